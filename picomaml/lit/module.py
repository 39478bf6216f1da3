"""The LightningModule: one pico-decoder trained with the autoregressive (AR) objective.

Optimization is manual (`automatic_optimization = False`) because the hybrid AR + meta objective decides
per optimizer step which loss to take and accumulates gradients over micro-batches itself. Metrics go to
the loggers once per optimizer step, keyed by `global_step` (completed optimizer steps), so every logger
and every resume sees the same x-axis; `self.log` only feeds the progress bar and `callback_metrics`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch

from picomaml.lit.optim import OptimConfig, build_optimizer
from picomaml.model import ModelConfig, PicoDecoder
from picomaml.model.flops import model_flops_per_token


class PicoLitModule(pl.LightningModule):
    """Trains `PicoDecoder(model_config)` on micro-batches `{"tokens": Long[B, T+1]}`."""

    def __init__(self, model_config: ModelConfig, optim: OptimConfig, seq_len: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model_config = model_config
        self.optim_config = optim
        self.seq_len = seq_len
        # Stored in every checkpoint so export/evaluate can rebuild the model and a resume can refuse a
        # checkpoint of another architecture with a clear message.
        self.save_hyperparameters({"model_config": asdict(model_config), "optim": asdict(optim)})
        self.model = PicoDecoder(model_config)
        self.flops_per_token = model_flops_per_token(model_config, seq_len)
        self.tokens_seen = 0
        self._micro_step = 0
        self._window = _StepWindow()
        self._val_loss_sum = 0.0
        self._val_tokens = 0

    # --- optimization -------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer, scheduler = build_optimizer(
            list(self.parameters()), self.optim_config, max(1, self.trainer.max_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        tokens = batch["tokens"]
        loss = self.model.lm_loss(tokens[:, :-1], tokens[:, 1:])
        accumulate = self.optim_config.accumulate_grad_batches
        self.manual_backward(loss / accumulate)

        n_tokens = tokens[:, :-1].numel() * self.trainer.world_size
        self.tokens_seen += n_tokens
        self._window.add(loss.detach(), n_tokens)
        self._micro_step += 1
        if self._micro_step < accumulate:
            return
        self._micro_step = 0
        self._optimizer_step()

    def _optimizer_step(self) -> None:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        grad_norm = _grad_norm(self.parameters()) if self._should_log() else None
        if self.optim_config.grad_clip > 0:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.optim_config.grad_clip, gradient_clip_algorithm="norm"
            )
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        # global_step now counts this update; metrics are logged against it
        self._window.steps += 1
        if grad_norm is not None:
            self._log_train_window(lr, grad_norm)

    def _should_log(self) -> bool:
        # global_step is the count before this update; log the updates that land on the cadence
        return (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def _log_train_window(self, lr: float, grad_norm: torch.Tensor) -> None:
        # every rank reaches this on the same steps, so the collective is safe
        loss_ar = float(self.trainer.strategy.reduce(self._window.mean_loss(), reduce_op="mean"))
        metrics = {
            "train/loss_ar": loss_ar,
            "train/lr": lr,
            "train/grad_norm": float(grad_norm),
            "train/tokens_seen": float(self.tokens_seen),
            "train/tokens_per_s": self._window.tokens_per_s(),
            "train/model_flops": float(self.tokens_seen) * self.flops_per_token,
        }
        self._window.reset()
        self.log("train/loss_ar", loss_ar, prog_bar=True, logger=False)
        self.log("train/tokens_per_s", metrics["train/tokens_per_s"], prog_bar=True, logger=False)
        self._log_to_loggers(metrics)

    def _log_to_loggers(self, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)

    # --- validation ---------------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_loss_sum = 0.0
        self._val_tokens = 0

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        tokens = batch["tokens"]
        with torch.no_grad():
            loss = self.model.lm_loss(tokens[:, :-1], tokens[:, 1:])
        n_tokens = tokens[:, :-1].numel()
        self._val_loss_sum += float(loss) * n_tokens
        self._val_tokens += n_tokens

    def on_validation_epoch_end(self) -> None:
        totals = torch.tensor([self._val_loss_sum, float(self._val_tokens)], device=self.device)
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        # token-weighted mean over every validation token of every rank
        val_loss = float(totals[0] / totals[1].clamp_min(1))
        metrics = {"val/loss": val_loss, "val/ppl": math.exp(min(val_loss, 50.0))}
        for name, value in metrics.items():
            self.log(name, value, prog_bar=True, logger=False, sync_dist=False)
        if not self.trainer.sanity_checking:
            self._log_to_loggers(metrics)
        self._window.restart_clock()  # validation time is not training throughput

    # --- checkpoint state beyond weights and optimizer ----------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["picomaml"] = {
            "tokens_seen": self.tokens_seen,
            "micro_step": self._micro_step,
            "torch_rng": torch.get_rng_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("picomaml", {})
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self._micro_step = int(state.get("micro_step", 0))
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])


def _grad_norm(parameters: Any) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)


class _StepWindow:
    """Loss and throughput over the optimizer steps since the last log (windowed, never cumulative)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros(())
        self.micro_batches = 0
        self.tokens = 0
        self.steps = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.tokens_at_clock = self.tokens
        self.clock = time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.loss_sum = self.loss_sum.to(loss.device) + loss.float()
        self.micro_batches += 1
        self.tokens += tokens

    def mean_loss(self) -> torch.Tensor:
        return self.loss_sum / max(1, self.micro_batches)

    def tokens_per_s(self) -> float:
        return (self.tokens - self.tokens_at_clock) / max(1e-9, time.perf_counter() - self.clock)
