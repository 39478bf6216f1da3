"""Shared fixtures: composed configs pointing at a tmp output dir and a session-wide token cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from picomaml.config import CONF_DIR, register_bases, register_resolvers
from picomaml.train import CONFIG_SCHEMAS

# Tests never touch the network; wandb stays off unless a test turns it on.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)
register_resolvers()
register_bases(CONFIG_SCHEMAS)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenized-corpus cache for the whole session (the wiki packs once, in a few seconds)."""
    return tmp_path_factory.mktemp("cache")


def compose_train(overrides: list[str], output_dir: Path, cache_dir: Path) -> DictConfig:
    """The config `python -m picomaml.train <overrides>` would run, writing into `output_dir`."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir)
    return cfg


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
