"""The README's post-training commands (pretrain, SFT, DPO, a DPO sweep over beta, locally and on the
local SLURM cluster), run exactly as written.

As tests/test_readme_sweeps.py does for the sweeps: the commands are read from the section's bash block,
so a README edit is what gets tested, and run with ``bash -c`` one after the other in a fresh working
directory (each command's ``ckpt_path`` is the run dir the one before it wrote there).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.test_readme_sweeps import readme_env, readme_sweep_commands

SECTION = "### Post-training: SFT, then DPO"


def test_section_has_the_commands_this_test_checks() -> None:
    commands = readme_sweep_commands(section=SECTION)
    assert [c.split()[:3] for c in commands] == [
        ["python", "-m", "picomaml.train"],
        *3 * [["python", "-m", "picomaml.align"]],
        ["bash", "launchers/slurm_local_cluster.sh", "start"],
        ["python", "-m", "picomaml.align"],
    ]
    assert [c.split()[3] for c in commands[1:4]] == ["stage=sft", "stage=dpo", "-m"]
    assert commands[5].split()[3:5] == ["-m", "hydra/launcher=slurm_local"]


@pytest.mark.slow
@pytest.mark.usefixtures("slurm_cluster")
def test_readme_post_training_runs_as_written(tmp_path: Path, cache_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the README's slurm_local_cluster.sh start runs as root")
    env = readme_env(cache_dir)
    (tmp_path / "launchers").symlink_to(REPO / "launchers")
    for command in readme_sweep_commands(section=SECTION):
        proc = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200
        )
        assert proc.returncode == 0, (command, (proc.stdout + proc.stderr)[-4000:])

    outputs = tmp_path / "outputs"
    # the two sweeps' dirs are named by their start time: the local one, then the one on SLURM
    local_sweep, slurm_sweep = sorted((outputs / "align" / "multirun").glob("*/*"))
    reports = [outputs / "align" / "runs" / "seq_dpo_shuffle" / "eval_results" / "dpo_test.json"]
    reports += sorted(local_sweep.glob("[0-9]/eval_results/dpo_test.json"))
    reports += sorted(slurm_sweep.glob("[0-9]/eval_results/dpo_test.json"))
    assert len(reports) == 5
    assert len(list(slurm_sweep.glob(".submitit/*/*_result.pkl"))) == 2  # both jobs ran through SLURM
    for path in reports:
        report = json.loads(path.read_text())
        # before DPO the policy is its reference: loss log 2, accuracy one half by ties
        assert report["before"]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert report["before"]["pref_acc"] == 0.5
        assert 0 < report["step"] <= report["final_step"] and report["n_pairs"] > 0
    shuffle = json.loads(reports[0].read_text())
    # the README's claim: with shuffled rejections DPO learns the preference on unseen pairs
    assert shuffle["after"]["pref_acc"] > 0.8 and shuffle["after"]["dpo_loss"] < math.log(2)
    assert [json.loads(path.read_text())["beta"] for path in reports[1:]] == [0.1, 0.5, 0.1, 0.5]
