"""Fully masked query rows give zeros (and zero gradients), never NaN or the average of the values, in every attention
implementation this package registers; and padded keys' contents never reach the output (hf_multimax.masking)."""

import pytest
import torch
from families import BY_NAME, randomize_multimax
from torch import nn
from transformers import AttentionInterface

import hf_multimax
from hf_multimax.comparators import COMPARATORS, EntmaxAlphaParameters
from hf_multimax.modeling import SegLU

hf_multimax.register_comparators()  # registered on request only
IMPLEMENTATIONS = ["multimax", "multimax_eager", *COMPARATORS]
MIN = torch.finfo(torch.float32).min


def attention_module(causal: bool = False) -> nn.Module:
    module = nn.Module()
    module.is_causal = causal
    module.num_key_value_groups = 2
    module.multimax = SegLU(2, None)
    module.entmax_alpha = EntmaxAlphaParameters(4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        module.multimax.multimax_ranges.copy_(torch.randn(4, generator=g) * 0.5)
        module.multimax.multimax_ts.copy_(torch.randn(4, generator=g) * 0.3)
    return module


def masks() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (mask, fully masked rows (batch, q)): sequence 1 attends nowhere from query rows 2 and 4."""
    keep = torch.ones(2, 1, 6, 7, dtype=torch.bool)
    keep[1, :, [2, 4]] = False
    keep[0, :, :, 5:] = False  # some padding elsewhere, rows still have keys
    empty = ~keep[:, 0].any(-1)
    return {
        "bool": (keep, empty),
        "float_min": (torch.zeros(keep.shape).masked_fill(~keep, MIN), empty),
        "float_-inf": (torch.zeros(keep.shape).masked_fill(~keep, float("-inf")), empty),
    }


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 6, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 7, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 7, 8, generator=g, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("kind", list(masks()))
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_fully_masked_rows_are_zero_with_finite_gradients(name, kind):
    mask, empty = masks()[kind]
    module = attention_module()
    q, k, v = inputs()
    out, _ = AttentionInterface()[name](module, q, k, v, mask, scaling=0.5)  # (batch, q, heads, dim)
    assert torch.isfinite(out).all()
    assert (out[empty] == 0).all(), "a row with no key to attend must give zeros"
    assert (out[~empty].abs().sum(-1) > 0).all()
    parameters = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.pow(2).sum(), [q, k, v, *parameters], allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert (grads[0].transpose(1, 2)[empty] == 0).all(), "no gradient flows into a query with nothing to attend"


@pytest.mark.parametrize("kind", list(masks()))
def test_fused_and_reference_agree_on_fully_masked_rows(kind):
    mask, _ = masks()[kind]
    module = attention_module()
    q, k, v = inputs()
    fused, _ = AttentionInterface()["multimax"](module, q, k, v, mask, scaling=0.5)
    reference, _ = AttentionInterface()["multimax_eager"](module, q, k, v, mask, scaling=0.5)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    for got, want in zip(
        torch.autograd.grad(fused.sum(), [q, k, v, *module.multimax.parameters()]),
        torch.autograd.grad(reference.sum(), [q, k, v, *module.multimax.parameters()]),
    ):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", ["bart", "t5"])
def test_padded_encoder_positions_do_not_leak_through_cross_attention(family, name):
    """Transformers' own check (GPT-2's test_cross_attention_respects_encoder_padding_mask), for an encoder-decoder:
    what the encoder produced at padded positions must not change the decoder's output, also for a sample whose
    every encoder position is padded (its cross-attention rows have no key)."""
    fam = BY_NAME[family]
    model = fam.build(name)
    randomize_multimax(model)
    batch = fam.inputs(padding=None)
    enc_mask = torch.ones_like(batch["attention_mask"])
    enc_mask[0, 4:] = 0  # partly padded
    enc_mask[1, :] = 0  # fully padded
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, enc_mask.shape[1], model.config.d_model, generator=g)
    garbage = hidden.clone()
    garbage[enc_mask == 0] = torch.randn(int((enc_mask == 0).sum()), model.config.d_model, generator=g) * 100
    outputs = []
    with torch.no_grad():
        for states in (hidden, garbage):
            out = model(
                encoder_outputs=(states,), attention_mask=enc_mask, decoder_input_ids=batch["decoder_input_ids"]
            )
            outputs.append(out.logits)
    assert torch.isfinite(outputs[0]).all()
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
