"""`python -m picomaml.analyze`: every figure from tiny real runs, linear CKA and attention maps checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from picomaml.analyze import main
from picomaml.eval.analysis import attention_probs, linear_cka
from picomaml.model import ModelConfig, PicoDecoder


def test_every_figure_is_written_for_a_sweep(sweep_dir: Path) -> None:  # noqa: F811
    summary = main([f"path={sweep_dir}", "prompt=Kalo mitsu renka dorpel", "layer=1", "head=2"])
    out = sweep_dir / "analysis"
    figures = [
        "loss_curves",
        "ppl_vs_size",
        "cka_0",
        "embedding_pca_0",
        "embedding_pca_1",
        "attention_0",
        "attention_1",
    ]
    for name in figures:
        path = out / f"{name}.png"
        assert path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name}.png)" in summary.read_text()
    text = summary.read_text()
    assert "Not drawn: no meta/*acc* metric logged" in text  # AR-only runs
    assert "Not drawn: needs learning dynamics at 2+ steps" in text  # run 1 has none
    assert "most frequent tokens" in text


def test_a_single_run_and_a_non_run(sweep_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    main([f"path={sweep_dir / '0'}"])
    assert (sweep_dir / "0" / "analysis" / "cka_0.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="is not a picomaml run or sweep"):
        main([f"path={tmp_path}"])


def test_linear_cka_is_invariant_to_rotation_and_scale() -> None:
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    assert linear_cka(x, 3 * x @ rotation) == pytest.approx(1.0)
    assert linear_cka(x, torch.randn(50, 8, generator=torch.Generator().manual_seed(2))) < 0.5


def test_attention_probabilities_reproduce_the_attention_output() -> None:
    torch.manual_seed(0)
    model = PicoDecoder(
        ModelConfig(
            d_model=32,
            n_layers=2,
            attention_n_heads=4,
            attention_n_kv_heads=2,
            activation_hidden_dim=64,
            vocab_size=64,
            max_seq_len=16,
        )
    ).eval()
    ids = torch.randint(0, 64, (1, 10))
    attention = model.layers[1].attention
    seen = {}
    handle = attention.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        model(ids)
    handle.remove()
    probs = torch.stack([attention_probs(model, ids, 1, h)[0] for h in range(4)])  # [H, T, T]
    assert torch.allclose(probs.sum(-1), torch.ones(4, 10)) and torch.all(probs.triu(1) == 0)
    v = attention.v_proj(seen["x"]).view(1, 10, 2, 8)[0].detach()  # [T, K, E]
    heads = torch.stack([probs[h] @ v[:, h // 2] for h in range(4)], dim=1)  # [T, H, E]
    with torch.no_grad():
        rebuilt = attention.o_proj(heads.reshape(1, 10, 32))
    torch.testing.assert_close(rebuilt, seen["out"], rtol=1e-4, atol=1e-5)


def test_a_run_without_metrics_or_checkpoints_is_nothing_to_analyse(tmp_path: Path) -> None:
    (tmp_path / "training_config.yaml").write_text("model: {}\n")
    with pytest.raises(SystemExit, match="nothing to analyse") as exit_info:
        main([f"path={tmp_path}"])
    assert exit_info.value.code == 2
    assert not (tmp_path / "analysis").exists()
