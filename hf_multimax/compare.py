"""``hf-multimax compare``: train the same tiny model with SoftMax and with MultiMax attention, side by side.

Each implementation runs the fine-tuning pipeline of the example scripts (:func:`hf_multimax.finetune.run`) on the
task's embedded offline data, from the same seed and therefore the same initial weights (MultiMax's parameters are
added on top). The command prints a table (final training loss, evaluation loss, task metric, time per step), writes
``loss_curves.png``, ``results.md`` and ``results.json`` to the output folder, and saves each trained model with its
tokenizer or image processor to ``OUTPUT_DIR/<implementation>/`` for ``hf-multimax analyze``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cli import command
from .config import INIT_METHODS
from .tasks import TASKS, get_task

logger = logging.getLogger(__name__)

__all__ = ["compare", "format_table", "plot_loss_curves", "COMPARE_DEFAULTS"]

#: Per-task settings of the default comparison: a few minutes in total on a 2-core CPU.
COMPARE_DEFAULTS: dict[str, dict[str, Any]] = {
    "lm": {"max_train_steps": 500},
    "translation": {"max_train_steps": 600},
    "vit": {"max_train_steps": 500},
}


def _multimax_flag_argv(args: argparse.Namespace) -> list[str]:
    argv = []
    for name in ("multimax_order", "multimax_init", "multimax_per_head", "multimax_output"):
        value = getattr(args, name, None)
        if value is not None:
            argv += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def compare(
    task_name: str,
    output_dir: str | Path,
    implementations: Sequence[str] = ("sdpa", "multimax"),
    seed: int = 0,
    max_train_steps: int | None = None,
    multimax_argv: Sequence[str] = (),
    extra_argv: Sequence[str] = (),
) -> dict[str, dict]:
    """Train one model per attention implementation and return ``{implementation: results of finetune.run}``.

    ``multimax_argv`` (``--multimax_*`` flags) applies to the implementations that have MultiMax parameters only, so
    the baseline stays plain SoftMax; ``extra_argv`` (any flag of the example scripts) applies to every run.
    """
    from . import finetune
    from .integration import PARAMETRIC_ATTENTION

    task = get_task(task_name)
    steps = max_train_steps or COMPARE_DEFAULTS[task.name]["max_train_steps"]
    output_dir = Path(output_dir)
    results = {}
    for implementation in implementations:
        argv = ["--attn_implementation", implementation, "--output_dir", str(output_dir / implementation),
                "--seed", str(seed), "--max_train_steps", str(steps), "--eval_strategy", "end"]
        if implementation in PARAMETRIC_ATTENTION:
            argv += list(multimax_argv)
        argv += list(extra_argv)
        logger.info("compare: training %s (%s)", implementation, " ".join(argv))
        args = finetune.parse_args(task, argv)
        results[implementation] = finetune.run(task, args)
    return results


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
    from .plots import pyplot, save_figure

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


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=sorted(TASKS), default="lm",
                        help="lm: tiny Llama on CPython's docs (perplexity); translation: tiny T5 on English→German "
                             "UI strings (BLEU); vit: tiny ViT on 8×8 digits (accuracy)")
    parser.add_argument("--implementations", nargs="+", default=["sdpa", "multimax"], metavar="NAME",
                        help="attention implementations to train, the first being the baseline (default: sdpa "
                             "multimax; also eager, multimax_eager or any registered name)")
    parser.add_argument("--output_dir", default=None,
                        help="where models, loss_curves.png, results.md and results.json go (default: compare-TASK)")
    parser.add_argument("--seed", type=int, default=0, help="seed shared by every run")
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help="optimizer steps per run (default: " + ", ".join(
                            f"{k} {v['max_train_steps']}" for k, v in COMPARE_DEFAULTS.items()) + ")")
    parser.add_argument("--multimax_order", type=int, default=None, help="SegLU order of the MultiMax runs")
    parser.add_argument("--multimax_init", choices=INIT_METHODS, default=None,
                        help="initialisation of the MultiMax parameters (default identity)")
    parser.add_argument("--multimax_per_head", action="store_true", default=None,
                        help="one MultiMax parameter set per head in the MultiMax runs")
    parser.add_argument("--multimax_output", action="store_true", default=None,
                        help="MultiMax on the output logits too, in the MultiMax runs")
    parser.add_argument("--script_args", default="",
                        help="further flags of the example scripts for every run, quoted, e.g. "
                             "\"--learning_rate 1e-3 --config_overrides hidden_size=128\"")


@command("compare", "Train the same tiny model with SoftMax and with MultiMax on embedded data; table + loss plot.",
         add_arguments)
def run_compare(args: argparse.Namespace) -> int:
    import datasets

    datasets.disable_progress_bars()  # keep the terminal to the training bars and the table
    output_dir = Path(args.output_dir or f"compare-{args.task}")
    load_before = _load_average()
    if load_before is not None and load_before > (os.cpu_count() or 1):
        logger.warning("the machine is busy (load average %.1f on %d CPUs): time per step will be inflated",
                       load_before, os.cpu_count() or 1)
    started = time.perf_counter()
    results = compare(
        args.task, output_dir, args.implementations, seed=args.seed, max_train_steps=args.max_train_steps,
        multimax_argv=_multimax_flag_argv(args), extra_argv=shlex.split(args.script_args),
    )
    elapsed = time.perf_counter() - started
    table = format_table(args.task, results)
    task = get_task(args.task)
    plot = plot_loss_curves(results, output_dir / "loss_curves.png",
                            title=f"{args.task}: training loss, " + " vs ".join(results))
    command_line = "hf-multimax " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    steps = next(iter(results.values()))["steps"]
    markdown = "\n".join([
        f"# hf-multimax compare: {args.task}",
        "",
        f"`{command_line}`" if command_line else "",
        "",
        f"{steps} optimizer steps per run, seed {args.seed}, same initial weights; {task.metric} on the held-out split. "
        "Time per step is wall-clock on this machine"
        + (f" (1-minute load average {load_before:.1f} before, {_load_average():.1f} after, {os.cpu_count()} CPUs)"
           if load_before is not None else "") + ": other processes inflate it.",
        "",
        table,
        "",
        f"![training loss]({plot.name})",
        "",
        "Models: " + ", ".join(f"`{output_dir / name}`" for name in results),
        "",
    ])
    (output_dir / "results.md").write_text(markdown)
    summary = {
        "task": args.task,
        "seed": args.seed,
        "seconds": elapsed,
        "load_average": {"before": load_before, "after": _load_average(), "cpus": os.cpu_count()},
        "results": {name: {k: v for k, v in r.items()} for name, r in results.items()},
    }
    (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
    print()
    print(table)
    print(f"\nloss curves: {plot}\nresults:     {output_dir / 'results.md'}, {output_dir / 'results.json'}")
    print(f"models:      {', '.join(str(output_dir / name) for name in results)}  ({elapsed:.0f} s in all)")
    return 0
