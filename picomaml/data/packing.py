"""Tokenize a corpus, split it by document, pack it into rows, and cache the result as Arrow.

Layout of one split (train, val or meta_test):

- the **token stream**: every document's tokens followed by one eos, documents concatenated;
- **rows** of ``seq_len + 1`` tokens cut from that stream back to back (input = ``row[:-1]``,
  labels = ``row[1:]``). The last row is completed with tokens from the start of the same split's
  stream, so no token is dropped and no pad token needs masking in the loss.

Rows are a reshape of the stream, so the cache stores each split once, already padded to whole rows:
``rows`` and ``stream`` are two zero-copy views of the same memory-mapped Arrow buffer.

**Splits are by document.** Document ``i`` gets a uniform number ``u_i = hash(i, seed)`` in [0, 1)
(:func:`document_uniforms`) and goes to

- ``val`` when ``u_i < val_fraction`` (language-model validation);
- ``meta_test`` when ``val_fraction <= u_i < val_fraction + meta_test_fraction``: text that AR
  training never sees, from which meta-test SMLMT episodes are cut, so that held-out words are also
  scored in held-out text (a model that memorised its training text gains nothing there);
- ``train`` otherwise (the AR stream, and the text meta-train episodes are cut from).

The rule needs no shuffle and gives the same answer for the same document on every machine, for every
model, and whether or not meta-learning is on (so AR-only and hybrid runs train on the same text). The
val documents do not depend on ``meta_test_fraction``, and raising ``meta_test_fraction`` only moves
documents from train to meta_test: the meta-test documents of a smaller fraction stay meta-test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from picomaml.data.corpora import Corpus, Piece, TextCorpus, document_pieces, is_blank

log = logging.getLogger(__name__)

# Bumped whenever the cache layout or the packing rule changes (2: the meta_test split).
CACHE_FORMAT_VERSION = 2
_ENCODE_BATCH = 1024
# A call also stops at this many characters (16 pieces of corpora.MAX_PIECE_CHARS), so the tokenizer's
# memory for one call (~100 bytes per character for GPT-2) stays near 25 MB.
_ENCODE_BATCH_CHARS = 1 << 18
SPLITS = ("train", "val", "meta_test")
"""Split names; a document's split code (see :func:`assign_splits`) is its position here."""
_ARRAYS = ("tokens", "doc_offsets", "doc_ids")
_ARRAY_TYPES = {"tokens": pa.int32(), "doc_offsets": pa.int64(), "doc_ids": pa.int64()}


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """A split's documents as one 1-D token array, each document followed by eos.

    Document ``k`` of the split is ``tokens[doc_offsets[k]:doc_offsets[k + 1]]`` (its eos included);
    ``doc_ids[k]`` is its index in the corpus, so a document keeps its identity across splits.
    """

    tokens: np.ndarray
    doc_offsets: np.ndarray
    doc_ids: np.ndarray

    @property
    def n_docs(self) -> int:
        return len(self.doc_ids)

    def document(self, k: int) -> np.ndarray:
        """Tokens of the split's ``k``-th document, ending with eos."""
        return self.tokens[self.doc_offsets[k] : self.doc_offsets[k + 1]]

    def head(self, max_tokens: int | None) -> TokenStream:
        """The stream's first whole documents up to ``max_tokens`` tokens (at least one document).

        Whole documents, so a prefix never ends inside a word; ``None`` (or a budget past the end)
        returns the stream itself, without a copy.
        """
        if max_tokens is None or max_tokens >= len(self.tokens):
            return self
        n_docs = max(1, int(np.searchsorted(self.doc_offsets, max_tokens, side="right")) - 1)
        end = self.doc_offsets[n_docs]
        return TokenStream(self.tokens[:end], self.doc_offsets[: n_docs + 1], self.doc_ids[:n_docs])


@dataclasses.dataclass(frozen=True)
class PackedSplit:
    """One split: its token stream and the ``[n_rows, seq_len + 1]`` rows packed from it."""

    stream: TokenStream
    rows: np.ndarray

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    def row_doc_ids(self, row_indices: np.ndarray) -> np.ndarray:
        """Corpus document id of every token of the given rows, shape ``[len(row_indices), seq_len + 1]``.

        Per-document metrics group token losses by these ids. Tokens in the wrapped tail of the last
        row repeat the split's first document and carry its id.
        """
        width = self.rows.shape[1]
        flat = (np.asarray(row_indices)[:, None] * width + np.arange(width)) % len(self.stream.tokens)
        position_doc = np.searchsorted(self.stream.doc_offsets, flat, side="right") - 1
        return self.stream.doc_ids[position_doc]


@dataclasses.dataclass(frozen=True)
class PackedCorpus:
    """The train, val and meta_test splits of a packed corpus, plus the cache file they were read from.

    A split whose fraction is 0 is empty (no documents, no rows).
    """

    train: PackedSplit
    val: PackedSplit
    meta_test: PackedSplit
    path: Path


def document_uniforms(n_docs: int, seed: int) -> np.ndarray:
    """Per document, a uniform number in [0, 1) that decides its split (see the module docstring).

    SplitMix64 of ``(doc index, seed)``: independent per document, so adding documents at the end of
    a corpus never moves existing ones between splits.
    """
    with np.errstate(over="ignore"):
        z = np.arange(n_docs, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def validation_mask(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the documents held out for validation."""
    return document_uniforms(n_docs, seed) < val_fraction


def assign_splits(n_docs: int, val_fraction: float, meta_test_fraction: float, seed: int) -> np.ndarray:
    """Split code of every document: an int8 index into :data:`SPLITS` (0 train, 1 val, 2 meta_test).

    The meta_test interval starts where the val interval ends, so the val documents are those of
    :func:`validation_mask` whatever ``meta_test_fraction`` is.
    """
    if val_fraction < 0 or meta_test_fraction < 0 or val_fraction + meta_test_fraction >= 1:
        raise ValueError(
            f"val_fraction={val_fraction} and meta_test_fraction={meta_test_fraction} must be >= 0 and "
            "leave documents for training (their sum < 1)"
        )
    u = document_uniforms(n_docs, seed)
    codes = np.zeros(n_docs, dtype=np.int8)
    codes[u < val_fraction + meta_test_fraction] = SPLITS.index("meta_test")
    codes[u < val_fraction] = SPLITS.index("val")
    return codes


def tokenize_documents(
    documents: Iterable[str], tokenizer: PreTrainedTokenizerBase
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize whole documents; return ``(tokens, doc_offsets)`` with eos after each document.

    Blank documents are skipped; long ones are tokenized in pieces (see :func:`tokenize_pieces`).
    Raises ValueError when no document is left.
    """
    tokens, doc_offsets = tokenize_pieces(document_pieces(documents), tokenizer)
    if len(doc_offsets) == 1:
        raise ValueError("the corpus has no documents")
    return tokens, doc_offsets


def _encode_batches(pieces: Iterable[Piece]) -> Iterator[list[Piece]]:
    """Consecutive pieces, up to ``_ENCODE_BATCH`` of them or ``_ENCODE_BATCH_CHARS`` characters."""
    batch: list[Piece] = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece.text)
        if len(batch) >= _ENCODE_BATCH or chars >= _ENCODE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def tokenize_pieces(
    pieces: Iterable[Piece], tokenizer: PreTrainedTokenizerBase
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents given as pieces (a corpus's ``pieces()``); return ``(tokens, doc_offsets)``.

    A document's tokens are its pieces' tokens back to back, then one eos; a document whose pieces are
    all blank is dropped. Batches are bounded in pieces and characters, and each batch's tokens go to a
    temporary file as soon as they exist, so memory stays flat whatever the length of the corpus or of
    one document: holding the batches' arrays until the end left freed batch memory scattered between
    them that the allocator could not give back (measured: 3.7x the tokens for a 50 MB one-line file).
    Uses the Rust backend's ``encode_batch_fast`` (parallel, no offsets): the Python-level
    ``tokenizer(...)`` call would spend most of its time building per-token Python objects.
    """
    backend = tokenizer.backend_tokenizer
    eos = np.array([tokenizer.eos_token_id], dtype=np.int32).tobytes()
    lengths: list[int] = []
    with tempfile.TemporaryFile() as spill:
        document_start, blank = 0, True  # where the open document's tokens start in the file (bytes)
        for batch in _encode_batches(pieces):
            encodings = backend.encode_batch_fast([piece.text for piece in batch], add_special_tokens=False)
            for piece, encoding in zip(batch, encodings, strict=True):
                spill.write(np.asarray(encoding.ids, dtype=np.int32).tobytes())
                blank = blank and is_blank(piece.text)
                if not piece.last:
                    continue
                if blank:  # drop what the blank document wrote
                    spill.seek(document_start)
                    spill.truncate()
                else:
                    spill.write(eos)
                    end = spill.tell()
                    lengths.append((end - document_start) // 4)
                    document_start = end
                blank = True
        if spill.tell() != document_start:
            raise RuntimeError("the corpus's last piece does not close its document (last=False)")
        spill.seek(0)
        tokens = np.fromfile(spill, dtype=np.int32)
    doc_offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    return tokens, doc_offsets


def pack_splits(
    tokens: np.ndarray, doc_offsets: np.ndarray, codes: np.ndarray, width: int
) -> dict[str, tuple[TokenStream, np.ndarray]]:
    """Separate a tokenized corpus by split and pad each split's stream to whole rows of ``width``.

    Returns ``{split: (stream, padded)}`` for every split of :data:`SPLITS`: ``padded`` is the split's
    token stream extended cyclically to a whole number of rows (at least one; empty for a split with no
    document) and ``stream.tokens`` is its head, so each split costs one copy of its tokens.
    ``codes`` holds each document's split code (:func:`assign_splits`); documents keep their corpus
    order within a split.
    """
    codes = np.asarray(codes).astype(np.int8)
    lengths = np.diff(doc_offsets)
    # runs of consecutive documents in the same split, copied with one slice each
    run_starts = np.flatnonzero(np.diff(codes, prepend=np.int8(-1)))
    run_ends = np.append(run_starts[1:], len(codes))
    packed = {}
    for code, name in enumerate(SPLITS):
        doc_mask = codes == code
        n = int(lengths[doc_mask].sum())
        padded = np.empty(-(-n // width) * width, dtype=np.int32)  # whole rows; none without tokens
        filled = 0
        mine = codes[run_starts] == code
        for start, end in zip(doc_offsets[run_starts[mine]], doc_offsets[run_ends[mine]], strict=True):
            padded[filled : filled + end - start] = tokens[start:end]
            filled += end - start
        while 0 < filled < len(padded):  # complete the last row from the split's own start
            more = min(filled, len(padded) - filled)
            padded[filled : filled + more] = padded[:more]
            filled += more
        stream = TokenStream(
            tokens=padded[:n],
            doc_offsets=np.concatenate([[0], np.cumsum(lengths[doc_mask])]).astype(np.int64),
            doc_ids=np.flatnonzero(doc_mask).astype(np.int64),
        )
        packed[name] = (stream, padded)
    return packed


def cache_key(
    corpus: Corpus,
    tokenizer_name: str,
    seq_len: int,
    val_fraction: float,
    seed: int,
    meta_test_fraction: float = 0.0,
) -> dict:
    """Everything that determines the cached bytes; its hash names the cache file.

    ``meta_test_fraction`` moves documents out of the train split, so a cache built with another value
    holds another training stream and must never be reused.
    """
    return {
        "format": CACHE_FORMAT_VERSION,
        "corpus": corpus.name,
        "fingerprint": corpus.fingerprint(),
        "tokenizer": tokenizer_name,
        "seq_len": seq_len,
        "val_fraction": val_fraction,
        "meta_test_fraction": meta_test_fraction,
        "seed": seed,
    }


def cache_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()
    name = f"{key['corpus']}-{key['tokenizer']}-L{key['seq_len']}-{digest}.arrow"
    return Path(cache_dir) / "packed" / name


def _checksum(arrays: Iterable[np.ndarray]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for array in arrays:
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return digest.hexdigest()


def _write_atomic(path: Path, key: dict, padded: dict[str, dict[str, np.ndarray]], n_tokens: dict) -> None:
    """Write one single-row Arrow IPC file (one list column per array), then rename it into place.

    The rename is atomic, so a reader sees either no file or a complete one, even when two jobs build
    the same cache at once.
    """
    # one list cell over each numpy buffer, built without a copy (pa.array([array]) would copy it)
    columns = {
        f"{split}_{name}": pa.LargeListArray.from_arrays(
            pa.array([0, len(padded[split][name])], type=pa.int64()),
            pa.array(padded[split][name], type=_ARRAY_TYPES[name]),
        )
        for split in SPLITS
        for name in _ARRAYS
    }
    ordered = [padded[split][name] for split in SPLITS for name in _ARRAYS]
    metadata = {
        "key": json.dumps(key, sort_keys=True),
        "n_tokens": json.dumps(n_tokens),
        "checksum": _checksum(ordered),
    }
    table = pa.table(columns).replace_schema_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class CorruptCacheError(Exception):
    """The cache file exists but cannot be trusted (truncated, garbage, wrong schema or checksum)."""


def _read(path: Path, key: dict, seq_len: int) -> PackedCorpus:
    """Memory-map a cache file and verify it completely before handing out views into it."""
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if json.loads(metadata["key"]) != key:
            raise CorruptCacheError("key mismatch")
        n_tokens = json.loads(metadata["n_tokens"])
        arrays = {
            split: {
                name: table.column(f"{split}_{name}").chunk(0).values.to_numpy(zero_copy_only=True)
                for name in _ARRAYS
            }
            for split in SPLITS
        }
    except (pa.ArrowException, KeyError, ValueError, OSError) as err:
        raise CorruptCacheError(f"{type(err).__name__}: {err}") from err
    if _checksum(arrays[split][name] for split in SPLITS for name in _ARRAYS) != metadata["checksum"]:
        raise CorruptCacheError("checksum mismatch")
    width = seq_len + 1
    splits = {}
    for split in SPLITS:
        padded, offsets, doc_ids = (arrays[split][name] for name in _ARRAYS)
        n = n_tokens[split]
        if len(padded) % width or len(padded) < n or offsets[-1] != n or len(offsets) != len(doc_ids) + 1:
            raise CorruptCacheError(f"inconsistent {split} lengths")
        stream = TokenStream(tokens=padded[:n], doc_offsets=offsets, doc_ids=doc_ids)
        splits[split] = PackedSplit(stream=stream, rows=padded.reshape(-1, width))
    return PackedCorpus(train=splits["train"], val=splits["val"], meta_test=splits["meta_test"], path=path)


def _no_documents_message(
    corpus: Corpus, split: str, n_docs: int, val_fraction: float, meta_test_fraction: float
) -> str:
    """Why a split got no document, and the keys that fix it (a split is whole documents)."""
    fractions = f"data.val_fraction={val_fraction} and data.meta_test_fraction={meta_test_fraction}"
    more = "add documents"
    if isinstance(corpus, TextCorpus) and corpus.txt_unit == "file":
        more += " (data.corpus_options.txt_unit=paragraph makes each paragraph of a .txt file a document)"
    off = {
        "train": "or lower data.val_fraction and data.meta_test_fraction",
        "val": "or set data.val_fraction=0 data.val_batches=0 (no validation)",
        "meta_test": "or set data.meta_test_fraction=0 (no meta-learning, no meta-test evaluation)",
    }[split]
    return (
        f"{fractions} leave no {split} document: {corpus.describe()} has {n_docs} document"
        f"{'s' if n_docs != 1 else ''}, and the splits are by whole documents; {more}, {off}"
    )


def build_packed(
    corpus: Corpus,
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_name: str,
    seq_len: int,
    val_fraction: float,
    seed: int,
    cache_dir: str | os.PathLike,
    meta_test_fraction: float = 0.0,
) -> Path:
    """Tokenize, split and pack ``corpus``, write the cache file, and return its path.

    Raises ValueError when a split asked for (train always; val and meta_test when their fraction is
    positive) would get no document: a tiny corpus is refused here rather than training on nothing.
    """
    key = cache_key(corpus, tokenizer_name, seq_len, val_fraction, seed, meta_test_fraction)
    path = cache_path(cache_dir, key)
    started = time.perf_counter()
    tokens, doc_offsets = tokenize_pieces(corpus.pieces(), tokenizer)
    if len(doc_offsets) == 1:
        raise ValueError(f"{corpus.describe()} has no documents")
    codes = assign_splits(len(doc_offsets) - 1, val_fraction, meta_test_fraction, seed)
    packed = pack_splits(tokens, doc_offsets, codes, seq_len + 1)
    del tokens  # the splits hold copies: keep one copy of a big corpus in memory, not two
    streams = {split: stream for split, (stream, _) in packed.items()}
    fractions = {"train": 1.0, "val": val_fraction, "meta_test": meta_test_fraction}
    for split in SPLITS:
        if fractions[split] > 0 and streams[split].n_docs == 0:
            message = _no_documents_message(corpus, split, len(codes), val_fraction, meta_test_fraction)
            raise ValueError(message)
    padded = {
        split: {"tokens": rows, "doc_offsets": stream.doc_offsets, "doc_ids": stream.doc_ids}
        for split, (stream, rows) in packed.items()
    }
    _write_atomic(path, key, padded, {split: len(s.tokens) for split, s in streams.items()})
    log.info(
        "packed corpus %s: %d documents, %d train / %d val / %d meta_test tokens in %.1f s -> %s",
        corpus.name,
        len(codes),
        len(streams["train"].tokens),
        len(streams["val"].tokens),
        len(streams["meta_test"].tokens),
        time.perf_counter() - started,
        path,
    )
    return path


def load_packed(
    corpus: Corpus,
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_name: str,
    seq_len: int,
    val_fraction: float,
    seed: int,
    cache_dir: str | os.PathLike,
    meta_test_fraction: float = 0.0,
) -> PackedCorpus:
    """Return the packed corpus from the cache, building (or rebuilding a corrupt) cache first.

    A cache file that fails any check is reported with one warning, deleted and rebuilt.
    """
    key = cache_key(corpus, tokenizer_name, seq_len, val_fraction, seed, meta_test_fraction)
    path = cache_path(cache_dir, key)
    if path.exists():
        try:
            return _read(path, key, seq_len)
        except CorruptCacheError as err:
            log.warning("data cache %s is corrupt (%s); deleting and rebuilding it", path, err)
            path.unlink(missing_ok=True)
    build_packed(
        corpus, tokenizer, tokenizer_name, seq_len, val_fraction, seed, cache_dir, meta_test_fraction
    )
    return _read(path, key, seq_len)
