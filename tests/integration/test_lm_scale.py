"""The language-model experiment at scale (examples/recipes/lm_scale.py) at its ``--dry-run`` size, in-process, so that
no GPU time goes to finding its bugs: the results file keeps ``hf-multimax compare``'s contract, a diverging run is
recorded with its step while the other implementation's run stays, ``--resume`` adds seeds (and refuses other
settings), a too-small corpus stops with one error line, and the corpus builder is deterministic and holds out whole
directories."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from scripts import EXAMPLES, load_module

from hf_multimax.cli import run_script
from hf_multimax.compare.report import format_table
from hf_multimax.data.python_corpus import PYTHON_SOURCES, CorpusSource, build_python_corpus, sources_named

SCRIPT = EXAMPLES / "recipes" / "lm_scale.py"
lm_scale = load_module(SCRIPT)
#: What the GPU machine's image does not have (issue 23): the script must run without them.
NOT_ON_THE_GPU_IMAGE = ("datasets", "evaluate", "sacrebleu", "entmax")
#: Runs the script with those packages unimportable (``python -c BLOCKED_RUN ARGS...``).
BLOCKED_RUN = f"""
import importlib.abc, runpy, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {NOT_ON_THE_GPU_IMAGE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Absent())
try:
    import datasets
except ModuleNotFoundError:
    print("the blocker hides datasets", file=sys.stderr)
sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]
runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
"""
#: Every output a run leaves (the $OUT of a GPU command takes at most 8 files).
OUTPUTS = {
    "results.json",
    "results.md",
    "loss_curves.png",
    "metrics.png",
    "eval_curves.png",
    "corpus.json",
    "tokenizer.json",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: tiny models gain nothing from two, and on a shared CPU two OpenMP threads can be 10x
    slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(*argv: str) -> int:
    return run_script(lm_scale.main, list(argv))


def error_line(capsys) -> str:
    """The one ``error:`` line a failed command printed (progress bars share stderr); no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def results_of(folder) -> dict:
    return json.loads((folder / "results.json").read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The dry run, one seed, sdpa and multimax."""
    folder = tmp_path_factory.mktemp("lm-scale") / "out"
    assert run("--dry-run", "--output_dir", str(folder)) == 0
    return folder


def test_the_dry_run_writes_compare_s_contract(dry_run, capsys):
    assert {path.name for path in dry_run.iterdir()} == OUTPUTS
    results = results_of(dry_run)
    for key in ("task", "command", "baseline", "implementations", "seeds", "settings", "machine", "runs", "summary"):
        assert key in results, key
    assert results["experiment"] == "lm_scale" and results["baseline"] == "sdpa"
    assert [(r["implementation"], r["seed"]) for r in results["runs"]] == [("sdpa", 0), ("multimax", 0)]
    settings = results["settings"]
    tokens = settings["max_train_steps"] * settings["training"]["tokens_per_step"]
    for record in results["runs"]:
        assert "error" not in record, record.get("error")
        assert record["tokens"] == tokens == settings["tokens_per_run"] >= lm_scale.DRY_RUN["tokens"]
        assert record["metrics"]["tokens_per_second"] > 0
        assert record["metrics"]["perplexity"] == pytest.approx(math.exp(record["metrics"]["eval_loss"]))
        assert {"paper_multimodality", "paper_sparsity", "attention_entropy"} <= set(record["metrics"])
        assert len(record["losses"]) == settings["max_train_steps"]
        # held-out loss at the same fixed token counts for every run, and it fell from the initial ln(V)
        assert [t for t, _ in record["evals"]] == [
            s * settings["training"]["tokens_per_step"] for s in settings["training"]["eval_steps"]
        ]
        assert record["evals"][-1][1] < record["evals"][0][1] - 0.5
    assert results["runs"][0]["evals"][0][1] == pytest.approx(math.log(results["tokenizer"]["vocab_size"]), abs=0.1)
    assert set(results["runs"][1]["modulators"]) and not results["runs"][0]["modulators"]
    # every MultiMax attention backward of the training steps is recorded with the kernel that computed it
    backends = results["runs"][1]["attention_backends"]
    backward = sum(count for name, count in backends.items() if name.startswith("backward:"))
    assert backward == settings["max_train_steps"] * settings["model"]["n_layer"]
    assert "attention_backends" not in results["runs"][0]  # sdpa
    assert results["versus_baseline"]["multimax"]["eval_loss"]["n"] == 1
    corpus = results["corpus"]
    assert corpus["sources"][0]["name"] == "stdlib" and corpus["sources"][0]["licence"] == "PSF-2.0"
    assert corpus["sources"][0]["version"] and len(corpus["sha256"]) == 64
    assert settings["data"]["corpus_sha256"] == corpus["sha256"]
    assert corpus["tokens"]["train"] >= lm_scale.DRY_RUN["min_train_tokens"]
    manifest = json.loads((dry_run / "corpus.json").read_text())
    assert {f["split"] for f in manifest["file_list"]} == {"train", "eval"}
    # the compare report's tables apply, and the script's own table comes last
    assert "perplexity" in format_table(results)
    assert "Attention statistics" in (dry_run / "results.md").read_text()
    assert run("--report_only", "--output_dir", str(dry_run)) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("multimax - sdpa (1 pairs")


def test_resume_adds_a_seed_and_keeps_the_runs_there(dry_run, tmp_path):
    folder = tmp_path / "out"
    shutil.copytree(dry_run, folder)
    before = results_of(folder)
    assert run("--dry-run", "--output_dir", str(folder), "--seeds", "2", "--resume") == 0
    after = results_of(folder)
    assert [(r["implementation"], r["seed"]) for r in after["runs"]] == [
        ("sdpa", 0),
        ("multimax", 0),
        ("sdpa", 1),
        ("multimax", 1),
    ]
    assert after["runs"][:2] == before["runs"]  # kept as they were, not trained again
    assert after["tokenizer"]["sha256"] == before["tokenizer"]["sha256"]
    assert after["versus_baseline"]["multimax"]["eval_loss"]["n"] == 2
    assert after["runs"][2]["losses"] != after["runs"][0]["losses"]  # another seed, another data order


@pytest.mark.parametrize(
    ("flag", "value", "difference"),
    [
        ("--learning_rate", "0.01", "training.learning_rate: 0.003 then, 0.01 now"),
        ("--vocab_size", "600", "data.vocab_size: 512 then, 600 now"),
    ],
)
def test_resume_refuses_other_settings_before_building_the_corpus(flag, value, difference, dry_run, tmp_path, capsys):
    folder = tmp_path / "out"
    shutil.copytree(dry_run, folder)
    (folder / "corpus.json").unlink()
    assert run("--dry-run", "--output_dir", str(folder), "--resume", flag, value) == 2
    error = error_line(capsys)
    assert "--resume" in error and difference in error
    assert not (folder / "corpus.json").exists()


def test_a_diverging_run_is_recorded_with_its_step_and_the_other_run_is_kept(tmp_path):
    folder = tmp_path / "out"
    argv = ["--dry-run", "--output_dir", str(folder), "--tokens", "25600", "--evals", "2", "--no_analysis"]
    assert run(*argv, "--multimax_learning_rate", "1e30") == 0
    sdpa, multimax = results_of(folder)["runs"]
    assert "error" not in sdpa and math.isfinite(sdpa["metrics"]["eval_loss"])
    assert multimax["error"].startswith("non-finite training loss (")
    assert multimax["error"].endswith(f") at step {multimax['failed_step']}")
    assert 1 <= multimax["failed_step"] <= multimax["steps"] < 50
    assert "eval_loss" not in multimax["metrics"]
    assert "Failed runs: multimax seed 0: non-finite" in (folder / "results.md").read_text()


def test_a_corpus_below_the_minimum_stops_with_one_error_line(tmp_path, capsys):
    folder = tmp_path / "out"
    assert run("--dry-run", "--output_dir", str(folder), "--min_train_tokens", "1e9") == 2
    error = error_line(capsys)
    assert "corpus shortfall" in error and "from stdlib, fewer than --min_train_tokens 1,000,000,000" in error
    assert not (folder / "results.json").exists()


def test_a_spent_time_budget_runs_nothing_and_says_which_seeds_are_left(tmp_path):
    folder = tmp_path / "out"
    assert run("--dry-run", "--output_dir", str(folder), "--seeds", "2", "--time_budget", "0.001") == 0
    results = results_of(folder)
    assert results["runs"] == [] and results["not_run"] == [0, 1]
    assert "no run finished" in (folder / "results.md").read_text()


def test_it_runs_with_only_the_packages_of_the_gpu_image(tmp_path):
    folder = tmp_path / "out"
    argv = ["--dry-run", "--output_dir", str(folder), "--tokens", "12800", "--evals", "1", "--no_analysis"]
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the blocker hides datasets" in done.stderr
    results = results_of(folder)
    assert [run.get("error") for run in results["runs"]] == [None, None]
    assert results["versus_baseline"]["multimax"]["eval_loss"]["n"] == 1  # compare's statistics ran there too
    assert {path.name for path in folder.iterdir()} == OUTPUTS


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--tokens", "0", "--tokens must be >= 1"),
        ("--n_head", "3", "--n_embd 64 must be a multiple of --n_head 3"),
        ("--sources", "stdlib-typo", "--sources: unknown source(s) ['stdlib-typo']"),
        ("--eval_fraction", "0.9", "--eval_fraction must be in (0, 0.5]"),
        ("--vocab_size", "100", "--vocab_size must hold the 256 bytes"),
    ],
)
def test_bad_flags_end_in_one_error_line_naming_the_flag(flag, value, message, tmp_path, capsys):
    assert run("--dry-run", "--output_dir", str(tmp_path), flag, value) == 2
    assert message in error_line(capsys)


def test_both_implementations_start_from_the_same_weights():
    settings = lm_scale.run_settings(lm_scale.parse_args(["--dry-run", "--multimax_output"]), bf16=False)
    tokenizer = {"vocab_size": 300, "special_tokens": {"pad_token": 0, "eos_token": 1, "unk_token": 2, "bos_token": 3}}
    config = lm_scale.model_config(settings, tokenizer)
    sdpa = lm_scale.build_model(config, "sdpa", 7, settings["multimax"]).state_dict()
    multimax = lm_scale.build_model(config, "multimax", 7, settings["multimax"]).state_dict()
    other_seed = lm_scale.build_model(config, "sdpa", 8, settings["multimax"]).state_dict()
    assert all(torch.equal(value, multimax[name]) for name, value in sdpa.items())
    assert {name for name in multimax if name not in sdpa} >= {"lm_head.multimax.multimax_ts"}
    assert not torch.equal(sdpa["transformer.h.0.attn.c_attn.weight"], other_seed["transformer.h.0.attn.c_attn.weight"])


# -- the corpus builder ---------------------------------------------------------------------------------------------


def test_the_corpus_is_deterministic_and_holds_out_whole_directories():
    first = build_python_corpus(sources_named(["stdlib"]), eval_fraction=0.05, max_bytes=800_000, progress=False)
    again = build_python_corpus(sources_named(["stdlib"]), eval_fraction=0.05, max_bytes=800_000, progress=False)
    assert first.sha256 == again.sha256 and first.files == again.files
    directories = {
        split: {f.path.rpartition("/")[0] for f in first.files if f.split == split} for split in ("train", "eval")
    }
    assert directories["eval"] and not directories["eval"] & directories["train"]
    assert 0 < first.bytes_of("eval") <= 0.05 * (first.bytes_of("eval") + first.bytes_of("train"))
    assert first.bytes_of("train") + first.bytes_of("eval") <= 800_000
    assert len({f.sha256 for f in first.files}) == len(first.files)  # exact duplicates dropped
    other = build_python_corpus(sources_named(["stdlib"]), eval_fraction=0.1, max_bytes=800_000, progress=False)
    assert other.sha256 != first.sha256


def test_a_source_that_is_not_installed_is_reported_and_the_rest_is_read():
    absent = CorpusSource("hf-multimax-no-such-package", "MIT", "hf_multimax_no_such_package")
    corpus = build_python_corpus((PYTHON_SOURCES[0], absent), max_bytes=300_000, progress=False)
    assert corpus.missing == ["hf-multimax-no-such-package"]
    report = {source["name"]: source for source in corpus.sources}
    assert report["hf-multimax-no-such-package"] == dict(report["hf-multimax-no-such-package"], found=False, files=0)
    assert report["stdlib"]["found"] and report["stdlib"]["files"] == len(corpus.files) > 0
