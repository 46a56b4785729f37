"""Timing GEMM beside NumPy: shared by ``python -m microtile``, the tuner's report and the
benchmark scripts.

Both libraries are held to the same thread count with threadpoolctl, timed in alternating
blocks (the order flips every round), and the medians compared.  OpenBLAS's and libgomp's
workers spin for a while after a call, so on a machine with few cores the library timed right
after the other one loses a core to the other's spinning workers; ``gap`` seconds of sleep
before each block let them park first.  The result of the last call is checked against a
float64 reference, so a fast wrong answer never makes it into a table.
"""
import statistics
import time

import numpy as np


def _block(fn, reps):
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def gemm_beside_numpy(m, n, k, dtype="float32", threads=1, rounds=5, gap=0.1, trans=False,
                      budget=0.1, seed=0):
    """GFLOP/s of ``microtile.gemm`` and of ``numpy.matmul`` on one shape.

    Parameters
    ----------
    m, n, k : int
        C is m x n, the inner dimension k.
    dtype : str or dtype
    threads : int
        Both libraries are limited to this many threads.
    rounds : int
        Alternating blocks per library; the medians are compared.
    gap : float
        Seconds of sleep before each block (see the module's note).
    trans : bool
        Time ``a.T @ b.T`` from transposed storage instead.
    budget : float
        Rough seconds per block.

    Returns
    -------
    (float, float)
        microtile's and NumPy's GFLOP/s (medians).
    """
    import microtile as mt
    from threadpoolctl import threadpool_limits

    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, m) if trans else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if trans else (k, n)).astype(dtype)
    out_mt = np.empty((m, n), dtype)
    out_np = np.empty((m, n), dtype)
    flops = 2.0 * m * n * k
    if trans:
        f_mt = lambda: mt.gemm(a, b, trans_a=True, trans_b=True, out=out_mt)  # noqa: E731
        f_np = lambda: np.matmul(a.T, b.T, out=out_np)  # noqa: E731
    else:
        f_mt = lambda: mt.gemm(a, b, out=out_mt)  # noqa: E731
        f_np = lambda: np.matmul(a, b, out=out_np)  # noqa: E731
    t_mt, t_np = [], []
    with threadpool_limits(threads), mt.config_context(threads=threads):
        reps = max(1, int(budget / max(_block(f_mt, 1), 1e-7)))
        f_np()
        for r in range(rounds):
            order = ((t_mt, f_mt), (t_np, f_np)) if r % 2 == 0 else ((t_np, f_np), (t_mt, f_mt))
            for times, fn in order:
                if gap:
                    time.sleep(gap)
                times.append(_block(fn, reps))
    check_gemm(out_mt, a.T if trans else a, b.T if trans else b)
    return (flops / statistics.median(t_mt) / 1e9, flops / statistics.median(t_np) / 1e9)


def check_gemm(c, a, b, alpha=1.0):
    """AssertionError unless c equals alpha * a @ b within k * eps of the float64 product."""
    k = a.shape[1]
    a64 = np.asarray(a, np.float64)
    b64 = np.asarray(b, np.float64)
    ref = alpha * (a64 @ b64)
    scale = abs(alpha) * (np.abs(a64) @ np.abs(b64))
    eps = np.finfo(c.dtype).eps
    bad = np.abs(c - ref) > 2 * max(k, 1) * eps * scale + np.finfo(c.dtype).tiny
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise AssertionError(f"gemm result wrong at ({i}, {j}) of {c.shape}: {c[i, j]!r} vs "
                             f"{ref[i, j]!r}")
