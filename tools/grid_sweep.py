"""Exhaustive grid over microtile's blocking (mc, kc, nc) on this machine: how close do the
tuner's choices come to the grid's best?  (Not run in CI: a few minutes of timing.)

The objectives are the tuner's own (``autotune.search``):
  * (mc, kc) on the square 1024^3 GEMM, single-threaded, nc fixed;
  * nc on the wide GEMM the nc step uses (all usable CPUs, rows split between them), at
    the re-measured best (mc, kc).
``--mode 3d`` instead times the full product mc x kc x nc on the geometric mean of both.

Named points are timed in the same interleaved rounds as the grid: the analytical model's
values, BLIS's zen3 table, and the choices in any profiles given with ``--profile NAME=PATH``
(for example the ``--quick`` and the full run's).  Each is reported as a fraction of the
grid's best, then again after the grid's top five and the named points are re-measured
together (the maximum of a noisy grid is biased upwards); the goal is within 3 %.
``--mode threads`` times the named configurations whole, on all usable CPUs, at reference
shapes.

    flock -x /tmp/microtile-bench.lock python tools/grid_sweep.py --dtype float32 \\
        --profile quick=/tmp/quick.json --profile full=/tmp/full.json

On a shared machine the figures carry the other processes' noise: upper quartiles of
interleaved rounds damp it, they do not remove it.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

sys.path[:0] = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), p)
                for p in ("src", "")]

import microtile  # noqa: E402
from microtile import _config, _dispatch, _hwinfo  # noqa: E402
from autotune import measure, search  # noqa: E402

BLIS_ZEN3 = {"float32": {"mc": 144, "kc": 256, "nc": 4080},
             "float64": {"mc": 72, "kc": 256, "nc": 4080}}
GRID = {
    "float32": {"mc": [48, 96, 144, 192, 288, 390, 582, 780, 1164],
                "kc": [128, 168, 256, 384, 512, 672, 768, 896, 1024],
                "nc": [512, 1024, 2048, 3072, 4096]},
    "float64": {"mc": [24, 48, 72, 96, 144, 192, 288, 384, 576],
                "kc": [128, 168, 256, 384, 512, 672, 768, 896, 1024],
                "nc": [336, 512, 1024, 1792, 2560, 4096]},
}


def measure_points(problem, points, rounds, base, seed=0, say=print):
    """GFLOP/s per point (a dict of overrides): the upper quartile of its samples, as the
    tuner scores; rounds visit every point in a new random order; every point's output is
    checked first."""
    rng = np.random.default_rng(seed)
    for p in points:
        err = measure.check(problem, {**base, **p})
        if err > 1.0:
            raise SystemExit(f"{p}: wrong result ({err:.3g} x the bound)")
    samples = [[] for _ in points]
    t0 = time.perf_counter()
    for r in range(rounds):
        for i in rng.permutation(len(points)):
            samples[i].append(measure.gflops(problem, {**base, **points[int(i)]}))
        say(f"  round {r + 1}/{rounds} done ({time.perf_counter() - t0:.0f} s)")
    return [measure.upper_quartile(s) for s in samples]


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
        print(f"    {search._fmt({k: points[i][k] for k in key_fields}):28} "
              f"{values[i]:7.1f} GFLOP/s  {values[i] / values[best]:6.1%}")
    out = {"grid_best": {"point": points[best], "gflops": values[best]}, "named": {}}
    for name, p in named.items():
        i = points.index(p)
        frac = values[i] / values[best]
        out["named"][name] = {"point": p, "gflops": values[i], "of_best": frac}
        mark = "within 3 %" if frac >= 0.97 else "MORE than 3 % below"
        print(f"  {name:22} {search._fmt({k: p[k] for k in key_fields}):28} "
              f"{values[i]:7.1f} GFLOP/s  {frac:6.1%} of the grid's best ({mark})")
    return out


def confirm(title, problem, base, grid_points, grid_values, named, key_fields, rounds, say,
            top=5):
    """Re-measure the grid's top few beside the named points in fresh rounds: the best of
    many noisy measurements is biased upwards (the winner's curse), so the named points are
    judged against the re-measured best, not the sweep's maximum."""
    order = sorted(range(len(grid_points)), key=lambda i: -grid_values[i])
    pts = [grid_points[i] for i in order[:top]]
    for p in named.values():
        if p not in pts:
            pts.append(p)
    say(f"confirming: {len(pts)} points, {rounds} rounds")
    vals = measure_points(problem, pts, rounds, base, seed=1, say=say)
    best = max(range(len(pts)), key=lambda i: vals[i])
    print(f"\n{title} (re-measured: the grid's top {top} beside the named points)")
    out = {"best": {"point": pts[best], "gflops": vals[best]}, "named": {}}
    for i in range(min(top, len(order))):
        print(f"    grid #{i + 1} {search._fmt({k: pts[i][k] for k in key_fields}):24} "
              f"{vals[i]:7.1f} GFLOP/s  {vals[i] / vals[best]:6.1%}")
    for name, p in named.items():
        i = pts.index(p)
        frac = vals[i] / vals[best]
        out["named"][name] = {"point": p, "gflops": vals[i], "of_best": frac}
        mark = "within 3 %" if frac >= 0.97 else "MORE than 3 % below"
        print(f"  {name:22} {search._fmt({k: p[k] for k in key_fields}):28} "
              f"{vals[i]:7.1f} GFLOP/s  {frac:6.1%} of the best ({mark})")
    return out


def sweep_2d(dtype, named, mr, nr, rounds, say):
    g = GRID[dtype]
    nc_fix = _config.defaults(dtype)["nc"]
    prob = measure.Problem(search.OBJECTIVE_N, search.OBJECTIVE_N, search.OBJECTIVE_N, dtype)
    pts = [{"mc": m, "kc": k} for m in g["mc"] for k in g["kc"]]
    for p in named.values():
        q = {"mc": p["mc"], "kc": p["kc"]}
        if q not in pts:
            pts.append(q)
    say(f"{dtype}: (mc, kc) grid of {len(pts)} points on {prob}, 1 thread, nc={nc_fix}")
    vals = measure_points(prob, pts, rounds, {"threads": 1, "nc": nc_fix}, say=say)
    named_mk = {n: {"mc": p["mc"], "kc": p["kc"]} for n, p in named.items()}
    res_mk = report(f"{dtype} (mc, kc) on {prob}:", pts, vals, named_mk, ("mc", "kc"))
    res_mk["confirmed"] = confirm(f"{dtype} (mc, kc) on {prob}", prob,
                                  {"threads": 1, "nc": nc_fix}, pts, vals, named_mk,
                                  ("mc", "kc"), 2 * rounds, say)
    best = res_mk["confirmed"]["best"]["point"]
    ncs = sorted(set(g["nc"]) | {p["nc"] for p in named.values()})
    threads = _hwinfo.usable_cpus()
    prob2 = measure.Problem(*search.nc_shape(best, max(ncs), threads, mr, nr), dtype)
    pts2 = [{"nc": v} for v in ncs]
    say(f"{dtype}: nc sweep of {len(pts2)} values on {prob2}, {threads} threads, at "
        f"mc={best['mc']} kc={best['kc']}")
    vals2 = measure_points(prob2, pts2, rounds, search.nc_base(best, threads), say=say)
    res_nc = report(f"{dtype} nc on {prob2}, {threads} threads (mc={best['mc']}, "
                    f"kc={best['kc']}):", pts2, vals2,
                    {n_: {"nc": p["nc"]} for n_, p in named.items()}, ("nc",))
    return {"mc_kc": res_mk, "nc": res_nc}


def sweep_3d(dtype, named, mr, nr, rounds, say):
    g = GRID[dtype]
    sq = measure.Problem(search.OBJECTIVE_N, search.OBJECTIVE_N, search.OBJECTIVE_N, dtype)
    wide = measure.Problem(1024, search.snap(1.25 * max(g["nc"]), nr, nr, 1 << 14), 512, dtype)
    pts = [{"mc": m, "kc": k, "nc": c} for m in g["mc"] for k in g["kc"] for c in g["nc"]]
    pts += [p for p in named.values() if p not in pts]
    say(f"{dtype}: full grid of {len(pts)} points, geometric mean of {sq} and {wide}")
    a = measure_points(sq, pts, rounds, {"threads": 1}, say=say)
    b = measure_points(wide, pts, rounds, {"threads": 1}, say=say)
    vals = [math.sqrt(x * y) for x, y in zip(a, b)]
    return {"mc_kc_nc": report(f"{dtype} (mc, kc, nc), geometric mean:", pts, vals, named,
                               ("mc", "kc", "nc"))}


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
        vals = measure_points(prob, pts, rounds, {"threads": threads}, say=say)
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
    ap.add_argument("--mode", choices=("2d", "3d", "threads"), default="2d",
                    help="2d: (mc, kc) grid then nc; 3d: the full product; threads: the "
                         "named configurations on all CPUs at reference shapes")
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
            fn = sweep_3d if args.mode == "3d" else sweep_2d
            results[dt] = fn(dt, named, mr, nr, args.rounds, say)
    print(f"\n({time.perf_counter() - t0:.0f} s; upper quartiles of {args.rounds} interleaved "
          "rounds on a machine shared with other processes)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
