"""``hf-multimax analyze MODEL_DIR ...``: saved models' attention side by side
(see :func:`hf_multimax.analysis.analyze`)."""

from __future__ import annotations

import argparse

SPARSITY_THRESHOLD, MODE_THRESHOLD = 0.01, 0.1  # the defaults of hf_multimax.analysis.metrics (checked by a test)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dirs",
        nargs="+",
        metavar="MODEL_DIR",
        help="saved models or PEFT adapters (save_pretrained folders), e.g. the OUTPUT_DIR/<implementation>/ "
        "folders of `hf-multimax compare`; two or more are compared side by side",
    )
    parser.add_argument("--output_dir", default="analysis", help="where to write the PNGs, summary.md and summary.json")
    parser.add_argument("--labels", nargs="+", help="a name per model for legends and tables (default: folder names)")
    parser.add_argument(
        "--attn_implementation",
        nargs="+",
        dest="attn_implementations",
        help="attention implementation to load with, one for all models or one per model (default: the "
        "one each folder was trained with; multimax -> multimax_eager and sdpa -> eager to get "
        "the weights)",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="NAME_OR_PATH",
        help="tokenizer for text models saved without one (default: the folder's, else a byte-level BPE "
        "built offline on the embedded data, else random token ids)",
    )
    parser.add_argument(
        "--text_file", help="text inputs: paragraphs separated by blank lines (or lines); default: embedded data"
    )
    parser.add_argument(
        "--image_dir", help="image inputs for vision models (any folder of images); default: scikit-learn's digits"
    )
    parser.add_argument("--num_samples", type=int, default=8, help="number of texts or images to run")
    parser.add_argument("--max_length", type=int, default=64, help="truncate texts to this many tokens")
    parser.add_argument(
        "--sparsity_threshold",
        type=float,
        default=SPARSITY_THRESHOLD,
        help=f"weights below it count as near zero (default {SPARSITY_THRESHOLD})",
    )
    parser.add_argument(
        "--mode_threshold",
        type=float,
        default=MODE_THRESHOLD,
        help=f"weights above it count as modes (default {MODE_THRESHOLD})",
    )


def run(args: argparse.Namespace) -> int:
    from ..analysis.report import analyze, overview

    summary = analyze(
        args.model_dirs,
        args.output_dir,
        labels=args.labels,
        attn_implementations=args.attn_implementations,
        text_file=args.text_file,
        image_dir=args.image_dir,
        num_samples=args.num_samples,
        max_length=args.max_length,
        sparsity_threshold=args.sparsity_threshold,
        mode_threshold=args.mode_threshold,
        tokenizer=args.tokenizer,
    )
    print(overview(summary))
    print(f"\nWrote {', '.join(summary['images'])}, summary.md and summary.json to {args.output_dir}")
    return 0
