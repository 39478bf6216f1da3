"""Figures and a markdown summary for one run or a sweep of runs (``python -m picomaml.analyze``).

A run is a directory with ``training_config.yaml``; a sweep is a directory whose subdirectories are runs
(Hydra multirun jobs). :func:`analyze` writes PNGs and ``summary.md`` (embedding them) into
``<dir>/analysis/``.
Across runs, on one figure each:

- ``loss_curves.png``: training AR loss (solid), meta loss (dashed) and validation loss (dots) per step.
- ``meta_accuracy.png``: every logged ``meta/*acc*`` metric over training (when a run logged one).
- ``ppl_vs_size.png`` (two runs or more): each run's last ``val/ppl`` against its parameter count.

Per run (file names end in the run's directory name):

- ``cka_<run>.png``: linear CKA between the learning-dynamics activations of one layer at every pair of
  dumped steps, on the fixed validation batch (the same inputs at every step, so CKA compares the
  representations rather than the data). CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)
  with column-centred X, Y [n, d]: 1 for representations equal up to rotation and isotropic scaling.
- ``embedding_pca_<run>.png``: the token embedding matrix projected on its top two principal components;
  the most frequent tokens of the run's training data are drawn and labelled.
- ``attention_<run>.png``: the attention map of one layer and head for a prompt, from the attention
  module's own ``attention_weights`` (the fused kernels never materialise it): softmax probabilities, or
  for ``model.attention=linear`` the implied kernel weights (which RoPE can make negative).

Runs trained on ``data=synthetic`` also get the number-sequence figures of
:mod:`picomaml.eval.numeric_analysis` (number-token and sequence-kind PCA, SwiGLU unit selectivity
across sequence kinds) and a selectivity table in the summary; their attention prompt defaults to an
arithmetic sequence.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from picomaml.model import ModelConfig, PicoDecoder
from picomaml.model.pico_decoder import rope_rotations
from picomaml.runs import (
    TRAINING_CONFIG,
    LoadedRun,
    RunError,
    checkpoint_steps_available,
    load_run,
    metrics_row_step,
)

DEFAULT_PROMPT = "The history of the city begins with a small village on the river, where"
NUMERIC_PROMPT = "arithmetic: 7, 12, 17, 22, 27, 32, 37, 42, 47, 52"
"""The attention prompt of a run trained on ``data=synthetic`` when no prompt is given."""


@dataclass
class RunInfo:
    """A run directory and what analysis needs from it without loading a checkpoint."""

    path: Path
    name: str
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def model_config(self) -> ModelConfig:
        section = OmegaConf.to_container(OmegaConf.load(self.path / TRAINING_CONFIG).model, resolve=True)
        section.pop("_target_", None)
        return ModelConfig(**section)

    def last(self, key: str) -> float | None:
        values = self.metrics.get(key)
        return values[-1][1] if values else None


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``csv/metrics.csv`` as ``{key: [(step, value), ...]}`` (empty cells skipped, rows in file order)."""
    path = run_dir / "csv" / "metrics.csv"
    metrics: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return metrics
    with open(path) as file:
        for row in csv.DictReader(file):
            step = metrics_row_step(row)
            if step is None:  # a damaged row (see picomaml.runs.metrics_row_step)
                continue
            del row["step"]
            for key, value in row.items():
                if value not in ("", None):
                    metrics.setdefault(key, []).append((step, float(value)))
    return metrics


def find_runs(path: Path) -> list[RunInfo]:
    """The run at ``path``, or the runs directly under it (a sweep), in natural order of their names."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: not a directory")
    if (path / TRAINING_CONFIG).is_file():
        dirs = [path]
    else:
        children = [p for p in path.iterdir() if p.is_dir() and (p / TRAINING_CONFIG).is_file()]
        dirs = sorted(
            children, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]
        )
    if not dirs:
        raise RunError(
            f"{path} is not a picomaml run or sweep (no {TRAINING_CONFIG} in it or its subdirectories)"
        )
    return [RunInfo(d, d.name, read_metrics(d)) for d in dirs]


# --- figures across runs ------------------------------------------------------------------------------------


def plot_loss_curves(runs: Sequence[RunInfo], out: Path) -> Path | None:
    """Training AR / meta losses and validation loss of every run against the step."""
    keys = (("train/loss_ar", "-", "AR"), ("train/loss_meta", "--", "meta"), ("val/loss", ":o", "val"))
    if not any(run.metrics.get(k) for run in runs for k, _, _ in keys):
        return None
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        for key, style, label in keys:
            if run.metrics.get(key):
                steps, values = zip(*run.metrics[key], strict=True)
                ax.plot(steps, values, style, color=color, markersize=3, label=f"{run.name} {label}")
    ax.set(xlabel="optimizer step", ylabel="loss (nats/token)", title="Loss curves")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, out / "loss_curves.png")


def plot_meta_accuracy(runs: Sequence[RunInfo], out: Path) -> Path | None:
    """Every ``meta/*acc*`` metric of every run over training; None when no run logged one."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    plotted = False
    for i, run in enumerate(runs):
        keys = sorted(k for k in run.metrics if k.startswith("meta/") and "acc" in k)
        for j, key in enumerate(keys):
            steps, values = zip(*run.metrics[key], strict=True)
            ax.plot(
                steps, values, ["-", "--", ":", "-."][j % 4], color=f"C{i % 10}", label=f"{run.name} {key}"
            )
            plotted = True
    if not plotted:
        return None
    ax.set(xlabel="optimizer step", ylabel="accuracy", title="Meta-learning accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, out / "meta_accuracy.png")


def count_parameters(config: ModelConfig) -> int:
    """Parameters of a pico-decoder, counted on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return PicoDecoder(config).num_parameters()


def plot_ppl_vs_size(runs: Sequence[RunInfo], out: Path) -> Path | None:
    """Last ``val/ppl`` of each run against its parameter count (log-log); None with fewer than 2 runs."""
    points = [(count_parameters(run.model_config), run.last("val/ppl"), run.name) for run in runs]
    points = [p for p in points if p[1] is not None]
    if len(points) < 2:
        return None
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    sizes, ppls, names = zip(*points, strict=True)
    ax.plot(sizes, ppls, "o")
    for size, ppl, name in points:
        ax.annotate(name, (size, ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="last val/ppl", title="Perplexity vs size")
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out / "ppl_vs_size.png")


# --- per-run figures ------------------------------------------------------------------------------------


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n inputs, ``x`` [n, d1] and ``y`` [n, d2]."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).norm() ** 2
    denominator = (x.T @ x).norm() * (y.T @ y).norm()
    return float(cross / denominator) if denominator > 0 else float("nan")


def dynamics_steps(run_dir: Path, split: str = "val") -> list[int]:
    """Steps N with ``checkpoints/step_N/learning_dynamics/<split>_activations.pt``, sorted."""
    found = []
    for path in (run_dir / "checkpoints").glob(f"step_*/learning_dynamics/{split}_activations.pt"):
        found.append(int(path.parent.parent.name.removeprefix("step_")))
    return sorted(found)


def plot_cka(run: RunInfo, out: Path, layer_suffix: str = "swiglu.w_2") -> Path | None:
    """CKA heatmap across learning-dynamics steps for the deepest module ending in ``layer_suffix``."""
    steps = dynamics_steps(run.path)
    if len(steps) < 2:
        return None
    acts = [
        torch.load(
            run.path / "checkpoints" / f"step_{s}" / "learning_dynamics" / "val_activations.pt",
            weights_only=True,
        )
        for s in steps
    ]
    names = [n for n in acts[0] if n == layer_suffix or n.endswith("." + layer_suffix)]
    if not names:
        raise ValueError(
            f"no learning-dynamics layer ends with {layer_suffix!r}; layers: {', '.join(acts[0])}"
        )
    layer = names[-1]
    matrix = np.array([[linear_cka(a[layer], b[layer]) for b in acts] for a in acts])
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=90, fontsize=7)
    ax.set_yticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
    ax.set(xlabel="step", ylabel="step", title=f"{run.name}: linear CKA of {layer} (val batch)")
    fig.colorbar(image, ax=ax)
    return _save(fig, out / f"cka_{run.name}.png")


def frequent_tokens(run: LoadedRun, n: int, max_tokens: int = 200_000) -> tuple[np.ndarray, str]:
    """The ``n`` most frequent token ids of the run's first ``max_tokens`` training tokens, and where
    they came from; when the data cannot be read (e.g. offline Dolma), the ``n`` lowest ids (GPT-2's
    earliest BPE merges, roughly its most frequent pieces)."""
    try:
        tokens = np.asarray(run.datamodule().train_token_stream(max_tokens).tokens)
    except Exception as err:  # the figure is still useful without the data; say so in the summary
        return np.arange(n), f"lowest {n} token ids (training data unavailable: {err})"
    counts = np.bincount(tokens, minlength=n)
    order = np.argsort(-counts, kind="stable")[:n]
    return order[counts[order] > 0], f"{n} most frequent tokens of the first {len(tokens):,} training tokens"


def plot_embedding_pca(loaded: LoadedRun, name: str, out: Path, n_tokens: int = 300) -> tuple[Path, str]:
    """Frequent tokens on the top two principal components of the (real-vocabulary) embedding matrix."""
    from picomaml.data import load_tokenizer

    tokenizer = load_tokenizer(loaded.tokenizer_name)
    weight = loaded.model.embedding_proj.weight.detach().double()[: len(tokenizer)]
    centred = weight - weight.mean(0)
    # eigenvectors of the D x D covariance: exact, and cheap whatever the vocabulary size
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred)
    components = eigenvectors[:, [-1, -2]]
    explained = (eigenvalues[[-1, -2]] / eigenvalues.sum()).tolist()
    ids, source = frequent_tokens(loaded, n_tokens)
    points = (centred[torch.as_tensor(ids)] @ components).numpy()
    fig = Figure(figsize=(9, 8))
    ax = fig.subplots()
    ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.6)
    for (x, y), token in zip(points, ids.tolist(), strict=True):
        ax.annotate(repr(tokenizer.decode([token]))[1:-1], (x, y), fontsize=5)
    ax.set(
        xlabel=f"PC1 ({explained[0]:.1%} of variance)",
        ylabel=f"PC2 ({explained[1]:.1%} of variance)",
        title=f"{name}: token embeddings, step {loaded.step}",
    )
    return _save(fig, out / f"embedding_pca_{name}.png"), source


def attention_probs(model: PicoDecoder, input_ids: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """Causal attention map [B, T, T] of query head ``head`` in layer ``layer``.

    The attention module's input (after ``attention_norm``) is captured with a forward hook and handed to
    the module's own ``attention_weights`` (softmax probabilities; for linear attention the implied kernel
    weights), so the map is the one that layer computes, for either attention kind.
    """
    attention = model.layers[layer].attention
    if not 0 <= head < attention.n_heads:
        raise ValueError(f"head={head} out of range: layer {layer} has {attention.n_heads} heads")
    captured: dict[str, torch.Tensor] = {}
    handle = attention.register_forward_hook(lambda m, args, out: captured.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        handle.remove()
    x = captured["x"]
    rope = rope_rotations(attention.head_dim, model.config.position_emb_theta, 0, x.shape[1], x.device)
    with torch.no_grad():
        return attention.attention_weights(x, rope)[:, head]


def plot_attention(
    loaded: LoadedRun, name: str, out: Path, prompt: str, layer: int = 0, head: int = 0
) -> Path:
    """Heatmap of :func:`attention_probs` for ``prompt`` (rows: queries, columns: keys)."""
    from picomaml.data import load_tokenizer

    if not 0 <= layer < loaded.model_config.n_layers:
        raise ValueError(f"layer={layer} out of range: the model has {loaded.model_config.n_layers} layers")
    tokenizer = load_tokenizer(loaded.tokenizer_name)
    ids = tokenizer.encode(prompt)[: loaded.model_config.max_seq_len]
    probs = attention_probs(loaded.model, torch.tensor([ids]), layer, head)[0].numpy()
    # linear attention's implied weights can be negative (RoPE in the numerator): a diverging scale then
    low, high, cmap = (0, 1, "magma") if probs.min() >= 0 else (-abs(probs).max(), abs(probs).max(), "RdBu_r")
    labels = [repr(tokenizer.decode([t]))[1:-1] for t in ids]
    size = max(5.0, 0.3 * len(ids))
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(probs, vmin=low, vmax=high, cmap=cmap)
    ax.set_xticks(range(len(ids)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(ids)), labels, fontsize=7)
    kind = loaded.model_config.attention
    title = f"{name} ({kind} attention): layer {layer} head {head}, step {loaded.step}"
    ax.set(xlabel="key", ylabel="query", title=title)
    fig.colorbar(image, ax=ax)
    return _save(fig, out / f"attention_{name}.png")


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


# --- driver ----------------------------------------------------------------------------------------------


def analyze(
    path: str | Path,
    prompt: str | None = None,
    layer: int = 0,
    head: int = 0,
    cka_layer: str = "swiglu.w_2",
    n_tokens: int = 300,
) -> Path:
    """Write every figure the run or sweep at ``path`` has data for and ``summary.md``; returns its path.

    ``prompt`` None: :data:`NUMERIC_PROMPT` for runs trained on ``data=synthetic``, else
    :data:`DEFAULT_PROMPT`."""
    path = Path(path)
    runs = find_runs(path)
    if not any(run.metrics or checkpoint_steps_available(run.path) for run in runs):
        raise RunError(
            f"nothing to analyse in {path}: no logged metrics (csv/metrics.csv) and no checkpoint in "
            f"{', '.join(str(r.path) for r in runs)}"
        )
    out = path / "analysis"
    out.mkdir(exist_ok=True)
    selectivity: dict[str, tuple[str, Any]] = {}  # run name -> (attention kind, Selectivity)
    sections: list[tuple[str, Path | None, str]] = [
        ("Loss curves", plot_loss_curves(runs, out), "no loss metrics logged"),
        ("Meta-learning accuracy", plot_meta_accuracy(runs, out), "no meta/*acc* metric logged"),
        ("Perplexity vs model size", plot_ppl_vs_size(runs, out), "needs two runs or more with val/ppl"),
    ]
    for run in runs:
        sections.append(
            (
                f"{run.name}: CKA across steps",
                plot_cka(run, out, cka_layer),
                "needs learning dynamics at 2+ steps",
            )
        )
        try:
            loaded = load_run(run.path)
        except RunError as err:  # e.g. a run trained without checkpoints: its curves are still drawn
            sections.append((f"{run.name}: embedding PCA and attention", None, str(err)))
            continue
        figure, source = plot_embedding_pca(loaded, run.name, out, n_tokens)
        sections.append((f"{run.name}: embedding PCA ({source})", figure, ""))
        synthetic = loaded.train_config.data.get("corpus") == "synthetic"
        text = prompt if prompt is not None else NUMERIC_PROMPT if synthetic else DEFAULT_PROMPT
        attention = plot_attention(loaded, run.name, out, text, layer, head)
        kind = loaded.model_config.attention
        sections.append((f"{run.name}: {kind} attention for {text!r}", attention, ""))
        if synthetic:
            sections += _numeric_sections(loaded, run.name, out, selectivity)
    summary = out / "summary.md"
    summary.write_text(_summary(path, runs, sections) + _selectivity_table(selectivity))
    return summary


def _numeric_sections(
    loaded: LoadedRun, name: str, out: Path, selectivity: dict[str, tuple[str, Any]]
) -> list[tuple[str, Path | None, str]]:
    """The number-sequence figures of a ``data=synthetic`` run (:mod:`picomaml.eval.numeric_analysis`),
    on sequences of the run's training length L; records the run's selectivity for the summary table."""
    from picomaml.data import load_tokenizer
    from picomaml.eval.numeric import NumericConfig, run_numeric_setup
    from picomaml.eval.numeric_analysis import numeric_figures

    train_terms, kinds = run_numeric_setup(loaded.train_config, NumericConfig())
    if len(kinds) < 2:
        return [(f"{name}: number sequences", None, "selectivity across kinds needs two kinds or more")]
    tokenizer = load_tokenizer(loaded.tokenizer_name)
    pca, figure, result = numeric_figures(loaded.model, tokenizer, name, out, kinds, train_terms)
    selectivity[name] = (loaded.model_config.attention, result)
    return [
        (f"{name}: number-token and sequence-kind PCA ({train_terms}-term sequences)", pca, ""),
        (f"{name}: SwiGLU unit selectivity across sequence kinds", figure, ""),
    ]


def _selectivity_table(selectivity: dict[str, tuple[str, Any]]) -> str:
    """Per run: mean selectivity index over all SwiGLU units, the share with SI >= 0.5 and, per kind,
    how many units prefer it with SI >= 0.5 (see :mod:`picomaml.eval.numeric_analysis`)."""
    if not selectivity:
        return ""
    from picomaml.eval.numeric_analysis import SELECTIVE

    kinds = list(dict.fromkeys(k for _, result in selectivity.values() for k in result.kinds))
    lines = [
        "",
        "## Neuron selectivity across sequence kinds",
        "",
        "SI = (a_max - a_rest) / (a_max + a_rest) per SwiGLU unit, a = mean |activation| over the number "
        f"tokens of each kind's sequences; *selective*: SI >= {SELECTIVE}; the kind columns count the "
        "selective units that prefer that kind.",
        "",
        "| run | attention | units | mean SI | selective | " + " | ".join(kinds) + " |",
        "|---|---|---:|---:|---:|" + "---:|" * len(kinds),
    ]
    for name, (kind, result) in selectivity.items():
        counts = result.counts()
        share = float((result.index >= SELECTIVE).mean())
        lines.append(
            f"| {name} | {kind} | {result.index.size} | {result.index.mean():.3f} | {share:.1%} | "
            + " | ".join(str(counts.get(k, 0)) for k in kinds)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _summary(path: Path, runs: Sequence[RunInfo], sections: Sequence[tuple[str, Path | None, str]]) -> str:
    lines = [f"# Analysis of `{path}`", "", "| run | parameters | last step | last val/loss | last val/ppl |"]
    lines.append("|---|---:|---:|---:|---:|")
    for run in runs:
        steps = [s for values in run.metrics.values() for s, _ in values]
        loss, ppl = run.last("val/loss"), run.last("val/ppl")
        lines.append(
            f"| {run.name} | {count_parameters(run.model_config):,} | {max(steps, default=0)} | "
            f"{'-' if loss is None else f'{loss:.4f}'} | {'-' if ppl is None else f'{ppl:.2f}'} |"
        )
    for title, figure, why_missing in sections:
        lines += ["", f"## {title}", ""]
        lines.append(f"![{title}]({figure.name})" if figure is not None else f"_Not drawn: {why_missing}._")
    return "\n".join(lines) + "\n"
