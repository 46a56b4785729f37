"""conv2d forward and backward on ResNet/VGG layers (float32, N = 8), and pooling."""
import numpy as np

import microtile as mt

from .common import (DTYPES, Benchmark, check, conv2d_ref, fold, gflops, max_pool_ref,
                     random, windows)

# name: (C, H, K, R, stride, pad); tools/bench_conv.py times these too.
LAYERS = {
    "resnet_conv1": (3, 224, 64, 7, 2, 3),
    "vgg_first": (3, 224, 64, 3, 1, 1),
    "resnet_3x3_56": (64, 56, 64, 3, 1, 1),
    "resnet_1x1_56": (256, 56, 64, 1, 1, 0),
    "resnet_3x3_28": (128, 28, 128, 3, 1, 1),
    "late_3x3_7": (512, 7, 512, 3, 1, 1),
}
BATCH = 8


def out_size(layer):
    C, H, K, R, s, p = layer
    return (H + 2 * p - R) // s + 1


def norms(a, axes):
    """Euclidean norms of ``a`` over ``axes``, kept as length-1 axes."""
    return np.sqrt(np.square(a).sum(axis=axes, keepdims=True))


def channel_squares(a):
    """Sum of squares over the channels of NCHW ``a``, as one channel."""
    return np.square(a).sum(axis=1, keepdims=True)


def flops(n, layer):
    """Of the forward pass over ``n`` images; the backward pass does twice as many."""
    C, H, K, R, s, p = layer
    return 2.0 * n * K * C * R * R * out_size(layer) ** 2


class Conv2d(Benchmark):
    params = (list(LAYERS), [2])
    param_names = ["layer", "threads"]
    timeout = 180

    def setup(self, layer, threads):
        C, H, K, R, s, p = LAYERS[layer]
        P = out_size(LAYERS[layer])
        self.args = dict(stride=s, padding=p)
        self.x = random((BATCH, C, H, H), "float32", 1)
        self.w = random((K, C, R, R), "float32", 2) / np.float32(np.sqrt(C * R * R))
        self.b = random(K, "float32", 3)
        self.y = np.empty((BATCH, K, P, P), np.float32)
        self.dy = random(self.y.shape, "float32", 4)
        self.flops = flops(BATCH, LAYERS[layer])
        self.limit_threads(threads)
        self.check_once(layer, threads)

    def check(self, layer, threads):
        C, H, K, R, s, p = LAYERS[layer]
        shape = self.x.shape
        overlap = ((R + s - 1) // s) ** 2  # most output positions one input feeds, per channel
        terms = BATCH * out_size(LAYERS[layer]) ** 2  # summed into each dw and db entry

        # The magnitudes, sums of |a_t| |b_t|, are bounded by Cauchy-Schwarz: ||a|| ||b||.
        def y_mag(x, w, b):  # ||input field|| ||filter k|| + |b_k|
            fields = windows(channel_squares(x), R, s, p).sum(axis=(4, 5))
            return (np.sqrt(fields) * norms(w, (1, 2, 3)).reshape(K, 1, 1)
                    + np.abs(b)[:, None, None])

        def dx_mag(dy, w):  # ||dy over the outputs x feeds|| ||w[:, c]||
            fed = np.broadcast_to(channel_squares(dy)[..., None, None], dy[:, :1].shape + (R, R))
            return np.sqrt(fold(fed, (shape[0], 1) + shape[2:], s, p)) * norms(w, (0, 2, 3))

        def dw_mag(dy, x):  # ||dy[:, k]|| ||x[:, c]||
            return norms(dy, (0, 2, 3)).reshape(K, 1, 1, 1) * norms(x, (0, 2, 3))

        self.time_forward(layer, threads)
        check("conv2d", self.y, lambda x, w, b: conv2d_ref(x, w, b, s, p),
              (self.x, self.w, self.b), C * R * R + 1, "float32", y_mag)
        dx, dw, db = mt.conv2d_backward(self.dy, self.x, self.w, **self.args)
        check("conv2d_backward dx", dx,
              lambda dy, w: fold(np.tensordot(dy, w, axes=(1, 0)).transpose(0, 3, 1, 2, 4, 5),
                                 shape, s, p),
              (self.dy, self.w), K * overlap, "float32", dx_mag)
        check("conv2d_backward dw", dw,
              lambda dy, x: np.tensordot(dy, windows(x, R, s, p), axes=([0, 2, 3], [0, 2, 3])),
              (self.dy, self.x), terms, "float32", dw_mag)
        check("conv2d_backward db", db, lambda dy: dy.sum(axis=(0, 2, 3)), (self.dy,), terms,
              "float32")

    def time_forward(self, layer, threads):
        mt.conv2d(self.x, self.w, self.b, out=self.y, **self.args)

    def time_backward(self, layer, threads):
        mt.conv2d_backward(self.dy, self.x, self.w, **self.args)

    def track_gflops_forward(self, layer, threads):
        return gflops(lambda: self.time_forward(layer, threads), self.flops)

    track_gflops_forward.unit = "GFLOP/s"

    def track_gflops_forward_backward(self, layer, threads):
        return gflops(lambda: (self.time_forward(layer, threads),
                               self.time_backward(layer, threads)), 3 * self.flops)

    track_gflops_forward_backward.unit = "GFLOP/s"


# kind: (forward, backward, what the backward takes of x)
POOLS = {
    "max": (mt.max_pool2d, mt.max_pool2d_backward, lambda x: x),
    "avg": (mt.avg_pool2d, mt.avg_pool2d_backward, lambda x: x.shape),
}
POOL_ARGS = (3, 2, 1)  # kernel, stride, padding
POOL_INPUT = (8, 64, 112, 112)


class Pooling(Benchmark):
    params = (list(POOLS), DTYPES)
    param_names = ["kind", "dtype"]

    def setup(self, kind, dtype):
        self.forward, self.backward, of_x = POOLS[kind]
        size, stride, pad = POOL_ARGS
        n, c, h, _ = POOL_INPUT
        p = (h + 2 * pad - size) // stride + 1
        self.x = random(POOL_INPUT, dtype, 5)
        self.x_arg = of_x(self.x)
        self.dy = random((n, c, p, p), dtype, 6)
        self.check_once(kind, dtype)

    def check(self, kind, dtype):
        size, stride, pad = POOL_ARGS
        area, overlap = size * size, ((size + stride - 1) // stride) ** 2  # <= windows per x
        y = self.forward(self.x, *POOL_ARGS)
        dx = self.backward(self.dy, self.x_arg, *POOL_ARGS)
        if kind == "max":
            # y exact; each dy goes to its window's first maximum in row-major order
            win = windows(self.x, size, stride, pad, -np.inf)
            first = np.argmax(win.reshape(win.shape[:4] + (area,)), axis=-1)
            hot = (np.arange(area) == first[..., None]).reshape(win.shape)
            pool, spread, depths = (lambda x: max_pool_ref(x, *POOL_ARGS),
                                    lambda dy: dy[..., None, None] * hot, (0, overlap))
        else:
            # sums, then a division (or a product with a rounded 1/area): 2 more roundings
            pool, spread, depths = (
                lambda x: windows(x, size, stride, pad).sum(axis=(4, 5)) / area,
                lambda dy: np.broadcast_to(dy[..., None, None] / area, dy.shape + (size, size)),
                (area + 1, overlap + 2))
        check(f"{kind}_pool2d", y, pool, (self.x,), depths[0], dtype)
        check(f"{kind}_pool2d_backward", dx,
              lambda dy: fold(spread(dy), self.x.shape, stride, pad), (self.dy,), depths[1],
              dtype)

    def time_forward(self, kind, dtype):
        self.forward(self.x, *POOL_ARGS)

    def time_backward(self, kind, dtype):
        self.backward(self.dy, self.x_arg, *POOL_ARGS)
