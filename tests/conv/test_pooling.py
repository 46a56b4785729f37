"""max_pool2d / avg_pool2d and their backward passes against direct NumPy loops."""
import numpy as np
import pytest

import microtile as mt


def _pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


def ref_max_pool(x, k, stride=None, padding=0):
    """Loops in float64: value and flat (H, W) index of the first maximum (NaN takes over)."""
    k = _pair(k)
    st = k if stride is None else _pair(stride)
    pad = _pair(padding)
    N, C, H, W = x.shape
    P = (H + 2 * pad[0] - k[0]) // st[0] + 1
    Q = (W + 2 * pad[1] - k[1]) // st[1] + 1
    y = np.empty((N, C, P, Q))
    idx = np.empty((N, C, P, Q), np.int64)
    for n in range(N):
        for c in range(C):
            for p in range(P):
                for q in range(Q):
                    best, bi = -np.inf, None
                    for h in range(p * st[0] - pad[0], p * st[0] - pad[0] + k[0]):
                        for w in range(q * st[1] - pad[1], q * st[1] - pad[1] + k[1]):
                            if 0 <= h < H and 0 <= w < W:
                                v = float(x[n, c, h, w])
                                if bi is None:
                                    bi = h * W + w
                                if v > best or v != v:
                                    best, bi = v, h * W + w
                    y[n, c, p, q], idx[n, c, p, q] = best, bi
    return y, idx


def ref_avg_pool(x, k, stride=None, padding=0, count_include_pad=True):
    k = _pair(k)
    st = k if stride is None else _pair(stride)
    pad = _pair(padding)
    N, C, H, W = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0],) * 2, (pad[1],) * 2))
    ones = np.pad(np.ones((H, W)), ((pad[0],) * 2, (pad[1],) * 2))
    P = (H + 2 * pad[0] - k[0]) // st[0] + 1
    Q = (W + 2 * pad[1] - k[1]) // st[1] + 1
    y = np.zeros((N, C, P, Q))
    cnt = np.zeros((P, Q))
    for r in range(k[0]):
        for s in range(k[1]):
            sl = (slice(r, r + st[0] * (P - 1) + 1, st[0]), slice(s, s + st[1] * (Q - 1) + 1, st[1]))
            y += xp[(slice(None), slice(None)) + sl]
            cnt += ones[sl]
    return y / (k[0] * k[1]) if count_include_pad else y / cnt


def random_pool(rng):
    k = (int(rng.integers(1, 5)), int(rng.integers(1, 5)))
    st = None if rng.random() < 0.3 else (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    pad = (int(rng.integers(0, k[0] // 2 + 1)), int(rng.integers(0, k[1] // 2 + 1)))
    shape = (int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(k[0], 14)),
             int(rng.integers(k[1], 14)))
    return k, st, pad, shape


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(12))
def test_max_pool_random(seed, dtype):
    rng = np.random.default_rng(seed)
    k, st, pad, shape = random_pool(rng)
    x = rng.standard_normal(shape).astype(dtype)
    if seed % 3 == 1:
        x = np.round(x)             # many ties
    if seed % 3 == 2:
        x = x[:, ::-1, :, ::-1]     # negative strides
    y, idx = mt.max_pool2d(x, k, st, pad, return_indices=True)
    ry, ridx = ref_max_pool(x, k, st, pad)
    assert y.dtype == dtype and idx.dtype == np.int64
    np.testing.assert_array_equal(y, ry.astype(dtype))
    np.testing.assert_array_equal(idx, ridx)
    np.testing.assert_array_equal(mt.max_pool2d(x, k, st, pad), y)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx_ref = np.zeros(x.shape).reshape(x.shape[0], x.shape[1], -1)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            np.add.at(dx_ref[n, c], ridx[n, c].ravel(), dy[n, c].ravel().astype(np.float64))
    dx_ref = dx_ref.reshape(x.shape)
    tol = 4 * np.finfo(dtype).eps * np.abs(dy).max() * k[0] * k[1]
    for dx in (mt.max_pool2d_backward(dy, x, k, st, pad),
               mt.max_pool2d_backward(dy, x, k, st, pad, indices=idx)):
        assert dx.shape == x.shape and dx.dtype == dtype
        np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=tol)


@pytest.mark.parametrize("include", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(8))
def test_avg_pool_random(seed, dtype, include):
    rng = np.random.default_rng(50 + seed)
    k, st, pad, shape = random_pool(rng)
    x = rng.standard_normal(shape).astype(dtype)
    if seed % 2:
        x = np.asfortranarray(x)
    y = mt.avg_pool2d(x, k, st, pad, count_include_pad=include)
    ry = ref_avg_pool(x, k, st, pad, include)
    tol = 4 * k[0] * k[1] * np.finfo(dtype).eps * (np.abs(x).max() + 1)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, ry, rtol=0, atol=tol)
    # The backward is the adjoint: <avg(x), dy> == <x, avg_backward(dy)>.
    dy = rng.standard_normal(y.shape)
    dx = mt.avg_pool2d_backward(dy, x.shape, k, st, pad, count_include_pad=include)
    assert dx.shape == x.shape and dx.dtype == np.float64
    lhs = np.sum(ref_avg_pool(x, k, st, pad, include) * dy)
    assert abs(lhs - np.sum(x * dx)) <= 1e-5 * (1 + np.abs(x).sum() * np.abs(dy).max())


def test_avg_backward_finite_differences():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 7, 6))
    dy = rng.standard_normal(mt.avg_pool2d(x, (3, 2), (2, 1), (1, 1)).shape)
    for include in (True, False):
        dx = mt.avg_pool2d_backward(dy, x.shape, (3, 2), (2, 1), (1, 1),
                                    count_include_pad=include)
        h = 1e-6
        for flat in rng.choice(x.size, 15, replace=False):
            i = np.unravel_index(flat, x.shape)
            xp, xm = x.copy(), x.copy()
            xp[i] += h
            xm[i] -= h
            num = np.sum(dy * (mt.avg_pool2d(xp, (3, 2), (2, 1), (1, 1),
                                             count_include_pad=include)
                               - mt.avg_pool2d(xm, (3, 2), (2, 1), (1, 1),
                                               count_include_pad=include))) / (2 * h)
            assert abs(num - dx[i]) < 1e-7, (include, i, num, dx[i])


def test_max_backward_finite_differences():
    rng = np.random.default_rng(4)
    x = rng.permutation(2 * 3 * 8 * 7).reshape(2, 3, 8, 7) / 10.0   # distinct: no ties
    dy = rng.standard_normal(mt.max_pool2d(x, 3, 2, 1).shape)
    dx = mt.max_pool2d_backward(dy, x, 3, 2, 1)
    h = 1e-4
    for flat in range(x.size):
        i = np.unravel_index(flat, x.shape)
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        num = np.sum(dy * (mt.max_pool2d(xp, 3, 2, 1) - mt.max_pool2d(xm, 3, 2, 1))) / (2 * h)
        assert abs(num - dx[i]) < 1e-8, (i, num, dx[i])


def test_ties_first_in_row_major_order():
    x = np.zeros((1, 1, 4, 4))
    y, idx = mt.max_pool2d(x, 2, return_indices=True)
    np.testing.assert_array_equal(idx[0, 0], [[0, 2], [8, 10]])
    x = np.full((1, 1, 3, 3), 5.0)
    y, idx = mt.max_pool2d(x, 3, 1, 1, return_indices=True)
    # The window at (0, 0) covers rows -1..1 and columns -1..1: first real element is (0, 0).
    assert idx[0, 0, 0, 0] == 0 and idx[0, 0, 1, 1] == 0 and idx[0, 0, 2, 2] == 4
    dx = mt.max_pool2d_backward(np.ones_like(y), x, 3, 1, 1)
    assert dx[0, 0, 0, 0] == 4 and dx[0, 0, 0, 1] == 2 and dx[0, 0, 1, 1] == 1 and dx.sum() == 9


def test_padding_never_wins():
    x = -np.arange(1.0, 17.0).reshape(1, 1, 4, 4)      # all negative: padding 0 would win
    y, idx = mt.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert (y < 0).all()
    np.testing.assert_array_equal(y, ref_max_pool(x, 3, 2, 1)[0])
    x = np.full((1, 1, 3, 3), -np.inf)
    y, idx = mt.max_pool2d(x, 2, 1, 1, return_indices=True)
    assert np.isneginf(y).all()
    assert ((idx >= 0) & (idx < 9)).all()


def test_nan_propagates():
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    x[0, 0, 0, 1] = np.nan
    y, idx = mt.max_pool2d(x, 2, return_indices=True)
    assert np.isnan(y[0, 0, 0, 0]) and idx[0, 0, 0, 0] == 1
    assert not np.isnan(y[0, 0, 1, 1])
    assert np.isnan(mt.avg_pool2d(x, 2)[0, 0, 0, 0])
    x[0, 0, 1, 0] = np.nan                  # two NaNs in one window: the last one, as torch
    y, idx = mt.max_pool2d(x, 2, return_indices=True)
    assert idx[0, 0, 0, 0] == 4


def test_unbatched_and_defaults():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 9, 8))
    y = mt.max_pool2d(x, 3)
    assert y.shape == (3, 3, 2)
    np.testing.assert_array_equal(y, ref_max_pool(x[None], 3)[0][0])
    a = mt.avg_pool2d(x, (2, 3), 1)
    np.testing.assert_allclose(a, ref_avg_pool(x[None], (2, 3), 1)[0], rtol=1e-12)
    assert mt.avg_pool2d_backward(np.ones_like(a), x.shape, (2, 3), 1).shape == x.shape
    assert mt.max_pool2d_backward(np.ones_like(y), x, 3).shape == x.shape


def test_zero_sizes():
    assert mt.max_pool2d(np.ones((0, 3, 4, 4)), 2).shape == (0, 3, 2, 2)
    assert mt.avg_pool2d(np.ones((2, 0, 4, 4)), 2).shape == (2, 0, 2, 2)
    assert mt.max_pool2d_backward(np.ones((0, 3, 2, 2)), np.ones((0, 3, 4, 4)), 2).shape == \
        (0, 3, 4, 4)
    assert mt.avg_pool2d_backward(np.ones((2, 0, 2, 2)), (2, 0, 4, 4), 2).shape == (2, 0, 4, 4)


def test_inputs_untouched():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 2, 6, 6))
    dy = rng.standard_normal((2, 2, 3, 3))
    xc, dyc = x.copy(), dy.copy()
    x.flags.writeable = dy.flags.writeable = False
    mt.max_pool2d(x, 2, return_indices=True)
    mt.max_pool2d_backward(dy, x, 2)
    mt.avg_pool2d_backward(dy, x.shape, 2)
    np.testing.assert_array_equal(x, xc)
    np.testing.assert_array_equal(dy, dyc)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: mt.max_pool2d(np.ones((1, 1, 4, 4)), 2, padding=2), ValueError, "half"),
    (lambda: mt.avg_pool2d(np.ones((1, 1, 4, 4)), 3, padding=(0, 2)), ValueError, "half"),
    (lambda: mt.max_pool2d(np.ones((1, 1, 4, 4)), 5), ValueError, "larger"),
    (lambda: mt.max_pool2d(np.ones((1, 1, 4, 4)), 0), ValueError, "kernel_size"),
    (lambda: mt.max_pool2d(np.ones((1, 1, 4, 4)), 2, 0), ValueError, "stride"),
    (lambda: mt.avg_pool2d(np.ones((1, 1, 4, 4)), 2, -1), ValueError, "stride"),
    (lambda: mt.max_pool2d(np.ones((1, 1, 4, 4)), 2, padding=-1), ValueError, "padding"),
    (lambda: mt.max_pool2d(np.ones((1, 1, 4, 4)), 2.0), TypeError, "kernel_size"),
    (lambda: mt.max_pool2d(np.ones((4, 4)), 2), ValueError, "4-D"),
    (lambda: mt.avg_pool2d(np.ones((1, 1, 1, 4, 4)), 2), ValueError, "4-D"),
    (lambda: mt.max_pool2d(np.ones((1, 1, 4, 4), np.int32), 2), TypeError, "int32"),
    (lambda: mt.avg_pool2d(np.ones((1, 1, 4, 4), bool), 2), TypeError, "bool"),
    (lambda: mt.max_pool2d_backward(np.ones((1, 1, 3, 3)), np.ones((1, 1, 4, 4)), 2),
     ValueError, "dy"),
    (lambda: mt.max_pool2d_backward(np.ones((1, 1, 2, 2)), np.ones((1, 1, 4, 4)), 2,
                                    indices=np.full((1, 1, 2, 2), 16)), ValueError, "indices"),
    (lambda: mt.max_pool2d_backward(np.ones((1, 1, 2, 2)), np.ones((1, 1, 4, 4)), 2,
                                    indices=np.full((1, 1, 2, 2), -1)), ValueError, "indices"),
    (lambda: mt.max_pool2d_backward(np.ones((1, 1, 2, 2)), np.ones((1, 1, 4, 4)), 2,
                                    indices=np.zeros((1, 1, 2, 3), int)), ValueError, "indices"),
    (lambda: mt.max_pool2d_backward(np.ones((1, 1, 2, 2)), np.ones((1, 1, 4, 4)), 2,
                                    indices=np.zeros((1, 1, 2, 2))), TypeError, "indices"),
    (lambda: mt.avg_pool2d_backward(np.ones((1, 1, 2, 2)), (1, 1, 5, 5), 3), ValueError, "dy"),
    (lambda: mt.avg_pool2d_backward(np.ones((1, 1, 2, 2)), (4, 4), 2), ValueError,
     "input_shape"),
    (lambda: mt.avg_pool2d_backward(np.ones((1, 1, 2, 2), np.int8), (1, 1, 4, 4), 2),
     TypeError, "int8"),
])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("seed", range(4))
def test_against_torch(seed):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(90 + seed)
    k, st, pad, shape = random_pool(rng)
    x = np.round(rng.standard_normal(shape), 1).astype(np.float32)   # with ties
    x.ravel()[rng.choice(x.size, 2)] = np.nan if seed == 3 else 0.0
    xt = torch.tensor(x, requires_grad=True)
    yt, it = F.max_pool2d(xt, k, st, pad, return_indices=True)
    y, idx = mt.max_pool2d(x, k, st, pad, return_indices=True)
    np.testing.assert_array_equal(y, yt.detach().numpy())
    np.testing.assert_array_equal(idx, it.numpy())
    dy = rng.standard_normal(y.shape).astype(np.float32)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(mt.max_pool2d_backward(dy, x, k, st, pad), xt.grad.numpy(),
                               rtol=1e-6, atol=1e-6)
    x = np.nan_to_num(x)
    for include in (True, False):
        xt = torch.tensor(x, requires_grad=True)
        at = F.avg_pool2d(xt, k, st, pad, count_include_pad=include)
        np.testing.assert_allclose(mt.avg_pool2d(x, k, st, pad, count_include_pad=include),
                                   at.detach().numpy(), rtol=1e-5, atol=1e-6)
        at.backward(torch.tensor(dy))
        np.testing.assert_allclose(
            mt.avg_pool2d_backward(dy, x.shape, k, st, pad, count_include_pad=include),
            xt.grad.numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ overflow and empty planes

def test_huge_window_is_a_value_error_not_inf():
    # kernel 2**32 squared overflowed the window count (undefined behaviour in C): the
    # average came out inf instead of 1 / 2**64.  torch refuses such a kernel; so does this.
    with pytest.raises(ValueError, match="kernel_size"):
        mt.avg_pool2d(np.ones((1, 1, 1, 1)), 2 ** 32, padding=2 ** 31)
    with pytest.raises(ValueError, match="kernel_size"):
        mt.avg_pool2d_backward(np.ones((1, 1, 1, 1)), (1, 1, 1, 1), 2 ** 32, padding=2 ** 31)
    with pytest.raises(ValueError, match="kernel_size"):
        mt.max_pool2d(np.ones((1, 1, 1, 1)), (2 ** 40, 1), padding=(2 ** 39, 0))
    for what, value in (("stride", 2 ** 64), ("padding", 2 ** 63)):
        with pytest.raises(ValueError, match=what):
            mt.max_pool2d(np.ones((1, 1, 4, 4)), 2, **{what: value})


def test_largest_window_computes_exactly():
    # The largest kernel accepted: a window of (2**31 - 1)**2 positions holding one 1.0.
    k = 2 ** 31 - 1
    got = mt.avg_pool2d(np.ones((1, 1, 1, 1)), k, padding=k // 2)
    np.testing.assert_allclose(got, [[[[1.0 / (float(k) * float(k))]]]], rtol=1e-15)
    got = mt.avg_pool2d(np.ones((1, 1, 1, 1)), k, padding=k // 2, count_include_pad=False)
    np.testing.assert_array_equal(got, [[[[1.0]]]])
    y, idx = mt.max_pool2d(np.full((1, 1, 1, 1), 3.0), k, padding=k // 2, return_indices=True)
    assert y[0, 0, 0, 0] == 3.0 and idx[0, 0, 0, 0] == 0


@pytest.mark.parametrize("shape", [(1, 1, 0, 4), (2, 3, 4, 0), (1, 1, 0, 0)])
def test_empty_planes_are_value_errors(shape):
    # With padding the windows held padding only: max pooling returned -inf and an index
    # into the empty plane, average pooling NaN or 0.  torch raises; so does this.
    x = np.ones(shape)
    dy = np.ones(shape[:2] + (1, 1))
    for call in (lambda: mt.max_pool2d(x, 3, padding=1),
                 lambda: mt.max_pool2d(x, 3, padding=1, return_indices=True),
                 lambda: mt.avg_pool2d(x, 3, padding=1),
                 lambda: mt.avg_pool2d(x, 2, stride=1, padding=1, count_include_pad=False),
                 lambda: mt.max_pool2d_backward(dy, x, 3, padding=1),
                 lambda: mt.avg_pool2d_backward(dy, shape, 3, padding=1),
                 lambda: mt.max_pool2d(x, 1)):
        with pytest.raises(ValueError, match="empty"):
            call()


@pytest.mark.parametrize("shape", ["1111", "12ab", b"1111", ("1", 1, 4, 4), [1, 1, 4.0, 4]])
def test_input_shape_must_be_ints(shape):
    # "1111" was taken for (1, 1, 1, 1) and "12ab" gave "invalid literal for int()".
    with pytest.raises(TypeError, match="input_shape"):
        mt.avg_pool2d_backward(np.ones((1, 1, 1, 1)), shape, 1)


def test_input_shape_accepts_integer_types():
    dx = mt.avg_pool2d_backward(np.ones((1, 1, 2, 2)), np.array([1, 1, 4, 4]), 2)
    np.testing.assert_array_equal(dx, np.full((1, 1, 4, 4), 0.25))
    dx = mt.avg_pool2d_backward(np.ones((1, 2, 2)), (np.int64(1), 4, 4), 2)
    assert dx.shape == (1, 4, 4)
