"""The paper's comparators as attention implementations: "sparsemax", "entmax15", "entmax_alpha", "evsoftmax"."""

import copy
import math

import pytest
import torch
from entmax import entmax15, entmax_bisect, sparsemax
from torch import nn
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    LlamaConfig,
)
from transformers.masking_utils import AttentionMaskInterface

import hf_multimax
from hf_multimax.comparators import (
    COMPARATORS,
    EVSOFTMAX_EPS,
    EntmaxAlphaParameters,
    masked_entmax15,
    masked_entmax_alpha,
    masked_evsoftmax,
    masked_sparsemax,
)

hf_multimax.register_comparators()  # registered on request only
NAMES = list(COMPARATORS)
ALPHAS = torch.tensor([1.2, 1.5, 2.0, 3.0])


def reference_evsoftmax(x: torch.Tensor, training: bool) -> torch.Tensor:
    """The authors' ev-softmax (github sisl/EvSoftmax, evsoftmax.py) on one unmasked row."""
    below = x < x.mean(dim=-1, keepdim=True)
    offset = torch.ones_like(x)
    offset[below] = EVSOFTMAX_EPS if training else 0.0
    p = torch.softmax(x, dim=-1) * offset
    return p / p.sum(dim=-1, keepdim=True)


def reference(name: str, row: torch.Tensor, head: int, training: bool = False) -> torch.Tensor:
    if name == "sparsemax":
        return sparsemax(row, dim=-1)
    if name == "entmax15":
        return entmax15(row, dim=-1)
    if name == "entmax_alpha":
        return entmax_bisect(row, ALPHAS[head].to(row.dtype), dim=-1)
    return reference_evsoftmax(row, training)


class FakeAttention(nn.Module):
    """What the attention functions read off an attention module."""

    def __init__(self, is_causal: bool = False, heads: int = 4, groups: int = 2):
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = groups
        self.entmax_alpha = EntmaxAlphaParameters(heads)
        with torch.no_grad():
            self.entmax_alpha.pre_alpha.copy_(torch.log(torch.expm1(ALPHAS - 1.01)))


def qkv(dtype=torch.float32, batch=2, heads=4, kv_heads=2, q=6, k=6, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda h, n: (torch.randn(batch, h, n, dim, generator=g) * 2).to(dtype)  # noqa: E731
    return make(heads, q), make(kv_heads, k), make(kv_heads, k)


def padding_mask(batch=2, q=6, k=6) -> torch.Tensor:
    """Boolean (True = attend): left padding in sequence 0, and query row 0 of sequence 1 fully masked."""
    mask = torch.ones(batch, 1, q, k, dtype=torch.bool)
    mask[0, :, :, :2] = False
    mask[1, :, 0, :] = False
    return mask


def mask_cases():
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    bool_mask = padding_mask()
    float_mask = torch.zeros(2, 1, 6, 6).masked_fill(~(bool_mask & causal), torch.finfo(torch.float32).min)
    return {
        "bool": (bool_mask, False, bool_mask.expand(2, 4, 6, 6)),
        "float": (float_mask, False, (bool_mask & causal).expand(2, 4, 6, 6)),
        "causal": (None, True, causal.expand(2, 4, 6, 6)),
        "none": (None, False, torch.ones(2, 4, 6, 6, dtype=torch.bool)),
    }


def run(name, mask, is_causal, dtype=torch.float32, training=False):
    module = FakeAttention(is_causal=is_causal).train(training)
    query, key, value = qkv(dtype)
    out, weights = AttentionInterface()[name](module, query, key, value, mask, scaling=0.5)
    return out, weights, (query, key, value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["bool", "float", "causal", "none"])
@pytest.mark.parametrize("name", NAMES)
def test_output_is_a_distribution_with_exact_zeros_at_masked(name, case, dtype):
    mask, is_causal, valid = mask_cases()[case]
    out, weights, _ = run(name, mask, is_causal, dtype)
    assert weights.dtype == dtype and out.dtype == dtype
    assert torch.isfinite(weights).all() and torch.isfinite(out).all()
    assert (weights >= 0).all()
    assert (weights[~valid] == 0).all()
    rows = valid.any(-1)
    sums = weights.float().sum(-1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(sums[rows], torch.ones_like(sums[rows]), atol=tol, rtol=0)
    assert (sums[~rows] == 0).all()  # fully masked rows: all zeros, no NaN


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_reference_on_unmasked_entries(name, training):
    mask, _, valid = mask_cases()["float"]
    _, weights, (query, key, _) = run(name, mask, False, training=training)
    scores = 0.5 * query @ key.repeat_interleave(2, dim=1).transpose(-1, -2)
    for b in range(2):
        for h in range(4):
            for i in range(6):
                v = valid[b, h, i]
                if v.any():
                    expected = reference(name, scores[b, h, i][v], h, training)
                    torch.testing.assert_close(weights[b, h, i][v], expected, atol=1e-5, rtol=1e-4)


def test_sparse_where_it_should_be():
    scores = torch.tensor([[3.0, 2.9, 0.0, -1.0, -2.0]])
    for function in (masked_sparsemax, masked_entmax15, lambda s: masked_entmax_alpha(s, 1.5)):
        p = function(scores)
        assert (p[0, 2:] == 0).all() and (p[0, :2] > 0.3).all()  # two modes kept, the tail exactly zero
    ev = masked_evsoftmax(scores)
    assert (ev[0, 2:] == 0).all() and (ev[0, :2] > 0).all()  # mean 0.58: the three below it are zeroed
    ev_train = masked_evsoftmax(scores, training=True)
    assert (ev_train[0, 2:] > 0).all() and (ev_train[0, 2:] < 1e-5).all()  # ε instead of zeros in training
    dense = torch.softmax(scores, -1)
    assert (dense > 0).all()


def test_masked_values_do_not_matter():
    scores = torch.randn(3, 7)
    valid = torch.tensor([[True] * 4 + [False] * 3] * 3)
    other = scores.clone()
    other[~valid] = torch.tensor([1e4, -1e30, float("inf")]).repeat(3)[: (~valid).sum()]
    for function in (masked_sparsemax, masked_entmax15, lambda s, v: masked_entmax_alpha(s, 1.3, v), masked_evsoftmax):
        torch.testing.assert_close(function(scores, valid), function(other, valid))


def test_gradients_float64():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([1.3, 1.6, 2.2], dtype=torch.float64, requires_grad=True)
    valid = torch.ones(2, 1, 4, 6, dtype=torch.bool)
    valid[0, :, :, 4:] = False
    assert torch.autograd.gradcheck(lambda s, a: masked_entmax_alpha(s, a, valid), (scores, alpha), atol=1e-5)
    assert torch.autograd.gradcheck(lambda s: masked_evsoftmax(s, valid, training=True), (scores,))
    assert torch.autograd.gradcheck(lambda s: masked_entmax15(s, valid), (scores,))


def test_registered_with_mask_functions():
    for name in NAMES:
        assert name in AttentionInterface().valid_keys()
        assert name in AttentionMaskInterface().valid_keys()  # else Transformers would pass attention_mask=None


def test_refuses_softcap():
    module = FakeAttention()
    query, key, value = qkv()
    with pytest.raises(ValueError, match="softcap"):
        AttentionInterface()["sparsemax"](module, query, key, value, None, softcap=30.0)


# ---------------------------------------------------------------------------------------------------------------------
# Inside real models


def llama_config():
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        initializer_range=0.2,
    )


def bert_config():
    return BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=64,
        max_position_embeddings=64,
        num_labels=3,
        initializer_range=0.2,
    )


def text_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 64, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("name", NAMES)
def test_tiny_models_train_with_each_comparator(name, family):
    torch.manual_seed(0)
    if family == "llama":
        model = AutoModelForCausalLM.from_config(llama_config(), attn_implementation=name)
        inputs = dict(text_inputs(), labels=text_inputs()["input_ids"])
    else:
        model = AutoModelForSequenceClassification.from_config(bert_config(), attn_implementation=name)
        inputs = dict(text_inputs(), labels=torch.tensor([0, 2]))
    model.train()
    out = model(**inputs, output_attentions=True)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        weights = model(**text_inputs(), output_attentions=True).attentions
    assert len(weights) == 2
    for w in weights:
        assert torch.isfinite(w).all()
        assert (w[0, :, :, :3] == 0).all()  # left padding of sequence 0 gets exactly zero weight
        if family == "llama":
            assert (w[1].triu(1) == 0).all()  # causal
    if name in ("sparsemax", "entmax15"):
        assert any((w[1] == 0).any() for w in weights)  # sparse where nothing is masked


def test_bfloat16_models():
    for name in NAMES:
        model = AutoModelForCausalLM.from_config(llama_config(), attn_implementation=name).to(torch.bfloat16).eval()
        with torch.no_grad():
            out = model(**text_inputs(), output_attentions=True)
        assert torch.isfinite(out.logits).all()
        assert all(torch.isfinite(w).all() and w.dtype == torch.bfloat16 for w in out.attentions)


def test_entmax_alpha_parameters_learn_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(), attn_implementation="entmax_alpha")
    layers = [layer.self_attn.entmax_alpha for layer in model.model.layers]
    assert all(isinstance(p, EntmaxAlphaParameters) and p.pre_alpha.shape == (4,) for p in layers)
    torch.testing.assert_close(layers[0].alpha(), torch.full((4,), 1.5))
    assert "model.layers.0.self_attn.entmax_alpha.pre_alpha" in model.state_dict()

    inputs = dict(text_inputs(), labels=text_inputs()["input_ids"])
    model(**inputs).loss.backward()
    grads = [p.pre_alpha.grad for p in layers]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)

    with torch.no_grad():
        for i, p in enumerate(layers):
            p.pre_alpha.add_(0.1 * (i + 1))
    model.save_pretrained(tmp_path / "alpha")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "alpha", attn_implementation="entmax_alpha").eval()
    for p, q in zip(layers, (layer.self_attn.entmax_alpha for layer in reloaded.model.layers)):
        torch.testing.assert_close(p.alpha(), q.alpha())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**text_inputs()).logits, reloaded(**text_inputs()).logits)


def test_entmax_alpha_initialised_when_the_checkpoint_lacks_it(tmp_path):
    AutoModelForCausalLM.from_config(llama_config()).save_pretrained(tmp_path / "softmax")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "softmax", attn_implementation="entmax_alpha")
    for layer in model.model.layers:
        torch.testing.assert_close(layer.self_attn.entmax_alpha.alpha(), torch.full((4,), 1.5))
    switched = AutoModelForCausalLM.from_config(copy.deepcopy(llama_config()), attn_implementation="sdpa")
    switched.set_attn_implementation("entmax_alpha")
    assert all(layer.self_attn.entmax_alpha.pre_alpha.shape == (4,) for layer in switched.model.layers)
    assert math.isclose(switched.model.layers[1].self_attn.entmax_alpha.alpha()[0].item(), 1.5, rel_tol=1e-6)
