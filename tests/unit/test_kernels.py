"""Fused MultiMax attention (``"multimax"``) against the reference (``"multimax_eager"``).

Every backend that runs here (the C++ CPU kernel and the blocked PyTorch path; FlexAttention's forward) is compared
with the reference on outputs and on the gradients of query, key, value, ``ranges``, ``ts`` (and T5's position bias),
over masks, GQA, cross attention, decoding, orders, shared/per-head parameters and dtypes; the hand-written backward
is checked by ``gradcheck`` in float64; whole models give the same logits and gradients with either implementation.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import hf_multimax  # noqa: F401  (registers "multimax")
from hf_multimax.attention import multimax_attention_forward, multimax_eager_attention_forward
from hf_multimax.kernels import (
    BackendCall,
    KernelFallbackWarning,
    cpu,
    last_backend,
    multimax_attention,
    record_backends,
    select_backend,
)
from hf_multimax.kernels.blocked import dropout_keep_scale
from hf_multimax.kernels.problem import AttentionProblem
from hf_multimax.masking import safe_softmax
from hf_multimax.modeling import SegLU
from hf_multimax.registry import IMPLEMENTATIONS

FMIN = torch.finfo(torch.float32).min

CPU_KERNEL = cpu.cpu_kernel_available()
needs_cpu_kernel = pytest.mark.skipif(not CPU_KERNEL, reason=f"CPU kernel unavailable: {cpu.cpu_kernel_status()[1]}")


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def attention_module(
    order: int, heads: int | None, *, causal: bool = False, n_rep: int = 1, seed: int = 0
) -> nn.Module:
    """A stand-in attention module with random (non-identity) MultiMax parameters."""
    module = nn.Module()
    module.multimax = SegLU(order, heads)
    module.is_causal = causal
    module.num_key_value_groups = n_rep
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.multimax.multimax_ranges.copy_(torch.randn(module.multimax.multimax_ranges.shape, generator=gen) * 0.5)
        module.multimax.multimax_ts.copy_(torch.randn(module.multimax.multimax_ts.shape, generator=gen) * 0.3)
    return module


def params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return module.multimax.multimax_ranges, module.multimax.multimax_ts


def left_padding_mask(batch: int, q_len: int, kv_len: int, pad: list[int], causal: bool = True) -> torch.Tensor:
    """Bool (batch, 1, q, kv) mask like Transformers' sdpa_mask for left padding: rows of padded queries are fully
    masked under causality (nothing before them is a real token)."""
    keys = torch.arange(kv_len)[None, :] >= torch.tensor(pad)[:, None]
    mask = keys[:, None, None, :].expand(batch, 1, q_len, kv_len).clone()
    if causal:
        offset = kv_len - q_len
        mask &= (torch.arange(kv_len)[None, :] <= torch.arange(q_len)[:, None] + offset)[None, None]
    return mask


def grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(out.dtype)
    return list(torch.autograd.grad(out, inputs, grad_out))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "") -> None:
    """Tolerance relative to the tensor's scale (parameter gradients are sums over every score)."""
    scale = max(1.0, expected.detach().abs().max().item())
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}"
    )


CASES = {
    # name: (batch, heads, kv_heads, q_len, kv_len, head_dim, mask kind, causal)
    "causal": (2, 4, 4, 37, 37, 16, None, True),
    "causal_gqa_tiles": (1, 4, 2, 150, 150, 16, None, True),
    "left_padding_bool": (3, 2, 2, 21, 21, 8, "padding", False),
    "padding_float": (2, 2, 1, 19, 19, 8, "float", False),
    "cross_long_kv": (2, 2, 2, 20, 300, 8, "keys", False),
    "decode_q1": (2, 4, 2, 1, 41, 16, "keys", False),
    "position_bias": (2, 2, 2, 13, 17, 8, "keys+bias", False),
}


def make_inputs(case: str, dtype=torch.float32, seed: int = 0):
    b, h, hkv, lq, lk, d, kind, causal = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(b, hkv, lk, d, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(b, hkv, lk, d, generator=gen).to(dtype).requires_grad_()
    mask = bias = None
    if kind == "padding":
        mask = left_padding_mask(b, lq, lk, pad=[0, 3, 7][:b])
    elif kind == "float":
        mask = torch.zeros(b, 1, lq, lk).masked_fill(~left_padding_mask(b, lq, lk, pad=[0, 5][:b]), FMIN)
    elif kind and kind.startswith("keys"):
        keep = torch.rand(b, lk, generator=gen) > 0.3
        keep[:, 0] = True
        mask = keep[:, None, None, :].expand(b, 1, lq, lk)
        if kind.endswith("bias"):
            bias = torch.randn(1, h, lq, lk, generator=gen).to(dtype).requires_grad_()
    return q, k, v, mask, bias, causal


def reference(module, q, k, v, mask, bias, causal, scale=None):
    module.is_causal = causal
    out, _ = multimax_eager_attention_forward(module, q, k, v, mask, scaling=scale, position_bias=bias)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# fused vs reference


@pytest.mark.parametrize("order,per_head", [(1, False), (2, True), (3, False), (2, False)])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_float32(case, order, per_head, backend):
    q, k, v, mask, bias, causal = make_inputs(case)
    module = attention_module(order, q.shape[1] if per_head else None, n_rep=q.shape[1] // k.shape[1])
    inputs = [q, k, v, *params(module)] + ([bias] if bias is not None else [])
    expected = reference(module, q, k, v, mask, bias, causal)
    out = multimax_attention(
        q, k, v, *params(module), attention_mask=mask, is_causal=causal, position_bias=bias, backend=backend
    )
    assert torch.isfinite(out).all()
    assert_close(out, expected, 1e-5, "output")
    names = ["dq", "dk", "dv", "d_ranges", "d_ts", "d_bias"]
    for name, got, want in zip(names, grads(out, inputs), grads(expected, inputs)):
        assert got.shape == want.shape
        assert_close(got, want, 2e-5, name)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["causal_gqa_tiles", "left_padding_bool", "position_bias"])
def test_half_precision_is_at_least_as_accurate_as_the_reference(case, dtype, cpu_target):
    """bf16/fp16 inputs and parameters (the model's dtype). The fused path computes in float32 throughout; the
    reference rounds the scores to the input dtype. Both are measured against the reference run in float32 on the
    same (exactly representable) values: the fused error must not exceed the reference's."""
    q, k, v, mask, bias, causal = make_inputs(case, dtype)
    module = attention_module(2, q.shape[1], n_rep=q.shape[1] // k.shape[1]).to(dtype)
    inputs = [q, k, v, *params(module)] + ([bias] if bias is not None else [])
    expected = reference(module, q, k, v, mask, bias, causal)
    module.is_causal = causal
    out, weights = multimax_attention_forward(module, q, k, v, mask, position_bias=bias)
    assert out.dtype == dtype and weights is None

    exact_inputs = [t.detach().float().requires_grad_() for t in inputs]
    exact_module = attention_module(2, q.shape[1], n_rep=module.num_key_value_groups)
    with torch.no_grad():
        exact_module.multimax.multimax_ranges.copy_(exact_inputs[3])
        exact_module.multimax.multimax_ts.copy_(exact_inputs[4])
    xq, xk, xv = exact_inputs[:3]
    exact = reference(exact_module, xq, xk, xv, mask, exact_inputs[5] if bias is not None else None, causal)
    exact_grads = grads(exact, [xq, xk, xv, *params(exact_module)] + exact_inputs[5:])

    def error(a, b):
        return (a.float() - b.float()).abs().max().item()

    assert error(out, exact) <= 1.25 * error(expected, exact) + 1e-3
    names = ["dq", "dk", "dv", "d_ranges", "d_ts", "d_bias"]
    for name, got, want, truth in zip(names, grads(out, inputs), grads(expected, inputs), exact_grads):
        assert got.dtype == want.dtype, name
        assert error(got, truth) <= 1.25 * error(want, truth) + 1e-3 * max(1.0, truth.abs().max().item()), name


def test_gradcheck_float64():
    """The hand-written backward (σ', parameter sums, bias gradient, GQA reductions, dropout) against finite
    differences: the blocked path computes in float64 for float64 inputs; the C++ kernel implements the same
    formulas and is checked against it and the reference above."""
    gen = torch.Generator().manual_seed(0)
    f64 = dict(dtype=torch.float64)
    q = torch.randn(2, 4, 5, 3, generator=gen, **f64).requires_grad_()
    k = torch.randn(2, 2, 7, 3, generator=gen, **f64).requires_grad_()
    v = torch.randn(2, 2, 7, 3, generator=gen, **f64).requires_grad_()
    bias = torch.randn(1, 4, 5, 7, generator=gen, **f64).requires_grad_()
    mask = torch.rand(2, 1, 5, 7, generator=gen) > 0.3
    mask[1, :, 2] = False  # one fully masked row
    for order, shape, dropout in [(1, (8,), 0.0), (2, (4, 4), 0.0), (3, (6,), 0.3)][:3]:
        shape = (shape[0], 2 * order) if len(shape) == 2 else (2 * order,)
        ranges = (torch.randn(shape, generator=gen, **f64) * 0.5).requires_grad_()
        ts = (torch.randn(shape, generator=gen, **f64) * 0.5).requires_grad_()

        def fn(q, k, v, ranges, ts, bias, dropout=dropout):
            torch.manual_seed(7)  # the same dropout mask at every evaluation
            return multimax_attention(q, k, v, ranges, ts, attention_mask=mask, position_bias=bias, dropout_p=dropout)

        assert torch.autograd.gradcheck(fn, (q, k, v, ranges, ts, bias))
    # causal, float mask absent, query longer than keys (top-left aligned)
    ranges = (torch.randn(4, generator=gen, **f64) * 0.5).requires_grad_()
    ts = (torch.randn(4, generator=gen, **f64) * 0.5).requires_grad_()
    q2 = torch.randn(1, 2, 6, 3, generator=gen, **f64).requires_grad_()
    k2, v2 = (torch.randn(1, 1, 4, 3, generator=gen, **f64).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(lambda *a: multimax_attention(*a, is_causal=True), (q2, k2, v2, ranges, ts))


# ----------------------------------------------------------------------------------------------------------------------
# masks and numerics


def test_fully_masked_rows_are_zero_not_nan(backend):
    q, k, v, _, _, _ = make_inputs("left_padding_bool")
    mask = torch.zeros(q.shape[0], 1, q.shape[2], k.shape[2], dtype=torch.bool)
    mask[0] = True  # batch 0 attends everywhere, batch 1 and 2 nowhere
    module = attention_module(2, None)
    out = multimax_attention(q, k, v, *params(module), attention_mask=mask, backend=backend)
    assert (out[1:] == 0).all() and (out[0] != 0).any()
    expected = reference(module, q, k, v, mask, None, False)
    for got, want in zip(grads(out, [q, k, v, *params(module)]), grads(expected, [q, k, v, *params(module)])):
        assert torch.isfinite(got).all()
        assert_close(got, want, 2e-5)


def test_minus_inf_rows_give_zeros_not_nan(backend):
    """Float masks of -inf everywhere on a row: a zero row and zero gradients, as the reference."""
    q, k, v, _, _, _ = make_inputs("padding_float")
    mask = torch.zeros(q.shape[0], 1, q.shape[2], k.shape[2])
    mask[1, :, 4:] = float("-inf")
    module = attention_module(2, None)
    out = multimax_attention(q, k, v, *params(module), attention_mask=mask, backend=backend)
    assert torch.isfinite(out).all() and (out[1, 4:] == 0).all()
    expected = reference(module, q, k, v, mask, None, False)
    assert_close(out, expected, 1e-5)
    for got, want in zip(grads(out, [q, k, v, *params(module)]), grads(expected, [q, k, v, *params(module)])):
        assert torch.isfinite(got).all()
        assert_close(got, want, 2e-5)


def test_causal_with_more_queries_than_keys_and_scaling(backend):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 9, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 2, 5, 8, generator=gen, requires_grad=True) for _ in range(2))
    module = attention_module(2, 2)
    expected = reference(module, q, k, v, None, None, True, scale=0.7)
    out = multimax_attention(q, k, v, *params(module), is_causal=True, scale=0.7, backend=backend)
    assert_close(out, expected, 1e-5)


@pytest.mark.parametrize("q_len,kv_len", [(1, 2100), (3, 2), (0, 4), (2, 0)])
def test_decoding_shapes_and_empty_sequences(backend, q_len, kv_len):
    """Few query rows (the decode path, whose key blocks are 2048 long: 2100 keys cross one) and empty queries or
    keys: the reference's output (zeros where a row has no key) and its gradients, no crash."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, q_len, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, kv_len, 8, generator=gen, requires_grad=True) for _ in range(2))
    module = attention_module(2, 2)
    out = multimax_attention(q, k, v, *params(module), backend=backend)
    assert out.shape == (2, q_len, 2, 8)
    if kv_len == 0 or q_len == 0:
        assert (out == 0).all()
        gradients = grads(out, [q, k, v])
        assert all(g.shape == x.shape and (g == 0).all() for g, x in zip(gradients, [q, k, v]))
        return
    expected = reference(module, q, k, v, None, None, False)
    assert_close(out, expected, 1e-5)
    inputs = [q, k, v, *params(module)]
    for got, want in zip(grads(out, inputs), grads(expected, inputs)):
        assert_close(got, want, 2e-5)


@needs_cpu_kernel
def test_strided_inputs_are_not_copied_and_still_correct(cpu_target):
    """Query/key/value as Transformers produces them, (B, L, H, D) projections viewed as (B, H, L, D)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 33, 4, 16, generator=gen).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 33, 2, 16, generator=gen).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 33, 2, 16, generator=gen).transpose(1, 2).requires_grad_()
    problem = AttentionProblem.build(
        q, k, v, torch.zeros(4), torch.zeros(4), scale=0.25, mask=None, causal=True, bias=None, dropout_p=0.0
    )
    assert problem.q.data_ptr() == q.data_ptr()  # float32 rows with unit stride: used in place
    module = attention_module(2, None, n_rep=2)
    expected = reference(module, q, k, v, None, None, True)
    out = multimax_attention(q, k, v, *params(module), is_causal=True, backend="cpu")
    assert_close(out, expected, 1e-5)
    for got, want in zip(grads(out, [q, k, v]), grads(expected, [q, k, v])):
        assert_close(got, want, 2e-5)


@needs_cpu_kernel
@pytest.mark.parametrize("case", ["cross_long_kv", "position_bias", "causal_gqa_tiles"])
def test_backward_split_over_key_blocks(case, monkeypatch, cpu_target):
    """Many threads for few (batch, head) pairs: the backward splits key blocks over tasks with private dq slices."""
    monkeypatch.setattr(cpu, "_kv_split", lambda *args: 3)
    q, k, v, mask, bias, causal = make_inputs(case)
    module = attention_module(2, q.shape[1], n_rep=q.shape[1] // k.shape[1])
    inputs = [q, k, v, *params(module)] + ([bias] if bias is not None else [])
    expected = reference(module, q, k, v, mask, bias, causal)
    out = multimax_attention(
        q, k, v, *params(module), attention_mask=mask, is_causal=causal, position_bias=bias, backend="cpu"
    )
    for got, want in zip(grads(out, inputs), grads(expected, inputs)):
        assert_close(got, want, 2e-5)


# ----------------------------------------------------------------------------------------------------------------------
# dropout


def test_dropout_mask_is_unbiased_and_reproducible():
    q, k, v, _, _, _ = make_inputs("causal")
    problem = AttentionProblem.build(
        q, k, v, torch.zeros(4), torch.zeros(4), scale=1.0, mask=None, causal=False, bias=None, dropout_p=0.25, seed=123
    )
    keep = dropout_keep_scale(problem, 0, q.shape[2], 0, k.shape[2])
    assert torch.equal(keep.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert abs((keep > 0).float().mean().item() - 0.75) < 0.03
    module = attention_module(2, None)
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(multimax_attention(q, k, v, *params(module), is_causal=True, dropout_p=0.25))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_dropout_matches_reference_with_the_same_mask(backend):
    """Dropout on the normalised weights, as in the reference; same mask for both backends (a shared counter hash)."""
    q, k, v, mask, bias, _ = make_inputs("position_bias")
    module = attention_module(2, q.shape[1])
    torch.manual_seed(5)
    out = multimax_attention(
        q, k, v, *params(module), attention_mask=mask, position_bias=bias, dropout_p=0.3, backend=backend
    )
    torch.manual_seed(5)
    problem = AttentionProblem.build(
        q, k, v, *params(module), scale=q.shape[-1] ** -0.5, mask=mask, causal=False, bias=bias, dropout_p=0.3
    )
    keep = dropout_keep_scale(problem, 0, q.shape[2], 0, k.shape[2])
    scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + bias
    weights = safe_softmax(module.multimax(scores).masked_fill(~mask, float("-inf")), dim=-1) * keep
    expected = torch.matmul(weights, v).transpose(1, 2)
    assert_close(out, expected, 1e-5)
    inputs = [q, k, v, *params(module), bias]
    for got, want in zip(grads(out, inputs), grads(expected, inputs)):
        assert_close(got, want, 2e-5)


def test_training_module_applies_dropout_and_eval_does_not():
    q, k, v, _, _, _ = make_inputs("causal")
    module = attention_module(2, None, causal=True)
    expected = reference(module, q, k, v, None, None, True)
    module.train()
    train_out, _ = multimax_attention_forward(module, q, k, v, None, dropout=0.5)
    module.eval()
    eval_out, _ = multimax_attention_forward(module, q, k, v, None, dropout=0.5)
    assert not torch.allclose(train_out, expected, atol=1e-3)
    assert_close(eval_out, expected, 1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# the Transformers-facing function and backend choice


def test_registered_as_multimax_with_reference_selectable():
    from transformers import AttentionInterface

    assert IMPLEMENTATIONS["multimax"].function is multimax_attention_forward
    assert IMPLEMENTATIONS["multimax_eager"].function is multimax_eager_attention_forward
    assert AttentionInterface._global_mapping["multimax"] is multimax_attention_forward


@pytest.mark.parametrize("name", ["softcap", "s_aux", "sinks"])
def test_refuses_score_changing_extras(name):
    q, k, v, _, _, _ = make_inputs("causal")
    with pytest.raises(ValueError, match=name):
        multimax_attention_forward(attention_module(2, None), q, k, v, None, **{name: torch.ones(1)})


def test_attention_weights_come_from_the_reference():
    q, k, v, mask, _, _ = make_inputs("left_padding_bool")
    module = attention_module(2, None)
    out, weights = multimax_attention_forward(module, q, k, v, mask, output_attentions=True)
    expected, expected_weights = multimax_eager_attention_forward(module, q, k, v, mask)
    assert weights is not None and torch.equal(weights, expected_weights) and torch.equal(out, expected)


def test_wrong_num_key_value_groups_is_refused():
    q, k, v, _, _, _ = make_inputs("causal_gqa_tiles")
    with pytest.raises(ValueError, match="num_key_value_groups"):
        multimax_attention_forward(attention_module(2, None, n_rep=1), q, k, v, None)


def test_backend_selection(monkeypatch):
    q32, q64 = torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4, dtype=torch.float64)
    assert select_backend(q64, 2, 0.0) == "torch"
    assert select_backend(q32, 5, 0.0) == "torch"  # orders above the compiled ones
    assert select_backend(q32, 2, 0.0) == ("cpu" if CPU_KERNEL else "torch")
    monkeypatch.setenv("HF_MULTIMAX_BACKEND", "torch")
    assert select_backend(q32, 2, 0.0) == "torch"
    with pytest.raises(ValueError, match="unknown"):
        select_backend(q32, 2, 0.0, backend="nonexistent")


def test_high_order_runs_on_the_pytorch_path():
    q, k, v, mask, _, _ = make_inputs("left_padding_bool")
    module = attention_module(5, None)
    expected = reference(module, q, k, v, mask, None, False)
    with record_backends() as seen, warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out, _ = multimax_attention_forward(module, q, k, v, mask)
    assert_close(out, expected, 1e-5)
    assert [(c.backend, c.wanted) for c in seen] == [("torch", "cpu" if CPU_KERNEL else "torch")]
    if CPU_KERNEL:  # the C++ kernel would have run it: a fallback, with a warning naming the order and the shapes
        (message,) = [str(w.message) for w in record if w.category is KernelFallbackWarning]
        assert "order 5" in message and "query (3, 2, 21, 8)" in message and "order 5" in seen[0].fallback


@pytest.mark.parametrize(
    "dtype,backend,expected",
    [
        (torch.float32, None, "cpu" if CPU_KERNEL else "torch"),
        (torch.bfloat16, None, "cpu" if CPU_KERNEL else "torch"),
        (torch.float64, None, "torch"),  # float64 (gradcheck): the blocked path by design, not a fallback
        (torch.float32, "torch", "torch"),
    ],
)
def test_record_backends_names_the_backend_that_ran(dtype, backend, expected, recwarn):
    q, k, v, mask, bias, causal = make_inputs("position_bias", dtype)
    module = attention_module(2, None).to(dtype)
    with record_backends() as seen:
        out = multimax_attention(q, k, v, *params(module), attention_mask=mask, position_bias=bias, backend=backend)
        grads(out, [q, k, v, *params(module), bias])
    assert seen == [BackendCall("forward", expected, expected), BackendCall("backward", expected, expected)]
    assert last_backend() == seen[-1]
    assert not [w for w in recwarn if w.category is KernelFallbackWarning]


def test_failed_build_warns_and_falls_back(monkeypatch, caplog):
    """Whatever stops the kernel (here the opt-out switch; equally a missing compiler or BLAS symbol) leaves the
    PyTorch path in charge with one logged warning."""
    saved = dict(cpu._STATE)
    monkeypatch.setattr(cpu, "_STATE", {})
    monkeypatch.setenv("HF_MULTIMAX_CPU_KERNEL", "0")
    with caplog.at_level(logging.WARNING, logger="hf_multimax.kernels.cpu"):
        assert cpu.cpu_kernel_status() == (False, "RuntimeError: disabled by HF_MULTIMAX_CPU_KERNEL=0")
    assert "pure-PyTorch" in caplog.text
    assert select_backend(torch.zeros(1, 1, 2, 4), 2, 0.0) == "torch"
    monkeypatch.setattr(cpu, "_STATE", saved)


@needs_cpu_kernel
def test_kernel_library_is_cached():
    path = cpu.library_path()
    assert path is not None and path.exists() and path.parent.name == "kernels"


# ----------------------------------------------------------------------------------------------------------------------
# FlexAttention (the CUDA path): its score_mod, checked on CPU through FlexAttention's eager forward


def test_flex_score_mod_matches_reference():
    flex = pytest.importorskip("hf_multimax.kernels.flex")
    if not flex._HAS_FLEX:
        pytest.skip("FlexAttention not available")
    for case in ["causal", "left_padding_bool", "position_bias"]:
        q, k, v, mask, bias, causal = (t.detach() if isinstance(t, torch.Tensor) else t for t in make_inputs(case))
        module = attention_module(2, q.shape[1])
        with torch.no_grad():
            expected = reference(module, q, k, v, mask, bias, causal)
            out = flex.flex_multimax_attention(
                q,
                k,
                v,
                *params(module),
                scale=q.shape[-1] ** -0.5,
                attention_mask=mask,
                is_causal=causal,
                position_bias=bias,
                compile=False,
            )
        assert_close(out, expected, 1e-5, case)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_on_cuda_matches_reference():
    q, k, v, mask, bias, causal = make_inputs("causal_gqa_tiles")
    q, k, v = (t.detach().cuda().requires_grad_() for t in (q, k, v))
    module = attention_module(2, q.shape[1], n_rep=2).cuda()
    inputs = [q, k, v, *params(module)]
    expected = reference(module, q, k, v, None, None, True)
    out = multimax_attention(q, k, v, *params(module), is_causal=True, backend="flex")
    assert_close(out, expected, 1e-4)
    for got, want in zip(grads(out, inputs), grads(expected, inputs)):
        assert_close(got, want, 1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# whole models: "multimax" and "multimax_eager" agree


def _randomise_multimax(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "multimax" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)


def _run(model_cls, config, impl: str, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = model_cls._from_config(config, attn_implementation=impl)
    _randomise_multimax(model)
    assert model.config._attn_implementation == impl
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_model_outputs(first, second) -> None:
    (logits_a, grads_a), (logits_b, grads_b) = first, second
    assert_close(logits_b, logits_a, 1e-5, "logits")
    assert grads_a.keys() == grads_b.keys() and any("multimax" in n for n in grads_a)
    for name in grads_a:
        assert_close(grads_b[name], grads_a[name], 1e-4, name)


@pytest.mark.parametrize("per_head", [False, True])
def test_tiny_llama_same_logits_and_grads(per_head):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        multimax_per_head=per_head,
        multimax_order=2,
    )
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0  # left padding: fully masked query rows
    batch = dict(input_ids=ids, attention_mask=attention_mask, labels=ids)
    _assert_same_model_outputs(
        _run(LlamaForCausalLM, config, "multimax_eager", batch), _run(LlamaForCausalLM, config, "multimax", batch)
    )


def test_tiny_llama_kv_cache_decoding_matches():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    results = []
    for impl in ("multimax_eager", "multimax"):
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(config, attn_implementation=impl).eval()
        _randomise_multimax(model)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=4,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        results.append(out)
    assert torch.equal(results[0].sequences, results[1].sequences)
    for a, b in zip(results[0].scores, results[1].scores):
        assert_close(b, a, 1e-5, "decoding scores")


def test_tiny_t5_position_bias_and_cross_attention():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        dropout_rate=0.0,
        multimax_per_head=True,
        multimax_order=3,
    )
    gen = torch.Generator().manual_seed(2)
    input_ids = torch.randint(1, 64, (2, 9), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    labels = torch.randint(1, 64, (2, 5), generator=gen)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    eager = _run(T5ForConditionalGeneration, config, "multimax_eager", batch)
    fused = _run(T5ForConditionalGeneration, config, "multimax", batch)
    assert any("relative_attention_bias" in n for n in eager[1])  # the position bias is learned through attention
    _assert_same_model_outputs(eager, fused)
