"""Shared by the benchmark modules: operands, thread limits, correctness checks, rates.

Every class builds its operands in ``setup`` and checks microtile's result there against
NumPy in float64 (once per process: asv re-runs ``setup`` before each sample, and the check
is the slow part); ``time_*`` methods then make one library call each, and ``track_*``
methods time several calls and return a rate.
"""
import contextlib
import statistics
import time

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from threadpoolctl import threadpool_limits

import microtile as mt

DTYPES = ["float32", "float64"]
THREADS = [1, 2]

_CHECKED = set()


class Benchmark:
    """Base class: ``limit_threads`` and ``check_once`` for ``setup``, and the ``teardown``
    that lifts the limits."""

    _limits = None

    def limit_threads(self, n):
        """Hold microtile, and every pool threadpoolctl sees (OpenBLAS, OpenMP), to ``n``
        threads until teardown."""
        self._limits = contextlib.ExitStack()
        self._limits.enter_context(threadpool_limits(n))
        self._limits.enter_context(mt.config_context(threads=n))

    def check_once(self, *params):
        """``self.check(*params)`` unless it already passed for these params in this
        process."""
        key = (type(self).__module__, type(self).__qualname__) + params
        if key not in _CHECKED:
            self.check(*params)
            _CHECKED.add(key)

    def teardown(self, *params):
        if self._limits is not None:
            self._limits.close()
            self._limits = None


def random(shape, dtype, seed=0):
    """Standard normal values in ``dtype``, the same for the same seed."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=dtype)


# --- correctness ------------------------------------------------------------------------

def gamma(k, dtype):
    """Higham's gamma_k = k u / (1 - k u) for the unit roundoff u of ``dtype``."""
    u = np.finfo(dtype).eps / 2
    return k * u / (1 - k * u)


def compare(what, got, ref, bound):
    """Raise AssertionError where ``|got - ref| > bound`` (or either is NaN)."""
    err = np.abs(np.subtract(got, ref, dtype=np.float64))
    ok = err <= bound
    if not ok.all():
        excess = np.where(ok, -np.inf, err - bound)
        worst = np.unravel_index(np.argmax(excess), err.shape)
        raise AssertionError(
            f"{what}: {ok.size - np.count_nonzero(ok)} of {ok.size} values differ from NumPy's "
            f"float64 result by more than the rounding bound (at {tuple(map(int, worst))}: "
            f"error {err[worst]:.3g}, bound {np.broadcast_to(bound, err.shape)[worst]:.3g})")


def check(what, got, fn, operands, depth, dtype, magnitude=None):
    """Compare ``got``, microtile's ``fn(*operands)`` computed in ``dtype``, with ``fn`` in
    float64, and return (float64 result, error bound).

    ``fn`` is built from sums, products, nonnegative constants, ReLU, max and reshapes, and
    ``depth`` bounds the roundings on the path of any one term.  Then microtile's result and
    the reference are each within ``gamma(depth) * fn(|operands|)`` of the exact value
    (Higham, Accuracy and Stability of Numerical Algorithms, ch. 3), whatever the order of
    the sums; ReLU and max do not add to the error.  ``magnitude(*operands)``, when given,
    bounds ``fn(|operands|)`` from above more cheaply than evaluating it.
    """
    # One OpenBLAS thread: steadier beside other work, and far faster for some shapes.
    with threadpool_limits(1, user_api="blas"):
        x64 = [np.asarray(op, np.float64) for op in operands]
        ref = fn(*x64)
        mag = fn(*(np.abs(x) for x in x64)) if magnitude is None else magnitude(*x64)
    bound = (gamma(depth, dtype) + gamma(depth, np.float64)) * mag
    compare(what, got, ref, bound)
    return ref, bound


# --- float64 references for convolution and pooling -------------------------------------

def windows(x, size, stride, pad, fill=0.0):
    """(N, C, P, Q, size, size) view of the receptive fields of ``x`` padded with ``fill``."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    return sliding_window_view(xp, (size, size), axis=(2, 3))[:, :, ::stride, ::stride]


def fold(cols, shape, stride, pad):
    """Adjoint of ``windows``: add each field of ``cols`` (N, C, P, Q, R, R) back where it
    came from in an input of ``shape`` (col2im)."""
    n, c, h, w = shape
    _, _, p, q, r, _ = cols.shape
    out = np.zeros((n, c, h + 2 * pad, w + 2 * pad))
    for i in range(r):
        for j in range(r):
            out[:, :, i:i + stride * (p - 1) + 1:stride,
                j:j + stride * (q - 1) + 1:stride] += cols[..., i, j]
    return out[:, :, pad:pad + h, pad:pad + w]


def conv2d_ref(x, w, b, stride, pad):
    """conv2d (cross-correlation, NCHW, weights KCRR) plus bias."""
    y = np.tensordot(windows(x, w.shape[2], stride, pad), w, axes=([1, 4, 5], [1, 2, 3]))
    return y.transpose(0, 3, 1, 2) + b[:, None, None]


def max_pool_ref(x, size, stride, pad):
    return windows(x, size, stride, pad, -np.inf).max(axis=(4, 5))


# --- rates ------------------------------------------------------------------------------

def seconds_per_call(fn, min_time=0.02, repeat=5):
    """Median over ``repeat`` blocks of about ``min_time`` seconds of ``fn``'s time per call."""
    fn()
    t0 = time.perf_counter()
    fn()
    reps = max(1, int(min_time / max(time.perf_counter() - t0, 1e-7)))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def gflops(fn, flops):
    """GFLOP/s of ``fn``, which does ``flops`` floating-point operations a call."""
    return flops / seconds_per_call(fn) / 1e9
