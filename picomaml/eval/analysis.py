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
- ``attention_<run>.png``: attention probabilities of one layer and head for a prompt, recomputed from
  the model's own ``q_proj``/``k_proj`` and RoPE (the fused attention kernel never materialises them).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from picomaml.model import ModelConfig, PicoDecoder
from picomaml.model.pico_decoder import apply_rope, rope_rotations
from picomaml.runs import (
    TRAINING_CONFIG,
    LoadedRun,
    RunError,
    checkpoint_steps_available,
    load_run,
    metrics_row_step,
)

DEFAULT_PROMPT = "The history of the city begins with a small village on the river, where"


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
    """Causal attention probabilities [B, T, T] of query head ``head`` in layer ``layer``.

    The attention module's input (after ``attention_norm``) is captured with a forward hook; q and k are
    recomputed with the module's own projections and RoPE, and query head h reads kv head h // (H / K),
    as the model's grouped-query attention does.
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
    B, T, _ = x.shape
    E, K = attention.head_dim, attention.n_kv_heads
    rope = rope_rotations(E, model.config.position_emb_theta, 0, T, x.device)
    with torch.no_grad():
        q = apply_rope(attention.q_proj(x).view(B, T, attention.n_heads, E), rope)[:, :, head]
        kv_head = head // (attention.n_heads // K)
        k = apply_rope(attention.k_proj(x).view(B, T, K, E), rope)[:, :, kv_head]
        scores = (q.float() @ k.float().transpose(1, 2)) / math.sqrt(E)  # [B, T, T]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


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
    labels = [repr(tokenizer.decode([t]))[1:-1] for t in ids]
    size = max(5.0, 0.3 * len(ids))
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(probs, vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(len(ids)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(ids)), labels, fontsize=7)
    ax.set(xlabel="key", ylabel="query", title=f"{name}: layer {layer} head {head}, step {loaded.step}")
    fig.colorbar(image, ax=ax)
    return _save(fig, out / f"attention_{name}.png")


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


# --- driver ----------------------------------------------------------------------------------------------


def analyze(
    path: str | Path,
    prompt: str = DEFAULT_PROMPT,
    layer: int = 0,
    head: int = 0,
    cka_layer: str = "swiglu.w_2",
    n_tokens: int = 300,
) -> Path:
    """Write every figure the run or sweep at ``path`` has data for and ``summary.md``; returns its path."""
    path = Path(path)
    runs = find_runs(path)
    if not any(run.metrics or checkpoint_steps_available(run.path) for run in runs):
        raise RunError(
            f"nothing to analyse in {path}: no logged metrics (csv/metrics.csv) and no checkpoint in "
            f"{', '.join(str(r.path) for r in runs)}"
        )
    out = path / "analysis"
    out.mkdir(exist_ok=True)
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
        attention = plot_attention(loaded, run.name, out, prompt, layer, head)
        sections.append((f"{run.name}: attention for {prompt!r}", attention, ""))
    summary = out / "summary.md"
    summary.write_text(_summary(path, runs, sections))
    return summary


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
