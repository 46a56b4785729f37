"""Exhaustive grid over microtile's blocking (mc, kc, nc) on this machine: how close do the
tuner's choices come to the grid's best?  (Not run in CI: a few minutes of timing.)

The default objective is the tuner's final one (``autotune.blocking_search.joint_parts``):
the geometric mean of the square 1024^3 GEMM on one thread and on all usable CPUs and of a
wide 512 x 5120 x 1024 GEMM on all of them, over the product grid GRID3 of (mc, kc, nc).
``--mode 2d`` instead follows the tuner's steps: (mc, kc) on the square GEMM with nc fixed
(GRID; one thread and all, or ``--objective single``), then nc on the wide GEMM of the nc
step at the best (mc, kc).  Beware: the 2-D plane judges a point at an nc not its own, and a
deep kc with the default nc overflows the L3 (a tuner's (12, 768, 448) read 80 % there).

Every point is timed the way the tuner times its candidates: an anchored race
(``autotune.measure``), each sample scored against a reference point timed just before and
after it, so the spells of load that come and go on a shared VM cancel out.  Named points
are timed in the same interleaved rounds as the grid: the analytical model's
values, BLIS's zen3 table, and the choices in any profiles given with ``--profile NAME=PATH``
(for example the ``--quick`` and the full run's).  Each is reported as a fraction of the
grid's best, then again after the grid's top few and the named points are re-measured
together in four times the rounds, and finally in a held-out measurement (see ``confirm``:
the maximum of noisy measurements is biased upwards); the goal is within 3 %.
``--mode threads`` times the named configurations whole, on all usable CPUs, at reference
shapes.

    flock -x /tmp/microtile-bench.lock python tools/grid_sweep.py --dtype float32 \\
        --profile quick=/tmp/quick.json --profile full=/tmp/full.json

On a shared machine the figures carry the other processes' noise: anchored, interleaved
rounds damp it, they do not remove it.  The 3-D sweep takes about 5 minutes for float32
and 8 for float64 on the 2-core VM.
"""
import argparse
import json
import os
import sys
import time

from threadpoolctl import threadpool_limits

sys.path[:0] = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), p)
                for p in ("src", "")]

import microtile  # noqa: E402
from microtile._config import _context as _config, _hwinfo  # noqa: E402
from microtile._kernels import _dispatch
from autotune import blocking_search, measure  # noqa: E402
from autotune.tuning import fmt  # noqa: E402

BLIS_ZEN3 = {"float32": {"mc": 144, "kc": 256, "nc": 4080},
             "float64": {"mc": 72, "kc": 256, "nc": 4080}}
GRID = {
    "float32": {"mc": [6, 12, 24, 48, 72, 96, 144, 192, 288, 390, 582, 780],
                "kc": [128, 168, 256, 384, 512, 672, 768, 896, 1024],
                "nc": [512, 1024, 2048, 3072, 4096]},
    "float64": {"mc": [6, 12, 24, 36, 48, 72, 96, 144, 192, 288, 384, 576],
                "kc": [128, 168, 256, 384, 512, 672, 768, 896, 1024],
                "nc": [336, 512, 1024, 1792, 2560, 4096]},
}

# The product grid is coarser: every mc, kc and nc that came near the top of the 2-D sweeps
# here, and enough beyond them on each side to show the edges.
GRID3 = {
    "float32": {"mc": [6, 12, 24, 48, 96, 192, 390, 780], "kc": [256, 384, 512, 768, 1024],
                "nc": [256, 512, 1024, 2048, 4096]},
    "float64": {"mc": [6, 12, 24, 48, 96, 192, 384], "kc": [256, 384, 512, 768, 1024],
                "nc": [256, 512, 1024, 2048, 4096]},
}


def measure_points(parts, points, rounds, seed=0, say=print, anchor=None):
    """GFLOP/s per point (a dict of overrides), scored as the tuner scores: an anchored race
    (``autotune.measure``) with ``anchor`` (default: the first point) timed beside every
    sample, no pruning, rounds visiting every point in a new random order; every point's
    output is checked first.  ``parts``: ``(problem, overrides)`` pairs; a sample is the
    geometric mean over them (``measure.objective``)."""
    t0 = time.perf_counter()

    def progress(r, res):
        say(f"  round {r + 1}/{rounds} done ({time.perf_counter() - t0:.0f} s)")

    sample, check = measure.objective(parts)
    res = measure.race(points, sample, check, rounds=rounds, top=0, extra_rounds=0,
                       prune=0.0, seed=seed, on_round=progress,
                       anchor=points[0] if anchor is None else anchor)
    for p in points:
        if res.error[measure.key(p)] > 1.0:
            raise SystemExit(f"{p}: wrong result ({res.error[measure.key(p)]:.3g} x the bound)")
    return [res.score(p) for p in points]


def named_points(dtype, profiles):
    code = ("float32", "float64").index(dtype)
    isa = microtile.get_config()["isa"]
    mr, nr = _dispatch.kernel_shape(isa, code)
    named = {"model (OS caches)": {k: _config.defaults(dtype)[k] for k in ("mc", "kc", "nc")},
             "BLIS zen3": dict(BLIS_ZEN3[dtype])}
    for name, path in profiles:
        doc = json.load(open(path))
        c = doc["chosen"].get(dtype)
        if c:
            named[name] = {k: c[k] for k in ("mc", "kc", "nc")}
    return named, mr, nr


def report(title, points, values, named, key_fields):
    best = max(range(len(points)), key=lambda i: values[i])
    print(f"\n{title}")
    order = sorted(range(len(points)), key=lambda i: -values[i])
    print("  grid top 8:")
    for i in order[:8]:
        print(f"    {fmt({k: points[i][k] for k in key_fields}):28} "
              f"{values[i]:7.1f} GFLOP/s  {values[i] / values[best]:6.1%}")
    return {"grid_best": {"point": points[best], "gflops": values[best]},
            "named": _verdicts(points, values, best, named, key_fields, "the grid's best"),
            "grid": [[p, round(v, 3)] for p, v in zip(points, values)]}


def _verdicts(pts, vals, ref, named, key_fields, against):
    """Print each named point as a fraction of ``vals[ref]`` and return the verdicts."""
    out = {}
    for name, p in named.items():
        i = pts.index(p)
        frac = vals[i] / vals[ref]
        out[name] = {"point": p, "gflops": vals[i], "of_best": frac}
        mark = "within 3 %" if frac >= 0.97 else "MORE than 3 % below"
        print(f"  {name:22} {fmt({k: p[k] for k in key_fields}):28} "
              f"{vals[i]:7.1f} GFLOP/s  {frac:6.1%} of {against} ({mark})")
    return out


def _judge(title, pts, vals, ref, named, key_fields, label):
    """Print each point of a re-measurement, and each named point as a fraction of
    ``vals[ref]``; return the named points' verdicts."""
    print(f"\n{title} ({label})")
    for i, p in enumerate(pts):
        if p in named.values():
            continue
        print(f"    grid     {fmt({k: p[k] for k in key_fields}):28} "
              f"{vals[i]:7.1f} GFLOP/s  {vals[i] / vals[ref]:6.1%}")
    return _verdicts(pts, vals, ref, named, key_fields, "the best")


def confirm(title, parts, grid_points, grid_values, named, key_fields, rounds, say,
            top=5, keep=3):
    """Judge the named points against the grid's best without the winner's curse (the best
    of many noisy measurements is biased upwards, and so is the best of a re-measurement).

    Stage 2 re-measures the sweep's top ``top`` beside the named points and picks the
    grid's best from that; stage 3, held out, times stage 2's best ``keep`` grid points and
    the named points again in fresh rounds, and the named points are judged against the
    stage-2 best's stage-3 figure, a measurement that played no part in choosing it."""
    # The grid's best is a grid point: a named point off the grid is judged, not a judge.
    order = sorted((i for i in range(len(grid_points))
                    if grid_points[i] not in named.values()), key=lambda i: -grid_values[i])
    pts = [grid_points[i] for i in order[:top]]
    pts += [p for p in named.values() if p not in pts]
    say(f"confirming: {len(pts)} points, {rounds} rounds")
    vals = measure_points(parts, pts, rounds, seed=1, say=say)
    grid_idx = sorted((i for i in range(len(pts)) if pts[i] in [grid_points[j] for j in
                                                                 order[:top]]),
                      key=lambda i: -vals[i])
    stage2 = _judge(title, pts, vals, grid_idx[0], named, key_fields,
                    f"re-measured: the grid's top {top} beside the named points")
    held = [pts[i] for i in grid_idx[:keep]]
    held += [p for p in named.values() if p not in held]
    say(f"held-out verdict: {len(held)} points, {rounds} rounds")
    vals3 = measure_points(parts, held, rounds, seed=2, say=say)
    stage3 = _judge(title, held, vals3, 0, named, key_fields,
                    f"held out: the re-measurement's best {keep} grid points and the named "
                    f"points timed again; judged against {fmt(held[0])}")
    return {"best": {"point": held[0], "gflops": vals3[0], "stage2_gflops": vals[grid_idx[0]]},
            "named": stage3, "stage2": stage2}


def sweep_2d(dtype, named, mr, nr, rounds, say, joint=True):
    g = GRID[dtype]
    nc_fix = _config.defaults(dtype)["nc"]
    threads = _hwinfo.usable_cpus()
    n = blocking_search.OBJECTIVE_N
    prob = measure.Problem(n, n, n, dtype)
    pts = [{"mc": m, "kc": k} for m in g["mc"] for k in g["kc"]]
    for p in named.values():
        q = {"mc": p["mc"], "kc": p["kc"]}
        if q not in pts:
            pts.append(q)
    base = [{"threads": 1, "nc": nc_fix}]
    how = "1 thread"
    if joint and threads > 1:
        base.append({"threads": threads, "thread_mnk": 0, "nc": nc_fix})
        how = f"geometric mean of 1 and {threads} threads"
    say(f"{dtype}: (mc, kc) grid of {len(pts)} points on {prob}, {how}, nc={nc_fix}")
    named_mk = {n: {"mc": p["mc"], "kc": p["kc"]} for n, p in named.items()}
    anchor = next(iter(named_mk.values()))
    parts = [(prob, b) for b in base]
    vals = measure_points(parts, pts, rounds, say=say, anchor=anchor)
    title = f"{dtype} (mc, kc) on {prob}, {how}"
    res_mk = report(title + ":", pts, vals, named_mk, ("mc", "kc"))
    res_mk["confirmed"] = confirm(title, parts, pts, vals, named_mk, ("mc", "kc"),
                                  4 * rounds, say)
    best = res_mk["confirmed"]["best"]["point"]
    ncs = sorted(set(g["nc"]) | {p["nc"] for p in named.values()})
    prob2 = measure.Problem(*blocking_search.nc_shape(best, max(ncs), threads, mr, nr), dtype)
    pts2 = [{"nc": v} for v in ncs]
    say(f"{dtype}: nc sweep of {len(pts2)} values on {prob2}, {threads} threads, at "
        f"mc={best['mc']} kc={best['kc']}")
    named_nc = {n_: {"nc": p["nc"]} for n_, p in named.items()}
    base2 = blocking_search.nc_base(best, threads)
    # Two threads feel every spell of load on either core, and the nc grid is small:
    # three times the rounds.
    vals2 = measure_points([(prob2, base2)], pts2, 3 * rounds, say=say,
                           anchor=next(iter(named_nc.values())))
    title = f"{dtype} nc on {prob2}, {threads} threads (mc={best['mc']}, kc={best['kc']})"
    res_nc = report(title + ":", pts2, vals2, named_nc, ("nc",))
    res_nc["confirmed"] = confirm(title, [(prob2, base2)], pts2, vals2, named_nc, ("nc",),
                                  6 * rounds, say, top=3)
    return {"mc_kc": res_mk, "nc": res_nc}


def sweep_3d(dtype, named, mr, nr, rounds, say):
    """Every (mc, kc, nc) of GRID3 on the tuner's final objective
    (``blocking_search.joint_parts``)."""
    g = GRID3[dtype]
    threads = _hwinfo.usable_cpus()
    parts = blocking_search.joint_parts(dtype, threads)
    pts = [{"mc": m, "kc": k, "nc": c} for m in g["mc"] for k in g["kc"] for c in g["nc"]]
    pts += [p for p in named.values() if p not in pts]
    how = ", ".join(f"{p} on {b['threads']} thread(s)" for p, b in parts)
    say(f"{dtype}: full grid of {len(pts)} points; geometric mean of {how}")
    vals = measure_points(parts, pts, rounds, say=say, anchor=next(iter(named.values())))
    title = f"{dtype} (mc, kc, nc), geometric mean of {how}"
    keys = ("mc", "kc", "nc")
    out = report(title + ":", pts, vals, named, keys)
    out["confirmed"] = confirm(title, parts, pts, vals, named, keys, 4 * rounds, say, top=8)
    return {"mc_kc_nc": out}


THREAD_SHAPES = [(256, 256, 256), (1024, 1024, 1024), (2048, 2048, 2048), (3136, 64, 576)]


def compare_threads(dtype, profiles, rounds, say):
    """The named configurations whole (blocking and thresholds) on all usable CPUs, at the
    reference shapes: what a user of each would see."""
    threads = _hwinfo.usable_cpus()
    defaults = {k: v for k, v in _config.defaults(dtype).items()}
    named = {"model (OS caches)": dict(defaults),
             "BLIS zen3": {**defaults, **BLIS_ZEN3[dtype]}}
    for name, path in profiles:
        c = json.load(open(path))["chosen"].get(dtype)
        if c:
            named[name] = {**defaults, **c}
    out = {}
    print(f"\n{dtype} on {threads} threads (GFLOP/s):")
    print("  " + " " * 22 + "".join(f"{f'{m}x{n}x{k}':>16}" for m, n, k in THREAD_SHAPES))
    cols = {}
    for shape in THREAD_SHAPES:
        prob = measure.Problem(*shape, dtype)
        pts = list(named.values())
        vals = measure_points([(prob, {"threads": threads})], pts, rounds, say=say)
        cols[shape] = vals
    for j, name in enumerate(named):
        row = [cols[s][j] for s in THREAD_SHAPES]
        out[name] = {f"{m}x{n}x{k}": v for (m, n, k), v in zip(THREAD_SHAPES, row)}
        print(f"  {name:22}" + "".join(f"{v:16.1f}" for v in row))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=("float32", "float64", "all"), default="all")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mode", choices=("3d", "2d", "threads"), default="3d",
                    help="3d: the full product on the tuner's final objective (default); "
                         "2d: (mc, kc) grid then nc; threads: the named configurations on "
                         "all CPUs at reference shapes")
    ap.add_argument("--objective", choices=("joint", "single"), default="joint",
                    help="2d mode's (mc, kc) objective: the geometric mean of one thread and "
                         "all usable CPUs (the tuner's last word, default), or one thread")
    ap.add_argument("--profile", action="append", default=[], metavar="NAME=PATH",
                    help="a profile whose choices to place on the grid (repeatable)")
    ap.add_argument("--json", metavar="PATH", help="also write the results here")
    args = ap.parse_args(argv)
    profiles = [tuple(p.split("=", 1)) for p in args.profile]
    dtypes = ("float32", "float64") if args.dtype == "all" else (args.dtype,)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    results = {}
    t0 = time.perf_counter()
    with threadpool_limits(limits=1, user_api="blas"):
        for dt in dtypes:
            if args.mode == "threads":
                results[dt] = compare_threads(dt, profiles, args.rounds, say)
                continue
            named, mr, nr = named_points(dt, profiles)
            if args.mode == "3d":
                results[dt] = sweep_3d(dt, named, mr, nr, args.rounds, say)
            else:
                results[dt] = sweep_2d(dt, named, mr, nr, args.rounds, say,
                                       joint=args.objective == "joint")
    print(f"\n({time.perf_counter() - t0:.0f} s; {args.rounds} interleaved anchored rounds on a "
          "machine shared with other processes)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
