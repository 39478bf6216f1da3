"""``python -m picomaml.bench train``: steady-state pretraining steps of the real training computation
on random tokens::

    python -m picomaml.bench train model=11m precision=bf16 batch_size=8 seq_len=512 steps=20 warmup=5 \\
        out=bench.json

One step = forward + ``lm_loss`` + backward + gradient clipping at 1.0 + AdamW (lr 3e-4, weight decay
0.01; the fused kernel, which torch also has on CPU, about 3x faster than the per-tensor loop).
``precision=bf16`` runs forward and loss under ``torch.autocast(dtype=bfloat16)`` with fp32 master
weights, which is what Lightning's ``bf16-mixed`` does. Model FLOPs follow :mod:`picomaml.model.flops`;
MFU divides the achieved model FLOP/s by the peak matmul FLOP/s of the same dtype, measured in the same
process with the same thread count. ``tokens_per_s_best`` and ``mfu_best`` use the fastest step.

``attention=linear`` benchmarks the model with ``model.attention=linear``; ``seq_len`` above the preset's
``max_seq_len`` raises that limit for the run (RoPE has no table to outgrow). Peak memory
(``peak_memory_mb``): on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps (weights,
optimizer state and activations); on CPU the process's peak resident set size (``VmHWM``), so it
also holds the interpreter and libraries, the same for every configuration.

Comma-separated ``attention`` and ``seq_len`` compare configurations: each combination runs in its own
process (so each peak is its own), then a table gives tokens/s and peak memory side by side with the
linear/softmax ratios, e.g. where linear attention overtakes softmax::

    python -m picomaml.bench train model=11m batch_size=1 attention=softmax,linear seq_len=512,2048,8192 \\
        steps=3 warmup=1 out=attention.json
"""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from picomaml.bench.common import cpu_name, matmul_peak_flops, parse_args, peak_rss_mb, sync
from picomaml.model import PicoDecoder, load_model_config, model_flops_per_token
from picomaml.model.pico_decoder import ATTENTION_KINDS

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench_train(argv: list[str]) -> dict[str, object]:
    """Time training steps; returns (and prints, and writes to ``out``) the summary."""
    args = parse_args(
        argv,
        {
            "model": "11m",
            "precision": "fp32",
            "batch_size": 8,
            "seq_len": "512",
            "attention": "softmax",
            "steps": 20,
            "warmup": 5,
            "threads": 2,
            "device": "cpu",
            "seed": 0,
            "peak_n": 2048,
            "out": None,
        },
        "picomaml.bench train",
        __doc__ or "",
    )
    if args["precision"] not in _DTYPES:
        raise SystemExit(f"precision={args['precision']!r}; allowed values: {', '.join(_DTYPES)}")
    attentions = str(args["attention"]).split(",")
    bad = [a for a in attentions if a not in ATTENTION_KINDS]
    if bad:
        raise SystemExit(f"attention={bad[0]!r}; allowed values: {', '.join(ATTENTION_KINDS)}")
    try:
        seq_lens = [int(t) for t in str(args["seq_len"]).split(",")]
    except ValueError:
        seq_lens = [0]
    if min(seq_lens) < 1:
        raise SystemExit(f"seq_len={args['seq_len']!r}: expected positive integers, comma-separated")
    if len(attentions) * len(seq_lens) > 1:
        return _compare(argv, args, attentions, seq_lens)
    return _bench_one(args, attentions[0], seq_lens[0])


def _bench_one(args: dict[str, object], attention: str, seq_len: int) -> dict[str, object]:
    """One configuration, timed in this process."""
    torch.set_num_threads(args["threads"])
    torch.manual_seed(args["seed"])
    device = torch.device(args["device"])
    dtype = _DTYPES[args["precision"]]
    batch = args["batch_size"]

    preset = load_model_config(args["model"])
    config = load_model_config(
        args["model"], attention=attention, max_seq_len=max(preset.max_seq_len, seq_len)
    )
    model = PicoDecoder(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01, fused=True)
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device=device)
    input_ids, labels = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model.lm_loss(input_ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args["warmup"]):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # The peak is sampled between steps and the best sample kept, so a busy spell on a shared machine
    # lowers the measured training speed without also lowering the denominator of MFU.
    peak = matmul_peak_flops(dtype, device, n=args["peak_n"])
    times = []
    for _ in range(args["steps"]):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
        peak = max(peak, matmul_peak_flops(dtype, device, n=args["peak_n"], min_time=0.2))
    flops_per_token = model_flops_per_token(config, seq_len)
    mean = statistics.fmean(times)
    tokens_per_s = batch * seq_len / mean
    achieved = flops_per_token * tokens_per_s
    result = {
        "model": args["model"],
        "precision": args["precision"],
        "batch_size": batch,
        "seq_len": seq_len,
        "attention": attention,
        "steps": args["steps"],
        "warmup": args["warmup"],
        "tokens_per_s": tokens_per_s,
        "step_time_mean_s": mean,
        "step_time_median_s": statistics.median(times),
        "step_time_min_s": min(times),
        "model_flops_per_token": flops_per_token,
        "achieved_flops_per_s": achieved,
        "peak_matmul_flops_per_s": peak,
        "peak_matmul_n": args["peak_n"],
        "mfu": achieved / peak,
        # The fastest step estimates the uncontended speed on a machine shared with other jobs.
        "tokens_per_s_best": batch * seq_len / min(times),
        "mfu_best": flops_per_token * batch * seq_len / min(times) / peak,
        "peak_rss_mb": peak_rss_mb(),
        "peak_memory_mb": _peak_memory_mb(device),
        "peak_memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "process_peak_rss",
        "num_parameters": model.num_parameters(),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args["out"]:
        Path(args["out"]).write_text(text + "\n")
    return result


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def _compare(
    argv: list[str], args: dict[str, object], attentions: list[str], seq_lens: list[int]
) -> dict[str, object]:
    """Every (attention, seq_len) in a fresh ``python -m picomaml.bench train`` process; a table of both."""
    fixed = [a for a in argv if a.partition("=")[0] not in ("attention", "seq_len", "out")]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seq_len, attention in itertools.product(seq_lens, attentions):
            out = Path(tmp) / f"{attention}-{seq_len}.json"
            command = [sys.executable, "-m", "picomaml.bench", "train", *fixed]
            command += [f"attention={attention}", f"seq_len={seq_len}", f"out={out}"]
            print(f"running: {' '.join(command[1:-1])}", file=sys.stderr, flush=True)
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            runs.append(json.loads(out.read_text()))
    rows = []
    for seq_len in seq_lens:
        row: dict[str, object] = {"seq_len": seq_len}
        for r in (r for r in runs if r["seq_len"] == seq_len):
            row[f"{r['attention']}_tokens_per_s"] = r["tokens_per_s"]
            row[f"{r['attention']}_tokens_per_s_best"] = r["tokens_per_s_best"]
            row[f"{r['attention']}_peak_memory_mb"] = r["peak_memory_mb"]
        if {"softmax", "linear"} <= set(attentions):
            row["linear_over_softmax_tokens_per_s"] = row["linear_tokens_per_s"] / row["softmax_tokens_per_s"]
            row["linear_over_softmax_peak_memory"] = (
                row["linear_peak_memory_mb"] / row["softmax_peak_memory_mb"]
            )
        rows.append(row)
    result = {"runs": runs, "comparison": rows}
    print(json.dumps(result, indent=2))
    print(_table(rows, attentions, str(runs[0]["peak_memory_kind"])))
    if args["out"]:
        Path(args["out"]).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _table(rows: list[dict[str, object]], attentions: list[str], memory_kind: str) -> str:
    """The comparison as a markdown table."""
    header = ["seq_len"] + [f"{a} tokens/s" for a in attentions] + [f"{a} peak MB" for a in attentions]
    ratios = "linear_over_softmax_tokens_per_s" in rows[0]
    if ratios:
        header += ["linear/softmax tokens/s", "linear/softmax memory"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["seq_len"])]
        cells += [f"{row[f'{a}_tokens_per_s']:.0f}" for a in attentions]
        cells += [f"{row[f'{a}_peak_memory_mb']:.0f}" for a in attentions]
        if ratios:
            cells += [
                f"{row['linear_over_softmax_tokens_per_s']:.2f}",
                f"{row['linear_over_softmax_peak_memory']:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n(peak memory: {memory_kind})"
