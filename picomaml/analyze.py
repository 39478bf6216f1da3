"""``python -m picomaml.analyze``: figures and a markdown summary for a run or a sweep of runs.

    python -m picomaml.analyze path=outputs/train/runs/demo
    python -m picomaml.analyze path=outputs/train/multirun/2026-01-02/10-00-00-ab12cd prompt="The river"

writes PNGs (loss curves, meta accuracy, perplexity against size, CKA across steps, embedding PCA,
attention maps) and ``summary.md`` into ``<dir>/analysis/`` (see :mod:`picomaml.eval.analysis`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from picomaml.cli import main_guard, parse_cli_args
from picomaml.eval.analysis import DEFAULT_PROMPT, analyze


@dataclass
class AnalyzeArgs:
    """Arguments of ``python -m picomaml.analyze`` (key=value).

    path: a run directory or a sweep directory of runs. prompt: text for the attention heatmap.
    layer, head: layer and query head of the attention heatmap. cka_layer: module-name suffix for the
    CKA heatmap. tokens: frequent tokens drawn in the embedding PCA.
    """

    path: str
    prompt: str = DEFAULT_PROMPT
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
