"""The AR-vs-hybrid study: its statistics against independent computations, its report on a synthetic
sweep, its experiment config, the step-0 control, and the whole study end to end through the CLIs."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.types import RunMode

from picomaml.config import CONF_DIR
from picomaml.eval.study import (
    T975,
    Estimate,
    collect_study,
    mean_ci,
    paired_difference,
    study_rows,
    t_quantile,
    t_quantile_table,
)
from picomaml.eval.suite import parse_suite, trained_head
from picomaml.evaluate import main as evaluate_main
from picomaml.lit.checkpointing import StepCheckpoints
from picomaml.lit.final_eval import FinalEvaluation
from picomaml.lit.module import is_meta_step
from picomaml.meta import MetaConfig
from picomaml.report import main as report_main

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------ statistics


def test_t_quantiles_are_students_not_the_normal() -> None:
    # printed tables of t(0.975, df)
    assert t_quantile_table(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile_table(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile_table(10) == pytest.approx(2.228, abs=1e-3)
    assert t_quantile_table(30) == pytest.approx(2.042, abs=1e-3)
    # beyond the table the expansion approaches the normal quantile from above
    assert 1.96 < t_quantile_table(120) == pytest.approx(1.980, abs=1e-3)
    assert t_quantile_table(31) < t_quantile_table(30)
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile(0)


def test_t_table_agrees_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in [*range(1, len(T975) + 1), 31, 40, 60, 200, 1000]:
        assert t_quantile_table(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3), df
        assert t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)


def test_paired_difference_by_hand() -> None:
    ar = {"0": 10.0, "1": 12.0, "2": 11.0}
    hybrid = {"0": 9.5, "1": 11.9, "2": 10.2, "3": 1.0}  # seed 3 has no AR partner: left out
    diff = paired_difference(ar, hybrid)
    # d = (-0.5, -0.1, -0.8): mean -0.4667, sd 0.35119, t(0.975, 2) = 4.3027
    assert diff.n == 3
    assert diff.mean == pytest.approx(-1.4 / 3)
    sd = math.sqrt(((-0.5 + 1.4 / 3) ** 2 + (-0.1 + 1.4 / 3) ** 2 + (-0.8 + 1.4 / 3) ** 2) / 2)
    assert diff.half_width == pytest.approx(4.3027 * sd / math.sqrt(3), rel=1e-4)
    assert diff.half_width == pytest.approx(0.87243, rel=1e-4)
    assert not diff.excludes_zero  # [-1.339, 0.406]
    # pairing removes the variance the arms share: the unpaired intervals are far wider
    assert mean_ci(list(ar.values())).half_width > 2 * diff.half_width
    assert paired_difference(ar, {"9": 1.0}) is None
    single = mean_ci([3.0])
    assert single == Estimate(1, 3.0, None) and single.low is None


def test_paired_difference_matches_scipy_ttest_rel() -> None:
    stats = pytest.importorskip("scipy.stats")
    ar = [0.41, 0.38, 0.47, 0.44, 0.40]
    hybrid = [0.45, 0.43, 0.46, 0.52, 0.44]
    diff = paired_difference(dict(enumerate(ar)), dict(enumerate(hybrid)))
    ci = stats.ttest_rel(hybrid, ar).confidence_interval(0.95)
    assert diff.low == pytest.approx(ci.low, rel=1e-9)
    assert diff.high == pytest.approx(ci.high, rel=1e-9)
    assert diff.excludes_zero == (ci.low > 0 or ci.high < 0)


# ------------------------------------------------------------------------ the report on a fake sweep

TASK = "downstream/bbc_news/k4"
# (model, hybrid_ratio, seed) -> final loss; the hybrid arm is 0.1, 0.3, 0.2 lower than AR per seed
LOSS = {
    ("tiny", 0.0, 0): 8.0,
    ("tiny", 0.0, 1): 8.4,
    ("tiny", 0.0, 2): 7.9,
    ("tiny", 0.5, 0): 7.9,
    ("tiny", 0.5, 1): 8.1,
    ("tiny", 0.5, 2): 7.7,
    ("small", 0.0, 0): 7.0,
    ("small", 0.0, 1): 7.2,
    ("small", 0.0, 2): 7.1,
    ("small", 0.5, 0): 7.05,
    ("small", 0.5, 1): 7.25,
    ("small", 0.5, 2): 7.15,
}
PARAMS = {"tiny": 4_900_000, "small": 15_000_000}


def fake_scores(model: str, ratio: float, seed: int, step: int) -> dict:
    loss = LOSS[(model, ratio, seed)] if step else 10.8 + 0.01 * seed  # step 0: the shared init
    acc = 0.5 + 0.1 * ratio + 0.01 * seed if step else 0.2
    scores = {
        "run_dir": "x",
        "step": step,
        "n_params": float(PARAMS[model]),
        "loss": loss,
        "ppl_token_weighted": math.exp(loss),
        "meta_query_acc": acc,
        "meta_head": "trained",
        "meta_config": {"n_way": 5},
        f"{TASK}/head/acc": acc,
        f"{TASK}/head/episodes": [acc, acc],
        f"{TASK}/tfidf/acc": 0.6,
        "downstream/bbc_news/chance": 0.2,
    }
    for s in (0, 1, 2):
        scores[f"{TASK}/finetune/step{s}/acc"] = acc + 0.05 * s
    return scores


def write_fake_sweep(root: Path) -> Path:
    """Job dirs as Hydra and picomaml.train leave them: overrides, config, result, final evaluation."""
    for job, (model, ratio, seed) in enumerate(LOSS):
        job_dir = root / str(job)
        (job_dir / ".hydra").mkdir(parents=True)
        overrides = [f"model={model}", f"meta.hybrid_ratio={ratio}", f"seed={seed}"]
        (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "meta": {"n_way": 5}}))
        tokens = 12 * 5120 if ratio == 0 else 12 * 5120 - 1000 * (seed + 1)
        result = {"status": "completed", "global_step": 12, "tokens_seen": tokens, "wall_time_s": 60.0}
        (job_dir / "result.json").write_text(json.dumps(result))
        final = {"final": fake_scores(model, ratio, seed, 12), "step0": fake_scores(model, ratio, seed, 0)}
        (job_dir / "eval_results").mkdir()
        (job_dir / "eval_results" / "final.json").write_text(json.dumps(final))
    killed = root / "12" / ".hydra"  # a job that never finished: listed, not counted
    killed.mkdir(parents=True)
    (killed / "overrides.yaml").write_text(yaml.safe_dump(["model=tiny", "meta.hybrid_ratio=0.5", "seed=3"]))
    return root


def read_study_csv(path: Path) -> dict[tuple[str, str, str, str], dict[str, str]]:
    with path.open() as f:
        return {(r["model"], r["metric"], r["checkpoint"], r["arm"]): r for r in csv.DictReader(f)}


def test_study_report_on_a_synthetic_sweep(tmp_path: Path) -> None:
    sweep = write_fake_sweep(tmp_path / "sweep")
    report_main([f"sweep_dir={sweep}", "study=true"])
    rows = read_study_csv(sweep / "study.csv")

    tiny_ar = [LOSS[("tiny", 0.0, s)] for s in range(3)]
    tiny_hybrid = [LOSS[("tiny", 0.5, s)] for s in range(3)]
    ar = rows[("tiny", "loss", "final", "ar")]
    assert int(ar["n"]) == 3 and float(ar["mean"]) == pytest.approx(statistics.fmean(tiny_ar))
    assert float(ar["ci95"]) == pytest.approx(4.3027 * statistics.stdev(tiny_ar) / math.sqrt(3), rel=1e-4)
    diffs = [h - a for h, a in zip(tiny_hybrid, tiny_ar, strict=True)]  # -0.1, -0.3, -0.2
    diff = rows[("tiny", "loss", "final", "diff")]
    assert float(diff["mean"]) == pytest.approx(-0.2)
    assert float(diff["ci95"]) == pytest.approx(4.3027 * statistics.stdev(diffs) / math.sqrt(3), rel=1e-4)
    # lower on every seed, yet with 3 seeds t(0.975, 2) = 4.30 keeps 0 inside the interval (the normal
    # 1.96 would have excluded it: 0.2 > 1.96 * 0.1 / sqrt(3))
    assert float(diff["low"]) < 0 < float(diff["high"])
    assert 1.96 * statistics.stdev(diffs) / math.sqrt(3) < 0.2
    assert rows[("tiny", "loss", "final", "diff")]["n_params"] == str(PARAMS["tiny"])
    # the step-0 control is the same init in both arms: its paired difference is exactly 0
    assert float(rows[("small", "loss", "step0", "diff")]["mean"]) == 0.0
    assert float(rows[("small", "loss", "step0", "ar")]["mean"]) == pytest.approx(10.81)
    # downstream: head-only, full fine-tuning at its last step, and the TF-IDF floor
    assert float(rows[("small", f"{TASK}/head/acc", "final", "diff")]["mean"]) == pytest.approx(0.05)
    assert float(rows[("small", f"{TASK}/finetune/step2/acc", "final", "hybrid")]["mean"]) == pytest.approx(
        0.55 + 0.01 + 0.1
    )
    assert float(rows[("tiny", f"{TASK}/tfidf/acc", "final", "ar")]["mean"]) == pytest.approx(0.6)
    assert ("tiny", f"{TASK}/finetune/step1/acc", "final", "ar") not in rows  # curves go to the plot

    md = (sweep / "study.md").read_text()
    lines = md.splitlines()
    # models in parameter order, each with its table; the killed job is listed apart
    assert md.index("## tiny (4.9M params)") < md.index("## small (15.0M params)")
    header = next(line for line in lines if line.startswith("| metric |"))
    assert header == "| metric | AR | hybrid r=0.5 | hybrid r=0.5 − AR (paired) | step 0 (init) |"
    loss_row = next(line for line in lines if line.startswith("| val loss"))
    # by hand: AR 8.1, sd 0.2646; hybrid 7.9, sd 0.2; differences -0.2, sd 0.1; step 0 10.81, sd 0.01;
    # each half-width t(0.975, 2) * sd / sqrt(3) with t = 4.3027 (4 significant digits)
    assert loss_row == (
        "| val loss (nats/token) ↓ | 8.100 ± 0.657 | 7.900 ± 0.497 "
        "| -0.2000 ± 0.2484 [-0.4484, 0.0484] | 10.81 ± 0.02 |"
    )
    # small's hybrid arm is 0.05 lower on every seed exactly: a zero-width interval that excludes 0
    small_loss = [line for line in lines if line.startswith("| val loss")][1]
    assert "| **0.05000 ± 0.00000 [0.05000, 0.05000]** |" in small_loss
    assert "| bbc_news k=4: full fine-tune (2 steps) ↑ |" in md and "| bbc_news k=4: TF-IDF floor |" in md
    assert "## Jobs without a final evaluation" in md and "| 12 | missing |" in md
    # the token budget each arm really used
    budget = next(line for line in lines if line.startswith("| tiny | hybrid"))
    assert budget.startswith("| tiny | hybrid (r=0.5) | 3 | 12 | 59,440 (58,440-60,440) |")
    assert "| tiny | ar (r=0) | 3 | 12 | 61,440 | 5,120 |" in md
    for plot in ("study_scaling.png", "study_adaptation.png"):
        assert (sweep / plot).stat().st_size > 10_000


def test_study_rows_pair_only_seeds_both_arms_ran(tmp_path: Path) -> None:
    sweep = write_fake_sweep(tmp_path / "sweep")
    # seed 2 of tiny's AR arm lost its evaluation
    (sweep / "2" / "eval_results" / "final.json").unlink()
    jobs, missing = collect_study(sweep)
    assert [m.job for m in missing] == [2, 12]
    rows = {(r.model, r.metric.key, r.checkpoint, r.arm): r.estimate for r in study_rows(jobs)}
    assert rows[("tiny", "loss", "final", "ar")].n == 2
    assert rows[("tiny", "loss", "final", "hybrid")].n == 3
    assert rows[("tiny", "loss", "final", "diff")].n == 2
    assert rows[("tiny", "loss", "final", "diff")].mean == pytest.approx(-0.2)  # (-0.1 - 0.3) / 2
    plain = tmp_path / "plain_sweep"  # a sweep of another experiment: no final evaluations
    (plain / "0" / ".hydra").mkdir(parents=True)
    (plain / "0" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model=tiny"]))
    with pytest.raises(SystemExit, match="no job under .* has eval_results/final.json"):
        report_main([f"sweep_dir={plain}", "study=true"])


# ---------------------------------------------------------------------------- config and the suite


def compose_study(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            config_name="train", overrides=["experiment=ar_vs_hybrid", *overrides], return_hydra_config=True
        )


def test_experiment_gives_both_arms_the_same_backbone_positions_per_step() -> None:
    cfg = compose_study([])
    meta = cfg.meta
    assert (
        cfg.data.batch_size * cfg.data.seq_len
        == (meta.tasks_per_step * meta.n_way * (meta.k_shot + meta.q_query) * meta.window_len)
        == 5120
    )
    assert meta.enabled and cfg.hydra.mode == RunMode.MULTIRUN
    assert dict(cfg.hydra.sweeper.params) == {
        "model": "tiny,small,11m",
        "meta.hybrid_ratio": "0.0,0.5",
        "seed": "0,1,2",
    }
    assert cfg.callbacks.final_eval._target_ == "picomaml.lit.final_eval.FinalEvaluation"
    assert cfg.callbacks.model_checkpoint.log_spaced_until == 0  # step 0 is always saved
    assert "ar_vs_hybrid/multirun" in cfg.hydra.sweep.dir
    # both arms are valid meta configs; the AR arm never takes a meta step
    for ratio in (0.0, 0.5):
        MetaConfig(**{**{k: v for k, v in meta.items() if k != "_target_"}, "hybrid_ratio": ratio})
    ar = MetaConfig(hybrid_ratio=0.0)
    assert not any(is_meta_step(step, ar, seed) for step in range(200) for seed in range(3))


def test_trained_head_only_after_meta_steps() -> None:
    head = object()
    hybrid, ar = MetaConfig(hybrid_ratio=0.5), MetaConfig(hybrid_ratio=0.0)
    assert trained_head(SimpleNamespace(meta_head=head, meta_config=hybrid, step=12)) is head
    assert trained_head(SimpleNamespace(meta_head=head, meta_config=hybrid, step=0)) is None
    assert trained_head(SimpleNamespace(meta_head=head, meta_config=ar, step=12)) is None
    assert trained_head(SimpleNamespace(meta_head=None, meta_config=None, step=12)) is None
    assert parse_suite("meta, lm") == ("lm", "meta")
    with pytest.raises(ValueError, match="unknown part"):
        parse_suite("lm,ppl")


def test_evaluate_cli_scores_the_step0_control(sweep_dir: Path) -> None:
    run = sweep_dir / "1"
    results = evaluate_main([f"ckpt_path={run}", "suite=lm", "control=step0", "max_docs=6"])
    saved = json.loads((run / "eval_results" / "step_4.json").read_text())
    assert saved["step"] == 4 and saved["step0"]["step"] == 0
    assert saved["step0"]["n_docs"] == saved["n_docs"] == 6
    assert "meta_query_acc" not in saved  # suite=lm only
    # the random init predicts ~uniformly over the 50k vocabulary; 4 steps moved it
    assert saved["step0"]["loss"] == pytest.approx(math.log(50304), abs=0.5)
    assert saved["loss"] != saved["step0"]["loss"] and results["step0"] == saved["step0"]
    with pytest.raises(SystemExit, match="control='step2': choose from step0"):
        evaluate_main([f"ckpt_path={run}", "control=step2"])


def test_final_evaluation_refuses_what_it_cannot_score(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown part"):
        FinalEvaluation(suite="lm,perplexity")
    with pytest.raises(ValueError, match="downstream.ks"):
        FinalEvaluation(downstream={"ks": []})
    callback = FinalEvaluation(suite="lm")
    no_checkpoints = SimpleNamespace(callbacks=[callback], max_steps=10)
    with pytest.raises(ValueError, match="needs callbacks.model_checkpoint"):
        callback.on_fit_start(no_checkpoints, SimpleNamespace())
    saver = StepCheckpoints(dirpath=tmp_path / "checkpoints", steps=[5, 10])
    only_later_steps = SimpleNamespace(callbacks=[saver, callback], max_steps=10)
    with pytest.raises(ValueError, match="control_step=0 is not a checkpoint step"):
        callback.on_fit_start(only_later_steps, SimpleNamespace())
    saver.steps = None  # the default schedule saves step 0, but this dir holds no training_config.yaml
    with pytest.raises(ValueError, match="training_config.yaml"):
        callback.on_fit_start(only_later_steps, SimpleNamespace())


# ------------------------------------------------------------------------------------ end to end

STEPS = 3
SEEDS = (0, 2)  # both take AR and meta steps in the first 3 steps (is_meta_step)


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path: Path, cache_dir: Path) -> None:
    """The study command on model=tiny, 2 seeds, a few steps and a small evaluation, then the report."""
    hybrid = MetaConfig(hybrid_ratio=0.5)
    meta_steps = {s: sum(is_meta_step(t, hybrid, s) for t in range(STEPS)) for s in SEEDS}
    assert all(0 < n < STEPS for n in meta_steps.values()), meta_steps  # both kinds of step in both seeds
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "picomaml.train",
        "experiment=ar_vs_hybrid",
        "model=tiny",
        f"seed={','.join(map(str, SEEDS))}",
        f"trainer.max_steps={STEPS}",
        f"hydra.sweep.dir={sweep}",
        # a quarter of the positions per step, both sides alike: 80 x 32 = 2 x 5 x 8 x 32
        "data.seq_len=32",
        "data.batch_size=80",
        "meta.window_len=32",
        "meta.buffer_tokens=200000",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "callbacks.periodic_eval=null",
        "callbacks.final_eval.episodes=4",
        "callbacks.final_eval.max_docs=8",
        "callbacks.final_eval.downstream.tasks=[bbc_news]",
        "callbacks.final_eval.downstream.ks=[2]",
        "callbacks.final_eval.downstream.episodes=2",
        "callbacks.final_eval.downstream.test_per_class=4",
        "callbacks.final_eval.downstream.window_len=32",
        "callbacks.final_eval.downstream.finetune_episodes=1",
        "callbacks.final_eval.downstream.finetune_steps=[0,1]",
    ]
    env = {**os.environ, "PICOMAML_CACHE": str(cache_dir), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    jobs, missing = collect_study(sweep)
    assert not missing and len(jobs) == 2 * len(SEEDS)
    by_cell = {(j.hybrid_ratio, int(j.seed)): j for j in jobs}
    for seed in SEEDS:
        ar, hyb = by_cell[(0.0, seed)], by_cell[(0.5, seed)]
        # the same init: identical step-0 scores; the AR arm took no meta step, the hybrid arm some
        assert ar.step0["loss"] == hyb.step0["loss"]
        assert ar.record.final["meta/meta_steps"] == 0
        assert hyb.record.final["meta/meta_steps"] == meta_steps[seed]
        assert ar.record.tokens_seen == STEPS * 80 * 32
        # meta windows count their real tokens only, at most the padded positions
        assert 0 < hyb.record.tokens_seen < ar.record.tokens_seen
        assert ar.final["step"] == hyb.final["step"] == STEPS
        assert json.loads((ar.record.path / "eval_results" / "final.json").read_text())["final"][
            "meta_head"
        ].startswith("fresh init")
        for scores in (ar.final, hyb.final, ar.step0):
            assert 0 <= scores["meta_query_acc"] <= 1 and scores["meta_tasks"] == 4
            assert 0 <= scores["downstream/bbc_news/k2/finetune/step1/acc"] <= 1

    # the evaluate CLI with the callback's options reproduces the callback's numbers (one code path)
    job = by_cell[(0.5, SEEDS[0])]
    again = evaluate_main(
        [f"ckpt_path={job.record.path}", "suite=lm,meta", "control=step0", "episodes=4", "max_docs=8"]
        + ["batch_size=16", f"out={tmp_path / 'again.json'}"]
    )
    for checkpoint, scores in (("final", again), ("step0", again["step0"])):
        for key in ("loss", "ppl_doc_mean", "meta_query_acc"):
            assert scores[key] == pytest.approx(getattr(job, checkpoint)[key], rel=1e-6), (checkpoint, key)

    report = subprocess.run(
        [sys.executable, "-m", "picomaml.report", f"sweep_dir={sweep}", "study=true"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    md = (sweep / "study.md").read_text()
    assert "| metric | AR | hybrid r=0.5 | hybrid r=0.5 − AR (paired) | step 0 (init) |" in md
    assert "| tiny | ar (r=0) | 2 |" in md and "| tiny | hybrid (r=0.5) | 2 |" in md
    rows = read_study_csv(sweep / "study.csv")
    for metric in ("loss", "meta_query_acc", "downstream/bbc_news/k2/head/acc"):
        diff = rows[("tiny", metric, "final", "diff")]
        assert int(diff["n"]) == len(SEEDS) and diff["ci95"] != "", metric
        paired = [by_cell[(0.5, s)].final[metric] - by_cell[(0.0, s)].final[metric] for s in SEEDS]
        assert float(diff["mean"]) == pytest.approx(statistics.fmean(paired))
    assert (sweep / "study_adaptation.png").is_file() and (sweep / "study_scaling.png").is_file()
