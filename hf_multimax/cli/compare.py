"""``hf-multimax compare``: the same tiny model trained with each attention implementation on several seeds, with
statistics over the seeds (see :mod:`hf_multimax.compare`)."""

from __future__ import annotations

import argparse
import shlex
import sys

HELP = (
    "Train the same tiny model with each attention implementation on N seeds; tables with 95% CIs, plots, results.json."
)
TASK_HELP = (
    "lm: tiny Llama on CPython's docs (perplexity); translation: tiny T5 on English→German UI strings (BLEU); "
    "vit: tiny ViT on 8×8 digits (accuracy)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..compare.runner import COMPARE_DEFAULTS
    from ..config import INIT_METHODS

    parser.add_argument("--task", choices=sorted(COMPARE_DEFAULTS), default="lm", help=TASK_HELP)
    parser.add_argument(
        "--implementations",
        nargs="*",
        default=["sdpa", "multimax"],
        metavar="NAME",
        help="attention implementations to train, the first being the baseline (default: sdpa "
        "multimax; also eager, multimax_eager, sparsemax, entmax15, entmax_alpha, evsoftmax or "
        "any registered name)",
    )
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seeds",
        type=int,
        default=None,
        metavar="N",
        help="runs per implementation, on seeds 0..N-1 (default 1: seed 0); the same seed gives every "
        "implementation the same initial weights, split and data order",
    )
    seeds.add_argument(
        "--seed_list",
        type=int,
        nargs="*",
        default=None,
        metavar="SEED",
        help="explicit seeds instead of --seeds, e.g. --seed_list 3 7 11",
    )
    seeds.add_argument("--seed", type=int, default=None, help="one seed (the same as --seed_list SEED)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished runs already in --output_dir (its results.json, same settings) and "
        "train only the missing or failed ones",
    )
    parser.add_argument(
        "--output_dir",
        default=None,
        help="where models (IMPLEMENTATION/seed_N), loss_curves.png, metrics.png, results.md and "
        "results.json go (default: compare-TASK)",
    )
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="optimizer steps per run (default: "
        + ", ".join(f"{k} {v['max_train_steps']}" for k, v in COMPARE_DEFAULTS.items())
        + ")",
    )
    parser.add_argument(
        "--no_analysis",
        action="store_true",
        help="skip measuring each trained model's attention (the analyze statistics and the paper's measures)",
    )
    mm = parser.add_argument_group("MultiMax runs only (the other implementations are left as they are)")
    mm.add_argument("--multimax_order", type=int, default=None, help="SegLU order")
    mm.add_argument(
        "--multimax_init",
        choices=INIT_METHODS,
        default=None,
        help="initialisation of the MultiMax parameters (default: the task's compare default)",
    )
    mm.add_argument("--multimax_per_head", action="store_true", default=None, help="one parameter set per head")
    mm.add_argument("--multimax_output", action="store_true", default=None, help="MultiMax on the output logits too")
    mm.add_argument(
        "--multimax_learning_rate",
        type=float,
        default=None,
        help="learning rate of the MultiMax parameters (default: the task's compare default)",
    )
    parser.add_argument(
        "--script_args",
        default="",
        help="further flags of the example scripts for every run, quoted, e.g. "
        '"--learning_rate 1e-3 --config_overrides hidden_size=128"',
    )


def run(args: argparse.Namespace) -> int:
    import logging
    import os
    from pathlib import Path

    import datasets

    from ..compare.report import write_report
    from ..compare.runner import MULTIMAX_ONLY, compare, load_average, plan_runs, preflight, resolve_seeds, settings_of
    from ..finetune.tasks import get_task

    logger = logging.getLogger("hf_multimax.compare")
    seeds = resolve_seeds(args.seeds, [args.seed] if args.seed is not None else args.seed_list)
    output_dir = Path(args.output_dir or f"compare-{args.task}")
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output_dir {output_dir} exists and is not a folder")
    script_argv = shlex.split(args.script_args)
    multimax = {name: getattr(args, name) for name in MULTIMAX_ONLY}
    # Every check (implementations, seeds, steps, flags, script arguments) before anything trains.
    settings = settings_of(args.task, args.max_train_steps, multimax, script_argv, not args.no_analysis)
    preflight(get_task(args.task), plan_runs(settings, output_dir, args.implementations, seeds)[0].args)
    datasets.disable_progress_bars()  # keep the terminal to the progress bars and the table
    load = load_average()
    if load is not None and load > (os.cpu_count() or 1):
        logger.warning(
            "the machine is busy (load average %.1f on %d CPUs): time per step will be inflated",
            load,
            os.cpu_count() or 1,
        )
    command_line = "hf-multimax " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    results = compare(
        args.task,
        output_dir,
        args.implementations,
        seeds=seeds,
        max_train_steps=args.max_train_steps,
        multimax_flags=multimax,
        script_argv=script_argv,
        resume=args.resume,
        analysis=not args.no_analysis,
        command_line=command_line,
    )
    tables, files = write_report(output_dir, results)
    print()
    print(tables)
    print()
    print("\n".join(f"{name + ':':<17}{path}" for name, path in files.items()))
    print(
        f"models:          {output_dir}/IMPLEMENTATION/seed_N  ({len(results['runs'])} runs, "
        f"{results['seconds']:.0f} s)"
    )
    return 0 if any(not run.get("error") for run in results["runs"]) else 1
