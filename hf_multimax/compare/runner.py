"""Training the same tiny model once per attention implementation, from the same seed and therefore the same initial
weights (a parametric implementation's own parameters are added on top), on the task's embedded offline data."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import registry
from ..finetune import make_args, run
from ..finetune.tasks import get_task

logger = logging.getLogger(__name__)

__all__ = ["compare", "COMPARE_DEFAULTS", "check_implementations", "uses_multimax"]

#: Per-task settings of the default comparison: a few minutes in total on a 2-core CPU.
COMPARE_DEFAULTS: dict[str, dict[str, Any]] = {
    "lm": {"max_train_steps": 500},
    "translation": {"max_train_steps": 600},
    "vit": {"max_train_steps": 500},
}


def uses_multimax(implementation: str) -> bool:
    """Whether ``implementation`` runs MultiMax (its parameters are the SegLU that the ``multimax_*`` flags shape)."""
    return registry.parametric(implementation) is registry.MULTIMAX_PARAMETERS


def check_implementations(implementations: Sequence[str]) -> list[str]:
    """The implementations as a list; ``ValueError`` naming the flag for an empty list, an unknown name or a
    duplicate, before anything is trained."""
    from transformers import AttentionInterface

    implementations = list(implementations)
    if not implementations:
        raise ValueError("--implementations needs at least one attention implementation (the first is the baseline)")
    known = sorted(set(AttentionInterface().valid_keys()) | {"eager"})
    unknown = [name for name in implementations if name not in known]
    if unknown:
        raise ValueError(f"--implementations: unknown attention implementation(s) {unknown}; known: {known}")
    duplicates = sorted({name for name in implementations if implementations.count(name) > 1})
    if duplicates:
        raise ValueError(f"--implementations lists {duplicates} more than once")
    return implementations


def compare(
    task_name: str,
    output_dir: str | Path,
    implementations: Sequence[str] = ("sdpa", "multimax"),
    seed: int = 0,
    max_train_steps: int | None = None,
    multimax_flags: Mapping[str, Any] | None = None,
    script_argv: Sequence[str] = (),
) -> dict[str, dict]:
    """Train one model per attention implementation and return ``{implementation: results of finetune.run}``.

    ``multimax_flags`` (``{"multimax_order": 3, ...}``) apply to the MultiMax implementations only, so the other
    runs stay what they are; ``script_argv`` (any flag of the example scripts) applies to every run.
    """
    task = get_task(task_name)
    implementations = check_implementations(implementations)
    steps = max_train_steps or COMPARE_DEFAULTS[task.name]["max_train_steps"]
    output_dir = Path(output_dir)
    results = {}
    for implementation in implementations:
        values: dict[str, Any] = dict(attn_implementation=implementation, output_dir=str(output_dir / implementation),
                                      seed=seed, max_train_steps=steps, eval_strategy="end")  # fmt: skip
        if uses_multimax(implementation):
            values.update({name: value for name, value in (multimax_flags or {}).items() if value is not None})
        args = make_args(task, script_argv, **values)
        logger.info("compare: training %s", implementation)
        results[implementation] = run(task, args)
    return results
