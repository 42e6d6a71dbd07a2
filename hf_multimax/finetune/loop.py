"""The training loop of the fine-tuning scripts (the loop of Transformers' ``run_*_no_trainer.py``), with checkpoints
that appear under their final name only when complete, and exact resumption."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..training.clipping import clip_grad_norm_
from ..training.distributed import replica_divergence

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "train", "token_weight", "find_checkpoint", "save_checkpoint", "CheckpointError"]

STATE_FILE = "training_state.json"
CHECKPOINT_NAME = re.compile(r"^(step|epoch)_(\d+)$")


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
        raise RuntimeError(
            f"after step {result.completed_steps} the processes disagree on {name} (largest "
            f"difference {diff:.3g}): its gradients were not synchronised across processes"
        )


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be resumed from; the message names the file at fault."""


def _read_state(path: Path) -> dict | None:
    """The loop state saved in checkpoint ``path`` (``None`` for a checkpoint without one, written by another script);
    raise :class:`CheckpointError` naming the file when it is there but unreadable."""
    state_file = path / STATE_FILE
    if not state_file.exists():
        return None
    try:
        state = json.loads(state_file.read_text())
        int(state["completed_steps"])
        list(state["losses"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{state_file} is not a complete training state ({type(error).__name__}: {error}): the checkpoint was "
            "not written to the end (e.g. the run was killed while saving); resume from an earlier one, or from "
            "'latest', which skips incomplete checkpoints"
        ) from error
    return state


def _completed_steps(path: Path, state: dict | None, steps_per_epoch: int) -> int:
    if state is not None:
        return int(state["completed_steps"])
    match = CHECKPOINT_NAME.match(path.name)
    if match is None:
        raise CheckpointError(
            f"{path} has no {STATE_FILE} and its name is not step_N or epoch_N, so the step it was saved at is unknown"
        )
    kind, number = match.groups()
    return int(number) * (steps_per_epoch if kind == "epoch" else 1)


def find_checkpoint(args: argparse.Namespace, steps_per_epoch: int = 1) -> tuple[Path, dict | None]:
    """The checkpoint ``--resume_from_checkpoint`` names and its loop state: a folder, or ``latest``: the newest
    complete ``step_N`` / ``epoch_N`` folder in ``--output_dir`` (one log line says which, and which incomplete ones
    it skipped)."""
    if args.resume_from_checkpoint != "latest":
        path = Path(args.resume_from_checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {path} is not a folder")
        return path, _read_state(path)
    folder = Path(args.output_dir)
    candidates = (
        [p for p in folder.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)] if folder.is_dir() else []
    )
    complete, skipped = [], []
    for path in candidates:
        try:
            state = _read_state(path)
            complete.append((_completed_steps(path, state, steps_per_epoch), path, state))
        except CheckpointError as error:
            skipped.append(f"{path.name} ({str(error).split(':')[0]})")
    if not complete:
        found = f"; incomplete: {', '.join(skipped)}" if skipped else ""
        raise FileNotFoundError(f"no complete step_N or epoch_N checkpoint in {args.output_dir} to resume from{found}")
    steps, path, state = max(complete, key=lambda entry: (entry[0], entry[1].name))
    logger.info(
        "Resuming from %s, the newest complete checkpoint (step %d)%s",
        path,
        steps,
        f"; skipped incomplete {', '.join(skipped)}" if skipped else "",
    )
    return path, state


def save_checkpoint(accelerator, args: argparse.Namespace, name: str, result: TrainResult) -> Path:
    """``accelerator.save_state`` (model, optimizer, scheduler, RNG states) plus the loop position and loss history,
    written to a hidden staging folder that is renamed to ``name`` once complete: a run killed while saving leaves
    no folder under a checkpoint's name (the staging folder is cleared on the next save)."""
    output_dir = Path(args.output_dir)
    final, staging, old = output_dir / name, output_dir / f".{name}.incomplete", output_dir / f".{name}.replaced"
    if accelerator.is_main_process:
        for leftover in (staging, old):
            if leftover.exists():
                shutil.rmtree(leftover)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()  # every process's shards and RNG state are in the staging folder
    if accelerator.is_main_process:
        state = {"completed_steps": result.completed_steps, "losses": result.losses}
        partial = staging / f"{STATE_FILE}.partial"
        partial.write_text(json.dumps(state))
        os.replace(partial, staging / STATE_FILE)
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


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
        path, state = find_checkpoint(args, steps_per_epoch)
        result.completed_steps = _completed_steps(path, state, steps_per_epoch)
        result.losses = [tuple(x) for x in state["losses"]] if state is not None else []
        accelerator.print(f"Resuming from checkpoint {path} (step {result.completed_steps})")
        try:
            accelerator.load_state(str(path))
        except Exception as error:  # a truncated or foreign folder: name it instead of Accelerate's traceback
            raise CheckpointError(
                f"{path} could not be loaded as an Accelerate checkpoint ({type(error).__name__}: {error})"
            ) from error
        starting_epoch = result.completed_steps // steps_per_epoch
        skip_batches = (result.completed_steps % steps_per_epoch) * args.gradient_accumulation_steps

    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info("  Num examples = %d", len(train_dataloader.dataset))
    logger.info("  Num epochs = %d, total optimization steps = %d", num_epochs, args.max_train_steps)
    logger.info(
        "  Batch size per device = %d, total (parallel, distributed, accumulated) = %d",
        args.per_device_train_batch_size,
        total_batch,
    )
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed and args.max_grad_norm:
        logger.warning(
            "DeepSpeed clips gradients itself (its `gradient_clipping` setting, one global norm): "
            "--max_grad_norm and --multimax_output_clip do not apply"
        )
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
                    clip_grad_norm_(
                        model, args.max_grad_norm, output_clip=getattr(args, "multimax_output_clip", "separate")
                    )
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
                accelerator.log(
                    {"train_loss": mean_loss, "lr": scheduler.get_last_lr()[0]}, step=result.completed_steps
                )
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
