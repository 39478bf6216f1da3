"""Smoke run of the training benchmark: every key present, values sane (no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from picomaml.bench import main
from picomaml.model import load_model_config, model_flops_per_token

KEYS = {
    "model", "precision", "batch_size", "seq_len", "steps", "warmup", "tokens_per_s", "step_time_mean_s",
    "step_time_median_s", "step_time_min_s", "model_flops_per_token", "achieved_flops_per_s",
    "peak_matmul_flops_per_s", "peak_matmul_n", "mfu", "tokens_per_s_best", "mfu_best", "peak_rss_mb",
    "num_parameters", "torch_version", "threads", "device", "cpu", "cpu_capability", "attention",
    "peak_memory_mb", "peak_memory_kind",
}  # fmt: skip


def test_bench_train_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    main(["train", "model=tiny", "precision=fp32", "batch_size=2", "seq_len=32", "steps=2", "warmup=1"]
         + ["threads=1", "peak_n=256", f"out={out}"])  # fmt: skip
    r = json.loads(out.read_text())
    assert set(r) == KEYS
    assert (r["model"], r["precision"], r["batch_size"], r["seq_len"]) == ("tiny", "fp32", 2, 32)
    assert r["model_flops_per_token"] == model_flops_per_token(load_model_config("tiny"), 32)
    assert r["tokens_per_s"] > 0 and r["step_time_median_s"] > 0
    assert r["achieved_flops_per_s"] == pytest.approx(r["tokens_per_s"] * r["model_flops_per_token"])
    assert r["mfu"] == pytest.approx(r["achieved_flops_per_s"] / r["peak_matmul_flops_per_s"])
    assert 0 < r["mfu"] < 1.5 and r["peak_rss_mb"] > 0 and r["threads"] == 1


def test_bench_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit, match="usage"):
        main(["nope"])
    with pytest.raises(SystemExit, match="batchsize"):
        main(["train", "batchsize=3"])
    with pytest.raises(SystemExit, match="fp32, bf16"):
        main(["train", "model=tiny", "precision=fp16"])


def test_bench_meta_smoke(tmp_path: Path) -> None:
    out = tmp_path / "meta.json"
    main(["meta", "model=tiny", "n_way=3", "k_shot=2", "q_query=2", "tasks=1", "window_len=16"]
         + ["inner_steps=2", "steps=1", "warmup=1", "threads=1", f"out={out}"])  # fmt: skip
    r = json.loads(out.read_text())
    assert r["backbone_tokens_per_step"] == 1 * 3 * (2 + 2) * 16
    for order in ("second", "first"):
        timing = r[order]
        assert timing["meta_over_ar"] == pytest.approx(timing["meta_step_s"] / timing["ar_step_s"])
        assert (
            0 < timing["inner_loop_fraction"] == pytest.approx(timing["inner_loop_s"] / timing["meta_step_s"])
        )


def test_bench_sweep_smoke(tmp_path: Path) -> None:
    """The same 4-trial study async and in blocking batches on submitit_local (no timing assertions)."""
    out = tmp_path / "sweep.json"
    main(["sweep", "launcher=submitit_local", "task=app", "trials=4", "parallelism=2", "steps=2"]
         + ["step_s=0.05", "slow_step_s=0.5", f"dir={tmp_path / 'studies'}", f"out={out}"])  # fmt: skip
    r = json.loads(out.read_text())
    assert (r["trials"], r["parallelism"], r["slow_trials"]) == (4, 2, [0, 2])
    assert r["python_startup_s"] > 0
    for schedule, launches in (("async", 4), ("batch", 2)):
        s = r[schedule]
        assert s["states"] == {"COMPLETE": 4, "FAIL": 0, "PRUNED": 0}
        assert s["launch_calls"] == launches and s["slurm_submissions"] is None
        assert 0 < s["study_s"] < s["wall_s"]
        assert [t["number"] for t in s["trials"]] == [0, 1, 2, 3]
        assert [t["slow"] for t in s["trials"]] == [True, False, True, False]
        for t in s["trials"]:
            assert t["steps"] == 2
            assert t["submit_to_first_step"] == pytest.approx(
                t["submit_to_process"] + t["process_to_first_step"]
            )
            assert t["submit_to_process"] > 0 and t["last_step_to_recorded"] > 0
        assert s["overheads"]["submit_to_first_step"]["max"] == max(
            t["submit_to_first_step"] for t in s["trials"]
        )
    # under batch, the fast trial of a batch is recorded with its slow partner
    batch = r["batch"]["trials"]
    assert batch[0]["recorded_at"] == pytest.approx(batch[1]["recorded_at"], abs=0.5)
    assert r["batch_over_async_wall"] == pytest.approx(r["batch"]["wall_s"] / r["async"]["wall_s"])


def test_bench_sweep_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="submitit_local, slurm"):
        main(["sweep", "launcher=nope"])
    with pytest.raises(SystemExit, match="async, batch"):
        main(["sweep", "schedules=async,sync"])
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(SystemExit, match="is not empty"):
        main(["sweep", f"dir={tmp_path / 'used'}"])
