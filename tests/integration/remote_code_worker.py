"""Loads pushed folders as someone without hf-multimax would: ``trust_remote_code=True`` through every Auto class of
their ``auto_map``, one pipeline per task, a ``save_pretrained`` round trip, a PEFT adapter, and the loads that must
fail. Started by ``test_hub_remote_code.py`` in a Python whose ``import hf_multimax`` fails (an import blocker on
``PYTHONPATH``); ``python remote_code_worker.py PLAN.json RESULTS.pt``.

The plan (JSON) names the folders and what to do with each; the results (``torch.save``) hold every output tensor and
every error message, for the test to compare with hf-multimax's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from hub_helpers import call, main_module_importable, output_tensors
from hub_helpers import load as load_fixed


def error_text(action) -> str | None:
    """The error ``action()`` raises, as ``"Type: message"`` (``None`` when it does not raise)."""
    try:
        action()
    except Exception as error:  # the test reads the message
        return f"{type(error).__name__}: {error}"
    return None


def load(auto_class: str, folder: str, **kwargs):
    return load_fixed(auto_class, folder, trust_remote_code=True, **kwargs)


def main(plan_path: str, results_path: str) -> None:
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

    plan = json.loads(Path(plan_path).read_text())
    inputs = torch.load(plan["inputs"])
    results: dict = {"hf_multimax_importable": main_module_importable("hf_multimax"), "outputs": {}, "classes": {}}
    refused = plan["refused"]
    # First, before any remote code has registered "multimax" in this process:
    results["errors"] = {
        "no trust_remote_code": error_text(lambda: AutoModelForCausalLM.from_pretrained(refused["plain"])),
        "pipeline without trust_remote_code": error_text(lambda: pipeline("text-generation", model=refused["plain"])),
    }

    for name, entry in plan["folders"].items():
        for auto_class in entry["auto_classes"]:
            model = load(auto_class, entry["path"])
            results["classes"][name, auto_class] = f"{type(model).__module__}.{type(model).__name__}"
            results["outputs"][name, auto_class] = output_tensors(call(model, inputs[name]))

    tasks = plan["pipelines"]
    generator = pipeline("text-generation", model=tasks["text-generation"], trust_remote_code=True)
    classifier = pipeline("text-classification", model=tasks["text-classification"], trust_remote_code=True)
    images = pipeline("image-classification", model=tasks["image-classification"], trust_remote_code=True)
    pixels = (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    results["pipelines"] = {
        "text-generation": generator(plan["text"], max_new_tokens=6, do_sample=False),
        "text-classification": classifier(plan["text"], top_k=None),
        "image-classification": images(Image.fromarray(pixels), top_k=None),
        "module": type(generator.model).__module__,
    }
    translation = plan["translation"]
    tokenizer = AutoTokenizer.from_pretrained(translation)
    encoded = tokenizer([plan["text"]], return_tensors="pt")
    seq2seq = load("AutoModelForSeq2SeqLM", translation)
    results["translation"] = seq2seq.generate(**encoded, max_new_tokens=6, do_sample=False).tolist()

    results["round_trip"] = {}
    for name, auto_class in plan["round_trip"]:
        saved = Path(plan["scratch"]) / f"round-trip-{name}"
        load(auto_class, plan["folders"][name]["path"]).save_pretrained(saved)
        reloaded = load(auto_class, str(saved))
        results["round_trip"][name] = {
            "path": str(saved),
            "files": sorted(p.name for p in saved.iterdir()),
            "config": json.loads((saved / "config.json").read_text()),
            "outputs": output_tensors(call(reloaded, inputs[name])),
            "class": f"{type(reloaded).__module__}.{type(reloaded).__name__}",
        }

    adapter = plan["adapter"]
    base = load("AutoModelForCausalLM", adapter["base"])
    with_adapter = PeftModel.from_pretrained(base, adapter["path"]).eval()
    results["adapter"] = output_tensors(call(with_adapter, inputs[adapter["inputs"]]))

    results["errors"] |= {
        "missing file": error_text(lambda: load("AutoModelForCausalLM", refused["missing"])),
        "incompatible file": error_text(lambda: load("AutoModelForCausalLM", refused["incompatible"])),
        "translation pipeline": error_text(lambda: pipeline("translation", model=translation, trust_remote_code=True)),
        "seq2seq ok": error_text(lambda: AutoModelForSeq2SeqLM.from_pretrained(translation, trust_remote_code=True)),
    }
    torch.save(results, results_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
