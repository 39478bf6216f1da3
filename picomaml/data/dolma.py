"""Stream ``pico-lm/pretokenized-dolma`` (pico's pretraining data) with shard-aware fast-forward.

The dataset is 10,000 parquet shards ``data/train-XXXXX-of-10000.parquet`` of 20,480 rows each; a row
is ``input_ids``: 2049 OLMo token ids (documents joined by eos, already shuffled by pico). Row ``g`` of
the dataset is row ``g % 20480`` of shard ``g // 20480``, so resuming at row ``g`` opens only shards
from ``g // 20480`` on and drops ``g % 20480`` rows of the first: a restart at step 100k costs seconds,
not a pass over 200M rows.

Whole shards are held out, since a stream has no document list to split (pico's shards are already a
random split of the shuffled documents), from the end of the dataset:

- the last ``val_shards`` shards: language-model validation;
- the ``meta_test_shards`` shards before them: text AR training never sees, from which meta-test SMLMT
  episodes are cut (the Dolma counterpart of the packed corpora's ``meta_test`` document split);
- every shard before those: training, which cycles over them in the dataset's own order (pico trains
  one pass).

Holding out shards at the end keeps row ``g`` of the training stream where it was for every ``g`` below
the (smaller) number of training rows; only the point where a second pass would start moves. The split
is only as clean as the shard boundaries: a document that pico's packing cut across two shards would
have its halves on both sides (at most one document per boundary).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import load_dataset

from picomaml.data.packing import TokenStream

DOLMA_REPO = "pico-lm/pretokenized-dolma"
OLMO_EOS_ID = 50279
_READ_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class DolmaSource:
    """Where the Dolma rows live and how they are laid out.

        ``root=None`` streams ``repo`` from the Hugging Face Hub; a local directory with the same
        ``data/train-XXXXX-of-NNNNN.parquet`` layout (a mirror, or a test fixture) is read instead when
        given. ``n_shards``, ``rows_per_shard`` and ``row_len`` describe that layout; shards are opened one
    at a time, only when the stream reaches them.
    """

    repo: str = DOLMA_REPO
    root: str | None = None
    n_shards: int = 10000
    rows_per_shard: int = 20480
    row_len: int = 2049
    val_shards: int = 1
    meta_test_shards: int = 1
    column: str = "input_ids"
    eos_token_id: int = OLMO_EOS_ID

    def __post_init__(self) -> None:
        for key in ("n_shards", "rows_per_shard", "row_len", "val_shards"):
            if getattr(self, key) <= 0:
                raise ValueError(f"corpus_options.{key} must be positive, got {getattr(self, key)}")
        if self.meta_test_shards < 0:
            raise ValueError(f"corpus_options.meta_test_shards must be >= 0, got {self.meta_test_shards}")
        if self.val_shards + self.meta_test_shards >= self.n_shards:
            raise ValueError(
                f"corpus_options.val_shards={self.val_shards} and meta_test_shards={self.meta_test_shards} "
                f"leave no training shards of {self.n_shards}"
            )

    @property
    def train_shards(self) -> int:
        return self.n_shards - self.val_shards - self.meta_test_shards

    def split_shards(self, split: str) -> range:
        """Indices of the shards of ``split``: ``train``, ``meta_test`` or ``val`` (in that order)."""
        bounds = {
            "train": (0, self.train_shards),
            "meta_test": (self.train_shards, self.n_shards - self.val_shards),
            "val": (self.n_shards - self.val_shards, self.n_shards),
        }
        if split not in bounds:
            raise ValueError(f"unknown Dolma split {split!r}; splits are {', '.join(bounds)}")
        return range(*bounds[split])

    @property
    def train_rows(self) -> int:
        return self.train_shards * self.rows_per_shard

    def shard_file(self, index: int) -> str:
        """Path of shard ``index`` relative to the dataset root."""
        return f"data/train-{index:05d}-of-{self.n_shards:05d}.parquet"

    def open_shard(self, index: int) -> Any:
        """A streaming ``datasets.IterableDataset`` over shard ``index``, yielding Arrow tables.

        One shard per ``load_dataset`` call: resolving a list of thousands of hub paths up front
        would cost a request per path, and a shard is only opened when the stream reaches it.
        """
        kwargs: dict[str, Any] = {"split": "train", "streaming": True, "columns": [self.column]}
        if self.root is None:
            dataset = load_dataset(self.repo, data_files=[self.shard_file(index)], **kwargs)
        else:
            dataset = load_dataset(
                "parquet", data_files=[os.path.join(self.root, self.shard_file(index))], **kwargs
            )
        return dataset.with_format("arrow")

    def iter_rows(self, first_row: int, shards: range, width: int) -> Iterator[np.ndarray]:
        """Yield ``[k, width]`` int64 blocks of rows, starting at row ``first_row`` of ``shards``.

        Rows are truncated to their first ``width`` tokens. Iteration ends after the last shard.
        """
        start_shard, skip = divmod(first_row, self.rows_per_shard)
        for shard in shards[start_shard:]:
            n_rows = 0
            for table in self.open_shard(shard).iter(batch_size=min(_READ_BATCH, self.rows_per_shard)):
                n_rows += table.num_rows
                if skip >= table.num_rows:
                    skip -= table.num_rows
                    continue
                block = _rows_to_numpy(table.slice(skip).column(self.column), self.row_len)
                skip = 0
                yield block[:, :width]
            # Row g lives in shard g // rows_per_shard only if every shard is full.
            if n_rows != self.rows_per_shard:
                raise ValueError(
                    f"{self.shard_file(shard)} holds {n_rows} rows, expected {self.rows_per_shard}"
                )


def _rows_to_numpy(column: pa.ChunkedArray, row_len: int) -> np.ndarray:
    """Convert a list column of equal-length rows to a 2-D int64 array without Python-level loops."""
    array = column.combine_chunks()
    flat = array.flatten().to_numpy(zero_copy_only=False)
    if len(flat) != len(array) * row_len:
        raise ValueError(
            f"Dolma rows must all hold {row_len} token ids; got {len(flat)} ids in {len(array)} rows"
        )
    return flat.reshape(len(array), row_len).astype(np.int64, copy=False)


class RowReader:
    """Sequential reader over the training rows from a global position, cycling forever.

    ``take(n)`` returns the next ``n`` rows; ``skip(n)`` passes over ``n`` rows, re-opening at the new
    shard instead of reading when the jump crosses a whole shard.
    """

    def __init__(self, source: DolmaSource, position: int, width: int) -> None:
        self.source = source
        self.width = width
        self._open(position)

    def _open(self, position: int) -> None:
        self.position = position % self.source.train_rows
        self._blocks = self.source.iter_rows(self.position, range(self.source.train_shards), self.width)
        self._block = np.empty((0, self.width), dtype=np.int64)

    def _next_block(self) -> None:
        block = next(self._blocks, None)
        if block is None:  # end of the training shards: the next epoch starts at row 0
            self._open(0)
            block = next(self._blocks)
        self._block = block

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if not len(self._block):
                self._next_block()
            part, self._block = self._block[:n], self._block[n:]
            parts.append(part)
            n -= len(part)
            self.position = (self.position + len(part)) % self.source.train_rows
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def skip(self, n: int) -> None:
        if n >= self.source.rows_per_shard:
            self._open(self.position + n)
        elif n > 0:
            self.take(n)


def _first_rows(source: DolmaSource, shards: range, n_rows: int, width: int) -> np.ndarray:
    """The first ``min(n_rows, rows in shards)`` rows of ``shards``; opens no shard beyond them."""
    n_available = min(n_rows, len(shards) * source.rows_per_shard)
    blocks, total = [], 0
    for block in source.iter_rows(0, shards, width):
        blocks.append(block[: n_available - total])
        total += len(blocks[-1])
        if total >= n_available:
            break
    return np.concatenate(blocks)


def read_val_rows(source: DolmaSource, n_rows: int, width: int) -> np.ndarray:
    """The first ``n_rows`` rows of the validation shards (cycled if they hold fewer)."""
    rows = _first_rows(source, source.split_shards("val"), n_rows, width)
    return rows[np.arange(n_rows) % len(rows)]


def read_token_stream(source: DolmaSource, max_tokens: int, split: str = "train") -> TokenStream:
    """Whole rows of ``split`` from its first row (at least one, up to ``max_tokens`` tokens) as a stream.

    ``train``: the training rows, in training order; ``meta_test``: the held-out meta-test shards,
    never more rows than they hold. Document boundaries are recovered from the eos tokens; the text
    before the first eos of the buffer counts as a document too.
    """
    n_rows = max(1, max_tokens // source.row_len)
    if split == "train":
        rows = RowReader(source, 0, source.row_len).take(n_rows)
    else:
        shards = source.split_shards(split)
        if not shards:
            raise ValueError(f"Dolma holds out no {split} shards (corpus_options.{split}_shards=0)")
        rows = _first_rows(source, shards, n_rows, source.row_len)
    tokens = rows.reshape(-1).astype(np.int32)
    ends = np.flatnonzero(tokens == source.eos_token_id) + 1
    offsets = np.unique(np.concatenate([[0], ends, [len(tokens)]])).astype(np.int64)
    return TokenStream(tokens=tokens, doc_offsets=offsets, doc_ids=np.arange(len(offsets) - 1))
