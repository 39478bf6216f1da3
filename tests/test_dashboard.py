"""A picomaml sweep opens in optuna-dashboard (issue 12, part 5).

The real optuna-dashboard (a dev dependency) is started as its command line,
``optuna-dashboard <storage URL> --host 127.0.0.1 --port <port>``, on the storage a picomaml sweep
wrote (``sqlite:///<sweep dir>/optuna.db``, the sweeper's default), and its HTTP API must show the study
as the sweep's trials.csv records it: name, direction, every trial with its state, value and params.
tests/test_readme_sweeps.py does the same for the README's optuna study of real trainings on SLURM.
"""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "tests" / "sweep_app" / "app.py"
DASHBOARD = Path(sys.executable).parent / "optuna-dashboard"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@contextmanager
def serve_dashboard(storage: str, timeout_s: float = 90.0) -> Iterator[str]:
    """``optuna-dashboard <storage> --host 127.0.0.1 --port <free port>`` in a subprocess; yields its
    base URL once ``/api/meta`` answers, stops it at the end."""
    port = _free_port()
    proc = subprocess.Popen(
        [str(DASHBOARD), storage, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"optuna-dashboard exited: {proc.stdout.read()[-3000:]}")
            try:
                _get(f"{base}/api/meta")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"optuna-dashboard did not answer on {base} in {timeout_s:.0f} s"
                    ) from None
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def dashboard_study(base: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The study ``name`` as the dashboard lists it (``/api/studies``) and its detail with every trial
    (``/api/studies/<id>``)."""
    summaries = _get(f"{base}/api/studies")["study_summaries"]
    matching = [s for s in summaries if s["study_name"] == name]
    assert len(matching) == 1, [s["study_name"] for s in summaries]
    return matching[0], _get(f"{base}/api/studies/{matching[0]['study_id']}")


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_dashboard_shows_a_picomaml_sweep(tmp_path: Path, storage: str) -> None:
    """A 4-trial study through picomaml's sweeper (in-process launcher, one trial raises), then the
    dashboard on its storage: the default SQLite file, or a journal file (``hydra.sweeper.storage=
    journal:<file>``, which the dashboard takes as the bare path)."""
    sweep_dir = tmp_path / "sweep"
    journal = sweep_dir / "journal.log"
    cmd = [
        sys.executable,
        str(APP),
        "-m",
        "hydra/sweeper=picomaml_optuna",
        "hydra/launcher=basic",
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweeper.study_name=dash",
        "x=interval(0,0.8)",
        "y=interval(0,0.9)",
        "fail_above=0.85",
        "hydra.sweeper.enqueue=[{x:0.9,y:0.5}]",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.plots=false",
        "steps=2",
        "step_sleep=0",
        *([f"hydra.sweeper.storage=journal:{journal}"] if storage == "journal" else []),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    with (sweep_dir / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]

    # the storage the sweeper wrote, as a user types it
    url = f"sqlite:///{sweep_dir / 'optuna.db'}" if storage == "sqlite" else str(journal)
    assert not (sweep_dir / ("journal.log" if storage == "sqlite" else "optuna.db")).exists()
    with serve_dashboard(url) as base:
        summary, detail = dashboard_study(base, "dash")
    assert summary["directions"] == ["minimize"]
    assert detail["name"] == "dash"
    trials = detail["trials"]
    assert [t["number"] for t in trials] == [int(r["number"]) for r in rows]
    for trial, row in zip(trials, rows, strict=True):
        assert trial["state"].upper() == row["state"]
        params = {p["name"]: float(p["param_external_value"]) for p in trial["params"]}
        assert params == pytest.approx({"x": float(row["params_x"]), "y": float(row["params_y"])})
        if row["state"] == "COMPLETE":
            assert trial["values"] == [pytest.approx(float(row["value"]))]
            # the validation losses the trial reported at each step (what pruners see)
            assert len(trial["intermediate_values"]) == 2
    best = min((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: float(r["value"]))
    assert [t["number"] for t in detail["best_trials"]] == [int(best["number"])]
