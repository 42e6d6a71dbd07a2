"""What ``import hf_multimax`` does to Transformers, and what it does not: one module of hooks, undoable, checked
against the installed Transformers; no effect on stock SoftMax models; nothing heavy imported."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from scripts import ROOT

import hf_multimax
from hf_multimax.integrations import trainer as trainer_hooks
from hf_multimax.integrations import transformers as hooks


def python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (nothing imported yet); return its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


HEAVY = ("transformers.trainer", "datasets", "peft", "evaluate", "entmax", "matplotlib", "sklearn")


def test_import_loads_nothing_and_a_multimax_model_needs_nothing_heavy():
    out = json.loads(
        python(f"""
        import json, sys
        import hf_multimax
        after_import = sorted(m for m in ("torch", "transformers", *{HEAVY!r}) if m in sys.modules)
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=64)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="multimax")
        model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
        print(json.dumps({{"after_import": after_import, "seglus": len(hf_multimax.multimax_modules(model)),
                          "loaded": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
    """)
    )
    assert out == {"after_import": [], "seglus": 2, "loaded": []}


def test_help_imports_neither_torch_nor_transformers():
    out = json.loads(
        python("""
        import contextlib, io, json, sys
        from hf_multimax.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as text:
            try:
                main(["--help"])
            except SystemExit as exit:
                code = exit.code
        print(json.dumps({"code": code, "usage": "usage: hf-multimax" in text.getvalue(),
                          "loaded": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
    """)
    )
    assert out == {"code": 0, "usage": True, "loaded": []}


def test_hooks_install_when_transformers_was_imported_first():
    out = python("""
        from transformers import AttentionInterface, PreTrainedModel
        assert "multimax" not in AttentionInterface().valid_keys()
        import hf_multimax
        print("multimax" in AttentionInterface().valid_keys(), PreTrainedModel.post_init.__module__)
    """)
    assert out.split() == ["True", "hf_multimax.integrations.transformers"]


def test_unregister_restores_every_patched_attribute_and_registration():
    out = json.loads(
        python("""
        import json
        from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel
        from transformers.masking_utils import AttentionMaskInterface

        def state():
            return {"model": {k: id(v) for k, v in vars(PreTrainedModel).items()},
                    "config": sorted(vars(PreTrainedConfig)),
                    "attention": sorted(AttentionInterface._global_mapping),
                    "masks": sorted(AttentionMaskInterface._global_mapping)}

        before = state()
        import hf_multimax
        during = state()
        hf_multimax.unregister()
        after = state()
        hf_multimax.register()
        again = "multimax" in AttentionInterface().valid_keys()
        print(json.dumps({"changed": before != during, "restored": before == after, "again": again,
                          "patched": sorted(k for k in before["model"] if before["model"][k] != during["model"][k])}))
    """)
    )
    assert out == {
        "changed": True,
        "restored": True,
        "again": True,
        "patched": sorted(hook.name for hook in hooks.HOOKS),
    }


STOCK_MODELS = """
    import json, sys, tempfile
    import torch
    if sys.argv[1] == "with":
        import hf_multimax
    from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                              BertConfig, LlamaConfig, T5Config)
    configs = {
        "llama": (AutoModelForCausalLM, LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=64)),
        "bert": (AutoModelForSequenceClassification,
                 BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=64, num_labels=3)),
        "t5": (AutoModelForSeq2SeqLM, T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=64,
                                               decoder_start_token_id=0)),
    }
    result = {}
    for name, (auto, config) in configs.items():
        torch.manual_seed(0)
        model = auto.from_config(config).eval()
        ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
        mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
        extra = {"decoder_input_ids": ids[:, :2]} if name == "t5" else {}
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, **extra).logits
        folder = tempfile.mkdtemp()
        model.save_pretrained(folder)
        result[name] = {"logits": logits.flatten().tolist(), "keys": sorted(model.state_dict()),
                        "config": json.load(open(folder + "/config.json"))}
    print(json.dumps(result))
"""


def test_comparators_are_registered_on_request_and_never_replace_another_packages():
    out = json.loads(
        python("""
        import json
        from transformers import AttentionInterface
        import hf_multimax
        from hf_multimax.compare.runner import check_implementations

        NAMES = ["sparsemax", "entmax15", "entmax_alpha", "evsoftmax"]
        def registered():
            return [name for name in NAMES if name in AttentionInterface().valid_keys()]

        result = {"after_import": registered()}
        def theirs(module, query, key, value, attention_mask, **kwargs):
            raise AssertionError("not called")
        AttentionInterface.register("evsoftmax", theirs)
        try:
            hf_multimax.register_comparators()
        except ValueError as error:
            result["refused"] = str(error)
        result["kept_theirs"] = AttentionInterface._global_mapping["evsoftmax"] is theirs
        result["after_refusal"] = registered()
        result["named"] = hf_multimax.register_comparators(["sparsemax"])
        check_implementations(["sdpa", "entmax15"])  # what `hf-multimax compare --implementations` does
        result["after_compare"] = registered()
        try:
            hf_multimax.register_comparators(["softmax2"])
        except ValueError as error:
            result["unknown"] = str(error)
        hf_multimax.unregister()
        result["after_unregister"] = [n for n in registered() if n != "evsoftmax"]
        print(json.dumps(result))
    """)
    )
    assert out["after_import"] == []
    assert "'evsoftmax' is already registered with Transformers by __main__.theirs" in out["refused"]
    assert out["kept_theirs"] is True
    assert out["after_refusal"] == ["evsoftmax"]  # a refusal registers none of the others either
    assert out["named"] == ["sparsemax"]
    assert out["after_compare"] == ["sparsemax", "entmax15", "evsoftmax"]
    assert "unknown comparator 'softmax2'" in out["unknown"]
    assert out["after_unregister"] == []


def test_stock_softmax_models_are_bit_identical_with_and_without_hf_multimax(tmp_path):
    script = tmp_path / "stock.py"
    script.write_text(textwrap.dedent(STOCK_MODELS))
    runs = []
    for mode in ("without", "with"):
        done = subprocess.run(
            [sys.executable, str(script), mode], capture_output=True, text=True, cwd=ROOT, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout))
    without, with_ = runs
    for name in without:
        assert with_[name]["logits"] == without[name]["logits"], name  # bit-identical floats
        assert with_[name]["keys"] == without[name]["keys"], name
        assert with_[name]["config"] == without[name]["config"], name
        assert not any(key.startswith("multimax") for key in with_[name]["config"])


def test_the_hooks_fit_the_installed_transformers():
    assert hooks.check_compatibility() == []
    assert trainer_hooks.check_trainer_compatibility() == []


def test_a_changed_signature_is_named_and_left_unpatched():
    class Changed:  # what a future Transformers might look like
        def post_init(self):
            pass

        def set_attn_implementation(self, attn_implementation):
            pass

        def _initialize_weights(self, submodule, is_custom_code=False):  # renamed parameter
            pass

        def save_pretrained(self, save_directory):
            pass

    problems = hooks.check_compatibility({"PreTrainedModel": Changed})
    assert len(problems) == 2
    assert any(
        p.startswith(
            "transformers.PreTrainedModel._initialize_weights now takes (self, submodule, "
            "is_custom_code); hf-multimax expects it to start with (self, module)"
        )
        for p in problems
    )
    assert any(
        p == "transformers.PreTrainedModel._adjust_missing_and_unexpected_keys does not exist in this "
        "Transformers version"
        for p in problems
    )

    class ChangedTrainer:
        def get_decay_parameter_names(self, model):
            pass

        def _clip_grad_norm(self, model, max_norm):
            pass

    # the subclass calls super()._clip_grad_norm(model): a new required parameter would break it
    assert trainer_hooks.check_trainer_compatibility(ChangedTrainer) == [
        "transformers.Trainer._clip_grad_norm now takes (self, model, max_norm); hf-multimax expects (self, model)"
    ]
    del ChangedTrainer.get_decay_parameter_names
    with pytest.raises(RuntimeError, match="transformers.Trainer.get_decay_parameter_names does not exist"):
        hf_multimax.patch_trainer(ChangedTrainer)
