"""Level 1/2 and batched matmul."""
import numpy as np

import microtile as mt

from .common import Threads, random


class Level2:
    params = ([256, 2048], ["float32", "float64"])
    param_names = ["n", "dtype"]

    def setup(self, n, dtype):
        self.a = random((n, n), dtype, 1)
        self.x = random(n, dtype, 2)
        self.y = random(n, dtype, 3)
        self.threads = Threads(1).__enter__()

    def teardown(self, n, dtype):
        self.threads.__exit__()

    def time_gemv(self, n, dtype):
        mt.gemv(self.a, self.x)

    def time_gemv_trans(self, n, dtype):
        mt.gemv(self.a, self.x, trans=True)

    def time_dot(self, n, dtype):
        mt.dot(self.x, self.y)

    def time_ger(self, n, dtype):
        mt.ger(self.a, self.x, self.y, alpha=1e-9)


class BatchedMatmul:
    params = ([(512, 8), (64, 32), (8, 128)], ["float32"])
    param_names = ["batch_n", "dtype"]

    def setup(self, batch_n, dtype):
        batch, n = batch_n
        self.a = random((batch, n, n), dtype, 1)
        self.b = random((batch, n, n), dtype, 2)

    def time_matmul(self, batch_n, dtype):
        mt.matmul(self.a, self.b)

    def time_numpy_matmul(self, batch_n, dtype):
        np.matmul(self.a, self.b)
