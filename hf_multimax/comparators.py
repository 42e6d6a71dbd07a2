"""The MultiMax paper's comparators as attention implementations: sparse SoftMax alternatives.

``import hf_multimax`` registers, beside ``"multimax"`` (see :mod:`hf_multimax.registry`):

* ``"sparsemax"``: SparseMax (Martins & Astudillo, 2016), the Euclidean projection onto the simplex,
  ``argmin_p ||p - s||²`` over distributions ``p``.
* ``"entmax15"``: 1.5-EntMax (Peters et al., 2019), ``argmax_p <p, s> + H^T_1.5(p)`` (Tsallis entropy, α = 1.5).
* ``"entmax_alpha"``: α-EntMax with a learnable α per head (Correia et al., 2019, "Adaptively Sparse Transformers"),
  ``α = 1.01 + softplus(pre_alpha)`` (so α > 1), initialised at α = 1.5. The parameters live on each attention
  module as ``<attention>.entmax_alpha.pre_alpha`` (shape ``(num_heads,)``) and are loaded and saved with the model.
* ``"evsoftmax"``: Ev-SoftMax (Chen et al., 2021, "Evidential Softmax for Sparse Multimodal Distributions in Deep
  Generative Models"): SoftMax restricted to the scores at or above the row mean,
  ``p_i ∝ 1[s_i >= mean(s)] · exp(s_i)``. In training mode the zeroed entries keep a factor ε = 1e-6 instead of 0
  (the paper's full-support approximation, as the authors' ``evsoftmax(..., training=True)``), so every score gets a
  gradient.

SparseMax and the EntMax variants run the maintained ``entmax`` package (``sparsemax``, ``entmax15``,
``entmax_bisect``). Every function computes in float32 (bfloat16 / float16 inputs too), treats masks as
:func:`~hf_multimax.attention.multimax_eager_attention_forward` does (boolean True = attend, float = additive,
``None`` + ``module.is_causal`` = causal), gives masked positions exactly zero weight and fully masked rows all-zero
weights (never NaN), and returns the weights like Transformers' eager path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import initialization as init

from .attention import check_extras, dense_scores
from .extras import require
from .masking import score_mask
from .modeling import head_count, placement

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

logger = logging.getLogger(__name__)

__all__ = [
    "COMPARATORS",
    "NEEDS_ENTMAX",
    "EVSOFTMAX_EPS",
    "EntmaxAlphaParameters",
    "ENTMAX_ALPHA_ATTRIBUTE",
    "build_entmax_alpha",
    "masked_normalize",
    "masked_sparsemax",
    "masked_entmax15",
    "masked_entmax_alpha",
    "masked_evsoftmax",
]

#: ε that Ev-SoftMax keeps on below-mean entries in training mode (the authors' ``EPS``).
EVSOFTMAX_EPS = 1e-6
#: Masked scores are replaced by ``row max - MASK_GAP`` before the ``entmax`` functions run: a finite value, because
#: ``-inf`` gives NaN on fully masked rows and ``finfo.min`` overflows in EntMax-1.5's squares. Any score more than 1
#: (SparseMax), 2 (EntMax-1.5) or 1/(α-1) (α-EntMax) below the row max gets exactly zero weight; the output is forced to
#: zero at masked positions afterwards in any case.
MASK_GAP = 1.0e4
#: Lower bound of the learnable α: ``α = ALPHA_MIN + softplus(pre_alpha)``. α → 1 is SoftMax, where the bisection of
#: ``entmax_bisect`` divides by α - 1.
ALPHA_MIN = 1.01
ALPHA_INIT = 1.5
#: The child attribute of each attention module that holds its learnable α (``self_attn.entmax_alpha.pre_alpha``).
ENTMAX_ALPHA_ATTRIBUTE = "entmax_alpha"


# ---------------------------------------------------------------------------------------------------------------------
# Masked normalisers: (scores float32 (batch, heads, q, k), valid bool broadcastable or None) -> weights float32


def _entmax(function: str) -> Callable:
    """``entmax.<function>``, or a :class:`~hf_multimax.extras.MissingExtraError` naming the ``comparators`` extra."""
    require("comparators", f"entmax.{function} (SparseMax and EntMax attention)")
    import entmax

    return getattr(entmax, function)


def masked_normalize(
    fn: Callable[[torch.Tensor], torch.Tensor], scores: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """Apply a normaliser ``fn`` over the last dimension to the unmasked entries of each row of ``scores``.

    Masked entries are replaced by a finite value far below the row maximum (see :data:`MASK_GAP`), the output is
    set to exactly zero there and each row renormalised over its unmasked entries; fully masked rows give zeros.
    """
    if valid is None:
        return fn(scores)
    valid = valid.expand_as(scores)
    row_max = scores.masked_fill(~valid, -math.inf).amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    filled = torch.where(valid, scores, row_max - MASK_GAP)
    weights = fn(filled).masked_fill(~valid, 0.0)
    total = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(total > 0, total, torch.ones_like(total))


def masked_sparsemax(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """SparseMax over the last dimension of the unmasked entries: ``argmin_p ||p - s||²`` on the simplex."""
    sparsemax = _entmax("sparsemax")

    return masked_normalize(lambda x: sparsemax(x, dim=-1), scores, valid)


def masked_entmax15(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """1.5-EntMax over the last dimension of the unmasked entries: ``p = [s/2 - τ]₊²`` with τ such that Σp = 1."""
    entmax15 = _entmax("entmax15")

    return masked_normalize(lambda x: entmax15(x, dim=-1), scores, valid)


def masked_entmax_alpha(
    scores: torch.Tensor, alpha: torch.Tensor | float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """α-EntMax (bisection) over the last dimension: ``p = [(α-1)s - τ]₊^(1/(α-1))`` with τ such that Σp = 1.

    ``alpha``: a float, or a tensor of per-head values (shape ``(heads,)``) for ``(batch, heads, q, k)`` scores;
    differentiable with respect to ``alpha``.
    """
    entmax_bisect = _entmax("entmax_bisect")

    if isinstance(alpha, torch.Tensor):
        if alpha.dim() == 1:
            alpha = alpha.view(1, -1, 1, 1)
        alpha = alpha.to(scores.dtype).expand(*scores.shape[:-1], 1)
    return masked_normalize(lambda x: entmax_bisect(x, alpha, dim=-1), scores, valid)


def masked_evsoftmax(
    scores: torch.Tensor, valid: torch.Tensor | None = None, training: bool = False, eps: float = EVSOFTMAX_EPS
) -> torch.Tensor:
    """Ev-SoftMax over the last dimension: ``p_i ∝ w_i · exp(s_i)`` with ``w_i = 1`` where ``s_i >= mean(s)``, else
    ``0`` (``eps`` in training). The mean runs over the unmasked entries only; masked entries get exactly zero."""
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    valid = valid.expand_as(scores)
    count = valid.sum(dim=-1, keepdim=True)
    mean = scores.masked_fill(~valid, 0.0).sum(dim=-1, keepdim=True) / count.clamp(min=1)
    keep = valid & (scores >= mean)
    # softmax(s) · w renormalised == softmax over s + log(w): log(eps) for the below-mean entries in training.
    below = scores + math.log(eps) if training else torch.full_like(scores, -math.inf)
    logits = torch.where(keep, scores, torch.where(valid, below, torch.full_like(scores, -math.inf)))
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    exp = torch.exp(logits - row_max)
    total = exp.sum(dim=-1, keepdim=True)
    return exp / torch.where(total > 0, total, torch.ones_like(total))


# ---------------------------------------------------------------------------------------------------------------------
# Learnable α of "entmax_alpha"


class EntmaxAlphaParameters(nn.Module):
    """The learnable α of one attention layer, one per head: ``α = 1.01 + softplus(pre_alpha)``, initialised at 1.5."""

    PARAMETER_NAMES = ("pre_alpha",)

    def __init__(
        self, num_heads: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.pre_alpha = nn.Parameter(torch.empty(num_heads, device=device, dtype=dtype))
        if self.pre_alpha.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """α = 1.5 for every head; a tensor loaded from a checkpoint is kept (``transformers.initialization``)."""
        init.constant_(self.pre_alpha, math.log(math.expm1(ALPHA_INIT - ALPHA_MIN)))

    def alpha(self) -> torch.Tensor:
        """α per head, float32, shape ``(num_heads,)``."""
        return ALPHA_MIN + nn.functional.softplus(self.pre_alpha.float())

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


def build_entmax_alpha(module: nn.Module, config: PreTrainedConfig) -> EntmaxAlphaParameters:
    """The α of one attention module, one per query head, on the module's device and dtype."""
    return EntmaxAlphaParameters(head_count(module, config), **placement(module))


# ---------------------------------------------------------------------------------------------------------------------
# Attention functions


def sparse_attention(
    normalize: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor], name: str
) -> Callable:
    """Build an attention function (Transformers' backend signature) around ``normalize(module, scores, valid)``."""

    def attention_forward(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        is_causal: bool | None = None,
        position_bias: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_extras(kwargs, name)
        # At least float32: the entmax sorts / bisections and Ev-SoftMax's mean are not bfloat16-safe.
        scores, value, causal = dense_scores(
            module, query, key, value, attention_mask, scaling, is_causal, position_bias
        )
        valid, bias = score_mask(attention_mask, causal, scores.shape[-2], scores.shape[-1], scores.device)
        if bias is not None:
            scores = scores + bias.to(scores.dtype)
        weights = normalize(module, scores, valid).to(query.dtype)
        weights = nn.functional.dropout(weights, p=dropout, training=module.training)
        out = torch.matmul(weights, value)
        return out.transpose(1, 2).contiguous(), weights

    attention_forward.__name__ = attention_forward.__qualname__ = f"{name}_attention_forward"
    attention_forward.__doc__ = (
        f"``{name!r}`` attention: ``{name}(Q·Kᵀ·scale + position_bias, mask) · V`` "
        "(see :mod:`hf_multimax.comparators`)."
    )
    return attention_forward


def entmax_alpha_of(module: nn.Module) -> torch.Tensor:
    parameters = getattr(module, ENTMAX_ALPHA_ATTRIBUTE, None)
    if parameters is None:
        raise RuntimeError(
            f"{type(module).__name__} has no learnable α. Select it through Transformers so that it is created: "
            '`from_pretrained(..., attn_implementation="entmax_alpha")`, `from_config(config, attn_implementation='
            '"entmax_alpha")` or `model.set_attn_implementation("entmax_alpha")` (after `import hf_multimax`).'
        )
    return parameters.alpha()


sparsemax_attention_forward = sparse_attention(lambda module, s, valid: masked_sparsemax(s, valid), "sparsemax")
entmax15_attention_forward = sparse_attention(lambda module, s, valid: masked_entmax15(s, valid), "entmax15")
entmax_alpha_attention_forward = sparse_attention(
    lambda module, s, valid: masked_entmax_alpha(s, entmax_alpha_of(module), valid), "entmax_alpha"
)
evsoftmax_attention_forward = sparse_attention(
    lambda module, s, valid: masked_evsoftmax(s, valid, training=module.training), "evsoftmax"
)

#: name -> attention function (the registry, :mod:`hf_multimax.registry`, adds α's parameters to "entmax_alpha").
COMPARATORS: dict[str, Callable] = {
    "sparsemax": sparsemax_attention_forward,
    "entmax15": entmax15_attention_forward,
    "entmax_alpha": entmax_alpha_attention_forward,
    "evsoftmax": evsoftmax_attention_forward,
}
#: The comparators that run the ``entmax`` package (the ``comparators`` extra); Ev-SoftMax needs nothing.
NEEDS_ENTMAX = ("sparsemax", "entmax15", "entmax_alpha")
