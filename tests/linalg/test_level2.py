"""dot, outer, ger and gemv against float64 references with k*eps bounds, over lengths 0, 1,
odd and large, strided and negative-stride vectors, and every matrix layout."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import microtile
from microtile import config_context

from _helpers import (EDGE_SIZES, FLOATS, LAYOUTS, OUT_LAYOUTS, PRIMES, VEC_LAYOUTS,
                      assert_close, assert_gemm, assert_outside_untouched, make_out, rand,
                      result_dtype, vec_layout, with_layout)

ISAS = microtile.available_isas()
lengths = st.one_of(st.sampled_from(EDGE_SIZES), st.sampled_from(PRIMES),
                    st.integers(0, 300), st.sampled_from((1000, 4099)))
dims = st.one_of(st.sampled_from(EDGE_SIZES), st.sampled_from(PRIMES), st.integers(0, 300))
scalars = st.one_of(st.sampled_from((1.0, 0.0, -1.0, 0.5)),
                    st.floats(-4, 4, allow_nan=False, width=32))
seeds = st.integers(0, 2 ** 32 - 1)


def dtypes_pair():
    return st.sampled_from(FLOATS).flatmap(
        lambda d: st.tuples(st.just(d), st.one_of(st.just(d), st.sampled_from(FLOATS))))


# --- dot -------------------------------------------------------------------------------------

def check_dot(res, x, y):
    assert type(res) is float, f"dot must return a Python float, got {type(res)}"
    ref, bound = (float(np.dot(x.astype(np.float64), y.astype(np.float64))),
                  float(np.dot(np.abs(x.astype(np.float64)), np.abs(y.astype(np.float64)))))
    assert_close(np.array(res), np.array(ref), np.array(bound), len(x), result_dtype(x, y), "dot")


@given(n=lengths, dts=dtypes_pair(), lx=st.sampled_from(VEC_LAYOUTS),
       ly=st.sampled_from(VEC_LAYOUTS), seed=seeds)
def test_dot_matches_numpy(n, dts, lx, ly, seed):
    rng = np.random.default_rng(seed)
    x, y = rand(rng, n, dts[0]), rand(rng, n, dts[1])
    xv, yv = vec_layout(x, lx), vec_layout(y, ly)
    check_dot(microtile.dot(xv, yv), x, y)
    np.testing.assert_array_equal(xv, x)
    np.testing.assert_array_equal(yv, y)


@pytest.mark.parametrize("dt", FLOATS)
def test_dot_lengths(dt, rng):
    for n in (0, 1, 2, 3, 7, 8, 15, 16, 17, 31, 33, 63, 65, 257, 1000, 100_003, 1_000_001):
        x, y = rand(rng, n, dt), rand(rng, n, dt)
        check_dot(microtile.dot(x, y), x, y)
        check_dot(microtile.dot(x[::-1], y[::-1]), x[::-1], y[::-1])
    assert microtile.dot(np.empty(0, dt), np.empty(0, dt)) == 0.0


def test_dot_mixed_precision_is_float64(rng):
    x = rand(rng, 10_001, np.float32)
    y = rand(rng, 10_001, np.float64)
    check_dot(microtile.dot(x, y), x, y)   # float64 bound: float32 arithmetic would fail it


def test_dot_exact_integers(rng):
    """Small integers sum exactly: the dot product must be exact in float32 as well."""
    x = rng.integers(-50, 51, 4097).astype(np.float32)
    y = rng.integers(-50, 51, 4097).astype(np.float32)
    assert microtile.dot(x, y) == float(np.dot(x.astype(np.int64), y.astype(np.int64)))


@pytest.mark.parametrize("dt", FLOATS)
def test_dot_nan_inf(dt):
    x = np.ones(37, dt)
    y = np.ones(37, dt)
    x[20] = np.nan
    assert np.isnan(microtile.dot(x, y))
    x[20] = np.inf
    assert microtile.dot(x, y) == np.inf
    y[20] = 0.0                          # Inf * 0 = NaN (IEEE), not skipped
    assert np.isnan(microtile.dot(x, y))
    x[20], y[20], x[21], y[21] = np.inf, 1.0, np.inf, -1.0
    assert np.isnan(microtile.dot(x, y))


# --- outer -----------------------------------------------------------------------------------

def outer_ref(x, y):
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    return np.multiply.outer(x64, y64), np.abs(np.multiply.outer(x64, y64))


@given(m=lengths.filter(lambda v: v <= 1000), n=dims, dts=dtypes_pair(),
       lx=st.sampled_from(VEC_LAYOUTS), ly=st.sampled_from(VEC_LAYOUTS),
       out_layout=st.sampled_from((None,) + OUT_LAYOUTS), seed=seeds)
def test_outer_matches_numpy(m, n, dts, lx, ly, out_layout, seed):
    rng = np.random.default_rng(seed)
    x, y = rand(rng, m, dts[0]), rand(rng, n, dts[1])
    dt = result_dtype(x, y)
    out = big = None
    if out_layout is not None:
        out, big = make_out((m, n), dt, out_layout)
    res = microtile.outer(vec_layout(x, lx), vec_layout(y, ly), out=out)
    if out is not None:
        assert res is out
    assert res.dtype == dt and res.shape == (m, n)
    ref, bound = outer_ref(x, y)
    assert_close(res, ref, bound, 1, dt, "outer")
    assert_outside_untouched(out, big)


@pytest.mark.parametrize("dt", FLOATS)
def test_outer_is_exact(dt, rng):
    """One correctly rounded product per element: equal to NumPy's in the same dtype."""
    x, y = rand(rng, 131, dt), rand(rng, 67, dt)
    np.testing.assert_array_equal(microtile.outer(x, y), x[:, None] * y[None, :])


@pytest.mark.parametrize("m,n", [(0, 0), (0, 5), (5, 0), (1, 1)])
def test_outer_small(m, n):
    res = microtile.outer(np.ones(m), np.full(n, 2.0))
    assert res.shape == (m, n)
    np.testing.assert_array_equal(res, np.full((m, n), 2.0))


def test_outer_nan_inf():
    res = microtile.outer(np.array([0.0, 1.0, np.nan]), np.array([np.inf, 2.0]))
    np.testing.assert_array_equal(np.isnan(res), [[True, False], [False, False], [True, True]])
    assert res[1, 0] == np.inf


# --- ger -------------------------------------------------------------------------------------

@given(m=dims, n=dims, dt=st.sampled_from(FLOATS), alpha=scalars,
       la=st.sampled_from(OUT_LAYOUTS), lx=st.sampled_from(VEC_LAYOUTS),
       ly=st.sampled_from(VEC_LAYOUTS), seed=seeds)
def test_ger_matches_numpy(m, n, dt, alpha, la, lx, ly, seed):
    rng = np.random.default_rng(seed)
    x, y = rand(rng, m, dt), rand(rng, n, dt)
    a, big = make_out((m, n), dt, la)
    a[...] = rand(rng, (m, n), dt)
    a0 = a.copy()
    xv, yv = vec_layout(x, lx), vec_layout(y, ly)
    res = microtile.ger(a, xv, yv, alpha=alpha)
    assert res is a, "ger must return a itself"
    assert a.dtype == dt
    ref, bound = outer_ref(x, y)
    assert_close(a, a0 + alpha * ref, np.abs(a0) + abs(alpha) * bound, 1, dt, "ger")
    np.testing.assert_array_equal(xv, x)
    np.testing.assert_array_equal(yv, y)
    assert_outside_untouched(a, big)


@pytest.mark.parametrize("dt", FLOATS)
def test_ger_default_alpha_and_repeats(dt, rng):
    a = rand(rng, (33, 17), dt)
    a0 = a.copy()
    x, y = rand(rng, 33, dt), rand(rng, 17, dt)
    for _ in range(4):
        microtile.ger(a, x, y)
    ref, bound = outer_ref(x, y)
    assert_close(a, a0 + 4 * ref, np.abs(a0) + 4 * bound, 4, dt, "ger x4")


def test_ger_mixed_vectors_into_float64(rng):
    a = rand(rng, (20, 30), np.float64)
    a0 = a.copy()
    x, y = rand(rng, 20, np.float32), rand(rng, 30, np.float64)
    microtile.ger(a, x, y, alpha=-0.5)
    ref, bound = outer_ref(x, y)
    assert_close(a, a0 - 0.5 * ref, np.abs(a0) + 0.5 * bound, 1, np.float64, "ger mixed")


@pytest.mark.parametrize("m,n", [(0, 0), (0, 4), (4, 0)])
def test_ger_zero_sizes(m, n):
    a = np.ones((m, n))
    assert microtile.ger(a, np.ones(m), np.ones(n)) is a


def test_ger_nan_inf_propagate():
    """IEEE: a zero in x times Inf in y is NaN (no skipping of zero elements)."""
    a = np.zeros((3, 2))
    microtile.ger(a, np.array([0.0, 1.0, 2.0]), np.array([np.inf, 1.0]))
    assert np.isnan(a[0, 0]) and a[1, 0] == np.inf and a[2, 1] == 2.0
    a = np.ones((2, 2))
    microtile.ger(a, np.array([np.nan, 1.0]), np.array([0.0, 0.0]))
    assert np.isnan(a[0]).all() and (a[1] == 1.0).all()


# --- gemv ------------------------------------------------------------------------------------

@st.composite
def gemv_cases(draw):
    return dict(m=draw(dims), n=draw(dims), dts=draw(dtypes_pair()),
                alpha=draw(scalars), beta=draw(scalars), trans=draw(st.booleans()),
                y_mode=draw(st.sampled_from(("none", "given", "nan"))),
                dty=draw(st.sampled_from(FLOATS)),
                out_mode=draw(st.sampled_from((None, "C", "strided", "neg"))),
                la=draw(st.sampled_from(LAYOUTS)), lx=draw(st.sampled_from(VEC_LAYOUTS)),
                ly=draw(st.sampled_from(VEC_LAYOUTS)), seed=draw(seeds))


def run_gemv(case):
    rng = np.random.default_rng(case["seed"])
    m, n, trans, alpha, beta = case["m"], case["n"], case["trans"], case["alpha"], case["beta"]
    a_op = rand(rng, (m, n), case["dts"][0])
    x = rand(rng, n, case["dts"][1])
    a = with_layout(a_op.T if trans else a_op, case["la"])
    y = None
    if case["y_mode"] == "given" or beta != 0:
        y = rand(rng, m, case["dty"])
    elif case["y_mode"] == "nan":
        y = np.full(m, np.nan, case["dty"])
    dt = result_dtype(a_op, x, y)
    out = None
    if case["out_mode"] is not None:
        out = vec_layout(np.full(m, np.nan, dt), {"C": "C", "strided": "strided",
                                                  "neg": "neg_strided"}[case["out_mode"]])
    yv = None if y is None else vec_layout(y, case["ly"])
    xv = vec_layout(x, case["lx"])
    before = [np.array(v, copy=True) for v in (a, xv)] + ([] if yv is None else [yv.copy()])
    res = microtile.gemv(a, xv, alpha=alpha, beta=beta, y=yv, trans=trans, out=out)
    if out is not None:
        assert res is out
    assert isinstance(res, np.ndarray) and res.shape == (m,)
    assert_gemm(res[:, None], a_op, x[:, None], alpha, beta,
                None if y is None else y[:, None], what=f"gemv {case}")
    for old, new in zip(before, [a, xv] + ([] if yv is None else [yv])):
        np.testing.assert_array_equal(new, old, err_msg="gemv modified an input")


@given(gemv_cases())
def test_gemv_matches_numpy(case):
    run_gemv(case)


@given(gemv_cases(), st.sampled_from(ISAS), st.sampled_from((1, 2, 3)))
def test_gemv_matches_numpy_any_isa_threads(case, isa, threads):
    with config_context(isa=isa, threads=threads):
        run_gemv(case)


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_gemv_large(dt, trans, threads, rng):
    for m, n in [(1531, 1297), (4099, 7), (7, 4099), (1, 20000), (20000, 1)]:
        a_op = rand(rng, (m, n), dt)
        a = np.ascontiguousarray(a_op.T) if trans else a_op
        x, y = rand(rng, n, dt), rand(rng, m, dt)
        with config_context(threads=threads):
            res = microtile.gemv(a, x, alpha=1.25, beta=-0.5, y=y, trans=trans)
        assert_gemm(res[:, None], a_op, x[:, None], 1.25, -0.5, y[:, None], what=f"{m}x{n}")


@pytest.mark.parametrize("dt", FLOATS)
def test_gemv_zero_sizes(dt):
    for m, n in [(0, 0), (0, 5), (5, 0)]:
        res = microtile.gemv(np.ones((m, n), dt), np.ones(n, dt))
        assert res.shape == (m,) and res.dtype == dt
        np.testing.assert_array_equal(res, 0)
        res = microtile.gemv(np.ones((n, m), dt), np.ones(n, dt), trans=True, beta=2.0,
                             y=np.ones(m, dt))
        np.testing.assert_array_equal(res, 2.0)


@pytest.mark.parametrize("dt", FLOATS)
def test_gemv_beta_zero_does_not_read_y(dt, rng):
    a, x = rand(rng, (40, 30), dt), rand(rng, 30, dt)
    y = np.full(40, np.nan, dt)
    res = microtile.gemv(a, x, beta=0.0, y=y)
    assert not np.isnan(res).any()
    assert_gemm(res[:, None], a, x[:, None])
    out = np.full(40, np.inf, dt)
    microtile.gemv(a, x, out=out)
    assert_gemm(out[:, None], a, x[:, None])


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("trans", [False, True])
def test_gemv_nan_inf_propagate(dt, trans):
    a = np.ones((5, 4), dt)
    x = np.ones(4, dt)
    a[1, 2] = np.nan
    a[3, 0] = np.inf
    x[1] = 0.0
    a[4, 1] = np.inf                    # times x[1] == 0 -> NaN in row 4
    av = np.ascontiguousarray(a.T) if trans else a
    res = microtile.gemv(av, x, trans=trans)
    np.testing.assert_array_equal(np.isnan(res), [False, True, False, False, True])
    assert res[3] == np.inf and res[0] == 3.0 and res[2] == 3.0


def test_gemv_returns_promoted_dtype(rng):
    a = rand(rng, (6, 5), np.float32)
    assert microtile.gemv(a, rand(rng, 5, np.float32)).dtype == np.float32
    assert microtile.gemv(a, rand(rng, 5, np.float64)).dtype == np.float64
    assert microtile.gemv(a, rand(rng, 5, np.float32), beta=1.0,
                          y=rand(rng, 6, np.float64)).dtype == np.float64


@pytest.mark.parametrize("layout", ["C", "F", "strided"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dt", FLOATS)
def test_ger_and_outer_large(layout, threads, dt, rng):
    """Big enough for the threaded paths; row-, column-major and strided a."""
    for m, n in [(1531, 1297), (9, 20000), (20000, 9)]:
        x, y = rand(rng, m, dt), rand(rng, n, dt)
        a, big = make_out((m, n), dt, layout)
        a[...] = rand(rng, (m, n), dt)
        a0 = a.copy()
        with config_context(threads=threads):
            microtile.ger(a, x, y, alpha=0.75)
            res = microtile.outer(x, y)
        ref, bound = outer_ref(x, y)
        assert_close(a, a0 + 0.75 * ref, np.abs(a0) + 0.75 * bound, 1, dt, f"ger {m}x{n}")
        assert_close(res, ref, bound, 1, dt, f"outer {m}x{n}")
        assert_outside_untouched(a, big)


@pytest.mark.parametrize("dt", FLOATS)
def test_nan_scalars(dt, rng):
    a, x, y = rand(rng, (6, 5), dt), rand(rng, 5, dt), rand(rng, 6, dt)
    assert np.isnan(microtile.gemv(a, x, alpha=np.nan)).all()
    assert np.isnan(microtile.gemv(a, x, beta=np.nan, y=y)).all()
    assert np.isnan(microtile.ger(a.copy(), y, x, alpha=np.nan)).all()


# --- strided operands in bounded blocks ------------------------------------------------------

# Longer than the drivers' gather block (2**14 elements), so strided and stride-0 operands
# are read in several blocks; odd, so the last block is partial.
LONG = 3 * 2 ** 14 + 5


def _matrix(a_op, layout, trans):
    """``a_op`` (m, n) passed as ``a`` (its transpose when ``trans``) with a layout whose
    rows, columns or both are strided, or broadcast (stride 0)."""
    a = np.ascontiguousarray(a_op.T) if trans else a_op
    if layout == "rows":         # rows contiguous
        return np.ascontiguousarray(a)
    if layout == "cols":         # columns contiguous
        return np.asfortranarray(a)
    if layout == "strided":      # neither
        return with_layout(a, "strided")
    if layout == "broadcast":    # stride 0 both ways: a holds one value
        return np.broadcast_to(a.flat[0], a.shape)
    raise ValueError(layout)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("layout", ["rows", "cols", "strided", "broadcast"])
@pytest.mark.parametrize("mn", [(7, LONG), (LONG, 5), (40, LONG)])
def test_gemv_long_strided_operands(mn, layout, trans, threads, rng):
    m, n = mn
    dt = np.float64
    a_op = rand(rng, (m, n), dt)
    a = _matrix(a_op, layout, trans)
    a_op = (a.T if trans else a).astype(np.float64)
    for x in (vec_layout(rand(rng, n, dt), "strided"), vec_layout(rand(rng, n, dt), "neg"),
              np.broadcast_to(dt(0.75), (n,))):
        y = rand(rng, m, dt)
        with config_context(threads=threads):
            res = microtile.gemv(a, x, alpha=1.5, beta=-0.5, y=y, trans=trans)
        assert_gemm(res[:, None], a_op, np.asarray(x)[:, None], 1.5, -0.5, y[:, None],
                    what=f"gemv {mn} {layout}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
@pytest.mark.parametrize("mn", [(9, LONG), (LONG, 9)])
def test_ger_and_outer_long_strided_vectors(mn, layout, threads, rng):
    m, n = mn
    dt = np.float32
    for x, y in ((vec_layout(rand(rng, m, dt), "strided"), vec_layout(rand(rng, n, dt), "neg")),
                 (np.broadcast_to(dt(1.5), (m,)), np.broadcast_to(dt(-0.5), (n,)))):
        a, big = make_out((m, n), dt, layout)
        a[...] = rand(rng, (m, n), dt)
        a0 = a.copy()
        with config_context(threads=threads):
            microtile.ger(a, x, y, alpha=0.75)
            res = microtile.outer(x, y)
        ref, bound = outer_ref(np.asarray(x), np.asarray(y))
        assert_close(a, a0 + 0.75 * ref, np.abs(a0) + 0.75 * bound, 1, dt, f"ger {mn}")
        assert_close(res, ref, bound, 1, dt, f"outer {mn}")
        assert_outside_untouched(a, big)


# --- alpha == 0 and the other byte order -----------------------------------------------------

@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("trans", [False, True])
def test_gemv_alpha_zero_does_not_read_a_or_x(dt, trans, rng):
    """BLAS semantics (documented in the docstring): alpha == 0 gives beta * y even when a
    or x hold NaN or Inf; NumPy's 0 * (a @ x) would be NaN."""
    a = np.full((6, 5), np.nan, dt)
    a[0, 0] = np.inf
    x = np.full(5, np.inf, dt)
    y = rand(rng, 5 if trans else 6, dt)
    res = microtile.gemv(a, x if not trans else np.full(6, np.nan, dt), alpha=0.0, beta=-2.0,
                         y=y, trans=trans)
    np.testing.assert_array_equal(res, -2.0 * y)
    res = microtile.gemv(a, x if not trans else np.full(6, np.nan, dt), alpha=0.0,
                         trans=trans)
    np.testing.assert_array_equal(res, np.zeros(5 if trans else 6, dt))


@pytest.mark.parametrize("dt", FLOATS)
def test_ger_alpha_zero_does_not_read_x_or_y(dt, rng):
    a = rand(rng, (4, 3), dt)
    a0 = a.copy()
    assert microtile.ger(a, np.full(4, np.nan, dt), np.array([np.inf, 0, 1], dt),
                         alpha=0.0) is a
    np.testing.assert_array_equal(a, a0)


@pytest.mark.parametrize("dt", FLOATS)
def test_byteswapped_and_misaligned_arrays_compute(dt, rng):
    """A byte-swapped a for ger ("unsupported dtype >f4" once) and byte-swapped or misaligned
    out arrays compute as NumPy does with them: the result lands in them, in their order."""
    sw = np.dtype(dt).newbyteorder()
    a, x, y = rand(rng, (5, 4), dt), rand(rng, 5, dt), rand(rng, 4, dt)
    a_sw = a.astype(sw)
    assert microtile.ger(a_sw, x.astype(sw), y, alpha=0.5) is a_sw
    assert a_sw.dtype == sw
    ref, bound = outer_ref(x, y)
    assert_close(a_sw, a + 0.5 * ref, np.abs(a) + 0.5 * bound, 1, dt, "ger byte-swapped")
    a_un = with_layout(a, "unaligned")
    microtile.ger(a_un, x, y, alpha=0.5)
    assert_close(a_un, a + 0.5 * ref, np.abs(a) + 0.5 * bound, 1, dt, "ger misaligned")

    for make in (lambda shape: np.zeros(shape, sw),
                 lambda shape: with_layout(np.zeros(shape, dt), "unaligned")):
        out = make(4)
        assert microtile.gemv(a, x, trans=True, out=out) is out
        assert out.dtype == make(1).dtype
        assert_gemm(out.astype(dt)[:, None], a.T, x[:, None], what="gemv out")
        out = make((5, 4))
        assert microtile.outer(x, y, out=out) is out
        assert_close(out, ref, bound, 1, dt, "outer out")
        # out is c: beta reads it in its own byte order.
        c = rand(rng, (5, 5), dt)
        out = make((5, 5))
        out[...] = c
        assert microtile.gemm(a, a.T, beta=1.0, c=out, out=out) is out
        assert_gemm(out.astype(dt), a, a.T, 1.0, 1.0, c, what="gemm out is c")
        out = make((3, 5, 5))
        stack = rand(rng, (3, 5, 4), dt)
        assert microtile.matmul(stack, a.T, out=out) is out
        assert_gemm(out.astype(dt), stack, a.T, what="matmul out")


@pytest.mark.parametrize("dt", FLOATS)
def test_unpickled_arrays_compute_in_their_own_dtype(dt, rng):
    """An unpickled array carries a dtype object equal to, but not, NumPy's canonical one.
    As an input it must still select its own precision, and as ``out`` it must be written in
    it (a float32 out taken for float64 would be overrun)."""
    import pickle
    a, x, y = rand(rng, (5, 4), dt), rand(rng, 5, dt), rand(rng, 4, dt)
    a_p, x_p = pickle.loads(pickle.dumps(a)), pickle.loads(pickle.dumps(x))
    if a_p.dtype is np.dtype(dt):
        pytest.skip("this NumPy unpickles to the canonical dtype object")
    out = pickle.loads(pickle.dumps(np.zeros((5, 5), dt)))
    guard = np.full(64, 7, dt)
    assert microtile.gemm(a_p, a_p.T, out=out) is out
    assert out.dtype == dt
    assert_gemm(out, a, a.T, what="gemm unpickled")
    got = microtile.gemv(a_p, x_p, trans=True)
    assert got.dtype == dt
    assert_gemm(got[:, None], a.T, x[:, None], what="gemv unpickled")
    ref, bound = outer_ref(x, y)
    assert_close(microtile.outer(x_p, y), ref, bound, 1, dt, "outer unpickled")
    np.testing.assert_array_equal(guard, 7)
