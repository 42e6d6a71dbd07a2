"""The shared body of the fine-tuning scripts in ``examples/`` (and of ``hf-multimax compare``).

:func:`run` is the story of Transformers' ``run_*_no_trainer.py`` scripts, written once: parse arguments → build the
``Accelerator`` → load and preprocess the data → build the model (a local folder, a Hub name, or a tiny from-scratch
config) with the chosen attention implementation and MultiMax flags → optional LoRA → optimizer (MultiMax parameters
without weight decay) and scheduler → ``accelerator.prepare`` → training loop with a progress bar, checkpoints and
resumption → evaluation → ``save_pretrained`` (and an optional push to the Hub). What differs between scripts lives in
a :class:`~hf_multimax.tasks.Task`.

Runs unchanged on CPU, one GPU, or several processes with ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import FLAG_DEFAULTS, INIT_METHODS
from .integration import PARAMETRIC_ATTENTION
from .tasks import TINY_CONFIGS, Task
from .distributed import full_state_dict, launched_without_accelerator, replica_divergence
from .training import OUTPUT_CLIP_MODES, clip_grad_norm_, multimax_parameter_groups

logger = logging.getLogger(__name__)

__all__ = [
    "build_parser",
    "parse_args",
    "add_model_arguments",
    "add_data_arguments",
    "add_training_arguments",
    "add_lora_arguments",
    "add_hub_arguments",
    "setup_logging",
    "make_accelerator",
    "multimax_flags",
    "build_model",
    "apply_lora",
    "make_optimizer",
    "train",
    "TrainResult",
    "save_model",
    "push_to_hub",
    "run",
    "MULTIMAX_LORA_MODULES",
]

#: Name of the child module that holds each attention layer's MultiMax parameters: LoRA trains and saves these in
#: full (``modules_to_save``), next to the adapters.
MULTIMAX_LORA_MODULES = ("multimax",)
STATE_FILE = "training_state.json"
CHECKPOINT_NAME = re.compile(r"^(step|epoch)_(\d+)$")


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Arguments


def add_model_arguments(parser: argparse.ArgumentParser, task: Task) -> None:
    """``--model_name_or_path`` / tiny config, ``--attn_implementation`` and the MultiMax flags."""
    group = parser.add_argument_group("model")
    group.add_argument("--model_name_or_path", default=None,
                       help="local folder or Hub name of a pretrained model to fine-tune; default: train a tiny "
                            "model from scratch (see --model_type, --config_overrides)")
    group.add_argument("--model_type", default=task.default_model_type, choices=task.model_types,
                       help="architecture of the from-scratch model (ignored with --model_name_or_path)")
    group.add_argument("--config_overrides", default=None,
                       help="comma-separated config fields for the from-scratch model, e.g. "
                            "'hidden_size=128,num_hidden_layers=4'")
    group.add_argument("--tokenizer_name", default=None,
                       help="tokenizer to use (default: that of --model_name_or_path, or a BPE tokenizer trained "
                            "locally on the training data)")
    group.add_argument("--attn_implementation", default="multimax",
                       help="attention implementation: multimax (default), multimax_eager (reference, returns "
                            "weights), sdpa, eager, or any name registered with transformers.AttentionInterface")
    mm = parser.add_argument_group("MultiMax flags (unset: the checkpoint's value, else the default)")
    mm.add_argument("--multimax_order", type=int, default=None,
                    help=f"order N of the SegLU modulator (2N ranges and slopes; default {FLAG_DEFAULTS['multimax_order']})")
    mm.add_argument("--multimax_init", default=None, choices=INIT_METHODS,
                    help="initialisation of new MultiMax parameters: identity (starts as SoftMax, for fine-tuning; "
                         "default) or paper (trunc-normal std 0.02, as the authors train from scratch)")
    mm.add_argument("--multimax_per_head", type=_bool, default=None, metavar="{true,false}",
                    help="one parameter set per attention head instead of one per layer (default false)")
    mm.add_argument("--multimax_output", type=_bool, default=None, metavar="{true,false}",
                    help="also apply MultiMax's modulator to the output logits (default false)")


def add_data_arguments(parser: argparse.ArgumentParser, task: Task) -> None:
    group = parser.add_argument_group("data (default: the embedded offline data set of the task)")
    group.add_argument("--dataset_name", default=None, help="Hub data set name, passed to datasets.load_dataset")
    group.add_argument("--dataset_config_name", default=None, help="configuration of --dataset_name")
    group.add_argument("--train_file", default=None,
                       help="local training data: .csv/.tsv/.json/.jsonl/.txt (as the Transformers examples accept) "
                            "or, for images, a folder of class sub-folders")
    group.add_argument("--validation_file", default=None, help="local validation data in the format of --train_file")
    group.add_argument("--validation_split_percentage", type=int, default=task.validation_split_percentage,
                       help="percentage of the training data held out when there is no validation split")
    group.add_argument("--max_train_samples", type=int, default=None, help="truncate the training set (debugging)")
    group.add_argument("--max_eval_samples", type=int, default=None, help="truncate the validation set")


def add_training_arguments(parser: argparse.ArgumentParser, task: Task) -> None:
    group = parser.add_argument_group("training")
    scratch = task.scratch_defaults
    group.add_argument("--output_dir", default=None, help="where the model, tokenizer, results and checkpoints go")
    group.add_argument("--seed", type=int, default=42, help="random seed (model init, data order, splits)")
    group.add_argument("--per_device_train_batch_size", type=int, default=None,
                       help=f"training batch size per device (default {scratch.get('per_device_train_batch_size', 8)} "
                            "from scratch, 8 for a pretrained model)")
    group.add_argument("--per_device_eval_batch_size", type=int, default=32, help="evaluation batch size per device")
    group.add_argument("--learning_rate", type=float, default=None,
                       help=f"peak learning rate of AdamW (default {scratch.get('learning_rate', 1e-3)} from scratch, "
                            "5e-5 for a pretrained model)")
    group.add_argument("--multimax_learning_rate", type=float, default=None,
                       help="learning rate of the MultiMax parameters (default: --learning_rate)")
    group.add_argument("--weight_decay", type=float, default=0.0,
                       help="AdamW weight decay (never applied to MultiMax parameters, biases and norms)")
    group.add_argument("--num_train_epochs", type=int, default=None,
                       help=f"epochs (default {scratch.get('num_train_epochs', 3)}); --max_train_steps overrides")
    group.add_argument("--max_train_steps", type=int, default=None, help="total optimizer steps (overrides epochs)")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="micro-batches accumulated per optimizer step")
    group.add_argument("--lr_scheduler_type", default="linear",
                       choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                "constant_with_warmup"], help="learning-rate schedule")
    group.add_argument("--num_warmup_steps", type=int, default=0, help="warm-up steps of the schedule")
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0 disables)")
    group.add_argument("--multimax_output_clip", default="separate", choices=OUTPUT_CLIP_MODES,
                       help="how clipping treats output-layer MultiMax, whose gradient sums over the vocabulary: "
                            "separate (its own group clipped to --max_grad_norm; default), scaled (one global norm in "
                            "which it counts 1/sqrt(vocabulary size)) or global (plain global clipping)")
    group.add_argument("--checkpointing_steps", default=None,
                       help="save the training state every N steps (an integer) or at the end of every 'epoch'")
    group.add_argument("--resume_from_checkpoint", default=None,
                       help="a checkpoint folder (step_N or epoch_N) to resume from, or 'latest' for the newest one "
                            "in --output_dir")
    group.add_argument("--with_tracking", action="store_true",
                       help="log losses and metrics to the experiment trackers of --report_to")
    group.add_argument("--report_to", default="all",
                       help="trackers for --with_tracking: all (every installed one), tensorboard, wandb, ...")
    group.add_argument("--logging_steps", type=int, default=10, help="log the training loss every N steps")
    group.add_argument("--eval_strategy", default="epoch", choices=["epoch", "end"],
                       help="evaluate after every epoch (as the Transformers examples) or only at the end")
    group.add_argument("--check_replicas", action="store_true",
                       help="distributed runs: after every optimizer step, check that all processes hold identical "
                            "MultiMax parameters and stop with an error naming the first that differs")


def add_lora_arguments(parser: argparse.ArgumentParser, task: Task) -> None:
    group = parser.add_argument_group("LoRA (PEFT)")
    group.add_argument("--lora", action="store_true",
                       help="train LoRA adapters instead of the full model; MultiMax parameters are trained in full "
                            "and saved with the adapter (modules_to_save)")
    group.add_argument("--lora_r", type=int, default=8, help="LoRA rank")
    group.add_argument("--lora_alpha", type=int, default=16, help="LoRA scaling numerator (scale = alpha / r)")
    group.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA branch")
    group.add_argument("--lora_target_modules", default=None,
                       help="comma-separated module names to adapt (default: PEFT's choice for the architecture, "
                            "e.g. q_proj,v_proj for Llama)")


def add_hub_arguments(parser: argparse.ArgumentParser, task: Task) -> None:
    group = parser.add_argument_group("Hugging Face Hub")
    group.add_argument("--push_to_hub", action="store_true",
                       help="push the saved model with a model card (hf_multimax.hub.push_to_hub)")
    group.add_argument("--hub_model_id", default=None, help="repository id (default: the name of --output_dir)")
    group.add_argument("--hub_token", default=None, help="token with write access (default: the stored login)")
    group.add_argument("--hub_private_repo", action="store_true", help="create the repository as private")
    group.add_argument("--hub_dry_run", action="store_true",
                       help="prepare the repository folder and model card without uploading")


ARGUMENT_GROUPS: tuple[Callable[[argparse.ArgumentParser, Task], None], ...] = (
    add_model_arguments, add_data_arguments, add_training_arguments, add_lora_arguments, add_hub_arguments,
)


def build_parser(task: Task, description: str | None = None) -> argparse.ArgumentParser:
    """The parser of one script: the shared groups plus ``task.add_arguments``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add in ARGUMENT_GROUPS:
        add(parser, task)
    task.add_arguments(parser)
    return parser


def parse_args(task: Task, argv: Sequence[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """Parse ``argv`` and fill the defaults that depend on other flags (from scratch or pretrained)."""
    args = build_parser(task, description).parse_args(argv)
    resolve_defaults(task, args)
    return args


def resolve_defaults(task: Task, args: argparse.Namespace) -> argparse.Namespace:
    pretrained = args.model_name_or_path is not None
    fallback = {"learning_rate": 5e-5, "per_device_train_batch_size": 8, "num_train_epochs": 3}
    for name, value in fallback.items():
        if getattr(args, name) is None:
            setattr(args, name, value if pretrained else task.scratch_defaults.get(name, value))
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not str(args.checkpointing_steps).isdigit():
            raise ValueError(f"--checkpointing_steps must be an integer or 'epoch', got {args.checkpointing_steps!r}")
        args.checkpointing_steps = int(args.checkpointing_steps)
    if args.output_dir is None and (args.checkpointing_steps or args.resume_from_checkpoint == "latest" or args.push_to_hub):
        raise ValueError("--checkpointing_steps, --resume_from_checkpoint latest and --push_to_hub need --output_dir")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Accelerator, model, optimizer


def setup_logging(accelerator) -> None:
    """INFO logs on the main process, errors only elsewhere (as the Transformers examples)."""
    import datasets
    import transformers

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if accelerator.is_main_process else logging.ERROR)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def make_accelerator(args: argparse.Namespace):
    """An ``Accelerator`` with gradient accumulation, optional trackers, and a seedable sampler, so that a resumed run
    sees the same data order as an uninterrupted one.

    Launched as several processes on a machine without an accelerator (``accelerate launch --multi_gpu
    --num_processes N`` or ``torchrun`` on CPUs), it runs data-parallel on CPU with gloo, where Accelerate alone would
    run N independent copies.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    kwargs: dict[str, Any] = {}
    if args.with_tracking:
        kwargs = {"log_with": args.report_to, "project_dir": args.output_dir}
    if launched_without_accelerator():
        kwargs["cpu"] = True
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            logger.warning("Accelerate runs FSDP on GPUs only: these CPU processes train data-parallel (DDP) instead")
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        **kwargs,
    )
    set_seed(args.seed)
    if accelerator.is_main_process and args.output_dir is not None:
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    return accelerator


def multimax_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The MultiMax flags given on the command line (unset ones are left to the checkpoint / the defaults)."""
    return {name: getattr(args, name) for name in FLAG_DEFAULTS if getattr(args, name, None) is not None}


def _auto_class(task: Task):
    import transformers

    return getattr(transformers, task.auto_class)


def _model_class(auto_class, config):
    """The concrete class an auto class maps ``config`` to (``from_config`` trips on configs without architectures
    when the mapping holds several classes, e.g. DeiT)."""
    model_class = auto_class._model_mapping[type(config)]
    return model_class[0] if isinstance(model_class, (tuple, list)) else model_class


def tiny_config(task: Task, args: argparse.Namespace, preprocessor: Any, raw):
    """The tiny from-scratch config of ``args.model_type`` with the task's fields and ``--config_overrides``."""
    from transformers import AutoConfig

    kwargs = dict(TINY_CONFIGS[args.model_type], **task.config_kwargs(args, preprocessor, raw))
    config = AutoConfig.for_model(args.model_type, **kwargs)
    if args.config_overrides:
        config.update_from_string(args.config_overrides)
    return config


def build_model(task: Task, args: argparse.Namespace, preprocessor: Any, raw) -> nn.Module:
    """The model with ``args.attn_implementation`` and the MultiMax flags.

    Pretrained: ``from_pretrained(..., attn_implementation=..., multimax_*=...)``. From scratch: the tiny config is built
    with eager SoftMax attention first and switched with ``set_attn_implementation``, so that two runs from the same seed
    start from identical weights whatever the attention (MultiMax's own parameters are created on top of them).
    """
    auto_class = _auto_class(task)
    implementation = args.attn_implementation
    flags = multimax_flags(args)
    if args.model_name_or_path:
        model = auto_class.from_pretrained(args.model_name_or_path, attn_implementation=implementation, **flags,
                                           **task.pretrained_kwargs(args, preprocessor, raw))
    else:
        config = tiny_config(task, args, preprocessor, raw)
        for name, value in flags.items():
            setattr(config, name, value)
        model_class = _model_class(auto_class, config)
        parametric = implementation in PARAMETRIC_ATTENTION
        model = model_class._from_config(config, attn_implementation="eager" if parametric else implementation)
        if parametric:
            model.set_attn_implementation(implementation)
    if hasattr(model, "resize_token_embeddings") and hasattr(preprocessor, "__len__"):
        embeddings = model.get_input_embeddings()
        if embeddings is not None and len(preprocessor) > embeddings.weight.shape[0]:
            model.resize_token_embeddings(len(preprocessor))
    return model


#: Query/value projection names of common architectures, tried in order when PEFT has no default for a model type.
LORA_TARGET_CANDIDATES = (("q_proj", "v_proj"), ("query", "value"), ("q", "v"), ("c_attn",))


def default_lora_targets(model: nn.Module) -> list[str] | None:
    """PEFT's default LoRA targets for the model type, else the first query/value name pair the model has."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = {name.rpartition(".")[2] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    if set(DEFAULTS.get(model_type) or ()) & names:
        return None  # PEFT's own choice applies to this model
    for candidate in LORA_TARGET_CANDIDATES:
        if set(candidate) <= names:
            return list(candidate)
    return None


def apply_lora(task: Task, args: argparse.Namespace, model: nn.Module) -> nn.Module:
    """Wrap ``model`` in a PEFT LoRA model. The ``multimax`` child modules (and a new classification head) are
    ``modules_to_save``: trained in full and written to ``adapter_model.safetensors`` with the adapters."""
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules.split(",") if args.lora_target_modules else default_lora_targets(model)
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        modules_to_save=list(MULTIMAX_LORA_MODULES + task.lora_modules_to_save),
        task_type=task.peft_task_type,
    )
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: %d trainable parameters of %d (%.2f%%)", trainable, total, 100 * trainable / total)
    return model


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW over :func:`~hf_multimax.training.multimax_parameter_groups` (no weight decay on MultiMax parameters)."""
    groups = multimax_parameter_groups(model, weight_decay=args.weight_decay, multimax_lr=args.multimax_learning_rate)
    for group in groups:
        group.pop("name", None)
    return torch.optim.AdamW(groups, lr=args.learning_rate)


# ---------------------------------------------------------------------------------------------------------------------
# Training loop


@dataclass
class TrainResult:
    """What :func:`train` did: ``losses`` are ``(step, mean training loss of that optimizer step)``."""

    completed_steps: int = 0
    epochs: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    #: ``--check_replicas``: steps checked and the largest difference seen between processes (0.0: identical).
    replica_checks: int = 0
    replica_max_abs_diff: float = 0.0

    @property
    def time_per_step(self) -> float:
        """Mean seconds per optimizer step, ignoring the first (warm-up) step when there are others."""
        times = self.step_times[1:] if len(self.step_times) > 1 else self.step_times
        return sum(times) / len(times) if times else float("nan")


def token_weight(accelerator, count: torch.Tensor) -> torch.Tensor:
    """``count × processes / total count``: the factor that turns this process's mean loss over its ``count`` labelled
    tokens into its share of the mean over all processes' tokens, once data parallelism averages the gradients.

    Without it each process weighs its own mean equally, and a padded batch (translation) trains differently on two
    processes than on one; blocks of equal length (language modelling) give exactly 1.
    """
    count = count.detach().to(accelerator.device, torch.float32).reshape(())
    total = accelerator.reduce(count.clone(), reduction="sum")
    return count * accelerator.num_processes / total.clamp(min=1)


def check_replicas(accelerator, model: nn.Module, result: TrainResult) -> None:
    """``--check_replicas``: stop when the processes' MultiMax parameters no longer agree after a step (data
    parallelism keeps every replica identical; a difference means the gradients were not synchronised)."""
    diff, name = replica_divergence(accelerator, model)
    result.replica_checks += 1
    result.replica_max_abs_diff = max(result.replica_max_abs_diff, diff)
    if diff > 0:
        raise RuntimeError(f"after step {result.completed_steps} the processes disagree on {name} (largest "
                           f"difference {diff:.3g}): its gradients were not synchronised across processes")


def find_checkpoint(args: argparse.Namespace) -> Path:
    """The folder ``--resume_from_checkpoint`` names; ``latest`` is the newest ``step_N`` / ``epoch_N`` folder."""
    if args.resume_from_checkpoint != "latest":
        path = Path(args.resume_from_checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {path} is not a folder")
        return path
    candidates = [p for p in Path(args.output_dir).iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)]
    if not candidates:
        raise FileNotFoundError(f"no step_N or epoch_N checkpoint in {args.output_dir} to resume from")
    return max(candidates, key=lambda p: json.loads((p / STATE_FILE).read_text())["completed_steps"]
               if (p / STATE_FILE).is_file() else int(CHECKPOINT_NAME.match(p.name).group(2)))


def save_checkpoint(accelerator, args: argparse.Namespace, name: str, result: TrainResult) -> None:
    """``accelerator.save_state`` (model, optimizer, scheduler, RNG states) plus the loop position and loss history."""
    path = Path(args.output_dir) / name
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        state = {"completed_steps": result.completed_steps, "losses": result.losses}
        (path / STATE_FILE).write_text(json.dumps(state))
    accelerator.wait_for_everyone()


def train(
    accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    train_dataloader,
    args: argparse.Namespace,
    evaluate: Callable[[], dict[str, float]] | None = None,
    count_labels: Callable[[dict], torch.Tensor] | None = None,
) -> TrainResult:
    """The loop of the ``run_*_no_trainer.py`` scripts: prepared objects in, :class:`TrainResult` out.

    Steps ``args.max_train_steps`` optimizer steps with gradient accumulation, MultiMax-aware clipping
    (:func:`~hf_multimax.training.clip_grad_norm_`), a tqdm bar on the local main process, checkpoints every
    ``args.checkpointing_steps`` steps or epoch, and resumption from ``args.resume_from_checkpoint`` (skipping the
    batches already seen). ``evaluate()`` runs after every epoch; its last result is ``TrainResult.metrics``. With
    ``args.check_replicas``, processes are checked to hold the same MultiMax parameters after every step.
    ``count_labels(batch)`` (the number of labelled positions) makes the loss of several processes the mean over every
    labelled token of the global batch (see :func:`token_weight`), as one process with that batch would compute it.
    """
    from accelerate.utils import DistributedType
    from tqdm.auto import tqdm

    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    result = TrainResult()
    starting_epoch, skip_batches = 0, 0
    if args.resume_from_checkpoint:
        path = find_checkpoint(args)
        accelerator.print(f"Resuming from checkpoint {path}")
        accelerator.load_state(str(path))
        state_file = path / STATE_FILE
        if state_file.is_file():
            state = json.loads(state_file.read_text())
            result.completed_steps = state["completed_steps"]
            result.losses = [tuple(x) for x in state["losses"]]
        else:  # a checkpoint written by another script: trust the folder name
            kind, number = CHECKPOINT_NAME.match(path.name).groups()
            result.completed_steps = int(number) * (steps_per_epoch if kind == "epoch" else 1)
        starting_epoch = result.completed_steps // steps_per_epoch
        skip_batches = (result.completed_steps % steps_per_epoch) * args.gradient_accumulation_steps

    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info("  Num examples = %d", len(train_dataloader.dataset))
    logger.info("  Num epochs = %d, total optimization steps = %d", num_epochs, args.max_train_steps)
    logger.info("  Batch size per device = %d, total (parallel, distributed, accumulated) = %d",
                args.per_device_train_batch_size, total_batch)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed and args.max_grad_norm:
        logger.warning("DeepSpeed clips gradients itself (its `gradient_clipping` setting, one global norm): "
                       "--max_grad_norm and --multimax_output_clip do not apply")
    progress = tqdm(range(args.max_train_steps), disable=not accelerator.is_local_main_process, desc="Training")
    progress.update(result.completed_steps)

    for epoch in range(starting_epoch, num_epochs):
        model.train()
        if hasattr(train_dataloader, "set_epoch"):
            train_dataloader.set_epoch(epoch)  # the seedable sampler's order is a function of (seed, epoch)
        active = train_dataloader
        if epoch == starting_epoch and skip_batches:
            active = accelerator.skip_first_batches(train_dataloader, skip_batches)
        step_loss, micro_batches, started = 0.0, 0, time.perf_counter()
        for batch in active:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                if count_labels is not None and accelerator.num_processes > 1:
                    loss = loss * token_weight(accelerator, count_labels(batch))
                step_loss += loss.detach().float()
                micro_batches += 1
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm and not deepspeed:
                    accelerator.unscale_gradients()
                    clip_grad_norm_(model, args.max_grad_norm,
                                    output_clip=getattr(args, "multimax_output_clip", "separate"))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            mean_loss = accelerator.reduce(step_loss / micro_batches, reduction="mean").item()
            result.completed_steps += 1
            result.losses.append((result.completed_steps, mean_loss))
            if getattr(args, "check_replicas", False):
                check_replicas(accelerator, model, result)
            result.step_times.append(time.perf_counter() - started)
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.3f}")
            if args.with_tracking and result.completed_steps % args.logging_steps == 0:
                accelerator.log({"train_loss": mean_loss, "lr": scheduler.get_last_lr()[0]}, step=result.completed_steps)
            if isinstance(args.checkpointing_steps, int) and result.completed_steps % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args, f"step_{result.completed_steps}", result)
            step_loss, micro_batches, started = 0.0, 0, time.perf_counter()
            if result.completed_steps >= args.max_train_steps:
                break

        result.epochs = epoch + 1
        last = result.completed_steps >= args.max_train_steps or epoch == num_epochs - 1
        if evaluate is not None and (getattr(args, "eval_strategy", "epoch") == "epoch" or last):
            result.metrics = evaluate()
            logger.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))
            if args.with_tracking:
                accelerator.log(dict(result.metrics, epoch=epoch), step=result.completed_steps)
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, args, f"epoch_{epoch}", result)
        if result.completed_steps >= args.max_train_steps:
            break
    progress.close()
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Saving


def save_model(accelerator, model: nn.Module, preprocessor: Any, args: argparse.Namespace, results: dict) -> None:
    """``save_pretrained`` of the unwrapped model (the adapter, with MultiMax parameters, under LoRA; gathered whole
    under FSDP), the tokenizer or image processor, and ``all_results.json``."""
    accelerator.wait_for_everyone()
    state_dict = full_state_dict(accelerator, model)  # gathered from the shards under FSDP / ZeRO-3 (all processes)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
                              state_dict=state_dict)
    if accelerator.is_main_process:
        if preprocessor is not None:
            preprocessor.save_pretrained(args.output_dir)
        with open(Path(args.output_dir) / "all_results.json", "w") as f:
            json.dump(results, f, indent=2)
    accelerator.wait_for_everyone()


def push_to_hub(task: Task, args: argparse.Namespace, results: dict) -> Any:
    """Push ``args.output_dir`` with a model card through :func:`hf_multimax.hub.push_to_hub` (imported lazily; the
    folder it uploads is written to ``OUTPUT_DIR/hub``). Without that module, or when the push fails, the model stays
    saved locally and the log says so."""
    try:
        from hf_multimax.hub import push_to_hub as hub_push
    except ImportError:
        logger.warning("hf_multimax.hub is not available in this installation: the model is saved locally in %s "
                       "and was not pushed", args.output_dir)
        return None
    metrics = dict(results.get("metrics") or {})
    dataset = args.dataset_name
    if dataset is None:  # local files or the embedded default: describe them for the card's model-index
        dataset = "local files" if args.train_file else task.default_dataset
    eval_results = dict(metrics, dataset_type=dataset, dataset_name=dataset, dataset_split="validation") if metrics else None
    try:
        return hub_push(
            args.output_dir,
            args.hub_model_id or Path(args.output_dir).resolve().name,
            local_dir=Path(args.output_dir) / "hub",
            token=args.hub_token,
            private=args.hub_private_repo,
            dry_run=args.hub_dry_run,
            base_model=args.model_name_or_path,
            datasets=[args.dataset_name] if args.dataset_name else None,
            eval_results=eval_results,
            pipeline_tag=task.pipeline_tag,
        )
    except Exception as error:  # the trained model is safe on disk; say why it is not on the Hub
        logger.error("push to the Hub failed (%s: %s); the model is saved in %s", type(error).__name__, error,
                     args.output_dir)
        return None


# ---------------------------------------------------------------------------------------------------------------------
# The story


def run(task: Task, args: argparse.Namespace) -> dict:
    """Train, evaluate and save one model for ``task``; return the results (also in ``all_results.json``).

    Returns ``{"task", "attn_implementation", "metrics", "train_loss", "losses", "time_per_step", "steps",
    "epochs", "output_dir"}``, where ``train_loss`` is the mean of the last 10% of the training losses.
    """
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    # 1. Accelerator (device placement, processes, gradient accumulation, trackers) and seed.
    accelerator = make_accelerator(args)
    setup_logging(accelerator)
    logger.info("%s", accelerator.state)

    # 2. Data: Hub data set, local files, or the embedded default; tokenizer or image processor; model inputs.
    with accelerator.main_process_first():
        raw = task.load_raw(args)
        preprocessor = task.build_preprocessor(args, raw)
        train_dataset, eval_dataset = task.preprocess(args, raw, preprocessor)

    # 3. Model with the chosen attention and MultiMax flags; optional LoRA.
    model = build_model(task, args, preprocessor, raw)
    if args.lora:
        if args.model_name_or_path is None and args.output_dir is not None and accelerator.is_main_process:
            # A from-scratch base has no home on disk: keep it so that the adapter can be loaded again.
            base_dir = Path(args.output_dir) / "base_model"
            model.save_pretrained(base_dir)
            model.config.name_or_path = model.name_or_path = str(base_dir.resolve())
        model = apply_lora(task, args, model)
    collator = task.collator(args, preprocessor, model)
    train_dataloader = DataLoader(train_dataset, shuffle=True, collate_fn=collator,
                                  batch_size=args.per_device_train_batch_size)
    eval_dataloader = DataLoader(eval_dataset, collate_fn=collator, batch_size=args.per_device_eval_batch_size)

    # 4. Optimizer (MultiMax parameters without weight decay) and learning-rate schedule.
    optimizer = make_optimizer(model, args)
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )

    # 5. Prepare everything for the devices and processes at hand.
    model, optimizer, train_dataloader, eval_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, scheduler
    )
    if args.with_tracking:
        accelerator.init_trackers(f"hf_multimax_{task.name}", {k: v for k, v in vars(args).items()
                                                                  if isinstance(v, (int, float, str, bool))})

    # 6. Train, evaluating after every epoch.
    result = train(accelerator, model, optimizer, scheduler, train_dataloader, args,
                   evaluate=lambda: task.evaluate(accelerator, model, eval_dataloader, args, preprocessor),
                   count_labels=lambda batch: task.label_count(batch["labels"]))
    if not result.metrics:  # resumed after the last epoch: nothing ran
        result.metrics = task.evaluate(accelerator, model, eval_dataloader, args, preprocessor)
    if args.with_tracking:
        accelerator.end_training()

    tail = [loss for _, loss in result.losses[-max(1, len(result.losses) // 10):]]
    results = {
        "task": task.name,
        "attn_implementation": args.attn_implementation,
        "metrics": result.metrics,
        "train_loss": sum(tail) / len(tail) if tail else float("nan"),
        "losses": result.losses,
        "time_per_step": result.time_per_step,
        "steps": result.completed_steps,
        "epochs": result.epochs,
        "output_dir": args.output_dir,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type).rpartition(".")[2],
    }
    if getattr(args, "check_replicas", False):
        results["replica_check"] = {"steps": result.replica_checks, "max_abs_diff": result.replica_max_abs_diff}
    logger.info("%s: %s", task.metric, result.metrics.get(task.metric))

    # 7. Save (and push).
    if args.output_dir is not None:
        save_model(accelerator, model, preprocessor, args, results)
        if args.push_to_hub and accelerator.is_main_process:
            push_to_hub(task, args, results)
    return results
