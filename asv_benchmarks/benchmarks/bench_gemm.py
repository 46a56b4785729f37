"""GEMM: square, transposed and skinny shapes; microtile and NumPy side by side."""
import numpy as np

import microtile as mt

from .common import Threads, gflops, random


class _Gemm:
    """Operands for an m x n x k product, allocated in setup, with both libraries held to the
    benchmark's thread count."""

    def _setup(self, m, n, k, dtype, threads):
        self.m, self.n, self.k = m, n, k
        self.a = random((m, k), dtype, 1)
        self.b = random((k, n), dtype, 2)
        self.out = np.empty((m, n), dtype)
        self.threads = Threads(threads).__enter__()

    def teardown(self, *params):
        self.threads.__exit__()

    def _ours(self):
        return gflops(lambda: mt.gemm(self.a, self.b, out=self.out),
                      2.0 * self.m * self.n * self.k)


class GemmSquare(_Gemm):
    params = ([64, 256, 1024, 2048], ["float32", "float64"], [1, 2])
    param_names = ["n", "dtype", "threads"]
    timeout = 120

    def setup(self, n, dtype, threads):
        self._setup(n, n, n, dtype, threads)

    def time_gemm(self, n, dtype, threads):
        mt.gemm(self.a, self.b, out=self.out)

    def time_numpy_matmul(self, n, dtype, threads):
        np.matmul(self.a, self.b, out=self.out)

    def track_gflops(self, n, dtype, threads):
        return self._ours()

    track_gflops.unit = "GFLOP/s"

    def track_ratio_to_numpy(self, n, dtype, threads):
        theirs = gflops(lambda: np.matmul(self.a, self.b, out=self.out), 2.0 * n ** 3)
        return self._ours() / theirs

    track_ratio_to_numpy.unit = "ratio"


class GemmTransposed(_Gemm):
    params = ([256, 1024], ["float32", "float64"], [1, 2])
    param_names = ["n", "dtype", "threads"]

    def setup(self, n, dtype, threads):
        self._setup(n, n, n, dtype, threads)

    def time_gemm_tt(self, n, dtype, threads):
        mt.gemm(self.a, self.b, trans_a=True, trans_b=True, out=self.out)

    def track_gflops_tt(self, n, dtype, threads):
        return gflops(lambda: mt.gemm(self.a, self.b, trans_a=True, trans_b=True,
                                      out=self.out), 2.0 * n ** 3)

    track_gflops_tt.unit = "GFLOP/s"


class GemmSkinny(_Gemm):
    # Shapes from neural networks: an MLP layer, a wide-batch projection, and an im2col conv.
    params = (["256x4096x784", "4096x256x64", "3136x64x576"], ["float32", "float64"], [1, 2])
    param_names = ["mnk", "dtype", "threads"]

    def setup(self, mnk, dtype, threads):
        m, n, k = map(int, mnk.split("x"))
        self._setup(m, n, k, dtype, threads)

    def time_gemm(self, mnk, dtype, threads):
        mt.gemm(self.a, self.b, out=self.out)

    def time_numpy_matmul(self, mnk, dtype, threads):
        np.matmul(self.a, self.b, out=self.out)

    def track_gflops(self, mnk, dtype, threads):
        return self._ours()

    track_gflops.unit = "GFLOP/s"
