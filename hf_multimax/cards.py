"""Model cards for MultiMax checkpoints: read what a saved folder holds, plot its σ, render the card template.

Everything here works on a folder written by ``save_pretrained`` (a full model or a PEFT adapter), so the card
describes exactly the files that are uploaded. The template is a Jinja file rendered with
``huggingface_hub.ModelCard.from_template``; the default one ships inside the package
(``hf_multimax/model_cards/multimax_model_card.md``) so that a non-editable install has it too.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from .config import FLAG_DEFAULTS
from .modules import SegLU

logger = logging.getLogger(__name__)

__all__ = [
    "CARD_TAG",
    "PLOT_FILENAME",
    "CheckpointSummary",
    "default_template_path",
    "describe_folder",
    "read_multimax_parameters",
    "seglu_tree",
    "build_eval_results",
    "write_model_card",
]

#: Tag every card written here carries (besides ``multimax``); also how ``hub.push_to_hub`` recognises its own folders.
CARD_TAG = "hf-multimax"
#: The σ-vs-identity figure written next to the card and referenced from it.
PLOT_FILENAME = "multimax_sigma.png"
DEFAULT_TEMPLATE = "multimax_model_card.md"
PARAMETER_KEY = re.compile(r"^(?P<module>.+)\.multimax_(?P<kind>ranges|ts)$")
#: Prefixes PEFT puts in front of the wrapped model's parameter names.
PEFT_PREFIXES = ("base_model.model.",)
#: (Auto class, name of its ``*_MAPPING_NAMES`` in ``transformers.models.auto.modeling_auto``), most specific first.
AUTO_CLASSES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
)
#: PEFT ``task_type`` -> Auto class, for adapter folders (which carry no ``config.json``).
PEFT_TASK_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
#: Keys of an ``eval_results`` dict that describe the task and data rather than a metric.
EVAL_CONTEXT_KEYS = ("task_type", "task_name", "dataset_type", "dataset_name", "dataset_config", "dataset_split")


def default_template_path() -> Path:
    """The packaged card template (``hf_multimax/model_cards/multimax_model_card.md``)."""
    return Path(str(resources.files("hf_multimax") / "model_cards" / DEFAULT_TEMPLATE))


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def read_multimax_parameters(folder: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module_name: (ranges, ts)}`` (float32, CPU) for every SegLU stored in the folder's safetensors files.

    Only the MultiMax tensors are read. PEFT's ``base_model.model.`` prefix is removed, so names match the model.
    """
    from safetensors import safe_open

    found: dict[str, dict[str, torch.Tensor]] = {}
    for path in weight_files(Path(folder)):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                match = PARAMETER_KEY.match(key)
                if match is None:
                    continue
                module = match["module"]
                for prefix in PEFT_PREFIXES:
                    module = module.removeprefix(prefix)
                found.setdefault(module, {})[match["kind"]] = f.get_tensor(key).float()
    incomplete = sorted(name for name, pair in found.items() if len(pair) != 2)
    if incomplete:
        raise ValueError(f"{folder}: MultiMax module(s) {incomplete} have only one of multimax_ranges / multimax_ts")
    return {name: (pair["ranges"], pair["ts"]) for name, pair in sorted(found.items(), key=lambda kv: natural_key(kv[0]))}


def natural_key(name: str) -> list[Any]:
    """Sort ``layers.10`` after ``layers.2``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def seglu_tree(parameters: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """An ``nn.Module`` holding a :class:`SegLU` per entry, at the same dotted names, with the given parameters.

    Lets :func:`hf_multimax.plots.plot_modulators` draw a folder's σ without building (or downloading) the model.
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


def is_attention_module(name: str) -> bool:
    """Whether a SegLU name belongs to an attention module (``self_attn``, ``attention.self``, ``SelfAttention``...)
    rather than an output head (``lm_head``, ``classifier``...)."""
    return any("attn" in part.lower() or "attention" in part.lower() for part in name.split(".")[:-1])


def infer_flags(parameters: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """The MultiMax flags that give the stored parameter shapes (for adapter folders, which have no config.json).
    ``multimax_init`` cannot be known and is left out."""
    attention = [ranges for name, (ranges, _) in parameters.items() if is_attention_module(name)]
    reference = attention[0] if attention else next(iter(parameters.values()))[0]
    return {
        "multimax_order": int(reference.shape[-1] // 2),
        "multimax_per_head": bool(attention and attention[0].dim() == 2),
        "multimax_output": any(not is_attention_module(name) for name in parameters),
    }


def auto_class_for(architecture: str | None, peft_task_type: str | None = None) -> str:
    """The Auto class that loads ``architecture`` (e.g. ``LlamaForCausalLM`` -> ``AutoModelForCausalLM``)."""
    if architecture:
        from transformers.models.auto import modeling_auto

        for auto_name, mapping_name in AUTO_CLASSES:
            for value in getattr(modeling_auto, mapping_name, {}).values():
                if architecture == value or (isinstance(value, tuple) and architecture in value):
                    return auto_name
    return PEFT_TASK_AUTO_CLASSES.get(peft_task_type or "", "AutoModel")


@dataclass
class CheckpointSummary:
    """What a saved folder holds, as far as the card needs it.

    Attributes:
        is_adapter: a PEFT adapter folder (``adapter_config.json``) rather than a full model (``config.json``).
        parameters: ``{module_name: (ranges, ts)}`` of every SegLU in the weights.
        flags: the MultiMax flags (from ``config.json``; inferred from the shapes for adapters unless given).
        architecture: e.g. ``LlamaForCausalLM`` (``None`` for an adapter folder without it).
        model_type: e.g. ``llama``.
        auto_class: the Auto class of the usage snippet.
        base_model: an adapter's ``base_model_name_or_path``.
        peft_type: an adapter's ``peft_type`` (``LORA``...).
        has_tokenizer / has_image_processor: the folder holds a tokenizer / an image processor.
        files: the folder's files (relative names, sorted).
    """

    is_adapter: bool
    parameters: dict[str, tuple[torch.Tensor, torch.Tensor]]
    flags: dict[str, Any]
    architecture: str | None = None
    model_type: str | None = None
    auto_class: str = "AutoModel"
    base_model: str | None = None
    peft_type: str | None = None
    has_tokenizer: bool = False
    has_image_processor: bool = False
    files: list[str] = field(default_factory=list)


def describe_folder(
    folder: str | Path, flags: Mapping[str, Any] | None = None, architecture: str | None = None
) -> CheckpointSummary:
    """Summarise a ``save_pretrained`` folder (full model or PEFT adapter) for its card.

    Args:
        folder: the folder.
        flags: MultiMax flags to report for an adapter (the base model's config); inferred from shapes if ``None``.
        architecture: the base model's class name for an adapter, when known.
    """
    folder = Path(folder)
    parameters = read_multimax_parameters(folder)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    common = dict(
        has_tokenizer=(folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file(),
        has_image_processor=(folder / "preprocessor_config.json").is_file(),
        files=files,
    )
    if (folder / "adapter_config.json").is_file():
        adapter = json.loads((folder / "adapter_config.json").read_text())
        resolved = dict(infer_flags(parameters) if parameters else {})
        resolved.update(flags or {})
        return CheckpointSummary(
            is_adapter=True,
            parameters=parameters,
            flags=resolved,
            architecture=architecture,
            auto_class=auto_class_for(architecture, adapter.get("task_type")),
            base_model=adapter.get("base_model_name_or_path"),
            peft_type=adapter.get("peft_type"),
            **common,
        )
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a saved model: it has neither config.json nor adapter_config.json")
    config = json.loads((folder / "config.json").read_text())
    architecture = (config.get("architectures") or [None])[0]
    resolved = {name: config[name] for name in FLAG_DEFAULTS if name in config} if parameters else {}
    return CheckpointSummary(
        is_adapter=False,
        parameters=parameters,
        flags=resolved,
        architecture=architecture,
        model_type=config.get("model_type"),
        auto_class=auto_class_for(architecture),
        **common,
    )


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


def parameter_rows(parameters: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, Any]]:
    """One row per SegLU for the card's table. Per-head parameters are summarised by their mean over heads, with
    every head's values in ``heads``."""
    rows = []
    for name, (ranges, ts) in parameters.items():
        per_head = ranges.dim() == 2
        rows.append(
            {
                "name": name.removesuffix(".multimax"),
                "kind": "attention" if is_attention_module(name) else "output head",
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


def write_model_card(
    folder: str | Path,
    repo_id: str,
    *,
    summary: CheckpointSummary | None = None,
    base_model: str | None = None,
    datasets: str | Sequence[str] | None = None,
    eval_results: Any = None,
    pipeline_tag: str | None = None,
    license: str | None = "apache-2.0",
    template_path: str | Path | None = None,
    extra_tags: Iterable[str] = (),
) -> ModelCard:
    """Write ``README.md`` (and the σ plot, ``multimax_sigma.png``) into a saved model or adapter folder.

    Args:
        folder: a ``save_pretrained`` folder.
        repo_id: the Hub repository the card is for (its name heads the card and the usage snippet).
        summary: :func:`describe_folder` of ``folder`` (computed if ``None``).
        base_model: Hub id of the model this one was fine-tuned from (metadata ``base_model``).
        datasets: Hub ids of the training datasets.
        eval_results: see :func:`build_eval_results`.
        pipeline_tag, license: card metadata.
        template_path: a Jinja template (default: :func:`default_template_path`).
        extra_tags: tags added to ``multimax`` / ``hf-multimax``.
    """
    from . import __version__
    from .plots import plot_modulators

    folder = Path(folder)
    summary = summary or describe_folder(folder)
    datasets = [datasets] if isinstance(datasets, str) else list(datasets or []) or None
    model_name = repo_id.split("/")[-1]
    base_model = base_model or (summary.base_model if summary.is_adapter else None)

    plot = None
    if summary.parameters:
        title = f"{model_name}: learned MultiMax σ(x) per layer (dashed: identity = SoftMax)"
        plot = plot_modulators(seglu_tree(summary.parameters), folder / PLOT_FILENAME, title=title).name
    else:
        logger.warning("%s holds no MultiMax parameters; its card says so", folder)

    tags = (["multimax"] if summary.parameters else []) + [CARD_TAG]
    if summary.is_adapter:
        tags += ["peft"] + ([summary.peft_type.lower()] if summary.peft_type else [])
    if summary.model_type:
        tags.append(summary.model_type)
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
        rows=parameter_rows(summary.parameters),
        any_per_head=any(ranges.dim() == 2 for ranges, _ in summary.parameters.values()),
        columns=list(range(2 * order)),
        plot=plot,
        eval_rows=[
            {"metric": r.metric_name or r.metric_type, "value": r.metric_value, "dataset": r.dataset_name,
             "split": r.dataset_split or ""}
            for r in card_data.eval_results or []
        ],
        hf_multimax_version=__version__,
    )
    card = ModelCard(re.sub(r"\n{3,}", "\n\n", card.content))  # template conditionals leave runs of blank lines
    card.save(folder / "README.md")
    return card
