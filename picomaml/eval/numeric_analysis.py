"""Interpretability for models trained on number sequences (``data=synthetic``): what the embeddings,
the hidden states and the MLP units of a run say about numbers and sequence kinds.

:func:`picomaml.eval.analysis.analyze` calls these for every run trained on ``data=synthetic``:

- ``numeric_pca_<run>.png``, two panels. *Number tokens*: the input embeddings of the single-token
  numbers ``" 0"`` .. ``" 199"`` (the tokens that carry most terms) on their own top two principal
  components, colored by value: a model that learned magnitude lays them out along a curve in order.
  *Sequence kinds*: the final-norm hidden state averaged over the number tokens of each evaluation
  sequence (:func:`picomaml.eval.numeric.make_sequences`, L terms), on its top two components, colored
  by kind: separated clusters mean the residual stream encodes which rule the sequence follows.
- ``selectivity_<run>.png``: **neuron activation selectivity across sequence kinds**. For every SwiGLU
  hidden unit u (the input of ``swiglu.w_2``, ``silu(w_0 x) * w_1 x``) of every layer, ``a_u(k)`` is the
  mean absolute activation over the number tokens (:func:`~picomaml.eval.numeric.encode_with_number_mask`,
  every term) of the sequences of kind k. Its selectivity index is

      SI_u = (a_max - a_rest) / (a_max + a_rest),   a_max = max_k a_u(k),  a_rest = mean of the others

  (Morcos et al. 2018's class-selectivity index, on magnitudes because SwiGLU units take both signs):
  0 when a unit responds equally to every kind, 1 when it responds to one kind only, 0.5 when its
  preferred kind drives it 3x harder than the others on average. The figure shows the most selective
  units' profiles (each row scaled to its maximum) and the summary counts, per kind, the units that
  prefer it with SI >= :data:`SELECTIVE`.

Attention maps come from :func:`picomaml.eval.analysis.attention_probs`, which reads each attention
module's own ``attention_weights``: softmax probabilities, or for linear attention the implied weights
``phi(q_t) . phi(k_s) / sum_s' phi(q_t) . phi(k_s')`` (with RoPE in the numerator, so they may be
negative and rows need not sum to one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from picomaml.data.corpora import SYNTHETIC_KINDS
from picomaml.eval.numeric import NumericSequence, encode_with_number_mask, make_sequences
from picomaml.model import PicoDecoder

SELECTIVE = 0.5
"""Selectivity index from which a unit counts as selective for its preferred kind (3x the others)."""
ANALYSIS_SEED = 4321
"""Seed of the sequences the figures read (fixed, so two runs are analysed on the same inputs)."""


def analysis_sequences(kinds: Sequence[str], n_terms: int, per_kind: int = 24) -> list[NumericSequence]:
    """``per_kind`` sequences of ``n_terms`` terms for each kind (geometric capped at 12 terms)."""
    sequences = []
    for kind in kinds:
        sequences += make_sequences(
            kind, n_terms if kind != "geometric" else min(n_terms, 12), per_kind, ANALYSIS_SEED
        )
    return sequences


@torch.no_grad()
def hidden_and_swiglu(
    model: PicoDecoder, tokenizer: Any, sequences: Sequence[NumericSequence]
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Per sequence: the final-norm hidden states at its number tokens [n, D], and per layer the SwiGLU
    hidden activations (the input of ``swiglu.w_2``) at the same tokens [n, F].

    Number tokens here are those of every term (``first_scored_term=0``); sequences run one at a time
    so no padding enters."""
    hidden, swiglu = [], []
    captured: list[torch.Tensor] = []
    handles = [
        layer.swiglu.w_2.register_forward_hook(lambda m, args, out: captured.append(args[0]))
        for layer in model.layers
    ]
    try:
        for seq in sequences:
            ids, mask = encode_with_number_mask(tokenizer, seq, first_scored_term=0)
            captured.clear()
            h = model.hidden_states(torch.tensor([ids]))[0]
            keep = torch.tensor(mask)
            hidden.append(h[keep].float())
            swiglu.append([acts[0][keep].float() for acts in captured])
    finally:
        for handle in handles:
            handle.remove()
    return hidden, swiglu


@dataclass
class Selectivity:
    """Per-unit selectivity across kinds: ``mean_abs`` [L, F, K] (a_u(k) per layer), ``index`` [L, F]
    and ``preferred`` [L, F] (an index into ``kinds``)."""

    kinds: list[str]
    mean_abs: np.ndarray
    index: np.ndarray
    preferred: np.ndarray

    def counts(self, threshold: float = SELECTIVE) -> dict[str, int]:
        """Units (all layers) with SI >= ``threshold``, by preferred kind."""
        selective = self.index >= threshold
        return {k: int((selective & (self.preferred == i)).sum()) for i, k in enumerate(self.kinds)}


def selectivity_index(mean_abs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(SI, preferred kind) of units from their mean absolute activation per kind, ``mean_abs`` [..., K]:
    SI = (a_max - a_rest) / (a_max + a_rest) with a_rest the mean over the other K - 1 kinds; 0 for a
    unit that never activates."""
    K = mean_abs.shape[-1]
    if K < 2:
        raise ValueError("selectivity across kinds needs two kinds or more")
    top = mean_abs.max(axis=-1)
    rest = (mean_abs.sum(axis=-1) - top) / (K - 1)
    total = top + rest
    index = np.divide(top - rest, total, out=np.zeros_like(total), where=total > 0)
    return index, mean_abs.argmax(axis=-1)


def neuron_selectivity(
    swiglu: Sequence[Sequence[torch.Tensor]], sequences: Sequence[NumericSequence]
) -> Selectivity:
    """:class:`Selectivity` from :func:`hidden_and_swiglu`'s per-sequence activations (module docstring):
    a_u(k) averages |activation| over all number tokens of kind k's sequences."""
    kinds = list(dict.fromkeys(s.kind for s in sequences))
    n_layers = len(swiglu[0])
    per_kind = []
    for kind in kinds:
        rows = [acts for acts, s in zip(swiglu, sequences, strict=True) if s.kind == kind]
        per_kind.append(
            np.stack([torch.cat([r[layer] for r in rows]).abs().mean(0).numpy() for layer in range(n_layers)])
        )
    mean_abs = np.stack(per_kind, axis=-1)  # [L, F, K]
    index, preferred = selectivity_index(mean_abs)
    return Selectivity(kinds, mean_abs, index, preferred)


def _pca2(x: torch.Tensor) -> tuple[np.ndarray, list[float]]:
    """Points of ``x`` [n, d] on its top two principal components, and their shares of the variance."""
    centred = x.double() - x.double().mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred)
    explained = (eigenvalues[[-1, -2]] / eigenvalues.sum().clamp_min(1e-30)).tolist()
    return (centred @ eigenvectors[:, [-1, -2]]).numpy(), explained


def plot_numeric_pca(
    model: PicoDecoder,
    tokenizer: Any,
    hidden: Sequence[torch.Tensor],
    sequences: Sequence[NumericSequence],
    title: str,
    path: Path,
) -> Path:
    """The two panels of ``numeric_pca_<run>.png`` (module docstring)."""
    values = [v for v in range(200) if len(tokenizer.encode(f" {v}")) == 1]
    ids = torch.tensor([tokenizer.encode(f" {v}")[0] for v in values])
    points, explained = _pca2(model.embedding_proj.weight.detach()[ids])
    fig = Figure(figsize=(13, 5.5))
    left, right = fig.subplots(1, 2)
    scatter = left.scatter(points[:, 0], points[:, 1], c=values, cmap="viridis", s=12)
    for v, (x, y) in zip(values, points, strict=True):
        if v % 10 == 0:
            left.annotate(str(v), (x, y), fontsize=7)
    fig.colorbar(scatter, ax=left, label="value")
    left.set(
        title=f"{title}: number-token embeddings ' 0'..' 199'",
        xlabel=f"PC1 ({explained[0]:.1%})",
        ylabel=f"PC2 ({explained[1]:.1%})",
    )
    pooled = torch.stack([h.mean(0) for h in hidden])
    points, explained = _pca2(pooled)
    kinds = list(dict.fromkeys(s.kind for s in sequences))
    for i, kind in enumerate(kinds):
        rows = [j for j, s in enumerate(sequences) if s.kind == kind]
        right.scatter(points[rows, 0], points[rows, 1], s=14, color=f"C{i}", label=kind)
    right.legend(fontsize=8)
    right.set(
        title="sequence kinds: mean final hidden state over number tokens",
        xlabel=f"PC1 ({explained[0]:.1%})",
        ylabel=f"PC2 ({explained[1]:.1%})",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_selectivity(selectivity: Selectivity, title: str, path: Path, top: int = 40) -> Path:
    """The ``top`` most selective units' activation profiles across kinds (rows scaled to their max),
    labelled ``L<layer>.u<unit> SI=<index>``, beside the histogram of SI per layer."""
    L, F, _ = selectivity.mean_abs.shape
    flat = np.argsort(-selectivity.index, axis=None)[:top]
    layers, units = np.unravel_index(flat, (L, F))
    profiles = selectivity.mean_abs[layers, units]  # [top, K]
    scaled = profiles / np.maximum(profiles.max(axis=1, keepdims=True), 1e-30)
    fig = Figure(figsize=(12, max(5.0, 0.18 * len(flat) + 1.5)))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    image = left.imshow(scaled, aspect="auto", cmap="magma", vmin=0, vmax=1)
    left.set_xticks(range(len(selectivity.kinds)), selectivity.kinds, rotation=30, fontsize=8)
    labels = [
        f"L{layer}.u{unit} SI={selectivity.index[layer, unit]:.2f}"
        for layer, unit in zip(layers, units, strict=True)
    ]
    left.set_yticks(range(len(flat)), labels, fontsize=6)
    left.set_title(f"{title}: most kind-selective SwiGLU units (|act| / row max)", fontsize=9)
    fig.colorbar(image, ax=left)
    bins = np.linspace(0, 1, 21)
    for layer in range(L):
        right.hist(selectivity.index[layer], bins=bins, histtype="step", label=f"layer {layer}")
    right.axvline(SELECTIVE, color="gray", linestyle=":")
    right.set(xlabel="selectivity index", ylabel="units", title="selectivity index per layer")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def numeric_figures(
    model: PicoDecoder, tokenizer: Any, name: str, out: Path, kinds: Sequence[str], n_terms: int
) -> tuple[Path, Path, Selectivity]:
    """Both figures of one run, and its :class:`Selectivity` (the summary tabulates it)."""
    kinds = [k for k in kinds if k in SYNTHETIC_KINDS]
    sequences = analysis_sequences(kinds, n_terms)
    hidden, swiglu = hidden_and_swiglu(model, tokenizer, sequences)
    pca = plot_numeric_pca(model, tokenizer, hidden, sequences, name, out / f"numeric_pca_{name}.png")
    selectivity = neuron_selectivity(swiglu, sequences)
    figure = plot_selectivity(selectivity, name, out / f"selectivity_{name}.png")
    return pca, figure, selectivity
