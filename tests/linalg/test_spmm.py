"""spmm against scipy's own product computed in float64, with the k*eps bound of
``_helpers`` where k is the number of stored entries that meet in one output element (the
nonzeros per row of a sparse left operand, per column of a sparse right one, duplicates
counted): every format, both sides, transposed views, both index dtypes, duplicates,
unsorted indices, explicit zeros, empty rows, 0-size shapes, alpha/beta/c/out, NaN/Inf,
strided dense operands, malformed matrices, both ISAs, and threads."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

sp = pytest.importorskip("scipy.sparse")

import microtile
from microtile import config_context, spmm

from _helpers import (FLOATS, LAYOUTS, OUT_LAYOUTS, assert_close, assert_outside_untouched,
                      make_out, rand, run_in_threads, run_python, with_layout)

ISAS = microtile.available_isas()
FORMATS = ("csr", "csc", "coo", "bsr", "lil", "dok", "dia")
SIZES = (0, 1, 7, 63, 65, 257)


def random_sparse(rng, shape, density, dtype, fmt="csr", index=np.int32):
    """A random sparse matrix of ``fmt``; CSR/CSC with ``index`` index arrays."""
    m = sp.random(shape[0], shape[1], density=density, format="csr", dtype=np.float64,
                  rng=rng)
    m.data[:] = rng.standard_normal(m.nnz)
    m = m.astype(dtype)
    if fmt == "dia" and m.nnz > 0:
        # DIA stores one full-length diagonal per nonzero offset: keep it small.
        m = sp.random(shape[0], shape[1], density=min(density, 0.02), format="csr",
                      dtype=np.float64, rng=rng).astype(dtype)
    m = m.asformat(fmt)
    if fmt in ("csr", "csc"):
        m.indptr = m.indptr.astype(index)
        m.indices = m.indices.astype(index)
    return m


def messy_csr(rng, shape, nnz, dtype, index=np.int32):
    """CSR with duplicate entries, unsorted indices, explicit zeros and empty rows (scipy
    accepts all four as they are)."""
    m, k = shape
    rows = np.sort(rng.integers(0, max(m // 2, 1), nnz)) * 2 if m else np.zeros(0, int)
    rows = rows[rows < m]
    cols = rng.integers(0, k, rows.size) if k else np.zeros(0, int)
    if rows.size >= 2:
        rows[1], cols[1] = rows[0], cols[0]          # a duplicate
    data = rng.standard_normal(rows.size)
    data[::5] = 0.0                                  # explicit zeros
    indptr = np.zeros(m + 1, dtype=index)
    np.cumsum(np.bincount(rows, minlength=m), out=indptr[1:])
    order = np.lexsort((-cols, rows))                # columns descending within each row
    a = sp.csr_matrix((data[order].astype(dtype), cols[order].astype(index), indptr),
                      shape=shape)
    assert not a.has_canonical_format or rows.size < 2
    return a


def reference(a, b, alpha=1.0, beta=0.0, c=None):
    """(ref, bound, k): scipy's product in float64 (implicit zeros never multiply), the
    bound |alpha| |a| @ |b| + |beta| |c| with duplicates' magnitudes added, and the largest
    number of stored entries that meet in one element."""
    def parts(x):
        if sp.issparse(x):
            coo = sp.coo_matrix(x)
            x64 = sp.csr_matrix((coo.data.astype(np.float64), (coo.row, coo.col)), x.shape)
            xa = sp.csr_matrix((np.abs(coo.data.astype(np.float64)), (coo.row, coo.col)),
                               x.shape)
            return x64, xa, coo
        x64 = np.asarray(x, dtype=np.float64)
        return x64, np.abs(x64), None
    a64, aa, acoo = parts(a)
    b64, ba, bcoo = parts(b)
    shape = (a.shape[0], b.shape[1])
    ref = np.zeros(shape)
    bound = np.zeros(shape)
    if alpha != 0:
        ref += alpha * np.asarray(a64 @ b64)
        bound += abs(alpha) * np.asarray(aa @ ba)
    if beta != 0:
        c64 = np.broadcast_to(np.asarray(c, dtype=np.float64), shape)
        ref += beta * c64
        bound += abs(beta) * np.abs(c64)
    if acoo is not None:
        k = np.bincount(acoo.row, minlength=1).max() if acoo.nnz else 0
    else:
        k = np.bincount(bcoo.col, minlength=1).max() if bcoo.nnz else 0
    return ref, bound, int(k)


def check(res, a, b, alpha=1.0, beta=0.0, c=None, what="spmm"):
    dense = [x for x in (a, b, c) if x is not None and not sp.issparse(x)]
    dt = np.result_type(*[np.asarray(x).dtype for x in dense],
                        *[x.dtype for x in (a, b) if sp.issparse(x)])
    assert res.dtype == dt, f"{what}: dtype {res.dtype}, expected {dt}"
    ref, bound, k = reference(a, b, alpha, beta, c)
    assert_close(res, ref, bound, k, dt, what)


def snapshot(*xs):
    out = []
    for x in xs:
        if sp.issparse(x):
            out.append(tuple(np.array(getattr(x, n), copy=True)
                             for n in ("data", "indices", "indptr") if hasattr(x, n)))
        else:
            out.append((np.array(x, copy=True),))
    return out


def assert_unchanged(before, *xs):
    for snap, x in zip(before, xs):
        now = snapshot(x)[0]
        for u, v in zip(snap, now):
            np.testing.assert_array_equal(u, v)


# --- formats, sides, dtypes ------------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dt", FLOATS)
def test_every_format_both_sides(isa, fmt, dt, rng):
    a = random_sparse(rng, (67, 45), 0.15, dt, fmt)
    b = rand(rng, (45, 70), dt)
    d = rand(rng, (30, 67), dt)
    before = snapshot(a, b, d)
    with config_context(isa=isa):
        check(spmm(a, b), a, b, what=f"{fmt} @ dense")
        check(spmm(d, a), d, a, what=f"dense @ {fmt}")
        check(spmm(a.T, d.T), a.T, d.T, what=f"{fmt}.T @ dense")
        check(spmm(b.T, a.T), b.T, a.T, what=f"dense @ {fmt}.T")
    assert_unchanged(before, a, b, d)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ("csr", "csc"))
@pytest.mark.parametrize("index", (np.int32, np.int64))
@pytest.mark.parametrize("dt", FLOATS)
def test_odd_sizes(isa, fmt, index, dt, rng):
    for m, k, n in ((0, 5, 3), (5, 0, 3), (5, 3, 0), (1, 1, 1), (7, 63, 65), (65, 7, 257),
                    (257, 65, 7), (63, 257, 1), (1, 257, 63)):
        a = random_sparse(rng, (m, k), 0.3, dt, fmt, index)
        b = rand(rng, (k, n), dt)
        with config_context(isa=isa):
            check(spmm(a, b), a, b, what=f"{fmt}{(m, k)} @ {(k, n)}")
            bs = random_sparse(rng, (n, m), 0.3, dt, fmt, index)
            d = rand(rng, (k, n), dt)
            check(spmm(d, bs), d, bs, what=f"{(k, n)} @ {fmt}{(n, m)}")


def test_sparse_arrays_and_matrices(rng):
    a = random_sparse(rng, (20, 30), 0.2, np.float64)
    b = rand(rng, (30, 9), np.float64)
    for x in (sp.csr_array(a), sp.csc_array(a), sp.coo_array(a), sp.csr_matrix(a)):
        check(spmm(x, b), x, b, what=type(x).__name__)


def test_mixed_and_unusual_index_dtypes(rng):
    """A hand-built matrix may carry int64 indptr with int32 indices, or unsigned ones:
    converted to int64 once, and still checked."""
    a = random_sparse(rng, (15, 12), 0.3, np.float64)
    b = rand(rng, (12, 5), np.float64)
    for ip, ix in ((np.int64, np.int32), (np.int32, np.int64), (np.uint32, np.uint32),
                   (np.int16, np.int16)):
        m = a.copy()
        m.indptr = a.indptr.astype(ip)
        m.indices = a.indices.astype(ix)
        check(spmm(m, b), a, b, what=f"{np.dtype(ip)}/{np.dtype(ix)} indices")
    m = a.copy()
    m.indices = a.indices.astype(np.uint64)
    m.indices[0] = np.uint64(2 ** 64 - 1)           # -1 once read as int64
    with pytest.raises(ValueError, match="out of range"):
        spmm(m, b)


def test_tolerance_catches_one_wrong_term(rng):
    """The bound is tight enough that dropping a single product is caught."""
    a = random_sparse(rng, (30, 300), 0.3, np.float64)
    b = rand(rng, (300, 20), np.float64)
    res = spmm(a, b)
    row = int(np.argmax(np.diff(a.indptr)))
    p = a.indptr[row]
    res[row, 3] -= a.data[p] * b[a.indices[p], 3]
    with pytest.raises(AssertionError):
        check(res, a, b)


def test_subclass_of_a_scipy_class_is_sparse(rng):
    class Mine(sp.csr_array):
        pass

    a = Mine(random_sparse(rng, (9, 8), 0.3, np.float64))
    b = rand(rng, (8, 3), np.float64)
    check(spmm(a, b), a, b)


@pytest.mark.parametrize("sdt", FLOATS)
@pytest.mark.parametrize("ddt", FLOATS)
def test_mixed_dtypes_promote(sdt, ddt, rng):
    a = random_sparse(rng, (33, 40), 0.2, sdt)
    b = rand(rng, (40, 17), ddt)
    res = spmm(a, b)
    assert res.dtype == np.result_type(sdt, ddt)
    check(res, a, b)
    check(spmm(b.T, a.T), b.T, a.T)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("index", (np.int32, np.int64))
@pytest.mark.parametrize("dt", FLOATS)
def test_duplicates_unsorted_explicit_zeros_empty_rows(isa, index, dt, rng):
    a = messy_csr(rng, (41, 37), 150, dt, index)
    before = snapshot(a)
    b = rand(rng, (37, 70), dt)
    d = rand(rng, (9, 41), dt)
    with config_context(isa=isa):
        check(spmm(a, b), a, b, what="messy csr @ dense")
        check(spmm(a.T, d.T), a.T, d.T, what="messy csc @ dense")
        check(spmm(d, a), d, a, what="dense @ messy csr")
        check(spmm(b.T, a.T), b.T, a.T, what="dense @ messy csc")
    assert_unchanged(before, a)
    assert not a.has_sorted_indices   # scipy did not sort them for us


@pytest.mark.parametrize("dt", FLOATS)
def test_zero_nonzeros(dt, rng):
    for fmt in ("csr", "csc", "coo"):
        a = sp.csr_matrix((6, 4), dtype=dt).asformat(fmt)
        b = rand(rng, (4, 5), dt)
        np.testing.assert_array_equal(spmm(a, b), np.zeros((6, 5), dt))
        np.testing.assert_array_equal(spmm(b.T, a.T), np.zeros((5, 6), dt))
        c = rand(rng, (6, 5), dt)
        np.testing.assert_array_equal(spmm(a, b, beta=2.0, c=c), (dt(2) * c).astype(dt))


@given(m=st.integers(0, 70), k=st.integers(0, 70), n=st.integers(0, 140),
       density=st.sampled_from((0.0, 0.02, 0.3, 1.0)), fmt=st.sampled_from(FORMATS[:4]),
       side=st.sampled_from(("left", "right")), transpose=st.booleans(),
       dts=st.tuples(st.sampled_from(FLOATS), st.sampled_from(FLOATS)),
       index=st.sampled_from((np.int32, np.int64)),
       alpha=st.sampled_from((1.0, -0.5, 0.0)), beta=st.sampled_from((0.0, 1.0, 2.5)),
       isa=st.sampled_from(ISAS), threads=st.sampled_from((1, 2)),
       seed=st.integers(0, 2 ** 32 - 1))
def test_random_products(m, k, n, density, fmt, side, transpose, dts, index, alpha, beta,
                         isa, threads, seed):
    rng = np.random.default_rng(seed)
    sshape = (m, k) if side == "left" else (k, n)
    if transpose:
        sshape = sshape[::-1]
    s = random_sparse(rng, sshape, density, dts[0], fmt, index)
    if transpose:
        s = s.T
    dense = rand(rng, (k, n) if side == "left" else (m, k), dts[1])
    a, b = (s, dense) if side == "left" else (dense, s)
    c = rand(rng, (m, n), dts[1]) if beta else None
    with config_context(isa=isa, threads=threads):
        res = spmm(a, b, alpha=alpha, beta=beta, c=c)
    check(res, a, b, alpha, beta, c, what=f"{fmt} {side} T={transpose}")


# --- dense layouts, alpha/beta/c/out ---------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", ("csr", "csc"))
def test_dense_layouts(layout, fmt, rng):
    dt = np.float32
    a = random_sparse(rng, (23, 70), 0.2, dt, fmt)
    b = rand(rng, (70, 19), dt)
    d = rand(rng, (13, 23), dt)
    bl, dl = with_layout(b, layout), with_layout(d, layout)
    check(spmm(a, bl), a, b, what=f"{fmt} @ {layout}")
    check(spmm(dl, a), d, a, what=f"{layout} @ {fmt}")
    np.testing.assert_array_equal(bl, b)
    np.testing.assert_array_equal(dl, d)


@pytest.mark.parametrize("layout", OUT_LAYOUTS)
@pytest.mark.parametrize("side", ("left", "right"))
@pytest.mark.parametrize("fmt", ("csr", "csc"))
def test_out_layouts_and_beta(layout, side, fmt, rng):
    dt = np.float64
    s = random_sparse(rng, (31, 29), 0.2, dt, fmt)
    dense = rand(rng, (29, 18) if side == "left" else (18, 31), dt)
    a, b = (s, dense) if side == "left" else (dense, s)
    shape = (a.shape[0], b.shape[1])
    c = rand(rng, shape, dt)
    out, big = make_out(shape, dt, layout)
    res = spmm(a, b, alpha=-1.5, beta=0.5, c=c, out=out)
    assert res is out
    check(res, a, b, -1.5, 0.5, c, what=f"{side} out={layout}")
    assert_outside_untouched(out, big)
    # out may be c itself: an in-place update.
    c2 = with_layout(c, layout) if layout not in ("readonly",) else c.copy()
    expect_c = c2.copy()
    res = spmm(a, b, alpha=2.0, beta=-1.0, c=c2, out=c2)
    assert res is c2
    check(res, a, b, 2.0, -1.0, expect_c, what=f"{side} in place {layout}")


def test_c_broadcasts_and_weak_scalars(rng):
    a = random_sparse(rng, (12, 10), 0.3, np.float32)
    b = rand(rng, (10, 8), np.float32)
    row = rand(rng, (8,), np.float32)
    check(spmm(a, b, beta=1.0, c=row), a, b, 1.0, 1.0, np.broadcast_to(row, (12, 8)))
    res = spmm(a, b, beta=2.0, c=3.0)
    assert res.dtype == np.float32             # a Python number does not promote
    check(res, a, b, 1.0, 2.0, np.full((12, 8), 3.0, np.float32))
    with pytest.raises(ValueError, match="broadcast"):
        spmm(a, b, beta=1.0, c=np.ones((3, 8), np.float32))


def test_beta_zero_does_not_read_c_and_alpha_zero_does_not_form_product(rng):
    a = random_sparse(rng, (12, 10), 0.3, np.float64)
    a.data[0] = np.nan
    b = rand(rng, (10, 8), np.float64)
    c = np.full((12, 8), np.nan)
    res = spmm(a, b, alpha=0.0, beta=0.0, c=c)
    np.testing.assert_array_equal(res, np.zeros((12, 8)))
    c = rand(rng, (12, 8), np.float64)
    np.testing.assert_array_equal(spmm(a, b, alpha=0.0, beta=3.0, c=c), 3.0 * c)
    a.data[0] = 1.0
    assert np.isfinite(spmm(a, b, beta=0.0, c=np.full((12, 8), np.nan))).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ("csr", "csc"))
def test_nan_and_inf_propagate(isa, fmt, rng):
    dt = np.float64
    a = random_sparse(rng, (20, 30), 0.3, dt, fmt)
    a.data[0] = np.nan
    a.data[1] = np.inf
    b = rand(rng, (30, 70), dt)
    b[3, 5] = -np.inf
    d = rand(rng, (70, 20), dt)
    d[2, 4] = np.nan
    with config_context(isa=isa):
        check(spmm(a, b), a, b, what="nan/inf sparse @ dense")
        check(spmm(d, a), d, a, what="nan/inf dense @ sparse")


# --- threads ---------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ("csr", "csc"))
@pytest.mark.parametrize("dt", FLOATS)
def test_two_threads_power_law_rows(isa, fmt, dt, rng):
    """A few rows a hundred times denser than the rest, with 2 threads splitting by
    nonzeros: the split must neither drop nor repeat a row."""
    m, k = 300, 257
    dense_rows = sp.random(3, k, density=0.9, format="csr", rng=rng)
    sparse_rows = sp.random(m - 3, k, density=0.009, format="csr", rng=rng)
    a = sp.vstack([dense_rows, sparse_rows]).tocsr().astype(dt).asformat(fmt)
    b = rand(rng, (k, 130), dt)
    d = rand(rng, (97, m), dt)
    with config_context(isa=isa, threads=2):
        check(spmm(a, b), a, b, what="2 threads sparse @ dense")
        check(spmm(d, a), d, a, what="2 threads dense @ sparse")
        check(spmm(a.T, d.T), a.T, d.T, what="2 threads sparse.T @ dense")
        check(spmm(b.T, a.T), b.T, a.T, what="2 threads dense @ sparse.T")


def test_python_threads_at_once(rng):
    a = random_sparse(rng, (200, 150), 0.05, np.float32)
    b = rand(rng, (150, 64), np.float32)
    d = rand(rng, (40, 200), np.float32)
    want1, want2 = spmm(a, b), spmm(d, a)

    def work(i):
        for _ in range(5):
            np.testing.assert_array_equal(spmm(a, b), want1)
            np.testing.assert_array_equal(spmm(d, a), want2)

    run_in_threads(work, n=8)


# --- errors ----------------------------------------------------------------------------------

def _malformed(rng, index):
    base = random_sparse(rng, (6, 5), 0.5, np.float64, "csr", index)
    assert base.nnz >= 3
    out = []
    m = base.copy(); m.indices[1] = 5; out.append(("index too large", m))
    m = base.copy(); m.indices[0] = -1; out.append(("negative index", m))
    m = base.copy(); m.indptr[2], m.indptr[3] = m.indptr[3] + 1, m.indptr[2]
    out.append(("indptr not monotonic", m))
    m = base.copy(); m.indptr = m.indptr[:-1]; out.append(("indptr too short", m))
    m = base.copy(); m.indptr[-1] = len(m.indices) + 5
    out.append(("indptr past the end", m))
    m = base.copy(); m.indptr[0] = 1; out.append(("indptr[0] not 0", m))
    return out


@pytest.mark.parametrize("index", (np.int32, np.int64))
def test_malformed_matrices_raise(index, rng):
    b = rand(rng, (5, 4), np.float64)
    d = rand(rng, (3, 6), np.float64)
    for what, m in _malformed(rng, index):
        for call in (lambda: spmm(m, b), lambda: spmm(d, m), lambda: spmm(m.T, d.T),
                     lambda: spmm(b.T, m.T), lambda: spmm(m, b, alpha=0.0)):
            with pytest.raises(ValueError):
                call()


def test_argument_errors(rng):
    a = random_sparse(rng, (6, 5), 0.5, np.float64)
    b = rand(rng, (5, 4), np.float64)
    with pytest.raises(TypeError, match="exactly one"):
        spmm(b.T, b)
    with pytest.raises(TypeError, match="exactly one"):
        spmm(a, a.T)
    with pytest.raises(TypeError, match="int64"):
        spmm(a.astype(np.int64), b)
    with pytest.raises(TypeError, match="complex"):
        spmm(a.astype(np.complex128), b)
    with pytest.raises(TypeError, match="int32"):
        spmm(a, b.astype(np.int32))
    with pytest.raises(ValueError, match=r"\(6, 5\).*\(4, 5\)"):
        spmm(a, b.T)
    with pytest.raises(ValueError, match="2-D"):
        spmm(a, b[:, 0])
    with pytest.raises(ValueError, match="c is required"):
        spmm(a, b, beta=1.0)
    with pytest.raises(ValueError, match="shape"):
        spmm(a, b, out=np.empty((4, 6)))
    with pytest.raises(TypeError, match="dtype"):
        spmm(a, b, out=np.empty((6, 4), np.float32))
    ro = np.empty((6, 4))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        spmm(a, b, out=ro)
    buf = np.zeros((7, 6))
    with pytest.raises(ValueError, match="overlap"):
        spmm(a, buf[:5, :4], out=buf[1:, :4])
    cbuf = np.zeros((7, 4))
    with pytest.raises(ValueError, match="without being c"):
        spmm(a, b, beta=1.0, c=cbuf[:6], out=cbuf[1:])


# --- ISA and optional scipy in fresh interpreters --------------------------------------------

def test_generic_isa_process():
    code = r"""
import json, numpy as np, scipy.sparse as sp, microtile
rng = np.random.default_rng(5)
errs = []
for dt in (np.float32, np.float64):
    a = sp.random(65, 63, density=0.1, format="csr", dtype=dt, rng=rng)
    b = rng.standard_normal((63, 67)).astype(dt)
    d = rng.standard_normal((7, 65)).astype(dt)
    for got, want in ((microtile.spmm(a, b), a.toarray() @ b),
                      (microtile.spmm(d, a), d @ a.toarray()),
                      (microtile.spmm(a.T, d.T), a.toarray().T @ d.T),
                      (microtile.spmm(b.T, a.T), b.T @ a.toarray().T)):
        errs.append(float(np.abs(got - want).max() / (np.abs(want).max() + 1)))
print(json.dumps({"isa": microtile.get_config()["isa"], "err": max(errs)}))
"""
    res = run_python(code, env={"MICROTILE_ISA": "generic"})
    assert res["isa"] == "generic"
    assert res["err"] < 1e-5


def test_imports_without_scipy():
    code = r"""
import json, sys
sys.modules["scipy"] = None          # any "import scipy" now raises ImportError
import numpy as np, microtile
err = None
try:
    microtile.spmm(np.ones((2, 2)), np.ones((2, 2)))
except TypeError as exc:
    err = str(exc)
print(json.dumps({"loaded": any(k.startswith("scipy") and v is not None
                                for k, v in sys.modules.items()), "err": err}))
"""
    res = run_python(code)
    assert not res["loaded"]
    assert "exactly one" in res["err"]


def test_private_driver_refuses_what_the_public_layer_never_passes():
    """csr_product is private, but it still checks what would make a kernel misread."""
    from microtile.sparse._spmm import csr_product
    ip = np.array([0, 1, 2], np.int32)
    ix = np.array([0, 1], np.int32)
    data = np.ones(2)
    X = np.ones((2, 3))
    Y = np.empty((2, 3))
    csr_product(False, ip, ix, data, 2, X, Y, 1.0, 0.0)
    np.testing.assert_array_equal(Y, np.ones((2, 3)))
    for args, exc in (((False, ip, ix, data, 2, X[0], Y, 1.0, 0.0), ValueError),
                      ((False, ip[:0], ix, data, 2, X, Y, 1.0, 0.0), ValueError),
                      ((False, ip, ix, data, 2, X, Y[:1], 1.0, 0.0), ValueError),
                      ((True, ip, ix, data, 3, X, Y, 1.0, 0.0), ValueError),
                      ((False, ip, ix, data, 2, X[:, ::2], Y[:, :2], 1.0, 0.0), ValueError),
                      ((False, ip, ix, data.astype(np.float32), 2, X, Y, 1.0, 0.0), TypeError),
                      ((False, ip, ix.astype(np.int64), data, 2, X, Y, 1.0, 0.0), TypeError),
                      ((False, ip, ix, data[:1], 2, X, Y, 1.0, 0.0), ValueError)):
        with pytest.raises(exc):
            csr_product(*args)


def test_duplicates_of_a_float32_coo_matrix_are_summed_in_the_products_dtype():
    """scipy's tocsr() sums duplicates in the matrix's dtype: a float32 COO matrix times a
    float64 operand came out with float32 roundings (3e-8 relative; found by the fuzz
    driver).  Now the duplicates reach the kernel and are summed in float64."""
    sp = pytest.importorskip("scipy.sparse")
    rng = np.random.default_rng(21)
    rows = np.array([0, 0, 0, 1, 1, 2])
    cols = np.array([1, 1, 1, 0, 0, 2])
    data = rng.standard_normal(6).astype(np.float32)
    a = sp.coo_matrix((data, (rows, cols)), shape=(3, 3))
    b = rng.standard_normal((3, 4))
    dense = np.zeros((3, 3))
    np.add.at(dense, (rows, cols), data.astype(np.float64))
    got = microtile.spmm(a, b)
    assert got.dtype == np.float64
    # The rounding bound sums |each duplicate|, not |their sum|: three duplicates that
    # nearly cancel leave a small entry but their products' roundings (the portable build,
    # without FMA, measured 1.13x a bound built from |sum|).
    dense_abs = np.zeros((3, 3))
    np.add.at(dense_abs, (rows, cols), np.abs(data.astype(np.float64)))
    bound = 8 * np.finfo(np.float64).eps * (dense_abs @ np.abs(b))
    assert np.all(np.abs(got - dense @ b) <= bound), np.max(np.abs(got - dense @ b) / bound)
