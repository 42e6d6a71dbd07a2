"""Metrics of attention maps and the ``hf-multimax analyze`` command (the paper's analyses).

Metrics are pure functions of attention weights ``(batch, heads, q, k)`` and a boolean ``valid`` mask (True where a
query may attend a key; ``None`` = everything), each returning one value per head:

* :func:`sparsity`: share of the valid weights below a threshold; :func:`zero_fraction`: share exactly zero.
* :func:`modes`: number of weights above a threshold (0.1) per row: the modes a query attends to.
* :func:`multimodality`: the paper's ``1 - (p_(1) - p_(2))`` per row (1: two equal modes, 0: one mode), and
  :func:`residual_mass`: the mass on the small "residual" entries (at most the threshold) per row: the two sides of
  the paper's sparsity/multi-modality trade-off (a multi-modal map keeps a high ``multimodality``, a sparse one a low
  ``residual_mass``).
* :func:`entropy`: Shannon entropy of each row, in nats.
* :func:`token_similarity`: over-smoothing, the mean pairwise cosine similarity of a layer's token representations
  (Gong et al., 2021; the paper's Figure 4 for vision models).

:func:`collect_attention` runs a model once and records every attention module's weights and mask; :func:`analyze`
loads saved models and writes the figures (see :mod:`hf_multimax.analysis_plots`) and ``summary.md`` /
``summary.json``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cli import command

logger = logging.getLogger(__name__)

__all__ = [
    "AttentionMap",
    "ModelAnalysis",
    "sparsity",
    "zero_fraction",
    "modes",
    "multimodality",
    "residual_mass",
    "entropy",
    "attention_metrics",
    "token_similarity",
    "weights_implementation",
    "returning_attention_weights",
    "collect_attention",
    "analyze_model",
    "load_for_analysis",
    "detect_attn_implementation",
    "analyze",
]

#: Default thresholds: a weight below ``SPARSITY_THRESHOLD`` counts as (near) zero, one above ``MODE_THRESHOLD`` as a mode.
SPARSITY_THRESHOLD = 0.01
MODE_THRESHOLD = 0.1
#: Implementations that do not return attention weights -> the one that computes the same weights and returns them.
WEIGHTS_IMPLEMENTATIONS = {"multimax": "multimax_eager", "sdpa": "eager", "flash_attention_2": "eager",
                           "flash_attention_3": "eager", "flex_attention": "eager"}
#: First components of module names that only say which model class holds the layers.
MODEL_PREFIXES = {"model", "base_model", "transformer", "vit", "bert", "roberta", "deit", "encoder_model"}


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


def _valid(weights: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return torch.ones_like(weights, dtype=torch.bool)
    return valid.to(torch.bool).expand_as(weights)


def _per_head(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over every dimension but the head dimension (1), counting only where ``mask``."""
    dims = [0, *range(2, values.dim())]
    mask = mask.to(values.dtype)
    return (values * mask).sum(dims) / mask.sum(dims).clamp(min=1)


def sparsity(weights: torch.Tensor, valid: torch.Tensor | None = None, threshold: float = SPARSITY_THRESHOLD) -> torch.Tensor:
    """Share of the valid weights below ``threshold``, per head: shape ``(heads,)``."""
    valid = _valid(weights, valid)
    return _per_head((weights < threshold).float(), valid)


def zero_fraction(weights: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Share of the valid weights that are exactly zero, per head."""
    valid = _valid(weights, valid)
    return _per_head((weights == 0).float(), valid)


def _rows(valid: torch.Tensor) -> torch.Tensor:
    """Rows (queries) with at least one valid key: ``(batch, heads, q)``."""
    return valid.any(dim=-1)


def modes(weights: torch.Tensor, valid: torch.Tensor | None = None, threshold: float = MODE_THRESHOLD) -> torch.Tensor:
    """Mean number of valid weights above ``threshold`` per row, per head."""
    valid = _valid(weights, valid)
    count = ((weights > threshold) & valid).sum(dim=-1).float()
    return _per_head(count, _rows(valid))


def multimodality(weights: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's multi-modality ``1 - (p_(1) - p_(2))`` (largest minus second-largest weight) averaged over rows, per
    head: 1 for two equal modes, 0 for a one-hot row (or a single valid key). It reproduces the paper's Figure 1
    (right): SoftMax on (10, 8, -1) gives 0.24, SparseMax 0, any map on (10, 10, -1) 1."""
    valid = _valid(weights, valid)
    masked = weights.float().masked_fill(~valid, 0.0)
    k = min(2, weights.shape[-1])
    top = masked.topk(k, dim=-1).values
    second = top[..., 1] if k == 2 else torch.zeros_like(top[..., 0])
    return _per_head(1.0 - (top[..., 0] - second), _rows(valid))


def residual_mass(weights: torch.Tensor, valid: torch.Tensor | None = None, threshold: float = MODE_THRESHOLD) -> torch.Tensor:
    """Mean total weight on the valid entries at or below ``threshold`` per row, per head."""
    valid = _valid(weights, valid)
    mass = (weights.float() * ((weights <= threshold) & valid)).sum(dim=-1)
    return _per_head(mass, _rows(valid))


def entropy(weights: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Shannon entropy ``-Σ p log p`` (nats, ``0 log 0 = 0``) of each row, per head."""
    valid = _valid(weights, valid)
    p = weights.float() * valid
    h = -(torch.where(p > 0, p * torch.log(p.clamp(min=1e-38)), torch.zeros_like(p))).sum(dim=-1)
    return _per_head(h, _rows(valid))


def attention_metrics(
    weights: torch.Tensor,
    valid: torch.Tensor | None = None,
    sparsity_threshold: float = SPARSITY_THRESHOLD,
    mode_threshold: float = MODE_THRESHOLD,
) -> dict[str, torch.Tensor]:
    """Every metric above for one attention map: ``{name: (heads,) tensor}``."""
    weights = weights.float()
    return {
        "sparsity": sparsity(weights, valid, sparsity_threshold),
        "zeros": zero_fraction(weights, valid),
        "modes": modes(weights, valid, mode_threshold),
        "multimodality": multimodality(weights, valid),
        "residual_mass": residual_mass(weights, valid, mode_threshold),
        "entropy": entropy(weights, valid),
    }


def token_similarity(hidden: torch.Tensor, valid_tokens: torch.Tensor | None = None) -> float:
    """Mean pairwise cosine similarity of distinct tokens of ``hidden`` ``(batch, tokens, dim)``, averaged over the
    batch; ``valid_tokens`` ``(batch, tokens)`` leaves out padding. 1 means every token carries the same direction
    (over-smoothing)."""
    hidden = nn.functional.normalize(hidden.float(), dim=-1)
    if valid_tokens is None:
        valid_tokens = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    valid_tokens = valid_tokens.to(torch.bool)
    sims = []
    for h, v in zip(hidden, valid_tokens):
        h = h[v]
        n = h.shape[0]
        if n < 2:
            continue
        gram = h @ h.T
        sims.append(((gram.sum() - gram.diagonal().sum()) / (n * (n - 1))).item())
    return float(sum(sims) / len(sims)) if sims else float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# Collecting attention weights


@dataclass
class AttentionMap:
    """The weights one attention module produced, and where they were allowed to be non-zero."""

    name: str
    weights: torch.Tensor  # (batch, heads, q, k), float32, cpu
    valid: torch.Tensor  # bool, same shape


def weights_implementation(implementation: str | None) -> str:
    """The attention implementation that computes the same weights as ``implementation`` and returns them: fused
    ``"multimax"`` -> ``"multimax_eager"``, ``"sdpa"`` (and other fused SoftMax paths) -> ``"eager"``; the comparators
    and ``"multimax_eager"`` return their weights already."""
    if implementation is None:
        return "eager"
    return WEIGHTS_IMPLEMENTATIONS.get(implementation, implementation)


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


def _attention_modules(model: nn.Module) -> dict[nn.Module, str]:
    from transformers import PreTrainedModel

    from .integration import routes_through_interface

    return {
        module: name
        for name, module in model.named_modules()
        if not isinstance(module, PreTrainedModel) and routes_through_interface(type(module))
    }


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


def collect_attention(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[list[AttentionMap], Any]:
    """Run ``model`` once on ``inputs`` (no gradients) and record every attention module's weights and valid mask.

    The model is switched for the call to an implementation that returns weights (:func:`weights_implementation`)
    and asked for ``output_attentions=True`` and ``output_hidden_states=True``. Masks are taken from the attention
    modules' own arguments (boolean, additive float, or ``None`` + ``module.is_causal``), so padding, causality and
    cross-attention are all accounted for. Returns ``(maps in call order, model outputs)``.
    """
    from .attention import resolve_causal
    from .comparators import score_mask

    modules = _attention_modules(model)
    masks: dict[nn.Module, tuple[torch.Tensor | None, bool | None]] = {}
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
        maps.append(AttentionMap(modules[module], weights.detach().float().cpu(), valid.cpu()))

    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
        with returning_attention_weights(model), torch.no_grad():
            outputs = model(**inputs, output_attentions=True, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    if not maps:
        raise RuntimeError(f"{type(model).__name__} has no attention module that routes through Transformers' AttentionInterface")
    return maps, outputs


# ---------------------------------------------------------------------------------------------------------------------
# One model


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
    from .integration import multimax_modules

    return {
        name: {"ranges": seglu.multimax_ranges.detach().float().cpu().tolist(), "ts": seglu.multimax_ts.detach().float().cpu().tolist()}
        for name, seglu in multimax_modules(model).items()
    }


def learned_alphas(model: nn.Module) -> dict[str, list[float]]:
    """Every ``"entmax_alpha"`` layer's α per head."""
    from .comparators import EntmaxAlphaParameters

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
    token similarity per hidden state, and the learned σ / α."""
    maps, outputs = collect_attention(model, inputs)
    layers, totals, weights_sum = [], {}, 0.0
    for attention in maps:
        metrics = attention_metrics(attention.weights, attention.valid, sparsity_threshold, mode_threshold)
        entry: dict[str, Any] = {"name": attention.name, "heads": attention.weights.shape[1]}
        for key, per_head in metrics.items():
            entry[key] = float(per_head.mean())
            entry[f"{key}_per_head"] = [round(float(v), 6) for v in per_head]
        layers.append(entry)
        for key in metrics:
            totals[key] = totals.get(key, 0.0) + entry[key]
        weights_sum += 1
    overall = {key: value / weights_sum for key, value in totals.items()}
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


# ---------------------------------------------------------------------------------------------------------------------
# Loading saved models and building inputs


def _checkpoint_keys(path: Path) -> set[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    keys: set[str] = set()
    for file in path.glob("*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            keys |= set(f.keys())
    return keys


def detect_attn_implementation(path: str | Path) -> str:
    """The attention implementation a saved model was trained with, from what it saved:

    ``multimax_order`` in ``config.json`` -> ``"multimax"``; ``entmax_alpha`` parameters in the checkpoint ->
    ``"entmax_alpha"``; a directory named after a registered implementation (``hf-multimax compare`` saves to
    ``OUTPUT_DIR/<implementation>/``) -> that name; otherwise ``"eager"`` (SoftMax).
    """
    from transformers import AttentionInterface

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if "multimax_order" in config or any("multimax_order" in v for v in config.values() if isinstance(v, dict)):
        return "multimax"
    if any(".entmax_alpha." in key for key in _checkpoint_keys(path)):
        return "entmax_alpha"
    if path.name in AttentionInterface().valid_keys() or path.name == "eager":
        return path.name
    return "eager"


def load_for_analysis(path: str | Path, attn_implementation: str | None = None) -> tuple[nn.Module, str]:
    """Load a saved model with the class its ``config.json`` names (``architectures``) and its attention
    implementation (:func:`detect_attn_implementation` unless given); return ``(model in eval mode, kind)``."""
    import transformers
    from transformers import AutoConfig, AutoModel

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    implementation = attn_implementation or detect_attn_implementation(path)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        logger.warning("%s names no known architecture (%s); loading it with AutoModel", path, architectures)
        cls = AutoModel
    model = cls.from_pretrained(path, attn_implementation=implementation).eval()
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        kind = "vision"
    elif getattr(config, "is_encoder_decoder", False):
        kind = "seq2seq"
    else:
        kind = "text"
    return model, kind


def _spread(items: Sequence, n: int) -> list:
    """``n`` items spread evenly over ``items`` (deterministic)."""
    if len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def text_inputs(
    path: str | Path, kind: str, model: nn.Module, texts: Sequence[str] | None, num_samples: int, max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenised inputs for a text model: ``texts`` (or the embedded defaults: Python documentation paragraphs for
    LMs and encoders, English→German pairs for seq2seq models) with the tokenizer saved beside the model."""
    from transformers import AutoTokenizer

    from . import data

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    targets = None
    if texts is None:
        if kind == "seq2seq":
            pairs = _spread(data.translation_pairs(), num_samples)
            texts, targets = [en for en, _ in pairs], [de for _, de in pairs]
        else:
            texts = _spread([t for t in data.lm_texts() if len(t) > 200], num_samples)
    else:
        texts = list(texts)[:num_samples]
    inputs = dict(tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length))
    if "token_type_ids" not in inspect.signature(model.forward).parameters:
        inputs.pop("token_type_ids", None)
    if kind == "seq2seq":
        labels = tokenizer(text_target=list(targets or texts), return_tensors="pt", padding=True, truncation=True,
                           max_length=max_length)["input_ids"]
        if hasattr(model, "prepare_decoder_input_ids_from_labels"):
            inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
        else:
            inputs["decoder_input_ids"] = labels
    return inputs


def image_inputs(path: str | Path, model: nn.Module, image_dir: str | Path | None, num_samples: int) -> dict[str, torch.Tensor]:
    """Pixel values for a vision model: images from ``image_dir`` (or scikit-learn's digits, one per class first)
    through the image processor saved beside the model (or :func:`hf_multimax.data.build_image_processor`)."""
    import numpy as np
    from PIL import Image

    from . import data

    if image_dir is not None:
        files = sorted(p for p in Path(image_dir).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
        if not files:
            raise ValueError(f"no images found in {image_dir}")
        images = [Image.open(p) for p in files[:num_samples]]
    else:
        pixels, labels = data.digit_images()
        by_class = [np.flatnonzero(labels == c) for c in range(10)]  # one digit of each class, then the next ones
        order = [int(by_class[i % 10][i // 10]) for i in range(num_samples)]
        images = [Image.fromarray(np.round(pixels[i] * 255).astype(np.uint8), mode="L") for i in order]
    channels = getattr(model.config, "num_channels", 3)
    images = [image.convert("RGB" if channels == 3 else "L") for image in images]
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):
        processor = data.build_image_processor(getattr(model.config, "image_size", 8))
    return {"pixel_values": processor(images=images, return_tensors="pt")["pixel_values"]}


# ---------------------------------------------------------------------------------------------------------------------
# `hf-multimax analyze`

METRIC_COLUMNS = (
    ("sparsity", "near-zero share"),
    ("zeros", "exact zeros"),
    ("modes", "modes/row"),
    ("multimodality", "multi-modality"),
    ("residual_mass", "residual mass"),
    ("entropy", "entropy (nats)"),
)


def _labels(model_dirs: Sequence[str | Path], labels: Sequence[str] | None) -> list[str]:
    if labels:
        if len(labels) != len(model_dirs):
            raise ValueError(f"got {len(labels)} labels for {len(model_dirs)} models")
        return list(labels)
    names = [Path(d).resolve().name for d in model_dirs]
    if len(set(names)) < len(names):  # e.g. two runs' "multimax" folders: add the parent folder
        names = [f"{Path(d).resolve().parent.name}/{Path(d).resolve().name}" for d in model_dirs]
    return names


def _read_texts(text_file: str | Path) -> list[str]:
    """Paragraphs (blocks separated by blank lines) of a text file, or its lines when it has no blank lines."""
    text = Path(text_file).read_text(encoding="utf-8")
    blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
    return blocks if len(blocks) > 1 else [line for line in text.splitlines() if line.strip()]


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def render_summary_md(summary: dict[str, Any]) -> str:
    """``summary.md``: the inputs, an overview table (one row per model), per-layer tables, learned σ / α, images."""
    s = summary["settings"]
    lines = [
        "# Attention analysis",
        "",
        f"Inputs: {s['inputs']}. A weight counts as near zero below {s['sparsity_threshold']:g} and as a mode above "
        f"{s['mode_threshold']:g}; residual mass is the weight on entries at or below {s['mode_threshold']:g}. "
        "Values are means over heads, queries and inputs (masked positions excluded).",
        "",
        "## Overview",
        "",
        "| model | attention | " + " | ".join(title for _, title in METRIC_COLUMNS) + " | token similarity (last) |",
        "|---|---|" + "---:|" * (len(METRIC_COLUMNS) + 1),
    ]
    for m in summary["models"]:
        last = m["token_similarity"][-1] if m["token_similarity"] else float("nan")
        lines.append(f"| {m['label']} | {m['attn_implementation']} | "
                     + " | ".join(_fmt(m["overall"][key]) for key, _ in METRIC_COLUMNS) + f" | {_fmt(last)} |")
    for m in summary["models"]:
        lines += ["", f"## {m['label']}", "", f"`{m['path']}`: {m['architecture']}, attention `{m['attn_implementation']}`.", "",
                  "| layer | " + " | ".join(title for _, title in METRIC_COLUMNS) + " |",
                  "|---|" + "---:|" * len(METRIC_COLUMNS)]
        for layer in m["layers"]:
            lines.append(f"| {short_name(layer['name'])} | " + " | ".join(_fmt(layer[key]) for key, _ in METRIC_COLUMNS) + " |")
        if m["token_similarity"]:
            lines += ["", "Token cosine similarity per hidden state (0 = embeddings): "
                      + ", ".join(_fmt(v) for v in m["token_similarity"]) + "."]
        if m["modulators"]:
            lines += ["", "Learned MultiMax σ (ranges / slopes t):", ""]
            for name, p in m["modulators"].items():
                ranges = json.dumps([round(v, 4) for v in _flat(p["ranges"])])
                ts = json.dumps([round(v, 4) for v in _flat(p["ts"])])
                lines.append(f"- `{short_name(name)}`: ranges {ranges}, t {ts}")
        if m["entmax_alpha"]:
            lines += ["", "Learned α per head:", ""]
            lines += [f"- `{short_name(name)}`: {json.dumps([round(a, 3) for a in alphas])}" for name, alphas in m["entmax_alpha"].items()]
    lines += ["", "## Images", ""] + [f"- `{name}`: {what}" for name, what in summary["images"].items()]
    return "\n".join(lines) + "\n"


def _flat(values: Any) -> list[float]:
    return [v for row in values for v in _flat(row)] if isinstance(values, list) else [values]


def analyze(
    model_dirs: Sequence[str | Path],
    output_dir: str | Path,
    labels: Sequence[str] | None = None,
    attn_implementations: Sequence[str] | None = None,
    text_file: str | Path | None = None,
    image_dir: str | Path | None = None,
    num_samples: int = 8,
    max_length: int = 64,
    sparsity_threshold: float = SPARSITY_THRESHOLD,
    mode_threshold: float = MODE_THRESHOLD,
) -> dict[str, Any]:
    """Analyse saved models side by side and write the figures, ``summary.md`` and ``summary.json`` to
    ``output_dir``; return the summary (with ``"images"``: file name -> description).

    ``attn_implementations``: one for all models or one per model; detected from what each model saved otherwise
    (:func:`detect_attn_implementation`).
    """
    from tqdm.auto import tqdm

    from . import analysis_plots as figures
    from .plots import plot_modulators

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    names = _labels(model_dirs, labels)
    if attn_implementations and len(attn_implementations) not in (1, len(model_dirs)):
        raise ValueError(f"give one --attn_implementation for all models or one per model, got {len(attn_implementations)}")
    texts = _read_texts(text_file) if text_file is not None else None

    analyses: list[ModelAnalysis] = []
    descriptions: list[str] = []
    for i, (path, label) in enumerate(tqdm(list(zip(model_dirs, names)), desc="analyze", unit="model")):
        implementation = attn_implementations[min(i, len(attn_implementations) - 1)] if attn_implementations else None
        model, kind = load_for_analysis(path, implementation)
        if kind == "vision":
            inputs = image_inputs(path, model, image_dir, num_samples)
            descriptions.append(f"{inputs['pixel_values'].shape[0]} images from "
                                + (str(image_dir) if image_dir else "scikit-learn's digits"))
        else:
            inputs = text_inputs(path, kind, model, texts, num_samples, max_length)
            source = str(text_file) if text_file else ("English→German pairs" if kind == "seq2seq" else "Python documentation paragraphs")
            descriptions.append(f"{inputs['input_ids'].shape[0]} texts ({source}, at most {max_length} tokens)")
        logger.info("Analysing %s (%s, %s)", path, type(model).__name__, model.config._attn_implementation)
        analyses.append(analyze_model(model, inputs, label, str(path), kind, sparsity_threshold, mode_threshold))

    images: dict[str, str] = {}
    figures.plot_attention_histograms(analyses, output_dir / "attention_histograms.png")
    images["attention_histograms.png"] = "attention-weight histograms per layer (paper Fig. 5)"
    figures.plot_layer_metrics(analyses, output_dir / "attention_metrics.png")
    images["attention_metrics.png"] = "sparsity, exact zeros, modes, multi-modality, residual mass and entropy per layer"
    for analysis in analyses:
        if analysis.modulators:
            name = f"modulators_{_safe(analysis.label)}.png"
            plot_modulators(analysis.model, output_dir / name, title=f"Learned σ per layer: {analysis.label}")
            images[name] = f"learned MultiMax σ per layer vs identity, {analysis.label} (paper Fig. 3)"
    vision = [a for a in analyses if a.kind == "vision" and a.token_similarity]
    if vision:
        figures.plot_token_similarity(vision, output_dir / "patch_similarity.png")
        images["patch_similarity.png"] = "patch cosine similarity per layer, over-smoothing (paper Fig. 4)"
    modulators = {a.label: sigma for a in analyses if (sigma := figures.first_attention_modulator(a.model)) is not None}
    figures.plot_simplex(modulators, output_dir / "simplex.png")
    images["simplex.png"] = ("SoftMax over temperatures, SparseMax, EntMax-1.5, Ev-SoftMax"
                             + (" and each model's first-layer MultiMax" if modulators else "")
                             + " on the inputs (10, x, -1), on the simplex (paper Fig. 1)")

    summary = {
        "settings": {
            "inputs": "; ".join(f"{a.label}: {d}" for a, d in zip(analyses, descriptions)),
            "sparsity_threshold": sparsity_threshold,
            "mode_threshold": mode_threshold,
            "num_samples": num_samples,
            "max_length": max_length,
        },
        "models": [a.to_json() for a in analyses],
        "images": images,
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output_dir / "summary.md").write_text(render_summary_md(summary))
    return summary


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR",
                        help="saved models (save_pretrained folders with their tokenizer or image processor), e.g. "
                        "the OUTPUT_DIR/<implementation>/ folders of `hf-multimax compare`; two or more are compared side by side")
    parser.add_argument("--output_dir", default="analysis", help="where to write the PNGs, summary.md and summary.json")
    parser.add_argument("--labels", nargs="+", help="a name per model for legends and tables (default: folder names)")
    parser.add_argument("--attn_implementation", nargs="+", dest="attn_implementations",
                        help="attention implementation to load with, one for all models or one per model (default: "
                        "detected; multimax -> multimax_eager and sdpa -> eager to get the weights)")
    parser.add_argument("--text_file", help="text inputs: paragraphs separated by blank lines (or lines); default: embedded data")
    parser.add_argument("--image_dir", help="image inputs for vision models (any folder of images); default: scikit-learn's digits")
    parser.add_argument("--num_samples", type=int, default=8, help="number of texts or images to run")
    parser.add_argument("--max_length", type=int, default=64, help="truncate texts to this many tokens")
    parser.add_argument("--sparsity_threshold", type=float, default=SPARSITY_THRESHOLD, help="weights below it count as near zero")
    parser.add_argument("--mode_threshold", type=float, default=MODE_THRESHOLD, help="weights above it count as modes")


@command("analyze", "Analyse saved models' attention (sparsity, modes, entropy, over-smoothing, learned σ) and plot it.",
         add_analyze_arguments)
def run_analyze(args: argparse.Namespace) -> int:
    summary = analyze(
        args.model_dirs,
        args.output_dir,
        labels=args.labels,
        attn_implementations=args.attn_implementations,
        text_file=args.text_file,
        image_dir=args.image_dir,
        num_samples=args.num_samples,
        max_length=args.max_length,
        sparsity_threshold=args.sparsity_threshold,
        mode_threshold=args.mode_threshold,
    )
    print(_overview(summary))
    print(f"\nWrote {', '.join(summary['images'])}, summary.md and summary.json to {args.output_dir}")
    return 0


def _overview(summary: dict[str, Any]) -> str:
    """The overview table of summary.md (what the command prints)."""
    text = render_summary_md(summary)
    start = text.index("## Overview")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None].rstrip()
