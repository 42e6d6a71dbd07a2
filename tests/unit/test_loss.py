"""Chunked output-layer MultiMax + cross-entropy against the materialising path a ``multimax_output`` model takes."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hf_multimax  # noqa: F401
from hf_multimax.loss import (
    causal_lm_loss,
    fused_linear_seglu_cross_entropy,
    unfused_linear_seglu_cross_entropy,
)


def make(n=37, hidden=16, vocab=101, order=2, bias=True, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * 0.3).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=gen).to(dtype).requires_grad_() if bias else None
    r = (torch.randn(2 * order, generator=gen) * 0.5).to(dtype).requires_grad_()
    t = (torch.randn(2 * order, generator=gen) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::5] = -100
    return h, w, b, r, t, labels


def inputs_of(h, w, b, r, t):
    return [x for x in (h, w, b, r, t) if x is not None]


def check(fused_loss, ref_loss, inputs, tol):
    torch.testing.assert_close(fused_loss, ref_loss, atol=tol, rtol=tol)
    for got, want in zip(torch.autograd.grad(fused_loss, inputs), torch.autograd.grad(ref_loss, inputs)):
        assert got.dtype == want.dtype and got.shape == want.shape
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("chunk_size,bias,reduction", [(1, True, "mean"), (7, False, "mean"), (None, True, "sum")])
def test_same_loss_and_gradients_as_unfused(backend, order, chunk_size, bias, reduction):
    h, w, b, r, t, labels = make(order=order, bias=bias)
    ref = unfused_linear_seglu_cross_entropy(h, w, b, r, t, labels, reduction=reduction)
    got = fused_linear_seglu_cross_entropy(
        h, w, b, r, t, labels, chunk_size=chunk_size, reduction=reduction, backend=backend
    )
    check(got, ref, inputs_of(h, w, b, r, t), 1e-5)


def test_batched_hidden_and_frozen_inputs(backend):
    """(batch, seq, hidden) input; a frozen head (no weight gradient) is not computed and not returned."""
    h, w, b, r, t, labels = make(n=24)
    w.requires_grad_(False)
    h3, labels2 = h.reshape(2, 12, -1), labels.reshape(2, 12)
    ref = unfused_linear_seglu_cross_entropy(h3, w, b, r, t, labels2)
    got = fused_linear_seglu_cross_entropy(h3, w, b, r, t, labels2, chunk_size=5, backend=backend)
    check(got, ref, [h, b, r, t], 1e-5)


def test_bfloat16_head(backend):
    """A bf16 model: the head runs in bf16 in both paths; σ and the loss in float32 (the unfused hook also rounds
    σ(logits) to bf16, the fused path does not), so they agree to bf16 precision."""
    h, w, b, r, t, labels = make(dtype=torch.bfloat16)
    ref = unfused_linear_seglu_cross_entropy(h, w, b, r, t, labels)
    got = fused_linear_seglu_cross_entropy(h, w, b, r, t, labels, chunk_size=10, backend=backend)
    check(got, ref, inputs_of(h, w, b, r, t), 3e-2)


def test_gradcheck_float64():
    h, w, b, r, t, labels = make(n=6, hidden=3, vocab=7, order=2, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *x: fused_linear_seglu_cross_entropy(*x, labels, chunk_size=4), (h, w, b, r, t)
    )


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_never_materialises_the_logits(backend):
    n, vocab, chunk = 64, 512, 8
    h, w, b, r, t, labels = make(n=n, vocab=vocab)
    with LargestTensor() as fused:
        loss = fused_linear_seglu_cross_entropy(h, w, b, r, t, labels, chunk_size=chunk, backend=backend)
        loss.backward()
    with LargestTensor() as unfused:
        unfused_linear_seglu_cross_entropy(h, w, b, r, t, labels).backward()
    assert unfused.largest >= n * vocab
    assert fused.largest <= max(chunk * vocab, w.numel())


def test_errors_and_edge_cases():
    h, w, b, r, t, labels = make()
    with pytest.raises(IndexError):
        fused_linear_seglu_cross_entropy(h, w, b, r, t, labels.clamp(min=0) + 1000)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_seglu_cross_entropy(h, w, b, r, t, labels, reduction="none")
    with pytest.raises(ValueError, match="shared"):
        fused_linear_seglu_cross_entropy(h, w, b, r.expand(2, -1), t.expand(2, -1), labels)
    ignored = torch.full_like(labels, -100)
    assert torch.isnan(fused_linear_seglu_cross_entropy(h, w, b, r, t, ignored))  # like F.cross_entropy
    assert torch.isnan(unfused_linear_seglu_cross_entropy(h, w, b, r, t, ignored))


def test_causal_lm_loss_matches_model_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        multimax_output=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation="multimax")
    with torch.no_grad():
        model.lm_head.multimax.multimax_ranges.normal_(0, 0.5)
        model.lm_head.multimax.multimax_ts.normal_(0, 0.3)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)

    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    expected_grads = torch.autograd.grad(expected, list(model.parameters()), allow_unused=True)
    got = causal_lm_loss(model, labels, input_ids=ids, attention_mask=mask, chunk_size=5)
    got_grads = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for (name, _), g, e in zip(model.named_parameters(), got_grads, expected_grads):
        assert (g is None) == (e is None), name
        if e is not None:
            torch.testing.assert_close(g, e, atol=1e-5 * max(1.0, e.abs().max().item()), rtol=1e-4, msg=name)


def test_causal_lm_loss_needs_output_multimax():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM._from_config(config)
    with pytest.raises(ValueError, match="multimax_output"):
        causal_lm_loss(model, torch.zeros(1, 3, dtype=torch.long), input_ids=torch.zeros(1, 3, dtype=torch.long))
