"""The README's "Search and scale-out" commands, run exactly as written (issue 12, parts 2-4).

As tests/test_readme_sweeps.py does for the section before it: the commands are read from the section's
bash blocks, so a README edit is what gets tested, and each runs with ``bash -c`` in a fresh working
directory on the local SLURM cluster. The two-objective study must leave a Pareto front, the memory
example must be refused before anything is written, and the data-parallel job must train as two ranks.
The memory benchmark line is a measurement (minutes of real trainings per size); tests/test_memory.py
checks the model it reports on.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_readme_sweeps import readme_env, readme_sweep_commands

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Search and scale-out"


def _commands() -> dict[str, str]:
    """The section's commands by what they do."""
    named = {}
    for command in readme_sweep_commands(section=SECTION):
        if "meta_optuna_pareto" in command:
            named["pareto"] = command
        elif "picomaml.report" in command:
            named["report"] = command
        elif "picomaml.bench memory" in command:
            named["bench"] = command
        elif "tasks_per_node=2" in command:
            named["ddp"] = command
        elif "data.batch_size=256" in command:
            named["refused"] = command
        else:
            raise AssertionError(f"a command this test does not know: {command}")
    return named


def test_section_has_the_commands_this_test_checks() -> None:
    assert sorted(_commands()) == ["bench", "ddp", "pareto", "refused", "report"]


def _run(command: str, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
@pytest.mark.usefixtures("slurm_cluster")
def test_readme_scaleout_runs_as_written(tmp_path: Path, cache_dir: Path) -> None:
    commands = _commands()
    env = readme_env(cache_dir)

    # a run predicted over this machine's memory: one line naming the override, nothing written
    proc = _run(commands["refused"], tmp_path, env, timeout=300)
    assert proc.returncode != 0
    assert "predicted peak memory" in proc.stderr and "memory_check=false" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs" / "train" / "runs").exists() or not any(
        (tmp_path / "outputs" / "train" / "runs").iterdir()
    )

    # two objectives on SLURM: 4 complete trials, best.yaml lists the Pareto front, the report shows it
    proc = _run(commands["pareto"], tmp_path, env, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    sweep_dir = tmp_path / "outputs" / "train" / "multirun" / "meta_pareto"
    front = yaml.safe_load((sweep_dir / "best.yaml").read_text())["pareto_front"]
    assert front and all(set(member["values"]) == {"val/loss", "meta_test/query_acc"} for member in front)
    text = (sweep_dir / "trials.csv").read_text()
    assert "values_val/loss" in text and "values_meta_test/query_acc" in text and "pareto" in text
    proc = _run(commands["report"], tmp_path, env, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "Pareto front" in (sweep_dir / "report.md").read_text()

    # data parallel: one SLURM job, two gloo ranks
    proc = _run(commands["ddp"], tmp_path, env, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (result_file,) = (tmp_path / "outputs" / "train" / "multirun" / "ddp2").glob("*/result.json")
    result = json.loads(result_file.read_text())
    assert result["status"] == "completed" and result["world_size"] == 2, result
