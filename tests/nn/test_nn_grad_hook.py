"""The "gradients ready" callback of Sequential and Residual backward (what
microtile.distributed overlaps communication with): which layers it names, in which order,
that their gradients are final when it does, and that it stays in its thread."""
import threading

import numpy as np
import pytest

from microtile import nn
from microtile.nn._module import backward_leaves, grads_ready_hook

F64 = np.float64


def resnet_like(rng):
    block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, dtype=F64, rng=rng),
                          nn.BatchNorm2d(4, dtype=F64), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, dtype=F64, rng=rng))
    shortcut = nn.Conv2d(3, 4, 1, dtype=F64, rng=rng)
    return nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, dtype=F64, rng=rng), nn.Tanh(),
                         nn.Residual(block, shortcut), nn.ReLU(),
                         nn.Residual(nn.Sequential(nn.Conv2d(4, 4, 1, dtype=F64, rng=rng))),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 3, dtype=F64, rng=rng))


def run_backward(model, x, callback):
    y = model(x)
    with grads_ready_hook(callback):
        model.backward(np.ones_like(y))


def test_leaves_are_named_in_backward_order(rng):
    model = resnet_like(rng)
    calls = []
    run_backward(model, rng.standard_normal((2, 3, 5, 5)), calls.append)
    res1, res2 = model[2], model[4]
    expected = [model[6], model[5],
                res2.block[0],
                res1.block[3], res1.block[2], res1.block[1], res1.block[0], res1.shortcut,
                model[0]]
    # The ReLU after the second Residual and the one inside the block, and the Tanh,
    # ran fused into the layer before them: they are not named.
    assert [id(c) for c in calls] == [id(c) for c in expected if not isinstance(
        c, nn.ReLU)]
    listed = backward_leaves(model)
    fused = {id(model[1]), id(model[3]), id(res1.block[2])}
    assert [id(c) for c in listed if id(c) not in fused] == [id(c) for c in calls]


def test_gradients_are_final_when_named(rng):
    model = resnet_like(rng)
    x = rng.standard_normal((2, 3, 5, 5))
    model.zero_grad()
    snapshots = []

    def snapshot(layer):
        snapshots.append([p.grad.copy() for p in layer.parameters()]
                         if hasattr(layer, "parameters") else [])

    calls = []
    run_backward(model, x, lambda layer: (calls.append(layer), snapshot(layer)))
    assert sum(len(s) for s in snapshots) == len(model.parameters())
    for layer, grads in zip(calls, snapshots):
        for p, g in zip(layer.parameters(), grads):
            np.testing.assert_array_equal(g, p.grad)


def test_no_callback_outside_the_block_or_in_another_thread(rng):
    model = resnet_like(rng)
    x = rng.standard_normal((2, 3, 5, 5))
    calls = []
    other = []

    def backward_elsewhere():
        y = model(x)
        model.backward(np.ones_like(y))
        other.append(True)

    y = model(x)
    with grads_ready_hook(calls.append):
        t = threading.Thread(target=backward_elsewhere)
        t.start()
        t.join()
        model.backward(np.ones_like(y))
    n = len(calls)
    assert other == [True] and n == 8       # this thread's backward only
    y = model(x)
    model.backward(np.ones_like(y))
    assert len(calls) == n


def test_callback_restored_after_an_error(rng):
    model = nn.Sequential(nn.Linear(3, 2, dtype=F64, rng=rng))
    outer, inner = [], []
    model(np.ones((1, 3)))
    with grads_ready_hook(outer.append):
        with pytest.raises(ValueError):
            with grads_ready_hook(inner.append):
                model.backward(np.ones((1, 5)))       # wrong shape
        model.backward(np.ones((1, 2)))
    assert inner == [] and outer == [model[0]]
