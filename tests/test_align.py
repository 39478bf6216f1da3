"""Post-training (issue 13): the DPO loss and preference accuracy on fixed numbers, preference pairs, the
frozen reference, config errors, and a tiny real SFT -> DPO run with a sweep over beta."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import MissingConfigException
from omegaconf import DictConfig

from picomaml.align.config import DPOStage
from picomaml.align.dpo import dpo_loss, preference_accuracy, response_logprobs, sequence_logprobs
from picomaml.align.module import DPOLitModule
from picomaml.align.preferences import build_pairs, collate_pairs
from picomaml.align.run import prepare_align
from picomaml.config import ConfigError
from picomaml.data import PicoDataModule
from picomaml.lit.optim import OptimConfig
from picomaml.model import PicoDecoder
from picomaml.runs import read_checkpoint, resolve_checkpoint
from picomaml.train import prepare_run, save_training_config, train
from tests.helpers import FAST, MICRO_MODEL, REPO, compose_align, compose_train

# --- the DPO maths, against the paper's formula written out independently --------------------------


def _reference_logp(logits: list[list[float]], labels: list[int], mask: list[bool], average: bool) -> float:
    """log p(response) from per-position logits, in plain Python: log-softmax, then sum (or mean)."""
    total, count = 0.0, 0
    for row, label, keep in zip(logits, labels, mask, strict=True):
        if keep:
            peak = max(row)
            log_z = peak + math.log(sum(math.exp(v - peak) for v in row))
            total += row[label] - log_z
            count += 1
    return total / max(count, 1) if average else total


def _reference_dpo(pc: float, pr: float, rc: float, rr: float, beta: float) -> float:
    """Rafailov et al. 2023, eq. 7: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))."""
    margin = beta * ((pc - rc) - (pr - rr))
    return -math.log(1.0 / (1.0 + math.exp(-margin)))


def test_dpo_loss_by_hand_on_one_token_responses() -> None:
    # vocab of 2, one response token each. Policy: chosen p = 1/2, rejected p = 1/(3 + 1) = 1/4;
    # reference: 1/2 for both. With beta = 1 the margin is (0) - (log 1/4 - log 1/2) = log 2, and the
    # loss -log sigmoid(log 2) = -log(2/3) = log 1.5.
    logits = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]], [[0.0, 0.0]], [[0.0, 0.0]]])
    labels = torch.tensor([[0], [1], [0], [1]])
    mask = torch.ones(4, 1, dtype=torch.bool)
    logps = sequence_logprobs(logits, labels, mask)
    assert logps.tolist() == pytest.approx([math.log(0.5), math.log(0.25), math.log(0.5), math.log(0.5)])
    out = dpo_loss(logps[0:1], logps[1:2], logps[2:3], logps[3:4], beta=1.0)
    assert out.losses.item() == pytest.approx(math.log(1.5), rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.0, abs=1e-7)
    assert out.rejected_rewards.item() == pytest.approx(math.log(0.5), rel=1e-6)
    assert preference_accuracy(out.chosen_rewards, out.rejected_rewards).item() == 1.0


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_an_independent_implementation(average: bool, beta: float) -> None:
    gen = torch.Generator().manual_seed(0)
    n_pairs, T, V = 3, 5, 7
    # rows 0..2 policy chosen, 3..5 policy rejected, 6..8 reference chosen, 9..11 reference rejected
    logits = torch.randn(4 * n_pairs, T, V, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (4 * n_pairs, T), generator=gen)
    mask = torch.rand(4 * n_pairs, T, generator=gen) < 0.6
    mask[:, 0] = True  # responses of different lengths, none empty
    logps = sequence_logprobs(logits, labels, mask, average=average)
    expected_logps = [
        _reference_logp(logits[i].tolist(), labels[i].tolist(), mask[i].tolist(), average)
        for i in range(4 * n_pairs)
    ]
    assert logps.tolist() == pytest.approx(expected_logps, rel=1e-9)
    pc, pr, rc, rr = logps.split(n_pairs)
    out = dpo_loss(pc, pr, rc, rr, beta)
    expected = [
        _reference_dpo(*(expected_logps[k * n_pairs + i] for k in range(4)), beta) for i in range(n_pairs)
    ]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-9)
    # length normalisation changes the loss whenever the lengths differ (they do here)
    other = dpo_loss(*sequence_logprobs(logits, labels, mask, average=not average).split(n_pairs), beta)
    assert not torch.allclose(other.losses, out.losses)


def test_dpo_loss_stays_finite_for_huge_margins() -> None:
    zero = torch.zeros(1)
    out = dpo_loss(zero, torch.tensor([1e4]), zero, zero, beta=1.0)  # the rejected far above the chosen
    assert out.losses.item() == pytest.approx(1e4)


def test_preference_accuracy_on_fixed_logprobs() -> None:
    chosen = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    rejected = torch.tensor([-2.0, -1.0, -3.0, -5.0])
    # above, below, a tie (counts one half), above
    assert preference_accuracy(chosen, rejected).tolist() == [1.0, 0.0, 0.5, 1.0]
    assert preference_accuracy(chosen, rejected).mean().item() == 0.625


def test_response_logprobs_equal_the_dense_computation_on_a_collated_batch() -> None:
    torch.manual_seed(0)
    model = PicoDecoder(MICRO_MODEL).eval()
    from picomaml.align.preferences import PreferencePair

    pairs = [
        PreferencePair(np.array([5, 6, 7]), np.array([8, 9]), np.array([9, 8]), doc_id=0),
        PreferencePair(np.array([1]), np.array([2, 3, 4]), np.array([10]), doc_id=1),
    ]
    batch = collate_pairs(pairs, pad_id=63)
    tokens, mask = batch["tokens"], batch["response_mask"]
    assert tokens.shape == (4, 5)
    # the mask selects exactly the response tokens as labels, chosen rows first
    labels = tokens[:, 1:]
    assert [labels[i][mask[i]].tolist() for i in range(4)] == [[8, 9], [2, 3, 4], [9, 8], [10]]
    with torch.no_grad():
        dense = sequence_logprobs(model(tokens[:, :-1]), labels, mask)
        compact = response_logprobs(model, tokens, mask)
        dense_mean = sequence_logprobs(model(tokens[:, :-1]), labels, mask, average=True)
        compact_mean = response_logprobs(model, tokens, mask, average=True)
    torch.testing.assert_close(compact, dense)
    torch.testing.assert_close(compact_mean, dense_mean)


# --- preference pairs ---------------------------------------------------------------------------------


def _synthetic(cache_dir: Path, val_fraction: float = 0.3) -> PicoDataModule:
    data = PicoDataModule(
        corpus="synthetic",
        corpus_options={"n_docs": 300},
        seq_len=32,
        batch_size=4,
        val_fraction=val_fraction,
        meta_test_fraction=0.0,
        val_batches=1,
        cache_dir=cache_dir,
    )
    data.check()
    return data


def _split_docs(data: PicoDataModule) -> dict[str, dict[int, np.ndarray]]:
    out = {}
    for split in ("train", "val"):
        stream = getattr(data.packed, split).stream
        out[split] = {
            int(stream.doc_ids[k]): np.asarray(stream.document(k)[:-1]) for k in range(stream.n_docs)
        }
    return out


def test_wrong_term_pairs_continue_the_document_and_reject_a_wrong_number(cache_dir: Path) -> None:
    data = _synthetic(cache_dir)
    pairs = build_pairs(data, DPOStage(corruption="wrong_term"))
    docs = _split_docs(data)
    tok = data.tokenizer
    for split, source in (("train", "train"), ("val", "val"), ("test", "val")):
        assert pairs[split], split
        for pair in pairs[split]:
            text = tok.decode(docs[source][pair.doc_id].tolist())
            prompt, chosen, rejected = (
                tok.decode(t.tolist()) for t in (pair.prompt, pair.chosen, pair.rejected)
            )
            assert text.startswith(prompt + chosen)  # the true next term
            assert chosen.startswith(", ") and rejected.startswith(", ")
            true, wrong = int(chosen[2:]), int(rejected[2:])
            assert 7 <= abs(true - wrong) <= 19
            assert len(prompt.split(", ")) >= 3  # min_prompt_terms


@pytest.mark.parametrize("corruption", ["shuffle", "other_doc"])
def test_token_pairs_and_their_splits(cache_dir: Path, corruption: str) -> None:
    data = _synthetic(cache_dir)
    stage = DPOStage(corruption=corruption, prompt_tokens=8, response_tokens=6)
    pairs = build_pairs(data, stage)
    docs = _split_docs(data)
    ids = {split: {p.doc_id for p in pairs[split]} for split in pairs}
    # no document, and no pair, crosses splits: train from train documents, val and test from disjoint
    # halves of the held-out documents
    assert ids["train"] <= set(docs["train"]) and ids["val"] | ids["test"] <= set(docs["val"])
    assert not ids["val"] & ids["test"] and ids["val"] and ids["test"]
    for split, source in (("train", "train"), ("val", "val"), ("test", "val")):
        for pair in pairs[split]:
            doc = docs[source][pair.doc_id]
            np.testing.assert_array_equal(pair.prompt, doc[:8])
            np.testing.assert_array_equal(pair.chosen, doc[8:14])  # the true continuation
            assert not np.array_equal(pair.rejected, pair.chosen)
            if corruption == "shuffle":
                np.testing.assert_array_equal(np.sort(pair.rejected), np.sort(pair.chosen))
            else:  # another document of the same pair split, at the same position
                partners = [
                    d
                    for d in ids[split]
                    if d != pair.doc_id and np.array_equal(docs[source][d][8:14], pair.rejected)
                ]
                assert partners, "the rejected continuation comes from a document of the same split"


def test_pairs_are_seeded(cache_dir: Path) -> None:
    data = _synthetic(cache_dir)

    def summary(seed: int) -> list[tuple]:
        built = build_pairs(data, DPOStage(corruption="wrong_term", pair_seed=seed))
        return [(s, p.doc_id, p.prompt.tolist(), p.rejected.tolist()) for s in built for p in built[s]]

    assert summary(0) == summary(0)
    assert summary(0) != summary(1)


def test_a_split_without_pairs_is_one_clear_error(cache_dir: Path) -> None:
    data = _synthetic(cache_dir)
    with pytest.raises(ValueError, match="stage.prompt_tokens"):
        build_pairs(data, DPOStage(prompt_tokens=500))


def test_the_test_scores_the_best_validations_policy_and_checkpoints_keep_it() -> None:
    torch.manual_seed(0)
    init = PicoDecoder(MICRO_MODEL).state_dict()

    def dpo_module() -> DPOLitModule:
        optim = OptimConfig()
        return DPOLitModule(MICRO_MODEL, optim, init, beta=0.1, monitor="val/dpo_loss", monitor_mode="min")

    module = dpo_module()
    assert module.use_best_policy() == {}  # no validation yet: the policy stays as it is
    snapshots = {}
    for step, loss in ((4, 0.69), (8, 0.41), (12, 0.41), (16, 0.55)):  # the best is the first 0.41
        with torch.no_grad():
            for parameter in module.model.parameters():
                parameter.add_(0.01 * step)
        snapshots[step] = {k: v.clone() for k, v in module.model.state_dict().items()}
        kept = module.best
        module._keep_if_best(loss)
        if module.best is not kept:
            module.best["step"] = step  # no trainer here: global_step stays 0
    checkpoint = {"state_dict": module.state_dict(), "picomaml": {}}
    module.on_save_checkpoint(checkpoint)
    resumed = dpo_module()
    resumed.on_load_checkpoint(checkpoint)
    for candidate in (module, resumed):
        assert candidate.use_best_policy() == {"val/dpo_loss": 0.41} and candidate.scored_step == 8
        for name, value in candidate.model.state_dict().items():
            torch.testing.assert_close(value, snapshots[8][name], rtol=0, atol=0)


# --- config errors ---------------------------------------------------------------------------------------


def test_stage_is_required_and_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"stage is required: stage=sft .* or stage=dpo"):
        prepare_align(compose_align([], tmp_path, tmp_path))
    with pytest.raises(MissingConfigException) as info:
        compose_align(["stage=ppo"], tmp_path, tmp_path)
    assert "stage/ppo" in str(info.value) and info.value.options == ["dpo", "sft"]


def test_missing_ckpt_path_and_bad_stage_values_fail_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ckpt_path is required"):
        prepare_align(compose_align(["stage=sft"], tmp_path / "a", tmp_path))
    with pytest.raises(ConfigError, match=r"ckpt_path=.*no such file"):
        prepare_align(compose_align(["stage=dpo", f"ckpt_path={tmp_path}/none"], tmp_path / "b", tmp_path))
    with pytest.raises(ConfigError, match=r"stage.beta must be > 0"):
        prepare_align(compose_align(["stage=dpo", "stage.beta=-1"], tmp_path / "c", tmp_path))
    with pytest.raises(
        ConfigError, match=r"stage.corruption='flip'; allowed: shuffle, other_doc, wrong_term"
    ):
        prepare_align(compose_align(["stage=dpo", "stage.corruption=flip"], tmp_path / "d", tmp_path))
    with pytest.raises(ConfigError, match=r"stage.monitor='val/loss' is not logged by this stage"):
        prepare_align(compose_align(["stage=dpo", "stage.monitor=val/loss"], tmp_path / "e", tmp_path))
    with pytest.raises(ConfigError, match=r"stage.test_on='first'; allowed: best, last"):
        prepare_align(compose_align(["stage=dpo", "stage.test_on=first"], tmp_path / "f", tmp_path))
    assert not any((tmp_path / d).exists() for d in "abcdef")


def test_the_command_answers_help_and_names_what_is_missing_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PICOMAML_ROOT": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "picomaml.align", *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)

    helped = run("--help")
    assert helped.returncode == 0 and "stage: dpo, sft" in helped.stdout
    for args, message in (((), "stage is required"), (("stage=dpo",), "ckpt_path is required")):
        proc = run(*args)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(f"picomaml: config error: {message}")
    assert not (tmp_path / "outputs" / "align" / "runs" / "stage=dpo").exists()


# --- a tiny real SFT -> DPO run ----------------------------------------------------------------------------

DATA = ["data=synthetic", "data.seq_len=32", "data.batch_size=4", "data.val_fraction=0.2"]
RUN = [
    *(o for o in FAST if not o.startswith(("model=", "data"))),
    *DATA,
    "trainer.log_every_n_steps=2",
    "callbacks.model_checkpoint.hf_export=false",
]


@pytest.mark.slow
def test_sft_then_dpo_end_to_end(tmp_path: Path, cache_dir: Path) -> None:
    # a tiny pretrained checkpoint (picomaml.train)
    base = tmp_path / "base"
    cfg = compose_train(
        [
            *FAST,
            *DATA,
            "trainer.max_steps=30",
            "trainer.val_check_interval=30",
            "~callbacks.learning_dynamics",
            "~callbacks.periodic_eval",
            "callbacks.model_checkpoint.hf_export=false",
        ],
        base,
        cache_dir,
    )
    plan = prepare_run(cfg)
    base.mkdir(parents=True)
    save_training_config(cfg, base)
    plan.trainer.fit(plan.module, datamodule=plan.datamodule)

    # SFT: the AR objective from the checkpoint's weights, a fresh optimizer (step 0)
    sft = tmp_path / "sft"
    result = train(
        compose_align(
            ["stage=sft", f"ckpt_path={base}", *RUN, "trainer.max_steps=6", "trainer.val_check_interval=3"],
            sft,
            cache_dir,
        ),
        prepare=prepare_align,
    )
    assert result["status"] == "completed" and result["global_step"] == 6
    assert result["metric_name"] == "val/loss" and math.isfinite(result["metric"])
    sft_ckpt = read_checkpoint(resolve_checkpoint(sft)[1])
    base_ckpt = read_checkpoint(resolve_checkpoint(base)[1])
    assert sft_ckpt["hyper_parameters"]["model_config"] == base_ckpt["hyper_parameters"]["model_config"]

    # DPO from the SFT run: catch the module to look at its reference after training
    plans = []

    def keep_plan(cfg: DictConfig):
        plans.append(prepare_align(cfg))
        return plans[-1]

    dpo = tmp_path / "dpo"
    result = train(
        compose_align(
            [
                "stage=dpo",
                f"ckpt_path={sft}",
                *RUN,
                "stage.prompt_tokens=8",
                "stage.response_tokens=8",
                "stage.beta=0.5",
                "optim.lr=1e-3",
                "trainer.max_steps=12",
                "trainer.val_check_interval=4",
            ],
            dpo,
            cache_dir,
        ),
        prepare=keep_plan,
    )
    assert result["status"] == "completed"
    module = plans[0].module
    sft_state = {
        k.removeprefix("model."): v for k, v in sft_ckpt["state_dict"].items() if k.startswith("model.")
    }
    # the reference is the SFT model, untouched by training; the policy moved away from it
    for name, value in module.reference.state_dict().items():
        torch.testing.assert_close(value, sft_state[name], rtol=0, atol=0)
    assert all(not p.requires_grad for p in module.reference.parameters())
    assert not module.reference.training
    assert any(not torch.equal(p, sft_state[n]) for n, p in module.model.state_dict().items())
    optimized = {id(p) for group in module.trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in module.reference.parameters()}
    # checkpoints hold the policy alone, loadable as any picomaml run
    dpo_ckpt = read_checkpoint(resolve_checkpoint(dpo)[1])
    assert not any(k.startswith("reference.") for k in dpo_ckpt["state_dict"])
    assert dpo_ckpt["hyper_parameters"]["dpo"] == {"beta": 0.5, "length_normalize": False}

    # before: the step-0 policy is the reference (loss log 2, accuracy 0.5 by ties); after: it learned
    report = json.loads((dpo / "eval_results" / "dpo_test.json").read_text())
    assert report["before"]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert report["before"]["pref_acc"] == 0.5
    assert report["before"]["logp_acc"] == report["before"]["ref_logp_acc"]
    assert report["after"]["pref_acc"] > 0.5 and report["after"]["dpo_loss"] < math.log(2)
    assert report["n_pairs"] == result["metrics"]["test/n_pairs"] > 0
    metrics_csv = (dpo / "csv" / "metrics.csv").read_text()
    for key in ("train/dpo_loss", "val/pref_acc", "val/dpo_loss", "test/pref_acc"):
        assert key in metrics_csv.splitlines()[0]
    # the test scored the policy of the best validation (the first of equal ones, as early stopping
    # counts), and the run returns that validation's accuracy
    validations = [
        (int(row["step"]), float(row["val/pref_acc"]))
        for row in csv.DictReader(metrics_csv.splitlines())
        if row.get("val/pref_acc")
    ]
    best_step, best_acc = max(validations, key=lambda sv: (sv[1], -sv[0]))
    assert [step for step, _ in validations] == [4, 8, 12]
    assert report["step"] == best_step and report["final_step"] == 12
    assert result["metric_name"] == "val/pref_acc" and result["metric"] == pytest.approx(best_acc)

    # a sweep over beta: one DPO job per value, each with its own result
    env = {**os.environ, "PICOMAML_ROOT": str(tmp_path), "PICOMAML_CACHE": str(cache_dir)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "picomaml.align",
            "-m",
            "stage=dpo",
            f"ckpt_path={sft}",
            "stage.beta=0.1,1.0",
            *RUN,
            "stage.prompt_tokens=8",
            "stage.response_tokens=8",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((tmp_path / "outputs" / "align" / "multirun").glob("*/*/[0-9]"))
    assert len(jobs) == 2
    betas = [json.loads((job / "eval_results" / "dpo_test.json").read_text())["beta"] for job in jobs]
    assert betas == [0.1, 1.0]
    assert all(json.loads((job / "result.json").read_text())["status"] == "completed" for job in jobs)
