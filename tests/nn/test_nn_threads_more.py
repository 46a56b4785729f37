"""The layers of issue 14 shared by 16 Python threads: each thread must get exactly its own
outputs and input gradients (per-thread buffers and saved state), as in test_nn_threads.

The references are the same layer run serially in float64; threads only change which
thread runs a layer, not the arithmetic, so the tolerance is test_nn_threads' (1e-11
relative), far below any mix-up with another thread's data.
"""
import numpy as np
import pytest

from microtile import nn

from _helpers import run_in_threads

N_THREADS = 16
ROUNDS = 6
TOL = 1e-11
F64 = np.float64


def _close(got, ref, what):
    scale = np.max(np.abs(ref)) if ref.size else 0.0
    err = np.max(np.abs(got - ref)) if ref.size else 0.0
    assert got.shape == ref.shape and err <= TOL * (1.0 + scale), f"{what}: off by {err:.3g}"


LAYERS = {
    # Batch statistics without running estimates: training mode mutates no shared state.
    "BatchNorm2d-train": lambda: nn.BatchNorm2d(3, track_running_stats=False, dtype=F64),
    "BatchNorm2d-eval": lambda: nn.BatchNorm2d(3, dtype=F64).eval(),
    "LeakyReLU": lambda: nn.LeakyReLU(0.2),
    "GELU": nn.GELU,
    "SiLU": nn.SiLU,
    "Softmax": lambda: nn.Softmax(1),
    "LogSoftmax": lambda: nn.LogSoftmax(-1),
    "AdaptiveAvgPool2d": lambda: nn.AdaptiveAvgPool2d((2, 3)),
    "Residual": lambda: nn.Residual(nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1, dtype=F64, rng=0), nn.BatchNorm2d(3, dtype=F64).eval(),
        nn.GELU())),
    "Dropout-eval": lambda: nn.Dropout(0.5).eval(),
}


@pytest.mark.parametrize("make", list(LAYERS.values()), ids=list(LAYERS))
def test_each_layer_shared_by_16_threads(make):
    layer = make()
    data = []
    for i in range(N_THREADS):
        rng = np.random.default_rng(200 + i)
        x = rng.standard_normal((1 + i % 4, 3, 6 + i % 3, 7))
        y = layer(x).copy()
        dy = rng.standard_normal(y.shape)
        data.append((x, y, dy, layer.backward(dy).copy()))

    def work(i):
        x, y_ref, dy, dx_ref = data[i]
        for r in range(ROUNDS):
            _close(layer(x), y_ref, f"thread {i} round {r} output")
            _close(layer.backward(dy), dx_ref, f"thread {i} round {r} input gradient")

    run_in_threads(work, N_THREADS, timeout=300)


def test_dropout_masks_are_per_thread():
    """Each thread's backward uses the mask of its own last forward."""
    layer = nn.Dropout(0.5, rng=0)

    def work(i):
        x = np.full((3 + i, 50), 1.0 + i)
        for _ in range(ROUNDS):
            y = layer(x).copy()
            assert set(np.unique(y)) <= {0.0, 2.0 * (1 + i)}
            dx = layer.backward(np.ones_like(x))
            np.testing.assert_array_equal(dx, np.where(y == 0, 0.0, 2.0))

    run_in_threads(work, N_THREADS, timeout=300)
