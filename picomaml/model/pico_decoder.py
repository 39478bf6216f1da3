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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


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

    def __post_init__(self) -> None:
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
    """Keys (after RoPE) and values of every layer, for incremental decoding.

    Buffers are allocated on first use with the dtype and device of the first keys written, as
    [B, K, max_len, E] per layer. Call ``model(chunk, kv_cache=cache, start_pos=p)`` with consecutive
    chunks (a prompt, then one token at a time, or any chunk lengths); ``start_pos`` is the number of
    tokens already in the cache.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None) -> None:
        self.config = config
        self.batch_size = batch_size
        self.max_len = config.max_seq_len if max_len is None else max_len
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

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
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.keys[layer][:, :, start_pos:end] = k
        self.values[layer][:, :, start_pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query KV heads and interleaved RoPE; no biases."""

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

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, H, E]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, K, E]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
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
        self.attention = Attention(config, layer_idx)
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
