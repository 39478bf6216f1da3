"""SMLMT episodes (Bansal et al., 2020): N-way K-shot classification of masked words.

A task picks ``n_way`` distinct word types from the eligible words of a :class:`WordIndex`, and for each
``k_shot + q_query`` distinct windows that contain it. In every window, each occurrence of its class word
(all BPE pieces of it, in any casing) becomes ONE mask token, so the window shrinks; it is then
right-padded with the pad id to ``window_len`` and its real length is kept. Labels are a fresh random
permutation of 0..n_way-1 per task, so a label never means the same word twice.

Choices made here:

- Windows are the fixed, non-overlapping document chunks of the index (see :mod:`picomaml.meta.words`),
  so windows of one class never overlap each other, and the N*(K+Q) windows of a task are distinct
  chunk ids, so no two windows of a task share any text. Support and query are disjoint.
- Other classes' words (and meta-test words) MAY appear unmasked in a window: a window only hides its own
  class word. Masking every class word everywhere would leak the class through the mask count.
- Inflections are different word types ("apple" vs "apples"): a window of class "apple" may show
  "apples". That is the task as the paper defines it (word types, not lemmas).
- Windows are listed class-major (class i's K support windows, then the next class's); the labels carry
  the permutation, and the model encodes each window independently, so the order carries no signal.

Episode ``e`` of stream (``seed``, meta_test) is built from ``np.random.default_rng([seed, stream, e])``
only, so any episode can be rebuilt from its number: resuming at episode e needs no sampler state.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from picomaml.meta.config import MetaConfig
from picomaml.meta.words import WordIndex

BATCH_KEYS = (
    "support_tokens",
    "support_lengths",
    "support_labels",
    "query_tokens",
    "query_lengths",
    "query_labels",
    "class_words",
    "support_windows",
    "query_windows",
    "episode",
)


class EpisodeSampler:
    """Builds SMLMT tasks from a word index; raises ValueError at construction if too few words qualify.

    Args:
        index: the word index (its mask and pad ids are used for the windows).
        cfg: episode shape, sampling and window length.
        meta_test: draw classes from the held-out meta-test words instead of the meta-train words.
    """

    def __init__(self, index: WordIndex, cfg: MetaConfig, meta_test: bool = False) -> None:
        self.index = index
        self.cfg = cfg
        self.meta_test = meta_test
        self.pool = index.eligible(cfg.shots, meta_test)
        split = "meta-test" if meta_test else "meta-train"
        if self.pool.size < cfg.n_way:
            raise ValueError(
                f"SMLMT: only {self.pool.size} {split} words occur in at least k_shot + q_query = "
                f"{cfg.shots} distinct windows (meta.k_shot={cfg.k_shot}, meta.q_query={cfg.q_query}), but "
                f"meta.n_way={cfg.n_way} are needed. Lower meta.n_way, meta.k_shot or meta.q_query, a "
                f"smaller meta.window_len, or index more text (meta.buffer_tokens={cfg.buffer_tokens}, "
                f"{index.tokens.size} tokens indexed)."
            )
        counts = index.num_windows[self.pool].astype(np.float64)
        if cfg.sampling == "uniform":
            self.cumulative = None
        else:
            weights = counts**cfg.alpha if cfg.sampling == "freq_pow" else np.log1p(counts)
            self.cumulative = np.cumsum(weights)

    def task(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One N-way task as numpy arrays (the per-task slices of the keys in :data:`BATCH_KEYS`)."""
        cfg, index = self.cfg, self.index
        n_way, shots = cfg.n_way, cfg.shots
        classes, chunks = self._classes(rng)
        starts = index.chunk_starts[chunks].ravel()
        lens = index.chunk_lens[chunks].ravel()
        offsets = np.arange(cfg.window_len)
        tokens = index.tokens[np.minimum(starts[:, None] + offsets, index.tokens.size - 1)].astype(np.int64)
        keep = offsets < lens[:, None]
        row, rel, length = self._class_occurrences(classes, chunks, starts)
        tokens[row, rel] = index.mask_id
        # the word's later pieces disappear: one mask stands for the whole word
        for piece in range(1, int(length.max(initial=1))):
            longer = length > piece
            keep[row[longer], rel[longer] + piece] = False
        lengths = keep.sum(axis=1)
        # kept tokens move left, in order, to their rank among the kept tokens of their row
        row_kept, col_kept = np.nonzero(keep)
        windows = np.full_like(tokens, index.pad_id)
        windows[row_kept, np.cumsum(keep, axis=1)[row_kept, col_kept] - 1] = tokens[row_kept, col_kept]

        perm = rng.permutation(n_way)
        labels = np.repeat(perm, shots).reshape(n_way, shots)
        class_words = np.empty(n_way, dtype=np.int64)
        class_words[perm] = classes
        windows = windows.reshape(n_way, shots, -1)
        lengths = lengths.reshape(n_way, shots)
        k = cfg.k_shot
        return {
            "support_tokens": windows[:, :k].reshape(n_way * k, -1),
            "support_lengths": lengths[:, :k].ravel(),
            "support_labels": labels[:, :k].ravel(),
            "query_tokens": windows[:, k:].reshape(n_way * cfg.q_query, -1),
            "query_lengths": lengths[:, k:].ravel(),
            "query_labels": labels[:, k:].ravel(),
            "class_words": class_words,
            "support_windows": chunks[:, :k].ravel(),
            "query_windows": chunks[:, k:].ravel(),
        }

    def meta_batch(self, episode: int, seed: int) -> dict[str, torch.Tensor]:
        """``cfg.tasks_per_step`` tasks of episode ``episode``, stacked along a leading task dimension."""
        stream = 1 if self.meta_test else 0
        rng = np.random.default_rng([seed, stream, episode])
        tasks = [self.task(rng) for _ in range(self.cfg.tasks_per_step)]
        batch = {key: torch.from_numpy(np.stack([t[key] for t in tasks])) for key in tasks[0]}
        batch["episode"] = torch.tensor(episode, dtype=torch.long)
        return batch

    def _classes(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """N distinct words and, per word, K+Q distinct windows no other class of the task uses.

        Words are drawn with replacement (uniformly or by weight) and repeats skipped, which is exactly
        weighted sampling without replacement, in O(N log P) instead of O(P) for P eligible words. A word
        whose windows are all taken by earlier classes of the task is skipped too.
        """
        n_way = self.cfg.n_way
        classes: list[int] = []
        chunks: list[list[int]] = []
        used: set[int] = set()
        seen: set[int] = set()
        while len(classes) < n_way:
            if len(seen) == self.pool.size:
                # a corpus problem, not a bug: callers report it like the too-few-words error above
                split = "meta-test" if self.meta_test else "meta-train"
                raise ValueError(
                    f"SMLMT: the {self.pool.size} eligible {split} words share too many windows to fill one "
                    f"meta.n_way={n_way} task ({self.cfg.shots} windows of its own per class); index more "
                    "text (meta.buffer_tokens, or data.meta_test_fraction for meta-test) or lower meta.n_way"
                )
            for j in self._draw(rng, 2 * n_way).tolist():
                if j in seen:
                    continue
                seen.add(j)
                word = int(self.pool[j])
                picked = self._windows(word, used, rng)
                if picked is not None:
                    classes.append(word)
                    chunks.append(picked)
                    used.update(picked)
                    if len(classes) == n_way:
                        break
        return np.asarray(classes, dtype=np.int64), np.asarray(chunks, dtype=np.int64)

    def _draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` pool positions drawn with replacement under the configured sampling weights."""
        if self.cumulative is None:
            return rng.integers(0, self.pool.size, size=size)
        return np.searchsorted(self.cumulative, rng.random(size) * self.cumulative[-1], side="right")

    def _windows(self, word: int, used: set[int], rng: np.random.Generator) -> list[int] | None:
        """K+Q distinct random windows of ``word`` not in ``used``, or None if fewer remain.

        Looking at ``shots + len(used)`` distinct random candidates (or all of them) guarantees ``shots``
        unused ones whenever they exist, without touching every window of a frequent word.
        """
        index, shots = self.index, self.cfg.shots
        lo, hi = int(index.win_ptr[word]), int(index.win_ptr[word + 1])
        count = hi - lo
        draw = min(count, shots + len(used))
        if 4 * draw < count:
            # repeats skipped in order = uniform sampling without replacement
            order = list(dict.fromkeys(rng.integers(0, count, size=2 * draw).tolist()))[:draw]
        else:
            order = []
        if len(order) < draw:
            order = rng.permutation(count)[:draw].tolist()
        candidates = index.win_chunk[lo:hi][order].tolist()
        free = [c for c in candidates if c not in used][:shots]
        return free if len(free) == shots else None

    def _class_occurrences(
        self, classes: np.ndarray, chunks: np.ndarray, starts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every occurrence of a class word inside that class's windows: (row, offset, piece count).

        Rows are ``class * shots + window``. An occurrence of word i in a window of class j != i is left
        alone (other classes' words stay visible).
        """
        index, shots = self.index, self.cfg.shots
        lo, hi = index.occ_ptr[classes], index.occ_ptr[classes + 1]
        counts = hi - lo
        occ = np.arange(counts.sum()) + np.repeat(lo - np.cumsum(counts) + counts, counts)
        occ_class = np.repeat(np.arange(classes.size), counts)
        flat = chunks.ravel()
        sorter = np.argsort(flat)
        slot = np.minimum(np.searchsorted(flat, index.occ_chunk[occ], sorter=sorter), flat.size - 1)
        row = sorter[slot]
        hit = (flat[row] == index.occ_chunk[occ]) & (row // shots == occ_class)
        row, occ = row[hit], occ[hit]
        return row, index.occ_pos[occ] - starts[row], index.occ_len[occ]


class MetaBatchDataset(Dataset):
    """Map-style dataset of meta-batches indexed by episode number; use it with ``batch_size=None``.

    Item ``e`` is ``EpisodeSampler.meta_batch(e, seed)``: a dict of tensors (T = ``tasks_per_step``,
    N = ``n_way``, K = ``k_shot``, Q = ``q_query``, L = ``window_len``)

    - ``support_tokens`` Long[T, N*K, L]: masked windows, right-padded with the pad id;
    - ``support_lengths`` Long[T, N*K]: real tokens per window (the last real token is ``length - 1``);
    - ``support_labels`` Long[T, N*K]: labels in 0..N-1;
    - ``query_tokens`` Long[T, N*Q, L], ``query_lengths`` Long[T, N*Q], ``query_labels`` Long[T, N*Q];
    - ``class_words`` Long[T, N]: word type id (``index.words``) of each label, for logging and checks;
    - ``support_windows`` Long[T, N*K], ``query_windows`` Long[T, N*Q]: window (chunk) ids;
    - ``episode`` Long[]: the episode number.

    Episodes are pure functions of (seed, meta_test, e): a resumed run continues by starting its sampler
    at the next episode number, in any number of DataLoader workers. The length is nominal (``length``
    episodes); iterate it with a sequential sampler starting where the run left off.
    """

    def __init__(
        self,
        index: WordIndex,
        cfg: MetaConfig,
        seed: int,
        meta_test: bool = False,
        length: int = 2**31 - 1,
    ) -> None:
        if seed < 0:
            raise ValueError(f"MetaBatchDataset seed must be >= 0, got {seed}")
        self.sampler = EpisodeSampler(index, cfg, meta_test)
        self.seed = seed
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, episode: int) -> dict[str, torch.Tensor]:
        if not 0 <= episode < self.length:
            raise IndexError(f"episode {episode} out of range [0, {self.length})")
        return self.sampler.meta_batch(int(episode), self.seed)
