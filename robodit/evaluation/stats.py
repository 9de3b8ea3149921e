"""Success statistics: Wilson score intervals and CALVIN-style chain metrics.

Why Wilson and not p ± 1.96·sqrt(p(1-p)/n): with the 10–50 episodes a benchmark can afford, the normal
interval collapses to zero width at 0% and 100% and leaves [0, 1] near them; Wilson's stays honest there
(10/10 successes → [72%, 100%], not [100%, 100%]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when there are no trials."""
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # exact endpoints at the boundaries (floating point leaves ±1e-17 otherwise)
    lo = 0.0 if successes == 0 else max(0.0, center - half)
    hi = 1.0 if successes == n else min(1.0, center + half)
    return lo, hi


def rate_summary(outcomes: Sequence[bool]) -> dict:
    """{"episodes", "successes", "success_rate", "ci95": [lo, hi]} for a list of per-episode outcomes.

    No outcomes -> success_rate None (not 0.0: a task nobody attempted, or whose episodes all errored, has no
    rate, and a 0 would read as a measured failure and pull means down)."""
    n, k = len(outcomes), int(sum(bool(o) for o in outcomes))
    lo, hi = wilson_interval(k, n)
    return {"episodes": n, "successes": k, "success_rate": k / n if n else None, "ci95": [lo, hi]}


def mean_rate(per_task: dict[str, dict]) -> float | None:
    """Mean over tasks of success_rate, skipping tasks without a rate; None when no task has one."""
    rates = [r["success_rate"] for r in per_task.values() if r.get("success_rate") is not None]
    return sum(rates) / len(rates) if rates else None


def completed_in_row(successes: Sequence[bool]) -> int:
    """Subtasks completed before the first failure (a chain stops there)."""
    count = 0
    for s in successes:
        if not s:
            break
        count += 1
    return count


def chain_metrics(per_chain: Sequence[Sequence[bool]], length: int) -> dict:
    """CALVIN's numbers: success rate at chain lengths 1..length (chains whose first k subtasks all succeeded),
    each with a Wilson interval, and the average number of subtasks completed in a row."""
    done = [completed_in_row(s) for s in per_chain]
    n = len(done)
    at = {}
    for k in range(1, length + 1):
        hits = sum(d >= k for d in done)
        at[str(k)] = {"successes": hits, "success_rate": hits / n if n else None, "ci95": list(wilson_interval(hits, n))}
    return {"chains": n, "success_at_length": at, "avg_completed": sum(done) / n if n else None,
            "avg_completed_ci95": bootstrap_mean_interval(done) if n else None, "completed_per_chain": done}


START = "(start)"


def transition_failures(chains: Sequence[tuple[Sequence[str], Sequence[bool]]]) -> dict[str, dict[str, dict]]:
    """Where chains break: {previous subtask ("(start)" for the first): {subtask: {attempts, failures}}} over the
    subtasks each chain attempted (it stops at its first failure, so a failure is always its last attempt)."""
    out: dict[str, dict[str, dict]] = {}
    for tasks, successes in chains:
        for k, ok in enumerate(successes):
            cell = out.setdefault(tasks[k - 1] if k else START, {}).setdefault(tasks[k], {"attempts": 0, "failures": 0})
            cell["attempts"] += 1
            cell["failures"] += int(not ok)
    return out


def bootstrap_mean_interval(values: Sequence[float], resamples: int = 10_000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of mean(values), resampling the units (chains): the average completed
    length is a mean of 0..5 counts, not a rate, so it gets no Wilson interval."""
    import numpy as np

    x = np.asarray(values, np.float64)
    if not len(x):
        raise ValueError("bootstrap needs a non-empty sample")
    means = _resampled_means(x, np.random.default_rng(seed), resamples)
    return [float(v) for v in np.percentile(means, [2.5, 97.5])]


def _resampled_means(x, rng, resamples: int):
    """Means of `resamples` bootstrap resamples of the units of `x` (drawn with replacement), [resamples]."""
    return x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(1)


def bootstrap_mean_difference(a: Sequence[float], b: Sequence[float], paired: bool, resamples: int = 10_000,
                              seed: int = 0) -> dict:
    """mean(b) - mean(a) with a 95% percentile bootstrap interval: over shared units resampled jointly when
    `paired` (the same chains: their difficulty cancels), else over each side independently."""
    import numpy as np

    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not len(x) or not len(y) or (paired and len(x) != len(y)):
        raise ValueError(f"bootstrap needs non-empty samples (paired: equal lengths), got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    if paired:
        idx = rng.integers(0, len(x), size=(resamples, len(x)))
        diffs = y[idx].mean(1) - x[idx].mean(1)
    else:
        diffs = _resampled_means(y, rng, resamples) - _resampled_means(x, rng, resamples)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"difference": float(y.mean() - x.mean()), "ci95": [float(lo), float(hi)], "paired": bool(paired),
            "units": [len(x), len(y)], "resamples": int(resamples)}
