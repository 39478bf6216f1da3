"""`MetaConfig`: every knob of SMLMT episodes and the MAML inner loop, checked before training.

The fields are exactly the keys of `conf/meta/*.yaml` (each file instantiates this class through
`_target_: picomaml.meta.MetaConfig`), so a typo'd key fails as an unexpected keyword argument and an
out-of-range value fails in `__post_init__` with a ValueError naming the key and what is allowed.
Cross-section checks (`window_len` <= the model's `max_seq_len`) belong to whoever sees both sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

HYBRID_MODES = ("schedule", "sum")
SAMPLINGS = ("uniform", "freq_pow", "log_freq")
POOLINGS = ("last", "mean")
HEAD_INITS = ("kaiming", "xavier", "identity")
OUTPUT_INITS = ("proto", "zeros")


@dataclass
class MetaConfig:
    """SMLMT episode shape, word index, head and inner-loop settings.

    Episodes (see :mod:`picomaml.meta.smlmt`):
        n_way, k_shot, q_query: classes per task, support and query windows per class.
        tasks_per_step: tasks in one meta-batch (one optimizer step's worth of episodes).
        window_len: tokens per window before masking; windows are right-padded to it.
        min_window_tokens: windows (document chunks) shorter than this are never used, so a window is
            never just its masked word.
        buffer_tokens: the word index is built over the first `buffer_tokens` of the token stream.
        sampling, alpha: how class words are drawn: `uniform` over eligible word types,
            `freq_pow` proportional to (number of windows containing the word) ** alpha, or `log_freq`
            proportional to log(1 + that number).
        stop_words: "english" (the built-in list in :mod:`picomaml.meta.words`) or a list of words;
            never used as classes.
        min_word_chars: shorter words are never used as classes.
        meta_test_fraction: fraction of eligible word types held out as meta-test classes; the split is
            a hash of (split_seed, word), so it does not depend on the corpus or its order.
        split_seed: seed of that split (kept apart from the run seed so runs with different seeds are
            evaluated on the same held-out words).

    MAML (see :mod:`picomaml.meta.maml` and :mod:`picomaml.meta.head`):
        inner_steps, inner_lr: SGD steps on the support set and their learning rate.
        first_order: drop second-order terms (FOMAML); default false = full second order.
        learn_inner_lr: Meta-SGD style learned inner learning rate per head tensor (initialised at
            `inner_lr`).
        pooling: window representation, `last` real token or `mean` over real tokens.
        head_hidden_dims: widths of the head's MLP body ([] = the output layer sits on the backbone).
        head_init: initialisation of the body (`kaiming`, `xavier`, or `identity` = eye-like weights).
        output_init: `proto` (ProtoMAML, W = 2 s c_k, b = -s ||c_k||^2) or `zeros`.
        proto_scale: initial value of the meta-learned ProtoMAML scale s (features are unit-normalised,
            so squared distances lie in [0, 4]).

    Hybrid training (read by the LightningModule):
        enabled: false turns meta-learning off entirely (plain AR pretraining).
        hybrid_ratio: fraction of optimizer steps that are meta steps (`schedule`) or the meta weight r in
            loss = (1 - r) AR + r meta (`sum`).
        hybrid_mode: `schedule` or `sum`.
        val_episodes: meta-test episodes (of `tasks_per_step` tasks each) scored at every validation.
    """

    enabled: bool = True
    n_way: int = 5
    k_shot: int = 4
    q_query: int = 4
    tasks_per_step: int = 2
    inner_steps: int = 5
    inner_lr: float = 1.0
    first_order: bool = False
    learn_inner_lr: bool = False
    hybrid_ratio: float = 0.5
    hybrid_mode: str = "schedule"
    window_len: int = 64
    min_window_tokens: int = 8
    buffer_tokens: int = 1_000_000
    sampling: str = "uniform"
    alpha: float = 0.5
    stop_words: Any = "english"
    min_word_chars: int = 3
    meta_test_fraction: float = 0.1
    split_seed: int = 0
    pooling: str = "last"
    head_hidden_dims: list[int] = field(default_factory=list)
    head_init: str = "kaiming"
    output_init: str = "proto"
    proto_scale: float = 10.0
    val_episodes: int = 16

    def __post_init__(self) -> None:
        # Hydra hands over ListConfig objects; plain lists pickle into DataLoader workers and compare
        # equal to literals in tests.
        self.head_hidden_dims = [int(d) for d in self.head_hidden_dims]
        if not isinstance(self.stop_words, str):
            self.stop_words = [str(w) for w in self.stop_words]
        self._check()

    def _check(self) -> None:
        _at_least("n_way", self.n_way, 2)
        _at_least("k_shot", self.k_shot, 1)
        _at_least("q_query", self.q_query, 1)
        _at_least("tasks_per_step", self.tasks_per_step, 1)
        _at_least("val_episodes", self.val_episodes, 0)
        _at_least("inner_steps", self.inner_steps, 0)
        if not self.inner_lr > 0:
            raise ValueError(f"meta.inner_lr must be > 0, got {self.inner_lr}")
        if not 0.0 <= self.hybrid_ratio <= 1.0:
            raise ValueError(f"meta.hybrid_ratio must be in [0, 1], got {self.hybrid_ratio}")
        if not self.enabled and self.hybrid_ratio != 0.0:
            # a silently ignored key would make a sweep over it look like it measured something
            raise ValueError(
                f"meta.hybrid_ratio={self.hybrid_ratio} needs meta-learning on: pick a meta option "
                "(meta=5way4shot, ...) or set meta.enabled=true"
            )
        _one_of("hybrid_mode", self.hybrid_mode, HYBRID_MODES)
        _at_least("min_window_tokens", self.min_window_tokens, 2)
        if self.window_len < self.min_window_tokens:
            raise ValueError(
                f"meta.window_len must be >= meta.min_window_tokens ({self.min_window_tokens}), "
                f"got {self.window_len}"
            )
        _at_least("buffer_tokens", self.buffer_tokens, 1)
        _one_of("sampling", self.sampling, SAMPLINGS)
        if self.alpha < 0:
            raise ValueError(f"meta.alpha must be >= 0, got {self.alpha}")
        if isinstance(self.stop_words, str) and self.stop_words != "english":
            raise ValueError(f"meta.stop_words must be 'english' or a list of words, got {self.stop_words!r}")
        _at_least("min_word_chars", self.min_word_chars, 1)
        if not 0.0 <= self.meta_test_fraction < 1.0:
            raise ValueError(f"meta.meta_test_fraction must be in [0, 1), got {self.meta_test_fraction}")
        _one_of("pooling", self.pooling, POOLINGS)
        if any(d < 1 for d in self.head_hidden_dims):
            raise ValueError(f"meta.head_hidden_dims must be positive widths, got {self.head_hidden_dims}")
        _one_of("head_init", self.head_init, HEAD_INITS)
        _one_of("output_init", self.output_init, OUTPUT_INITS)
        if not self.proto_scale > 0:
            raise ValueError(f"meta.proto_scale must be > 0, got {self.proto_scale}")

    @property
    def shots(self) -> int:
        """Windows needed per class and task: k_shot support + q_query query."""
        return self.k_shot + self.q_query


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"meta.{key} must be >= {low}, got {value}")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"meta.{key} must be one of {', '.join(allowed)}; got {value!r}")
