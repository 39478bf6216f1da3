"""Evaluation: both perplexities by hand, the CLI on a tiny real run, the light version, clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from picomaml.eval.light import evaluate_light
from picomaml.eval.lm import document_batches, evaluate_lm
from picomaml.eval.meta import load_meta_config
from picomaml.evaluate import main
from picomaml.model import PicoDecoder
from picomaml.runs import RunError, load_run
from tests.helpers import MICRO_MODEL

BOS, PAD = 0, 63


def tiny_model() -> PicoDecoder:
    torch.manual_seed(0)
    return PicoDecoder(MICRO_MODEL).eval()


def nll_by_hand(model: PicoDecoder, window: list[int]) -> list[float]:
    """NLL of window[1:] given its prefixes, from one plain forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([window[:-1]]))[0]
    return F.cross_entropy(logits, torch.tensor(window[1:]), reduction="none").tolist()


def test_both_perplexities_match_a_hand_computation() -> None:
    model = tiny_model()
    doc_a, doc_b = [5, 7, 9, BOS], [3, 4, 6, 8, 10, 12, BOS]  # each document ends with eos (= bos id)
    # seq_len 4: doc_b's [bos]+7 tokens is cut into windows [bos 3 4 6 8] and [8 10 12 bos]
    nll_a = nll_by_hand(model, [BOS, *doc_a])
    nll_b = nll_by_hand(model, [BOS, 3, 4, 6, 8]) + nll_by_hand(model, [8, 10, 12, BOS])
    assert len(nll_a) == len(doc_a) and len(nll_b) == len(doc_b)
    token_weighted = math.exp((sum(nll_a) + sum(nll_b)) / (len(nll_a) + len(nll_b)))
    doc_mean = (math.exp(sum(nll_a) / len(nll_a)) + math.exp(sum(nll_b) / len(nll_b))) / 2

    batches = list(
        document_batches([(10, doc_a), (11, doc_b)], seq_len=4, batch_size=2, bos_id=BOS, pad_id=PAD)
    )
    assert [b["tokens"].shape for b in batches] == [(2, 5), (1, 5)]
    result = evaluate_lm(model, batches)
    assert result["ppl_token_weighted"] == pytest.approx(token_weighted, rel=1e-5)
    assert result["ppl_doc_mean"] == pytest.approx(doc_mean, rel=1e-5)
    assert result["n_tokens"] == 11 and result["n_docs"] == 2
    assert result["ppl_doc_mean"] != pytest.approx(result["ppl_token_weighted"], rel=1e-6)
    # top-1 accuracy by hand over the same labels
    with torch.no_grad():
        hits = [
            int(model(torch.tensor([w[:-1]]))[0].argmax(-1)[i] == w[i + 1])
            for w in ([BOS, *doc_a], [BOS, 3, 4, 6, 8], [8, 10, 12, BOS])
            for i in range(len(w) - 1)
        ]
    assert result["top1_acc"] == pytest.approx(sum(hits) / 11)
    assert result["top1_acc"] <= result["top5_acc"] <= 1


def test_cli_writes_results_with_meta_test_accuracy(sweep_dir: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    run = sweep_dir / "1"
    results = main([f"ckpt_path={run}", "meta=5way4shot", "episodes=6", "max_docs=12", "step=2"])
    saved = json.loads((run / "eval_results" / "step_2.json").read_text())
    assert saved["step"] == 2 and saved["checkpoint"].endswith("step_2/checkpoint.ckpt")
    for key in (
        "ppl_token_weighted",
        "ppl_doc_mean",
        "top1_acc",
        "top5_acc",
        "meta_query_acc",
        "meta_query_acc_ci95",
        "meta_no_adapt_acc",
        "meta_no_adapt_acc_ci95",
    ):
        assert math.isfinite(saved[key]), key
    assert saved["n_docs"] == 12 and saved["meta_tasks"] == 6 and saved["meta_chance"] == 0.2
    assert saved["meta_head"].startswith("fresh init")  # an AR-only run has no trained head
    assert 0 <= saved["meta_query_acc"] <= 1
    assert results["ppl_doc_mean"] == saved["ppl_doc_mean"]
    out = capsys.readouterr().out
    assert "ppl_token_weighted" in out and "meta_query_acc" in out


def test_evaluate_light_on_the_datamodule_restores_train_mode(sweep_dir: Path) -> None:  # noqa: F811
    run = load_run(sweep_dir / "1")
    run.model.train()
    module = SimpleNamespace(model=run.model, hparams={})
    datamodule = run.datamodule()
    cfg = load_meta_config("5way4shot")
    rng = torch.get_rng_state()
    results = evaluate_light(module, datamodule, meta_config=cfg, episodes=3)
    assert torch.equal(rng, torch.get_rng_state())
    assert run.model.training
    assert results["n_tokens"] == 2 * 4 * 32  # val_batches x batch_size x seq_len
    assert results["meta_tasks"] == 3 and 0 <= results["meta_query_acc"] <= 1
    assert set(evaluate_light(module, datamodule)) == set(
        evaluate_lm(run.model, datamodule.val_batches_list())
    )


def test_errors_name_the_problem(sweep_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_run(tmp_path / "missing")
    with pytest.raises(RunError, match="is not a picomaml run"):
        load_run(tmp_path)
    with pytest.raises(RunError, match=r"no checkpoint at step 3 .*\(available: 0, 1, 2, 4\)"):
        load_run(sweep_dir / "1", step=3)
    with pytest.raises(RunError, match=r"no checkpoint at step 5"):
        load_run(sweep_dir / "1" / "checkpoints" / "step_5")
    assert load_run(sweep_dir / "0" / "checkpoints" / "step_2").step == 2
    with pytest.raises(
        SystemExit, match="unknown key 'episode'; valid keys: ckpt_path, step, meta, episodes"
    ):
        main([f"ckpt_path={sweep_dir / '1'}", "episode=3"])
    with pytest.raises(SystemExit, match="no checkpoint at step 3"):
        main([f"ckpt_path={sweep_dir / '1'}", "step=3"])
    with pytest.raises(ValueError, match="unknown meta config 'nope'; valid names: .*5way4shot"):
        load_meta_config("nope")
