"""GEMM throughput beside NumPy (OpenBLAS), interleaved, medians (a benchmark, not a test).

The measurement itself is ``microtile._bench.gemm_beside_numpy`` (threadpoolctl holds both
libraries to the same thread count; results are checked).  ``--gap 0`` shows what a program
that alternates the two libraries back to back sees: each loses a core to the other's
spinning workers for a while.

    python tools/bench_gemm.py [--threads 1 2] [--sizes 64 256 1024 2048] [--gap 0.3]
"""
import argparse

import microtile as mt
from microtile._bench import gemm_beside_numpy

SHAPES_SKINNY = [(256, 4096, 784), (4096, 256, 64), (3136, 64, 576)]


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
                g_mt, g_np = gemm_beside_numpy(m, n, k, dtype, threads, args.rounds,
                                               args.gap, trans, budget=0.15)
                label = f"{m}x{n}x{k}" + ("ᵀ" if trans else "")
                print(f"{label:>18} {dtype:>8} {threads:>3} {g_mt:10.1f} {g_np:8.1f} "
                      f"{g_mt / g_np:6.2f}", flush=True)


if __name__ == "__main__":
    main()
