"""``PicoDataModule``: one LightningDataModule for every corpus, with a model-independent batch order.

The order contract (what makes runs comparable across model sizes and resumable exactly):

- Training is an infinite sequence of **global micro-batches** m = 0, 1, 2, ... Micro-batch m covers
  positions ``[m*B*W, (m+1)*B*W)`` of an infinite stream of training rows (B = per-device
  ``batch_size``, W = world size). Rank r takes the slice ``[r*B, (r+1)*B)``.
- Packed corpora (wiki, text, synthetic): position p is row ``perm_e[p % n_rows]`` where
  ``e = p // n_rows`` is the epoch and ``perm_e`` a permutation seeded by ``(seed, e)``.
  Dolma: position p is dataset row ``p % n_train_rows`` (the dataset is pre-shuffled).
- The order depends on (corpus, tokenizer, seq_len, seed, B, W) only. Resuming at micro-batch k
  yields exactly the batches a fresh run yields from k on, with any ``num_workers``.

A batch is ``{"tokens": LongTensor[B, seq_len + 1], "microbatch": LongTensor[]}``; inputs are
``tokens[:, :-1]`` and labels ``tokens[:, 1:]``. Validation batches add ``"doc_ids"`` (the corpus
document of every token) for per-document perplexity.

Three disjoint sets of documents (whole shards for Dolma), fixed by the data config alone, never by the
model or the meta config:

- **train**: the AR stream, and the text meta-train SMLMT episodes are cut from (meta-train words only);
- **val**: language-model validation;
- **meta_test** (``meta_test_fraction``; Dolma: ``corpus_options.meta_test_shards``): text AR training
  never sees, the only text meta-test episodes are cut from, with held-out words only
  (``meta.meta_test_fraction``, a split of word types). Meta-test accuracy thus measures unseen words
  in unseen text: a model cannot score there by having memorised its training documents.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerFast

from picomaml.data import dolma
from picomaml.data.corpora import CORPORA, make_corpus
from picomaml.data.episodes import HybridMicrobatches, MetaEpisodes, meta_val_batches
from picomaml.data.packing import PackedCorpus, TokenStream, load_packed
from picomaml.data.tokenizer import TOKENIZER_NAMES, load_tokenizer
from picomaml.meta import MetaBatchDataset, MetaConfig, WordIndex

log = logging.getLogger(__name__)

CORPUS_NAMES = (*CORPORA, "dolma")
_DEFAULT_CACHE_DIR = Path("~/.cache/picomaml").expanduser()
_DOLMA_STREAM_TOKENS = 1 << 20


class PackedOrder:
    """Row order of a packed split: a fresh seeded permutation per epoch over ``rows``."""

    def __init__(self, rows: np.ndarray, seed: int) -> None:
        self.rows = rows
        self.seed = seed
        self._permutations: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            # A micro-batch spans at most two epochs; older permutations are never needed again.
            if len(self._permutations) >= 2:
                del self._permutations[min(self._permutations)]
            rng = np.random.default_rng((self.seed, epoch))
            self._permutations[epoch] = rng.permutation(len(self.rows))
        return self._permutations[epoch]

    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        """Rows at stream positions (any epoch), as int64 ``[len(positions), seq_len + 1]``."""
        epochs, within = np.divmod(positions, len(self.rows))
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            hit = epochs == epoch
            indices[hit] = self.permutation(int(epoch))[within[hit]]
        return self.rows[indices].astype(np.int64)


def _worker_share() -> tuple[int, int]:
    """(this worker's index, number of workers) inside a DataLoader, (0, 1) outside one."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _batch(tokens: np.ndarray, microbatch: int) -> dict[str, torch.Tensor]:
    return {"tokens": torch.from_numpy(tokens), "microbatch": torch.tensor(microbatch, dtype=torch.long)}


class PackedMicrobatches(IterableDataset):
    """This rank's slice of global micro-batches ``start, start + 1, ...`` of a packed corpus.

    DataLoader workers take micro-batches round-robin (worker w of K serves m = start + w + jK), which is
    the order in which the DataLoader collects them, so every ``num_workers`` yields the same sequence.
    """

    def __init__(self, order: PackedOrder, start: int, batch_size: int, rank: int, world_size: int) -> None:
        self.order = order
        self.start = start
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, n_workers = _worker_share()
        offsets = self.rank * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        for m in itertools.count(self.start + worker, n_workers):
            positions = m * self.batch_size * self.world_size + offsets
            yield _batch(self.order.rows_at(positions), m)


class DolmaMicrobatches(IterableDataset):
    """This rank's slice of global micro-batches ``start, start + 1, ...`` streamed from Dolma.

    Each rank (and worker) reads the global stream and keeps its slice: the cost is reading W times the
    rows it trains on, which is small next to a forward pass, and it keeps the order exact.
    """

    def __init__(
        self, source: dolma.DolmaSource, width: int, start: int, batch_size: int, rank: int, world_size: int
    ) -> None:
        self.source = source
        self.width = width
        self.start = start
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, n_workers = _worker_share()
        global_batch = self.batch_size * self.world_size
        first = self.start + worker
        reader = dolma.RowReader(self.source, first * global_batch + self.rank * self.batch_size, self.width)
        # From the end of this rank's slice to its slice in this worker's next micro-batch.
        gap = global_batch * n_workers - self.batch_size
        for m in itertools.count(first, n_workers):
            yield _batch(reader.take(self.batch_size), m)
            reader.skip(gap)


class PicoDataModule(L.LightningDataModule):
    """Data for picomaml runs: tokenized, packed, cached, served in a resumable global order.

    Args:
        corpus: ``wiki`` (embedded Wikipedia leads), ``text`` (local files), ``synthetic`` (number
            sequences) or ``dolma`` (pico's pretokenized Dolma, streamed from the Hub).
        corpus_options: options of the chosen corpus (see ``WikiCorpus``, ``TextCorpus``,
            ``SyntheticCorpus``, ``dolma.DolmaSource``); an unknown key raises ValueError.
        tokenizer: ``gpt2`` (embedded) or ``olmo`` (required by ``dolma``).
        seq_len: tokens of model input per row; rows hold ``seq_len + 1`` tokens.
        batch_size: per-device micro-batch size B.
        val_fraction: fraction of documents held out for validation (packed corpora; Dolma holds out
            whole shards, ``corpus_options.val_shards``).
        meta_test_fraction: fraction of documents held out of AR training for meta-test episodes
            (packed corpora; Dolma: ``corpus_options.meta_test_shards``). Documents, not words: the
            held-out word types are ``meta.meta_test_fraction``. It does not depend on whether
            meta-learning is on, so AR-only and hybrid runs train on the same text and both can be
            scored on meta-test episodes. 0 is allowed, but then meta-learning and meta-test
            evaluation refuse to run. The 0.15 default holds out ~1,450 wiki articles (~150k tokens),
            where 126-153 held-out words (data seeds 0-4, split seeds 0-1) are eligible for 5-way 4+4-shot.
        val_batches: fixed number of validation micro-batches per validation run.
        num_workers: DataLoader workers for training batches (validation is served in-process).
        seed: seeds the document split (val, meta_test) and the per-epoch row permutations; not the model.
        cache_dir: where packed corpora are cached (``<cache_dir>/packed/*.arrow``).
    """

    def __init__(
        self,
        corpus: str = "wiki",
        corpus_options: Mapping[str, Any] | None = None,
        tokenizer: str = "gpt2",
        seq_len: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.02,
        meta_test_fraction: float = 0.15,
        val_batches: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if corpus not in CORPUS_NAMES:
            raise ValueError(f"data.corpus: unknown corpus {corpus!r}; allowed: {', '.join(CORPUS_NAMES)}")
        if tokenizer not in TOKENIZER_NAMES:
            raise ValueError(
                f"data.tokenizer: unknown tokenizer {tokenizer!r}; allowed: {', '.join(TOKENIZER_NAMES)}"
            )
        for key, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"data.{key} must be a positive integer, got {value!r}")
        for key, value in (("val_batches", val_batches), ("num_workers", num_workers)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"data.{key} must be a non-negative integer, got {value!r}")
        for key, value in (("val_fraction", val_fraction), ("meta_test_fraction", meta_test_fraction)):
            if not 0 <= value < 1:
                raise ValueError(f"data.{key} must be in [0, 1), got {value!r}")
        options = dict(corpus_options or {})
        if corpus == "dolma":
            self.source: dolma.DolmaSource | None = self._dolma_source(options, tokenizer, seq_len)
            self.corpus = None
        else:
            if val_batches > 0 and val_fraction == 0:
                raise ValueError("data.val_fraction must be > 0 when data.val_batches > 0")
            if val_fraction + meta_test_fraction >= 1:
                raise ValueError(
                    f"data.val_fraction={val_fraction} + data.meta_test_fraction={meta_test_fraction} "
                    "must be < 1 to leave documents for training"
                )
            self.source = None
            self.corpus = make_corpus(corpus, options)
        self.corpus_name = corpus
        self.tokenizer_name = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.meta_test_fraction = meta_test_fraction
        self.val_batches = val_batches
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else _DEFAULT_CACHE_DIR
        self.next_microbatch = 0
        self.meta: MetaConfig | None = None
        self._meta_train: MetaBatchDataset | None = None
        self._meta_test: MetaBatchDataset | None = None
        self._packed: PackedCorpus | None = None
        self._dolma_val_rows: np.ndarray | None = None

    @staticmethod
    def _dolma_source(options: dict[str, Any], tokenizer: str, seq_len: int) -> dolma.DolmaSource:
        allowed = [f.name for f in dataclasses.fields(dolma.DolmaSource)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"corpus_options: unknown key(s) {unknown} for corpus 'dolma'; allowed: {allowed}"
            )
        if tokenizer != "olmo":
            raise ValueError(
                f"data.tokenizer must be 'olmo' for corpus 'dolma' (its ids are OLMo's), got {tokenizer!r}"
            )
        source = dolma.DolmaSource(**options)
        if seq_len > source.row_len - 1:
            raise ValueError(f"data.seq_len={seq_len} exceeds Dolma rows ({source.row_len - 1} input tokens)")
        return source

    # -- tokenizer ---------------------------------------------------------------------------------

    @functools.cached_property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The tokenizer (loaded on first use: ``olmo`` needs the Hub or its cache)."""
        return load_tokenizer(self.tokenizer_name)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (special tokens included), <= 50304."""
        return len(self.tokenizer)

    @property
    def mask_token_id(self) -> int:
        return self.tokenizer.mask_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    # -- building and loading ------------------------------------------------------------------------

    def check(self) -> None:
        """Read the data now, so that what is wrong with it fails before training, in one line.

        ``prepare_run`` calls this for every run, AR-only or not. Packed corpora are built (or loaded
        from the cache) and kept; a ValueError names the config key, and the file where one is at
        fault: a glob that matches nothing, an empty, binary or non-UTF-8 file, a JSON line that is not
        JSON or lacks ``data.corpus_options.text_key``, a corrupt Parquet file, a split left without
        documents, or a corpus with too few tokens for one training row plus the validation rows.
        Dolma is streamed from the Hub shard by shard, so nothing is read here.
        """
        if self.corpus is None:
            return
        packed = self.packed
        width = self.seq_len + 1
        val_rows = self.val_batches * self.batch_size
        n_tokens = sum(len(s.stream.tokens) for s in (packed.train, packed.val, packed.meta_test))
        needed = (1 + val_rows) * width
        if n_tokens < needed:
            raise ValueError(
                f"data.seq_len={self.seq_len}: {self.corpus.describe()} has {n_tokens} tokens, fewer than "
                f"the {needed} that one training row and data.val_batches={self.val_batches} x "
                f"data.batch_size={self.batch_size} validation rows of data.seq_len + 1 = {width} tokens "
                "need; add text, or lower data.seq_len, data.val_batches or data.batch_size"
            )
        n_train = len(packed.train.stream.tokens)
        if n_train < width:
            raise ValueError(
                f"data.val_fraction={self.val_fraction} and data.meta_test_fraction="
                f"{self.meta_test_fraction} leave {n_train} training tokens of the {n_tokens} in "
                f"{self.corpus.describe()}, fewer than one row of data.seq_len + 1 = {width} tokens; "
                "lower them, lower data.seq_len, or add text"
            )

    def prepare_data(self) -> None:
        """Build the packed cache once (Lightning calls this on one process per node)."""
        if self.corpus is not None and self._packed is None:
            self._load()

    def setup(self, stage: str | None = None) -> None:
        if self.corpus is not None and self._packed is None:
            self._packed = self._load()

    def _load(self) -> PackedCorpus:
        return load_packed(
            self.corpus,
            self.tokenizer,
            self.tokenizer_name,
            self.seq_len,
            self.val_fraction,
            self.seed,
            self.cache_dir,
            meta_test_fraction=self.meta_test_fraction,
        )

    @property
    def packed(self) -> PackedCorpus:
        """The packed train/val/meta_test splits of a packed corpus (loaded from the cache on first use)."""
        if self.corpus is None:
            raise RuntimeError("corpus 'dolma' is streamed, not packed")
        self.setup()
        return self._packed

    # -- order ---------------------------------------------------------------------------------------

    def rank_and_world_size(self) -> tuple[int, int]:
        """(rank, world size) from the attached Trainer, else torch.distributed, else (0, 1)."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _train_dataset(self, start: int, rank: int, world_size: int) -> IterableDataset:
        if self.source is not None:
            return DolmaMicrobatches(self.source, self.seq_len + 1, start, self.batch_size, rank, world_size)
        return PackedMicrobatches(
            PackedOrder(self.packed.train.rows, self.seed), start, self.batch_size, rank, world_size
        )

    def train_batches(
        self, start: int = 0, rank: int | None = None, world_size: int | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Training micro-batches ``start, start + 1, ...`` (infinite), in this process, no DataLoader.

        ``rank``/``world_size`` default to :meth:`rank_and_world_size`.
        """
        default_rank, default_world = self.rank_and_world_size()
        dataset = self._train_dataset(
            start, default_rank if rank is None else rank, default_world if world_size is None else world_size
        )
        return iter(dataset)

    def setup_meta(self, meta: MetaConfig) -> None:
        """Serve SMLMT meta-batches beside the AR batches (see :mod:`picomaml.data.episodes`).

        Builds both word indexes now, so a corpus that cannot supply ``k_shot + q_query`` windows for
        ``n_way`` words fails before training: meta-train over the first ``meta.buffer_tokens`` tokens
        of the AR training stream (meta-train words), meta-test over as many tokens of the held-out
        meta-test documents (held-out words; see :meth:`meta_test_dataset`).
        """
        # read first: a data config that holds out no text fails on that, not on a count of words
        test_stream = self.meta_test_token_stream(max_tokens=meta.buffer_tokens)
        train_index = self._word_index(meta, self.train_token_stream(max_tokens=meta.buffer_tokens))
        meta_train = MetaBatchDataset(train_index, meta, seed=self.seed)
        test_index = self._word_index(meta, test_stream)
        meta_test = MetaBatchDataset(test_index, meta, seed=self.seed, meta_test=True)
        self.meta = meta
        self._meta_train, self._meta_test = meta_train, meta_test

    def meta_test_dataset(self, meta: MetaConfig, seed: int) -> MetaBatchDataset:
        """Meta-test episodes of ``meta``, seeded by ``seed``: what validation, ``evaluate`` and the
        periodic evaluation score.

        Classes are held-out words (``meta.meta_test_fraction``) and windows are cut from the held-out
        meta-test documents (the first ``meta.buffer_tokens`` of :meth:`meta_test_token_stream`), which
        AR training never sees. Raises ValueError when no documents are held out for meta-test
        (``meta_test_fraction=0``) or they hold too few held-out words for ``n_way`` classes.
        """
        stream = self.meta_test_token_stream(max_tokens=meta.buffer_tokens)
        return MetaBatchDataset(self._word_index(meta, stream), meta, seed=seed, meta_test=True)

    def _word_index(self, meta: MetaConfig, stream: TokenStream) -> WordIndex:
        return WordIndex.build(
            np.asarray(stream.tokens),
            self.tokenizer,
            meta,
            mask_id=self.mask_token_id,
            pad_id=self.pad_token_id,
        )

    @property
    def meta_train_episodes(self) -> MetaBatchDataset | None:
        """Meta-train meta-batches (meta-train words in AR training text); None unless :meth:`setup_meta`
        ran."""
        return self._meta_train

    @property
    def meta_test_episodes(self) -> MetaBatchDataset | None:
        """Meta-test meta-batches (held-out words in held-out documents), for evaluation; None unless
        :meth:`setup_meta` ran."""
        return self._meta_test

    def train_dataloader(self) -> DataLoader:
        """Infinite loader from ``next_microbatch`` (0, or the value restored from a checkpoint).

        Stop training with ``max_steps``; the Trainer must use ``use_distributed_sampler=False``
        because the rank slicing happens here. With meta-learning set up, items are
        ``{"ar": <micro-batch>, "meta": <meta-batch>}``.
        """
        rank, world_size = self.rank_and_world_size()
        dataset = self._train_dataset(self.next_microbatch, rank, world_size)
        if self._meta_train is not None:
            meta = MetaEpisodes(self._meta_train, self.next_microbatch, rank, world_size)
            dataset = HybridMicrobatches(dataset, meta)
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def _val_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The validation rows served, in order, and the document id of each of their tokens."""
        _, world_size = self.rank_and_world_size()
        global_batch = self.batch_size * world_size
        n_rows = self.val_batches * global_batch
        if self.source is not None:
            if self._dolma_val_rows is None:
                self._dolma_val_rows = dolma.read_val_rows(self.source, n_rows, self.seq_len + 1)
            rows = self._dolma_val_rows
            is_eos = rows.reshape(-1) == self.source.eos_token_id
            # A token belongs to the document its next eos closes; the eos belongs to it too.
            doc_ids = (np.cumsum(is_eos) - is_eos).reshape(rows.shape)
            return rows, doc_ids
        val = self.packed.val
        if n_rows > val.n_rows:
            log.warning(
                "val_batches=%d x %d rows exceeds the %d validation rows; rows repeat",
                self.val_batches,
                global_batch,
                val.n_rows,
            )
        indices = np.arange(n_rows) % val.n_rows
        return val.rows[indices].astype(np.int64), val.row_doc_ids(indices)

    def val_batches_list(self) -> list[dict[str, torch.Tensor]]:
        """This rank's validation micro-batches: the first ``val_batches`` of the val rows, fixed order."""
        if self.val_batches == 0:
            return []
        rank, world_size = self.rank_and_world_size()
        rows, doc_ids = self._val_rows()
        batches = []
        for v in range(self.val_batches):
            lo = (v * world_size + rank) * self.batch_size
            batch = _batch(rows[lo : lo + self.batch_size], v)
            batch["doc_ids"] = torch.from_numpy(doc_ids[lo : lo + self.batch_size])
            batches.append(batch)
        return batches

    def val_dataloader(self) -> DataLoader | list:
        """The validation micro-batches (none when ``val_batches`` is 0); with meta-learning set up, a
        second loader of fixed meta-test meta-batches (dataloader_idx 1)."""
        batches = self.val_batches_list()
        ar = DataLoader(batches, batch_size=None) if batches else []
        if self._meta_test is None or self.meta is None or self.meta.val_episodes == 0:
            return ar
        rank, world_size = self.rank_and_world_size()
        meta = meta_val_batches(self._meta_test, self.meta.val_episodes, rank, world_size)
        return [ar, DataLoader(meta, batch_size=None)]

    # -- streams for evaluation and the meta-learning sampler --------------------------------------------

    def train_token_stream(self, max_tokens: int | None = None) -> TokenStream:
        """The training split as one token stream (eos after each document) with document offsets.

        Packed corpora: the whole split (memory-mapped from the cache, no copy) or its first documents
        up to ``max_tokens``. Dolma: whole rows from the start of the data, up to ``max_tokens``
        (default 2**20).
        """
        if self.source is not None:
            return dolma.read_token_stream(self.source, max_tokens or _DOLMA_STREAM_TOKENS)
        return self.packed.train.stream.head(max_tokens)

    def val_token_stream(self) -> TokenStream:
        """The validation documents of a packed corpus, for per-document perplexity."""
        return self.packed.val.stream

    def meta_test_token_stream(self, max_tokens: int | None = None) -> TokenStream:
        """The held-out meta-test documents, the only text meta-test episodes are cut from.

        Packed corpora: the ``meta_test`` split (or its first documents up to ``max_tokens``). Dolma:
        whole rows of the ``meta_test_shards`` from their start, up to ``max_tokens`` (default 2**20).
        Raises ValueError when no documents are held out for meta-test.
        """
        if self.source is not None:
            if self.source.meta_test_shards == 0:
                raise ValueError(
                    "corpus_options.meta_test_shards=0 holds out no Dolma shards for meta-test episodes; "
                    "set it >= 1 (meta-test text must be text AR training never sees)"
                )
            return dolma.read_token_stream(self.source, max_tokens or _DOLMA_STREAM_TOKENS, "meta_test")
        if self.meta_test_fraction == 0:
            raise ValueError(
                f"data.meta_test_fraction=0 holds out no {self.corpus_name!r} documents for meta-test "
                "episodes; set it > 0 (e.g. 0.15) to use meta-learning or meta-test evaluation "
                "(meta-test text must be text AR training never sees)"
            )
        return self.packed.meta_test.stream.head(max_tokens)

    # -- resume --------------------------------------------------------------------------------------

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Count a micro-batch as consumed only once it reaches the training step, not when a worker
        # prefetches it, so a checkpoint resumes right after the last batch trained on.
        if self.trainer is not None and self.trainer.training and isinstance(batch, dict):
            ar = batch.get("ar", batch)  # hybrid items carry the AR micro-batch under "ar"
            self.next_microbatch = int(ar["microbatch"]) + 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"next_microbatch": self.next_microbatch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_microbatch = int(state_dict["next_microbatch"])
