"""conv2d forward and forward+backward on ResNet/VGG layers, float32, N = 8, 2 threads."""
import numpy as np

import microtile as mt

from .common import Threads, gflops, random

# name: (C, H, K, R, stride, pad); tools/bench_conv.py times these too.
LAYERS = {
    "resnet_conv1": (3, 224, 64, 7, 2, 3),
    "vgg_first": (3, 224, 64, 3, 1, 1),
    "resnet_3x3_56": (64, 56, 64, 3, 1, 1),
    "resnet_1x1_56": (256, 56, 64, 1, 1, 0),
    "resnet_3x3_28": (128, 28, 128, 3, 1, 1),
    "late_3x3_7": (512, 7, 512, 3, 1, 1),
}


def flops(n, layer):
    C, H, K, R, s, p = layer
    P = (H + 2 * p - R) // s + 1
    return 2.0 * n * K * C * R * R * P * P


class Conv2d:
    params = (list(LAYERS), [2])
    param_names = ["layer", "threads"]
    timeout = 180

    def setup(self, layer, threads):
        C, H, K, R, s, p = LAYERS[layer]
        self.n = 8
        self.args = dict(stride=s, padding=p)
        self.x = random((self.n, C, H, H), "float32", 1)
        self.w = random((K, C, R, R), "float32", 2) / np.float32(np.sqrt(C * R * R))
        self.b = random(K, "float32", 3)
        self.y = mt.conv2d(self.x, self.w, self.b, **self.args)
        self.dy = random(self.y.shape, "float32", 4)
        self.flops = flops(self.n, LAYERS[layer])
        self.threads = Threads(threads).__enter__()

    def teardown(self, layer, threads):
        self.threads.__exit__()

    def _forward(self):
        mt.conv2d(self.x, self.w, self.b, out=self.y, **self.args)

    def _forward_backward(self):
        self._forward()
        mt.conv2d_backward(self.dy, self.x, self.w, **self.args)

    def time_forward(self, layer, threads):
        self._forward()

    def time_forward_backward(self, layer, threads):
        self._forward_backward()

    def track_gflops_forward(self, layer, threads):
        return gflops(self._forward, self.flops)

    track_gflops_forward.unit = "GFLOP/s"

    def track_gflops_forward_backward(self, layer, threads):
        return gflops(self._forward_backward, 3 * self.flops)

    track_gflops_forward_backward.unit = "GFLOP/s"


class Pooling:
    params = (["max", "avg"], ["float32", "float64"])
    param_names = ["kind", "dtype"]

    def setup(self, kind, dtype):
        self.x = random((8, 64, 112, 112), dtype, 5)
        self.fn = mt.max_pool2d if kind == "max" else mt.avg_pool2d
        self.y = self.fn(self.x, 3, 2, 1)
        self.dy = random(self.y.shape, dtype, 6)

    def time_forward(self, kind, dtype):
        self.fn(self.x, 3, 2, 1)

    def time_backward(self, kind, dtype):
        if self.fn is mt.max_pool2d:
            mt.max_pool2d_backward(self.dy, self.x, 3, 2, 1)
        else:
            mt.avg_pool2d_backward(self.dy, self.x.shape, 3, 2, 1)
