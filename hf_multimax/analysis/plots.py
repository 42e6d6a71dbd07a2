"""Every figure of hf-multimax (PNG, matplotlib on the Agg backend: no display needed): the model card's σ plot, the
``hf-multimax analyze`` figures and the ``compare`` plots use these helpers.

* :func:`plot_modulators`: each layer's learned σ against the identity (the paper's Figure 3).
* :func:`plot_attention_histograms`: attention weights per layer (the paper's Figure 5), models overlaid.
* :func:`plot_layer_metrics`: sparsity, zeros, modes, multi-modality, residual mass and entropy per layer.
* :func:`plot_token_similarity`: over-smoothing, token cosine similarity per layer (Figure 4).
* :func:`plot_simplex`: SoftMax over temperatures, SparseMax, EntMax-1.5, Ev-SoftMax and each model's MultiMax on the
  same 3-d inputs, drawn on the probability simplex (Figure 1).
* :func:`plot_bands` and :func:`plot_intervals`: curves with a confidence band, and means with confidence intervals
  (``hf-multimax compare``'s ``loss_curves.png`` and ``metrics.png``; the statistics are computed by the caller).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..extras import require
from ..modeling import multimax_modules

if TYPE_CHECKING:
    from .collect import ModelAnalysis

__all__ = [
    "pyplot",
    "save_figure",
    "modulator_curves",
    "plot_modulators",
    "plot_attention_histograms",
    "plot_layer_metrics",
    "plot_token_similarity",
    "plot_simplex",
    "simplex_inputs",
    "simplex_functions",
    "first_attention_modulator",
    "Band",
    "IntervalPanel",
    "plot_bands",
    "plot_intervals",
]

SQRT3_2 = math.sqrt(3) / 2


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display); a clear
    :class:`~hf_multimax.extras.MissingExtraError` without matplotlib."""
    require("analysis", "plotting", modules=["matplotlib"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, rect: tuple[float, float, float, float] | None = None) -> Path:
    """Lay out ``fig`` (within ``rect`` of the figure, e.g. to leave room for a title), write it as a PNG at ``path``
    (creating the folder) and close it; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def modulator_curves(model: nn.Module, x: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """σ(x) of every SegLU in ``model`` on a grid: ``{module_name: (x, σ(x))}``; per-head SegLUs give
    ``(heads, len)``."""
    x = torch.linspace(-6.0, 6.0, 241) if x is None else x
    curves = {}
    with torch.no_grad():
        for name, seglu in multimax_modules(model).items():
            grid = x.to(torch.float32)
            if seglu.num_heads is not None:
                grid = grid.expand(1, seglu.num_heads, 1, -1)
            y = seglu(grid)  # SegLU casts its parameters to the grid's float32; the model is left as it is
            curves[name] = (x.cpu(), y.reshape(-1, x.numel()).squeeze(0).cpu())
    return curves


def plot_modulators(
    model: nn.Module, path: str | Path, title: str | None = None, x: torch.Tensor | None = None
) -> Path:
    """Plot each layer's learned σ(x) against the identity (the paper's Figure 3), one panel per SegLU; write a PNG."""
    plt = pyplot()
    curves = modulator_curves(model, x)
    if not curves:
        raise ValueError(f"{type(model).__name__} has no MultiMax parameters to plot")
    cols = min(4, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax, (name, (grid, y)) in zip(axes.flat, curves.items()):
        ax.plot(grid, grid, "k--", lw=0.8, label="identity (SoftMax)")
        for row in y.reshape(-1, grid.numel()):
            ax.plot(grid, row, lw=1.2)
        ax.set_title(name.removesuffix(".multimax"), fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(curves) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(title or "Learned MultiMax modulator σ(x) per layer", fontsize=9)
    return save_figure(fig, path)


def _grid(n: int, cols: int = 4, size: tuple[float, float] = (3.2, 2.6)):
    plt = pyplot()
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)


def plot_attention_histograms(analyses: Sequence[ModelAnalysis], path: str | Path, bins: int = 40) -> Path:
    """Histogram of the (unmasked) attention weights of each layer, one panel per layer, models overlaid; log counts,
    so the mass of near-zero weights (sparsity) and of large ones (modes) both show."""
    from .collect import short_name

    layers = max(len(a.maps) for a in analyses)
    fig, axes = _grid(layers)
    edges = torch.linspace(0, 1, bins + 1)
    for i, ax in enumerate(axes[:layers]):
        for color, analysis in enumerate(analyses):
            if i >= len(analysis.maps):
                continue
            attention = analysis.maps[i]
            values = attention.weights[attention.valid].float().clamp(0, 1)
            counts = torch.histogram(values, bins=edges).hist
            share = counts / max(values.numel(), 1)
            ax.stairs(
                share.numpy(),
                edges.numpy(),
                color=f"C{color}",
                lw=1.3,
                label=f"{analysis.label} ({analysis.layers[i]['sparsity']:.0%} < thr.)",
            )
        ax.set_yscale("log")
        ax.set_title(short_name(analyses[0].maps[min(i, len(analyses[0].maps) - 1)].name), fontsize=7)
        ax.set_xlabel("attention weight", fontsize=7)
        ax.set_ylabel("share of weights", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5)
    fig.suptitle("Attention weights per layer", fontsize=9)
    return save_figure(fig, path)


def plot_layer_metrics(analyses: Sequence[ModelAnalysis], path: str | Path) -> Path:
    """Sparsity, exact zeros, modes per row, multi-modality, residual mass and entropy per layer, one line per model."""
    metrics = [
        ("sparsity", "share below threshold"),
        ("zeros", "share exactly zero"),
        ("modes", "weights > 0.1 per row"),
        ("multimodality", "multi-modality 1-(p1-p2)"),
        ("residual_mass", "mass on small entries"),
        ("entropy", "entropy (nats)"),
    ]
    from matplotlib.ticker import MaxNLocator

    fig, axes = _grid(len(metrics), cols=3)
    for ax, (key, title) in zip(axes, metrics):
        for color, analysis in enumerate(analyses):
            ax.plot(
                range(len(analysis.layers)),
                [layer[key] for layer in analysis.layers],
                "o-",
                ms=3,
                color=f"C{color}",
                label=analysis.label,
            )
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("attention layer", fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=6)
    axes[0].legend(fontsize=6)
    fig.suptitle("Attention metrics per layer", fontsize=9)
    return save_figure(fig, path)


def plot_token_similarity(analyses: Sequence[ModelAnalysis], path: str | Path) -> Path:
    """Mean pairwise cosine similarity of the token (patch) representations after each layer: over-smoothing."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for color, analysis in enumerate(analyses):
        ax.plot(
            range(len(analysis.token_similarity)),
            analysis.token_similarity,
            "o-",
            ms=3,
            color=f"C{color}",
            label=analysis.label,
        )
    ax.set_xlabel("hidden state (0 = embeddings)", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean cosine similarity of tokens", fontsize=8)
    ax.set_title("Patch similarity per layer (over-smoothing)", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


#: The paper's Figure 1 inputs: a largest entry, a second one approaching it, and a negative one to be ignored.
SIMPLEX_INPUTS = ((10.0, 2.0, -1.0), (10.0, 4.0, -1.0), (10.0, 6.0, -1.0), (10.0, 8.0, -1.0), (10.0, 10.0, -1.0))


def simplex_inputs(points: Sequence[Sequence[float]] = SIMPLEX_INPUTS) -> torch.Tensor:
    """The 3-d inputs of the simplex plot, shape ``(n, 3)`` (default: the paper's ``(10, x, -1)``, x = 2 … 10)."""
    return torch.tensor(points, dtype=torch.float32)


def first_attention_modulator(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """σ of the first attention layer's SegLU (its first head when per head), or ``None`` without MultiMax."""
    from .. import registry
    from ..functional import seglu
    from ..modeling import SegLU

    for found in registry.parameter_modules(model):
        module = found.module
        if found.role != "attention" or not isinstance(module, SegLU):
            continue
        ranges = module.multimax_ranges.detach().float().cpu()
        ts = module.multimax_ts.detach().float().cpu()
        if ranges.dim() == 2:
            ranges, ts = ranges[0], ts[0]
        return lambda x, r=ranges, t=ts: seglu(x, r, t)
    return None


def simplex_functions(temperature: float = 1.0) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The fixed comparators of the simplex plot, ``{name: function of (n, 3) inputs}``."""
    from ..comparators import masked_entmax15, masked_evsoftmax, masked_sparsemax

    return {
        f"SoftMax T={temperature:g}": lambda x: torch.softmax(x / temperature, dim=-1),
        "SparseMax": masked_sparsemax,
        "EntMax-1.5": masked_entmax15,
        "Ev-SoftMax": masked_evsoftmax,
    }


def _project(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Barycentric (p1, p2, p3) -> 2-d point of the triangle with vertices e1 = (1, 0), e2 = (1/2, √3/2), e3 = (0, 0),
    the layout of the paper's Figure 1."""
    return p[..., 0] + p[..., 1] / 2, p[..., 1] * SQRT3_2


MARKERS = {
    "SoftMax": ("s", "k"),
    "SparseMax": ("*", "tab:blue"),
    "EntMax-1.5": ("v", "tab:green"),
    "Ev-SoftMax": ("s", "c"),
}


def plot_simplex(
    modulators: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    path: str | Path,
    points: Sequence[Sequence[float]] = SIMPLEX_INPUTS,
    temperatures: tuple[float, float] = (0.1, 100.0),
) -> Path:
    """Outputs on the 2-simplex for the same 3-d inputs (the paper's Figure 1): SoftMax traced over temperatures from
    ``temperatures[0]`` to ``temperatures[1]`` (one thin line per input, from the argmax vertex to the uniform centre),
    SoftMax at T = 1, SparseMax, EntMax-1.5, Ev-SoftMax and each model's MultiMax ``softmax(σ(x))`` as markers
    (``modulators``: label -> first attention layer's σ). Vertices are uni-modal outputs, edges bi-modal ones."""
    plt = pyplot()
    x = simplex_inputs(points)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    ax.plot([1, 0.5, 0, 1], [0, SQRT3_2, 0, 0], "k-", lw=0.8)
    for (vx, vy), text in (((1, 0), "(1, 0, 0)"), ((0.5, SQRT3_2), "(0, 1, 0)"), ((0, 0), "(0, 0, 1)")):
        ax.annotate(
            text,
            (vx, vy),
            xytext=(0, 6 if vy > 0 else -8),
            textcoords="offset points",
            fontsize=8,
            ha="center",
            va="bottom" if vy > 0 else "top",
        )
    ts = torch.logspace(math.log10(temperatures[0]), math.log10(temperatures[1]), 300)
    cmap = plt.get_cmap("viridis")
    for i, point in enumerate(x):
        curve = torch.softmax(point[None] / ts[:, None], dim=-1)
        px, py = _project(curve)
        ax.plot(
            px,
            py,
            "-",
            lw=0.9,
            color=cmap(i / max(len(x) - 1, 1)),
            label=(
                f"SoftMax, T {temperatures[0]:g}→{temperatures[1]:g}: x = {tuple(round(v, 2) for v in point.tolist())}"
            ),
        )
    with torch.no_grad():
        for name, function in simplex_functions().items():
            marker, color = MARKERS[name.split(" ")[0]]
            px, py = _project(function(x).float())
            hollow = name.startswith("SoftMax")  # drawn under Ev-SoftMax, which equals it where both are dense
            ax.scatter(
                px,
                py,
                marker=marker,
                s=90 if hollow or marker == "*" else 40,
                label=name,
                zorder=3,
                alpha=0.85,
                facecolors="none" if hollow else color,
                edgecolors=color if hollow else "none",
            )
        for i, (label, sigma) in enumerate(modulators.items()):
            px, py = _project(torch.softmax(sigma(x), dim=-1).float())
            ax.scatter(
                px,
                py,
                marker="^",
                s=60,
                color=f"C{(i + 6) % 10}",
                label=f"MultiMax ({label})",
                zorder=4,
                alpha=0.85,
                edgecolors="none",
            )
    ax.set_xlim(-0.1, 1.1)
    ax.set_ylim(-0.1, SQRT3_2 + 0.1)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.legend(fontsize=6, loc="upper left", frameon=False)
    ax.set_title("Outputs on the probability simplex for the same inputs x", fontsize=9)
    return save_figure(fig, path)


@dataclass
class Band:
    """One curve of :func:`plot_bands`: ``y`` over ``x`` with a band from ``low`` to ``high`` (NaN where undefined)."""

    x: Sequence[float]
    y: Sequence[float]
    low: Sequence[float]
    high: Sequence[float]
    label: str


def plot_bands(bands: Sequence[Band], path: str | Path, title: str, xlabel: str, ylabel: str) -> Path:
    """One line per :class:`Band` with its shaded band (where defined); a PNG."""
    import numpy as np

    fig, ax = pyplot().subplots(figsize=(6.4, 4.0))
    for index, band in enumerate(bands):
        color = f"C{index}"
        ax.plot(band.x, band.y, color=color, lw=1.6, label=band.label)
        low, high = np.asarray(band.low, dtype=float), np.asarray(band.high, dtype=float)
        if np.isfinite(low).any():
            ax.fill_between(band.x, low, high, color=color, alpha=0.2, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


@dataclass
class IntervalPanel:
    """One panel of :func:`plot_intervals`: a value with its interval per label. ``zero_line`` draws y = 0 (for
    differences); ``filled[i]`` False draws the marker hollow (e.g. an interval that contains 0)."""

    title: str
    labels: Sequence[str]
    centers: Sequence[float]
    lows: Sequence[float]
    highs: Sequence[float]
    zero_line: bool = False
    filled: Sequence[bool] | None = None
    colors: Mapping[str, str] = field(default_factory=dict)


def plot_intervals(panels: Sequence[IntervalPanel], path: str | Path, title: str, cols: int = 4) -> Path:
    """A grid of panels, each with one marker and error bar per label (NaN bounds: marker only); a PNG."""
    fig, axes = _grid(len(panels), cols=cols, size=(3.0, 2.5))
    for ax, panel in zip(axes, panels):
        for i, (label, center, low, high) in enumerate(zip(panel.labels, panel.centers, panel.lows, panel.highs)):
            color = panel.colors.get(label, f"C{i}")
            filled = panel.filled[i] if panel.filled is not None else True
            if math.isfinite(low) and math.isfinite(high):
                ax.errorbar([i], [center], yerr=[[center - low], [high - center]], color=color, capsize=3, lw=1.2)
            ax.scatter([i], [center], color=color if filled else "white", edgecolors=color, zorder=3, s=28)
        if panel.zero_line:
            ax.axhline(0.0, color="0.4", lw=0.8, ls="--")
        ax.set_xticks(range(len(panel.labels)))
        ax.set_xticklabels(panel.labels, rotation=30, ha="right", fontsize=6)
        ax.set_xlim(-0.6, len(panel.labels) - 0.4)
        ax.set_title(panel.title, fontsize=7)
        ax.tick_params(axis="y", labelsize=6)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=9)
    rows = math.ceil(len(panels) / max(1, min(cols, len(panels))))
    return save_figure(fig, path, rect=(0, 0, 1, 1 - 0.35 / (2.5 * rows)))
