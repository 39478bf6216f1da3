"""The meta-learned classification head: an MLP body plus a per-task N-way output layer.

The head is *functional*: every forward takes its parameters as a ``dict[str, Tensor]``, so the inner
loop adapts a dict of new tensors (``p - lr * grad``) and never writes into the module. The module only
holds the **initial** (meta-learned) body parameters as ``nn.Parameter``s, which the outer optimizer
updates, the log ProtoMAML scale (``proto`` init only) and, with ``learn_inner_lr``, one learned log
inner learning rate per head tensor (Meta-SGD with a per-layer rather than per-weight rate, kept
positive by the log).

Backbone features are L2-normalised before the body. Final-norm hidden states have norm ~sqrt(d_model),
so raw squared-distance logits grow with the model width: at d_model 96 the ProtoMAML init already fits
the support set (support loss ~0.004 on synthetic clustered features), leaving the inner loop no gradient
and the query predictions overconfident (query loss ~2.5 at 25% accuracy). On the unit sphere distances
are in [0, 2] whatever the width, so one ``inner_lr`` means the same thing for every model size.

The output layer has no meta-learned initial value, because any fixed N-way matrix would tie each row
to a label index while labels are a random permutation per task. Its value is computed per task from
the support set and does not depend on the label order:

- ``proto`` (ProtoMAML, Triantafillou et al. 2020): with c_k the mean body output of class k's support
  windows and s a meta-learned scale (initialised at ``proto_scale``), W_k = 2 s c_k and
  b_k = -s ||c_k||^2, so logits are -s ||z - c_k||^2 up to a per-window constant, i.e. a prototypical
  network before the first inner step (s = 1 is the paper's form; the scale lets the outer loop set the
  sharpness of the init). Gradients flow through c_k into the body and the backbone features.
- ``zeros``: W = 0, b = 0 (uniform predictions before adaptation; all learning is in the inner loop).

The body is ``Linear -> ReLU`` per entry of ``head_hidden_dims`` (none = output layer directly on the
normalised features), initialised with ``kaiming`` (He normal, for ReLU), ``xavier`` (Glorot uniform) or
``identity`` (eye-like weights) and zero biases.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from picomaml.meta.config import MetaConfig

OUTPUT_WEIGHT = "out_weight"
OUTPUT_BIAS = "out_bias"


class MetaHead(nn.Module):
    """MLP body (meta-learned initial parameters) + N-way output layer initialised per task.

    Args:
        d_model: width of the backbone features.
        cfg: reads ``head_hidden_dims``, ``head_init``, ``output_init``, ``proto_scale``,
            ``learn_inner_lr`` and ``inner_lr`` (the head owns its inner-loop step sizes, fixed or learned).
    """

    def __init__(self, d_model: int, cfg: MetaConfig) -> None:
        super().__init__()
        dims = [d_model, *cfg.head_hidden_dims]
        self.num_layers = len(cfg.head_hidden_dims)
        self.feature_dim = dims[-1]
        self.body = nn.ParameterDict()
        for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            weight = torch.empty(fan_out, fan_in)
            if cfg.head_init == "kaiming":
                nn.init.kaiming_normal_(weight, nonlinearity="relu")
            elif cfg.head_init == "xavier":
                nn.init.xavier_uniform_(weight)
            else:
                nn.init.eye_(weight)
            self.body[f"body{i}_weight"] = nn.Parameter(weight)
            self.body[f"body{i}_bias"] = nn.Parameter(torch.zeros(fan_out))
        # only `proto` uses the scale; an unused parameter would break DDP's gradient bucketing
        self.log_proto_scale = (
            nn.Parameter(torch.tensor(math.log(cfg.proto_scale))) if cfg.output_init == "proto" else None
        )
        self.inner_lr = float(cfg.inner_lr)
        self.log_inner_lr: nn.ParameterDict | None = None
        if cfg.learn_inner_lr:
            self.log_inner_lr = nn.ParameterDict(
                {name: nn.Parameter(torch.tensor(math.log(cfg.inner_lr))) for name in self.param_names()}
            )

    def param_names(self) -> list[str]:
        """Names of the tensors the inner loop adapts: the body's, then the output layer's."""
        return [*self.body.keys(), OUTPUT_WEIGHT, OUTPUT_BIAS]

    @property
    def learns_inner_lr(self) -> bool:
        return self.log_inner_lr is not None

    def initial_params(self) -> dict[str, Tensor]:
        """The meta-learned body parameters themselves (not copies): the start of every inner loop."""
        return dict(self.body.items())

    def inner_lrs(self) -> dict[str, Tensor | float]:
        """Inner-loop step size per head tensor: the learned ones (Meta-SGD, differentiable) with
        ``learn_inner_lr``, else ``inner_lr`` for every tensor."""
        if self.log_inner_lr is None:
            return dict.fromkeys(self.param_names(), self.inner_lr)
        return {name: log_lr.exp() for name, log_lr in self.log_inner_lr.items()}

    def features(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Body output for backbone features ``x`` [..., d_model] under ``params``."""
        x = F.normalize(x, dim=-1)
        for i in range(self.num_layers):
            x = F.relu(F.linear(x, params[f"body{i}_weight"], params[f"body{i}_bias"]))
        return x

    def logits(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """N-way logits [..., N] for backbone features ``x`` under a full parameter dict (body + output)."""
        return F.linear(self.features(params, x), params[OUTPUT_WEIGHT], params[OUTPUT_BIAS])

    def output_layer(self, support_z: Tensor, labels: Tensor, n_way: int) -> tuple[Tensor, Tensor]:
        """Initial output weight [N, D'] and bias [N] from body outputs of the support set.

        Row k depends only on the windows labelled k, so permuting labels permutes rows (ProtoMAML), or
        everything is zero.
        """
        if self.log_proto_scale is None:
            return support_z.new_zeros(n_way, support_z.shape[-1]), support_z.new_zeros(n_way)
        onehot = F.one_hot(labels, n_way).to(support_z.dtype)
        prototypes = (onehot.T @ support_z) / onehot.sum(0).clamp_min(1).unsqueeze(1)
        scale = self.log_proto_scale.exp()
        return 2 * scale * prototypes, -scale * (prototypes**2).sum(-1)

    def task_params(self, support_x: Tensor, labels: Tensor, n_way: int) -> dict[str, Tensor]:
        """Start of one task's inner loop: the initial body parameters plus the task's output layer."""
        params = self.initial_params()
        weight, bias = self.output_layer(self.features(params, support_x), labels, n_way)
        return {**params, OUTPUT_WEIGHT: weight, OUTPUT_BIAS: bias}
