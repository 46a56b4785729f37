"""spmm beside scipy.sparse and torch.sparse, and a pruned Linear's forward (not a test).

Peers: scipy.sparse's ``a @ b`` (serial: scipy has no threaded product, so it runs on one
thread at every thread count) and ``torch.sparse.mm`` on a CSR tensor (torch held to the same
threads as microtile).  float32; every library's result is first checked against scipy's
float64 product (componentwise, (k + 2) eps |a| @ |b| with k the most stored entries summed
into one element); then rounds time each library once per case, in an order that rotates
from round to round (interleaved), and the medians are reported.  GFLOP/s count 2 * nnz * n
(n: the dense operand's other dimension); the ratios are microtile's speed over the faster
peer's and over scipy's.

Cases: CSR 10000x10000 at density 0.001 @ dense 10000x256; CSR 4096x4096 at 0.01 @ dense
4096x512; a bag-of-words batch CSR 256x50000 at 0.002 @ dense 50000x512; dense 256x4096 @
(CSR 4096x4096 at 0.1).T (a pruned layer's forward); a power-law row distribution (1 % of
the rows a hundred times denser than the rest) CSR 8192x8192 @ dense 8192x256.  Then a
90 %-pruned 4096x4096 nn.Linear's forward on a 256-row batch, the sparse kernel against the
dense GEMM (config_context(sparse_density=1 / 0)).

    PYTHONPATH=src:. python tools/bench_spmm.py [--threads 1 2] [--rounds 7] [--json]
    PYTHONPATH=src:. python tools/bench_spmm.py --small     # a smoke run: sizes / 8
"""
import argparse
import json
import pathlib
import statistics
import sys
import time
import warnings

import numpy as np

import microtile as mt
from microtile import nn

try:
    import scipy
    import scipy.sparse as sp
except ImportError:     # the peers' reference: nothing to do without it
    sys.exit("bench_spmm: scipy is not installed (pip install scipy)")

# The cases and their operands are the asv suite's, so both time the same products.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from asv_benchmarks.benchmarks.bench_sparse import CASES, operands, spmm_reference  # noqa: E402


def check(name, lib, got, ref, bound):
    err = np.abs(np.asarray(got, np.float64) - ref)
    if not (err <= bound).all():
        worst = np.unravel_index(np.argmax(err - bound), err.shape)
        sys.exit(f"bench_spmm: {name}: {lib}'s result is off (error {err[worst]:.3g} at "
                 f"{tuple(map(int, worst))}, bound {bound[worst]:.3g})")


def reference(s, d, sparse_left):
    """scipy's float64 product and its error bound for a float32 computation."""
    ref, mag, k = spmm_reference(s, d, sparse_left)
    return ref, (k + 2) * float(np.finfo(np.float32).eps) * mag + 1e-30


def torch_csr(torch, s):
    """The CSR matrix behind ``s`` as a torch CSR tensor: ``s`` itself, or for a CSC ``s``
    (a CSR's transpose, as ``w.T``) that CSR, which the caller multiplies transposed."""
    c = s if s.format == "csr" else s.T.tocsr()
    return torch.sparse_csr_tensor(torch.from_numpy(c.indptr), torch.from_numpy(c.indices),
                                   torch.from_numpy(c.data), size=c.shape,
                                   check_invariants=True)


def callables(s, d, sparse_left, torch):
    """name -> a no-argument call computing the product (a fresh result each time, as a
    user's call would)."""
    fns = {}
    if sparse_left:
        fns["microtile"] = lambda: mt.spmm(s, d)
        fns["scipy"] = lambda: s @ d
    else:
        fns["microtile"] = lambda: mt.spmm(d, s)
        fns["scipy"] = lambda: d @ s
    if torch is not None:
        ts, td = torch_csr(torch, s), torch.from_numpy(d)
        if sparse_left and s.format == "csr":
            fns["torch"] = lambda: torch.sparse.mm(ts, td)
        elif not sparse_left and s.format == "csc":     # d @ C.T = (C @ d.T).T
            fns["torch"] = lambda: torch.sparse.mm(ts, td.t()).t()
        else:
            raise ValueError(f"no torch spelling for a {s.format} operand on this side")
    return fns


def block(fn, reps):
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def interleaved(fns, rounds, min_time):
    """Median seconds per call of each function: every round runs each once (a block of
    about ``min_time`` seconds), in an order rotated by one from the round before."""
    names = list(fns)
    reps = {}
    for name in names:                         # warm-up, and how many calls fill a block
        fns[name]()
        reps[name] = max(1, int(min_time / max(block(fns[name], 1), 1e-7)))
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(block(fns[name], reps[name]))
    return {name: statistics.median(v) for name, v in times.items()}


def bench_case(name, s, d, sparse_left, threads, rounds, min_time, torch):
    fns = callables(s, d, sparse_left, torch)
    ref, bound = reference(s, d, sparse_left)
    for lib, fn in fns.items():
        check(name, lib, fn(), ref, bound)
    med = interleaved(fns, rounds, min_time)
    n = d.shape[1] if sparse_left else d.shape[0]
    flops = 2.0 * s.nnz * n
    peers = [lib for lib in med if lib != "microtile"]
    fastest = min(peers, key=med.get)
    return {"case": name, "threads": threads, "nnz": int(s.nnz), "n": int(n),
            "gflops": {lib: flops / t / 1e9 for lib, t in med.items()},
            "ms": {lib: t * 1e3 for lib, t in med.items()},
            "vs_faster_peer": med[fastest] / med["microtile"], "faster_peer": fastest,
            "vs_scipy": med["scipy"] / med["microtile"]}


def bench_pruned_linear(size, batch, threads, rounds, min_time):
    """The forward of a 90 %-pruned Linear(size, size) on the sparse kernel and on the dense
    GEMM, both checked against the float64 product."""
    layer = nn.prune(nn.Linear(size, size, rng=0), 0.9)
    x = np.random.default_rng(1).standard_normal((batch, size), dtype=np.float32)
    w64 = layer.weight.data.astype(np.float64)
    ref = x.astype(np.float64) @ w64.T + layer.bias.data
    bound = ((size + 3) * float(np.finfo(np.float32).eps)
             * (np.abs(x.astype(np.float64)) @ np.abs(w64).T + np.abs(layer.bias.data)))

    def forward(density):
        def fn():
            with mt.config_context(sparse_density=density):
                return layer.forward(x)
        return fn

    fns = {"sparse": forward(1.0), "dense": forward(0.0)}
    for lib, fn in fns.items():
        check(f"pruned Linear {size}", lib, fn(), ref, bound)
    med = interleaved(fns, rounds, min_time)
    return {"case": f"90%-pruned Linear {size}x{size}, batch {batch}", "threads": threads,
            "ms": {k: v * 1e3 for k, v in med.items()},
            "speedup": med["dense"] / med["sparse"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.1, help="seconds per timed block")
    ap.add_argument("--small", action="store_true",
                    help="every dimension / 8, 2 rounds: a smoke run, not a measurement")
    ap.add_argument("--no-torch", action="store_true", help="scipy as the only peer")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    scale, rounds, min_time = 1.0, args.rounds, args.min_time
    if args.small:
        scale, rounds, min_time = 0.125, 2, 0.002
    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("bench_spmm: PyTorch is not installed; scipy is the only peer",
                  file=sys.stderr)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    todo = [(name, *operands(name, scale)) for name in CASES]
    rows, linear = [], []
    for threads in args.threads:
        mt.set_num_threads(threads)
        if torch is not None:
            torch.set_num_threads(threads)
        for name, s, d, left in todo:
            rows.append(bench_case(name, s, d, left, threads, rounds, min_time, torch))
            if not args.json:
                print_row(rows[-1], header=len(rows) == 1)
        linear.append(bench_pruned_linear(max(16, int(4096 * scale)), max(16, int(256 * scale)),
                                          threads, rounds, min_time))
    if args.json:
        print(json.dumps({"rows": rows, "pruned_linear": linear, "scale": scale,
                          "rounds": rounds}, indent=2))
        return 0
    print(f"\nfloat32, medians of {rounds} interleaved rounds; scipy {scipy.__version__} "
          "(one thread), "
          + (f"torch {torch.__version__}, " if torch is not None else "")
          + f"microtile {mt.__version__} ({mt.get_config()['isa']})"
          + ("; --small: a smoke run, not a measurement" if args.small else ""))
    for r in linear:
        print(f"{r['case']}, {r['threads']} thread(s): sparse {r['ms']['sparse']:.2f} ms, "
              f"dense {r['ms']['dense']:.2f} ms, sparse {r['speedup']:.2f}x the dense speed")
    return 0


def print_row(r, header):
    if header:
        print(f"{'case':44s} {'thr':>3s} {'nnz':>9s} {'microtile':>9s} {'scipy':>7s} "
              f"{'torch':>7s} {'vs peer':>8s} {'vs scipy':>8s}   (GFLOP/s)")
    g = r["gflops"]
    torch_g = f"{g['torch']:7.2f}" if "torch" in g else f"{'-':>7s}"
    print(f"{r['case']:44s} {r['threads']:3d} {r['nnz']:9d} {g['microtile']:9.2f} "
          f"{g['scipy']:7.2f} {torch_g} {r['vs_faster_peer']:8.2f} {r['vs_scipy']:8.2f}",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
