"""Text generation: greedy or sampled, with KV-cached decoding (``python -m picomaml.generate`` is its CLI).

Decoding with a cache runs the prompt once (prefill), then one token per step: each step feeds only the
new token and reads what earlier positions left in the :class:`~picomaml.model.KVCache`: their keys and
values for softmax attention (a step costs O(context) instead of re-running the whole sequence), or the
recurrent state of ``model.attention=linear`` (a step costs O(1) in the context length).
``use_cache=false`` recomputes the full sequence every step; both give the same tokens (the tests check
it), which makes the slow path a reference for the fast one.
"""

from __future__ import annotations

import torch

from picomaml.model.pico_decoder import KVCache, PicoDecoder


def check_context(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> None:
    """Raise ValueError when the prompt plus the new tokens do not fit in the model's context."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prompt_len < 1:
        raise ValueError("the prompt must hold at least one token")
    if prompt_len + max_new_tokens > max_seq_len:
        raise ValueError(
            f"prompt of {prompt_len} tokens is too long: with max_new_tokens={max_new_tokens} it must be at "
            f"most {max_seq_len - max_new_tokens} tokens (model context max_seq_len={max_seq_len})"
        )


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V].

    ``temperature == 0`` is greedy (argmax). Otherwise logits are divided by the temperature, cut to the
    ``top_k`` most likely tokens (0 = no cut), then to the smallest set whose probability reaches
    ``top_p`` (nucleus; the most likely token always stays), and one token is drawn with ``generator``.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(
            f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}"
        )
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: PicoDecoder,
    input_ids: torch.Tensor,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = 0,
    use_cache: bool = True,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Continue ``input_ids`` [B, T] by up to ``max_new_tokens`` tokens; returns [B, T + new].

    Sampling draws from a ``torch.Generator`` seeded with ``seed`` (None: the global RNG), so a seed
    gives the same text every time and the global RNG is left alone. With ``eos_token_id``, generation
    stops once every row has produced it; rows that finished earlier are filled with eos.
    """
    config = model.config
    check_context(input_ids.shape[1], max_new_tokens, config.max_seq_len)
    device = input_ids.device
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    batch = input_ids.shape[0]
    cache = KVCache(config, batch, max_len=input_ids.shape[1] + max_new_tokens) if use_cache else None
    tokens = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    # prefill: the whole prompt once; afterwards the cache holds every position before the new token
    logits = model(tokens, kv_cache=cache, start_pos=0)[:, -1]
    for _ in range(max_new_tokens):
        next_ids = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            next_ids = torch.where(finished, eos_token_id, next_ids)
            finished |= next_ids == eos_token_id
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
        if bool(finished.all()) or tokens.shape[1] == input_ids.shape[1] + max_new_tokens:
            break
        if cache is not None:
            logits = model(next_ids[:, None], kv_cache=cache, start_pos=tokens.shape[1] - 1)[:, -1]
        else:
            logits = model(tokens)[:, -1]
    return tokens
