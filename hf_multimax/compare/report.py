"""The report of ``hf-multimax compare``: the table, the loss-curve figure, ``results.md`` and ``results.json``."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..finetune.tasks import get_task

__all__ = ["format_table", "plot_loss_curves", "load_average", "write_report"]


def format_table(task_name: str, results: dict[str, dict]) -> str:
    """A markdown table: implementation, final training loss, evaluation loss, task metric, time per step."""
    task = get_task(task_name)
    arrow = "↑" if task.greater_is_better else "↓"
    baseline_name = next(iter(results))
    baseline = results[baseline_name]["time_per_step"]
    extra = [name for name in task.extra_metrics if all(name in r["metrics"] for r in results.values())]
    lines = [
        f"| attention | final train loss ↓ | eval loss ↓ | {task.metric} {arrow} | "
        + "".join(f"{name} ↑ | " for name in extra) + f"time / step | vs {baseline_name} |",
        "| --- | ---: | ---: | ---: | " + "---: | " * len(extra) + "---: | ---: |",
    ]
    for implementation, result in results.items():
        metrics = result["metrics"]
        relative = result["time_per_step"] / baseline if baseline else math.nan
        lines.append(
            f"| {implementation} | {result['train_loss']:.4f} | {metrics['eval_loss']:.4f} | "
            f"{metrics[task.metric]:.4g} | " + "".join(f"{metrics[name]:.4g} | " for name in extra)
            + f"{1000 * result['time_per_step']:.1f} ms | {relative:.2f}× |"
        )
    return "\n".join(lines)


def plot_loss_curves(results: dict[str, dict], path: str | Path, title: str | None = None) -> Path:
    """Training-loss curves (per step, faint, and exponentially smoothed) of every implementation; a PNG."""
    from ..analysis.plots import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(6.4, 4.0))
    for index, (implementation, result) in enumerate(results.items()):
        steps = [step for step, _ in result["losses"]]
        losses = [loss for _, loss in result["losses"]]
        color = f"C{index}"
        ax.plot(steps, losses, color=color, alpha=0.25, lw=0.8)
        smoothed, value = [], None
        for loss in losses:
            value = loss if value is None else 0.9 * value + 0.1 * loss
            smoothed.append(value)
        ax.plot(steps, smoothed, color=color, lw=1.8, label=f"{implementation} (final {result['train_loss']:.3f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title or "Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def write_report(
    task_name: str,
    output_dir: Path,
    results: dict[str, dict],
    *,
    seed: int,
    seconds: float,
    load_before: float | None,
    command_line: str = "",
) -> tuple[str, Path]:
    """Write ``loss_curves.png``, ``results.md`` and ``results.json`` to ``output_dir``; return the table and the plot."""
    import json

    task = get_task(task_name)
    table = format_table(task_name, results)
    plot = plot_loss_curves(results, output_dir / "loss_curves.png",
                            title=f"{task_name}: training loss, " + " vs ".join(results))  # fmt: skip
    steps = next(iter(results.values()))["steps"]
    load_after = load_average()
    markdown = "\n".join([
        f"# hf-multimax compare: {task_name}",
        "",
        f"`{command_line}`" if command_line else "",
        "",
        f"{steps} optimizer steps per run, seed {seed}, same initial weights; {task.metric} on the held-out split. "
        "Time per step is wall-clock on this machine"
        + (f" (1-minute load average {load_before:.1f} before, {load_after:.1f} after, {os.cpu_count()} CPUs)"
           if load_before is not None and load_after is not None else "") + ": other processes inflate it.",
        "",
        table,
        "",
        f"![training loss]({plot.name})",
        "",
        "Models: " + ", ".join(f"`{output_dir / name}`" for name in results),
        "",
    ])  # fmt: skip
    (output_dir / "results.md").write_text(markdown)
    summary = {
        "task": task_name,
        "seed": seed,
        "seconds": seconds,
        "load_average": {"before": load_before, "after": load_after, "cpus": os.cpu_count()},
        "results": results,
    }
    (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
    return table, plot
