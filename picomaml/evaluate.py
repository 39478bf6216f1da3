"""Evaluate a checkpoint: perplexity two ways, next-token accuracy, and meta-test N-way K-shot accuracy.

CLI (key=value arguments, see :class:`EvalArgs`)::

    python -m picomaml.evaluate ckpt_path=outputs/train/runs/demo
    python -m picomaml.evaluate ckpt_path=outputs/.../run meta=10way4shot episodes=400 step=2048

writes ``<run>/eval_results/step_<N>.json`` and prints a table.

Language modelling, on the run's validation documents, each scored on its own (``[eos] + document``,
so every token of the document, its closing eos included, is predicted once; a document longer than
the context is cut into consecutive windows and the context restarts at each window):

- ``ppl_token_weighted`` = exp(total NLL / total tokens): every token counts the same, so long
  documents dominate. This is what ``val/ppl`` in training measures (on packed rows).
- ``ppl_doc_mean`` = mean over documents of exp(document NLL / document tokens): pico-train's (and the
  HF ``evaluate`` perplexity metric's) "mean perplexity"; every document counts the same, so short,
  hard documents pull it up. The two differ whenever documents differ in length or difficulty.
- ``top1_acc`` / ``top5_acc``: teacher-forced next-token accuracy over the same tokens.

Meta-test accuracy: ``episodes`` SMLMT tasks (one task per episode) whose classes are the held-out
meta-test words (never classes during meta-training), each scored by adapting the head on the support
set and classifying the query windows. Reported with 95% confidence intervals over tasks:
``meta_query_acc`` (after the inner loop), ``meta_no_adapt_acc`` (the head's initialisation alone; with
the ProtoMAML init that is a nearest-prototype classifier on the backbone features) and ``meta_chance``
(1/N). For an AR-only checkpoint (no trained meta head) the head is a **fresh initialisation** of the
requested meta config (seeded): the number then measures how well MAML from an untrained head init
separates held-out words with the backbone's features, which is the baseline a meta-trained run is
compared against.

:func:`evaluate_light` is the cheap periodic version for the training loop (the run's fixed validation
micro-batches and a few episodes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from picomaml.checkpoint import LoadedRun, load_run, main_guard, parse_cli_args
from picomaml.config import CONF_DIR, group_options
from picomaml.meta import MetaBatchDataset, MetaConfig, MetaHead, WordIndex, evaluate_episodes
from picomaml.model import PicoDecoder

# Fields of MetaConfig that describe the head and the window representation: a trained head is only
# meaningful with the values it was trained with, whatever episode shape is evaluated.
_HEAD_FIELDS = (
    "pooling",
    "head_hidden_dims",
    "head_init",
    "output_init",
    "proto_scale",
    "learn_inner_lr",
)
# rows of the vocabulary projection evaluated at once: bounds the fp32 [rows, V] logits block
_LOGIT_ROWS = 1024


# --- language modelling -----------------------------------------------------------------------------


class LMTotals:
    """Running sums of token NLL, per document and overall, and of top-1/top-5 hits."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.tokens = 0
        self.top1 = 0
        self.top5 = 0
        self.doc_nll: dict[int, float] = {}
        self.doc_tokens: dict[int, int] = {}

    def add(self, nll: torch.Tensor, doc_ids: torch.Tensor, top1: torch.Tensor, top5: torch.Tensor) -> None:
        """Add scored tokens: NLL [N] (fp32), their document ids [N], top-1/top-5 hits [N] (bool)."""
        self.nll += float(nll.double().sum())
        self.tokens += nll.numel()
        self.top1 += int(top1.sum())
        self.top5 += int(top5.sum())
        docs, inverse = doc_ids.unique(return_inverse=True)
        sums = torch.zeros(len(docs), dtype=torch.float64, device=nll.device).index_add_(
            0, inverse, nll.double()
        )
        counts = torch.bincount(inverse, minlength=len(docs))
        for doc, s, c in zip(docs.tolist(), sums.tolist(), counts.tolist(), strict=True):
            self.doc_nll[doc] = self.doc_nll.get(doc, 0.0) + s
            self.doc_tokens[doc] = self.doc_tokens.get(doc, 0) + c

    def result(self) -> dict[str, float]:
        """``loss``, ``ppl_token_weighted``, ``ppl_doc_mean``, ``top1_acc``, ``top5_acc``, counts."""
        if not self.tokens:
            raise ValueError("no tokens were scored")
        loss = self.nll / self.tokens
        doc_ppl = [math.exp(self.doc_nll[d] / self.doc_tokens[d]) for d in self.doc_nll]
        return {
            "loss": loss,
            "ppl_token_weighted": math.exp(loss),
            "ppl_doc_mean": float(np.mean(doc_ppl)),
            "top1_acc": self.top1 / self.tokens,
            "top5_acc": self.top5 / self.tokens,
            "n_tokens": float(self.tokens),
            "n_docs": float(len(doc_ppl)),
        }


@torch.no_grad()
def score_batch(model: PicoDecoder, tokens: torch.Tensor, doc_ids: torch.Tensor, totals: LMTotals) -> None:
    """Score one batch ``tokens`` [B, T+1] (inputs ``[:, :-1]``, labels ``[:, 1:]``) into ``totals``.

    ``doc_ids`` [B, T+1] gives the document of every token; a label whose id is negative (padding) is
    not scored. The logits are formed a block of rows at a time, so memory stays O(rows x V).
    """
    labels, label_docs = tokens[:, 1:].flatten(), doc_ids[:, 1:].flatten()
    hidden = model.hidden_states(tokens[:, :-1]).flatten(0, 1)  # [N, D]
    keep = label_docs >= 0
    hidden, labels, label_docs = hidden[keep], labels[keep], label_docs[keep]
    for start in range(0, labels.numel(), _LOGIT_ROWS):
        rows = slice(start, start + _LOGIT_ROWS)
        logits = model.de_embedding_proj(hidden[rows]).float()
        nll = F.cross_entropy(logits, labels[rows], reduction="none")
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hit5 = (top5 == labels[rows, None]).any(dim=-1)
        totals.add(nll, label_docs[rows], top5[:, 0] == labels[rows], hit5)


def evaluate_lm(
    model: PicoDecoder, batches: Iterable[dict[str, torch.Tensor]], device: torch.device | str | None = None
) -> dict[str, float]:
    """Perplexities and accuracies over batches of ``{"tokens", "doc_ids"}`` (see :func:`score_batch`).

    Works with the datamodule's packed validation micro-batches (tokens near a document boundary then
    see the previous document as context) and with :func:`document_batches` (each document alone).
    """
    device = next(model.parameters()).device if device is None else torch.device(device)
    totals = LMTotals()
    for batch in batches:
        score_batch(model, batch["tokens"].to(device), batch["doc_ids"].to(device), totals)
    return totals.result()


def document_batches(
    documents: Iterable[tuple[int, np.ndarray]],
    seq_len: int,
    batch_size: int,
    bos_id: int,
    pad_id: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches that score each ``(doc_id, tokens)`` document on its own.

    A document becomes ``[bos_id] + tokens`` (GPT-2 style: the end-of-text token opens a document, as it
    does in packed training data) cut into windows of ``seq_len + 1`` tokens that overlap by one, so every
    document token is a label exactly once. Windows are right-padded with ``pad_id``; padding and the
    leading bos carry doc id -1 and are never scored.
    """
    rows: list[np.ndarray] = []
    ids: list[np.ndarray] = []

    def flush() -> dict[str, torch.Tensor]:
        batch = {"tokens": torch.from_numpy(np.stack(rows)), "doc_ids": torch.from_numpy(np.stack(ids))}
        rows.clear()
        ids.clear()
        return batch

    for doc_id, tokens in documents:
        seq = np.concatenate([[bos_id], np.asarray(tokens, dtype=np.int64)])
        owner = np.full(seq.size, doc_id, dtype=np.int64)
        owner[0] = -1
        for start in range(0, seq.size - 1, seq_len):
            window = seq[start : start + seq_len + 1]
            row = np.full(seq_len + 1, pad_id, dtype=np.int64)
            row_ids = np.full(seq_len + 1, -1, dtype=np.int64)
            row[: window.size] = window
            row_ids[: window.size] = owner[start : start + window.size]
            rows.append(row)
            ids.append(row_ids)
            if len(rows) == batch_size:
                yield flush()
    if rows:
        yield flush()


# --- meta-test ----------------------------------------------------------------------------------------


def load_meta_config(name: str, **overrides: Any) -> MetaConfig:
    """The :class:`MetaConfig` of ``conf/meta/<name>.yaml`` with fields replaced by ``overrides``."""
    path = CONF_DIR / "meta" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown meta config {name!r}; valid names: {', '.join(group_options('meta'))}")
    values = yaml.safe_load(path.read_text())
    values.pop("_target_", None)
    return MetaConfig(**{**values, **overrides})


def eval_meta_config(requested: MetaConfig, trained: MetaConfig | None) -> MetaConfig:
    """The config episodes are evaluated with: one task per episode (so M episodes = M tasks, one CI
    sample each), the requested episode shape and inner loop, and a trained head's own representation
    and architecture fields (:data:`_HEAD_FIELDS`)."""
    head_fields = {k: getattr(trained, k) for k in _HEAD_FIELDS} if trained is not None else {}
    return dataclasses.replace(requested, tasks_per_step=1, enabled=True, **head_fields)


def meta_test_dataset(datamodule: Any, cfg: MetaConfig, seed: int) -> MetaBatchDataset:
    """Meta-test episodes over the word index of the first ``cfg.buffer_tokens`` training tokens.

    The index covers the same text as meta-training's; the held-out words (``meta_test_fraction`` of the
    eligible word types, chosen by a hash of ``split_seed``) are the classes. Raises ValueError when the
    corpus has too few held-out words for ``n_way`` classes.
    """
    stream = datamodule.train_token_stream(cfg.buffer_tokens)
    index = WordIndex.build(stream.tokens, datamodule.tokenizer, cfg)
    return MetaBatchDataset(index, cfg, seed, meta_test=True)


def evaluate_meta(
    model: PicoDecoder,
    head: MetaHead | None,
    dataset: MetaBatchDataset,
    cfg: MetaConfig,
    episodes: int,
    seed: int = 0,
) -> dict[str, float]:
    """Meta-test accuracy over ``episodes`` episodes, as ``meta_*`` keys; ``head=None`` uses a fresh
    :class:`MetaHead` of ``cfg`` initialised from ``seed`` (the global RNG is left untouched)."""
    device = next(model.parameters()).device
    if head is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = MetaHead(model.config.d_model, cfg)
    head = head.to(device)
    with torch.enable_grad():  # the inner loop differentiates the head's support loss
        stats = evaluate_episodes(model.hidden_states, dataset, head, cfg, range(episodes), device=device)
    return {f"meta_{k}": v for k, v in stats.items()}


# --- periodic evaluation during training -----------------------------------------------------------------

_META_DATASETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def evaluate_light(
    module: Any,
    datamodule: Any,
    meta_config: MetaConfig | None = None,
    episodes: int = 20,
    max_val_batches: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """A cheap evaluation the training loop can run every few hundred steps (on one rank).

    Perplexities and accuracies (:func:`evaluate_lm`) on the datamodule's fixed validation micro-batches
    (the first ``max_val_batches``, default all), plus meta-test accuracy over ``episodes`` episodes. The
    meta config is ``meta_config`` if given, else ``module.hparams["meta_config"]``; with neither, no
    meta-test keys are returned. The head is ``module.meta_head`` when the module has one, else a fresh
    seeded init (see the module docstring). The meta-test index is built once per datamodule and config.

    It leaves the training state alone: no optimizer, RNG or ``.grad`` is touched (the inner loop takes
    gradients of the head with ``torch.autograd.grad`` only), and the model's train/eval mode is restored.
    Call it outside ``torch.inference_mode`` (e.g. from a training-batch hook; picomaml's Trainer runs
    with ``inference_mode=False``), since the inner loop needs autograd.
    """
    model: PicoDecoder = module.model
    was_training = model.training
    model.eval()
    try:
        batches = datamodule.val_batches_list()[:max_val_batches]
        results = evaluate_lm(model, batches) if batches else {}
        if meta_config is None and "meta_config" in getattr(module, "hparams", {}):
            meta_config = MetaConfig(**dict(module.hparams["meta_config"]))
        if meta_config is not None and episodes > 0:
            head = getattr(module, "meta_head", None)
            cfg = eval_meta_config(meta_config, meta_config if head is not None else None)
            per_module = _META_DATASETS.setdefault(datamodule, {})
            key = (repr(cfg), seed)  # the dataclass repr lists every field
            if key not in per_module:
                per_module[key] = meta_test_dataset(datamodule, cfg, seed)
            was_head_training = head.training if head is not None else False
            if head is not None:
                head.eval()
            try:
                results.update(evaluate_meta(model, head, per_module[key], cfg, episodes, seed))
            finally:
                if head is not None:
                    head.train(was_head_training)
        return results
    finally:
        model.train(was_training)


# --- CLI ---------------------------------------------------------------------------------------------------


@dataclass
class EvalArgs:
    """Arguments of ``python -m picomaml.evaluate`` (key=value).

    ckpt_path: run dir, .ckpt file or checkpoints/step_N dir. step: checkpoint step of a run dir
    (default last). meta: meta config name (conf/meta), ``auto`` = the run's own (5way4shot for an
    AR-only run), ``off`` = skip meta-test. episodes: meta-test tasks. seed: episode and fresh-head seed.
    max_docs: score only the first validation documents (default all). seq_len: context per window
    (default the run's data.seq_len). batch_size: windows per forward. buffer_tokens: tokens indexed for
    meta-test words (default the meta config's). cache_dir: the data cache (default the run's).
    device: cpu, cuda or auto. out: JSON path (default <run>/eval_results/step_<N>.json).
    """

    ckpt_path: str
    step: int | None = None
    meta: str = "auto"
    episodes: int = 200
    seed: int = 0
    max_docs: int | None = None
    seq_len: int | None = None
    batch_size: int = 8
    buffer_tokens: int | None = None
    cache_dir: str | None = None
    device: str = "auto"
    out: str | None = None


def evaluate_run(args: EvalArgs) -> dict[str, Any]:
    """Evaluate one checkpoint as described in the module docstring; returns what is written to JSON."""
    run = load_run(args.ckpt_path, args.step)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    model = run.model.to(device)
    datamodule = run.datamodule(**({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    seq_len = args.seq_len or int(run.train_config.data.seq_len)
    if seq_len > run.model_config.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={run.model_config.max_seq_len}")

    results: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "checkpoint": str(run.checkpoint_path),
        "step": run.step,
    }
    results.update(evaluate_lm(model, _validation_batches(datamodule, seq_len, args)))
    results.update(_evaluate_run_meta(run, model, datamodule, args))
    out = Path(args.out) if args.out else run.run_dir / "eval_results" / f"step_{run.step}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    results["output"] = str(out)
    return results


def _validation_batches(datamodule: Any, seq_len: int, args: EvalArgs) -> Iterable[dict[str, torch.Tensor]]:
    """Each validation document on its own; Dolma (streamed, no document list) uses the packed rows."""
    if datamodule.corpus_name == "dolma":
        return datamodule.val_batches_list()
    stream = datamodule.val_token_stream()
    n_docs = stream.n_docs if args.max_docs is None else min(args.max_docs, stream.n_docs)
    docs = ((int(stream.doc_ids[k]), stream.document(k)) for k in range(n_docs))
    tokenizer = datamodule.tokenizer
    return document_batches(docs, seq_len, args.batch_size, tokenizer.eos_token_id, tokenizer.pad_token_id)


def _evaluate_run_meta(run: LoadedRun, model: PicoDecoder, datamodule: Any, args: EvalArgs) -> dict[str, Any]:
    if args.meta == "off" or args.episodes <= 0:
        return {}
    if args.meta == "auto":
        requested = run.meta_config or load_meta_config("5way4shot")
    else:
        requested = load_meta_config(args.meta)
    if args.buffer_tokens is not None:
        requested = dataclasses.replace(requested, buffer_tokens=args.buffer_tokens)
    cfg = eval_meta_config(requested, run.meta_config if run.meta_head is not None else None)
    info: dict[str, Any] = {
        "meta_config": dataclasses.asdict(cfg),
        "meta_head": "trained" if run.meta_head is not None else "fresh init (AR-only checkpoint)",
    }
    try:
        dataset = meta_test_dataset(datamodule, cfg, args.seed)
    except ValueError as err:  # e.g. a synthetic corpus of number words: too few held-out words
        print(f"warning: meta-test skipped: {err}", file=sys.stderr)
        return {**info, "meta_skipped": str(err)}
    return {**info, **evaluate_meta(model, run.meta_head, dataset, cfg, args.episodes, args.seed)}


def print_results(results: dict[str, Any]) -> None:
    """A small table of the headline numbers."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['run_dir']}  step {results['step']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("ppl_token_weighted", "ppl_doc_mean", "loss", "top1_acc", "top5_acc", "n_docs", "n_tokens"):
        table.add_row(key, f"{results[key]:.4g}")
    if "meta_query_acc" in results:
        for name in ("query_acc", "no_adapt_acc"):
            value, ci = results[f"meta_{name}"], results[f"meta_{name}_ci95"]
            table.add_row(f"meta_{name}", f"{value:.3f} ± {ci:.3f}")
        table.add_row("meta_chance", f"{results['meta_chance']:.3f}")
        table.add_row("meta_tasks", f"{results['meta_tasks']:.0f}")
        table.add_row("meta_head", results["meta_head"])
    elif "meta_skipped" in results:
        table.add_row("meta-test", "skipped")
    Console().print(table)
    print(f"wrote {results['output']}")


def _main(argv: list[str]) -> dict[str, Any]:
    args = parse_cli_args(EvalArgs, argv, "picomaml.evaluate")
    try:
        results = evaluate_run(args)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    print_results(results)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point (see the module docstring)."""
    return main_guard(_main, argv)


if __name__ == "__main__":
    main()
