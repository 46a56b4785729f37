"""Measuring candidates fairly on a shared, noisy machine.

A candidate is a dict of ``config_context`` overrides.  Before it is timed its output is
checked against a float64 reference; a wrong answer disqualifies it whatever its speed.
Candidates are raced: rounds visit them in a fresh random order (so a burst of load from
another process hits every candidate alike, not one), a candidate clearly behind the
leader after two rounds stops being measured, and the top few get extra rounds before the
winner is named.

A candidate's score is the upper quartile of its samples, not their median.  Load from
other processes only ever slows a GEMM down, so the fast end of the distribution is the
machine's own; on this 2-core machine shared with other jobs, more than half the samples
of a candidate are often slowed, and then the median measures the neighbours.  The
quartile rather than the maximum, so that no single sample decides.
"""
import math
import random
import time

import numpy as np

import microtile


class Problem:
    """One GEMM shape with fixed random operands, its float64 reference and error bound."""

    def __init__(self, m, n, k, dtype, seed=0):
        rng = np.random.default_rng(seed)
        self.m, self.n, self.k = m, n, k
        self.dtype = np.dtype(dtype)
        self.a = rng.uniform(-1, 1, (m, k)).astype(self.dtype)
        self.b = rng.uniform(-1, 1, (k, n)).astype(self.dtype)
        self.out = np.empty((m, n), self.dtype)
        a64 = self.a.astype(np.float64)
        b64 = self.b.astype(np.float64)
        self.ref = a64 @ b64
        # Componentwise bound of a k-term dot product's rounding error: k * u * (|A| |B|);
        # twice that, plus the rounding of the result itself.
        eps = float(np.finfo(self.dtype).eps)
        self.bound = (k + 2) * eps * (np.abs(a64) @ np.abs(b64)) + np.finfo(self.dtype).tiny
        self.flops = 2.0 * m * n * k

    def __repr__(self):
        return f"{self.m}x{self.n}x{self.k} {self.dtype.name}"

    def run(self):
        microtile.gemm(self.a, self.b, out=self.out)

    def error(self):
        """Largest error of the last result as a multiple of its bound (<= 1 is correct)."""
        if not np.isfinite(self.out).all():
            return math.inf
        return float(np.max(np.abs(self.out - self.ref) / self.bound))


def upper_quartile(samples):
    """75th percentile of a list of samples, 0.0 for an empty one."""
    return float(np.percentile(samples, 75)) if len(samples) else 0.0


def timed(fn, min_seconds):
    """Seconds per call of ``fn``: calls it in a batch lasting at least ``min_seconds``."""
    calls = 0
    t0 = time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return elapsed / calls


def check(problem, overrides):
    """Run once under ``overrides`` (the warm-up call) and return the error ratio."""
    problem.out.fill(np.nan)
    with microtile.config_context(dtype=problem.dtype.name, **overrides):
        problem.run()
    return problem.error()


def gflops(problem, overrides, min_seconds=0.0):
    """One sample: GFLOP/s of ``problem`` under ``overrides``."""
    with microtile.config_context(dtype=problem.dtype.name, **overrides):
        sec = timed(problem.run, min_seconds)
    return problem.flops / sec / 1e9


def objective(parts, min_seconds=0.0):
    """``(sample, check)`` for a race whose score is the geometric mean over ``parts``, a
    list of ``(problem, overrides)`` pairs (the candidate's overrides are added to each):
    for example one GEMM on one thread and on all, so that a blocking which suits only a
    lone thread (blocks that crowd each other out of a shared cache) or only the team
    cannot win."""
    def sample(c):
        logs = [math.log(gflops(p, {**b, **c}, min_seconds)) for p, b in parts]
        return math.exp(sum(logs) / len(logs))

    def check_all(c):
        return max(check(p, {**b, **c}) for p, b in parts)

    return sample, check_all


def key(candidate):
    """A hashable name for a candidate dict."""
    return tuple(sorted(candidate.items()))


class RaceResult:
    """Samples and verdicts of one race."""

    def __init__(self, candidates, anchor=None):
        self.candidates = list(candidates)
        self.samples = {key(c): [] for c in self.candidates}
        # Anchored races: each sample of a candidate over the anchor's beside it.
        self.anchor = anchor
        self.ratios = {key(c): [] for c in self.candidates}
        self.error = {}
        self.dropped = set()

    def score(self, cand):
        """GFLOP/s: the upper quartile of the candidate's samples; in an anchored race the
        anchor's upper quartile times the candidate's median ratio to the anchor (0 when
        the candidate has no samples)."""
        if self.anchor is None or key(cand) == key(self.anchor):
            return upper_quartile(self.samples[key(cand)])
        r = self.ratios[key(cand)]
        return upper_quartile(self.samples[key(self.anchor)]) * float(np.median(r)) if r else 0.0

    def valid(self):
        return [c for c in self.candidates if self.error.get(key(c), math.inf) <= 1.0]

    def ranking(self):
        return sorted(self.valid(), key=self.score, reverse=True)

    @property
    def winner(self):
        ranked = self.ranking()
        return ranked[0] if ranked else None

    def summary(self):
        return [{"candidate": dict(c), "score": round(self.score(c), 3),
                 "median": round(float(np.median(self.samples[key(c)])), 3)
                 if self.samples[key(c)] else 0.0,
                 "samples": len(self.samples[key(c)]),
                 **({"ratio": round(float(np.median(self.ratios[key(c)])), 4)}
                    if self.anchor is not None and self.ratios[key(c)] else {}),
                 "error_ratio": round(self.error.get(key(c), math.inf), 4),
                 "dropped": key(c) in self.dropped} for c in self.candidates]


def race(candidates, sample, check_fn, *, rounds=4, top=3, extra_rounds=2, prune=0.85,
         deadline=None, seed=0, on_round=None, anchor=None):
    """Race candidate dicts.

    ``check_fn(c)`` returns the error ratio of c's output (the first, warm-up call);
    ``sample(c)`` returns one GFLOP/s sample.  At least two rounds are always run; later
    rounds stop at ``deadline`` (a ``time.perf_counter`` value).  ``anchor``, one of the
    candidates, makes the race anchored (see the module's docstring) if it computes
    correctly.
    """
    rng = random.Random(seed)
    res = RaceResult(candidates, anchor)
    for c in res.candidates:
        res.error[key(c)] = check_fn(c)
    alive = res.valid()
    if anchor is not None and anchor not in alive:
        anchor = res.anchor = None      # a wrong anchor cannot be timed: race unanchored

    def one_round(group):
        order = [c for c in group if anchor is None or c != anchor]
        rng.shuffle(order)
        if anchor is None:
            for c in order:
                res.samples[key(c)].append(sample(c))
            return
        before = sample(anchor)
        res.samples[key(anchor)].append(before)
        for c in order:
            s = sample(c)
            after = sample(anchor)
            res.samples[key(anchor)].append(after)
            res.samples[key(c)].append(s)
            res.ratios[key(c)].append(2.0 * s / (before + after))
            before = after

    for r in range(rounds):
        if r >= 2 and deadline is not None and time.perf_counter() > deadline:
            break
        one_round(alive)
        if r >= 1 and len(alive) > 1:
            lead = max(res.score(c) for c in alive)
            slow = [c for c in alive if c != anchor and _best(res, c) < prune * lead]
            res.dropped.update(key(c) for c in slow)
            alive = [c for c in alive if c not in slow]
        if on_round is not None:
            on_round(r, res)
    finalists = sorted(alive, key=res.score, reverse=True)[:top]
    if anchor is not None and anchor not in finalists:
        finalists.append(anchor)
    if len(finalists) > 1:
        for _ in range(extra_rounds):
            if deadline is not None and time.perf_counter() > deadline:
                break
            one_round(finalists)
    return res


def _best(res, c):
    """The most a candidate has shown: its fastest sample, or in an anchored race the
    anchor's upper quartile times its best ratio."""
    if res.anchor is None or key(c) == key(res.anchor):
        return max(res.samples[key(c)])
    return upper_quartile(res.samples[key(res.anchor)]) * max(res.ratios[key(c)])
