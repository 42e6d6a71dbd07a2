"""Remote code: a MultiMax model pushed with ``remote_code=True`` loads where hf-multimax cannot be imported
(``trust_remote_code=True``, every Auto class of its ``auto_map``, pipelines, PEFT, a save round trip) with the outputs
hf-multimax gives; the loading decision of ``import hf_multimax`` (``config.json`` records MultiMax); and the folders,
models and flags that are refused.

The loads without hf-multimax run in one subprocess (``remote_code_worker.py``) whose ``import hf_multimax`` fails; the
folders are local (the Hub cannot be reached here).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from families import FAMILIES, randomize_multimax
from hub_helpers import call, load, output_tensors, tiny_tokenizer, write_import_blocker
from huggingface_hub import ModelCard
from scripts import ROOT
from transformers import AutoModelForCausalLM, LlamaForCausalLM, ViTImageProcessor, dynamic_module_utils, pipeline

import hf_multimax
from hf_multimax.attention import multimax_attention_forward
from hf_multimax.cli import main
from hf_multimax.hub import push_to_hub
from hf_multimax.hub.remote_code import REMOTE_FILE, plan_remote_code, remote_code_format, render_remote_code

REPO = "someone/tiny-multimax"
TEXT = "the cat sat on a mat"
#: Flags per family besides multimax_output=True (every family has output-layer MultiMax): per-head parameters and
#: another order somewhere.
FLAGS = {"gpt2": {"multimax_per_head": True}, "bart": {"multimax_per_head": True}, "qwen2": {"multimax_order": 3}}
#: The folder each pipeline runs on.
PIPELINES = {"text-generation": "llama", "text-classification": "bert", "image-classification": "vit"}
#: save_pretrained through the remote-code model: a decoder, an encoder-decoder (configs copied into its stacks) and ViT
#: (whose weights Transformers renames on load and back on save).
ROUND_TRIPS = [
    ("llama", "AutoModelForCausalLM"),
    ("t5", "AutoModelForSeq2SeqLM"),
    ("vit", "AutoModelForImageClassification"),
]
#: float32 rounding: the plain PyTorch reference of the remote file against hf-multimax's fused kernels.
TOLERANCE = {"rtol": 1e-4, "atol": 2e-5}


def family_inputs(family) -> dict:
    """The family's test batch; seq2seq inputs end in EOS, which BART's and T5's classification heads pool."""
    inputs = family.inputs()
    if family.kind == "seq2seq":
        inputs["input_ids"][:, -1] = family.make_config().eos_token_id
    return inputs


@pytest.fixture(scope="module")
def pushed(tmp_path_factory) -> dict[str, Path]:
    """One dry-run push with remote code per family (tiny models with learned-looking σ, output head included)."""
    root = tmp_path_factory.mktemp("remote")
    folders = {}
    for family in FAMILIES:
        model = family.build("multimax", multimax_output=True, **FLAGS.get(family.name, {}))
        randomize_multimax(model)
        extras = {"processor": ViTImageProcessor(size={"height": 16, "width": 16})} if family.kind == "vision" else {}
        if family.kind != "vision":
            extras["tokenizer"] = tiny_tokenizer()
        folders[family.name] = push_to_hub(
            model, REPO, local_dir=root / family.name, dry_run=True, remote_code=True, **extras
        ).local_dir
    return folders


@pytest.fixture(scope="module")
def adapter(pushed, tmp_path_factory):
    """A LoRA adapter (MultiMax trained through ``modules_to_save``) on the remote-code Llama, and its logits."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["multimax"], init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(pushed["llama"]), config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param))
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    push_to_hub(model, REPO, local_dir=folder, dry_run=True, base_model=str(pushed["llama"]))
    return folder, output_tensors(call(model, family_inputs(FAMILIES[0])))


@pytest.fixture(scope="module")
def refused(pushed, tmp_path_factory) -> dict[str, Path]:
    """Folders that must not load: remote code missing, and remote code of another format than config.json's."""
    root = tmp_path_factory.mktemp("refused")
    missing = shutil.copytree(pushed["llama"], root / "missing")
    (missing / REMOTE_FILE).unlink()
    incompatible = shutil.copytree(pushed["llama"], root / "incompatible")
    config = json.loads((incompatible / "config.json").read_text())
    config["multimax_remote_code"].update(format=99, hf_multimax_version="9.9.9")
    (incompatible / "config.json").write_text(json.dumps(config))
    return {"plain": pushed["llama"], "missing": missing, "incompatible": incompatible}


@pytest.fixture(scope="module")
def worker(pushed, adapter, refused, tmp_path_factory) -> dict:
    """Everything loaded without hf-multimax, in one subprocess."""
    root = tmp_path_factory.mktemp("worker")
    torch.save({family.name: family_inputs(family) for family in FAMILIES}, root / "inputs.pt")
    plan = {
        "inputs": str(root / "inputs.pt"),
        "scratch": str(root),
        "text": TEXT,
        "folders": {
            name: {"path": str(folder), "auto_classes": sorted(auto_map(folder))} for name, folder in pushed.items()
        },
        "pipelines": {task: str(pushed[name]) for task, name in PIPELINES.items()},
        "translation": str(pushed["t5"]),
        "round_trip": [[name, auto_class] for name, auto_class in ROUND_TRIPS],
        "adapter": {"base": str(pushed["llama"]), "path": str(adapter[0]), "inputs": "llama"},
        "refused": {name: str(path) for name, path in refused.items()},
    }
    (root / "plan.json").write_text(json.dumps(plan))
    blocker = write_import_blocker(root / "blocker")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT / "tests")]),
        "HF_MODULES_CACHE": str(root / "modules"),
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("remote_code_worker.py")), "plan.json", "results.pt"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(root / "results.pt", weights_only=False)


def auto_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / "config.json").read_text())["auto_map"]


# ----------------------------------------------------------------------------------------------------------------------
# Without hf-multimax: the same outputs as with it


def test_the_worker_really_ran_without_hf_multimax(worker):
    assert worker["hf_multimax_importable"] is False
    assert all(".modeling_multimax." in name for name in worker["classes"].values())


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_every_auto_class_matches_hf_multimax(family, pushed, worker):
    folder = pushed[family.name]
    architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
    classes = auto_map(folder)
    assert f"modeling_multimax.{architecture}" in classes.values()
    for auto_class, target in sorted(classes.items()):
        # hf-multimax's side: no attn_implementation passed, config.json's record selects MultiMax
        expected = output_tensors(call(load(auto_class, folder), family_inputs(family)))
        actual = worker["outputs"][family.name, auto_class]
        assert worker["classes"][family.name, auto_class].endswith(target), auto_class
        assert actual.keys() == expected.keys(), auto_class
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], **TOLERANCE, msg=f"{auto_class}.{key}")


def test_pipelines_and_translation_match_hf_multimax(pushed, worker):
    generated = pipeline("text-generation", model=pushed["llama"])(TEXT, max_new_tokens=6, do_sample=False)
    assert worker["pipelines"]["text-generation"] == generated
    assert worker["pipelines"]["module"].endswith(".modeling_multimax")
    for task, name in (("text-classification", TEXT), ("image-classification", None)):
        runner = pipeline(task, model=pushed[PIPELINES[task]])
        if name is None:
            from PIL import Image

            pixels = (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
            name = Image.fromarray(pixels.numpy())
        expected = runner(name, top_k=None)
        actual = worker["pipelines"][task]
        assert [r["label"] for r in actual] == [r["label"] for r in expected], task
        assert [r["score"] for r in actual] == pytest.approx([r["score"] for r in expected], abs=1e-5), task
    # Transformers 5 removed the translation pipeline; a seq2seq model translates with generate.
    assert "has been removed from transformers" in worker["errors"]["translation pipeline"]
    assert worker["errors"]["seq2seq ok"] is None
    tokenizer = transformers.AutoTokenizer.from_pretrained(pushed["t5"])
    model = load("AutoModelForSeq2SeqLM", pushed["t5"])
    expected = model.generate(**tokenizer([TEXT], return_tensors="pt"), max_new_tokens=6, do_sample=False)
    assert worker["translation"] == expected.tolist()


@pytest.mark.parametrize("name,auto_class", ROUND_TRIPS)
def test_save_pretrained_round_trip_loads_again_both_ways(name, auto_class, pushed, worker):
    trip = worker["round_trip"][name]
    original = json.loads((pushed[name] / "config.json").read_text())
    assert REMOTE_FILE in trip["files"]
    assert (Path(trip["path"]) / REMOTE_FILE).read_text() == (pushed[name] / REMOTE_FILE).read_text()
    for key in ("auto_map", "architectures", "attn_implementation", "multimax_remote_code", "multimax_order"):
        assert trip["config"][key] == original[key], key
    family = next(f for f in FAMILIES if f.name == name)
    expected = output_tensors(call(load(auto_class, pushed[name]), family_inputs(family)))
    for key in expected:
        torch.testing.assert_close(trip["outputs"][key], expected[key], **TOLERANCE)
    # ... and with hf-multimax, from the folder the remote-code model wrote
    again = output_tensors(call(load(auto_class, Path(trip["path"])), family_inputs(family)))
    assert all(torch.equal(again[key], expected[key]) for key in expected)


def test_a_peft_adapter_loads_with_peft_on_the_remote_code_base(adapter, worker):
    _, expected = adapter
    for key in expected:
        torch.testing.assert_close(worker["adapter"][key], expected[key], **TOLERANCE)


# ----------------------------------------------------------------------------------------------------------------------
# Loads that must fail, each with one clear error


def test_without_trust_remote_code_plain_transformers_refuses(worker):
    for case in ("no trust_remote_code", "pipeline without trust_remote_code"):
        message = worker["errors"][case]
        assert message.startswith("ValueError: ") and 'attn_implementation="multimax"` is not supported' in message


def test_missing_or_incompatible_remote_file_is_one_error_naming_file_and_version(worker, refused, tmp_path):
    missing = worker["errors"]["missing file"]
    assert missing.startswith("OSError: ") and REMOTE_FILE in missing
    incompatible = worker["errors"]["incompatible file"]
    assert incompatible.startswith("ValueError: ") and REMOTE_FILE in incompatible
    assert f"hf-multimax {hf_multimax.__version__} (remote-code format {remote_code_format()})" in incompatible
    assert "format 99 by hf-multimax 9.9.9" in incompatible
    # hf-multimax refuses to push either folder as it is, naming the file and the versions
    with pytest.raises(
        ValueError, match=rf"names {REMOTE_FILE} \(remote-code format 1, hf-multimax .*\), which is not"
    ):
        push_to_hub(refused["missing"], REPO, local_dir=tmp_path / "a", dry_run=True)
    with pytest.raises(
        ValueError, match=rf"{REMOTE_FILE} is from hf-multimax .* but config.json was written for format 99"
    ):
        push_to_hub(refused["incompatible"], REPO, local_dir=tmp_path / "b", dry_run=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # pushing with remote code writes both again, and the folder loads
    repaired = push_to_hub(refused["incompatible"], REPO, local_dir=tmp_path / "c", dry_run=True, remote_code=True)
    assert json.loads((repaired.local_dir / "config.json").read_text())["multimax_remote_code"]["format"] == 1
    assert (refused["incompatible"] / REMOTE_FILE).is_file()  # the pushed folder itself is left as it was
    # a sound remote-code folder pushed again without the flag keeps its code, and its card says so
    again = push_to_hub(repaired.local_dir, REPO, local_dir=tmp_path / "d", dry_run=True)
    assert REMOTE_FILE in again.files and "trust_remote_code=True" in ModelCard.load(again.local_dir / "README.md").text


# ----------------------------------------------------------------------------------------------------------------------
# With hf-multimax installed


def test_remote_code_with_hf_multimax_runs_its_kernels_bit_identically(pushed, monkeypatch, tmp_path):
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    family = FAMILIES[0]
    expected = call(load("AutoModelForCausalLM", pushed["llama"]), family_inputs(family)).logits
    model = load("AutoModelForCausalLM", pushed["llama"], trust_remote_code=True)
    module = sys.modules[type(model).__module__]
    assert module.fused_attention_forward is multimax_attention_forward
    assert torch.equal(call(model, family_inputs(family)).logits, expected)


def test_loading_honours_the_recorded_implementation_unless_another_is_asked(tmp_path):
    family = FAMILIES[0]
    model = family.build("multimax", multimax_output=True)
    randomize_multimax(model)
    model.save_pretrained(tmp_path / "mm")
    assert json.loads((tmp_path / "mm" / "config.json").read_text())["attn_implementation"] == "multimax"
    assert "attn_implementation" not in model.config.__dict__  # recorded while saving only
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "mm").eval()
    assert reloaded.config._attn_implementation == "multimax"
    inputs = family_inputs(family)
    assert torch.equal(call(reloaded, inputs).logits, call(model, inputs).logits)
    with pytest.warns(hf_multimax.MultiMaxWarning, match="dropped"):
        softmax = LlamaForCausalLM.from_pretrained(tmp_path / "mm", attn_implementation="sdpa")
    assert softmax.config._attn_implementation == "sdpa"
    # the reference implementation records the fast one; SoftMax models record nothing
    model.set_attn_implementation("multimax_eager")
    model.save_pretrained(tmp_path / "eager")
    assert json.loads((tmp_path / "eager" / "config.json").read_text())["attn_implementation"] == "multimax"
    family.build("sdpa").save_pretrained(tmp_path / "sdpa")
    assert "attn_implementation" not in json.loads((tmp_path / "sdpa" / "config.json").read_text())


# ----------------------------------------------------------------------------------------------------------------------
# The folder, the file and the card


def test_the_pushed_folder_and_its_card_show_both_ways_to_load(pushed):
    folder = pushed["llama"]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_multimax.LlamaForCausalLM"
    assert config["architectures"] == ["LlamaForCausalLM"] and config["attn_implementation"] == "multimax"
    assert config["multimax_remote_code"] == {
        "file": REMOTE_FILE,
        "format": remote_code_format(),
        "hf_multimax_version": hf_multimax.__version__,
        "attn_implementation": "multimax",
    }
    card = ModelCard.load(folder / "README.md")
    assert "custom_code" in card.data.tags
    text = card.text
    assert "### With hf-multimax" in text and "### With remote code (no hf-multimax)" in text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}", attn_implementation="multimax")' in text
    assert f'from_pretrained("{REPO}", trust_remote_code=True, revision="COMMIT_SHA")' in text
    assert f'pipeline("text-generation", model="{REPO}", trust_remote_code=True' not in text  # no pipeline_tag given
    assert "runs `modeling_multimax.py` from this repository on your machine" in text and "pin `revision`" in text
    assert 'Plain Transformers refuses this checkpoint (`Specified attn_implementation="multimax"' in text


def test_the_file_is_the_template_with_its_version_and_needs_only_torch_and_transformers(pushed, tmp_path):
    source = (pushed["bert"] / REMOTE_FILE).read_text()
    assert source == render_remote_code()  # one template for every family
    assert source.startswith(f"# {REMOTE_FILE}: generated by hf-multimax {hf_multimax.__version__} (remote-code")
    assert f'HF_MULTIMAX_VERSION = "{hf_multimax.__version__}"' in source
    ast.parse(source)
    (tmp_path / REMOTE_FILE).write_text(source)
    # Transformers' own check of what a remote file needs (imports inside `try` do not count)
    needed = set(dynamic_module_utils.get_imports(tmp_path / REMOTE_FILE)) - set(sys.stdlib_module_names)
    assert needed == {"torch", "transformers"}
    template = (ROOT / "hf_multimax" / "hub" / "remote_modeling.py").read_text()
    assert source.split("\n", 2)[2] == template.split("\n", 1)[1].replace(
        'HF_MULTIMAX_VERSION = "0+template"', f'HF_MULTIMAX_VERSION = "{hf_multimax.__version__}"'
    )


class MyLlama(LlamaForCausalLM):
    """A model class of the user's own: the remote file cannot make it."""


def test_push_refuses_what_the_template_cannot_serve(tmp_path):
    family = FAMILIES[0]
    mine = MyLlama(family.config())
    with pytest.raises(ValueError, match=r"cannot serve MyLlama: .* no model class 'MyLlama'"):
        push_to_hub(mine, REPO, local_dir=tmp_path / "a", dry_run=True, remote_code=True)
    with pytest.raises(ValueError, match="cannot serve LlamaForCausalLM: it holds no MultiMax parameters"):
        push_to_hub(family.build("sdpa"), REPO, local_dir=tmp_path / "b", dry_run=True, remote_code=True)
    gpt2 = next(f for f in FAMILIES if f.name == "gpt2")
    config = gpt2.config()
    config._attn_implementation = "multimax"
    double_heads = transformers.GPT2DoubleHeadsModel(config)
    with pytest.raises(ValueError, match="cannot serve GPT2DoubleHeadsModel: no Auto class of Transformers loads it"):
        push_to_hub(double_heads, REPO, local_dir=tmp_path / "c", dry_run=True, remote_code=True)
    with pytest.raises(TypeError, match="remote_code must be True or False, got 'yes'"):
        push_to_hub(family.build("multimax"), REPO, local_dir=tmp_path / "d", dry_run=True, remote_code="yes")
    assert not any((tmp_path / name).exists() for name in "abcd")  # refused before anything was written
    # a comparator's parameters (registering one here would outlive this test): what push checks for such a model
    with pytest.raises(
        ValueError, match="cannot serve LlamaForCausalLM: its attention was trained with 'entmax_alpha'"
    ):
        plan_remote_code("LlamaForCausalLM", family.config(), "entmax_alpha", has_output=False)


def test_adapters_take_no_remote_code_but_merged_models_do(adapter, tmp_path):
    from peft import PeftModel

    folder, _ = adapter
    with pytest.raises(ValueError, match="remote_code=True needs a full model.*merge_adapter=True"):
        push_to_hub(folder, REPO, local_dir=tmp_path / "a", dry_run=True, remote_code=True)
    base = AutoModelForCausalLM.from_pretrained(
        json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    model = PeftModel.from_pretrained(base, folder)
    with pytest.raises(ValueError, match="remote_code=True needs a full model"):
        push_to_hub(model, REPO, local_dir=tmp_path / "b", dry_run=True, remote_code=True)
    merged = push_to_hub(model, REPO, local_dir=tmp_path / "c", dry_run=True, remote_code=True, merge_adapter=True)
    assert REMOTE_FILE in merged.files and "adapter_config.json" not in merged.files


def test_cli_remote_code_flag_and_its_errors(pushed, adapter, tmp_path, capsys):
    code = main(["push", str(pushed["gpt2"]), REPO, "--dry-run", "--local-dir", str(tmp_path / "cli"), "--remote-code"])
    assert code == 0 and REMOTE_FILE in capsys.readouterr().out
    assert auto_map(tmp_path / "cli")["AutoModelForCausalLM"] == "modeling_multimax.GPT2LMHeadModel"
    code = main(["push", str(adapter[0]), REPO, "--dry-run", "--local-dir", str(tmp_path / "x"), "--remote_code"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("hf-multimax push: error: remote_code=True needs a full model")
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["push", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--remote-code" in help_text and "trust_remote_code=True" in help_text
