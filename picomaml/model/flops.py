"""Model FLOPs accounting, shared by the benchmark and the training loop's logging.

PaLM-style (Chowdhery et al. 2022, appendix B) training FLOPs per token::

    6 * N_matmul + 12 * n_layers * d_model * seq_len

* ``N_matmul``: parameters that take part in a matmul, i.e. every linear weight including
  ``de_embedding_proj`` (the vocabulary projection is a real [D, V] matmul), but not the embedding
  lookup (a gather) nor the norm weights (elementwise). 6 = 2 (multiply-add) x 3 (forward, backward
  w.r.t. activations, backward w.r.t. weights).
* ``12 * n_layers * d_model * seq_len``: attention scores and the weighted sum of values, forward and
  backward, counted over the full T x T square (the PaLM convention; a causal kernel does half the
  work, so MFU is comparable with published numbers rather than an upper bound of the hardware's use).
  ``d_model`` = n_heads * head_dim, so GQA does not change this term.

Elementwise work (norms, RoPE, SiLU, softmax) is not counted, as in the PaLM and Chinchilla formulas.

``model.attention=linear`` replaces the attention term by its recurrent form's matmuls, independent of
``seq_len``: per layer and token, each query head reads the [E, E] state (2 E^2 multiply-adds) and each
kv head adds its key-value outer product to it (2 E^2), times 3 for training:
``6 * n_layers * (n_heads + n_kv_heads) * head_dim^2``. The chunkwise training form does more (its
intra-chunk [C, C] products), as a causal softmax kernel does less than the PaLM square: model FLOPs
count the model's function, not one implementation of it.
"""

from __future__ import annotations

from picomaml.model.pico_decoder import ModelConfig


def matmul_params(config: ModelConfig) -> int:
    """Linear-layer weights: attention q/k/v/o and SwiGLU w_0/w_1/w_2 of every layer, plus the
    de-embedding projection."""
    d, f, e = config.d_model, config.activation_hidden_dim, config.head_dim
    attention = 2 * d * config.attention_n_heads * e + 2 * d * config.attention_n_kv_heads * e
    swiglu = 3 * d * f
    return config.n_layers * (attention + swiglu) + d * config.vocab_size


def model_flops_per_token(config: ModelConfig, seq_len: int, training: bool = True) -> int:
    """Model FLOPs per token at context ``seq_len``; ``training=False`` gives the forward pass (1/3)."""
    if config.attention == "linear":
        heads = config.attention_n_heads + config.attention_n_kv_heads
        attention = 6 * config.n_layers * heads * config.head_dim**2
    else:
        attention = 12 * config.n_layers * config.d_model * seq_len
    flops = 6 * matmul_params(config) + attention
    return flops if training else flops // 3
