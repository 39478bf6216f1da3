"""The LightningModule: a pico-decoder trained on the autoregressive (AR) loss, MAML over SMLMT, or both.

Optimization is manual (`automatic_optimization = False`): the hybrid objective decides per optimizer
step which loss to take (`meta.hybrid_mode=schedule`: a seeded coin per step, identical on every rank,
meta with probability `hybrid_ratio`) or mixes them (`sum`: (1 - r) AR + r meta), and accumulates
gradients over micro-batches itself. Metrics go to the loggers once per logging step, keyed by
`global_step` (completed optimizer steps) and averaged over the steps since the last log (windowed, not
cumulative), so every logger and every resume sees the same x-axis; `self.log` only feeds the progress
bar and `callback_metrics`. AR and meta losses are always logged under separate keys.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from picomaml.lit.optim import OptimConfig, build_optimizer
from picomaml.meta import MetaConfig, MetaHead, meta_forward, meta_test_tasks
from picomaml.model import ModelConfig, PicoDecoder
from picomaml.model.flops import model_flops_per_token

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or gradient norm for more steps in a row than allowed."""

    def __init__(self, step: int, grad_norm: float, streak: int) -> None:
        self.step = step
        super().__init__(
            f"diverged at step {step}: non-finite loss or gradient norm (grad norm {grad_norm}) for "
            f"{streak} step(s) in a row; no update was applied and no non-finite weights were saved. "
            "Lower optim.lr, or let optim.nonfinite_patience skip isolated bad steps"
        )


def is_meta_step(step: int, meta: MetaConfig | None, seed: int) -> bool:
    """Whether optimizer step `step` is a meta step under the `schedule` hybrid mode.

    A pure function of (seed, step): identical on every rank and after a resume, with no state to save.
    """
    if meta is None or not meta.enabled or meta.hybrid_ratio == 0.0:
        return False
    if meta.hybrid_ratio == 1.0:
        return True
    return bool(np.random.default_rng([seed, step, 0x4D414D4C]).random() < meta.hybrid_ratio)


class PicoLitModule(pl.LightningModule):
    """Trains `PicoDecoder(model_config)`; with `meta.enabled`, also a `MetaHead` by MAML.

    Training items are AR micro-batches `{"tokens": Long[B, T+1]}`, or with meta-learning
    `{"ar": <AR micro-batch>, "meta": <SMLMT meta-batch>}` (see `picomaml.data.episodes`).
    """

    def __init__(
        self,
        model_config: ModelConfig,
        optim: OptimConfig,
        seq_len: int,
        meta: MetaConfig | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model_config = model_config
        self.optim_config = optim
        self.meta_config = meta if meta is not None and meta.enabled else None
        self.seq_len = seq_len
        self.seed = seed
        # Stored in every checkpoint so export/evaluate can rebuild the model and a resume can refuse a
        # checkpoint of another architecture with a clear message.
        hparams = {"model_config": asdict(model_config), "optim": asdict(optim)}
        if self.meta_config is not None:
            hparams["meta_config"] = asdict(self.meta_config)
        self.save_hyperparameters(hparams)
        self.model = PicoDecoder(model_config)
        self.meta_head = MetaHead(model_config.d_model, self.meta_config) if self.meta_config else None
        self.flops_per_token = model_flops_per_token(model_config, seq_len)
        self.tokens_seen = 0
        self.meta_steps = 0
        self.ar_steps = 0
        self._micro_step = 0
        self._loss_nonfinite = torch.zeros((), dtype=torch.bool)
        self._nonfinite_streak = 0
        self._window = _StepWindow()
        self._val_loss_sum = 0.0
        self._val_tokens = 0
        self._val_meta: list[dict[str, torch.Tensor]] = []
        # called as listener(global_step, metrics) after each validation (e.g. the optuna pruner)
        self.validation_listeners: list[Callable[[int, dict[str, float]], None]] = []

    # --- optimization -------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer, scheduler = build_optimizer(
            list(self.named_parameters()), self.optim_config, max(1, self.trainer.max_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _backward_micro_batch(self, loss: torch.Tensor) -> bool:
        """Backward of one micro-batch's loss, scaled for accumulation; True when the accumulation
        window is full and the optimizer should step (the window restarts)."""
        self._loss_nonfinite = self._loss_nonfinite | ~torch.isfinite(loss.detach())
        self.manual_backward(loss / self.optim_config.accumulate_grad_batches)
        self._micro_step += 1
        if self._micro_step < self.optim_config.accumulate_grad_batches:
            return False
        self._micro_step = 0
        return True

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        ar_batch, meta_batch = (batch["ar"], batch["meta"]) if "ar" in batch else (batch, None)
        weights = self._loss_weights(meta_batch is not None)
        loss = torch.zeros((), device=self.device)
        if weights["ar"] > 0:
            tokens = ar_batch["tokens"]
            loss_ar = self.model.lm_loss(tokens[:, :-1], tokens[:, 1:])
            loss = loss + weights["ar"] * loss_ar
            self._count_tokens(tokens[:, :-1].numel())
            self._window.add("train/loss_ar", loss_ar)
        if weights["meta"] > 0:
            loss_meta, stats = meta_forward(
                self.model.hidden_states, meta_batch, self.meta_head, self.meta_config
            )
            loss = loss + weights["meta"] * loss_meta
            self._count_tokens(int(meta_batch["support_lengths"].sum() + meta_batch["query_lengths"].sum()))
            self._window.add("train/loss_meta", loss_meta)
            for name, value in stats.items():
                self._window.add(f"meta/{name}", value)
        if not self._backward_micro_batch(loss):
            return
        if weights["meta"] > 0:
            self.meta_steps += 1
        if weights["ar"] > 0:
            self.ar_steps += 1
        self._optimizer_step()

    def _loss_weights(self, has_meta_batch: bool) -> dict[str, float]:
        """Weights of the AR and meta losses at this optimizer step (the hybrid objective)."""
        meta = self.meta_config
        if meta is None or not has_meta_batch:
            return {"ar": 1.0, "meta": 0.0}
        if meta.hybrid_mode == "sum":
            return {"ar": 1.0 - meta.hybrid_ratio, "meta": meta.hybrid_ratio}
        if is_meta_step(self.global_step, meta, self.seed):
            return {"ar": 0.0, "meta": 1.0}
        return {"ar": 1.0, "meta": 0.0}

    def _count_tokens(self, local_tokens: int) -> None:
        # tokens through the backbone, summed over ranks (every rank trains on the same shapes)
        self.tokens_seen += local_tokens * self.trainer.world_size

    def _optimizer_step(self) -> None:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        grad_norm = _grad_norm(self.parameters())
        if self._skip_nonfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            return
        if self.optim_config.grad_clip > 0:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.optim_config.grad_clip, gradient_clip_algorithm="norm"
            )
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        # global_step now counts this update; metrics are logged against it
        if self._should_log(self.global_step - 1):
            self._log_train_window(lr, grad_norm)

    def _skip_nonfinite(self, grad_norm: torch.Tensor) -> bool:
        """Whether this optimizer step must be skipped: its loss or gradient norm is not finite.

        A skipped step leaves the weights (and so every checkpoint) finite. More than
        `optim.nonfinite_patience` such steps in a row raise :class:`DivergenceError`, which ends the run
        as `diverged` instead of training on NaN weights to a `completed` run with a NaN metric.
        """
        bad = (self._loss_nonfinite | ~torch.isfinite(grad_norm.to(self._loss_nonfinite.device))).float()
        self._loss_nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        if self.trainer.world_size > 1:  # every rank must take the same decision
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if not bool(bad > 0):  # one host sync per optimizer step
            self._nonfinite_streak = 0
            return False
        self._nonfinite_streak += 1
        step = self.global_step + 1
        if self._nonfinite_streak > self.optim_config.nonfinite_patience:
            raise DivergenceError(step, float(grad_norm), self._nonfinite_streak)
        log.warning("step %d: non-finite loss or gradient norm (%s); update skipped", step, float(grad_norm))
        return True

    def _should_log(self, completed_steps: int) -> bool:
        # log the updates that land on the cadence (completed_steps counts the updates before this one)
        return (completed_steps + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def _log_train_window(self, lr: float, grad_norm: torch.Tensor) -> None:
        # every rank reaches this on the same steps and with the same keys, so the collective is safe
        means = self._window.means()
        if means:
            names = sorted(means)
            values = self.trainer.strategy.reduce(torch.stack([means[n] for n in names]), reduce_op="mean")
            means = dict(zip(names, values.tolist(), strict=True))
        metrics = {
            **means,
            "train/lr": lr,
            "train/grad_norm": float(grad_norm),
            "train/tokens_seen": float(self.tokens_seen),
            "train/tokens_per_s": self._window.tokens_per_s(self.tokens_seen),
            "train/model_flops": float(self.tokens_seen) * self.flops_per_token,
        }
        if self.meta_config is not None:
            metrics.update(
                {
                    "meta/meta_steps": float(self.meta_steps),
                    "meta/ar_steps": float(self.ar_steps),
                    "meta/chance": 1.0 / self.meta_config.n_way,
                }
            )
            for name, value in self.meta_head.named_parameters():
                metrics[f"meta/head_norm/{name}"] = float(value.detach().norm())
        self._window.reset(self.tokens_seen)
        for name in ("train/loss_ar", "train/loss_meta", "meta/query_acc"):
            if name in metrics:
                self.log(name, metrics[name], prog_bar=True, logger=False)
        self.log("train/tokens_per_s", metrics["train/tokens_per_s"], prog_bar=True, logger=False)
        self._log_to_loggers(metrics)

    def _log_to_loggers(self, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    # --- validation ---------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_loss_sum = 0.0
        self._val_tokens = 0
        self._val_meta = []

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if dataloader_idx == 1:
            self._val_meta.append(self._meta_test_step(batch))
            return
        tokens = batch["tokens"]
        with torch.no_grad():
            loss = self.model.lm_loss(tokens[:, :-1], tokens[:, 1:])
        n_tokens = tokens[:, :-1].numel()
        self._val_loss_sum += float(loss) * n_tokens
        self._val_tokens += n_tokens

    def _meta_test_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-task query accuracy on held-out words, after adaptation and with the prototype init only."""
        stats = meta_test_tasks(self.model.hidden_states, batch, self.meta_head, self.meta_config)
        return {k: stats[k] for k in ("query_acc", "query_acc_no_adapt", "query_loss")}

    def on_validation_epoch_end(self) -> None:
        totals = torch.tensor([self._val_loss_sum, float(self._val_tokens)], device=self.device)
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        # token-weighted mean over every validation token of every rank
        val_loss = float(totals[0] / totals[1].clamp_min(1))
        metrics = {"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50.0))}
        if self._val_meta:
            metrics.update(self._meta_test_metrics())
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name in ("val/loss", "meta_test/query_acc"), logger=False)
        if not self.trainer.sanity_checking:
            self._log_to_loggers(metrics)
            for listener in self.validation_listeners:
                listener(self.global_step, metrics)
        self._window.restart_clock(self.tokens_seen)  # validation time is not training throughput

    def _meta_test_metrics(self) -> dict[str, float]:
        metrics = {}
        for key in ("query_acc", "query_acc_no_adapt", "query_loss"):
            local = torch.cat([step[key] for step in self._val_meta]).double()
            values = self.all_gather(local).flatten()  # every rank's tasks
            metrics[f"meta_test/{key}"] = values.mean().item()
            if key != "query_loss":
                metrics[f"meta_test/{key}_ci95"] = 1.96 * values.std().item() / math.sqrt(values.numel())
        metrics["meta_test/chance"] = 1.0 / self.meta_config.n_way
        return metrics

    # --- checkpoint state beyond weights and optimizer ----------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Loggers buffer rows (CSV: 100 at a time); write them with every checkpoint so that a run
        # killed after this save and resumed from it has no hole in its logged history.
        for logger in self.loggers:
            logger.save()
        checkpoint["picomaml"] = {
            "tokens_seen": self.tokens_seen,
            "meta_steps": self.meta_steps,
            "ar_steps": self.ar_steps,
            "micro_step": self._micro_step,
            "torch_rng": torch.get_rng_state(),
            # the open logging window, so a checkpoint between two logging steps (a log-spaced step, a
            # signal save) resumes to the same windowed means as the uninterrupted run
            "window": self._window.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("picomaml", {})
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.meta_steps = int(state.get("meta_steps", 0))
        self.ar_steps = int(state.get("ar_steps", 0))
        self._micro_step = int(state.get("micro_step", 0))
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        self._window.load_state_dict(state.get("window", {}), self.tokens_seen)


def _grad_norm(parameters: Any) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)


class _StepWindow:
    """Means of the losses and metrics over the micro-batches since the last log, and throughput.

    Values stay on the device until logging, so a step never waits for a device-to-host copy.
    """

    def __init__(self) -> None:
        self.reset(0)

    def reset(self, tokens_seen: int) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.restart_clock(tokens_seen)

    def restart_clock(self, tokens_seen: int) -> None:
        self.tokens_at_clock = tokens_seen
        self.clock = time.perf_counter()

    def add(self, name: str, value: torch.Tensor | float) -> None:
        value = torch.as_tensor(value).detach().float()
        self.sums[name] = self.sums[name].to(value.device) + value if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0) + 1

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {"sums": {n: v.cpu() for n, v in self.sums.items()}, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, dict[str, Any]], tokens_seen: int) -> None:
        self.reset(tokens_seen)
        self.sums = {n: torch.as_tensor(v) for n, v in state.get("sums", {}).items()}
        self.counts = dict(state.get("counts", {}))

    def means(self) -> dict[str, torch.Tensor]:
        return {name: total / self.counts[name] for name, total in self.sums.items()}

    def tokens_per_s(self, tokens_seen: int) -> float:
        return (tokens_seen - self.tokens_at_clock) / max(1e-9, time.perf_counter() - self.clock)
