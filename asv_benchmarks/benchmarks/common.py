"""Helpers shared by the benchmark modules: thread limits for both libraries, GFLOP/s."""
import time

import numpy as np
from threadpoolctl import threadpool_limits

import microtile as mt


class Threads:
    """Hold microtile and every other pool (OpenBLAS, OpenMP) to ``n`` threads."""

    def __init__(self, n):
        self.n = n
        self.limits = None
        self.old = None

    def __enter__(self):
        self.old = mt.get_num_threads()
        mt.set_num_threads(self.n)
        self.limits = threadpool_limits(self.n)
        return self

    def __exit__(self, *exc):
        self.limits.restore_original_limits()
        mt.set_num_threads(self.old)


def gflops(fn, flops, min_time=0.2, repeat=5):
    """Median GFLOP/s of ``fn`` over ``repeat`` blocks of about ``min_time`` seconds each."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    reps = max(1, int(min_time / one))
    rates = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        rates.append(flops * reps / (time.perf_counter() - t0) / 1e9)
    return float(np.median(rates))


def random(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)
