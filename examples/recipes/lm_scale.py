#!/usr/bin/env python
r"""Does MultiMax help at scale? The paper's 6-layer decoder trained from scratch with SoftMax (``sdpa``) and with
MultiMax on 10^8 tokens of real text per run, paired by seed, in one GPU command of at most 9 minutes (issue 26).

    python examples/recipes/lm_scale.py --output_dir out/lm-scale --seeds 3 --time_budget 480
    python examples/recipes/lm_scale.py --output_dir out/lm-scale --seeds 6 --resume   # adds seeds 3-5
    python examples/recipes/lm_scale.py --report_only --output_dir out/lm-scale         # tables and figures again
    python examples/recipes/lm_scale.py --dry-run --output_dir /tmp/lm-scale-dry        # tiny, on a CPU, seconds

What it trains (``docs/lm-scale.md`` says why):

* **Model**: the shape of the ``wikitext103-lm`` recipe (``recipes.py``, from fairseq's ``transformer_lm`` that the
  MultiMax authors trained on WikiText-103): a GPT-2 decoder of 6 layers, 512 wide, 8 heads, FFN 2048, ReLU, tied
  input/output embeddings, context 512; no dropout (one pass and a half over the data leaves little to regularise,
  and the paired runs then differ only by their attention). Both implementations start from the same weights: the
  model is built from one seed with eager SoftMax and switched (MultiMax's σ parameters come on top).
* **Optimiser**: fairseq's settings scaled to the step budget: AdamW, peak learning rate 5e-4, betas (0.9, 0.98),
  weight decay 0.01 (none on biases, norms and σ), warm-up over 8% of the steps (fairseq: 4000 of 50,000), then
  cosine decay (the recipe's stand-in for fairseq's inverse square root); gradients clipped at 1.0 (fairseq: none;
  the CPU experiments that chose MultiMax's learning rate clipped at 1.0). Batch 64 blocks of 512 tokens = 32,768
  tokens per update, fairseq's 2048 tokens x 16 accumulated updates; ``--tokens 1e8`` is 3052 updates.
* **MultiMax**: σ of order 2 in every attention layer, the paper's trunc-normal initialisation (std 0.02) and a
  learning rate of 0.03 for σ (``hf_multimax.compare.COMPARE_DEFAULTS``, chosen by the CPU experiments); not on the
  output logits unless ``--multimax_output`` (the question is the attention; upstream's fairseq decoder also puts σ
  on the logits).
* **Data**: the Python source of this machine's standard library and installed packages
  (:mod:`hf_multimax.data.python_corpus`: a documented list, versions, licences and a hash recorded); 2% of the
  bytes held out as whole directories; a 16,384-token byte-level BPE trained on up to 64 MB of the training files.
  The training tokens live on the device; each step takes 64 random contiguous blocks, drawn by a generator seeded
  with the run's seed (same seed, same blocks for every implementation). Held-out loss and perplexity (per BPE
  token) on up to 2^20 held-out tokens at step 0 and at ten evenly spaced token counts; the attention statistics of
  both models (``hf-multimax analyze``'s and the paper's M and S) on 4 held-out blocks at the end.
* **Precision**: bf16 autocast on CUDA (float32 master weights, loss in float32); float32 on a CPU.

Estimate for one H200 (FLOPs per training token = 6 x matmul parameters + attention): matmul parameters 18.9M in the
layers + 8.4M in the tied head (16,384 x 512) = 27.3M, so 6N = 164 MFLOP; causal attention scores 3 x 6 layers x 2 x
2 x 512/2 x 512 = 9.4 MFLOP; total ~173 MFLOP per token, 1.7e16 FLOPs per 10^8 tokens, 5.7 TFLOP per step. At 30-40%
of the H200's ~790 TFLOP/s bf16 dense (237-316 TFLOP/s) that is 18-24 ms per step and 55-73 s per run; the ten
evaluations of 2^20 tokens add ~4%; MultiMax's σ adds ~15 FLOPs per score (negligible) and whatever its kernel costs
over FlashAttention on the attention's small share. Building the corpus (~250 MB read, a tokenizer trained on 64 MB,
everything encoded on 16 cores) takes about a minute. So a seed pair takes ~2-2.5 minutes at that utilisation and
``--time_budget 480`` fits two (30%) or three (40%) pairs in a 9-minute command; a 35M-parameter model at 512 wide
may well run nearer 20-25% (kernel launches, the float32 cross-entropy over 16,384 logits: ~90 s per run), in which
case the budget stops after one or two pairs and ``--resume`` adds the rest in a later window.

Outputs in ``--output_dir`` (7 files): ``results.json`` (``hf-multimax compare``'s contract: ``runs``, ``summary``,
``versus_baseline``, ``settings``, ``machine``, ... plus ``corpus`` and ``tokenizer``; written after every run),
``results.md``, ``loss_curves.png``, ``metrics.png``, ``eval_curves.png``, ``corpus.json`` (every file with its hash
and split) and ``tokenizer.json`` (reused by ``--resume``). The last thing printed is a short table.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
EXPERIMENT = "lm_scale"
TOKENIZER_FILE = "tokenizer.json"
CORPUS_FILE = "corpus.json"
#: How often (in steps) the losses are fetched from the device and checked for a non-finite value.
CHECK_EVERY = 25

logger = logging.getLogger("lm_scale")


# -- the paper's setting ----------------------------------------------------------------------------------------------


def paper_setting() -> dict[str, Any]:
    """The ``wikitext103-lm`` recipe of ``recipes.py`` (fairseq ``transformer_lm`` on WikiText-103) as numbers: its
    architecture, learning rate, weight decay, warm-up share, block size and blocks per update."""
    spec = importlib.util.spec_from_file_location("lm_scale_recipes", HERE / "recipes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look the module up while it runs
    spec.loader.exec_module(module)
    recipe = module.RECIPES["wikitext103-lm"]
    flags = dict(zip(recipe.args[::2], recipe.args[1::2], strict=True))
    shape = dict(item.split("=") for item in flags["--config_overrides"].split(","))
    return {
        "n_layer": int(shape["n_layer"]),
        "n_embd": int(shape["n_embd"]),
        "n_head": int(shape["n_head"]),
        "n_inner": int(shape["n_inner"]),
        "activation_function": shape["activation_function"],
        "context": int(flags["--block_size"]),
        "batch_size": int(flags["--per_device_train_batch_size"])
        * recipe.num_processes
        * int(flags["--gradient_accumulation_steps"]),
        "learning_rate": float(flags["--learning_rate"]),
        "weight_decay": float(flags["--weight_decay"]),
        "warmup_fraction": int(flags["--num_warmup_steps"]) / int(flags["--max_train_steps"]),
    }


PAPER = paper_setting()
#: Every size of ``--dry-run`` (flags given explicitly still win): a 2-layer model, 64-token blocks, 200 steps on
#: 1.5 MB of this machine's standard library, on the CPU in seconds.
DRY_RUN: dict[str, Any] = {
    "sources": ["stdlib"],
    "max_corpus_mb": 1.5,
    "tokenizer_sample_mb": 1.5,
    "vocab_size": 512,
    "min_train_tokens": 100_000,
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 4,
    "n_inner": 256,
    "context": 64,
    "batch_size": 8,
    "tokens": 200 * 8 * 64,
    "learning_rate": 3e-3,
    "evals": 4,
    "eval_tokens": 8192,
    "analysis_blocks": 2,
}


# -- hf_multimax.compare on the GPU image --------------------------------------------------------------------------


# -- arguments --------------------------------------------------------------------------------------------------------


def _tokens(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens such as 1e8, got {text!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, got {text!r}")
    return int(value)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, unless it is ``None`` or a switch's ``False``/``True`` (its help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from hf_multimax.config import FLAG_DEFAULTS
    from hf_multimax.data.python_corpus import PYTHON_SOURCES

    from_scratch = _compare_defaults()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    run = parser.add_argument_group("runs")
    run.add_argument("--output_dir", default="lm-scale", help="where results.json and the other outputs go")
    run.add_argument(
        "--implementations",
        nargs="+",
        default=["sdpa", "multimax"],
        help="attention implementations; the first is the baseline",
    )
    seeds = run.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seeds", type=int, default=None, help="train seeds 0 .. N-1 (without this or --seed_list: seed 0)"
    )
    seeds.add_argument("--seed_list", type=int, nargs="+", default=None, help="train these seeds")
    run.add_argument(
        "--time_budget",
        type=float,
        default=None,
        help="seconds from the start of the command: a seed is started only when its runs are expected to end "
        "within it (from the runs already timed), and a run projected past it is stopped and recorded as failed",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="keep the successful runs of OUTPUT_DIR/results.json (same settings, refused otherwise) and its "
        "tokenizer.json; train the missing seeds",
    )
    run.add_argument(
        "--report_only", action="store_true", help="rewrite results.md and the figures from results.json; no training"
    )
    run.add_argument("--dry-run", dest="dry_run", action="store_true", help=f"tiny sizes for a CPU check: {DRY_RUN}")
    run.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cpu, ...")
    run.add_argument(
        "--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 autocast on CUDA, else fp32"
    )
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--no_analysis", dest="analysis", action="store_false", help="skip the attention statistics")

    model = parser.add_argument_group("model (default: the wikitext103-lm recipe's shape)")
    shape_help = {
        "n_layer": "decoder layers",
        "n_embd": "width",
        "n_head": "attention heads",
        "n_inner": "feed-forward width",
        "context": "tokens per block",
    }
    for name, text in shape_help.items():
        model.add_argument(f"--{name}", type=int, default=PAPER[name], help=text)
    model.add_argument("--dropout", type=float, default=0.0, help="residual, embedding and attention dropout")

    train = parser.add_argument_group("training (default: fairseq transformer_lm's, scaled to the steps)")
    train.add_argument("--tokens", type=_tokens, default=10**8, help="training tokens per run (rounded up to steps)")
    train.add_argument("--batch_size", type=int, default=PAPER["batch_size"], help="blocks per optimizer step")
    train.add_argument("--learning_rate", type=float, default=PAPER["learning_rate"], help="peak learning rate")
    train.add_argument("--adam_betas", type=float, nargs=2, default=[0.9, 0.98], help="AdamW betas (fairseq's)")
    train.add_argument(
        "--weight_decay", type=float, default=PAPER["weight_decay"], help="AdamW's (not on biases, norms or σ)"
    )
    train.add_argument(
        "--warmup_fraction", type=float, default=PAPER["warmup_fraction"], help="share of the steps warming up"
    )
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm (0: no clipping)")
    train.add_argument("--evals", type=int, default=10, help="held-out evaluations at evenly spaced token counts")
    train.add_argument("--eval_tokens", type=_tokens, default=2**20, help="held-out tokens per evaluation (at most)")
    train.add_argument("--analysis_blocks", type=int, default=4, help="held-out blocks the attention is analysed on")

    mm = parser.add_argument_group("MultiMax runs only")
    mm.add_argument(
        "--multimax_init",
        choices=("identity", "paper"),
        default=from_scratch["multimax_init"],
        help="σ's initial slopes: the paper's trunc-normal (std 0.02) or 0 (MultiMax starts as SoftMax)",
    )
    mm.add_argument(
        "--multimax_learning_rate", type=float, default=from_scratch["multimax_learning_rate"], help="σ's peak rate"
    )
    mm.add_argument("--multimax_order", type=int, default=FLAG_DEFAULTS["multimax_order"], help="σ's order N")
    mm.add_argument("--multimax_per_head", action="store_true", help="one σ per head instead of per layer")
    mm.add_argument("--multimax_output", action="store_true", help="σ on the output logits too (as upstream)")

    data = parser.add_argument_group("data")
    data.add_argument(
        "--sources",
        nargs="+",
        default=[source.name for source in PYTHON_SOURCES],
        help="the corpus's sources, of hf_multimax.data.python_corpus.PYTHON_SOURCES",
    )
    data.add_argument("--eval_fraction", type=float, default=0.02, help="share of bytes held out (whole directories)")
    data.add_argument("--max_corpus_mb", type=float, default=None, help="read at most this many MB (default: all)")
    data.add_argument("--tokenizer_sample_mb", type=float, default=64.0, help="MB of training files the BPE learns on")
    data.add_argument("--vocab_size", type=int, default=16384, help="byte-level BPE vocabulary")
    data.add_argument(
        "--min_train_tokens",
        type=_tokens,
        default=25 * 10**6,
        help="stop with an error when the sources found give fewer training tokens",
    )
    return parser


def _compare_defaults() -> dict[str, Any]:
    """The MultiMax-only settings that ``hf-multimax compare`` chose from scratch for the language model."""
    from hf_multimax.compare.runner import COMPARE_DEFAULTS

    return COMPARE_DEFAULTS["lm"]["multimax"]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The arguments, with :data:`DRY_RUN`'s sizes under ``--dry-run``; ``ValueError`` naming the flag for a value
    out of range."""
    parser = build_parser()
    if parser.parse_known_args(argv)[0].dry_run:
        parser.set_defaults(**DRY_RUN)
    args = parser.parse_args(argv)
    positive = (
        "n_layer",
        "n_embd",
        "n_head",
        "n_inner",
        "context",
        "tokens",
        "batch_size",
        "evals",
        "eval_tokens",
        "vocab_size",
        "multimax_order",
    )
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("analysis_blocks", "min_train_tokens", "weight_decay", "max_grad_norm", "dropout"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.n_embd % args.n_head:
        raise ValueError(f"--n_embd {args.n_embd} must be a multiple of --n_head {args.n_head}")
    if not 0 <= args.warmup_fraction < 1:
        raise ValueError(f"--warmup_fraction must be in [0, 1), got {args.warmup_fraction}")
    if not 0 < args.eval_fraction <= 0.5:
        raise ValueError(f"--eval_fraction must be in (0, 0.5], got {args.eval_fraction}")
    if not args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    for name in ("learning_rate", "multimax_learning_rate", "tokenizer_sample_mb"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.max_corpus_mb is not None and not args.max_corpus_mb > 0:
        raise ValueError(f"--max_corpus_mb must be > 0, got {args.max_corpus_mb}")
    if args.time_budget is not None and not args.time_budget > 0:
        raise ValueError(f"--time_budget must be > 0 seconds, got {args.time_budget}")
    if not 256 + 4 <= args.vocab_size <= 2**31 - 1:
        raise ValueError(f"--vocab_size must hold the 256 bytes and 4 special tokens (>= 260), got {args.vocab_size}")
    return args


# -- settings and resuming --------------------------------------------------------------------------------------------


def resolve_device(args: argparse.Namespace) -> tuple[torch.device, bool]:
    """The device and whether to train under bf16 autocast."""
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {args.device!r} is not a device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r}: CUDA is not available here")
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    return device, bf16


def run_settings(args: argparse.Namespace, bf16: bool) -> dict[str, Any]:
    """What every run shares, as far as the arguments tell (``data`` gets the corpus's and tokenizer's hashes once
    they are built): ``results.json``'s ``settings``, which ``--resume`` requires to be the same."""
    steps = math.ceil(args.tokens / (args.batch_size * args.context))
    evals = sorted({0, *(round(k * steps / args.evals) for k in range(1, args.evals + 1))})
    return {
        "task": "lm",
        "experiment": EXPERIMENT,
        "max_train_steps": steps,
        "tokens_per_run": steps * args.batch_size * args.context,
        "model": {
            "model_type": "gpt2",
            "n_layer": args.n_layer,
            "n_embd": args.n_embd,
            "n_head": args.n_head,
            "n_inner": args.n_inner,
            "activation_function": PAPER["activation_function"],
            "context": args.context,
            "dropout": args.dropout,
            "tie_word_embeddings": True,
        },
        "training": {
            "batch_size": args.batch_size,
            "tokens_per_step": args.batch_size * args.context,
            "optimizer": "AdamW",
            "learning_rate": args.learning_rate,
            "adam_betas": list(args.adam_betas),
            "weight_decay": args.weight_decay,
            "schedule": "cosine",
            "warmup_steps": round(args.warmup_fraction * steps),
            "max_grad_norm": args.max_grad_norm,
            "precision": "bf16 autocast" if bf16 else "fp32",
            "compile": args.compile,
            "eval_steps": evals,
            "eval_tokens": args.eval_tokens,
            "analysis_blocks": args.analysis_blocks if args.analysis else 0,
        },
        "multimax": {
            "multimax_init": args.multimax_init,
            "multimax_learning_rate": args.multimax_learning_rate,
            "multimax_order": args.multimax_order,
            "multimax_per_head": args.multimax_per_head,
            "multimax_output": args.multimax_output,
        },
        "data": {
            "sources": list(args.sources),
            "eval_fraction": args.eval_fraction,
            "max_corpus_mb": args.max_corpus_mb,
            "tokenizer_sample_mb": args.tokenizer_sample_mb,
            "vocab_size": args.vocab_size,
        },
        "analysis": args.analysis,
    }


def _flat(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def check_resumable(
    previous: Mapping[str, Any], settings: Mapping[str, Any], path: Path, partial: bool = False
) -> None:
    """``ValueError`` naming ``--resume`` when ``previous`` (a ``results.json``) is not this experiment's or was made
    with settings other than ``settings``, compared key by key so that the message names each difference;
    ``partial``: only the keys ``settings`` has (the arguments' part, checked before the data is built)."""
    from hf_multimax.compare.runner import jsonable

    if previous.get("experiment") != EXPERIMENT:
        raise ValueError(f"--resume: {path} is not a results file of {EXPERIMENT} (use another --output_dir)")
    before, now = _flat(previous.get("settings") or {}), _flat(jsonable(settings))
    changed = sorted(
        key for key in (now.keys() if partial else before.keys() | now.keys()) if before.get(key) != now.get(key)
    )
    if changed:
        details = "; ".join(f"{key}: {before.get(key)!r} then, {now.get(key)!r} now" for key in changed)
        raise ValueError(
            f"--resume: the runs in {path} were made with other settings ({details}); use the same settings "
            "or another --output_dir"
        )


# -- data -------------------------------------------------------------------------------------------------------------


def build_data(args: argparse.Namespace, output_dir: Path, reuse_tokenizer: bool) -> dict[str, Any]:
    """The corpus (written to ``corpus.json``), its tokenizer (trained on the training files, or ``tokenizer.json``
    of ``output_dir`` when ``reuse_tokenizer``) and both splits as token arrays.

    Raises:
        ValueError: naming ``--min_train_tokens`` (and the sources not found) when the corpus is too small.
    """
    from tokenizers import Tokenizer

    from hf_multimax.data import SPECIAL_TOKENS, build_tokenizer
    from hf_multimax.data.python_corpus import build_python_corpus, encode_texts, sources_named

    started = time.perf_counter()
    max_bytes = None if args.max_corpus_mb is None else int(args.max_corpus_mb * 1e6)
    corpus = build_python_corpus(sources_named(args.sources), args.eval_fraction, max_bytes)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CORPUS_FILE).write_text(json.dumps(corpus.manifest(), indent=0) + "\n")
    path = output_dir / TOKENIZER_FILE
    trained_on = None
    if reuse_tokenizer and path.is_file():
        tokenizer = Tokenizer.from_file(str(path))
        logger.info("tokenizer: reusing %s", path)
    else:
        sample = corpus.sample("train", args.tokenizer_sample_mb * 1e6)
        trained_on = sum(len(text.encode("utf-8")) for text in sample)
        tokenizer = build_tokenizer(sample, vocab_size=args.vocab_size).backend_tokenizer
        tokenizer.save(str(path))
        logger.info(
            "tokenizer: %d tokens trained on %d files (%.1f MB)",
            tokenizer.get_vocab_size(),
            len(sample),
            trained_on / 1e6,
        )
    train_ids = encode_texts(tokenizer, corpus.train_texts, desc="tokenizing the training files")
    eval_ids = encode_texts(tokenizer, corpus.eval_texts, desc="tokenizing the held-out files")
    found = [source["name"] for source in corpus.sources if source["found"]]
    if len(train_ids) < args.min_train_tokens:
        missing = f"; not installed here: {', '.join(corpus.missing)}" if corpus.missing else ""
        raise ValueError(
            f"corpus shortfall: {len(train_ids):,} training tokens from {', '.join(found) or 'no source'}, "
            f"fewer than --min_train_tokens {args.min_train_tokens:,}{missing}"
        )
    if corpus.missing:
        logger.warning(
            "corpus: %s not installed here; training on %s (%s training tokens, at least --min_train_tokens %s)",
            ", ".join(corpus.missing),
            ", ".join(found),
            f"{len(train_ids):,}",
            f"{args.min_train_tokens:,}",
        )
    if len(eval_ids) < args.context + 1:
        raise ValueError(
            f"the held-out files hold {len(eval_ids)} tokens, fewer than one block of --context {args.context} + 1; "
            "raise --eval_fraction"
        )
    ids = {name: tokenizer.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
    summary = corpus.summary()
    summary["tokens"] = {"train": int(len(train_ids)), "eval": int(len(eval_ids))}
    summary["seconds"] = time.perf_counter() - started
    return {
        "corpus": summary,
        "tokenizer": {
            "sha256": _sha256(path),
            "vocab_size": tokenizer.get_vocab_size(),
            "special_tokens": ids,
            "trained_on_bytes": trained_on,
        },
        "train": train_ids,
        "eval": eval_ids,
    }


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def eval_blocks(eval_ids: np.ndarray, context: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping blocks of ``context + 1`` tokens spread evenly over the held-out tokens, at most
    ``max_tokens // context`` of them (at least one): the same blocks for every run."""
    count = max(1, min(max_tokens // context, (len(eval_ids) - 1) // context))
    stride = (len(eval_ids) - 1) // count
    starts = np.arange(count) * stride
    return torch.from_numpy(np.stack([eval_ids[s : s + context + 1].astype(np.int64) for s in starts]))


# -- model and training -----------------------------------------------------------------------------------------------


def model_config(settings: Mapping[str, Any], tokenizer: Mapping[str, Any]):
    """The GPT-2 config of ``settings["model"]`` for the tokenizer's vocabulary and special tokens."""
    from transformers import GPT2Config

    shape, special = settings["model"], tokenizer["special_tokens"]
    return GPT2Config(
        vocab_size=tokenizer["vocab_size"],
        n_positions=shape["context"],
        n_embd=shape["n_embd"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_inner=shape["n_inner"],
        activation_function=shape["activation_function"],
        resid_pdrop=shape["dropout"],
        embd_pdrop=shape["dropout"],
        attn_pdrop=shape["dropout"],
        tie_word_embeddings=shape["tie_word_embeddings"],
        bos_token_id=special["bos_token"],
        eos_token_id=special["eos_token"],
        pad_token_id=special["pad_token"],
    )


def build_model(config, implementation: str, seed: int, multimax: Mapping[str, Any] | None = None):
    """The model for one run: built from ``seed`` with eager SoftMax (or ``implementation`` itself when it has no
    parameters) and then switched, so every implementation starts from the same weights; ``multimax`` (the
    ``multimax_*`` flags) goes on the config of MultiMax runs only."""
    from transformers import GPT2LMHeadModel

    from hf_multimax import registry
    from hf_multimax.compare.runner import uses_multimax

    config = copy.deepcopy(config)  # from_config writes the implementation onto the config object it is given
    if uses_multimax(implementation):
        for name, value in (multimax or {}).items():
            if name != "multimax_learning_rate":
                setattr(config, name, value)
    parametric = registry.parametric(implementation) is not None
    torch.manual_seed(seed)
    model = GPT2LMHeadModel._from_config(config, attn_implementation="eager" if parametric else implementation)
    if parametric:
        model.set_attn_implementation(implementation)
    return model


class _Warnings(logging.Handler):
    """The distinct warnings hf-multimax logs during a run (e.g. a kernel falling back), to keep with its record."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.messages and len(self.messages) < 20:
            self.messages.append(message)


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int, bf16: bool) -> float:
    """Mean cross-entropy (nats per token) of ``model`` over every next-token prediction of ``blocks``."""
    import torch.nn.functional as F

    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=blocks.device)
    for start in range(0, len(blocks), batch_size):
        chunk = blocks[start : start + batch_size]
        with torch.autocast(blocks.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=chunk[:, :-1], use_cache=False).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum").double()
    model.train()
    return float(total / (blocks.shape[0] * (blocks.shape[1] - 1)))


def train_run(
    implementation: str,
    seed: int,
    settings: Mapping[str, Any],
    data: Mapping[str, Any],
    device: torch.device,
    bf16: bool,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Train, evaluate and analyse one run; return its ``results.json`` record. A non-finite loss stops the run and
    the record says at which step (``error``, ``failed_step``); so does a run projected to end after ``deadline``
    (a ``time.perf_counter()`` value), and an exception (out of memory, a kernel error) is recorded, not raised."""
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from hf_multimax import clip_grad_norm_, multimax_parameter_groups
    from hf_multimax.compare.runner import training_failure, uses_multimax
    from hf_multimax.kernels import record_backends

    training, multimax = settings["training"], settings["multimax"]
    steps, batch, context = settings["max_train_steps"], training["batch_size"], settings["model"]["context"]
    tokens_per_step = batch * context
    started = time.perf_counter()
    model = build_model(model_config(settings, data["tokenizer"]), implementation, seed, multimax).to(device)
    groups = multimax_parameter_groups(
        model,
        weight_decay=training["weight_decay"],
        multimax_lr=multimax["multimax_learning_rate"] if uses_multimax(implementation) else None,
    )
    for group in groups:
        group.pop("name")
    optimizer = torch.optim.AdamW(
        groups, lr=training["learning_rate"], betas=tuple(training["adam_betas"]), fused=device.type == "cuda"
    )
    scheduler = get_scheduler("cosine", optimizer, training["warmup_steps"], steps)
    step_model = torch.compile(model) if training["compile"] else model

    train_ids, blocks = data["train_device"], data["eval_device"]
    rng = np.random.default_rng(seed)  # the data order: a function of the seed only
    offsets = torch.from_numpy(rng.integers(0, len(train_ids) - context, size=(steps, batch))).to(device)
    window = torch.arange(context + 1, device=device)
    losses = torch.full((steps,), math.nan, device=device)
    eval_steps = set(training["eval_steps"])
    evals: list[list[float]] = []
    timer = {"eval": 0.0}

    def run_eval(step: int) -> None:
        _sync(device)
        began = time.perf_counter()
        evals.append([step * tokens_per_step, evaluate(step_model, blocks, batch, bf16)])
        timer["eval"] += time.perf_counter() - began

    def projected_end(step: int, since: tuple[int, float, float]) -> float:
        """When the run would end at the pace of the steps since the last check (evaluations apart)."""
        now = time.perf_counter()
        pace = (now - since[1] - (timer["eval"] - since[2])) / (step - since[0])
        evals_left = sum(s > step for s in eval_steps) * timer["eval"] / len(evals)
        return now + pace * (steps - step) + evals_left

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warnings = _Warnings()
    logging.getLogger("hf_multimax").addHandler(warnings)
    progress = tqdm(total=steps, desc=f"{implementation} seed {seed}", unit="step", mininterval=5)
    loop_started = time.perf_counter()
    step, checked, failure, failed_step = 0, 0, None, None
    steady: tuple[int, float, float] | None = None  # where the steady-state pace is measured from
    # every MultiMax attention forward and backward: the backend that computed it, and why, if it fell back
    with record_backends() as calls:
        try:
            run_eval(0)
            last = (0, time.perf_counter(), timer["eval"])
            while step < steps:
                chunk = train_ids[offsets[step, :, None] + window].long()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = step_model(input_ids=chunk[:, :-1], use_cache=False).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten())
                loss.backward()
                if training["max_grad_norm"] > 0:
                    clip_grad_norm_(model, training["max_grad_norm"])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses[step] = loss.detach()
                step += 1
                if step % CHECK_EVERY and step not in eval_steps and step < steps:
                    continue
                fetched = losses[checked:step].tolist()  # the only synchronisation between checks
                bad = next((i for i, value in enumerate(fetched) if not math.isfinite(value)), None)
                if bad is not None:
                    failed_step = checked + bad + 1
                    failure = f"non-finite training loss ({fetched[bad]}) at step {failed_step}"
                    break
                checked = step
                progress.update(step - progress.n)
                progress.set_postfix_str(f"loss {fetched[-1]:.3f}")
                if step in eval_steps:
                    run_eval(step)
                if deadline is not None and step >= 2 * CHECK_EVERY and step < steps:
                    end = projected_end(step, last)
                    if end > deadline:
                        failed_step = step
                        failure = (
                            f"stopped at step {step} of {steps}: projected to end {end - deadline:.0f} s past "
                            "--time_budget"
                        )
                        break
                last = (step, time.perf_counter(), timer["eval"])
                if steady is None and step >= max(CHECK_EVERY, steps // 10):
                    steady = last
        except Exception as error:  # one run failing must not stop the others
            logger.error("%s seed %d failed: %s: %s", implementation, seed, type(error).__name__, error, exc_info=True)
            failure = f"{type(error).__name__}: {error}"
        finally:
            progress.close()
            logging.getLogger("hf_multimax").removeHandler(warnings)
    _sync(device)
    ended = time.perf_counter()
    train_seconds = ended - loop_started - timer["eval"]
    values = losses[: failed_step or step].tolist()
    tail = values[-max(1, len(values) // 10) :]
    metrics: dict[str, Any] = {}
    if failure is None:
        metrics["eval_loss"] = evals[-1][1]
        metrics["perplexity"] = math.exp(min(evals[-1][1], 700.0))
    if step:
        metrics["tokens_per_second"] = step * tokens_per_step / train_seconds
    if failure is None and steady is not None and step > steady[0]:
        seconds = ended - steady[1] - (timer["eval"] - steady[2])
        metrics["tokens_per_second_steady"] = (step - steady[0]) * tokens_per_step / seconds
    record: dict[str, Any] = {
        "implementation": implementation,
        "seed": seed,
        "train_loss": sum(tail) / len(tail) if failure is None else math.nan,
        "metrics": metrics,
        "time_per_step": train_seconds / step if step else math.nan,
        "steps": step,
        "tokens": step * tokens_per_step,
        "seconds": 0.0,
        "output_dir": None,
        "losses": [[index + 1, value] for index, value in enumerate(values)],
        "evals": evals,
        "eval_seconds": timer["eval"],
    }
    if device.type == "cuda":
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if calls:
        counts: dict[str, int] = {}
        for call in calls:
            counts[f"{call.op}:{call.backend}"] = counts.get(f"{call.op}:{call.backend}", 0) + 1
        record["attention_backends"] = counts
        fallbacks = sorted({call.fallback for call in calls if call.fallback})
        if fallbacks:
            record["attention_fallbacks"] = fallbacks
    if warnings.messages:
        record["warnings"] = warnings.messages
    failure = failure or training_failure(record)
    if failure is not None:
        record["error"] = failure
        if failed_step is not None:
            record["failed_step"] = failed_step
        logger.error("%s seed %d failed: %s", implementation, seed, failure)
    else:
        record["modulators"] = _modulators(model)
        if training["analysis_blocks"]:
            try:
                record["metrics"].update(attention_statistics(model, blocks[: training["analysis_blocks"], :-1]))
            except Exception as error:  # the run itself is fine: keep it, say why its attention is not measured
                logger.warning("could not analyse the attention of %s seed %d: %s", implementation, seed, error)
                record["analysis_error"] = f"{type(error).__name__}: {error}"
    record["seconds"] = time.perf_counter() - started
    return record


def expected_seconds(timed: Mapping[str, Sequence[float]], implementations: Sequence[str]) -> float:
    """How long runs of ``implementations`` are expected to take: each one's mean time so far, the slowest
    implementation's mean for one not timed yet, 0 before any run was timed."""
    means = {name: sum(times) / len(times) for name, times in timed.items() if times}
    if not means:
        return 0.0
    return sum(means.get(name, max(means.values())) for name in implementations)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _modulators(model) -> dict[str, dict[str, list]]:
    from hf_multimax.analysis.collect import learned_modulators

    return learned_modulators(model)


def attention_statistics(model, input_ids: torch.Tensor) -> dict[str, float]:
    """The attention of ``model`` on held-out blocks as ``hf-multimax compare`` records it: ``analyze``'s statistics
    (``attention_<name>``) and the paper's M and S, averaged over layers."""
    from hf_multimax.analysis import analyze_model
    from hf_multimax.compare.runner import attention_metric_name

    overall = analyze_model(model, {"input_ids": input_ids}, kind="text").overall
    return {attention_metric_name(key): value for key, value in overall.items()}


# -- the whole experiment ---------------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, Any]:
    """``compare``'s machine description and, on CUDA, the GPU, CUDA, Triton and the MultiMax kernel backend."""
    import importlib.metadata

    from hf_multimax.compare.runner import load_average, machine_description
    from hf_multimax.kernels import select_backend

    described = machine_description()
    described["load_average"] = {"before": load_average(), "after": None}
    described["device"] = str(device)
    for package in ("triton", "tokenizers"):
        try:
            described[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            described[package] = None
    if device.type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
        described["cuda"] = torch.version.cuda
        described["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    query = torch.zeros(1, 1, 1, 64, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    described["multimax_backend"] = select_backend(query, 2, 0.0)
    return described


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    if args.report_only:
        from hf_multimax.compare.runner import read_results

        results = read_results(output_dir)
        if results is None:
            raise FileNotFoundError(f"--report_only: no results.json in {output_dir}")
        write_outputs(output_dir, results)
        print(short_table(results))
        return 0
    started = time.perf_counter()
    deadline = None if args.time_budget is None else started + args.time_budget

    import hf_multimax  # noqa: F401 (registers the attention implementations)
    from hf_multimax.compare.runner import (
        build_results,
        check_implementations,
        load_average,
        read_results,
        resolve_seeds,
        write_results,
    )

    implementations = check_implementations(args.implementations)
    seeds = resolve_seeds(args.seeds, args.seed_list)
    device, bf16 = resolve_device(args)
    settings = run_settings(args, bf16)
    previous = read_results(output_dir) if args.resume else None
    if previous is not None:  # what the arguments decide is checked before the corpus is built
        check_resumable(previous, settings, output_dir / "results.json", partial=True)
    elif not args.resume and (output_dir / "results.json").is_file():
        logger.warning("%s already holds results; training afresh (--resume continues them instead)", output_dir)

    data = build_data(args, output_dir, reuse_tokenizer=previous is not None)
    settings["data"].update(
        corpus_sha256=data["corpus"]["sha256"],
        tokenizer_sha256=data["tokenizer"]["sha256"],
        train_tokens=data["corpus"]["tokens"]["train"],
    )
    if previous is not None:
        check_resumable(previous, settings, output_dir / "results.json")
        if data["tokenizer"]["trained_on_bytes"] is None:  # reused: trained in an earlier command
            data["tokenizer"]["trained_on_bytes"] = (previous.get("tokenizer") or {}).get("trained_on_bytes")
    data["train_device"] = torch.from_numpy(data["train"].astype(np.int32)).to(device)
    data["eval_device"] = eval_blocks(data["eval"], args.context, args.eval_tokens).to(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    kept = [run for run in (previous or {}).get("runs") or () if not run.get("error")]
    done = {(run["implementation"], run["seed"]) for run in kept}
    all_seeds = sorted({*seeds, *(run["seed"] for run in kept)})
    state: dict[str, Any] = {"settings": settings, "implementations": implementations, "seeds": all_seeds, "runs": kept}
    described = machine(device)
    order = {(impl, seed): i for i, (seed, impl) in enumerate((s, m) for s in all_seeds for m in implementations)}
    not_run: list[int] = []

    def results() -> dict[str, Any]:
        state["runs"].sort(key=lambda run: order.get((run["implementation"], run["seed"]), len(order)))
        out = build_results(
            state,
            seconds=time.perf_counter() - started,
            machine=described,
            command_line=shlex.join(["python", "examples/recipes/lm_scale.py", *argv]),
        )
        out.update(experiment=EXPERIMENT, corpus=data["corpus"], tokenizer=data["tokenizer"], not_run=not_run)
        return out

    timed: dict[str, list[float]] = {}
    for index, seed in enumerate(seeds):
        remaining = [impl for impl in implementations if (impl, seed) not in done]
        if not remaining:
            continue
        expected = expected_seconds(timed, remaining)
        if deadline is not None and time.perf_counter() + expected > deadline:
            not_run.extend(s for s in seeds[index:] if any((impl, s) not in done for impl in implementations))
            logger.warning(
                "--time_budget: seed %d would end ~%.0f s after the budget; not run: seeds %s (--resume adds them)",
                seed,
                time.perf_counter() + expected - deadline,
                not_run,
            )
            break
        for implementation in remaining:
            logger.info("training %s on seed %d", implementation, seed)
            record = train_run(implementation, seed, settings, data, device, bf16, deadline)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the run's model and optimizer are gone with train_run's frame
            state["runs"].append(record)
            if not record.get("error"):
                timed.setdefault(implementation, []).append(record["seconds"])
            write_results(output_dir, results())
    described["load_average"]["after"] = load_average()
    final = results()
    write_outputs(output_dir, final)
    print(short_table(final))
    return 0


# -- report -----------------------------------------------------------------------------------------------------------


def plot_eval_curves(results: Mapping[str, Any], path: Path) -> Path:
    """Held-out loss against training tokens: per implementation the mean over seeds and its 95% band."""
    from hf_multimax.analysis.plots import Band, plot_bands
    from hf_multimax.compare.statistics import summarize

    bands = []
    for implementation in results["implementations"]:
        curves = [
            run["evals"]
            for run in results["runs"]
            if run["implementation"] == implementation and not run.get("error") and run.get("evals")
        ]
        if not curves:
            continue
        length = min(len(curve) for curve in curves)
        stats = [summarize([curve[i][1] for curve in curves]) for i in range(length)]
        bands.append(
            Band(
                [curves[0][i][0] / 1e6 for i in range(length)],
                [s["mean"] for s in stats],
                [s["ci95"][0] for s in stats],
                [s["ci95"][1] for s in stats],
                f"{implementation} ({len(curves)} seed{'s' * (len(curves) > 1)})",
            )
        )
    return plot_bands(
        bands, path, "held-out loss, mean over seeds and 95% band", "training tokens (millions)", "held-out loss (nats)"
    )


def write_outputs(output_dir: Path, results: Mapping[str, Any]) -> None:
    """``results.json``, and with at least one finished run ``loss_curves.png``, ``metrics.png``,
    ``eval_curves.png``; ``results.md`` always (``compare``'s tables and figures, this experiment's story)."""
    from hf_multimax.compare.report import plot_loss_curves, plot_metrics
    from hf_multimax.compare.runner import write_results

    write_results(output_dir, results)
    figures = []
    if results["summary"]:
        plot_loss_curves(results, output_dir / "loss_curves.png", "training loss, smoothed: mean over seeds, 95% band")
        plot_metrics(results, output_dir / "metrics.png")
        plot_eval_curves(results, output_dir / "eval_curves.png")
        figures = ["![held-out loss](eval_curves.png)", "![training loss](loss_curves.png)", "![metrics](metrics.png)"]
    (output_dir / "results.md").write_text(results_markdown(results, figures))


def results_markdown(results: Mapping[str, Any], figures: Sequence[str]) -> str:
    """``results.md``: the command, the machine, what was trained on what, the tables, the figures."""
    from hf_multimax.compare.report import format_attention_table, format_table

    settings, corpus, described = results["settings"], results["corpus"], results["machine"]
    shape, training = settings["model"], settings["training"]
    hardware = described.get("gpu") or described.get("cpu", "?")
    sources = [
        f"| {s['name']} | {s['version'] or '-'} | {s['licence']} | {s['licence_metadata'] or '-'} | {s['files']:,} | "
        f"{s['bytes'] / 1e6:.1f} |"
        for s in corpus["sources"]
    ]
    tables = [format_table(results), format_attention_table(results)] if results["summary"] else ["no run finished"]
    kernels = sorted({name for run in results["runs"] for name in run.get("attention_backends") or ()})
    fallbacks = sorted({reason for run in results["runs"] for reason in run.get("attention_fallbacks") or ()})
    lines = [
        "# Does MultiMax help at scale? (examples/recipes/lm_scale.py)",
        "",
        f"`{results['command']}`",
        "",
        f"Machine: {hardware}, torch {described.get('torch')}, transformers {described.get('transformers')}, triton "
        f"{described.get('triton')}, MultiMax kernel backend `{described.get('multimax_backend')}`; this command "
        f"took {(results.get('seconds') or 0) / 60:.1f} minutes. MultiMax attention calls ran on: "
        + (", ".join(kernels) or "none recorded")
        + (f"; fell back because: {'; '.join(fallbacks)}" if fallbacks else "; no fallback")
        + ".",
        "",
        f"Model: GPT-2 decoder, {shape['n_layer']} layers, {shape['n_embd']} wide, {shape['n_head']} heads, FFN "
        f"{shape['n_inner']}, context {shape['context']}, vocabulary {results['tokenizer']['vocab_size']:,}. "
        f"{settings['tokens_per_run']:,} training tokens per run ({settings['max_train_steps']:,} steps of "
        f"{training['batch_size']} blocks), AdamW at {training['learning_rate']:g} (betas "
        f"{tuple(training['adam_betas'])}, weight decay {training['weight_decay']:g}, {training['warmup_steps']} "
        f"warm-up steps, cosine), gradient norm clipped at {training['max_grad_norm']:g}, {training['precision']}. "
        "MultiMax runs only: "
        + ", ".join(f"{k} {v}" for k, v in settings["multimax"].items())
        + f". Seeds {', '.join(map(str, results['seeds']))} (a seed fixes the initial weights and the data order, "
        "the same for every implementation; the held-out blocks are the same for all runs)."
        + (f" Not run (time budget): seeds {results['not_run']}." if results.get("not_run") else ""),
        "",
        f"Corpus: {corpus['tokens']['train']:,} training and {corpus['tokens']['eval']:,} held-out tokens "
        f"({corpus['bytes']['train'] / 1e6:.2f} and {corpus['bytes']['eval'] / 1e6:.2f} MB, "
        f"{corpus['files']['train']:,} and {corpus['files']['eval']:,} files), sha256 `{corpus['sha256'][:16]}`"
        + (f"; not installed: {', '.join(corpus['missing'])}" if corpus["missing"] else "")
        + ".",
        "",
        "| source | version | licence | licence in its metadata | files | MB |",
        "| --- | --- | --- | --- | ---: | ---: |",
        *sources,
        "",
        *[table + "\n" for table in tables if table],
        *[figure + "\n" for figure in figures],
    ]
    return "\n".join(lines)


def short_table(results: Mapping[str, Any]) -> str:
    """Per run: held-out loss, perplexity, tokens/s over the whole loop and steady (after the first 10% of the
    steps; evaluations excluded from both), and the error of a failed run; then the paired differences."""
    lines = [
        f"{'attention':<12} {'seed':>4} {'tokens':>12} {'eval loss':>9} {'perplexity':>10} {'tokens/s':>10} "
        f"{'steady':>10}  status"
    ]
    for run in results["runs"]:
        metrics = run.get("metrics") or {}
        lines.append(
            f"{run['implementation']:<12} {run['seed']:>4} {run.get('tokens', 0):>12,} "
            f"{_number(metrics.get('eval_loss'), '.4f'):>9} {_number(metrics.get('perplexity'), '.2f'):>10} "
            f"{_number(metrics.get('tokens_per_second'), ',.0f'):>10} "
            f"{_number(metrics.get('tokens_per_second_steady'), ',.0f'):>10}  {run.get('error') or 'ok'}"
        )
    from hf_multimax.compare.statistics import format_aligned

    for implementation, diffs in results.get("versus_baseline", {}).items():
        parts = [
            f"{name} {format_aligned(diffs[name])}"
            for name in ("eval_loss", "perplexity", "tokens_per_second_steady")
            if name in diffs
        ]
        pairs = max((d.get("n", 0) for d in diffs.values()), default=0)
        lines.append(
            f"{implementation} - {results['baseline']} ({pairs} pairs, mean ± 95% half-width): " + "; ".join(parts)
        )
    return "\n".join(lines)


def _number(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


if __name__ == "__main__":
    from hf_multimax.cli import run_script

    sys.exit(run_script(main))
