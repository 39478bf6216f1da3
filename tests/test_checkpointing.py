"""Step checkpoints (picomaml.lit.checkpointing) on a hybrid AR + meta run: layout, the Hugging Face
export in every step dir, meta-episode learning dynamics, exact resumes from every kind of checkpoint,
saves and dumps killed half-way (``latest`` only ever names a complete step dir, and the rerun completes
every one), and a full disk.

One 8-step run (:func:`straight`) is shared: checkpoints at 0, 1, 2, 4 (log-spaced) and 3, 6 (every 3)
and 8 (the end), logging every 2 steps, validating every 4, half of the steps meta steps.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk

from picomaml.config import ConfigError
from picomaml.meta import meta_forward
from picomaml.runs import load_run
from picomaml.train import prepare_run, train
from tests.helpers import FAST, META, compose_train

REPO = Path(__file__).resolve().parents[1]
SCHEDULE = [0, 1, 2, 3, 4, 6, 8]
COMMON = [
    *META,
    "meta.hybrid_ratio=0.5",
    "meta.val_episodes=2",
    "data.val_batches=2",
    "trainer.max_steps=8",
    "trainer.val_check_interval=4",
    "trainer.log_every_n_steps=2",
    "callbacks.model_checkpoint.every_n_train_steps=3",
    "callbacks.learning_dynamics.val_batch_size=4",
]
# a complete step dir: the resume state, the Hugging Face export and the learning dynamics
STEP_FILES = {"checkpoint.ckpt", "config.json", "model.safetensors", "tokenizer.json", "learning_dynamics"}
DYNAMICS_FILES = {
    f"{split}_{kind}.pt"
    for split in ("train", "val", "meta")
    for kind in ("activations", "weights", "gradients")
} | {"train_data"}
# what must come out the same, step by step, whatever the run was resumed from
CURVES = (
    "train/loss_ar",
    "train/loss_meta",
    "train/tokens_seen",
    "train/lr",
    "val/loss",
    "meta_test/query_acc",
)


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as file:
        return list(csv.DictReader(file))


def curve(run_dir: Path, key: str, after: int = -1) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows(run_dir) if r.get(key) and int(r["step"]) > after}


def assert_complete(step_dir: Path) -> None:
    assert {p.name for p in step_dir.iterdir()} >= STEP_FILES, step_dir
    assert {p.name for p in (step_dir / "learning_dynamics").iterdir()} == DYNAMICS_FILES, step_dir
    hidden = [str(p) for p in step_dir.rglob(".*")]
    assert not hidden, f"temporary files left: {hidden}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("checkpointing") / "straight"
    result = train(compose_train(COMMON, run_dir, cache_dir))
    assert result["status"] == "completed" and result["global_step"] == 8
    return run_dir


def test_step_dirs_hold_the_hf_export_and_the_resume_state(straight: Path) -> None:
    ckpt_dir = straight / "checkpoints"
    steps = sorted(int(p.name.removeprefix("step_")) for p in ckpt_dir.glob("step_*"))
    assert steps == SCHEDULE
    for step in SCHEDULE:
        files = {p.name for p in (ckpt_dir / f"step_{step}").iterdir()}
        assert {"checkpoint.ckpt", "config.json", "model.safetensors", "tokenizer.json"} <= files, step
        assert not any(name.startswith(".") for name in files), f"temporary files left in step_{step}"
        assert (
            torch.load(ckpt_dir / f"step_{step}" / "checkpoint.ckpt", weights_only=False)["global_step"]
            == step
        )
    assert os.readlink(ckpt_dir / "latest") == "step_8"
    assert os.path.samefile(ckpt_dir / "last.ckpt", ckpt_dir / "step_8" / "checkpoint.ckpt")

    from transformers import LlamaForCausalLM

    run = load_run(ckpt_dir / "step_4")
    assert run.step == 4 and run.meta_head is not None
    hf = LlamaForCausalLM.from_pretrained(ckpt_dir / "step_4").eval()
    tokens = torch.randint(0, 50000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, run.model(tokens), rtol=1e-4, atol=1e-4)
    # the export is step 4's: not the same weights as step 8's
    assert not torch.equal(run.model.embedding_proj.weight, load_run(straight).model.embedding_proj.weight)


def test_meta_dynamics_hold_query_loss_gradients_on_fixed_episodes(straight: Path, cache_dir: Path) -> None:
    ld = straight / "checkpoints" / "step_4" / "learning_dynamics"
    train_acts = torch.load(ld / "train_activations.pt")
    acts, weights, grads = (
        torch.load(ld / f"meta_{kind}.pt") for kind in ("activations", "weights", "gradients")
    )
    assert set(acts) == set(weights) == set(grads) == set(train_acts)
    run = load_run(straight, step=4)
    datamodule = run.datamodule(cache_dir=str(cache_dir))
    datamodule.setup_meta(run.meta_config)
    batch = datamodule.meta_test_episodes[0]
    cfg = run.meta_config
    windows = cfg.tasks_per_step * cfg.n_way * (cfg.k_shot + cfg.q_query)
    modules = dict(run.model.named_modules())
    for name in grads:
        assert acts[name].shape == (windows, modules[name].weight.shape[0]), name
        assert torch.equal(weights[name], modules[name].weight), name
    # the gradients are d(query loss after adaptation)/d(weight) on meta-test episode 0
    run.model.train(), run.meta_head.train()
    loss, _ = meta_forward(run.model.hidden_states, batch, run.meta_head, cfg)
    loss.backward()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, modules[name].weight.grad, rtol=1e-4, atol=1e-7, msg=name)
    # and activations the outputs at each window's last real token
    lengths = torch.cat([batch["support_lengths"].flatten(), batch["query_lengths"].flatten()])
    tokens = torch.cat([batch["support_tokens"].flatten(0, 1), batch["query_tokens"].flatten(0, 1)])
    name = "layers.0.attention.v_proj"
    captured = {}
    handle = modules[name].register_forward_hook(lambda m, a, out: captured.setdefault("o", out))
    with torch.no_grad():
        run.model.hidden_states(tokens[:, : int(lengths.max())])
    handle.remove()
    torch.testing.assert_close(acts[name], captured["o"][torch.arange(windows), lengths - 1])


def test_periodic_evaluation_is_logged_and_written(straight: Path) -> None:
    evals = {k: curve(straight, f"eval/{k}") for k in ("ppl_doc_mean", "top5_acc", "meta_query_acc")}
    assert all(sorted(c) == [3, 6] for c in evals.values()), evals
    saved = json.loads((straight / "eval_results" / "step_6_light.json").read_text())
    assert saved["step"] == 6 and saved["meta_tasks"] == 8
    assert saved["ppl_doc_mean"] == pytest.approx(evals["ppl_doc_mean"][6])
    assert 0 <= saved["top1_acc"] <= saved["top5_acc"] <= 1


def test_dynamics_and_evaluation_do_not_change_a_hybrid_run(
    straight: Path, tmp_path: Path, cache_dir: Path
) -> None:
    without = tmp_path / "without"
    train(
        compose_train(
            [*COMMON, "~callbacks.learning_dynamics", "~callbacks.periodic_eval"], without, cache_dir
        )
    )
    assert not (without / "checkpoints" / "step_4" / "learning_dynamics").exists()
    assert not (without / "eval_results").exists()
    for key in CURVES:
        assert curve(without, key) == curve(straight, key), key


@pytest.mark.parametrize("step", [0, 1, 3, 4])
def test_resume_from_a_step_checkpoint_continues_the_same_curves(
    straight: Path, tmp_path: Path, cache_dir: Path, step: int
) -> None:
    """0: the initial weights; 1 and 3: between two logging steps; 4: a logging + validation step."""
    resumed = tmp_path / f"from_{step}"
    source = straight / "checkpoints" / f"step_{step}"
    result = train(compose_train([*COMMON, f"ckpt_path={source}"], resumed, cache_dir))
    assert result["global_step"] == 8
    for key in CURVES:
        a, b = curve(straight, key, after=step), curve(resumed, key, after=step)
        assert a and sorted(a) == sorted(b), key
        assert max(abs(a[s] - b[s]) for s in a) <= 1e-6, key


# `python -m picomaml.train` killed (os._exit, no cleanup) half-way through a write of step 4: the
# Lightning checkpoint ("checkpoint") or the learning-dynamics dump (its training rows, "dynamics")
KILL_AT_STEP_4 = """
import io, os, sys, runpy, torch, datasets

def write_half_and_die(path, data):
    with open(path, "wb") as file:  # half the bytes reach the disk, then the process is killed
        file.write(data[: len(data) // 2])
    os._exit(9)

if sys.argv[1] == "checkpoint":
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "state_dict" in obj and obj.get("global_step") == 4:
            data = io.BytesIO()
            real_save(obj, data)
            write_half_and_die(f, data.getvalue())
        return real_save(obj, f, *args, **kwargs)

    torch.save = save
else:
    real_save_to_disk = datasets.Dataset.save_to_disk

    def save_to_disk(self, path, *args, **kwargs):
        if "step_4" in str(path):
            os.makedirs(path, exist_ok=True)
            write_half_and_die(os.path.join(path, "data-00000-of-00001.arrow"), b"rows" * 1000)
        return real_save_to_disk(self, path, *args, **kwargs)

    datasets.Dataset.save_to_disk = save_to_disk
sys.argv = ["picomaml.train", *sys.argv[2:]]
runpy.run_module("picomaml.train", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("write", ["checkpoint", "dynamics"])
def test_a_kill_half_way_through_a_step_leaves_the_previous_one_published(
    straight: Path, tmp_path: Path, cache_dir: Path, write: str
) -> None:
    run_dir = tmp_path / "killed"
    overrides = [*COMMON, f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT_STEP_4, write, *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == 9, killed.stderr[-3000:]
    ckpt_dir = run_dir / "checkpoints"
    # what is published is complete: step 3, latest and last.ckpt alike
    assert os.readlink(ckpt_dir / "latest") == "step_3"
    assert not (ckpt_dir / "step_4" / "checkpoint.ckpt").exists()
    assert os.path.samefile(ckpt_dir / "last.ckpt", ckpt_dir / "step_3" / "checkpoint.ckpt")
    assert_complete(ckpt_dir / "step_3")
    assert load_run(run_dir).step == 3
    # the same command resumes from step 3 and ends as if never killed, every step dir complete
    rerun = subprocess.run(
        [sys.executable, "-m", "picomaml.train", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {ckpt_dir}/last.ckpt" in rerun.stdout + rerun.stderr
    for step in SCHEDULE:
        assert_complete(ckpt_dir / f"step_{step}")
    assert os.readlink(ckpt_dir / "latest") == "step_8"
    for key in CURVES:
        a, b = curve(straight, key), curve(run_dir, key)
        assert sorted(a) == sorted(b), key
        assert max(abs(a[s] - b[s]) for s in a) <= 1e-6, key


def test_a_resume_completes_the_step_dir_it_resumes_from(
    straight: Path, tmp_path: Path, cache_dir: Path
) -> None:
    """A run dir as a kill can leave it: step 4's checkpoint saved and linked as last.ckpt, but neither its
    learning dynamics nor its Hugging Face weights written, and ``latest`` still at step 3. The rerun
    resumes from step 4, writes what is missing (the files of the uninterrupted run) and publishes it."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "unfinished"
    shutil.copytree(straight, run_dir, symlinks=True)
    ckpt_dir = run_dir / "checkpoints"
    for step in (6, 8):
        shutil.rmtree(ckpt_dir / f"step_{step}")
    shutil.rmtree(ckpt_dir / "step_4" / "learning_dynamics")
    (ckpt_dir / "step_4" / "model.safetensors").unlink()
    (ckpt_dir / "last.ckpt").unlink()
    os.link(ckpt_dir / "step_4" / "checkpoint.ckpt", ckpt_dir / "last.ckpt")
    (ckpt_dir / "latest").unlink()
    os.symlink("step_3", ckpt_dir / "latest")

    result = train(compose_train(COMMON, run_dir, cache_dir))
    assert result["status"] == "completed" and result["global_step"] == 8
    for step in SCHEDULE:
        assert_complete(ckpt_dir / f"step_{step}")
    assert os.readlink(ckpt_dir / "latest") == "step_8"
    done, want = ckpt_dir / "step_4", straight / "checkpoints" / "step_4"
    for name in sorted(DYNAMICS_FILES - {"train_data"}):
        a, b = torch.load(done / "learning_dynamics" / name), torch.load(want / "learning_dynamics" / name)
        assert list(a) == list(b), name
        for layer in a:
            torch.testing.assert_close(a[layer], b[layer], rtol=1e-5, atol=1e-6, msg=f"{name} {layer}")
    rows = load_from_disk(str(done / "learning_dynamics" / "train_data"))
    assert rows[:] == load_from_disk(str(want / "learning_dynamics" / "train_data"))[:]
    a, b = load_file(done / "model.safetensors"), load_file(want / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in CURVES:
        assert curve(run_dir, key) == pytest.approx(curve(straight, key), abs=1e-6), key


def test_a_full_disk_fails_the_run_with_the_path_and_the_space_left(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk fills up while step 2's checkpoint is written, and result.json cannot be written either.
    The run fails with the checkpoint's error, which names the file and the space left; the failed
    result.json is logged, not raised in its place; no partial file is left and step 1 stays published."""
    real_save, real_write_text = torch.save, Path.write_text

    def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        if isinstance(obj, dict) and "state_dict" in obj and obj.get("global_step") == 2:
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    def write_text(self: Path, data: str, *args: object, **kwargs: object) -> int:
        if "result.json" in self.name:
            self.write_bytes(data[:10].encode())
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(Path, "write_text", write_text)
    with caplog.at_level("ERROR"), pytest.raises(OSError) as raised:
        train(compose_train([*FAST, "trainer.max_steps=2"], tmp_path, cache_dir))
    ckpt_dir = tmp_path / "checkpoints"
    message = re.fullmatch(r"No space left writing (\S+) \((\d+\.\d) MB free on (/\S*)\)", str(raised.value))
    assert message is not None, str(raised.value)
    assert message.group(1) == str(ckpt_dir / "step_2" / "checkpoint.ckpt")
    assert raised.value.errno == errno.ENOSPC
    logged = [r.getMessage() for r in caplog.records if "result.json" in r.getMessage()]
    assert logged and "No space left writing" in logged[0], [r.getMessage() for r in caplog.records]
    assert not (tmp_path / "result.json").exists()
    assert [p.name for p in tmp_path.rglob(".*")] == [".lock"]
    assert os.readlink(ckpt_dir / "latest") == "step_1"
    assert os.path.samefile(ckpt_dir / "last.ckpt", ckpt_dir / "step_1" / "checkpoint.ckpt")


def test_push_to_hub_offline_warns_once_and_trains_on(
    tmp_path: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The real uploader and HfApi with HF_HUB_OFFLINE=1 (conftest): one warning, every checkpoint local."""
    hub = ["checkpointing.push_to_hub=true", "checkpointing.hub_repo_id=picomaml-tests/tiny"]
    with caplog.at_level("WARNING", logger="picomaml.lit.hub"):
        result = train(compose_train([*FAST, "trainer.max_steps=4", *hub], tmp_path, cache_dir))
    assert result["status"] == "completed"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [
        f"step_{s}" for s in (0, 1, 2, 4)
    ]
    offline = [r for r in caplog.records if "offline" in r.getMessage()]
    assert len(offline) == 1, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["checkpointing.push_to_hub=true"], "needs checkpointing.hub_repo_id"),
        (["checkpointing.push_to_hub=true", "checkpointing.hub_repo_id=a/b/c"], "checkpointing.hub_repo_id"),
        (
            ["checkpointing.push_to_hub=true", "checkpointing.hub_repo_id=a/b", "callbacks=none"],
            "callbacks=default",
        ),
    ],
)
def test_bad_hub_settings_fail_before_training(
    tmp_path: Path, cache_dir: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        prepare_run(compose_train([*FAST, *overrides], tmp_path, cache_dir))
    assert not (tmp_path / "checkpoints").exists()
