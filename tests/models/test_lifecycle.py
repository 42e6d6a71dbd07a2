"""Parameter lifecycle: creation under from_pretrained's meta device, init, save/load, flags, and bad input."""

import json
import os
import warnings

import pytest
import torch
from families import BY_NAME, FAMILIES, FAMILY_IDS, randomize_multimax
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, LlamaConfig

import hf_multimax

LLAMA = BY_NAME["llama"]


def softmax_checkpoint(tmp_path, family=LLAMA):
    """A plain SoftMax checkpoint, as on the Hub."""
    model = family.build("sdpa")
    model.save_pretrained(tmp_path / "softmax")
    return tmp_path / "softmax", model


def folder_state(path):
    return {name: os.path.getmtime(path / name) for name in os.listdir(path)}


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_softmax_checkpoint_loads_as_identity_multimax(tmp_path, family):
    path, softmax = softmax_checkpoint(tmp_path, family)
    model = family.auto.from_pretrained(path, attn_implementation="multimax")
    seglus = hf_multimax.multimax_modules(model)
    assert len(seglus) == family.attention_modules
    for seglu in seglus.values():  # materialised from the meta device and initialised, not left as empty memory
        assert seglu.multimax_ts.device.type == "cpu"
        assert torch.equal(seglu.multimax_ts, torch.zeros(4)) and torch.equal(seglu.multimax_ranges, torch.zeros(4))
    # right padding: SDPA treats fully masked rows (left padding under a causal mask) differently from eager
    inputs = family.inputs(padding="right")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, softmax(**inputs).logits, atol=1e-5, rtol=0)


def test_paper_init_draws_small_trunc_normal_values(tmp_path):
    path, _ = softmax_checkpoint(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="multimax", multimax_init="paper")
    values = torch.cat([p.flatten() for p in hf_multimax.multimax_modules(model).values() for p in p.parameters()])
    # upstream's trunc_normal_(std=0.02) keeps torch's default cut at ±2 (absolute), as timm does
    assert values.abs().max() < 0.2 and 0.008 < values.std() < 0.04
    assert values.unique().numel() == values.numel()


def test_save_and_reload_is_bit_identical(tmp_path):
    model = LLAMA.build("multimax", multimax_per_head=True, multimax_order=3)
    randomize_multimax(model)
    model.save_pretrained(tmp_path / "mm")
    with safe_open(tmp_path / "mm" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.multimax.multimax_ts" in keys
    assert "model.layers.1.self_attn.multimax.multimax_ranges" in keys
    config = json.loads((tmp_path / "mm" / "config.json").read_text())
    assert config["multimax_order"] == 3 and config["multimax_per_head"] is True
    assert config["multimax_init"] == "identity" and config["multimax_output"] is False

    # "paper" asks for random init; the checkpoint's values must win and never be re-initialised
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "mm", attn_implementation="multimax", multimax_init="paper"
    )
    for name, seglu in hf_multimax.multimax_modules(model).items():
        other = reloaded.get_submodule(name)
        assert other.multimax_ts.shape == (4, 6)
        assert torch.equal(other.multimax_ts, seglu.multimax_ts) and torch.equal(
            other.multimax_ranges, seglu.multimax_ranges
        )
    inputs = LLAMA.inputs()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model.eval()(**inputs).logits)


@pytest.mark.parametrize("flags", [{}, {"multimax_order": 3, "multimax_per_head": True}], ids=["defaults", "flags"])
@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_save_and_reload_every_family_records_its_flags(tmp_path, family, flags):
    """Every family writes its MultiMax flags to its own top-level config.json, also when they are left at their
    defaults (T5 and BART hold copies of the config in their stacks), and reloads as the same model."""
    from hf_multimax.checkpoint import read_checkpoint

    model = family.build("multimax", **flags)
    randomize_multimax(model)
    model.save_pretrained(tmp_path / family.name)
    config = json.loads((tmp_path / family.name / "config.json").read_text())
    expected = {**hf_multimax.FLAG_DEFAULTS, **flags}
    assert {name: config.get(name) for name in expected} == expected
    checkpoint = read_checkpoint(tmp_path / family.name)
    assert checkpoint.flags == expected and checkpoint.attn_implementation == "multimax"
    assert len(checkpoint.modules) == family.attention_modules
    assert {m.role for m in checkpoint.modules} == {"attention"}
    reloaded = family.auto.from_pretrained(tmp_path / family.name, attn_implementation="multimax").eval()
    assert {name: getattr(reloaded.config, name) for name in expected} == expected
    for name, seglu in hf_multimax.multimax_modules(model).items():
        assert torch.equal(reloaded.get_submodule(name).multimax_ts, seglu.multimax_ts)
    inputs = family.inputs()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model.eval()(**inputs).logits)


def test_every_route_gives_the_same_model(tmp_path):
    path, _ = softmax_checkpoint(tmp_path)
    inputs = LLAMA.inputs()
    loaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation="multimax")
    from_config = AutoModelForCausalLM.from_config(LlamaConfig.from_pretrained(path), attn_implementation="multimax")
    from_config.load_state_dict(loaded.state_dict())
    switched = AutoModelForCausalLM.from_pretrained(path)  # sdpa
    assert not hf_multimax.multimax_modules(switched)
    switched.set_attn_implementation("multimax")
    assert switched.config._attn_implementation == "multimax"
    assert set(switched.state_dict()) == set(loaded.state_dict())
    with torch.no_grad():
        expected = loaded(**inputs).logits
        for other in (from_config.eval(), switched.eval()):
            torch.testing.assert_close(other(**inputs).logits, expected, atol=1e-6, rtol=0)


def test_set_attn_implementation_creates_parameters_on_the_model_dtype():
    model = LLAMA.build("sdpa").to(torch.bfloat16)
    model.config.multimax_init = "paper"
    model.set_attn_implementation("multimax")
    for seglu in hf_multimax.multimax_modules(model).values():
        assert seglu.multimax_ts.dtype == torch.bfloat16 and seglu.multimax_ts.abs().sum() > 0


def test_flags_from_pretrained_kwargs_reach_the_config(tmp_path):
    path, _ = softmax_checkpoint(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="multimax", multimax_order=3, multimax_per_head=True
    )
    assert model.config.multimax_order == 3
    assert hf_multimax.multimax_modules(model)["model.layers.0.self_attn.multimax"].multimax_ts.shape == (4, 6)
    model.save_pretrained(tmp_path / "again")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "again", attn_implementation="multimax")
    assert reloaded.config.multimax_order == 3 and reloaded.config.multimax_per_head is True


@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("multimax_order", 0, "`multimax_order` must be an int >= 1, got 0"),
        ("multimax_order", 2.0, "`multimax_order` must be an int >= 1, got 2.0"),
        ("multimax_order", True, "`multimax_order` must be an int >= 1, got True"),
        ("multimax_init", "xavier", "`multimax_init` must be one of ('identity', 'paper'), got 'xavier'"),
        ("multimax_per_head", "yes", "`multimax_per_head` must be a bool (True or False), got 'yes'"),
        ("multimax_output", 1, "`multimax_output` must be a bool (True or False), got 1"),
    ],
)
def test_bad_flags_fail_before_any_weight_is_touched(tmp_path, flag, value, words):
    path, _ = softmax_checkpoint(tmp_path)
    before = folder_state(path)
    with pytest.raises(ValueError, match=__import__("re").escape(words)):
        AutoModelForCausalLM.from_pretrained(path, attn_implementation="multimax", **{flag: value})
    config = LLAMA.config()
    with pytest.raises(ValueError, match=__import__("re").escape(words)):
        setattr(config, flag, value)
    assert folder_state(path) == before


def test_wrong_parameter_shape_in_checkpoint_is_named(tmp_path):
    model = LLAMA.build("multimax")
    model.save_pretrained(tmp_path / "mm")
    with pytest.raises(
        ValueError, match=r"multimax_ranges` has shape \(4,\) in the checkpoint but the model expects \(6,\)"
    ):
        AutoModelForCausalLM.from_pretrained(tmp_path / "mm", attn_implementation="multimax", multimax_order=3)


def test_multimax_checkpoint_loads_as_multimax_and_another_implementation_warns_with_the_fix(tmp_path):
    model = LLAMA.build("multimax")
    randomize_multimax(model)
    model.save_pretrained(tmp_path / "mm")
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf_multimax.MultiMaxWarning)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mm")  # config.json records "multimax"
    assert reloaded.config._attn_implementation == "multimax"
    for name, seglu in hf_multimax.multimax_modules(model).items():
        assert torch.equal(hf_multimax.multimax_modules(reloaded)[name].multimax_ts, seglu.multimax_ts)
    with pytest.warns(hf_multimax.MultiMaxWarning, match=r'attn_implementation="multimax"\)` to use them'):
        softmax = AutoModelForCausalLM.from_pretrained(tmp_path / "mm", attn_implementation="sdpa")
    assert hf_multimax.multimax_modules(softmax) == {}


def test_a_base_model_from_an_output_multimax_checkpoint_drops_the_head_quietly(tmp_path):
    """A multimax_output ...ForCausalLM checkpoint loaded as its base model: the head's σ goes with the head (as
    Transformers drops the head's weight), with no MultiMax warning about attention; the attention's σ loads. Loaded
    with SoftMax attention, the attention's σ is still named as dropped, the head's is not."""
    from transformers import AutoModel

    model = LLAMA.build("multimax", multimax_output=True)
    randomize_multimax(model)
    model.save_pretrained(tmp_path / "mm")
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf_multimax.MultiMaxWarning)
        base = AutoModel.from_pretrained(tmp_path / "mm")
    assert base.config._attn_implementation == "multimax"
    key = "layers.0.self_attn.multimax.multimax_ts"
    assert torch.equal(base.state_dict()[key], model.state_dict()[f"model.{key}"])
    with pytest.warns(hf_multimax.MultiMaxWarning) as record:
        AutoModel.from_pretrained(tmp_path / "mm", attn_implementation="sdpa")
    messages = [str(w.message) for w in record if issubclass(w.category, hf_multimax.MultiMaxWarning)]
    assert len(messages) == 1 and "self_attn.multimax" in messages[0] and "lm_head" not in messages[0], messages


def test_loading_a_softmax_checkpoint_is_quiet(tmp_path):
    path, _ = softmax_checkpoint(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hf_multimax.MultiMaxWarning)
        AutoModelForCausalLM.from_pretrained(path, attn_implementation="multimax")
        AutoModelForCausalLM.from_pretrained(path)


def test_fp16_from_pretrained_keeps_parameters_in_model_dtype(tmp_path):
    path, _ = softmax_checkpoint(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="multimax", dtype=torch.float16)
    for seglu in hf_multimax.multimax_modules(model).values():
        assert seglu.multimax_ts.dtype == torch.float16 and torch.all(seglu.multimax_ts == 0)


def test_encoder_decoder_cross_attention_parameters_round_trip(tmp_path):
    t5 = BY_NAME["t5"]
    model = t5.build("multimax")
    randomize_multimax(model)
    model.save_pretrained(tmp_path / "t5")
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "t5", attn_implementation="multimax")
    cross = "decoder.block.0.layer.1.EncDecAttention.multimax"
    assert torch.equal(reloaded.get_submodule(cross).multimax_ts, model.get_submodule(cross).multimax_ts)
