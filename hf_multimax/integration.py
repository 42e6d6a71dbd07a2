"""Transformers glue: registers ``"multimax"`` and gives every model that selects it its MultiMax parameters.

Everything that touches Transformers' classes happens here, once, in :func:`register` (called on ``import
hf_multimax``):

* ``AttentionInterface`` / ``AttentionMaskInterface``: the attention function and its mask function, under one name.
* ``PreTrainedConfig``: validated properties for the ``multimax_*`` flags, so ``from_pretrained(..., multimax_order=3)``
  lands on the config (Transformers otherwise hands unknown keyword arguments to the model's ``__init__``) and the
  flags are written to ``config.json``.
* ``PreTrainedModel.post_init`` and ``set_attn_implementation``: attach a :class:`SegLU` (``<attention>.multimax``) to
  every attention module that dispatches through the interface, and to the output head when ``multimax_output``.
  ``post_init`` runs inside ``from_pretrained``'s meta-device context, so the parameters are created there, loaded
  like any other weight, and initialised only when the checkpoint lacks them.
* ``PreTrainedModel._initialize_weights``: initialises ``SegLU`` modules (models' own ``_init_weights`` do not know
  them); ``_adjust_missing_and_unexpected_keys``: refuses MultiMax parameters of the wrong shape and warns when a
  checkpoint's MultiMax parameters would be dropped.
* ``transformers.Trainer``: MultiMax parameters stay out of weight decay, and output-layer MultiMax is clipped as
  :func:`hf_multimax.training.clip_grad_norm_` does (see :mod:`hf_multimax.training`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import multimax_attention_forward, multimax_eager_attention_forward
from .config import FLAG_DEFAULTS, MultiMaxSettings, flag_property
from .modules import SegLU
from .training import patch_trainer_clipping, patch_trainer_weight_decay

logger = logging.getLogger(__name__)

__all__ = [
    "MULTIMAX",
    "MULTIMAX_IMPLEMENTATIONS",
    "MultiMaxWarning",
    "register",
    "attach_multimax",
    "ParametricAttention",
    "register_parametric_attention",
    "routes_through_interface",
    "multimax_modules",
    "output_head",
]

MULTIMAX = "multimax"
#: Every attention implementation name that runs MultiMax and so needs MultiMax parameters: the default (fused when
#: available) and the plain reference path (which also returns the attention weights).
MULTIMAX_IMPLEMENTATIONS = {MULTIMAX: multimax_attention_forward, "multimax_eager": multimax_eager_attention_forward}
#: Names of the attributes that may hold an attention module's number of (query) heads.
HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_heads", "n_head")
#: Attributes that hold a classification head on ``*ForSequenceClassification`` / ``*ForImageClassification``.
CLASSIFIER_ATTRIBUTES = ("score", "classifier", "classification_head")
#: Class names of models with an output head (base models such as ``LlamaModel`` have none and are left alone).
HEAD_MODEL_NAME = re.compile(r"For[A-Z]\w*$|LMHeadModel$")
MULTIMAX_KEY = re.compile(r"(^|\.)multimax_(ranges|ts)$")


class MultiMaxWarning(UserWarning):
    """MultiMax parameters or flags that would have no effect (e.g. a MultiMax checkpoint loaded without MultiMax)."""


@functools.cache
def routes_through_interface(cls: type) -> bool:
    """Whether a module class dispatches its attention through ``ALL_ATTENTION_FUNCTIONS.get_interface``.

    Transformers itself decides this from the source (``PreTrainedModel._can_set_attn_implementation``); we look at
    the class and its bases so that inherited ``forward`` methods count. Models themselves never qualify.
    """
    if issubclass(cls, PreTrainedModel):
        return False
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if "ALL_ATTENTION_FUNCTIONS.get_interface(" in source:
            return True
    return False


def governed_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, PreTrainedConfig]]:
    """Yield ``(name, module, config)`` for every module, with the config that selects its attention: the module's
    own ``config`` if it has one, else that of the nearest enclosing ``PreTrainedModel``."""
    stack: list[tuple[str, nn.Module, PreTrainedConfig]] = [("", model, model.config)]
    while stack:
        name, module, config = stack.pop()
        if isinstance(module, PreTrainedModel):
            config = module.config
        own = getattr(module, "config", None)
        yield name, module, own if isinstance(own, PreTrainedConfig) else config
        for child_name, child in reversed(list(module.named_children())):
            stack.append((f"{name}.{child_name}" if name else child_name, child, config))


def head_count(module: nn.Module, config: PreTrainedConfig) -> int:
    for attribute in HEAD_COUNT_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(config, "num_attention_heads", None)
    if isinstance(value, int) and value > 0:
        return value
    raise ValueError(
        f"`multimax_per_head=True` needs the number of heads of {type(module).__name__}, which has none of the "
        f"attributes {HEAD_COUNT_ATTRIBUTES} and whose config has no `num_attention_heads`; use multimax_per_head=False"
    )


def placement(owner: nn.Module) -> dict:
    """``device`` and ``dtype`` keyword arguments for parameters that join ``owner`` (its first parameter's; the meta
    device inside ``from_pretrained``)."""
    reference = next(owner.parameters(recurse=True), None)
    device = reference.device if reference is not None else None
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else None
    return {"device": device, "dtype": dtype}


def new_seglu(owner: nn.Module, settings: MultiMaxSettings, num_heads: int | None) -> SegLU:
    """A SegLU on ``owner``'s device and dtype."""
    return SegLU(settings.order, num_heads, settings.init, **placement(owner))


def output_head(model: PreTrainedModel) -> nn.Module | None:
    """The module whose output is the model's logits: the LM head, or a classification head (None for base models)."""
    head = model.get_output_embeddings()
    if isinstance(head, nn.Module):
        return head
    for attribute in CLASSIFIER_ATTRIBUTES:
        head = getattr(model, attribute, None)
        if isinstance(head, nn.Module):
            return head
    return None


def modulate_logits(head: nn.Module, args: tuple, logits: torch.Tensor) -> torch.Tensor:
    """Forward hook of an output head: logits -> σ(logits), computed in float32."""
    return head.multimax(logits.float()).to(logits.dtype)


def attach_output_multimax(model: PreTrainedModel, settings: MultiMaxSettings) -> bool:
    head = output_head(model)
    if head is None:
        if HEAD_MODEL_NAME.search(type(model).__name__):
            raise ValueError(
                f"`multimax_output=True` but {type(model).__name__} has no output head MultiMax knows "
                f"(get_output_embeddings() or one of {CLASSIFIER_ATTRIBUTES}); allowed: causal-LM, seq2seq-LM, "
                "sequence- and image-classification models"
            )
        return False
    if getattr(head, "multimax", None) is None:
        head.multimax = new_seglu(head, settings, None)
    if getattr(head, "_multimax_hook", None) is None:
        head._multimax_hook = head.register_forward_hook(modulate_logits)
    return True


@dataclass(frozen=True)
class ParametricAttention:
    """An attention implementation whose attention modules carry learnable parameters of their own.

    Attributes:
        attribute: name of the child module that holds them on each attention module (``"multimax"``).
        build: ``build(attention_module, config) -> nn.Module`` creating that child on the attention module's device
            and dtype (called inside ``from_pretrained``'s meta-device context too). Its class must be listed in
            ``module_types`` and have ``reset_parameters()``, which ``from_pretrained`` calls when the checkpoint lacks
            the parameters (use ``transformers.initialization`` helpers there: they skip loaded tensors).
        module_types: classes of the children ``build`` returns.
    """

    attribute: str
    build: Callable[[nn.Module, PreTrainedConfig], nn.Module]
    module_types: tuple[type, ...]


def build_attention_seglu(module: nn.Module, config: PreTrainedConfig) -> SegLU:
    settings = MultiMaxSettings.from_config(config)
    settings.write_to(config)  # recorded explicitly, so config.json reloads the same model
    return new_seglu(module, settings, head_count(module, config) if settings.per_head else None)


#: attention implementation name -> its parameters. Other modules add entries with `register_parametric_attention`.
PARAMETRIC_ATTENTION: dict[str, ParametricAttention] = {
    name: ParametricAttention("multimax", build_attention_seglu, (SegLU,)) for name in MULTIMAX_IMPLEMENTATIONS
}


def register_parametric_attention(
    name: str,
    function: Callable,
    parameters: ParametricAttention | None = None,
    mask_function: Callable = sdpa_mask,
) -> None:
    """Register an attention function and its mask function under ``name`` and, when it has learnable parameters,
    attach them to attention modules of every model that selects it (as for ``"multimax"``)."""
    AttentionInterface.register(name, function)
    # Registered under the same name: an attention function without a mask function of its name silently gets
    # `attention_mask=None`. `sdpa_mask` gives a boolean mask (True = attend), or None for purely causal / unmasked
    # attention, which the attention function resolves from `module.is_causal`.
    AttentionMaskInterface.register(name, mask_function)
    if parameters is not None:
        PARAMETRIC_ATTENTION[name] = parameters


def attach_multimax(model: PreTrainedModel) -> int:
    """Give every attention module of ``model`` the parameters its attention implementation needs (MultiMax's SegLU,
    or those of another registered parametric implementation), and the output head its SegLU when
    ``multimax_output``. Return how many attention modules got or have parameters. Idempotent."""
    count = 0
    for _, module, config in governed_modules(model):
        spec = PARAMETRIC_ATTENTION.get(config._attn_implementation)
        if spec is None or not routes_through_interface(type(module)):
            continue
        if getattr(module, spec.attribute, None) is None:
            setattr(module, spec.attribute, spec.build(module, config))
        count += 1
    implementation = model.config._attn_implementation
    if implementation in PARAMETRIC_ATTENTION and count == 0:
        raise ValueError(
            f"{type(model).__name__} does not route its attention through Transformers' AttentionInterface, so "
            f"attn_implementation={implementation!r} cannot apply to it (it would silently run SoftMax). Supported "
            "models call `ALL_ATTENTION_FUNCTIONS.get_interface(...)` in their attention layers (Llama, Qwen2, "
            "Mistral, Gemma, GPT-2, BERT, ViT, T5, BART, Marian and most recent models)."
        )
    if model.config.multimax_output:
        settings = MultiMaxSettings.from_config(model.config)
        if attach_output_multimax(model, settings):
            settings.write_to(model.config)
    return count


def multimax_modules(model: nn.Module) -> dict[str, SegLU]:
    """Every SegLU in ``model`` by module name (attention layers and output head)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SegLU)}


#: id(config) -> (parametric implementation, weak references to the models built with it on that config object).
_PARAMETRIC_MODELS_BY_CONFIG: dict[int, tuple[str, list[weakref.ref]]] = {}


def check_shared_config(model: PreTrainedModel) -> None:
    """Warn when ``model`` switched the attention of another, live model with learned attention parameters (MultiMax
    or another parametric implementation) built on the same config object.

    ``AutoModel*.from_config(config, attn_implementation=...)`` keeps a reference to ``config`` and sets
    ``config._attn_implementation`` in place, so a second model built from the same object silently changes what the
    first one runs.
    """
    config = model.config
    previous, refs = _PARAMETRIC_MODELS_BY_CONFIG.get(id(config), (None, []))
    owners = [ref for ref in refs if (m := ref()) is not None and m.config is config]
    current = config._attn_implementation
    if owners and current != previous:
        submodules = {id(m) for m in model.modules()}
        others = [ref() for ref in owners if id(ref()) not in submodules]
        if others:
            warnings.warn(
                f"This {type(model).__name__} was built from the same config object as a live {type(others[0]).__name__} "
                f"with {previous!r} attention, and Transformers set `config._attn_implementation={current!r}` on that "
                f"shared object: that model now runs {current!r} too and ignores its learned attention parameters. "
                "Build each model from its own config (`copy.deepcopy(config)`).",
                MultiMaxWarning,
                stacklevel=3,
            )
        owners = []  # warned once for this config object
    if current in PARAMETRIC_ATTENTION:
        owners.append(weakref.ref(model))
    if owners:
        _PARAMETRIC_MODELS_BY_CONFIG[id(config)] = (current, owners)
    else:
        _PARAMETRIC_MODELS_BY_CONFIG.pop(id(config), None)


# ---------------------------------------------------------------------------------------------------------------------
# Patches of PreTrainedModel / PreTrainedConfig, installed once by `register()`.


def patched_post_init(original):
    @functools.wraps(original)
    def post_init(self: PreTrainedModel) -> None:
        attach_multimax(self)
        check_shared_config(self)
        original(self)

    return post_init


def patched_set_attn_implementation(original):
    @functools.wraps(original)
    def set_attn_implementation(self: PreTrainedModel, attn_implementation, *args, **kwargs):
        result = original(self, attn_implementation, *args, **kwargs)
        attach_multimax(self)
        return result

    return set_attn_implementation


def parametric_module_types() -> tuple[type, ...]:
    return tuple({t for spec in PARAMETRIC_ATTENTION.values() for t in spec.module_types} | {SegLU})


def patched_initialize_weights(original):
    @functools.wraps(original)
    def _initialize_weights(self: PreTrainedModel, module: nn.Module, *args, **kwargs):
        if isinstance(module, parametric_module_types()):
            if not getattr(module, "_is_hf_initialized", False):
                module.reset_parameters()
                module._is_hf_initialized = True
            return None
        return original(self, module, *args, **kwargs)

    return _initialize_weights


def patched_adjust_keys(original):
    @functools.wraps(original)
    def _adjust_missing_and_unexpected_keys(self: PreTrainedModel, loading_info) -> None:
        check_loaded_multimax(self, loading_info)
        return original(self, loading_info)

    return _adjust_missing_and_unexpected_keys


def check_loaded_multimax(model: PreTrainedModel, loading_info) -> None:
    """Refuse checkpoint MultiMax parameters of the wrong shape; warn when checkpoint MultiMax parameters are dropped."""
    mismatched = [entry for entry in loading_info.mismatched_keys if MULTIMAX_KEY.search(entry[0])]
    if mismatched:
        # Remove them so that Transformers' own report does not replace this error with a generic RuntimeError.
        loading_info.mismatched_keys = set(loading_info.mismatched_keys) - set(mismatched)
        key, checkpoint_shape, model_shape = sorted(mismatched)[0]
        raise ValueError(
            f"MultiMax parameter `{key}` has shape {tuple(checkpoint_shape)} in the checkpoint but the model expects "
            f"{tuple(model_shape)}: the model was built with multimax_order={model.config.multimax_order!r} and "
            f"multimax_per_head={model.config.multimax_per_head!r} (shape (2N,) or (num_heads, 2N)), which differ from "
            "the checkpoint's; load it without overriding these flags"
        )
    dropped = sorted(key for key in loading_info.unexpected_keys if MULTIMAX_KEY.search(key))
    if dropped:
        warnings.warn(
            f"The checkpoint holds {len(dropped)} MultiMax parameters (e.g. `{dropped[0]}`) that "
            f"{type(model).__name__} does not use because it was loaded with "
            f"attn_implementation={model.config._attn_implementation!r}. They are dropped: load it with "
            "`import hf_multimax` and `from_pretrained(..., attn_implementation=\"multimax\")` to use them.",
            MultiMaxWarning,
            stacklevel=2,
        )
        logger.warning("MultiMax parameters in the checkpoint were dropped: %d keys, e.g. %s", len(dropped), dropped[0])


_REGISTERED = False


def register() -> None:
    """Register ``"multimax"`` with Transformers and install the hooks above. Safe to call more than once."""
    global _REGISTERED
    if _REGISTERED:
        return
    for name, function in MULTIMAX_IMPLEMENTATIONS.items():
        register_parametric_attention(name, function, PARAMETRIC_ATTENTION[name])
    for name in FLAG_DEFAULTS:
        setattr(PreTrainedConfig, name, flag_property(name))
    PreTrainedModel.post_init = patched_post_init(PreTrainedModel.post_init)
    PreTrainedModel.set_attn_implementation = patched_set_attn_implementation(PreTrainedModel.set_attn_implementation)
    PreTrainedModel._initialize_weights = patched_initialize_weights(PreTrainedModel._initialize_weights)
    PreTrainedModel._adjust_missing_and_unexpected_keys = patched_adjust_keys(
        PreTrainedModel._adjust_missing_and_unexpected_keys
    )
    patch_trainer_weight_decay()
    patch_trainer_clipping()
    _REGISTERED = True
