"""MAML over SMLMT meta-batches: pooling, the head-only inner loop, the outer loss and evaluation.

Cost model: the backbone runs ONCE per meta-batch, on all support and query windows of all tasks
(:func:`meta_forward`); the inner loop then adapts only the small head on those fixed features, so an
inner step costs a few tiny matmuls, never a backbone forward.

Inner loop, per task (:func:`maml_outer_loss`): start from the head's initial body parameters plus the
task's ProtoMAML (or zero) output layer, take ``inner_steps`` SGD steps on the support cross-entropy with
``torch.autograd.grad``, then score the query windows with the adapted parameters. The outer loss is the
mean query cross-entropy over tasks. With ``first_order=False`` the inner gradients are built with
``create_graph=True``, so the outer gradient includes the second-order terms through the head and into
the backbone features. With ``first_order=True`` (FOMAML) each inner gradient is computed on detached
copies and enters the update as a constant; the outer gradient still reaches the initial parameters
(identity path), the learned inner lrs, and the support features through the prototypes.

Every update creates new tensors (``p - lr * g``): the module's parameters are never written, so nothing
leaks between tasks or steps, and only the caller's optimizer changes them. The adaptation always runs
with autograd enabled and autocast disabled (fp32 second-order maths on a tiny head), so it also works
inside Lightning's no-grad validation loop (as long as the Trainer does not use inference mode).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from picomaml.meta.config import MetaConfig
from picomaml.meta.head import MetaHead

METRIC_KEYS = (
    "support_loss_pre",
    "support_loss_post",
    "support_acc_pre",
    "support_acc_post",
    "query_loss",
    "query_acc",
    "query_acc_no_adapt",
    "inner_grad_norm",
)


def representations(hidden: Tensor, lengths: Tensor, pooling: str) -> Tensor:
    """Pool final-norm hidden states [B, L, D] of right-padded windows into [B, D].

    ``last``: the state at the last real token (index ``length - 1``); a causal model has read the whole
    masked window there. ``mean``: the mean over the real tokens. Padding never contributes, and no
    choice reads the mask position alone or always position 0. Lengths must be >= 1.
    """
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
    if pooling == "mean":
        real = torch.arange(hidden.shape[1], device=hidden.device) < lengths.unsqueeze(1)
        return (hidden * real.unsqueeze(-1).to(hidden.dtype)).sum(1) / lengths.unsqueeze(1).to(hidden.dtype)
    raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")


@dataclass(frozen=True)
class InnerLoop:
    """What one task's adaptation does: ``steps`` SGD steps on the support cross-entropy of an
    ``n_way`` task, first order (FOMAML) or second order. The step sizes belong to the head
    (:meth:`MetaHead.inner_lrs`, fixed or learned)."""

    n_way: int
    steps: int
    first_order: bool = False

    @classmethod
    def of(cls, cfg: MetaConfig, first_order: bool | None = None) -> InnerLoop:
        """The inner loop of ``cfg``; ``first_order`` overrides ``cfg.first_order`` when given."""
        order = cfg.first_order if first_order is None else first_order
        return cls(n_way=cfg.n_way, steps=cfg.inner_steps, first_order=order)


def maml_outer_loss(
    head: MetaHead,
    support_feats: Tensor,
    support_labels: Tensor,
    query_feats: Tensor,
    query_labels: Tensor,
    inner: InnerLoop,
) -> tuple[Tensor, dict[str, float]]:
    """Mean query cross-entropy after inner-loop adaptation, over a batch of T tasks.

    Args:
        head: the head whose initial parameters (and learned lrs) receive the outer gradient.
        support_feats: [T, N*K, D] backbone features of the support windows.
        support_labels: [T, N*K] labels in 0..N-1.
        query_feats, query_labels: [T, N*Q, D] and [T, N*Q].
        inner: N, the number of SGD steps on the support loss (0 = ProtoMAML init only) and the order.

    Returns:
        The outer loss (a scalar with a graph into the features, the head and the learned lrs) and
        detached float metrics averaged over tasks: ``support_loss_pre/post``, ``support_acc_pre/post``
        (before/after adaptation), ``query_loss``, ``query_acc``, ``query_acc_no_adapt`` (the ProtoMAML
        init without inner steps, i.e. a prototypical-network baseline), ``inner_grad_norm`` (global
        norm of the inner gradient, mean over steps and tasks), ``head_param_norm`` (norm of the initial
        body parameters), ``proto_scale`` (with ``proto`` init) and ``inner_lr_mean`` (with learned lrs).
    """
    stats = adapt_tasks(head, support_feats, support_labels, query_feats, query_labels, inner)
    loss = stats.pop("query_loss_graph").mean()
    squares = [(p.detach() ** 2).sum() for p in head.initial_params().values()]
    extra = [torch.sqrt(sum(squares, loss.new_zeros(())))]
    names = [*METRIC_KEYS, "head_param_norm"]
    if head.log_proto_scale is not None:
        extra.append(head.log_proto_scale.detach().exp())
        names.append("proto_scale")
    if head.learns_inner_lr:
        extra.append(torch.stack([lr.detach() for lr in head.inner_lrs().values()]).mean())
        names.append("inner_lr_mean")
    values = torch.stack([*(stats[k].mean() for k in METRIC_KEYS), *extra]).tolist()  # one device sync
    return loss, dict(zip(names, values, strict=True))


def adapt_tasks(
    head: MetaHead,
    support_feats: Tensor,
    support_labels: Tensor,
    query_feats: Tensor,
    query_labels: Tensor,
    inner: InnerLoop,
) -> dict[str, Tensor]:
    """Adapt the head to each task; per-task tensors [T] for every key of :data:`METRIC_KEYS` (detached)
    plus ``query_loss_graph`` [T], the query losses with their graph (arguments as :func:`maml_outer_loss`).

    Tasks are looped over, not vmapped: T is small and each task builds its own parameter dict from the
    module's initial parameters, which is what keeps tasks independent.
    """
    device_type = support_feats.device.type
    lrs = head.inner_lrs()
    with torch.enable_grad(), torch.autocast(device_type, enabled=False):
        per_task = [
            _adapt_one(
                head,
                _fp32(support_feats[t]),
                support_labels[t],
                _fp32(query_feats[t]),
                query_labels[t],
                inner,
                lrs,
            )
            for t in range(support_feats.shape[0])
        ]
    return {key: torch.stack([task[key] for task in per_task]) for key in per_task[0]}


def _adapt_one(
    head: MetaHead,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    inner: InnerLoop,
    lrs: Mapping[str, Tensor | float],
) -> dict[str, Tensor]:
    initial = head.task_params(support_x, support_y, inner.n_way)
    # The ProtoMAML output layer is computed from the body parameters. Every inner step must take the
    # partial derivative of the support loss with respect to each tensor, holding the others fixed; a
    # view is a graph node of its own that the output layer was not computed from, so differentiating
    # with respect to it (rather than the body parameters themselves) leaves out the path through the
    # prototypes, at the first step as at every later one, while the outer gradient still flows back.
    params = {name: p.view_as(p) for name, p in initial.items()}
    grad_norms = []
    for _ in range(inner.steps):
        if inner.first_order:
            current = {name: p.detach().requires_grad_() for name, p in params.items()}
            x = support_x.detach()
        else:
            # a tensor with no graph (features from a no-grad backbone) still needs grad to be adapted
            current = {
                name: p if p.requires_grad else p.detach().requires_grad_() for name, p in params.items()
            }
            x = support_x
        loss = F.cross_entropy(head.logits(current, x), support_y)
        grads = torch.autograd.grad(loss, list(current.values()), create_graph=not inner.first_order)
        grad_norms.append(torch.sqrt(sum((g.detach() ** 2).sum() for g in grads)))
        params = {name: p - lrs[name] * g for (name, p), g in zip(params.items(), grads, strict=True)}
    query_logits = head.logits(params, query_x)
    query_loss = F.cross_entropy(query_logits, query_y)
    with torch.no_grad():
        support_pre = head.logits(initial, support_x)
        support_post = head.logits(params, support_x)
        query_pre = head.logits(initial, query_x)
        zero = support_x.new_zeros(())
        return {
            "query_loss_graph": query_loss,
            "support_loss_pre": F.cross_entropy(support_pre, support_y),
            "support_loss_post": F.cross_entropy(support_post, support_y),
            "support_acc_pre": _accuracy(support_pre, support_y),
            "support_acc_post": _accuracy(support_post, support_y),
            "query_loss": query_loss.detach(),
            "query_acc": _accuracy(query_logits, query_y),
            "query_acc_no_adapt": _accuracy(query_pre, query_y),
            "inner_grad_norm": torch.stack(grad_norms).mean() if grad_norms else zero,
        }


def _fp32(x: Tensor) -> Tensor:
    """Upcast half-precision features (bf16 autocast) to fp32; float64 (gradient checks) stays."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(-1) == labels).float().mean()


def window_features(
    backbone_hidden_fn: Callable[[Tensor], Tensor], batch: Mapping[str, Tensor], pooling: str
) -> tuple[Tensor, Tensor]:
    """Support [T, N*K, D] and query [T, N*Q, D] fp32 features from ONE backbone call on all windows.

    The windows are trimmed to the longest real length first: the backbone is causal and padding is on
    the right, so the dropped pad columns cannot change any real position.
    """
    support, query = batch["support_tokens"], batch["query_tokens"]
    tasks, n_support = support.shape[:2]
    n_query = query.shape[1]
    lengths = torch.cat([batch["support_lengths"].flatten(), batch["query_lengths"].flatten()])
    tokens = torch.cat([support.flatten(0, 1), query.flatten(0, 1)])[:, : int(lengths.max())]
    feats = _fp32(representations(backbone_hidden_fn(tokens), lengths, pooling))
    split = tasks * n_support
    return feats[:split].view(tasks, n_support, -1), feats[split:].view(tasks, n_query, -1)


def meta_forward(
    backbone_hidden_fn: Callable[[Tensor], Tensor],
    batch: Mapping[str, Tensor],
    head: MetaHead,
    cfg: MetaConfig,
) -> tuple[Tensor, dict[str, float]]:
    """Outer loss and metrics of one meta-batch (a :class:`~picomaml.meta.smlmt.MetaBatchDataset` item).

    ``backbone_hidden_fn`` maps token ids [B, L] to final-norm hidden states [B, L, D] (e.g.
    ``model.hidden_states``); it is called once. ``batch`` must already be on the backbone's device.
    """
    support_feats, query_feats = window_features(backbone_hidden_fn, batch, cfg.pooling)
    return maml_outer_loss(
        head, support_feats, batch["support_labels"], query_feats, batch["query_labels"], InnerLoop.of(cfg)
    )


def meta_test_tasks(
    backbone_hidden_fn: Callable[[Tensor], Tensor],
    batch: Mapping[str, Tensor],
    head: MetaHead,
    cfg: MetaConfig,
) -> dict[str, Tensor]:
    """Per-task meta-test statistics [T] of one meta-batch (the keys of :data:`METRIC_KEYS`), detached.

    The backbone runs without grad and the head adapts with grad. The inner loop runs first order: no
    outer backward follows, and every inner step takes the partial derivative, so the adapted parameters
    are exactly those of second order. Validation, ``evaluate`` and the benchmarks all score this way.
    """
    with torch.no_grad():
        support_feats, query_feats = window_features(backbone_hidden_fn, batch, cfg.pooling)
    stats = adapt_tasks(
        head,
        support_feats,
        batch["support_labels"],
        query_feats,
        batch["query_labels"],
        InnerLoop.of(cfg, first_order=True),
    )
    stats.pop("query_loss_graph")
    return stats


def evaluate_episodes(
    backbone_hidden_fn: Callable[[Tensor], Tensor],
    dataset: Any,
    head: MetaHead,
    cfg: MetaConfig,
    episodes: Iterable[int],
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Query accuracy over the tasks of the given episodes, with 95% confidence intervals.

    Each task is one sample: mean +- 1.96 * std / sqrt(M) over M tasks (sample std; nan for M < 2).
    Each task is scored by :func:`meta_test_tasks`. Returns ``query_acc``, ``query_acc_ci95``,
    ``no_adapt_acc`` and ``no_adapt_acc_ci95`` (ProtoMAML init, no inner steps), ``chance`` (1/N) and
    ``tasks`` (M). ``dataset[e]`` is a meta-batch (e.g. a meta-test :class:`MetaBatchDataset`).
    """
    adapted: list[Tensor] = []
    baseline: list[Tensor] = []
    for episode in episodes:
        batch = {k: v.to(device) if device is not None else v for k, v in dataset[episode].items()}
        stats = meta_test_tasks(backbone_hidden_fn, batch, head, cfg)
        adapted.append(stats["query_acc"].cpu())
        baseline.append(stats["query_acc_no_adapt"].cpu())
    acc, base = torch.cat(adapted).double(), torch.cat(baseline).double()
    return {
        "query_acc": acc.mean().item(),
        "query_acc_ci95": ci95(acc),
        "no_adapt_acc": base.mean().item(),
        "no_adapt_acc_ci95": ci95(base),
        "chance": 1.0 / cfg.n_way,
        "tasks": float(acc.numel()),
    }


def ci95(values: Tensor) -> float:
    """Half-width of the normal-approximation 95% interval of the mean: 1.96 * sample std / sqrt(M)
    (nan for M < 2)."""
    if values.numel() < 2:
        return math.nan
    return (1.96 * values.double().std() / math.sqrt(values.numel())).item()
