"""The numeric-sequence benchmark: what a model trained on ``data=synthetic`` learned, kind by kind, and
how far past its training length it carries.

``data=synthetic`` renders number sequences as text, ``"arithmetic: 7, 12, 17, 22"`` (see
:class:`picomaml.data.corpora.SyntheticCorpus`: counting, arithmetic, geometric, alternating,
random_walk). This module generates fresh evaluation sequences with the same generator and scores a
model on them in two ways:

**Number-token accuracy** (teacher forced). A document is tokenized as the packer does (``[eos] +
text``: in training every document follows an eos). A *number token* is a token whose characters overlap
the characters of a term, that is its minus sign and digits: GPT-2 gives ``" 17"`` (the leading space
belongs to the token), ``" -"`` + ``"3"`` for -3, ``" 12"`` + ``"34"`` for 1234; the kind prefix
(``"arithmetic"``, ``":"``) and the commas are never number tokens. Only the number tokens of terms
``first_scored_term`` onwards are scored (default 2, the third term): the first two terms are free
draws of the generator (start, step or the second value), so nothing could predict them. The score is
the fraction of those tokens that are the model's argmax prediction given the true prefix.

**Greedy continuation exact match.** The prompt is ``[eos] + "kind: t_1, ..., t_m,"`` with
``m = terms - n``; the model continues greedily for as many tokens as the true continuation
``" t_{m+1}, ..., t_terms"`` has, plus :data:`CONTINUATION_SLACK` (so the text after the last term is
seen, and ``" 10"`` then ``"0"`` is read as 100, not 10). The generated text is parsed back into terms
(:func:`parse_continuation`: numbers separated by ``", "``, each ended by a comma, the end of the
document or the end of the text), and the continuation is an exact match when its first ``n`` terms are
the true next ``n`` terms. ``term_acc`` is the fraction of those ``n`` positions right.

**Length extrapolation.** A run trained with ``data.corpus_options.max_terms = L`` never saw a document
of more than ``L`` terms. Sequences of exactly ``m * L`` terms for each multiple ``m`` of ``lengths``
(default 1, 2, 4) are scored with both metrics; the continuation always predicts the last ``n`` terms,
so at ``4L`` the model continues a document four times longer than any it was trained on. The corpus
caps geometric sequences at :data:`GEOMETRIC_MAX_TERMS` terms (their numbers grow fast), so geometric is
only scored at lengths up to that cap; ``numeric/all/...`` averages over the kinds scored at *every*
requested length, so its extrapolation curve compares the same kinds at each length.

Evaluation sequences come from ``numpy.random.default_rng([seed, kind, terms])``, a stream the training
corpus (one ``default_rng(generator_seed)`` stream) does not use, and are the same for every checkpoint
scored with the same :class:`NumericConfig`. The rule spaces are small (counting has 100 sequences of
each length), so at ``1x`` an evaluation sequence can coincide with a training document: that length
measures in-distribution skill; ``2x`` and ``4x`` are longer than any training document.

Result keys (flat, JSON-ready), for each kind and ``all`` and each multiple ``m``:
``numeric/<kind>/x<m>/token_acc``, ``.../exact``, ``.../term_acc``, ``.../n_seqs``, ``.../n_tokens``;
plus ``numeric/train_terms`` (L), ``numeric/x<m>/terms`` (m * L) and ``numeric/continuation_terms`` (n).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from picomaml.data.corpora import SYNTHETIC_KINDS, SyntheticCorpus
from picomaml.model import PicoDecoder
from picomaml.model.generation import generate

GEOMETRIC_MAX_TERMS = 12
"""Longest geometric sequence :class:`~picomaml.data.corpora.SyntheticCorpus` generates."""
CONTINUATION_SLACK = 2
"""Tokens generated beyond the true continuation's length (see the module docstring)."""

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""Anything that maps input ids [B, T] to next-token logits [B, T, V]: a PicoDecoder, or a test oracle.
A :class:`~picomaml.model.PicoDecoder` is run the fast way (logits only where they are scored, KV-cached
decoding); anything else is called on whole sequences. Both give the same predictions."""


@dataclass
class NumericConfig:
    """What the numeric suite scores; the same config gives every checkpoint the same sequences.

    per_kind: sequences per kind and length. lengths: multiples ``m`` of the training length L that are
    scored (sequences of exactly ``m * L`` terms). train_terms: L (None: the run's
    ``data.corpus_options.max_terms``). continuation_terms: n, the terms the greedy continuation must
    get right. first_scored_term: 0-based index of the first term whose tokens the accuracy scores.
    kinds: sequence kinds (None: the run's ``data.corpus_options.kinds``, else all). seed: the
    evaluation sequences. batch_size: sequences per forward.
    """

    per_kind: int = 32
    lengths: Sequence[int] = (1, 2, 4)
    train_terms: int | None = None
    continuation_terms: int = 3
    first_scored_term: int = 2
    kinds: Sequence[str] | None = None
    seed: int = 1234
    batch_size: int = 32

    def __post_init__(self) -> None:
        self.lengths = tuple(int(m) for m in self.lengths)
        if self.kinds is not None:
            self.kinds = tuple(str(k) for k in self.kinds)
            unknown = [k for k in self.kinds if k not in SYNTHETIC_KINDS]
            if unknown or not self.kinds:
                raise ValueError(
                    f"numeric.kinds: {unknown or 'empty'}; choose from {', '.join(SYNTHETIC_KINDS)}"
                )
        for key in ("per_kind", "continuation_terms", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"numeric.{key} must be >= 1, got {getattr(self, key)}")
        if not self.lengths or any(m < 1 for m in self.lengths):
            raise ValueError(f"numeric.lengths must be positive multiples of L, got {list(self.lengths)}")
        if self.first_scored_term < 0:
            raise ValueError(f"numeric.first_scored_term must be >= 0, got {self.first_scored_term}")
        if self.train_terms is not None:
            self.check_train_terms(self.train_terms)

    def check_train_terms(self, train_terms: int) -> None:
        """ValueError unless a sequence of L terms leaves a prompt of at least one term and a scored term."""
        need = max(self.continuation_terms + 1, self.first_scored_term + 1)
        if train_terms < need:
            raise ValueError(
                f"numeric.train_terms={train_terms}: a sequence needs at least {need} terms "
                f"(continuation_terms={self.continuation_terms} after a prompt of one term or more, and "
                f"first_scored_term={self.first_scored_term})"
            )


# ------------------------------------------------------------------------------------- sequences


@dataclass(frozen=True)
class NumericSequence:
    """One evaluation document: its kind and terms, rendered exactly as the training corpus renders it."""

    kind: str
    terms: tuple[int, ...]

    @property
    def text(self) -> str:
        return render(self.kind, self.terms)


def render(kind: str, terms: Sequence[int]) -> str:
    """``"kind: t1, t2, ..."``, the text of a :class:`~picomaml.data.corpora.SyntheticCorpus` document."""
    return f"{kind}: " + ", ".join(str(t) for t in terms)


def make_sequences(kind: str, n_terms: int, count: int, seed: int) -> list[NumericSequence]:
    """``count`` sequences of ``kind`` with exactly ``n_terms`` terms each, from the corpus generator.

    Empty when the kind cannot be that long (geometric beyond :data:`GEOMETRIC_MAX_TERMS`)."""
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"kind {kind!r}: choose from {', '.join(SYNTHETIC_KINDS)}")
    if kind == "geometric" and n_terms > GEOMETRIC_MAX_TERMS:
        return []
    rng = np.random.default_rng([seed, SYNTHETIC_KINDS.index(kind), n_terms])
    sequences = []
    for _ in range(count):
        # the training corpus's own rule for each kind (one generator, so train and eval agree)
        terms = SyntheticCorpus._terms(kind, n_terms, rng)
        assert len(terms) == n_terms, (kind, n_terms, len(terms))
        sequences.append(NumericSequence(kind, tuple(int(t) for t in terms)))
    return sequences


_TERM = re.compile(r"-?\d+")
_CONTINUATION_TERM = re.compile(r"(?:^ ?|, ?)(-?\d+)(?=,|$)")


def term_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the terms of a document (minus sign and digits), in order.

    Terms are read after the ``"kind: "`` prefix, so a digit in a kind name would never count."""
    start = text.index(": ") + 2 if ": " in text else 0
    return [(m.start() + start, m.end() + start) for m in _TERM.finditer(text[start:])]


def parse_continuation(text: str) -> list[int]:
    """The terms at the start of a generated continuation ``" 22, 27, 32"``, in order.

    Each term is an optional minus and digits, separated by ``","`` and one optional space, and ended by
    a comma or the end of the text; parsing stops at the first thing that is not such a term (so
    ``" 22, 27x"`` gives ``[22]``)."""
    terms, pos = [], 0
    while (match := _CONTINUATION_TERM.match(text, pos)) is not None:
        terms.append(int(match.group(1)))
        pos = match.end()
    return terms


# ---------------------------------------------------------------------------------------- scoring


def encode_with_number_mask(
    tokenizer: Any, sequence: NumericSequence, first_scored_term: int
) -> tuple[list[int], list[bool]]:
    """Token ids of ``[eos] + text`` and, per id, whether it is a scored number token (module docstring).

    The mask marks tokens whose character span overlaps the span of a term with index >=
    ``first_scored_term``; the eos, the kind prefix and the commas are never marked."""
    text = sequence.text
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    spans = term_spans(text)[first_scored_term:]
    ids = [tokenizer.eos_token_id, *encoded["input_ids"]]
    mask = [False]
    for a, b in encoded["offset_mapping"]:
        mask.append(any(a < e and s < b for s, e in spans))
    return ids, mask


@torch.no_grad()
def number_token_hits(
    model: LogitsFn, rows: Sequence[tuple[list[int], list[bool]]], pad_id: int, device: Any, batch_size: int
) -> tuple[int, int]:
    """(correct, scored) number tokens over ``rows`` of (ids, mask): the argmax at position t-1 against
    token t, for every t whose mask is set. Rows are right-padded; a causal model never reads the pads
    for real positions."""
    correct = scored = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for i, (row_ids, row_mask) in enumerate(chunk):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            mask[i, : len(row_mask)] = torch.tensor(row_mask)
        target_mask = mask[:, 1:]  # token t (t >= 1) is predicted at position t - 1
        inputs = ids[:, :-1].to(device)
        if isinstance(model, PicoDecoder):
            # the vocabulary projection only where a number token is predicted ([N, V], not [B, T, V])
            hidden = model.hidden_states(inputs)[target_mask.to(device)]
            predicted = model.de_embedding_proj(hidden).argmax(dim=-1).cpu()
        else:
            predicted = model(inputs).argmax(dim=-1).cpu()[target_mask]
        correct += int((predicted == ids[:, 1:][target_mask]).sum())
        scored += int(target_mask.sum())
    return correct, scored


@torch.no_grad()
def greedy_continue(
    model: LogitsFn, prompts: Sequence[list[int]], max_new: Sequence[int], eos_id: int, device: Any
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token ids), ``max_new[i]`` tokens each at most, stopping at eos.

    Prompts of equal length are decoded together: a PicoDecoder with KV-cached
    :func:`~picomaml.model.generation.generate`, any other :data:`LogitsFn` by re-running the whole
    sequence each step (``generate``'s ``use_cache=False`` path, which gives the same tokens)."""
    out: list[list[int]] = [[] for _ in prompts]
    groups: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(len(prompt), []).append(i)
    for members in groups.values():
        tokens = torch.tensor([prompts[i] for i in members], dtype=torch.long, device=device)
        steps = max(max_new[i] for i in members)
        if isinstance(model, PicoDecoder):
            tokens = generate(model, tokens, max_new_tokens=steps, eos_token_id=eos_id)
        else:
            done = torch.zeros(len(members), dtype=torch.bool, device=device)
            for _ in range(steps):
                next_ids = model(tokens)[:, -1].argmax(dim=-1)
                next_ids = torch.where(done, eos_id, next_ids)
                done |= next_ids == eos_id
                tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
                if bool(done.all()):
                    break
        for row, i in enumerate(members):
            new = tokens[row, len(prompts[i]) :].tolist()[: max_new[i]]
            out[i] = new[: new.index(eos_id)] if eos_id in new else new
    return out


def continuation_scores(
    model: LogitsFn,
    tokenizer: Any,
    sequences: Sequence[NumericSequence],
    n: int,
    device: Any,
    max_seq_len: int | None = None,
) -> list[tuple[bool, float]]:
    """(exact match, fraction of the ``n`` terms right) of the greedy continuation of each sequence's
    last ``n`` terms (module docstring). ValueError when a prompt and its continuation do not fit in
    ``max_seq_len``."""
    prompts, budgets, truths = [], [], []
    for seq in sequences:
        head, tail = seq.terms[:-n], seq.terms[-n:]
        prompt = [tokenizer.eos_token_id, *tokenizer.encode(render(seq.kind, head) + ",")]
        target = tokenizer.encode(" " + ", ".join(str(t) for t in tail))
        budget = len(target) + CONTINUATION_SLACK
        if max_seq_len is not None and len(prompt) + budget > max_seq_len:
            raise ValueError(
                f"a {seq.kind} sequence of {len(seq.terms)} terms needs {len(prompt) + budget} positions, "
                f"more than model.max_seq_len={max_seq_len}: lower numeric.lengths"
            )
        prompts.append(prompt)
        budgets.append(budget)
        truths.append(list(tail))
    generated = greedy_continue(model, prompts, budgets, tokenizer.eos_token_id, device)
    scores = []
    for ids, truth in zip(generated, truths, strict=True):
        terms = parse_continuation(tokenizer.decode(ids))[:n]
        right = sum(a == b for a, b in zip(terms, truth, strict=False))
        scores.append((terms == truth, right / n))
    return scores


def evaluate_numeric(
    model: LogitsFn,
    tokenizer: Any,
    config: NumericConfig,
    train_terms: int,
    kinds: Sequence[str] = SYNTHETIC_KINDS,
    device: Any = "cpu",
    max_seq_len: int | None = None,
) -> dict[str, float]:
    """Per-kind number-token accuracy and continuation exact match at ``m * train_terms`` terms for
    every ``m`` in ``config.lengths``, and their macro-average ``all`` (keys in the module docstring)."""
    config.check_train_terms(train_terms)
    n = config.continuation_terms
    results: dict[str, float] = {"numeric/train_terms": float(train_terms), "numeric/continuation_terms": n}
    scored_at: dict[int, set[str]] = {}
    for m in config.lengths:
        n_terms = m * train_terms
        results[f"numeric/x{m}/terms"] = float(n_terms)
        scored_at[m] = set()
        for kind in kinds:
            sequences = make_sequences(kind, n_terms, config.per_kind, config.seed)
            if not sequences:
                continue
            rows = [encode_with_number_mask(tokenizer, s, config.first_scored_term) for s in sequences]
            correct, scored = number_token_hits(
                model, rows, tokenizer.pad_token_id, device, config.batch_size
            )
            cont = continuation_scores(model, tokenizer, sequences, n, device, max_seq_len)
            prefix = f"numeric/{kind}/x{m}"
            results[f"{prefix}/token_acc"] = correct / scored
            results[f"{prefix}/exact"] = float(np.mean([exact for exact, _ in cont]))
            results[f"{prefix}/term_acc"] = float(np.mean([frac for _, frac in cont]))
            results[f"{prefix}/n_seqs"] = float(len(sequences))
            results[f"{prefix}/n_tokens"] = float(scored)
            scored_at[m].add(kind)
    common = [k for k in kinds if all(k in s for s in scored_at.values())]
    for m in config.lengths:
        for metric in ("token_acc", "exact", "term_acc"):
            values = [results[f"numeric/{k}/x{m}/{metric}"] for k in common]
            if values:
                results[f"numeric/all/x{m}/{metric}"] = float(np.mean(values))
    results["numeric/all/n_kinds"] = float(len(common))
    return results


def run_numeric_setup(train_config: Any, config: NumericConfig) -> tuple[int, tuple[str, ...]]:
    """(L, kinds) for a run: the config's when set, else the run's synthetic corpus options; ValueError
    naming the key when the run was not trained on ``data=synthetic`` and L is not given."""
    data = train_config.data
    synthetic = data.get("corpus") == "synthetic"
    options = (data.get("corpus_options") or {}) if synthetic else {}
    train_terms = config.train_terms
    if train_terms is None:
        if not synthetic:
            raise ValueError(
                f"the numeric suite scores number sequences; this run was trained on "
                f"data.corpus={data.get('corpus')!r}: set numeric train_terms (L) to score it anyway"
            )
        train_terms = int(options.get("max_terms", SyntheticCorpus.max_terms))
    kinds = config.kinds or tuple(options.get("kinds") or SYNTHETIC_KINDS)
    return int(train_terms), tuple(str(k) for k in kinds)
