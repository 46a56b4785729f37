"""Every error rule of docs/API.md, for every linear-algebra function, and the promise that
inputs are never modified (except ``a`` in ``ger``)."""
import numpy as np
import pytest

import microtile

from _helpers import assert_gemm, rand, with_layout

# A valid call of each function: the shapes of its array arguments and how to call it.
# ``x`` maps argument names to arrays.
CALLS = {
    "gemm": ({"a": (4, 3), "b": (3, 5), "c": (4, 5)},
             lambda x: microtile.gemm(x["a"], x["b"], beta=1.0, c=x["c"])),
    "gemm_t": ({"a": (3, 4), "b": (5, 3), "c": (4, 5)},
               lambda x: microtile.gemm(x["a"], x["b"], alpha=2.0, beta=-1.0, c=x["c"],
                                        trans_a=True, trans_b=True)),
    "matmul": ({"a": (2, 4, 3), "b": (3, 5)}, lambda x: microtile.matmul(x["a"], x["b"])),
    "matmul_1d": ({"a": (3,), "b": (3, 5)}, lambda x: microtile.matmul(x["a"], x["b"])),
    "dot": ({"x": (7,), "y": (7,)}, lambda x: microtile.dot(x["x"], x["y"])),
    "outer": ({"x": (4,), "y": (5,)}, lambda x: microtile.outer(x["x"], x["y"])),
    "ger": ({"a": (4, 5), "x": (4,), "y": (5,)},
            lambda x: microtile.ger(x["a"], x["x"], x["y"], alpha=0.5)),
    "gemv": ({"a": (4, 5), "x": (5,), "y": (4,)},
             lambda x: microtile.gemv(x["a"], x["x"], beta=0.5, y=x["y"])),
    "gemv_t": ({"a": (5, 4), "x": (5,), "y": (4,)},
               lambda x: microtile.gemv(x["a"], x["x"], alpha=-1.0, beta=2.0, y=x["y"],
                                        trans=True)),
}

BAD_DTYPES = [np.int8, np.int32, np.int64, np.uint16, np.bool_, np.float16, np.complex64,
              np.complex128, np.longdouble, object]


def _arrays(name, rng, dtype=np.float64):
    shapes, _ = CALLS[name]
    return {k: rand(rng, s, dtype) for k, s in shapes.items()}


def _call(name, arrays):
    return CALLS[name][1](arrays)


@pytest.mark.parametrize("name", list(CALLS))
def test_valid_calls_work(name, rng):
    """The baseline the error tests perturb is itself a valid call."""
    _call(name, _arrays(name, rng))


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name,arg", [(n, a) for n in CALLS for a in CALLS[n][0]])
def test_bad_dtype_raises_type_error_naming_it(name, arg, bad, rng):
    arrays = _arrays(name, rng)
    arrays[arg] = np.ones(arrays[arg].shape, dtype=bad)
    with pytest.raises(TypeError) as info:
        _call(name, arrays)
    assert np.dtype(bad).name in str(info.value), str(info.value)


@pytest.mark.parametrize("name", ["gemm", "matmul", "dot", "outer", "gemv"])
def test_python_lists_of_ints_are_integer_arrays(name):
    ints = {"gemm": ([[1, 2]], [[3], [4]]), "matmul": ([[1, 2]], [[3], [4]]),
            "dot": ([1, 2], [3, 4]), "outer": ([1, 2], [3, 4]), "gemv": ([[1, 2]], [3, 4])}
    with pytest.raises(TypeError, match="int"):
        getattr(microtile, name)(*ints[name])


@pytest.mark.parametrize("bad", [None, "abc", [[1.0, 2.0], [3.0]], {"a": 1}],
                         ids=["None", "str", "ragged", "dict"])
@pytest.mark.parametrize("name", ["gemm", "matmul", "dot", "outer", "gemv"])
def test_non_arrays_raise(name, bad):
    good = {"gemm": np.ones((2, 2)), "matmul": np.ones((2, 2)), "dot": np.ones(2),
            "outer": np.ones(2), "gemv": np.ones(2)}[name]
    with pytest.raises((TypeError, ValueError)):
        getattr(microtile, name)(bad, good)


@pytest.mark.parametrize("alpha", [None, "x", 1j, [1.0, 2.0]], ids=["None", "str", "complex", "list"])
def test_bad_scalars_raise(alpha, rng):
    a = rand(rng, (3, 3), np.float64)
    with pytest.raises((TypeError, ValueError)):
        microtile.gemm(a, a, alpha=alpha)
    with pytest.raises((TypeError, ValueError)):
        microtile.gemm(a, a, beta=alpha, c=a)
    with pytest.raises((TypeError, ValueError)):
        microtile.gemv(a, a[0], alpha=alpha)


# --- shape mismatches: ValueError with the shapes in the message -----------------------------

def _assert_shapes_in(exc, *shapes):
    msg = str(exc.value)
    for shape in shapes:
        options = shape if isinstance(shape, list) else [shape]
        assert any(str(tuple(s)) in msg for s in options), f"{options} not in message {msg!r}"


@pytest.mark.parametrize("sa,sb", [((3, 4), (5, 6)), ((1, 2), (3, 1)), ((0, 3), (4, 0)),
                                   ((7, 0), (1, 7))])
def test_gemm_inner_mismatch(sa, sb):
    with pytest.raises(ValueError) as info:
        microtile.gemm(np.ones(sa), np.ones(sb))
    _assert_shapes_in(info, sa, sb)


def test_gemm_transposed_mismatch():
    a, b = np.ones((4, 3)), np.ones((4, 5))   # op(a) = (3, 4), b = (4, 5): fine without trans_b
    microtile.gemm(a, b, trans_a=True)
    with pytest.raises(ValueError) as info:
        microtile.gemm(a, b, trans_a=True, trans_b=True)
    _assert_shapes_in(info, [(4, 3), (3, 4)], [(4, 5), (5, 4)])


@pytest.mark.parametrize("sc", [(2, 2), (5,), (3, 5, 1), (4, 1, 5), (2, 5)])
def test_gemm_c_does_not_broadcast(sc):
    with pytest.raises(ValueError) as info:
        microtile.gemm(np.ones((3, 4)), np.ones((4, 6)), beta=1.0, c=np.ones(sc))
    _assert_shapes_in(info, sc, (3, 6))


@pytest.mark.parametrize("sa,sb", [((3,), (3, 4)), ((3, 4, 5), (5, 2)), ((2, 2), (2,)),
                                   ((), (2, 2)), ((2, 2), ())])
def test_gemm_needs_2d(sa, sb):
    with pytest.raises(ValueError):
        microtile.gemm(np.ones(sa), np.ones(sb))


def test_gemm_c_required_when_beta_nonzero():
    with pytest.raises(ValueError, match="c"):
        microtile.gemm(np.ones((2, 3)), np.ones((3, 4)), beta=1.0)
    with pytest.raises(ValueError):
        microtile.gemm(np.ones((2, 3)), np.ones((3, 4)), beta=-1e-300)


@pytest.mark.parametrize("sa,sb", [((3, 4), (5, 6)), ((2, 3, 4), (3, 4, 5)), ((3,), (4,)),
                                   ((3,), (4, 5)), ((5, 4), (3,)), ((2, 2, 3, 4), (3, 4, 5))])
def test_matmul_mismatch(sa, sb):
    with pytest.raises(ValueError) as info:
        microtile.matmul(np.ones(sa), np.ones(sb))
    _assert_shapes_in(info, sa, sb)


@pytest.mark.parametrize("sa,sb", [((), (3,)), ((3,), ()), ((), ())])
def test_matmul_0d(sa, sb):
    with pytest.raises(ValueError):
        microtile.matmul(np.ones(sa), np.ones(sb))


@pytest.mark.parametrize("sx,sy", [((3,), (4,)), ((0,), (1,))])
def test_dot_length_mismatch(sx, sy):
    with pytest.raises(ValueError) as info:
        microtile.dot(np.ones(sx), np.ones(sy))
    _assert_shapes_in(info, sx, sy)


@pytest.mark.parametrize("sx,sy", [((3, 1), (3,)), ((3,), (1, 3)), ((2, 2), (2, 2)),
                                   ((), ()), ((), (1,))])
def test_dot_needs_1d(sx, sy):
    with pytest.raises(ValueError):
        microtile.dot(np.ones(sx), np.ones(sy))


@pytest.mark.parametrize("sa,sx,sy", [((3, 4), (5,), (4,)), ((3, 4), (3,), (5,)),
                                      ((3, 4), (4,), (3,)), ((3,), (3,), (1,)),
                                      ((3, 4), (3, 1), (4,)), ((3, 4), (), (4,))])
def test_ger_mismatch(sa, sx, sy):
    a = np.ones(sa)
    a0 = a.copy()
    with pytest.raises(ValueError):
        microtile.ger(a, np.ones(sx), np.ones(sy))
    np.testing.assert_array_equal(a, a0)


def test_ger_mismatch_message():
    with pytest.raises(ValueError) as info:
        microtile.ger(np.ones((3, 4)), np.ones(5), np.ones(4))
    _assert_shapes_in(info, (3, 4), (5,))


def test_ger_read_only_a():
    a = np.ones((3, 4))
    a.flags.writeable = False
    with pytest.raises(ValueError):
        microtile.ger(a, np.ones(3), np.ones(4))
    with pytest.raises(ValueError):
        microtile.ger(np.broadcast_to(np.ones(4), (3, 4)), np.ones(3), np.ones(4))


@pytest.mark.parametrize("sa,sx,trans", [((3, 4), (5,), False), ((3, 4), (4,), True),
                                         ((3, 4), (3,), False), ((3,), (3,), False),
                                         ((3, 4), (4, 1), False), ((3, 4), (), False),
                                         ((), (4,), False)])
def test_gemv_mismatch(sa, sx, trans):
    with pytest.raises(ValueError):
        microtile.gemv(np.ones(sa), np.ones(sx), trans=trans)


def test_gemv_mismatch_message():
    with pytest.raises(ValueError) as info:
        microtile.gemv(np.ones((3, 4)), np.ones(5))
    _assert_shapes_in(info, [(3, 4)], (5,))
    with pytest.raises(ValueError) as info:
        microtile.gemv(np.ones((3, 4)), np.ones(4), beta=1.0, y=np.ones(4))
    _assert_shapes_in(info, (4,), (3,))


def test_gemv_y_required_when_beta_nonzero():
    with pytest.raises(ValueError):
        microtile.gemv(np.ones((3, 4)), np.ones(4), beta=0.5)


# --- out= --------------------------------------------------------------------------------------

# Each: a call with out=..., and the result's shape and dtype.
OUT_CALLS = {
    "gemm": (lambda out, dt: microtile.gemm(np.ones((4, 3), dt), np.ones((3, 5), dt), out=out),
             (4, 5)),
    "gemm_c": (lambda out, dt: microtile.gemm(np.ones((4, 3), dt), np.ones((3, 5), dt),
                                              beta=1.0, c=np.ones((4, 5), dt), out=out), (4, 5)),
    "matmul": (lambda out, dt: microtile.matmul(np.ones((2, 4, 3), dt), np.ones((3, 5), dt),
                                                out=out), (2, 4, 5)),
    "outer": (lambda out, dt: microtile.outer(np.ones(4, dt), np.ones(5, dt), out=out), (4, 5)),
    "gemv": (lambda out, dt: microtile.gemv(np.ones((4, 5), dt), np.ones(5, dt), out=out), (4,)),
    "gemv_y": (lambda out, dt: microtile.gemv(np.ones((4, 5), dt), np.ones(5, dt), beta=1.0,
                                              y=np.ones(4, dt), out=out), (4,)),
}


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(OUT_CALLS))
def test_out_good(name, dt):
    call, shape = OUT_CALLS[name]
    out = np.full(shape, np.nan, dt)
    assert call(out, dt) is out
    assert np.isfinite(out).all()


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(OUT_CALLS))
def test_out_wrong_shape(name, dt):
    call, shape = OUT_CALLS[name]
    for bad in [shape[:-1] + (shape[-1] + 1,), shape[::-1] if len(shape) > 1 else (1,) + shape,
                (1,) + shape, shape[1:], ()]:
        if tuple(bad) == tuple(shape):
            continue
        with pytest.raises(ValueError):
            call(np.empty(bad, dt), dt)


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(OUT_CALLS))
def test_out_wrong_dtype(name, dt):
    call, shape = OUT_CALLS[name]
    other = np.float64 if dt == np.float32 else np.float32
    for bad in (other, np.float16, np.int64, np.complex128):
        with pytest.raises(TypeError):
            call(np.empty(shape, bad), dt)


@pytest.mark.parametrize("name", list(OUT_CALLS))
def test_out_read_only(name):
    call, shape = OUT_CALLS[name]
    out = np.zeros(shape)
    out.flags.writeable = False
    with pytest.raises(ValueError):
        call(out, np.float64)
    np.testing.assert_array_equal(out, 0)


def test_gemm_out_overlaps_input(rng):
    a = rand(rng, (5, 5), np.float64)
    b = rand(rng, (5, 5), np.float64)
    a0, b0 = a.copy(), b.copy()
    for kw in (dict(out=a), dict(out=b), dict(out=a, beta=1.0, c=b), dict(out=b, c=a, beta=0.5)):
        with pytest.raises(ValueError):
            microtile.gemm(a, b, **kw)
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)
    buf = rand(rng, (6, 5), np.float64)
    with pytest.raises(ValueError):  # shares memory with a without being a
        microtile.gemm(buf[:5], b, out=buf[1:])


def test_gemm_out_overlapping_c_without_being_c(rng):
    buf = rand(rng, (6, 5), np.float64)
    a, b = rand(rng, (5, 3), np.float64), rand(rng, (3, 5), np.float64)
    for c, out in [(buf[:5], buf[1:]), (buf[:5], buf[:5, ::-1]), (buf[:5], buf[:5].T)]:
        with pytest.raises(ValueError):
            microtile.gemm(a, b, beta=1.0, c=c, out=out)


def test_gemm_out_is_c_is_allowed(rng):
    c = rand(rng, (4, 5), np.float64)
    c0 = c.copy()
    a, b = rand(rng, (4, 3), np.float64), rand(rng, (3, 5), np.float64)
    assert microtile.gemm(a, b, beta=1.0, c=c, out=c) is c
    assert_gemm(c, a, b, 1.0, 1.0, c0)


def test_matmul_out_overlaps_input(rng):
    a = rand(rng, (3, 4, 4), np.float64)
    b = rand(rng, (4, 4), np.float64)
    for out in (a, a[:, ::-1]):
        with pytest.raises(ValueError):
            microtile.matmul(a, b, out=out)
    c = rand(rng, (4, 4), np.float64)
    with pytest.raises(ValueError):
        microtile.matmul(c, b, out=b)


def test_outer_out_overlaps_input():
    buf = np.ones((5, 5))
    with pytest.raises(ValueError):
        microtile.outer(buf[0], np.ones(5), out=buf)
    with pytest.raises(ValueError):
        microtile.outer(np.ones(5), buf[:, 2], out=buf)


def test_gemv_out_overlaps_input(rng):
    a = rand(rng, (5, 5), np.float64)
    x = rand(rng, 5, np.float64)
    y = rand(rng, 5, np.float64)
    with pytest.raises(ValueError):
        microtile.gemv(a, x, out=x)
    with pytest.raises(ValueError):
        microtile.gemv(a, a[2], out=a[2])
    with pytest.raises(ValueError):
        microtile.gemv(a, x, out=a[:, 0])
    # Like gemm's c, y may be out itself (gemv's docstring says so, which docs/API.md allows),
    # but out may not overlap y otherwise.
    buf = rand(rng, 6, np.float64)
    for y_view, out in [(buf[:5], buf[1:]), (buf[:5], buf[:5][::-1])]:
        with pytest.raises(ValueError):
            microtile.gemv(a, x, beta=1.0, y=y_view, out=out)


def test_gemv_out_is_y_is_in_place(rng):
    a, x = rand(rng, (5, 4), np.float64), rand(rng, 4, np.float64)
    for y in (rand(rng, 5, np.float64), rand(rng, 10, np.float64)[::-2]):
        y0 = y.copy()
        assert microtile.gemv(a, x, alpha=2.0, beta=-1.0, y=y, out=y) is y
        assert_gemm(y[:, None], a, x[:, None], 2.0, -1.0, y0[:, None])


def test_ger_x_inside_a_is_rejected_or_correct(rng):
    """x is a row of a: either refused (a is also the output) or computed from x's values
    before the update, as ``a += alpha * np.outer(x, y)`` would."""
    a = rand(rng, (4, 4), np.float64)
    y = rand(rng, 4, np.float64)
    expected = a + 2.0 * np.outer(a[1].copy(), y)
    try:
        microtile.ger(a, a[1], y, alpha=2.0)
    except ValueError:
        return
    np.testing.assert_allclose(a, expected, rtol=4 * np.finfo(float).eps, atol=0)


# --- inputs are never modified ----------------------------------------------------------------

@pytest.mark.parametrize("layout", ["C", "F", "strided", "neg_both"])
@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(CALLS))
def test_inputs_not_modified(name, layout, dt, rng):
    """Compare every input with a copy taken before the call; for ger, x and y stay and a
    changes only inside its own view (the memory around a strided a is NaN and stays so)."""
    shapes, call = CALLS[name]
    arrays = {}
    for k, s in shapes.items():
        x = rand(rng, s, dt)
        arrays[k] = with_layout(x, layout) if x.ndim >= 2 else _vector_layout(x, layout)
    before = {k: np.array(v, copy=True) for k, v in arrays.items()}
    bases = {k: (v.base.copy() if v.base is not None else None) for k, v in arrays.items()}
    res = call(arrays)
    for k, v in arrays.items():
        if name == "ger" and k == "a":
            assert res is v, "ger must return a"
            if layout == "strided":
                v[...] = np.nan
                assert np.isnan(v.base).all(), "ger wrote outside a"
            continue
        np.testing.assert_array_equal(v, before[k], err_msg=f"{name} modified {k}")
        if bases[k] is not None:
            np.testing.assert_array_equal(v.base, bases[k],
                                          err_msg=f"{name} wrote around {k}")


def _vector_layout(x, layout):
    """1-D versions of the layouts: contiguous, strided in a NaN buffer, negative stride."""
    if layout in ("C", "F"):
        return x.copy()
    if layout == "strided":
        big = np.full(3 * len(x) + 1, np.nan, x.dtype)
        big[::3][:len(x)] = x
        return big[::3][:len(x)]
    return x[::-1].copy()[::-1]


@pytest.mark.parametrize("bad", ["2", b"1", 1j, np.complex64(1 + 1j), np.array([1.0, 2.0]),
                                 [1.0], None])
def test_scale_factors_must_be_real_numbers(bad):
    """float("2") would take text and float(np.complex64) drop the imaginary part: alpha and
    beta are real numbers or a TypeError naming them (found by the fuzz driver)."""
    a = np.ones((3, 3))
    for call, name in ((lambda: microtile.gemm(a, a, alpha=bad), "alpha"),
                       (lambda: microtile.gemm(a, a, beta=bad, c=a), "beta"),
                       (lambda: microtile.gemv(a, a[0], alpha=bad), "alpha"),
                       (lambda: microtile.ger(a.copy(), a[0], a[0], alpha=bad), "alpha")):
        with pytest.raises(TypeError, match=name):
            call()
    # NumPy scalars and 0-d arrays are real numbers.
    np.testing.assert_array_equal(microtile.gemm(a, a, alpha=np.float32(2), beta=np.array(0.0)),
                                  2 * a @ a)


def test_any_stride_on_a_length_one_axis():
    """NumPy lets a length-1 axis have any stride (as_strided, x[None]); the kernels used to
    step a pointer by it past the last element, an overflow that UBSan reports for +-2**62.
    Such strides are now treated as 0; the results are unchanged."""
    rng = np.random.default_rng(3)
    from numpy.lib.stride_tricks import as_strided
    for dt in (np.float32, np.float64):
        base = rng.standard_normal(16).astype(dt)
        size = base.itemsize
        for huge in (2 ** 62, -(2 ** 62)):
            col = as_strided(base, (16, 1), (size, huge // size * size))   # (m, k=1)
            row = as_strided(base[:9], (1, 9), (huge // size * size, size))  # (k=1, n)
            assert_gemm(microtile.gemm(col, row), col, row, what="k=1 gemm")
            assert_gemm(microtile.gemm(row, row.T), row, row.T, what="m=n=1 gemm")
            x1 = as_strided(base, (1,), (huge // size * size,))
            assert_gemm(microtile.gemv(col, x1)[:, None], col, x1[:, None], what="gemv")
