"""The shared body of the fine-tuning scripts in ``examples/`` and of ``hf-multimax compare``: arguments
(:mod:`.arguments`), the loop and its checkpoints (:mod:`.loop`), the run from data to saved model
(:mod:`.pipeline`), and what each task does differently (:mod:`.tasks`)."""

from .arguments import build_parser, make_args, multimax_flags, parse_args
from .loop import CheckpointError, TrainResult, train
from .pipeline import apply_lora, build_model, make_accelerator, make_optimizer, run, save_model
from .tasks import TASKS, Task, get_task

__all__ = [
    "TASKS",
    "CheckpointError",
    "Task",
    "TrainResult",
    "apply_lora",
    "build_model",
    "build_parser",
    "get_task",
    "make_accelerator",
    "make_args",
    "make_optimizer",
    "multimax_flags",
    "parse_args",
    "run",
    "save_model",
    "train",
]
