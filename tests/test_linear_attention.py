"""``model.attention=linear`` (issue 13): the three forms of linear attention agree with a naive reference
written here from the formula, nothing leaks from the future, cached decoding equals recomputation, the
softmax default is untouched, export refuses a linear model, and a linear model trains, meta-learns,
resumes, generates and evaluates end to end.

The reference (Katharopoulos et al. 2020, with RoFormer's RoPE placement, Su et al. 2021 eq. 19)::

    out_t = sum_{s<=t} (R_t phi(q_t)) . (R_s phi(k_s)) v_s / sum_{s<=t} phi(q_t) . phi(k_s),  phi = elu + 1
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from picomaml.bench import main as bench_main
from picomaml.config import ConfigError
from picomaml.export import main as export_main
from picomaml.model import KVCache, ModelConfig, PicoDecoder, load_model_config, model_flops_per_token
from picomaml.model.generation import generate
from picomaml.model.hf import export_to_hf
from picomaml.model.pico_decoder import (
    LinearAttention,
    linear_attention_chunkwise,
    linear_attention_recurrent,
    rope_rotations,
)
from picomaml.runs import check_architecture
from picomaml.train import prepare_run, train
from tests.helpers import compose_train, tiny_overrides, write_word_corpus


def small_config(attention: str, **overrides: object) -> ModelConfig:
    """6 query heads sharing 2 kv heads (GQA groups of 3), head_dim 8, a small vocabulary."""
    values = dict(
        d_model=48,
        n_layers=2,
        attention_n_heads=6,
        attention_n_kv_heads=2,
        activation_hidden_dim=96,
        vocab_size=97,
        max_seq_len=400,
        attention=attention,
    )
    return ModelConfig(**{**values, **overrides})


def small_model(attention: str, seed: int = 0) -> PicoDecoder:
    torch.manual_seed(seed)
    model = PicoDecoder(small_config(attention)).eval()
    # GPT-2 init gives tiny q/k (phi ~ 1 everywhere): scale them up so the weights differ by position
    # and a wrong mask or rotation shows
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.q_proj.weight.mul_(40)
            layer.attention.k_proj.weight.mul_(40)
            layer.attention.o_proj.weight.mul_(20)  # outputs of order 0.1-1, so tolerances mean something
    return model


def naive_linear_attention(attention: LinearAttention, x: torch.Tensor, theta: float) -> torch.Tensor:
    """The formula above, in float64, with an explicit [T, T] weight matrix per head and RoPE written in
    real arithmetic (interleaved pairs (2j, 2j+1) rotated by pos * theta^(-2j/E))."""
    B, T, _ = x.shape
    H, K, E = attention.n_heads, attention.n_kv_heads, attention.head_dim
    q = attention.q_proj(x).double().view(B, T, H, E)
    k = attention.k_proj(x).double().view(B, T, K, E)
    v = attention.v_proj(x).double().view(B, T, K, E)
    phi_q = torch.where(q > 0, q + 1, torch.exp(q))  # elu(x) + 1
    phi_k = torch.where(k > 0, k + 1, torch.exp(k))

    def rotate(t: torch.Tensor) -> torch.Tensor:
        freq = theta ** (-torch.arange(0, E, 2, dtype=torch.float64) / E)  # [E/2]
        angle = torch.arange(T, dtype=torch.float64)[:, None] * freq  # [T, E/2]
        cos, sin = torch.cos(angle)[:, None], torch.sin(angle)[:, None]  # [T, 1, E/2]
        a, b = t[..., 0::2], t[..., 1::2]
        out = torch.empty_like(t)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    rot_q, rot_k = rotate(phi_q), rotate(phi_k)
    out = torch.zeros(B, T, H, E, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // K)  # the kv head this query head reads
            for t in range(T):
                numerator = sum((rot_q[b, t, h] @ rot_k[b, s, g]) * v[b, s, g] for s in range(t + 1))
                denominator = sum(phi_q[b, t, h] @ phi_k[b, s, g] for s in range(t + 1))
                out[b, t, h] = numerator / denominator
    return attention.o_proj(out.reshape(B, T, H * E).float())


def test_chunkwise_equals_recurrent_equals_naive_reference() -> None:
    model = small_model("linear")
    config = model.config
    attention = model.layers[0].attention
    torch.manual_seed(1)
    T = 75  # five chunks of 16 (head_dim 8), the last one padded
    x = torch.randn(2, T, config.d_model)
    rope = rope_rotations(config.head_dim, config.position_emb_theta, 0, T, x.device)
    with torch.no_grad():
        reference = naive_linear_attention(attention, x, config.position_emb_theta)
        chunkwise = attention(x, rope)
        cache = KVCache(config, batch_size=2)
        recurrent = torch.cat(
            [attention(x[:, t : t + 1], rope[t : t + 1], cache, start_pos=t) for t in range(T)], dim=1
        )
    assert reference.abs().max() > 0.1  # not a vacuous comparison of zeros
    torch.testing.assert_close(chunkwise, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(recurrent, reference, rtol=1e-4, atol=1e-5)


def test_chunkwise_form_carries_state_across_any_chunk_length() -> None:
    """The functions themselves: chunk lengths 1, 7, 64 and a nonzero starting state give the
    token-by-token recurrence's outputs and final state."""
    torch.manual_seed(2)
    B, K, G, T, E = 2, 2, 3, 50, 8
    qf, kf = torch.rand(B, K, G, T, E) + 0.1, torch.rand(B, K, 1, T, E) + 0.1
    qr, kr, v = torch.randn(B, K, G, T, E), torch.randn(B, K, 1, T, E), torch.randn(B, K, 1, T, E)
    state, normaliser = torch.randn(B, K, 1, E, E), torch.rand(B, K, 1, E) + 1
    want, want_state, want_norm = linear_attention_recurrent(qf, qr, kf, kr, v, state, normaliser)
    for chunk in (1, 7, 64):
        got, got_state, got_norm = linear_attention_chunkwise(qf, qr, kf, kr, v, state, normaliser, chunk)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_state, want_state)
        torch.testing.assert_close(got_norm, want_norm)


@pytest.mark.parametrize("attention", ["softmax", "linear"])
@pytest.mark.parametrize("t", [10, 70, 140])
def test_no_future_token_leaks(attention: str, t: int) -> None:
    """Changing token t changes no logit before t (and does change the logits at t)."""
    model = small_model(attention)
    torch.manual_seed(3)
    ids = torch.randint(0, 97, (2, 150))
    changed = ids.clone()
    changed[:, t] = (ids[:, t] + 1) % 97
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-3


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_attention_weights_are_the_layers_causal_map(attention: str) -> None:
    """``o_proj(weights @ v)`` is the layer's output, nothing sits above the diagonal, and the rows
    sum to one (softmax always; linear attention without rotation, where its weights are
    phi(q_t).phi(k_s) / sum_s' phi(q_t).phi(k_s'))."""
    model = small_model(attention)
    layer = model.layers[1]
    torch.manual_seed(4)
    B, T = 2, 90
    x = layer.attention_norm(torch.randn(B, T, 48))
    rope = rope_rotations(8, 10000.0, 0, T, x.device)
    with torch.no_grad():
        weights = layer.attention.attention_weights(x, rope)  # [B, H, T, T]
        v = layer.attention.v_proj(x).view(B, T, 2, 8).transpose(1, 2).repeat_interleave(3, dim=1)
        out = layer.attention.o_proj((weights @ v).transpose(1, 2).reshape(B, T, 48))
        torch.testing.assert_close(out, layer.attention(x, rope), rtol=1e-4, atol=1e-6)
        assert weights.shape == (B, 6, T, T)
        assert (weights.triu(1) == 0).all()
        unrotated = layer.attention.attention_weights(x, torch.ones_like(rope))
    torch.testing.assert_close(unrotated.sum(-1), torch.ones(B, 6, T), rtol=1e-5, atol=1e-5)


def test_cache_decode_equals_full_recomputation() -> None:
    """A prompt chunk, then odd chunk lengths and single tokens, give the full sequence's logits."""
    model = small_model("linear")
    torch.manual_seed(5)
    ids = torch.randint(0, 97, (3, 160))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, batch_size=3)
        parts, pos = [], 0
        for length in (37, 1, 1, 5, 1, 13, 67, 1, 1):  # 67 crosses a chunk boundary mid-sequence
            parts.append(model(ids[:, pos : pos + length], kv_cache=cache, start_pos=pos))
            pos += length
    assert pos == 127
    torch.testing.assert_close(torch.cat(parts, dim=1), full[:, :pos], rtol=1e-4, atol=1e-5)
    # the state is fp32 [B, K, E, E] per layer, whatever the context length
    assert cache.states[0].shape == (3, 2, 8, 8) and cache.states[0].dtype == torch.float32
    assert cache.keys == []


def test_generate_with_cache_equals_without() -> None:
    model = small_model("linear")
    prompt = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(6))
    for temperature in (0.0, 1.0):
        cached = generate(model, prompt, max_new_tokens=20, temperature=temperature, seed=1)
        recomputed = generate(
            model, prompt, max_new_tokens=20, temperature=temperature, seed=1, use_cache=False
        )
        assert torch.equal(cached, recomputed)


def test_linear_state_cannot_rewind() -> None:
    model = small_model("linear")
    ids = torch.randint(0, 97, (1, 20))
    cache = KVCache(model.config, batch_size=1)
    with torch.no_grad():
        model(ids[:, :10], kv_cache=cache, start_pos=0)
        with pytest.raises(ValueError, match="summarises 10 positions and cannot rewind"):
            model(ids[:, 5:8], kv_cache=cache, start_pos=5)
        # restarting at 0 is allowed and forgets the old state
        again = model(ids[:, :4], kv_cache=cache, start_pos=0)
        torch.testing.assert_close(again, model(ids[:, :4]))


def test_linear_attention_under_bf16_autocast_keeps_an_fp32_state() -> None:
    model = small_model("linear")
    ids = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cache = KVCache(model.config, batch_size=2)
            low = model(ids, kv_cache=cache, start_pos=0)
    assert cache.states[0].dtype == torch.float32 and cache.normalisers[0].dtype == torch.float32
    assert (low - reference).abs().max() < 0.05 * reference.abs().max()


def pico_names(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """pico-train's state_dict names and shapes (DESIGN.md section 4), written out independently."""
    d, f, e = config.d_model, config.activation_hidden_dim, config.head_dim
    h, k = config.attention_n_heads, config.attention_n_kv_heads
    names = {"embedding_proj.weight": (config.vocab_size, d), "output_norm.weight": (d,)}
    names["de_embedding_proj.weight"] = (config.vocab_size, d)
    for i in range(config.n_layers):
        p = f"layers.{i}."
        names |= {
            p + "attention_norm.weight": (d,),
            p + "attention.q_proj.weight": (h * e, d),
            p + "attention.k_proj.weight": (k * e, d),
            p + "attention.v_proj.weight": (k * e, d),
            p + "attention.o_proj.weight": (d, h * e),
            p + "swiglu_norm.weight": (d,),
            p + "swiglu.w_0.weight": (f, d),
            p + "swiglu.w_1.weight": (f, d),
            p + "swiglu.w_2.weight": (d, f),
        }
    return names


@pytest.mark.parametrize("preset", ["11m", "tiny"])
def test_presets_keep_softmax_and_pico_state_dicts(preset: str) -> None:
    config = load_model_config(preset)
    assert config.attention == "softmax"
    with torch.device("meta"):
        softmax, linear = PicoDecoder(config), PicoDecoder(dataclasses.replace(config, attention="linear"))
    expected = pico_names(config)
    for model in (softmax, linear):
        assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == expected
    assert type(softmax.layers[0].attention).__name__ == "Attention"
    assert isinstance(linear.layers[0].attention, LinearAttention)
    # a pico-style state_dict (names above, no picomaml extras) loads strictly into the softmax model
    state = {n: torch.randn(s) for n, s in expected.items()} if preset == "tiny" else None
    if state is not None:
        model = PicoDecoder(config)
        model.load_state_dict(state, strict=True)
        torch.testing.assert_close(
            model.layers[1].attention.k_proj.weight, state["layers.1.attention.k_proj.weight"]
        )


def test_bad_attention_names_the_allowed_values(tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"model.attention='bogus': allowed values: softmax, linear"):
        small_config("bogus")
    cfg = compose_train(["model=tiny", "data=synthetic", "model.attention=bogus"], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match=r"model.attention='bogus': allowed values: softmax, linear"):
        prepare_run(cfg)


def test_checkpoints_from_before_the_key_resume_as_softmax(tmp_path: Path) -> None:
    """A checkpoint saved before ``model.attention`` existed is a softmax model, not another architecture."""
    config = small_config("softmax")
    saved = {k: v for k, v in dataclasses.asdict(config).items() if k != "attention"}
    path = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": {"model_config": saved}, "state_dict": {}, "global_step": 3}, path)
    assert check_architecture(path, config) == 3
    with pytest.raises(ConfigError, match="model.attention: checkpoint softmax vs config linear"):
        check_architecture(path, small_config("linear"))


def test_export_of_a_linear_model_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.attention=linear cannot be exported") as err:
        export_to_hf(small_model("linear"), tmp_path / "hf")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "hf").exists()


def test_linear_flops_do_not_grow_with_the_context() -> None:
    config = small_config("linear")
    per_layer = 6 * (6 + 2) * 8**2  # read and update of the [E, E] state, forward and backward
    assert model_flops_per_token(config, 8192) == model_flops_per_token(config, 16)
    assert model_flops_per_token(config, 16) - model_flops_per_token(small_config("softmax"), 16) == (
        2 * per_layer - 12 * 2 * 48 * 16
    )


@pytest.mark.slow
def test_linear_model_trains_meta_learns_resumes_generates_and_evaluates(
    tmp_path: Path, cache_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """Hybrid AR + MAML training of a linear model with checkpoints and learning dynamics, resumed from
    its last checkpoint; then generate (cache == recomputation), evaluate (perplexity and meta-test) and
    export (refused in one line) on the run dir."""
    from picomaml.evaluate import main as evaluate_main
    from picomaml.runs import load_run, resume_checkpoint

    corpus = write_word_corpus(tmp_path / "words.jsonl")
    overrides = [o for o in tiny_overrides(corpus) if o != "~callbacks.learning_dynamics"] + [
        "model.attention=linear",
        "meta=5way4shot",
        "meta.hybrid_ratio=0.5",
        "meta.hybrid_mode=sum",  # both losses at every step
        "meta.window_len=32",
        "meta.tasks_per_step=1",
        "trainer.max_steps=2",
        "callbacks.learning_dynamics.val_batch_size=2",
        "~callbacks.periodic_eval",  # evaluate runs below
    ]
    run_dir = tmp_path / "run"
    result = train(compose_train(overrides, run_dir, cache_dir))
    assert result["status"] == "completed" and result["global_step"] == 2
    step_dir = run_dir / "checkpoints" / "step_2"
    assert (step_dir / "checkpoint.ckpt").is_file() and not (step_dir / "model.safetensors").exists()
    dynamics = torch.load(step_dir / "learning_dynamics" / "train_activations.pt", weights_only=True)
    assert any(name.endswith("attention.v_proj") for name in dynamics)
    metrics = (run_dir / "csv" / "metrics.csv").read_text()
    assert "train/loss_meta" in metrics and "train/loss_ar" in metrics

    # the same command with two more steps resumes from last.ckpt
    assert resume_checkpoint(None, run_dir) == run_dir / "checkpoints" / "last.ckpt"
    resumed = [o for o in overrides if o != "trainer.max_steps=2"] + ["trainer.max_steps=4"]
    assert train(compose_train(resumed, run_dir, cache_dir))["global_step"] == 4

    run = load_run(str(run_dir), None)
    assert run.model_config.attention == "linear" and run.step == 4
    prompt = torch.randint(0, 50257, (1, 7), generator=torch.Generator().manual_seed(0))
    cached = generate(run.model, prompt, max_new_tokens=12)
    assert torch.equal(cached, generate(run.model, prompt, max_new_tokens=12, use_cache=False))

    results = evaluate_main([f"ckpt_path={run_dir}", "meta=5way4shot", "episodes=3", "max_docs=8"])
    assert math.isfinite(results["ppl_token_weighted"]) and results["step"] == 4
    assert 0 <= results["meta_query_acc"] <= 1 and not results["meta_head"].startswith("fresh init")

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        export_main([f"ckpt_path={run_dir}", f"out={tmp_path / 'hf'}", "tokenizer=none"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.attention=linear cannot be exported") and "\n" not in err


@pytest.mark.slow
def test_bench_compares_attention_kinds(tmp_path: Path) -> None:
    out = tmp_path / "attention.json"
    result = bench_main(
        ["train", "model=tiny", "batch_size=1", "attention=softmax,linear", "seq_len=16"]
        + ["steps=1", "warmup=1", "threads=1", "peak_n=64", f"out={out}"]
    )
    assert [(r["attention"], r["seq_len"]) for r in result["runs"]] == [("softmax", 16), ("linear", 16)]
    (row,) = result["comparison"]
    assert row["linear_over_softmax_tokens_per_s"] == pytest.approx(
        row["linear_tokens_per_s"] / row["softmax_tokens_per_s"]
    )
    assert row["softmax_peak_memory_mb"] > 0 and row["linear_peak_memory_mb"] > 0
    assert out.is_file()
