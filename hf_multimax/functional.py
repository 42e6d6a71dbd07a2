"""The math of MultiMax, as plain differentiable PyTorch.

MultiMax (Zhou, Fritz & Keuper, ICML 2024) is ``softmax(σ(x))`` where σ, the *segmented linear unit*
(SegLU), is a learnable piecewise polynomial modulator. For order ``N`` it has ``2N`` ranges ``r`` and
``2N`` slopes ``t`` (the layout of the authors' reference code)::

    σ(x) = x + Σ_{n=1..N} ( t[2n-2]·relu(r[2n-2] - x)^n + t[2n-1]·relu(x - r[2n-1])^n )

With every ``t = 0``, σ is the identity and MultiMax is SoftMax. This module is the reference: the
fused kernels are checked against it.
"""

from __future__ import annotations

import torch

__all__ = ["seglu", "multimax", "seglu_order", "broadcast_parameter", "seglu_backward", "seglu_parameter_grads"]


def seglu_order(ranges: torch.Tensor, ts: torch.Tensor) -> int:
    """Return the order ``N`` of a SegLU parameter pair, validating their shapes.

    Raises:
        TypeError: when ``ranges`` or ``ts`` is not a floating-point tensor.
        ValueError: when their shapes differ or the last dimension is not a positive even number.
    """
    for name, value in (("ranges", ranges), ("ts", ts)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(
                f"`{name}` must be a floating-point torch.Tensor, got {type(value).__name__}"
                + (f" of dtype {value.dtype}" if isinstance(value, torch.Tensor) else "")
            )
    if ranges.shape != ts.shape:
        raise ValueError(f"`ranges` and `ts` must have the same shape, got {tuple(ranges.shape)} and {tuple(ts.shape)}")
    if ranges.dim() not in (1, 2) or ranges.shape[-1] < 2 or ranges.shape[-1] % 2:
        raise ValueError(f"`ranges` must have shape (2N,) or (num_heads, 2N) with N >= 1, got {tuple(ranges.shape)}")
    return ranges.shape[-1] // 2


def broadcast_parameter(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View one SegLU coefficient column (shape ``()`` or ``(num_heads,)``) so it broadcasts over ``x``.

    Per-head coefficients align with dimension 1 of ``(batch, heads, q, k)`` scores, i.e. dimension ``-3``.
    """
    if p.dim() == 0:
        return p
    if x.dim() < 3:
        raise ValueError(
            f"per-head parameters of shape ({p.shape[0]}, 2N) need scores shaped (batch, heads, q, k); got x of shape "
            f"{tuple(x.shape)}"
        )
    if x.shape[-3] != p.shape[0]:
        raise ValueError(
            f"per-head parameters are for {p.shape[0]} heads but x has {x.shape[-3]} heads (dimension -3 of "
            f"{tuple(x.shape)})"
        )
    return p.view(-1, 1, 1)


def seglu(x: torch.Tensor, ranges: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Apply the SegLU modulator σ to ``x``.

    Args:
        x: scores of any shape; with per-head parameters, shaped ``(batch, heads, q, k)``.
        ranges: breakpoints, shape ``(2N,)`` (shared) or ``(num_heads, 2N)`` (per head).
        ts: slopes, same shape as ``ranges``.

    Returns:
        ``σ(x)`` in the promoted dtype of ``x`` and the parameters. Gradients w.r.t. all three inputs are exact
        (away from the measure-zero breakpoints).
    """
    order = seglu_order(ranges, ts)
    out = x
    for n in range(1, order + 1):
        lo, hi = 2 * n - 2, 2 * n - 1
        below = torch.relu(broadcast_parameter(ranges[..., lo], x) - x)
        above = torch.relu(x - broadcast_parameter(ranges[..., hi], x))
        if n > 1:
            below, above = below**n, above**n
        out = out + broadcast_parameter(ts[..., lo], x) * below + broadcast_parameter(ts[..., hi], x) * above
    return out


def multimax(x: torch.Tensor, ranges: torch.Tensor, ts: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """MultiMax: ``softmax(seglu(x, ranges, ts), dim)``. See :func:`seglu` for the parameter shapes."""
    return torch.softmax(seglu(x, ranges, ts), dim=dim)


def seglu_backward(
    x: torch.Tensor, grad: torch.Tensor, ranges: torch.Tensor, ts: torch.Tensor, sum_dims: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward of :func:`seglu` by hand, for the fused paths: ``(grad · dσ/dx, sums)``.

    ``sums`` stacks, over the last dimension, ``Σ grad·a^n`` for the 2N coefficients then ``Σ grad·a^(n-1)``, summed
    over ``sum_dims`` of ``x``, where ``a`` is ``relu(r - x)`` (low side) or ``relu(x - r)`` (high side) and ``a^0`` the
    indicator ``a > 0``; :func:`seglu_parameter_grads` turns them into the gradients of ``ranges`` and ``ts``. The
    sums are float64 (they add up every score of an attention call or every logit of a batch).
    """
    order = seglu_order(ranges, ts)
    deriv = torch.ones_like(x)
    power_sums, prev_sums = [], []
    for n in range(1, order + 1):
        for side, index in ((0, 2 * n - 2), (1, 2 * n - 1)):
            r = broadcast_parameter(ranges[..., index], x)
            t = broadcast_parameter(ts[..., index], x)
            a = torch.relu(r - x) if side == 0 else torch.relu(x - r)
            a_prev = (a > 0).to(x.dtype) if n == 1 else (a if n == 2 else a ** (n - 1))
            power_sums.append((grad * a_prev * a).sum(dim=sum_dims))
            prev_sums.append((grad * a_prev).sum(dim=sum_dims))
            deriv = deriv + (-n if side == 0 else n) * t * a_prev
    return grad * deriv, torch.stack(power_sums + prev_sums, dim=-1).double()


def seglu_parameter_grads(sums: torch.Tensor, ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(d ranges, d ts)`` from the sums of :func:`seglu_backward` (last dimension 4N; leading dimensions,
    e.g. one per head, broadcast against ``ts``), in float64: ``∂σ/∂t = a^n``, ``∂σ/∂r_low = n·t·a^(n-1)``,
    ``∂σ/∂r_high = -n·t·a^(n-1)``."""
    order = sums.shape[-1] // 4
    coef = torch.tensor(
        [(n if side == 0 else -n) for n in range(1, order + 1) for side in (0, 1)],
        dtype=torch.float64,
        device=sums.device,
    )
    sums = sums.double()
    return coef * ts.detach().double() * sums[..., 2 * order :], sums[..., : 2 * order]
