"""What to choose: the blocking and threading parameters of one dtype, by measurement.

Order of the steps, each fixing what the next one builds on:

1. mc, kc — on a 1024^3 GEMM timed on one thread and on all (the geometric mean: the
   blocks size per-core caches, but two cores' blocks share the L3): a coarse scan around
   the analytical model's values, then a local search: race the centre against its
   neighbours (each of mc and kc up and down by a factor, and both together the way that
   keeps the block's footprint), move to a winner that beats the centre by more than the
   noise, shrink the factor when the centre holds.
2. nc — a ladder of values and the model's, on a wide GEMM whose n spans several of them;
   then the blocking search's best few with that nc, and the model's point, raced again.
3. split (ic vs jc) — with the tuned threads, over square, tall, wide and skinny shapes.
4. thread_mnk — the size below which one thread beats them all.
5. nopack_mnk and nopack_a_panels — where reading operands in place beats packing them.

The incumbent (the model's value, or the library's default) keeps its place unless a
challenger beats it by a margin, so noise cannot talk the tuner into a change.
"""
import math
import time

import numpy as np

from autotune import measure
from microtile._config import _blocking

OBJECTIVE_N = 1024
MOVE_MARGIN = 1.01       # a neighbour must beat the centre by 1 % to move the search
KEEP_MARGIN = 1.02       # a challenger must beat the default by 2 % to replace it
SPLIT_MARGIN = 1.04      # ... and the driver's own split choice by 4 % (it adapts per shape)
KC_STEP = 8
# Below this parallel efficiency the cores are taken by someone else, and thread-count
# decisions are not made (the defaults stay).
BUSY_EFFICIENCY = 0.7
BUSY_SINGLE = 0.7
# A sweep whose cells spread more than this (interquartile range over the median) was
# measured on a machine too busy to tell a few per cent apart.
NOISY_SPREAD = 0.25
CONTAMINATED_SPEEDUP = 0.9

SETTINGS = {
    True: {   # --quick
        "factors": (1.41, 1.19), "max_moves": 2, "rounds": 3, "top": 3, "extra": 2,
        "finalists": 2, "final_rounds": 3, "sweep_rounds": 5,
        "budget": {"blocking": 8.0, "nc": 2.0, "split": 2.0, "threads": 2.0,
                   "nopack": 1.0, "nopack_a": 1.0, "conv": 3.0},
    },
    False: {  # full run
        "factors": (1.41, 1.19, 1.09), "max_moves": 4, "rounds": 7, "top": 3, "extra": 3,
        "finalists": 4, "final_rounds": 11, "sweep_rounds": 9,
        "budget": {"blocking": 100.0, "nc": 20.0, "split": 15.0, "threads": 12.0,
                   "nopack": 8.0, "nopack_a": 8.0, "conv": 20.0},
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


def legal_block(mc, kc, mr):
    # kc above the objective's k (1024 = KC_MAX) would all measure alike there.
    return {"mc": snap(mc, mr, mr, _blocking.MC_MAX),
            "kc": snap(kc, KC_STEP, 2 * KC_STEP, _blocking.KC_MAX)}


def neighbours(centre, factor, mr):
    """mc and kc each up and down by ``factor``, and both at once along mc*kc constant."""
    mc, kc = centre["mc"], centre["kc"]
    pts = [(mc * factor, kc), (mc / factor, kc), (mc, kc * factor), (mc, kc / factor),
           (mc * factor, kc / factor), (mc / factor, kc * factor)]
    out, seen = [], {measure.key(centre)}
    for m, k in pts:
        c = legal_block(m, k, mr)
        if measure.key(c) not in seen:
            seen.add(measure.key(c))
            out.append(c)
    return out


def _fmt(c):
    return " ".join(f"{k}={v}" for k, v in c.items())


# The scan: mc as a count of micro-panels (the few smallest) and as a multiple of the
# model's, kc as a multiple of the model's.
SCAN = {True: ((1, 2), (0.5, 1.0), (1.0, 2.0, 4.0)),
        False: ((1, 2, 4), (0.5, 1.0, 2.0, 4.0), (1.0, 1.5, 2.0, 3.0, 4.0))}


def scan_points(model, mr, quick=True):
    """A coarse grid around the model's point: mc of one or two micro-panels (four too in a
    full run) and from half to once the model's (four times in a full run), kc from once to
    four times the model's.  The model's kc is a lower bound: it keeps both micro-panels in
    L1, while a deeper kc saves passes over C, and the kernel streams its operands well
    enough from L2 and even L3.  On Zen3 an mc of one or two micro-panels with a deep kc
    measured best on one thread and on two, 5-10 % above the model's point (a scan from an
    eighth of the model's mc, 12 in float64, did not reach mc = 6)."""
    pts = []
    panels, mcs, kcs = SCAN[bool(quick)]
    for mc in [p * mr for p in panels] + [model["mc"] * f for f in mcs]:
        for fk in kcs:
            c = legal_block(mc, model["kc"] * fk, mr)
            if c not in pts:
                pts.append(c)
    return pts


def search_blocking(t, seeds, nc):
    """(mc, kc) on the square objective, timed on one thread and on all (their geometric
    mean; one thread only when the cores are busy): a coarse scan around the model's point,
    a local search from the scan's best, and a final re-measurement of the best points met."""
    deadline = t.deadline("blocking")
    prob = t.problem(OBJECTIVE_N, OBJECTIVE_N, OBJECTIVE_N)
    base = t.blocking_bases({"nc": nc})
    uniq = []
    for s in seeds:
        c = legal_block(s["mc"], s["kc"], t.mr)
        if c not in uniq:
            uniq.append(c)
    races = []
    scores = {}

    def record(res, ref_cand, label):
        races.append({"step": label, "results": res.summary()})
        # Scores relative to a reference measured in the same race: races run at different
        # moments under different loads, ratios within a race do not drift with it.
        ref = res.score(ref_cand)
        if ref > 0:
            for c in res.valid():
                if measure.key(c) not in res.dropped and res.score(c) > 0:
                    scores.setdefault(measure.key(c), []).append(res.score(c) / ref)

    scan = scan_points(uniq[0], t.mr, t.quick)
    scan += [s for s in uniq if s not in scan]
    res = t.race(prob, scan, deadline, base=base, rounds=3, top=3, extra_rounds=1,
                 anchor=uniq[0])
    if res.winner is None:
        raise RuntimeError(f"{t.dtype}: no blocking candidate computed a correct result")
    record(res, uniq[0], "scan")
    centre = res.winner
    visited = {measure.key(c) for c in scan}
    t.say(f"{t.dtype} blocking scan: best {_fmt(centre)} {res.score(centre):.1f} GFLOP/s "
          f"(model {_fmt(uniq[0])} {res.score(uniq[0]):.1f}), {len(scan)} points")
    for factor in t.s["factors"]:
        if time.perf_counter() > deadline:
            t.say(f"{t.dtype} blocking: time budget spent, stopping the search")
            break
        moves = 0
        while moves <= t.s["max_moves"] and time.perf_counter() <= deadline:
            cands = [centre] + [c for c in neighbours(centre, factor, t.mr)
                                if measure.key(c) not in visited]
            if len(cands) == 1:
                break
            res = t.race(prob, cands, deadline, base=base, anchor=centre)
            visited.update(measure.key(c) for c in cands)
            record(res, centre, f"x{factor:g}")
            w = res.winner
            if w is None:
                raise RuntimeError(f"{t.dtype}: no blocking candidate computed a correct result")
            t.say(f"{t.dtype} blocking x{factor:g}: best {_fmt(w)} "
                  f"{res.score(w):.1f} GFLOP/s (centre {_fmt(centre)} "
                  f"{res.score(centre):.1f}), {len(cands)} candidates")
            if w == centre or res.score(w) < res.score(centre) * MOVE_MARGIN:
                break
            centre = w
            moves += 1
    # The final word: the search's end point, the best few it met on the way, and every
    # seed, re-measured together in fresh interleaved rounds; the model's point stays
    # unless the winner beats it by more than the noise.
    ranked = sorted(scores, key=lambda k: float(np.median(scores[k])), reverse=True)
    finals = [centre]
    for k in ranked[: t.s["finalists"]]:
        c = {f: dict(k)[f] for f in ("mc", "kc")}
        if c not in finals:
            finals.append(c)
    finals += [s for s in uniq if s not in finals]
    verdict = t.race(prob, finals, None, base=base, rounds=t.s["final_rounds"],
                     extra_rounds=0, prune=0.0, anchor=uniq[0])
    w = verdict.winner
    if w is not None:
        centre = w
        if w != uniq[0] and verdict.score(w) < verdict.score(uniq[0]) * MOVE_MARGIN:
            centre = uniq[0]
    t.say(f"{t.dtype} blocking: {_fmt(centre)} {verdict.score(centre):.1f} GFLOP/s "
          f"(model {verdict.score(uniq[0]):.1f}) after re-measuring {len(finals)} points")
    t.evidence["blocking"] = {
        "problem": [prob.m, prob.n, prob.k], "threads": [b["threads"] for b in base],
        "nc": nc, "races": races,
        "final": verdict.summary(), "chosen": centre,
        "finalists": [centre] + [c for c in verdict.ranking() if c != centre][:2]}
    return centre


def nc_shape(block, nc_max, threads, mr, nr):
    """The GEMM that nc is measured on.  B's kc x nc block is what nc sizes: k = kc fills
    it once, n spans the largest candidate and a quarter more, and m gives each thread at
    least 1024 rows: the block is reused by every row block while A is packed again for
    every nc columns, so a small m would flatter a small nc."""
    m = snap(max(1024, 2 * block["mc"]) * threads, mr, mr, 1 << 14)
    n = snap(1.25 * nc_max, nr, nr, 1 << 14)
    return m, n, min(block["kc"], 1024)


def nc_base(block, threads):
    """Overrides for the nc measurement: rows split between threads, so each spans all n."""
    base = {"threads": threads, **block}
    if threads > 1:
        base.update(split="ic", thread_mnk=0)
    return base


# The nc values always tried beside the model's: the model's nc moves with the L3 size the
# latency curve finds, and on a VM that wanders between runs (4-8 MiB here); the ladder keeps a
# noisy seed from confining the search to a corner.
NC_LADDER = {True: (512, 1024, 2048),
             False: (256, 512, 768, 1024, 1536, 2048, 3072, 4096)}


def search_nc(t, block, nc_seed, threads=1):
    """nc among a ladder of values and the model's, on a wide GEMM.

    The team shares one packed kc x nc block of B, which the L3 holds beside the threads'
    blocks of A, so where the cores are free this is measured on ``threads`` threads with
    the rows split between them (each thread then spans all of n)."""
    deadline = t.deadline("nc")
    # Twice the model's cap: the cap is a guess for machines whose L3 is shared with
    # neighbours the OS does not show; here it is measured.
    top = 2 * _blocking.NC_MAX
    vals = {snap(v, t.nr, t.nr, top) for v in (nc_seed,) + NC_LADDER[bool(t.quick)]}
    cands = [{"nc": v} for v in sorted(vals)]
    m, n, k = nc_shape(block, max(vals), threads, t.mr, t.nr)
    prob = t.problem(m, n, k)
    seed_c = {"nc": snap(nc_seed, t.nr, t.nr, top)}
    res = t.race(prob, cands, deadline, base=nc_base(block, threads), anchor=seed_c)
    w = res.winner
    if w is None:
        raise RuntimeError(f"{t.dtype}: no nc computed a correct result")
    chosen = seed_c if res.score(w) < res.score(seed_c) * KEEP_MARGIN else w
    t.say(f"{t.dtype} nc: {chosen['nc']} ({res.score(chosen):.1f} GFLOP/s on {prob}, "
          f"{threads} thread(s); model {seed_c['nc']} {res.score(seed_c):.1f})")
    t.evidence["nc"] = {"problem": [m, n, k], "threads": threads, "results": res.summary(),
                        "chosen": chosen["nc"]}
    return chosen["nc"]


WIDE = (512, 5120, 1024)


def joint_parts(dtype, threads, seed=0):
    """The objective (mc, kc, nc) are finally judged on, as ``(problem, overrides)`` pairs
    whose GFLOP/s are combined by geometric mean: the square 1024^3 GEMM on one thread and
    on ``threads``, and a wide 512 x 5120 x 1024 GEMM (several nc blocks wide, every kc
    deep) on ``threads``.  ``tools/grid_sweep.py`` sweeps its grid on the same pairs."""
    sq = measure.Problem(OBJECTIVE_N, OBJECTIVE_N, OBJECTIVE_N, dtype, seed=seed)
    wide = measure.Problem(*WIDE, dtype, seed=seed)
    team = {"threads": threads, "thread_mnk": 0}
    if threads <= 1:
        return [(sq, {"threads": 1}), (wide, {"threads": 1})]
    return [(sq, {"threads": 1}), (sq, team), (wide, team)]


def search_joint(t, finalists, model):
    """The last word on (mc, kc, nc): the blocking search's best few with the chosen nc, and
    the model's point, raced on ``joint_parts``: mc and kc were searched on the square
    GEMM and nc on a wide one, each with the other fixed, and a near tie among the
    finalists may be decided by how they go together."""
    cands = []
    for c in list(finalists) + [model]:
        c = {"mc": c["mc"], "kc": c["kc"], "nc": c["nc"]}
        if c not in cands:
            cands.append(c)
    if len(cands) == 1:
        return cands[0]
    parts = [(p, {**t.pinned, **b})
             for p, b in joint_parts(t.dtype, t.threads if t.joint else 1, t.seed)]
    sample, check = measure.objective(parts)
    incumbent = cands[0]
    res = measure.race(cands, sample, check, rounds=t.s["final_rounds"], top=len(cands),
                       extra_rounds=0, prune=0.0, deadline=t.deadline("nc"), seed=t.seed,
                       anchor=incumbent)
    w = res.winner
    if w is None:
        raise RuntimeError(f"{t.dtype}: no blocking computed a correct result")
    pick = incumbent if res.score(w) < res.score(incumbent) * MOVE_MARGIN else w
    t.say(f"{t.dtype} blocking, square and wide: {_fmt(pick)} "
          f"{res.score(pick):.1f} GFLOP/s (geometric mean; "
          + ", ".join(f"{_fmt(c)} {res.score(c):.1f}" for c in cands) + ")")
    t.evidence["joint"] = {"parts": [[[p.m, p.n, p.k], b["threads"]] for p, b in parts],
                           "results": res.summary(), "chosen": pick}
    return pick


def split_shapes(n):
    """Square, tall, wide and skinny (convolution-like) shapes for the split race."""
    return [(n, n, n), (4 * n, n // 4, n // 2), (n // 4, 4 * n, n // 2), (3136, 64, 576)]


def split_thread_counts(threads):
    """Thread counts the split is measured at: 2, the powers of two between, and ``threads``
    (a handful even on a big machine)."""
    counts, n = [], 2
    while n < threads:
        counts.append(n)
        n *= 2
    return counts + [threads] if threads > 1 else []


def search_split(t, block):
    """ic vs jc (vs the driver's own choice, "auto") at each of ``split_thread_counts``;
    the driver holds one split per dtype, so the tuned thread count's result is chosen and
    the others are kept as evidence."""
    size = 1024 if t.dtype == "float32" else 768
    probs = [t.problem(*s, seed=t.seed + i) for i, s in enumerate(split_shapes(size))]
    cands = [{"split": "auto"}, {"split": "ic"}, {"split": "jc"}]
    auto = cands[0]
    chosen = auto
    counts = split_thread_counts(t.threads)
    for nt in counts:
        base = {**t.pinned, "threads": nt, "thread_mnk": 0, **block}

        def sample(c):  # geometric mean over the shapes
            logs = [math.log(measure.gflops(p, {**base, **c})) for p in probs]
            return math.exp(sum(logs) / len(logs))

        def check(c):
            return max(measure.check(p, {**base, **c}) for p in probs)

        deadline = t.deadline("split")
        res = measure.race(cands, sample, check, rounds=t.s["rounds"], top=3,
                           extra_rounds=t.s["extra"], deadline=deadline, seed=t.seed)
        w = res.winner
        if w is None:
            raise RuntimeError(f"{t.dtype}: no split computed a correct result")
        pick = auto if res.score(w) < res.score(auto) * SPLIT_MARGIN else w
        t.say(f"{t.dtype} split on {nt} threads: {pick['split']} ("
              + ", ".join(f"{c['split']} {res.score(c):.1f}" for c in cands) + " GFLOP/s)")
        t.evidence.setdefault("split", {})[str(nt)] = {
            "shapes": [list(s) for s in split_shapes(size)], "results": res.summary(),
            "chosen": pick["split"]}
        if nt == t.threads:
            chosen = pick
    return chosen["split"]


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


def _too_noisy(t, step):
    if t.last_spread <= NOISY_SPREAD:
        return False
    t.say(f"{t.dtype} {step}: samples spread {t.last_spread:.0%} (other processes are "
          "running); keeping the default")
    t.evidence[step] = {"noisy": True, "spread": round(t.last_spread, 3)}
    return True


def _mid(a, b):
    return int(math.sqrt(a * b))


def search_thread_mnk(t, block, split):
    """The m*n*k below which one thread is faster than ``t.threads``."""
    sizes = [16, 24, 32, 48, 64, 96, 128, 192, 256]
    probs = [t.problem(s, s, s) for s in sizes]
    for attempt in range(2):
        med = sweep(t, probs, {"one": {"threads": 1},
                               "all": {"threads": t.threads, "thread_mnk": 0}},
                    {**block, "split": split}, t.s["sweep_rounds"], 0.004)
        ratios = [m["all"] / m["one"] for m in med]
        # At 256^3 (a millisecond of work) more threads cannot lose on free cores; if
        # they do, another process took a core during the sweep.
        if ratios[-1] >= CONTAMINATED_SPEEDUP:
            break
        t.say(f"{t.dtype} threads: {t.threads} threads ran {ratios[-1]:.2f}x one thread at "
              f"256^3; other processes were using the CPUs"
              + ("; measuring again" if attempt == 0 else ""))
        if attempt == 0 and t.quiet is not None:
            t.quiet(True)
    else:
        t.evidence["thread_mnk"] = {"sizes": sizes, "speedup": [round(r, 3) for r in ratios],
                                    "threads": t.threads, "chosen": None,
                                    "contaminated": True}
        return None
    i = best_cut(ratios, favour_low=False)
    mnk = [s ** 3 for s in sizes]
    if i == 0:
        value = mnk[0]
    elif i == len(sizes):
        value = mnk[-1] * 2
    else:
        value = _mid(mnk[i - 1], mnk[i])
    t.say(f"{t.dtype} threads pay from about {round(value ** (1 / 3))}^3 ("
          + " ".join(f"{s}:{r:.2f}" for s, r in zip(sizes, ratios)) + " speed-up)")
    t.evidence["thread_mnk"] = {"sizes": sizes, "speedup": [round(r, 3) for r in ratios],
                                "threads": t.threads, "chosen": value}
    return value


def search_nopack(t, block, default):
    """The m*n*k at or below which reading A and B in place beats packing them."""
    sizes = [8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    probs = [t.problem(s, s, s) for s in sizes]
    med = sweep(t, probs, {"inplace": {"nopack_mnk": 1 << 40}, "packed": {"nopack_mnk": 0}},
                {"threads": 1, **block}, t.s["sweep_rounds"], 0.003)
    if _too_noisy(t, "nopack_mnk"):
        return None
    ratios = [m["inplace"] / m["packed"] for m in med]
    mnk = [s ** 3 for s in sizes]
    matters = max(abs(math.log(r)) for r in ratios) > math.log(1.03)
    i = best_cut(ratios, favour_low=True)
    if not matters:
        value = default
    elif i == 0:
        value = 0
    elif i == len(sizes):
        value = mnk[-1]
    else:
        value = _mid(mnk[i - 1], mnk[i])
    t.say(f"{t.dtype} no-pack path up to about {round(value ** (1 / 3))}^3 ("
          + " ".join(f"{s}:{r:.2f}" for s, r in zip(sizes, ratios)) + " in-place/packed)"
          + ("" if matters else "; under 3 % either way, default kept"))
    t.evidence["nopack_mnk"] = {"sizes": sizes, "ratio": [round(r, 3) for r in ratios],
                                "matters": matters, "chosen": value}
    return value


def search_nopack_a(t, block, default):
    """How many nr-wide column panels of B (at most) make reading A in place pay."""
    panels = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    mk = 512
    probs = [t.problem(mk, p * t.nr, mk) for p in panels]
    med = sweep(t, probs, {"inplace": {"nopack_a_panels": 1 << 10},
                           "packed": {"nopack_a_panels": 0}},
                {"threads": 1, "nopack_mnk": 0, **block}, t.s["sweep_rounds"], 0.003)
    if _too_noisy(t, "nopack_a_panels"):
        return None
    ratios = [m["inplace"] / m["packed"] for m in med]
    matters = max(abs(math.log(r)) for r in ratios) > math.log(1.03)
    i = best_cut(ratios, favour_low=True)
    value = (panels[i - 1] if i else 0) if matters else default
    t.say(f"{t.dtype} A read in place up to {value} column panel(s) ("
          + " ".join(f"{p}:{r:.2f}" for p, r in zip(panels, ratios)) + " in-place/packed)"
          + ("" if matters else "; under 3 % either way, default kept"))
    t.evidence["nopack_a_panels"] = {"m": mk, "k": mk, "panels": panels,
                                     "ratio": [round(r, 3) for r in ratios],
                                     "matters": matters, "chosen": value}
    return value


def _load(t, step, want_par):
    """Wait a little for the machine to calm down, record the load ``step`` runs under, and
    return (busy, single, parallel): busy when a step that wants all threads would share
    them with other processes."""
    single, par = t.quiet(want_par)
    t.evidence.setdefault("load", {})[step] = {"single": round(single, 3),
                                               "parallel": round(par, 3)}
    return want_par and (par < BUSY_EFFICIENCY or single < BUSY_SINGLE), single, par


def tune_dtype(t, model, defaults, nc_model=None):
    """Run every step for one dtype; returns the chosen overrides (a ``config_context``
    dict for ``t.dtype``) and fills ``t.evidence``.

    ``nc_model(mc, kc)``: the analytical model's nc for the measured mc and kc, which seeds
    the nc step (default: the model's own nc).  Steps that decide how threads behave are
    skipped (defaults kept) when other processes hold the cores; nc is then measured on one
    thread instead of all.
    """
    seeds = [model, defaults]
    chosen = {}
    t.pinned = {k: defaults[k] for k in ("mc", "kc", "nc", "nopack_mnk", "thread_mnk",
                                         "nopack_a_panels", "split") if k in defaults}
    if t.quiet is not None:
        busy, _, par = _load(t, "blocking", t.threads > 1)
        if busy:
            t.joint = False
            t.say(f"{t.dtype} blocking: other processes hold the CPUs ({t.threads} threads "
                  f"at {par:.0%} efficiency); timing it on one thread only")
    block = search_blocking(t, seeds, model["nc"])
    chosen.update(block)
    nc_seed = nc_model(block["mc"], block["kc"]) if nc_model else model["nc"]
    if nc_seed != model["nc"]:
        t.say(f"{t.dtype} nc: the model gives {nc_seed} for kc={block['kc']} "
              f"(and {model['nc']} for its own kc={model['kc']})")
    chosen["nc"] = nc_seed

    def cur():
        return {k: chosen[k] for k in ("mc", "kc", "nc")}

    def joint():
        fin = [{**c, "nc": chosen["nc"]} for c in t.evidence["blocking"]["finalists"]]
        pick = search_joint(t, fin, model)
        chosen.update(pick)
        return pick

    # (name, kind, step): kind "single" runs on one thread, "threaded" needs free cores
    # or is skipped, "either" runs on all threads when the cores are free, else on one.
    steps = [
        ("nc", "either", lambda n: search_nc(t, block, nc_seed, n)),
        ("joint", "threaded", lambda n: joint()),
        ("split", "threaded", lambda n: search_split(t, cur())),
        ("thread_mnk", "threaded", lambda n: search_thread_mnk(t, cur(),
                                                             chosen.get("split", "auto"))),
        ("nopack_mnk", "single", lambda n: search_nopack(t, cur(), defaults["nopack_mnk"])),
        ("nopack_a_panels", "single", lambda n: search_nopack_a(t, cur(),
                                                                defaults["nopack_a_panels"])),
    ]
    skipped = []
    for name, kind, step in steps:
        keep = None if name == "joint" else (nc_seed if name == "nc" else defaults[name])
        if t.out_of_time():
            skipped.append(name)
            if keep is not None:
                chosen[name] = keep
            continue
        if kind == "threaded" and t.threads == 1:
            if keep is not None:
                chosen[name] = keep
            continue
        nthreads = 1
        if t.quiet is not None:
            busy, single, par = _load(t, name, kind != "single" and t.threads > 1)
            if busy and kind == "threaded":
                t.say(f"{t.dtype} {name}: other processes hold the CPUs ({t.threads} threads "
                      f"at {par:.0%} efficiency, this core at {single:.0%}); keeping "
                      + ("the default" if keep is not None else "the one-thread choice"))
                t.evidence.setdefault("busy", []).append(name)
                if keep is not None:
                    chosen[name] = keep
                continue
            if kind == "either" and not busy:
                nthreads = t.threads
        elif kind == "either":
            nthreads = t.threads
        value = step(nthreads)
        if name == "joint":
            continue
        if value is None:           # the step could not measure cleanly: keep the default
            t.evidence.setdefault("busy", []).append(name)
            value = keep
        chosen[name] = value
    if skipped:
        t.say(f"{t.dtype}: out of time, kept defaults for " + ", ".join(skipped))
        t.evidence["skipped"] = skipped
    if isinstance(chosen.get("split"), int):
        chosen["split"] = {0: "auto", 1: "ic", 2: "jc"}[chosen["split"]]
    return chosen


def conv_reference(x, w, padding):
    """float64 NCHW convolution (stride 1, no dilation) and the same of |x|, |w|."""
    from numpy.lib.stride_tricks import sliding_window_view
    x64 = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    w64 = w.astype(np.float64)
    r, s = w.shape[2], w.shape[3]
    win = sliding_window_view(x64, (r, s), axis=(2, 3))       # N, C, P, Q, R, S
    ref = np.einsum("ncpqrs,kcrs->nkpq", win, w64, optimize=True)
    bound = np.einsum("ncpqrs,kcrs->nkpq", np.abs(win), np.abs(w64), optimize=True)
    return ref, bound


def search_conv_chunk(t, conv, default, shape=(8, 64, 28, 28, 128, 3)):
    """The column chunk (bytes one thread lowers and multiplies at a time) that makes
    ``conv(x, w, padding=p)`` fastest; float32, with the tuned threads.  ``conv`` is
    ``microtile.conv2d``.  (The workspace cap itself is a memory limit, the user's to set.)"""
    deadline = t.deadline("conv")
    n, c, h, wd, k, r = shape
    rng = np.random.default_rng(t.seed)
    x = rng.uniform(-1, 1, (n, c, h, wd)).astype(np.float32)
    w = rng.uniform(-1, 1, (k, c, r, r)).astype(np.float32)
    pad = r // 2
    ref, bound = conv_reference(x, w, pad)
    bound = (c * r * r + 2) * float(np.finfo(np.float32).eps) * bound + 1e-30
    flops = 2.0 * ref.size * c * r * r
    sizes = [1 << 20, 2 << 20, 4 << 20] if t.quick else [512 << 10, 1 << 20, 2 << 20,
                                                        4 << 20, 8 << 20]
    if default not in sizes:
        sizes.append(default)
    cands = [{"conv_chunk": v} for v in sorted(sizes)]
    base = {"threads": t.threads}

    def check(cand):
        import microtile
        with microtile.config_context(**base, **cand):
            y = conv(x, w, padding=pad)
        y = np.asarray(y, dtype=np.float64)
        if y.shape != ref.shape or not np.isfinite(y).all():
            return math.inf
        return float(np.max(np.abs(y - ref) / bound))

    def sample(cand):
        import microtile
        with microtile.config_context(**base, **cand):
            sec = measure.timed(lambda: conv(x, w, padding=pad), 0.02)
        return flops / sec / 1e9

    res = measure.race(cands, sample, check, rounds=t.s["rounds"], top=3,
                       extra_rounds=t.s["extra"], deadline=deadline, seed=t.seed)
    w_ = res.winner
    if w_ is None:
        raise RuntimeError("conv2d: no chunk size gave a correct result")
    inc = {"conv_chunk": default}
    chosen = inc if res.score(w_) < res.score(inc) * KEEP_MARGIN else w_
    t.say(f"conv2d chunk: {chosen['conv_chunk'] >> 10} KiB per thread ("
          + ", ".join(f"{cd['conv_chunk'] >> 10} KiB {res.score(cd):.1f}" for cd in cands)
          + " GFLOP/s)")
    t.evidence["conv_chunk"] = {"shape": list(shape), "results": res.summary(),
                                "chosen": chosen["conv_chunk"]}
    return chosen["conv_chunk"]
