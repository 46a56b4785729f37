"""spmm (float32, into a preallocated result) beside scipy.sparse, and a 90 %-pruned Linear's
forward on the sparse kernel beside the dense GEMM.  scipy is needed for the sparse operands:
without it these benchmarks are skipped.  ``tools/bench_spmm.py`` times the same cases beside
torch.sparse as well."""
import numpy as np

import microtile as mt
from microtile import nn

from .common import THREADS, Benchmark, check, compare, gamma, random, seconds_per_call

# name: (sparse rows, sparse columns, density, dense n, side).  side "left": sparse @ dense
# (columns x n); "right": dense (n x columns) @ sparse.T, a pruned layer's x @ W.T.  Density
# None: a power-law row distribution (POWER_LAW_PER_ROW nonzeros in most rows, a hundred times
# as many in 1 % of them).
CASES = {
    "csr10000^2@0.001 x 256": (10000, 10000, 0.001, 256, "left"),
    "csr4096^2@0.01 x 512": (4096, 4096, 0.01, 512, "left"),
    "bag-of-words 256x50000@0.002 x 512": (256, 50000, 0.002, 512, "left"),
    "256 x (csr4096^2@0.1).T": (4096, 4096, 0.1, 256, "right"),
    "power-law 8192^2 x 256": (8192, 8192, None, 256, "left"),
}
POWER_LAW_PER_ROW = 16


def random_csr(rng, m, k, density):
    """Uniformly placed nonzeros with standard normal values: canonical float32 CSR."""
    import scipy.sparse as sp
    a = sp.random(m, k, density=density, format="csr", dtype=np.float64, rng=rng)
    a.data[:] = rng.standard_normal(a.nnz)
    return a.astype(np.float32)


def power_law_csr(rng, m, k, per_row, heavy=0.01, factor=100):
    """``per_row`` nonzeros in most rows and ``factor`` times as many in a fraction ``heavy``
    of them, at random columns (duplicates summed): canonical float32 CSR."""
    import scipy.sparse as sp
    counts = np.full(m, per_row)
    counts[rng.choice(m, max(1, int(heavy * m)), replace=False)] = min(k, per_row * factor)
    indptr = np.concatenate(([0], np.cumsum(counts)))
    cols = rng.integers(0, k, indptr[-1])
    a = sp.csr_matrix((rng.standard_normal(indptr[-1]), cols, indptr), shape=(m, k))
    a.sum_duplicates()
    return a.astype(np.float32)


def operands(case, scale=1.0, seed=0):
    """(sparse, dense, sparse_left) of ``case``, every dimension times ``scale`` (at least
    16): the product is ``sparse @ dense`` when ``sparse_left``, else ``dense @ sparse``."""
    rows, cols, density, n, side = CASES[case]

    def s(v):
        return max(16, int(v * scale))

    rng = np.random.default_rng(seed)
    if density is None:
        a = power_law_csr(rng, s(rows), s(cols), max(1, int(POWER_LAW_PER_ROW * scale ** 0.5)))
    else:
        a = random_csr(rng, s(rows), s(cols), density)
    if side == "left":
        return a, random((s(cols), s(n)), np.float32, seed + 1), True
    return a.T, random((s(n), s(cols)), np.float32, seed + 1), False


def spmm_reference(s, d, sparse_left):
    """scipy's float64 product, |s| @ |d|, and the most stored entries summed into one
    element of the result (k)."""
    s64, d64 = s.astype(np.float64), d.astype(np.float64)
    if sparse_left:
        ref, mag = s64 @ d64, abs(s64) @ np.abs(d64)
        k = np.diff(s.tocsr().indptr).max(initial=0)
    else:
        ref, mag = d64 @ s64, np.abs(d64) @ abs(s64)
        k = np.diff(s.tocsc().indptr).max(initial=0)
    return np.asarray(ref), np.asarray(mag), int(k)


class Spmm(Benchmark):
    """The issue's cases: uniformly sparse, a bag-of-words batch, a pruned layer's x @ W.T,
    and a power-law row distribution (the threads' split by nonzeros, not rows)."""

    params = (list(CASES), THREADS)
    param_names = ["case", "threads"]
    timeout = 120

    def setup(self, case, threads):
        try:
            import scipy.sparse  # noqa: F401
        except ImportError:
            raise NotImplementedError("scipy is not installed") from None
        self.s, self.d, self.left = operands(case)
        m, n = ((self.s.shape[0], self.d.shape[1]) if self.left
                else (self.d.shape[0], self.s.shape[1]))
        self.out = np.empty((m, n), np.float32)
        self.flops = 2.0 * self.s.nnz * (self.d.shape[1] if self.left else self.d.shape[0])
        self.limit_threads(threads)
        self.check_once(case, threads)

    def check(self, case, threads):
        self.time_spmm(case, threads)
        ref, mag, k = spmm_reference(self.s, self.d, self.left)
        # Each element sums at most k products: gamma(k + 1) of |s| @ |d| in either dtype.
        bound = (gamma(k + 1, np.float32) + gamma(k + 1, np.float64)) * mag
        compare("spmm", self.out, ref, bound)

    def time_spmm(self, case, threads):
        if self.left:
            mt.spmm(self.s, self.d, out=self.out)
        else:
            mt.spmm(self.d, self.s, out=self.out)

    def time_scipy(self, case, threads):
        if self.left:
            self.s @ self.d
        else:
            self.d @ self.s

    def track_gflops(self, case, threads):
        return self.flops / seconds_per_call(lambda: self.time_spmm(case, threads)) / 1e9

    track_gflops.unit = "GFLOP/s"

    def track_ratio_to_scipy(self, case, threads):
        """microtile's speed over scipy's (scipy runs on one thread at any count)."""
        return (seconds_per_call(lambda: self.time_scipy(case, threads))
                / seconds_per_call(lambda: self.time_spmm(case, threads)))

    track_ratio_to_scipy.unit = "ratio"


_PRUNED = {}


def pruned_linear(size):
    """A Linear(size, size) pruned to 10 % of its weights, built once per process (asv runs
    setup before every sample, and pruning 16M weights takes most of a second)."""
    if size not in _PRUNED:
        _PRUNED[size] = nn.prune(nn.Linear(size, size, rng=0), 0.9)
    return _PRUNED[size]


class PrunedLinearForward(Benchmark):
    """A 90 %-pruned Linear's forward on a 256-row batch: the sparse kernel (what a pruned
    layer runs at or below sparse_density) against the dense GEMM on the same weights."""

    params = ([1024, 4096], THREADS)
    param_names = ["size", "threads"]
    timeout = 120

    def setup(self, size, threads):
        self.layer = pruned_linear(size)
        self.x = random((256, size), np.float32, 1)
        self.limit_threads(threads)
        self.check_once(size, threads)

    def _forward(self, density):
        with mt.config_context(sparse_density=density):
            return self.layer.forward(self.x)

    def check(self, size, threads):
        ops = (self.x, self.layer.weight.data, self.layer.bias.data)
        for density in (1.0, 0.0):
            check(f"forward at sparse_density={density}", self._forward(density),
                  lambda x, w, b: x @ w.T + b, ops, size + 1, np.float32)

    def time_sparse_forward(self, size, threads):
        self._forward(1.0)

    def time_dense_forward(self, size, threads):
        self._forward(0.0)

    def track_sparse_speedup(self, size, threads):
        """The dense forward's time over the sparse one's (above 1: pruning pays)."""
        return (seconds_per_call(lambda: self._forward(0.0))
                / seconds_per_call(lambda: self._forward(1.0)))

    track_sparse_speedup.unit = "ratio"
