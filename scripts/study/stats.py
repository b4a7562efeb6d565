"""Statistics over seeds (scipy.stats): paired tests and bootstrap intervals."""

from __future__ import annotations

import math
import statistics

import numpy as np
from scipy import stats


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3g} ± {sd:.2g}"


def paired_test(a: list[float], b: list[float], *, confidence: float = 0.95) -> dict:
    """Paired over seeds: mean difference ``a - b`` with a bootstrap ``confidence`` interval
    (percentile, 10 000 resamples, fixed seed), the two-sided paired t-test (``ttest_rel``) and
    the exact sign-flip permutation test (``permutation_test``; distribution-free, with n pairs
    its smallest p-value is 2 / 2**n). Wins: pairs with ``a > b``."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(diff)
    out = {"n": n, "mean_diff": float(diff.mean()) if n else math.nan,
           "ci_low": math.nan, "ci_high": math.nan, "t": math.nan, "p_t": math.nan,
           "p_permutation": math.nan, "wins": int((diff > 0).sum())}  # fmt: skip
    if n < 2:
        return out
    if np.all(diff == diff[0]):  # no spread: every test is degenerate
        same = diff[0] == 0
        out.update(ci_low=float(diff[0]), ci_high=float(diff[0]), p_t=1.0 if same else 0.0,
                   t=0.0 if same else math.copysign(math.inf, diff[0]),
                   p_permutation=1.0 if same else 2 / 2**n)  # fmt: skip
        return out
    t = stats.ttest_rel(a, b)
    perm = stats.permutation_test((diff,), np.mean, permutation_type="samples",
                                  n_resamples=10_000, alternative="two-sided")  # fmt: skip
    boot = stats.bootstrap((diff,), np.mean, confidence_level=confidence, n_resamples=10_000,
                           method="percentile", rng=np.random.default_rng(0))  # fmt: skip
    out.update(t=float(t.statistic), p_t=float(t.pvalue), p_permutation=float(perm.pvalue),
               ci_low=float(boot.confidence_interval.low),
               ci_high=float(boot.confidence_interval.high))  # fmt: skip
    return out
