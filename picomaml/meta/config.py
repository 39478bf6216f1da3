"""`MetaConfig`: every knob of SMLMT episodes and the MAML inner loop, checked before training.

The fields are exactly the keys of the `meta` config group (its `base` option is this dataclass at its
defaults, which every `conf/meta/*.yaml` extends), so a typo'd key fails as an unexpected keyword argument
and an out-of-range value fails in `__post_init__` with a ValueError naming the key and what is allowed.
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
    """SMLMT episode shape, word index, head and inner-loop settings: the `meta` config group.

    The defaults are the `meta=5way4shot` job; each file in `conf/meta/` lists `base` (these fields at
    their defaults) first and states only what differs.
    """

    # --- hybrid training (read by the LightningModule) ---
    enabled: bool = True
    """False turns meta-learning off entirely (plain AR pretraining, `meta=off`)."""
    hybrid_ratio: float = 0.5
    """Fraction of optimizer steps that are meta steps (`schedule`), or r in (1 - r) AR + r meta (`sum`)."""
    hybrid_mode: str = "schedule"
    """`schedule` (a seeded coin per step, the same on every rank) or `sum`."""
    val_episodes: int = 16
    """Meta-test episodes (of `tasks_per_step` tasks each) scored at every validation."""

    # --- episodes (picomaml.meta.smlmt) ---
    n_way: int = 5
    """Classes (word types) per task."""
    k_shot: int = 4
    """Support windows per class."""
    q_query: int = 4
    """Query windows per class."""
    tasks_per_step: int = 2
    """Tasks in one meta-batch (one optimizer step's worth of episodes)."""
    window_len: int = 64
    """Tokens per window before masking; windows are right-padded to it (<= model.max_seq_len)."""
    min_window_tokens: int = 8
    """Windows (document chunks) shorter than this are never used, so a window is never just its word."""

    # --- word index (picomaml.meta.words) ---
    buffer_tokens: int = 1_000_000
    """The word index is built over the first `buffer_tokens` of the token stream (the whole wiki)."""
    sampling: str = "uniform"
    """How class words are drawn: `uniform` over eligible words, `freq_pow` proportional to (windows
    containing the word) ** alpha, `log_freq` proportional to log(1 + that number)."""
    alpha: float = 0.5
    """Exponent of `freq_pow`."""
    stop_words: Any = "english"
    """`english` (the list in picomaml.meta.words) or a list of words; never used as classes."""
    min_word_chars: int = 3
    """Shorter words are never used as classes."""
    meta_test_fraction: float = 0.1
    """Fraction of eligible word types held out as meta-test classes (a hash of (split_seed, word), so
    it depends on neither the corpus nor its order)."""
    split_seed: int = 0
    """Seed of that split, apart from the run seed so runs of every seed are scored on the same words."""

    # --- head (picomaml.meta.head) ---
    pooling: str = "last"
    """Window representation: the `last` real token, or the `mean` over real tokens."""
    head_hidden_dims: list[int] = field(default_factory=list)
    """Widths of the head's MLP body ([] = the output layer sits on the backbone features)."""
    head_init: str = "kaiming"
    """Body initialisation: `kaiming`, `xavier` or `identity` (eye-like weights)."""
    output_init: str = "proto"
    """`proto` (ProtoMAML, W = 2 s c_k, b = -s ||c_k||^2) or `zeros`."""
    proto_scale: float = 10.0
    """Initial meta-learned ProtoMAML scale s (features are unit-normalised: squared distances in [0, 4])."""

    # --- inner loop (picomaml.meta.maml) ---
    inner_steps: int = 5
    """SGD steps on the support set per task (0 = the ProtoMAML init alone)."""
    inner_lr: float = 1.0
    """Their step size; with unit-normalised features one step moves a logit by about lr / n_way at most."""
    first_order: bool = False
    """Drop second-order terms (FOMAML); the default is full second order."""
    learn_inner_lr: bool = False
    """Meta-SGD: a learned step size per head tensor, initialised at `inner_lr`."""

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
