"""Benchmark microtile's conv2d against PyTorch's CPU convolution (not a test).

Both libraries run in this process held to the same thread count (torch.set_num_threads and
microtile.set_num_threads); runs are interleaved (torch, microtile, torch, ...) so drift in
machine load hits both alike, and medians are reported.  Every timed microtile result is
checked against torch's.  Finally the peak memory of a forward pass at N = 64 is measured with
tracemalloc (NumPy reports its allocations to it) and compared with output + workspace cap.

    PYTHONPATH=src:. python tools/bench_conv.py [--threads 2] [--reps 7] [--layers a,b]
"""
import argparse
import math
import pathlib
import statistics
import sys
import time
import tracemalloc

import numpy as np

import microtile as mt

# The layer table is the asv suite's, so both time the same layers.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from asv_benchmarks.benchmarks.bench_conv import LAYERS, flops  # noqa: E402


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_layer(name, layer, n, reps, torch, F):
    C, H, K, R, s, p = layer
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, C, H, H), dtype=np.float32)
    w = (rng.standard_normal((K, C, R, R), dtype=np.float32) / math.sqrt(C * R * R))
    b = rng.standard_normal(K, dtype=np.float32)
    xt, wt, bt = (torch.from_numpy(a).requires_grad_(True) for a in (x, w, b))
    y_ref = F.conv2d(xt, wt, bt, stride=s, padding=p)
    dy = rng.standard_normal(tuple(y_ref.shape), dtype=np.float32)
    dyt = torch.from_numpy(dy)

    def t_fwd():
        with torch.no_grad():
            F.conv2d(xt, wt, bt, stride=s, padding=p)

    def m_fwd():
        mt.conv2d(x, w, b, stride=s, padding=p)

    def t_all():
        xt.grad = wt.grad = bt.grad = None
        F.conv2d(xt, wt, bt, stride=s, padding=p).backward(dyt)

    def m_all():
        mt.conv2d(x, w, b, stride=s, padding=p)
        mt.conv2d_backward(dy, x, w, stride=s, padding=p)

    # Correctness of what is being timed.
    y = mt.conv2d(x, w, b, stride=s, padding=p)
    t_all()
    dx, dw, db = mt.conv2d_backward(dy, x, w, stride=s, padding=p)
    for got, ref, what in ((y, y_ref.detach().numpy(), "y"), (dx, xt.grad.numpy(), "dx"),
                           (dw, wt.grad.numpy(), "dw"), (db, bt.grad.numpy(), "db")):
        scale = np.abs(ref).max() + 1e-30
        err = np.abs(got - ref).max() / scale
        if not err < 1e-3:
            sys.exit(f"{name}: {what} differs from torch (max rel err {err:.2e})")

    out = {}
    for phase, tf, mf in (("fwd", t_fwd, m_fwd), ("fwd+bwd", t_all, m_all)):
        tf(), mf()  # warm-up
        tt, mm = [], []
        for _ in range(reps):
            tt.append(_time(tf))
            mm.append(_time(mf))
        out[phase] = (statistics.median(tt), statistics.median(mm))
    return out


def peak_memory(name, layer, n):
    C, H, K, R, s, p = layer
    x = np.random.default_rng(1).standard_normal((n, C, H, H), dtype=np.float32)
    w = np.random.default_rng(2).standard_normal((K, C, R, R), dtype=np.float32)
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    y = mt.conv2d(x, w, stride=s, padding=p)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    cap = mt.get_config()["conv_workspace"]
    return peak, y.nbytes, cap


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--layers", default=",".join(LAYERS))
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(args.threads)
    mt.set_num_threads(args.threads)
    names = args.layers.split(",")
    print(f"float32, N={args.n}, threads={args.threads}, medians of {args.reps} interleaved "
          f"runs; torch {torch.__version__}, microtile {mt.__version__} "
          f"({mt.get_config()['isa']})")
    head = (f"{'layer':15s} {'phase':8s} {'torch ms':>9s} {'mt ms':>9s} {'torch GF/s':>10s} "
            f"{'mt GF/s':>9s} {'ratio':>6s}")
    print(head)
    print("-" * len(head))
    ratios = {"fwd": [], "fwd+bwd": []}
    for name in names:
        layer = LAYERS[name]
        res = bench_layer(name, layer, args.n, args.reps, torch, F)
        for phase, (tt, mm) in res.items():
            fl = flops(args.n, layer) * (3 if phase == "fwd+bwd" else 1)
            ratios[phase].append(tt / mm)
            print(f"{name:15s} {phase:8s} {tt * 1e3:9.2f} {mm * 1e3:9.2f} {fl / tt / 1e9:10.1f} "
                  f"{fl / mm / 1e9:9.1f} {tt / mm:6.2f}")
        sys.stdout.flush()
    for phase, r in ratios.items():
        print(f"geometric mean ratio (torch time / microtile time), {phase}: "
              f"{math.exp(sum(map(math.log, r)) / len(r)):.2f}")
    if not args.no_memory:
        for name in ("resnet_conv1", "resnet_3x3_56", "late_3x3_7"):
            from microtile.conv import _conv
            _conv.release_workspace()   # measure the workspace too, not a kept one
            peak, outb, cap = peak_memory(name, LAYERS[name], 64)
            print(f"peak memory, forward N=64, {name}: {peak / 2**20:.1f} MiB "
                  f"(output {outb / 2**20:.1f} MiB + cap {cap / 2**20:.1f} MiB = "
                  f"{(outb + cap) / 2**20:.1f} MiB) {'OK' if peak <= outb + cap else 'OVER'}")


if __name__ == "__main__":
    main()
