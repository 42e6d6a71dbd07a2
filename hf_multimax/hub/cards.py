"""Model cards for MultiMax checkpoints: plot a saved folder's σ and render the card template.

Everything here works on a folder written by ``save_pretrained`` (a full model or a PEFT adapter), read by
:func:`hf_multimax.checkpoint.read_checkpoint`, so the card describes exactly the files that are uploaded. The
template is a Jinja file rendered with ``huggingface_hub.ModelCard.from_template``; the default one is
``model_cards/multimax_model_card.md`` in the source tree, shipped in the package as ``hf_multimax.hub.templates``
so that a non-editable install has it too.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from .._version import __version__
from ..checkpoint import Checkpoint, read_checkpoint
from ..config import FLAG_DEFAULTS
from ..extras import require
from ..modeling import SEGLU_ATTRIBUTE, SegLU
from .remote_code import CONFIG_KEY

logger = logging.getLogger(__name__)

__all__ = [
    "CARD_TAG",
    "PLOT_FILENAME",
    "default_template_path",
    "seglu_tree",
    "build_eval_results",
    "write_model_card",
]

#: Tag every card written here carries (besides ``multimax``); also how ``hub.push_to_hub`` recognises its own folders.
CARD_TAG = "hf-multimax"
#: The σ-vs-identity figure written next to the card and referenced from it.
PLOT_FILENAME = "multimax_sigma.png"
DEFAULT_TEMPLATE = "multimax_model_card.md"
#: Keys of an ``eval_results`` dict that describe the task and data rather than a metric.
EVAL_CONTEXT_KEYS = ("task_type", "task_name", "dataset_type", "dataset_name", "dataset_config", "dataset_split")


def default_template_path() -> Path:
    """The packaged card template (``model_cards/multimax_model_card.md``, installed as
    ``hf_multimax.hub.templates``)."""
    return Path(str(resources.files("hf_multimax.hub.templates") / DEFAULT_TEMPLATE))


def seglu_tree(parameters: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """An ``nn.Module`` holding a :class:`SegLU` per entry, at the same dotted names, with the given parameters.

    Lets :func:`hf_multimax.analysis.plots.plot_modulators` draw a folder's σ without building (or downloading) the
    model.
    """
    root = nn.Module()
    for name, (ranges, ts) in parameters.items():
        num_heads = ranges.shape[0] if ranges.dim() == 2 else None
        seglu = SegLU(ranges.shape[-1] // 2, num_heads)
        with torch.no_grad():
            seglu.multimax_ranges.copy_(ranges)
            seglu.multimax_ts.copy_(ts)
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(leaf, seglu)
    return root


def build_eval_results(
    eval_results: Any, *, model_name: str, pipeline_tag: str | None, datasets: Sequence[str] | None
) -> list[EvalResult] | None:
    """Normalise ``eval_results`` to ``EvalResult`` objects (the model-index of the card metadata).

    Accepts a list of ``EvalResult``, a list of dicts of ``EvalResult`` fields, or a flat dict
    ``{metric_name: value}`` that may also hold any of ``task_type``, ``task_name``, ``dataset_type``,
    ``dataset_name``, ``dataset_config``, ``dataset_split``; missing ones default to ``pipeline_tag`` and the first
    dataset.
    """
    if eval_results is None or (hasattr(eval_results, "__len__") and len(eval_results) == 0):
        return None
    if isinstance(eval_results, Mapping):
        context = {key: eval_results[key] for key in EVAL_CONTEXT_KEYS if key in eval_results}
        metrics = {key: value for key, value in eval_results.items() if key not in EVAL_CONTEXT_KEYS}
        context.setdefault("task_type", pipeline_tag)
        context.setdefault("dataset_type", datasets[0] if datasets else None)
        context.setdefault("dataset_name", context["dataset_type"])
        missing = [key for key in ("task_type", "dataset_type") if not context.get(key)]
        if missing:
            raise ValueError(
                f"eval_results {dict(metrics)} need a task and a dataset for the card's model-index: pass "
                "pipeline_tag=... and datasets=[...], or put 'task_type' and 'dataset_type' in the dict"
            )
        bad = {key: value for key, value in metrics.items() if not isinstance(value, (int, float))}
        if bad:
            raise ValueError(f"eval_results values must be numbers, got {bad}")
        return [EvalResult(metric_type=name, metric_value=value, **context) for name, value in metrics.items()]
    results = []
    for entry in eval_results:
        if isinstance(entry, EvalResult):
            results.append(entry)
        elif isinstance(entry, Mapping):
            results.append(EvalResult(**entry))
        else:
            raise TypeError(f"eval_results entries must be EvalResult or dict, got {type(entry).__name__}")
    return results


def format_value(value: float) -> str:
    return f"{value:+.4f}"


ROLE_NAMES = {"attention": "attention", "output": "output head", None: "unknown (no config to tell)"}


def parameter_rows(checkpoint: Checkpoint) -> list[dict[str, Any]]:
    """One row per SegLU for the card's table. Per-head parameters are summarised by their mean over heads, with
    every head's values in ``heads``."""
    rows = []
    for name, (ranges, ts) in checkpoint.multimax_parameters.items():
        per_head = ranges.dim() == 2
        rows.append(
            {
                "name": name.removesuffix(f".{SEGLU_ATTRIBUTE}"),
                "kind": ROLE_NAMES[checkpoint.role(name)],
                "shape": str(tuple(ranges.shape)),
                "per_head": per_head,
                "ranges": [format_value(v) for v in (ranges.mean(0) if per_head else ranges).tolist()],
                "ts": [format_value(v) for v in (ts.mean(0) if per_head else ts).tolist()],
                "max_abs_t": f"{ts.abs().max().item():.4f}",
                "heads": [
                    {"ranges": [format_value(v) for v in r], "ts": [format_value(v) for v in t]}
                    for r, t in zip(ranges.tolist(), ts.tolist())
                ]
                if per_head
                else [],
            }
        )
    return rows


def recorded_implementation(folder: Path) -> str | None:
    """The ``attn_implementation`` a full model's ``config.json`` records (Transformers loads it unless the caller
    asks for another), or ``None``."""
    path = folder / "config.json"
    value = json.loads(path.read_text()).get("attn_implementation") if path.is_file() else None
    return value if isinstance(value, str) else None


def remote_code_info(folder: Path, pipeline_tag: str | None) -> dict[str, Any]:
    """What the card says about the folder's remote code: its file, versions and Auto classes, and the pipeline task
    to show (``None`` when Transformers has no pipeline for ``pipeline_tag``)."""
    from transformers.pipelines import get_supported_tasks

    config = json.loads((folder / "config.json").read_text())
    record = config.get(CONFIG_KEY) or {}
    return {
        "file": record.get("file"),
        "format": record.get("format"),
        "hf_multimax_version": record.get("hf_multimax_version"),
        "auto_classes": sorted(config.get("auto_map") or {}),
        "pipeline_task": pipeline_tag if pipeline_tag in get_supported_tasks() else None,
    }


def write_model_card(
    folder: str | Path,
    repo_id: str,
    *,
    summary: Checkpoint | None = None,
    base_model: str | None = None,
    datasets: str | Sequence[str] | None = None,
    eval_results: Any = None,
    pipeline_tag: str | None = None,
    license: str | None = "apache-2.0",
    template_path: str | Path | None = None,
    extra_tags: Iterable[str] = (),
    remote_code: bool = False,
) -> ModelCard:
    """Write ``README.md`` (and the σ plot, ``multimax_sigma.png``) into a saved model or adapter folder.

    Args:
        folder: a ``save_pretrained`` folder.
        repo_id: the Hub repository the card is for (its name heads the card and the usage snippet).
        summary: :func:`~hf_multimax.checkpoint.read_checkpoint` of ``folder`` (read if ``None``).
        base_model: Hub id of the model this one was fine-tuned from (metadata ``base_model``).
        datasets: Hub ids of the training datasets.
        eval_results: see :func:`build_eval_results`.
        pipeline_tag, license: card metadata.
        template_path: a Jinja template (default: :func:`default_template_path`).
        extra_tags: tags added to ``multimax`` / ``hf-multimax``.
        remote_code: the folder holds ``modeling_multimax.py`` (:mod:`.remote_code`): the card shows how to load it
            with ``trust_remote_code=True`` and tags it ``custom_code``, as the Hub does for such repositories.
    """
    require("hub", "hf_multimax.hub.write_model_card")
    from ..analysis.plots import plot_modulators

    folder = Path(folder)
    summary = summary or read_checkpoint(folder)
    parameters = summary.multimax_parameters
    datasets = [datasets] if isinstance(datasets, str) else list(datasets or []) or None
    model_name = repo_id.split("/")[-1]
    base_model = base_model or (summary.base_model if summary.is_adapter else None)

    plot = None
    if parameters:
        title = f"{model_name}: learned MultiMax σ(x) per layer (dashed: identity = SoftMax)"
        plot = plot_modulators(seglu_tree(parameters), folder / PLOT_FILENAME, title=title).name
    else:
        logger.warning("%s holds no MultiMax parameters; its card says so", folder)

    tags = (["multimax"] if parameters else []) + [CARD_TAG]
    if summary.is_adapter:
        tags += ["peft"] + ([summary.peft_type.lower()] if summary.peft_type else [])
    if summary.model_type:
        tags.append(summary.model_type)
    if remote_code:
        tags.append("custom_code")
    tags += [tag for tag in extra_tags if tag not in tags]
    multimax_meta = {key.removeprefix("multimax_"): value for key, value in summary.flags.items()}
    card_data = ModelCardData(
        library_name="peft" if summary.is_adapter else "transformers",
        tags=tags,
        base_model=base_model,
        datasets=datasets,
        license=license,
        pipeline_tag=pipeline_tag,
        model_name=model_name,
        eval_results=build_eval_results(
            eval_results, model_name=model_name, pipeline_tag=pipeline_tag, datasets=datasets
        ),
        multimax=multimax_meta or None,
    )
    order = summary.flags.get("multimax_order", FLAG_DEFAULTS["multimax_order"])
    summary.files = sorted(set(summary.files) | {"README.md"} | ({plot} if plot else set()))
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path or default_template_path()),
        repo_id=repo_id,
        model_name=model_name,
        summary=summary,
        flags=summary.flags,
        load_kwargs=[f"{name}={value!r}" for name, value in summary.flags.items() if name != "multimax_init"],
        rows=parameter_rows(summary),
        any_per_head=any(ranges.dim() == 2 for ranges, _ in parameters.values()),
        columns=list(range(2 * order)),
        plot=plot,
        eval_rows=[
            {
                "metric": r.metric_name or r.metric_type,
                "value": r.metric_value,
                "dataset": r.dataset_name,
                "split": r.dataset_split or "",
            }
            for r in card_data.eval_results or []
        ],
        hf_multimax_version=__version__,
        recorded_implementation=recorded_implementation(folder),
        remote_code=remote_code_info(folder, pipeline_tag) if remote_code else None,
    )
    card = ModelCard(re.sub(r"\n{3,}", "\n\n", card.content))  # template conditionals leave runs of blank lines
    card.save(folder / "README.md")
    return card
