"""Metrics of attention maps (the paper's analyses), pure functions of weights ``(batch, heads, q, k)`` and a boolean
``valid`` mask (True where a query may attend a key; ``None`` = everything), each returning one value per head:

* :func:`sparsity`: share of the valid weights below a threshold; :func:`zero_fraction`: share exactly zero.
* :func:`modes`: number of weights above a threshold (0.1) per row: the modes a query attends to.
* :func:`multimodality`: ``1 - (p_(1) - p_(2))`` per row (1: two equal modes, 0: one mode), and
  :func:`residual_mass`: the mass on the small "residual" entries (at most the threshold) per row: the two sides of
  the paper's sparsity/multi-modality trade-off (a multi-modal map keeps a high ``multimodality``, a sparse one a low
  ``residual_mass``).
* :func:`entropy`: Shannon entropy of each row, in nats.
* :func:`token_similarity`: over-smoothing, the mean pairwise cosine similarity of a layer's token representations
  (Gong et al., 2021; the paper's Figure 4 for vision models).

Rows with no valid key (fully masked queries) are left out of every per-row mean.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "SPARSITY_THRESHOLD",
    "MODE_THRESHOLD",
    "sparsity",
    "zero_fraction",
    "modes",
    "multimodality",
    "residual_mass",
    "entropy",
    "attention_metrics",
    "token_similarity",
]

#: Default thresholds: a weight below ``SPARSITY_THRESHOLD`` counts as (near) zero, one above ``MODE_THRESHOLD`` as a
#: mode.
SPARSITY_THRESHOLD = 0.01
MODE_THRESHOLD = 0.1


def _valid(weights: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return torch.ones_like(weights, dtype=torch.bool)
    return valid.to(torch.bool).expand_as(weights)


def _per_head(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over every dimension but the head dimension (1), counting only where ``mask``."""
    dims = [0, *range(2, values.dim())]
    mask = mask.to(values.dtype)
    return (values * mask).sum(dims) / mask.sum(dims).clamp(min=1)


def sparsity(
    weights: torch.Tensor, valid: torch.Tensor | None = None, threshold: float = SPARSITY_THRESHOLD
) -> torch.Tensor:
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


def residual_mass(
    weights: torch.Tensor, valid: torch.Tensor | None = None, threshold: float = MODE_THRESHOLD
) -> torch.Tensor:
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
