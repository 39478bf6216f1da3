"""Print the composed config as a tree (rich) and keep a copy in the run dir."""

from __future__ import annotations

from pathlib import Path

import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

# Sections first in this order, then the rest: the ones a researcher checks before a long run.
ORDER = ("data", "model", "meta", "optim", "trainer", "callbacks", "logger", "paths")


def print_config_tree(cfg: DictConfig, save_to: Path | None = None) -> None:
    tree = rich.tree.Tree("config", guide_style="dim")
    names = [k for k in ORDER if k in cfg] + [k for k in cfg if k not in ORDER and k != "hydra"]
    for name in names:
        branch = tree.add(f"[bold]{name}")
        value = cfg[name]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    Console().print(tree)
    if save_to is not None:
        with open(save_to, "w") as file:
            Console(file=file, width=120).print(tree)
