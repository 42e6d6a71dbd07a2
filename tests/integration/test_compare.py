"""``hf-multimax compare``: every implementation on every seed from the same weights, the results.json contract,
resuming, failed runs, the paper's comparators in one run, and user mistakes caught before any training."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import hf_multimax
from hf_multimax import cli
from hf_multimax.compare import compare
from hf_multimax.compare.runner import run_dir

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

TINY_VIT = "--max_train_samples 96 --max_eval_samples 24 --per_device_train_batch_size 16"
PNG = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 5000, path


def test_two_seeds_two_implementations_results_contract(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = cli.main(
        [
            "compare",
            "--task",
            "vit",
            "--seeds",
            "2",
            "--max_train_steps",
            "2",
            "--output_dir",
            str(out),
            "--multimax_init",
            "identity",
            "--script_args",
            TINY_VIT,
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| sdpa | 2 |" in printed and "| multimax | 2 |" in printed and "accuracy ↑" in printed
    assert "paired difference against sdpa" in printed and "paper M (Def. 3.2)" in printed

    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [(r["implementation"], r["seed"]) for r in runs] == [
        ("sdpa", 0),
        ("multimax", 0),
        ("sdpa", 1),
        ("multimax", 1),
    ]
    for run in runs:
        assert {"implementation", "seed", "train_loss", "metrics", "time_per_step"} <= set(run)
        assert "error" not in run and run["steps"] == 2 and len(run["losses"]) == 2
        assert {
            "eval_loss",
            "accuracy",
            "attention_sparsity",
            "attention_entropy",
            "paper_multimodality",
            "paper_sparsity",
        } <= set(run["metrics"])
        assert (out / run["implementation"] / f"seed_{run['seed']}" / "model.safetensors").is_file()
    names = {"train_loss", "time_per_step"} | set(runs[0]["metrics"])
    for implementation in ("sdpa", "multimax"):
        assert set(results["summary"][implementation]) == names
        for stats in results["summary"][implementation].values():
            assert {"mean", "std", "ci95", "n"} <= set(stats) and stats["n"] == 2 and len(stats["ci95"]) == 2
    assert set(results["versus_baseline"]) == {"multimax"}
    assert set(results["versus_baseline"]["multimax"]) == names
    for diff in results["versus_baseline"]["multimax"].values():
        assert {"mean_difference", "ci95", "p_value"} <= set(diff)
    # The summary is the statistics of the runs: the mean eval loss is the mean of the two seeds.
    eval_losses = [r["metrics"]["eval_loss"] for r in runs if r["implementation"] == "sdpa"]
    assert results["summary"]["sdpa"]["eval_loss"]["mean"] == pytest.approx(sum(eval_losses) / 2)

    # Same seed: the same initial weights for both (identity MultiMax = SoftMax); another seed: other weights.
    first = {(r["implementation"], r["seed"]): r["losses"][0][1] for r in runs}
    assert first[("sdpa", 0)] == pytest.approx(first[("multimax", 0)], abs=1e-5)
    assert first[("sdpa", 1)] == pytest.approx(first[("multimax", 1)], abs=1e-5)
    assert first[("sdpa", 0)] != pytest.approx(first[("sdpa", 1)], abs=1e-5)

    for name in ("loss_curves.png", "metrics.png"):
        assert_png(out / name)
    markdown = (out / "results.md").read_text()
    assert "± " in markdown and "![metrics](metrics.png)" in markdown and "Machine:" in markdown
    # The baseline is plain SoftMax: no MultiMax parameters in its checkpoint.
    assert not any("multimax" in k for k in load_file(run_dir(out, "sdpa", 0) / "model.safetensors"))
    assert any("multimax" in k for k in load_file(run_dir(out, "multimax", 0) / "model.safetensors"))


def test_resume_skips_finished_runs_and_refuses_other_settings(tmp_path):
    out = tmp_path / "cmp"
    kwargs = dict(implementations=["sdpa", "multimax"], max_train_steps=1, script_argv=TINY_VIT.split(), analysis=False)
    first = compare("vit", out, seeds=[0], **kwargs)
    model = run_dir(out, "sdpa", 0) / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    second = compare("vit", out, seeds=[0, 1], resume=True, **kwargs)
    assert [(r["implementation"], r["seed"]) for r in second["runs"]] == [
        ("sdpa", 0),
        ("multimax", 0),
        ("sdpa", 1),
        ("multimax", 1),
    ]
    assert model.stat().st_mtime_ns == stamp  # seed 0 was not trained again
    assert second["runs"][0] == first["runs"][0]
    assert run_dir(out, "multimax", 1).is_dir()
    with pytest.raises(ValueError, match="--resume.*max_train_steps"):
        compare("vit", out, seeds=[0, 1], resume=True, **dict(kwargs, max_train_steps=2))


def nan_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention function that breaks training: NaN outputs."""
    return torch.full_like(query, float("nan")).transpose(1, 2).contiguous(), None


def test_a_failed_implementation_is_reported_and_the_others_finish(tmp_path, capsys):
    from transformers import AttentionInterface

    AttentionInterface.register("nan_for_test", nan_attention)
    try:
        out = tmp_path / "cmp"
        code = cli.main(
            [
                "compare",
                "--task",
                "vit",
                "--seeds",
                "2",
                "--max_train_steps",
                "1",
                "--no_analysis",
                "--implementations",
                "sdpa",
                "nan_for_test",
                "--output_dir",
                str(out),
                "--script_args",
                TINY_VIT,
            ]
        )
    finally:
        AttentionInterface._global_mapping.pop("nan_for_test", None)
    assert code == 0
    printed = capsys.readouterr().out
    assert "| nan_for_test | 0 of 2 | failed: non-finite training loss" in printed
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [bool(r.get("error")) for r in runs] == [False, True, False, True]
    assert json.loads((out / "results.json").read_text())["summary"]["sdpa"]["eval_loss"]["n"] == 2


def test_the_papers_comparators_in_one_run_and_multimax_only_flags(tmp_path, capsys):
    out = tmp_path / "lm"
    implementations = ["sdpa", "multimax", "sparsemax", "entmax15", "entmax_alpha", "evsoftmax"]
    code = cli.main(
        [
            "compare",
            "--task",
            "lm",
            "--max_train_steps",
            "1",
            "--output_dir",
            str(out),
            "--no_analysis",
            "--implementations",
            *implementations,
            "--multimax_order",
            "3",
            "--multimax_learning_rate",
            "0.5",
            "--script_args",
            "--max_train_samples 120 --block_size 32",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    for name in implementations:
        assert f"| {name} | 1 |" in printed
    assert json.loads((run_dir(out, "multimax", 0) / "config.json").read_text())["multimax_order"] == 3
    for name in ("sdpa", "sparsemax", "entmax15", "entmax_alpha", "evsoftmax"):  # MultiMax flags: MultiMax runs only
        assert not any("multimax" in k for k in load_file(run_dir(out, name, 0) / "model.safetensors")), name
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["multimax"]["multimax_order"] == 3 and settings["multimax"]["multimax_learning_rate"] == 0.5


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--seed_list", "3", "-1"], "--seed_list: seeds must be >= 0"),
        (["--seed_list", "3", "3"], "--seed_list lists [3] more than once"),
        (["--implementations"], "--implementations needs at least one"),
        (
            ["--implementations", "sdpa", "softermax"],
            "--implementations: unknown attention implementation(s) ['softermax']",
        ),
        (["--max_train_steps", "0"], "--max_train_steps must be >= 1"),
        (["--multimax_order", "0"], "multimax_order"),
        (["--script_args", "--no_such_flag 1"], "--script_args"),
        (
            ["--script_args", "--max_train_steps 900"],
            "--script_args sets --max_train_steps, which compare sets for each run; "
            "use compare's --max_train_steps instead",
        ),
        (
            ["--script_args", "--seed 3 --multimax_learning_rate 0.1"],
            "--script_args sets --multimax_learning_rate, --seed",
        ),
        (["--script_args=--group_by_length"], "--script_args '--group_by_length' are not flags of the vit"),
    ],
)
def test_bad_input_is_one_error_line_before_any_training(tmp_path, capsys, flags, message):
    out = tmp_path / "never"
    assert cli.main(["compare", "--task", "vit", "--output_dir", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hf-multimax compare: error:") and message in err[-1]
    assert not out.exists()


def test_compare_rejects_unknown_task():
    with pytest.raises(SystemExit):
        cli.main(["compare", "--task", "speech"])


def test_identity_multimax_loads_and_trains_like_softmax_from_the_same_seed(tmp_path):
    """The MultiMax model of a run reloads as MultiMax; its σ parameters are the saved ones."""
    out = tmp_path / "cmp"
    compare(
        "vit",
        out,
        implementations=["multimax"],
        seeds=[3],
        max_train_steps=1,
        analysis=False,
        multimax_flags={"multimax_init": "paper"},
        script_argv=TINY_VIT.split(),
    )
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(run_dir(out, "multimax", 3), attn_implementation="multimax")
    saved = {
        k: v for k, v in load_file(run_dir(out, "multimax", 3) / "model.safetensors").items() if "multimax_ts" in k
    }
    loaded = {n: s.multimax_ts.detach() for n, s in hf_multimax.multimax_modules(model).items()}
    assert len(saved) == len(loaded) == 2
    assert sorted(t.tolist() for t in loaded.values()) == sorted(t.tolist() for t in saved.values())
    assert all(not math.isclose(float(ts.abs().sum()), 0.0) for ts in loaded.values())  # paper init: not identity
