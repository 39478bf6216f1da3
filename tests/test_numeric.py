"""The numeric-sequence benchmark on hand-made cases: which tokens are number tokens, how a continuation
is parsed, per-kind accuracy and exact match of a model whose every prediction is known, and the
extrapolation lengths."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from picomaml.data import load_tokenizer
from picomaml.data.corpora import SYNTHETIC_KINDS, SyntheticCorpus
from picomaml.eval.numeric import (
    NumericConfig,
    NumericSequence,
    continuation_scores,
    encode_with_number_mask,
    evaluate_numeric,
    make_sequences,
    number_token_hits,
    parse_continuation,
    run_numeric_setup,
    term_spans,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gpt2")


class PrefixOracle:
    """A model-like callable whose predictions are known exactly: it knows some documents by heart.

    At each position it finds a known document (as ``[eos] + tokens``) that starts with the input so far
    and predicts that document's next token (eos at its end); ``wrong`` maps a (document text, token
    index) to a token it predicts there instead. With no matching document it predicts eos."""

    def __init__(self, tokenizer, texts: Sequence[str], wrong: dict[tuple[str, int], int] | None = None):
        self.eos = tokenizer.eos_token_id
        self.vocab = len(tokenizer)
        self.docs = [(text, [self.eos, *tokenizer.encode(text)]) for text in texts]
        self.wrong = wrong or {}

    def predict(self, prefix: list[int]) -> int:
        for text, doc in self.docs:
            if doc[: len(prefix)] == prefix:
                t = len(prefix)
                if t >= len(doc):
                    return self.eos
                return self.wrong.get((text, t), doc[t])
        return self.eos

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            row = input_ids[b].tolist()
            for t in range(T):
                logits[b, t, self.predict(row[: t + 1])] = 1.0
        return logits


def test_number_tokens_are_the_tokens_of_terms(tokenizer) -> None:
    # GPT-2: 'arithmetic: 995, 1000, 1005, 1010' -> ar|ithmetic|:| 9|95|,| 1000|,| 100|5|,| 101|0
    seq = NumericSequence("arithmetic", (995, 1000, 1005, 1010))
    ids, mask = encode_with_number_mask(tokenizer, seq, first_scored_term=0)
    pieces = [tokenizer.decode([i]) for i in ids[1:]]
    assert ids[0] == tokenizer.eos_token_id and not mask[0]
    assert pieces == ["ar", "ithmetic", ":", " 9", "95", ",", " 1000", ",", " 100", "5", ",", " 101", "0"]
    marked = [p for p, m in zip(pieces, mask[1:], strict=True) if m]
    assert marked == [" 9", "95", " 1000", " 100", "5", " 101", "0"]  # never the prefix or a comma
    # from the third term on only
    _, mask2 = encode_with_number_mask(tokenizer, seq, first_scored_term=2)
    assert [p for p, m in zip(pieces, mask2[1:], strict=True) if m] == [" 100", "5", " 101", "0"]
    # a minus sign is part of its term: ' -' and '3' are number tokens of -3
    walk = NumericSequence("random_walk", (1, -1, -3))
    ids, mask = encode_with_number_mask(tokenizer, walk, first_scored_term=2)
    assert [tokenizer.decode([i]) for i, m in zip(ids, mask, strict=True) if m] == [" -", "3"]
    assert term_spans(walk.text) == [(13, 14), (16, 18), (20, 22)]
    assert walk.text[16:18] == "-1"


def test_parse_continuation() -> None:
    assert parse_continuation(" 22, 27, 32") == [22, 27, 32]
    assert parse_continuation(" 22, -27,") == [22, -27]
    assert parse_continuation(" 22, 27x, 32") == [22]  # stops at the first malformed term
    assert parse_continuation("22,27") == [22, 27]
    assert parse_continuation(" x 22") == []
    assert parse_continuation("") == []


def test_accuracy_and_exact_match_of_a_known_model(tokenizer) -> None:
    counting = NumericSequence("counting", (5, 6, 7, 8, 9))
    alternating = NumericSequence("alternating", (3, 40, 3, 40, 3))
    arithmetic = NumericSequence("arithmetic", (995, 1000, 1005, 1010))
    # token 10 of [eos] + alternating is the second ' 40' (eos alter nating : ' 3' , ' 40' , ' 3' , ' 40');
    # token 13 of [eos] + arithmetic is the '0' of 1010 (eos ar ithmetic : ' 9' '95' , ' 1000' , ' 100' '5'
    # , ' 101' '0'): the oracle says '1' there, 1011
    wrong_40, wrong_0 = tokenizer.encode(" 41")[0], tokenizer.encode("1")[0]
    oracle = PrefixOracle(
        tokenizer,
        [counting.text, alternating.text, arithmetic.text],
        wrong={(alternating.text, 10): wrong_40, (arithmetic.text, 13): wrong_0},
    )
    rows = [encode_with_number_mask(tokenizer, s, 2) for s in (counting, alternating, arithmetic)]
    # scored tokens: counting ' 7' ' 8' ' 9' (3 right); alternating ' 3' ' 40' ' 3' (the ' 40' wrong);
    # arithmetic ' 100' '5' ' 101' '0' (the '0' wrong): 3 + 2 + 3 right of 3 + 3 + 4
    assert number_token_hits(oracle, rows[:1], tokenizer.pad_token_id, "cpu", 2) == (3, 3)
    assert number_token_hits(oracle, rows[1:2], tokenizer.pad_token_id, "cpu", 2) == (2, 3)
    assert number_token_hits(oracle, rows[2:], tokenizer.pad_token_id, "cpu", 2) == (3, 4)
    # batching (right padding) changes nothing
    assert number_token_hits(oracle, rows, tokenizer.pad_token_id, "cpu", 2) == (8, 10)
    assert number_token_hits(oracle, rows, tokenizer.pad_token_id, "cpu", 3) == (8, 10)

    # continuations of the last 2 terms: counting ' 8, 9' then eos (exact); alternating: ' 41' where
    # ' 40' belongs, then no known prefix (eos): 0 of 2 terms; arithmetic: ' 100' '5' ',' ' 101' '1'
    # parses as 1005, 1011: the first of 2 terms right
    scores = continuation_scores(oracle, tokenizer, [counting, alternating, arithmetic], 2, "cpu")
    assert scores == [(True, 1.0), (False, 0.0), (False, 0.5)]
    # with n = 1 the continuations predict the last term only: 9 (right) and 1011 (wrong)
    assert continuation_scores(oracle, tokenizer, [counting, arithmetic], 1, "cpu") == [
        (True, 1.0),
        (False, 0.0),
    ]
    with pytest.raises(ValueError, match="max_seq_len=10"):
        continuation_scores(oracle, tokenizer, [counting], 2, "cpu", max_seq_len=10)


def test_sequences_have_exactly_the_requested_terms() -> None:
    for kind in SYNTHETIC_KINDS:
        for n in (4, 8, 12):
            seqs = make_sequences(kind, n, 5, seed=7)
            assert len(seqs) == 5 and all(len(s.terms) == n and s.kind == kind for s in seqs)
            assert seqs == make_sequences(kind, n, 5, seed=7)  # reproducible
            assert seqs != make_sequences(kind, n, 5, seed=8)
    counting = make_sequences("counting", 16, 3, seed=0)
    assert all(np.diff(s.terms).tolist() == [1] * 15 for s in counting)
    alternating = make_sequences("alternating", 9, 3, seed=0)
    assert all(s.terms[::2] == (s.terms[0],) * 5 and s.terms[1::2] == (s.terms[1],) * 4 for s in alternating)
    # the corpus caps geometric sequences at 12 terms: none longer is made
    assert make_sequences("geometric", 13, 3, seed=0) == []
    with pytest.raises(ValueError, match="choose from"):
        make_sequences("fibonacci", 4, 1, seed=0)


def test_extrapolation_lengths_and_per_kind_scores(tokenizer) -> None:
    """L = 4: lengths 4, 8, 16 terms. The oracle knows every evaluation sequence of 4 and 8 terms and the
    16-term counting ones, nothing else: so 1x and 2x are perfect, at 4x only counting is."""
    config = NumericConfig(per_kind=4, lengths=(1, 2, 4), continuation_terms=2, seed=3, batch_size=8)
    known = [s.text for m in (1, 2) for k in SYNTHETIC_KINDS for s in make_sequences(k, 4 * m, 4, 3)]
    known += [s.text for s in make_sequences("counting", 16, 4, 3)]
    results = evaluate_numeric(PrefixOracle(tokenizer, known), tokenizer, config, train_terms=4)
    assert results["numeric/train_terms"] == 4
    assert [results[f"numeric/x{m}/terms"] for m in (1, 2, 4)] == [4, 8, 16]
    for m in (1, 2):
        for kind in SYNTHETIC_KINDS:
            assert results[f"numeric/{kind}/x{m}/token_acc"] == 1.0, (kind, m)
            assert results[f"numeric/{kind}/x{m}/exact"] == 1.0, (kind, m)
            assert results[f"numeric/{kind}/x{m}/n_seqs"] == 4
    assert results["numeric/counting/x4/token_acc"] == results["numeric/counting/x4/exact"] == 1.0
    for kind in ("arithmetic", "alternating", "random_walk"):
        assert results[f"numeric/{kind}/x4/token_acc"] == results[f"numeric/{kind}/x4/exact"] == 0.0
    # geometric cannot be 16 terms long: not scored at 4x, and left out of "all" at every length
    assert "numeric/geometric/x4/token_acc" not in results and "numeric/geometric/x2/exact" in results
    assert results["numeric/all/n_kinds"] == 4
    assert results["numeric/all/x1/exact"] == 1.0 and results["numeric/all/x4/token_acc"] == 0.25
    # every counting sequence of 16 terms scores its terms 2..15 (one token each for numbers < 100)
    n_tokens = results["numeric/counting/x4/n_tokens"]
    assert 4 * 14 <= n_tokens <= 4 * 14 * 2


def test_config_checks_and_run_setup() -> None:
    with pytest.raises(ValueError, match="numeric.kinds"):
        NumericConfig(kinds=["fibonacci"])
    with pytest.raises(ValueError, match="numeric.lengths"):
        NumericConfig(lengths=[0, 2])
    with pytest.raises(ValueError, match="numeric.train_terms=3"):
        NumericConfig(train_terms=3, continuation_terms=3)
    from omegaconf import OmegaConf

    synthetic = OmegaConf.create(
        {"data": {"corpus": "synthetic", "corpus_options": {"max_terms": 8, "kinds": ["counting"]}}}
    )
    assert run_numeric_setup(synthetic, NumericConfig()) == (8, ("counting",))
    assert run_numeric_setup(synthetic, NumericConfig(train_terms=5, kinds=["geometric"])) == (
        5,
        ("geometric",),
    )
    wiki = OmegaConf.create({"data": {"corpus": "wiki"}})
    with pytest.raises(ValueError, match="data.corpus='wiki'"):
        run_numeric_setup(wiki, NumericConfig())
    assert run_numeric_setup(wiki, NumericConfig(train_terms=6)) == (6, SYNTHETIC_KINDS)
    assert SyntheticCorpus.max_terms == 32  # the default L of a run that sets no corpus_options


def test_pico_decoder_fast_path_matches_the_generic_one(tokenizer) -> None:
    """A real (random, seeded) PicoDecoder scored the fast way (logits at number tokens only, KV-cached
    greedy decoding) and as a plain logits function give the same counts and continuations."""
    from picomaml.model import ModelConfig, PicoDecoder

    torch.manual_seed(0)
    model = PicoDecoder(
        ModelConfig(
            d_model=32, n_layers=2, attention_n_heads=4, attention_n_kv_heads=2, activation_hidden_dim=64
        )
    ).eval()
    with torch.no_grad():  # a sharper random model, so greedy decoding emits numbers and commas too
        model.de_embedding_proj.weight.mul_(50)
    sequences = [s for k in SYNTHETIC_KINDS for s in make_sequences(k, 6, 3, seed=5)]
    rows = [encode_with_number_mask(tokenizer, s, 2) for s in sequences]
    generic = lambda ids: model(ids)  # noqa: E731 (not a PicoDecoder: the generic path)
    pad = tokenizer.pad_token_id
    assert number_token_hits(model, rows, pad, "cpu", 4) == number_token_hits(generic, rows, pad, "cpu", 4)
    fast = continuation_scores(model, tokenizer, sequences, 2, "cpu", model.config.max_seq_len)
    assert fast == continuation_scores(generic, tokenizer, sequences, 2, "cpu")
