"""``python -m picomaml.export``: write a checkpoint as a plain Hugging Face ``LlamaForCausalLM`` directory.

    python -m picomaml.export ckpt_path=outputs/train/runs/<run> out=hf_model/
    python -m picomaml.export ckpt_path=<run>/checkpoints/step_64 out=hf_step64/ tokenizer=none
    python -m picomaml.export ckpt_path=state_dict.pt preset=11m out=hf_model/

The conversion (q/k rows reordered for Llama's half-rotation RoPE; logits match) is
:mod:`picomaml.model.hf`; reading the checkpoint is :mod:`picomaml.runs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from picomaml.cli import main_guard, parse_cli_args
from picomaml.data.tokenizer import TOKENIZER_NAMES, load_tokenizer
from picomaml.model.hf import export_to_hf
from picomaml.runs import load_model


@dataclass
class ExportArgs:
    """Arguments of ``python -m picomaml.export`` (key=value).

    ckpt_path: a run dir, a checkpoints/step_N dir, a .ckpt file, or a plain state_dict file (then
    give preset); a run dir exports its last checkpoint. out: the directory to write.
    preset: model size (conf/model) of a plain state_dict. tokenizer: saved alongside: a picomaml name
    (gpt2, olmo), a tokenizer directory, or none.
    """

    ckpt_path: str
    out: str
    preset: str | None = None
    tokenizer: str = "gpt2"


def _main(argv: list[str]) -> Path:
    args = parse_cli_args(ExportArgs, argv, "picomaml.export")
    tokenizer = None
    if args.tokenizer in TOKENIZER_NAMES:
        tokenizer = load_tokenizer(args.tokenizer)
    elif args.tokenizer != "none":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    out = export_to_hf(load_model(args.ckpt_path, args.preset), args.out, tokenizer)
    print(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> Path:
    """CLI entry point (see the module docstring)."""
    return main_guard(_main, argv)


if __name__ == "__main__":
    main()
