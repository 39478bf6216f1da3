"""Tokenizers: the embedded GPT-2 BPE is exact and offline; OLMo fails clearly without the Hub."""

import itertools
import os
import subprocess
import sys

import pytest

from picomaml.data import MODEL_VOCAB_SIZE, load_tokenizer
from picomaml.data.corpora import WikiCorpus


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


def test_gpt2_special_ids_and_size(gpt2):
    assert len(gpt2) == 50259
    assert (gpt2.eos_token_id, gpt2.mask_token_id, gpt2.pad_token_id) == (50256, 50257, 50258)
    assert gpt2.convert_ids_to_tokens([50256, 50257, 50258]) == ["<|endoftext|>", "<|mask|>", "<|pad|>"]
    assert len(gpt2) <= MODEL_VOCAB_SIZE
    assert load_tokenizer("gpt2") is gpt2  # built once per process


def test_gpt2_matches_reference_ids(gpt2):
    # Ids of the original GPT-2 tokenizer: a 1-token tokenizer (the transformers 5 pitfall) fails here.
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the cat sat on the mat.") == [262, 3797, 3332, 319, 262, 2603, 13]


def test_gpt2_round_trips_wiki_text(gpt2):
    docs = list(itertools.islice(WikiCorpus().documents(), 300))
    encodings = gpt2.backend_tokenizer.encode_batch_fast(docs, add_special_tokens=False)
    for doc, encoding in zip(docs, encodings, strict=True):
        assert gpt2.decode(encoding.ids) == doc
    n_tokens = sum(len(e.ids) for e in encodings)
    assert 3.5 < sum(len(d) for d in docs) / n_tokens < 6  # English BPE: ~4-5 characters per token


@pytest.mark.parametrize(
    "text",
    [
        "naïve café, Ünïcödé ñ",
        "emoji 😀👍🏽 and a ZWJ family 👨‍👩‍👧",
        "日本語の文章",
        "tabs\tand\n\nnewlines  ",
    ],
)
def test_gpt2_round_trips_unicode(gpt2, text):
    ids = gpt2.encode(text)
    assert all(0 <= i < 50257 for i in ids)  # byte-level BPE never needs unk
    assert gpt2.decode(ids) == text


def test_special_tokens_encode_to_single_ids(gpt2):
    assert gpt2.encode("a <|mask|> b<|endoftext|>") == [64, 220, 50257, 275, 50256]


def test_unknown_tokenizer_lists_valid_names():
    with pytest.raises(ValueError, match="gpt2, olmo"):
        load_tokenizer("bert")


def test_olmo_offline_error_names_tokenizer_and_hub(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE at import, so the call runs in a fresh interpreter.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = (
        "from picomaml.data.tokenizer import load_tokenizer\n"
        "try:\n    load_tokenizer('olmo')\n"
        "except OSError as err:\n    print('ERROR', err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert "ERROR Cannot load tokenizer 'olmo' (allenai/OLMo-7B-0724-hf)" in result.stdout, result.stderr
    assert "Hugging Face Hub is unreachable" in result.stdout
