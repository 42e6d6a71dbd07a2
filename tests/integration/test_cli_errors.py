"""Every command of ``hf-multimax`` with a user's mistake: a wrong path, a folder that is not a model, a model saved
without its tokenizer or image processor. Each ends in one ``error:`` line and exit code 2 (never a traceback), or,
where the command can proceed offline, works and says in one log line what it used instead."""

import logging

import pytest
from transformers import AutoModelForCausalLM, AutoModelForImageClassification, LlamaConfig, ViTConfig

from hf_multimax.cli import main


def run(capsys, *argv):
    """``(exit code, stderr)`` of ``hf-multimax ARGV``."""
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_one_error_line(code, err, *words):
    """Exit code 2 and one ``hf-multimax COMMAND: error: ...`` line naming ``words`` (progress bars aside)."""
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and lines[0].startswith("hf-multimax "), err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def llama_without_tokenizer(tmp_path_factory):
    """A MultiMax Llama saved with ``save_pretrained`` alone, as most training code saves it."""
    path = tmp_path_factory.mktemp("models") / "llama"
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=400,
        max_position_embeddings=128,
    )
    AutoModelForCausalLM.from_config(config, attn_implementation="multimax").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vit_without_processor(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "vit"
    config = ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=8,
        patch_size=2,
        num_channels=3,
        num_labels=10,
    )
    AutoModelForImageClassification.from_config(config, attn_implementation="multimax").save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# a wrong path, a folder that is not a model


@pytest.mark.parametrize("command", [["analyze"], ["push", "--dry-run"]])
def test_a_wrong_path(capsys, tmp_path, command):
    extra = ["someone/model"] if command[0] == "push" else []
    code, err = run(capsys, command[0], str(tmp_path / "nowhere"), *extra, *command[1:])
    assert_one_error_line(code, err, "nowhere", "not a folder")


@pytest.mark.parametrize("command", [["analyze"], ["push", "--dry-run"]])
def test_a_folder_that_is_not_a_model(capsys, tmp_path, command):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a model")
    extra = ["someone/model"] if command[0] == "push" else []
    code, err = run(capsys, command[0], str(tmp_path / "notes"), *extra, *command[1:])
    assert_one_error_line(code, err, "is not a saved model", "config.json")


def test_compare_with_wrong_paths_and_names(capsys, tmp_path, llama_without_tokenizer):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        (["--output_dir", str(a_file)], ["--output_dir", "not a folder"]),
        (["--implementations", "multimax", "softmaxx"], ["--implementations", "softmaxx"]),
        (["--implementations"], ["--implementations", "at least one"]),
        (["--script_args", f"--model_name_or_path {tmp_path / 'nowhere'}"], ["--model_name_or_path", "not a folder"]),
        (["--script_args", f"--model_name_or_path {tmp_path}"], ["--model_name_or_path", "not a saved model"]),
        (["--script_args", f"--train_file {tmp_path / 'missing.txt'}"], ["--train_file", "does not exist"]),
        (["--script_args", f"--model_name_or_path {llama_without_tokenizer}"], ["no tokenizer", "--tokenizer_name"]),
        (["--max_train_steps", "0"], ["--max_train_steps"]),
    ]
    for argv, words in cases:
        code, err = run(capsys, "compare", "--max_train_steps", "1", "--output_dir", str(tmp_path / "out"), *argv)
        assert_one_error_line(code, err, *words)
    assert not (tmp_path / "out").exists()  # nothing was trained or written


def test_info_with_an_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["info", "--bogus"])
    assert exit.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# a model saved without its tokenizer or image processor


def test_analyze_a_model_saved_without_its_tokenizer(capsys, caplog, tmp_path, llama_without_tokenizer):
    with caplog.at_level(logging.WARNING, logger="hf_multimax"):
        code = main(
            [
                "analyze",
                str(llama_without_tokenizer),
                "--output_dir",
                str(tmp_path / "out"),
                "--num_samples",
                "2",
                "--max_length",
                "16",
            ]
        )
    assert code == 0
    said = [r.getMessage() for r in caplog.records if "has no tokenizer" in r.getMessage()]
    assert len(said) == 1 and "byte-level BPE" in said[0] and "--tokenizer NAME_OR_PATH" in said[0]
    assert (tmp_path / "out" / "summary.md").is_file()


def test_analyze_a_tiny_vocabulary_falls_back_to_random_ids(capsys, caplog, tmp_path):
    path = tmp_path / "tiny"
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    AutoModelForCausalLM.from_config(config, attn_implementation="multimax").save_pretrained(path)
    with caplog.at_level(logging.WARNING, logger="hf_multimax"):
        assert main(["analyze", str(path), "--output_dir", str(tmp_path / "out"), "--num_samples", "2"]) == 0
    assert any("random token ids" in r.getMessage() for r in caplog.records)
    assert "random token sequences" in (tmp_path / "out" / "summary.md").read_text()


def test_analyze_with_a_tokenizer_that_does_not_load(capsys, tmp_path, llama_without_tokenizer):
    code, err = run(
        capsys,
        "analyze",
        str(llama_without_tokenizer),
        "--tokenizer",
        str(tmp_path / "nowhere"),
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert_one_error_line(code, err, "--tokenizer", "not a folder")
    assert not (tmp_path / "out").exists()


def test_analyze_a_vision_model_saved_without_its_image_processor(capsys, caplog, tmp_path, vit_without_processor):
    with caplog.at_level(logging.WARNING, logger="hf_multimax"):
        assert (
            main(["analyze", str(vit_without_processor), "--output_dir", str(tmp_path / "out"), "--num_samples", "2"])
            == 0
        )
    assert any("has no image processor" in r.getMessage() for r in caplog.records)
    code, err = run(capsys, "analyze", str(vit_without_processor), "--image_dir", str(tmp_path / "no_images"))
    assert_one_error_line(code, err, "--image_dir", "not a folder")
    code, err = run(capsys, "analyze", str(vit_without_processor), "--text_file", str(tmp_path / "none.txt"))
    assert_one_error_line(code, err, "--text_file", "not a file")


def test_push_a_model_saved_without_its_tokenizer(capsys, tmp_path, llama_without_tokenizer):
    assert (
        main(
            [
                "push",
                str(llama_without_tokenizer),
                "someone/llama-multimax",
                "--dry-run",
                "--local-dir",
                str(tmp_path / "hub"),
            ]
        )
        == 0
    )
    assert (tmp_path / "hub" / "README.md").is_file() and (tmp_path / "hub" / "model.safetensors").is_file()
    assert "AutoTokenizer" not in (tmp_path / "hub" / "README.md").read_text()  # the card promises no tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# the example scripts, run as a user runs them


def run_script(*argv):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize(
    "script", ["examples/run_clm.py", "examples/run_translation.py", "examples/run_image_classification.py"]
)
def test_script_with_a_wrong_path_is_one_error_line(script, tmp_path):
    flag = "--train_file"
    code, err = run_script(script, flag, str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out"))
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and flag in lines[0] and "missing" in lines[0], err


def test_script_on_a_model_without_its_tokenizer_names_the_flag(llama_without_tokenizer, tmp_path):
    code, err = run_script(
        "examples/run_clm.py",
        "--model_name_or_path",
        str(llama_without_tokenizer),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_train_steps",
        "1",
    )
    assert code == 2 and "Traceback" not in err, err
    assert "--tokenizer_name" in err


def test_recipes_jsonl_with_a_missing_file_is_one_error_line(tmp_path):
    code, err = run_script(
        "examples/recipes/recipes.py", "jsonl", str(tmp_path / "train.de"), str(tmp_path / "train.en"), "de", "en"
    )
    assert code == 2 and "Traceback" not in err and "train.de" in err, err


def test_output_into_a_pipe_closed_early_ends_quietly():
    """``hf-multimax info | head -0``: the reader leaves before the output is written; no error line, no traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "hf_multimax.cli", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # as `head -0` does, before the command writes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 1) and "error" not in err.lower() and "Traceback" not in err, err
