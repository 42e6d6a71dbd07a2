"""The report of ``hf-multimax compare`` on the results of :func:`.runner.compare`: the tables (per implementation,
and paired differences against the baseline), ``results.md``, ``loss_curves.png`` and ``metrics.png``."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..analysis.report import METRIC_COLUMNS
from ..finetune.tasks import get_task
from .runner import attention_metric_name, write_results
from .statistics import format_aligned, significant, summarize

__all__ = [
    "ATTENTION_COLUMNS",
    "format_table",
    "format_attention_table",
    "plot_loss_curves",
    "plot_metrics",
    "write_report",
]

#: The attention statistics of every run: metric name in ``results.json`` -> column title.
ATTENTION_COLUMNS: tuple[tuple[str, str], ...] = tuple(
    (attention_metric_name(key), title) for key, title in METRIC_COLUMNS
)


# -- tables ------------------------------------------------------------------------------------------------------------


def _columns(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(name, header)`` of the task columns: train loss, eval loss, the task metric, its extra metrics, time."""
    task = get_task(results["task"])
    names = {name for stats in results["summary"].values() for name in stats}
    arrow = "↑" if task.greater_is_better else "↓"
    columns = [
        ("train_loss", "final train loss ↓"),
        ("eval_loss", "eval loss ↓"),
        (task.metric, f"{task.metric} {arrow}"),
    ]
    columns += [(name, f"{name} ↑") for name in task.extra_metrics]
    columns.append(("time_per_step", "time / step (s) ↓"))
    return [(name, header) for name, header in columns if name in names]


def _run_counts(results: Mapping[str, Any], implementation: str) -> tuple[int, int, list[str]]:
    runs = [run for run in results["runs"] if run["implementation"] == implementation]
    errors = [f"seed {run['seed']}: {run['error']}" for run in runs if run.get("error")]
    return len(runs) - len(errors), len(runs), errors


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def _difference(stats: Mapping[str, Any]) -> str:
    """A paired difference: ``mean ± h (p …)``, bold when its interval excludes 0."""
    text = format_aligned(stats)
    p_value = stats.get("p_value")
    if p_value is not None and not (isinstance(p_value, float) and math.isnan(p_value)):
        text += f" (p {p_value:.2g})"
    return f"**{text}**" if significant(stats) else text


def _tables(results: Mapping[str, Any], columns: Sequence[tuple[str, str]], what: str) -> str:
    """Means per implementation, then the paired differences against the baseline, for ``columns``."""
    summary, versus, baseline = results["summary"], results["versus_baseline"], results["baseline"]
    rows, failures = [], []
    for implementation, stats in summary.items():
        ok, total, errors = _run_counts(results, implementation)
        failures += [f"{implementation} {error}" for error in errors]
        count = f"{ok}" if ok == total else f"{ok} of {total}"
        if ok == 0:
            rows.append([implementation, count, f"failed: {errors[0].split(': ', 1)[1]}"] + [""] * (len(columns) - 1))
            continue
        rows.append(
            [implementation, count] + [format_aligned(stats[name]) if name in stats else "n/a" for name, _ in columns]
        )
    lines = [f"{what}: mean ± 95% CI half-width over seeds (Student t)", ""]
    lines += _table(["attention", "seeds", *(header for _, header in columns)], rows)
    if versus:
        lines += [
            "",
            f"{what}, paired difference against {baseline} on the same seed (implementation − {baseline}): "
            "mean ± 95% CI half-width (two-sided paired t-test p); **bold**: the interval excludes 0",
            "",
        ]
        diff_rows = []
        for implementation, diffs in versus.items():
            pairs = max((d.get("n", 0) for d in diffs.values()), default=0)
            diff_rows.append(
                [implementation, str(pairs)]
                + [_difference(diffs[name]) if name in diffs else "n/a" for name, _ in columns]
            )
        lines += _table(["attention", "pairs", *(f"Δ {header}" for _, header in columns)], diff_rows)
    if failures:
        lines += ["", "Failed runs: " + "; ".join(failures)]
    return "\n".join(lines)


def format_table(results: Mapping[str, Any]) -> str:
    """The task metrics' tables (markdown): per implementation and against the baseline."""
    return _tables(results, _columns(results), "Task metrics")


def format_attention_table(results: Mapping[str, Any]) -> str:
    """The attention statistics' tables (empty when no run was analysed)."""
    names = {name for stats in results["summary"].values() for name in stats}
    columns = [(name, title) for name, title in ATTENTION_COLUMNS if name in names]
    if not columns:
        return ""
    return _tables(results, columns, "Attention statistics (mean over layers, `hf-multimax analyze` inputs)")


# -- figures -----------------------------------------------------------------------------------------------------------


def _smoothed(
    losses: Sequence[Sequence[float]], weight: float = 0.9, period: int | None = None
) -> tuple[list[float], list[float]]:
    """Steps and the smoothed losses of one run: exponentially, or, when the batches repeat their lengths every
    ``period`` steps (``--group_by_length``), the mean of the last ``period`` losses, which removes that sawtooth."""
    steps = [step for step, _ in losses]
    if period and period > 1:
        window: deque[float] = deque(maxlen=period)
        values = []
        for _, loss in losses:
            window.append(loss)
            values.append(sum(window) / len(window))
        return steps, values
    values, value = [], None
    for _, loss in losses:
        value = loss if value is None else weight * value + (1 - weight) * loss
        values.append(value)
    return steps, values


def plot_loss_curves(results: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Training loss per implementation (smoothed per run, over its ``loss_period`` when it has one): the mean over
    seeds and its 95% band."""
    from ..analysis.plots import Band, plot_bands

    bands = []
    for implementation in results["implementations"]:
        curves = [
            _smoothed(run["losses"], period=run.get("loss_period"))
            for run in results["runs"]
            if run["implementation"] == implementation and not run.get("error") and run.get("losses")
        ]
        if not curves:
            continue
        length = min(len(values) for _, values in curves)
        steps = curves[0][0][:length]
        stats = [summarize([values[i] for _, values in curves]) for i in range(length)]
        final = summarize(
            [
                run["train_loss"]
                for run in results["runs"]
                if run["implementation"] == implementation and not run.get("error")
            ]
        )
        bands.append(
            Band(
                steps,
                [s["mean"] for s in stats],
                [s["ci95"][0] for s in stats],
                [s["ci95"][1] for s in stats],
                f"{implementation} (final {format_aligned(final)}, {len(curves)} seed{'s' * (len(curves) > 1)})",
            )
        )
    what = "mean over seeds and 95% band" if any("seeds" in band.label for band in bands) else "one seed"
    return plot_bands(
        bands, path, title or f"{results['task']}: training loss, {what}", "optimizer step", "training loss (smoothed)"
    )


def plot_metrics(results: Mapping[str, Any], path: str | Path) -> Path:
    """Every metric's mean and 95% CI per implementation, and below it the paired difference against the baseline
    (hollow: the interval contains 0)."""
    from ..analysis.plots import IntervalPanel, plot_intervals

    summary, versus, baseline = results["summary"], results["versus_baseline"], results["baseline"]
    names = [name for name, _ in _columns(results)] + [
        name for name, _ in ATTENTION_COLUMNS if any(name in s for s in summary.values())
    ]
    titles = dict(_columns(results)) | dict(ATTENTION_COLUMNS)
    colors = {implementation: f"C{i}" for i, implementation in enumerate(results["implementations"])}
    panels = []
    for name in names:
        labels = [impl for impl in summary if name in summary[impl]]
        stats = [summary[impl][name] for impl in labels]
        panels.append(
            IntervalPanel(
                titles[name],
                labels,
                [_float(s["mean"]) for s in stats],
                [_float(s["ci95"][0]) for s in stats],
                [_float(s["ci95"][1]) for s in stats],
                colors=colors,
            )
        )
        if versus:
            labels = [impl for impl in versus if name in versus[impl]]
            diffs = [versus[impl][name] for impl in labels]
            panels.append(
                IntervalPanel(
                    f"Δ {titles[name]} vs {baseline}",
                    labels,
                    [_float(d["mean_difference"]) for d in diffs],
                    [_float(d["ci95"][0]) for d in diffs],
                    [_float(d["ci95"][1]) for d in diffs],
                    zero_line=True,
                    filled=[significant(d) for d in diffs],
                    colors=colors,
                )
            )
    cols = 4
    return plot_intervals(
        panels,
        path,
        f"{results['task']}: mean and 95% CI over seeds"
        + (f"; to the right of each: its paired difference vs {baseline}" if versus else ""),
        cols=cols,
    )


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


# -- the whole report --------------------------------------------------------------------------------------------------


def write_report(output_dir: str | Path, results: Mapping[str, Any]) -> tuple[str, dict[str, Path]]:
    """Write ``results.json``, ``loss_curves.png``, ``metrics.png`` and ``results.md``; return the printed tables
    and the files."""
    output_dir = Path(output_dir)
    files = {"results.json": write_results(output_dir, results)}
    if results["summary"]:
        files["loss_curves.png"] = plot_loss_curves(results, output_dir / "loss_curves.png")
        files["metrics.png"] = plot_metrics(results, output_dir / "metrics.png")
    tables = (
        "\n\n".join(t for t in (format_table(results), format_attention_table(results)) if t)
        if results["summary"]
        else "no run finished"
    )
    settings, machine = results["settings"], results["machine"]
    load = machine.get("load_average") or {}
    load_text = (
        f", 1-minute load average {load['before']:.1f} before and {load['after']:.1f} after"
        if load.get("before") is not None and load.get("after") is not None
        else ""
    )
    multimax = ", ".join(f"{k} {v}" for k, v in settings["multimax"].items()) or "package defaults"
    markdown = [
        f"# hf-multimax compare: {results['task']}",
        "",
        f"`{results['command']}`" if results["command"] else "",
        "",
        f"{settings['max_train_steps']} optimizer steps per run; seeds {', '.join(map(str, results['seeds']))} "
        "(a seed fixes the initial weights, the held-out split and the data order, the same for every "
        f"implementation); MultiMax runs only: {multimax}. Baseline: {results['baseline']}.",
        "",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cpus', '?')} logical CPUs, "
        f"torch {machine.get('torch', '?')} "
        f"(threads: {machine.get('torch_threads', '?')}){load_text}"
        + (f"; this command took {results['seconds'] / 60:.1f} minutes" if results.get("seconds") else "")
        + ". Times per step are wall-clock and inflated by other processes.",
        "",
        tables,
        "",
    ]
    if "loss_curves.png" in files:
        markdown += ["![training loss](loss_curves.png)", "", "![metrics](metrics.png)", ""]
    markdown += [
        "Models: `"
        + "`, `".join(sorted({str(Path(run["output_dir"]).parent) for run in results["runs"]}))
        + "` (one `seed_N` folder per seed)",
        "",
    ]
    (output_dir / "results.md").write_text("\n".join(markdown))
    files["results.md"] = output_dir / "results.md"
    return tables, files
