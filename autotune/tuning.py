"""What every search step shares: the ``Tuning`` state of one dtype's search (kernel shape,
threads, settings, clock, progress, evidence), the margins a challenger must beat the
incumbent by, and the measurement primitives built on ``measure``: the interleaved size
``sweep`` and its noise check, ``best_cut`` (where along a sweep one option starts to win),
the load check taken before a step, and ``snap`` and ``fmt`` for candidates.

The incumbent (the model's value, or the library's default) keeps its place unless a
challenger beats it by a margin, so noise cannot talk the tuner into a change.
"""
import math
import time

import numpy as np

from autotune import measure

MOVE_MARGIN = 1.01       # a neighbour must beat the centre by 1 % to move the search
KEEP_MARGIN = 1.02       # a challenger must beat the default by 2 % to replace it
SPLIT_MARGIN = 1.04      # ... and the driver's own split choice by 4 % (it adapts per shape)
# Below this parallel efficiency the cores are taken by someone else, and thread-count
# decisions are not made (the defaults stay).
BUSY_EFFICIENCY = 0.7
BUSY_SINGLE = 0.7
# A sweep whose cells spread more than this (interquartile range over the median) was
# measured on a machine too busy to tell a few per cent apart.
NOISY_SPREAD = 0.25

SETTINGS = {
    True: {   # --quick
        "factors": (1.41, 1.19), "max_moves": 2, "rounds": 3, "top": 3, "extra": 2,
        "finalists": 2, "final_rounds": 3, "sweep_rounds": 5,
        "budget": {"blocking": 8.0, "nc": 2.0, "split": 2.0, "threads": 2.0,
                   "nopack": 1.0, "nopack_a": 1.0, "conv": 3.0, "sparse": 3.0},
    },
    False: {  # full run
        "factors": (1.41, 1.19, 1.09), "max_moves": 4, "rounds": 7, "top": 3, "extra": 3,
        "finalists": 4, "final_rounds": 11, "sweep_rounds": 9,
        "budget": {"blocking": 100.0, "nc": 20.0, "split": 15.0, "threads": 12.0,
                   "nopack": 8.0, "nopack_a": 8.0, "conv": 20.0, "sparse": 40.0},
    },
}


class Tuning:
    """What one dtype's search needs: kernel shape, threads, settings, clock, progress."""

    def __init__(self, dtype, mr, nr, threads, *, quick, say=None, hard_deadline=None,
                 seed=0, quiet=None):
        self.dtype = dtype
        self.mr, self.nr = mr, nr
        self.threads = threads
        self.quick = quick
        self.s = SETTINGS[bool(quick)]
        self.say = say or (lambda msg: None)
        self.hard_deadline = hard_deadline
        self.seed = seed
        # quiet(need_parallel) -> (single, parallel): the load figures after waiting a
        # little for the machine to calm down (see ``probes.wait_quiet``); None: assume calm.
        self.quiet = quiet
        # Every tunable a measurement does not set itself: the library's defaults, so the
        # profile loaded when the tuner started cannot leak into what it measures.
        self.pinned = {}
        self.last_spread = 0.0
        self.evidence = {}
        # Whether the blocking objective includes all threads (cleared when other processes
        # hold the cores: a busy team would only add noise).
        self.joint = threads > 1

    def deadline(self, phase):
        d = time.perf_counter() + self.s["budget"][phase]
        return d if self.hard_deadline is None else min(d, self.hard_deadline)

    def out_of_time(self):
        return self.hard_deadline is not None and time.perf_counter() > self.hard_deadline

    def problem(self, m, n, k, seed=None):
        return measure.Problem(m, n, k, self.dtype, seed=self.seed if seed is None else seed)

    def race(self, problem, candidates, deadline, base=None, min_seconds=0.0, **kw):
        """Race overrides dicts on one problem; ``base`` overrides are added to each (a
        list of them: the score is the geometric mean over the list)."""
        bases = base if isinstance(base, list) else [base or {}]
        opts = {"rounds": self.s["rounds"], "top": self.s["top"],
                "extra_rounds": self.s["extra"], "deadline": deadline, "seed": self.seed}
        opts.update(kw)
        sample, check = measure.objective([(problem, {**self.pinned, **b}) for b in bases],
                                          min_seconds)
        return measure.race(candidates, sample, check, **opts)

    def blocking_bases(self, extra=None):
        """The blocking objective's thread settings: one thread, and all of them when the
        cores are free (``self.joint``); their geometric mean is the score."""
        bases = [{"threads": 1, **(extra or {})}]
        if self.joint and self.threads > 1:
            bases.append({"threads": self.threads, "thread_mnk": 0, **(extra or {})})
        return bases


def snap(value, step, lo, hi):
    """``value`` rounded to a multiple of ``step`` within [lo, hi]."""
    v = int(round(value / step)) * step
    return int(min(hi, max(lo, v)))


def fmt(c):
    """A candidate dict as ``name=value`` pairs, for progress lines."""
    return " ".join(f"{k}={v}" for k, v in c.items())


def best_cut(ratios, favour_low):
    """Index i of the best threshold for a per-size speed ratio of option X over option Y.

    ``favour_low``: X is used at sizes 0..i-1 (i = 0: never), and i maximises the summed
    log-ratio over those sizes.  Otherwise X is used at sizes i..end (i = len: never).  A
    sum rather than a first crossing, so one noisy point cannot move the threshold far.
    """
    logs = [math.log(r) for r in ratios]
    n = len(logs)
    if favour_low:
        gains = [sum(logs[:i]) for i in range(n + 1)]
    else:
        gains = [sum(logs[i:]) for i in range(n + 1)]
    return max(range(n + 1), key=lambda i: (round(gains[i], 6), -abs(i - n / 2)))


def sweep(t, problems, configs, base, rounds, min_seconds):
    """Per problem, the GFLOP/s of each config (dict name -> overrides), measured in
    interleaved rounds; every config's output is checked first.

    Samples here are a few milliseconds long, so a time slice lost to another process
    halves one outright; the figure kept is the upper quartile (noise only ever slows a
    GEMM down, yet one lucky sample should not decide either).  ``t.last_spread`` is the
    median over cells of the interquartile range over the median: how noisy it was.
    """
    base = {**t.pinned, **base}
    for p in problems:
        for name, cfg in configs.items():
            err = measure.check(p, {**base, **cfg})
            if err > 1.0:
                raise RuntimeError(f"{t.dtype} {name} on {p}: wrong result "
                                   f"(error {err:.3g} x the bound)")
    samples = {(i, name): [] for i in range(len(problems)) for name in configs}
    rng = np.random.default_rng(t.seed)
    for _ in range(rounds):
        for i in rng.permutation(len(problems)):
            names = list(configs)
            rng.shuffle(names)
            for name in names:
                samples[(int(i), name)].append(
                    measure.gflops(problems[int(i)], {**base, **configs[name]}, min_seconds))
    spreads = []
    for v in samples.values():
        q1, q2, q3 = np.percentile(v, [25, 50, 75])
        spreads.append((q3 - q1) / q2 if q2 > 0 else math.inf)
    t.last_spread = float(np.median(spreads))
    return [{name: float(np.percentile(samples[(i, name)], 75)) for name in configs}
            for i in range(len(problems))]


def too_noisy(t, step):
    """Whether the last sweep's samples spread more than NOISY_SPREAD (then the step keeps
    its default: this says so and records it in ``t.evidence``)."""
    if t.last_spread <= NOISY_SPREAD:
        return False
    t.say(f"{t.dtype} {step}: samples spread {t.last_spread:.0%} (other processes are "
          "running); keeping the default")
    t.evidence[step] = {"noisy": True, "spread": round(t.last_spread, 3)}
    return True


def check_load(t, step, want_par):
    """Wait a little for the machine to calm down, record the load ``step`` runs under, and
    return (busy, single, parallel): busy when a step that wants all threads would share
    them with other processes."""
    single, par = t.quiet(want_par)
    t.evidence.setdefault("load", {})[step] = {"single": round(single, 3),
                                               "parallel": round(par, 3)}
    return want_par and (par < BUSY_EFFICIENCY or single < BUSY_SINGLE), single, par

