"""One model, one loss, used from 16 Python threads at once.

Layers reuse their output buffers between calls; before they were kept per thread, 16 threads
sharing one model got 284 wrong outputs out of 1,550, silently.  Now every thread must get
exactly its own answer (no exception is expected: sharing is supported), and backward passes
in several threads must add up in the shared gradients.

Tolerance: every output is compared with the same model run serially beforehand, in float64.
The only difference allowed is the summation order of a GEMM or convolution split differently
between threads: at most (k + 2) eps sum|w||x| per layer (k <= 100 here, |x|, |w| <= ~3), so a
relative 1e-11 of the output's scale is generous; any mix-up with another thread's data is
off by the data's own scale (~0.1 to 1).
"""
import threading

import numpy as np
import pytest

from microtile import nn

from _helpers import run_in_threads

N_THREADS = 16
ROUNDS = 6
TOL = 1e-11


def _model(pool):
    return nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1, dtype=np.float64, rng=0), nn.ReLU(), pool,
        nn.Flatten(), nn.Linear(5 * 4 * 4, 33, dtype=np.float64, rng=1), nn.Tanh(),
        nn.Linear(33, 7, dtype=np.float64, rng=2), nn.Sigmoid())


def _inputs(i):
    """Thread i's batch: sizes differ between threads (so buffers of several shapes are in
    use at once) and repeat (so some threads share a shape)."""
    rng = np.random.default_rng(100 + i)
    n = 1 + i % 5
    return rng.standard_normal((n, 2, 8, 8)), rng.standard_normal((n, 7)), \
        rng.integers(0, 7, n)


def _close(got, ref, what):
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, expected {ref.shape}"
    scale = np.max(np.abs(ref)) if ref.size else 0.0
    err = np.max(np.abs(got - ref)) if ref.size else 0.0
    assert err <= TOL * (1.0 + scale), f"{what}: off by {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_forward_backward_and_loss_shared_by_16_threads(pool):
    model = _model(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
    mse, xent = nn.MSELoss(), nn.CrossEntropyLoss()
    data = [_inputs(i) for i in range(N_THREADS)]
    ref = []
    for x, target, labels in data:           # serially: what each thread must see
        y = model(x).copy()
        value = mse(y, target)
        dx = model.backward(mse.backward()).copy()
        ref.append((y, value, dx, xent(y, labels), xent.backward().copy()))
    model.zero_grad()
    # Every thread's gradient contributions, summed, ROUNDS times: what the shared .grad
    # must hold at the end.
    want_grads = [ROUNDS * g for g in _summed_grads(model, data, mse)]
    model.zero_grad()

    def work(i):
        x, target, labels = data[i]
        y_ref, v_ref, dx_ref, xv_ref, dxent_ref = ref[i]
        for r in range(ROUNDS):
            y = model(x)
            _close(y, y_ref, f"thread {i} round {r} output")
            value = mse(y, target)
            assert abs(value - v_ref) <= TOL * (1 + abs(v_ref)), (i, r, value, v_ref)
            _close(xent(y, labels), xv_ref, f"thread {i} cross-entropy")
            _close(xent.backward(), dxent_ref, f"thread {i} cross-entropy gradient")
            dx = model.backward(mse.backward())
            _close(dx, dx_ref, f"thread {i} round {r} input gradient")
            _close(y, y_ref, f"thread {i} round {r} output after backward")

    run_in_threads(work, N_THREADS, timeout=300)
    for (name, p), want in zip(model.named_parameters(), want_grads):
        _close(p.grad, want, f"accumulated gradient of {name}")


def _summed_grads(model, data, loss):
    total = None
    for x, target, _ in data:
        model.zero_grad()
        loss(model(x), target)
        model.backward(loss.backward())
        grads = [p.grad.copy() for p in model.parameters()]
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    return total


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(19, 11, dtype=np.float64, rng=3),
    lambda: nn.Conv2d(3, 4, 3, dtype=np.float64, rng=4),
    lambda: nn.MaxPool2d(2), lambda: nn.AvgPool2d(3, 2, 1), nn.ReLU, nn.Sigmoid, nn.Tanh,
    nn.Flatten,
], ids=["Linear", "Conv2d", "MaxPool2d", "AvgPool2d", "ReLU", "Sigmoid", "Tanh", "Flatten"])
def test_each_layer_shared_by_16_threads(make):
    """Each layer alone: forward and backward in 16 threads, each thread with its own batch,
    against the same layer run serially."""
    layer = make()
    conv_like = not isinstance(layer, nn.Linear)
    data = []
    for i in range(N_THREADS):
        rng = np.random.default_rng(200 + i)
        shape = (1 + i % 4, 3, 6 + i % 3, 7) if conv_like else (1 + i % 4, 19)
        x = rng.standard_normal(shape)
        y = layer(x).copy()
        dy = rng.standard_normal(y.shape)
        data.append((x, y, dy, layer.backward(dy).copy()))

    def work(i):
        x, y_ref, dy, dx_ref = data[i]
        for r in range(ROUNDS):
            y = layer(x)
            _close(y, y_ref, f"thread {i} round {r} output")
            _close(layer.backward(dy), dx_ref, f"thread {i} round {r} input gradient")

    run_in_threads(work, N_THREADS, timeout=300)


def test_predict_shared_by_16_threads():
    model = _model(nn.MaxPool2d(2))
    xs = [np.random.default_rng(300 + i).standard_normal((37 + i, 2, 8, 8))
          for i in range(N_THREADS)]
    refs = [nn.predict(model, x, batch_size=8) for x in xs]

    def work(i):
        for r in range(ROUNDS):
            _close(nn.predict(model, xs[i], batch_size=5 + i % 4), refs[i],
                   f"thread {i} round {r} predict")

    run_in_threads(work, N_THREADS, timeout=300)


def test_a_thread_keeps_its_own_forward_for_backward():
    """Thread A's backward uses A's forward even after thread B ran forward in between."""
    layer = nn.Linear(3, 2, dtype=np.float64, rng=5)
    xa, xb = np.ones((4, 3)), np.full((1, 3), -2.0)
    ya = layer(xa).copy()
    other = threading.Thread(target=lambda: layer(xb))
    other.start()
    other.join()
    layer.zero_grad()
    dy = np.ones_like(ya)
    layer.backward(dy)
    np.testing.assert_allclose(layer.weight.grad, dy.T @ xa, rtol=1e-15)


def test_models_still_copy_and_pickle():
    """The per-thread state is left out of copies and pickles (a thread-local object can be
    neither); weights and gradients are kept."""
    import copy
    import pickle
    model = _model(nn.MaxPool2d(2))
    x = np.random.default_rng(6).standard_normal((2, 2, 8, 8))
    y = model(x).copy()
    model.backward(np.ones_like(y))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        np.testing.assert_array_equal(clone(x), y)
        for p, q in zip(model.parameters(), clone.parameters()):
            np.testing.assert_array_equal(p.grad, q.grad)
            assert not np.shares_memory(p.data, q.data)
