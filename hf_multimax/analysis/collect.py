"""Running a model once and recording what every attention module did: its weights, where they could be non-zero and
the pre-normalisation scores they were computed from (:func:`collect_attention`), then every metric per layer (the
paper's own measures included), the token similarity per hidden state and the learned σ / α (:func:`analyze_model`).

The scores are recorded by wrapping, for the one forward pass of the collection, the attention function each module
looks up in Transformers' ``ALL_ATTENTION_FUNCTIONS`` (a local override of that mapping, removed afterwards): the
wrapper computes ``Q·Kᵀ·scale + position_bias`` (plus the finite part of a float mask) with the same helper as the
reference paths (:func:`hf_multimax.attention.dense_scores`) and then calls the function the module would have called.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import registry
from ..attention import dense_scores, resolve_causal
from ..comparators import EntmaxAlphaParameters
from ..masking import score_mask
from ..modeling import multimax_modules, routes_through_interface
from .metrics import MODE_THRESHOLD, SPARSITY_THRESHOLD, attention_metrics, token_similarity
from .paper_measures import paper_measures

logger = logging.getLogger(__name__)

__all__ = [
    "AttentionMap",
    "ModelAnalysis",
    "weights_implementation",
    "returning_attention_weights",
    "collect_attention",
    "recording_scores",
    "analyze_model",
    "short_name",
]

#: Transformers' implementations that do not return attention weights -> the one that computes the same weights and
#: returns them (the registry's implementations say so themselves: ``Implementation.weights_twin``).
SOFTMAX_WEIGHTS_TWINS = {
    "sdpa": "eager",
    "flash_attention_2": "eager",
    "flash_attention_3": "eager",
    "flex_attention": "eager",
}
#: First components of module names that only say which model class holds the layers.
MODEL_PREFIXES = {"model", "base_model", "transformer", "vit", "bert", "roberta", "deit", "encoder_model"}


@dataclass
class AttentionMap:
    """The weights one attention module produced, where they were allowed to be non-zero, and the scores they were
    computed from (the normaliser's input before masking: ``Q·Kᵀ·scale`` plus any ``position_bias`` and the finite
    part of a float mask; for MultiMax the input of σ). ``scores`` is ``None`` when they could not be recorded (a
    module that does not look its attention function up in ``ALL_ATTENTION_FUNCTIONS``)."""

    name: str
    weights: torch.Tensor  # (batch, heads, q, k), float32, cpu
    valid: torch.Tensor  # bool, same shape
    scores: torch.Tensor | None = None  # float32, cpu, same shape


def weights_implementation(implementation: str | None) -> str:
    """The attention implementation that computes the same weights as ``implementation`` and returns them: fused
    ``"multimax"`` -> ``"multimax_eager"``, ``"sdpa"`` (and other fused SoftMax paths) -> ``"eager"``; the comparators
    and ``"multimax_eager"`` return their weights already."""
    if implementation is None:
        return "eager"
    registered = registry.get(implementation)
    if registered is not None:
        return registered.weights_twin or implementation
    return SOFTMAX_WEIGHTS_TWINS.get(implementation, implementation)


@contextmanager
def returning_attention_weights(model: nn.Module) -> Iterator[str]:
    """Temporarily switch ``model`` to the attention implementation that returns its weights; yields its name."""
    current = model.config._attn_implementation
    target = weights_implementation(current)
    if target != current:
        model.set_attn_implementation(target)
    try:
        yield target
    finally:
        if target != current:
            model.set_attn_implementation(current)


def _module_eager(module: nn.Module) -> Callable:
    """The ``eager_attention_forward`` of the modeling file that defines ``module``'s class: what Transformers calls
    for ``"eager"`` when the mapping has no entry of that name."""
    function = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if function is None:
        raise RuntimeError(
            f"{type(module).__module__} has no eager_attention_forward to record the scores of "
            f"{type(module).__name__} with"
        )
    return function


def _record_scores(module: nn.Module, query, key, value, attention_mask, scaling, kwargs: dict) -> torch.Tensor:
    """The scores a normaliser sees, computed as the reference paths compute them (float32, GQA heads repeated)."""
    scores, _, _ = dense_scores(
        module, query, key, value, attention_mask, scaling, kwargs.get("is_causal"), kwargs.get("position_bias")
    )
    if isinstance(attention_mask, torch.Tensor):
        _, bias = score_mask(attention_mask, False, scores.shape[-2], scores.shape[-1], scores.device)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
    return scores.detach().float().cpu()


@contextmanager
def recording_scores(names: set[str], sink: dict[nn.Module, torch.Tensor]) -> Iterator[None]:
    """While active, the attention functions registered (or defaulted to, for ``"eager"``) under ``names`` first store
    each calling module's pre-normalisation scores in ``sink[module]``, then run unchanged. Implemented as a local
    override of Transformers' ``ALL_ATTENTION_FUNCTIONS``, restored on exit."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as functions

    saved = {name: functions._local_mapping[name] for name in names if name in functions._local_mapping}

    def wrap(name: str) -> Callable:
        base = functions[name] if name in functions else None

        def recording(module, query, key, value, attention_mask, *args, **kwargs):
            scaling = kwargs.get("scaling", args[0] if args else None)
            sink[module] = _record_scores(module, query, key, value, attention_mask, scaling, kwargs)
            return (base or _module_eager(module))(module, query, key, value, attention_mask, *args, **kwargs)

        return recording

    wrappers = {name: wrap(name) for name in names}
    try:
        for name, wrapper in wrappers.items():
            functions[name] = wrapper
        yield
    finally:
        for name in wrappers:
            if name in saved:
                functions[name] = saved[name]
            else:
                functions._local_mapping.pop(name, None)


def _attention_modules(model: nn.Module) -> dict[nn.Module, str]:
    return {module: name for name, module in model.named_modules() if routes_through_interface(type(module))}


def _mask_argument(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, bool | None]:
    """The mask an attention module was called with (``attention_mask`` or T5's ``mask``) and any ``is_causal``."""
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = dict(kwargs)
    extra = bound.get("kwargs", {}) if isinstance(bound.get("kwargs"), dict) else {}
    mask = next((bound[name] for name in ("attention_mask", "mask") if isinstance(bound.get(name), torch.Tensor)), None)
    return mask, bound.get("is_causal", extra.get("is_causal"))


def _returned_weights(output: Any) -> torch.Tensor | None:
    """The attention weights in an attention module's output: its last 4-D tensor (T5 returns position_bias before)."""
    if not isinstance(output, tuple):
        return None
    for item in reversed(output):
        if isinstance(item, torch.Tensor) and item.dim() == 4:
            return item
    return None


def collect_attention(
    model: nn.Module, inputs: dict[str, torch.Tensor], record_scores: bool = True
) -> tuple[list[AttentionMap], Any]:
    """Run ``model`` once on ``inputs`` (no gradients) and record every attention module's weights, valid mask and
    (``record_scores``) pre-normalisation scores.

    The model is switched for the call to an implementation that returns weights (:func:`weights_implementation`)
    and asked for ``output_attentions=True`` and ``output_hidden_states=True``. Masks are taken from the attention
    modules' own arguments (boolean, additive float, or ``None`` + ``module.is_causal``), so padding, causality and
    cross-attention are all accounted for. Returns ``(maps in call order, model outputs)``.
    """
    modules = _attention_modules(model)
    masks: dict[nn.Module, tuple[torch.Tensor | None, bool | None]] = {}
    scores: dict[nn.Module, torch.Tensor] = {}
    maps: list[AttentionMap] = []

    def before(module, args, kwargs):
        masks[module] = _mask_argument(module, args, kwargs)

    def after(module, args, kwargs, output):
        weights = _returned_weights(output)
        if weights is None:
            raise RuntimeError(
                f"{type(module).__name__} ({modules[module]}) returned no attention weights with "
                f"attn_implementation={model.config._attn_implementation!r}"
            )
        mask, is_causal = masks.pop(module)
        causal = resolve_causal(module, mask, is_causal, weights.shape[-2])
        valid, _ = score_mask(mask, causal, weights.shape[-2], weights.shape[-1], weights.device)
        valid = torch.ones_like(weights, dtype=torch.bool) if valid is None else valid.expand_as(weights)
        recorded = scores.pop(module, None)
        if recorded is not None and recorded.shape != weights.shape:
            recorded = None  # not the scores these weights came from (e.g. a module that reshapes them itself)
        maps.append(AttentionMap(modules[module], weights.detach().float().cpu(), valid.cpu(), recorded))

    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
        with returning_attention_weights(model), torch.no_grad():
            names = (
                {
                    getattr(getattr(m, "config", None), "_attn_implementation", None)
                    or model.config._attn_implementation
                    for m in modules
                }
                if record_scores
                else set()
            )
            with recording_scores(names, scores):
                outputs = model(**inputs, output_attentions=True, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    if not maps:
        raise RuntimeError(
            f"{type(model).__name__} has no attention module that routes through Transformers' AttentionInterface"
        )
    if record_scores and any(m.scores is None for m in maps):
        missing = [m.name for m in maps if m.scores is None]
        logger.warning(
            "no pre-normalisation scores recorded for %d attention module(s) (%s): the paper's measures are NaN there",
            len(missing),
            ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else ""),
        )
    return maps, outputs


@dataclass
class ModelAnalysis:
    """What :func:`analyze_model` measured on one model."""

    label: str
    path: str
    architecture: str
    attn_implementation: str
    kind: str  # "text", "seq2seq" or "vision"
    maps: list[AttentionMap] = field(repr=False)
    layers: list[dict[str, Any]]
    overall: dict[str, float]
    token_similarity: list[float]
    modulators: dict[str, dict[str, list]]
    entmax_alpha: dict[str, list[float]]
    model: nn.Module | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "path": self.path,
            "architecture": self.architecture,
            "attn_implementation": self.attn_implementation,
            "kind": self.kind,
            "overall": self.overall,
            "layers": self.layers,
            "token_similarity": self.token_similarity,
            "modulators": self.modulators,
            "entmax_alpha": self.entmax_alpha,
        }


def short_name(name: str) -> str:
    """A module name without the model-class prefixes: ``model.layers.0.self_attn`` -> ``layers.0.self_attn``."""
    while name.partition(".")[0] in MODEL_PREFIXES and "." in name:
        name = name.partition(".")[2]
    return name


def learned_modulators(model: nn.Module) -> dict[str, dict[str, list]]:
    """Every SegLU's learned parameters: ``{module name: {"ranges": [...], "ts": [...]}}``."""
    return {
        name: {
            "ranges": seglu.multimax_ranges.detach().float().cpu().tolist(),
            "ts": seglu.multimax_ts.detach().float().cpu().tolist(),
        }
        for name, seglu in multimax_modules(model).items()
    }


def learned_alphas(model: nn.Module) -> dict[str, list[float]]:
    """Every ``"entmax_alpha"`` layer's α per head."""
    return {
        name: module.alpha().detach().cpu().tolist()
        for name, module in model.named_modules()
        if isinstance(module, EntmaxAlphaParameters)
    }


def _hidden_states(outputs: Any) -> tuple[torch.Tensor, ...] | None:
    for name in ("hidden_states", "encoder_hidden_states"):
        states = getattr(outputs, name, None)
        if states:
            return tuple(states)
    return None


#: The paper's own measures (:mod:`.paper_measures`) that :func:`analyze_model` adds to every layer.
PAPER_MEASURES = ("paper_multimodality", "paper_sparsity")


def _nanmean(values: list[float]) -> float:
    """Mean of the values that are not NaN; NaN when none is."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def analyze_model(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    label: str = "model",
    path: str = "",
    kind: str = "text",
    sparsity_threshold: float = SPARSITY_THRESHOLD,
    mode_threshold: float = MODE_THRESHOLD,
) -> ModelAnalysis:
    """Collect ``model``'s attention on ``inputs`` and compute every metric per layer (with per-head values), the
    paper's multi-modality and sparsity (:mod:`.paper_measures`, from the recorded scores), the token similarity per
    hidden state, and the learned σ / α. ``overall`` is the mean over layers of each layer's mean over heads; a
    paper measure undefined on a head or layer (NaN) is left out of those means."""
    maps, outputs = collect_attention(model, inputs)
    layers: list[dict[str, Any]] = []
    for attention in maps:
        metrics = attention_metrics(attention.weights, attention.valid, sparsity_threshold, mode_threshold)
        heads = attention.weights.shape[1]
        if attention.scores is not None:
            metrics.update(paper_measures(attention.scores, attention.weights, attention.valid))
        else:
            metrics.update({key: torch.full((heads,), math.nan) for key in PAPER_MEASURES})
        entry: dict[str, Any] = {"name": attention.name, "heads": heads}
        for key, per_head in metrics.items():
            entry[key] = _nanmean([float(v) for v in per_head])
            entry[f"{key}_per_head"] = [round(float(v), 6) for v in per_head]
        layers.append(entry)
    overall = {
        key: _nanmean([layer[key] for layer in layers])
        for key in layers[0]
        if key not in ("name", "heads") and not key.endswith("_per_head")
    }
    hidden = _hidden_states(outputs)
    similarity = []
    if hidden is not None:
        mask = inputs.get("attention_mask")
        for states in hidden:
            valid_tokens = mask if mask is not None and mask.shape == states.shape[:2] else None
            similarity.append(token_similarity(states, valid_tokens))
    return ModelAnalysis(
        label=label,
        path=path,
        architecture=type(model).__name__,
        attn_implementation=model.config._attn_implementation,
        kind=kind,
        maps=maps,
        layers=layers,
        overall=overall,
        token_similarity=similarity,
        modulators=learned_modulators(model),
        entmax_alpha=learned_alphas(model),
        model=model,
    )
