r"""Whole words in a byte-level BPE token stream, and an index word type -> occurrences -> windows.

Word boundaries come from the tokenizer's byte-level pieces, never from re-tokenizing text, so the
index works for any byte-level BPE (GPT-2, OLMo/GPT-NeoX): per token id we derive, once, from
``tokenizer.convert_ids_to_tokens``

- ``lead_space``: the piece starts with a space byte (``Ġ``);
- ``alpha``: the piece, without that space, is one or more ASCII letters;
- ``glues``: the piece starts with a *word character*;
- ``ends_word_char``: the piece ends with a word character;
- ``partial``: the piece is not whole UTF-8 characters, because the BPE split a character over
  several tokens (GPT-2 writes a curly quote as two tokens, ``b" \xe2\x80"`` + ``b"\x9c"``).

Word characters are decided on decoded Unicode characters: letters, digits and combining marks of any
script (categories L, N, M), so "é", "ü" or the accent of a decomposed "e\u0301" belong to the word
around them, while spaces (NBSP and thin space too), punctuation, dashes, quotes and symbols separate
words. Deciding on raw bytes instead (every byte >= 0x80 a word byte) would glue "river" to the en dash
in "river–bank" or to the quotes in "“river”", so those occurrences would stay unmasked in the windows
of their own class. The flags of a partial piece depend on its neighbours' bytes and are settled in
context, per position, when the buffer is indexed (rare: ~0.3% of the tokens of the wiki corpus).

A token *continues* the previous one when the two share a character split between them, or when it
starts and the previous one ends with a word character; every other token (leading space, after a
newline, punctuation, a special token, ...) starts a new *unit*. A **word occurrence** is a unit made
only of alphabetic pieces: "Ġpine"+"apple" is one word "pineapple", "Ġcaf"+"é", "Z"+"ü"+"rich" and
"Ġabc"+"123" are no words at all (so "caf", "rich" and "abc" never become classes that leave half a word
unmasked), and "ĠJohn"+"'s" is the word "john" followed by punctuation. Word types are lower-cased
strings, so "The", " the" and "THE" are one type whatever their BPE pieces are. Non-ASCII words are not
indexed (documented limitation: the byte pieces of accented letters are not alphabetic on their own).

**Windows.** The buffer is cut, once, into *windows*: each document (a run of tokens between special
tokens such as eos) is split into ceil(len / window_len) nearly equal chunks whose boundaries are moved
back to the nearest unit start, so no word is ever cut in two; chunks shorter than ``min_window_tokens``
are dropped. Windows never overlap, so "K+Q occurrences in distinct windows" means K+Q distinct chunks
and two classes of a task can never share text as long as they use distinct chunk ids. A word is
*eligible* with at least K+Q windows containing it.

**Meta-train / meta-test split.** A word type is meta-test when blake2b(split_seed, word) / 2^64 <
``meta_test_fraction``: deterministic, independent of the corpus and its order, so an index built on the
validation stream holds out the same words as one built on the training stream.
"""

from __future__ import annotations

import functools
import hashlib
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np

from picomaml.meta.config import MetaConfig

# A standard English function-word list (NLTK's, without contractions); class words should carry meaning.
_ENGLISH_STOP_WORDS_TEXT = """
a about above after again against ain all am an and any are aren as at be because been before being
below between both but by can couldn did didn do does doesn doing don down during each few for from
further had hadn has hasn have haven having he her here hers herself him himself his how i if in
into is isn it its itself just ll me mightn more most mustn my myself needn no nor not now o of off
on once only or other our ours ourselves out over own re s same shan she should shouldn so some such
t than that the their theirs them themselves then there these they this those through to too under
until up ve very was wasn we were weren what when where which while who whom why will with won
wouldn y you your yours yourself yourselves also would could may might must shall one two three upon
"""
ENGLISH_STOP_WORDS = frozenset(_ENGLISH_STOP_WORDS_TEXT.split())


@dataclass(frozen=True)
class TokenFlags:
    """Per-token-id boolean flags of a byte-level BPE vocabulary (see the module docstring)."""

    lead_space: np.ndarray
    alpha: np.ndarray
    glues: np.ndarray
    ends_word_char: np.ndarray
    partial: np.ndarray
    """Pieces with a character split over tokens: their ``glues`` / ``ends_word_char`` say False and
    the index decides them in context (see :func:`_boundary_flags`)."""
    special: np.ndarray
    """Special/added tokens (eos, mask, pad) and undecodable pieces: they separate documents."""
    text: list[str]
    """Lower-cased letters of each alphabetic piece without its leading space ('' for the others)."""
    raw: list[bytes]
    """The bytes of each piece (b'' for special tokens)."""

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TokenFlags:
        """Derive the flags from ``tokenizer.convert_ids_to_tokens(range(len(tokenizer)))``.

        Special and added tokens (eos, mask, pad) are boundaries: no flag set. Pieces containing a
        character outside the GPT-2 byte alphabet (a non-byte-level tokenizer) are treated the same.
        """
        size = len(tokenizer)
        pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        to_bytes = {ord(ch): byte for ch, byte in _byte_decoder().items()}
        lead_space = np.zeros(size, dtype=bool)
        alpha = np.zeros(size, dtype=bool)
        glues = np.zeros(size, dtype=bool)
        ends = np.zeros(size, dtype=bool)
        partial = np.zeros(size, dtype=bool)
        is_special = np.zeros(size, dtype=bool)
        text = [""] * size
        raws = [b""] * size
        for i, piece in enumerate(pieces):
            try:
                raw = piece.translate(to_bytes).encode("latin-1") if piece and i not in special else b""
            except UnicodeEncodeError:  # a character outside the byte alphabet
                raw = b""
            if not raw:
                is_special[i] = True
                continue
            raws[i] = raw
            space = raw[:1] == b" "
            body = raw[1:] if space else raw
            lead_space[i] = space
            try:
                chars = raw.decode("utf-8")
            except UnicodeDecodeError:
                partial[i] = True
            else:
                glues[i] = _is_word_char(chars[0])  # a leading space is no word character
                ends[i] = _is_word_char(chars[-1])
            if body.isalpha():  # ASCII-only for bytes; False when empty
                alpha[i] = True
                text[i] = body.decode("ascii").lower()
        return cls(lead_space, alpha, glues, ends, partial, is_special, text, raws)


def _is_word_char(char: str) -> bool:
    """Letters and digits of any script (``isalnum`` is exactly Unicode categories L and N) and
    combining marks, which belong to the letter they follow (the first block of them starts at U+0300,
    so spaces and ASCII punctuation skip the category lookup)."""
    return char.isalnum() or (char >= "\u0300" and unicodedata.category(char)[0] == "M")


def _char_at(data: bytes, i: int) -> tuple[str, int]:
    """The character whose UTF-8 encoding covers byte ``i`` of ``data``, and the index of its first byte.

    A byte that belongs to no valid character (a stray continuation byte, a sequence cut by the end of
    ``data``) decodes as U+FFFD on its own, like ``bytes.decode(errors="replace")``.
    """
    start = i
    while start > max(0, i - 3) and 0x80 <= data[start] < 0xC0:  # continuation bytes: back to the lead
        start -= 1
    lead = data[start]
    size = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    if start + size > i:
        try:
            return data[start : start + size].decode("utf-8"), start
        except UnicodeDecodeError:
            pass
    return "\ufffd", i


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars = list(printable)
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + shifted)
            shifted += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def split_is_meta_test(word: str, split_seed: int, fraction: float) -> bool:
    """Whether ``word`` is held out for meta-test: a seeded hash of the word, not of its position."""
    digest = hashlib.blake2b(f"{split_seed}\x00{word}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


@dataclass(frozen=True)
class WordIndex:
    """Word types of a token buffer, their occurrences and the windows containing them.

    All arrays are numpy, so the index pickles cheaply into DataLoader workers. Type ids index ``words``;
    per type ``w``, ``occ_*[occ_ptr[w]:occ_ptr[w+1]]`` are its occurrences sorted by position and
    ``win_chunk[win_ptr[w]:win_ptr[w+1]]`` the distinct windows (chunk ids, increasing) containing it.
    """

    tokens: np.ndarray  # int32 [n] the buffer
    chunk_starts: np.ndarray  # int64 [C] window (chunk) start positions in `tokens`
    chunk_lens: np.ndarray  # int64 [C]
    words: list[str]  # type id -> lower-cased word
    occ_ptr: np.ndarray  # int64 [V + 1]
    occ_pos: np.ndarray  # int64 [occurrences] start position
    occ_len: np.ndarray  # int64 [occurrences] number of BPE pieces
    occ_chunk: np.ndarray  # int64 [occurrences] chunk id containing the occurrence
    win_ptr: np.ndarray  # int64 [V + 1]
    win_chunk: np.ndarray  # int64 [distinct (type, chunk) pairs]
    is_meta_test: np.ndarray  # bool [V], hashed for words in >= 2 windows (the others are never eligible)
    mask_id: int
    pad_id: int

    @classmethod
    def build(
        cls,
        tokens: np.ndarray,
        tokenizer: Any,
        cfg: MetaConfig,
        *,
        mask_id: int | None = None,
        pad_id: int | None = None,
    ) -> WordIndex:
        """Index the first ``cfg.buffer_tokens`` of ``tokens`` (1-D ids, documents separated by eos).

        ``mask_id`` / ``pad_id`` default to the tokenizer's ``mask_token_id`` / ``pad_token_id``.
        Stop words (``cfg.stop_words``) and words shorter than ``cfg.min_word_chars`` get no type.
        """
        mask_id = tokenizer.mask_token_id if mask_id is None else mask_id
        pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
        if mask_id is None or pad_id is None:
            raise ValueError("WordIndex needs a tokenizer with mask and pad tokens (or pass mask_id/pad_id)")
        buffer = np.ascontiguousarray(np.asarray(tokens)[: cfg.buffer_tokens], dtype=np.int32)
        if buffer.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array of token ids, got shape {buffer.shape}")
        flags = TokenFlags.from_tokenizer(tokenizer)
        ids = buffer.astype(np.int64)
        if ids.size and ids.max() >= len(flags.text):
            # ids beyond the tokenizer (model vocabulary padding) never occur in text: make them boundaries
            ids = np.where(ids < len(flags.text), ids, tokenizer.eos_token_id)
        unit_starts, unit_lens, special = _units(ids, flags)
        chunk_starts, chunk_lens = _chunks(unit_starts, special, cfg.window_len, cfg.min_window_tokens)

        alpha_count = np.add.reduceat(flags.alpha[ids].astype(np.int64), unit_starts) if ids.size else ids
        is_word = alpha_count == unit_lens
        occ_pos, occ_len = unit_starts[is_word], unit_lens[is_word]
        occ_string, strings = _word_strings(ids, occ_pos, occ_len, flags.text)

        stop = ENGLISH_STOP_WORDS if cfg.stop_words == "english" else {w.lower() for w in cfg.stop_words}
        usable = np.array([len(s) >= cfg.min_word_chars and s not in stop for s in strings], dtype=bool)
        words = [s for s, ok in zip(strings, usable, strict=True) if ok]
        type_of_string = np.full(len(strings), -1, dtype=np.int64)
        type_of_string[usable] = np.arange(len(words))
        occ_type = type_of_string[occ_string]

        # Chunks never cut a unit, so the chunk holding a word's first piece holds all of it; occurrences
        # in dropped (short) chunks or on document separators are in no window.
        occ_chunk = np.searchsorted(chunk_starts, occ_pos, side="right") - 1
        chunk_end = (chunk_starts + chunk_lens)[np.maximum(occ_chunk, 0)] if chunk_starts.size else occ_pos
        keep = (occ_type >= 0) & (occ_chunk >= 0) & (occ_pos < chunk_end)
        order = np.lexsort((occ_pos[keep], occ_type[keep]))
        occ_type, occ_pos, occ_len, occ_chunk = (
            column[keep][order] for column in (occ_type, occ_pos, occ_len, occ_chunk)
        )
        n_types = len(words)
        occ_ptr = np.concatenate([[0], np.cumsum(np.bincount(occ_type, minlength=n_types))])

        # sorted by (type, position) and chunks follow positions: distinct pairs are the changes
        first = np.ones(occ_type.size, dtype=bool)
        first[1:] = (occ_type[1:] != occ_type[:-1]) | (occ_chunk[1:] != occ_chunk[:-1])
        win_chunk = occ_chunk[first]
        win_ptr = np.concatenate([[0], np.cumsum(np.bincount(occ_type[first], minlength=n_types))])
        # every task needs k_shot + q_query >= 2 windows per class: words in one window are never split
        is_test = np.zeros(n_types, dtype=bool)
        for w in np.flatnonzero(np.diff(win_ptr) >= 2).tolist():
            is_test[w] = split_is_meta_test(words[w], cfg.split_seed, cfg.meta_test_fraction)
        return cls(
            tokens=buffer,
            chunk_starts=chunk_starts,
            chunk_lens=chunk_lens,
            words=words,
            occ_ptr=occ_ptr.astype(np.int64),
            occ_pos=occ_pos,
            occ_len=occ_len,
            occ_chunk=occ_chunk,
            win_ptr=win_ptr.astype(np.int64),
            win_chunk=win_chunk,
            is_meta_test=is_test,
            mask_id=int(mask_id),
            pad_id=int(pad_id),
        )

    @property
    def num_windows(self) -> np.ndarray:
        """Per type id, the number of distinct windows containing the word."""
        return np.diff(self.win_ptr)

    def word_id(self, word: str) -> int:
        """Type id of ``word`` (case-insensitive); KeyError if it is not indexed."""
        return self._ids[word.lower()]

    @functools.cached_property
    def _ids(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    def occurrences(self, word: str | int) -> np.ndarray:
        """Occurrences of a word (type id or string) as an int64 array of (start, length) rows."""
        w = self.word_id(word) if isinstance(word, str) else int(word)
        lo, hi = self.occ_ptr[w], self.occ_ptr[w + 1]
        return np.stack([self.occ_pos[lo:hi], self.occ_len[lo:hi]], axis=1)

    def eligible(self, min_windows: int, meta_test: bool) -> np.ndarray:
        """Type ids of the meta-train (or meta-test) words found in at least ``min_windows`` windows."""
        return np.flatnonzero((self.num_windows >= min_windows) & (self.is_meta_test == meta_test))

    def window_tokens(self, chunk: int) -> np.ndarray:
        """The unmasked tokens of window ``chunk``."""
        start = self.chunk_starts[chunk]
        return self.tokens[start : start + self.chunk_lens[chunk]]


def _units(ids: np.ndarray, flags: TokenFlags) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start positions and lengths of units (see module docstring), and the special-token mask."""
    n = ids.size
    starts_word, ends_word, split = _boundary_flags(ids, flags)
    cont = np.zeros(n, dtype=bool)
    if n > 1:
        cont[1:] = split[1:] | (starts_word[1:] & ends_word[:-1])
    starts = np.flatnonzero(~cont)
    return starts, np.diff(np.append(starts, n)), flags.special[ids]


def _boundary_flags(ids: np.ndarray, flags: TokenFlags) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Per position: starts with a word character, ends with one, shares a character with the previous.

    Whole-character pieces take their token id's flags. A partial piece is decoded together with the
    bytes of up to three tokens on each side (a UTF-8 character has at most four bytes), never across a
    special token, so the first and last character it touches are known: "river" + b"\xe2\x80" +
    b"\x9d" ends the word at the closing quote, "river" + b"\xc5" + b"\x9d" ("ŝ") does not. A Python loop
    is fast enough because partial pieces are rare.
    """
    starts_word = flags.glues[ids]
    ends_word = flags.ends_word_char[ids]
    split = np.zeros(ids.size, dtype=bool)
    raw = flags.raw
    positions = np.flatnonzero(flags.partial[ids])
    decided: list[tuple[bool, bool, bool]] = []  # assigned at once: numpy item writes are slow in a loop
    for t in positions.tolist():
        lo = max(t - 3, 0)
        window = [raw[i] for i in ids[lo : t + 4].tolist()]
        before = b""
        for piece in reversed(window[: t - lo]):
            if not piece or len(before) >= 3:  # b"" is a special token: characters never span documents
                break
            before = piece + before
        after = b""
        for piece in window[t - lo + 1 :]:
            if not piece or len(after) >= 3:
                break
            after += piece
        data = before + window[t - lo] + after
        first, first_start = _char_at(data, len(before))
        last, _ = _char_at(data, len(data) - len(after) - 1)
        decided.append((first_start < len(before), _is_word_char(first), _is_word_char(last)))
    if decided:
        split[positions], starts_word[positions], ends_word[positions] = np.array(decided, dtype=bool).T
    return starts_word, ends_word, split


def _chunks(
    unit_starts: np.ndarray, special: np.ndarray, window_len: int, min_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut every document (run of non-special tokens) into windows that never split a unit.

    A document of ``m`` tokens gets ceil(m / window_len) chunks of a target size ceil(m / that), so
    there is no stub at its end; each boundary moves back to the unit start at or before it. A unit
    longer than the target (never a real word) is kept whole up to ``window_len`` tokens.
    """
    n = special.size
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    positions = np.arange(n)
    is_start = np.zeros(n + 1, dtype=bool)
    is_start[unit_starts] = True
    is_start[n] = True
    back = np.maximum.accumulate(np.where(is_start[:n], positions, 0))
    ahead = np.minimum.accumulate(np.where(is_start, np.arange(n + 1), n)[::-1])[::-1]
    separators = np.flatnonzero(special)
    doc_starts = np.concatenate([[0], separators + 1])
    doc_ends = np.concatenate([separators, [n]])
    starts: list[int] = []
    ends: list[int] = []
    for a, b in zip(doc_starts.tolist(), doc_ends.tolist(), strict=True):
        if b <= a:
            continue
        pieces = -(-(b - a) // window_len)
        target = -(-(b - a) // pieces)
        s = a
        while s < b:
            e = min(s + target, b)
            if e < b:
                e = int(back[e]) if back[e] > s else min(int(ahead[s + 1]), s + window_len, b)
            starts.append(s)
            ends.append(e)
            s = e
    chunk_starts = np.asarray(starts, dtype=np.int64)
    chunk_lens = np.asarray(ends, dtype=np.int64) - chunk_starts
    keep = chunk_lens >= min_len
    return chunk_starts[keep], chunk_lens[keep]


def _word_strings(
    ids: np.ndarray, occ_pos: np.ndarray, occ_len: np.ndarray, text: list[str]
) -> tuple[np.ndarray, list[str]]:
    """Lower-cased string of every word occurrence, as ids into a list of distinct strings.

    Piece sequences of up to ``width`` pieces are packed exactly into one int64 (base = vocabulary
    size + 1, so ``width`` = 4 for GPT-2), deduplicated with one ``np.unique``, and only the distinct
    sequences are turned into strings; longer words (rare) are joined one by one.
    """
    base = len(text) + 1
    width = max(1, int(63 // np.log2(base)))
    short = occ_len <= width
    pos, length = occ_pos[short], occ_len[short]
    offsets = np.arange(width)
    rows = np.where(offsets < length[:, None], ids[np.minimum(pos[:, None] + offsets, ids.size - 1)] + 1, 0)
    keys = rows @ (base**offsets)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    # object-array sum concatenates strings in C; column index 0 (padding) maps to ""
    pieces = np.array(["", *text], dtype=object)[rows[first]]
    sequence_strings = pieces.sum(axis=1) if first.size else np.zeros(0, dtype=object)

    string_ids: dict[str, int] = {}
    sequence_ids = np.array([string_ids.setdefault(w, len(string_ids)) for w in sequence_strings.tolist()])
    occ_string = np.empty(occ_pos.size, dtype=np.int64)
    occ_string[short] = sequence_ids[inverse.ravel()] if first.size else inverse
    for j in np.flatnonzero(~short).tolist():
        word = "".join(text[t] for t in ids[occ_pos[j] : occ_pos[j] + occ_len[j]].tolist())
        occ_string[j] = string_ids.setdefault(word, len(string_ids))
    return occ_string, list(string_ids)
