"""Bad data fails before training, in one line that names the config key and the file; big files stream.

The contract (issue: "AR-only runs check their data only inside fit"): ``prepare_run`` reads the data of
every run, AR-only or meta, and a data problem is a ConfigError whose one-line message names the key
that chose the data (``data.corpus_options.paths``, ``data.corpus_options.text_key``, ``data.seq_len``,
...), the offending file, and what is wrong with it (with the line or byte offset where there is one).
A one-line text file of tens of MB is read and tokenized in bounded pieces, as one long document with
the tokens of the whole text.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picomaml.config import ConfigError
from picomaml.data import PicoDataModule, corpora, load_tokenizer
from picomaml.train import prepare_run
from tests.helpers import FAST, compose_train

REPO = Path(__file__).resolve().parents[1]
PATHS = "data.corpus_options.paths"
TEXT_KEY = "data.corpus_options.text_key"
MODES = {"ar_only": ["meta=off"], "meta": ["meta=5way4shot", "meta.window_len=32"]}


@dataclass
class BadData:
    """One bad input: ``write(folder)`` creates it and returns the file (or glob) it is about."""

    write: Callable[[Path], Path]
    key: str
    says: list[str]
    overrides: list[str] = field(default_factory=list)


def _file(name: str, data: bytes) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name

    return write


def _parquet(name: str, table: dict) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        pq.write_table(pa.table(table), folder / name)
        return folder / name

    return write


def _small_files(folder: Path) -> Path:
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(f"Short note {i}.")
    return folder / "doc*.txt"


def _jsonl(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


BAD = {
    "empty_txt": BadData(_file("empty.txt", b""), PATHS, ["is empty"]),
    "whitespace_txt": BadData(_file("blank.txt", b"  \n\n\t\n"), PATHS, ["only whitespace"]),
    "binary_txt": BadData(_file("image.txt", b"GIF89a\x01\x00\x00\x80"), PATHS, ["binary", "offset 7"]),
    "latin1_txt": BadData(
        _file("latin1.txt", "Un café noir.".encode("latin-1")), PATHS, ["UTF-8", "offset 6"]
    ),
    "jsonl_not_json": BadData(
        _file("bad.jsonl", _jsonl('{"text": "fine"}', '{"text": unquoted}')), PATHS, ["line 2", "JSON"]
    ),
    "jsonl_without_text_field": BadData(
        _file("body.jsonl", _jsonl('{"text": "a"}', '{"text": "b"}', '{"body": "c"}')),
        TEXT_KEY,
        ["line 3", "'text'"],
    ),
    "corrupt_parquet": BadData(_file("broken.parquet", b"PAR1" + bytes(range(200))), PATHS, ["Parquet"]),
    "parquet_without_text_column": BadData(
        _parquet("body.parquet", {"body": ["a", "b"]}), TEXT_KEY, ["'text'"]
    ),
    "glob_matches_nothing": BadData(lambda folder: folder / "missing-*.txt", PATHS, ["matches no files"]),
    "one_document": BadData(
        _file("one.txt", b"A single file is a single document."), "data.val_fraction", ["1 document"]
    ),
    "too_few_tokens": BadData(
        _small_files, "data.seq_len", ["tokens", "data.val_batches"], ["data.val_fraction=0.25"]
    ),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_fails_before_training_naming_key_and_file(tmp_path: Path, case: str, mode: str) -> None:
    bad = BAD[case]
    folder = tmp_path / "data"
    folder.mkdir()
    target = bad.write(folder)
    overrides = [*FAST, "data=text", f"{PATHS}={target}", *bad.overrides, *MODES[mode]]
    cfg = compose_train(overrides, tmp_path / "run", tmp_path / "cache")
    with pytest.raises(ConfigError) as raised:
        prepare_run(cfg)
    message = str(raised.value)
    assert "\n" not in message
    assert bad.key in message and str(target) in message, message
    for words in bad.says:
        assert words in message, message


def test_too_small_corpus_says_how_many_tokens_it_has_and_needs(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    pattern = _small_files(folder)
    dm = PicoDataModule(
        corpus="text",
        corpus_options={"paths": str(pattern)},
        seq_len=32,
        batch_size=4,
        val_fraction=0.25,
        val_batches=4,
        cache_dir=tmp_path / "cache",
    )
    tokenizer = load_tokenizer("gpt2")
    has = sum(len(tokenizer.encode(f"Short note {i}.")) + 1 for i in range(40))  # + eos per document
    needs = (1 + 4 * 4) * 33  # one training row + val_batches x batch_size validation rows
    with pytest.raises(ValueError, match=f"has {has} tokens, fewer than the {needs}"):
        dm.check()


def test_a_train_split_shorter_than_one_row_names_the_fractions(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    dm = PicoDataModule(
        corpus="text",
        corpus_options={"paths": str(_small_files(folder))},
        seq_len=32,
        val_fraction=0.6,
        meta_test_fraction=0.3,
        val_batches=0,
        cache_dir=tmp_path / "cache",
    )
    assert dm.packed.train.stream.n_docs > 0  # a few short documents: some tokens, fewer than 33
    fractions = r"data\.val_fraction=0\.6 and data\.meta_test_fraction=0\.3"
    with pytest.raises(ValueError, match=rf"{fractions} leave \d+ training tokens .* one row"):
        dm.check()


def test_one_unmatched_entry_of_a_path_list_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(ValueError, match=r"data\.corpus_options\.paths: '.*typo\.txt' matches no files"):
        corpora.TextCorpus(paths=[str(tmp_path / "a.txt"), str(tmp_path / "typo.txt")])


@pytest.mark.slow
def test_cli_reports_a_bad_data_file_in_one_line(tmp_path: Path, cache_dir: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.touch()
    env = {**os.environ, "PICOMAML_CACHE": str(cache_dir)}
    overrides = ["model=tiny", "data=text", f"{PATHS}={empty}", "trainer.max_steps=1"]
    cmd = [sys.executable, "-m", "picomaml.train", *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"picomaml: config error: {PATHS}: {empty} is empty (0 bytes)"
    ]
    assert not (tmp_path / "run").exists()


# -- long documents: read and tokenized in pieces, with the tokens of the whole text -----------------


def _prose(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["alpha", "it's", "naïve", "12.5", "—", "über", "中文", "x", "(b)", "\t", "  "]
    return " ".join(rng.choice(words) for _ in range(n_words))


def test_a_long_document_tokenizes_as_the_whole_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # tiny pieces and read blocks, so the document crosses hundreds of piece and block boundaries
    monkeypatch.setattr(corpora, "MAX_PIECE_CHARS", 64)
    monkeypatch.setattr(corpora, "_READ_BLOCK_BYTES", 7)
    text = _prose(3000).replace(" x ", " x\r\n").replace(" (b) ", "\n\n(b) ")
    path = tmp_path / "long.txt"
    path.write_bytes(text.encode("utf-8"))
    dm = PicoDataModule(
        corpus="text",
        corpus_options={"paths": str(path)},
        seq_len=16,
        val_fraction=0.0,
        meta_test_fraction=0.0,
        val_batches=0,
        cache_dir=tmp_path / "cache",
    )
    dm.check()
    stream = dm.packed.train.stream
    whole = path.read_text(encoding="utf-8")  # universal newlines, as documented for .txt
    assert stream.n_docs == 1
    assert stream.document(0)[:-1].tolist() == dm.tokenizer.encode(whole, add_special_tokens=False)


def test_paragraphs_stream_across_block_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpora, "MAX_PIECE_CHARS", 50)
    monkeypatch.setattr(corpora, "_READ_BLOCK_BYTES", 3)
    text = "\r\n\r\n".join(_prose(n, seed=n) for n in (5, 80, 1, 40)) + "\n\n\n  \n\nlast\n"
    path = tmp_path / "paragraphs.txt"
    path.write_bytes(text.encode("utf-8"))
    corpus = corpora.TextCorpus(paths=str(path), txt_unit="paragraph")
    expected = [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    assert list(corpus.documents()) == expected
    assert all(len(piece.text) <= 50 for piece in corpus.pieces())


@pytest.mark.slow
def test_a_50_mb_one_line_file_trains_in_bounded_memory(tmp_path: Path) -> None:
    # ' w w ... w' blocks: each block starts a word with its space, so the file's tokens are the block's
    # tokens 50 times over (plus one eos), and any cut the reader makes must not change them
    block = " " + _prose(200_000).strip()
    repeats = -(-(50 << 20) // len(block.encode("utf-8")))
    path = tmp_path / "one_line.txt"
    with open(path, "w", encoding="utf-8") as file:
        for _ in range(repeats):
            file.write(block)
    assert path.stat().st_size >= 50 << 20 and "\n" not in block
    expected_tokens = repeats * len(load_tokenizer("gpt2").encode(block)) + 1
    script = f"""
import json
from pathlib import Path
from picomaml.bench.common import peak_rss_mb, proc_status_mb
from picomaml.data import PicoDataModule
dm = PicoDataModule(corpus="text", corpus_options={{"paths": {str(path)!r}}}, seq_len=256, val_fraction=0.0,
                    meta_test_fraction=0.0, val_batches=0, cache_dir={str(tmp_path / "cache")!r})
dm.tokenizer.backend_tokenizer.encode_batch_fast(["warm up"])  # the tokenizer's own memory is not the file's
# this process's own peak from here on (peak_rss_mb: not ru_maxrss, which starts at pytest's size)
Path("/proc/self/clear_refs").write_text("5")
before = proc_status_mb("VmRSS")
dm.setup("fit")  # builds the packed cache: what check() (prepare_run) and fit do first
stream = dm.packed.train.stream
growth_mb = peak_rss_mb() - before
print(json.dumps({{"growth_mb": growth_mb, "docs": stream.n_docs, "tokens": len(stream.tokens)}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"50 MB one-line file: peak RSS growth {result['growth_mb']:.0f} MB, {result['tokens']} tokens")
    # The tokens are 95 MB and packing holds two copies. Reading the line whole and tokenizing it in one
    # call took 7.6 GB (and before that, a crash in fit); 256 Ki-character pieces with the batches' arrays
    # kept until the end took 0.5 GB with the tokenizer's 2 threads and 1.0 GB with 16 (RAYON_NUM_THREADS),
    # 16 Ki-character pieces spilled to a file take 0.22 and 0.28 GB (0.32 GB with 64 threads).
    assert result["growth_mb"] < 640
    assert result["docs"] == 1 and result["tokens"] == expected_tokens
