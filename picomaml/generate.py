"""``python -m picomaml.generate``: continue a prompt with a trained run, greedy or sampled.

    python -m picomaml.generate ckpt_path=outputs/.../run prompt="The history of" max_new_tokens=50
    python -m picomaml.generate ckpt_path=... prompt="..." temperature=0.8 top_k=50 top_p=0.95 seed=1

Decoding is :mod:`picomaml.model.generation` (KV-cached; ``use_cache=false`` recomputes every step).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from picomaml.cli import main_guard, parse_cli_args, pick_device, usage_error
from picomaml.model.generation import check_context, generate
from picomaml.runs import load_run


@dataclass
class GenerateArgs:
    """Arguments of ``python -m picomaml.generate`` (key=value).

    ckpt_path: run dir, .ckpt file or checkpoints/step_N dir. step: checkpoint step of a run dir.
    prompt: text to continue. max_new_tokens: tokens to add. temperature: 0 = greedy, else sampling
    with top_k (0 = off) and top_p (1.0 = off), seeded by seed. use_cache: KV-cached decoding.
    stop_at_eos: stop at the end-of-text token. device: cpu, cuda or auto.
    """

    ckpt_path: str
    prompt: str
    step: int | None = None
    max_new_tokens: int = 50
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    use_cache: bool = True
    stop_at_eos: bool = True
    device: str = "auto"


def _main(argv: list[str]) -> str:
    args = parse_cli_args(GenerateArgs, argv, "picomaml.generate")
    from picomaml.data import load_tokenizer

    run = load_run(args.ckpt_path, args.step)
    device = pick_device(args.device)
    tokenizer = load_tokenizer(run.tokenizer_name)
    prompt_ids = torch.tensor([tokenizer.encode(args.prompt)], device=device)
    try:
        check_context(prompt_ids.shape[1], args.max_new_tokens, run.model_config.max_seq_len)
    except ValueError as err:
        raise usage_error(f"error: {err}") from err
    out = generate(
        run.model.to(device),
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        use_cache=args.use_cache,
        eos_token_id=tokenizer.eos_token_id if args.stop_at_eos else None,
    )
    text = tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
    print(text)
    return text


def main(argv: list[str] | None = None) -> str:
    """CLI entry point (see the module docstring)."""
    return main_guard(_main, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
