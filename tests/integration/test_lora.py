"""LoRA trains and saves the learned parameters of every registered attention implementation with the adapter
(MultiMax's SegLU and α-EntMax's α alike), because ``modules_to_save`` comes from the registry."""

import pytest
import torch
from families import BY_NAME
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from scripts import load_example
from transformers import AutoModelForCausalLM

import hf_multimax
from hf_multimax import registry

hf_multimax.register_comparators()  # registered on request only

PARAMETRIC = sorted(
    {name for name, impl in registry.IMPLEMENTATIONS.items() if impl.parameters is not None} - {"multimax_eager"}
)


@pytest.mark.parametrize("implementation", PARAMETRIC)
def test_lora_script_trains_and_saves_the_implementations_parameters(tmp_path, implementation):
    spec = registry.parametric(implementation)
    out = tmp_path / implementation
    load_example("run_clm").main(
        [
            "--lora",
            "--attn_implementation",
            implementation,
            "--output_dir",
            str(out),
            "--max_train_steps",
            "4",
            "--max_train_samples",
            "200",
            "--block_size",
            "32",
            "--max_eval_samples",
            "20",
            "--learning_rate",
            "5e-2",
            "--multimax_init",
            "paper",
            "--eval_strategy",
            "end",
        ]
    )
    adapter = load_file(out / "adapter_model.safetensors")
    saved = {
        key: value
        for key, value in adapter.items()
        if (parsed := registry.parameter_key(key)) and parsed[1] == spec.attribute
    }
    assert len(saved) == 2 * len(spec.module_types[0].PARAMETER_NAMES)  # two attention layers
    assert any("lora_A" in key for key in adapter)
    base = AutoModelForCausalLM.from_pretrained(out / "base_model", attn_implementation=implementation)
    initial = {name: p.detach().clone() for name, p in base.named_parameters() if f".{spec.attribute}." in name}
    model = PeftModel.from_pretrained(base, out)
    trained = {
        name: p for name, p in model.named_parameters() if f".{spec.attribute}." in name and "modules_to_save" in name
    }
    assert len(trained) == len(initial) == len(saved)
    original = {
        name.removeprefix("base_model.model.").replace(".modules_to_save.default", ""): p for name, p in trained.items()
    }
    assert all(not torch.equal(p, initial[name]) for name, p in original.items()), "trained, saved and reloaded"


@pytest.mark.parametrize(
    "implementation,flags,expected",
    [
        ("multimax", {}, ["multimax"]),
        ("entmax_alpha", {}, ["entmax_alpha"]),
        ("entmax_alpha", {"multimax_output": True}, ["entmax_alpha", "multimax"]),
        ("sdpa", {"multimax_output": True}, ["multimax"]),
        ("sparsemax", {}, []),
    ],
)
def test_modules_to_save_follow_the_model(implementation, flags, expected):
    model = BY_NAME["llama"].build(implementation, **flags)
    assert hf_multimax.lora_modules_to_save(model) == expected
    count = len(registry.parameter_modules(model))
    config = hf_multimax.multimax_lora_config(model, target_modules=["q_proj", "v_proj"], r=2)
    peft_model = get_peft_model(model, config)
    copies = [found for found in registry.parameter_modules(peft_model) if ".modules_to_save." in found.name]
    assert len(copies) == count  # every parameter module has a trained copy ...
    assert all(p.requires_grad for found in copies for p in found.module.parameters())  # ... that trains
