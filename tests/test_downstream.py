"""Downstream few-shot scoring on the real BBC-news and tweet-sentiment data (tiny model, small configs)."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from picomaml.bench.downstream import bench_downstream
from picomaml.data.tokenizer import load_tokenizer
from picomaml.eval import downstream
from picomaml.eval.downstream import (
    TASK_NAMES,
    DownstreamConfig,
    episode,
    evaluate_downstream,
    finetune_curve,
    load_task,
    paired_difference,
    scalar_metrics,
    score_head,
    tfidf_accuracy,
    tokenize,
)
from picomaml.meta import MetaConfig, MetaHead
from picomaml.model import PicoDecoder, load_model_config

# a head with a body, so "the head is unchanged" covers meta-learned body parameters too
META = MetaConfig(head_hidden_dims=[16])
SMALL = DownstreamConfig(
    ks=[2, 4],
    episodes=3,
    test_per_class=10,
    window_len=24,
    inner_steps=3,
    finetune_episodes=2,
    finetune_steps=[0, 2],
    finetune_lr=1e-3,
    batch_size=16,
)
HEAD_ONLY = dataclasses.replace(SMALL, finetune_episodes=0)


def _model(seed: int) -> PicoDecoder:
    torch.manual_seed(seed)
    return PicoDecoder(load_model_config("tiny"))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def small_results(tokenizer) -> dict:
    return evaluate_downstream(_model(0), None, tokenizer, SMALL, META)


@pytest.fixture(scope="module")
def two_models(tokenizer) -> tuple[list[dict], list[list]]:
    """Head-only results of two differently initialised models, and the episodes each evaluation drew."""
    seen: list[list] = []

    def recording(*args, **kwargs):
        ep = episode(*args, **kwargs)
        seen[-1].append(ep)
        return ep

    results = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(downstream, "episode", recording)
        for seed in (0, 1):
            seen.append([])
            results.append(evaluate_downstream(_model(seed), None, tokenizer, HEAD_ONLY, META))
    return results, seen


@pytest.mark.parametrize("name", TASK_NAMES)
def test_split_is_disjoint_class_balanced_and_stable(name: str) -> None:
    task = load_task(name, test_per_class=40)
    train = [i for pool in task.train for i in pool]
    assert set(train).isdisjoint(task.test)
    assert sorted(train + list(task.test)) == list(range(len(task.texts)))  # nothing lost
    assert collections.Counter(task.test_labels) == dict.fromkeys(range(task.n_way), 40)
    assert all(task.labels[i] == c for c, pool in enumerate(task.train) for i in pool)
    assert len(set(task.texts)) == len(task.texts)  # duplicates cannot straddle the split
    # the split is a hash order: recomputed from scratch it is the same, and a larger test pool
    # only adds texts (class by class)
    assert load_task.__wrapped__(name, 40) == task
    bigger = load_task(name, test_per_class=50)
    for c in range(task.n_way):
        assert set(task.test[40 * c : 40 * (c + 1)]) <= set(bigger.test[50 * c : 50 * (c + 1)])


def test_task_contents() -> None:
    bbc = load_task("bbc_news")
    assert bbc.classes == ("business", "entertainment", "politics", "sports", "tech")
    assert len(bbc.texts) == 2127  # 2,225 files, exact duplicates dropped
    assert bbc.texts[0].startswith("Ad sales boost Time Warner profit")
    tweets = load_task("tweet_sentiment")
    assert tweets.classes == ("negative", "neutral", "positive")
    assert all("\r" not in t and "&amp;" not in t for t in tweets.texts)
    assert min(collections.Counter(tweets.labels).values()) > 1000


@pytest.mark.parametrize("k", [4, 8, 16])
def test_episode_support_is_k_per_class_from_the_train_pool(k: int) -> None:
    task = load_task("bbc_news")
    ep = episode(task, k, 3, seed=0)
    assert collections.Counter(ep.support_labels) == dict.fromkeys(range(5), k)
    assert len(set(ep.support)) == 5 * k
    for i, label in zip(ep.support, ep.support_labels, strict=True):
        assert task.labels[i] == label and i in task.train[label]
    assert ep.query == task.test and ep.query_labels == task.test_labels
    # a function of (task, k, index, seed) alone
    assert episode(task, k, 3, seed=0) == ep
    assert episode(task, k, 4, seed=0).support != ep.support
    assert episode(task, k, 3, seed=1).support != ep.support


def test_supports_of_one_episode_are_nested_in_k() -> None:
    task = load_task("tweet_sentiment")
    small, large = episode(task, 4, 2), episode(task, 16, 2)
    for c in range(task.n_way):
        assert small.support[4 * c : 4 * (c + 1)] == large.support[16 * c : 16 * c + 4]


def test_two_models_see_the_same_episodes(two_models: tuple[list[dict], list[list]]) -> None:
    results, seen = two_models
    assert len(seen[0]) == len(HEAD_ONLY.tasks) * len(HEAD_ONLY.ks) * HEAD_ONLY.episodes
    assert seen[0] == seen[1]
    # the models differ, so their features (and some head scores) do; the bag-of-words floor does not
    assert (
        results[0]["downstream/bbc_news/k4/tfidf/episodes"]
        == results[1]["downstream/bbc_news/k4/tfidf/episodes"]
    )


def test_results_keys_and_confidence_intervals(small_results: dict) -> None:
    r = small_results
    for name in TASK_NAMES:
        assert r[f"downstream/{name}/chance"] == pytest.approx(1 / load_task(name).n_way)
        for k in SMALL.ks:
            scorers = ["head", "head0", "tfidf", *(f"finetune/step{s}" for s in SMALL.finetune_steps)]
            for scorer in scorers:
                prefix = f"downstream/{name}/k{k}/{scorer}"
                accs = r[f"{prefix}/episodes"]
                n = SMALL.finetune_episodes if scorer.startswith("finetune") else SMALL.episodes
                assert len(accs) == n and all(0 <= a <= 1 for a in accs)
                assert r[f"{prefix}/acc"] == pytest.approx(statistics.fmean(accs))
                assert r[f"{prefix}/acc_ci95"] == pytest.approx(1.96 * statistics.stdev(accs) / math.sqrt(n))
    json.dumps(r)  # JSON-ready as it is
    scalars = scalar_metrics(r)
    assert all(isinstance(v, float) for v in scalars.values())
    assert not any(key.endswith("/episodes") for key in scalars)


def test_finetune_step0_is_the_prototype_init(small_results: dict) -> None:
    # exact: the copy re-encodes its texts in other batches, but on CPU a text's features do not depend
    # on the batch it is in, and both start from the same ProtoMAML output layer
    for name in TASK_NAMES:
        for k in SMALL.ks:
            prefix = f"downstream/{name}/k{k}"
            head0 = small_results[f"{prefix}/head0/episodes"][: SMALL.finetune_episodes]
            assert small_results[f"{prefix}/finetune/step0/episodes"] == head0


def test_paired_difference_matches_the_formula(two_models: tuple[list[dict], list[list]]) -> None:
    (first, second), _ = two_models
    diff = paired_difference(first, second)
    assert {
        f"{key.removesuffix('/episodes')}/diff" for key in first if key.endswith("/episodes")
    } <= diff.keys()
    key = "downstream/bbc_news/k4/head"
    d = [b - a for a, b in zip(first[f"{key}/episodes"], second[f"{key}/episodes"], strict=True)]
    assert diff[f"{key}/diff"] == pytest.approx(statistics.fmean(d))
    assert diff[f"{key}/diff_ci95"] == pytest.approx(1.96 * statistics.stdev(d) / math.sqrt(len(d)))
    assert all(v == 0 for v in paired_difference(second, second).values())


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluation_changes_neither_model_nor_head_nor_global_rng(tokenizer) -> None:
    model = _model(0).train()
    torch.manual_seed(7)
    head = MetaHead(model.config.d_model, META)
    model_before, head_before = _state(model), _state(head)
    rng_before = torch.get_rng_state()
    cfg = dataclasses.replace(SMALL, tasks=["tweet_sentiment"], ks=[2])
    evaluate_downstream(model, head, tokenizer, cfg, META)
    evaluate_downstream(model, None, tokenizer, dataclasses.replace(cfg, finetune_episodes=0), META)
    assert _same(_state(model), model_before) and _same(_state(head), head_before)
    assert model.training  # the caller's mode is restored
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_pooling_defaults_to_the_meta_configs(tokenizer) -> None:
    model = _model(0)
    cfg = dataclasses.replace(HEAD_ONLY, tasks=["tweet_sentiment"], ks=[2])
    mean_meta = dataclasses.replace(META, pooling="mean")
    inherited = evaluate_downstream(model, None, tokenizer, cfg, mean_meta)
    explicit = evaluate_downstream(model, None, tokenizer, dataclasses.replace(cfg, pooling="mean"), META)
    last = evaluate_downstream(model, None, tokenizer, cfg, META)
    key = "downstream/tweet_sentiment/k2/head0/episodes"
    assert inherited[key] == explicit[key] != last[key]


def test_head_only_scoring_leaves_the_head_unchanged() -> None:
    torch.manual_seed(0)
    head = MetaHead(48, META)
    before = _state(head)
    support, query = torch.randn(4, 6, 48), torch.randn(9, 48)
    labels = torch.arange(3).repeat_interleave(2).repeat(4, 1)
    adapted, proto = score_head(head, support, labels, query, torch.arange(3).repeat(3), 3, inner_steps=5)
    assert len(adapted) == len(proto) == 4
    assert _same(_state(head), before)


def test_finetuning_trains_a_copy_only(tokenizer) -> None:
    task = load_task("bbc_news", test_per_class=10)
    ep = episode(task, 2, 0)
    model = _model(0)
    torch.manual_seed(0)
    head = MetaHead(model.config.d_model, META)
    model_before, head_before = _state(model), _state(head)
    support = tokenize(tokenizer, [task.texts[i] for i in ep.support], 24)
    query = tokenize(tokenizer, [task.texts[i] for i in ep.query], 24)
    curve, tuned_model, tuned_head = finetune_curve(
        model,
        head,
        support,
        torch.tensor(ep.support_labels),
        query,
        torch.tensor(ep.query_labels),
        task.n_way,
        SMALL,
        "last",
        torch.device("cpu"),
    )
    assert len(curve) == 2
    assert _same(_state(model), model_before) and _same(_state(head), head_before)
    tuned = _state(tuned_model)
    assert not torch.equal(
        tuned["layers.0.attention.q_proj.weight"], model_before["layers.0.attention.q_proj.weight"]
    )
    assert not torch.equal(_state(tuned_head)["body.body0_weight"], head_before["body.body0_weight"])


def test_tfidf_floor_is_far_above_chance() -> None:
    bbc = load_task("bbc_news")
    accs = [tfidf_accuracy(bbc, episode(bbc, 16, i)) for i in range(5)]
    assert statistics.fmean(accs) > 0.85  # ~0.94 over 10 episodes; chance is 0.2
    tweets = load_task("tweet_sentiment")
    accs = [tfidf_accuracy(tweets, episode(tweets, 16, i)) for i in range(5)]
    assert statistics.fmean(accs) > 0.45  # ~0.57; chance is 0.33


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("tasks", ["bbc_news", "imdb"]),
        ("ks", [4, 0]),
        ("episodes", 0),
        ("test_per_class", 0),
        ("window_len", 0),
        ("pooling", "max"),
        ("inner_steps", -1),
        ("finetune_episodes", 11),
        ("finetune_steps", [0, 4, 2]),
        ("finetune_lr", 0.0),
        ("finetune_optimizer", "lbfgs"),
        ("seed", -1),
        ("batch_size", 0),
    ],
)
def test_bad_config_names_the_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^downstream\\.{key} ") as err:
        DownstreamConfig(**{key: value})
    assert "\n" not in str(err.value)


def test_window_must_fit_the_model(tokenizer) -> None:
    with pytest.raises(ValueError, match="window_len=512 exceeds model.max_seq_len=256"):
        evaluate_downstream(_model(0), None, tokenizer, DownstreamConfig(window_len=512))


def test_bench_downstream_smoke(tmp_path: Path) -> None:
    out = tmp_path / "downstream.json"
    threads = torch.get_num_threads()
    try:
        bench_downstream(
            ["model=tiny", "ks=2", "episodes=2", "test_per_class=5", "window_len=16", "finetune=true"]
            + ["finetune_episodes=1", "finetune_steps=0,1", "threads=1", f"out={out}"]
        )
    finally:
        torch.set_num_threads(threads)  # the benchmark sets the process-wide thread count
    r = json.loads(out.read_text())
    assert r["model"] == "tiny" and r["ks"] == [2] and r["tasks"] == list(TASK_NAMES)
    assert r["head_only_s"] == pytest.approx(r["encode_s"] + r["head_s"])
    assert 0 < r["encode_s"] + r["head_s"] + r["tfidf_s"] + r["finetune_s"] <= r["wall_s"]
    assert "downstream/bbc_news/k2/finetune/step1/acc" in r["metrics"]


def test_tokenizing_episodes_leaves_the_shared_tokenizer_untruncated() -> None:
    # the tokenizer is cached process-wide; a truncation left on its Rust backend would cut every
    # document packed later in the same process (e.g. after a periodic evaluation)
    tokenizer = load_tokenizer("gpt2")
    text = "hello world " * 50
    full = len(tokenizer.backend_tokenizer.encode(text).ids)
    assert [len(ids) for ids in tokenize(tokenizer, [text], 8)] == [8]
    assert tokenizer.backend_tokenizer.truncation is None
    assert len(tokenizer.backend_tokenizer.encode(text).ids) == full > 8
