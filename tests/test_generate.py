"""Generation: the KV-cached path equals full recomputation, sampling is seeded, long prompts are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from picomaml.generate import main
from picomaml.model import ModelConfig, PicoDecoder
from picomaml.model.generation import generate, sample_next


@pytest.fixture(scope="module")
def model() -> PicoDecoder:
    torch.manual_seed(0)
    config = ModelConfig(
        d_model=32,
        n_layers=2,
        attention_n_heads=4,
        attention_n_kv_heads=2,
        activation_hidden_dim=64,
        vocab_size=128,
        max_seq_len=48,
    )
    return PicoDecoder(config).eval()


def test_kv_cached_greedy_decoding_equals_full_recomputation(model: PicoDecoder) -> None:
    prompt = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    cached = generate(model, prompt, max_new_tokens=20, use_cache=True)
    full = generate(model, prompt, max_new_tokens=20, use_cache=False)
    assert cached.shape == (2, 27)
    assert torch.equal(cached[:, :7], prompt)
    assert torch.equal(cached, full)
    # and greedy means: each new token is the argmax of the full forward over what precedes it
    with torch.no_grad():
        assert torch.equal(model(cached[:, :-1]).argmax(-1)[:, 6:], cached[:, 7:])


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(model: PicoDecoder) -> None:
    prompt = torch.tensor([[1, 2, 3]])
    rng = torch.get_rng_state()
    runs = [generate(model, prompt, 20, temperature=1.5, top_k=50, top_p=0.9, seed=s) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    assert torch.equal(rng, torch.get_rng_state())
    cached = generate(model, prompt, 20, temperature=1.5, seed=3)
    assert torch.equal(cached, generate(model, prompt, 20, temperature=1.5, seed=3, use_cache=False))


def test_top_k_and_top_p_cut_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = lambda **kw: {
        int(sample_next(logits, 1.0, generator=torch.Generator().manual_seed(s), **kw)) for s in range(200)
    }
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.75) == {0, 1}  # 0.5 < 0.75, 0.5 + 0.3 reaches it
    assert draws(top_p=0.1) == {0}
    assert draws() == {0, 1, 2, 3}


def test_a_prompt_longer_than_the_context_is_refused(model: PicoDecoder) -> None:
    with pytest.raises(
        ValueError, match=r"prompt of 40 tokens is too long: .* at most 28 tokens .*max_seq_len=48"
    ):
        generate(model, torch.zeros(1, 40, dtype=torch.long), max_new_tokens=20)


def test_cli_generates_from_a_run(sweep_dir: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    text = main(
        [f"ckpt_path={sweep_dir / '1'}", "prompt=Kalo mitsu", "max_new_tokens=5", "stop_at_eos=false"]
    )
    assert text.startswith("Kalo mitsu") and len(text) > len("Kalo mitsu")
    assert text in capsys.readouterr().out
    with pytest.raises(SystemExit, match="prompt of .* tokens is too long"):
        main([f"ckpt_path={sweep_dir / '1'}", "prompt=kalo " * 200, "max_new_tokens=5"])
