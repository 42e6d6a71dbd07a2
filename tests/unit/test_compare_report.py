"""The tables and figures of ``hf-multimax compare`` on hand-built run records."""

from __future__ import annotations

import json
import math

import pytest

from hf_multimax.compare import build_results, format_attention_table, format_table, plot_loss_curves, plot_metrics
from hf_multimax.compare.runner import jsonable, training_failure, write_results
from hf_multimax.compare.statistics import format_aligned, summarize


def run(impl, seed, ppl, loss=2.0, error=None, attention=None):
    record = {
        "implementation": impl,
        "seed": seed,
        "train_loss": loss + seed / 10,
        "time_per_step": 0.01,
        "metrics": {"eval_loss": math.log(ppl), "perplexity": ppl, **(attention or {})},
        "losses": [[1, 3.0 + seed], [2, 2.5 + seed], [3, loss + seed]],
        "output_dir": f"/x/{impl}/seed_{seed}",
    }
    if error:
        record["error"] = error
    return record


def results(runs, implementations=("sdpa", "multimax", "broken")):
    state = {
        "settings": {"task": "lm", "max_train_steps": 3, "multimax": {}, "script": {}, "script_args": []},
        "implementations": list(implementations),
        "seeds": [0, 1, 2],
        "runs": runs,
    }
    return build_results(state, seconds=1.0, machine={"cpu": "test"}, command_line="hf-multimax compare")


def example():
    runs = []
    for seed in range(3):
        runs.append(run("sdpa", seed, 50.0 + seed, attention={"attention_entropy": 1.0 + seed / 10}))
        runs.append(run("multimax", seed, 48.0 + seed + 0.1 * (seed % 2), attention={"attention_entropy": 1.0}))
        runs.append(run("broken", seed, math.nan, error="RuntimeError: boom"))
    return results(runs)


def test_tables_show_intervals_mark_significant_differences_and_failures():
    table = format_table(example())
    lines = table.splitlines()
    sdpa = next(line for line in lines if line.startswith("| sdpa |"))
    # perplexity 50, 51, 52: mean 51, s = 1, half-width t_{.975,2} / sqrt(3) = 2.48
    assert "| 3 |" in sdpa and "51.0 ± 2.5" in sdpa
    difference = next(line for line in lines if line.startswith("| multimax | 3 |") and "(p " in line)
    # Δ perplexity = -2, -1.9, -2: an interval far from 0, shown in bold with its p-value
    assert "**-1.97 ± 0.14 (p 0.0" in difference
    assert "| broken | 0 of 3 | failed: RuntimeError: boom |" in table
    assert "Failed runs: broken seed 0: RuntimeError: boom" in table
    attention = format_attention_table(example())
    assert "entropy (nats)" in attention and "| multimax | 3 | 1.000 ± 0 |" not in attention
    assert "| multimax | 3 | 1 ± 0 |" in attention


def test_a_difference_whose_interval_contains_zero_is_not_bold():
    runs = []
    for seed, (a, b) in enumerate([(50.0, 49.0), (50.0, 51.0), (50.0, 50.5)]):
        runs += [run("sdpa", seed, a), run("multimax", seed, b)]
    table = format_table(results(runs, ("sdpa", "multimax")))
    row = next(line for line in table.splitlines() if line.startswith("| multimax | 3 |") and "(p " in line)
    assert "**" not in row


def test_results_json_has_no_nan_and_the_figures_are_pngs(tmp_path):
    data = example()
    path = write_results(tmp_path, data)
    text = path.read_text()
    assert "NaN" not in text
    loaded = json.loads(text)
    assert loaded["summary"]["broken"]["perplexity"]["mean"] is None  # NaN as null
    assert set(loaded["versus_baseline"]) == {"multimax", "broken"}
    assert jsonable({"a": (float("nan"), 1.0)}) == {"a": [None, 1.0]}
    for plot in (plot_loss_curves(data, tmp_path / "l.png"), plot_metrics(data, tmp_path / "m.png")):
        assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_training_failure_and_aligned_formatting():
    assert training_failure({"losses": [[1, 2.0], [2, float("nan")]], "metrics": {"eval_loss": 1.0}}).startswith(
        "non-finite training loss (nan) at step 2"
    )
    assert training_failure({"losses": [[1, 2.0]], "metrics": {"eval_loss": float("inf")}}).startswith(
        "non-finite evaluation loss"
    )
    assert training_failure({"losses": [[1, 2.0]], "metrics": {"eval_loss": 1.0}}) is None
    assert format_aligned(summarize([0.97, 0.98, 0.99])) == "0.980 ± 0.025"
    assert format_aligned(summarize([4.2])) == "4.2"
    assert format_aligned({"mean_difference": -1e-9, "ci95": [-0.001, 0.001]}) == "0.0000 ± 0.0010"


def test_loss_curves_average_out_the_length_grouping_period():
    """With ``--group_by_length`` the loss repeats with the batch lengths every ``loss_period`` steps; the curve
    averages over that period (a sawtooth of amplitude 1 leaves a flat line), while a run without one is smoothed
    exponentially as before."""
    from hf_multimax.compare.report import _smoothed

    period = 50
    losses = [[step, 3.0 + (step % period) / period] for step in range(1, 501)]  # mean 3.49 over every period
    _, flat = _smoothed(losses, period=period)
    assert max(flat[period:]) - min(flat[period:]) < 1e-9
    assert flat[-1] == pytest.approx(3.0 + (period - 1) / (2 * period))
    _, exponential = _smoothed(losses)
    assert max(exponential[period:]) - min(exponential[period:]) > 0.4  # the sawtooth stays in
    assert _smoothed(losses, period=1)[1] == exponential


def test_run_records_keep_the_loss_period_of_grouped_runs():
    import argparse

    from hf_multimax.compare.runner import RunSpec, _record

    spec = RunSpec("sdpa", 0, argparse.Namespace(output_dir="out"))
    result = {"train_loss": 1.0, "metrics": {"eval_loss": 1.0}, "losses": [(1, 1.0)], "loss_period": 7}
    assert _record(spec, result, 1.0, None)["loss_period"] == 7
    assert "loss_period" not in _record(spec, {k: v for k, v in result.items() if k != "loss_period"}, 1.0, None)
