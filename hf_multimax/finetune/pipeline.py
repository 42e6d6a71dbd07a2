"""The story of the fine-tuning scripts, written once (:func:`run`): parse arguments → build the ``Accelerator`` → load
and preprocess the data → build the model (a local folder, a Hub name, or a tiny from-scratch config) with the chosen
attention implementation and MultiMax flags → optional LoRA → optimizer (MultiMax parameters without weight decay) and
scheduler → ``accelerator.prepare`` → training loop (:mod:`.loop`) → evaluation → ``save_pretrained`` (and an
optional push to the Hub). What differs between scripts lives in a :class:`~hf_multimax.finetune.tasks.Task`.

Runs unchanged on CPU, one GPU, or several processes with ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import registry
from ..integrations.peft import lora_modules_to_save
from ..integrations.transformers import register_named_comparators
from ..training.distributed import full_state_dict, launched_without_accelerator
from ..training.optim import multimax_parameter_groups
from .arguments import multimax_flags
from .loop import train
from .sampling import LengthGroupedSampler, sequence_lengths
from .tasks import TINY_CONFIGS, Task

logger = logging.getLogger(__name__)

__all__ = [
    "setup_logging",
    "make_accelerator",
    "build_model",
    "apply_lora",
    "make_optimizer",
    "save_model",
    "push_to_hub",
    "run",
]


def setup_logging(accelerator) -> None:
    """INFO logs on the main process, errors only elsewhere (as the Transformers examples)."""
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if accelerator.is_main_process else logging.ERROR,
    )
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
    return accelerator


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

    Pretrained: ``from_pretrained(..., attn_implementation=..., multimax_*=...)``. From scratch: the tiny config is
    built with eager SoftMax attention first and switched with ``set_attn_implementation``, so that two runs from the
    same seed start from identical weights whatever the attention (MultiMax's own parameters are created on top of
    them).
    """
    auto_class = _auto_class(task)
    implementation = args.attn_implementation
    register_named_comparators([implementation])  # "sparsemax", "entmax15"...: registered only when named
    flags = multimax_flags(args)
    if args.model_name_or_path:
        model = auto_class.from_pretrained(
            args.model_name_or_path,
            attn_implementation=implementation,
            **flags,
            **task.pretrained_kwargs(args, preprocessor, raw),
        )
    else:
        config = tiny_config(task, args, preprocessor, raw)
        for name, value in flags.items():
            setattr(config, name, value)
        model_class = _model_class(auto_class, config)
        parametric = registry.parametric(implementation) is not None
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
    """Wrap ``model`` in a PEFT LoRA model. The modules that hold learned attention parameters (``multimax``,
    ``entmax_alpha``...: :func:`hf_multimax.integrations.peft.lora_modules_to_save`) and a new classification head
    are ``modules_to_save``: trained in full and written to ``adapter_model.safetensors`` with the adapters."""
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules.split(",") if args.lora_target_modules else default_lora_targets(model)
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        modules_to_save=lora_modules_to_save(model) + list(task.lora_modules_to_save),
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


def save_model(accelerator, model: nn.Module, preprocessor: Any, args: argparse.Namespace, results: dict) -> None:
    """``save_pretrained`` of the unwrapped model (the adapter, with MultiMax parameters, under LoRA; gathered whole
    under FSDP), the tokenizer or image processor, and ``all_results.json``."""
    accelerator.wait_for_everyone()
    state_dict = full_state_dict(accelerator, model)  # gathered from the shards under FSDP / ZeRO-3 (all processes)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        args.output_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=state_dict,
    )
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
        logger.warning(
            "hf_multimax.hub is not available in this installation: the model is saved locally in %s "
            "and was not pushed",
            args.output_dir,
        )
        return None
    metrics = dict(results.get("metrics") or {})
    dataset = args.dataset_name
    if dataset is None:  # local files or the embedded default: describe them for the card's model-index
        dataset = "local files" if args.train_file else task.default_dataset
    eval_results = (
        dict(metrics, dataset_type=dataset, dataset_name=dataset, dataset_split="validation") if metrics else None
    )
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
        logger.error(
            "push to the Hub failed (%s: %s); the model is saved in %s", type(error).__name__, error, args.output_dir
        )
        return None


def run(task: Task, args: argparse.Namespace) -> dict:
    """Train, evaluate and save one model for ``task``; return the results (also in ``all_results.json``).

    Returns ``{"task", "attn_implementation", "metrics", "train_loss", "losses", "time_per_step", "steps",
    "epochs", "output_dir"}``, where ``train_loss`` is the mean of the last 10% of the training losses, and with
    ``--group_by_length`` ``"loss_period"``: the steps after which the batch lengths, and with them the loss, repeat.
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

    # 3. Model with the chosen attention and MultiMax flags; optional LoRA. Only now, with the inputs known to load,
    #    is the output folder created.
    model = build_model(task, args, preprocessor, raw)
    if args.output_dir is not None and accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    if args.lora:
        if args.model_name_or_path is None and args.output_dir is not None and accelerator.is_main_process:
            # A from-scratch base has no home on disk: keep it so that the adapter can be loaded again.
            base_dir = Path(args.output_dir) / "base_model"
            model.save_pretrained(base_dir)
            model.config.name_or_path = model.name_or_path = str(base_dir.resolve())
        model = apply_lora(task, args, model)
    collator = task.collator(args, preprocessor, model)
    sampler = None
    if getattr(args, "group_by_length", False):  # text tasks only
        sampler = LengthGroupedSampler(sequence_lengths(train_dataset), args.per_device_train_batch_size, args.seed)
        # Evaluation too: sorted by length (its metrics do not depend on the order), so generation pads little.
        eval_lengths = sequence_lengths(eval_dataset)
        eval_dataset = eval_dataset.select(sorted(range(len(eval_lengths)), key=eval_lengths.__getitem__))
    train_dataloader = DataLoader(
        train_dataset,
        sampler=sampler,
        shuffle=sampler is None,
        collate_fn=collator,
        batch_size=args.per_device_train_batch_size,
    )
    eval_dataloader = DataLoader(eval_dataset, collate_fn=collator, batch_size=args.per_device_eval_batch_size)

    # 4. Optimizer (MultiMax parameters without weight decay) and learning-rate schedule.
    optimizer = make_optimizer(model, args)
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )

    # 5. Prepare everything for the devices and processes at hand.
    model, optimizer, train_dataloader, eval_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, scheduler
    )
    if args.with_tracking:
        accelerator.init_trackers(
            f"hf_multimax_{task.name}", {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        )

    # 6. Train, evaluating after every epoch.
    result = train(
        accelerator,
        model,
        optimizer,
        scheduler,
        train_dataloader,
        args,
        evaluate=lambda: task.evaluate(accelerator, model, eval_dataloader, args, preprocessor),
        count_labels=lambda batch: task.label_count(batch["labels"]),
    )
    if not result.metrics:  # resumed after the last epoch: nothing ran
        result.metrics = task.evaluate(accelerator, model, eval_dataloader, args, preprocessor)
    if args.with_tracking:
        accelerator.end_training()

    tail = [loss for _, loss in result.losses[-max(1, len(result.losses) // 10) :]]
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
    if sampler is not None:
        # Each process takes every num_processes-th batch, and a step accumulates several: the loss's period in steps.
        per_step = accelerator.num_processes * args.gradient_accumulation_steps
        results["loss_period"] = max(1, round(sampler.batches_per_group / per_step))
    if getattr(args, "check_replicas", False):
        results["replica_check"] = {"steps": result.replica_checks, "max_abs_diff": result.replica_max_abs_diff}
    logger.info("%s: %s", task.metric, result.metrics.get(task.metric))

    # 7. Save (and push).
    if args.output_dir is not None:
        save_model(accelerator, model, preprocessor, args, results)
        if args.push_to_hub and accelerator.is_main_process:
            push_to_hub(task, args, results)
    return results
