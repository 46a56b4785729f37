"""GEMM beside NumPy in the three conditions users meet (a benchmark, not a test).

    alone        blocks of calls of one library, 0.3 s pause before each block: no
                 interference, each library's best.
    interleaved  single calls alternating microtile, NumPy, microtile, ... back to back:
                 each call starts while the other library's workers may still spin.
    loaded       a separate process keeps one core busy the whole time; each library at 1
                 and at 2 threads, blocks interleaved.

Both libraries are held to the same thread count (threadpoolctl); every timed result is
checked against a float64 product.  Ratios are microtile / NumPy of median times.

    python tools/bench_threads.py [--dtypes float32 float64] [--threads 1 2] [--rounds 7]
                                  [--modes alone interleaved loaded] [--shapes 256x256x256 ...]
    python tools/bench_threads.py --torch     # conv2d forward, CNN and MLP steps beside torch

With ``--torch`` the other library is PyTorch (same threads, float32): a conv2d forward
(ResNet 3x3, 64 channels, 56x56, batch 8), bench_nn.py's CNN training step, the
784-1024-1024-10 MLP training step at batch 256 and bench_rnn.py's first case (LSTM
128->256, T 50, batch 32) forward+backward; ratios are torch time / microtile time.
"""
import argparse
import statistics
import subprocess
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

import microtile as mt
from microtile._bench import check_gemm

SHAPES = ["256x256x256", "512x512x512", "1024x1024x1024", "256x4096x784", "4096x256x64",
          "3136x64x576", "256x1024x784", "32x1024x784"]
HOG = "while True:\n    pass\n"


def _operands(shape, dtype, seed=0):
    m, n, k = (int(v) for v in shape.split("x"))
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    return a, b, 2.0 * m * n * k


def _calls(a, b):
    out_mt = np.empty((a.shape[0], b.shape[1]), a.dtype)
    out_np = np.empty_like(out_mt)
    return (lambda: mt.gemm(a, b, out=out_mt)), (lambda: np.matmul(a, b, out=out_np)), \
        out_mt, out_np


def _block(fn, reps):
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def _reps(fn, budget):
    fn()
    return max(1, int(budget / max(_block(fn, 1), 1e-7)))


def blocks(fns, rounds, budget, gap):
    """Median seconds per call of each function, in blocks alternating between them."""
    reps = [_reps(f, budget) for f in fns]
    times = [[] for _ in fns]
    for r in range(rounds):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            if gap:
                time.sleep(gap)
            times[i].append(_block(fns[i], reps[i]))
    return [statistics.median(t) for t in times]


def alternating(f_mt, f_np, calls):
    """Median seconds per call when the two libraries' calls alternate one by one."""
    t_mt, t_np = [], []
    f_mt(), f_np()
    for _ in range(calls):
        for times, fn in ((t_mt, f_mt), (t_np, f_np)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(t_mt), statistics.median(t_np)


def _torch_cases():
    """(label, microtile call, torch call, check) for --torch."""
    import os
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_nn
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 64, 56, 56)).astype(np.float32)
    w = (rng.standard_normal((64, 64, 3, 3)) * 0.05).astype(np.float32)
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    out = {}

    def conv_mt():
        out["mt"] = mt.conv2d(x, w, padding=1)

    def conv_t():
        with torch.no_grad():
            out["t"] = torch.nn.functional.conv2d(tx, tw, padding=1)

    def conv_check():
        np.testing.assert_allclose(out["mt"], out["t"].numpy(), rtol=1e-3, atol=1e-3)
    cases = [("conv2d fwd 3x3 C64 56x56 b8", conv_mt, conv_t, conv_check)]
    model, tmodel = bench_nn.cnn_pair(torch)
    cx = rng.standard_normal((bench_nn.CNN["batch"], 1, 28, 28)).astype(np.float32)
    cy = rng.integers(0, 10, bench_nn.CNN["batch"])
    f, g = bench_nn.steps(model, tmodel, cx, cy, torch)
    cases.append(("CNN step b64", f, g, lambda: None))
    model, tmodel = bench_nn.mlp_pair((784, 1024, 1024, 10), torch)
    mx = rng.standard_normal((256, 784)).astype(np.float32)
    my = rng.integers(0, 10, 256)
    f, g = bench_nn.steps(model, tmodel, mx, my, torch)
    cases.append(("MLP 784-1024-1024-10 step b256", f, g, lambda: None))
    # bench_rnn.py's first case (the LSTM), forward and backward, its dx checked.
    import bench_rnn
    label, kind, f_in, hid, layers, T, batch = bench_rnn.CASES[0]
    tl = getattr(torch.nn, kind)(f_in, hid, num_layers=layers)
    ml = getattr(mt.nn, kind)(f_in, hid, num_layers=layers)
    ml.load_state_dict({k: v.detach().numpy() for k, v in tl.state_dict().items()})
    sx = rng.standard_normal((T, batch, f_in)).astype(np.float32)
    sdy = np.ones((T, batch, hid), np.float32)
    tsx = torch.from_numpy(sx).requires_grad_(True)
    tsdy = torch.from_numpy(sdy)

    def lstm_mt():
        ml.zero_grad()
        ml.forward(sx)
        out["lstm_mt"] = ml.backward(sdy)

    def lstm_t():
        tl.zero_grad()
        tsx.grad = None
        tl(tsx)[0].backward(tsdy)
        out["lstm_t"] = tsx.grad

    def lstm_check():
        np.testing.assert_allclose(out["lstm_mt"], out["lstm_t"].numpy(), rtol=1e-3,
                                   atol=1e-3)
    cases.append((f"{label} fwd+bwd", lstm_mt, lstm_t, lstm_check))
    return cases, torch


def torch_main(args):
    cases, torch = _torch_cases()
    print(f"microtile {mt.__version__} beside torch {torch.__version__}, float32, "
          f"{args.rounds} rounds, medians; ratio = torch time / microtile time; loaded: "
          f"ms at 1 and 2 threads")
    print(f"{'case':>32} | " + " ".join(f"alone {t}t" for t in args.threads) + " | "
          + " ".join(f"inter {t}t" for t in args.threads)
          + f" | {'loaded mt ms 1t/2t':>18} {'torch 1t/2t':>13}")
    hog = None
    try:
        for label, f_mt, f_t, check in cases:
            row = f"{label:>32} |"
            for mode in ("alone", "interleaved", "loaded"):
                if mode == "loaded":
                    hog = subprocess.Popen([sys.executable, "-c", HOG])
                    time.sleep(0.5)
                    # One thread count at a time: torch rebuilds its OpenMP team when
                    # set_num_threads changes, which must not be timed.
                    med = []
                    for t in args.threads:
                        torch.set_num_threads(t)
                        with mt.config_context(threads=t):
                            med += blocks([f_mt, f_t], args.rounds, args.budget, 0.0)
                    row += (" | " + "/".join(f"{v * 1e3:.2f}" for v in med[0::2]).rjust(18)
                            + " " + "/".join(f"{v * 1e3:.2f}" for v in med[1::2]).rjust(13))
                    hog.kill()
                    hog.wait()
                    hog = None
                    continue
                cells = []
                for t in args.threads:
                    torch.set_num_threads(t)
                    with mt.config_context(threads=t):
                        if mode == "alone":
                            s_mt, s_t = blocks([f_mt, f_t], args.rounds, args.budget, 0.3)
                        else:
                            calls = max(15, int(args.rounds * args.budget /
                                                max(_block(f_t, 1), 1e-6)))
                            s_mt, s_t = alternating(f_mt, f_t, min(calls, 300))
                    cells.append(f"{s_t / s_mt:7.2f}")
                row += " " + " ".join(cells)
                check()
            print(row, flush=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shapes", nargs="+", default=SHAPES)
    p.add_argument("--modes", nargs="+", default=["alone", "interleaved", "loaded"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--budget", type=float, default=0.08, help="seconds per block")
    p.add_argument("--torch", action="store_true",
                   help="conv2d forward, CNN/MLP steps and an LSTM beside torch instead of "
                        "GEMMs")
    args = p.parse_args(argv)
    if args.torch:
        return torch_main(args)
    print(f"microtile {mt.__version__}, isa {mt.get_config()['isa']}, "
          f"profile {mt.get_config()['profile_status']}, {args.rounds} rounds, medians; "
          f"ratio = microtile / NumPy GFLOP/s; loaded: GFLOP/s at 1 and 2 threads")
    head = f"{'shape':>15} {'dtype':>8}"
    for mode in args.modes:
        if mode == "loaded":
            head += f" | {'loaded mt 1t/2t':>16} {'np 1t/2t':>12}"
        else:
            head += " | " + " ".join(f"{mode[:5]} {t}t" for t in args.threads)
    print(head)
    hog = None
    try:
        for dtype in args.dtypes:
            for shape in args.shapes:
                a, b, flops = _operands(shape, dtype)
                f_mt, f_np, out_mt, out_np = _calls(a, b)
                row = f"{shape:>15} {dtype:>8}"
                for mode in args.modes:
                    if mode == "loaded":
                        if hog is None:
                            hog = subprocess.Popen([sys.executable, "-c", HOG])
                            time.sleep(0.5)
                        fns, labels = [], []
                        for t in args.threads:
                            def lim_mt(t=t):
                                with mt.config_context(threads=t):
                                    f_mt()

                            def lim_np(t=t):
                                with threadpool_limits(t):
                                    f_np()
                            fns += [lim_mt, lim_np]
                        med = blocks(fns, args.rounds, args.budget, 0.0)
                        g = [flops / s / 1e9 for s in med]
                        row += (" | " + "/".join(f"{v:.1f}" for v in g[0::2]).rjust(16) + " "
                                + "/".join(f"{v:.1f}" for v in g[1::2]).rjust(12))
                    else:
                        if hog is not None:
                            hog.kill()
                            hog.wait()
                            hog = None
                        cells = []
                        for t in args.threads:
                            with threadpool_limits(t), mt.config_context(threads=t):
                                if mode == "alone":
                                    s_mt, s_np = blocks([f_mt, f_np], args.rounds, args.budget,
                                                        0.3)
                                else:
                                    calls = max(15, int(args.rounds * args.budget /
                                                        max(_block(f_np, 1), 1e-6)))
                                    s_mt, s_np = alternating(f_mt, f_np, min(calls, 400))
                            cells.append(f"{s_np / s_mt:7.2f}")
                        row += " | " + " ".join(cells)
                    check_gemm(out_mt, a, b)
                    check_gemm(out_np, a, b)
                print(row, flush=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


if __name__ == "__main__":
    main()
