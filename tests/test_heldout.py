"""Held-out meta-test text: meta-test episodes come from documents that AR training never sees.

Meta-test SMLMT classes are held-out *words* (``meta.meta_test_fraction``); these tests check that their
windows are also held-out *text*: a third document split (``data.meta_test_fraction``) disjoint from
train and val, checked on document ids and on the tokens themselves, large enough on the embedded wiki
for >= 100 eligible held-out words, and fixed by the data config alone (not the model, not meta).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from picomaml.config import ConfigError
from picomaml.data import PicoDataModule
from picomaml.data.corpora import WikiCorpus
from picomaml.data.packing import SPLITS, TokenStream, assign_splits, validation_mask
from picomaml.meta import MetaBatchDataset, MetaConfig
from picomaml.train import prepare_run
from tests.helpers import FAST, compose_train

WIKI_YAML = Path(__file__).parents[1] / "picomaml" / "conf" / "data" / "wiki.yaml"


def wiki_from_config(cache_dir: Path) -> PicoDataModule:
    """The datamodule ``data=wiki`` instantiates, with every key at its config default."""
    config = OmegaConf.load(WIKI_YAML)
    root = OmegaConf.create({"data": config, "paths": {"cache_dir": str(cache_dir)}})
    return instantiate(root.data)


@pytest.fixture(scope="module")
def wiki(cache_dir: Path) -> PicoDataModule:
    dm = wiki_from_config(cache_dir)
    dm.setup_meta(MetaConfig())  # meta=5way4shot, the default meta job
    return dm


@pytest.fixture(scope="module")
def wiki_texts() -> list[str]:
    return list(WikiCorpus().documents())


def find_sequences(haystack: np.ndarray, needles: list[np.ndarray]) -> list[int]:
    """Indices of the needles (token sequences of >= 4 GPT-2 ids) occurring contiguously in haystack.

    A 4-gram of ids < 2**16 packs exactly into a uint64, so candidate positions come from an exact
    sorted index of the haystack's 4-grams (no hash collisions); each needle is anchored on its rarest
    4-gram, and every candidate is then compared token by token.
    """
    assert haystack.max() < 2**16
    grams = np.lib.stride_tricks.sliding_window_view(haystack.astype(np.uint64), 4)
    keys = grams @ (np.uint64(1) << np.arange(48, -1, -16, dtype=np.uint64))
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    found = []
    for i, needle in enumerate(needles):
        assert len(needle) >= 4
        needle_grams = np.lib.stride_tricks.sliding_window_view(needle.astype(np.uint64), 4)
        needle_keys = needle_grams @ (np.uint64(1) << np.arange(48, -1, -16, dtype=np.uint64))
        lo = np.searchsorted(sorted_keys, needle_keys, side="left")
        hi = np.searchsorted(sorted_keys, needle_keys, side="right")
        anchor = int(np.argmin(hi - lo))
        for position in order[lo[anchor] : hi[anchor]].tolist():
            start = position - anchor
            if start >= 0 and np.array_equal(haystack[start : start + len(needle)], needle):
                found.append(i)
                break
    return found


def documents(stream: TokenStream) -> list[np.ndarray]:
    """The stream's documents without their eos."""
    return [stream.document(k)[:-1] for k in range(stream.n_docs)]


# -- the split -----------------------------------------------------------------------------------------


def test_three_splits_partition_the_documents(wiki: PicoDataModule) -> None:
    packed = wiki.packed
    ids = {name: set(getattr(packed, name).stream.doc_ids.tolist()) for name in SPLITS}
    assert not ids["meta_test"] & ids["train"] and not ids["meta_test"] & ids["val"]
    assert not ids["train"] & ids["val"]
    assert sorted(ids["train"] | ids["val"] | ids["meta_test"]) == list(range(10033))
    # the defaults of data=wiki: val 0.02, meta_test 0.15 of the documents
    assert 0.01 < len(ids["val"]) / 10033 < 0.03
    assert 0.13 < len(ids["meta_test"]) / 10033 < 0.17


def test_meta_test_text_is_absent_from_the_ar_rows(wiki: PicoDataModule, wiki_texts: list[str]) -> None:
    """Token level: no meta-test document occurs anywhere in the train or val rows (what AR training and
    validation are served), and the meta-test documents are the corpus's own text."""
    packed, tokenizer = wiki.packed, wiki.tokenizer
    meta_test = packed.meta_test.stream
    for k in range(meta_test.n_docs):  # the doc ids are truthful: each is its article, tokenized afresh
        expected = tokenizer(wiki_texts[meta_test.doc_ids[k]], add_special_tokens=False)["input_ids"]
        assert meta_test.document(k)[:-1].tolist() == expected
    needles = documents(meta_test)
    for split in (packed.train, packed.val):
        assert find_sequences(split.rows.reshape(-1), needles) == []
    # the search can fail: train documents are found in the train rows, meta-test ones in their own
    train_docs = documents(packed.train.stream)[:50]
    assert find_sequences(packed.train.rows.reshape(-1), train_docs) == list(range(50))
    assert find_sequences(packed.meta_test.rows.reshape(-1), needles[:50]) == list(range(50))


def test_training_batches_are_train_rows(wiki: PicoDataModule) -> None:
    train_rows = {row.tobytes() for row in wiki.packed.train.rows.astype(np.int64)}
    meta_test_rows = {row.tobytes() for row in wiki.packed.meta_test.rows.astype(np.int64)}
    batches = wiki.train_batches(0)
    for _ in range(20):
        for row in next(batches)["tokens"].numpy():
            assert row.tobytes() in train_rows and row.tobytes() not in meta_test_rows


# -- episodes ---------------------------------------------------------------------------------------


def assert_windows_in(episodes: MetaBatchDataset, stream: TokenStream, n_episodes: int) -> None:
    """Every window of the first episodes lies inside one document of ``stream``, and what the episode
    shows of it (its unmasked tokens, in order) is that document's text."""
    index = episodes.sampler.index
    assert np.array_equal(index.tokens, stream.tokens[: len(index.tokens)])
    mask_id = index.mask_id
    for e in range(n_episodes):
        batch = episodes[e]
        for side in ("support", "query"):
            chunks = batch[f"{side}_windows"].reshape(-1).numpy()
            tokens = batch[f"{side}_tokens"].reshape(len(chunks), -1).numpy()
            lengths = batch[f"{side}_lengths"].reshape(-1).numpy()
            for chunk, window, length in zip(chunks, tokens, lengths, strict=True):
                start, size = index.chunk_starts[chunk], index.chunk_lens[chunk]
                k = int(np.searchsorted(stream.doc_offsets, start, side="right")) - 1
                assert start + size < stream.doc_offsets[k + 1]  # inside document k, before its eos
                document = iter(stream.document(k).tolist())
                shown = [t for t in window[:length].tolist() if t != mask_id]
                assert all(t in document for t in shown)  # an in-order subsequence of the document


def test_meta_test_episodes_come_from_meta_test_documents(wiki: PicoDataModule) -> None:
    stream = wiki.packed.meta_test.stream
    for episodes in (wiki.meta_test_episodes, wiki.meta_test_dataset(MetaConfig(), seed=3)):
        index = episodes.sampler.index
        assert_windows_in(episodes, stream, n_episodes=20)
        classes = torch.cat([episodes[e]["class_words"].reshape(-1) for e in range(20)]).numpy()
        assert index.is_meta_test[classes].all()
    # validation scores exactly these episodes
    meta_loader = wiki.val_dataloader()[1]
    first = next(iter(meta_loader))
    assert torch.equal(first["support_tokens"], wiki.meta_test_episodes[0]["support_tokens"])


def test_meta_train_episodes_come_from_the_ar_stream(wiki: PicoDataModule) -> None:
    episodes = wiki.meta_train_episodes
    assert_windows_in(episodes, wiki.packed.train.stream, n_episodes=10)
    classes = torch.cat([episodes[e]["class_words"].reshape(-1) for e in range(10)]).numpy()
    assert not episodes.sampler.index.is_meta_test[classes].any()


def test_default_wiki_holds_out_at_least_100_eligible_words(wiki: PicoDataModule) -> None:
    index = wiki.meta_test_episodes.sampler.index
    cfg = MetaConfig()
    assert (cfg.n_way, cfg.k_shot, cfg.q_query) == (5, 4, 4)
    eligible = index.eligible(cfg.shots, meta_test=True)
    assert len(eligible) >= 100
    ten_way = wiki.meta_test_dataset(MetaConfig(n_way=10, tasks_per_step=1), seed=0)
    assert ten_way.sampler.pool.size >= 100


# -- determinism ------------------------------------------------------------------------------------


def test_split_is_the_same_across_builds(tmp_path: Path, wiki: PicoDataModule) -> None:
    again = wiki_from_config(tmp_path)  # a fresh cache: tokenized and split again
    assert again.packed.path.name == wiki.packed.path.name and again.packed.path != wiki.packed.path
    for name in SPLITS:
        ours, theirs = getattr(wiki.packed, name).stream, getattr(again.packed, name).stream
        assert np.array_equal(ours.doc_ids, theirs.doc_ids)
        assert np.array_equal(ours.tokens, theirs.tokens)


def test_split_and_meta_test_episodes_do_not_depend_on_the_model(tmp_path: Path, cache_dir: Path) -> None:
    plans = {}
    for model in ("tiny", "11m"):
        overrides = [*FAST, f"model={model}", "data=wiki", "meta=5way4shot", "meta.buffer_tokens=200000"]
        plans[model] = prepare_run(compose_train(overrides, tmp_path / model, cache_dir))
    tiny, other = (plans[m].datamodule for m in ("tiny", "11m"))
    assert tiny.packed.path == other.packed.path
    for name in SPLITS:
        assert np.array_equal(
            getattr(tiny.packed, name).stream.doc_ids, getattr(other.packed, name).stream.doc_ids
        )
    for e in range(3):
        a, b = tiny.meta_test_episodes[e], other.meta_test_episodes[e]
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_val_is_unchanged_and_meta_test_grows_by_moving_train_documents() -> None:
    codes = {f: assign_splits(20000, 0.02, f, seed=5) for f in (0.0, 0.1, 0.15)}
    val = SPLITS.index("val")
    meta_test = SPLITS.index("meta_test")
    for f, split in codes.items():
        assert np.array_equal(split == val, validation_mask(20000, 0.02, seed=5))
        assert abs((split == meta_test).mean() - f) < 0.01
    assert not (codes[0.0] == meta_test).any()
    assert np.all(codes[0.15][codes[0.1] == meta_test] == meta_test)  # nested: only train docs move
    assert not np.array_equal(assign_splits(20000, 0.02, 0.15, seed=6), codes[0.15])
    with pytest.raises(ValueError, match="sum < 1"):
        assign_splits(10, 0.5, 0.5, seed=0)


def test_meta_test_fraction_enters_the_cache(cache_dir: Path) -> None:
    def build(fraction: float) -> PicoDataModule:
        options = {"n_docs": 300}
        return PicoDataModule(
            corpus="synthetic",
            corpus_options=options,
            seq_len=32,
            meta_test_fraction=fraction,
            cache_dir=cache_dir,
        )

    none, some = build(0.0), build(0.2)
    assert none.packed.path != some.packed.path
    assert none.packed.meta_test.stream.n_docs == 0 and none.packed.meta_test.rows.shape == (0, 33)
    assert none.packed.train.stream.n_docs + none.packed.val.stream.n_docs == 300
    assert some.packed.meta_test.stream.n_docs > 0
    assert some.packed.train.stream.n_docs < none.packed.train.stream.n_docs
    assert np.array_equal(some.packed.val.stream.doc_ids, none.packed.val.stream.doc_ids)


# -- no held-out text -----------------------------------------------------------------------------------


def test_meta_needs_held_out_documents(tmp_path: Path, cache_dir: Path) -> None:
    dm = PicoDataModule(
        corpus="synthetic", corpus_options={"n_docs": 300}, meta_test_fraction=0.0, cache_dir=cache_dir
    )
    next(dm.train_batches(0))  # AR training is fine without a meta-test split
    for call in (lambda: dm.meta_test_dataset(MetaConfig(), seed=0), lambda: dm.setup_meta(MetaConfig())):
        with pytest.raises(ValueError, match="meta_test_fraction=0 holds out no"):
            call()
    # data=synthetic holds out nothing for meta-test: meta-learning on it fails before training
    with pytest.raises(ConfigError, match="data.meta_test_fraction=0"):
        prepare_run(compose_train([*FAST, "meta=5way4shot"], tmp_path, cache_dir))
