"""compare_stats against values worked out by hand (t quantiles from tables or closed forms, not from scipy)."""

import math
import warnings

import pytest

from hf_multimax.compare.statistics import build_summary, format_mean_ci, paired_difference, significant, summarize

NAN = float("nan")

# Two-sided 95% Student-t quantiles t_{0.975, df}. df = 1 and df = 2 have closed forms:
#   df = 1 (Cauchy): t = tan(π·0.475);   df = 2: P(|T| > t) = 1 - t/sqrt(t² + 2) = 0.05  =>  t² = 2·0.95²/(1 - 0.95²).
T_DF1 = math.tan(math.pi * 0.475)  # 12.7062047...
T_DF2 = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))  # 4.3026527...
T_DF3 = 3.182446305284263  # table
T_DF4 = 2.7764451051977987  # table


def test_closed_form_quantiles_match_the_tables():
    assert T_DF1 == pytest.approx(12.706204736174703)
    assert T_DF2 == pytest.approx(4.302652729911275)


def test_summarize_one_to_five():
    # mean = 15/5 = 3; Σ(v-3)² = 4+1+0+1+4 = 10, s² = 10/4 = 2.5; half-width = t_{.975,4}·sqrt(2.5)/sqrt(5).
    s = summarize([1, 2, 3, 4, 5])
    half = T_DF4 * math.sqrt(2.5) / math.sqrt(5)  # = 2.7764·0.7071 = 1.96324
    assert s["mean"] == pytest.approx(3.0)
    assert s["std"] == pytest.approx(math.sqrt(2.5))
    assert s["ci95"] == pytest.approx([3 - half, 3 + half])
    assert s["ci95"][0] == pytest.approx(1.0367568, abs=1e-6)
    assert s["n"] == 5
    assert "failed" not in s


def test_summarize_leaves_out_and_counts_failed_values():
    # [1, nan, 3, None]: kept [1, 3]: mean 2, s = sqrt(((1-2)² + (3-2)²)/1) = sqrt(2);
    # half = t_{.975,1}·sqrt(2)/sqrt(2) = t_{.975,1}.
    s = summarize([1.0, NAN, 3.0, None])
    assert s["mean"] == pytest.approx(2.0)
    assert s["std"] == pytest.approx(math.sqrt(2))
    assert s["ci95"] == pytest.approx([2 - T_DF1, 2 + T_DF1])
    assert (s["n"], s["failed"]) == (2, 2)


def test_summarize_one_value_has_no_spread():
    s = summarize([4.2])
    assert s["mean"] == 4.2 and s["n"] == 1
    assert math.isnan(s["std"])
    assert all(math.isnan(v) for v in s["ci95"])


@pytest.mark.parametrize("values, failed", [([], 0), ([NAN, NAN], 2)])
def test_summarize_nothing_usable(values, failed):
    s = summarize(values)
    assert s["n"] == 0 and s.get("failed", 0) == failed
    assert math.isnan(s["mean"]) and math.isnan(s["std"]) and all(math.isnan(v) for v in s["ci95"])


def test_summarize_zero_variance():
    s = summarize([2.0, 2.0, 2.0])
    assert s["std"] == 0.0
    assert s["ci95"] == [2.0, 2.0]


# Paired example: candidate (2, 4, 9), baseline (1, 2, 6): d = (1, 2, 3), mean 2, s_d = 1, se = 1/sqrt(3),
# t = 2·sqrt(3) = 3.4641 on 2 df; two-sided p = 1 - t/sqrt(t² + 2) = 1 - 3.4641/sqrt(14) = 0.0741799.
PAIRED_T = 2 * math.sqrt(3)
PAIRED_P = 1 - PAIRED_T / math.sqrt(PAIRED_T**2 + 2)
PAIRED_HALF = T_DF2 / math.sqrt(3)  # 2.48414


def test_paired_difference_by_hand():
    d = paired_difference([2, 4, 9], [1, 2, 6])
    assert PAIRED_P == pytest.approx(0.0741799, abs=1e-7)
    assert d["mean_difference"] == pytest.approx(2.0)
    assert d["p_value"] == pytest.approx(PAIRED_P)
    assert d["ci95"] == pytest.approx([2 - PAIRED_HALF, 2 + PAIRED_HALF])
    assert d["n"] == 3
    flipped = paired_difference([1, 2, 6], [2, 4, 9])
    assert flipped["mean_difference"] == pytest.approx(-2.0)
    assert flipped["p_value"] == pytest.approx(PAIRED_P)
    assert flipped["ci95"] == pytest.approx([-2 - PAIRED_HALF, -2 + PAIRED_HALF])


def test_paired_difference_drops_pairs_with_a_nan_on_either_side():
    d = paired_difference([2, NAN, 4, 9, 7.0], [1, 5, 2, 6, None])
    assert d["n"] == 3
    assert d["mean_difference"] == pytest.approx(2.0)
    assert d["p_value"] == pytest.approx(PAIRED_P)


def test_paired_difference_zero_variance_is_defined_and_quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy would warn (and divide by zero) here
        same = paired_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
        shifted = paired_difference([1.1, 2.1, 3.1], [1.0, 2.0, 3.0])  # d = 0.1 up to float rounding
        down = paired_difference([0.0, 1.0], [0.5, 1.5])
    assert (same["mean_difference"], same["ci95"], same["p_value"]) == (0.0, [0.0, 0.0], 1.0)
    assert shifted["mean_difference"] == pytest.approx(0.1)
    assert shifted["ci95"] == pytest.approx([0.1, 0.1])
    assert shifted["p_value"] == 0.0
    assert down["mean_difference"] == -0.5 and down["p_value"] == 0.0
    assert significant(shifted) and significant(down) and not significant(same)


@pytest.mark.parametrize("candidate, baseline, n", [([3.0], [1.0], 1), ([NAN, 2.0], [1.0, NAN], 0), ([], [], 0)])
def test_paired_difference_too_few_pairs(candidate, baseline, n):
    d = paired_difference(candidate, baseline)
    assert d["n"] == n
    assert math.isnan(d["p_value"]) and all(math.isnan(v) for v in d["ci95"])
    assert (d["mean_difference"] == 2.0) if n == 1 else math.isnan(d["mean_difference"])
    assert not significant(d)


def test_paired_difference_needs_aligned_sequences():
    with pytest.raises(ValueError, match="aligned by seed"):
        paired_difference([1.0, 2.0], [1.0])


def test_significant_with_spread():
    # d = (1, 1.1, 0.9, 1.0): mean 1, s_d² = (0 + .01 + .01 + 0)/3, half = t_{.975,3}·s_d/2 = 3.1824·0.08165/2 = 0.1299.
    d = paired_difference([2.0, 2.1, 1.9, 2.0], [1.0, 1.0, 1.0, 1.0])
    half = T_DF3 * math.sqrt(0.02 / 3) / 2
    assert d["ci95"] == pytest.approx([1 - half, 1 + half])
    assert significant(d)
    assert not significant(paired_difference([2, 4, 9], [1, 2, 6]))  # 2 ± 2.484 contains 0


def _run(impl, seed, loss, time, metrics=None, error=None):
    run = {"implementation": impl, "seed": seed, "train_loss": loss, "time_per_step": time, "metrics": metrics or {}}
    if error:
        run["error"] = error
    return run


def _runs():
    # sdpa (baseline) by seed: loss {0: 1, 1: 2, 2: 6}; multimax listed in seed order 2, 0, 1 with loss
    # {0: 2, 1: 4, 2: 9}, so by seed d = (1, 2, 3) (the paired example), while pairing by list position would give
    # (9-1, 2-2, 4-6) = (8, 0, -2): same mean, but s_d = sqrt(28) and p ≈ 0.6.
    return [
        _run("sdpa", 0, 1.0, 0.10, {"accuracy": 0.50}),
        _run("sdpa", 1, 2.0, 0.10, {"accuracy": 0.60}),
        _run("sdpa", 2, 6.0, 0.10, {"accuracy": 0.70}),
        _run("multimax", 2, 9.0, 0.25, {"accuracy": 0.72, "bleu": 30.0}),
        _run("multimax", 0, 2.0, 0.15, {"accuracy": 0.52, "bleu": 10.0}),
        _run("multimax", 1, 4.0, 0.20, {"accuracy": 0.62, "bleu": 20.0}),
        _run("multimax", 3, 5.0, 0.20, {"accuracy": 0.90, "bleu": 40.0}),  # baseline lacks seed 3: unpaired
        _run("entmax", 0, 1.5, 0.30, {"accuracy": 0.55}),
        {"implementation": "entmax", "seed": 1, "train_loss": 99.0, "error": "CUDA out of memory"},  # failed
        _run("entmax", 2, 6.5, 0.30, {"accuracy": 0.75}),
    ]


def test_build_summary_pairs_by_seed():
    summary, versus = build_summary(_runs(), baseline="sdpa")
    assert list(summary) == ["sdpa", "multimax", "entmax"]
    assert list(summary["sdpa"]) == ["train_loss", "time_per_step", "accuracy", "bleu"]
    assert set(versus) == {"multimax", "entmax"}

    loss = versus["multimax"]["train_loss"]
    assert loss["n"] == 3  # seed 3 has no baseline partner
    assert loss["mean_difference"] == pytest.approx(2.0)
    assert loss["p_value"] == pytest.approx(PAIRED_P)
    # accuracy: d = (0.02, 0.02, 0.02) on seeds 0, 1, 2 -> zero variance, a certain +0.02
    acc = versus["multimax"]["accuracy"]
    assert acc["mean_difference"] == pytest.approx(0.02) and acc["p_value"] == 0.0
    # time: d = (0.05, 0.10, 0.15): mean 0.1, s_d = 0.05, half = t_{.975,2}·0.05/sqrt(3)
    t = versus["multimax"]["time_per_step"]
    assert t["ci95"] == pytest.approx([0.1 - T_DF2 * 0.05 / math.sqrt(3), 0.1 + T_DF2 * 0.05 / math.sqrt(3)])

    # multimax alone has all four seeds: loss (2, 4, 9, 5) -> mean 5
    assert summary["multimax"]["train_loss"]["n"] == 4
    assert summary["multimax"]["train_loss"]["mean"] == pytest.approx(5.0)


def test_build_summary_failed_runs_and_missing_metrics():
    summary, versus = build_summary(_runs(), baseline="sdpa")
    # entmax seed 1 failed: its train_loss of 99 is not used, it counts as failed everywhere
    loss = summary["entmax"]["train_loss"]
    assert (loss["n"], loss["failed"]) == (2, 1)
    assert loss["mean"] == pytest.approx(4.0)  # (1.5 + 6.5)/2
    assert summary["entmax"]["accuracy"]["failed"] == 1
    # entmax vs sdpa pairs only seeds 0 and 2: loss d = (0.5, 0.5), zero variance
    assert versus["entmax"]["train_loss"]["n"] == 2
    assert versus["entmax"]["train_loss"]["mean_difference"] == pytest.approx(0.5)
    # bleu only exists for multimax: the others report it as missing, and there is nothing to pair
    assert summary["sdpa"]["bleu"]["n"] == 0 and summary["sdpa"]["bleu"]["failed"] == 3
    assert versus["multimax"]["bleu"]["n"] == 0 and math.isnan(versus["multimax"]["bleu"]["mean_difference"])


def test_build_summary_rejects_ambiguous_input():
    with pytest.raises(ValueError, match="baseline 'eager' has no run"):
        build_summary(_runs(), baseline="eager")
    with pytest.raises(ValueError, match="two runs with seed 0"):
        build_summary(_runs() + [_run("sdpa", 0, 1.0, 0.1)], baseline="sdpa")


def test_format_mean_ci():
    assert format_mean_ci(summarize([1, 2, 3, 4, 5])) == "3 ± 1.96"
    assert format_mean_ci(summarize([1, 2, 3, 4, 5]), digits=5) == "3 ± 1.9632"
    assert format_mean_ci(paired_difference([2, 4, 9], [1, 2, 6])) == "2 ± 2.48"
    assert format_mean_ci(summarize([4.2])) == "4.2 ± n/a"
    assert format_mean_ci(summarize([])) == "n/a"
