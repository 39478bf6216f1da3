"""``python -m picomaml.bench meta``: what a MAML step costs next to an AR step.

A meta step forwards T tasks x N classes x (K + Q) windows of L tokens through the backbone once, adapts
the head with ``inner_steps`` SGD steps per task and backpropagates the query loss into the backbone. The
AR step it is compared with trains on the same number of rows and tokens ([T*N*(K+Q), L]), so the ratio
isolates the meta machinery (pooling, head, inner loop, second-order terms) from the backbone size. Note
that the AR step also pays the vocabulary projection and its softmax, which the meta step skips.

Reported per order (second, first): meta step time, AR step time, their ratio, and the inner loop alone
(head adaptation + outer backward on fixed features) with its fraction of the meta step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from picomaml.bench.common import median_time, parse_args
from picomaml.meta import InnerLoop, MetaConfig, MetaHead, maml_outer_loss, meta_forward, window_features
from picomaml.model import PicoDecoder, load_model_config


def _meta_batch(cfg: MetaConfig, vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random windows with the episode shapes of ``cfg`` (timing does not depend on the words)."""
    t, n, length = cfg.tasks_per_step, cfg.n_way, cfg.window_len
    batch = {}
    for part, shots in (("support", cfg.k_shot), ("query", cfg.q_query)):
        batch[f"{part}_tokens"] = torch.randint(0, vocab, (t, n * shots, length), generator=generator)
        batch[f"{part}_lengths"] = torch.full((t, n * shots), length)
        batch[f"{part}_labels"] = torch.arange(n).repeat_interleave(shots).repeat(t, 1)
    return batch


def _bench_order(
    model: PicoDecoder,
    cfg: MetaConfig,
    batch: dict[str, torch.Tensor],
    warmup: int,
    steps: int,
    device: torch.device,
) -> dict[str, float]:
    head = MetaHead(model.config.d_model, cfg).to(device)
    params = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01, fused=True)
    rows = torch.cat([batch["support_tokens"].flatten(0, 1), batch["query_tokens"].flatten(0, 1)])
    ar_tokens = torch.cat([rows, rows[:, :1]], dim=1)  # [rows, L + 1]: the meta step's rows and length

    def update(loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def meta_step() -> None:
        update(meta_forward(model.hidden_states, batch, head, cfg)[0])

    def ar_step() -> None:
        update(model.lm_loss(ar_tokens[:, :-1], ar_tokens[:, 1:]))

    with torch.no_grad():
        support, query = window_features(model.hidden_states, batch, cfg.pooling)

    def inner_loop() -> None:
        s, q = support.detach().requires_grad_(), query.detach().requires_grad_()
        loss, _ = maml_outer_loss(
            head, s, batch["support_labels"], q, batch["query_labels"], InnerLoop.of(cfg)
        )
        loss.backward()

    meta_s = median_time(meta_step, warmup, steps, device)
    ar_s = median_time(ar_step, warmup, steps, device)
    inner_s = median_time(inner_loop, warmup, steps, device)
    return {
        "meta_step_s": meta_s,
        "ar_step_s": ar_s,
        "meta_over_ar": meta_s / ar_s,
        "inner_loop_s": inner_s,
        "inner_loop_fraction": inner_s / meta_s,
    }


def bench_meta(argv: list[str]) -> dict[str, object]:
    args = parse_args(
        argv,
        {
            "model": "11m",
            "n_way": 5,
            "k_shot": 4,
            "q_query": 4,
            "tasks": 2,
            "window_len": 64,
            "inner_steps": 5,
            "steps": 10,
            "warmup": 3,
            "threads": 2,
            "device": "cpu",
            "seed": 0,
            "out": None,
        },
        "picomaml.bench meta",
        __doc__ or "",
    )
    torch.set_num_threads(args["threads"])
    torch.manual_seed(args["seed"])
    device = torch.device(args["device"])
    config = load_model_config(args["model"])
    model = PicoDecoder(config).to(device).train()
    generator = torch.Generator().manual_seed(args["seed"])
    results: dict[str, object] = {"model": args["model"], "threads": args["threads"], "device": str(device)}

    for order in ("second", "first"):
        cfg = MetaConfig(
            n_way=args["n_way"],
            k_shot=args["k_shot"],
            q_query=args["q_query"],
            tasks_per_step=args["tasks"],
            window_len=args["window_len"],
            inner_steps=args["inner_steps"],
            first_order=order == "first",
        )
        batch = {k: v.to(device) for k, v in _meta_batch(cfg, config.vocab_size, generator).items()}
        results[order] = _bench_order(model, cfg, batch, args["warmup"], args["steps"], device)
    windows = args["tasks"] * args["n_way"] * (args["k_shot"] + args["q_query"])
    results["backbone_tokens_per_step"] = windows * args["window_len"]
    results["shape"] = f"{windows} windows x {args['window_len']} tokens"
    text = json.dumps(results, indent=2)
    print(text)
    if args["out"]:
        Path(args["out"]).write_text(text + "\n")
    return results
