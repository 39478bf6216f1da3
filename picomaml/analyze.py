"""``python -m picomaml.analyze``: figures and a markdown summary for a run or a sweep of runs.

    python -m picomaml.analyze path=outputs/train/runs/demo
    python -m picomaml.analyze path=outputs/train/multirun/2026-01-02/10-00-00-ab12cd prompt="The river"

writes PNGs (loss curves, meta accuracy, perplexity against size, CKA across steps, embedding PCA,
attention maps, and for runs trained on data=synthetic number-token and sequence-kind PCA and SwiGLU
unit selectivity across sequence kinds) and ``summary.md`` into ``<dir>/analysis/`` (see
:mod:`picomaml.eval.analysis`). An experiment=attention_compare sweep:

    python -m picomaml.analyze path=outputs/attention_compare/multirun/<date>/<time>-<hex>
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from picomaml.cli import main_guard, parse_cli_args
from picomaml.eval.analysis import analyze


@dataclass
class AnalyzeArgs:
    """Arguments of ``python -m picomaml.analyze`` (key=value).

    path: a run directory or a sweep directory of runs. prompt: text for the attention heatmap (default:
    an arithmetic sequence for runs trained on data=synthetic, else a Wikipedia-like sentence).
    layer, head: layer and query head of the attention heatmap. cka_layer: module-name suffix for the
    CKA heatmap. tokens: frequent tokens drawn in the embedding PCA.
    """

    path: str
    prompt: str | None = None
    layer: int = 0
    head: int = 0
    cka_layer: str = "swiglu.w_2"
    tokens: int = 300


def _main(argv: list[str]) -> Path:
    args = parse_cli_args(AnalyzeArgs, argv, "picomaml.analyze")
    summary = analyze(args.path, args.prompt, args.layer, args.head, args.cka_layer, args.tokens)
    print(f"wrote {summary}")
    return summary


def main(argv: list[str] | None = None) -> Path:
    """CLI entry point (see the module docstring)."""
    return main_guard(_main, argv)


if __name__ == "__main__":
    main()
