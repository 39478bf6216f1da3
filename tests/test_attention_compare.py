"""experiment=attention_compare: its config, its report on a hand-made sweep, neuron selectivity by
hand, and the whole experiment end to end (a tiny multirun, the report and the analysis on it)."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.types import RunMode

from picomaml.config import CONF_DIR
from picomaml.eval.compare import collect_compare
from picomaml.eval.numeric import NumericSequence
from picomaml.eval.numeric_analysis import neuron_selectivity, selectivity_index
from picomaml.evaluate import main as evaluate_main
from picomaml.report import main as report_main

T2 = 4.3027  # t(0.975, 2): three seeds


def test_experiment_config() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=["experiment=attention_compare"], return_hydra_config=True
        )
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert dict(cfg.hydra.sweeper.params) == {"model.attention": "softmax,linear", "seed": "0,1,2"}
    assert cfg.data.corpus == "synthetic" and cfg.data.corpus_options.max_terms == 8
    assert cfg.callbacks.final_eval._target_ == "picomaml.lit.final_eval.FinalEvaluation"
    assert list(cfg.callbacks.final_eval.suite) == ["lm", "numeric"]
    assert list(cfg.callbacks.final_eval.numeric.lengths) == [1, 2, 4]
    assert (
        cfg.callbacks.model_checkpoint.log_spaced_until == 0
    )  # step 0 is saved: control_step=0 can score it
    assert "attention_compare/multirun" in cfg.hydra.sweep.dir
    # equal tokens: the arm changes the attention only, never the batch, the context or the step count
    for attention in ("softmax", "linear"):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            arm = compose(
                config_name="train",
                overrides=["experiment=attention_compare", f"model.attention={attention}"],
            )
        assert arm.model.attention == attention
        assert (arm.data.batch_size, arm.data.seq_len, arm.trainer.max_steps) == (4, 64, 200)


# ------------------------------------------------------------------------ the report on a fake sweep

# (arm, seed) -> counting number-token accuracy at L: linear is 0.2, 0.1, 0.15 below softmax per seed
COUNTING = {
    ("softmax", 0): 0.8,
    ("softmax", 1): 0.9,
    ("softmax", 2): 0.7,
    ("linear", 0): 0.6,
    ("linear", 1): 0.8,
    ("linear", 2): 0.55,
}


def fake_scores(arm: str, seed: int, step: int) -> dict:
    acc = COUNTING[(arm, seed)] if step else 0.01
    scores = {"step": step, "n_params": 2_500_000.0, "loss": 2.0 + 0.1 * seed if step else 10.8}
    for kind in ("counting", "random_walk", "all"):
        for m in (1, 2, 4):
            scores[f"numeric/{kind}/x{m}/token_acc"] = acc / m if kind != "random_walk" else 0.2
            scores[f"numeric/{kind}/x{m}/exact"] = acc / (2 * m)
            scores[f"numeric/{kind}/x{m}/term_acc"] = acc / m
    scores.update({"numeric/train_terms": 8.0, "numeric/continuation_terms": 3.0})
    scores.update({f"numeric/x{m}/terms": 8.0 * m for m in (1, 2, 4)})
    return scores


def write_fake_sweep(root: Path) -> Path:
    for job, (arm, seed) in enumerate(COUNTING):
        job_dir = root / str(job)
        (job_dir / ".hydra").mkdir(parents=True)
        (job_dir / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([f"model.attention={arm}", f"seed={seed}"])
        )
        result = {"status": "completed", "global_step": 64, "tokens_seen": 65536, "wall_time_s": 100.0 + job}
        (job_dir / "result.json").write_text(json.dumps(result))
        (job_dir / "eval_results").mkdir()
        final = {"final": fake_scores(arm, seed, 64), "step0": fake_scores(arm, seed, 0)}
        (job_dir / "eval_results" / "final.json").write_text(json.dumps(final))
        (job_dir / "csv").mkdir()
        rows = ["step,train/loss_ar,val/loss"] + [
            f"{s},{8.0 / s + 0.1 * seed + (0.5 if arm == 'linear' else 0)},{'' if s % 16 else 9.0 / s}"
            for s in range(4, 65, 4)
        ]
        (job_dir / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    killed = root / "6" / ".hydra"
    killed.mkdir(parents=True)
    (killed / "overrides.yaml").write_text(yaml.safe_dump(["model.attention=linear", "seed=3"]))
    return root


def test_report_on_a_hand_made_sweep(tmp_path: Path) -> None:
    sweep = write_fake_sweep(tmp_path / "sweep")
    report_main([f"sweep_dir={sweep}", "numeric=true"])
    with (sweep / "numeric.csv").open() as f:
        rows = {(r["key"], r["checkpoint"], r["arm"]): r for r in csv.DictReader(f)}
    key = "numeric/counting/x1/token_acc"
    softmax = [COUNTING[("softmax", s)] for s in range(3)]
    soft = rows[(key, "final", "softmax")]
    assert int(soft["n"]) == 3 and float(soft["mean"]) == pytest.approx(0.8)
    assert float(soft["ci95"]) == pytest.approx(T2 * statistics.stdev(softmax) / math.sqrt(3), rel=1e-4)
    # paired: differences -0.2, -0.1, -0.15: mean -0.15, sd 0.05, half-width 4.3027 * 0.05 / sqrt(3)
    diff = rows[(key, "final", "linear - softmax")]
    assert float(diff["mean"]) == pytest.approx(-0.15)
    assert float(diff["ci95"]) == pytest.approx(T2 * 0.05 / math.sqrt(3), rel=1e-4)
    assert float(diff["high"]) < 0  # excludes 0
    # extrapolation rows are there too (the fake halves the accuracy at each doubling)
    assert float(rows[("numeric/counting/x4/token_acc", "final", "softmax")]["mean"]) == pytest.approx(0.2)
    assert float(rows[("numeric/random_walk/x2/token_acc", "final", "linear - softmax")]["mean"]) == 0.0
    assert float(rows[("loss", "step0", "softmax")]["mean"]) == pytest.approx(10.8)

    md = (sweep / "numeric.md").read_text()
    lines = md.splitlines()
    assert "arms model.attention = softmax, linear (baseline softmax); seeds 0, 1, 2" in md
    header = "| kind | terms | softmax | linear | linear - softmax (paired) | step 0 (init) |"
    assert lines.count(header) == 2  # token accuracy and exact match
    token_table = lines[lines.index(header) :]
    # by hand: softmax 0.8 ± 4.3027 * 0.1 / sqrt(3) = 0.2484; linear 0.65 ± 4.3027 * 0.1323 / sqrt(3) = 0.3286
    assert token_table[2] == (
        "| counting | L = 8 | 0.8000 ± 0.2484 | 0.6500 ± 0.3286 "
        "| **-0.1500 ± 0.1242 [-0.2742, -0.0258]** | 0.01000 ± 0.00000 |"
    )
    assert token_table[3].startswith("| counting | 2L = 16 |") and token_table[4].startswith(
        "| counting | 4L = 32 |"
    )
    assert token_table[5].startswith("| random_walk | L = 8 |")
    assert token_table[8].startswith("| all | L = 8 |")  # the macro-average comes last
    assert "| softmax | 3 | 2,500,000 | 64 | 65,536 | 101 (100-102) |" in md
    assert "## Jobs without a numeric evaluation" in md and "| 6 | missing |" in md
    assert (sweep / "numeric_loss_curves.png").stat().st_size > 10_000

    jobs, missing = collect_compare(sweep)
    assert len(jobs) == 6 and [m.job for m in missing] == [6]
    # without a scored step-0 control (callbacks.final_eval.control_step=null) the column is left out
    for path in sweep.glob("*/eval_results/final.json"):
        path.write_text(json.dumps({"final": json.loads(path.read_text())["final"]}))
    report_main([f"sweep_dir={sweep}", "numeric=true"])
    assert (
        "| kind | terms | softmax | linear | linear - softmax (paired) |"
        in (sweep / "numeric.md").read_text()
    )
    with pytest.raises(SystemExit, match="choose one"):
        report_main([f"sweep_dir={sweep}", "numeric=true", "study=true"])


# ------------------------------------------------------------------------------ neuron selectivity


def test_selectivity_index_by_hand() -> None:
    mean_abs = np.array(
        [
            [1.0, 1.0, 1.0, 1.0, 1.0],  # no preference: 0
            [4.0, 1.0, 1.0, 1.0, 1.0],  # (4 - 1) / (4 + 1) = 0.6, prefers kind 0
            [0.0, 0.0, 2.0, 0.0, 0.0],  # one kind only: 1
            [0.0, 0.0, 0.0, 0.0, 0.0],  # never active: 0
            [1.0, 3.0, 3.0, 1.0, 1.0],  # rest (1+3+1+1)/4 = 1.5: (3 - 1.5) / (3 + 1.5) = 1/3, first max
        ]
    )
    index, preferred = selectivity_index(mean_abs)
    assert index.tolist() == pytest.approx([0.0, 0.6, 1.0, 0.0, 1 / 3])
    assert preferred.tolist() == [0, 0, 2, 0, 1]


def test_neuron_selectivity_from_activations() -> None:
    """Two kinds, one layer of 3 units: unit 0 fires on counting only, unit 1 on both alike, unit 2 with
    negative values on alternating (magnitudes count)."""
    seqs = [NumericSequence("counting", (1, 2)), NumericSequence("alternating", (1, 2)),
            NumericSequence("counting", (3, 4))]  # fmt: skip
    acts = [
        [torch.tensor([[2.0, 1.0, 0.0], [4.0, 1.0, 0.0]])],  # counting, 2 number tokens
        [torch.tensor([[0.0, 1.0, -3.0]])],  # alternating
        [torch.tensor([[3.0, 1.0, 1.0]])],  # counting
    ]
    result = neuron_selectivity(acts, seqs)
    assert result.kinds == ["counting", "alternating"]
    # counting: mean |act| over its 3 tokens = [3, 1, 1/3]; alternating: [0, 1, 3]
    np.testing.assert_allclose(result.mean_abs[0], [[3.0, 0.0], [1.0, 1.0], [1 / 3, 3.0]], rtol=1e-6)
    assert result.index[0].tolist() == pytest.approx([1.0, 0.0, (3 - 1 / 3) / (3 + 1 / 3)])
    assert result.preferred[0].tolist() == [0, 0, 1]
    assert result.counts() == {"counting": 1, "alternating": 1}


def test_linear_attention_map_reproduces_the_layer_output() -> None:
    """The map analyze draws for linear attention (the implied kernel weights) is the one the layer
    applies: weights @ values through o_proj give the attention module's own output."""
    from picomaml.eval.analysis import attention_probs
    from picomaml.model import ModelConfig, PicoDecoder

    torch.manual_seed(0)
    config = ModelConfig(
        d_model=32,
        n_layers=2,
        attention_n_heads=4,
        attention_n_kv_heads=2,
        activation_hidden_dim=64,
        vocab_size=64,
        max_seq_len=16,
        attention="linear",
    )
    model = PicoDecoder(config).eval()
    ids = torch.randint(0, 64, (1, 10))
    attention = model.layers[1].attention
    seen = {}
    handle = attention.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        model(ids)
    handle.remove()
    weights = torch.stack([attention_probs(model, ids, 1, h)[0] for h in range(4)])  # [H, T, T]
    assert torch.all(weights.triu(1) == 0)
    v = attention.v_proj(seen["x"]).view(1, 10, 2, 8)[0].detach()  # [T, K, E]
    heads = torch.stack([weights[h] @ v[:, h // 2] for h in range(4)], dim=1)  # [T, H, E]
    with torch.no_grad():
        rebuilt = attention.o_proj(heads.reshape(1, 10, 32))
    torch.testing.assert_close(rebuilt, seen["out"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_tiny_attention_compare_end_to_end(tmp_path: Path, cache_dir: Path) -> None:
    """The experiment as a multirun on a tiny budget (2 arms x 2 seeds, 3 steps), then the report and the
    analysis on its sweep dir; the evaluate CLI reproduces a job's numeric scores."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "picomaml.train",
        "experiment=attention_compare",
        "seed=0,1",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.log_every_n_steps=1",
        f"hydra.sweep.dir={sweep}",
        "data.corpus_options.n_docs=300",
        "data.corpus_options.min_terms=4",
        "data.corpus_options.max_terms=4",
        "data.seq_len=32",
        "data.batch_size=4",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "callbacks.final_eval.max_docs=4",
        "callbacks.final_eval.control_step=0",
        "callbacks.final_eval.numeric.per_kind=2",
        "callbacks.final_eval.numeric.lengths=[1,2]",
        "callbacks.final_eval.numeric.continuation_terms=2",
    ]
    env = {**os.environ, "PICOMAML_CACHE": str(cache_dir), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    jobs, missing = collect_compare(sweep)
    assert not missing and sorted((j.arm, j.seed) for j in jobs) == [
        ("linear", "0"), ("linear", "1"), ("softmax", "0"), ("softmax", "1")
    ]  # fmt: skip
    for job in jobs:
        config = yaml.safe_load((job.record.path / "training_config.yaml").read_text())
        assert config["model"]["attention"] == job.arm
        assert job.record.tokens_seen == 3 * 4 * 32  # equal tokens in every arm
        for scores in (job.final, job.step0):
            assert scores["numeric/train_terms"] == 4 and scores["numeric/x2/terms"] == 8
            for kind in ("counting", "arithmetic", "geometric", "alternating", "random_walk", "all"):
                for m in (1, 2):
                    assert 0 <= scores[f"numeric/{kind}/x{m}/token_acc"] <= 1
                    assert 0 <= scores[f"numeric/{kind}/x{m}/exact"] <= 1
            assert scores["numeric/counting/x1/n_seqs"] == 2

    # the evaluate CLI with the callback's options gives the callback's numbers (one code path)
    job = next(j for j in jobs if j.arm == "linear")
    again = evaluate_main(
        [f"ckpt_path={job.record.path}", "suite=numeric", "numeric_per_kind=2", "numeric_lengths=1,2"]
        + ["numeric_terms=2", f"out={tmp_path / 'again.json'}"]
    )
    for key, value in job.final.items():
        if key.startswith("numeric/"):
            assert again[key] == pytest.approx(value), key

    report_main([f"sweep_dir={sweep}", "numeric=true"])
    md = (sweep / "numeric.md").read_text()
    assert md.count("| kind | terms | softmax | linear | linear - softmax (paired) | step 0 (init) |") == 2
    assert "| counting | L = 4 |" in md and "| all | 2L = 8 |" in md
    assert (sweep / "numeric_loss_curves.png").stat().st_size > 10_000

    analyze = subprocess.run(
        [sys.executable, "-m", "picomaml.analyze", f"path={sweep}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert analyze.returncode == 0, analyze.stderr[-3000:]
    out = sweep / "analysis"
    summary = (out / "summary.md").read_text()
    assert "## Neuron selectivity across sequence kinds" in summary
    assert "linear attention for 'arithmetic: 7, 12" in summary
    for job in jobs:
        name = job.record.path.name
        for figure in (f"numeric_pca_{name}.png", f"selectivity_{name}.png", f"attention_{name}.png"):
            assert (out / figure).stat().st_size > 5_000, figure
        assert f"| {name} | {job.arm} |" in summary
