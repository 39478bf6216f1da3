"""The README's "Sweeps on SLURM and optuna" commands, run exactly as written (issue 12, part 1).

The commands are read from README.md's bash block in that section (so a README edit is what gets
tested), continuation lines joined, and each one is run with ``bash -c`` in a fresh working directory
that holds a link to ``launchers/`` (the kit's path in the first line is relative to a checkout), with
the session's token cache and ``python`` being this interpreter. Then: the 2 x 2 grid ran as SLURM jobs
that all completed, with a finished run per job; the report compared both hybrid ratios; the optuna
study holds its 4 trials in the sweep dir's SQLite storage, trials.csv agrees, and rerunning the same
line (as the README's comment says) continues the study without launching anything new. The
study is then opened in optuna-dashboard (part 5).
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.helpers import wait_for
from tests.test_dashboard import dashboard_study, serve_dashboard
from tests.test_slurm_resources import jobs_from

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Sweeps on SLURM and optuna"


def readme_sweep_commands(readme: Path = REPO / "README.md", section: str = SECTION) -> list[str]:
    """The shell commands of the bash blocks of the README section whose heading starts with
    ``section``, one per logical line (``\\`` continuations joined), comments left in place: bash
    ignores them as a reader does."""
    text = readme.read_text()
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    section = text[start : end if end >= 0 else len(text)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL):
        for line in block.replace("\\\n", "").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line)
    return commands


def readme_env(cache_dir: Path) -> dict[str, str]:
    """The environment a user's shell gives the README's commands: this venv's ``python`` first on PATH,
    outputs under the working dir (no PICOMAML_ROOT), the session's data cache, no network."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PICOMAML_CACHE": str(cache_dir),
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("PICOMAML_ROOT", None)
    return env


def test_section_has_the_commands_this_test_checks() -> None:
    commands = readme_sweep_commands()
    assert [c.split()[:3] for c in commands] == [
        ["bash", "launchers/slurm_local_cluster.sh", "start"],
        ["python", "-m", "picomaml.train"],
        ["python", "-m", "picomaml.report"],
        ["python", "-m", "picomaml.train"],
    ]
    assert all("hydra/launcher=slurm_local" in c for c in (commands[1], commands[3]))


def _run(command: str, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    started = time.perf_counter()
    proc = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    print(f"{time.perf_counter() - started:6.1f} s  {command[:100]}")
    assert proc.returncode == 0, f"{command}\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc


def _sacct_states(workdir: Path, n: int, since: float) -> dict[str, str]:
    """Final SLURM states of the ``n`` jobs submitted from ``workdir``. A sweep driver returns as soon as
    submitit has read a job's result, which can be before the job's end reaches the accounting
    database, so this waits (up to a minute) until every job has left PENDING and RUNNING."""
    states: dict[str, str] = {}

    def settled() -> bool:
        ids = sorted(jobs_from(workdir, since))
        if len(ids) < n:
            return False
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", "JobIDRaw,State"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        states.clear()
        states.update(line.split("|", 1) for line in out.splitlines() if "|" in line)
        return len(states) >= n and not {"PENDING", "RUNNING", "COMPLETING"} & set(states.values())

    wait_for(settled, 60, f"{n} SLURM jobs from {workdir} to be accounted as ended")
    return states


@pytest.mark.slow
@pytest.mark.usefixtures("slurm_cluster")
def test_readme_sweeps_run_as_written(tmp_path: Path, cache_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the README's first line (slurm_local_cluster.sh start) runs as root")
    (tmp_path / "launchers").symlink_to(REPO / "launchers")
    env = readme_env(cache_dir)
    start, grid, report, optuna_line = readme_sweep_commands()
    # jobs of this run only (sacct's clock has whole seconds)
    started = time.time() - 1
    t0 = time.perf_counter()
    _run(start, tmp_path, env, timeout=600)

    # the grid: 4 runs, one SLURM job each, all completed
    _run(grid, tmp_path, env, timeout=1800)
    grid_dir = tmp_path / "outputs" / "train" / "multirun" / "slurm_grid"
    results = [json.loads((grid_dir / str(i) / "result.json").read_text()) for i in range(4)]
    assert [r["status"] for r in results] == ["completed"] * 4
    assert all(r["global_step"] == 6 for r in results)
    grid_jobs = _sacct_states(tmp_path, 4, started)
    assert len(grid_jobs) == 4 and set(grid_jobs.values()) == {"COMPLETED"}, grid_jobs

    # the report: both hybrid ratios, 2 completed runs each
    proc = _run(report, tmp_path, env, timeout=300)
    assert "report.md" in proc.stdout
    md = (grid_dir / "report.md").read_text()
    assert "## By meta.hybrid_ratio" in md
    for ratio in ("0", "0.5"):
        assert re.search(rf"^\|\s*{re.escape(ratio)}\s*\|\s*2\s*\|\s*2\s*\|", md, flags=re.MULTILINE), md

    # the optuna study: 4 trials as SLURM jobs, results in the sweep dir
    _run(optuna_line, tmp_path, env, timeout=1800)
    sweep_dir = tmp_path / "outputs" / "train" / "multirun" / "meta_optuna"
    storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    study = optuna.load_study(study_name="meta_optuna", storage=storage)
    assert len(study.trials) == 4
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials), [
        (t.state, t.user_attrs) for t in study.trials
    ]
    jobs = _sacct_states(tmp_path, 8, started)
    assert len(jobs) == 8 and set(jobs.values()) == {"COMPLETED"}, jobs
    with (sweep_dir / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3]
    assert (sweep_dir / "best.yaml").exists()
    print(f"README block: {time.perf_counter() - t0:.0f} s")

    # "rerun to continue the study": with n_trials reached, the rerun launches nothing
    proc = _run(optuna_line, tmp_path, env, timeout=600)
    assert "4 trials done, 0 to run" in proc.stdout + proc.stderr
    assert len(optuna.load_study(study_name="meta_optuna", storage=storage).trials) == 4
    assert len(jobs_from(tmp_path, started)) == 8

    # part 5: the study as optuna-dashboard shows it
    with serve_dashboard(storage) as base:
        summary, detail = dashboard_study(base, "meta_optuna")
    assert summary["directions"] == ["minimize"]
    assert [t["number"] for t in detail["trials"]] == [0, 1, 2, 3]
    for trial, row in zip(detail["trials"], rows, strict=True):
        assert trial["state"].upper() == row["state"]
        if row["state"] == "COMPLETE":
            assert trial["values"] == [pytest.approx(float(row["value"]))]
