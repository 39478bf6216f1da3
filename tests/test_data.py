"""Packed corpora and the datamodule: packing, splits, cache, and the resumable global batch order."""

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from picomaml.data import PicoDataModule, load_tokenizer, packing
from picomaml.data.corpora import Piece, TextCorpus, WikiCorpus, make_corpus
from picomaml.data.datamodule import PackedOrder
from picomaml.data.packing import cache_key, cache_path

EOS = 50256


@pytest.fixture(scope="session")
def wiki_dm(tmp_path_factory):
    """The embedded wiki corpus, tokenized and packed once per test session."""
    dm = PicoDataModule(corpus="wiki", seq_len=128, batch_size=4, cache_dir=tmp_path_factory.mktemp("cache"))
    started = time.perf_counter()
    dm.setup("fit")
    print(f"wiki tokenize+pack: {time.perf_counter() - started:.1f} s")
    return dm


def synthetic_dm(cache_dir, **overrides):
    config = {
        "corpus": "synthetic",
        "corpus_options": {"n_docs": 300},
        "seq_len": 32,
        "batch_size": 3,
        "val_fraction": 0.1,
        "val_batches": 2,
        "cache_dir": cache_dir,
    }
    return PicoDataModule(**(config | overrides))


def take(batches, n):
    return [next(batches) for _ in range(n)]


# -- packing and splits ----------------------------------------------------------------------------


def test_wiki_rows_are_the_stream_cut_into_rows(wiki_dm):
    for split in (wiki_dm.packed.train, wiki_dm.packed.val, wiki_dm.packed.meta_test):
        rows, tokens = split.rows, split.stream.tokens
        assert rows.shape[1] == 129 and rows.dtype == np.int32
        flat = rows.reshape(-1)
        # Every token is in a row, in order; only the last row is completed from the stream's start.
        assert np.array_equal(flat[: len(tokens)], tokens)
        assert 0 <= len(flat) - len(tokens) < 129
        assert np.array_equal(flat[len(tokens) :], tokens[: len(flat) - len(tokens)])


def test_wiki_documents_end_with_eos_and_lose_no_token(wiki_dm):
    tokenizer = load_tokenizer("gpt2")
    texts = list(WikiCorpus().documents())
    for split in (wiki_dm.packed.train, wiki_dm.packed.val, wiki_dm.packed.meta_test):
        stream = split.stream
        assert stream.doc_offsets[-1] == len(stream.tokens)
        assert np.all(stream.tokens[stream.doc_offsets[1:] - 1] == EOS)
        assert np.count_nonzero(stream.tokens == EOS) == stream.n_docs
        for k in np.linspace(0, stream.n_docs - 1, 5).astype(int):
            assert tokenizer.decode(stream.document(k)[:-1]) == texts[stream.doc_ids[k]]


def test_split_is_by_document(wiki_dm):
    packed = wiki_dm.packed
    train, val, meta_test = packed.train.stream, packed.val.stream, packed.meta_test.stream
    assert not set(train.doc_ids) & set(val.doc_ids)
    assert not set(meta_test.doc_ids) & (set(train.doc_ids) | set(val.doc_ids))
    assert sorted([*train.doc_ids, *val.doc_ids, *meta_test.doc_ids]) == list(range(10033))
    assert 0.01 < val.n_docs / 10033 < 0.03
    assert 0.13 < meta_test.n_docs / 10033 < 0.17  # the default meta_test_fraction, 0.15
    rows = np.arange(wiki_dm.packed.val.n_rows)
    assert set(np.unique(wiki_dm.packed.val.row_doc_ids(rows))) == set(val.doc_ids)


def test_each_split_is_its_documents_in_order_completed_cyclically_to_whole_rows():
    lengths = [5, 3, 7, 2, 4, 1]
    codes = np.array([0, 0, 1, 0, 2, 2])  # train, train, val, train, meta_test, meta_test
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.arange(offsets[-1], dtype=np.int32) + 100
    width = 4
    packed = packing.pack_splits(tokens, offsets, codes, width)
    for code, split in enumerate(packing.SPLITS):
        docs = np.flatnonzero(codes == code)
        stream_tokens = np.concatenate([tokens[offsets[d] : offsets[d + 1]] for d in docs])
        stream, padded = packed[split]
        assert np.array_equal(stream.tokens, stream_tokens) and list(stream.doc_ids) == list(docs)
        n_rows = -(-len(stream_tokens) // width)
        # a split shorter than a row (meta_test: 5 tokens, val: 7) repeats its stream until the row is full
        assert np.array_equal(padded, np.resize(stream_tokens, n_rows * width))
    assert len(packing.pack_splits(tokens, offsets, np.zeros(6), width)["val"][1]) == 0


def test_a_blank_document_split_across_tokenizer_calls_leaves_no_token(monkeypatch):
    monkeypatch.setattr(packing, "_ENCODE_BATCH", 2)  # the blank document's pieces land in two calls
    tokenizer = load_tokenizer("gpt2")
    pieces = [
        Piece("Hello", last=False),
        Piece(" world", last=True),
        Piece("  ", last=False),
        Piece("\n", last=True),
        Piece(" again", last=True),
    ]
    tokens, offsets = packing.tokenize_pieces(pieces, tokenizer)
    hello, again = tokenizer.encode("Hello world"), tokenizer.encode(" again")
    assert tokens.tolist() == [*hello, EOS, *again, EOS]
    assert offsets.tolist() == [0, len(hello) + 1, len(hello) + len(again) + 2]


def test_wiki_text_is_cleaned():
    texts = list(WikiCorpus().documents())
    assert len(texts) == 10033
    assert not any("  " in t or "()" in t or " ," in t for t in texts)
    assert any("Aniline is the simplest aromatic amine" in t for t in texts)


def test_train_token_stream_is_the_cached_train_split(wiki_dm):
    stream = wiki_dm.train_token_stream()
    assert stream.tokens.dtype == np.int32 and stream is wiki_dm.packed.train.stream
    head = wiki_dm.train_token_stream(max_tokens=5000)
    assert len(head.tokens) <= 5000 and head.tokens[-1] == EOS
    assert np.array_equal(head.tokens, stream.tokens[: len(head.tokens)])
    assert head.n_docs == len(head.doc_offsets) - 1


def test_cache_load_is_fast_and_identical(wiki_dm):
    again = PicoDataModule(corpus="wiki", seq_len=128, batch_size=4, cache_dir=wiki_dm.cache_dir)
    started = time.perf_counter()
    again.setup()
    elapsed = time.perf_counter() - started
    print(f"wiki cache load: {elapsed * 1000:.0f} ms")
    assert again.packed.path == wiki_dm.packed.path
    assert np.array_equal(again.packed.train.rows, wiki_dm.packed.train.rows)
    assert elapsed < 5


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip_token"])
def test_corrupt_cache_is_rebuilt(tmp_path, caplog, damage):
    dm = synthetic_dm(tmp_path)
    rows = np.array(dm.packed.train.rows)
    path = dm.packed.path
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not an arrow file" * 100)
    else:  # a valid Arrow file whose payload changed: only the checksum catches it
        index = data.index(rows[0, :4].tobytes())
        path.write_bytes(data[:index] + b"\x07" + data[index + 1 :])
    with caplog.at_level(logging.WARNING, logger="picomaml.data.packing"):
        rebuilt = synthetic_dm(tmp_path)
        assert np.array_equal(rebuilt.packed.train.rows, rows)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "corrupt" in warnings[0].getMessage()


def test_cache_key_separates_configurations(tmp_path):
    corpus = make_corpus("synthetic", {"n_docs": 10})
    configurations = [
        (32, 0.1, 0, 0.0),
        (64, 0.1, 0, 0.0),
        (32, 0.2, 0, 0.0),
        (32, 0.1, 1, 0.0),
        (32, 0.1, 0, 0.15),
    ]
    paths = {
        cache_path(tmp_path, cache_key(corpus, "gpt2", seq_len, val_fraction, seed, meta_test_fraction))
        for seq_len, val_fraction, seed, meta_test_fraction in configurations
    }
    assert len(paths) == len(configurations)


# -- text corpus -----------------------------------------------------------------------------------


def test_text_corpus_reads_txt_jsonl_parquet_in_order(tmp_path):
    (tmp_path / "a.txt").write_text("First file, first paragraph.\n\nFirst file, second paragraph.\n")
    (tmp_path / "b.txt").write_text("Second file.")
    (tmp_path / "c.jsonl").write_text(
        "\n".join(json.dumps({"body": t, "n": 1}) for t in ["json one", "json two"])
    )
    pq.write_table(pa.table({"body": ["parquet one", "", "parquet two"]}), tmp_path / "d.parquet")
    txt = str(tmp_path / "*.txt")
    by_file = TextCorpus(paths=[txt])
    assert list(by_file.documents()) == [
        "First file, first paragraph.\n\nFirst file, second paragraph.\n",
        "Second file.",
    ]
    by_paragraph = TextCorpus(paths=[txt], txt_unit="paragraph")
    assert list(by_paragraph.documents())[:2] == [
        "First file, first paragraph.",
        "First file, second paragraph.\n",
    ]
    records = TextCorpus(paths=[str(tmp_path / "c.jsonl"), str(tmp_path / "d.parquet")], text_key="body")
    assert list(records.documents()) == ["json one", "json two", "parquet one", "parquet two"]
    with pytest.raises(ValueError, match="text_key"):
        list(TextCorpus(paths=str(tmp_path / "c.jsonl")).documents())


def test_json_records_skip_blank_lines_and_null_texts_and_arrays_work(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": null}\n{"text": "  "}\n{"text": "two"}\n')
    (tmp_path / "b.json").write_text(json.dumps([{"text": "three"}, {"text": "four"}]))
    corpus = TextCorpus(paths=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.json")])
    assert list(corpus.documents()) == ["one", "two", "three", "four"]


def test_text_datamodule_packs_local_files(tmp_path):
    files = tmp_path / "docs"
    files.mkdir()
    for i in range(40):
        (files / f"{i:02d}.txt").write_text(f"Document number {i} talks about topic {i * 7}. " * (1 + i % 3))
    dm = PicoDataModule(
        corpus="text",
        corpus_options={"paths": str(files / "*.txt")},
        seq_len=16,
        batch_size=2,
        val_fraction=0.2,
        val_batches=1,
        cache_dir=tmp_path / "cache",
    )
    train, val, meta_test = dm.packed.train.stream, dm.packed.val.stream, dm.packed.meta_test.stream
    assert train.n_docs + val.n_docs + meta_test.n_docs == 40 and val.n_docs > 0 and meta_test.n_docs > 0
    text = dm.tokenizer.decode(train.document(0)[:-1])
    assert text == (files / f"{train.doc_ids[0]:02d}.txt").read_text()
    before = dm.corpus.fingerprint()
    (files / "00.txt").write_text("changed")  # a changed file changes the fingerprint, hence the cache
    assert dm.corpus.fingerprint() != before


# -- validation of the configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"corpus": "books"}, "corpus"),
        ({"tokenizer": "bert"}, "tokenizer"),
        ({"batch_size": 0}, "batch_size"),
        ({"seq_len": -4}, "seq_len"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"meta_test_fraction": -0.1}, "meta_test_fraction"),
        ({"val_fraction": 0.5, "meta_test_fraction": 0.5}, "meta_test_fraction"),
        ({"val_batches": -1}, "val_batches"),
        ({"corpus_options": {"n_doc": 5}}, "corpus_options"),
        ({"corpus_options": {"kinds": ["fibonacci"]}}, "kinds"),
        ({"corpus": "text", "corpus_options": {"paths": "/nonexistent/*.txt"}}, "paths"),
        ({"corpus": "dolma", "corpus_options": {}}, "tokenizer"),
        ({"corpus": "dolma", "corpus_options": {}, "tokenizer": "olmo", "seq_len": 4096}, "seq_len"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path, overrides, key):
    with pytest.raises(ValueError, match=key):
        synthetic_dm(tmp_path, **overrides)


def test_unknown_top_level_key_fails(tmp_path):
    with pytest.raises(TypeError, match="seq_length"):
        synthetic_dm(tmp_path, seq_length=12)


# -- batch order -------------------------------------------------------------------------------------


def test_batches_have_the_contract_shape(tmp_path):
    batch = next(synthetic_dm(tmp_path).train_batches(0))
    assert set(batch) == {"tokens", "microbatch"}
    assert batch["tokens"].shape == (3, 33) and batch["tokens"].dtype == torch.long
    assert batch["microbatch"].shape == () and int(batch["microbatch"]) == 0


def test_order_is_identical_across_instances_and_resumable(tmp_path):
    first = take(synthetic_dm(tmp_path).train_batches(0), 12)
    second = take(synthetic_dm(tmp_path).train_batches(0), 12)  # e.g. the run of another model size
    resumed = take(synthetic_dm(tmp_path).train_batches(7), 5)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a["tokens"], b["tokens"])
    for a, b in zip(first[7:], resumed, strict=True):
        assert torch.equal(a["tokens"], b["tokens"]) and int(a["microbatch"]) == int(b["microbatch"])
    assert [int(b["microbatch"]) for b in first] == list(range(12))


def test_seed_changes_the_order(tmp_path):
    a = next(synthetic_dm(tmp_path).train_batches(0))["tokens"]
    b = next(synthetic_dm(tmp_path, seed=1).train_batches(0))["tokens"]
    assert not torch.equal(a, b)


def test_dataloader_workers_do_not_change_the_order(tmp_path):
    reference = take(synthetic_dm(tmp_path).train_batches(0), 7)
    dm = synthetic_dm(tmp_path, num_workers=2)
    dm.load_state_dict({"next_microbatch": 2})
    loaded = take(iter(dm.train_dataloader()), 5)
    for a, b in zip(reference[2:], loaded, strict=True):
        assert torch.equal(a["tokens"], b["tokens"]) and int(a["microbatch"]) == int(b["microbatch"])


def test_ranks_split_the_global_micro_batch(tmp_path):
    single = take(synthetic_dm(tmp_path, batch_size=6).train_batches(0, rank=0, world_size=1), 4)
    dm = synthetic_dm(tmp_path, batch_size=3)
    rank0 = take(dm.train_batches(0, rank=0, world_size=2), 4)
    rank1 = take(dm.train_batches(0, rank=1, world_size=2), 4)
    for whole, r0, r1 in zip(single, rank0, rank1, strict=True):
        assert torch.equal(torch.cat([r0["tokens"], r1["tokens"]]), whole["tokens"])


def test_each_epoch_is_a_permutation_of_the_rows():
    rows = np.arange(10, dtype=np.int32)[:, None] * np.ones((1, 3), dtype=np.int32)
    order = PackedOrder(rows, seed=3)
    seen = order.rows_at(np.arange(30))[:, 0]
    for epoch in range(3):
        assert sorted(seen[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:20])


def test_validation_batches_are_fixed_and_rank_sliced(tmp_path):
    dm = synthetic_dm(tmp_path, val_batches=3)
    batches = list(dm.val_dataloader())
    assert len(batches) == 3 and [int(b["microbatch"]) for b in batches] == [0, 1, 2]
    assert all(b["tokens"].shape == (3, 33) and b["doc_ids"].shape == (3, 33) for b in batches)
    val_rows = torch.from_numpy(dm.packed.val.rows[:9].astype(np.int64))
    assert torch.equal(torch.cat([b["tokens"] for b in batches]), val_rows)
    assert set(torch.cat([b["doc_ids"] for b in batches]).unique().tolist()) <= set(
        dm.packed.val.stream.doc_ids
    )


# -- Lightning resume --------------------------------------------------------------------------------


def test_lightning_checkpoint_resumes_the_data_position(tmp_path):
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(int(batch["microbatch"]))
            return (self.weight * batch["tokens"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(max_steps, ckpt_path=None):
        trainer = L.Trainer(
            max_steps=max_steps,
            use_distributed_sampler=False,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        model = Recorder()
        trainer.fit(model, datamodule=synthetic_dm(tmp_path), ckpt_path=ckpt_path)
        return trainer, model

    trainer, first = fit(3)
    assert first.seen == [0, 1, 2]
    trainer.save_checkpoint(tmp_path / "step3.ckpt")
    _, resumed = fit(5, ckpt_path=tmp_path / "step3.ckpt")
    assert resumed.seen == [3, 4]


@pytest.mark.parametrize("name", ["wiki", "text", "synthetic", "dolma"])
def test_hydra_configs_instantiate(tmp_path, name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from picomaml.data import CORPUS_NAMES

    (tmp_path / "a.txt").write_text("some text")
    config = OmegaConf.load(Path(__file__).parents[1] / "conf" / "data" / f"{name}.yaml")
    if name == "text":
        config.corpus_options.paths = str(tmp_path / "*.txt")
    root = OmegaConf.create({"data": config, "paths": {"cache_dir": str(tmp_path)}})
    dm = instantiate(root.data)  # construction validates everything but touches no data
    assert isinstance(dm, PicoDataModule) and dm.corpus_name == name in CORPUS_NAMES
    assert dm.cache_dir == tmp_path
