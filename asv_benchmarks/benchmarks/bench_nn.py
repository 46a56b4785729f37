"""microtile.nn in float32: a training step (zero_grad, forward, cross-entropy, backward, SGD
with momentum) of MLPs and of a small CNN, their forward pass, and optimizer updates alone."""
import numpy as np

from microtile import nn

from .common import (THREADS, Benchmark, check, compare, conv2d_ref, gamma, max_pool_ref,
                     random, seconds_per_call)

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


def reference(model):
    """``fn(x, *weights)``, the Sequential ``model`` in NumPy (weights in the order of
    ``model.parameters()``), and the most roundings on any term's path through it."""
    steps, depth = [], 0
    for layer in model:
        if isinstance(layer, nn.Linear):
            steps.append((2, lambda h, w, b: h @ w.T + b))
            depth += layer.in_features + 1
        elif isinstance(layer, nn.Conv2d):
            steps.append((2, lambda h, w, b, s=layer.stride[0], p=layer.padding[0]:
                          conv2d_ref(h, w, b, s, p)))
            depth += layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1] + 1
        elif isinstance(layer, nn.MaxPool2d):
            steps.append((0, lambda h, k=layer.kernel_size[0], s=layer.stride[0],
                          p=layer.padding[0]: max_pool_ref(h, k, s, p)))
        elif isinstance(layer, nn.ReLU):
            steps.append((0, lambda h: np.maximum(h, 0.0)))
        elif isinstance(layer, nn.Flatten):
            steps.append((0, lambda h: h.reshape(len(h), -1)))
        else:
            raise TypeError(f"no NumPy reference for {layer!r}")

    def fn(x, *weights):
        rest = iter(weights)
        for count, step in steps:
            x = step(x, *(next(rest) for _ in range(count)))
        return x

    return fn, depth


def check_cross_entropy(what, got, logits, bound, labels, dtype):
    """Compare a mean cross-entropy computed in ``dtype`` from logits that are within
    ``bound`` of the float64 ``logits``."""
    n, c = logits.shape
    rows = np.arange(n)
    m = logits.max(axis=1)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
    zy = logits[rows, labels]
    # lse and z_y each move by at most the largest error in the row's logits; computing them
    # rounds at most c + 8 times a row (shift, exp, c-term sum, log, add back, subtract z_y),
    # each relative to the logits' size or (in the log) to 1; the mean over n rows and
    # fit's loss * n / n, n + 2 times.
    row = (bound.max(axis=1) + bound[rows, labels] + gamma(c + 8, dtype)
           * (np.abs(lse) + np.abs(zy) + 2 * np.abs(logits).max(axis=1) + 1))
    ref = lse - zy
    compare(what, got, ref.mean(), row.mean() + gamma(n + 2, dtype) * np.abs(ref).mean())


class _Training(Benchmark):
    """``time_train_step`` is ``nn.fit`` over one batch: one optimizer step on it."""

    timeout = 120

    def _setup(self, model, x, classes, threads, params):
        self.model, self.x = model, x
        self.labels = np.random.default_rng(2).integers(0, classes, len(x)).astype(np.intp)
        opt = nn.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.fit_args = (model, nn.CrossEntropyLoss(), opt, x, self.labels)
        self.fit_kwargs = dict(batch_size=len(x), shuffle=False, progress=False)
        self.limit_threads(threads)
        self.check_once(*params)
        self.time_train_step(*params)  # buffers and optimizer state exist from here on

    def check(self, *params):
        dtype = self.x.dtype
        fn, depth = reference(self.model)
        weights = [p.data for p in self.model.parameters()]
        logits, bound = check("forward", self.model.forward(self.x), fn, (self.x, *weights),
                              depth, dtype)
        history = nn.fit(*self.fit_args, **self.fit_kwargs)
        check_cross_entropy("fit loss", history["loss"][0], logits, bound, self.labels, dtype)

    def time_train_step(self, *params):
        nn.fit(*self.fit_args, **self.fit_kwargs)

    def time_forward(self, *params):
        self.model.forward(self.x)

    def track_samples_per_second(self, *params):
        return len(self.x) / seconds_per_call(lambda: self.time_train_step(*params))

    track_samples_per_second.unit = "samples/s"


class TrainStep(_Training):
    params = (list(MLPS), ["float32"], THREADS)
    param_names = ["model", "dtype", "threads"]

    def setup(self, model, dtype, threads):
        sizes, batch = MLPS[model]
        self._setup(make_mlp(sizes, dtype), random((batch, sizes[0]), dtype, 1), sizes[-1],
                    threads, (model, dtype, threads))


class TrainStepCNN(_Training):
    """conv 3x3 + ReLU + 2x2 max-pool + linear on 28x28 single-channel images, batch 64."""

    params = (["float32"], [2])
    param_names = ["dtype", "threads"]

    def setup(self, dtype, threads):
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, dtype=dtype, rng=0),
                              nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(16 * 14 * 14, 10, dtype=dtype, rng=1))
        self._setup(model, random((64, 1, 28, 28), dtype, 1), 10, threads, (dtype, threads))


# name: (keyword arguments, the first step's displacement of p in float64 from the gradient)
OPTIMIZERS = {
    "SGD": (dict(lr=0.01, momentum=0.9), lambda g: 0.01 * g),
    "Adam": (dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8),
             lambda g: 1e-3 * g / (np.abs(g) + 1e-8)),
    "AdaGrad": (dict(lr=1e-2, eps=1e-10), lambda g: 1e-2 * g / (np.abs(g) + 1e-10)),
    "RMSprop": (dict(lr=1e-2, alpha=0.99, eps=1e-8),
                lambda g: 1e-2 * g / (np.sqrt(0.01) * np.abs(g) + 1e-8)),
}


class OptimizerStep(Benchmark):
    params = (list(OPTIMIZERS), [1 << 16, 1 << 20], THREADS)
    param_names = ["optimizer", "size", "threads"]

    def setup(self, optimizer, size, threads):
        self.p = nn.Parameter(random(size, "float32", 1))
        self.p.grad = random(size, "float32", 2)
        kwargs, self.first_step = OPTIMIZERS[optimizer]
        self.opt = getattr(nn, optimizer)([self.p], **kwargs)
        self.limit_threads(threads)
        self.check_once(optimizer, size, threads)
        self.time_step(optimizer, size, threads)  # optimizer state exists from here on

    def check(self, optimizer, size, threads):
        p0, g = self.p.data.astype(np.float64), self.p.grad.astype(np.float64)
        self.time_step(optimizer, size, threads)
        d = self.first_step(g)
        # the displacement: at most 20 roundings, no cancellation among them; then p - d
        bound = sum(gamma(20, dt) * np.abs(d) + gamma(1, dt) * np.abs(p0 - d)
                    for dt in ("float32", "float64"))
        compare(f"{optimizer} step", self.p.data, p0 - d, bound)

    def time_step(self, optimizer, size, threads):
        self.opt.step()


# Memory-bound layers (issue 14's cases, as tools/bench_memory.py times them beside torch):
# float32, results checked against NumPy in float64 once per process.
def _gelu(x):
    from scipy.special import erfc
    return x * 0.5 * erfc(-x / np.sqrt(2.0))


def _sigmoid(v):
    # through tanh: no overflow in exp for any v
    return 0.5 * (1 + np.tanh(0.5 * v))


def _gelu_tanh(x):
    # 0.5 x (1 + tanh(u)) written as x sigmoid(2u), which does not cancel in the left tail
    return x * _sigmoid(2 * np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))


ELEMENTWISE = {
    "ReLU": (nn.ReLU, lambda x: np.maximum(x, 0.0)),
    "GELU": (nn.GELU, _gelu),
    "GELU(tanh)": (lambda: nn.GELU("tanh"), _gelu_tanh),
    "SiLU": (nn.SiLU, lambda x: x * _sigmoid(x)),
    "Sigmoid": (nn.Sigmoid, _sigmoid),
    "Tanh": (nn.Tanh, np.tanh),
}


class Elementwise(Benchmark):
    """An activation's forward and backward on 10^7 float32 elements."""
    params = (list(ELEMENTWISE), THREADS)
    param_names = ["activation", "threads"]

    def setup(self, name, threads):
        self.x = random(10 ** 7, "float32", 1)
        self.dy = random(10 ** 7, "float32", 2)
        self.layer = ELEMENTWISE[name][0]()
        self.limit_threads(threads)
        self.check_once(name, threads)
        self.layer.forward(self.x)

    def check(self, name, threads):
        x = self.x[:100000]
        ref = ELEMENTWISE[name][1](x.astype(np.float64))
        # float32 activations within a few ulp (tests/nn): 1e-6 of the magnitude, plus for
        # GELU the rounding of x / sqrt 2 and of its square in the tail's exponent
        xd = x.astype(np.float64)
        compare(f"{name} forward", self.layer.forward(x), ref,
                (1e-6 + xd * xd * 2.0 ** -23) * np.abs(ref) + 1e-37)

    def time_forward(self, name, threads):
        self.layer.forward(self.x)

    def time_backward(self, name, threads):
        self.layer.backward(self.dy)


class BatchNormMaxPool(Benchmark):
    """BatchNorm2d forward+backward (train mode) on (32, 64, 56, 56), and 2x2 max pooling
    forward and backward on (32, 64, 112, 112): passes over memory."""
    params = (THREADS,)
    param_names = ["threads"]

    def setup(self, threads):
        self.x = random((32, 64, 56, 56), "float32", 3)
        self.dy = random((32, 64, 56, 56), "float32", 4)
        self.bn = nn.BatchNorm2d(64)
        self.px = random((32, 64, 112, 112), "float32", 5)
        self.pool = nn.MaxPool2d(2)
        self.pdy = random((32, 64, 56, 56), "float32", 6)
        self.limit_threads(threads)
        self.check_once(threads)
        self.pool.forward(self.px)

    def check(self, threads):
        x = self.x.astype(np.float64)
        mean = x.mean(axis=(0, 2, 3), keepdims=True)
        ref = (x - mean) / np.sqrt(x.var(axis=(0, 2, 3), keepdims=True) + 1e-5)
        compare("BatchNorm2d forward", self.bn.forward(self.x), ref,
                1e-5 * np.abs(ref) + 1e-5)
        ref_pool = max_pool_ref(self.px[:2].astype(np.float64), 2, 2, 0)
        compare("MaxPool2d forward", self.pool.forward(self.px[:2]), ref_pool, 0.0)

    def time_batchnorm_forward_backward(self, threads):
        self.bn.forward(self.x)
        self.bn.backward(self.dy)

    def time_maxpool_forward(self, threads):
        self.pool.forward(self.px)

    def time_maxpool_backward(self, threads):
        self.pool.backward(self.pdy)


# Recurrent layers (issue 15's cases, as tools/bench_rnn.py times them beside torch).
def lstm_ref(x, w_ih, w_hh, b_ih, b_hh, dtype):
    """A one-layer LSTM over x (T, N, I) in float64, torch's equations and gate order, and a
    bound on a ``dtype`` computation's error: each step's pre-activations round within
    gamma_(I+H+2) of the sum of their terms' magnitudes, the gates and the cell add a few
    units of roundoff, and a step's error is carried into the next at most whole (the
    gates' derivatives are at most 1/4 and 1), so the bounds of the steps add up."""
    T, N = x.shape[:2]
    H = w_hh.shape[1]
    h = np.zeros((N, H))
    c = np.zeros((N, H))
    out = np.empty((T, N, H))
    bound = 0.0
    for t in range(T):
        z = x[t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh
        mag = (np.abs(x[t]) @ np.abs(w_ih).T + np.abs(b_ih) + np.abs(h) @ np.abs(w_hh).T
               + np.abs(b_hh))
        i, f, g, o = (z[:, q * H:(q + 1) * H] for q in range(4))
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        out[t] = h
        bound += float(gamma(x.shape[2] + H + 2, dtype) * mag.max()) * (1 + np.abs(c).max())
        bound += float(gamma(16, dtype)) * (1 + np.abs(c).max())
    return out, bound


class Recurrent(Benchmark):
    """LSTM and GRU 128 -> 256 over 50 steps, forward and forward+backward, float32."""
    params = (["LSTM", "GRU"], [1, 32], THREADS)
    param_names = ["layer", "batch", "threads"]

    def setup(self, layer, batch, threads):
        self.m = getattr(nn, layer)(128, 256, rng=0)
        self.x = random((50, batch, 128), "float32", 7)
        self.dy = random((50, batch, 256), "float32", 8)
        self.limit_threads(threads)
        self.check_once(layer, batch, threads)
        self.m.forward(self.x)

    def check(self, layer, batch, threads):
        if layer != "LSTM":
            return
        sd = {k: np.asarray(v, np.float64) for k, v in self.m.state_dict().items()}
        x = self.x[:, :1]
        ref, bound = lstm_ref(x.astype(np.float64), sd["weight_ih_l0"], sd["weight_hh_l0"],
                              sd["bias_ih_l0"], sd["bias_hh_l0"], np.float32)
        compare("LSTM forward", self.m.forward(x), ref, bound)

    def time_forward(self, layer, batch, threads):
        self.m.forward(self.x)

    def time_forward_backward(self, layer, batch, threads):
        self.m.forward(self.x)
        self.m.backward(self.dy)
