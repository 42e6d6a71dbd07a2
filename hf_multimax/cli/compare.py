"""``hf-multimax compare``: the same tiny model trained with each attention implementation (see
:mod:`hf_multimax.compare`)."""

from __future__ import annotations

import argparse
import shlex
import sys

TASK_HELP = ("lm: tiny Llama on CPython's docs (perplexity); translation: tiny T5 on English→German UI strings (BLEU); "
             "vit: tiny ViT on 8×8 digits (accuracy)")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..compare.runner import COMPARE_DEFAULTS
    from ..config import INIT_METHODS

    parser.add_argument("--task", choices=sorted(COMPARE_DEFAULTS), default="lm", help=TASK_HELP)
    parser.add_argument("--implementations", nargs="*", default=["sdpa", "multimax"], metavar="NAME",
                        help="attention implementations to train, the first being the baseline (default: sdpa "
                             "multimax; also eager, multimax_eager, sparsemax, entmax15, entmax_alpha, evsoftmax or "
                             "any registered name)")
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
                             "\"--learning_rate 1e-3 --config_overrides hidden_size=128\"")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import logging
    import os
    import time
    from pathlib import Path

    import datasets

    from ..compare.report import load_average, write_report
    from ..compare.runner import check_implementations, compare
    from ..config import FLAG_DEFAULTS

    logger = logging.getLogger("hf_multimax.compare")
    check_implementations(args.implementations)
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"--max_train_steps must be >= 1, got {args.max_train_steps}")
    output_dir = Path(args.output_dir or f"compare-{args.task}")
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output_dir {output_dir} exists and is not a folder")
    script_argv = shlex.split(args.script_args)
    datasets.disable_progress_bars()  # keep the terminal to the training bars and the table
    load_before = load_average()
    if load_before is not None and load_before > (os.cpu_count() or 1):
        logger.warning("the machine is busy (load average %.1f on %d CPUs): time per step will be inflated",
                       load_before, os.cpu_count() or 1)  # fmt: skip
    started = time.perf_counter()
    results = compare(
        args.task, output_dir, args.implementations, seed=args.seed, max_train_steps=args.max_train_steps,
        multimax_flags={name: getattr(args, name) for name in FLAG_DEFAULTS}, script_argv=script_argv,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    command_line = "hf-multimax " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    table, plot = write_report(args.task, output_dir, results, seed=args.seed, seconds=elapsed, load_before=load_before,
                               command_line=command_line)  # fmt: skip
    print()
    print(table)
    print(f"\nloss curves: {plot}\nresults:     {output_dir / 'results.md'}, {output_dir / 'results.json'}")
    print(f"models:      {', '.join(str(output_dir / name) for name in results)}  ({elapsed:.0f} s in all)")
    return 0
