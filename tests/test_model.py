"""pico-decoder: sizes, pico-train compatibility, causality, RoPE form, KV cache, chunked loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from picomaml.model import (
    KVCache,
    ModelConfig,
    PicoDecoder,
    load_model_config,
    model_flops_per_token,
    pico_decoder,
)


@pytest.fixture(scope="module")
def tiny() -> PicoDecoder:
    torch.manual_seed(0)
    model = PicoDecoder(load_model_config("tiny")).eval()
    with torch.no_grad():  # non-trivial norms so a mix-up between norms would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50304, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "name, expected",
    [("11m", 11_282_784), ("65m", 64_595_328), ("181m", 181_095_168), ("570m", 569_808_384)],
)
def test_preset_parameter_counts(name: str, expected: int) -> None:
    with torch.device("meta"):
        model = PicoDecoder(load_model_config(name))
    assert model.num_parameters() == expected
    config = model.config
    assert (config.n_layers, config.attention_n_heads, config.attention_n_kv_heads) == (12, 12, 4)
    assert (config.vocab_size, config.max_seq_len, config.activation_hidden_dim) == (
        50304,
        2048,
        4 * config.d_model,
    )


def _pico_state_dict_keys(n_layers: int) -> list[str]:
    keys = ["embedding_proj.weight"]
    for i in range(n_layers):
        keys += [f"layers.{i}.attention_norm.weight"]
        keys += [f"layers.{i}.attention.{p}_proj.weight" for p in "qkvo"]
        keys += [f"layers.{i}.swiglu_norm.weight"]
        keys += [f"layers.{i}.swiglu.w_{j}.weight" for j in range(3)]
    return keys + ["output_norm.weight", "de_embedding_proj.weight"]


def test_state_dict_uses_pico_names_and_loads_strict(tiny: PicoDecoder) -> None:
    state = tiny.state_dict()
    assert sorted(state) == sorted(_pico_state_dict_keys(tiny.config.n_layers))
    pico_state = {k: torch.randn_like(v) for k, v in state.items()}  # as if from a pico checkpoint
    other = PicoDecoder(tiny.config)
    other.load_state_dict(pico_state, strict=True)
    assert torch.equal(other.layers[1].swiglu.w_2.weight, pico_state["layers.1.swiglu.w_2.weight"])


def test_causal(tiny: PicoDecoder) -> None:
    x = _tokens(2, 24)
    y = x.clone()
    y[:, 15:] = _tokens(2, 9, seed=1)
    with torch.no_grad():
        a, b = tiny(x), tiny(y)
    assert a.dtype == torch.float32 and a.shape == (2, 24, 50304)
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_rope_rotates_interleaved_pairs() -> None:
    head_dim, theta, start, length = 8, 10000.0, 3, 5
    x = torch.randn(2, length, 3, head_dim)
    ours = pico_decoder.apply_rope(x, pico_decoder.rope_rotations(head_dim, theta, start, length, x.device))
    # Reference in real arithmetic, float64: pair j = elements (2j, 2j+1) turns by pos * theta^(-2j/E).
    freqs = theta ** (-torch.arange(0, head_dim, 2).double() / head_dim)
    angles = torch.arange(start, start + length).double()[:, None, None] * freqs  # [T, 1, E/2]
    a, b = x.double()[..., 0::2], x.double()[..., 1::2]
    reference = torch.empty_like(x, dtype=torch.float64)
    reference[..., 0::2] = a * angles.cos() - b * angles.sin()
    reference[..., 1::2] = a * angles.sin() + b * angles.cos()
    torch.testing.assert_close(ours.double(), reference, rtol=0, atol=1e-5)


def test_kv_cache_matches_full_recomputation(tiny: PicoDecoder) -> None:
    x = _tokens(2, 12)
    with torch.no_grad():
        full = tiny(x)
        cache = KVCache(tiny.config, batch_size=2, max_len=12)
        steps = [tiny(x[:, t : t + 1], kv_cache=cache, start_pos=t) for t in range(12)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-4)
        # a prompt chunk, then a multi-token chunk at start_pos > 0 (needs the offset mask), then singles
        cache = KVCache(tiny.config, batch_size=2)
        chunks = [tiny(x[:, :5], kv_cache=cache, start_pos=0), tiny(x[:, 5:9], kv_cache=cache, start_pos=5)]
        chunks += [tiny(x[:, t : t + 1], kv_cache=cache, start_pos=t) for t in range(9, 12)]
        torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=0, atol=1e-4)


def test_two_sizes_in_one_process(tiny: PicoDecoder) -> None:
    other = PicoDecoder(load_model_config("tiny", d_model=64, attention_n_heads=4, attention_n_kv_heads=2))
    x = _tokens(1, 10)
    with torch.no_grad():
        a, b, a_again = tiny(x), other(x), tiny(x)
    assert a.shape == b.shape == (1, 10, 50304)
    torch.testing.assert_close(a, a_again)
    assert other.hidden_states(x).shape == (1, 10, 64)


def test_hidden_states_are_output_norm(tiny: PicoDecoder) -> None:
    x = _tokens(2, 7)
    with torch.no_grad():
        hidden = tiny.hidden_states(x)
        torch.testing.assert_close(tiny.de_embedding_proj(hidden), tiny(x))
    assert hidden.shape == (2, 7, tiny.config.d_model)


@pytest.mark.parametrize("chunk", [5, 1024])
def test_lm_loss_matches_cross_entropy(
    tiny: PicoDecoder, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pico_decoder, "_LOSS_CHUNK_TOKENS", chunk)
    x = _tokens(2, 16)
    labels = _tokens(2, 16, seed=3)
    labels[0, :4] = -100
    labels[1, -1] = -100

    ours = tiny.lm_loss(x, labels)
    ours_grads = torch.autograd.grad(ours, list(tiny.parameters()))
    reference = F.cross_entropy(tiny(x).flatten(0, 1), labels.flatten(), ignore_index=-100)
    reference_grads = torch.autograd.grad(reference, list(tiny.parameters()))

    assert ours.dtype == torch.float32 and ours.ndim == 0
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for g, r in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_lm_loss_without_grad_mode(tiny: PicoDecoder) -> None:
    x, labels = _tokens(2, 8), _tokens(2, 8, seed=5)
    with torch.no_grad():
        ours = tiny.lm_loss(x, labels)
        reference = F.cross_entropy(tiny(x).flatten(0, 1), labels.flatten())
    assert not ours.requires_grad
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_lm_loss_under_bf16_autocast(tiny: PicoDecoder) -> None:
    x, labels = _tokens(1, 8), _tokens(1, 8, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = tiny.lm_loss(x, labels)
        reference = F.cross_entropy(tiny(x).flatten(0, 1), labels.flatten())
    ours.backward()
    assert ours.dtype == torch.float32
    assert tiny.de_embedding_proj.weight.grad.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=2e-2, atol=2e-2)
    tiny.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "overrides, names",
    [
        ({"attention_n_heads": 5}, ["attention_n_heads", "d_model"]),
        (
            {"d_model": 36, "attention_n_heads": 12, "attention_n_kv_heads": 4},
            ["attention_n_heads", "head_dim"],
        ),
        ({"attention_n_kv_heads": 4}, ["attention_n_kv_heads", "[1, 2, 3, 6]"]),
        ({"vocab_size": 0}, ["vocab_size"]),
        ({"norm_eps": -1.0}, ["norm_eps"]),
    ],
)
def test_bad_config_raises_naming_the_key(overrides: dict, names: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        load_model_config("tiny", **overrides)
    for name in names:
        assert name in str(err.value)


def test_unknown_preset_and_key_raise_with_valid_names() -> None:
    with pytest.raises(ValueError, match="11m.*65m") as err:
        load_model_config("12m")
    assert "tiny" in str(err.value) and "12m" in str(err.value)
    with pytest.raises(ValueError, match="d_model"):
        load_model_config("tiny", d_modle=3)
    with pytest.raises(TypeError):
        ModelConfig(d_model=48)  # activation_hidden_dim has no default


def test_flops_per_token_11m() -> None:
    config = load_model_config("11m")
    # 12 layers x (attention 24,576 + swiglu 110,592) + de-embedding 4,829,184 = 6,451,200 matmul weights
    assert model_flops_per_token(config, 512) == 6 * 6_451_200 + 12 * 12 * 96 * 512
