"""Learning-dynamics dumps: pico-train's layout, exact contents, no effect on training, and a full disk.

The tiny real runs read here (``sweep_dir``, built by ``tests.helpers.tiny_sweep`` once per session) are
two identical 4-step runs on a small word corpus, run 0 with the callback, run 1 without, side by side.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_from_disk

from picomaml.lit.checkpointing import checkpoint_steps
from picomaml.lit.dynamics import match_modules
from picomaml.model import ModelConfig, PicoDecoder
from picomaml.train import train
from tests.helpers import FAST, MICRO_MODEL, VAL_ROWS, compose_train

DYNAMICS_STEPS = [0, 1, 2, 4]  # log-spaced 0, 1 (until 1), then every 2, for max_steps=4


def test_checkpoint_steps_are_log_spaced_then_regular() -> None:
    assert checkpoint_steps(2500, 1000) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 2500]
    assert checkpoint_steps(4, 2, log_spaced_until=1) == DYNAMICS_STEPS
    assert checkpoint_steps(6, 3) == [0, 1, 2, 3, 4, 6]
    assert checkpoint_steps(10, 4, log_spaced_until=2) == [0, 1, 2, 4, 8, 10]


def test_a_layer_suffix_matching_nothing_is_refused() -> None:
    model = PicoDecoder(MICRO_MODEL)
    with pytest.raises(ValueError, match=r"suffix 'attention.w_9' matches no module.*layers\.0\.attention"):
        match_modules(model, ["attention.v_proj", "attention.w_9"])


def test_files_have_pico_layout_names_and_shapes(sweep_dir: Path) -> None:
    checkpoints = sweep_dir / "0" / "checkpoints"
    dumped = sorted(int(p.name.removeprefix("step_")) for p in checkpoints.glob("step_*") if p.is_dir())
    assert dumped == DYNAMICS_STEPS
    layers = [
        f"layers.{i}.{m}" for i in range(2) for m in ("attention.v_proj", "attention.o_proj", "swiglu.w_2")
    ]
    # tiny: d_model 48, 2 kv heads x head_dim 8 = 16 value features, ffn 192
    out_dim = {"attention.v_proj": 16, "attention.o_proj": 48, "swiglu.w_2": 48}
    in_dim = {"attention.v_proj": 48, "attention.o_proj": 48, "swiglu.w_2": 192}
    for step in DYNAMICS_STEPS:
        ld = checkpoints / f"step_{step}" / "learning_dynamics"
        names = {p.name for p in ld.iterdir()}
        assert names == {
            f"{s}_{k}.pt" for s in ("train", "val") for k in ("activations", "weights", "gradients")
        } | {"train_data"}
        for split, rows in (("train", 4), ("val", VAL_ROWS)):
            acts, weights, grads = (
                torch.load(ld / f"{split}_{k}.pt") for k in ("activations", "weights", "gradients")
            )
            assert list(acts) == list(weights) == list(grads) == layers
            for name in layers:
                kind = name.split(".", 2)[2]
                assert acts[name].shape == (rows, out_dim[kind])
                assert weights[name].shape == grads[name].shape == (out_dim[kind], in_dim[kind])
        data = load_from_disk(str(ld / "train_data"))
        assert data.column_names == ["input_ids", "text"] and len(data) == 4
        assert len(data[0]["input_ids"]) == 33 and data[0]["text"]


def test_dumps_hold_the_checkpoint_weights_and_true_gradients(sweep_dir: Path) -> None:
    """Step 2's dump sees the weights of step 2's checkpoint, and its gradients are the LM loss's on its
    batch."""
    ld = sweep_dir / "0" / "checkpoints" / "step_2" / "learning_dynamics"
    checkpoint = torch.load(
        sweep_dir / "0" / "checkpoints" / "step_2" / "checkpoint.ckpt", weights_only=False
    )
    state = checkpoint["state_dict"]
    weights = torch.load(ld / "train_weights.pt")
    for name, weight in weights.items():
        assert torch.equal(weight, state[f"model.{name}.weight"]), name

    model = PicoDecoder(ModelConfig(**checkpoint["hyper_parameters"]["model_config"]))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    tokens = torch.tensor(load_from_disk(str(ld / "train_data"))["input_ids"])
    model.lm_loss(tokens[:, :-1], tokens[:, 1:]).backward()
    grads = torch.load(ld / "train_gradients.pt")
    modules = dict(model.named_modules())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, modules[name].weight.grad, rtol=1e-4, atol=1e-7, msg=name)
    acts = torch.load(ld / "train_activations.pt")
    captured = {}
    handle = modules["layers.1.swiglu.w_2"].register_forward_hook(
        lambda m, a, out: captured.setdefault("o", out)
    )
    with torch.no_grad():
        model(tokens[:, :-1])
    handle.remove()
    torch.testing.assert_close(acts["layers.1.swiglu.w_2"], captured["o"][:, -1])


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path / "csv" / "metrics.csv") as file:
        return list(csv.DictReader(file))


def test_the_callback_does_not_change_training(sweep_dir: Path) -> None:
    keys = (
        "step",
        "train/loss_ar",
        "train/grad_norm",
        "train/lr",
        "train/tokens_seen",
        "val/loss",
        "val/ppl",
    )
    with_dynamics, without = _rows(sweep_dir / "0"), _rows(sweep_dir / "1")
    assert len(with_dynamics) == len(without) >= 6
    for a, b in zip(with_dynamics, without, strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    final = [torch.load(sweep_dir / job / "checkpoints" / "last.ckpt", weights_only=False) for job in "01"]
    for name, value in final[0]["state_dict"].items():
        assert torch.equal(value, final[1]["state_dict"][name]), name


def _files(step_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``step_dir`` with its inode and modification time: what changes when
    anything is written, replaced or added."""
    return {
        str(p.relative_to(step_dir)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in step_dir.rglob("*")
    }


@pytest.mark.parametrize("full_at", ["train_data", "val_gradients.pt"])
def test_a_full_disk_during_a_dump_keeps_the_previous_one(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, full_at: str
) -> None:
    """Step 2 is dumped again (the run resumed from step 1 in its own dir) and the disk fills up while its
    training rows, or its last file, are written: the run fails with one error naming the file and the
    space left, the step's previous dynamics and every other file of its directory stay as they were,
    no partial file is left behind, and the published checkpoint is still step 2's."""
    overrides = [*FAST, "trainer.max_steps=2", "callbacks.learning_dynamics.val_batch_size=4"]
    assert train(compose_train(overrides, tmp_path, cache_dir))["status"] == "completed"
    ckpt_dir = tmp_path / "checkpoints"
    step_2 = ckpt_dir / "step_2"
    before = _files(step_2)
    assert "learning_dynamics/train_data" in before and "learning_dynamics/val_gradients.pt" in before

    def disk_full(path: object) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    real_save, real_save_to_disk = torch.save, Dataset.save_to_disk

    def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        if full_at in str(f):
            disk_full(f)
        real_save(obj, f, *args, **kwargs)

    def save_to_disk(self: Dataset, path: str, *args: object, **kwargs: object) -> None:
        if full_at in str(path) and "step_2" in str(path):
            os.makedirs(path, exist_ok=True)
            disk_full(os.path.join(path, "data-00000-of-00001.arrow"))
        real_save_to_disk(self, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(Dataset, "save_to_disk", save_to_disk)
    with pytest.raises(OSError) as raised:
        train(compose_train([*overrides, f"ckpt_path={ckpt_dir / 'step_1'}"], tmp_path, cache_dir))
    assert _files(step_2) == before
    message = str(raised.value)
    written = re.fullmatch(r"No space left writing (\S+) \(\d+\.\d MB free on /\S*\)", message)
    assert written is not None, message
    assert written.group(1).startswith(str(step_2)) and written.group(1).endswith(full_at), message
    assert json.loads((tmp_path / "result.json").read_text())["error"] == f"OSError: {message}"
    assert os.readlink(ckpt_dir / "latest") == "step_2"
    assert os.path.samefile(ckpt_dir / "last.ckpt", step_2 / "checkpoint.ckpt")
