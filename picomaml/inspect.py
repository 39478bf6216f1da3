"""Look inside a model size: its module tree, parameter counts and the tensor shapes flowing through it.

CLI::

    python -m picomaml.inspect model=11m
    python -m picomaml.inspect model=tiny seq_len=16 batch_size=1 device=cpu
    python -m picomaml.inspect model=11m attention=linear

Each module of the preset's :class:`~picomaml.model.PicoDecoder` gets a forward hook that records the
shapes of its tensor inputs and of its output for one sample batch of ``[batch_size, seq_len]`` token
ids. By default the model lives on PyTorch's ``meta`` device: tensors there carry shapes and dtypes but
no data, so even the 570m preset is inspected instantly without allocating its weights.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.tree import Tree
from torch import nn

from picomaml.cli import parse_cli_args, usage_error
from picomaml.model import PicoDecoder, load_model_config, model_flops_per_token


@dataclass
class ModuleRecord:
    """One module: its name in ``named_modules()``, class, parameters and the shapes of one call."""

    name: str
    kind: str
    own_params: int
    total_params: int
    inputs: list[tuple[int, ...]]
    output: tuple[int, ...] | None


def trace_shapes(model: nn.Module, input_ids: torch.Tensor) -> list[ModuleRecord]:
    """Run ``model(input_ids)`` once with forward hooks on every module; records in module order."""
    seen: dict[str, tuple[list[tuple[int, ...]], tuple[int, ...] | None]] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            if name not in seen:  # a module called twice keeps its first call
                shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
                seen[name] = (shapes, tuple(output.shape) if isinstance(output, torch.Tensor) else None)

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    records = []
    for name, module in model.named_modules():
        inputs, output = seen.get(name, ([], None))
        records.append(
            ModuleRecord(
                name=name,
                kind=type(module).__name__,
                own_params=sum(p.numel() for p in module.parameters(recurse=False)),
                total_params=sum(p.numel() for p in module.parameters()),
                inputs=inputs,
                output=output,
            )
        )
    return records


def render_tree(records: list[ModuleRecord], title: str) -> Tree:
    """A rich tree: one node per module with its parameter count and input -> output shapes.

    ``records`` must start with the root module (name ``""``), as :func:`trace_shapes` returns them.
    """
    nodes: dict[str, Tree] = {}
    for record in records:
        shapes = ", ".join(_shape(s) for s in record.inputs)
        label = (
            f"[bold]{record.name.rsplit('.', 1)[-1] or title}[/bold] ({record.kind}) "
            f"params {record.total_params:,}  [cyan]{shapes}[/cyan] -> [green]{_shape(record.output)}[/green]"
        )
        if not record.name:  # the model itself (named_modules lists it first, as "")
            nodes[""] = Tree(label)
            continue
        parent = record.name.rsplit(".", 1)[0] if "." in record.name else ""
        nodes[record.name] = nodes[parent].add(label)
    return nodes[""]


def _shape(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else "[" + ", ".join(map(str, shape)) + "]"


@dataclass
class InspectArgs:
    """Arguments of ``python -m picomaml.inspect`` (key=value).

    model: preset name (conf/model). seq_len, batch_size: the sample batch. device: ``meta`` (shapes
    only, no memory) or a real device such as ``cpu``. attention: the preset's ``model.attention``
    (softmax or linear).
    """

    model: str
    seq_len: int = 64
    batch_size: int = 2
    device: str = "meta"
    attention: str = "softmax"


def inspect_model(args: InspectArgs, console: Console | None = None) -> list[ModuleRecord]:
    """Build the preset, trace one batch and print the tree and a summary; returns the records."""
    config = load_model_config(args.model, attention=args.attention)
    if not 1 <= args.seq_len <= config.max_seq_len:
        raise ValueError(f"seq_len={args.seq_len} must be in [1, {config.max_seq_len}] (model.max_seq_len)")
    device = torch.device(args.device)
    with device:
        model = PicoDecoder(config)
    input_ids = torch.zeros(args.batch_size, args.seq_len, dtype=torch.long, device=device)
    records = trace_shapes(model, input_ids)
    console = console or Console(soft_wrap=True)
    console.print(render_tree(records, f"{args.model} on input [{args.batch_size}, {args.seq_len}]"))
    total = model.num_parameters()
    console.print(
        f"parameters: {total:,} total, {model.num_parameters(exclude_embeddings=True):,} without the "
        f"embedding and de-embedding matrices; training FLOPs/token at seq_len {args.seq_len}: "
        f"{model_flops_per_token(config, args.seq_len):,}"
    )
    return records


def main(argv: list[str] | None = None) -> list[ModuleRecord]:
    """CLI entry point (see the module docstring)."""
    args = parse_cli_args(InspectArgs, sys.argv[1:] if argv is None else argv, "picomaml.inspect")
    try:
        return inspect_model(args)
    except ValueError as err:
        raise usage_error(f"error: {err}") from err


if __name__ == "__main__":
    main()
