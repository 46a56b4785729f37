"""Winograd convolution (3x3, stride 1): forced through ``config_context(conv_algorithm=
"winograd")`` against torch and a float64 NumPy reference, forward and dx, odd sizes, any
padding, any layout; the fallback to the rule on layers it does not apply to; the measured
error bound on random, heavy-tailed and adversarial large-magnitude data; Inf and NaN; the
workspace cap.

Tolerance: Winograd's error is not the k*eps-of-|terms| of a direct sum (its transforms mix
the tile's inputs), so results are held to the documented bound
``WINOGRAD_ERROR[m] * (C*9) * eps * max|x| * max|w|`` (plus the bias's rounding).
"""
import numpy as np
import pytest

import microtile as mt
from microtile._config._schema import ACTIVATIONS
from microtile.conv import _winograd
from microtile.conv._conv import last_plan
from microtile.conv.convolution import WINOGRAD_ERROR, WINOGRAD_F4_MAX_C

from _helpers import run_in_threads
from test_conv import ref_conv, ref_conv_backward

torch = pytest.importorskip("torch")
F = torch.nn.functional

F32, F64 = np.float32, np.float64
EPS = {F32: np.finfo(F32).eps, F64: np.finfo(F64).eps}


def tile(C, dtype):
    return 4 if dtype == F64 or C <= WINOGRAD_F4_MAX_C else 2


def bound(C, x, w, b, dtype):
    """The documented error bound for a correlation over C channels of x with w (+ b)."""
    m = tile(C, dtype)
    tol = WINOGRAD_ERROR[m] * C * 9 * EPS[dtype] * np.abs(x).max() * np.abs(w).max()
    if b is not None and b.size:
        tol += 2 * EPS[dtype] * np.abs(b).max()
    return tol + 1e-300


def torch_ref(x, w, b, dy, padding):
    xt = torch.tensor(np.array(x, F64), requires_grad=True)
    wt = torch.tensor(np.array(w, F64), requires_grad=True)
    bt = None if b is None else torch.tensor(np.array(b, F64))
    yt = F.conv2d(xt, wt, bt, padding=padding)
    yt.backward(torch.tensor(np.array(dy, F64)))
    return yt.detach().numpy(), xt.grad.numpy(), wt.grad.numpy()


def check(x, w, b, dtype, padding, *, algorithm="winograd", expect="winograd"):
    """Forward, dx, dw and db against torch and the NumPy reference in float64."""
    N, C, H, W = x.shape
    with mt.config_context(conv_algorithm=algorithm):
        y = mt.conv2d(x, w, b, padding=padding)
        assert last_plan()["algorithm"] == expect
        dy = np.random.default_rng(5).standard_normal(y.shape).astype(dtype)
        dx, dw, db = mt.conv2d_backward(dy, x, w, padding=padding,
                                        need_bias_grad=b is not None)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    ry, rdx, rdw = torch_ref(x, w, b, dy, padding)
    ny = ref_conv(x, w, b, padding=padding)
    ndx, ndw, ndb = ref_conv_backward(dy, x, w, padding=padding)
    np.testing.assert_allclose(ry, ny, rtol=1e-10, atol=1e-10)
    tol_y = bound(C, x, w, b, dtype)
    assert np.abs(y - ny).max() <= tol_y, (np.abs(y - ny).max(), tol_y)
    tol_dx = bound(w.shape[0], dy, w, None, dtype)
    assert np.abs(dx - ndx).max() <= tol_dx, (np.abs(dx - ndx).max(), tol_dx)
    assert np.abs(dx - rdx).max() <= tol_dx
    # dw and db run on im2col: a direct sum over N*P*Q terms.
    n_terms = y.shape[0] * y.shape[2] * y.shape[3]
    tol_w = 4 * (n_terms + 2) * EPS[dtype] * ref_conv_backward(
        np.abs(dy), np.abs(x), np.abs(w), padding=padding)[1] + 1e-300
    assert np.all(np.abs(dw - ndw) <= tol_w)
    if b is not None:
        np.testing.assert_allclose(db, ndb, rtol=n_terms * 4 * EPS[dtype],
                                   atol=n_terms * 4 * EPS[dtype] * np.abs(dy).max())
    else:
        assert db is None
    return y, dx


SHAPES = [
    # N, C, H, W, K, padding
    (1, 1, 1, 1, 1, 1),        # a single output, all padding
    (1, 1, 3, 3, 1, 0),        # one output, no padding
    (2, 3, 7, 7, 4, 1),
    (1, 5, 13, 57, 3, 1),      # odd sizes, edge tiles on both sides
    (3, 2, 57, 13, 1, 2),      # K == 1, padding 2
    (2, 1, 13, 7, 6, 0),       # C == 1
    (1, 4, 2, 5, 2, 2),        # H smaller than a tile
    (2, 8, 5, 3, 5, 1),        # W smaller than a tile
    (1, 16, 28, 28, 16, 1),
    (2, 7, 9, 11, 9, 0),
]


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("shape", SHAPES)
def test_forced_against_torch_and_reference(shape, dtype):
    N, C, H, W, K, pad = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((K, C, 3, 3)).astype(dtype)
    b = rng.standard_normal(K).astype(dtype)
    check(x, w, b, dtype, pad)
    check(x, w, None, dtype, pad)


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes(seed):
    rng = np.random.default_rng(100 + seed)
    N, C, K = (int(v) for v in rng.integers(1, 6, 3))
    H, W = (int(v) for v in rng.integers(1, 40, 2))
    pad = int(rng.integers(0, 3))
    H, W = max(H, 3 - 2 * pad), max(W, 3 - 2 * pad)
    dtype = (F32, F64)[seed % 2]
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((K, C, 3, 3)).astype(dtype)
    check(x, w, rng.standard_normal(K).astype(dtype), dtype, pad)


@pytest.mark.parametrize("layout", ["nhwc_view", "reversed", "fortran", "strided"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_noncontiguous_inputs(layout, dtype):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((2, 9, 11, 6)).astype(dtype)          # N, H, W, C
    w0 = rng.standard_normal((5, 6, 3, 3)).astype(dtype)
    if layout == "nhwc_view":
        x, w = base.transpose(0, 3, 1, 2), w0
    elif layout == "reversed":
        x = np.ascontiguousarray(base.transpose(0, 3, 1, 2))[:, ::-1, ::-1, ::-1]
        w = np.ascontiguousarray(w0[:, :, ::-1, ::-1])[:, :, ::-1, ::-1]
    elif layout == "fortran":
        x, w = np.asfortranarray(base.transpose(0, 3, 1, 2)), np.asfortranarray(w0)
    else:
        big = rng.standard_normal((2, 12, 20, 23)).astype(dtype)
        x, w = big[:, ::2, ::2, ::2][:, :6, :9, :11], w0
    assert not x.flags.c_contiguous
    xc, wc = x.copy(), w.copy()
    y, dx = check(x, w, None, dtype, 1)
    np.testing.assert_array_equal(x, xc)            # inputs untouched
    np.testing.assert_array_equal(w, wc)
    with mt.config_context(conv_algorithm="im2col"):
        y2 = mt.conv2d(np.ascontiguousarray(x), np.ascontiguousarray(w), padding=1)
    np.testing.assert_allclose(y, y2, rtol=1e-4 if dtype == F32 else 1e-12,
                               atol=1e-4 if dtype == F32 else 1e-12)


def test_unbatched_and_out():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 10, 10))
    w = rng.standard_normal((4, 3, 3, 3))
    out = np.empty((4, 10, 10))
    with mt.config_context(conv_algorithm="winograd"):
        y = mt.conv2d(x, w, padding="same", out=out)
        assert y is out and last_plan()["algorithm"] == "winograd"
        dx, dw, db = mt.conv2d_backward(np.ones_like(y), x, w, padding=1)
    np.testing.assert_allclose(y, ref_conv(x[None], w, padding=1)[0], atol=1e-12)
    assert dx.shape == x.shape


@pytest.mark.parametrize("kwargs, w_shape", [
    ({"stride": 2, "padding": 1}, (4, 6, 3, 3)),
    ({"padding": 2}, (4, 6, 5, 5)),
    ({"padding": 1, "groups": 2}, (4, 3, 3, 3)),
    ({"padding": 2, "dilation": 2}, (4, 6, 3, 3)),
    ({"padding": 0}, (4, 6, 1, 1)),
    ({"stride": (1, 2), "padding": 1}, (4, 6, 3, 3)),
])
def test_inapplicable_layers_fall_back_to_the_rule(kwargs, w_shape):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 6, 12, 12))
    w = rng.standard_normal(w_shape)
    with mt.config_context(conv_algorithm="winograd"):
        y = mt.conv2d(x, w, **kwargs)
        assert last_plan()["algorithm"] != "winograd"
        dy = rng.standard_normal(y.shape)
        dx, dw, db = mt.conv2d_backward(dy, x, w, **kwargs)
    np.testing.assert_allclose(y, ref_conv(x, w, **kwargs), rtol=1e-10, atol=1e-10)
    rdx, rdw, rdb = ref_conv_backward(dy, x, w, **kwargs)
    np.testing.assert_allclose(dx, rdx, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dw, rdw, rtol=1e-10, atol=1e-10)


def test_rule_chooses_winograd_on_large_3x3_layers_only():
    x = np.full((1, 64, 28, 28), 0.5, np.float32)
    w = np.full((64, 64, 3, 3), 0.25, np.float32)
    mt.conv2d(x, w, padding=1)
    assert last_plan()["algorithm"] == "winograd"
    mt.conv2d(x, w, padding=1, stride=2)
    assert last_plan()["algorithm"] != "winograd"
    mt.conv2d(x[:, :32], w[:32, :32], padding=1)          # too few channels
    assert last_plan()["algorithm"] != "winograd"
    mt.conv2d(x[:, :, :8, :8], w, padding=1)              # 4 tiles
    assert last_plan()["algorithm"] != "winograd"
    with mt.config_context(conv_algorithm="im2col"):
        mt.conv2d(x, w, padding=1)
        assert last_plan()["algorithm"] == "im2col"


def _data(kind, rng, xs, wsh):
    if kind == "normal":
        return rng.standard_normal(xs), rng.standard_normal(wsh) * 0.1
    if kind == "heavy":           # trained-like: heavy tails, large magnitudes
        return rng.standard_t(2, xs) * 100, rng.standard_t(2, wsh) * 10
    if kind == "positive":        # no cancellation at all, large magnitude
        return rng.uniform(0.5, 1, xs) * 1e4, rng.uniform(0.5, 1, wsh) * 1e3
    # checkerboard signs: the transforms' sums of +-1 coefficients add up in magnitude
    x = np.ones(xs) * 1e3
    x[..., ::2, 1::2] *= -1
    x[..., 1::2, ::2] *= -1
    w = np.ones(wsh)
    w[..., ::2, 1::2] *= -1
    w[..., 1::2, ::2] *= -1
    return x * rng.uniform(0.9, 1, xs), w * rng.uniform(0.9, 1, wsh)


@pytest.mark.parametrize("kind", ["normal", "heavy", "positive", "checkerboard"])
@pytest.mark.parametrize("C", [1, 8, 64, 300])
def test_error_bound_float32(kind, C):
    # C = 300 is above WINOGRAD_F4_MAX_C: F(2x2) there.
    rng = np.random.default_rng(C)
    x64, w64 = _data(kind, rng, (1, C, 14, 14), (8, C, 3, 3))
    x, w = x64.astype(F32), w64.astype(F32)
    with mt.config_context(conv_algorithm="winograd"):
        y = mt.conv2d(x, w, padding=1)
        assert last_plan()["algorithm"] == "winograd"
        assert last_plan()["tile"] == tile(C, F32)
        dx, _, _ = mt.conv2d_backward(np.ascontiguousarray(y), x, w, padding=1,
                                      need_bias_grad=False)
    ref = F.conv2d(torch.tensor(x, dtype=torch.float64), torch.tensor(w, dtype=torch.float64),
                   padding=1).numpy()
    assert np.abs(y - ref).max() <= bound(C, x, w, None, F32)
    rdx = ref_conv_backward(y, x, w, padding=1)[0]
    assert np.abs(dx - rdx).max() <= bound(8, y, w, None, F32)


def test_relu_epilogue():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 5, 9, 10))
    w = rng.standard_normal((3, 5, 3, 3))
    b = rng.standard_normal(3)
    y = np.empty((2, 3, 9, 10))
    assert _winograd.forward(x, w, b, y, (9, 10, 1, 1, 9, 10), 4, 8 << 20, 2 << 20,
                             ACTIVATIONS["relu"]) == _winograd.OK
    np.testing.assert_allclose(y, np.maximum(ref_conv(x, w, b, padding=1), 0), atol=1e-12)
    with pytest.raises(ValueError, match="activation"):
        _winograd.forward(x, w, b, y, (9, 10, 1, 1, 9, 10), 4, 8 << 20, 2 << 20, 7)


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("where", ["x", "w", "dy"])
def test_inf_nan_propagate_as_on_im2col(value, where):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 3, 12, 12))
    w = rng.standard_normal((2, 3, 3, 3))
    dy = rng.standard_normal((1, 2, 12, 12))
    {"x": x, "w": w, "dy": dy}[where][(0, 1, 1, 2) if where == "w" else (0, 1, 5, 6)] = value
    got, want = [], []
    for algo, res in (("winograd", got), ("im2col", want)):
        with mt.config_context(conv_algorithm=algo):
            res.append(mt.conv2d(x, w, padding=1))
            res.append(mt.conv2d_backward(dy, x, w, padding=1)[0])
    for g, e in zip(got, want):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(e))
        np.testing.assert_array_equal(np.isinf(g), np.isinf(e))
        fin = np.isfinite(e)
        np.testing.assert_allclose(g[fin], e[fin], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("workspace", [64 << 10, 300 << 10, 8 << 20])
def test_workspace_cap_and_threads(threads, workspace):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 40, 17, 15)).astype(F32)
    w = rng.standard_normal((48, 40, 3, 3)).astype(F32)
    b = rng.standard_normal(48).astype(F32)
    with mt.config_context(conv_algorithm="winograd", threads=threads,
                           conv_workspace=workspace):
        y = mt.conv2d(x, w, b, padding=1)
        plan = last_plan()
    # At 64 KiB, more than one thread's scratch leaves too little: im2col takes the layer.
    if workspace > 64 << 10 or threads == 1:
        assert plan["algorithm"] == "winograd"
    assert plan["workspace_bytes"] <= workspace
    if plan["algorithm"] == "winograd" and workspace == 64 << 10:
        assert plan["filter_blocks"] > 1 and plan["chunks"] > 1
    assert np.abs(y - ref_conv(x, w, b, padding=1)).max() <= bound(40, x, w, b, F32)


def test_layer_over_the_cap_takes_im2col():
    # One filter's transform alone (36 x C float32) is over half of a 64 KiB cap.
    x = np.full((1, 600, 6, 6), 0.5, np.float32)
    w = np.full((2, 600, 3, 3), 0.25, np.float32)
    with mt.config_context(conv_algorithm="winograd", conv_workspace=64 << 10):
        y = mt.conv2d(x, w, padding=1)
        assert last_plan()["algorithm"] == "im2col"
    np.testing.assert_allclose(y[0, 0, 2, 2], 0.125 * 600 * 9, rtol=1e-5)


def test_threads_from_python():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 16, 20, 20)).astype(F32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(F32)
    want = ref_conv(x, w, padding=1)

    def work(i):
        with mt.config_context(conv_algorithm="winograd"):
            for _ in range(5):
                y = mt.conv2d(x, w, padding=1)
                assert np.abs(y - want).max() <= bound(16, x, w, None, F32)
    run_in_threads(work, n=3)


def test_applicable_lists_winograd_where_it_applies():
    from microtile.conv import convolution
    x = np.zeros((2, 64, 28, 28), np.float32)
    for kw, w_shape, want in (({"padding": 1}, (64, 64, 3, 3), True),
                              ({"padding": 1, "stride": 2}, (64, 64, 3, 3), False),
                              ({"padding": 2}, (64, 64, 5, 5), False),
                              ({"padding": 1, "groups": 2}, (64, 32, 3, 3), False)):
        w = np.zeros(w_shape, np.float32)
        X4, _, geom, groups, K, P, Q = convolution._setup("test", x, w, kw.get("stride", 1),
                                                          kw["padding"], 1,
                                                          kw.get("groups", 1))
        ok = convolution.applicable(2, 64 // groups, K, groups, geom, np.float32)
        assert ("winograd" in ok) == want
        assert convolution._rule(2, 64 // groups, K, groups, geom, np.float32) == (
            "winograd" if want else ("direct" if groups > 1 and 64 // groups
                                     <= convolution.DIRECT_MAX_CG_FORWARD else "im2col"))
