"""MAML head and inner loop: exact meta-gradients, first order, no mutation, order invariance, pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from picomaml.meta import (
    InnerLoop,
    MetaConfig,
    MetaHead,
    adapt_tasks,
    evaluate_episodes,
    maml_outer_loss,
    meta_forward,
    representations,
)


def _tasks(tasks=2, n_way=3, k=2, q=2, dim=4, separation=1.0, seed=0, dtype=torch.float64):
    """Clustered synthetic features [T, N*K, D] / [T, N*Q, D] with labels in a random order per task."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(tasks, n_way, 1, dim, generator=gen, dtype=dtype) * separation
    x = centres + 0.5 * torch.randn(tasks, n_way, k + q, dim, generator=gen, dtype=dtype)
    perm = torch.stack([torch.randperm(n_way, generator=gen) for _ in range(tasks)])
    y = perm[:, :, None].expand(tasks, n_way, k + q)
    support = (x[:, :, :k].reshape(tasks, n_way * k, dim), y[:, :, :k].reshape(tasks, -1))
    query = (x[:, :, k:].reshape(tasks, n_way * q, dim), y[:, :, k:].reshape(tasks, -1))
    return support, query


def _head(dim=4, dtype=torch.float64, **overrides) -> MetaHead:
    torch.manual_seed(0)
    return MetaHead(dim, MetaConfig(**overrides)).to(dtype)


def test_second_order_meta_gradient_matches_finite_differences():
    (s, sy), (q, qy) = _tasks()
    head = _head(head_hidden_dims=[3], learn_inner_lr=True, inner_lr=0.5)
    s.requires_grad_(True)
    q.requires_grad_(True)
    params = list(head.parameters())  # body, proto scale and learned inner lrs

    def outer(support, query, *_params):
        # gradcheck perturbs the head's parameters in place, so reading them from the head is enough
        loss, _ = maml_outer_loss(head, support, sy, query, qy, InnerLoop(3, 2, False))
        return loss

    # fast mode compares a random projection of the full Jacobian (numerical vs analytical)
    assert torch.autograd.gradcheck(outer, (s, q, *params), eps=1e-6, atol=1e-6, fast_mode=True)


def test_first_order_drops_exactly_the_second_order_term():
    (s, sy), (q, qy) = _tasks(tasks=1)
    steps, lr = 3, 0.7
    head = _head(inner_lr=lr)
    s.requires_grad_(True)
    q.requires_grad_(True)
    loss, _ = maml_outer_loss(head, s, sy, q, qy, InnerLoop(3, steps, True))
    fo_grads = torch.autograd.grad(loss, [s, q, head.log_proto_scale])

    # the same computation by hand, each inner gradient taken on detached copies
    scale = head.log_proto_scale.exp()
    xs, xq = F.normalize(s[0], dim=-1), F.normalize(q[0], dim=-1)
    onehot = F.one_hot(sy[0], 3).to(s.dtype)
    c = onehot.T @ xs / onehot.sum(0)[:, None]
    weight, bias = 2 * scale * c, -scale * (c**2).sum(-1)
    for _ in range(steps):
        w0, b0 = weight.detach().requires_grad_(), bias.detach().requires_grad_()
        inner = F.cross_entropy(xs.detach() @ w0.T + b0, sy[0])
        gw, gb = torch.autograd.grad(inner, [w0, b0])
        weight, bias = weight - lr * gw, bias - lr * gb
    manual = F.cross_entropy(xq @ weight.T + bias, qy[0])
    manual_grads = torch.autograd.grad(manual, [s, q, head.log_proto_scale])
    torch.testing.assert_close(loss, manual)
    for got, want in zip(fo_grads, manual_grads, strict=True):
        torch.testing.assert_close(got, want)

    second, _ = maml_outer_loss(head, s, sy, q, qy, InnerLoop(3, steps, False))
    torch.testing.assert_close(second, loss)  # same adapted values...
    so_grad = torch.autograd.grad(second, s)[0]
    assert not torch.allclose(so_grad, fo_grads[0])  # ...but second order adds a term


def test_inner_loop_lowers_support_loss():
    (s, sy), (q, qy) = _tasks(tasks=4, n_way=5, k=4, q=4, dim=16, separation=0.5, dtype=torch.float32)
    for output_init in ("proto", "zeros"):
        head = _head(16, torch.float32, output_init=output_init)
        _, metrics = maml_outer_loss(head, s, sy, q, qy, InnerLoop(5, 5, False))
        assert metrics["support_loss_post"] < metrics["support_loss_pre"]
        assert metrics["support_acc_post"] >= metrics["support_acc_pre"]
        assert metrics["inner_grad_norm"] > 0
        assert 0.0 <= metrics["query_acc"] <= 1.0


def test_head_is_never_mutated_by_the_inner_loop_or_backward():
    (s, sy), (q, qy) = _tasks(tasks=3, dtype=torch.float32)
    head = _head(4, torch.float32, head_hidden_dims=[5, 4], learn_inner_lr=True, inner_lr=0.5)
    before = {name: p.detach().clone() for name, p in head.named_parameters()}
    for first_order in (False, True):
        loss, _ = maml_outer_loss(head, s, sy, q, qy, InnerLoop(3, 4, first_order))
        loss.backward()
    for name, p in head.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_proto_init_is_invariant_to_label_order():
    (s, sy), (q, qy) = _tasks(tasks=1)
    head = _head(head_hidden_dims=[6], inner_lr=0.5)
    perm = torch.tensor([2, 0, 1])
    params = head.task_params(s[0], sy[0], 3)
    permuted = head.task_params(s[0], perm[sy[0]], 3)
    # class k becomes class perm[k]: row perm[k] of the new layer is row k of the old one
    torch.testing.assert_close(permuted["out_weight"][perm], params["out_weight"])
    torch.testing.assert_close(permuted["out_bias"][perm], params["out_bias"])
    loss, metrics = maml_outer_loss(head, s, sy, q, qy, InnerLoop(3, 3, False))
    loss_p, metrics_p = maml_outer_loss(head, s, perm[sy], q, perm[qy], InnerLoop(3, 3, False))
    torch.testing.assert_close(loss, loss_p)
    assert metrics["query_acc"] == metrics_p["query_acc"]


def test_every_inner_step_takes_the_partial_derivative_with_a_hidden_body():
    # MAML's inner step is SGD on the task's parameters: each tensor moves along the partial derivative
    # of the support loss, the others held fixed. With a hidden body, the ProtoMAML output layer is a
    # function of the body; its path must not enter the body's inner gradient at the first step either.
    (s, sy), (q, qy) = _tasks(tasks=1)
    head = _head(head_hidden_dims=[5], inner_lr=0.5)
    start = {name: t.detach().requires_grad_() for name, t in head.task_params(s[0], sy[0], 3).items()}
    support_loss = F.cross_entropy(head.logits(start, s[0]), sy[0])
    grads = torch.autograd.grad(support_loss, list(start.values()))
    adapted = {name: t.detach() - 0.5 * g for (name, t), g in zip(start.items(), grads, strict=True)}
    want = F.cross_entropy(head.logits(adapted, q[0]), qy[0])
    for first_order in (False, True):  # validation adapts first order, training second order: same head
        stats = adapt_tasks(head, s, sy, q, qy, InnerLoop(3, 1, first_order))
        torch.testing.assert_close(stats["query_loss"][0], want)


def test_zero_inner_steps_is_the_prototype_baseline():
    (s, sy), (q, qy) = _tasks(tasks=3)
    stats = adapt_tasks(_head(inner_lr=0.5), s, sy, q, qy, InnerLoop(3, 0, False))
    assert torch.equal(stats["query_acc"], stats["query_acc_no_adapt"])
    assert torch.equal(stats["support_loss_pre"], stats["support_loss_post"])


def test_adaptation_works_without_grad_mode_and_features_without_graph():
    (s, sy), (q, qy) = _tasks(tasks=2, n_way=5, k=4, q=4, dim=16, separation=0.5, dtype=torch.float32)
    head = _head(16, torch.float32)
    with torch.no_grad():  # as in Lightning's validation loop
        _, metrics = maml_outer_loss(head, s, sy, q, qy, InnerLoop(5, 5, False))
    assert metrics["support_loss_post"] < metrics["support_loss_pre"]


def test_outer_sgd_lowers_the_meta_loss():
    (s, sy), (q, qy) = _tasks(tasks=2, n_way=5, k=4, q=4, dim=16, separation=0.2, dtype=torch.float32)
    head = _head(16, torch.float32, head_hidden_dims=[16])
    # the features stand in for a backbone: both they and the head are meta-trained
    s, q = nn.Parameter(s.clone()), nn.Parameter(q.clone())
    optimizer = torch.optim.SGD([s, q, *head.parameters()], lr=0.05)
    history = []
    for _ in range(10):
        loss, metrics = maml_outer_loss(head, s, sy, q, qy, InnerLoop(5, 3, False))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((loss.item(), metrics["query_acc"]))
    (first_loss, first_acc), (last_loss, last_acc) = history[0], history[-1]
    # better than uniform guessing (log 5 = 1.61), not just calibrated down to it
    assert last_loss < 0.5 * first_loss and last_loss < 1.4
    assert last_acc > first_acc


def test_representations_ignore_padding():
    hidden = torch.randn(3, 6, 4)
    lengths = torch.tensor([6, 2, 4])
    last = representations(hidden, lengths, "last")
    torch.testing.assert_close(last, hidden[[0, 1, 2], [5, 1, 3]])
    mean = representations(hidden, lengths, "mean")
    torch.testing.assert_close(mean[1], hidden[1, :2].mean(0))
    padded = hidden.clone()
    padded[1, 2:] = 1e6
    padded[2, 4:] = -1e6
    for pooling in ("last", "mean"):
        torch.testing.assert_close(
            representations(padded, lengths, pooling), representations(hidden, lengths, pooling)
        )


class _TinyBackbone(nn.Module):
    """Embedding + causal running mean: hidden state t summarises tokens 0..t, like a causal LM."""

    def __init__(self, vocab=40, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.calls = 0

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = self.embed(tokens)
        return x.cumsum(1) / torch.arange(1, tokens.shape[1] + 1).view(1, -1, 1)


def _token_batch(episode, tasks=2, n_way=3, k=2, q=3, length=7):
    """Windows whose tokens come from a class-specific range, right-padded with id 0."""
    gen = torch.Generator().manual_seed(episode)

    def split(per_class):
        labels = torch.arange(n_way).repeat_interleave(per_class).expand(tasks, -1)
        tokens = (
            1
            + labels[..., None] * 10
            + torch.randint(0, 10, (tasks, n_way * per_class, length), generator=gen)
        )
        lengths = torch.randint(2, length + 1, (tasks, n_way * per_class), generator=gen)
        tokens = torch.where(torch.arange(length) < lengths[..., None], tokens, 0)
        return tokens, lengths, labels.clone()

    (st, sl, sy), (qt, ql, qy) = split(k), split(q)
    return {
        "support_tokens": st,
        "support_lengths": sl,
        "support_labels": sy,
        "query_tokens": qt,
        "query_lengths": ql,
        "query_labels": qy,
        "episode": torch.tensor(episode),
    }


def test_meta_forward_runs_the_backbone_once_and_trains_it():
    cfg = MetaConfig(n_way=3, k_shot=2, q_query=3, inner_steps=2, inner_lr=1.0, pooling="mean")
    torch.manual_seed(0)
    backbone, head = _TinyBackbone(), MetaHead(8, cfg)
    loss, metrics = meta_forward(backbone.hidden_states, _token_batch(0), head, cfg)
    assert backbone.calls == 1
    loss.backward()
    assert backbone.embed.weight.grad.abs().sum() > 0
    assert {"query_loss", "query_acc", "query_acc_no_adapt", "head_param_norm", "proto_scale"} <= set(metrics)


def test_evaluate_episodes_reports_confidence_intervals():
    cfg = MetaConfig(n_way=3, k_shot=2, q_query=3, inner_steps=2, inner_lr=1.0)
    torch.manual_seed(0)
    backbone, head = _TinyBackbone(), MetaHead(8, cfg)
    episodes = {e: _token_batch(e) for e in range(5)}
    result = evaluate_episodes(backbone.hidden_states, episodes, head, cfg, range(5))
    assert result["tasks"] == 10 and result["chance"] == 1 / 3
    assert result["query_acc"] > 0.6  # class-specific tokens: easy
    assert 0 <= result["query_acc_ci95"] < 0.3 and result["no_adapt_acc_ci95"] >= 0
    assert all(p.grad is None for p in [*head.parameters(), *backbone.parameters()])
