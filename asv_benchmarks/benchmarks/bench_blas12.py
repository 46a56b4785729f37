"""Level 1/2 (one thread) and batched matmul."""
import numpy as np

import microtile as mt

from .common import DTYPES, Benchmark, check, random

ALPHA = 1e-9  # ger's scale: the repeated in-place updates leave a all but unchanged


class Level2(Benchmark):
    params = ([256, 2048], DTYPES)
    param_names = ["n", "dtype"]

    def setup(self, n, dtype):
        self.a = random((n, n), dtype, 1)
        self.x = random(n, dtype, 2)
        self.y = random(n, dtype, 3)
        self.limit_threads(1)
        self.check_once(n, dtype)

    def check(self, n, dtype):
        ops = (self.a, self.x)
        check("gemv", mt.gemv(*ops), lambda a, x: a @ x, ops, n, dtype)
        check("gemv trans", mt.gemv(*ops, trans=True), lambda a, x: a.T @ x, ops, n, dtype)
        check("dot", mt.dot(self.x, self.y), np.dot, (self.x, self.y), n, dtype)
        ops = (self.a.copy(), self.x, self.y)
        # ALPHA rounded to dtype, ALPHA * x, * y, + a: four roundings
        check("ger", mt.ger(self.a, self.x, self.y, alpha=ALPHA),
              lambda a, x, y: a + ALPHA * np.outer(x, y), ops, 4, dtype)

    def time_gemv(self, n, dtype):
        mt.gemv(self.a, self.x)

    def time_gemv_trans(self, n, dtype):
        mt.gemv(self.a, self.x, trans=True)

    def time_dot(self, n, dtype):
        mt.dot(self.x, self.y)

    def time_ger(self, n, dtype):
        mt.ger(self.a, self.x, self.y, alpha=ALPHA)


class BatchedMatmul(Benchmark):
    """Stacks of small square products, beside numpy.matmul (default thread counts)."""

    params = (["512x8", "64x32", "8x128"], ["float32"])
    param_names = ["batch_x_n", "dtype"]

    def setup(self, batch_x_n, dtype):
        batch, n = map(int, batch_x_n.split("x"))
        self.a = random((batch, n, n), dtype, 1)
        self.b = random((batch, n, n), dtype, 2)
        self.check_once(batch_x_n, dtype)

    def check(self, batch_x_n, dtype):
        ops = (self.a, self.b)
        check("matmul", mt.matmul(*ops), np.matmul, ops, self.a.shape[-1], dtype)

    def time_matmul(self, batch_x_n, dtype):
        mt.matmul(self.a, self.b)

    def time_numpy_matmul(self, batch_x_n, dtype):
        np.matmul(self.a, self.b)
