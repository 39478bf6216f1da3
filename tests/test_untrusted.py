"""A downloaded run dir is data, never code: planted pickles and config targets do not run."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
import yaml

from picomaml import evaluate, export, generate
from picomaml.config import ConfigError
from picomaml.model import PicoDecoder, load_model_config
from picomaml.runs import RunError, check_architecture, load_run


class Planted:
    """Unpickling this runs a shell command that leaves a marker file (what an attacker would plant)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _legit_checkpoint(path: Path, extra: dict | None = None) -> None:
    config = load_model_config("tiny")
    model = PicoDecoder(config)
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"model_config": dataclasses.asdict(config)},
            "global_step": 1,
            **(extra or {}),
        },
        path,
    )


def _run_dir(root: Path, data: dict) -> Path:
    (root / "checkpoints").mkdir(parents=True)
    (root / "training_config.yaml").write_text(yaml.safe_dump({"data": data, "model": {}}))
    return root


def test_a_planted_pickle_in_a_checkpoint_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    run = _run_dir(tmp_path / "run", {"_target_": "picomaml.data.PicoDataModule"})
    _legit_checkpoint(run / "checkpoints" / "last.ckpt", extra={"payload": Planted(marker)})
    with pytest.raises(RunError, match="cannot be read"):
        load_run(run)
    with pytest.raises(ConfigError, match="cannot be read"):  # train ckpt_path=... checks it first
        check_architecture(run / "checkpoints" / "last.ckpt", load_model_config("tiny"))
    for main, args in (
        (evaluate.main, [f"ckpt_path={run}"]),
        (generate.main, [f"ckpt_path={run}", "prompt=hello"]),
        (export.main, [f"ckpt_path={run}", f"out={tmp_path / 'hf'}"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
    assert not marker.exists()


def test_a_planted_config_target_is_never_instantiated(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    planted = {"_target_": "os.system", "_args_": [f"touch {marker}"]}
    run = _run_dir(tmp_path / "run", planted)
    _legit_checkpoint(run / "checkpoints" / "last.ckpt")
    loaded = load_run(run)  # the weights are fine
    with pytest.raises(RunError, match=r"data._target_='os.system' is not one of picomaml's classes"):
        loaded.datamodule()
    with pytest.raises(SystemExit, match="refusing to instantiate") as exit_info:
        evaluate.main([f"ckpt_path={run}"])
    assert exit_info.value.code == 2
    # nested targets count too
    nested = _run_dir(tmp_path / "nested", {"_target_": "picomaml.data.PicoDataModule", "x": planted})
    _legit_checkpoint(nested / "checkpoints" / "last.ckpt")
    with pytest.raises(RunError, match=r"data.x._target_='os.system'"):
        load_run(nested).datamodule()
    assert not marker.exists()
