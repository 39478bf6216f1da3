"""The memory model (picomaml.lit.memory) and memory-aware runs and sweeps (issue 12).

What the issue asks, as tests: the prediction grows as it should with batch, seq_len, layers and
precision, and its activation term is what autograd really saves; `picomaml.train` refuses a single run
predicted over the memory limit with one line naming the prediction and the override, and runs it with
the override; in a sweep with `hydra.sweeper.memory_budget_gb`, a trial predicted over budget is never
launched and is recorded with the reason "predicts X GB > budget Y GB", a trial that runs out of memory
at run time (a real allocation the allocator refuses, inside training) ends alone with status `oom`
while the others complete, and the constraints reach the sampler, which then stops proposing the
over-budget region. (SLURM's over-memory kill: tests/test_slurm_memory.py.)
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import optuna
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from optuna.trial import TrialState

from picomaml.config import ConfigError
from picomaml.lit.memory import (
    GB,
    activation_bytes_per_token,
    count_parameters,
    estimate_training_memory,
    format_budget_reason,
    predict_peak_memory,
)
from picomaml.meta import MetaConfig
from picomaml.model import PicoDecoder, load_model_config, preset_names
from picomaml.sweep.memory_budget import MemoryBudget
from picomaml.train import prepare_run, train
from tests.helpers import FAST, compose_train

REPO = Path(__file__).resolve().parents[1]


class AllocateAtStep(pl.Callback):
    """Asks the CPU allocator for ``nbytes`` at the first training batch: 2**50 bytes (a petabyte) is
    refused by the allocator itself, the real path of a run that needs more memory than there is."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if self.nbytes:
            torch.empty(self.nbytes, dtype=torch.uint8)


# --- the model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", preset_names())
def test_parameter_count_is_the_models(name: str) -> None:
    config = load_model_config(name)
    with torch.device("meta"):
        assert count_parameters(config) == PicoDecoder(config).num_parameters()


def _saved_bytes(name: str, batch: int, seq_len: int) -> tuple[int, int]:
    """Bytes autograd saves for the backbone's forward pass (each storage once, parameters excluded)
    and the number of layers, measured with saved-tensor hooks on the real model."""
    config = load_model_config(name)
    model = PicoDecoder(config)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    kept = []  # hold every saved tensor so that no storage is freed and its address reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        kept.append(t)
        return t

    ids = torch.randint(0, config.vocab_size, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.hidden_states(ids)
    return sum(storages.values()), config.n_layers


@pytest.mark.parametrize("name", ["tiny", "11m"])
def test_activation_term_is_what_autograd_saves(name: str) -> None:
    batch, seq_len = 2, 64
    measured, n_layers = _saved_bytes(name, batch, seq_len)
    config = load_model_config(name)
    per_layer = activation_bytes_per_token(config, "32-true") * batch * seq_len
    # every block saves the same tensors; the rest (ids, final norm, RoPE tables) is within 1 layer
    assert abs(measured - n_layers * per_layer) < per_layer
    estimate = estimate_training_memory(config, batch_size=batch, seq_len=seq_len)
    assert estimate.terms["activations"] == pytest.approx(measured, rel=0.02)


def _peak(**kwargs: object) -> int:
    config = kwargs.pop("model", load_model_config("11m"))
    return estimate_training_memory(config, **{"batch_size": 8, "seq_len": 256, **kwargs}).peak_bytes


def test_prediction_grows_with_batch_seq_len_layers_and_precision() -> None:
    assert _peak(batch_size=4) < _peak(batch_size=8) < _peak(batch_size=16)
    assert _peak(seq_len=128) < _peak(seq_len=256) < _peak(seq_len=512)
    layers = [_peak(model=load_model_config("11m", n_layers=n)) for n in (6, 12, 24)]
    assert layers == sorted(layers) and len(set(layers)) == 3
    assert _peak(precision="bf16-true") < _peak(precision="32-true") < _peak(precision="64-true")
    # under accumulation the next micro-batch's forward runs on top of the accumulated gradients
    assert _peak(accumulate_grad_batches=2) > _peak(accumulate_grad_batches=1)

    # activations are linear in tokens; weights and optimizer state do not depend on them
    config = load_model_config("65m")
    small = estimate_training_memory(config, batch_size=4, seq_len=256).terms
    large = estimate_training_memory(config, batch_size=8, seq_len=256).terms
    rope = config.n_layers * 256 * config.head_dim * 4
    assert large["activations"] - rope == 2 * (small["activations"] - rope)
    assert large["weights"] == small["weights"] == count_parameters(config) * 4
    assert large["optimizer"] == 2 * large["weights"]
    # 16-bit halves the matmul outputs that autograd saves
    bf16 = estimate_training_memory(config, batch_size=8, seq_len=256, precision="bf16-mixed").terms
    assert bf16["activations"] < 0.7 * large["activations"]
    assert bf16["autocast"] > 0 and large["autocast"] == 0


def test_meta_windows_count_when_the_meta_step_is_the_larger() -> None:
    config = load_model_config("11m")
    ar_only = estimate_training_memory(config, batch_size=1, seq_len=64)
    meta = MetaConfig(tasks_per_step=8, window_len=128)  # 8 x 5 x 8 windows x 128 tokens
    hybrid = estimate_training_memory(config, batch_size=1, seq_len=64, meta=meta)
    assert hybrid.phase == "meta forward end" and hybrid.peak_bytes > ar_only.peak_bytes
    assert hybrid.breakdown["meta"] == hybrid.terms["meta"] > 0
    bigger = estimate_training_memory(
        config, batch_size=1, seq_len=64, meta=MetaConfig(tasks_per_step=16, window_len=128)
    )
    assert bigger.peak_bytes > hybrid.peak_bytes
    # sum mode: the AR and meta graphs are alive together
    both = estimate_training_memory(
        config, batch_size=1, seq_len=64, meta=MetaConfig(tasks_per_step=8, window_len=128, hybrid_mode="sum")
    )
    assert both.peak_bytes > hybrid.peak_bytes


def test_predict_from_a_composed_config(tmp_path: Path, cache_dir: Path) -> None:
    cfg = compose_train(["model=small", "data.batch_size=6", "data.seq_len=128"], tmp_path, cache_dir)
    estimate = predict_peak_memory(cfg)
    expected = estimate_training_memory(
        load_model_config("small"), batch_size=6, seq_len=128, precision=estimate_precision(cfg)
    )
    assert estimate.peak_bytes == expected.peak_bytes
    assert sum(estimate.breakdown.values()) == estimate.peak_bytes


def estimate_precision(cfg: object) -> str:
    from picomaml.config import resolve_precision

    return resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)


def test_budget_reason_format() -> None:
    assert format_budget_reason(31.23, 24) == "predicts 31.2 GB > budget 24 GB"
    assert format_budget_reason(1.66, 1.5) == "predicts 1.7 GB > budget 1.5 GB"


# --- single runs ------------------------------------------------------------------------------------


def test_train_refuses_a_run_over_the_limit_and_runs_it_with_the_override(
    tmp_path: Path, cache_dir: Path
) -> None:
    over = compose_train([*FAST, "memory_limit_gb=0.25"], tmp_path / "run", cache_dir)
    predicted = predict_peak_memory(over).peak_gb
    with pytest.raises(ConfigError) as err:
        prepare_run(over)
    message = str(err.value)
    assert "\n" not in message
    assert f"predicted peak memory {predicted:.1f} GB > memory_limit_gb 0.25 GB" in message
    assert "memory_check=false" in message
    assert not (tmp_path / "run").exists()  # refused before anything was written

    with open_dict(over):
        over.memory_check = False
        over.trainer.max_steps = 2
        over.callbacks = None
    assert train(over)["status"] == "completed"  # the same run, trained

    roomy = compose_train([*FAST, f"memory_limit_gb={predicted + 0.5:.1f}"], tmp_path / "ok", cache_dir)
    prepare_run(roomy)


def test_train_cli_refuses_a_run_over_this_machines_memory(tmp_path: Path, cache_dir: Path) -> None:
    """570m at 256 x 1024 tokens per micro-batch needs far more than any test machine's RAM."""
    cmd = [
        sys.executable,
        "-m",
        "picomaml.train",
        "model=570m",
        "data=synthetic",
        "data.batch_size=256",
        "data.seq_len=1024",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        f"paths.log_dir={tmp_path}",
        f"paths.cache_dir={cache_dir}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("picomaml: config error: predicted peak memory ")
    assert "> this machine's memory" in last and "memory_check=false" in last
    assert not (tmp_path / "train" / "runs").exists() or not any((tmp_path / "train" / "runs").iterdir())


# --- sweeps -----------------------------------------------------------------------------------------


def test_sweep_skips_over_budget_trials_and_records_oom_alone(tmp_path: Path, cache_dir: Path) -> None:
    """A 2 x 2 grid: model tiny | 65m x an allocation at step 1 of nothing | a petabyte.

    The budget sits between tiny's and 65m's predictions: both 65m trials are never launched and are
    recorded over_budget with the reason; tiny without the allocation completes; tiny with it runs out
    of memory inside training and is recorded oom, and the study goes on.
    """
    short = [o for o in FAST if not o.startswith("model=")] + [
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.val_batches=1",
        "callbacks=none",
    ]
    predicted = {
        name: predict_peak_memory(compose_train([*short, f"model={name}"], tmp_path / "p", cache_dir)).peak_gb
        for name in ("tiny", "65m")
    }
    budget = round((predicted["tiny"] + predicted["65m"]) / 2, 1)
    assert predicted["tiny"] < budget < predicted["65m"]
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "picomaml.train",
        "-m",
        *short,
        "hydra/sweeper=picomaml_optuna",
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.sampler.name=grid",
        "hydra.sweeper.plots=false",
        f"hydra.sweeper.memory_budget_gb={budget}",
        "model=choice(tiny,65m)",
        "+callbacks.hog._target_=tests.test_memory.AllocateAtStep",
        f"+callbacks.hog.nbytes=choice(0,{2**50})",
        f"paths.cache_dir={cache_dir}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    study = optuna.load_study(study_name="picomaml", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    by_params = {(t.params["model"], int(t.params["callbacks.hog.nbytes"])): t for t in study.trials}
    assert len(by_params) == 4
    for nbytes in (0, 2**50):
        over = by_params[("65m", nbytes)]
        assert over.user_attrs["status"] == "over_budget"
        reason = re.fullmatch(r"predicts (\d+\.\d) GB > budget ([\d.]+) GB", over.user_attrs["error"])
        assert reason is not None, over.user_attrs["error"]
        assert float(reason[1]) == pytest.approx(over.user_attrs["predicted_memory_gb"], abs=0.051)
        assert float(reason[2]) == budget
        assert over.constraints["memory_budget"] > 0  # what the sampler reads
        assert over.state == TrialState.PRUNED  # a state samplers learn from (FAIL they skip)
        assert not (sweep_dir / str(over.number)).exists()  # never launched

    ok = by_params[("tiny", 0)]
    assert ok.state == TrialState.COMPLETE and ok.constraints["memory_budget"] <= 0
    oom = by_params[("tiny", 2**50)]
    assert oom.user_attrs["status"] == "oom" and oom.constraints["oom"] > 0
    assert "can't allocate memory" in oom.user_attrs["error"]
    result = json.loads((sweep_dir / str(oom.number) / "result.json").read_text())
    assert result["status"] == "oom"

    with open(sweep_dir / "trials.csv") as f:
        rows = {int(r["number"]): r for r in csv.DictReader(f)}
    assert rows[by_params[("65m", 0)].number]["status"] == "over_budget"
    assert rows[by_params[("65m", 0)].number]["error"].startswith("predicts ")
    assert rows[oom.number]["status"] == "oom"
    assert rows[ok.number]["status"] == "complete"
    assert float(rows[ok.number]["predicted_memory_gb"]) == pytest.approx(predicted["tiny"], abs=0.01)


def test_constraints_steer_the_sampler_away_from_the_over_budget_region(
    tmp_path: Path, cache_dir: Path
) -> None:
    """TPE searching data.batch_size (1..64) for an objective that prefers large batches, with a budget
    that only batches up to 16 fit. With the trials recorded by MemoryBudget, TPE keeps probing the
    budget's edge (the optimum is there) but rarely proposes batches far over it (> 32); told FAIL, which
    samplers skip, the same trials leave TPE proposing them most of the time."""
    base = compose_train(["model=11m", "data.seq_len=1024"], tmp_path, cache_dir)
    OmegaConf.set_readonly(base, False)

    def config_for(batch: int):
        cfg = base.copy()
        with open_dict(cfg):
            cfg.data.batch_size = batch
        return cfg

    budget = predict_peak_memory(config_for(16)).machine_bytes / GB + 0.01
    assert predict_peak_memory(config_for(17)).machine_bytes / GB > budget

    def over_budget_proposals(record: str) -> int:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=10)
        study = optuna.create_study(sampler=sampler)
        gate = MemoryBudget(budget)
        count = 0
        for i in range(60):
            trial = study.ask()
            batch = trial.suggest_int("batch", 1, 64)
            if record == "fail" and batch > 16:
                study.tell(trial, state=TrialState.FAIL)
            elif record == "budget" and not gate.admit(study, trial, lambda b=batch: config_for(b)):
                pass  # told by the gate
            else:
                study.tell(trial, -batch)  # bigger is better: the optimum sits at the budget's edge
            count += batch > 32 and i >= 10  # after the 10 random startup trials
        return count

    with_constraints, ignored = over_budget_proposals("budget"), over_budget_proposals("fail")
    assert ignored > 20 and with_constraints < ignored / 3, (with_constraints, ignored)
