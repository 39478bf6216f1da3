"""``python -m picomaml.bench memory``: the memory model (:mod:`picomaml.lit.memory`) against measured peaks::

    python -m picomaml.bench memory sizes=tiny,small,11m,65m batches=4,16 seq_len=256 steps=3 out=mem.json

For each (size, batch) a fresh process runs the real training entry point
(``python -m picomaml.train model=<size> data.batch_size=<batch> trainer.max_steps=<steps>
callbacks=none``: the embedded wiki data, AdamW, no validation inside the steps) and its peak is
measured: on the CPU the child's peak resident set size (``VmHWM``, the kernel's own high-water mark, so
no sampling can miss it; see :func:`picomaml.bench.common.peak_rss_mb`); on CUDA
``torch.cuda.max_memory_allocated`` printed by the child. The peak of a step comes at step 2 (AdamW's
moments exist from step 1), so ``steps >= 2``.

First a ``runtime`` child measures the CPU baseline term: the same process (the same imports, the
config, the data module set up, with ``meta`` on its word index built, and one batch drawn) without a
model; it also packs the data cache, so the timed children read it. Printed per row: predicted and
measured GB and the error ``(predicted - measured) / measured``; ``model_err_pct`` compares the parts
above the baseline (predicted minus its ``runtime`` term vs measured minus the measured baseline), the
stricter test of the counted terms.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from picomaml.bench.common import cpu_name, parse_args

# the last thing each child does: print its own peak resident size (see common.peak_rss_mb)
_PRINT_PEAK = r"""
from picomaml.bench.common import peak_rss_mb
print("PICOMAML_PEAK_RSS_MB", peak_rss_mb(), flush=True)
"""

_BASELINE = (
    r"""
import json, sys
import picomaml.train  # every import of a training process (torch, lightning, hydra, optuna)
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from picomaml.config import CONF_DIR
from picomaml.config import instantiate_section
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose(config_name="train", overrides=json.loads(sys.argv[1]))
with open_dict(cfg):
    cfg.paths.output_dir = sys.argv[2]
datamodule = instantiate_section(cfg, "data")
datamodule.check()
meta = instantiate_section(cfg, "meta")
if meta.enabled:
    datamodule.setup_meta(meta)  # the SMLMT word index, as prepare_run builds it
datamodule.setup("fit")
next(iter(datamodule.train_dataloader()))
"""
    + _PRINT_PEAK
)

_TRAIN = (
    r"""
import json, runpy, sys
import torch
sys.argv = ["picomaml.train", *json.loads(sys.argv[1])]
try:
    runpy.run_module("picomaml.train", run_name="__main__")
except SystemExit as err:
    if err.code not in (None, 0):
        raise
if torch.cuda.is_available():
    print("PICOMAML_CUDA_PEAK", torch.cuda.max_memory_allocated(), flush=True)
"""
    + _PRINT_PEAK
)


def _run_child(code: str, args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``python -c code args``; return its peak RSS in bytes (its ``_PRINT_PEAK`` line) and stdout."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run(
            [sys.executable, "-c", code, *args], stdout=out, stderr=subprocess.STDOUT, env=env, text=True
        )
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{text[-3000:]}")
    peak_mb = next(line.split()[1] for line in text.splitlines() if line.startswith("PICOMAML_PEAK_RSS_MB"))
    return int(float(peak_mb) * 2**20), text


def bench_memory(argv: list[str]) -> dict[str, object]:
    """Measure peak memory of real training runs and compare with the prediction."""
    args = parse_args(
        argv,
        {
            "sizes": "tiny,small,11m,65m",
            "batches": "4,16",
            "seq_len": 256,
            "steps": 3,
            "device": "cpu",
            "precision": "32-true",
            "extra": "",
            "work_dir": None,
            "out": None,
        },
        "picomaml.bench memory",
        __doc__ or "",
    )
    from hydra import compose, initialize_config_dir

    from picomaml.config import CONF_DIR, register_bases, register_resolvers
    from picomaml.lit.memory import GB, predict_peak_memory
    from picomaml.train import CONFIG_SCHEMAS

    register_resolvers()
    register_bases(CONFIG_SCHEMAS)

    if args["steps"] < 2:
        raise SystemExit("steps must be >= 2: the peak comes at step 2, once AdamW's moments exist")
    work = Path(args["work_dir"] or tempfile.mkdtemp(prefix="picomaml-bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    accelerator = "gpu" if args["device"] == "cuda" else "cpu"
    common = [
        f"data.seq_len={args['seq_len']}",
        f"trainer.accelerator={accelerator}",
        f"trainer.precision={args['precision']}",
        f"paths.log_dir={tempfile.mkdtemp(prefix='logs-', dir=work)}",  # fresh run dirs, never a resume
        f"paths.cache_dir={work / 'cache'}",
        *[a for a in str(args["extra"]).split() if a],
    ]
    # twice: the first packs the data cache (tokenizing costs memory a training run never pays again)
    for _ in range(2):
        runtime, _ = _run_child(_BASELINE, [json.dumps(["model=tiny", *common]), str(work / "baseline")], env)
    rows = []
    for size in str(args["sizes"]).split(","):
        for batch in (int(b) for b in str(args["batches"]).split(",")):
            overrides = [
                f"model={size}",
                f"data.batch_size={batch}",
                *common,
                f"trainer.max_steps={args['steps']}",
                "trainer.val_check_interval=100000",
                "callbacks=none",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
                "memory_check=false",
                f"run_name=mem-{size}-{batch}",
            ]
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name="train", overrides=overrides)
            estimate = predict_peak_memory(cfg)
            rss, text = _run_child(_TRAIN, [json.dumps(overrides)], env)
            measured = rss
            if args["device"] == "cuda":
                line = next(x for x in text.splitlines() if x.startswith("PICOMAML_CUDA_PEAK"))
                measured = int(line.split()[1])
            predicted = estimate.peak_bytes
            row = {
                "model": size,
                "batch_size": batch,
                "seq_len": args["seq_len"],
                "predicted_gb": round(predicted / GB, 3),
                "measured_gb": round(measured / GB, 3),
                "err_pct": round(100 * (predicted - measured) / measured, 1),
                "phase": estimate.phase,
                "breakdown_gb": {k: round(v / GB, 3) for k, v in estimate.breakdown.items()},
            }
            if args["device"] == "cpu":
                model_pred = predicted - estimate.breakdown["runtime"]
                model_meas = measured - runtime
                row["model_err_pct"] = round(100 * (model_pred - model_meas) / model_meas, 1)
            rows.append(row)
            print(
                f"{size:>6} batch {batch:>3}: predicted {row['predicted_gb']:.2f} GB, "
                f"measured {row['measured_gb']:.2f} GB, error {row['err_pct']:+.1f}%",
                flush=True,
            )
    result = {
        "device": args["device"],
        "precision": args["precision"],
        "steps": args["steps"],
        "runtime_measured_gb": round(runtime / GB, 3),
        "runtime_model_gb": round(rows[0]["breakdown_gb"]["runtime"], 3) if rows else None,
        "rows": rows,
        "cpu": cpu_name(),
    }
    print("| model | batch x seq_len | predicted GB | measured GB | error |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch_size']} x {r['seq_len']} | {r['predicted_gb']:.2f} | "
            f"{r['measured_gb']:.2f} | {r['err_pct']:+.1f}% |"
        )
    text = json.dumps(result, indent=2)
    print(text)
    if args["out"]:
        Path(args["out"]).write_text(text + "\n")
    return result
