"""GEMM throughput beside NumPy (OpenBLAS), interleaved, medians (a benchmark, not a test).

Both libraries are held to the same thread count with threadpoolctl.  OpenBLAS and libgomp
workers spin for a while after a call, so running one library right after the other on a
2-core machine takes a core from the second; `--gap` seconds of sleep between switching
libraries lets the other side's workers go to sleep first (0 shows what a program that mixes
the two back to back sees).  Each timed result is checked against a float64 reference.

    python tools/bench_gemm.py [--threads 1 2] [--sizes 64 256 1024 2048] [--gap 0.3]
"""
import argparse
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits

import microtile as mt

SHAPES_SKINNY = [(256, 4096, 784), (4096, 256, 64), (3136, 64, 576)]


def _time(fn, reps):
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def measure(m, n, k, dtype, threads, rounds=7, gap=0.3, trans=False, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, m) if trans else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans else (k, n)).astype(dtype)
    out_mt = np.empty((m, n), dtype)
    out_np = np.empty((m, n), dtype)
    flops = 2.0 * m * n * k
    reps = max(1, int(0.15 / max(flops / 50e9, 1e-7)))
    if trans:
        f_mt = lambda: mt.gemm(a, b, trans_a=True, trans_b=True, out=out_mt)
        f_np = lambda: np.matmul(a.T, b.T, out=out_np)
    else:
        f_mt = lambda: mt.gemm(a, b, out=out_mt)
        f_np = lambda: np.matmul(a, b, out=out_np)
    t_mt, t_np = [], []
    with threadpool_limits(threads), mt.config_context(threads=threads):
        f_mt(), f_np()
        for r in range(rounds):
            order = (("mt", f_mt), ("np", f_np)) if r % 2 == 0 else (("np", f_np), ("mt", f_mt))
            for name, fn in order:
                if gap:
                    time.sleep(gap)
                (t_mt if name == "mt" else t_np).append(_time(fn, reps))
    ref = (a.T if trans else a).astype(np.float64) @ (b.T if trans else b).astype(np.float64)
    scale = (np.abs(a).astype(np.float64).T if trans else np.abs(a).astype(np.float64)) @ \
        (np.abs(b).T if trans else np.abs(b))
    err = np.max(np.abs(out_mt - ref) / np.maximum(scale, 1e-300))
    if not err <= 2 * k * np.finfo(dtype).eps:
        raise AssertionError(f"wrong result at {m}x{n}x{k} {dtype}: rel err {err:.2e}")
    g_mt = flops / statistics.median(t_mt) / 1e9
    g_np = flops / statistics.median(t_np) / 1e9
    return g_mt, g_np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024, 2048])
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    p.add_argument("--gap", type=float, default=0.3)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--skinny", action="store_true", help="also the skinny shapes")
    p.add_argument("--trans", action="store_true", help="also transposed inputs")
    args = p.parse_args(argv)
    print(f"microtile {mt.__version__}, isa {mt.get_config()['isa']}, gap {args.gap}s, "
          f"{args.rounds} interleaved rounds, medians")
    print(f"{'shape':>18} {'dtype':>8} {'thr':>3} {'microtile':>10} {'numpy':>8} {'ratio':>6}")
    for threads in args.threads:
        for dtype in args.dtypes:
            cases = [((n, n, n), False) for n in args.sizes]
            if args.trans:
                cases += [((n, n, n), True) for n in args.sizes if n >= 256]
            if args.skinny:
                cases += [(s, False) for s in SHAPES_SKINNY]
            for (m, n, k), trans in cases:
                g_mt, g_np = measure(m, n, k, np.dtype(dtype), threads, args.rounds, args.gap,
                                     trans)
                label = f"{m}x{n}x{k}" + ("ᵀ" if trans else "")
                print(f"{label:>18} {dtype:>8} {threads:>3} {g_mt:10.1f} {g_np:8.1f} "
                      f"{g_mt / g_np:6.2f}", flush=True)


if __name__ == "__main__":
    main()
