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
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

import torch

from picomaml.bench.common import cpu_name, matmul_peak_flops, parse_args, sync
from picomaml.model import PicoDecoder, load_model_config, model_flops_per_token

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench_train(argv: list[str]) -> dict[str, object]:
    """Time training steps; returns (and prints, and writes to ``out``) the summary."""
    args = parse_args(
        argv,
        {
            "model": "11m",
            "precision": "fp32",
            "batch_size": 8,
            "seq_len": 512,
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
    torch.set_num_threads(args["threads"])
    torch.manual_seed(args["seed"])
    device = torch.device(args["device"])
    dtype = _DTYPES[args["precision"]]
    batch, seq_len = args["batch_size"], args["seq_len"]

    config = load_model_config(args["model"])
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
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
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
