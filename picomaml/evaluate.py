"""``python -m picomaml.evaluate``: score a checkpoint, as language model, meta-learner and few-shot
classifier.

    python -m picomaml.evaluate ckpt_path=outputs/train/runs/demo
    python -m picomaml.evaluate ckpt_path=outputs/.../run meta=10way4shot episodes=400 step=2048
    python -m picomaml.evaluate ckpt_path=outputs/.../run suite=lm,meta,downstream control=step0

writes ``<run>/eval_results/step_<N>.json`` and prints a table. The suite (:mod:`picomaml.eval.suite`,
the same code the end-of-fit :class:`~picomaml.lit.final_eval.FinalEvaluation` runs) is any of ``lm``
(perplexities and next-token accuracy on the run's validation documents), ``meta`` (meta-test N-way
K-shot accuracy on held-out words) and ``downstream`` (few-shot classification of real labelled data,
head-only and fully fine-tuned, with the TF-IDF floor) and ``numeric`` (per-kind number-token accuracy,
greedy-continuation exact match and length extrapolation, for ``data=synthetic`` runs).
``control=step0`` also scores the run's step-0 checkpoint (its random init) with the same data and stores
it under ``"step0"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from picomaml.cli import main_guard, parse_cli_args, pick_device, usage_error
from picomaml.eval.downstream import DownstreamConfig
from picomaml.eval.numeric import NumericConfig
from picomaml.eval.suite import SuiteOptions, SuiteRunner
from picomaml.runs import load_run

CONTROLS = ("step0",)
LM_KEYS = ("ppl_token_weighted", "ppl_doc_mean", "loss", "top1_acc", "top5_acc", "n_docs", "n_tokens")


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
    suite: comma-separated parts, of lm, meta, downstream, numeric (default lm,meta). control: ``step0`` also
    scores the run's step-0 checkpoint (the random init), stored under "step0". downstream_ks,
    downstream_episodes, downstream_finetune_episodes, downstream_test_per_class: the downstream
    budget (default picomaml.eval.downstream.DownstreamConfig's; ks as a list, e.g. 4,8).
    numeric_per_kind, numeric_lengths, numeric_terms: sequences per kind and length, the multiples of
    the training length scored (e.g. 1,2,4) and the terms a greedy continuation must get right (default
    picomaml.eval.numeric.NumericConfig's).
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
    suite: str = "lm,meta"
    control: str | None = None
    downstream_ks: str | None = None
    downstream_episodes: int | None = None
    downstream_finetune_episodes: int | None = None
    downstream_test_per_class: int | None = None
    numeric_per_kind: int | None = None
    numeric_lengths: str | None = None
    numeric_terms: int | None = None


def suite_options(args: EvalArgs) -> SuiteOptions:
    """The :class:`SuiteOptions` the arguments ask for (ValueError naming a bad one)."""
    downstream: dict[str, Any] = {}
    if args.downstream_ks is not None:
        downstream["ks"] = [int(k) for k in args.downstream_ks.split(",") if k.strip()]
    if args.downstream_episodes is not None:
        downstream["episodes"] = args.downstream_episodes
        # fine-tuning runs on a prefix of the episodes; keep the default prefix valid for few episodes
        downstream["finetune_episodes"] = min(args.downstream_episodes, DownstreamConfig.finetune_episodes)
    if args.downstream_finetune_episodes is not None:
        downstream["finetune_episodes"] = args.downstream_finetune_episodes
    if args.downstream_test_per_class is not None:
        downstream["test_per_class"] = args.downstream_test_per_class
    numeric: dict[str, Any] = {}
    if args.numeric_per_kind is not None:
        numeric["per_kind"] = args.numeric_per_kind
    if args.numeric_lengths is not None:
        numeric["lengths"] = [int(m) for m in str(args.numeric_lengths).split(",") if m.strip()]
    if args.numeric_terms is not None:
        numeric["continuation_terms"] = args.numeric_terms
    return SuiteOptions(
        suite=args.suite,
        meta=args.meta,
        episodes=args.episodes,
        seed=args.seed,
        max_docs=args.max_docs,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        buffer_tokens=args.buffer_tokens,
        downstream=DownstreamConfig(**downstream),
        numeric=NumericConfig(**numeric),
    )


def evaluate_run(args: EvalArgs) -> dict[str, Any]:
    """Evaluate one checkpoint as described in the module docstring; returns what is written to JSON."""
    if args.control is not None and args.control not in CONTROLS:
        raise ValueError(f"control={args.control!r}: choose from {', '.join(CONTROLS)}")
    options = suite_options(args)
    run = load_run(args.ckpt_path, args.step)
    device = pick_device(args.device)
    datamodule = run.datamodule(**({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    runner = SuiteRunner(datamodule, options, device)
    results = runner.score(run)
    if args.control == "step0":
        results["step0"] = runner.score(load_run(run.run_dir, step=0))
    out = Path(args.out) if args.out else run.run_dir / "eval_results" / f"step_{run.step}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    results["output"] = str(out)
    return results


def _rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric, formatted value) rows of the headline numbers of one scored checkpoint."""
    rows = [(key, f"{results[key]:.4g}") for key in LM_KEYS if key in results]
    if "meta_query_acc" in results:
        for name in ("query_acc", "no_adapt_acc"):
            value, ci = results[f"meta_{name}"], results[f"meta_{name}_ci95"]
            rows.append((f"meta_{name}", f"{value:.3f} ± {ci:.3f}"))
        rows.append(("meta_chance", f"{results['meta_chance']:.3f}"))
        rows.append(("meta_tasks", f"{results['meta_tasks']:.0f}"))
        rows.append(("meta_head", results["meta_head"]))
    elif "meta_skipped" in results:
        rows.append(("meta-test", "skipped"))
    # numeric: every kind's (and all kinds') token accuracy and exact match at each length
    for key, value in results.items():
        if key.startswith("numeric/") and key.endswith(("/token_acc", "/exact")):
            rows.append((key, f"{value:.3f}"))
    # downstream: head-only, the fine-tuning budget's last point and the floor; the rest is in the JSON
    last_finetune = {}
    for key in results:
        if key.startswith("downstream/") and "/finetune/step" in key and key.endswith("/acc"):
            prefix, _, step = key.removesuffix("/acc").rpartition("/step")
            if int(step) >= last_finetune.get(prefix, -1):
                last_finetune[prefix] = int(step)
    for key, value in results.items():
        if not (key.startswith("downstream/") and key.endswith("/acc")):
            continue
        scorer = key.removesuffix("/acc")
        shown = scorer.endswith(("/head", "/tfidf")) or any(
            scorer == f"{prefix}/step{step}" for prefix, step in last_finetune.items()
        )
        if shown:
            rows.append((scorer, f"{value:.3f} ± {results[f'{scorer}/acc_ci95']:.3f}"))
    return rows


def print_results(results: dict[str, Any]) -> None:
    """A small table of the headline numbers (and of the step-0 control beside them, if scored)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['run_dir']}  step {results['step']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    control = dict(_rows(results["step0"])) if "step0" in results else None
    if control is not None:
        table.add_column("step 0 (control)", justify="right")
    for name, value in _rows(results):
        table.add_row(name, value, *(() if control is None else (control.get(name, ""),)))
    Console().print(table)
    print(f"wrote {results['output']}")


def _main(argv: list[str]) -> dict[str, Any]:
    args = parse_cli_args(EvalArgs, argv, "picomaml.evaluate")
    try:
        results = evaluate_run(args)
    except ValueError as err:
        raise usage_error(f"error: {err}") from err
    print_results(results)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point (see the module docstring)."""
    return main_guard(_main, argv)


if __name__ == "__main__":
    main()
