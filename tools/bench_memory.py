"""Memory-bound layers against the machine's memory bandwidth, beside PyTorch (CPU).

Issue 14's cases: BatchNorm2d forward+backward (train mode) on (32, 64, 56, 56), Dropout and
the activations forward and backward on 10^7 float32 elements.  Each is reported as its time
over the time a copy kernel needs to move the same bytes once (the least any implementation
must move: read every input once, write every output once), so 1.0 is the bandwidth bound and
issue 14's goal is at most 1.5.  The copy is microtile's own threaded copy (the identity
activation on the thread pool, the same threads as the layers), timed on arrays of the
case's size, so the bound is the one these kernels see; NumPy's one-thread ``np.copyto``
is shown beside it.  Each case's rounds alternate with rounds of torch's and of the copy,
so the three see the same host: its memory bandwidth moved between 11 and 28 GB/s from
one run to the next here, and a bound measured minutes apart moved the ratio by as much.
Results are checked against torch before timing.

    flock -x /tmp/microtile-bench.lock python tools/bench_memory.py [--threads 2] [--rounds 7]

Not a test: the figures go in the issue's closing note.
"""
import argparse
import os
import sys

import numpy as np

import microtile
from microtile import nn
from microtile.nn._act_kernels import act_forward

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
from bench_nn import time_many  # noqa: E402  (one timing loop for the nn benchmarks)

ELEMENTS = 10 ** 7
BN_SHAPE = (32, 64, 56, 56)


class Copy:
    """microtile's threaded copy of ``nbytes`` (read nbytes/2, write nbytes/2), and
    NumPy's."""

    def __init__(self, nbytes):
        n = max(1, int(nbytes // 8))
        self.a = np.random.default_rng(1).standard_normal(n).astype(np.float32)
        self.b = np.empty_like(self.a)

    def microtile(self):
        act_forward(self.a, self.b, 0)

    def numpy(self):
        np.copyto(self.b, self.a)


def activation_cases(torch):
    """(name, microtile layer, torch layer, bytes forward, bytes backward)."""
    tnn = torch.nn
    return [
        ("ReLU", nn.ReLU(), tnn.ReLU()),
        ("LeakyReLU(0.01)", nn.LeakyReLU(0.01), tnn.LeakyReLU(0.01)),
        ("GELU", nn.GELU(), tnn.GELU()),
        ("GELU(tanh)", nn.GELU("tanh"), tnn.GELU("tanh")),
        ("SiLU", nn.SiLU(), tnn.SiLU()),
        ("Sigmoid", nn.Sigmoid(), tnn.Sigmoid()),
        ("Tanh", nn.Tanh(), tnn.Tanh()),
    ]


def check(got, ref, what, tol=1e-5):
    err = float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-30))
    if not err < tol:
        raise AssertionError(f"{what}: relative error {err:.2e} against torch")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per timed round")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_memory: PyTorch is not installed", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    microtile.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []     # (case, microtile s, torch s, bytes moved at least, copy s, NumPy copy s)
    copies = {}

    def measure(case, f, g, nbytes):
        """Rounds of f (microtile), g (torch) and the two copies of nbytes, alternating."""
        copy = copies.setdefault(nbytes, Copy(nbytes))
        rows.append((case, nbytes) + time_many((f, g, copy.microtile, copy.numpy),
                                               args.rounds, args.min_time))

    # BatchNorm2d, train mode: forward reads x and writes y; backward reads x and dy and
    # writes dx.  (The statistics pass reads x, and the backward's sums x and dy, a second
    # time: that is what the 1.5 allows.)
    x = rng.standard_normal(BN_SHAPE).astype(np.float32)
    dy = rng.standard_normal(BN_SHAPE).astype(np.float32)
    bn = nn.BatchNorm2d(BN_SHAPE[1])
    tbn = torch.nn.BatchNorm2d(BN_SHAPE[1])
    tx = torch.from_numpy(x).requires_grad_()
    tdy = torch.from_numpy(dy)
    ty = tbn(tx)
    ty.backward(tdy)
    check(bn.forward(x), ty.detach().numpy(), "BatchNorm2d forward")
    check(bn.backward(dy), tx.grad.numpy(), "BatchNorm2d backward", 1e-4)

    def mt_bn():
        bn.forward(x)
        bn.backward(dy)

    def t_bn():
        tx.grad = None
        tbn(tx).backward(tdy)
    measure("BatchNorm2d fwd+bwd (32,64,56,56)", mt_bn, t_bn, 5 * x.nbytes)

    # Dropout (train mode): forward reads x and writes y (drawing the mask and writing it,
    # one byte per element, is the layer's own work: in its time, not in the bytes);
    # backward reads dy and the mask, writes dx.
    v = rng.standard_normal(ELEMENTS).astype(np.float32)
    dv = rng.standard_normal(ELEMENTS).astype(np.float32)
    drop = nn.Dropout(0.5, rng=0)
    tdrop = torch.nn.Dropout(0.5)
    tv = torch.from_numpy(v)
    tdv = torch.from_numpy(dv)
    measure("Dropout(0.5) forward 1e7", lambda: drop.forward(v), lambda: tdrop(tv),
            2 * v.nbytes)
    drop.forward(v)
    tvg = tv.clone().requires_grad_()
    tout = tdrop(tvg)

    def t_drop_b():
        tvg.grad = None
        tout.backward(tdv, retain_graph=True)
    measure("Dropout(0.5) backward 1e7", lambda: drop.backward(dv), t_drop_b,
            2 * v.nbytes + v.size)

    # Activations on their own (not fused into a layer): forward reads x, writes y;
    # backward reads x (or y) and dy, writes dx.
    for name, layer, tlayer in activation_cases(torch):
        tvg = torch.from_numpy(v.copy()).requires_grad_()
        tout = tlayer(tvg)
        tout.backward(tdv, retain_graph=True)
        check(layer.forward(v), tout.detach().numpy(), f"{name} forward")
        check(layer.backward(dv), tvg.grad.numpy(), f"{name} backward")

        def t_fwd(tlayer=tlayer):
            with torch.no_grad():
                tlayer(tv)

        def t_bwd(tvg=tvg, tout=tout):
            tvg.grad = None
            tout.backward(tdv, retain_graph=True)
        measure(f"{name} forward 1e7", lambda layer=layer: layer.forward(v), t_fwd,
                2 * v.nbytes)
        layer.forward(v)
        measure(f"{name} backward 1e7", lambda layer=layer: layer.backward(dv), t_bwd,
                3 * v.nbytes)

    print(f"Memory-bound layers, float32, {args.threads} threads, medians of {args.rounds} "
          f"interleaved rounds (torch {torch.__version__})")
    gbs = [nbytes / tc / 1e9 for _, nbytes, _, _, tc, _ in rows]
    gbs_np = [nbytes / tn / 1e9 for _, nbytes, _, _, _, tn in rows]
    print(f"copy bandwidth beside the cases: microtile pool {min(gbs):.1f}-{max(gbs):.1f} GB/s, "
          f"NumPy copyto (1 thread) {min(gbs_np):.1f}-{max(gbs_np):.1f} GB/s")
    print(f"{'case':36s} {'MB':>5s} {'microtile ms':>12s} {'torch ms':>9s} {'copy ms':>8s} "
          f"{'vs torch':>8s} {'x copy':>7s}")
    for name, nbytes, tm, tt, tc, _ in rows:
        print(f"{name:36s} {nbytes / 1e6:5.0f} {tm * 1e3:12.3f} {tt * 1e3:9.3f} "
              f"{tc * 1e3:8.3f} {tt / tm:7.2f}x {tm / tc:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
