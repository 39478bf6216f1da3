"""``python -m picomaml.evaluate``: score a checkpoint, as language model and as meta-learner.

    python -m picomaml.evaluate ckpt_path=outputs/train/runs/demo
    python -m picomaml.evaluate ckpt_path=outputs/.../run meta=10way4shot episodes=400 step=2048

writes ``<run>/eval_results/step_<N>.json`` and prints a table: perplexities and next-token accuracy on
the run's validation documents (:mod:`picomaml.eval.lm`) and meta-test N-way K-shot accuracy on held-out
words (:mod:`picomaml.eval.meta`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from picomaml.cli import main_guard, parse_cli_args
from picomaml.eval.lm import document_batches, evaluate_lm
from picomaml.eval.meta import eval_meta_config, evaluate_meta, load_meta_config
from picomaml.model import PicoDecoder
from picomaml.runs import LoadedRun, load_run


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
        dataset = datamodule.meta_test_dataset(cfg, args.seed)
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
