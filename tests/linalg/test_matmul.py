"""matmul with numpy.matmul semantics: 1-D and 2-D operands, stacks with broadcast batch
dimensions, zero sizes, out=, any layout; values within the k*eps bound of a float64
reference."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import microtile
from microtile import config_context

from _helpers import (FLOATS, SENTINEL, assert_close, gemm_reference, rand,
                      result_dtype, with_layout)

ISAS = microtile.available_isas()
small = st.one_of(st.sampled_from((0, 1, 2, 5, 6, 7, 8, 9, 16, 17, 33)), st.integers(0, 70))


def expected(a, b):
    """(ref, bound, k) for np.matmul(a, b) computed in float64, with NumPy's shape rules."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a2 = a64[None, :] if a64.ndim == 1 else a64
    b2 = b64[:, None] if b64.ndim == 1 else b64
    ref, bound = gemm_reference(a2, b2)
    if a64.ndim == 1:
        ref, bound = ref[..., 0, :], bound[..., 0, :]
    if b64.ndim == 1:
        ref, bound = ref[..., 0], bound[..., 0]
    return ref, bound, a64.shape[-1]


def check(res, a, b, what="matmul"):
    ref, bound, k = expected(a, b)
    want_shape = np.matmul(np.zeros(np.shape(a), np.float32), np.zeros(np.shape(b), np.float32)).shape
    assert np.shape(res) == want_shape == ref.shape, f"{what}: shape {np.shape(res)}, want {want_shape}"
    dt = result_dtype(a, b)
    assert np.asarray(res).dtype == dt, f"{what}: dtype {np.asarray(res).dtype}, want {dt}"
    assert_close(np.asarray(res), ref, bound, k, dt, what)


def stack_layout(x, layout, rng):
    """N-D layouts: C, F, the last two axes swapped in memory, negative strides, strided in
    a NaN buffer, batch axes permuted in memory."""
    if x.ndim < 2:
        return x if layout in ("C", "F", "swap", "perm") else with_layout(x[None], layout)[0]
    if layout == "swap":
        return np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)
    if layout == "perm":
        order = tuple(rng.permutation(x.ndim))
        inverse = tuple(np.argsort(order))
        return np.ascontiguousarray(x.transpose(order)).transpose(inverse)
    return with_layout(x, layout)


STACK_LAYOUTS = ("C", "F", "swap", "perm", "neg_both", "strided", "neg_strided", "readonly")


@st.composite
def matmul_shapes(draw):
    """Shapes (sa, sb) that np.matmul accepts: 1-D or N-D, batch dimensions broadcast."""
    m, n, k = draw(small), draw(small), draw(small)
    nb = draw(st.integers(0, 3))
    batch = [draw(st.sampled_from((0, 1, 2, 3, 4))) for _ in range(nb)]
    ba = [d if draw(st.booleans()) else 1 for d in batch]
    bb = [d if draw(st.booleans()) else 1 for d in batch]
    ba = ba[draw(st.integers(0, len(ba))):]       # drop leading batch dims on either side
    bb = bb[draw(st.integers(0, len(bb))):]
    a_1d = draw(st.integers(0, 4)) == 0
    b_1d = draw(st.integers(0, 4)) == 0
    sa = (k,) if a_1d else tuple(ba) + (m, k)
    sb = (k,) if b_1d else tuple(bb) + (k, n)
    return sa, sb


@given(shapes=matmul_shapes(), dta=st.sampled_from(FLOATS), dtb=st.sampled_from(FLOATS),
       la=st.sampled_from(STACK_LAYOUTS), lb=st.sampled_from(STACK_LAYOUTS),
       seed=st.integers(0, 2 ** 32 - 1))
def test_matmul_matches_numpy(shapes, dta, dtb, la, lb, seed):
    rng = np.random.default_rng(seed)
    sa, sb = shapes
    a, b = rand(rng, sa, dta), rand(rng, sb, dtb)
    av, bv = stack_layout(a, la, rng), stack_layout(b, lb, rng)
    check(microtile.matmul(av, bv), a, b, f"matmul {sa} {sb} {la} {lb}")
    np.testing.assert_array_equal(av, a)
    np.testing.assert_array_equal(bv, b)


@given(shapes=matmul_shapes(), dt=st.sampled_from(FLOATS),
       layout=st.sampled_from(("C", "F", "swap", "neg_both", "strided", "neg_strided")),
       seed=st.integers(0, 2 ** 32 - 1))
def test_matmul_out(shapes, dt, layout, seed):
    rng = np.random.default_rng(seed)
    sa, sb = shapes
    a, b = rand(rng, sa, dt), rand(rng, sb, dt)
    shape = np.matmul(a, b).shape
    if len(shape) == 0:
        return
    big = None
    base = np.full(shape, np.nan, dt)
    if layout in ("strided", "neg_strided") and len(shape) >= 2:
        out = with_layout(base, layout)      # a view into a larger buffer
        big = out.base
        big[...] = SENTINEL
        out[...] = np.nan
    elif len(shape) >= 2:
        out = stack_layout(base, layout, rng)
    else:
        out = base
    res = microtile.matmul(a, b, out=out)
    assert res is out
    check(out, a, b, f"matmul out {sa} {sb} {layout}")
    if big is not None:
        out[...] = SENTINEL
        assert (big == SENTINEL).all(), "matmul wrote outside out"


@pytest.mark.parametrize("dt", FLOATS)
def test_vector_vector_is_a_scalar(dt, rng):
    for n in (0, 1, 7, 65, 1000):
        x, y = rand(rng, n, dt), rand(rng, n, dt)
        res = microtile.matmul(x, y)
        assert np.ndim(res) == 0
        check(res, x, y)
    assert float(microtile.matmul(np.ones(0, dt), np.ones(0, dt))) == 0.0


@pytest.mark.parametrize("dt", FLOATS)
def test_vector_matrix_and_matrix_vector(dt, rng):
    for m, k in [(1, 1), (7, 5), (65, 63), (300, 257), (0, 4), (4, 0)]:
        x = rand(rng, k, dt)
        a = rand(rng, (m, k), dt)
        check(microtile.matmul(a, x), a, x)
        check(microtile.matmul(x, a.T), x, a.T)
        check(microtile.matmul(x[::-1], a[::-1, ::-1].T), x[::-1], a[::-1, ::-1].T)


@pytest.mark.parametrize("sa,sb", [
    ((2, 3, 4), (4, 5)), ((4,), (2, 4, 5)), ((2, 3, 4), (4,)), ((2, 1, 3, 4), (5, 4, 6)),
    ((1, 3, 4), (7, 4, 2)), ((3, 1, 1, 2, 3), (4, 1, 3, 5)), ((6, 6, 6), (6, 6, 6)),
    ((0, 3, 4), (4, 5)), ((2, 0, 4), (2, 4, 5)), ((2, 3, 0), (2, 0, 5)), ((2, 3, 4), (2, 4, 0)),
    ((0, 1, 3, 4), (5, 4, 2)), ((2, 3, 0), (0,)), ((0,), (3, 0, 2)),
])
@pytest.mark.parametrize("dt", FLOATS)
def test_stacks_and_broadcast(sa, sb, dt, rng):
    a, b = rand(rng, sa, dt), rand(rng, sb, dt)
    check(microtile.matmul(a, b), a, b, f"{sa} @ {sb}")


@pytest.mark.parametrize("dt", FLOATS)
def test_broadcast_views_with_zero_batch_stride(dt, rng):
    a = np.broadcast_to(rand(rng, (5, 7), dt), (4, 5, 7))
    b = np.broadcast_to(rand(rng, (1, 7, 3), dt), (4, 7, 3))
    assert a.strides[0] == 0 and b.strides[0] == 0
    check(microtile.matmul(a, b), a, b)


def test_mixed_precision(rng):
    a, b = rand(rng, (3, 40, 50), np.float32), rand(rng, (50, 20), np.float64)
    check(microtile.matmul(a, b), a, b)
    check(microtile.matmul(b.T, a.transpose(0, 2, 1)), b.T, a.transpose(0, 2, 1))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dt", FLOATS)
def test_many_small_matrices(threads, isa, dt, rng):
    """A stack of small products (spread across threads) and a few large ones."""
    cases = [((1000, 8, 8), (1000, 8, 8)), ((257, 3, 17), (17, 5)), ((2, 300, 200), (200, 150)),
             ((3, 1, 64), (3, 64, 1)), ((513, 6, 16), (513, 16, 16))]
    with config_context(threads=threads, isa=isa):
        for sa, sb in cases:
            a, b = rand(rng, sa, dt), rand(rng, sb, dt)
            check(microtile.matmul(a, b), a, b, f"{sa} @ {sb}")


@pytest.mark.parametrize("dt", FLOATS)
def test_nan_inf_and_zero_k(dt):
    a = np.ones((2, 3, 4), dt)
    a[1, 2, 3] = np.nan
    res = microtile.matmul(a, np.ones((4, 5), dt))
    assert np.isnan(res[1, 2]).all() and not np.isnan(res[0]).any() and not np.isnan(res[1, :2]).any()
    res = microtile.matmul(np.full((2, 3, 0), np.nan, dt), np.ones((0, 5), dt))
    np.testing.assert_array_equal(res, np.zeros((2, 3, 5)))


def test_out_nan_filled_does_not_leak(rng):
    a, b = rand(rng, (3, 20, 30), np.float64), rand(rng, (3, 30, 10), np.float64)
    out = np.full((3, 20, 10), np.nan)
    microtile.matmul(a, b, out=out)
    check(out, a, b)


def test_aliased_operands(rng):
    a = rand(rng, (4, 30, 30), np.float64)
    check(microtile.matmul(a, a), a, a)
    check(microtile.matmul(a, a.transpose(0, 2, 1)), a, a.transpose(0, 2, 1))
    check(microtile.matmul(a[0], a[0]), a[0], a[0])


@pytest.mark.parametrize("threads", [1, 2])
def test_stack_out_layouts_threaded(threads, rng):
    """A stack of small products spread across threads, into a stack out of any layout."""
    a, b = rand(rng, (64, 9, 13), np.float32), rand(rng, (64, 13, 11), np.float32)
    for layout in ("C", "F", "swap", "perm", "neg_both"):
        out = stack_layout(np.zeros((64, 9, 11), np.float32), layout, rng)
        with config_context(threads=threads, thread_mnk=0):
            assert microtile.matmul(a, b, out=out) is out
        check(out, a, b, f"out {layout}")


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("sa, sb", [
    ((2 ** 20, 0, 4), (4, 5)),                # empty rows, a batch of 2**20 (0 bytes)
    ((1, 3, 4), (2 ** 20, 4, 0)),             # empty columns, a broadcast against it
    ((2 ** 18, 1, 0, 4), (1, 2 ** 3, 4, 3)),  # both batch dimensions broadcast
    ((0, 3, 4), (5, 1, 4, 2)),                # empty batch
    ((4,), (2 ** 20, 4, 0)),                  # 1-D operand: a batch of empty rows
])
def test_empty_result_does_no_work(sa, sb, dt):
    # An empty result needs no per-matrix offsets, conversions or GEMM calls: it comes back
    # at once (a batch of 2**26 once took 13 s and 2.6 GB; test_memory.py runs 2**31).
    a = np.broadcast_to(np.ones((), dt), sa)
    b = np.broadcast_to(np.ones((), np.float64), sb)
    ref = np.matmul(a, b)
    assert ref.size == 0
    res = microtile.matmul(a, b)
    assert res.shape == ref.shape and res.dtype == np.float64
    out = np.empty(ref.shape, np.float64)
    assert microtile.matmul(a, b, out=out) is out
    with pytest.raises(ValueError, match="shape"):
        microtile.matmul(a, b, out=np.empty(ref.shape + (1,)))
