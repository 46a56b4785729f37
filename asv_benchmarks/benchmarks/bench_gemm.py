"""GEMM C = op(A) @ op(B) into a preallocated C, microtile and NumPy side by side."""
import numpy as np

import microtile as mt

from .common import DTYPES, THREADS, Benchmark, check, gflops, random


class _Gemm(Benchmark):
    param_names = ["mxnxk", "dtype", "threads"]
    trans = False  # A and B stored transposed (k x m, n x k), passed with trans_a/trans_b
    timeout = 120

    def setup(self, mxnxk, dtype, threads):
        m, n, k = map(int, mxnxk.split("x"))
        self.flops = 2.0 * m * n * k
        self.a = random((k, m) if self.trans else (m, k), dtype, 1)
        self.b = random((n, k) if self.trans else (k, n), dtype, 2)
        self.a_op, self.b_op = (self.a.T, self.b.T) if self.trans else (self.a, self.b)
        self.out = np.empty((m, n), dtype)
        self.limit_threads(threads)
        self.check_once(mxnxk, dtype, threads)

    def check(self, mxnxk, dtype, threads):
        self.time_gemm(mxnxk, dtype, threads)
        check("gemm", self.out, np.matmul, (self.a_op, self.b_op), self.a_op.shape[1], dtype)

    def time_gemm(self, mxnxk, dtype, threads):
        mt.gemm(self.a, self.b, trans_a=self.trans, trans_b=self.trans, out=self.out)

    def track_gflops(self, mxnxk, dtype, threads):
        return gflops(lambda: self.time_gemm(mxnxk, dtype, threads), self.flops)

    track_gflops.unit = "GFLOP/s"


class Gemm(_Gemm):
    """Small and large squares, and skinny shapes from neural networks (an MLP layer, a
    wide-batch projection, an im2col convolution); beside numpy.matmul."""

    params = (["64x64x64", "1024x1024x1024", "256x4096x784", "4096x256x64", "3136x64x576"],
              DTYPES, THREADS)

    def time_numpy_matmul(self, mxnxk, dtype, threads):
        np.matmul(self.a_op, self.b_op, out=self.out)

    def track_ratio_to_numpy(self, mxnxk, dtype, threads):
        theirs = gflops(lambda: self.time_numpy_matmul(mxnxk, dtype, threads), self.flops)
        return self.track_gflops(mxnxk, dtype, threads) / theirs

    track_ratio_to_numpy.unit = "ratio"


class GemmTransposed(_Gemm):
    """trans_a and trans_b both set: the packing routines read the other way."""

    params = (["256x256x256", "1024x1024x1024"], DTYPES, THREADS)
    trans = True
