"""The command-line arguments of the fine-tuning scripts, defined once: every script's parser is the shared groups plus
its task's own flags (:meth:`hf_multimax.finetune.tasks.Task.add_arguments`). :func:`make_args` builds the same
namespace from Python values (``hf-multimax compare`` uses it), so nothing is turned back into strings."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import FLAG_DEFAULTS, INIT_METHODS, validate_flag
from ..extras import require
from ..training.clipping import OUTPUT_CLIP_MODES

if TYPE_CHECKING:
    from .tasks import Task

__all__ = [
    "build_parser",
    "parse_args",
    "make_args",
    "resolve_defaults",
    "check_paths",
    "multimax_flags",
    "add_model_arguments",
    "add_data_arguments",
    "add_training_arguments",
    "add_lora_arguments",
    "add_hub_arguments",
]


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_model_arguments(parser: argparse.ArgumentParser, task: Task) -> None:
    """``--model_name_or_path`` / tiny config, ``--attn_implementation`` and the MultiMax flags."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model_name_or_path",
        default=None,
        help="local folder or Hub name of a pretrained model to fine-tune; default: train a tiny "
        "model from scratch (see --model_type, --config_overrides)",
    )
    group.add_argument(
        "--model_type",
        default=task.default_model_type,
        choices=task.model_types,
        help="architecture of the from-scratch model (ignored with --model_name_or_path)",
    )
    group.add_argument(
        "--config_overrides",
        default=None,
        help="comma-separated config fields for the from-scratch model, e.g. 'hidden_size=128,num_hidden_layers=4'",
    )
    group.add_argument(
        "--tokenizer_name",
        default=None,
        help="tokenizer to use (default: that of --model_name_or_path, or a BPE tokenizer trained "
        "locally on the training data)",
    )
    group.add_argument(
        "--attn_implementation",
        default="multimax",
        help="attention implementation: multimax (default), multimax_eager (reference, returns "
        "weights), sdpa, eager, or any name registered with transformers.AttentionInterface",
    )
    mm = parser.add_argument_group("MultiMax flags (unset: the checkpoint's value, else the default)")
    mm.add_argument(
        "--multimax_order",
        type=int,
        default=None,
        help=f"order N of the SegLU modulator (2N ranges and slopes; default {FLAG_DEFAULTS['multimax_order']})",
    )
    mm.add_argument(
        "--multimax_init",
        default=None,
        choices=INIT_METHODS,
        help="initialisation of new MultiMax parameters: identity (starts as SoftMax, for fine-tuning; "
        "default) or paper (trunc-normal std 0.02, as the authors train from scratch)",
    )
    mm.add_argument(
        "--multimax_per_head",
        type=_bool,
        default=None,
        metavar="{true,false}",
        help="one parameter set per attention head instead of one per layer (default false)",
    )
    mm.add_argument(
        "--multimax_output",
        type=_bool,
        default=None,
        metavar="{true,false}",
        help="also apply MultiMax's modulator to the output logits (default false)",
    )


def add_data_arguments(parser: argparse.ArgumentParser, task: Task) -> None:
    group = parser.add_argument_group("data (default: the embedded offline data set of the task)")
    group.add_argument("--dataset_name", default=None, help="Hub data set name, passed to datasets.load_dataset")
    group.add_argument("--dataset_config_name", default=None, help="configuration of --dataset_name")
    group.add_argument(
        "--train_file",
        default=None,
        help="local training data: .csv/.tsv/.json/.jsonl/.txt (as the Transformers examples accept) "
        "or, for images, a folder of class sub-folders",
    )
    group.add_argument("--validation_file", default=None, help="local validation data in the format of --train_file")
    group.add_argument(
        "--validation_split_percentage",
        type=int,
        default=task.validation_split_percentage,
        help="percentage of the training data held out when there is no validation split",
    )
    group.add_argument("--max_train_samples", type=int, default=None, help="truncate the training set (debugging)")
    group.add_argument("--max_eval_samples", type=int, default=None, help="truncate the validation set")


def add_training_arguments(parser: argparse.ArgumentParser, task: Task) -> None:
    group = parser.add_argument_group("training")
    scratch = task.scratch_defaults
    group.add_argument("--output_dir", default=None, help="where the model, tokenizer, results and checkpoints go")
    group.add_argument("--seed", type=int, default=42, help="random seed (model init, data order, splits)")
    group.add_argument(
        "--per_device_train_batch_size",
        type=int,
        default=None,
        help=f"training batch size per device (default {scratch.get('per_device_train_batch_size', 8)} "
        "from scratch, 8 for a pretrained model)",
    )
    group.add_argument("--per_device_eval_batch_size", type=int, default=32, help="evaluation batch size per device")
    if task.text_inputs:
        grouped = "on" if scratch.get("group_by_length") else "off"
        lengths = group.add_mutually_exclusive_group()
        lengths.add_argument(
            "--group_by_length",
            action="store_const",
            const=True,
            default=None,
            help="batch examples of similar length together (as Trainer's group_by_length), so that "
            "padding costs little; the order stays a function of --seed and the epoch "
            f"(default {grouped} from scratch, off for a pretrained model)",
        )
        lengths.add_argument(
            "--no_group_by_length",
            dest="group_by_length",
            action="store_const",
            const=False,
            help="random batches (the opposite of --group_by_length)",
        )
    group.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help=f"peak learning rate of AdamW (default {scratch.get('learning_rate', 1e-3)} from scratch, "
        "5e-5 for a pretrained model)",
    )
    group.add_argument(
        "--multimax_learning_rate",
        type=float,
        default=None,
        help="learning rate of the MultiMax parameters (default: --learning_rate)",
    )
    group.add_argument(
        "--weight_decay",
        type=float,
        default=0.0,
        help="AdamW weight decay (never applied to MultiMax parameters, biases and norms)",
    )
    group.add_argument(
        "--num_train_epochs",
        type=int,
        default=None,
        help=f"epochs (default {scratch.get('num_train_epochs', 3)}); --max_train_steps overrides",
    )
    group.add_argument("--max_train_steps", type=int, default=None, help="total optimizer steps (overrides epochs)")
    group.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="micro-batches accumulated per optimizer step"
    )
    group.add_argument(
        "--lr_scheduler_type",
        default="linear",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help="learning-rate schedule",
    )
    group.add_argument("--num_warmup_steps", type=int, default=0, help="warm-up steps of the schedule")
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0 disables)")
    group.add_argument(
        "--multimax_output_clip",
        default="separate",
        choices=OUTPUT_CLIP_MODES,
        help="how clipping treats output-layer MultiMax, whose gradient sums over the vocabulary: "
        "separate (its own group clipped to --max_grad_norm; default), scaled (one global norm in "
        "which it counts 1/sqrt(vocabulary size)) or global (plain global clipping)",
    )
    group.add_argument(
        "--checkpointing_steps",
        default=None,
        help="save the training state every N steps (an integer) or at the end of every 'epoch'",
    )
    group.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="a checkpoint folder (step_N or epoch_N) to resume from, or 'latest' for the newest one in --output_dir",
    )
    group.add_argument(
        "--with_tracking", action="store_true", help="log losses and metrics to the experiment trackers of --report_to"
    )
    group.add_argument(
        "--report_to",
        default="all",
        help="trackers for --with_tracking: all (every installed one), tensorboard, wandb, ...",
    )
    group.add_argument("--logging_steps", type=int, default=10, help="log the training loss every N steps")
    group.add_argument(
        "--eval_strategy",
        default="epoch",
        choices=["epoch", "end"],
        help="evaluate after every epoch (as the Transformers examples) or only at the end",
    )
    group.add_argument(
        "--check_replicas",
        action="store_true",
        help="distributed runs: after every optimizer step, check that all processes hold identical "
        "MultiMax parameters and stop with an error naming the first that differs",
    )


def add_lora_arguments(parser: argparse.ArgumentParser, task: Task) -> None:
    group = parser.add_argument_group("LoRA (PEFT)")
    group.add_argument(
        "--lora",
        action="store_true",
        help="train LoRA adapters instead of the full model; MultiMax parameters are trained in full "
        "and saved with the adapter (modules_to_save)",
    )
    group.add_argument("--lora_r", type=int, default=8, help="LoRA rank")
    group.add_argument("--lora_alpha", type=int, default=16, help="LoRA scaling numerator (scale = alpha / r)")
    group.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA branch")
    group.add_argument(
        "--lora_target_modules",
        default=None,
        help="comma-separated module names to adapt (default: PEFT's choice for the architecture, "
        "e.g. q_proj,v_proj for Llama)",
    )


def add_hub_arguments(parser: argparse.ArgumentParser, task: Task) -> None:
    group = parser.add_argument_group("Hugging Face Hub")
    group.add_argument(
        "--push_to_hub",
        action="store_true",
        help="push the saved model with a model card (hf_multimax.hub.push_to_hub)",
    )
    group.add_argument("--hub_model_id", default=None, help="repository id (default: the name of --output_dir)")
    group.add_argument("--hub_token", default=None, help="token with write access (default: the stored login)")
    group.add_argument("--hub_private_repo", action="store_true", help="create the repository as private")
    group.add_argument(
        "--hub_dry_run", action="store_true", help="prepare the repository folder and model card without uploading"
    )


ARGUMENT_GROUPS: tuple[Callable[[argparse.ArgumentParser, Task], None], ...] = (
    add_model_arguments,
    add_data_arguments,
    add_training_arguments,
    add_lora_arguments,
    add_hub_arguments,
)


def build_parser(task: Task, description: str | None = None) -> argparse.ArgumentParser:
    """The parser of one script: the shared groups plus ``task.add_arguments``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in ARGUMENT_GROUPS:
        add(parser, task)
    task.add_arguments(parser)
    return parser


def parse_args(task: Task, argv: Sequence[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """Parse ``argv`` and fill the defaults that depend on other flags (from scratch or pretrained). Raises
    :class:`~hf_multimax.extras.MissingExtraError` when the ``train`` extra (or ``hub``, for ``--push_to_hub``) is
    not installed."""
    require("train", "examples/run_*.py")
    args = build_parser(task, description).parse_args(argv)
    if args.push_to_hub:
        require("hub", "--push_to_hub")
    resolve_defaults(task, args)
    return args


def resolve_defaults(task: Task, args: argparse.Namespace) -> argparse.Namespace:
    pretrained = args.model_name_or_path is not None
    fallback = {"learning_rate": 5e-5, "per_device_train_batch_size": 8, "num_train_epochs": 3}
    if task.text_inputs:
        fallback["group_by_length"] = False
    for name, value in fallback.items():
        if getattr(args, name) is None:
            setattr(args, name, value if pretrained else task.scratch_defaults.get(name, value))
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not str(args.checkpointing_steps).isdigit():
            raise ValueError(f"--checkpointing_steps must be an integer or 'epoch', got {args.checkpointing_steps!r}")
        args.checkpointing_steps = int(args.checkpointing_steps)
    if args.output_dir is None and (
        args.checkpointing_steps or args.resume_from_checkpoint == "latest" or args.push_to_hub
    ):
        raise ValueError("--checkpointing_steps, --resume_from_checkpoint latest and --push_to_hub need --output_dir")
    check_paths(args)
    return args


def _local(path: str) -> bool:
    """Whether ``path`` names something on this machine rather than a Hub repository (``owner/name``)."""
    return os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path)


def check_paths(args: argparse.Namespace) -> None:
    """Fail before any work on local paths that do not exist or are not what the flag needs."""
    for flag in ("train_file", "validation_file"):
        value = getattr(args, flag, None)
        if value is not None and not os.path.exists(os.path.expanduser(value)):
            raise FileNotFoundError(f"--{flag} {value} does not exist")
    for flag in ("model_name_or_path", "tokenizer_name"):
        value = getattr(args, flag, None)
        if value is None or not _local(value):
            continue
        folder = Path(value).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"--{flag} {value} is not a folder (nor a Hub name like owner/name)")
        if flag == "model_name_or_path" and not any(
            (folder / f).is_file() for f in ("config.json", "adapter_config.json")
        ):
            raise ValueError(f"--model_name_or_path {value} is not a saved model: it has no config.json")


def make_args(task: Task, argv: Sequence[str] = (), **values: Any) -> argparse.Namespace:
    """The namespace a script would parse from ``argv``, with ``values`` set on top (Python values, keyed by
    destination: ``attn_implementation="multimax"``, ``multimax_order=3``, ``max_train_steps=100``...). An unknown
    name raises ``TypeError`` naming it; MultiMax flags are validated (``ValueError`` naming the flag)."""
    parser = build_parser(task)
    args = parser.parse_args(list(argv))
    known = set(vars(args))
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"unknown fine-tuning argument(s) {unknown}; known: {sorted(known)}")
    for name, value in values.items():
        if name in FLAG_DEFAULTS and value is not None:
            validate_flag(name, value)
        setattr(args, name, value)
    return resolve_defaults(task, args)


def multimax_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The MultiMax flags given on the command line (unset ones are left to the checkpoint / the defaults)."""
    return {name: getattr(args, name) for name in FLAG_DEFAULTS if getattr(args, name, None) is not None}
