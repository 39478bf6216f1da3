"""pico-decoder: the Pico LLaMA-style decoder, in one readable file.

Architecture (pico-train's ``src/model/pico_decoder.py``, same module names so its state_dicts load
with ``strict=True``)::

    input_ids [B, T]
      -> embedding_proj                                   x [B, T, D]
      -> n_layers x block:
           h   = x + attention(attention_norm(x))         pre-norm, causal, GQA, interleaved RoPE
           x   = h + swiglu(swiglu_norm(h))               w_2(silu(w_0 h) * w_1 h)
      -> output_norm                                      hidden states [B, T, D]
      -> de_embedding_proj (untied), cast to fp32         logits [B, T, V]

Shape letters used in comments: B batch, T query length, S key length (cache + T), D d_model,
H attention heads, K kv heads, E head_dim = D / H, F activation_hidden_dim, V vocab_size, N = B * T.

What differs from pico-train, on purpose (each a defect of pico-train's implementation, not of the model):

* attention uses ``scaled_dot_product_attention(is_causal=True)`` instead of a float mask built on the
  host every step (which also rules out fused kernels);
* RoPE rotations are computed per forward call from the config (a [T, E/2] complex table, negligible
  next to the matmuls) instead of a process-wide cache, so two model sizes can live in one process;
* the KV-cache decode path works for any chunk length including 1, at any start position;
* :meth:`PicoDecoder.lm_loss` never materialises the full fp32 [N, V] logits (see
  :class:`_ChunkedLinearCrossEntropy`).

``model.attention=linear`` swaps every block's softmax attention for :class:`LinearAttention` (kernelised,
causal, O(T) in the sequence length; same projections and parameter names). Softmax stays the default,
so every preset and every pico-train state_dict is unchanged.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_KINDS = ("softmax", "linear")


@dataclass(kw_only=True)
class ModelConfig:
    """Hyperparameters of a pico-decoder; field names are pico-train's ``ModelConfig`` names.

    The named sizes live in ``conf/model/*.yaml`` (see :mod:`picomaml.model.presets`).
    """

    d_model: int
    n_layers: int = 12
    attention_n_heads: int = 12
    attention_n_kv_heads: int = 4
    activation_hidden_dim: int
    vocab_size: int = 50304
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    position_emb_theta: float = 10000.0
    # "softmax" (pico's, exportable to Llama) or "linear" (:class:`LinearAttention`, not exportable)
    attention: str = "softmax"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(
                f"model.attention={self.attention!r}: allowed values: {', '.join(ATTENTION_KINDS)}"
            )
        for key in (
            "d_model",
            "n_layers",
            "attention_n_heads",
            "attention_n_kv_heads",
            "activation_hidden_dim",
            "vocab_size",
            "max_seq_len",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{key}={value!r}: must be a positive integer")
        for key in ("norm_eps", "position_emb_theta"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"model.{key}={value!r}: must be a positive number")
        if self.d_model % self.attention_n_heads:
            divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0]
            raise ValueError(
                f"model.attention_n_heads={self.attention_n_heads} must divide "
                f"model.d_model={self.d_model}; allowed values: {divisors}"
            )
        if self.head_dim % 2:
            even = [
                h for h in range(1, self.d_model + 1) if self.d_model % h == 0 and self.d_model // h % 2 == 0
            ]
            raise ValueError(
                f"model.attention_n_heads={self.attention_n_heads} gives an odd head_dim "
                f"{self.head_dim} (RoPE rotates pairs); allowed values for d_model={self.d_model}: {even}"
            )
        if self.attention_n_heads % self.attention_n_kv_heads:
            divisors = [k for k in range(1, self.attention_n_heads + 1) if self.attention_n_heads % k == 0]
            raise ValueError(
                f"model.attention_n_kv_heads={self.attention_n_kv_heads} must divide "
                f"model.attention_n_heads={self.attention_n_heads}; allowed values: {divisors}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.attention_n_heads

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 whatever the input dtype (as pico-train does).

    ``F.rms_norm`` is a single fused kernel; pico's ``x * rsqrt(mean(x^2) + eps)`` is the same math
    in four passes over memory.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pico: self._norm(x.float()).type_as(x) * self.weight
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return normed * self.weight


def rope_rotations(
    head_dim: int, theta: float, start_pos: int, seq_len: int, device: torch.device
) -> torch.Tensor:
    """Unit complex numbers ``exp(i * pos * freq_j)`` for positions ``start_pos .. start_pos + T - 1``.

    Pair ``j`` of a head (elements ``2j, 2j+1``) rotates at ``freq_j = theta ** (-2j / head_dim)``.
    Returns complex64 [T, E/2]; computed in fp32 even under autocast, because a bf16 angle at
    position 2000 would be off by whole radians.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    positions = torch.arange(start_pos, start_pos + seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)  # [T, E/2]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` [B, T, heads, E] by ``rotations`` [T, E/2] (complex).

    pico's complex form: consecutive pairs (a, b) are read as a + ib and multiplied by the rotation,
    giving (a cos - b sin, a sin + b cos). One complex multiply is one fused kernel, forward and
    backward (about 5x faster than the same math in real arithmetic on CPU). Done in fp32 like pico.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, T, heads, E/2]
    return torch.view_as_real(pairs * rotations[:, None, :]).flatten(-2).type_as(x)


class KVCache:
    """What every layer needs from earlier positions for incremental decoding, for either attention kind.

    * softmax attention: keys (after RoPE) and values, allocated on first use with the dtype and device
      of the first keys written, as [B, K, max_len, E] per layer;
    * linear attention: the recurrent state ``S = sum_s rot(phi(k_s)) v_s^T`` [B, K, E, E] and the
      normaliser ``z = sum_s phi(k_s)`` [B, K, E] per layer, in fp32 (see :class:`LinearAttention`), and
      how many positions they summarise. Memory is O(1) in the context length.

    Call ``model(chunk, kv_cache=cache, start_pos=p)`` with consecutive chunks (a prompt, then one token
    at a time, or any chunk lengths); ``start_pos`` is the number of tokens already in the cache. A
    softmax cache may be rewound (written again from an earlier ``start_pos``); a linear state cannot
    forget tokens, so it only continues where it stopped or restarts at ``start_pos=0``.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None) -> None:
        self.config = config
        self.batch_size = batch_size
        self.max_len = config.max_seq_len if max_len is None else max_len
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.states: list[torch.Tensor | None] = [None] * config.n_layers  # linear: S [B, K, E, E]
        self.normalisers: list[torch.Tensor | None] = [None] * config.n_layers  # linear: z [B, K, E]
        self.seen: list[int] = [0] * config.n_layers  # linear: positions summarised by S and z

    def _check_end(self, end: int) -> None:
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, K, T, E] at ``start_pos`` and return all keys and values so far [B, K, S, E]."""
        if not self.keys:
            shape = (self.batch_size, self.config.attention_n_kv_heads, self.max_len, self.config.head_dim)
            for _ in range(self.config.n_layers):
                self.keys.append(torch.zeros(shape, dtype=k.dtype, device=k.device))
                self.values.append(torch.zeros(shape, dtype=v.dtype, device=v.device))
        end = start_pos + k.shape[2]
        self._check_end(end)
        self.keys[layer][:, :, start_pos:end] = k
        self.values[layer][:, :, start_pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def read_state(
        self, layer: int, start_pos: int, n_tokens: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Linear attention: the state (S [B, K, E, E], z [B, K, E], fp32) before position ``start_pos``.

        Zeros at ``start_pos=0``; otherwise ``start_pos`` must be the number of positions already summarised.
        """
        self._check_end(start_pos + n_tokens)
        if start_pos == 0 or self.states[layer] is None:
            if start_pos != 0:
                raise ValueError(
                    f"linear-attention cache is empty; decoding must start at 0, not {start_pos}"
                )
            B, K, E = self.batch_size, self.config.attention_n_kv_heads, self.config.head_dim
            zeros = torch.zeros(B, K, E, E, dtype=torch.float32, device=device)
            return zeros, zeros.new_zeros(B, K, E)
        if start_pos != self.seen[layer]:
            raise ValueError(
                f"linear-attention cache summarises {self.seen[layer]} positions and cannot rewind; "
                f"continue at start_pos={self.seen[layer]} or restart at 0, not {start_pos}"
            )
        return self.states[layer], self.normalisers[layer]

    def write_state(self, layer: int, state: torch.Tensor, normaliser: torch.Tensor, end: int) -> None:
        """Linear attention: store the state after position ``end - 1``."""
        self.states[layer], self.normalisers[layer], self.seen[layer] = state, normaliser, end


class _AttentionBase(nn.Module):
    """The projections both attention kinds share (no biases), under pico-train's module names."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.attention_n_heads
        self.n_kv_heads = config.attention_n_kv_heads
        self.head_dim = config.head_dim
        d = config.d_model
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, T, H, E], k and v [B, T, K, E], before RoPE."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        return q, k, v

    def attention_weights(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """Causal attention map [B, H, T, T] (fp32) of the normed input ``x`` [B, T, D] at positions 0..T-1:
        row t says how much query t takes from each value s <= t (0 above the diagonal). The layer's
        output is ``o_proj`` of these weights applied to the values of the query head's kv head."""
        raise NotImplementedError  # each attention kind defines its own map


class Attention(_AttentionBase):
    """Causal multi-head softmax attention with grouped-query KV heads and interleaved RoPE; no biases."""

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._project(x)  # [B, T, H, E], [B, T, K, E], [B, T, K, E]
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, E]

        mask, causal = None, T > 1
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v, start_pos)  # [B, K, S, E], S = start_pos + T
            if start_pos > 0 and T > 1:
                # is_causal aligns the triangle to the top-left (query i sees keys <= i), which is
                # wrong when queries start at start_pos: query i must see keys <= start_pos + i.
                q_pos = torch.arange(start_pos, start_pos + T, device=x.device)
                mask = torch.arange(k.shape[2], device=x.device) <= q_pos[:, None]  # [T, S] bool
                causal = False
        # Query head h reads kv head h // (H / K), as pico's repeat_interleave and HF's repeat_kv.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attention_weights(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities ``softmax(q_t . k_s / sqrt(E))`` over s <= t, [B, H, T, T] fp32."""
        T = x.shape[1]
        q, k, _ = self._project(x)
        q = apply_rope(q, rope).float().transpose(1, 2)  # [B, H, T, E]
        k = apply_rope(k, rope).float().transpose(1, 2).repeat_interleave(self.n_heads // self.n_kv_heads, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # [B, H, T, T]
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def _fp32(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device`` (a no-op on devices without autocast, e.g. ``meta``)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1, the positive kernel feature map of Katharopoulos et al. 2020 ("Transformers
    are RNNs", section 3.2.1): phi(q) . phi(k) > 0 stands in for exp(q . k), so the normaliser is a sum of
    positive terms, at O(E) cost per element (no random features)."""
    return F.elu(x) + 1.0


# Added to the normaliser, as the reference implementation (fast-transformers' LinearAttention, eps=1e-6)
# does: phi(x) = exp(x) for x < 0 underflows to 0 in fp32 for very negative x.
_LINEAR_EPS = 1e-6
# Default chunk length of the chunkwise-parallel causal form (quadratic inside a chunk, a running state
# across); LinearAttention picks its own from the head size.
_LINEAR_CHUNK = 64


def linear_attention_chunkwise(
    qf: torch.Tensor,
    qr: torch.Tensor,
    kf: torch.Tensor,
    kr: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    normaliser: torch.Tensor,
    chunk: int = _LINEAR_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal linear attention of a whole sequence, chunkwise-parallel (the form used for training).

    Inputs in fp32, one kv head's G = H / K query heads grouped beside it: ``qf = phi(q)``, ``qr`` = its
    RoPE rotation [B, K, G, T, E]; ``kf = phi(k)``, ``kr`` = its rotation, ``v`` [B, K, 1, T, E];
    ``state`` [B, K, 1, E, E] and ``normaliser`` [B, K, 1, E] summarise positions before this sequence.
    Output t is ``sum_{s<=t} (qr_t . kr_s) v_s / (sum_{s<=t} qf_t . kf_s + eps)`` [B, K, G, T, E], then the
    state and normaliser after the last position.

    The sequence is cut into chunks of ``chunk`` tokens: inside a chunk the masked [C, C] products are
    computed directly; across chunks a prefix sum of per-chunk states ``kr^T v`` [E, E] carries the past.
    Memory is O(T * C + (T / C) * E^2) per head instead of the [T, E, E] prefix sums of a token-level
    cumsum, and the work is matmuls (no Python loop over tokens). Sun et al. 2023 (RetNet, "chunkwise
    recurrent representation") and Yang et al. 2024 (Gated Linear Attention) use the same split.
    """
    T = qf.shape[-2]
    pad = -T % chunk
    if pad:
        # zeros after the feature map: padded keys add nothing to any sum, padded queries are dropped
        qf, qr, kf, kr, v = (F.pad(t, (0, 0, 0, pad)) for t in (qf, qr, kf, kr, v))
    n = (T + pad) // chunk
    qf, qr, kf, kr, v = (t.unflatten(-2, (n, chunk)) for t in (qf, qr, kf, kr, v))  # [B, K, *, n, C, E]

    chunk_states = kr.transpose(-1, -2) @ v  # [B, K, 1, n, E, E]
    chunk_norms = kf.sum(-2)  # [B, K, 1, n, E]
    # state before chunk i = carried state + chunks 0..i-1 (an exclusive prefix sum over chunks)
    before = torch.cat([state.unsqueeze(-3), chunk_states[..., :-1, :, :]], dim=-3).cumsum(-3)
    norm_before = torch.cat([normaliser.unsqueeze(-2), chunk_norms[..., :-1, :]], dim=-2).cumsum(-2)

    future = torch.ones(chunk, chunk, dtype=torch.bool, device=qf.device).triu(1)
    scores = (qr @ kr.transpose(-1, -2)).masked_fill(future, 0.0)  # [B, K, G, n, C, C], rotated
    weights = (qf @ kf.transpose(-1, -2)).masked_fill(future, 0.0)  # unrotated, for the normaliser
    numerator = scores @ v + qr @ before  # [B, K, G, n, C, E]
    denominator = weights.sum(-1) + (qf * norm_before.unsqueeze(-2)).sum(-1)  # [B, K, G, n, C]
    out = (numerator / (denominator.unsqueeze(-1) + _LINEAR_EPS)).flatten(-3, -2)[..., :T, :]
    return (
        out,
        before[..., -1, :, :] + chunk_states[..., -1, :, :],
        norm_before[..., -1, :] + chunk_norms[..., -1, :],
    )


def linear_attention_recurrent(
    qf: torch.Tensor,
    qr: torch.Tensor,
    kf: torch.Tensor,
    kr: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    normaliser: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same function as :func:`linear_attention_chunkwise`, as an RNN: one token at a time,
    ``S += kr_t v_t^T``, ``z += kf_t``, ``out_t = qr_t S / (qf_t . z + eps)`` (Katharopoulos et al. 2020,
    section 3.4). O(E^2) per token and head whatever the context length: the decoding form."""
    outs = []
    for t in range(qf.shape[-2]):
        state = state + kr[..., t, :, None] * v[..., t, None, :]  # [B, K, 1, E, E]
        normaliser = normaliser + kf[..., t, :]  # [B, K, 1, E]
        numerator = (qr[..., t, None, :] @ state).squeeze(-2)  # [B, K, G, E]
        denominator = (qf[..., t, :] * normaliser).sum(-1, keepdim=True)  # [B, K, G, 1]
        outs.append(numerator / (denominator + _LINEAR_EPS))
    return torch.stack(outs, dim=-2), state, normaliser


class LinearAttention(_AttentionBase):
    """Causal kernelised linear attention (Katharopoulos et al. 2020), with GQA heads and RoPE.

    For query t (head h, reading kv head h // (H / K) as softmax attention does)::

        out_t = sum_{s<=t} (R_t phi(q_t)) . (R_s phi(k_s)) v_s  /  sum_{s<=t} phi(q_t) . phi(k_s)

    with phi = :func:`feature_map` (elu + 1) and R_t the RoPE rotation of position t. RoPE follows
    RoFormer (Su et al. 2021, section 3.3, eq. 19): the rotation goes into the numerator only, so the
    relative position enters the weights, while the denominator stays a sum of positive terms (rotated
    features can have negative dot products, and a rotated normaliser could reach zero). No 1/sqrt(E)
    scale: the normaliser already makes the weights of a row sum to one in the unrotated case.

    Three forms of the same function: :func:`linear_attention_chunkwise` for training and prompt prefill,
    :func:`linear_attention_recurrent` for one-token decoding steps from the state kept in
    :class:`KVCache`, and :meth:`attention_weights` (the explicit [T, T] map, O(T^2), for analysis).
    Everything after the projections runs in fp32 with autocast off: the state is a sum over the whole
    context, which bf16 (8 bits of mantissa) would round away.
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        # Per head the chunkwise form keeps T * C intra-chunk weights and (T / C) * E^2 chunk states: the
        # two balance at C = E. At least 16 so the intra-chunk matmuls are not degenerate (measured on a
        # 2-core CPU, one 11m layer (E = 8) at T = 8192, forward + backward: C = 16 kept 44 MB for
        # backward and took 0.44 s, C = 64 kept 61 MB and took 0.78 s).
        self.chunk = max(16, self.head_dim)

    @staticmethod
    def _features(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """phi(q), rot(phi(q)) [B, T, H, E]; phi(k), rot(phi(k)), v [B, T, K, E]; all fp32."""
        qf, kf = feature_map(q.float()), feature_map(k.float())
        return qf, apply_rope(qf, rope), kf, apply_rope(kf, rope), v.float()

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        K, G, E = self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim
        q, k, v = self._project(x)  # in the autocast dtype, like every other matmul
        out_dtype = v.dtype
        with _fp32(x.device):
            qf, qr, kf, kr, v = self._features(q, k, v, rope)
            # query head h = kv * G + g: group each kv head's G query heads beside it
            qf, qr = (t.view(B, T, K, G, E).permute(0, 2, 3, 1, 4) for t in (qf, qr))  # [B, K, G, T, E]
            kf, kr, v = (t.transpose(1, 2).unsqueeze(2) for t in (kf, kr, v))  # [B, K, 1, T, E]
            if kv_cache is None:
                state = x.new_zeros(B, K, 1, E, E, dtype=torch.float32)
                normaliser = x.new_zeros(B, K, 1, E, dtype=torch.float32)
            else:
                state, normaliser = kv_cache.read_state(self.layer_idx, start_pos, T, x.device)
                state, normaliser = state.unsqueeze(2), normaliser.unsqueeze(2)
            if kv_cache is not None and T == 1:  # a decoding step
                out, state, normaliser = linear_attention_recurrent(qf, qr, kf, kr, v, state, normaliser)
            else:  # out [B, K, G, T, E]
                out, state, normaliser = linear_attention_chunkwise(
                    qf, qr, kf, kr, v, state, normaliser, self.chunk
                )
            if kv_cache is not None:
                kv_cache.write_state(self.layer_idx, state.squeeze(2), normaliser.squeeze(2), start_pos + T)
        out = out.permute(0, 3, 1, 2, 4).reshape(B, T, self.n_heads * E).to(out_dtype)
        return self.o_proj(out)

    def attention_weights(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """The implied weights ``(R_t phi(q_t)) . (R_s phi(k_s)) / sum_{s'<=t} phi(q_t) . phi(k_s')`` for
        s <= t, [B, H, T, T] fp32. Rows sum to one only without RoPE; weights may be negative with it."""
        T = x.shape[1]
        G = self.n_heads // self.n_kv_heads
        q, k, v = self._project(x)
        with _fp32(x.device):
            qf, qr, kf, kr, _ = (t.transpose(1, 2) for t in self._features(q, k, v, rope))  # [B, heads, T, E]
            kf, kr = kf.repeat_interleave(G, 1), kr.repeat_interleave(G, 1)  # [B, H, T, E]
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            numerator = (qr @ kr.transpose(-1, -2)).masked_fill(future, 0.0)
            denominator = (qf @ kf.transpose(-1, -2)).masked_fill(future, 0.0).sum(-1, keepdim=True)
            return numerator / (denominator + _LINEAR_EPS)


class SwiGLU(nn.Module):
    """Gated feed-forward ``w_2(silu(w_0 x) * w_1 x)``, D -> F -> D, no biases."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w_0 = nn.Linear(config.d_model, config.activation_hidden_dim, bias=False)
        self.w_1 = nn.Linear(config.d_model, config.activation_hidden_dim, bias=False)
        self.w_2 = nn.Linear(config.activation_hidden_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_0(x)) * self.w_1(x))


class PicoDecoderBlock(nn.Module):
    """Pre-norm block: ``h = x + attention(attention_norm(x)); out = h + swiglu(swiglu_norm(h))``."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        attention = LinearAttention if config.attention == "linear" else Attention
        self.attention = attention(config, layer_idx)
        self.swiglu_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.swiglu = SwiGLU(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, kv_cache, start_pos)
        return h + self.swiglu(self.swiglu_norm(h))


class PicoDecoder(nn.Module):
    """The pico-decoder language model (see the module docstring for the data flow).

    Initialisation (pico-train leaves PyTorch's defaults; we train from scratch, so GPT-2's scheme):
    every linear and the embedding ~ N(0, 0.02); the two projections that write into the residual
    stream (``attention.o_proj``, ``swiglu.w_2``) ~ N(0, 0.02 / sqrt(2 * n_layers)) so the residual
    variance stays O(1) at any depth; norm weights 1.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding_proj = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(PicoDecoderBlock(config, i) for i in range(config.n_layers))
        self.output_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.de_embedding_proj = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = 0.02
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual = name.endswith(("attention.o_proj", "swiglu.w_2"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; ``exclude_embeddings`` drops both the embedding and de-embedding matrices."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embedding_proj.weight.numel() + self.de_embedding_proj.weight.numel()
        return n

    def _trunk(self, input_ids: torch.Tensor, kv_cache: KVCache | None, start_pos: int) -> torch.Tensor:
        T = input_ids.shape[1]
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence reaches position {start_pos + T} > model.max_seq_len={self.config.max_seq_len}"
            )
        x = self.embedding_proj(input_ids)  # [B, T, D]
        rope = rope_rotations(
            self.config.head_dim, self.config.position_emb_theta, start_pos, T, input_ids.device
        )
        for layer in self.layers:
            x = layer(x, rope, kv_cache, start_pos)
        return self.output_norm(x)  # [B, T, D]

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [B, T, D] (the representation the meta-learning head reads)."""
        return self._trunk(input_ids, None, 0)

    def forward(
        self, input_ids: torch.Tensor, kv_cache: KVCache | None = None, start_pos: int = 0
    ) -> torch.Tensor:
        """Logits [B, T, V] in fp32 for ``input_ids`` [B, T] at positions ``start_pos ..``.

        With a ``kv_cache`` the keys and values of earlier positions come from the cache and this
        chunk's are appended to it.
        """
        return self.de_embedding_proj(self._trunk(input_ids, kv_cache, start_pos)).float()

    def lm_loss(
        self, input_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
    ) -> torch.Tensor:
        """Mean next-token cross-entropy (fp32 scalar) over labels != ``ignore_index``.

        ``labels`` [B, T] are already aligned with ``input_ids`` (label t is the target at position t).
        Equals ``F.cross_entropy(self(input_ids).flatten(0, 1), labels.flatten())`` in value and
        gradients, in O(chunk x V) memory instead of O(N x V).
        """
        h = self.hidden_states(input_ids).flatten(0, 1)  # [N, D]
        # Autograd.Function.forward always runs without grad mode, so pass whether the caller has it:
        # under no_grad (evaluation) the fused gradient work is skipped.
        return _ChunkedLinearCrossEntropy.apply(
            h,
            self.de_embedding_proj.weight,
            labels.flatten(),
            ignore_index,
            _LOSS_CHUNK_TOKENS,
            torch.is_grad_enabled(),
        )


# Tokens per loss chunk: one reusable [chunk, V] fp32 block (1024 x 50304 x 4 B = 206 MB) is small next
# to the trunk's activations, and 1024 rows keep the three vocabulary matmuls near peak speed.
_LOSS_CHUNK_TOKENS = 1024


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Fused ``cross_entropy(h @ W.T, labels)`` that computes its gradients during the forward pass.

    For each chunk of tokens: logits = h_c @ W.T (in the autocast dtype when autocast is on, like a
    plain ``nn.Linear``), then an fp32 softmax, done in place in one preallocated [chunk, V] buffer:
    loss = logsumexp - logit[label], and, when gradients are needed,
    dlogits = (softmax - onehot) / n_valid, grad_h_c = dlogits @ W, grad_W += dlogits.T @ h_c
    (accumulated in fp32). Only that one vocabulary-sized block ever exists, the logits are never
    recomputed, and the backward pass just scales the stored gradients by grad_output.
    Why in place: fresh large allocations cost page faults (on CPU about as much as the exp), and
    every extra pass over the block costs about a quarter of the exp.
    Not twice differentiable (the meta-learning objective does not differentiate through it).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        h: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ignore_index: int,
        chunk: int,
        grad_enabled: bool,
    ) -> torch.Tensor:
        device = h.device
        compute_dtype = (
            torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else h.dtype
        )
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        # Autograd runs this forward with autocast still on; cast once here and compute in plain dtypes.
        with torch.autocast(device.type, enabled=False):
            w = weight.to(compute_dtype)
            valid = labels != ignore_index
            safe_labels = torch.where(valid, labels, 0)[:, None]  # [N, 1]
            # Mean over valid tokens; 0/0 gives nan like F.cross_entropy when every label is ignored.
            scale = 1.0 / valid.sum().float()
            row_scale = valid.float() * scale  # [N]
            grad_h = torch.empty(h.shape, dtype=compute_dtype, device=device) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_w else None
            losses = torch.empty(h.shape[0], dtype=torch.float32, device=device)
            n_rows = min(chunk, h.shape[0])
            block = torch.empty(n_rows, weight.shape[0], dtype=torch.float32, device=device)
            # low-precision copies of the logits and their gradient under autocast
            low = None if compute_dtype == torch.float32 else torch.empty_like(block, dtype=compute_dtype)
            for start in range(0, h.shape[0], chunk):
                rows = slice(start, start + chunk)
                h_c = h[rows].to(compute_dtype)  # [C, D]
                n = h_c.shape[0]
                logits = block[:n]  # [C, V], fp32
                if compute_dtype == torch.float32:
                    torch.mm(h_c, w.t(), out=logits)
                else:
                    logits.copy_(torch.mm(h_c, w.t(), out=low[:n]))
                target = logits.gather(1, safe_labels[rows]).squeeze(1)
                row_max = logits.amax(dim=1, keepdim=True)
                exp = logits.sub_(row_max).exp_()  # exp(logit - max), in place
                sum_exp = exp.sum(dim=1)
                losses[rows] = sum_exp.log() + row_max.squeeze(1) - target
                if not (need_h or need_w):
                    continue
                # (softmax - onehot) * row_scale, still in place
                exp.mul_((row_scale[rows] / sum_exp)[:, None])
                exp.scatter_add_(1, safe_labels[rows], -row_scale[rows, None])
                d_logits = exp if compute_dtype == torch.float32 else low[:n].copy_(exp)
                if need_h:
                    torch.mm(d_logits, w, out=grad_h[rows])
                if need_w and compute_dtype == torch.float32:
                    grad_w.addmm_(d_logits.t(), h_c)
                elif need_w:
                    grad_w += d_logits.t() @ h_c
            ctx.save_for_backward(grad_h, grad_w)
            ctx.dtypes = (h.dtype, weight.dtype)
            return (losses * valid).sum() * scale

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple:
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        if grad_h is not None:
            grad_h = (grad_h * grad_out).to(h_dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(w_dtype)
        return grad_h, grad_w, None, None, None, None
