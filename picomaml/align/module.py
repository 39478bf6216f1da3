"""The DPO LightningModule: a trainable policy and a frozen reference, both from one checkpoint.

It is a :class:`~picomaml.lit.module.PicoLitModule` whose training step takes the DPO loss instead of the
AR loss, so everything else is the training module's: manual optimization with gradient accumulation
and clipping, the AdamW groups and schedule, non-finite steps skipped (``optim.nonfinite_patience``),
windowed metrics logged against ``global_step``, and checkpoint state. The policy is ``self.model``, so
a DPO checkpoint is an ordinary picomaml checkpoint of the policy (``evaluate``, ``generate``, ``export``
and a further ``align`` stage read it as they read any run).

The reference is ``self.reference``: a copy of the starting weights with ``requires_grad`` off, kept in
eval mode whatever mode Lightning puts the module in, run under ``no_grad``, left out of the optimizer
and out of every checkpoint (it is rebuilt from ``ckpt_path``, which names the run, on resume).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from picomaml.align.dpo import dpo_loss, preference_accuracy, response_logprobs
from picomaml.lit.module import PicoLitModule
from picomaml.lit.optim import OptimConfig, build_optimizer
from picomaml.model import ModelConfig, PicoDecoder

REFERENCE_PREFIX = "reference."


class DPOLitModule(PicoLitModule):
    """DPO of ``PicoDecoder(model_config)`` from ``init_state`` (policy init and frozen reference).

    Batches are :mod:`picomaml.align.preferences` batches. ``results_path``, when set, receives the test
    pairs' metrics before DPO (the policy at step 0, scored when training starts) and after. The policy
    of the best validation by ``monitor`` (``monitor_mode``) is kept, in memory and in checkpoints, so
    that :meth:`use_best_policy` can put it back before the test after early stopping.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        optim: OptimConfig,
        init_state: dict[str, torch.Tensor],
        beta: float,
        length_normalize: bool = False,
        seq_len: int = 256,
        seed: int = 0,
        results_path: str | Path | None = None,
        monitor: str = "val/pref_acc",
        monitor_mode: str = "max",
    ) -> None:
        super().__init__(model_config, optim, seq_len=seq_len, meta=None, seed=seed)
        self.save_hyperparameters(
            {**self.hparams, "dpo": {"beta": beta, "length_normalize": length_normalize}}
        )
        self.beta = beta
        self.length_normalize = length_normalize
        self.results_path = Path(results_path) if results_path is not None else None
        self.model.load_state_dict(init_state)
        self.reference = PicoDecoder(model_config)
        self.reference.load_state_dict(init_state)
        self.reference.requires_grad_(False)
        self.reference.eval()
        self._eval_rows: list[dict[str, torch.Tensor]] = []
        # the test metrics of the policy at step 0 (== the reference), measured when training starts
        self.before: dict[str, float] | None = None
        self.monitor, self.monitor_mode = monitor, monitor_mode
        # {"step", "value", "state"}: the policy of the best validation so far (state on the CPU)
        self.best: dict[str, Any] | None = None
        self.scored_step: int | None = None  # the step of the policy the test scored

    # --- the frozen reference ------------------------------------------------------------------------

    def train(self, mode: bool = True) -> DPOLitModule:
        super().train(mode)
        self.reference.eval()  # Lightning switches every submodule to train mode at fit start
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = super().state_dict(*args, **kwargs)
        for key in [k for k in state if k.startswith(REFERENCE_PREFIX) or f".{REFERENCE_PREFIX}" in k]:
            del state[key]
        return state

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["picomaml"]["dpo_before"] = self.before
        checkpoint["picomaml"]["dpo_best"] = self.best

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # checkpoints hold the policy only; the strict load that follows expects the reference too
        for name, value in self.reference.state_dict().items():
            checkpoint["state_dict"][REFERENCE_PREFIX + name] = value
        super().on_load_checkpoint(checkpoint)
        self.before = checkpoint.get("picomaml", {}).get("dpo_before")
        self.best = checkpoint.get("picomaml", {}).get("dpo_best")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer, scheduler = build_optimizer(
            [(f"model.{n}", p) for n, p in self.model.named_parameters()],
            self.optim_config,
            max(1, self.trainer.max_steps),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- the objective -------------------------------------------------------------------------------

    def pair_scores(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per pair: policy and reference log-probabilities of chosen and rejected, DPO losses and rewards."""
        tokens, mask = batch["tokens"], batch["response_mask"]
        n = tokens.shape[0] // 2
        policy = response_logprobs(self.model, tokens, mask, self.length_normalize)
        with torch.no_grad():
            reference = response_logprobs(self.reference, tokens, mask, self.length_normalize)
        out = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], self.beta)
        return {
            "loss": out.losses,
            "pref_acc": preference_accuracy(out.chosen_rewards, out.rejected_rewards),
            "rewards_chosen": out.chosen_rewards,
            "rewards_rejected": out.rejected_rewards,
            "reward_margin": out.chosen_rewards - out.rejected_rewards,
            "logp_acc": preference_accuracy(policy[:n].detach(), policy[n:].detach()),
            "ref_logp_acc": preference_accuracy(reference[:n], reference[n:]),
        }

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        scores = self.pair_scores(batch)
        loss = scores["loss"].mean()
        self._window.add("train/dpo_loss", loss)
        for name in ("pref_acc", "reward_margin", "rewards_chosen", "rewards_rejected"):
            self._window.add(f"train/{name}", scores[name].mean())
        self._count_tokens(batch["tokens"][:, :-1].numel())
        if not self._backward_micro_batch(loss):
            return
        self._optimizer_step()

    # --- validation and test: every pair once, metrics over all ranks ---------------------------------

    def on_train_start(self) -> None:
        """Score the test pairs with the untrained policy, for the before/after comparison."""
        if self.results_path is None or self.global_step > 0 or self.before is not None:
            return
        self._eval_rows = []
        with torch.no_grad():
            for batch in self.trainer.datamodule.eval_batches("test"):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                self._eval_rows.append(self.pair_scores(batch))
        self.before = self._eval_metrics("test")
        self._eval_rows = []

    def on_validation_epoch_start(self) -> None:
        self._eval_rows = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        with torch.no_grad():
            self._eval_rows.append({k: v.detach() for k, v in self.pair_scores(batch).items()})

    def on_validation_epoch_end(self) -> None:
        metrics = self._eval_metrics("val")
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name in ("val/dpo_loss", "val/pref_acc"), logger=False)
        if not self.trainer.sanity_checking:
            self._log_to_loggers(metrics)
            self._keep_if_best(metrics[self.monitor])
            for listener in self.validation_listeners:
                listener(self.global_step, metrics)
        self._window.restart_clock(self.tokens_seen)

    def _keep_if_best(self, value: float) -> None:
        """Keep the policy when ``value`` beats the best so far (strictly, as EarlyStopping counts)."""
        best = self.best
        if best is not None and not (
            value < best["value"] if self.monitor_mode == "min" else value > best["value"]
        ):
            return
        state = {
            name: tensor.detach().to("cpu", copy=True) for name, tensor in self.model.state_dict().items()
        }
        self.best = {"step": self.global_step, "value": value, "state": state}

    def use_best_policy(self) -> dict[str, float]:
        """Load the best validation's policy into ``model`` (for the test); return ``{monitor: value}``
        of that validation (empty when none ran, and the policy is left as it is)."""
        if self.best is None:
            return {}
        self.model.load_state_dict(self.best["state"])
        self.scored_step = self.best["step"]
        return {self.monitor: float(self.best["value"])}

    def on_test_epoch_start(self) -> None:
        self._eval_rows = []

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        metrics = self._eval_metrics("test")
        for name, value in metrics.items():
            self.log(name, value, logger=False)
        self._log_to_loggers(metrics)
        if self.results_path is not None and self.trainer.is_global_zero:
            self._write_results(metrics)

    def _eval_metrics(self, prefix: str) -> dict[str, float]:
        """Means over every pair of every rank; ``ref_logp_acc`` is the reference's own log-prob accuracy."""
        names = (
            "loss",
            "pref_acc",
            "reward_margin",
            "rewards_chosen",
            "rewards_rejected",
            "logp_acc",
            "ref_logp_acc",
        )
        sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=self.device)
        for row in self._eval_rows:
            sums += torch.stack(
                [row[n].double().sum() for n in names]
                + [torch.tensor(float(len(row["loss"])), device=self.device, dtype=torch.float64)]
            )
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        count = float(sums[-1].clamp_min(1))
        means = {n: float(s) / count for n, s in zip(names, sums[:-1], strict=True)}
        key = {"loss": "dpo_loss"}
        metrics = {f"{prefix}/{key.get(n, n)}": v for n, v in means.items()}
        metrics[f"{prefix}/n_pairs"] = float(sums[-1])
        return metrics

    def _write_results(self, metrics: dict[str, float]) -> None:
        """``results_path``: the test pairs before DPO (the policy at step 0, measured when training
        started: it equals the reference, so every margin is 0, the DPO loss log 2 and the preference
        accuracy 0.5 by ties; its chosen-vs-rejected log-probability accuracy ``logp_acc`` is the
        informative number) and after (the policy at ``step``: the best validation's after
        :meth:`use_best_policy`, else the final one, at ``final_step``)."""
        get = lambda name: metrics[f"test/{name}"]  # noqa: E731
        before = {k.removeprefix("test/"): v for k, v in (self.before or {}).items()}
        results = {
            "step": self.global_step if self.scored_step is None else self.scored_step,
            "final_step": self.global_step,
            "n_pairs": int(get("n_pairs")),
            "beta": self.beta,
            "length_normalize": self.length_normalize,
            "before": before,
            "after": {
                "dpo_loss": get("dpo_loss"),
                "pref_acc": get("pref_acc"),
                "logp_acc": get("logp_acc"),
                "reward_margin": get("reward_margin"),
                "rewards_chosen": get("rewards_chosen"),
                "rewards_rejected": get("rewards_rejected"),
            },
        }
        self.results_path.parent.mkdir(parents=True, exist_ok=True)
        self.results_path.write_text(json.dumps(results, indent=2))
