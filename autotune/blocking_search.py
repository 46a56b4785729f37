"""The cache blocking: mc and kc by a coarse scan and a local search on the square 1024^3
GEMM (``search_blocking``, stepping by ``neighbours``), nc by a ladder on a wide GEMM
(``search_nc``), and the last word on (mc, kc, nc) together on the square and ``WIDE``
GEMMs (``joint_parts``, ``search_joint``).  ``tools/grid_sweep.py`` sweeps grids on the
same objectives."""
import time

import numpy as np

from autotune import measure
from autotune.tuning import KEEP_MARGIN, MOVE_MARGIN, fmt, snap
from microtile._config import _blocking
from microtile._config._schema import BLOCKING

OBJECTIVE_N = 1024
KC_STEP = 8


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
    t.say(f"{t.dtype} blocking scan: best {fmt(centre)} {res.score(centre):.1f} GFLOP/s "
          f"(model {fmt(uniq[0])} {res.score(uniq[0]):.1f}), {len(scan)} points")
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
            t.say(f"{t.dtype} blocking x{factor:g}: best {fmt(w)} "
                  f"{res.score(w):.1f} GFLOP/s (centre {fmt(centre)} "
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
    t.say(f"{t.dtype} blocking: {fmt(centre)} {verdict.score(centre):.1f} GFLOP/s "
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
        c = {k: c[k] for k in BLOCKING}
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
    t.say(f"{t.dtype} blocking, square and wide: {fmt(pick)} "
          f"{res.score(pick):.1f} GFLOP/s (geometric mean; "
          + ", ".join(f"{fmt(c)} {res.score(c):.1f}" for c in cands) + ")")
    t.evidence["joint"] = {"parts": [[[p.m, p.n, p.k], b["threads"]] for p, b in parts],
                           "results": res.summary(), "chosen": pick}
    return pick
