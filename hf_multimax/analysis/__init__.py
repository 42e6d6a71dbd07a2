"""The paper's analyses on any model: attention metrics (:mod:`.metrics`), collecting a model's attention
(:mod:`.collect`), inputs for saved models (:mod:`.inputs`), figures (:mod:`.plots`) and the ``analyze`` report
(:mod:`.report`)."""

from .collect import (
    AttentionMap,
    ModelAnalysis,
    analyze_model,
    collect_attention,
    returning_attention_weights,
    weights_implementation,
)
from .inputs import AnalysisInputError, load_for_analysis
from .metrics import (
    MODE_THRESHOLD,
    SPARSITY_THRESHOLD,
    attention_metrics,
    entropy,
    modes,
    multimodality,
    residual_mass,
    sparsity,
    token_similarity,
    zero_fraction,
)
from .report import analyze, render_summary_md

__all__ = [
    "AnalysisInputError",
    "AttentionMap",
    "MODE_THRESHOLD",
    "ModelAnalysis",
    "SPARSITY_THRESHOLD",
    "analyze",
    "analyze_model",
    "attention_metrics",
    "collect_attention",
    "entropy",
    "load_for_analysis",
    "modes",
    "multimodality",
    "render_summary_md",
    "residual_mass",
    "returning_attention_weights",
    "sparsity",
    "token_similarity",
    "weights_implementation",
    "zero_fraction",
]
