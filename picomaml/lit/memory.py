"""Predicted peak memory of a training job, from its config alone (nothing is allocated).

Why: "skip the configurations that go over my memory" needs a number before a job starts. The
prediction is the sum of the tensors alive at the moment of the step when the most of them are alive,
counted from the code of :mod:`picomaml.model.pico_decoder`, :mod:`picomaml.meta.maml` and
:mod:`picomaml.lit.module`, plus, on the CPU, the measured resident size of the process before the
model exists. It is checked against measurements by ``python -m picomaml.bench memory``.

Letters: P parameters (backbone + meta head), L layers, D d_model, F ffn width, H heads, Dk = D * K / H
the width of keys and values (K kv heads), V vocabulary, B micro-batch, T seq_len, N = B * T tokens per
micro-batch, C = min(1024, N) rows of the loss block. Byte sizes: ``p`` of a parameter (4 under
``32-true`` and ``*-mixed``, 2 under ``bf16-true``/``16-true``), ``r`` of the residual stream (4, or 2
under ``*-true`` 16-bit: the embedding output's dtype), ``c`` of a matmul output (2 under any 16-bit
precision, else 4).

The terms (the keys of :attr:`MemoryEstimate.breakdown`):

``weights``  P * p. Lightning keeps fp32 master weights under ``*-mixed``.
``grads``    P * p, alive from the backward pass until ``zero_grad(set_to_none=True)`` after the
             optimizer step; so they are not alive during the next forward pass, except under gradient
             accumulation (micro-batches 2.. run their forward pass on top of the accumulated grads).
``optimizer`` AdamW's two moments, 2 * P * p, created by the first optimizer step: the peak is at step 2.
             DDP adds its gradient buckets (another P * p) here.
``autocast`` ``*-mixed`` only: the bf16 copies of every matrix the forward pass multiplies with (all but
             the embedding table, 2 bytes each), cached by autocast and kept for the backward pass.
``activations`` what autograd saves for the backward pass, per token and layer::

                 32-true:  4 * (8D + 2Dk + 4F + H + 2)        bytes
                 *-mixed:  24D + 4Dk + 8F + 4H + 8
                 *-true:   20D + 4Dk + 8F + 4H + 8

             (fp32 count: the block input, both norms' normalised outputs and the inputs of the q/k/v and
             w_0/w_1 projections, the rotated q, k and v and the attention output that SDPA saves, its
             log-sum-exp per head, the attention residual, the four F-wide SwiGLU tensors, two rstd; the
             fused CPU and CUDA attention kernels never store the T x T score matrix. Norms compute in
             fp32, so under 16-bit their saved tensors stay 4 bytes wide.) Times L * N, plus per token
             the ids (8 B) and the final norm's input and output (2 * D * r), plus the RoPE tables.
``loss_block`` the fused chunked cross-entropy of an AR step
             (:class:`~picomaml.model.pico_decoder._ChunkedLinearCrossEntropy`), at the end of its
             forward pass: the final hidden states N * D * r, their gradient N * D * c, the
             vocabulary projection's gradient V * D * 4 (fp32), the logits block
             C * V * 4 (+ C * V * 2 for its bf16 copy) and under ``*-mixed`` the bf16 weight copy V * D * 2.
             Its backward pass (scaling both gradients, which then become the grads) is also checked.
``meta``     a meta step runs the backbone once on tasks_per_step * n_way * (k_shot + q_query) windows of
             window_len tokens: the same per-token activations for those tokens. The head and its
             second-order inner loop act on [windows, D] features: negligible. Under
             ``hybrid_mode=schedule`` a step is AR or meta, so the larger one counts; under ``sum`` both
             graphs are alive together.
``runtime``  CPU only: the resident size of the process before the model exists (Python, torch,
             Lightning, Hydra, optuna, the tokenizer and the memory-mapped data), measured by
             ``python -m picomaml.bench memory`` (``runtime_measured_gb``) on this project's machine:
             :data:`CPU_RUNTIME_BYTES`, plus with meta on the SMLMT word index,
             :data:`WORD_INDEX_BYTES_PER_TOKEN` per ``meta.buffer_tokens``. On CUDA the prediction is of
             ``torch.cuda.max_memory_allocated``, which counts tensors only; the CUDA context (some
             hundreds of MB) comes on top.

Peak: ``weights + optimizer + max(forward end, backward start, backward end)`` with
forward end = (grads under accumulation) + autocast + activations + loss_block (AR) or meta;
backward start = autocast + activations + the loss's backward (two gradient copies); backward end =
grads. Per device; on the CPU, ``devices`` processes share the machine (:attr:`MemoryEstimate.machine_bytes`).

FSDP (FULL_SHARD) divides weights, grads and optimizer state by the world size and adds the unsharded
embedding, de-embedding and largest block; that term is an estimate, not measured here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from picomaml.config import ConfigError, resolve_precision
from picomaml.meta import MetaConfig
from picomaml.model import ModelConfig

GB = 1e9
# Resident size of a CPU training process before its model exists (see the module docstring), measured
# by `python -m picomaml.bench memory` on the project's 2-core machine (torch 2.13 CPU, Lightning 2.6.6,
# the embedded wiki data): 0.630 GB in two runs, rounded up. The bench prints what it measures where it runs.
CPU_RUNTIME_BYTES = int(0.64 * GB)
# With meta on, the SMLMT word index (picomaml.meta.words, Python dicts over meta.buffer_tokens tokens)
# adds to it: 0.718 - 0.630 GB measured the same way with the default 1,000,000-token buffer.
WORD_INDEX_BYTES_PER_TOKEN = 88
LOSS_CHUNK_TOKENS = 1024  # picomaml.model.pico_decoder._LOSS_CHUNK_TOKENS (1024-token loss chunks)

_PRECISIONS = {
    # precision: (parameter bytes, residual bytes, matmul output bytes, autocast)
    "64-true": (8, 8, 8, False),
    "64": (8, 8, 8, False),
    "32-true": (4, 4, 4, False),
    "32": (4, 4, 4, False),
    "bf16-mixed": (4, 4, 2, True),
    "16-mixed": (4, 4, 2, True),
    "bf16-true": (2, 2, 2, False),
    "16-true": (2, 2, 2, False),
    "bf16": (4, 4, 2, True),
    "16": (4, 4, 2, True),
}
PRECISIONS = tuple(_PRECISIONS)


@dataclass(frozen=True)
class MemoryEstimate:
    """A predicted peak, per device (one process on the CPU), in bytes, with the terms that make it up.

    ``breakdown`` holds the terms alive at the peak (they sum to ``peak_bytes``); ``terms`` holds every
    term whether or not it is part of the peak phase (``phase`` names that phase).
    """

    peak_bytes: int
    breakdown: dict[str, int]
    terms: dict[str, int]
    phase: str
    device_type: str
    devices: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / GB

    @property
    def machine_bytes(self) -> int:
        """What the machine must hold: on the CPU every local process (``devices``), on CUDA one device."""
        return self.peak_bytes * (self.devices if self.device_type == "cpu" else 1)

    def summary(self) -> str:
        """``2.31 GB (weights 0.26, grads 0.26, ...)``: the peak and its nonzero terms in GB."""
        parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in self.breakdown.items() if v)
        return f"{self.peak_gb:.2f} GB ({parts})"


def count_parameters(model: ModelConfig) -> int:
    """Parameters of ``PicoDecoder(model)``: untied embedding and de-embedding, L blocks, final norm."""
    d, f, v = model.d_model, model.activation_hidden_dim, model.vocab_size
    dk = model.head_dim * model.attention_n_kv_heads
    block = 2 * d + d * d + 2 * d * dk + d * d + 3 * d * f  # 2 norms, q, k+v, o, SwiGLU
    return 2 * v * d + model.n_layers * block + d


def count_head_parameters(d_model: int, meta: MetaConfig | None) -> int:
    """Parameters of the meta head (:class:`~picomaml.meta.MetaHead`): its MLP body and log-scalars."""
    if meta is None or not meta.enabled:
        return 0
    n, fan_in = 0, d_model
    for width in meta.head_hidden_dims:
        n += fan_in * width + width
        fan_in = width
    n += 1 if meta.output_init == "proto" else 0
    if meta.learn_inner_lr:
        n += 2 * len(meta.head_hidden_dims) + (2 if meta.output_init == "zeros" else 0)
    return n


def activation_bytes_per_token(model: ModelConfig, precision: str) -> int:
    """Bytes autograd saves per token in one block (see the module docstring for each tensor)."""
    d, f, h = model.d_model, model.activation_hidden_dim, model.attention_n_heads
    dk = model.head_dim * model.attention_n_kv_heads
    param, residual, _, autocast = _precision(precision)
    if autocast:
        return 24 * d + 4 * dk + 8 * f + 4 * h + 8
    if param == 2:
        return 20 * d + 4 * dk + 8 * f + 4 * h + 8
    return param * (8 * d + 2 * dk + 4 * f + h + 2)


def _precision(precision: str) -> tuple[int, int, int, bool]:
    # a precision the model does not know (transformer-engine, ...) is counted as 32-true, the widest
    # of the common ones, so the check errs on the side of refusing
    return _PRECISIONS.get(str(precision), _PRECISIONS["32-true"])


def _trunk_bytes(model: ModelConfig, tokens: int, seq_len: int, precision: str) -> int:
    """Activations of the whole backbone for ``tokens`` tokens in sequences of ``seq_len``."""
    _, residual, _, _ = _precision(precision)
    per_token = (
        model.n_layers * activation_bytes_per_token(model, precision) + 8 + 2 * model.d_model * residual
    )
    rope = model.n_layers * seq_len * model.head_dim * 4  # a complex64 [T, E/2] table saved per layer
    return tokens * per_token + rope


def estimate_training_memory(
    model: ModelConfig,
    *,
    batch_size: int,
    seq_len: int,
    precision: str = "32-true",
    accumulate_grad_batches: int = 1,
    meta: MetaConfig | None = None,
    strategy: str | None = None,
    devices: int = 1,
    device_type: str = "cpu",
    runtime_bytes: int | None = None,
) -> MemoryEstimate:
    """Predicted peak memory of one training process (see the module docstring for every term).

    ``batch_size`` is the per-device micro-batch; ``strategy`` a Lightning strategy name (``ddp*``,
    ``fsdp``) or None; ``runtime_bytes`` replaces the CPU baseline :data:`CPU_RUNTIME_BYTES`.
    """
    param_b, residual_b, compute_b, autocast = _precision(precision)
    meta = meta if meta is not None and meta.enabled else None
    n_params = count_parameters(model) + count_head_parameters(model.d_model, meta)
    d, v = model.d_model, model.vocab_size
    world = max(1, devices)
    strategy = (strategy or "").lower()
    notes: list[str] = []
    if str(precision) not in _PRECISIONS:
        notes.append(f"precision {precision!r} not modelled: counted as 32-true")
    if getattr(model, "attention", "softmax") != "softmax":
        notes.append(f"attention={model.attention}: activations counted as softmax attention's")

    weights = grads = n_params * param_b
    optimizer = 2 * n_params * param_b
    if "fsdp" in strategy:
        weights, grads, optimizer = weights // world, grads // world, optimizer // world
        biggest_block = (count_parameters(model) - 2 * v * d - d) // model.n_layers
        weights += (2 * v * d + biggest_block) * param_b  # unsharded root (embeddings) and one block
        notes.append("FSDP term estimated, not measured")
    elif "ddp" in strategy and world > 1:
        optimizer += n_params * param_b  # DDP's gradient buckets
    # the matrices multiplied under autocast, in bf16: everything but the embedding table and the norms
    casts = 2 * (count_parameters(model) - v * d - (2 * model.n_layers + 1) * d) if autocast else 0

    tokens = batch_size * seq_len
    ar_ratio = 1.0
    meta_tokens = 0
    if meta is not None:
        ar_ratio = 1.0 - meta.hybrid_ratio if meta.hybrid_mode == "schedule" else 1.0
        if meta.hybrid_mode == "sum" and meta.hybrid_ratio == 1.0:
            ar_ratio = 0.0
        windows = meta.tasks_per_step * meta.n_way * (meta.k_shot + meta.q_query)
        meta_tokens = windows * min(meta.window_len, model.max_seq_len)
        if meta.hybrid_ratio == 0.0:
            meta_tokens = 0
    has_ar = ar_ratio > 0.0

    ar_acts = _trunk_bytes(model, tokens, seq_len, precision) if has_ar else 0
    meta_acts = _trunk_bytes(model, meta_tokens, meta.window_len, precision) if meta_tokens else 0
    rows = min(LOSS_CHUNK_TOKENS, tokens)
    loss_fwd = loss_bwd = 0
    if has_ar:
        loss_fwd = tokens * d * (residual_b + compute_b) + v * d * 4 + rows * v * 4 + 17 * tokens
        if compute_b != 4:
            loss_fwd += rows * v * compute_b
        if autocast:
            loss_fwd += v * d * 2
        # backward of the loss: grad_h and grad_w plus their scaled copies (the latter become the grads)
        loss_bwd = tokens * d * (compute_b + residual_b) + 2 * v * d * 4

    sum_mode = meta is not None and meta.hybrid_mode == "sum"
    accumulated = grads if accumulate_grad_batches > 1 else 0
    candidates: dict[str, dict[str, int]] = {}
    if has_ar:
        candidates["AR forward end (loss block)"] = {
            "grads": accumulated,
            "autocast": casts,
            "activations": ar_acts,
            "loss_block": loss_fwd,
            "meta": meta_acts if sum_mode else 0,
        }
        candidates["AR backward start"] = {
            "grads": accumulated,
            "autocast": casts,
            "activations": ar_acts,
            "loss_block": loss_bwd,
            "meta": meta_acts if sum_mode else 0,
        }
    if meta_acts and not sum_mode:
        candidates["meta forward end"] = {"grads": accumulated, "autocast": casts, "meta": meta_acts}
    candidates["backward end"] = {"grads": grads}
    phase, live = max(candidates.items(), key=lambda item: sum(item[1].values()))

    runtime = 0
    if device_type == "cpu":
        runtime = CPU_RUNTIME_BYTES if runtime_bytes is None else runtime_bytes
        runtime += meta.buffer_tokens * WORD_INDEX_BYTES_PER_TOKEN if meta is not None else 0
    breakdown = {
        "weights": weights,
        "grads": live.get("grads", 0),
        "optimizer": optimizer,
        "autocast": live.get("autocast", 0),
        "activations": live.get("activations", 0),
        "loss_block": live.get("loss_block", 0),
        "meta": live.get("meta", 0),
        "runtime": runtime,
    }
    terms = {
        "weights": weights,
        "grads": grads,
        "optimizer": optimizer,
        "autocast": casts,
        "activations": ar_acts,
        "loss_block": max(loss_fwd, loss_bwd),
        "meta": meta_acts,
        "runtime": runtime,
    }
    return MemoryEstimate(
        peak_bytes=sum(breakdown.values()),
        breakdown=breakdown,
        terms=terms,
        phase=phase,
        device_type=device_type,
        devices=world,
        notes=notes,
    )


def predict_peak_memory(cfg: DictConfig) -> MemoryEstimate:
    """:func:`estimate_training_memory` for a composed ``picomaml.train`` config (a pure function of it).

    Reads ``model``, ``meta``, ``data.batch_size``, ``data.seq_len``, ``optim.accumulate_grad_batches``
    and ``trainer.{precision, accelerator, devices, num_nodes, strategy}``. Raises
    :class:`~picomaml.config.ConfigError` naming the key for a section that does not build.
    """
    model = _build(ModelConfig, cfg.model, "model")
    meta = None
    if cfg.get("meta") is not None and bool(cfg.meta.get("enabled", False)):
        meta = _build(MetaConfig, cfg.meta, "meta")
    trainer = cfg.trainer
    accelerator = str(trainer.get("accelerator", "auto"))
    device_type = _device_type(accelerator)
    precision = resolve_precision(trainer.get("precision", "auto"), accelerator)
    strategy = trainer.get("strategy")
    if OmegaConf.is_config(strategy):  # a strategy object: its class name says which
        strategy = str(strategy.get("_target_", "")).rsplit(".", 1)[-1]
    devices = trainer.get("devices", 1)
    devices = devices if isinstance(devices, int) and devices > 0 else 1
    world = devices * int(trainer.get("num_nodes", 1) or 1)
    return estimate_training_memory(
        model,
        batch_size=int(cfg.data.batch_size),
        seq_len=int(cfg.data.seq_len),
        precision=precision,
        accumulate_grad_batches=int(OmegaConf.select(cfg, "optim.accumulate_grad_batches", default=1)),
        meta=meta,
        strategy=None if strategy is None else str(strategy),
        devices=world if "fsdp" in str(strategy).lower() or "ddp" in str(strategy).lower() else devices,
        device_type=device_type,
    )


def _build(schema: type, section: Any, key: str) -> Any:
    values = OmegaConf.to_container(section, resolve=True)
    values.pop("_target_", None)
    names = {f.name for f in dataclasses.fields(schema)}
    try:
        return schema(**{k: v for k, v in values.items() if k in names})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from err


def _device_type(accelerator: str) -> str:
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def machine_memory_bytes(device_type: str) -> int:
    """What one training process may use here: on CUDA the device's total memory; on the CPU the
    machine's RAM, or the memory limit of this process's cgroup (a container, a SLURM job with cgroup
    enforcement) when that is lower."""
    if device_type == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    return min(total, limit) if limit else total


def _cgroup_limit() -> int | None:
    try:
        rel = next(
            line.split(":", 2)[2].strip()
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if line.startswith("0::")
        )
        text = (Path("/sys/fs/cgroup") / rel.lstrip("/") / "memory.max").read_text().strip()
    except (OSError, StopIteration, IndexError):
        return None
    return None if text == "max" else int(text)


def check_fits(cfg: DictConfig) -> MemoryEstimate | None:
    """Refuse a run predicted over this machine's memory with one line naming the prediction and the
    override keys; returns the estimate (None when ``memory_check=false``).

    The limit is ``memory_limit_gb`` when set, else :func:`machine_memory_bytes`.
    """
    if not bool(cfg.get("memory_check", True)):
        return None
    estimate = predict_peak_memory(cfg)
    limit_gb = cfg.get("memory_limit_gb")
    if limit_gb is not None and not (isinstance(limit_gb, (int, float)) and limit_gb > 0):
        raise ConfigError(f"memory_limit_gb={limit_gb!r}: must be a positive number of GB, or null")
    limit = int(limit_gb * GB) if limit_gb is not None else machine_memory_bytes(estimate.device_type)
    if limit_gb is not None:
        where = f"memory_limit_gb {_num(limit_gb)} GB"
    else:
        device = "this GPU's memory" if estimate.device_type == "cuda" else "this machine's memory"
        where = f"{device} {limit / GB:.1f} GB"
    need = estimate.machine_bytes
    if need > limit:
        per = f" ({estimate.devices} processes)" if need != estimate.peak_bytes else ""
        raise ConfigError(
            f"predicted peak memory {need / GB:.1f} GB{per} > {where} "
            f"[{estimate.summary()}]; lower data.batch_size or data.seq_len, or override with "
            "memory_check=false (or memory_limit_gb=<GB>)"
        )
    return estimate


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is running out of memory: ``torch.OutOfMemoryError`` (CUDA) or a CPU allocation
    that failed (torch raises a RuntimeError from ``DefaultCPUAllocator``)."""
    import torch

    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "DefaultCPUAllocator" in text and "memory" in text
    )


def format_budget_reason(predicted_gb: float, budget_gb: float) -> str:
    """The reason recorded for a trial that is not launched: ``predicts 31.2 GB > budget 24 GB``."""
    return f"predicts {predicted_gb:.1f} GB > budget {_num(budget_gb)} GB"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


__all__ = [
    "CPU_RUNTIME_BYTES",
    "GB",
    "MemoryEstimate",
    "activation_bytes_per_token",
    "check_fits",
    "count_parameters",
    "estimate_training_memory",
    "format_budget_reason",
    "is_out_of_memory",
    "machine_memory_bytes",
    "predict_peak_memory",
]
