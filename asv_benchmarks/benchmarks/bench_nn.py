"""microtile.nn: one training step (zero_grad, forward, cross-entropy, backward, SGD with
momentum) of the issue's MLPs in float32, and the optimizer updates on their own."""
import numpy as np

import microtile as mt
from microtile import nn

from .common import Threads, random

MLPS = {
    "784-1024-1024-10@256": ((784, 1024, 1024, 10), 256),
    "784-256-256-10@64": ((784, 256, 256, 10), 64),
    "256-512-512-512-10@1024": ((256, 512, 512, 512, 10), 1024),
}


def make_mlp(sizes, dtype):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], dtype=dtype, rng=i))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class TrainStep:
    params = (list(MLPS), ["float32"], [1, 2])
    param_names = ["model", "dtype", "threads"]
    timeout = 120

    def setup(self, model, dtype, threads):
        sizes, batch = MLPS[model]
        self.model = make_mlp(sizes, dtype)
        self.x = random((batch, sizes[0]), dtype, 1)
        self.labels = np.random.default_rng(2).integers(0, sizes[-1], batch)
        self.loss = nn.CrossEntropyLoss()
        self.opt = nn.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.batch = batch
        self.threads = Threads(threads).__enter__()
        self.step()  # buffers and optimizer state exist from here on

    def teardown(self, model, dtype, threads):
        self.threads.__exit__()

    def step(self):
        self.opt.zero_grad()
        out = self.model.forward(self.x)
        self.loss.forward(out, self.labels)
        self.model.backward(self.loss.backward(), need_input_grad=False)
        self.opt.step()

    def time_train_step(self, model, dtype, threads):
        self.step()

    def time_forward(self, model, dtype, threads):
        self.model.forward(self.x)

    def track_samples_per_second(self, model, dtype, threads):
        import time
        reps = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(3):
                self.step()
            reps.append((time.perf_counter() - t0) / 3)
        return self.batch / float(np.median(reps))

    track_samples_per_second.unit = "samples/s"


class OptimizerStep:
    params = (["SGD", "Adam", "AdaGrad", "RMSprop"], [1 << 16, 1 << 20], [1, 2])
    param_names = ["optimizer", "size", "threads"]

    def setup(self, optimizer, size, threads):
        self.p = nn.Parameter(random(size, "float32", 1))
        self.p.grad = random(size, "float32", 2)
        kwargs = dict(lr=0.01, momentum=0.9) if optimizer == "SGD" else {}
        self.opt = getattr(nn, optimizer)([self.p], **kwargs)
        self.threads = Threads(threads).__enter__()
        self.opt.step()

    def teardown(self, optimizer, size, threads):
        self.threads.__exit__()

    def time_step(self, optimizer, size, threads):
        self.opt.step()


class TrainStepCNN:
    """conv 3x3 + ReLU + 2x2 max-pool + linear on 28x28 single-channel images, batch 64."""
    params = (["float32"], [2])
    param_names = ["dtype", "threads"]
    timeout = 120

    def setup(self, dtype, threads):
        if not hasattr(mt, "conv2d"):
            raise NotImplementedError("microtile.conv2d is not in this build")
        self.model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, dtype=dtype, rng=0),
                                   nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                   nn.Linear(16 * 14 * 14, 10, dtype=dtype, rng=1))
        self.x = random((64, 1, 28, 28), dtype, 1)
        self.labels = np.random.default_rng(2).integers(0, 10, 64)
        self.loss = nn.CrossEntropyLoss()
        self.opt = nn.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.threads = Threads(threads).__enter__()
        self.time_train_step(dtype, threads)

    def teardown(self, dtype, threads):
        self.threads.__exit__()

    def time_train_step(self, dtype, threads):
        self.opt.zero_grad()
        out = self.model.forward(self.x)
        self.loss.forward(out, self.labels)
        self.model.backward(self.loss.backward(), need_input_grad=False)
        self.opt.step()
