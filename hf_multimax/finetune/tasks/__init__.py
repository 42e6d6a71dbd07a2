"""The fine-tuning tasks, by name (the ``--task`` of ``hf-multimax compare``)."""

from .base import TINY_CONFIGS, Task, load_raw_datasets
from .lm import CausalLMTask
from .translation import TranslationTask, load_sacrebleu
from .vision import ImageClassificationTask

__all__ = [
    "TASKS",
    "TINY_CONFIGS",
    "Task",
    "CausalLMTask",
    "TranslationTask",
    "ImageClassificationTask",
    "get_task",
    "load_raw_datasets",
    "load_sacrebleu",
]

TASKS: dict[str, Task] = {task.name: task for task in (CausalLMTask(), TranslationTask(), ImageClassificationTask())}


def get_task(name: str) -> Task:
    """The task registered under ``name`` (``lm``, ``translation`` or ``vit``)."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}") from None
