"""Export a pico-decoder as a plain Hugging Face ``LlamaForCausalLM`` directory, and load one back.

The architectures are the same except for RoPE's layout: pico rotates interleaved pairs
(elements 2i, 2i+1 of a head), Llama rotates halves (elements i, i + E/2). Reordering the rows of
``q_proj`` and ``k_proj`` within each head (evens first, then odds) turns one into the other; attention
scores only depend on q.k, which is invariant to applying the same permutation to q and k, and the
values are untouched, so logits match.

``python -m picomaml.export`` is the command-line front of this module.

Only softmax attention has a Llama counterpart: a ``model.attention=linear`` model is refused with one
line (:func:`check_exportable`) rather than written as a Llama that would compute something else. Its
checkpoints (``checkpoint.ckpt``) are the way to share it; every picomaml tool reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from picomaml.model.pico_decoder import ModelConfig, PicoDecoder

# pico name (per layer, after "layers.{i}.") -> Llama name (after "model.layers.{i}.")
_LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.q_proj.weight": "self_attn.q_proj.weight",
    "attention.k_proj.weight": "self_attn.k_proj.weight",
    "attention.v_proj.weight": "self_attn.v_proj.weight",
    "attention.o_proj.weight": "self_attn.o_proj.weight",
    "swiglu_norm.weight": "post_attention_layernorm.weight",
    "swiglu.w_0.weight": "mlp.gate_proj.weight",
    "swiglu.w_1.weight": "mlp.up_proj.weight",
    "swiglu.w_2.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "embedding_proj.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "de_embedding_proj.weight": "lm_head.weight",
}


def _rope_rows(weight: torch.Tensor, head_dim: int, to_half: bool) -> torch.Tensor:
    """Reorder the output rows of a q/k projection [heads * E, D] within each head.

    ``to_half``: interleaved (pico) -> half-rotation (Llama), i.e. new row j of a head is old row
    ``perm[j]`` with perm = [0, 2, 4, ..., 1, 3, 5, ...]; otherwise the inverse.
    """
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    if not to_half:
        perm = torch.argsort(perm)
    heads = weight.view(-1, head_dim, weight.shape[-1])
    return heads[:, perm].reshape(weight.shape).contiguous()


def llama_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A pico-decoder ``state_dict`` (pico's names, no prefix) under ``LlamaForCausalLM``'s names."""
    out = {}
    for name, tensor in state.items():
        if name in _GLOBAL_NAMES:
            out[_GLOBAL_NAMES[name]] = tensor.detach().contiguous()
            continue
        _, idx, rest = name.split(".", 2)
        if rest in ("attention.q_proj.weight", "attention.k_proj.weight"):
            tensor = _rope_rows(tensor, config.head_dim, to_half=True)
        out[f"model.layers.{idx}.{_LAYER_NAMES[rest]}"] = tensor.detach().contiguous()
    return out


def llama_config(config: ModelConfig, dtype: torch.dtype = torch.float32, tokenizer=None) -> dict:
    """The ``config.json`` of the exported ``LlamaForCausalLM``."""
    special = {}
    if tokenizer is not None:
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.d_model,
        "intermediate_size": config.activation_hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.attention_n_heads,
        "num_key_value_heads": config.attention_n_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.position_emb_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.position_emb_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "dtype": str(dtype).removeprefix("torch."),
        **special,
    }


def export_to_hf(model: PicoDecoder, out_dir: str | Path, tokenizer=None) -> Path:
    """Write ``config.json``, ``model.safetensors`` (and the tokenizer's files when given) to ``out_dir``.

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` then loads it without ``trust_remote_code``.
    Weights keep the model's dtype.
    """
    return export_state_to_hf(model.state_dict(), model.config, out_dir, tokenizer)


def check_exportable(config: ModelConfig) -> None:
    """Raise ValueError (one line) unless ``config`` has an exact ``LlamaForCausalLM`` counterpart."""
    if config.attention != "softmax":
        raise ValueError(
            f"model.attention={config.attention} cannot be exported: LlamaForCausalLM has softmax attention "
            "only, so the export would compute a different model; share its checkpoint.ckpt instead"
        )


def export_state_to_hf(
    state: dict[str, torch.Tensor], config: ModelConfig, out_dir: str | Path, tokenizer=None
) -> Path:
    """:func:`export_to_hf` from a pico-decoder ``state_dict`` (e.g. a checkpoint's, without a model)."""
    check_exportable(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = state["embedding_proj.weight"].dtype
    weights = {k: v.cpu() for k, v in llama_state_dict(state, config).items()}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(llama_config(config, dtype, tokenizer), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def load_from_hf(hf_dir: str | Path) -> PicoDecoder:
    """Inverse of :func:`export_to_hf`: a ``LlamaForCausalLM`` directory -> :class:`PicoDecoder`."""
    hf_dir = Path(hf_dir)
    hf = json.loads((hf_dir / "config.json").read_text())
    theta = hf.get("rope_parameters", {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    config = ModelConfig(
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        attention_n_heads=hf["num_attention_heads"],
        attention_n_kv_heads=hf["num_key_value_heads"],
        activation_hidden_dim=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_seq_len=hf["max_position_embeddings"],
        norm_eps=hf["rms_norm_eps"],
        position_emb_theta=float(theta),
    )
    llama = load_file(hf_dir / "model.safetensors")
    from_llama = {v: k for k, v in _GLOBAL_NAMES.items()}
    from_layer = {v: k for k, v in _LAYER_NAMES.items()}
    state = {}
    for name, tensor in llama.items():
        if name in from_llama:
            state[from_llama[name]] = tensor
            continue
        _, _, idx, rest = name.split(".", 3)
        pico_name = from_layer[rest]
        if pico_name in ("attention.q_proj.weight", "attention.k_proj.weight"):
            tensor = _rope_rows(tensor, config.head_dim, to_half=False)
        state[f"layers.{idx}.{pico_name}"] = tensor
    with torch.device("meta"):
        model = PicoDecoder(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model
