"""What several test modules share: composed configs, small run settings, the tiny real runs, SLURM waits.

Fixtures live in ``conftest.py``; this module holds the plain functions, constants and callbacks they and
the tests use.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path

import lightning.pytorch as pl
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from picomaml.config import CONF_DIR
from picomaml.lit.dynamics import LearningDynamics
from picomaml.model import ModelConfig
from picomaml.train import prepare_run, save_training_config

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "launchers" / "slurm_local_cluster.sh"
VAL_ROWS = 4  # validation rows of the tiny runs' learning-dynamics dumps

# a one-layer model that builds in milliseconds, for tests of the code around a model
MICRO_MODEL = ModelConfig(
    d_model=16,
    n_layers=1,
    attention_n_heads=2,
    attention_n_kv_heads=1,
    activation_hidden_dim=32,
    vocab_size=64,
    max_seq_len=32,
)


def compose_root(root: str, overrides: list[str], output_dir: Path, cache_dir: Path) -> DictConfig:
    """The config `python -m picomaml.<root> <overrides>` would run, writing into `output_dir`."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=root, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir)
    return cfg


def compose_train(overrides: list[str], output_dir: Path, cache_dir: Path) -> DictConfig:
    """The config `python -m picomaml.train <overrides>` would run, writing into `output_dir`."""
    return compose_root("train", overrides, output_dir, cache_dir)


def compose_align(overrides: list[str], output_dir: Path, cache_dir: Path) -> DictConfig:
    """The config `python -m picomaml.align <overrides>` would run, writing into `output_dir`."""
    return compose_root("align", overrides, output_dir, cache_dir)


# Small and fast: tiny model, synthetic numbers, fp32 on CPU, no progress bar.
FAST = [
    "model=tiny",
    "data=synthetic",
    "data.seq_len=32",
    "data.batch_size=4",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "optim.lr=3e-3",
    "optim.warmup_steps=2",
]


# the embedded wiki corpus with a short word buffer: the word index builds in well under a second
META = [
    *FAST,
    "data=wiki",
    "data.seq_len=32",
    "meta=5way4shot",
    "meta.buffer_tokens=200000",
    "meta.window_len=32",
]


class GradCapture(pl.Callback):
    """Keeps a copy of the gradients that reach the optimizer (Adam's first step hides small differences)."""

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: object
    ) -> None:
        self.grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def write_word_corpus(path: Path) -> Path:
    """300 documents of made-up two-syllable words (144 word types), as JSON lines.

    Enough repeated words that SMLMT finds held-out meta-test classes, small enough to pack instantly.
    """
    syllables = ["ka", "lo", "mi", "ren", "tsu", "vax", "dor", "pel", "quin", "zar", "bri", "fen"]
    words = [a + b for a in syllables for b in syllables]
    rng = random.Random(0)
    with open(path, "w") as file:
        for _ in range(300):
            text = " ".join(rng.choice(words) for _ in range(24)).capitalize() + "."
            file.write(json.dumps({"text": text}) + "\n")
    return path


def tiny_overrides(corpus: Path) -> list[str]:
    return [
        *FAST,
        "data=text",
        f"data.corpus_options.paths={corpus}",
        "data.seq_len=32",
        "data.batch_size=4",
        "data.val_fraction=0.1",
        "data.meta_test_fraction=0.3",  # held-out documents enough for meta-test tasks of 144 word types
        "data.val_batches=2",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "~callbacks.learning_dynamics",  # the runs below add their own, or none
    ]


def tiny_sweep(root: Path, cache_dir: Path) -> Path:
    """``<root>/sweep/{0,1}``: the same tiny run with (0) and without (1) :class:`LearningDynamics`.

    Built once per session (the ``sweep_dir`` fixture); ``<root>/sweep/done`` marks a finished build.
    """
    sweep = root / "sweep"
    if (sweep / "done").is_file():
        return sweep
    corpus = write_word_corpus(root / "words.jsonl")
    for job, dynamics in (("0", True), ("1", False)):
        cfg = compose_train(tiny_overrides(corpus), sweep / job, cache_dir)
        plan = prepare_run(cfg)
        if dynamics:
            plan.trainer.callbacks.append(
                LearningDynamics(every_n_steps=2, log_spaced_until=1, val_batch_size=VAL_ROWS)
            )
        plan.output_dir.mkdir(parents=True, exist_ok=True)
        save_training_config(cfg, plan.output_dir)
        plan.trainer.fit(plan.module, datamodule=plan.datamodule)
    (sweep / "done").touch()
    return sweep


def controller_up() -> bool:
    """Whether a SLURM controller answers. Whatever state the node is in (idle, mixed, completing...):
    a cluster that answers is someone's to use and not ours to stop."""
    if shutil.which("scontrol") is None:
        return False
    try:
        proc = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return "is UP" in proc.stdout


def job_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
    return out.strip()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.5)
