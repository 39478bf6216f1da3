"""Language-model evaluation: perplexity two ways and next-token accuracy.

Documents are scored each on its own (``[eos] + document``, so every token of the document, its closing
eos included, is predicted once; a document longer than the context is cut into consecutive windows and
the context restarts at each window), or as the datamodule's packed validation rows:

- ``ppl_token_weighted`` = exp(total NLL / total tokens): every token counts the same, so long
  documents dominate. This is what ``val/ppl`` in training measures (on packed rows).
- ``ppl_doc_mean`` = mean over documents of exp(document NLL / document tokens): pico-train's (and the
  HF ``evaluate`` perplexity metric's) "mean perplexity"; every document counts the same, so short,
  hard documents pull it up. The two differ whenever documents differ in length or difficulty.
- ``top1_acc`` / ``top5_acc``: teacher-forced next-token accuracy over the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from picomaml.model import PicoDecoder

# rows of the vocabulary projection evaluated at once: bounds the fp32 [rows, V] logits block
_LOGIT_ROWS = 1024


class LMTotals:
    """Running sums of token NLL, per document and overall, and of top-1/top-5 hits."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.tokens = 0
        self.top1 = 0
        self.top5 = 0
        self.doc_nll: dict[int, float] = {}
        self.doc_tokens: dict[int, int] = {}

    def add(self, nll: torch.Tensor, doc_ids: torch.Tensor, top1: torch.Tensor, top5: torch.Tensor) -> None:
        """Add scored tokens: NLL [N] (fp32), their document ids [N], top-1/top-5 hits [N] (bool)."""
        self.nll += float(nll.double().sum())
        self.tokens += nll.numel()
        self.top1 += int(top1.sum())
        self.top5 += int(top5.sum())
        docs, inverse = doc_ids.unique(return_inverse=True)
        sums = torch.zeros(len(docs), dtype=torch.float64, device=nll.device).index_add_(
            0, inverse, nll.double()
        )
        counts = torch.bincount(inverse, minlength=len(docs))
        for doc, s, c in zip(docs.tolist(), sums.tolist(), counts.tolist(), strict=True):
            self.doc_nll[doc] = self.doc_nll.get(doc, 0.0) + s
            self.doc_tokens[doc] = self.doc_tokens.get(doc, 0) + c

    def result(self) -> dict[str, float]:
        """``loss``, ``ppl_token_weighted``, ``ppl_doc_mean``, ``top1_acc``, ``top5_acc``, counts."""
        if not self.tokens:
            raise ValueError("no tokens were scored")
        loss = self.nll / self.tokens
        doc_ppl = [math.exp(self.doc_nll[d] / self.doc_tokens[d]) for d in self.doc_nll]
        return {
            "loss": loss,
            "ppl_token_weighted": math.exp(loss),
            "ppl_doc_mean": float(np.mean(doc_ppl)),
            "top1_acc": self.top1 / self.tokens,
            "top5_acc": self.top5 / self.tokens,
            "n_tokens": float(self.tokens),
            "n_docs": float(len(doc_ppl)),
        }


@torch.no_grad()
def score_batch(model: PicoDecoder, tokens: torch.Tensor, doc_ids: torch.Tensor, totals: LMTotals) -> None:
    """Score one batch ``tokens`` [B, T+1] (inputs ``[:, :-1]``, labels ``[:, 1:]``) into ``totals``.

    ``doc_ids`` [B, T+1] gives the document of every token; a label whose id is negative (padding) is
    not scored. The logits are formed a block of rows at a time, so memory stays O(rows x V).
    """
    labels, label_docs = tokens[:, 1:].flatten(), doc_ids[:, 1:].flatten()
    hidden = model.hidden_states(tokens[:, :-1]).flatten(0, 1)  # [N, D]
    keep = label_docs >= 0
    hidden, labels, label_docs = hidden[keep], labels[keep], label_docs[keep]
    for start in range(0, labels.numel(), _LOGIT_ROWS):
        rows = slice(start, start + _LOGIT_ROWS)
        logits = model.de_embedding_proj(hidden[rows]).float()
        nll = F.cross_entropy(logits, labels[rows], reduction="none")
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hit5 = (top5 == labels[rows, None]).any(dim=-1)
        totals.add(nll, label_docs[rows], top5[:, 0] == labels[rows], hit5)


def evaluate_lm(
    model: PicoDecoder, batches: Iterable[dict[str, torch.Tensor]], device: torch.device | str | None = None
) -> dict[str, float]:
    """Perplexities and accuracies over batches of ``{"tokens", "doc_ids"}`` (see :func:`score_batch`).

    Works with the datamodule's packed validation micro-batches (tokens near a document boundary then
    see the previous document as context) and with :func:`document_batches` (each document alone).
    """
    device = next(model.parameters()).device if device is None else torch.device(device)
    totals = LMTotals()
    for batch in batches:
        score_batch(model, batch["tokens"].to(device), batch["doc_ids"].to(device), totals)
    return totals.result()


def document_batches(
    documents: Iterable[tuple[int, np.ndarray]],
    seq_len: int,
    batch_size: int,
    bos_id: int,
    pad_id: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches that score each ``(doc_id, tokens)`` document on its own.

    A document becomes ``[bos_id] + tokens`` (GPT-2 style: the end-of-text token opens a document, as it
    does in packed training data) cut into windows of ``seq_len + 1`` tokens that overlap by one, so every
    document token is a label exactly once. Windows are right-padded with ``pad_id``; padding and the
    leading bos carry doc id -1 and are never scored.
    """
    rows: list[np.ndarray] = []
    ids: list[np.ndarray] = []

    def flush() -> dict[str, torch.Tensor]:
        batch = {"tokens": torch.from_numpy(np.stack(rows)), "doc_ids": torch.from_numpy(np.stack(ids))}
        rows.clear()
        ids.clear()
        return batch

    for doc_id, tokens in documents:
        seq = np.concatenate([[bos_id], np.asarray(tokens, dtype=np.int64)])
        owner = np.full(seq.size, doc_id, dtype=np.int64)
        owner[0] = -1
        for start in range(0, seq.size - 1, seq_len):
            window = seq[start : start + seq_len + 1]
            row = np.full(seq_len + 1, pad_id, dtype=np.int64)
            row_ids = np.full(seq_len + 1, -1, dtype=np.int64)
            row[: window.size] = window
            row_ids[: window.size] = owner[start : start + window.size]
            rows.append(row)
            ids.append(row_ids)
            if len(rows) == batch_size:
                yield flush()
    if rows:
        yield flush()
