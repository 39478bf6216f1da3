"""``python -m picomaml.bench downstream``: what downstream few-shot scoring of one checkpoint costs.

Scores a fresh model of a preset (timing does not depend on the weights) with
:func:`picomaml.eval.downstream.evaluate_downstream` on the given tasks, shots and episodes, and splits
the wall time into its phases: ``encode_s`` (tokenizing every distinct text an episode reads and one
frozen-backbone forward over them), ``head_s`` (the head's ProtoMAML init and inner loop on the cached
features), ``tfidf_s`` (the bag-of-words floor) and, with ``finetune=true``, ``finetune_s`` (full
fine-tuning of a backbone copy per episode, the test pool re-encoded at every curve point).
``head_only_s`` = encode + head is what periodic evaluation pays per checkpoint for the head-only
scores. ``load_s`` is reading and splitting the task files, once per process. ``process_cpu_s`` is
the CPU time of all threads over the evaluation: well below ``wall_s * threads`` means the run waited
for cores other jobs held (on a shared machine a tiny op at 2 threads can wait tens of milliseconds).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from picomaml.bench.common import cpu_name, parse_args
from picomaml.data.tokenizer import load_tokenizer
from picomaml.eval.downstream import DownstreamConfig, evaluate_downstream, load_task, scalar_metrics
from picomaml.model import PicoDecoder, load_model_config


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def bench_downstream(argv: list[str]) -> dict[str, object]:
    args = parse_args(
        argv,
        {
            "model": "11m",
            "tasks": "bbc_news,tweet_sentiment",
            "ks": "4,8,16",
            "episodes": 10,
            "test_per_class": 50,
            "window_len": 128,
            "inner_steps": 5,
            "batch_size": 64,
            "finetune": "false",
            "finetune_episodes": 2,
            "finetune_steps": "0,1,2,4,8,16",
            "finetune_lr": 1e-4,
            "threads": 2,
            "device": "cpu",
            "seed": 0,
            "out": None,
        },
        "picomaml.bench downstream",
        __doc__ or "",
    )
    if args["finetune"] not in ("true", "false"):
        raise SystemExit(f"finetune must be true or false, got {args['finetune']!r}")
    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    cfg = DownstreamConfig(
        tasks=args["tasks"].split(","),
        ks=_ints(args["ks"]),
        episodes=args["episodes"],
        test_per_class=args["test_per_class"],
        window_len=args["window_len"],
        inner_steps=args["inner_steps"],
        batch_size=args["batch_size"],
        finetune_episodes=args["finetune_episodes"] if args["finetune"] == "true" else 0,
        finetune_steps=_ints(args["finetune_steps"]),
        finetune_lr=args["finetune_lr"],
        seed=args["seed"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args["seed"])
        model = PicoDecoder(load_model_config(args["model"])).to(device).eval()
    tokenizer = load_tokenizer("gpt2")

    start = time.perf_counter()
    for name in cfg.tasks:
        load_task(name, cfg.test_per_class)
    load_s = time.perf_counter() - start

    timings: dict[str, float] = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    results = evaluate_downstream(model, None, tokenizer, cfg, device=device, timings=timings)
    wall_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start

    report: dict[str, object] = {
        "model": args["model"],
        "threads": args["threads"],
        "device": str(device),
        "cpu": cpu_name(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "tasks": cfg.tasks,
        "ks": cfg.ks,
        "episodes": cfg.episodes,
        "finetune_episodes": cfg.finetune_episodes,
        "window_len": cfg.window_len,
        "load_s": load_s,
        "wall_s": wall_s,
        "process_cpu_s": cpu_s,
        **{key: timings.get(key, 0.0) for key in ("encode_s", "head_s", "tfidf_s", "finetune_s")},
        "head_only_s": timings.get("encode_s", 0.0) + timings.get("head_s", 0.0),
        "metrics": scalar_metrics(results),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args["out"]:
        Path(args["out"]).write_text(text + "\n")
    return report
