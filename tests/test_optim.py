"""Weight decay groups of the training optimizer (`optim.weight_decay` is documented as decoupled decay
of matrices; norms, biases and the meta head's log-scalars never decay)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from picomaml.lit.module import PicoLitModule
from picomaml.lit.optim import OptimConfig
from picomaml.meta import MetaConfig
from picomaml.model.presets import load_model_config

# no warmup, so the first step runs at `lr` itself and the decay factor is exactly 1 - lr * weight_decay
OPTIM = OptimConfig(lr=0.1, weight_decay=0.5, warmup_steps=0)


@pytest.fixture
def module() -> PicoLitModule:
    """A tiny decoder with a Meta-SGD ProtoMAML head, attached to a trainer as `configure_optimizers` is."""
    meta = MetaConfig(learn_inner_lr=True, output_init="proto", head_hidden_dims=[8])
    module = PicoLitModule(load_model_config("tiny"), OPTIM, seq_len=16, meta=meta)
    module.trainer = pl.Trainer(
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return module


def _log_scalars(module: PicoLitModule) -> list[torch.nn.Parameter]:
    head = module.meta_head
    return [head.log_proto_scale, *head.log_inner_lr.values()]


def test_only_matrices_decay_and_log_scalars_are_free(module):
    optimizer = module.configure_optimizers()["optimizer"]
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    params = list(module.parameters())
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(params) == len(decay_of)

    assert len(_log_scalars(module)) == 5  # the scale and one step size per head tensor (2 body, 2 output)
    for param in _log_scalars(module):
        assert decay_of[id(param)] == 0.0
    matrices = [p for p in module.model.parameters() if p.ndim == 2]
    matrices += [p for name, p in module.meta_head.body.items() if name.endswith("_weight")]
    assert len(matrices) == 2 + 7 * 2 + 1  # embedding and output projections, 7 per layer, head body
    for param in matrices:
        assert decay_of[id(param)] == OPTIM.weight_decay
    norms_and_biases = [p for p in params if p.ndim == 1]
    assert norms_and_biases and all(decay_of[id(p)] == 0.0 for p in norms_and_biases)


def test_a_step_without_gradient_shrinks_matrices_only(module):
    optimizer = module.configure_optimizers()["optimizer"]
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    for param in module.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()

    # AdamW with a zero gradient moves a parameter only by its decay: p <- p * (1 - lr * weight_decay)
    shrink = 1 - OPTIM.lr * OPTIM.weight_decay
    head = module.meta_head
    assert torch.equal(head.log_proto_scale, before["meta_head.log_proto_scale"])
    for name, log_lr in head.log_inner_lr.items():
        assert torch.equal(log_lr, before[f"meta_head.log_inner_lr.{name}"])
    torch.testing.assert_close(head.body["body0_weight"], shrink * before["meta_head.body.body0_weight"])
    q_proj = module.model.layers[0].attention.q_proj.weight
    torch.testing.assert_close(q_proj, shrink * before["model.layers.0.attention.q_proj.weight"])
    assert torch.equal(module.model.output_norm.weight, before["model.output_norm.weight"])
