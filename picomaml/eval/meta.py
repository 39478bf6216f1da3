"""Meta-test evaluation: N-way K-shot SMLMT accuracy on held-out words, with confidence intervals.

``episodes`` SMLMT tasks (one task per episode) whose classes are the held-out meta-test words (never
classes during meta-training), each scored by adapting the head on the support set and classifying the
query windows (:func:`picomaml.meta.meta_test_tasks`, the same scoring as validation). Reported with 95%
confidence intervals over tasks: ``meta_query_acc`` (after the inner loop), ``meta_no_adapt_acc`` (the
head's initialisation alone; with the ProtoMAML init that is a nearest-prototype classifier on the
backbone features) and ``meta_chance`` (1/N). For an AR-only checkpoint (no trained meta head) the head
is a **fresh initialisation** of the requested meta config (seeded): the number then measures how well
MAML from an untrained head init separates held-out words with the backbone's features, which is the
baseline a meta-trained run is compared against.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from picomaml.config import load_option
from picomaml.meta import MetaBatchDataset, MetaConfig, MetaHead, evaluate_episodes
from picomaml.model import PicoDecoder

# Fields of MetaConfig that describe the head, its inner-loop step size and the window representation:
# a trained head is only meaningful with the values it was trained with, whatever episode shape is
# evaluated.
HEAD_FIELDS = (
    "pooling",
    "head_hidden_dims",
    "head_init",
    "output_init",
    "proto_scale",
    "learn_inner_lr",
    "inner_lr",
)


def load_meta_config(name: str, **overrides: Any) -> MetaConfig:
    """The :class:`MetaConfig` of ``conf/meta/<name>.yaml`` with fields replaced by ``overrides``."""
    return load_option("meta", name, MetaConfig, **overrides)


def eval_meta_config(requested: MetaConfig, trained: MetaConfig | None) -> MetaConfig:
    """The config episodes are evaluated with: one task per episode (so M episodes = M tasks, one CI
    sample each), the requested episode shape and inner loop, and a trained head's own representation
    and architecture fields (:data:`HEAD_FIELDS`)."""
    head_fields = {k: getattr(trained, k) for k in HEAD_FIELDS} if trained is not None else {}
    return dataclasses.replace(requested, tasks_per_step=1, enabled=True, **head_fields)


def evaluate_meta(
    model: PicoDecoder,
    head: MetaHead | None,
    dataset: MetaBatchDataset,
    cfg: MetaConfig,
    episodes: int,
    seed: int = 0,
) -> dict[str, float]:
    """Meta-test accuracy over ``episodes`` episodes, as ``meta_*`` keys; ``head=None`` uses a fresh
    :class:`MetaHead` of ``cfg`` initialised from ``seed`` (the global RNG is left untouched)."""
    device = next(model.parameters()).device
    if head is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = MetaHead(model.config.d_model, cfg)
    head = head.to(device)
    with torch.enable_grad():  # the inner loop differentiates the head's support loss
        stats = evaluate_episodes(model.hidden_states, dataset, head, cfg, range(episodes), device=device)
    return {f"meta_{k}": v for k, v in stats.items()}
