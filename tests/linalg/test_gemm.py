"""gemm against a float64 NumPy reference with a k*eps error bound (see _helpers.py), over
shapes 0..300, both dtypes, transposes, alpha/beta, every layout, every blocking and
threading path, and both kernel sets."""
import threading

import numpy as np
import pytest
from hypothesis import given, strategies as st

import microtile
from microtile import config_context, gemm
from microtile.linalg._gemm import _b_read_in_place

from _helpers import (EDGE_SIZES, FLOATS, LAYOUTS, OUT_LAYOUTS, PRIMES, assert_close,
                      assert_gemm, assert_outside_untouched, gemm_reference, make_out, rand,
                      result_dtype, run_python, with_layout)

ISAS = microtile.available_isas()
dims = st.one_of(st.sampled_from(EDGE_SIZES), st.sampled_from(PRIMES), st.integers(0, 300))
small_dims = st.one_of(st.sampled_from((0, 1, 2, 5, 6, 7, 8, 9, 15, 16, 17, 31, 33)),
                       st.integers(0, 80))
alphas = st.one_of(st.sampled_from((1.0, 0.0, -1.0, 0.5, 2.0)),
                   st.floats(-4, 4, allow_nan=False, width=32))
betas = st.one_of(st.sampled_from((0.0, 1.0, -1.0, 0.25)),
                  st.floats(-4, 4, allow_nan=False, width=32))
C_SHAPES = ("full", "row", "row2d", "col", "scalar")


def c_shape(mode, m, n):
    return {"full": (m, n), "row": (n,), "row2d": (1, n), "col": (m, 1), "scalar": ()}[mode]


def operands(rng, m, n, k, ta, tb, dta, dtb, la="C", lb="C"):
    """(a, b, op(a), op(b)) with a, b stored transposed when ta/tb and in layouts la/lb."""
    a_op, b_op = rand(rng, (m, k), dta), rand(rng, (k, n), dtb)
    a = with_layout(a_op.T if ta else a_op, la)
    b = with_layout(b_op.T if tb else b_op, lb)
    return a, b, a_op, b_op


def snapshot(*arrays):
    return [None if x is None else np.array(x, copy=True) for x in arrays]


def assert_unchanged(before, *arrays):
    for old, new in zip(before, arrays):
        if old is not None:
            np.testing.assert_array_equal(np.asarray(new), old, err_msg="an input was modified")


@st.composite
def gemm_cases(draw, dim=dims, layouts=LAYOUTS):
    m, n, k = draw(dim), draw(dim), draw(dim)
    dta = draw(st.sampled_from(FLOATS))
    dtb = draw(st.one_of(st.just(dta), st.sampled_from(FLOATS)))
    alpha, beta = draw(alphas), draw(betas)
    c_mode = draw(st.sampled_from(C_SHAPES + ("none", "nan")))
    if beta != 0 and c_mode in ("none", "nan"):
        c_mode = "full"
    dtc = draw(st.one_of(st.just(dta), st.sampled_from(FLOATS)))
    out_mode = draw(st.sampled_from((None, "out", "c")))
    return dict(m=m, n=n, k=k, dta=dta, dtb=dtb, dtc=dtc, alpha=alpha, beta=beta,
                c_mode=c_mode, out_mode=out_mode,
                ta=draw(st.booleans()), tb=draw(st.booleans()),
                la=draw(st.sampled_from(layouts)), lb=draw(st.sampled_from(layouts)),
                lc=draw(st.sampled_from(layouts)), lo=draw(st.sampled_from(OUT_LAYOUTS)),
                seed=draw(st.integers(0, 2 ** 32 - 1)))


def run_case(case):
    """Build the case's operands, call gemm, check the result, the out buffer and the inputs."""
    rng = np.random.default_rng(case["seed"])
    m, n, k = case["m"], case["n"], case["k"]
    alpha, beta = case["alpha"], case["beta"]
    a, b, a_op, b_op = operands(rng, m, n, k, case["ta"], case["tb"], case["dta"], case["dtb"],
                                case["la"], case["lb"])
    c = None
    out_mode = case["out_mode"]
    if case["c_mode"] == "nan":
        c = np.full((m, n), np.nan, case["dtc"])
    elif case["c_mode"] != "none":
        c = rand(rng, c_shape(case["c_mode"], m, n), case["dtc"])
    big = None
    if out_mode == "c":
        # In place: c is the (m, n) result array itself (NaN-filled when beta == 0).
        c, big = make_out((m, n), result_dtype(a, b), case["lo"])
        c[...] = np.nan if case["c_mode"] in ("none", "nan") else rand(rng, (m, n), c.dtype)
        out = c
    else:
        out = None
        if out_mode == "out":
            out, big = make_out((m, n), result_dtype(a, b, c), case["lo"])
        if c is not None and c.ndim == 2:
            c = with_layout(c, case["lc"])
    c_before = None if c is None else np.array(c, copy=True)
    before = snapshot(a, b, None if out_mode == "c" else c)
    res = gemm(a, b, alpha=alpha, beta=beta, c=c, trans_a=case["ta"], trans_b=case["tb"],
               out=out)
    if out is not None:
        assert res is out, "gemm must return the out array"
    assert_gemm(res, a_op, b_op, alpha, beta, c_before, what=f"gemm {case}")
    assert_unchanged(before, a, b, None if out_mode == "c" else c)
    assert_outside_untouched(out, big)


@given(gemm_cases())
def test_gemm_matches_numpy(case):
    run_case(case)


# Paths that only small blocking, forced threading or the no-pack thresholds reach.
@st.composite
def configs(draw):
    cfg = {}
    if draw(st.booleans()):
        cfg.update(mc=draw(st.integers(1, 40)), kc=draw(st.integers(1, 40)),
                   nc=draw(st.integers(1, 60)))
    cfg["threads"] = draw(st.sampled_from((1, 2, 3, 4)))  # 3, 4: oversubscribed, odd splits
    cfg["split"] = draw(st.sampled_from(("auto", "ic", "jc")))
    cfg["isa"] = draw(st.sampled_from(ISAS))
    cfg["nopack_mnk"] = draw(st.sampled_from((0, 64 ** 3, 1 << 40)))
    cfg["thread_mnk"] = draw(st.sampled_from((0, 96 ** 3)))
    cfg["nopack_a_panels"] = draw(st.sampled_from((0, 4, 1000)))
    return cfg


@given(gemm_cases(dim=small_dims), configs())
def test_gemm_matches_numpy_any_config(case, cfg):
    with config_context(**cfg):
        run_case(case)


def test_tolerance_catches_one_wrong_term(rng):
    """The k*eps bound is tight enough that one missing product in one element fails."""
    for dt in FLOATS:
        a, b = rand(rng, (40, 300), dt), rand(rng, (300, 50), dt)
        good = gemm(a, b)
        assert_gemm(good, a, b)
        bad = good.copy()
        p = np.argmax(np.abs(a[17] * b[:, 23]))  # a typical largest term, ~5 for N(0,1)
        bad[17, 23] -= a[17, p] * b[p, 23]
        with pytest.raises(AssertionError, match=r"\(17, 23\)"):
            assert_gemm(bad, a, b)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("nopack", [0, 1 << 40], ids=["packed", "nopack"])
def test_edge_tiles_exhaustive(isa, dt, nopack, rng):
    """Every m, n up to a few micro-tiles: each partial-tile shape of 6x16/6x8/4x8/4x4."""
    with config_context(isa=isa, nopack_mnk=nopack, threads=1):
        for k in (1, 7):
            for m in range(1, 14):
                for n in range(1, 34):
                    a, b = rand(rng, (m, k), dt), rand(rng, (k, n), dt)
                    assert_gemm(gemm(a, b), a, b, what=f"{isa} {m}x{n}x{k}")


def _check_b_plan(dbl):
    # float32 rows: 784 and 129 elements spread over L1's sets; 1024 (4 KiB) and 512
    # (2 KiB) share one or two; 1025 (4100 bytes) drifts through a set every 16 rows.
    # 16 rows: more than two row panels and few enough to read B in place, for the 6-
    # and the 4-row tiles (AVX2 and the portable set).
    assert _b_read_in_place(16, 784, 300, 784, dbl)
    assert _b_read_in_place(16, 129, 300, 129, dbl)
    assert not _b_read_in_place(16, 1024, 300, 1024, dbl)
    assert not _b_read_in_place(16, 512, 300, 512, dbl)
    assert not _b_read_in_place(16, 1025, 300, 1025, False)     # 16 sets of 64
    assert _b_read_in_place(16, 1025, 300, 1025, True)          # 8200 bytes: 32 sets
    assert not _b_read_in_place(200, 784, 300, 784, dbl)    # too many rows of A


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("threads", [1, 2])
def test_b_in_place_for_a_few_row_panels(dt, threads, rng):
    """Up to a few row panels read B in place when B's rows fall in different L1 sets, and
    pack it when they would share sets: rows of 784 and 129 elements (spread), of 1024 and
    512 (4 KiB and 2 KiB apart for float32), a view with rows wider than n, each with
    row counts that end in partial panels, and n ending in a partial column panel."""
    dbl = np.dtype(dt) == np.float64
    for isa in ISAS:
        with config_context(isa=isa, nopack_mnk=0):
            _check_b_plan(dbl)
    with config_context(threads=threads, nopack_mnk=0):
        for n, width in ((784, 784), (129, 129), (1024, 1024), (512, 512), (100, 131)):
            for m in (13, 32, 36, 37, 48, 64, 66, 67):
                a = rand(rng, (m, 300), dt)
                b = rand(rng, (300, width), dt)[:, :n]
                assert_gemm(gemm(a, b, alpha=0.5), a, b, alpha=0.5, what=f"{m}x{n} w{width}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("nopack", [0, 1 << 40], ids=["packed", "nopack"])
def test_partial_row_panels_alpha_beta_strided_c(isa, dt, nopack, rng):
    """The last row panel of fewer than mr rows (the rows micro-kernel where the ISA has
    one) with alpha, beta and C written through strides, every row count, n a multiple of
    the tile width and not."""
    with config_context(isa=isa, nopack_mnk=nopack, threads=1):
        for m in range(1, 20):
            for n in (16, 32, 40):
                a, b = rand(rng, (m, 37), dt), rand(rng, (37, n), dt)
                big = rand(rng, (2 * m, 3 * n), dt)
                c = big[::2, ::3]
                before = np.array(big, copy=True)
                gemm(a, b, alpha=-0.5, beta=2.0, c=c, out=c)
                assert_gemm(c, a, b, alpha=-0.5, beta=2.0, c=before[::2, ::3],
                            what=f"{isa} {m}x{n}")
                rest = np.ones(big.shape, bool)
                rest[::2, ::3] = False
                np.testing.assert_array_equal(big[rest], before[rest])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("nopack", [0, 1 << 40], ids=["packed", "nopack"])
def test_a_row_has_the_same_bits_in_a_partial_panel(isa, dt, nopack, rng):
    """A row of C computed in a partial row panel gets the same bits as in a full one: its
    sums are made in the same order, whichever kernel runs (m = 12 is two full 6-row
    panels; m = 2..11 end in a partial one; m = 1 is a matrix-vector product)."""
    a, b = rand(rng, (12, 300), dt), rand(rng, (300, 48), dt)
    with config_context(isa=isa, nopack_mnk=nopack, threads=1):
        full = gemm(a, b)
        for m in range(2, 12):
            np.testing.assert_array_equal(gemm(a[:m], b), full[:m], err_msg=f"m={m}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dt", FLOATS)
def test_row_major_a_panels_every_depth_tail(isa, dt, rng):
    """Packed row-major A (the vector transposes of _pack_rows.h, 4 or 2 columns at a time):
    every depth tail, rows wider than k (a view of a wider array), kc cutting k, and A read
    transposed (column-major) beside it for the in-place cap."""
    with config_context(isa=isa, nopack_mnk=0, nopack_a_panels=0, threads=1):
        for k in list(range(1, 10)) + [31, 67]:
            for kc in (3, 8, 1024):
                with config_context(kc=kc):
                    m, n = 13, 21
                    wide = rand(rng, (m, k + 5), dt)
                    a = wide[:, 2:2 + k]                      # rows k + 5 apart
                    b = rand(rng, (k, n), dt)
                    assert_gemm(gemm(a, b), a, b, what=f"{isa} k={k} kc={kc}")
                    at = rand(rng, (k, m), dt)
                    assert_gemm(gemm(at, b, trans_a=True), at.T, b,
                                what=f"{isa} trans_a k={k} kc={kc}")
    with config_context(isa=isa, nopack_mnk=0, nopack_a_panels=1 << 10, threads=1):
        at = rand(rng, (70, 40), dt)
        b = rand(rng, (70, 300), dt)
        assert_gemm(gemm(at, b, trans_a=True), at.T, b, what=f"{isa} column-major A, wide B")


@pytest.mark.parametrize("dt", FLOATS)
def test_beyond_default_blocking(dt, rng):
    """m > mc, k > kc and n > nc of the configuration in force (several blocks per loop)."""
    cfg = microtile.get_config()[np.dtype(dt).name]
    mr, nr = cfg["mr"], cfg["nr"]
    for m, n, k in [(cfg["mc"] + mr + 1, 37, 29), (13, 29, 2 * cfg["kc"] + 3),
                    (7, cfg["nc"] + nr + 1, 11), (cfg["mc"] + 1, 2 * nr + 1, cfg["kc"] + 1)]:
        for ta in (False, True):
            a, b, a_op, b_op = operands(rng, m, n, k, ta, not ta, dt, dt)
            c = rand(rng, (m, n), dt)
            assert_gemm(gemm(a, b, trans_a=ta, trans_b=not ta, alpha=0.75, beta=-0.5, c=c),
                        a_op, b_op, 0.75, -0.5, c, what=f"{m}x{n}x{k} ta={ta}")


BLOCKINGS = [dict(mc=1, kc=1, nc=1), dict(mc=5, kc=3, nc=7), dict(mc=6, kc=16, nc=16),
             dict(mc=7, kc=17, nc=9), dict(mc=13, kc=64, nc=33), dict(mc=96, kc=5, nc=4096)]


@pytest.mark.parametrize("blocking", BLOCKINGS, ids=lambda d: "mc{mc}-kc{kc}-nc{nc}".format(**d))
@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("threads", [1, 2])
def test_small_blocking(blocking, dt, threads, rng):
    """Blocks smaller than the problem in every loop, block sizes that are not multiples of
    the micro-tile, with the beta == 1 accumulation over several kc blocks."""
    with config_context(threads=threads, thread_mnk=0, **blocking):
        for m, n, k in [(71, 53, 67), (1, 97, 40), (97, 1, 40), (45, 45, 1), (30, 130, 90)]:
            a, b = rand(rng, (m, k), dt), rand(rng, (k, n), dt)
            c = rand(rng, (m, n), dt)
            assert_gemm(gemm(a, b, beta=0.5, c=c), a, b, 1.0, 0.5, c, what=f"{m}x{n}x{k}")
            assert_gemm(gemm(a, b), a, b, what=f"{m}x{n}x{k} beta=0")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("split", ["auto", "ic", "jc"])
@pytest.mark.parametrize("dt", FLOATS)
def test_threads_and_split(threads, split, dt, rng):
    """Every partition of C between threads: rows, columns, skinny shapes with fewer tiles
    than threads, and threading forced on tiny problems."""
    shapes = [(1000, 3, 50), (3, 1000, 50), (5, 7, 3), (1, 1, 1), (64, 64, 64), (257, 129, 65),
              (6, 400, 31), (300, 8, 17)]
    for thread_mnk in (0, None):
        kw = {} if thread_mnk is None else {"thread_mnk": thread_mnk}
        with config_context(threads=threads, split=split, **kw):
            assert microtile.get_num_threads() == threads
            for m, n, k in shapes:
                for ta, tb in ((False, False), (True, True)):
                    a, b, a_op, b_op = operands(rng, m, n, k, ta, tb, dt, dt)
                    res = gemm(a, b, trans_a=ta, trans_b=tb)
                    assert_gemm(res, a_op, b_op, what=f"{m}x{n}x{k} {threads} {split}")


@pytest.mark.parametrize("dt", FLOATS)
def test_generic_isa_via_config_context(dt, rng):
    with config_context(isa="generic"):
        assert microtile.get_config()["isa"] == "generic"
        assert microtile.get_config()[np.dtype(dt).name]["mr"] >= 1
        for m, n, k in [(1, 1, 1), (7, 9, 5), (65, 63, 257), (200, 300, 150), (4, 4, 4)]:
            for ta, tb in ((False, True), (True, False)):
                a, b, a_op, b_op = operands(rng, m, n, k, ta, tb, dt, dt, "neg_both", "F")
                c = rand(rng, (m, n), dt)
                assert_gemm(gemm(a, b, trans_a=ta, trans_b=tb, alpha=-1.5, beta=2.0, c=c),
                            a_op, b_op, -1.5, 2.0, c, what=f"generic {m}x{n}x{k}")


def test_generic_isa_via_environment():
    """MICROTILE_ISA=generic at import: the portable kernels, and correct results from them."""
    code = r"""
import json, numpy as np, microtile
rng = np.random.default_rng(5)
worst = 0.0
for dt in (np.float32, np.float64):
    eps = np.finfo(dt).eps
    for m, n, k in [(1, 1, 1), (7, 9, 5), (65, 63, 257), (130, 301, 99)]:
        a = rng.standard_normal((m, k)).astype(dt)
        b = rng.standard_normal((n, k)).astype(dt)
        c = microtile.gemm(a, b, trans_b=True)
        a64, b64 = a.astype(float), b.astype(float)
        err = np.abs(c - a64 @ b64.T) / (2 * (k + 2) * eps * (np.abs(a64) @ np.abs(b64).T))
        worst = max(worst, float(err.max()), float(c.dtype != dt))
print(json.dumps({"isa": microtile.get_config()["isa"], "worst": worst,
                  "isas": list(microtile.available_isas())}))
"""
    res = run_python(code, env={"MICROTILE_ISA": "generic"})
    assert res["isa"] == "generic"
    assert res["worst"] <= 1.0, f"generic kernels off by {res['worst']} x the k*eps bound"


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("in_place", [False, True])
def test_beta_zero_does_not_read_c(dt, in_place, rng):
    """BLAS semantics: with beta == 0 the NaN/Inf in c (or a NaN-filled out) never leak."""
    for m, n, k in [(7, 9, 5), (64, 64, 64), (131, 67, 300)]:
        a, b = rand(rng, (m, k), dt), rand(rng, (k, n), dt)
        c = np.full((m, n), np.nan, dt)
        c[::2] = np.inf
        res = gemm(a, b, beta=0.0, c=c, out=c if in_place else None)
        assert not np.isnan(res).any()
        assert_gemm(res, a, b, what="beta=0, NaN c")
        out = np.full((m, n), np.nan, dt)
        assert_gemm(gemm(a, b, out=out), a, b, what="NaN-filled out")


@pytest.mark.parametrize("dt", FLOATS)
def test_alpha_zero_does_not_read_a_b(dt, rng):
    """BLAS semantics: alpha == 0 gives beta * c even when a or b hold NaN/Inf."""
    for m, n, k in [(7, 9, 5), (100, 90, 80), (0, 3, 4), (3, 4, 0)]:
        a = np.full((m, k), np.nan, dt)
        b = np.full((k, n), np.inf, dt)
        c = rand(rng, (m, n), dt)
        res = gemm(a, b, alpha=0.0)
        np.testing.assert_array_equal(res, np.zeros((m, n), dt))
        res = gemm(a, b, alpha=0.0, beta=-2.0, c=c)
        assert_gemm(res, a, b, 0.0, -2.0, c, what="alpha=0")
        assert not np.isnan(res).any()


def naive_product(a, b):
    """Sum of products without BLAS (einsum's own loops): IEEE behaviour for NaN and Inf,
    e.g. 0 * Inf = NaN, Inf + -Inf = NaN."""
    return np.einsum("ik,kj->ij", a.astype(np.float64), b.astype(np.float64), optimize=False)


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("isa", ISAS)
def test_nan_inf_propagate(dt, isa, rng):
    m, n, k = 23, 37, 41
    a, b = rand(rng, (m, k), dt), rand(rng, (k, n), dt)
    a[3, 5] = np.nan            # row 3 of C all NaN
    b[7, 11] = np.inf           # column 11: +-Inf unless a row has 0 or NaN there
    a[9, 7] = 0.0               # 0 * Inf -> NaN at (9, 11)
    a[12, 20] = np.inf
    b[20, 30] = -np.inf
    b[20, 31] = 0.0             # Inf * 0 -> NaN at (12, 31)
    a[15, 20] = -np.inf         # (15, 30) = -Inf * -Inf = +Inf
    b[25, 2] = np.inf
    a[18, 25] = 1.0
    a[18, 7] = -1.0             # (18, 11): -Inf from b[7,11], (18, 2): +Inf: stays finite mix
    with config_context(isa=isa):
        res = gemm(a, b)
        res_t = gemm(np.asfortranarray(a.T), b, trans_a=True)
    expected = naive_product(a, b)
    assert np.isnan(expected[3]).all() and np.isnan(expected[9, 11]) and np.isnan(expected[12, 31])
    assert expected[15, 30] == np.inf
    for r in (res, res_t):
        np.testing.assert_array_equal(np.isnan(r), np.isnan(expected))
        np.testing.assert_array_equal(np.isposinf(r), np.isposinf(expected))
        np.testing.assert_array_equal(np.isneginf(r), np.isneginf(expected))
        fin = np.isfinite(expected)
        ref, bound = gemm_reference(np.where(np.isfinite(a), a, 0), np.where(np.isfinite(b), b, 0))
        assert_close(np.where(fin, r, 0), np.where(fin, ref, 0), bound, k, dt)


@pytest.mark.parametrize("dt", FLOATS)
def test_inf_plus_minus_inf_is_nan(dt):
    a = np.array([[np.inf, np.inf]], dt)
    b = np.array([[1.0], [-1.0]], dt)
    assert np.isnan(gemm(a, b)[0, 0])
    c = np.array([[-np.inf]], dt)
    a2 = np.array([[np.inf]], dt)
    assert np.isnan(gemm(a2, np.ones((1, 1), dt), beta=1.0, c=c)[0, 0])


@pytest.mark.parametrize("dt", FLOATS)
def test_overflow_gives_inf(dt):
    big = np.finfo(dt).max
    a = np.full((3, 4), big / 2, dt)
    b = np.full((4, 5), 4.0, dt)
    assert np.isposinf(gemm(a, b)).all()


@pytest.mark.parametrize("layout", OUT_LAYOUTS)
@pytest.mark.parametrize("dt", FLOATS)
def test_out_is_c_in_place(layout, dt, rng):
    for m, n, k in [(1, 1, 1), (13, 17, 7), (120, 70, 300)]:
        a, b = rand(rng, (m, k), dt), rand(rng, (k, n), dt)
        c, big = make_out((m, n), dt, layout)
        c[...] = rand(rng, (m, n), dt)
        c0 = c.copy()
        res = gemm(a, b, alpha=2.0, beta=-0.5, c=c, out=c)
        assert res is c
        assert_gemm(c, a, b, 2.0, -0.5, c0, what=f"in place {layout}")
        assert_outside_untouched(c, big)


@pytest.mark.parametrize("dt", FLOATS)
def test_in_place_accumulation_repeats(dt, rng):
    """c += a @ b ten times in place equals c + 10 a @ b."""
    a, b = rand(rng, (37, 29), dt), rand(rng, (29, 41), dt)
    c = rand(rng, (37, 41), dt)
    c0 = c.copy()
    for _ in range(10):
        gemm(a, b, beta=1.0, c=c, out=c)
    ref, bound = gemm_reference(a, b, 10.0, 1.0, c0)
    assert_close(c, ref, 10 * bound, 29 + 10, dt)


@pytest.mark.parametrize("mode", ["row", "row2d", "col", "scalar"])
@pytest.mark.parametrize("dt", FLOATS)
def test_broadcast_c(mode, dt, rng):
    m, n, k = 19, 23, 11
    a, b = rand(rng, (m, k), dt), rand(rng, (k, n), dt)
    c = rand(rng, c_shape(mode, m, n), dt)
    c_before = c.copy()
    res = gemm(a, b, beta=1.5, c=c)
    assert res.shape == (m, n)
    assert_gemm(res, a, b, 1.0, 1.5, c)
    np.testing.assert_array_equal(c, c_before)


@pytest.mark.parametrize("dt", FLOATS)
def test_broadcast_inputs_zero_strides(dt, rng):
    """Read-only views with stride 0 (np.broadcast_to) as a and b."""
    row = rand(rng, (1, 33), dt)
    col = rand(rng, (40, 1), dt)
    a = np.broadcast_to(row, (25, 33))
    b = np.broadcast_to(col, (40, 31))[:33]
    assert a.strides[0] == 0 and b.strides[1] == 0
    assert_gemm(gemm(a, b), a, b)
    assert_gemm(gemm(b, a, trans_a=True, trans_b=True), b.T, a.T)


@pytest.mark.parametrize("dt", FLOATS)
def test_views_of_a_larger_array(dt, rng):
    """Operands and out carved from one buffer (disjoint), as a user slicing a workspace does."""
    buf = rand(rng, (300, 300), dt)
    a, b = buf[:100, :80], buf[100:180, 100:190]
    out = buf[200:300, 200:290]
    a0, b0 = a.copy(), b.copy()
    gemm(a, b, out=out)
    assert_gemm(out, a0, b0)


def test_mixed_precision_computes_in_float64(rng):
    """float32 with float64 gives float64 at float64 accuracy (float32 arithmetic would be
    ~1e9 times off the float64 bound)."""
    a32 = rand(rng, (60, 200), np.float32)
    b64 = rand(rng, (200, 70), np.float64)
    res = gemm(a32, b64)
    assert res.dtype == np.float64
    assert_gemm(res, a32, b64)
    res = gemm(b64.T, a32.T)
    assert res.dtype == np.float64
    assert_gemm(res, b64.T, a32.T)
    c64 = rand(rng, (60, 70), np.float64)
    res = gemm(a32, rand(rng, (200, 70), np.float32), beta=1.0, c=c64)
    assert res.dtype == np.float64


@pytest.mark.parametrize("dt", FLOATS)
def test_zero_sizes(dt, rng):
    for m, n, k in [(0, 0, 0), (0, 5, 3), (5, 0, 3), (5, 3, 0), (0, 0, 7), (1, 1, 0)]:
        a, b = rand(rng, (m, k), dt), rand(rng, (k, n), dt)
        res = gemm(a, b)
        assert res.shape == (m, n) and res.dtype == dt
        np.testing.assert_array_equal(res, np.zeros((m, n)))
        c = rand(rng, (m, n), dt)
        res = gemm(a, b, beta=3.0, c=c)
        assert_gemm(res, a, b, 1.0, 3.0, c)
        res = gemm(a.T, b.T, trans_a=True, trans_b=True, out=np.full((m, n), np.nan, dt))
        np.testing.assert_array_equal(res, np.zeros((m, n)))


def test_array_likes_and_scalar_types(rng):
    """Nested lists are arrays (float64), alpha/beta may be ints or NumPy scalars."""
    a = [[1.0, 2.0], [3.0, 4.0]]
    b = [[5.0], [6.0]]
    res = gemm(a, b)
    assert res.dtype == np.float64
    np.testing.assert_array_equal(res, [[17.0], [39.0]])
    res = gemm(np.float32(a), np.float32(b), alpha=np.float64(2), beta=1, c=np.float32([[1], [1]]))
    assert res.dtype == np.float32
    np.testing.assert_array_equal(res, [[35.0], [79.0]])


@pytest.mark.parametrize("dt", FLOATS)
def test_exact_small_integers(dt, rng):
    """Small integers multiply and add exactly in any order: the result must be exact."""
    a = rng.integers(-8, 9, (67, 129)).astype(dt)
    b = rng.integers(-8, 9, (129, 65)).astype(dt)
    exact = a.astype(np.int64) @ b.astype(np.int64)
    for isa in ISAS:
        with config_context(isa=isa):
            np.testing.assert_array_equal(gemm(a, b), exact.astype(dt))
            np.testing.assert_array_equal(gemm(b.T, a.T), exact.T.astype(dt))


@pytest.mark.parametrize("dt", FLOATS)
def test_large_two_threads(dt, rng):
    """One problem big enough that both threads and every blocking loop work for real."""
    m, n, k = 611, 523, 709
    a, b = rand(rng, (k, m), dt), rand(rng, (k, n), dt)
    c = rand(rng, (m, n), dt)
    with config_context(threads=2):
        res = gemm(a, b, trans_a=True, alpha=0.5, beta=1.0, c=c)
    assert_gemm(res, a.T, b, 0.5, 1.0, c)


def test_result_is_independent_of_layout(rng):
    """Bit-for-bit? Not required; but every layout must meet the bound and give the same
    shape and dtype, including Fortran-ordered and negative-stride out arrays."""
    m, n, k = 45, 38, 70
    for dt in FLOATS:
        a_op, b_op = rand(rng, (m, k), dt), rand(rng, (k, n), dt)
        for la in LAYOUTS:
            for lb in ("C", "F", "neg_strided"):
                res = gemm(with_layout(a_op, la), with_layout(b_op, lb))
                assert_gemm(res, a_op, b_op, what=f"{la}/{lb}")


@pytest.mark.parametrize("dt", FLOATS)
def test_aliased_inputs(dt, rng):
    """The same array as a and b, and as c: reading the same memory twice is fine."""
    a = rand(rng, (70, 70), dt)
    assert_gemm(gemm(a, a), a, a)
    assert_gemm(gemm(a, a, trans_b=True), a, a.T)
    assert_gemm(gemm(a, a, trans_a=True, beta=-1.0, c=a), a.T, a, 1.0, -1.0, a)
    v = a[:, ::2]
    assert_gemm(gemm(v, v, trans_a=True), v.T, v)


@pytest.mark.parametrize("out_layout", ["F", "strided", "neg_both"])
@pytest.mark.parametrize("split", ["auto", "ic", "jc"])
@pytest.mark.parametrize("dt", FLOATS)
def test_threaded_any_out_layout(out_layout, split, dt, rng):
    """Threads writing into a column-major, strided or reversed out (the driver transposes
    the problem for column-major C)."""
    with config_context(threads=2, split=split, thread_mnk=0):
        for m, n, k in [(301, 157, 263), (7, 900, 40), (900, 7, 40), (97, 101, 1)]:
            a, b = rand(rng, (m, k), dt), rand(rng, (k, n), dt)
            c = rand(rng, (m, n), dt)
            out, big = make_out((m, n), dt, out_layout)
            res = gemm(a, b, alpha=-1.0, beta=0.5, c=c, out=out)
            assert res is out
            assert_gemm(out, a, b, -1.0, 0.5, c, what=f"{m}x{n}x{k} {out_layout} {split}")
            assert_outside_untouched(out, big)


_KERNEL_FINGERPRINT = r"""
import hashlib, json, numpy as np, microtile
rng = np.random.default_rng(11)
a = rng.standard_normal((64, 300)).astype(np.float32)
b = rng.standard_normal((300, 70)).astype(np.float32)
with microtile.config_context(ISA mc=48, kc=64, nc=256, threads=1, nopack_mnk=0):
    c = microtile.gemm(a, b)
print(json.dumps({"isa": microtile.get_config()["isa"],
                  "digest": hashlib.sha256(c.tobytes()).hexdigest()}))
"""


def test_isa_override_really_switches_kernels():
    """Same blocking, one thread: config_context(isa="generic") must give bit-for-bit what
    a process started with MICROTILE_ISA=generic gives, and (FMA rounds differently from a
    separate multiply and add) not what the AVX2 kernels give."""
    env_generic = run_python(_KERNEL_FINGERPRINT.replace("ISA ", ""),
                             env={"MICROTILE_ISA": "generic"})
    ctx_generic = run_python(_KERNEL_FINGERPRINT.replace("ISA ", "isa='generic', "))
    assert env_generic["isa"] == "generic"
    assert ctx_generic["digest"] == env_generic["digest"]
    if "avx2-fma" in ISAS:
        ctx_avx2 = run_python(_KERNEL_FINGERPRINT.replace("ISA ", "isa='avx2-fma', "))
        assert ctx_avx2["digest"] != env_generic["digest"]


@pytest.mark.parametrize("dt", FLOATS)
def test_nan_inf_scalars(dt, rng):
    """alpha or beta NaN/Inf are not zero: they take part in IEEE arithmetic."""
    a, b, c = rand(rng, (7, 5), dt), rand(rng, (5, 9), dt), rand(rng, (7, 9), dt)
    assert np.isnan(gemm(a, b, alpha=np.nan)).all()
    assert np.isnan(gemm(a, b, beta=np.nan, c=c)).all()
    res = gemm(np.abs(a), np.abs(b), alpha=np.inf)
    assert np.isposinf(res).all()
    assert np.isnan(gemm(a, b, alpha=0.0, beta=np.nan, c=c)).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c", [2.0, 3, -0.5])
def test_python_number_c_is_a_weak_scalar(dtype, c):
    # NumPy keeps float32 for a32 @ b32 + 2.0; so does gemm with a Python number as c.
    rng = np.random.default_rng(5)
    a = rng.standard_normal((5, 7)).astype(dtype)
    b = rng.standard_normal((7, 3)).astype(dtype)
    r = microtile.gemm(a, b, beta=1.5, c=c)
    assert r.dtype == dtype
    ref = a.astype(np.float64) @ b + 1.5 * c
    tol = 2 * 9 * np.finfo(dtype).eps * (np.abs(a) @ np.abs(b) + 1.5 * abs(c))
    assert np.all(np.abs(r - ref) <= tol)
    y = microtile.gemv(a, b[:, 0], beta=1.5, y=c)
    assert y.dtype == dtype


# --- fused epilogue: relu keeps NaN ----------------------------------------------------------

@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("shape", [(1, 7, 5), (9, 1, 4), (23, 37, 19), (64, 130, 70)])
def test_linear_relu_keeps_nan_as_torch(shape, dt, rng):
    """relu(NaN) is NaN in torch; the fused epilogue must not turn it into 0 (the vector
    path, the strided path after a transposed problem, and the matrix-vector path)."""
    torch = pytest.importorskip("torch")
    from microtile.linalg._api import linear_forward
    m, n, k = shape
    x = rand(rng, (m, k), dt)
    w = rand(rng, (n, k), dt)
    b = rand(rng, n, dt)
    x[0, 0] = np.nan                  # row 0 all NaN
    w[-1, -1] = np.nan                # last column all NaN
    b[0] = -np.inf                    # column 0: -inf (relu 0) except row 0 (NaN)
    if m > 2 and n > 2:
        x[1, :] = np.inf              # row 1: +inf, -inf or NaN by sign
    ref = torch.relu(torch.nn.functional.linear(torch.tensor(x, dtype=torch.float64),
                                                torch.tensor(w, dtype=torch.float64),
                                                torch.tensor(b, dtype=torch.float64))).numpy()
    # Error bound of the finite entries: k products and the bias, from the finite terms.
    bound = (np.abs(np.nan_to_num(x.astype(np.float64), nan=0.0, posinf=0.0))
             @ np.abs(np.nan_to_num(w.T.astype(np.float64), nan=0.0)) + np.abs(b))
    fin = np.isfinite(ref)
    for out_layout in ("C", "F"):
        out = with_layout(np.full((m, n), 7.0, dt), out_layout)
        got = linear_forward(x, w, b, activation="relu", out=out)
        assert got is out
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        assert np.isnan(got[0]).all() and np.isnan(got[:, -1]).all()
        np.testing.assert_array_equal(got[~fin & ~np.isnan(ref)], ref[~fin & ~np.isnan(ref)])
        assert_close(got[fin], ref[fin], bound[fin], k + 1, dt, f"relu {out_layout}")


# --- small-batch Linear: the problem is turned so W is read in place ---------------------------

@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("m", [2, 7, 32, 63, 64, 65])
@pytest.mark.parametrize("threads", [1, 2])
def test_small_batch_linear_turned_matches_float64(m, threads, dt, rng):
    """x @ W.T with m up to nopack_a_panels micro-panels is computed as (W @ x.T).T with C
    written column by column: every activation, the bias per output column, C- and
    F-ordered out, edge tiles in both directions (n = 257, k = 131)."""
    from microtile.linalg._api import linear_forward
    n, k = 257, 131
    x, w, b = rand(rng, (m, k), dt), rand(rng, (n, k), dt), rand(rng, n, dt)
    z = x.astype(np.float64) @ w.T.astype(np.float64) + b
    bound = np.abs(x.astype(np.float64)) @ np.abs(w.T.astype(np.float64)) + np.abs(b)
    refs = {"none": z, "relu": np.maximum(z, 0), "tanh": np.tanh(z),
            "sigmoid": 1 / (1 + np.exp(-z))}
    with config_context(threads=threads, thread_mnk=0):
        for act, ref in refs.items():
            for layout in ("C", "F"):
                out = with_layout(np.full((m, n), 7.0, dt), layout)
                got = linear_forward(x, w, b, activation=act, out=out)
                assert got is out
                assert_close(got, ref, bound, k + 1, dt, f"{act} {layout}")
