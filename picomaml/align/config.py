"""The ``stage`` config group of ``python -m picomaml.align``: what to train, as checked dataclasses.

``stage=sft`` continues next-token training from a checkpoint; ``stage=dpo`` trains a policy initialised
from that checkpoint on preference pairs against a frozen copy of it. Every field is a key users type
(``stage.beta=0.5``); a value out of range raises ValueError naming ``stage.<key>`` and what is allowed,
which ``instantiate_section`` turns into the run's one-line config error before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass

CORRUPTIONS = ("shuffle", "other_doc", "wrong_term")
MONITOR_MODES = ("min", "max")
TEST_ON = ("best", "last")
SFT_METRICS = ("val/loss", "val/ppl")
DPO_METRICS = ("val/dpo_loss", "val/pref_acc", "val/reward_margin", "val/logp_acc")


def _check_monitor(monitor: str, mode: str, allowed: tuple[str, ...]) -> None:
    if monitor not in allowed:
        raise ValueError(
            f"stage.monitor={monitor!r} is not logged by this stage; allowed: {', '.join(allowed)}"
        )
    if mode not in MONITOR_MODES:
        raise ValueError(f"stage.monitor_mode={mode!r}; allowed: {', '.join(MONITOR_MODES)}")


@dataclass
class SFTStage:
    """Supervised fine-tuning: the AR objective of ``picomaml.train`` on the ``data=`` corpus, from the
    checkpoint's weights with a fresh optimizer and schedule (step 0). ``monitor``/``monitor_mode`` drive
    early stopping and are what the run returns to sweepers."""

    name: str = "sft"
    monitor: str = "val/loss"
    monitor_mode: str = "min"

    def __post_init__(self) -> None:
        _check_monitor(self.monitor, self.monitor_mode, SFT_METRICS)


@dataclass
class DPOStage:
    """Direct Preference Optimization on pairs built from the ``data=`` corpus (picomaml.align.preferences).

    Args:
        beta: the DPO temperature (how far the policy may move from the reference; the paper: 0.1-0.5).
        length_normalize: score a response by the mean of its token log-probabilities, not their sum.
        corruption: how the rejected response is made from the true continuation: ``shuffle`` (its tokens
            permuted), ``other_doc`` (another document's continuation at the same position) or
            ``wrong_term`` (``data=synthetic`` only: the next term of the number sequence, changed).
        prompt_tokens: prompt length for ``shuffle``/``other_doc``: a document's first tokens.
        response_tokens: length of the chosen (and rejected) continuation for ``shuffle``/``other_doc``.
        min_prompt_terms: ``wrong_term`` shows at least this many terms before the one to predict.
        max_train_pairs: keep at most this many training pairs (null: one per training document).
        test_share: share of the held-out (validation) documents whose pairs are test pairs; the rest
            are validation pairs (early stopping).
        pair_seed: seeds the cut points, the corruptions and the val/test split of held-out documents.
        monitor, monitor_mode: the validation metric of early stopping and of sweeps.
        test_on: which policy the test pairs score: ``best`` (the one of the best validation by
            ``monitor``, as Lightning's ``test(ckpt_path="best")``; the run's metrics then report that
            validation) or ``last`` (the final one: with early stopping, ``patience`` validations past
            the best).
    """

    name: str = "dpo"
    beta: float = 0.1
    length_normalize: bool = False
    corruption: str = "shuffle"
    prompt_tokens: int = 32
    response_tokens: int = 16
    min_prompt_terms: int = 3
    max_train_pairs: int | None = None
    test_share: float = 0.5
    pair_seed: int = 0
    monitor: str = "val/pref_acc"
    monitor_mode: str = "max"
    test_on: str = "best"

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"stage.beta must be > 0, got {self.beta}")
        if self.corruption not in CORRUPTIONS:
            raise ValueError(f"stage.corruption={self.corruption!r}; allowed: {', '.join(CORRUPTIONS)}")
        if self.prompt_tokens < 1:
            raise ValueError(f"stage.prompt_tokens must be >= 1, got {self.prompt_tokens}")
        if self.response_tokens < 2:
            raise ValueError(
                f"stage.response_tokens must be >= 2 (a shuffled single token is the same token), "
                f"got {self.response_tokens}"
            )
        if self.min_prompt_terms < 1:
            raise ValueError(f"stage.min_prompt_terms must be >= 1, got {self.min_prompt_terms}")
        if self.max_train_pairs is not None and self.max_train_pairs < 1:
            raise ValueError(f"stage.max_train_pairs must be >= 1 or null, got {self.max_train_pairs}")
        if not 0 < self.test_share < 1:
            raise ValueError(f"stage.test_share must be in (0, 1), got {self.test_share}")
        _check_monitor(self.monitor, self.monitor_mode, DPO_METRICS)
        if self.test_on not in TEST_ON:
            raise ValueError(f"stage.test_on={self.test_on!r}; allowed: {', '.join(TEST_ON)}")
