"""Reading a saved folder: what it is, which learned attention parameters it holds, which flags and which attention
implementation it was trained with. The one reader the model card, ``push``, ``analyze`` and ``compare`` use.

A folder is what ``save_pretrained`` writes: a full model (``config.json`` + safetensors) or a PEFT adapter
(``adapter_config.json`` + ``adapter_model.safetensors``, whose keys carry PEFT's ``base_model.model.`` prefix).
Whether a SegLU belongs to an attention layer or to the output head is decided from the model's structure: the
architecture named by the config (or the adapter's base model's config, when it can be found offline) is built on the
meta device (no memory, no weights) and its parameter modules are looked up
(:func:`hf_multimax.registry.parameter_modules`).
When no config can be found (an adapter whose base model is not available here), the roles stay unknown (``None``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import registry
from .config import FLAG_DEFAULTS
from .modeling import SEGLU_ATTRIBUTE

logger = logging.getLogger(__name__)

__all__ = ["SavedModule", "Checkpoint", "NotAModelError", "read_checkpoint", "auto_class_for", "natural_key"]

#: Prefixes PEFT puts in front of the wrapped model's parameter names in an adapter's weights.
PEFT_PREFIXES = ("base_model.model.",)
#: Written next to a model by the fine-tuning scripts: records the attention implementation a run used.
RESULTS_FILE = "all_results.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json",)
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


class NotAModelError(ValueError):
    """A folder that ``save_pretrained`` did not write (no ``config.json`` and no ``adapter_config.json``)."""


@dataclass
class SavedModule:
    """One module of learned attention parameters in a saved folder.

    Attributes:
        name: the module's name in the model (``model.layers.0.self_attn.multimax``; PEFT's prefix removed).
        attribute: ``"multimax"`` (a SegLU) or another registered attribute (``"entmax_alpha"``).
        role: ``"attention"``, ``"output"`` (the output head's σ of ``multimax_output``) or ``None`` when the folder's
            structure cannot be known (see the module docstring).
        tensors: parameter name -> float32 CPU tensor.
    """

    name: str
    attribute: str
    role: str | None
    tensors: dict[str, torch.Tensor]


@dataclass
class Checkpoint:
    """What a saved folder holds (see :func:`read_checkpoint`).

    Attributes:
        path: the folder.
        is_adapter: a PEFT adapter folder rather than a full model.
        modules: every module of learned attention parameters, in natural order of their names.
        flags: the ``multimax_*`` flags: ``config.json``'s (or the base model's), else inferred from the parameter
            shapes (``multimax_init`` cannot be inferred; ``multimax_output`` only when the roles are known).
        attn_implementation: the implementation the folder was trained with, when the folder tells: the one whose
            parameters its attention modules hold, else the one recorded by the fine-tuning scripts in
            ``all_results.json``; ``None`` when it cannot tell (e.g. a SoftMax model from elsewhere).
        architecture, model_type, auto_class: e.g. ``LlamaForCausalLM``, ``llama``, ``AutoModelForCausalLM``.
        config: the model's (or adapter base model's) ``config.json`` as a dict, when available.
        base_model, peft_type: an adapter's ``base_model_name_or_path`` and ``peft_type``.
        has_tokenizer, has_image_processor: whether the folder holds a tokenizer / an image processor.
        files: the folder's files (relative names, sorted).
    """

    path: Path
    is_adapter: bool
    modules: list[SavedModule]
    flags: dict[str, Any]
    attn_implementation: str | None = None
    architecture: str | None = None
    model_type: str | None = None
    auto_class: str = "AutoModel"
    config: dict[str, Any] | None = None
    base_model: str | None = None
    peft_type: str | None = None
    has_tokenizer: bool = False
    has_image_processor: bool = False
    files: list[str] = field(default_factory=list)

    @property
    def multimax_parameters(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module name: (ranges, ts)}`` of every SegLU (attention layers and output head)."""
        return {
            m.name: (m.tensors["multimax_ranges"], m.tensors["multimax_ts"])
            for m in self.modules
            if m.attribute == SEGLU_ATTRIBUTE
        }

    def role(self, name: str) -> str | None:
        """The role of the module called ``name``."""
        return next((m.role for m in self.modules if m.name == name), None)


def natural_key(name: str) -> list[Any]:
    """Sort ``layers.10`` after ``layers.2``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def auto_class_for(architecture: str | None, peft_task_type: str | None = None) -> str:
    """The Auto class that loads ``architecture`` (e.g. ``LlamaForCausalLM`` -> ``AutoModelForCausalLM``)."""
    if architecture:
        from transformers.models.auto import modeling_auto

        for auto_name, mapping_name in AUTO_CLASSES:
            for value in getattr(modeling_auto, mapping_name, {}).values():
                if architecture == value or (isinstance(value, tuple) and architecture in value):
                    return auto_name
    return PEFT_TASK_AUTO_CLASSES.get(peft_task_type or "", "AutoModel")


def _saved_parameters(folder: Path) -> dict[str, dict[str, Any]]:
    """``{module name: {"attribute", "tensors"}}`` of the registered parameters in the folder's safetensors files;
    only those tensors are read."""
    from safetensors import safe_open

    found: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = key
                for prefix in PEFT_PREFIXES:
                    name = name.removeprefix(prefix)
                parsed = registry.parameter_key(name)
                if parsed is None:
                    continue
                owner, attribute, parameter = parsed
                module = f"{owner}.{attribute}" if owner else attribute
                entry = found.setdefault(module, {"attribute": attribute, "tensors": {}})
                entry["tensors"][parameter] = f.get_tensor(key).float()
    return found


def _structural_roles(config: Any, architecture: str | None, implementation: str | None) -> dict[str, str] | None:
    """``{module name: role}`` of the parameter modules of the model ``config`` describes, built on the meta device
    with ``implementation`` (and the output head's σ when the config says ``multimax_output``); ``None`` when the
    model cannot be built here."""
    import transformers

    model_class = getattr(transformers, architecture, None) if architecture else None
    try:
        with torch.device("meta"):
            if model_class is not None:
                model = model_class._from_config(config, attn_implementation=implementation or "eager")
            else:
                model = transformers.AutoModel.from_config(config, attn_implementation=implementation or "eager")
    except Exception as error:  # an architecture this Transformers lacks, custom code...: roles stay unknown
        logger.info(
            "could not build %s on the meta device to read its structure (%s: %s)",
            architecture,
            type(error).__name__,
            error,
        )
        return None
    return {_saved_name(model, found): found.role for found in registry.parameter_modules(model)}


def _saved_name(model, found: registry.ParameterModule) -> str:
    """The name a parameter module has in the saved weights: Transformers may rename modules between the model in
    memory and its checkpoint format (e.g. ViT's ``vit.layers.0`` is saved as ``vit.encoder.layer.0``)."""
    parameter, tensor = next(found.module.named_parameters())
    key = f"{found.name}.{parameter}"
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # Transformers without weight conversion: names are saved as they are
        return found.name
    reverted = list(revert_weight_conversion(model, {key: tensor}))
    return reverted[0].rpartition(".")[0] if len(reverted) == 1 else found.name


def _load_config(source: str | Path | None):
    """The Transformers config at ``source`` (a folder or a Hub name found in the local cache), or ``None``."""
    if not source:
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError) as error:
        logger.info("no config for %s available offline (%s)", source, error)
        return None


def _recorded_implementation(folder: Path) -> str | None:
    path = folder / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("attn_implementation")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _inferred_flags(modules: list[SavedModule], roles_known: bool) -> dict[str, Any]:
    """The MultiMax flags that give the stored SegLU shapes (for folders without a config that records them)."""
    seglus = [m for m in modules if m.attribute == SEGLU_ATTRIBUTE]
    if not seglus:
        return {}
    attention = [m for m in seglus if m.role != "output"]
    reference = (attention or seglus)[0].tensors["multimax_ranges"]
    flags: dict[str, Any] = {
        "multimax_order": int(reference.shape[-1] // 2),
        "multimax_per_head": bool(attention and attention[0].tensors["multimax_ranges"].dim() == 2),
    }
    if roles_known:
        flags["multimax_output"] = any(m.role == "output" for m in seglus)
    return flags


def read_checkpoint(
    folder: str | Path,
    *,
    base_config: Any = None,
    flags: Mapping[str, Any] | None = None,
    architecture: str | None = None,
) -> Checkpoint:
    """Read a ``save_pretrained`` folder (a full model or a PEFT adapter).

    Args:
        folder: the folder.
        base_config: for an adapter, its base model's config (a ``PreTrainedConfig``) when the caller has it; else it
            is looked up from ``adapter_config.json``'s ``base_model_name_or_path`` (local folder or local Hub cache).
        flags: MultiMax flags to report instead of the ones read or inferred (e.g. a live base model's).
        architecture: for an adapter, the base model's class name, when known.

    Raises:
        FileNotFoundError: ``folder`` does not exist or is not a folder.
        NotAModelError: the folder has neither ``config.json`` nor ``adapter_config.json``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist or is not a folder")
    is_adapter = (folder / "adapter_config.json").is_file()
    if not is_adapter and not (folder / "config.json").is_file():
        raise NotAModelError(f"{folder} is not a saved model: it has neither config.json nor adapter_config.json")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    adapter: dict[str, Any] = json.loads((folder / "adapter_config.json").read_text()) if is_adapter else {}
    config = base_config if is_adapter else _load_config(folder)
    if is_adapter and config is None:
        config = _load_config(adapter.get("base_model_name_or_path"))
    config_dict = config.to_dict() if config is not None else None
    if architecture is None and config_dict is not None:
        architecture = (config_dict.get("architectures") or [None])[0]
    saved = _saved_parameters(folder)

    roles: dict[str, str] | None = None
    if saved and config is not None:
        guess = registry.implementation_of(entry["attribute"] for entry in saved.values())
        roles = _structural_roles(config, architecture, guess)
    modules = [
        SavedModule(name, entry["attribute"], roles.get(name) if roles is not None else None, entry["tensors"])
        for name, entry in sorted(saved.items(), key=lambda kv: natural_key(kv[0]))
    ]
    implementation = registry.implementation_of(m.attribute for m in modules if m.role != "output")
    implementation = implementation or _recorded_implementation(folder)

    resolved: dict[str, Any] = {}
    if config_dict is not None and any(m.attribute == SEGLU_ATTRIBUTE for m in modules):
        resolved = {name: config_dict[name] for name in FLAG_DEFAULTS if name in config_dict}
    if not resolved:
        resolved = _inferred_flags(modules, roles is not None)
    resolved.update(flags or {})
    return Checkpoint(
        path=folder,
        is_adapter=is_adapter,
        modules=modules,
        flags=resolved,
        attn_implementation=implementation,
        architecture=architecture,
        model_type=config_dict.get("model_type") if config_dict else None,
        auto_class=auto_class_for(architecture, adapter.get("task_type")),
        config=config_dict,
        base_model=adapter.get("base_model_name_or_path") if is_adapter else None,
        peft_type=adapter.get("peft_type") if is_adapter else None,
        has_tokenizer=any((folder / name).is_file() for name in TOKENIZER_FILES),
        has_image_processor=any((folder / name).is_file() for name in IMAGE_PROCESSOR_FILES),
        files=files,
    )
