"""Dolma streaming on a local fixture with the hub layout: 4 shards x 8 rows of 9 token ids.

Token ``r * 100 + j`` is position j of global row r, so every check can tell exactly which row and
which positions it got. Shards 0 and 1 train, shard 2 is the meta-test shard, shard 3 the validation
shard.
"""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from picomaml.data import PicoDataModule
from picomaml.data import dolma as dolma_module
from picomaml.data.dolma import OLMO_EOS_ID, DolmaSource

N_SHARDS, ROWS, ROW_LEN = 4, 8, 9


@pytest.fixture
def root(tmp_path):
    for shard in range(N_SHARDS):
        rows = [[(shard * ROWS + i) * 100 + j for j in range(ROW_LEN)] for i in range(ROWS)]
        rows[0][4] = OLMO_EOS_ID  # one document boundary per shard
        path = tmp_path / "data" / f"train-{shard:05d}-of-{N_SHARDS:05d}.parquet"
        path.parent.mkdir(exist_ok=True)
        # Row groups of 3 rows, so a skip lands inside a row group and across read batches.
        pq.write_table(pa.table({"input_ids": pa.array(rows, pa.list_(pa.int32()))}), path, row_group_size=3)
    return tmp_path


@pytest.fixture
def opened(monkeypatch):
    """Records the data files of every load_dataset call the Dolma code makes."""
    calls = []
    real = dolma_module.load_dataset

    def spy(*args, data_files, **kwargs):
        calls.append([path.rsplit("/", 1)[-1] for path in data_files])
        return real(*args, data_files=data_files, **kwargs)

    monkeypatch.setattr(dolma_module, "load_dataset", spy)
    return calls


def source(root):
    return DolmaSource(root=str(root), n_shards=N_SHARDS, rows_per_shard=ROWS, row_len=ROW_LEN)


def dm(root, **overrides):
    options = {"root": str(root), "n_shards": N_SHARDS, "rows_per_shard": ROWS, "row_len": ROW_LEN}
    config = {
        "corpus": "dolma",
        "corpus_options": options,
        "tokenizer": "olmo",
        "seq_len": 8,
        "batch_size": 3,
    }
    return PicoDataModule(**(config | overrides))


def row_ids(batch):
    return (batch["tokens"][:, 1] // 100).tolist()


def test_fast_forward_opens_only_the_needed_shards(root, opened):
    # Shard 0 is gone: reaching for it would fail, so passing proves it is never read.
    (root / "data" / "train-00000-of-00004.parquet").unlink()
    blocks = list(source(root).iter_rows(first_row=11, shards=range(2), width=ROW_LEN))
    rows = np.concatenate(blocks)
    assert opened == [["train-00001-of-00004.parquet"]]
    assert (rows[:, 1] // 100).tolist() == [11, 12, 13, 14, 15]
    assert rows[0].tolist() == [1100 + j for j in range(ROW_LEN)]


def test_batches_follow_the_dataset_order_and_wrap(root):
    batches = dm(root).train_batches(0)
    got = [row_ids(next(batches)) for _ in range(6)]
    # 16 training rows (shards 0 and 1); the 6th micro-batch crosses into the second pass.
    assert got == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14], [15, 0, 1]]


def test_resume_starts_at_the_right_shard(root, opened):
    batches = dm(root).train_batches(3)
    assert row_ids(next(batches)) == [9, 10, 11]
    assert int(next(batches)["microbatch"]) == 4
    assert opened == [["train-00001-of-00004.parquet"]]


def test_rank_slices_and_truncation(root):
    module = dm(root, batch_size=2, seq_len=4)
    rank0 = module.train_batches(1, rank=0, world_size=2)
    rank1 = module.train_batches(1, rank=1, world_size=2)
    first0, first1 = next(rank0), next(rank1)
    assert row_ids(first0) == [4, 5] and row_ids(first1) == [6, 7]
    assert first0["tokens"].shape == (2, 5) and first0["tokens"].dtype == torch.long
    assert first0["tokens"][0].tolist() == [400, 401, 402, 403, 404]
    assert row_ids(next(rank0)) == [8, 9] and row_ids(next(rank1)) == [10, 11]


def test_workers_do_not_change_the_order(root):
    module = dm(root, num_workers=2)
    module.load_state_dict({"next_microbatch": 1})
    loader = iter(module.train_dataloader())
    assert [row_ids(next(loader)) for _ in range(4)] == [[3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14]]


def test_validation_reads_the_held_out_shard(root):
    batches = list(dm(root, val_batches=2).val_dataloader())
    assert [row_ids(b) for b in batches] == [[24, 25, 26], [27, 28, 29]]
    assert batches[0]["doc_ids"][0].tolist() == [0] * 5 + [1] * 4  # eos at position 4 closes doc 0


def test_train_token_stream_splits_documents_at_eos(root):
    stream = dm(root).train_token_stream(max_tokens=2 * ROW_LEN)
    assert len(stream.tokens) == 2 * ROW_LEN and stream.tokens.dtype == np.int32
    assert stream.doc_offsets.tolist() == [0, 5, 18]


def test_a_short_shard_fails_loudly(root):
    path = root / "data" / "train-00000-of-00004.parquet"
    pq.write_table(pq.read_table(path).slice(1), path)  # 7 rows: later row indices would shift
    with pytest.raises(ValueError, match="holds 7 rows, expected 8"):
        list(source(root).iter_rows(first_row=0, shards=range(2), width=ROW_LEN))


# -- the meta-test shards ------------------------------------------------------------------------------


def test_meta_test_shards_sit_between_training_and_validation():
    shards = DolmaSource(n_shards=10, val_shards=2, meta_test_shards=3)
    assert shards.split_shards("train") == range(5)
    assert shards.split_shards("meta_test") == range(5, 8)
    assert shards.split_shards("val") == range(8, 10)
    assert shards.train_rows == 5 * shards.rows_per_shard
    with pytest.raises(ValueError, match="leave no training shards"):
        DolmaSource(n_shards=3, val_shards=1, meta_test_shards=2)
    with pytest.raises(ValueError, match="meta_test_shards must be >= 0"):
        DolmaSource(meta_test_shards=-1)


def test_training_never_reads_the_meta_test_shard(root, opened):
    # 16 training rows: two passes over shards 0 and 1, never shard 2 (meta-test) or 3 (validation)
    batches = dm(root, batch_size=4).train_batches(0)
    seen = [row for _ in range(8) for row in row_ids(next(batches))]
    assert seen == [*range(16), *range(16)]
    assert {name for call in opened for name in call} == {
        "train-00000-of-00004.parquet",
        "train-00001-of-00004.parquet",
    }


def test_meta_test_stream_reads_only_the_meta_test_shard(root, opened):
    stream = dm(root).meta_test_token_stream(max_tokens=3 * ROW_LEN)
    rows = stream.tokens.reshape(-1, ROW_LEN).astype(np.int64)
    assert (rows[:, 1] // 100).tolist() == [16, 17, 18]  # the first rows of shard 2
    assert stream.doc_offsets.tolist() == [0, 5, 27]  # the eos at position 4 of row 16
    assert opened == [["train-00002-of-00004.parquet"]]
    # a budget past the shard stops at its 8 rows instead of reading validation or training rows
    whole = dm(root).meta_test_token_stream(max_tokens=100 * ROW_LEN)
    assert (whole.tokens.reshape(-1, ROW_LEN)[:, 1] // 100).tolist() == list(range(16, 24))


def test_no_meta_test_shard_refuses_meta_test(root):
    options = {"root": str(root), "n_shards": N_SHARDS, "rows_per_shard": ROWS, "row_len": ROW_LEN}
    module = dm(root, corpus_options={**options, "meta_test_shards": 0})
    assert row_ids(next(module.train_batches(0))) == [0, 1, 2]
    with pytest.raises(ValueError, match="meta_test_shards=0"):
        module.meta_test_token_stream()
