"""Statistics over seeds for ``hf-multimax compare``: is one attention implementation better than another?

Every implementation is trained once per seed. For each number a run reports (``train_loss``, ``time_per_step`` and
each evaluation metric) this module gives

* :func:`summarize`: the mean over seeds, the sample standard deviation ``s = sqrt(Σ(v - mean)² / (n - 1))`` and the
  two-sided 95% Student-t interval of the mean, ``mean ± t_{0.975, n-1} · s / sqrt(n)``;
* :func:`paired_difference`: the per-seed difference ``d = candidate - baseline`` (same seed, so same data order and
  initialisation), its mean, the 95% t interval of that mean and the two-sided paired t-test p-value
  (``scipy.stats.ttest_rel``: ``t = mean(d) / (s_d / sqrt(n))`` on ``n - 1`` degrees of freedom);
* :func:`build_summary`: both, for every implementation and number of a list of run records;
* :func:`format_mean_ci` and :func:`significant` to report them.

Conventions (chosen so nothing is invented where the data cannot tell):

* NaN (or ``None``) is a failed or missing run: it is left out, and ``summarize`` counts it under ``"failed"`` (a key
  present only when there is at least one). ``paired_difference`` drops every pair in which either side is NaN.
* With one value the spread is unknown: ``std`` is NaN and the interval is ``[nan, nan]`` (not ``[mean, mean]``,
  which would claim certainty). The same holds for one pair in ``paired_difference`` (and ``p_value`` is NaN); with
  none, every number is NaN and ``n`` is 0.
* Differences that are all equal have zero variance, where ``ttest_rel`` divides by zero: if they are all 0 the
  result is ``p_value = 1.0`` with interval ``[0, 0]`` (no difference on any seed); otherwise ``p_value = 0.0`` with
  interval ``[d, d]`` (the limit of the t-test as the spread goes to 0: every seed moved by exactly ``d``). The test
  for "all equal" allows a relative spread of 1e-12, so a shift that float rounding made unequal in the last bits
  still counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "CONFIDENCE",
    "summarize",
    "paired_difference",
    "build_summary",
    "format_mean_ci",
    "format_aligned",
    "significant",
]

#: Confidence level of every interval here.
CONFIDENCE = 0.95
#: Numbers every run record carries at its top level (the others are under ``"metrics"``).
RUN_NUMBERS = ("train_loss", "time_per_step")
#: Relative spread below which a set of paired differences counts as all equal.
_EQUAL_RTOL = 1e-12

_NAN = float("nan")


def _as_float(value: Any) -> float:
    return _NAN if value is None else float(value)


def _t_half_width(std: float, n: int) -> float:
    """Half-width ``t_{(1+CONFIDENCE)/2, n-1} · std / sqrt(n)`` of the t interval of a mean of ``n`` values."""
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample std (ddof=1) and 95% t interval of the non-NaN ``values``.

    Returns ``{"mean", "std", "ci95": [low, high], "n"}`` (``n``: values used), plus ``"failed"`` (NaN or ``None``
    values left out) when there are any. One value: ``std`` NaN, ``ci95`` ``[nan, nan]``; none: everything NaN.
    """
    raw = np.array([_as_float(v) for v in values], dtype=float)
    failed = int(np.isnan(raw).sum())
    kept = raw[~np.isnan(raw)]
    n = int(kept.size)
    mean = float(kept.mean()) if n else _NAN
    if n >= 2:
        std = float(kept.std(ddof=1))
        half = _t_half_width(std, n)
        ci = [mean - half, mean + half]
    else:
        std = _NAN
        ci = [_NAN, _NAN]
    out: dict[str, Any] = {"mean": mean, "std": std, "ci95": ci, "n": n}
    if failed:
        out["failed"] = failed
    return out


def paired_difference(candidate: Sequence[float | None], baseline: Sequence[float | None]) -> dict[str, Any]:
    """Mean of ``d = candidate[i] - baseline[i]`` over the pairs where neither is NaN, with its 95% t interval and
    the two-sided paired t-test p-value (``scipy.stats.ttest_rel``).

    Returns ``{"mean_difference", "ci95": [low, high], "p_value", "n"}`` (``n``: pairs used). Fewer than two pairs:
    interval and p-value NaN. Zero variance: p-value 1.0 if every difference is 0, else 0.0, interval ``[d, d]``.

    Raises:
        ValueError: when the two sequences differ in length (they must be aligned by seed).
    """
    if len(candidate) != len(baseline):
        raise ValueError(
            f"candidate and baseline must be aligned by seed, got {len(candidate)} and {len(baseline)} values"
        )
    c = np.array([_as_float(v) for v in candidate], dtype=float)
    b = np.array([_as_float(v) for v in baseline], dtype=float)
    both = ~(np.isnan(c) | np.isnan(b))
    c, b = c[both], b[both]
    d = c - b
    n = int(d.size)
    if n == 0:
        return {"mean_difference": _NAN, "ci95": [_NAN, _NAN], "p_value": _NAN, "n": 0}
    mean = float(d.mean())
    if n == 1:
        return {"mean_difference": mean, "ci95": [_NAN, _NAN], "p_value": _NAN, "n": 1}
    scale = float(np.abs(d).max())
    if float(np.abs(d - d[0]).max()) <= _EQUAL_RTOL * scale:  # all equal (scale 0: all zero)
        if scale == 0.0:
            return {"mean_difference": 0.0, "ci95": [0.0, 0.0], "p_value": 1.0, "n": n}
        return {"mean_difference": mean, "ci95": [mean, mean], "p_value": 0.0, "n": n}
    half = _t_half_width(float(d.std(ddof=1)), n)
    p_value = float(stats.ttest_rel(c, b).pvalue)
    return {"mean_difference": mean, "ci95": [mean - half, mean + half], "p_value": p_value, "n": n}


def _run_value(run: Mapping[str, Any], name: str) -> float:
    """The number ``name`` of one run record: NaN when the run failed (has ``"error"``) or lacks it."""
    if run.get("error"):
        return _NAN
    value = run.get(name) if name in RUN_NUMBERS else (run.get("metrics") or {}).get(name)
    return _as_float(value)


def build_summary(runs: list[dict[str, Any]], baseline: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-implementation statistics of a list of run records, and each implementation against ``baseline``.

    ``runs``: ``{"implementation", "seed", "train_loss", "metrics": {name: value}, "time_per_step"}`` per run; a
    failed run carries ``"error"`` and counts as NaN for every number, even those it has. Returns
    ``(summary, versus_baseline)``: ``summary[impl][name] = summarize(values over seeds)`` for ``train_loss``,
    ``time_per_step`` and every metric name found in any run, and ``versus_baseline[impl][name] =
    paired_difference(impl, baseline)`` for every other implementation, runs paired by seed (a seed that only one
    side ran, or that failed on either side, is dropped). Implementations and metric names keep their first-seen
    order.

    Raises:
        ValueError: when ``baseline`` has no run, or an implementation has two runs with the same seed.
    """
    by_impl: dict[str, dict[Any, Mapping[str, Any]]] = {}
    names: dict[str, None] = dict.fromkeys(RUN_NUMBERS)
    for run in runs:
        impl, seed = run["implementation"], run["seed"]
        seeds = by_impl.setdefault(impl, {})
        if seed in seeds:
            raise ValueError(f"implementation {impl!r} has two runs with seed {seed!r}: cannot pair by seed")
        seeds[seed] = run
        names.update(dict.fromkeys(run.get("metrics") or {}))
    if baseline not in by_impl:
        raise ValueError(f"baseline {baseline!r} has no run (implementations: {sorted(by_impl)})")

    def values(impl: str, seeds: Sequence[Any], name: str) -> list[float]:
        runs_of = by_impl[impl]
        return [_run_value(runs_of[s], name) if s in runs_of else _NAN for s in seeds]

    summary = {
        impl: {name: summarize(values(impl, list(seeds), name)) for name in names} for impl, seeds in by_impl.items()
    }
    versus: dict[str, Any] = {}
    for impl, seeds in by_impl.items():
        if impl == baseline:
            continue
        shared = [s for s in seeds if s in by_impl[baseline]]
        versus[impl] = {
            name: paired_difference(values(impl, shared, name), values(baseline, shared, name)) for name in names
        }
    return summary, versus


def _center(stats_: Mapping[str, Any]) -> float:
    return _as_float(stats_["mean"] if "mean" in stats_ else stats_["mean_difference"])


def format_mean_ci(stats_: Mapping[str, Any], digits: int = 3) -> str:
    """``"mean ± h"`` with ``h`` the half-width of the 95% interval, each to ``digits`` significant digits; works on
    :func:`summarize` and :func:`paired_difference` results. ``"mean ± n/a"`` when the interval is undefined (one
    value), ``"n/a"`` when the mean is (no value)."""
    center = _center(stats_)
    if math.isnan(center):
        return "n/a"
    low, high = (_as_float(v) for v in stats_["ci95"])
    if math.isnan(low) or math.isnan(high):
        return f"{center:.{digits}g} ± n/a"
    return f"{center:.{digits}g} ± {(high - low) / 2:.{digits}g}"


def format_aligned(stats_: Mapping[str, Any], digits: int = 2) -> str:
    """``"mean ± h"`` for tables: ``h`` (the 95% half-width) to ``digits`` significant digits and the mean rounded to
    the same decimal place (``56.66 ± 0.41``, ``0.978 ± 0.012``); a mean alone (4 significant digits) when the
    interval is undefined (one value) and ``"n/a"`` when the mean is (no value). Works on :func:`summarize` and
    :func:`paired_difference` results."""
    center = _center(stats_)
    if math.isnan(center):
        return "n/a"
    low, high = (_as_float(v) for v in stats_["ci95"])
    half = (high - low) / 2
    if math.isnan(half):
        return f"{center:.4g}"
    if half == 0:
        return f"{center:.4g} ± 0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(half))))
    mean = f"{center:.{decimals}f}"
    if float(mean) == 0:
        mean = mean.lstrip("-")  # no "-0.000"
    return f"{mean} ± {half:.{decimals}f}"


def significant(diff: Mapping[str, Any]) -> bool:
    """Whether the 95% interval of a :func:`paired_difference` excludes 0 (False when it is undefined)."""
    low, high = (_as_float(v) for v in diff["ci95"])
    return bool(low > 0 or high < 0)
