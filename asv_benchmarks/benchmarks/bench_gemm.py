"""GEMM: square, transposed and skinny shapes; microtile and NumPy side by side."""
import numpy as np

import microtile as mt

from .common import Threads, gflops, random


class GemmSquare:
    params = ([64, 256, 1024, 2048], ["float32", "float64"], [1, 2])
    param_names = ["n", "dtype", "threads"]
    timeout = 120

    def setup(self, n, dtype, threads):
        self.a = random((n, n), dtype, 1)
        self.b = random((n, n), dtype, 2)
        self.out = np.empty((n, n), dtype)
        self.threads = Threads(threads).__enter__()

    def teardown(self, n, dtype, threads):
        self.threads.__exit__()

    def time_gemm(self, n, dtype, threads):
        mt.gemm(self.a, self.b, out=self.out)

    def time_numpy_matmul(self, n, dtype, threads):
        np.matmul(self.a, self.b, out=self.out)

    def track_gflops(self, n, dtype, threads):
        return gflops(lambda: mt.gemm(self.a, self.b, out=self.out), 2.0 * n ** 3)

    track_gflops.unit = "GFLOP/s"

    def track_ratio_to_numpy(self, n, dtype, threads):
        f = 2.0 * n ** 3
        ours = gflops(lambda: mt.gemm(self.a, self.b, out=self.out), f)
        theirs = gflops(lambda: np.matmul(self.a, self.b, out=self.out), f)
        return ours / theirs

    track_ratio_to_numpy.unit = "ratio"


class GemmTransposed:
    params = ([256, 1024], ["float32", "float64"], [1, 2])
    param_names = ["n", "dtype", "threads"]

    def setup(self, n, dtype, threads):
        self.a = random((n, n), dtype, 1)
        self.b = random((n, n), dtype, 2)
        self.out = np.empty((n, n), dtype)
        self.threads = Threads(threads).__enter__()

    def teardown(self, n, dtype, threads):
        self.threads.__exit__()

    def time_gemm_tt(self, n, dtype, threads):
        mt.gemm(self.a, self.b, trans_a=True, trans_b=True, out=self.out)

    def track_gflops_tt(self, n, dtype, threads):
        return gflops(lambda: mt.gemm(self.a, self.b, trans_a=True, trans_b=True,
                                      out=self.out), 2.0 * n ** 3)

    track_gflops_tt.unit = "GFLOP/s"


class GemmSkinny:
    # Shapes from neural networks: an MLP layer, a wide-batch projection, and an im2col conv.
    params = (["256x4096x784", "4096x256x64", "3136x64x576"], ["float32", "float64"], [1, 2])
    param_names = ["mnk", "dtype", "threads"]

    def setup(self, mnk, dtype, threads):
        self.m, self.n, self.k = map(int, mnk.split("x"))
        self.a = random((self.m, self.k), dtype, 1)
        self.b = random((self.k, self.n), dtype, 2)
        self.out = np.empty((self.m, self.n), dtype)
        self.threads = Threads(threads).__enter__()

    def teardown(self, mnk, dtype, threads):
        self.threads.__exit__()

    def time_gemm(self, mnk, dtype, threads):
        mt.gemm(self.a, self.b, out=self.out)

    def time_numpy_matmul(self, mnk, dtype, threads):
        np.matmul(self.a, self.b, out=self.out)

    def track_gflops(self, mnk, dtype, threads):
        return gflops(lambda: mt.gemm(self.a, self.b, out=self.out),
                      2.0 * self.m * self.n * self.k)

    track_gflops.unit = "GFLOP/s"
