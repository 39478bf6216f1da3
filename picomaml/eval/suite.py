"""One evaluation suite for a checkpoint, shared by ``python -m picomaml.evaluate`` and the end-of-fit
callback (:class:`picomaml.lit.final_eval.FinalEvaluation`), so both write the same numbers.

A suite is any of three parts, scored on one loaded checkpoint (:class:`~picomaml.runs.LoadedRun`):

- ``lm``: perplexities and next-token accuracy on the run's validation documents, each document scored
  on its own (:func:`validation_batches`, :func:`picomaml.eval.lm.evaluate_lm`);
- ``meta``: SMLMT meta-test N-way K-shot accuracy on held-out words (:mod:`picomaml.eval.meta`);
- ``downstream``: few-shot classification on real labelled data, head-only and fully fine-tuned,
  with the TF-IDF floor (:mod:`picomaml.eval.downstream`);
- ``numeric``: per-kind number-token accuracy, greedy-continuation exact match and length extrapolation
  on generated number sequences, for runs trained on ``data=synthetic`` (:mod:`picomaml.eval.numeric`).

Which head a checkpoint is scored with: its own only if it was meta-trained, that is the run took meta
steps (``meta.hybrid_ratio > 0``) and the checkpoint is past step 0 (:func:`trained_head`). Otherwise
(an AR-only run, an AR arm that carries a meta config with ``hybrid_ratio=0``, any step-0 checkpoint)
the head is a fresh initialisation seeded by the suite's ``seed``. So the AR arm of a study and the
step-0 control are scored exactly like ``meta=off`` runs, and a run's step-0 checkpoint gets the same
numbers in both arms of a seed (their weights are the same random init).

Every score is a function of the checkpoint and the :class:`SuiteOptions` only: validation documents,
meta-test episodes and downstream episodes are fixed by the options' ``seed``, never by the run's seed,
so any two checkpoints scored with the same options saw identical data and can be compared pairwise.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from picomaml.eval.downstream import DownstreamConfig, evaluate_downstream
from picomaml.eval.lm import document_batches, evaluate_lm
from picomaml.eval.meta import eval_meta_config, evaluate_meta, load_meta_config
from picomaml.eval.numeric import NumericConfig, evaluate_numeric, run_numeric_setup
from picomaml.meta import MetaBatchDataset, MetaConfig, MetaHead
from picomaml.model import PicoDecoder
from picomaml.runs import LoadedRun, read_checkpoint

SUITE_PARTS = ("lm", "meta", "downstream", "numeric")
# what an AR-only checkpoint is meta-tested with when no meta config is asked for
DEFAULT_META = "5way4shot"


def parse_suite(suite: str | Sequence[str]) -> tuple[str, ...]:
    """``"lm,meta"`` (or a list) as a tuple of :data:`SUITE_PARTS`, in the canonical order; ValueError
    naming the unknown part otherwise."""
    parts = [p.strip() for p in suite.split(",")] if isinstance(suite, str) else [str(p) for p in suite]
    parts = [p for p in parts if p]
    unknown = [p for p in parts if p not in SUITE_PARTS]
    if unknown or not parts:
        raise ValueError(f"suite: unknown part(s) {unknown or parts}; choose from {', '.join(SUITE_PARTS)}")
    return tuple(p for p in SUITE_PARTS if p in parts)


@dataclass
class SuiteOptions:
    """What a suite scores and with how much data; the same options give the same data to every checkpoint.

    suite: the parts to run (:data:`SUITE_PARTS`). meta: a ``conf/meta`` option name for the meta-test
    episode shape, or ``auto`` (the run's own meta config, :data:`DEFAULT_META` for an AR-only run);
    ``off`` skips the meta part. episodes: meta-test tasks (one CI sample each). seed: meta-test
    episodes and fresh-head init. max_docs: score only the first validation documents (None: all).
    seq_len: context per scored window (None: the run's ``data.seq_len``). batch_size: windows per
    forward. buffer_tokens: meta-test tokens indexed for words (None: the meta config's).
    downstream: the downstream config (its own ``seed`` fixes the downstream episodes).
    numeric: the numeric-sequence config (its own ``seed`` fixes the evaluation sequences).
    """

    suite: tuple[str, ...] = ("lm", "meta")
    meta: str = "auto"
    episodes: int = 200
    seed: int = 0
    max_docs: int | None = None
    seq_len: int | None = None
    batch_size: int = 8
    buffer_tokens: int | None = None
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    numeric: NumericConfig = field(default_factory=NumericConfig)

    def __post_init__(self) -> None:
        self.suite = parse_suite(self.suite)
        if self.episodes < 0:
            raise ValueError(f"episodes must be >= 0, got {self.episodes}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def trained_head(run: LoadedRun) -> MetaHead | None:
    """The checkpoint's meta head if it was ever meta-trained, else None (score with a fresh head).

    A run with ``meta.hybrid_ratio=0`` saves a head that never took a step, and a step-0 checkpoint
    saves the random init: neither is a meta-learned head, and calling it one would credit the AR arm
    with a head it never trained.
    """
    if run.meta_head is None or run.meta_config is None or run.step == 0:
        return None
    return run.meta_head if run.meta_config.hybrid_ratio > 0 else None


def training_state(run: LoadedRun) -> dict[str, float]:
    """What training had done when the checkpoint was saved: ``tokens_seen`` (AR tokens plus the real,
    unpadded tokens of meta windows), ``meta_steps`` and ``ar_steps`` (optimizer steps of each kind).
    Empty for a checkpoint that does not record them."""
    state = read_checkpoint(run.checkpoint_path).get("picomaml") or {}
    return {key: float(state[key]) for key in ("tokens_seen", "meta_steps", "ar_steps") if key in state}


def validation_batches(
    datamodule: Any, seq_len: int, batch_size: int, max_docs: int | None = None
) -> Iterable[dict[str, torch.Tensor]]:
    """Each validation document on its own; Dolma (streamed, no document list) uses the packed rows."""
    if datamodule.corpus_name == "dolma":
        return datamodule.val_batches_list()
    stream = datamodule.val_token_stream()
    n_docs = stream.n_docs if max_docs is None else min(max_docs, stream.n_docs)
    docs = ((int(stream.doc_ids[k]), stream.document(k)) for k in range(n_docs))
    tokenizer = datamodule.tokenizer
    return document_batches(docs, seq_len, batch_size, tokenizer.eos_token_id, tokenizer.pad_token_id)


class SuiteRunner:
    """Scores checkpoints of runs that share one datamodule (a run's checkpoints, or the runs of a sweep
    over one corpus), with the same :class:`SuiteOptions`.

    The meta-test index (a pass over the held-out documents) is built once per meta config and reused
    for every checkpoint scored here, e.g. a run's final and step-0 checkpoints.
    """

    def __init__(self, datamodule: Any, options: SuiteOptions, device: torch.device | str) -> None:
        self.datamodule = datamodule
        self.options = options
        self.device = torch.device(device)
        self._meta_datasets: dict[str, MetaBatchDataset | str] = {}

    def score(self, run: LoadedRun) -> dict[str, Any]:
        """The suite's results for ``run``'s checkpoint, as a flat JSON-ready dict.

        Keys: ``run_dir``, ``checkpoint``, ``step``, ``n_params``, ``n_params_non_embedding``, the
        checkpoint's :func:`training_state` and ``eval_s/<part>`` (wall seconds of each part, to size
        evaluation budgets); with ``lm`` the keys of :func:`~picomaml.eval.lm.evaluate_lm`; with
        ``meta`` the ``meta_*`` keys of :func:`~picomaml.eval.meta.evaluate_meta` plus ``meta_config``
        and ``meta_head`` (``trained`` or ``fresh init (...)``), or ``meta_skipped`` with the reason;
        with ``downstream`` the ``downstream/...`` keys of
        :func:`~picomaml.eval.downstream.evaluate_downstream`; with ``numeric`` the ``numeric/...``
        keys of :func:`~picomaml.eval.numeric.evaluate_numeric`.
        """
        opts = self.options
        model = run.model.to(self.device).eval()
        results: dict[str, Any] = {
            "run_dir": str(run.run_dir),
            "checkpoint": str(run.checkpoint_path),
            "step": run.step,
            "n_params": float(model.num_parameters()),
            "n_params_non_embedding": float(model.num_parameters(exclude_embeddings=True)),
            **training_state(run),
        }
        head = trained_head(run)
        parts = {"lm": self._lm, "meta": self._meta, "downstream": self._downstream, "numeric": self._numeric}
        for part in opts.suite:
            start = time.perf_counter()
            results.update(parts[part](run, model, head))
            results[f"eval_s/{part}"] = time.perf_counter() - start
        return results

    def _lm(self, run: LoadedRun, model: PicoDecoder, head: MetaHead | None) -> dict[str, Any]:
        seq_len = self.options.seq_len or int(run.train_config.data.seq_len)
        if seq_len > run.model_config.max_seq_len:
            raise ValueError(
                f"seq_len={seq_len} exceeds the model's max_seq_len={run.model_config.max_seq_len}"
            )
        opts = self.options
        return evaluate_lm(
            model, validation_batches(self.datamodule, seq_len, opts.batch_size, opts.max_docs)
        )

    def _downstream(self, run: LoadedRun, model: PicoDecoder, head: MetaHead | None) -> dict[str, Any]:
        # a trained head reads the representation it was trained with; a fresh one the requested config's
        meta_cfg = eval_meta_config(self._requested_meta(run), run.meta_config if head else None)
        tokenizer = self.datamodule.tokenizer
        return evaluate_downstream(model, head, tokenizer, self.options.downstream, meta_cfg, self.device)

    def _numeric(self, run: LoadedRun, model: PicoDecoder, head: MetaHead | None) -> dict[str, Any]:
        config = self.options.numeric
        train_terms, kinds = run_numeric_setup(run.train_config, config)
        return evaluate_numeric(
            model,
            self.datamodule.tokenizer,
            config,
            train_terms,
            kinds,
            self.device,
            model.config.max_seq_len,
        )

    def _requested_meta(self, run: LoadedRun) -> MetaConfig:
        """The meta config the options ask for (``auto``: the run's own, else :data:`DEFAULT_META`)."""
        opts = self.options
        if opts.meta in ("auto", "off"):
            requested = run.meta_config or load_meta_config(DEFAULT_META)
        else:
            requested = load_meta_config(opts.meta)
        if opts.buffer_tokens is not None:
            requested = dataclasses.replace(requested, buffer_tokens=opts.buffer_tokens)
        return requested

    def _meta(self, run: LoadedRun, model: PicoDecoder, head: MetaHead | None) -> dict[str, Any]:
        opts = self.options
        if opts.meta == "off" or opts.episodes <= 0:
            return {}
        # a trained head is only meaningful with the representation it was trained with
        cfg = eval_meta_config(self._requested_meta(run), run.meta_config if head is not None else None)
        info: dict[str, Any] = {
            "meta_config": dataclasses.asdict(cfg),
            "meta_head": "trained" if head is not None else _fresh_head_reason(run),
        }
        key = repr(cfg)  # the dataclass repr lists every field
        if key not in self._meta_datasets:
            try:
                self._meta_datasets[key] = self.datamodule.meta_test_dataset(cfg, opts.seed)
            except ValueError as err:  # e.g. a synthetic corpus of number words: too few held-out words
                print(f"warning: meta-test skipped: {err}", file=sys.stderr)
                self._meta_datasets[key] = str(err)
        dataset = self._meta_datasets[key]
        if isinstance(dataset, str):
            return {**info, "meta_skipped": dataset}
        return {**info, **evaluate_meta(model, head, dataset, cfg, opts.episodes, opts.seed)}


def _fresh_head_reason(run: LoadedRun) -> str:
    if run.meta_head is None:
        return "fresh init (AR-only checkpoint)"
    if run.step == 0:
        return "fresh init (step 0: no meta step taken yet)"
    return "fresh init (meta.hybrid_ratio=0: the head never trained)"
