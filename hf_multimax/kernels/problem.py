"""One attention call, normalised once for every backend: float32 operands, broadcast masks, per-head parameters."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..functional import seglu_order, seglu_parameter_grads
from ..masking import additive_mask

__all__ = ["AttentionProblem", "parameter_grads", "draw_seed", "check_inputs", "INPUT_DTYPES"]


def draw_seed() -> int:
    """A dropout seed from PyTorch's default generator, so ``torch.manual_seed`` makes dropout reproducible."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` with a contiguous last dimension (other strides kept: no copy of a transposed view)."""
    x = x if x.dtype == dtype else x.to(dtype)
    return x if x.stride(-1) == 1 else x.contiguous()


def _broadcast_view(x: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """``x`` broadcast to ``shape`` as a view (stride 0 on broadcast dimensions) with a unit stride on the last."""
    while x.dim() < 4:
        x = x.unsqueeze(0)
    if x.stride(-1) != 1 and x.shape[-1] > 1 or x.shape[-1] != shape[-1]:
        x = x.expand(*x.shape[:-1], shape[-1]).contiguous()
    return x.expand(shape)


@dataclass
class AttentionProblem:
    """``softmax(σ(scale·Q·Kᵀ + bias) + mask)·V`` with everything a kernel needs, in the compute dtype: float32
    (as the reference computes σ and SoftMax), or float64 for float64 inputs (so ``gradcheck`` can check the
    blocked path's hand-written backward).

    Shapes: ``q`` (B, H, Lq, D), ``k`` (B, Hkv, Lk, D), ``v`` (B, Hkv, Lk, Dv) with ``H % Hkv == 0`` (GQA: query head
    ``h`` reads key/value head ``h // (H // Hkv)``); ``mask`` and ``bias`` are broadcast *views* of shape
    (B, H, Lq, Lk) (stride 0 where the caller's tensor has size 1, nothing copied).
    """

    dtype: torch.dtype
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    ranges: torch.Tensor  # float32, caller's shape: (2N,) or (H, 2N)
    ts: torch.Tensor
    ranges_per_head: torch.Tensor  # float32 (H, 2N) contiguous
    ts_per_head: torch.Tensor
    order: int
    mask: torch.Tensor | None
    bias: torch.Tensor | None
    bias_shape: tuple[int, ...] | None
    scale: float
    causal: bool
    dropout_p: float
    seed: int

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def kv_len(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def v_dim(self) -> int:
        return self.v.shape[3]

    @property
    def n_rep(self) -> int:
        return self.heads // self.kv_heads

    @property
    def bias_slots(self) -> tuple[int, int]:
        """Batch and head extent of the bias gradient buffer: 1 where the bias is shared (broadcast)."""
        shape = _bias4d_shape(self.bias_shape)
        return (1 if shape[0] == 1 else self.batch), (1 if shape[1] == 1 else self.heads)

    @property
    def is_empty(self) -> bool:
        """An empty dimension: nothing for a kernel to do (the blocked path returns the empty results)."""
        return 0 in (self.batch, self.heads, self.q_len, self.kv_len, self.head_dim, self.v_dim)

    def describe(self) -> str:
        """The shapes, dtypes, order and device of this problem, for messages."""
        name = lambda dtype: str(dtype).replace("torch.", "")  # noqa: E731
        return (
            f"query {tuple(self.q.shape)}, key {tuple(self.k.shape)}, value {tuple(self.v.shape)} {name(self.q.dtype)} "
            f"(compute {name(self.dtype)}), order {self.order}, device {self.q.device.type}"
        )

    def in_compute_dtype(self) -> AttentionProblem:
        """This problem with query, key and value in the compute dtype (undoing ``native_dtype``)."""
        if self.q.dtype == self.dtype:
            return self
        return dataclasses.replace(self, q=self.q.to(self.dtype), k=self.k.to(self.dtype), v=self.v.to(self.dtype))

    def reduce_bias_grad(self, dbias: torch.Tensor) -> torch.Tensor:
        """Sum a (slots..., Lq, Lk) bias gradient down to the caller's bias shape."""
        return dbias.sum_to_size(_bias4d_shape(self.bias_shape)).reshape(self.bias_shape)

    @classmethod
    def build(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ranges: torch.Tensor,
        ts: torch.Tensor,
        *,
        scale: float,
        mask: torch.Tensor | None,
        causal: bool,
        bias: torch.Tensor | None,
        dropout_p: float,
        seed: int | None = None,
        native_dtype: bool = False,
    ) -> AttentionProblem:
        """Normalise one call. With ``native_dtype``, bfloat16/float16 query, key and value (all three in the same
        dtype) are kept in that dtype instead of float32 copies, for kernels that multiply them in that dtype and
        accumulate in float32 themselves (:mod:`.triton_kernel`); ``dtype`` stays the float32 compute dtype."""
        order = check_inputs(q, k, v, ranges, ts, mask=mask, bias=bias, dropout_p=dropout_p)
        b, h, lq, _ = q.shape
        lk = k.shape[2]
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        operands = dtype
        if native_dtype and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype == v.dtype:
            operands = q.dtype
        r32, t32 = ranges.detach().to(dtype), ts.detach().to(dtype)
        if mask is not None:
            # Boolean masks stay boolean (the kernels read one byte per score); float masks get -inf where masked.
            mask = mask if mask.dtype == torch.bool else additive_mask(mask.detach(), dtype)
            mask = _broadcast_view(mask, (b, h, lq, lk))
        bias_shape = None
        if bias is not None:
            bias_shape = tuple(bias.shape)
            bias = _broadcast_view(bias.detach().to(dtype), (b, h, lq, lk))
        return cls(
            dtype=dtype,
            q=_rows(q.detach(), operands),
            k=_rows(k.detach(), operands),
            v=_rows(v.detach(), operands),
            ranges=r32,
            ts=t32,
            ranges_per_head=r32.expand(h, 2 * order).contiguous(),
            ts_per_head=t32.expand(h, 2 * order).contiguous(),
            order=order,
            mask=mask,
            bias=bias,
            bias_shape=bias_shape,
            scale=float(scale),
            causal=bool(causal),
            dropout_p=float(dropout_p),
            seed=(draw_seed() if dropout_p > 0 else 0) if seed is None else int(seed),
        )


#: Input dtypes the kernels take (computed in float32; float64 in float64).
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ranges: torch.Tensor,
    ts: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> int:
    """Check one attention call's inputs from their shapes, dtypes and devices only (so it also runs on the fake
    tensors of ``torch.compile`` and ``torch.export``); return the SegLU order. ``TypeError`` for a wrong dtype,
    ``ValueError`` for a wrong shape, device or dropout, each naming the argument and what is allowed."""
    order = seglu_order(ranges, ts)
    for name, x in (("query", q), ("key", k), ("value", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in INPUT_DTYPES:
            raise TypeError(f"`{name}` has dtype {x.dtype}; MultiMax attention takes {INPUT_DTYPES}")
        if x.dim() != 4:
            raise ValueError(f"`{name}` must be 4-D (batch, heads, seq, dim), got shape {tuple(x.shape)}")
    b, h, _, d = q.shape
    hkv = k.shape[1]
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[3] != d or hkv == 0 or h % hkv:
        raise ValueError(
            f"incompatible shapes: query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)} (batch and "
            "head_dim must agree, key and value must have the same batch, heads and length, and the number of query "
            "heads must be a multiple of the number of key/value heads)"
        )
    if ranges.dim() == 2 and ranges.shape[0] != h:
        raise ValueError(f"per-head `ranges`/`ts` are for {ranges.shape[0]} heads but the query has {h} heads")
    devices = {t.device for t in (q, k, v, ranges, ts, mask, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(
            f"query, key, value, ranges, ts, mask and bias must be on one device, got {sorted(map(str, devices))}"
        )
    for name, x in (("attention_mask", mask), ("position_bias", bias)):
        if x is None:
            continue
        if name == "position_bias" and not x.is_floating_point():
            raise TypeError(f"`position_bias` must be a floating-point tensor, got {x.dtype}")
        shape = (1,) * (4 - x.dim()) + tuple(x.shape) if x.dim() <= 4 else None
        target = (b, h, q.shape[2], k.shape[2])
        if shape is None or any(s not in (1, t) for s, t in zip(shape, target)):
            raise ValueError(
                f"`{name}` of shape {tuple(x.shape)} does not broadcast to (batch, heads, q_len, kv_len) = {target}"
            )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"`dropout_p` must be in [0, 1), got {dropout_p}")
    return order


def _bias4d_shape(shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if shape is None:
        raise ValueError("no bias")
    return (1,) * (4 - len(shape)) + tuple(shape)


def parameter_grads(
    problem: AttentionProblem, sums: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``ranges`` and ``ts`` (the caller's shapes, in ``dtype``) from per-head sums ``(H, 4N)`` (see
    :func:`hf_multimax.functional.seglu_backward`)."""
    grad_ranges, grad_ts = seglu_parameter_grads(sums, problem.ts_per_head)
    if problem.ranges.dim() == 1:
        grad_ts, grad_ranges = grad_ts.sum(0), grad_ranges.sum(0)
    return grad_ranges.to(dtype), grad_ts.to(dtype)


def dropout_threshold(p: float) -> int:
    """Entries whose 24-bit hash is below this are dropped (``p`` of them)."""
    return int(math.floor(p * 16777216.0 + 0.5))
