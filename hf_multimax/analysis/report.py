"""``analyze``: saved models side by side: the figures (:mod:`.plots`), ``summary.md`` and ``summary.json``."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checkpoint import read_checkpoint
from ..extras import require
from .collect import ModelAnalysis, analyze_model, short_name
from .inputs import AnalysisInputError, image_inputs, load_for_analysis, text_inputs
from .metrics import MODE_THRESHOLD, SPARSITY_THRESHOLD

logger = logging.getLogger(__name__)

__all__ = ["analyze", "render_summary_md", "overview", "METRIC_COLUMNS"]

METRIC_COLUMNS = (
    ("sparsity", "near-zero share"),
    ("zeros", "exact zeros"),
    ("modes", "modes/row"),
    ("multimodality", "multi-modality"),
    ("residual_mass", "residual mass"),
    ("entropy", "entropy (nats)"),
    ("paper_multimodality", "paper M (Def. 3.2)"),
    ("paper_sparsity", "paper S (Def. 3.3)"),
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
        "Values are means over heads, queries and inputs (masked positions excluded). Paper M and S are the paper's "
        "multi-modality and sparsity (Definitions 3.2, 3.3; `hf_multimax.analysis.paper_measures`), computed from "
        "the pre-normalisation scores (ε = 0; n/a where undefined).",
        "",
        "## Overview",
        "",
        "| model | attention | " + " | ".join(title for _, title in METRIC_COLUMNS) + " | token similarity (last) |",
        "|---|---|" + "---:|" * (len(METRIC_COLUMNS) + 1),
    ]
    for m in summary["models"]:
        last = m["token_similarity"][-1] if m["token_similarity"] else float("nan")
        lines.append(
            f"| {m['label']} | {m['attn_implementation']} | "
            + " | ".join(_fmt(m["overall"][key]) for key, _ in METRIC_COLUMNS)
            + f" | {_fmt(last)} |"
        )
    for m in summary["models"]:
        lines += [
            "",
            f"## {m['label']}",
            "",
            f"`{m['path']}`: {m['architecture']}, attention `{m['attn_implementation']}`.",
            "",
            "| layer | " + " | ".join(title for _, title in METRIC_COLUMNS) + " |",
            "|---|" + "---:|" * len(METRIC_COLUMNS),
        ]
        for layer in m["layers"]:
            lines.append(
                f"| {short_name(layer['name'])} | " + " | ".join(_fmt(layer[key]) for key, _ in METRIC_COLUMNS) + " |"
            )
        if m["token_similarity"]:
            lines += [
                "",
                "Token cosine similarity per hidden state (0 = embeddings): "
                + ", ".join(_fmt(v) for v in m["token_similarity"])
                + ".",
            ]
        if m["modulators"]:
            lines += ["", "Learned MultiMax σ (ranges / slopes t):", ""]
            for name, p in m["modulators"].items():
                ranges = json.dumps([round(v, 4) for v in _flat(p["ranges"])])
                ts = json.dumps([round(v, 4) for v in _flat(p["ts"])])
                lines.append(f"- `{short_name(name)}`: ranges {ranges}, t {ts}")
        if m["entmax_alpha"]:
            lines += ["", "Learned α per head:", ""]
            lines += [
                f"- `{short_name(name)}`: {json.dumps([round(a, 3) for a in alphas])}"
                for name, alphas in m["entmax_alpha"].items()
            ]
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
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """Analyse saved models side by side and write the figures, ``summary.md`` and ``summary.json`` to
    ``output_dir``; return the summary (with ``"images"``: file name -> description).

    ``attn_implementations``: one for all models or one per model; by default what each folder was trained with
    (:func:`hf_multimax.checkpoint.read_checkpoint`). ``tokenizer``: a tokenizer name or folder for models saved
    without one (default: theirs, else one built offline; see :mod:`hf_multimax.analysis.inputs`). Every folder is
    checked before anything is loaded or written.
    """
    from tqdm.auto import tqdm

    require("analysis", "hf_multimax.analysis.analyze")

    from . import plots as figures

    names = _labels(model_dirs, labels)
    if attn_implementations and len(attn_implementations) not in (1, len(model_dirs)):
        raise AnalysisInputError(
            f"give one --attn_implementation for all models or one per model, got "
            f"{len(attn_implementations)} for {len(model_dirs)} models"
        )
    if num_samples < 1 or max_length < 1:
        raise AnalysisInputError(f"--num_samples and --max_length must be >= 1, got {num_samples} and {max_length}")
    for path in model_dirs:  # fail on a wrong path before any model is loaded or file written
        read_checkpoint(path)
    if text_file is not None and not Path(text_file).is_file():
        raise AnalysisInputError(f"--text_file {text_file} is not a file")
    if image_dir is not None and not Path(image_dir).is_dir():
        raise AnalysisInputError(f"--image_dir {image_dir} is not a folder")
    if (
        tokenizer is not None
        and (Path(tokenizer).is_absolute() or tokenizer.startswith("."))
        and not Path(tokenizer).is_dir()
    ):
        raise AnalysisInputError(f"--tokenizer {tokenizer} is not a folder (nor a Hub name like owner/name)")
    texts = _read_texts(text_file) if text_file is not None else None

    analyses: list[ModelAnalysis] = []
    descriptions: list[str] = []
    for i, (path, label) in enumerate(tqdm(list(zip(model_dirs, names)), desc="analyze", unit="model")):
        implementation = attn_implementations[min(i, len(attn_implementations) - 1)] if attn_implementations else None
        model, kind, checkpoint = load_for_analysis(path, implementation)
        if kind == "vision":
            inputs, description = image_inputs(path, checkpoint, model, image_dir, num_samples, label=label)
        else:
            inputs, description = text_inputs(
                path, checkpoint, model, kind, texts, num_samples, max_length, tokenizer_name=tokenizer, label=label
            )
        descriptions.append(description)
        logger.info("Analysing %s (%s, %s)", path, type(model).__name__, model.config._attn_implementation)
        analyses.append(analyze_model(model, inputs, label, str(path), kind, sparsity_threshold, mode_threshold))

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, str] = {}
    figures.plot_attention_histograms(analyses, output_dir / "attention_histograms.png")
    images["attention_histograms.png"] = "attention-weight histograms per layer (paper Fig. 5)"
    figures.plot_layer_metrics(analyses, output_dir / "attention_metrics.png")
    images["attention_metrics.png"] = (
        "sparsity, exact zeros, modes, multi-modality, residual mass and entropy per layer"
    )
    for analysis in analyses:
        if analysis.modulators:
            name = f"modulators_{_safe(analysis.label)}.png"
            figures.plot_modulators(analysis.model, output_dir / name, title=f"Learned σ per layer: {analysis.label}")
            images[name] = f"learned MultiMax σ per layer vs identity, {analysis.label} (paper Fig. 3)"
    vision = [a for a in analyses if a.kind == "vision" and a.token_similarity]
    if vision:
        figures.plot_token_similarity(vision, output_dir / "patch_similarity.png")
        images["patch_similarity.png"] = "patch cosine similarity per layer, over-smoothing (paper Fig. 4)"
    modulators = {a.label: sigma for a in analyses if (sigma := figures.first_attention_modulator(a.model)) is not None}
    figures.plot_simplex(modulators, output_dir / "simplex.png")
    images["simplex.png"] = (
        "SoftMax over temperatures, SparseMax, EntMax-1.5, Ev-SoftMax"
        + (" and each model's first-layer MultiMax" if modulators else "")
        + " on the inputs (10, x, -1), on the simplex (paper Fig. 1)"
    )

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


def overview(summary: dict[str, Any]) -> str:
    """The overview table of ``summary.md`` (what the command prints)."""
    text = render_summary_md(summary)
    start = text.index("## Overview")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None].rstrip()
