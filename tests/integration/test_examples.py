"""The example scripts, end to end, in-process: embedded default data, local files, checkpoints and resumption, LoRA,
the Hub step, and the embedded data itself."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scripts import load_example, load_module

import hf_multimax
from hf_multimax import data

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


#: script, flags that keep a run to a few seconds, auto class that reloads the result, metric reported.
SCRIPTS = {
    "run_clm": (
        ["--max_train_samples", "300", "--block_size", "32", "--max_eval_samples", "40"],
        "AutoModelForCausalLM",
        "perplexity",
    ),
    "run_translation": (
        ["--max_train_samples", "200", "--max_eval_samples", "8", "--num_beams", "2", "--max_target_length", "16"],
        "AutoModelForSeq2SeqLM",
        "bleu",
    ),
    "run_image_classification": (
        ["--max_train_samples", "256", "--max_eval_samples", "64"],
        "AutoModelForImageClassification",
        "accuracy",
    ),
}


def reload(auto_class: str, path: Path):
    import transformers

    return getattr(transformers, auto_class).from_pretrained(path, attn_implementation="multimax")


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_runs_on_embedded_default(script, tmp_path):
    fast, auto_class, metric = SCRIPTS[script]
    out = tmp_path / "out"
    results = load_example(script).main(["--output_dir", str(out), "--max_train_steps", "3", "--seed", "1", *fast])
    assert results["steps"] == 3 and len(results["losses"]) == 3
    assert all(np.isfinite(loss) for _, loss in results["losses"])
    assert np.isfinite(results["metrics"][metric]) and np.isfinite(results["metrics"]["eval_loss"])
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["metrics"] == pytest.approx(results["metrics"])
    # The saved folder reloads as a MultiMax model, with the trained MultiMax parameters.
    model = reload(auto_class, out)
    assert model.config._attn_implementation == "multimax"
    assert len(hf_multimax.multimax_modules(model)) > 0
    weights = load_file(out / "model.safetensors")
    assert any(key.endswith("multimax_ts") for key in weights)
    assert (out / "tokenizer.json").is_file() or (out / "preprocessor_config.json").is_file()


def test_training_reduces_the_loss(tmp_path):
    """Not just running: 60 steps of the tiny MultiMax ViT on the digits learn something (about 0.58 accuracy)."""
    results = load_example("run_image_classification").main(
        [
            "--max_train_steps",
            "60",
            "--eval_strategy",
            "end",
            "--max_eval_samples",
            "128",
            "--lr_scheduler_type",
            "constant",
        ]
    )
    losses = [loss for _, loss in results["losses"]]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert results["metrics"]["accuracy"] > 0.35  # chance is 0.1


def test_clm_local_text_file(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("\n".join(data.lm_texts()[:400]))
    validation = tmp_path / "validation.txt"
    validation.write_text("\n".join(data.lm_texts()[400:460]))
    out = tmp_path / "out"
    results = load_example("run_clm").main(
        [
            "--train_file",
            str(train),
            "--validation_file",
            str(validation),
            "--output_dir",
            str(out),
            "--max_train_steps",
            "2",
            "--block_size",
            "32",
            "--attn_implementation",
            "multimax_eager",
            "--multimax_order",
            "3",
            "--multimax_per_head",
            "true",
        ]
    )
    assert results["steps"] == 2 and np.isfinite(results["metrics"]["perplexity"])
    config = json.loads((out / "config.json").read_text())
    assert config["multimax_order"] == 3 and config["multimax_per_head"] is True
    model = reload("AutoModelForCausalLM", out)
    seglu = next(iter(hf_multimax.multimax_modules(model).values()))
    assert tuple(seglu.multimax_ts.shape) == (model.config.num_attention_heads, 6)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_translation_local_files(tmp_path, fmt):
    pairs = data.translation_pairs()
    train, validation = tmp_path / f"train.{fmt}", tmp_path / f"validation.{fmt}"
    for path, rows in ((train, pairs[:150]), (validation, pairs[150:158])):
        if fmt == "jsonl":
            path.write_text("".join(json.dumps({"translation": {"en": en, "de": de}}) + "\n" for en, de in rows))
        else:
            import csv

            with open(path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["en", "de"])
                writer.writerows(rows)
    results = load_example("run_translation").main(
        [
            "--train_file",
            str(train),
            "--validation_file",
            str(validation),
            "--max_train_steps",
            "2",
            "--num_beams",
            "2",
            "--max_target_length",
            "8",
            "--attn_implementation",
            "sdpa",
        ]
    )
    assert results["attn_implementation"] == "sdpa" and np.isfinite(results["metrics"]["bleu"])


def test_image_classification_image_folder(tmp_path):
    from PIL import Image

    images, labels = data.digit_images()
    for split, rows in (("train", range(0, 60)), ("validation", range(60, 80))):
        for i in rows:
            folder = tmp_path / split / f"digit{labels[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((images[i] * 255).astype(np.uint8), mode="L").save(folder / f"{i}.png")
    out = tmp_path / "out"
    results = load_example("run_image_classification").main(
        [
            "--train_file",
            str(tmp_path / "train"),
            "--validation_file",
            str(tmp_path / "validation"),
            "--output_dir",
            str(out),
            "--max_train_steps",
            "2",
            "--per_device_train_batch_size",
            "16",
        ]
    )
    assert 0.0 <= results["metrics"]["accuracy"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert set(config["id2label"].values()) == {f"digit{d}" for d in set(labels[:60].tolist())}


def test_checkpoint_resume_continues_exactly(tmp_path):
    """A run resumed from step_2 reproduces the losses and weights of an uninterrupted run."""
    script = load_example("run_clm")
    common = [
        "--max_train_samples",
        "300",
        "--block_size",
        "32",
        "--max_eval_samples",
        "20",
        "--max_train_steps",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--multimax_init",
        "paper",
        "--eval_strategy",
        "end",
    ]
    full = script.main([*common, "--output_dir", str(tmp_path / "full"), "--checkpointing_steps", "2"])
    assert (tmp_path / "full" / "step_2" / "training_state.json").is_file()
    # As if the run had died after step 3: only step_2 is on disk.
    first = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "full" / "step_2", first / "step_2")
    resumed = script.main([*common, "--output_dir", str(first), "--resume_from_checkpoint", "latest"])
    assert [step for step, _ in resumed["losses"]] == [1, 2, 3, 4]
    assert [loss for _, loss in resumed["losses"]] == pytest.approx([loss for _, loss in full["losses"]], rel=1e-5)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(first / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_example("run_clm").main(
            [
                "--output_dir",
                str(tmp_path),
                "--resume_from_checkpoint",
                "latest",
                "--max_train_samples",
                "100",
                "--block_size",
                "32",
                "--max_train_steps",
                "1",
            ]
        )


def test_lora_script_saves_multimax_with_the_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    out = tmp_path / "lora"
    load_example("run_image_classification").main(
        [
            "--lora",
            "--output_dir",
            str(out),
            "--max_train_steps",
            "5",
            "--multimax_init",
            "paper",
            "--max_train_samples",
            "256",
            "--max_eval_samples",
            "32",
            "--learning_rate",
            "1e-2",
        ]
    )
    adapter = load_file(out / "adapter_model.safetensors")
    multimax_keys = [k for k in adapter if "multimax_ts" in k]
    assert multimax_keys and any("lora_A" in k for k in adapter) and any("classifier" in k for k in adapter)
    # The from-scratch base was kept, and base + adapter reloads with the trained MultiMax parameters.
    base = AutoModelForImageClassification.from_pretrained(out / "base_model", attn_implementation="multimax")
    base_ts = {n: p.detach().clone() for n, p in base.named_parameters() if n.endswith("multimax_ts")}
    model = PeftModel.from_pretrained(base, out)
    loaded = {n: p for n, p in model.named_parameters() if n.endswith("multimax_ts") and "modules_to_save" in n}
    assert len(loaded) == len(base_ts) == len(multimax_keys)
    changed = [
        not torch.equal(p, base_ts[n.replace("base_model.model.", "").replace(".modules_to_save.default", "")])
        for n, p in loaded.items()
    ]
    assert any(changed)  # the MultiMax parameters were trained, saved and loaded


def test_push_to_hub_dry_run_writes_the_folder(tmp_path):
    out = tmp_path / "pushed"
    load_example("run_image_classification").main(
        [
            "--output_dir",
            str(out),
            "--max_train_steps",
            "1",
            "--max_train_samples",
            "64",
            "--max_eval_samples",
            "16",
            "--push_to_hub",
            "--hub_dry_run",
            "--hub_model_id",
            "someone/tiny-vit-multimax",
        ]
    )
    assert (out / "model.safetensors").is_file()
    if importlib.util.find_spec("hf_multimax.hub") is not None:
        assert (out / "hub" / "README.md").is_file() and (out / "hub" / "model.safetensors").is_file()


def test_every_flag_has_help():
    from hf_multimax import finetune
    from hf_multimax.finetune.tasks import TASKS

    for task in TASKS.values():
        parser = finetune.build_parser(task)
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{task.name}: {action.option_strings} has no help"


@pytest.mark.parametrize(
    "task_name, argv, grouped",
    [
        ("translation", [], True),
        ("translation", ["--no_group_by_length"], False),
        ("translation", ["--model_name_or_path", "google-t5/t5-small"], False),
        ("translation", ["--model_name_or_path", "google-t5/t5-small", "--group_by_length"], True),
        ("lm", [], False),
        ("lm", ["--group_by_length"], True),
    ],
)
def test_length_grouping_defaults_on_for_translation_from_scratch(task_name, argv, grouped):
    from hf_multimax import finetune
    from hf_multimax.finetune.tasks import TASKS

    args = finetune.parse_args(TASKS[task_name], argv)
    assert args.group_by_length is grouped
    if task_name == "translation" and not argv:  # compare's translation batch and about its 1000 steps
        assert (args.per_device_train_batch_size, args.num_train_epochs, args.vocab_size) == (64, 4, 1000)


def test_grouped_runs_report_the_loss_period(tmp_path):
    """1,000 pairs in batches of 5: mega-batches of min(1000 // 20, 50) = 50 batches, two batches a step."""
    results = load_example("run_translation").main(
        [
            "--max_train_samples",
            "1000",
            "--per_device_train_batch_size",
            "5",
            "--gradient_accumulation_steps",
            "2",
            "--max_train_steps",
            "2",
            "--max_eval_samples",
            "4",
            "--num_beams",
            "1",
            "--max_target_length",
            "8",
        ]
    )
    assert results["loss_period"] == 25
    ungrouped = load_example("run_translation").main(
        [
            "--max_train_samples",
            "100",
            "--max_train_steps",
            "1",
            "--max_eval_samples",
            "4",
            "--num_beams",
            "1",
            "--max_target_length",
            "8",
            "--no_group_by_length",
        ]
    )
    assert "loss_period" not in ungrouped


def test_bad_flags_fail_early():
    script = load_example("run_clm")
    with pytest.raises(SystemExit):
        script.main(["--multimax_init", "zeros"])
    with pytest.raises(ValueError, match="checkpointing_steps"):
        script.main(["--checkpointing_steps", "often", "--output_dir", "x"])


# -- embedded data ---------------------------------------------------------------------------------------------------


def test_embedded_data():
    texts = data.lm_texts()
    assert len(texts) > 1000 and sum(map(len, texts)) > 300_000
    assert any("assert" in t for t in texts)
    pairs = data.translation_pairs()
    assert len(pairs) > 1000 and all(en and de for en, de in pairs)
    assert ("Germany", "Deutschland") in pairs
    assert 0 < len(data.translation_pairs(["sphinx"])) < len(pairs)
    images, labels = data.digit_images()
    assert images.shape == (1797, 8, 8) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and set(labels.tolist()) == set(range(10))


def test_build_tokenizer_round_trips_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MULTIMAX_CACHE", str(tmp_path))
    texts = [de for _, de in data.translation_pairs()]
    tokenizer = data.build_tokenizer(texts, vocab_size=500)
    assert len(tokenizer) <= 500 and tokenizer.pad_token_id == 0
    sample = "Größe ändern – naïve café"
    ids = tokenizer(sample)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == sample
    assert len(list(tmp_path.glob("tokenizers/*/tokenizer.json"))) == 1
    again = data.build_tokenizer(texts, vocab_size=500)
    assert again(sample)["input_ids"] == ids


def test_regeneration_script_is_shipped():
    assert (data.DATA_DIR / "regenerate.py").is_file() and (data.DATA_DIR / "NOTICE.md").is_file()
    header = (data.DATA_DIR / "en_de.tsv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "source\ten\tde"


def test_every_translation_source_is_attributed():
    """Each origin in en_de.tsv has its row (with its pair count) in NOTICE.md and its licence texts in licenses/;
    the regeneration script reads exactly these origins."""
    rows = [line.split("\t") for line in (data.DATA_DIR / "en_de.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    counts = {name: sum(row[0] == name for row in rows) for name in data.TRANSLATION_SOURCES}
    assert {row[0] for row in rows} == set(data.TRANSLATION_SOURCES) and all(counts.values())
    assert len({row[1] for row in rows}) == len(rows) == len(data.translation_pairs())
    notice = (data.DATA_DIR / "NOTICE.md").read_text(encoding="utf-8")
    assert f"{len(rows):,} English→German pairs" in notice
    for name, count in counts.items():
        assert f"| `{name}` | {count:,} |" in notice, name
        licences = list((data.DATA_DIR / "licenses" / name).glob("*"))
        assert all(f.stat().st_size > 0 for f in licences), name
        assert any("LICEN" in f.name.upper() and f.stat().st_size > 500 for f in licences), name
    regenerate = load_module(data.DATA_DIR / "regenerate.py")
    assert tuple(source.name for source in regenerate.sources({})) == data.TRANSLATION_SOURCES
    assert len(data.translation_pairs(["django", "sphinx", "cldr"])) == 1546
    with pytest.raises(ValueError, match="unknown origin.*'wikipedia'"):
        data.translation_pairs(["wikipedia"])


def test_regeneration_reads_po_and_json_catalogs(tmp_path):
    """The readers of regenerate.py on small real-format files in a wheel-like zip: .po (multi-line strings, fuzzy,
    context and plural entries, a U+2028 inside a string), Jed JSON and id-keyed JSON pairs."""
    import zipfile

    regenerate = load_module(data.DATA_DIR / "regenerate.py")
    po = (
        'msgid ""\nmsgstr "Content-Type: text/plain"\n\n#: a.py:1\nmsgid "Save"\nmsgstr "Speichern"\n\n'
        '#, fuzzy\nmsgid "Load"\nmsgstr "Laden?"\n\nmsgctxt "verb"\nmsgid "Open"\nmsgstr "Öffnen"\n\n'
        'msgid ""\n"Delete the "\n"file"\nmsgstr "Datei löschen"\n\nmsgid "one item"\nmsgid_plural "items"\n'
        'msgstr[0] "ein Element"\nmsgstr[1] "Elemente"\n\nmsgid "Line\u2028two"\nmsgstr "Zeile\u2028zwei"\n'
    )
    wheel_path = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel_path, "w") as wheel:
        wheel.writestr("pkg/locale/de/LC_MESSAGES/django.po", po)
        wheel.writestr("pkg/locale/fr/LC_MESSAGES/django.po", 'msgid "Save"\nmsgstr "Enregistrer"\n')
        wheel.writestr("pkg/jed/de.json", json.dumps({"": {"domain": "x"}, "Close": ["Schließen"]}))
        wheel.writestr("pkg/locale/en/LC_MESSAGES/m.json", json.dumps({"a.b": "Next", "a.c": "Back"}))
        wheel.writestr("pkg/locale/de/LC_MESSAGES/m.json", json.dumps({"a.b": "Weiter"}))
        wheel.writestr("pkg-1.0.dist-info/licenses/LICENSE", "MIT License")
        wheel.writestr("pkg/vendored-2.0.dist-info/LICENSE", "not ours")
    with zipfile.ZipFile(wheel_path) as wheel:
        assert list(regenerate.po_files("pkg/*locale/de/LC_MESSAGES/*.po")(wheel)) == [
            ("Save", "Speichern"),
            ("Delete the file", "Datei löschen"),
            ("one item", "ein Element"),
            ("Line\u2028two", "Zeile\u2028zwei"),
        ]
        assert list(regenerate.jed_files("pkg/jed/*.json")(wheel)) == [("Close", "Schließen")]
        assert list(regenerate.keyed_json_files("pkg/locale")(wheel)) == [("Next", "Weiter")]
        assert regenerate.licence_files(wheel) == ["pkg-1.0.dist-info/licenses/LICENSE"]
    assert regenerate.clean("Delete  the\nfile") == "Delete the file" and regenerate.clean("Hello %(name)s") is None


def test_sacrebleu_works_offline():
    from hf_multimax.finetune.tasks import load_sacrebleu

    metric = load_sacrebleu()
    result = metric.compute(predictions=["the cat sat on the mat"], references=[["the cat sat on the mat"]])
    assert result["score"] == pytest.approx(100.0)
    import sacrebleu

    predictions, references = ["hello there world", "a b c d e"], [["hello world there"], ["a b c d f"]]
    expected = sacrebleu.corpus_bleu(predictions, [[r[0] for r in references]]).score
    assert metric.compute(predictions=predictions, references=references)["score"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("task_name", "family", "output"),
    [("lm", "llama", False), ("lm", "gpt2", True), ("translation", "t5", False), ("translation", "bart", True)],
)
def test_eval_loss_terms_give_the_models_loss(task_name, family, output):
    """The per-example loss sums the scripts gather across processes add up to the model's own mean loss (padded
    labels ignored; output-layer MultiMax included), so the evaluation loss does not depend on the batching."""
    from families import BY_NAME

    from hf_multimax.finetune.tasks import get_task

    task = get_task(task_name)
    model = BY_NAME[family].build("multimax", multimax_output=output, multimax_init="paper")
    batch = BY_NAME[family].inputs(batch=3, padding="right")
    labels = batch.get("decoder_input_ids", batch["input_ids"]).clone()
    labels[0, -2:] = -100
    batch.pop("decoder_input_ids", None)
    with torch.no_grad():
        outputs = model(**batch, labels=labels)
        sums, counts = task.loss_terms(outputs.logits, labels)
        assert sums.shape == counts.shape == (3,)
        torch.testing.assert_close(sums.sum() / counts.sum(), outputs.loss, atol=1e-5, rtol=1e-5)
        # Split into batches of one: the gathered terms give the same mean, unlike a mean of batch means.
        parts = [
            task.loss_terms(
                model(**{k: v[i : i + 1] for k, v in batch.items()}, labels=labels[i : i + 1]).logits, labels[i : i + 1]
            )
            for i in range(3)
        ]
    torch.testing.assert_close(torch.tensor(task.mean_loss(parts)), outputs.loss, atol=1e-5, rtol=1e-5)


def test_eval_loss_terms_for_classification():
    from families import BY_NAME

    from hf_multimax.finetune.tasks import get_task

    model = BY_NAME["vit"].build("multimax", multimax_output=True)
    labels = torch.tensor([1, 0, -100])
    with torch.no_grad():
        outputs = model(**BY_NAME["vit"].inputs(batch=3), labels=labels)
    sums, counts = get_task("vit").loss_terms(outputs.logits, labels)
    assert counts.tolist() == [1.0, 1.0, 0.0]
    torch.testing.assert_close(sums.sum() / counts.sum(), outputs.loss, atol=1e-5, rtol=1e-5)
