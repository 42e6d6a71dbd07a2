"""The paper-scale recipes (examples/recipes/): each one trains for two steps on small local data, in-process, with its
schedule, MultiMax flags and architecture (layers, heads, patches, activations, dropout; only the width is cut, to keep
CI fast), so the flags cannot rot; the README shows the commands the recipes print."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from scripts import EXAMPLES, load_example

import hf_multimax
from hf_multimax import data

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def load_recipes():
    """examples/recipes/recipes.py as a module (registered in sys.modules, which its dataclasses need)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("hf_multimax_recipes", EXAMPLES / "recipes" / "recipes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


recipes = load_recipes()
#: What CI changes: two steps, tiny batches and sequences, a few examples, narrower layers; the rest stays.
FAST = [
    "--max_train_steps",
    "2",
    "--per_device_train_batch_size",
    "2",
    "--per_device_eval_batch_size",
    "2",
    "--gradient_accumulation_steps",
    "1",
    "--checkpointing_steps",
    "1000",
    "--eval_strategy",
    "end",
]


#: The recipes' widths, narrowed in CI (divisible by each recipe's head count).
NARROW = {
    "n_embd": "64",
    "n_inner": "256",
    "d_model": "64",
    "encoder_ffn_dim": "128",
    "decoder_ffn_dim": "128",
    "hidden_size": "96",
    "intermediate_size": "384",
}


def architecture(recipe) -> dict[str, str]:
    """The recipe's ``--config_overrides`` as a dict, with the widths of :data:`NARROW`."""
    overrides = dict(item.split("=") for item in recipe.args[recipe.args.index("--config_overrides") + 1].split(","))
    assert set(NARROW) & set(overrides), recipe.name
    return {key: NARROW.get(key, value) for key, value in overrides.items()}


def local_data(name: str, folder):
    """Small local data in the format each recipe's real data comes in, and the flags that point at it."""
    if name == "wikitext103-lm":
        path = folder / "wiki.txt"
        path.write_text("\n".join(data.lm_texts()[:400]))
        return ["--train_file", str(path), "--block_size", "32", "--max_train_samples", "60", "--max_eval_samples", "4"]
    if name == "iwslt14-de-en":
        pairs = data.translation_pairs()[:80]
        for split, rows in (("train", pairs[:72]), ("valid", pairs[72:])):
            (folder / f"{split}.de").write_text("\n".join(de for _, de in rows) + "\n")
            (folder / f"{split}.en").write_text("\n".join(en for en, _ in rows) + "\n")
            with open(folder / f"{split}.jsonl", "w") as out:
                assert recipes.write_jsonl(folder / f"{split}.de", folder / f"{split}.en", "de", "en", out) == len(rows)
        return [
            "--train_file",
            str(folder / "train.jsonl"),
            "--validation_file",
            str(folder / "valid.jsonl"),
            "--max_source_length",
            "24",
            "--max_target_length",
            "24",
            "--max_eval_samples",
            "4",
        ]
    images, labels = data.digit_images()
    for split, indices in (("train", range(0, 12)), ("val", range(12, 16))):
        for i in indices:
            folder_class = folder / split / str(labels[i] % 2)
            folder_class.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(images[i] * 255).astype(np.uint8), mode="L").save(folder_class / f"{i}.png")
    # 32x32 images: DeiT-S's 12 layers, width, heads and 16x16 patches, on 4 patches instead of 196.
    return ["--train_file", str(folder / "train"), "--validation_file", str(folder / "val"), "--image_size", "32"]


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_recipe_trains_two_steps_with_its_architecture(name, tmp_path):
    recipe = recipes.RECIPES[name]
    out = tmp_path / "out"
    expected = architecture(recipe)
    narrow = ["--config_overrides", ",".join(f"{k}={v}" for k, v in expected.items())]
    argv = [*recipe.args, *local_data(name, tmp_path), *FAST, *narrow, "--output_dir", str(out)]  # local recipe.data
    results = load_example(recipe.script.removesuffix(".py")).main(argv)
    assert results["steps"] == 2 and all(math.isfinite(loss) for _, loss in results["losses"])
    config = json.loads((out / "config.json").read_text())
    for key, value in expected.items():  # the recipe's architecture (narrowed) is what was trained
        assert str(config[key]).lower() == value.lower(), key
    assert config["multimax_init"] == "paper" and config["multimax_output"] is True
    assert results["attn_implementation"] == "multimax"
    import transformers

    model = getattr(transformers, config["architectures"][0]).from_pretrained(out, attn_implementation="multimax")
    layers = {"wikitext103-lm": 6, "iwslt14-de-en": 6 + 6 + 6, "deit-small-imagenet": 12}[name]  # marian: cross too
    assert len([n for n in hf_multimax.multimax_modules(model) if "attn" in n or "attention" in n]) == layers


def test_recipe_commands_launch_the_scripts_and_are_in_the_readme():
    readme = (EXAMPLES / "recipes" / "README.md").read_text()
    for name, recipe in recipes.RECIPES.items():
        cmd = recipes.command(name, ["--output_dir", "out"])
        assert cmd[:2] == ["accelerate", "launch"] and cmd[cmd.index("--num_processes") + 1] == str(
            recipe.num_processes
        )
        assert cmd[-2:] == ["--output_dir", "out"]  # appended flags come last, so they win
        assert recipe.data[0] in cmd and recipe.data[0] not in recipes.command(name, own_data=True)
        assert recipes.markdown(name) in readme, f"examples/recipes/README.md does not show the {name} command"
    assert recipes.main(["print", "iwslt14-de-en", "--seed", "3"]) == 0
