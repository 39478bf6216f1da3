"""picomaml.report on a real grid multirun of the tiny app (tests/sweep_app), failed jobs included."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from picomaml.report import collect, main

APP = Path(__file__).parent / "sweep_app" / "app.py"


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sweep_dir = tmp_path_factory.mktemp("report") / "grid"
    cmd = [sys.executable, str(APP), "-m", "model=tiny,small", "x=0.3,0.6", "fail_above=0.5", "step_sleep=0"]
    proc = subprocess.run(
        [*cmd, f"hydra.sweep.dir={sweep_dir}"],
        cwd=sweep_dir.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Hydra's basic sweeper runs every job, then re-raises the first failure
    assert proc.returncode != 0 and "fail_above" in proc.stderr, proc.stderr[-2000:]
    return sweep_dir


def test_report_gathers_every_job(grid_sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    main([f"sweep_dir={grid_sweep}", "group_by=model", f"out={out}"])
    with (out / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["job"]) for r in rows] == [0, 1, 2, 3]
    by_params = {(r["model"], r["x"]): r for r in rows}
    assert {k: r["status"] for k, r in by_params.items()} == {
        ("tiny", "0.3"): "completed",
        ("tiny", "0.6"): "failed",
        ("small", "0.3"): "completed",
        ("small", "0.6"): "failed",
    }
    small = by_params[("small", "0.3")]
    # the app's loss at its last step (4): (0.3-0.3)^2 + (0.5-0.7)^2 + 0.1 + 1/5
    assert float(small["metric"]) == pytest.approx(0.04 + 0.1 + 0.2)
    assert float(small["final/val/loss"]) == pytest.approx(float(small["metric"]))
    assert float(small["final/train/loss"]) == pytest.approx(float(small["metric"]) + 0.05)
    assert float(small["wall_time_s"]) > 0 and small["tokens_seen"] == "4000"
    assert small["overrides"] == "model=small x=0.3 fail_above=0.5 step_sleep=0"

    md = (out / "report.md").read_text()
    assert "## By model" in md
    assert "| small | 2 | 1 | 0.34 | 0.34 | 0.34 |" in md
    assert (out / "curves.png").stat().st_size > 10_000


def test_report_status_without_result_json(grid_sweep: Path, tmp_path: Path) -> None:
    # a killed job leaves no result.json: the sweep's trials.csv (optuna sweeps) still knows its state
    sweep = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(grid_sweep), str(sweep)], check=True)
    (sweep / "1" / "result.json").unlink()
    (sweep / "2" / "result.json").unlink()
    (sweep / "trials.csv").write_text("number,state\n1,FAIL\n")
    status = {r.job: r.status for r in collect(sweep)}
    assert status[1] == "fail" and status[2] == "missing"


def test_report_rejects_a_dir_without_jobs(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main([f"sweep_dir={tmp_path}"])
