"""conv2d, conv2d_backward, im2col and col2im against a direct NumPy float64 reference."""
import threading
import warnings

import numpy as np
import pytest

import microtile as mt

EPS = {np.float32: np.finfo(np.float32).eps, np.float64: np.finfo(np.float64).eps}


# ------------------------------------------------------------------ float64 reference

def _pads(padding, R, S, dil):
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        th, tw = dil[0] * (R - 1), dil[1] * (S - 1)
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    ph, pw = (padding, padding) if np.isscalar(padding) else padding
    return ph, ph, pw, pw


def _pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


def _windows(xp, r, s, P, Q, st, dil):
    """xp[..., r*dh + p*sh, s*dw + q*sw] for all p < P, q < Q (a strided slice)."""
    h0, w0 = r * dil[0], s * dil[1]
    return xp[:, :, h0:h0 + st[0] * (P - 1) + 1:st[0], w0:w0 + st[1] * (Q - 1) + 1:st[1]]


def _padded(x, w, stride, padding, dilation):
    """x and w in float64, the stride and dilation pairs, the pads (top, bottom, left, right)
    and x zero-padded by them."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    st, dil = _pair(stride), _pair(dilation)
    pads = _pads(padding, w.shape[2], w.shape[3], dil)
    pt, pb, pl, pr = pads
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    return x, w, st, dil, pads, xp


def ref_conv(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """Direct loops over kernel taps and groups, in float64."""
    x, w, st, dil, (pt, pb, pl, pr), xp = _padded(x, w, stride, padding, dilation)
    N, C, H, W = x.shape
    K, Cg, R, S = w.shape
    P = (H + pt + pb - dil[0] * (R - 1) - 1) // st[0] + 1
    Q = (W + pl + pr - dil[1] * (S - 1) - 1) // st[1] + 1
    Kg = K // groups
    y = np.zeros((N, K, P, Q))
    for g in range(groups):
        xg = xp[:, g * Cg:(g + 1) * Cg]
        for r in range(R):
            for s in range(S):
                patch = _windows(xg, r, s, P, Q, st, dil)
                y[:, g * Kg:(g + 1) * Kg] += np.einsum("nchw,kc->nkhw", patch,
                                                       w[g * Kg:(g + 1) * Kg, :, r, s])
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None, None]
    return y


def ref_conv_backward(dy, x, w, stride=1, padding=0, dilation=1, groups=1):
    dy = np.asarray(dy, np.float64)
    x, w, st, dil, (pt, pb, pl, pr), xp = _padded(x, w, stride, padding, dilation)
    N, C, H, W = x.shape
    K, Cg, R, S = w.shape
    dxp = np.zeros_like(xp)
    P, Q = dy.shape[2:]
    Kg = K // groups
    dw = np.zeros_like(w)
    for g in range(groups):
        ks = slice(g * Kg, (g + 1) * Kg)
        cs = slice(g * Cg, (g + 1) * Cg)
        for r in range(R):
            for s in range(S):
                patch = _windows(xp[:, cs], r, s, P, Q, st, dil)
                dw[ks, :, r, s] = np.einsum("nkhw,nchw->kc", dy[:, ks], patch)
                _windows(dxp[:, cs], r, s, P, Q, st, dil)[...] += np.einsum(
                    "nkhw,kc->nchw", dy[:, ks], w[ks, :, r, s])
    dx = dxp[:, :, pt:pt + H, pl:pl + W]
    return dx, dw, dy.sum(axis=(0, 2, 3))


def assert_close(got, ref, bound, k, dtype, what=""):
    """|got - ref| <= c * k * eps * bound, with bound the same sum taken over |terms|."""
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    tol = 4 * (k + 2) * EPS[dtype] * bound + 1e-300
    err = np.abs(got.astype(np.float64) - ref)
    worst = np.unravel_index(np.argmax(err - tol), err.shape) if err.size else None
    assert np.all(err <= tol), f"{what}: worst at {worst}: got {got[worst]}, want {ref[worst]}"


def random_config(rng):
    groups = int(rng.choice([1, 1, 2, 3]))
    Cg = int(rng.integers(1, 4))
    Kg = int(rng.integers(1, 4))
    if rng.random() < 0.2:  # depthwise
        Cg, Kg, groups = 1, 1, int(rng.integers(2, 6))
    R, S = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    st = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    dil = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    pad = (int(rng.integers(0, 3)), int(rng.integers(0, 3)))
    H = int(rng.integers(dil[0] * (R - 1) + 1, 16)) - min(pad[0], 1)
    W = int(rng.integers(dil[1] * (S - 1) + 1, 16)) - min(pad[1], 1)
    N = int(rng.integers(1, 4))
    return dict(N=N, C=Cg * groups, H=max(H, 1), W=max(W, 1), K=Kg * groups, R=R, S=S,
                stride=st, padding=pad, dilation=dil, groups=groups)


def make(cfg, dtype, rng, bias=True):
    x = rng.standard_normal((cfg["N"], cfg["C"], cfg["H"], cfg["W"])).astype(dtype)
    w = rng.standard_normal((cfg["K"], cfg["C"] // cfg["groups"], cfg["R"], cfg["S"]))
    b = rng.standard_normal(cfg["K"]).astype(dtype) if bias else None
    return x, w.astype(dtype), b


def kw(cfg):
    return {k: cfg[k] for k in ("stride", "padding", "dilation", "groups")}


def check_forward_backward(x, w, b, dtype, **kwargs):
    y = mt.conv2d(x, w, b, **kwargs)
    ref = ref_conv(x, w, b, **kwargs)
    k = w.shape[1] * w.shape[2] * w.shape[3]
    bound = ref_conv(np.abs(x), np.abs(w), None if b is None else np.abs(b), **kwargs)
    assert y.dtype == dtype
    assert_close(y, ref, bound, k, dtype, "y")
    dy = np.random.default_rng(7).standard_normal(y.shape).astype(dtype)
    dx, dw, db = mt.conv2d_backward(dy, x, w, **kwargs)
    rdx, rdw, rdb = ref_conv_backward(dy, x, w, **kwargs)
    adx, adw, adb = ref_conv_backward(np.abs(dy), np.abs(x), np.abs(w), **kwargs)
    n_terms = dy.shape[0] * dy.shape[2] * dy.shape[3]
    assert_close(dx, rdx, adx, w.shape[0] * w.shape[2] * w.shape[3], dtype, "dx")
    assert_close(dw, rdw, adw, n_terms, dtype, "dw")
    assert_close(db, rdb, adb, n_terms, dtype, "db")
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == (w.shape[0],)
    assert dx.dtype == dw.dtype == db.dtype == dtype


# ------------------------------------------------------------------------ forward/backward

@pytest.mark.parametrize("algorithm", ["auto", "im2col", "direct"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(24))
def test_random_configs(seed, dtype, algorithm):
    # Every configuration on both algorithms (each applies to any layer), and on the one
    # the built-in rule picks.
    rng = np.random.default_rng(seed)
    cfg = random_config(rng)
    x, w, b = make(cfg, dtype, rng, bias=seed % 3 != 0)
    with mt.config_context(conv_algorithm=algorithm):
        check_forward_backward(x, w, b, dtype, **kw(cfg))


@pytest.mark.parametrize("layout", ["fortran", "reversed", "strided", "transposed"])
def test_noncontiguous_inputs(layout):
    rng = np.random.default_rng(1)
    base = rng.standard_normal((3, 4, 11, 13))
    if layout == "fortran":
        x = np.asfortranarray(base)
    elif layout == "reversed":
        x = base[:, ::-1, ::-1, ::-1]
    elif layout == "strided":
        x = rng.standard_normal((3, 8, 22, 13))[:, ::2, ::2, :]
    else:
        x = np.ascontiguousarray(base.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    w = rng.standard_normal((12, 6, 3, 2))[::2, ::3]   # (6, 2, 3, 2), strided
    b = rng.standard_normal(12)[::2]
    check_forward_backward(x, w, b, np.float64, stride=(2, 1), padding=1, dilation=(1, 2),
                           groups=2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hw", [(7, 7), (20, 19)])
def test_1x1(dtype, hw):
    # (20, 19) takes the no-im2col path; (7, 7) batches images through im2col.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 12, *hw)).astype(dtype)
    w = rng.standard_normal((8, 6, 1, 1)).astype(dtype)
    b = rng.standard_normal(8).astype(dtype)
    check_forward_backward(x, w, b, dtype, groups=2)
    # A plane that is not one strided run falls back to im2col.
    check_forward_backward(x[:, :, :, ::2], w, b, dtype, groups=2)
    check_forward_backward(x, w, b, dtype, stride=2, groups=2)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("workspace", [64 << 10, 1 << 20])
@pytest.mark.parametrize("shape", [(5, 6, 40, 37, 7), (9, 16, 6, 6, 24), (1, 3, 70, 70, 4)])
def test_chunking_and_threads(threads, workspace, shape):
    # Small workspaces force slices of one image (large planes) or several images per chunk
    # (small planes); odd thread counts leave uneven shares.
    N, C, H, W, K = shape
    rng = np.random.default_rng(3)
    x = rng.standard_normal((N, C, H, W))
    w = rng.standard_normal((K, C, 3, 3))
    b = rng.standard_normal(K)
    with mt.config_context(conv_workspace=workspace, threads=threads):
        check_forward_backward(x, w, b, np.float64, padding=1, stride=(1, 2))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("K", [33, 70])
def test_large_depth_chunks_float32(K, threads):
    # GEMM depth above kc; K = 70 accumulates dW rather than dW^T and, with many filters on
    # small planes, threads inside the GEMMs instead of over chunks.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 40, 15, 15)).astype(np.float32)
    w = rng.standard_normal((K, 40, 3, 3)).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32)
    with mt.config_context(conv_workspace=64 << 10, threads=threads):
        check_forward_backward(x, w, b, np.float32, padding=1)
    with mt.config_context(threads=threads):
        check_forward_backward(x, w, b, np.float32, padding=1)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_padding_modes(padding):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 9, 10))
    w = rng.standard_normal((4, 3, 4, 3))  # even kernel height: asymmetric "same" padding
    check_forward_backward(x, w, None, np.float64, padding=padding, dilation=(2, 1))
    if padding == "same":
        assert mt.conv2d(x, w, padding="same", dilation=(2, 1)).shape == (2, 4, 9, 10)


def test_gradients_finite_differences():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 4, 7, 6))
    w = rng.standard_normal((6, 2, 3, 2))
    b = rng.standard_normal(6)
    args = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    dy = rng.standard_normal(mt.conv2d(x, w, b, **args).shape)
    dx, dw, db = mt.conv2d_backward(dy, x, w, **args)

    def loss(xx, ww, bb):
        return float(np.sum(dy * mt.conv2d(xx, ww, bb, **args)))

    h = 1e-6
    for arr, grad, pos in ((x, dx, 0), (w, dw, 1), (b, db, 2)):
        for flat in rng.choice(arr.size, size=min(arr.size, 12), replace=False):
            idx = np.unravel_index(flat, arr.shape)
            plus = [x.copy(), w.copy(), b.copy()]
            minus = [x.copy(), w.copy(), b.copy()]
            plus[pos][idx] += h
            minus[pos][idx] -= h
            num = (loss(*plus) - loss(*minus)) / (2 * h)
            assert abs(num - grad[idx]) <= 1e-6 * (1 + abs(num)), (pos, idx, num, grad[idx])


def test_need_flags_and_unbatched():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 8, 8))
    w = rng.standard_normal((5, 3, 3, 3))
    y = mt.conv2d(x, w, padding=1)
    np.testing.assert_allclose(y, ref_conv(x[None], w, padding=1)[0], rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = mt.conv2d_backward(dy, x, w, padding=1, need_input_grad=False,
                                    need_bias_grad=False)
    assert dx is None and db is None
    rdx, rdw, _ = ref_conv_backward(dy[None], x[None], w, padding=1)
    np.testing.assert_allclose(dw, rdw, rtol=1e-12, atol=1e-12)
    dx, dw2, db = mt.conv2d_backward(dy, x, w, padding=1)
    assert dx.shape == x.shape
    np.testing.assert_allclose(dx, rdx[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw2, rdw, rtol=1e-12, atol=1e-12)


def test_mixed_dtypes_promote():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    w = rng.standard_normal((3, 2, 2, 2))
    assert mt.conv2d(x, w).dtype == np.float64
    assert mt.conv2d(x, w.astype(np.float32)).dtype == np.float32
    assert mt.conv2d(x, w.astype(np.float32), np.zeros(3)).dtype == np.float64
    dx, dw, db = mt.conv2d_backward(np.ones((2, 3, 4, 4), np.float32), x, w)
    assert dx.dtype == dw.dtype == db.dtype == np.float64


def test_out_argument():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 3, 6, 6))
    w = rng.standard_normal((4, 3, 3, 3))
    ref = ref_conv(x, w, padding=1)
    out = np.empty((2, 4, 6, 6))
    assert mt.conv2d(x, w, padding=1, out=out) is out
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    outf = np.empty((2, 4, 6, 6), order="F")
    assert mt.conv2d(x, w, padding=1, out=outf) is outf
    np.testing.assert_allclose(outf, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        mt.conv2d(x, w, out=np.empty((2, 4, 6, 6)))
    with pytest.raises(TypeError):
        mt.conv2d(x, w, padding=1, out=np.empty((2, 4, 6, 6), np.float32))
    ro = np.empty((2, 4, 6, 6))
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        mt.conv2d(x, w, padding=1, out=ro)


def test_inputs_untouched_and_readonly():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 4, 9, 9))
    w = rng.standard_normal((4, 2, 3, 3))
    b = rng.standard_normal(4)
    dy = rng.standard_normal((2, 4, 9, 9))
    copies = [a.copy() for a in (x, w, b, dy)]
    for a in (x, w, b, dy):
        a.flags.writeable = False
    mt.conv2d(x, w, b, padding=1, groups=2)
    mt.conv2d_backward(dy, x, w, padding=1, groups=2)
    for a, c in zip((x, w, b, dy), copies):
        np.testing.assert_array_equal(a, c)


def test_zero_sizes():
    w = np.ones((4, 3, 3, 3))
    assert mt.conv2d(np.ones((0, 3, 5, 5)), w).shape == (0, 4, 3, 3)
    y = mt.conv2d(np.ones((2, 3, 5, 5)), np.ones((0, 3, 3, 3)))
    assert y.shape == (2, 0, 3, 3)
    y = mt.conv2d(np.ones((2, 0, 5, 5)), np.ones((4, 0, 3, 3)), np.arange(4.0))
    np.testing.assert_array_equal(y, np.broadcast_to(np.arange(4.0)[None, :, None, None],
                                                     (2, 4, 3, 3)))
    dx, dw, db = mt.conv2d_backward(np.ones((0, 4, 3, 3)), np.ones((0, 3, 5, 5)), w)
    assert dx.shape == (0, 3, 5, 5) and dw.shape == w.shape and not dw.any()
    np.testing.assert_array_equal(db, np.zeros(4))
    dx, dw, db = mt.conv2d_backward(np.ones((2, 4, 3, 3)), np.ones((2, 0, 5, 5)),
                                    np.ones((4, 0, 3, 3)))
    assert dx.shape == (2, 0, 5, 5) and dw.shape == (4, 0, 3, 3)
    np.testing.assert_array_equal(db, np.full(4, 18.0))


def test_nan_inf_propagate():
    x = np.ones((1, 1, 5, 5))
    x[0, 0, 2, 2] = np.nan
    y = mt.conv2d(x, np.ones((1, 1, 3, 3)))
    assert np.isnan(y).all()          # every 3x3 window of a 5x5 plane covers the centre
    x[0, 0, 2, 2] = np.inf
    y = mt.conv2d(x, np.ones((1, 1, 1, 1)))
    assert np.isinf(y[0, 0, 2, 2]) and np.isfinite(y).sum() == 24


def test_threads_from_python():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((4, 6, 20, 20)).astype(np.float32)
    w = rng.standard_normal((8, 6, 3, 3)).astype(np.float32)
    want = mt.conv2d(x, w, padding=1)
    errors = []

    def work():
        try:
            for _ in range(5):
                np.testing.assert_array_equal(mt.conv2d(x, w, padding=1), want)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ---------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(x=np.ones((2, 4, 5, 5)), w=np.ones((3, 3, 3, 3))), ValueError, "channels"),
    (dict(x=np.ones((2, 4, 5, 5)), w=np.ones((3, 2, 3, 3)), groups=2), ValueError, "groups"),
    (dict(x=np.ones((2, 3, 5, 5)), w=np.ones((4, 1, 3, 3)), groups=2), ValueError, "divide"),
    (dict(x=np.ones((2, 3, 5, 5)), w=np.ones((4, 3, 6, 3))), ValueError, "larger"),
    (dict(x=np.ones((2, 3, 5, 5)), w=np.ones((4, 3, 3, 3)), dilation=3), ValueError,
     "larger"),
    (dict(x=np.ones((2, 3, 5, 5)), w=np.ones((4, 3, 3, 3)), stride=0), ValueError, "stride"),
    (dict(x=np.ones((2, 3, 5, 5)), w=np.ones((4, 3, 3, 3)), stride=(1, -1)), ValueError,
     "stride"),
    (dict(x=np.ones((2, 3, 5, 5)), w=np.ones((4, 3, 3, 3)), dilation=0), ValueError,
     "dilation"),
    (dict(x=np.ones((2, 3, 5, 5)), w=np.ones((4, 3, 3, 3)), padding=-1), ValueError,
     "padding"),
    (dict(x=np.ones((2, 3, 5, 5)), w=np.ones((4, 3, 3, 3)), padding="same", stride=2),
     ValueError, "same"),
    (dict(x=np.ones((2, 3, 5, 5)), w=np.ones((4, 3, 3, 3)), padding="full"), ValueError,
     "padding"),
    (dict(x=np.ones((2, 3, 5, 5)), w=np.ones((4, 3, 3, 3)), stride=(1, 2, 3)), ValueError,
     "stride"),
    (dict(x=np.ones((2, 3, 5, 5)), w=np.ones((4, 3, 3, 3)), stride=1.5), TypeError,
     "stride"),
    (dict(x=np.ones((2, 3, 5, 5)), w=np.ones((4, 3, 3, 3)), groups=0), ValueError, "groups"),
    (dict(x=np.ones((2, 3, 5, 5)), w=np.ones((4, 3, 3, 3)), groups=1.0), TypeError,
     "groups"),
    (dict(x=np.ones((3, 5, 5, 1, 1)), w=np.ones((4, 3, 3, 3))), ValueError, "4-D"),
    (dict(x=np.ones((5, 5)), w=np.ones((4, 3, 3, 3))), ValueError, "4-D"),
    (dict(x=np.ones((2, 3, 5, 5)), w=np.ones((4, 3, 3))), ValueError, "4-D"),
    (dict(x=np.ones((2, 3, 5, 5), int), w=np.ones((4, 3, 3, 3))), TypeError, "int64"),
    (dict(x=np.ones((2, 3, 5, 5)), w=np.ones((4, 3, 3, 3), np.float16)), TypeError,
     "float16"),
    (dict(x=np.ones((2, 3, 5, 5)), w=np.ones((4, 3, 3, 3)), bias=np.ones(3)), ValueError,
     "bias"),
    (dict(x=np.ones((2, 3, 5, 5)), w=np.ones((4, 3, 3, 3)), bias=np.ones(4, bool)), TypeError,
     "bool"),
])
def test_conv2d_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mt.conv2d(**kwargs)


def test_backward_errors():
    x, w = np.ones((2, 3, 5, 5)), np.ones((4, 3, 3, 3))
    with pytest.raises(ValueError, match="dy"):
        mt.conv2d_backward(np.ones((2, 4, 5, 5)), x, w)
    with pytest.raises(TypeError, match="complex"):
        mt.conv2d_backward(np.ones((2, 4, 3, 3), complex), x, w)
    with pytest.raises(ValueError, match="channels"):
        mt.conv2d_backward(np.ones((2, 4, 3, 3)), x, np.ones((4, 2, 3, 3)))


# ----------------------------------------------------------------------- im2col / col2im

def ref_im2col(x, R, S, stride, padding, dilation):
    st, dil, pad = _pair(stride), _pair(dilation), _pair(padding)
    N, C, H, W = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0],) * 2, (pad[1],) * 2))
    P = (H + 2 * pad[0] - dil[0] * (R - 1) - 1) // st[0] + 1
    Q = (W + 2 * pad[1] - dil[1] * (S - 1) - 1) // st[1] + 1
    out = np.empty((N, C, R, S, P * Q))
    for r in range(R):
        for s in range(S):
            out[:, :, r, s] = _windows(xp, r, s, P, Q, st, dil).reshape(N, C, P * Q)
    return out.reshape(N, C * R * S, P * Q)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(8))
def test_im2col_col2im(seed, dtype):
    rng = np.random.default_rng(100 + seed)
    cfg = random_config(rng)
    x = rng.standard_normal((cfg["N"], cfg["C"], cfg["H"], cfg["W"])).astype(dtype)
    if seed % 2:
        x = x[:, ::-1, :, ::-1]
    ks = (cfg["R"], cfg["S"])
    args = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"])
    cols = mt.im2col(x, ks, **args)
    np.testing.assert_array_equal(cols, ref_im2col(x, *ks, **args).astype(dtype))
    # col2im is the adjoint of im2col: <im2col(x), c> == <x, col2im(c)>.
    c = rng.standard_normal(cols.shape)
    back = mt.col2im(c, x.shape[2:], ks, **args)
    assert back.shape == x.shape
    lhs = np.sum(ref_im2col(x, *ks, **args) * c)
    rhs = np.sum(x.astype(np.float64) * back)
    assert abs(lhs - rhs) <= 1e-10 * (1 + np.sum(np.abs(c)) * np.abs(x).max())


def test_im2col_col2im_errors():
    x = np.ones((2, 3, 5, 5))
    with pytest.raises(ValueError, match="larger"):
        mt.im2col(x, 6)
    with pytest.raises(ValueError, match="4-D"):
        mt.im2col(np.ones((5, 5)), 2)
    with pytest.raises(TypeError):
        mt.im2col(x, 2, padding="same")
    with pytest.raises(ValueError, match="taps"):
        mt.col2im(np.ones((2, 10, 16)), (5, 5), 2)
    with pytest.raises(ValueError, match="columns"):
        mt.col2im(np.ones((2, 12, 15)), (5, 5), 2)
    with pytest.raises(TypeError):
        mt.col2im(np.ones((2, 12, 16), np.int32), (5, 5), 2)
    assert mt.im2col(np.ones((3, 5, 5)), 2).shape == (12, 16)
    assert mt.col2im(np.ones((12, 16)), 5, 2).shape == (3, 5, 5)


# ------------------------------------------------------------------------------ vs torch

@pytest.mark.parametrize("seed", range(6))
def test_against_torch(seed):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(200 + seed)
    cfg = random_config(rng)
    x, w, b = make(cfg, np.float32, rng)
    args = kw(cfg)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = F.conv2d(xt, wt, bt, **args)
    y = mt.conv2d(x, w, b, **args)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    yt.backward(torch.tensor(dy))
    dx, dw, db = mt.conv2d_backward(dy, x, w, **args)
    for got, ref in ((dx, xt.grad), (dw, wt.grad), (db, bt.grad)):
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4)
    ks = (cfg["R"], cfg["S"])
    uargs = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"])
    cols = mt.im2col(x, ks, **uargs)
    np.testing.assert_array_equal(cols, F.unfold(torch.tensor(x), ks, **uargs).numpy())
    np.testing.assert_allclose(mt.col2im(cols, x.shape[2:], ks, **uargs),
                               F.fold(torch.tensor(cols), x.shape[2:], ks, **uargs).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_same_padding_against_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(300)
    x = rng.standard_normal((2, 2, 8, 7)).astype(np.float32)
    w = rng.standard_normal((3, 2, 4, 2)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch notes that it copies the input for this case
        ref = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), padding="same",
                                         dilation=(1, 3))
    np.testing.assert_allclose(mt.conv2d(x, w, padding="same", dilation=(1, 3)), ref.numpy(),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- workspace cap, any geometry

def _weight(w, layout):
    """w with a given memory layout: C order, a non-contiguous one no (K, C·R·S) matrix view
    can describe, a stride-0 broadcast of one value, or one broadcast along R only."""
    if layout == "C":
        return w
    if layout == "transposed":
        return np.ascontiguousarray(w.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    if layout == "broadcast":
        return np.broadcast_to(w[:1, :1, :1, :1], w.shape)
    if layout == "broadcast_rows":
        return np.broadcast_to(w[:, :, :1, :], w.shape)
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ["C", "transposed", "broadcast", "broadcast_rows"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cfg", [
    dict(N=2, C=8, H=20, W=21, K=3, R=17, S=17, stride=1, padding=3, dilation=1, groups=1),
    dict(N=1, C=8, H=40, W=41, K=4, R=25, S=23, stride=2, padding=5, dilation=1, groups=2),
    dict(N=3, C=36, H=30, W=30, K=6, R=13, S=14, stride=(1, 2), padding=(2, 3),
         dilation=(2, 1), groups=3),
])
def test_depth_slices_when_one_column_is_over_the_workspace(cfg, threads, layout):
    # With the smallest workspace a single output position's column (Cg*R*S elements) is
    # over one thread's budget: the depth is cut into slices whose GEMMs add into the same
    # output block, and the workspace used stays under the cap.  (im2col forced: cfg1's
    # four channels per group would take the direct kernel, which has no columns.)
    rng = np.random.default_rng(11)
    x, w, b = make(cfg, np.float64, rng)
    w = _weight(w, layout)
    with mt.config_context(threads=threads, conv_workspace=64 << 10, conv_chunk=16 << 10,
                           conv_algorithm="im2col"):
        check_forward_backward(x, w, b, np.float64, **kw(cfg))
        plan = mt.conv._conv.last_plan()
        mt.conv2d(x, w, b, **kw(cfg))
        fwd = mt.conv._conv.last_plan()
    for p in (plan, fwd):
        assert p["depth_slices"] > 1, p
        assert p["workspace_bytes"] <= 64 << 10, p


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_depth_slices_against_torch(dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    cfg = dict(N=2, C=36, H=19, W=23, K=4, R=15, S=16, stride=(2, 1), padding=(4, 2),
               dilation=1, groups=2)
    x, w, b = make(cfg, dtype, rng)
    xt, wt, bt = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, w, b))
    yt = torch.nn.functional.conv2d(xt, wt, bt, **kw(cfg))
    dy = rng.standard_normal(tuple(yt.shape)).astype(dtype)
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    # im2col forced: the built-in rule takes the direct kernel for this grouped forward.
    with mt.config_context(conv_workspace=64 << 10, conv_chunk=16 << 10,
                           conv_algorithm="im2col"):
        y = mt.conv2d(x, w, b, **kw(cfg))
        assert mt.conv._conv.last_plan()["depth_slices"] > 1
        dx, dw, db = mt.conv2d_backward(dy, x, w, **kw(cfg))
    # Sums of at most 4320 products of O(1) terms, in any order: k * eps relative to the
    # largest sum is under 3e-3 in float32 and 1e-12 in float64.
    tol = 3e-3 if dtype == np.float32 else 1e-10
    for got, ref in ((y, yt), (dx, xt.grad), (dw, wt.grad), (db, bt.grad)):
        ref = ref.detach().numpy()
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("workspace", [64 << 10, 1 << 20, 8 << 20])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("geom", [
    # (x shape, w shape, padding): columns of 1 position x 1.6e5 taps, of 4e4 positions x
    # 1 tap, and in between.
    ((1, 1, 400, 400), (1, 1, 400, 400), 0),
    ((1, 4, 200, 200), (2, 4, 1, 1), 0),
    ((2, 2, 60, 55), (3, 2, 30, 25), 7),
    ((16, 3, 9, 9), (8, 3, 3, 3), 1),
])
def test_workspace_cap_holds_for_any_geometry(geom, threads, workspace):
    # The im2col driver's chunking (forced: the rule sends the last geometry, 3 input
    # channels, to the direct kernel, whose scratch is a band per thread).
    xs, ws_, pad = geom
    x = np.broadcast_to(np.float32(0.5), xs)
    w = np.broadcast_to(np.float32(0.25), ws_)
    with mt.config_context(threads=threads, conv_workspace=workspace, conv_algorithm="im2col"):
        y = mt.conv2d(x, w, padding=pad)
        assert mt.conv._conv.last_plan()["workspace_bytes"] <= workspace
        dx, dw, db = mt.conv2d_backward(np.ones_like(y), x, w, padding=pad,
                                        need_input_grad=xs[0] * xs[2] < 1000)
        assert mt.conv._conv.last_plan()["workspace_bytes"] <= workspace
    # Every output is a sum of the same products where the window covers only x (no
    # padding): spot-check the exact central value, 0.125 * (taps), exact in float32.
    taps = ws_[1] * ws_[2] * ws_[3]
    if pad == 0:
        np.testing.assert_array_equal(y, np.float32(0.125 * taps))


def test_broadcast_weight_is_read_in_place():
    # The weight matrix is a view of a broadcast or C-ordered w (no copy of its logical size).
    from microtile.conv.convolution import _weight_matrix
    w = np.broadcast_to(1.0, (2, 3, 50, 60))
    wm = _weight_matrix(w, np.dtype(np.float64))
    assert wm.shape == (2, 9000) and wm.strides == (0, 0)
    c = np.ones((4, 3, 5, 5))
    assert np.shares_memory(_weight_matrix(c, np.dtype(np.float64)), c)
    assert np.shares_memory(_weight_matrix(c[::2], np.dtype(np.float64)), c)


# ------------------------------------------------------------- argument limits and types

@pytest.mark.parametrize("arg", ["stride", "dilation", "padding"])
@pytest.mark.parametrize("value", [2 ** 31, 2 ** 62, 2 ** 64, (1, 2 ** 63)])
def test_huge_geometry_arguments_are_value_errors(arg, value):
    # Once an OverflowError ("Python int too large to convert to C ssize_t") or a NumPy
    # "Maximum allowed dimension exceeded"; now a ValueError naming the argument.
    x, w = np.ones((1, 2, 5, 5)), np.ones((3, 2, 3, 3))
    for call in (lambda: mt.conv2d(x, w, **{arg: value}),
                 lambda: mt.conv2d_backward(np.ones((1, 3, 3, 3)), x, w, **{arg: value}),
                 lambda: mt.im2col(x, 2, **{arg: value}),
                 lambda: mt.col2im(np.ones((1, 8, 16)), 5, 2, **{arg: value})):
        with pytest.raises(ValueError, match=arg):
            call()
    with pytest.raises(ValueError, match="kernel_size"):
        mt.im2col(x, value if arg == "stride" else 2 ** 40)


def test_largest_accepted_arguments_compute():
    # The limit itself is accepted and computes: a stride of 2**31 - 1 keeps one window.
    x = np.arange(50.0).reshape(1, 2, 5, 5)
    w = np.ones((1, 2, 1, 1))
    y = mt.conv2d(x, w, stride=2 ** 31 - 1)
    np.testing.assert_array_equal(y, [[[[x[0, :, 0, 0].sum()]]]])
    cols = mt.im2col(x, 1, stride=2 ** 31 - 1)
    np.testing.assert_array_equal(cols, x[:, :, :1, :1].reshape(1, 2, 1))


def test_huge_padding_result_is_a_value_error():
    # Padding within the argument limit whose output could not exist: ValueError, not a
    # crash or MemoryError.
    with pytest.raises(ValueError, match="result would have shape"):
        mt.im2col(np.ones((1, 1, 3, 3)), 2, padding=2 ** 31 - 1)
    with pytest.raises(ValueError, match="result would have shape"):
        mt.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2)), padding=2 ** 31 - 1)


@pytest.mark.parametrize("groups", [2 ** 31, 2 ** 64])
def test_huge_groups_is_a_value_error(groups):
    with pytest.raises(ValueError, match="groups"):
        mt.conv2d(np.ones((1, 0, 5, 5)), np.ones((0, 0, 3, 3)), groups=groups)


@pytest.mark.parametrize("value", ["12", "1111", b"4", np.str_("4"), ("1", 2), [2, "2"]])
def test_strings_are_never_sizes(value):
    x = np.ones((1, 2, 5, 5))
    with pytest.raises(TypeError, match="output_size"):
        mt.col2im(np.ones((1, 8, 16)), value, 2)
    with pytest.raises(TypeError, match="kernel_size"):
        mt.im2col(x, value)
    with pytest.raises(TypeError, match="stride"):
        mt.conv2d(x, np.ones((3, 2, 3, 3)), stride=value)


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 4, 1), (1, 4, 9), (2, 8, 16)])
def test_col2im_accepts_broadcast_columns(shape):
    # A stride-0 view used to be refused ("col2im_into: columns must be contiguous") when
    # NumPy kept it as it was; it is read in place, or its distinct rows copied.
    R = S = int(round((shape[1] // (1 if shape[1] == 1 else 2)) ** 0.5)) if shape[1] > 1 else 1
    C = shape[1] // (R * S)
    L = shape[2]
    side = int(round(L ** 0.5)) + R - 1
    cols = np.broadcast_to(np.float64(1.5), shape)
    got = mt.col2im(cols, side, (R, S))
    ref = mt.col2im(np.ascontiguousarray(cols), side, (R, S))
    assert got.shape == (shape[0], C, side, side)
    np.testing.assert_array_equal(got, ref)
    rows = np.broadcast_to(np.arange(shape[1], dtype=np.float64)[None, :, None], shape)
    np.testing.assert_array_equal(mt.col2im(rows, side, (R, S)),
                                  mt.col2im(np.ascontiguousarray(rows), side, (R, S)))


def test_byteswapped_and_misaligned_out():
    # As NumPy, an out of the result's type in the other byte order (or misaligned) is
    # accepted and holds the result.
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    ref = mt.conv2d(x, w, padding=1)
    out = np.zeros(ref.shape, np.dtype(np.float32).newbyteorder())
    assert mt.conv2d(x, w, padding=1, out=out) is out
    np.testing.assert_array_equal(out, ref)
    raw = np.zeros(ref.nbytes + 1, np.uint8)
    out = raw[1:].view(np.float32).reshape(ref.shape)
    assert mt.conv2d(x, w, padding=1, out=out) is out
    np.testing.assert_array_equal(out, ref)
    sw = x.astype(x.dtype.newbyteorder())
    np.testing.assert_array_equal(mt.conv2d(sw, w.astype(w.dtype.newbyteorder()), padding=1),
                                  ref)
