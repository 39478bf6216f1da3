"""Learning-dynamics dumps in pico-train's layout, so pico-analyze reads a picomaml run unchanged.

At each scheduled step N (after N optimizer updates, i.e. the weights of checkpoint ``step_N``) the
:class:`LearningDynamics` callback writes::

    <checkpoints>/step_<N>/learning_dynamics/
        train_activations.pt   {module name: Float[B, out]}   output of the module at ``sequence_idx``
        train_weights.pt       {module name: Float[out, in]}  the module's weight
        train_gradients.pt     {module name: Float[out, in]}  d(LM loss)/d(weight) on that batch
        train_data/            HF dataset (``save_to_disk``): ``input_ids`` (the rows) and ``text``
        val_activations.pt     the same on a fixed validation batch (the same rows at every step, which
        val_weights.pt         is what makes activations comparable across steps, e.g. by CKA)
        val_gradients.pt
        meta_activations.pt    meta runs: the same on a fixed batch of meta-test episodes (held-out
        meta_weights.pt        words; episode ``meta_episode``), activations at each window's last real
        meta_gradients.pt      token [windows, out], gradients of the query loss after adaptation

for every module whose name ends with one of ``layer_suffixes`` (pico-train's default:
``attention.v_proj``, ``attention.o_proj``, ``swiglu.w_2``; names as in ``PicoDecoder.named_modules()``,
e.g. ``layers.3.swiglu.w_2``). The train batch is the last micro-batch of update N (for step 0, the
first micro-batch, seen by the initial weights); rows are the datamodule's ``tokens`` [B, T+1], inputs
``[:, :-1]``, labels ``[:, 1:]``, as pico-train does. A micro-batch without ``tokens`` (e.g. a meta-only
batch) is skipped, so the dump uses the latest one that had them.

The dump must not change training: it runs its own forward and takes gradients with
``torch.autograd.grad`` (which never writes ``.grad``), touches no optimizer state, draws no random
numbers, does not copy the model, and removes its hooks before returning. It runs on global rank 0 with
rank 0's batch, on the unwrapped model (DDP is fine; FSDP shards the weights and is not supported).

Schedule (:func:`~picomaml.lit.checkpointing.checkpoint_steps`, the checkpoints' own): Pythia's
log-spaced 0, 1, 2, 4, ..., 512, then every ``every_n_steps``, and the final step.

A step's files appear all at once: they are written into ``step_<N>/.learning_dynamics.tmp-<pid>/`` and
that directory is renamed to ``learning_dynamics/``, so a kill or a full disk leaves either the previous
``learning_dynamics/`` (the one a redone step had) or the complete new one, and no partial file (a full
disk raises one error naming the file and the space left: ``checkpoint_io.explain_disk_full``).
The callback tells :class:`~picomaml.lit.checkpointing.StepCheckpoints` when it is done with a step
(``step_files_done``), which publishes the step directory only then. The last training batch is part of
the checkpoint (``state_dict``), so a run resumed at step N whose ``learning_dynamics/`` a kill left
unwritten redoes them from the same weights and rows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from picomaml.lit.checkpoint_io import explain_disk_full, fsync_dir, write_atomic
from picomaml.lit.checkpointing import checkpoint_steps
from picomaml.runs import step_dir_name

log = logging.getLogger(__name__)

DEFAULT_LAYER_SUFFIXES = ("attention.v_proj", "attention.o_proj", "swiglu.w_2")
DYNAMICS_DIR = "learning_dynamics"
# what every dump holds (val_* and meta_* depend on the run), so what a complete directory has
TRAIN_FILES = ("train_activations.pt", "train_weights.pt", "train_gradients.pt", "train_data")


def dynamics_complete(step_dir: Path) -> bool:
    """Whether ``step_dir`` holds a complete ``learning_dynamics/``."""
    return all((step_dir / DYNAMICS_DIR / name).exists() for name in TRAIN_FILES)


def match_modules(model: nn.Module, layer_suffixes: Sequence[str]) -> dict[str, nn.Module]:
    """Modules whose name ends with one of ``layer_suffixes``, by name, in model order.

    Raises ValueError naming the first suffix that matches no module with a weight, and a few valid names.
    """
    named = [
        (name, m) for name, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
    ]
    for suffix in layer_suffixes:
        if not any(name == suffix or name.endswith("." + suffix) for name, _ in named):
            examples = ", ".join(name for name, _ in named[1:7])
            raise ValueError(
                f"callbacks.learning_dynamics.layer_suffixes: suffix {suffix!r} matches no module of the "
                f"model; module names look like: {examples}, ..."
            )
    return {
        name: m
        for name, m in named
        if any(name == suffix or name.endswith("." + suffix) for suffix in layer_suffixes)
    }


def extract_states(
    model: nn.Module,
    modules: dict[str, nn.Module],
    tokens: torch.Tensor,
    sequence_idx: int = -1,
    forward_context: Any = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Activations, weights and LM-loss gradients of ``modules`` on ``tokens`` [B, T+1] (fp32, CPU).

    ``model`` must have ``lm_loss(input_ids, labels)``. ``forward_context`` (e.g. the trainer's precision
    autocast) wraps the forward pass, so activations are what training computes.
    """
    tokens = tokens.to(next(model.parameters()).device)
    return capture_states(
        modules,
        lambda: model.lm_loss(tokens[:, :-1], tokens[:, 1:]),
        lambda output: output[:, sequence_idx, :],
        forward_context,
    )


def extract_meta_states(
    model: nn.Module,
    head: nn.Module,
    meta_config: Any,
    modules: dict[str, nn.Module],
    batch: dict[str, torch.Tensor],
    forward_context: Any = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`extract_states` on a meta-batch: one backbone forward over its support and query windows
    (support first, as ``picomaml.meta.window_features`` orders them), activations at each window's last
    real token, gradients of the MAML query loss after the inner loop (``meta_config``'s, with ``head``).
    """
    from picomaml.meta import meta_forward

    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    last = torch.cat([batch["support_lengths"].flatten(), batch["query_lengths"].flatten()]) - 1
    return capture_states(
        modules,
        lambda: meta_forward(model.hidden_states, batch, head, meta_config)[0],
        lambda output: output[torch.arange(len(last), device=output.device), last],
        forward_context,
    )


def capture_states(
    modules: dict[str, nn.Module],
    loss_fn: Any,
    select: Any,
    forward_context: Any = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Runs ``loss_fn()`` with forward hooks on ``modules``; returns ``select(output)`` of each module
    (its activations), its weight, and d(loss)/d(weight), all fp32 on the CPU."""
    activations: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def save(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            # clone: a slice of [B, T, D] would otherwise pin (and torch.save) the whole tensor
            activations[name] = select(output).detach().float().cpu().clone()

        return save

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        with torch.enable_grad(), forward_context or contextlib.nullcontext():
            loss = loss_fn()
        grads = torch.autograd.grad(loss, [m.weight for m in modules.values()])
    finally:
        for handle in handles:
            handle.remove()
    return {
        "activations": activations,
        "weights": {name: m.weight.detach().float().cpu().clone() for name, m in modules.items()},
        "gradients": {name: g.detach().float().cpu() for name, g in zip(modules, grads, strict=True)},
    }


class LearningDynamics(pl.Callback):
    """Writes pico-train learning-dynamics files at the scheduled steps (see the module docstring).

    Args:
        every_n_steps: after the log-spaced steps, dump every this many optimizer steps (use the
            checkpoint cadence, so every ``step_N`` checkpoint has its dynamics).
        log_spaced_until: last power-of-two step of the early schedule (Pythia: 512).
        layer_suffixes: module-name suffixes to record; each must match at least one module.
        sequence_idx: token position whose activations are saved (-1: the last input position).
        val_batch_size: rows of the fixed validation batch (taken from the datamodule's validation
            micro-batches, in order); 0 disables the ``val_*`` files.
        meta_episode: in meta runs, the meta-test episode (a meta-batch of held-out words) whose
            windows give the ``meta_*`` files, the same at every step; None disables them.
        dirpath: the run's checkpoint directory (default ``<trainer.default_root_dir>/checkpoints``).
        steps: an explicit list of steps instead of the schedule.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        log_spaced_until: int = 512,
        layer_suffixes: Sequence[str] = DEFAULT_LAYER_SUFFIXES,
        sequence_idx: int = -1,
        val_batch_size: int = 32,
        meta_episode: int | None = 0,
        dirpath: str | os.PathLike | None = None,
        steps: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not layer_suffixes:
            raise ValueError("LearningDynamics: layer_suffixes is empty")
        self.every_n_steps = every_n_steps
        self.log_spaced_until = log_spaced_until
        self.layer_suffixes = tuple(layer_suffixes)
        self.sequence_idx = sequence_idx
        self.val_batch_size = val_batch_size
        self.meta_episode = meta_episode
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.steps = sorted(set(steps)) if steps is not None else None
        self._schedule: set[int] = set()
        self._modules: dict[str, nn.Module] = {}
        self._last_tokens: torch.Tensor | None = None
        self._last_dumped = -1
        self._val_tokens: torch.Tensor | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._modules = match_modules(pl_module.model, self.layer_suffixes)
        steps = self.steps
        if steps is None:
            steps = checkpoint_steps(max(trainer.max_steps, 0), self.every_n_steps, self.log_spaced_until)
        self._schedule = set(steps)
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "checkpoints"

    def state_dict(self) -> dict[str, Any]:
        # the rows a dump needs when the run resumes here (the last micro-batch that had tokens)
        return {"last_tokens": None if self._last_tokens is None else self._last_tokens.cpu()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_tokens = state_dict.get("last_tokens")

    def step_files_done(self, step: int) -> bool:
        """Whether this callback is done with ``step_<step>/`` (``StepCheckpoints`` publishes it then)."""
        return step not in self._schedule or self._last_dumped >= step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        self._last_dumped = -1
        if step == 0:
            return  # step 0's dump is taken on the first batch
        assert self.dirpath is not None
        if step in self._schedule and not dynamics_complete(self.dirpath / step_dir_name(step)):
            # the run that saved this checkpoint ended before the step's dump was complete
            self._dump(step, trainer, pl_module)
        self._last_dumped = step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        ar = batch.get("ar", batch) if isinstance(batch, dict) else None  # hybrid items nest the AR batch
        if isinstance(ar, dict) and "tokens" in ar:
            self._last_tokens = ar["tokens"]
        if trainer.global_step == 0 and self._last_dumped < 0 and 0 in self._schedule:
            self._dump(0, trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step > self._last_dumped and step in self._schedule:
            self._dump(step, trainer, pl_module)

    def _dump(self, step: int, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            if self._last_tokens is None:
                # e.g. resumed from a checkpoint written before the batch was kept in it
                log.warning("LearningDynamics: no training batch with tokens; step %d gets no dynamics", step)
            else:
                self._write(step, trainer, pl_module)
        self._last_dumped = step

    def _write(self, step: int, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The step's files, staged beside ``learning_dynamics/`` and renamed into place when complete."""
        assert self.dirpath is not None and self._last_tokens is not None
        step_dir = self.dirpath / step_dir_name(step)
        out_dir = step_dir / DYNAMICS_DIR
        staging = step_dir / f".{DYNAMICS_DIR}.tmp-{os.getpid()}"
        with explain_disk_full(staging):
            step_dir.mkdir(parents=True, exist_ok=True)
            _clean_up_after_kills(out_dir)
            staging.mkdir()
        try:
            model = pl_module.model
            # one context per forward pass: a context manager may be single-use
            forward = trainer.strategy.precision_plugin.forward_context
            train = extract_states(model, self._modules, self._last_tokens, self.sequence_idx, forward())
            _save_states(train, staging, "train")
            tokenizer = getattr(trainer.datamodule, "tokenizer", None)
            _save_rows(self._last_tokens, tokenizer, staging / "train_data")
            val_tokens = self._validation_tokens(trainer)
            if val_tokens is not None:
                val = extract_states(model, self._modules, val_tokens, self.sequence_idx, forward())
                _save_states(val, staging, "val")
            meta_batch = self._meta_batch(trainer, pl_module)
            if meta_batch is not None:
                meta = extract_meta_states(
                    model, pl_module.meta_head, pl_module.meta_config, self._modules, meta_batch, forward()
                )
                _save_states(meta, staging, "meta")
            fsync_dir(staging)
            _replace_dir(staging, out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _meta_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
        episodes = getattr(trainer.datamodule, "meta_test_episodes", None)
        if self.meta_episode is None or episodes is None or getattr(pl_module, "meta_head", None) is None:
            return None
        return episodes[self.meta_episode]

    def _validation_tokens(self, trainer: pl.Trainer) -> torch.Tensor | None:
        """The first ``val_batch_size`` validation rows, read once so every step sees the same inputs."""
        if self._val_tokens is None and self.val_batch_size > 0:
            batches = trainer.datamodule.val_batches_list() if trainer.datamodule is not None else []
            if not batches:
                log.warning("LearningDynamics: the datamodule has no validation batches; no val_* files")
                self.val_batch_size = 0
                return None
            rows = torch.cat([b["tokens"] for b in batches])
            if len(rows) < self.val_batch_size:
                log.warning(
                    "LearningDynamics: only %d validation rows for val_batch_size=%d",
                    len(rows),
                    self.val_batch_size,
                )
            self._val_tokens = rows[: self.val_batch_size]
        return self._val_tokens


def _save_states(states: dict[str, dict[str, torch.Tensor]], out_dir: Path, prefix: str) -> None:
    """``<prefix>_activations.pt``, ``<prefix>_weights.pt`` and ``<prefix>_gradients.pt``."""
    for kind, tensors in states.items():
        write_atomic(out_dir / f"{prefix}_{kind}.pt", lambda tmp, tensors=tensors: torch.save(tensors, tmp))


def _save_rows(tokens: torch.Tensor, tokenizer: Any, path: Path) -> None:
    """The batch as pico-train saves it: an HF dataset with ``input_ids`` and decoded ``text``."""
    import datasets

    rows = tokens.cpu().tolist()
    columns: dict[str, list] = {"input_ids": rows}
    if tokenizer is not None:
        columns["text"] = [tokenizer.decode(row, skip_special_tokens=True) for row in rows]
    # a progress bar per dump would flood the training log
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with explain_disk_full(path):
            datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    finally:
        if bars:
            datasets.enable_progress_bars()


def _replace_dir(new: Path, dest: Path) -> None:
    """``dest`` becomes the directory ``new``. A directory cannot be renamed over a non-empty one, so an
    existing ``dest`` is renamed aside first and removed after: a kill in between leaves it complete
    under ``.<name>.old-<pid>``, which :func:`_clean_up_after_kills` puts back."""
    aside = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, aside)
    os.replace(new, dest)
    fsync_dir(dest.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _clean_up_after_kills(dest: Path) -> None:
    """Remove the staging directories of killed dumps next to ``dest``; a previous ``dest`` that a kill
    left renamed aside (:func:`_replace_dir`) goes back in place."""
    for stale in sorted(dest.parent.glob(f".{dest.name}.*")):
        if ".old-" in stale.name and not dest.exists():
            os.replace(stale, dest)
        else:
            shutil.rmtree(stale, ignore_errors=True)
