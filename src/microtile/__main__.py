"""``python -m microtile``: what microtile runs with here, and a short GEMM table beside NumPy."""
import argparse
import sys


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m microtile",
                                description="Show microtile's configuration and a short "
                                            "GEMM benchmark beside NumPy.")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--no-bench", action="store_true", help="configuration only")
    args = p.parse_args(argv)
    if any(s < 1 for s in args.sizes):
        p.error("sizes must be positive")

    import microtile as mt
    from microtile._bench import gemm_beside_numpy

    cfg = mt.get_config()
    print(f"microtile {cfg['version']}")
    print(f"  isa       {cfg['isa']} (available: {', '.join(mt.available_isas())})")
    print(f"  threads   {cfg['threads']}")
    print(f"  profile   {cfg['profile_status']}" + (f" ({cfg['profile']})" if cfg['profile'] else ""))
    print(f"  {'dtype':8} {'mr':>3} {'nr':>3} {'mc':>5} {'kc':>5} {'nc':>6} {'split':>6} "
          f"{'thread_mnk':>11}")
    for dt in ("float32", "float64"):
        b = cfg[dt]
        print(f"  {dt:8} {b['mr']:3d} {b['nr']:3d} {b['mc']:5d} {b['kc']:5d} {b['nc']:6d} "
              f"{b['split']:>6} {b['thread_mnk']:11d}")
    if args.no_bench:
        return 0
    threads = sorted({1, cfg["threads"]})
    print("\nGEMM, square n x n x n, GFLOP/s (medians of interleaved runs, results checked)")
    print(f"  {'n':>5} {'dtype':8} {'thr':>3} {'microtile':>10} {'numpy':>8} {'ratio':>6}")
    for t in threads:
        for dt in ("float32", "float64"):
            for n in args.sizes:
                g_mt, g_np = gemm_beside_numpy(n, n, n, dt, threads=t, rounds=3, gap=0.05,
                                               budget=0.05)
                print(f"  {n:5d} {dt:8} {t:3d} {g_mt:10.1f} {g_np:8.1f} {g_mt / g_np:6.2f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
