"""MultiMax inside real Transformers models, one row per model family (tests/families.py)."""

import copy

import pytest
import torch
from families import BY_NAME, FAMILIES, FAMILY_IDS, clone_weights, randomize_multimax
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import hf_multimax


def formula_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_bias=None, **kw):
    """An independent MultiMax reference: σ written from the formula, Transformers' additive eager mask."""
    seglu = module.multimax
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    s = (query @ key.transpose(-1, -2) * scaling).double()
    if position_bias is not None:
        s = s + position_bias.double()
    r = seglu.multimax_ranges.double()
    t = seglu.multimax_ts.double()
    if r.dim() == 1:
        r, t = r.expand(query.shape[1], -1), t.expand(query.shape[1], -1)
    sigma = s.clone()
    for h in range(query.shape[1]):
        for n in range(1, r.shape[-1] // 2 + 1):
            sh = s[:, h]
            sigma[:, h] += t[h, 2 * n - 2] * torch.clamp(r[h, 2 * n - 2] - sh, min=0) ** n
            sigma[:, h] += t[h, 2 * n - 1] * torch.clamp(sh - r[h, 2 * n - 1], min=0) ** n
    if attention_mask is not None:
        sigma = sigma + attention_mask.double()
    weights = torch.softmax(sigma, -1).to(query.dtype)
    return (weights @ value).transpose(1, 2).contiguous(), weights


AttentionInterface.register("test_formula", formula_attention)
AttentionMaskInterface.register("test_formula", eager_mask)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_every_attention_module_gets_parameters(family):
    model = family.build("multimax")
    seglus = hf_multimax.multimax_modules(model)
    assert len(seglus) == family.attention_modules
    for name, seglu in seglus.items():
        attention = model.get_submodule(name.rpartition(".")[0])
        assert hf_multimax.modeling.routes_through_interface(type(attention))
        assert seglu.multimax_ts.shape == (4,) and torch.all(seglu.multimax_ts == 0)
    names = set(model.state_dict())
    assert {f"{n}.multimax_ranges" for n in seglus} <= names and {f"{n}.multimax_ts" for n in seglus} <= names


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_identity_init_equals_softmax(family):
    multimax = family.build("multimax")
    eager = family.build("sdpa", seed=99)  # SDPA: fully masked rows give zeros, as MultiMax
    clone_weights(multimax, eager)
    inputs = family.inputs()
    torch.testing.assert_close(logits(multimax, inputs), logits(eager, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_random_parameters_match_formula(family, per_head):
    # float64 end to end, so that the comparison checks the math rather than float32 rounding of large scores
    model = family.build("multimax", multimax_order=3 if per_head else 2, multimax_per_head=per_head).double()
    randomize_multimax(model)
    # right padding: no fully masked rows, which Transformers' own float64 eager path turns into NaN
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in family.inputs(padding="right").items()}
    ours = logits(model, inputs)
    plain = family.build("eager").double()
    clone_weights(model, plain)
    assert (ours - logits(plain, inputs)).abs().max() > 1e-3, "random MultiMax parameters must change the outputs"
    model.set_attn_implementation("test_formula")
    torch.testing.assert_close(ours, logits(model, inputs), atol=1e-10, rtol=1e-9)


# (family, padding side): BERT pools its first token and uses absolute positions, so it is checked with right padding
@pytest.mark.parametrize(
    "name, side",
    [
        ("llama", "left"),
        ("llama", "right"),
        ("gpt2", "left"),
        ("gpt2", "right"),
        ("bert", "right"),
        ("t5", "left"),
        ("t5", "right"),
    ],
)
def test_padding_does_not_change_real_tokens(name, side):
    family = BY_NAME[name]
    model = family.build("multimax")
    randomize_multimax(model)
    padded = family.inputs(batch=2, seq=9, padding=side)
    keep = padded["attention_mask"][0].bool()
    alone = {k: v[:1] for k, v in padded.items()}
    alone["input_ids"] = alone["input_ids"][:, keep]
    alone["attention_mask"] = alone["attention_mask"][:, keep]
    if name == "gpt2":  # GPT-2 takes absolute positions from the raw index unless position_ids are given
        padded["position_ids"] = (padded["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    out_padded, out_alone = logits(model, padded), logits(model, alone)
    if family.kind == "causal":
        out_padded = out_padded[:, keep]
    torch.testing.assert_close(out_padded[:1], out_alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "bert", "bart"])
def test_fully_masked_rows_give_no_nan(name):
    family = BY_NAME[name]
    model = family.build("multimax")
    randomize_multimax(model, scale=2.0)
    inputs = family.inputs()
    inputs["attention_mask"][0] = 0  # a sample with every token masked
    out = logits(model, inputs)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["llama", "bert", "t5", "vit"])
def test_half_precision_forward_is_finite(name, dtype):
    family = BY_NAME[name]
    model = family.build("multimax").to(dtype)
    randomize_multimax(model)
    assert all(p.dtype == dtype for s in hf_multimax.multimax_modules(model).values() for p in s.parameters())
    inputs = family.inputs()
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    out = logits(model, inputs)
    assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "t5", "bart"])
def test_greedy_generation_with_cache_equals_without(name):
    family = BY_NAME[name]
    model = family.build("multimax")
    randomize_multimax(model)
    inputs = family.inputs(padding="left" if family.kind == "causal" else None)
    inputs.pop("decoder_input_ids", None)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(**inputs, use_cache=True, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_backward_reaches_every_layer(family):
    model = family.build("multimax").train()
    randomize_multimax(model)
    inputs = family.inputs()
    if family.kind == "causal":
        inputs["labels"] = inputs["input_ids"]
    elif family.kind == "seq2seq":
        inputs["labels"] = inputs.pop("decoder_input_ids")
    else:
        inputs["labels"] = torch.tensor([1, 0])
    model(**inputs).loss.backward()
    for name, seglu in hf_multimax.multimax_modules(model).items():
        assert seglu.multimax_ts.grad is not None and seglu.multimax_ts.grad.abs().sum() > 0, name
        assert seglu.multimax_ranges.grad is not None, name


def test_per_head_parameters_follow_query_heads_under_gqa():
    model = BY_NAME["llama"].build("multimax", multimax_per_head=True, multimax_order=1)
    for seglu in hf_multimax.multimax_modules(model).values():
        assert seglu.multimax_ts.shape == (4, 2)  # 4 query heads, 2 key/value heads


def test_model_outside_the_interface_is_refused():
    from transformers import AutoModelForCausalLM, BloomConfig

    config = BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=64)
    with pytest.raises(ValueError, match="BloomModel does not route its attention through"):
        AutoModelForCausalLM.from_config(config, attn_implementation="multimax")


def test_softcapping_is_refused_loudly():
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
        attn_logit_softcapping=50.0,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="multimax")
    with pytest.raises(ValueError, match="does not support `softcap`"):
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_output_attentions_from_reference_path():
    model = BY_NAME["llama"].build("multimax_eager")
    randomize_multimax(model)
    out = model(**BY_NAME["llama"].inputs(), output_attentions=True)
    assert len(out.attentions) == 2
    weights = out.attentions[0]
    assert weights.shape == (2, 4, 9, 9)
    rows = torch.ones(2, 4, 9)
    rows[0, :, :3] = 0  # sample 0's three left-padded queries have nothing to attend: all-zero weights
    torch.testing.assert_close(weights.sum(-1), rows)
    assert torch.all(weights[1].triu(1) == 0)  # causal (sample 1 has no padding)


def test_shared_config_object_is_flagged():
    family = BY_NAME["llama"]
    config = family.config()
    from transformers import AutoModelForCausalLM

    first = AutoModelForCausalLM.from_config(config, attn_implementation="multimax")
    with pytest.warns(hf_multimax.MultiMaxWarning, match="copy.deepcopy"):
        AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert first.config._attn_implementation == "eager"  # the Transformers behaviour the warning is about
    second = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="multimax")
    assert second.config is not config
