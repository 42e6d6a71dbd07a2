"""Matplotlib figures shared by model cards and ``hf-multimax analyze`` (PNG, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .integration import multimax_modules

__all__ = ["plot_modulators", "modulator_curves", "pyplot", "save_figure"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it as a PNG at ``path`` (creating the folder) and close it; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def modulator_curves(model: nn.Module, x: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """σ(x) of every SegLU in ``model`` on a grid: ``{module_name: (x, σ(x))}``; per-head SegLUs give ``(heads, len)``."""
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


def plot_modulators(model: nn.Module, path: str | Path, title: str | None = None, x: torch.Tensor | None = None) -> Path:
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
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(title or "Learned MultiMax modulator σ(x) per layer", fontsize=9)
    return save_figure(fig, path)
