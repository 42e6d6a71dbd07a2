"""The attention implementations hf-multimax provides, and what each needs on a model: one table.

An *implementation* is a name for ``attn_implementation=`` and the attention function Transformers calls for it. A
*parametric* implementation also has learnable parameters of its own on every attention module (MultiMax's SegLU,
α-EntMax's α): :class:`ParametricAttention` says under which child attribute they live, how to build them and which
module classes hold them. Everything else derives from this table: which modules get parameters
(:func:`attach_parameters`), which parameters a model has and whether each belongs to an attention layer or the
output head (:func:`parameter_modules`), what LoRA must train in full (``modules_to_save``), which state-dict keys
are such parameters (:func:`parameter_key`) and which implementation they imply (:func:`implementation_of`), and
what Transformers registers (:mod:`hf_multimax.integrations.transformers`).

Nothing here touches Transformers' classes; it imports no ``transformers.modeling_utils`` at module level.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .attention import multimax_attention_forward, multimax_eager_attention_forward
from .comparators import COMPARATORS, ENTMAX_ALPHA_ATTRIBUTE, EntmaxAlphaParameters, build_entmax_alpha
from .config import FLAG_DEFAULTS, MultiMaxSettings
from .modeling import (
    OUTPUT_HOOK,
    SEGLU_ATTRIBUTE,
    SegLU,
    governed_modules,
    head_count,
    output_head,
    placement,
    routes_through_interface,
)

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

__all__ = [
    "MULTIMAX",
    "ParametricAttention",
    "Implementation",
    "ParameterModule",
    "IMPLEMENTATIONS",
    "COMPARATOR_IMPLEMENTATIONS",
    "get",
    "parametric",
    "add",
    "parameter_attributes",
    "parameter_module_types",
    "parameter_key",
    "implementation_of",
    "parameter_modules",
    "attach_parameters",
]

MULTIMAX = "multimax"
#: Class names of models with an output head (base models such as ``LlamaModel`` have none and are left alone).
HEAD_MODEL_NAME = re.compile(r"For[A-Z]\w*$|LMHeadModel$")
_PEFT_WRAPPER_CHILDREN = ("modules_to_save", "original_module")


@dataclass(frozen=True)
class ParametricAttention:
    """The learnable parameters an attention implementation keeps on every attention module.

    Attributes:
        attribute: the child module's attribute name on each attention module (``"multimax"``).
        build: ``build(attention_module, config) -> nn.Module`` creating that child on the attention module's device
            and dtype (called inside ``from_pretrained``'s meta-device context too). It must return an instance of
            one of ``module_types`` with ``reset_parameters()``, which ``from_pretrained`` calls when the checkpoint
            lacks the parameters (use ``transformers.initialization`` helpers there: they skip loaded tensors).
        module_types: classes of the children ``build`` returns.
        flags: config fields the parameters depend on; they are written to every config the parameters were built
            from and to the model's own, so that ``config.json`` reloads the same model.
    """

    attribute: str
    build: Callable[[nn.Module, PreTrainedConfig], nn.Module]
    module_types: tuple[type, ...]
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Implementation:
    """One ``attn_implementation`` name.

    Attributes:
        function: the attention function (Transformers' backend signature).
        parameters: its learnable parameters, or ``None``.
        weights_twin: the implementation that computes the same weights and returns them (``"multimax"`` ->
            ``"multimax_eager"``), for analyses that need the weights; ``None`` when this one returns them.
        mask_function: the mask function registered under the same name (default: Transformers' ``sdpa_mask``, a
            boolean mask or ``None`` for purely causal attention).
    """

    function: Callable
    parameters: ParametricAttention | None = None
    weights_twin: str | None = None
    mask_function: Callable | None = None


def build_attention_seglu(module: nn.Module, config: PreTrainedConfig) -> SegLU:
    """MultiMax's parameters for one attention module, per the ``multimax_*`` flags of ``config``."""
    settings = MultiMaxSettings.from_config(config)
    num_heads = head_count(module, config) if settings.per_head else None
    return SegLU(settings.order, num_heads, settings.init, **placement(module))


MULTIMAX_PARAMETERS = ParametricAttention(SEGLU_ATTRIBUTE, build_attention_seglu, (SegLU,), flags=tuple(FLAG_DEFAULTS))
ENTMAX_ALPHA_PARAMETERS = ParametricAttention(ENTMAX_ALPHA_ATTRIBUTE, build_entmax_alpha, (EntmaxAlphaParameters,))

#: The implementations ``import hf_multimax`` registers, by name. :func:`add` (``hf_multimax.register_attention``,
#: ``hf_multimax.register_comparators``) adds more.
IMPLEMENTATIONS: dict[str, Implementation] = {
    MULTIMAX: Implementation(multimax_attention_forward, MULTIMAX_PARAMETERS, weights_twin="multimax_eager"),
    "multimax_eager": Implementation(multimax_eager_attention_forward, MULTIMAX_PARAMETERS),
}
#: The paper's comparators, registered only on request (``hf_multimax.register_comparators()``): their names are
#: generic, and another package may claim them in Transformers' global attention registry.
COMPARATOR_IMPLEMENTATIONS: dict[str, Implementation] = {
    name: Implementation(function, ENTMAX_ALPHA_PARAMETERS if name == "entmax_alpha" else None)
    for name, function in COMPARATORS.items()
}


def get(name: str | None) -> Implementation | None:
    """The registered implementation called ``name`` (``None`` for Transformers' own, e.g. ``"sdpa"``)."""
    return IMPLEMENTATIONS.get(name) if isinstance(name, str) else None


def parametric(name: str | None) -> ParametricAttention | None:
    """The parameters implementation ``name`` keeps on attention modules, or ``None``."""
    implementation = get(name)
    return implementation.parameters if implementation is not None else None


def add(name: str, implementation: Implementation) -> None:
    """Add (or replace) an implementation in the table; its attribute must not clash with another's."""
    if implementation.parameters is not None:
        for other_name, other in IMPLEMENTATIONS.items():
            spec = other.parameters
            if (
                spec is not None
                and other_name != name
                and spec.attribute == implementation.parameters.attribute
                and spec is not implementation.parameters
            ):
                raise ValueError(
                    f"implementation {name!r} keeps its parameters under `{implementation.parameters.attribute}`, "
                    f"which {other_name!r} already uses for other parameters; choose another attribute"
                )
    IMPLEMENTATIONS[name] = implementation


def _known() -> dict[str, Implementation]:
    """Every implementation whose saved parameters this package recognises: the registered ones and the comparators
    (registered or not, so that a checkpoint trained with α-EntMax is recognised before it is registered)."""
    return {**COMPARATOR_IMPLEMENTATIONS, **IMPLEMENTATIONS}


def _specs() -> list[ParametricAttention]:
    seen: dict[int, ParametricAttention] = {}
    for implementation in _known().values():
        if implementation.parameters is not None:
            seen.setdefault(id(implementation.parameters), implementation.parameters)
    return list(seen.values())


def parameter_attributes() -> tuple[str, ...]:
    """Every child attribute that holds parameters of a registered implementation (``("multimax", "entmax_alpha")``)."""
    return tuple(dict.fromkeys(spec.attribute for spec in _specs()))


def parameter_module_types() -> tuple[type, ...]:
    """Every class of parameter module of a registered implementation (``SegLU``, ``EntmaxAlphaParameters``)."""
    return tuple(dict.fromkeys(t for spec in _specs() for t in spec.module_types))


def parameter_key(key: str) -> tuple[str, str, str] | None:
    """Split a state-dict key of a registered implementation's parameters into ``(module name, attribute, parameter
    name)``, e.g. ``model.layers.0.self_attn.multimax.multimax_ts`` -> ``("model.layers.0.self_attn", "multimax",
    "multimax_ts")``; ``None`` for any other key. A key matches when its next-to-last component is a registered
    attribute and its last a parameter name of that attribute's module class."""
    owner, _, rest = key.rpartition(".")
    module, _, attribute = owner.rpartition(".")
    for spec in _specs():
        if attribute == spec.attribute and rest in _parameter_names(spec):
            return module, attribute, rest
    return None


def _parameter_names(spec: ParametricAttention) -> frozenset[str]:
    names: set[str] = set()
    for module_type in spec.module_types:
        names |= set(getattr(module_type, "PARAMETER_NAMES", ()))
    return frozenset(names)


def implementation_of(attributes) -> str | None:
    """The parametric implementation whose parameters sit under ``attributes`` on a model's attention modules
    (``{"multimax"}`` -> ``"multimax"``, ``{"entmax_alpha"}`` -> ``"entmax_alpha"``), or ``None`` for none (a SoftMax
    model, or a parameter-free comparator). MultiMax's SegLU also serves output heads (``multimax_output``): when the
    roles are unknown and another implementation's attribute is present too, that one names the attention."""
    attributes, known = set(attributes), _known()
    names = [name for name, impl in known.items() if impl.parameters and impl.parameters.attribute in attributes]
    others = [name for name in names if known[name].parameters is not MULTIMAX_PARAMETERS]
    return (others or names or [None])[0]


@dataclass(frozen=True)
class ParameterModule:
    """One module of learnable attention parameters inside a model.

    Attributes:
        name: its name in ``model.named_modules()`` (under PEFT: the trained copy's name).
        module: the parameter module (a ``SegLU``, an ``EntmaxAlphaParameters``...).
        owner_name: the attention module or output head that carries it.
        attribute: its attribute on the owner (``"multimax"``).
        role: ``"attention"`` or ``"output"`` (the output head's SegLU of ``multimax_output``).
    """

    name: str
    module: nn.Module
    owner_name: str
    attribute: str
    role: str


def parameter_modules(model: nn.Module) -> list[ParameterModule]:
    """Every parameter module of a registered implementation in ``model``, found by structure: a child under a
    registered attribute whose class is registered, on its owner module (through PEFT's ``modules_to_save`` wrapper,
    both its trained copies and the frozen original). The role is ``"output"`` when the owner is an output head that
    applies σ to its logits (it carries the output hook), else ``"attention"``."""
    attributes, types = set(parameter_attributes()), parameter_module_types()
    found = []
    for owner_name, owner in model.named_modules():
        for attribute, child in owner.named_children():
            if attribute not in attributes:
                continue
            role = "output" if getattr(owner, OUTPUT_HOOK, None) is not None else "attention"
            prefix = f"{owner_name}.{attribute}" if owner_name else attribute
            for name, module in _unwrap(prefix, child):
                if isinstance(module, types):
                    found.append(ParameterModule(name, module, owner_name, attribute, role))
    return found


def _unwrap(name: str, child: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The child itself, or the modules PEFT's ``ModulesToSaveWrapper`` holds in its place."""
    if all(hasattr(child, part) for part in _PEFT_WRAPPER_CHILDREN):
        original = child.original_module
        if isinstance(original, nn.Module):
            yield f"{name}.original_module", original
        for adapter, copy in child.modules_to_save.items():
            yield f"{name}.modules_to_save.{adapter}", copy
        return
    yield name, child


# ---------------------------------------------------------------------------------------------------------------------
# Attaching parameters to a model


def modulate_logits(head: nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
    """Forward hook of an output head: logits -> σ(logits), computed in float32."""
    return getattr(head, SEGLU_ATTRIBUTE)(logits.float()).to(logits.dtype)


def attach_output_multimax(model: PreTrainedModel, settings: MultiMaxSettings) -> bool:
    """Give the output head its SegLU and the hook that applies it; False for a model without an output head."""
    head = output_head(model)
    if head is None:
        if HEAD_MODEL_NAME.search(type(model).__name__):
            raise ValueError(
                f"`multimax_output=True` but {type(model).__name__} has no output head MultiMax knows "
                "(get_output_embeddings(), `score`, `classifier` or `classification_head`); allowed: causal-LM, "
                "seq2seq-LM, sequence- and image-classification models"
            )
        return False
    if getattr(head, SEGLU_ATTRIBUTE, None) is None:
        setattr(head, SEGLU_ATTRIBUTE, SegLU(settings.order, None, settings.init, **placement(head)))
    if getattr(head, OUTPUT_HOOK, None) is None:
        setattr(head, OUTPUT_HOOK, head.register_forward_hook(modulate_logits))
    return True


def attach_parameters(model: PreTrainedModel) -> int:
    """Give every attention module of ``model`` the parameters of the implementation its config selects, and the
    output head its SegLU when ``multimax_output``; record the flags those parameters depend on in every config
    they were built from and in ``model.config`` (encoder-decoders such as T5 hold copies of the config in their
    stacks). Return how many attention modules have parameters. Idempotent."""
    count = 0
    used: dict[int, tuple[ParametricAttention, PreTrainedConfig]] = {}
    for _, module, config in governed_modules(model):
        spec = parametric(config._attn_implementation)
        if spec is None or not routes_through_interface(type(module)):
            continue
        if getattr(module, spec.attribute, None) is None:
            setattr(module, spec.attribute, spec.build(module, config))
        used[id(config)] = (spec, config)
        count += 1
    implementation = model.config._attn_implementation
    if parametric(implementation) is not None and count == 0:
        raise ValueError(
            f"{type(model).__name__} does not route its attention through Transformers' AttentionInterface, so "
            f"attn_implementation={implementation!r} cannot apply to it (it would silently run SoftMax). Supported "
            "models read `ALL_ATTENTION_FUNCTIONS` in their attention layers (Llama, Qwen2, Mistral, Gemma, GPT-2, "
            "BERT, ViT, T5, BART, Marian and most recent models)."
        )
    for spec, config in used.values():
        _record_flags(spec.flags, config, model.config)
    if model.config.multimax_output:
        settings = MultiMaxSettings.from_config(model.config)
        if attach_output_multimax(model, settings):
            _record_flags(MULTIMAX_PARAMETERS.flags, model.config, model.config)
    return count


def _record_flags(flags: tuple[str, ...], source: PreTrainedConfig, *targets: PreTrainedConfig) -> None:
    """Write ``flags`` (as ``source`` resolves them) explicitly on every target, so ``config.json`` records them."""
    for target in (source, *targets):
        for flag in flags:
            setattr(target, flag, getattr(source, flag))
