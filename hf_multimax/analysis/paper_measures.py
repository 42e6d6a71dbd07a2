"""The MultiMax paper's own multi-modality and sparsity measures (Definitions 3.2 and 3.3), per attention head.

Zhou, Fritz & Keuper, "MultiMax: Sparse and Multi-Modal Attention Learning", ICML 2024 (arXiv:2406.01189), define
two scores of a map ``φ`` from an input vector ``x`` (one row of pre-normalisation attention scores here) to the
probability simplex (SoftMax, MultiMax ``softmax(σ(x))``, SparseMax, ...), with a relevance threshold ``ε`` on the
*inputs*:

* Multi-modality (Def. 3.2), over the ``N`` entries with ``ε < x_n < x_max``::

      M(x) = 1 - (1/N) · Σ_n (φ(x)_max - φ(x)_n)

  1 when every relevant entry receives as much weight as the largest one, lower as they are suppressed.
* Sparsity (Def. 3.3), over the ``L`` entries with ``x_l < ε`` and a reference value ``s > 0``::

      S(x) = (1/L) · Σ_l exp((s - φ(x)_l)/s - 1)  =  (1/L) · Σ_l exp(-φ(x)_l / s)

  a smooth step in ``(0, 1]``: 1 when every irrelevant entry gets exactly zero weight, ``1/e`` when each gets ``s``.

Both sets are chosen on the inputs ``x``, so two normalisers given the same scores are judged on the same entries.
That is why :func:`paper_multimodality` and :func:`paper_sparsity` take the ``scores`` as well as the ``weights``
``φ(x)``. For MultiMax, ``scores`` are the inputs of the modulator σ (``QKᵀ/√d`` plus any additive mask), not σ(x).

Sources, and what is uncertain
------------------------------
The paper's Section 3 could not be read here: the stored copies of https://arxiv.org/html/2406.01189v1 and
https://raw.githubusercontent.com/mlresearch/v235/main/assets/zhou24g/zhou24g.pdf only showed their abstract and
introduction, and the authors' repository (github.com/ZhouYuxuanYX/MultiMax: README.md, vision_transformer.py,
multihead_attention.py, transformer_decoder.py) implements MultiMax but no measure. The formulas above are therefore
second-hand, taken from a MultiMax monitor for PaddleFleet's LM head opened by GitHub user ZhouYuxuanYX, the owner
of the authors' repository (github.com/bo-ke/llm-internal-medicine pull request 59: ``docs/multimax.md`` and
``src/internal_medicine/backends/paddlefleet/multimax_metrics.py``, two revisions of each). Not verified against the
paper:

* The exact form of the sparsity term: read as ``exp(((s - φ_l)/s) - 1)``, i.e. ``exp(-φ_l/s)``; another
  bracketing (e.g. ``(exp((s - φ_l)/s) - 1)/(e - 1)``) would change the values (each term decreases with ``φ_l``
  either way).
* What ``s`` is: the monitor's later revision quotes the paper as "any reference value for a non-linear scaling",
  giving the smallest SoftMax (temperature 1) probability as one example; its earlier revision read that as the
  smallest probability of the distribution being scored. Here the default is the smallest temperature-1 SoftMax
  probability *of the scores* ``min_k softmax(x)_k`` (over the valid keys of the row): it depends on the input only,
  so SoftMax and MultiMax on the same scores share one yardstick (SoftMax itself then scores at most ``1/e``). Pass
  ``reference`` to fix ``s`` instead (needed to compare rows or models with different inputs on one scale).
* ``ε``: "any reasonable threshold" on ``x``; the paper's own choice is not known (the monitor's pull request calls
  a probability threshold ``1/V`` "the paper's default", which does not carry over to raw scores). The default here,
  0, follows the paper's Figure 1 (inputs ``(10, x, -1)``; its caption, in the authors' README, faults SoftMax at
  high temperature for failing "to ignore the negative entry"). ``ε`` is an
  absolute threshold on the scores, so the measures change when a row's scores are shifted by a constant (SoftMax's
  output does not).
* ``φ_max`` is taken as the largest weight of the row, and the relevant set excludes one entry (the arg-max of ``x``)
  rather than every entry equal to ``x_max``: a row with two exactly tied modes then scores 1 instead of being
  undefined. For a monotone normaliser (SoftMax, MultiMax with a monotone σ) the rest agrees with the strict reading.
  Entries exactly at ``ε`` are in neither set, as in the strict inequalities.

A caller that has only the weights: for SoftMax attention, ``scores = weights.log()`` recovers the scores up to a
per-row constant (log-probabilities), so ``ε`` becomes a threshold ``log p`` on the weights and the default ``s`` is
the row's smallest weight. For any other normaliser (MultiMax included) the log-weights are ``σ(x)`` up to a
constant, not ``x``: the sets would be chosen by the normaliser's own output, which is a different measure; such a
caller needs the pre-normalisation scores (e.g. recomputed from the query and key states).

Aggregation: each measure is computed per row (query) and averaged over the rows of a head (batch and query
positions) where it is defined: rows with no valid key, with ``N = 0`` (Def. 3.2) or with ``L = 0`` (Def. 3.3) are
left out, and a head with no such row gives NaN (undefined, not 0: 0 is a real value of ``M``).
"""

from __future__ import annotations

import math

import torch

__all__ = ["DEFAULT_EPS", "paper_multimodality", "paper_sparsity", "paper_measures"]

#: Default relevance threshold ``ε`` on the scores.
DEFAULT_EPS = 0.0


def _prepare(
    scores: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores and weights in a float type of at least 32 bits, and the valid mask (non-finite scores never valid)."""
    if scores.dim() != 4 or scores.shape != weights.shape:
        raise ValueError(
            f"scores and weights must both be (batch, heads, q, k), got {tuple(scores.shape)} and "
            f"{tuple(weights.shape)}"
        )
    dtype = torch.promote_types(weights.dtype, torch.float32)
    x = scores.to(dtype)
    p = weights.to(dtype)
    v = torch.ones_like(x, dtype=torch.bool) if valid is None else valid.to(torch.bool).expand_as(x)
    return x, p, v & torch.isfinite(x)


def _head_mean(values: torch.Tensor, defined: torch.Tensor) -> torch.Tensor:
    """Mean of per-row ``values`` ``(batch, heads, q)`` over the ``defined`` rows of each head; NaN for none."""
    values = torch.where(defined, values, torch.zeros_like(values))
    count = defined.sum(dim=(0, 2))
    mean = values.sum(dim=(0, 2)) / count.clamp(min=1)
    return torch.where(count > 0, mean, torch.full_like(mean, float("nan")))


def paper_multimodality(
    scores: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor | None = None, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Def. 3.2 per head, shape ``(heads,)``: ``M = 1 - mean_n (φ_max - φ_n)`` over the valid entries other than the
    arg-max with ``scores > eps``, averaged over the rows that have such an entry (NaN for a head with none).

    ``scores``: pre-normalisation inputs ``x``; ``weights``: the normaliser's output ``φ(x)``, both
    ``(batch, heads, q, k)``; ``valid``: True where a key may be attended (broadcast to that shape).
    """
    x, p, v = _prepare(scores, weights, valid)
    top = x.masked_fill(~v, float("-inf")).argmax(dim=-1, keepdim=True)
    is_top = torch.zeros_like(v).scatter_(-1, top, True)
    relevant = v & (x > eps) & ~is_top
    p_max = p.masked_fill(~v, float("-inf")).amax(dim=-1, keepdim=True)
    gaps = torch.where(relevant, p_max - p, torch.zeros_like(p)).sum(dim=-1)
    n = relevant.sum(dim=-1)
    return _head_mean(1.0 - gaps / n.clamp(min=1), n > 0)


def paper_sparsity(
    scores: torch.Tensor,
    weights: torch.Tensor,
    valid: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
    reference: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Def. 3.3 per head, shape ``(heads,)``: ``S = mean_l exp(-φ_l / s)`` over the valid entries with
    ``scores < eps``, averaged over the rows that have such an entry (NaN for a head with none).

    ``reference`` is ``s``: a positive number, or a tensor broadcastable to ``(batch, heads, q, 1)``; by default the
    smallest temperature-1 SoftMax probability of each row's valid scores, ``exp(min x - logsumexp x)``. The ratio
    ``φ_l / s`` is taken in log space, so the default ``s`` or a float one below the float32 range still works
    (long rows); zero weights give 1.

    Raises:
        ValueError: when ``reference`` is not positive.
    """
    x, p, v = _prepare(scores, weights, valid)
    if reference is None:
        lowest = x.masked_fill(~v, float("inf")).amin(dim=-1, keepdim=True)
        log_s = lowest - torch.logsumexp(x.masked_fill(~v, float("-inf")), dim=-1, keepdim=True)
    elif isinstance(reference, torch.Tensor):
        if not bool((reference > 0).all()):
            raise ValueError(f"reference (s) must be positive, got {reference}")
        log_s = reference.to(x.device).log().to(x.dtype)
    else:
        if not reference > 0:
            raise ValueError(f"reference (s) must be positive, got {reference}")
        log_s = math.log(reference)  # in float64, so an s below the float32 range keeps its logarithm
    irrelevant = v & (x < eps)
    terms = torch.exp(-torch.exp(torch.log(p) - log_s))
    total = torch.where(irrelevant, terms, torch.zeros_like(terms)).sum(dim=-1)
    n = irrelevant.sum(dim=-1)
    return _head_mean(total / n.clamp(min=1), n > 0)


def paper_measures(
    scores: torch.Tensor,
    weights: torch.Tensor,
    valid: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
    reference: float | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Both measures of one attention map: ``{"paper_multimodality": (heads,), "paper_sparsity": (heads,)}``."""
    return {
        "paper_multimodality": paper_multimodality(scores, weights, valid, eps),
        "paper_sparsity": paper_sparsity(scores, weights, valid, eps, reference),
    }
