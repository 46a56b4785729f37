"""Convolution forward (inference) beside PyTorch's oneDNN on the layers of issue 12.

float32, both libraries held to the same threads, calls interleaved (torch, microtile, ...,
in a random order each repetition), medians; every microtile result is checked against
torch's.  ``--backward`` also times each layer's forward + backward (dx, dw, db).
Ratio = torch / microtile.

``--algorithm`` forces microtile's algorithm through ``config_context(conv_algorithm=...)``
(a comma-separated list times each, interleaved with torch: ``--algorithm
auto,im2col,winograd``); the "algorithm" column is what actually ran (an algorithm that
does not apply to a layer leaves it to the built-in rule).  ``--layers`` keeps the layers
whose name contains any of the given comma-separated words.

    PYTHONPATH=src python tools/bench_conv_inference.py [--threads 2] [--reps 9] [--backward]
        [--algorithm auto] [--layers "3x3 C"]
"""
import argparse
import random
import statistics
import time

import numpy as np

import microtile as mt

# name: (N, C, H, W, K, R, stride, padding, groups)
LAYERS = {
    "resnet 3x3 C64 56x56 b8": (8, 64, 56, 56, 64, 3, 1, 1, 1),
    "resnet 3x3 C128 28x28 b8": (8, 128, 28, 28, 128, 3, 1, 1, 1),
    "resnet 3x3 C256 14x14 b8": (8, 256, 14, 14, 256, 3, 1, 1, 1),
    "resnet conv1 7x7/2 b1": (1, 3, 224, 224, 64, 7, 2, 3, 1),
    "resnet 3x3 C64 56x56 b1": (1, 64, 56, 56, 64, 3, 1, 1, 1),
    "resnet 3x3 C128 28x28 b1": (1, 128, 28, 28, 128, 3, 1, 1, 1),
    "resnet 3x3 C256 14x14 b1": (1, 256, 14, 14, 256, 3, 1, 1, 1),
    "mobilenet dw 3x3 C32 112x112 b8": (8, 32, 112, 112, 32, 3, 1, 1, 32),
    "mobilenet dw 3x3/2 C144 56x56 b8": (8, 144, 56, 56, 144, 3, 2, 1, 144),
    "mobilenet dw 3x3 C512 14x14 b8": (8, 512, 14, 14, 512, 3, 1, 1, 512),
    "mobilenet dw 3x3 C96 112x112 b1": (1, 96, 112, 112, 96, 3, 1, 1, 96),
    "resnext 3x3 g32 C256 28x28 b8": (8, 256, 28, 28, 256, 3, 1, 1, 32),
}


def _median(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--algorithm", default="auto",
                    help="conv_algorithm to force; a comma-separated list times each")
    ap.add_argument("--layers", default="", help="comma-separated words a layer name must "
                    "contain one of (default: every layer)")
    args = ap.parse_args(argv)
    algorithms = [a.strip() for a in args.algorithm.split(",") if a.strip()]
    words = [w.strip() for w in args.layers.split(",") if w.strip()]
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(args.threads)
    mt.set_num_threads(args.threads)
    print(f"conv2d float32, {args.threads} threads, torch {torch.__version__}, medians of "
          f"{args.reps} interleaved calls; ratio = torch time / microtile time")
    print(f"{'layer':>34} {'algorithm':>9} {'mt ms':>8} {'torch ms':>9} {'fwd':>6}"
          + (f" {'fwd+bwd':>8}" if args.backward else ""))
    rng = np.random.default_rng(0)
    from microtile.conv._conv import last_plan
    for name, (n, c, h, w, k, r, s, p, g) in LAYERS.items():
        if words and not any(word in name for word in words):
            continue
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
        wt = (rng.standard_normal((k, c // g, r, r)) * 0.1).astype(np.float32)
        b = rng.standard_normal(k).astype(np.float32)
        tx, tw, tb = torch.from_numpy(x), torch.from_numpy(wt), torch.from_numpy(b)

        def f_t():
            with torch.no_grad():
                return F.conv2d(tx, tw, tb, stride=s, padding=p, groups=g)
        ty = f_t()
        fns, used = [], []
        for algo in algorithms:
            def f_mt(algo=algo):
                with mt.config_context(conv_algorithm=algo):
                    return mt.conv2d(x, wt, b, stride=s, padding=p, groups=g)
            y = f_mt()
            np.testing.assert_allclose(y, ty.numpy(), rtol=1e-3, atol=1e-3)
            used.append((last_plan() or {}).get("algorithm", "?"))
            fns.append(f_mt)
        # The call right after another library's is slowed by that library's threads
        # still spinning (measured: the same Winograd call 19.4 ms right after torch, 13.8
        # ms after another microtile call), so every repetition runs the calls in a fresh
        # random order (a rotation would keep the same neighbours).
        calls = [f_t] + fns
        times = [[] for _ in calls]
        order = list(range(len(calls)))
        shuffle = random.Random(12).shuffle
        for rep in range(args.reps):
            shuffle(order)
            for i in order:
                times[i].append(_median(calls[i], 1))
        m_t = statistics.median(times[0])
        for i, f_mt in enumerate(fns):
            m_mt = statistics.median(times[i + 1])
            row = (f"{name:>34} {used[i]:>9} {m_mt * 1e3:8.3f} {m_t * 1e3:9.3f} "
                   f"{m_t / m_mt:6.2f}")
            if args.backward:
                row += " " + _fwd_bwd(x, wt, b, s, p, g, y.shape, tx, tw, tb, rng,
                                      args.reps, algorithms[i])
            print(row, flush=True)


def _fwd_bwd(x, wt, b, s, p, g, yshape, tx, tw, tb, rng, reps, algo):
    """torch / microtile of forward + backward (dx, dw, db), checked, as a column."""
    import torch
    import torch.nn.functional as F
    dy = rng.standard_normal(yshape).astype(np.float32)
    tdy = torch.from_numpy(dy)
    txg = tx.clone().requires_grad_(True)
    twg = tw.clone().requires_grad_(True)
    tbg = tb.clone().requires_grad_(True)

    def b_mt():
        with mt.config_context(conv_algorithm=algo):
            mt.conv2d(x, wt, b, stride=s, padding=p, groups=g)
            return mt.conv2d_backward(dy, x, wt, stride=s, padding=p, groups=g)

    def b_t():
        out = F.conv2d(txg, twg, tbg, stride=s, padding=p, groups=g)
        txg.grad = twg.grad = tbg.grad = None
        out.backward(tdy)
        return txg.grad, twg.grad, tbg.grad
    got, ref = b_mt(), b_t()
    for a, e in zip(got, ref):
        np.testing.assert_allclose(a, e.numpy(), rtol=1e-3, atol=1e-2)
    tb_mt, tb_t = [], []
    for rep in range(reps):
        pair = ((b_t, tb_t), (b_mt, tb_mt))
        for f, acc in (pair if rep % 2 == 0 else pair[::-1]):
            acc.append(_median(f, 1))
    return f"{statistics.median(tb_t) / statistics.median(tb_mt):8.2f}"


if __name__ == "__main__":
    main()
