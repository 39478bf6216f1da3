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
    flops = 6 * matmul_params(config) + 12 * config.n_layers * config.d_model * seq_len
    return flops if training else flops // 3
