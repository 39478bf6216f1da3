"""Preference pairs cut from a corpus, and the data module that serves them to DPO.

A pair is a prompt x (the start of a document), a chosen response y_w (the document's true
continuation) and a rejected response y_l, a corrupted continuation (``stage.corruption``):

- ``shuffle``: the true continuation's tokens, permuted (same tokens, wrong order);
- ``other_doc``: another document's tokens at the same position (fluent text, wrong document);
- ``wrong_term``: for ``data=synthetic`` number sequences ("arithmetic: 7, 12, 17"), the next term is
  the true one plus or minus 7..19, so it breaks every rule of the corpus, the +-1..3 random walk
  included, while keeping the format.

Splits are by document, and follow the data module's own split (``picomaml.data.packing``), so the
pairs never hand DPO the text a model was validated on:

- **train** pairs come from the data module's train documents;
- **val** and **test** pairs come from its validation documents, which are divided in two by a seeded
  per-document hash (``stage.test_share`` of them are test).

A rejected continuation from another document (``other_doc``) is taken within the same split, so no
pair mixes text of two splits. Everything is seeded by ``stage.pair_seed`` and the document's id, so the
same config gives the same pairs on every machine and every rank.

A batch of B pairs is ``{"tokens": Long[2B, T + 1], "response_mask": Bool[2B, T], "microbatch": Long[]}``:
rows ``0..B-1`` are prompt + chosen, rows ``B..2B-1`` prompt + rejected, right-padded with the pad token
(a causal model never looks ahead, so right padding changes nothing before it), and
``response_mask[n, t]`` marks the labels ``tokens[n, t + 1]`` that belong to the response.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from picomaml.align.config import DPOStage
from picomaml.data.datamodule import PackedOrder, PicoDataModule
from picomaml.data.packing import TokenStream, document_uniforms

PAIR_SPLITS = ("train", "val", "test")
_SEQUENCE = re.compile(r"^([a-z_]+): (-?\d+(?:, -?\d+)*)$")
# stream ids for the per-document random generators, so val and test pairs of one document never share
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class PreferencePair:
    """Token ids (int64) of one pair, and the corpus id of the document it was cut from."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    doc_id: int

    def __len__(self) -> int:
        """Tokens of the longer of prompt + chosen and prompt + rejected."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def documents(stream: TokenStream) -> list[tuple[int, np.ndarray]]:
    """``(corpus doc id, tokens without the closing eos)`` of every document of a split."""
    return [
        (int(stream.doc_ids[k]), np.asarray(stream.document(k)[:-1], dtype=np.int64))
        for k in range(stream.n_docs)
    ]


def held_out_test_mask(doc_ids: np.ndarray, test_share: float, seed: int) -> np.ndarray:
    """Which held-out documents give test pairs (the rest give validation pairs): a per-document hash
    of ``(doc id, seed)``, so the division does not depend on which other documents are held out."""
    if len(doc_ids) == 0:
        return np.zeros(0, dtype=bool)
    # a seed stream apart from the data split's own (picomaml.data.packing uses data.seed)
    u = document_uniforms(int(doc_ids.max()) + 1, seed + 0x5EED)
    return u[doc_ids] < test_share


def token_pairs(
    docs: list[tuple[int, np.ndarray]],
    corruption: str,
    prompt_tokens: int,
    response_tokens: int,
    seed: int,
    split: str,
) -> list[PreferencePair]:
    """``shuffle`` or ``other_doc`` pairs: prompt = a document's first ``prompt_tokens`` tokens, chosen =
    the next ``response_tokens``. Documents too short for both are skipped, as are documents whose
    corruption cannot differ from the truth (a continuation of one repeated token)."""
    width = prompt_tokens + response_tokens
    usable = [(doc_id, tokens) for doc_id, tokens in docs if len(tokens) >= width]
    pairs = []
    for k, (doc_id, tokens) in enumerate(usable):
        rng = np.random.default_rng([seed, doc_id, _SPLIT_CODES[split]])
        prompt, chosen = tokens[:prompt_tokens], tokens[prompt_tokens:width]
        rejected = None
        for _ in range(8):  # a permutation or a partner may equal the truth by chance: draw again
            if corruption == "shuffle":
                candidate = chosen[rng.permutation(len(chosen))]
            elif len(usable) > 1:
                j = int(rng.integers(len(usable) - 1))
                candidate = usable[j + (j >= k)][1][prompt_tokens:width]
            else:
                break
            if not np.array_equal(candidate, chosen):
                rejected = candidate
                break
        if rejected is not None:
            pairs.append(PreferencePair(prompt.copy(), chosen.copy(), rejected.copy(), doc_id))
    return pairs


def wrong_term_pairs(
    docs: list[tuple[int, np.ndarray]], tokenizer: Any, min_prompt_terms: int, seed: int, split: str
) -> list[PreferencePair]:
    """``wrong_term`` pairs from synthetic number sequences: the prompt shows the rule's name and the
    first i terms (i drawn from ``min_prompt_terms .. n - 1``), chosen is ``", <term i+1>"``, rejected
    ``", <term i+1 +- 7..19>"``. Documents that are not such sequences, or too short, are skipped."""
    pairs = []
    for doc_id, tokens in docs:
        match = _SEQUENCE.match(tokenizer.decode(tokens.tolist()))
        if match is None:
            continue
        kind, terms = match.group(1), match.group(2).split(", ")
        if len(terms) <= min_prompt_terms:
            continue
        rng = np.random.default_rng([seed, doc_id, _SPLIT_CODES[split]])
        shown = int(rng.integers(min_prompt_terms, len(terms)))
        true = int(terms[shown])
        wrong = true + int(rng.choice([-1, 1])) * int(rng.integers(7, 20))
        prompt = f"{kind}: " + ", ".join(terms[:shown])
        encoded = [
            np.asarray(tokenizer.encode(t, add_special_tokens=False), dtype=np.int64)
            for t in (prompt, f", {true}", f", {wrong}")
        ]
        pairs.append(PreferencePair(*encoded, doc_id=doc_id))
    return pairs


def build_pairs(data: PicoDataModule, stage: DPOStage) -> dict[str, list[PreferencePair]]:
    """The train, val and test pairs of ``data``'s corpus (module docstring). Raises ValueError naming the
    keys to change when a split gets no pair."""
    packed = data.packed
    held_out = documents(packed.val.stream)
    is_test = held_out_test_mask(
        np.asarray([d for d, _ in held_out], dtype=np.int64), stage.test_share, stage.pair_seed
    )
    by_split = {
        "train": documents(packed.train.stream),
        "val": [doc for doc, test in zip(held_out, is_test, strict=True) if not test],
        "test": [doc for doc, test in zip(held_out, is_test, strict=True) if test],
    }
    pairs = {}
    for split, docs in by_split.items():
        if stage.corruption == "wrong_term":
            pairs[split] = wrong_term_pairs(
                docs, data.tokenizer, stage.min_prompt_terms, stage.pair_seed, split
            )
        else:
            pairs[split] = token_pairs(
                docs, stage.corruption, stage.prompt_tokens, stage.response_tokens, stage.pair_seed, split
            )
        if not pairs[split]:
            where = "data.val_fraction (held-out documents)" if split != "train" else "the corpus"
            what = (
                "number sequences longer than stage.min_prompt_terms"
                if stage.corruption == "wrong_term"
                else f"documents of >= stage.prompt_tokens + stage.response_tokens = "
                f"{stage.prompt_tokens + stage.response_tokens} tokens"
            )
            raise ValueError(
                f"stage.corruption={stage.corruption}: no {split} preference pair: {len(docs)} {split} "
                f"documents hold no {what}; raise {where}, or lower the lengths"
            )
    if stage.max_train_pairs is not None:
        pairs["train"] = pairs["train"][: stage.max_train_pairs]
    return pairs


def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of pairs (module docstring): chosen rows first, then rejected rows, right-padded."""
    sequences = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    width = max(len(prompt) + len(response) for prompt, response in sequences)
    tokens = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width - 1), dtype=bool)
    for row, (prompt, response) in enumerate(sequences):
        end = len(prompt) + len(response)
        tokens[row, : len(prompt)] = prompt
        tokens[row, len(prompt) : end] = response
        mask[row, len(prompt) - 1 : end - 1] = True  # label t is token t + 1
    return {"tokens": torch.from_numpy(tokens), "response_mask": torch.from_numpy(mask)}


class PairMicrobatches(IterableDataset):
    """This rank's slice of global micro-batches ``start, start + 1, ...`` of training pairs, in a fresh
    seeded order every epoch (the same order contract as :class:`~picomaml.data.PicoDataModule`)."""

    def __init__(
        self,
        pairs: list[PreferencePair],
        pad_id: int,
        seed: int,
        start: int,
        batch_size: int,
        rank: int,
        world_size: int,
    ) -> None:
        self.pairs = pairs
        self.pad_id = pad_id
        self.order = PackedOrder(np.arange(len(pairs)), seed)
        self.start = start
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        offsets = self.rank * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        for m in itertools.count(self.start):
            positions = m * self.batch_size * self.world_size + offsets
            batch = collate_pairs([self.pairs[i] for i in self.order.rows_at(positions)], self.pad_id)
            batch["microbatch"] = torch.tensor(m, dtype=torch.long)
            yield batch


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs from the corpus of ``data`` (a :class:`~picomaml.data.PicoDataModule`, which
    tokenizes, splits and caches it), ``data.batch_size`` pairs per micro-batch.

    Training is an infinite, resumable stream (``next_microbatch`` is checkpoint state); validation and
    test are every val and test pair once, in a fixed order.
    """

    def __init__(self, data: PicoDataModule, stage: DPOStage) -> None:
        super().__init__()
        self.data = data
        self.stage = stage
        self.batch_size = data.batch_size
        self.next_microbatch = 0
        self._pairs: dict[str, list[PreferencePair]] | None = None

    @property
    def tokenizer(self) -> Any:
        """The corpus tokenizer (step checkpoints save it beside the Hugging Face export)."""
        return self.data.tokenizer

    @property
    def pairs(self) -> dict[str, list[PreferencePair]]:
        """``{"train", "val", "test"}`` pairs, built on first use."""
        if self._pairs is None:
            self._pairs = build_pairs(self.data, self.stage)
        return self._pairs

    def check(self) -> None:
        """Read the corpus and build every pair now: a config that yields none fails before training."""
        if self.data.corpus is None:
            raise ValueError(
                "data=dolma is streamed without documents to cut pairs from; use wiki, text or synthetic"
            )
        if self.stage.corruption == "wrong_term" and self.data.corpus_name != "synthetic":
            raise ValueError(
                f"stage.corruption=wrong_term needs data=synthetic (number sequences), got data.corpus="
                f"{self.data.corpus_name}; use shuffle or other_doc"
            )
        self.data.check()
        _ = self.pairs

    @property
    def max_len(self) -> int:
        """Tokens of the longest pair sequence (prompt + response) of any split."""
        return max(len(p) for split in self.pairs.values() for p in split)

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._rank_and_world_size()
        dataset = PairMicrobatches(
            self.pairs["train"],
            self.data.pad_token_id,
            self.stage.pair_seed,
            self.next_microbatch,
            self.batch_size,
            rank,
            world_size,
        )
        return DataLoader(dataset, batch_size=None)

    def eval_batches(self, split: str) -> list[dict[str, torch.Tensor]]:
        """This rank's share of the ``split`` pairs, in batches (every pair once over all ranks)."""
        rank, world_size = self._rank_and_world_size()
        pairs = self.pairs[split]
        chunks = [pairs[i : i + self.batch_size] for i in range(0, len(pairs), self.batch_size)]
        return [collate_pairs(chunk, self.data.pad_token_id) for chunk in chunks[rank::world_size]]

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.eval_batches("val"), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.eval_batches("test"), batch_size=None)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # a micro-batch counts as consumed once it reaches the training step (resume continues after it)
        if self.trainer is not None and self.trainer.training and "microbatch" in batch:
            self.next_microbatch = int(batch["microbatch"]) + 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"next_microbatch": self.next_microbatch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_microbatch = int(state_dict["next_microbatch"])
