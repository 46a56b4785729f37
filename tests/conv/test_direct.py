"""The direct convolution (depthwise and small-group layers) against torch in float64, the
choice of algorithm (built-in rule and ``config_context(conv_algorithm=...)``), and the nn
layer on it.

Tolerances: every result is a sum of k products (forward k = C/groups*R*S plus the bias, dx
k = K/groups*R*S, dw and db k = N*P*Q), so it is within ~k*eps of the exact value relative
to the same sum over |terms|; ``_helpers.assert_close`` checks 2*(k+2)*eps times that bound
elementwise, computed by torch in float64 on |x|, |w|, |dy|.
"""
import itertools

import numpy as np
import pytest

from microtile.conv.convolution import DIRECT_MAX_CG, DIRECT_MAX_CG_FORWARD

import microtile as mt
from microtile import nn
from microtile.conv import _conv

from _helpers import assert_close, run_in_threads, run_python, step_allocation

torch = pytest.importorskip("torch")
F = torch.nn.functional

ISAS = mt.available_isas()
F32, F64 = np.float32, np.float64


# ------------------------------------------------------------------------------ reference

def _torch_grads(x, w, b, dy, kw):
    """(y, dx, dw, db) of torch's float64 conv2d (db None without a bias)."""
    xt = torch.tensor(np.array(x, F64), requires_grad=True)
    wt = torch.tensor(np.array(w, F64), requires_grad=True)
    bt = None if b is None else torch.tensor(np.array(b, F64), requires_grad=True)
    yt = F.conv2d(xt, wt, bt, **kw)
    if dy is None:
        return yt.detach().numpy(), None, None, None
    yt.backward(torch.tensor(np.array(dy, F64)))
    return (yt.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(),
            None if bt is None else bt.grad.numpy())


def reference(x, w, b, dy, kw):
    """Torch's float64 results and their bounds (the same sums over |terms|)."""
    ref = _torch_grads(x, w, b, dy, kw)
    bound = _torch_grads(np.abs(np.asarray(x, F64)), np.abs(np.asarray(w, F64)),
                         None if b is None else np.abs(np.asarray(b, F64)),
                         None if dy is None else np.abs(np.asarray(dy, F64)), kw)
    return ref, bound


def check_against_torch(x, w, b, dtype, *, need_x=True, **kw):
    """conv2d and conv2d_backward of microtile against torch; returns microtile's results."""
    groups = kw.get("groups", 1)
    y = mt.conv2d(x, w, b, **kw)
    assert y.dtype == dtype
    dy = np.random.default_rng(7).standard_normal(y.shape).astype(dtype)
    dx, dw, db = mt.conv2d_backward(dy, x, w, need_input_grad=need_x,
                                    need_bias_grad=b is not None, **kw)
    (ry, rdx, rdw, rdb), (by, bdx, bdw, bdb) = reference(x, w, b, dy, kw)
    K, Cg, R, S = w.shape
    n_terms = y.shape[0] * y.shape[2] * y.shape[3]
    assert_close(y, ry, by, Cg * R * S + 1, dtype, "y")
    if need_x:
        assert dx.dtype == dtype and dx.shape == x.shape
        assert_close(dx, rdx, bdx, K // groups * R * S, dtype, "dx")
    else:
        assert dx is None
    assert dw.dtype == dtype and dw.shape == w.shape
    assert_close(dw, rdw, bdw, n_terms, dtype, "dw")
    if b is not None:
        assert db.dtype == dtype
        assert_close(db, rdb, bdb, n_terms, dtype, "db")
    return y, dx, dw, db


def make(rng, N, C, H, W, K, Cg, R, S, dtype, bias=True):
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((K, Cg, R, S)).astype(dtype)
    b = rng.standard_normal(K).astype(dtype) if bias else None
    return x, w, b


def last_algorithm():
    return _conv.last_plan()["algorithm"]


# ------------------------------------------------------------ depthwise over the grid

SIZES = (1, 2, 7, 13, 57)
CHANNELS = (1, 3, 32, 33)
PADDINGS = (0, 1, 2, "same")


def _depthwise_cases():
    """Every (H, W) pair of SIZES, the other axes cycled so that each value of each axis
    meets many others: channels, batch 1/3, 3x3/5x5, stride 1/2, every padding."""
    cases = []
    for i, (H, W) in enumerate(itertools.product(SIZES, SIZES)):
        C = CHANNELS[i % 4]
        N = (1, 3)[i // 4 % 2]
        R = (3, 5)[i % 2]
        stride = (1, 2)[i // 2 % 2]
        padding = PADDINGS[(i + i // 5) % 4]
        if padding == "same" and stride != 1:
            padding = 1
        # A kernel larger than the padded input is an error, not a case: pad it to fit
        # ("same" always fits).
        if padding != "same":
            padding = max(padding, -(-(R - min(H, W)) // 2))
        cases.append(dict(N=N, C=C, H=H, W=W, R=R, stride=stride, padding=padding))
    return cases


CASES = _depthwise_cases()


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{N}C{C}H{H}W{W}R{R}s{stride}p{padding}"
                         .format(**c))
def test_depthwise_against_torch(case, dtype, rng):
    """The rule runs depthwise layers on the direct kernel; every ISA and 1 or 2 threads
    give torch's values for the forward, dx, dw and db.  (One channel is an ordinary
    layer, direct by the rule too as a layer of few input channels: it runs forced onto
    im2col as well.)"""
    N, C, H, W, R = (case[k] for k in "NCHWR")
    x, w, b = make(rng, N, C, H, W, C, 1, R, R, dtype)
    kw = dict(stride=case["stride"], padding=case["padding"], groups=C)
    algorithms = ("auto",) if C > 1 else ("auto", "im2col")
    for isa, threads, algorithm in itertools.product(ISAS, (1, 2), algorithms):
        with mt.config_context(isa=isa, threads=threads, conv_algorithm=algorithm):
            check_against_torch(x, w, b, dtype, **kw)
            assert last_algorithm() == ("direct" if algorithm == "auto" else algorithm)


def test_depthwise_is_the_rule_and_im2col_agrees():
    rng = np.random.default_rng(1)
    x, w, b = make(rng, 2, 6, 9, 11, 6, 1, 3, 3, F64)
    y = mt.conv2d(x, w, b, padding=1, groups=6)
    assert last_algorithm() == "direct"
    with mt.config_context(conv_algorithm="im2col"):
        y2 = mt.conv2d(x, w, b, padding=1, groups=6)
        assert last_algorithm() == "im2col"
    np.testing.assert_allclose(y, y2, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("layout", ["strided", "reversed", "fortran", "transposed_hw",
                                    "broadcast_batch"])
def test_noncontiguous_inputs(layout, dtype):
    """x, w and dy as views with any strides (NaN around strided views: a read outside the
    view would show); the inputs are left as they were."""
    rng = np.random.default_rng(2)
    N, C, H, W = 3, 5, 13, 17
    base = rng.standard_normal((N, C, H, W)).astype(dtype)
    if layout == "strided":
        big = np.full((N, 2 * C, 2 * H, 3 * W), np.nan, dtype)
        x = big[:, ::2, ::2, ::3]
        x[...] = base
    elif layout == "reversed":
        x = base[::-1, ::-1, ::-1, ::-1].copy()[::-1, ::-1, ::-1, ::-1]
    elif layout == "fortran":
        x = np.asfortranarray(base)
    elif layout == "transposed_hw":
        x = np.ascontiguousarray(base.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    else:
        x = np.broadcast_to(base[:1], base.shape)
    w = rng.standard_normal((2 * C, 1, 3, 6)).astype(dtype)[::2, :, :, ::2]   # (C, 1, 3, 3)
    b = rng.standard_normal(3 * C).astype(dtype)[::3]
    copies = [a.copy() for a in (x, w, b)]
    for threads in (1, 2):
        with mt.config_context(threads=threads):
            check_against_torch(x, w, b, dtype, stride=(2, 1), padding=(1, 2), groups=C)
            assert last_algorithm() == "direct"
    for a, c in zip((x, w, b), copies):
        np.testing.assert_array_equal(a, c)


def test_noncontiguous_dy_and_readonly_inputs():
    rng = np.random.default_rng(3)
    x, w, b = make(rng, 2, 4, 10, 9, 4, 1, 3, 3, F64)
    dy = np.full((2, 4, 10, 18), np.nan)[:, :, :, ::2]
    dy[...] = rng.standard_normal((2, 4, 10, 9))
    for a in (x, w, b, dy):
        a.flags.writeable = False
    dx, dw, db = mt.conv2d_backward(dy, x, w, padding=1, groups=4)
    (_, rdx, rdw, rdb), (_, bdx, bdw, bdb) = reference(x, w, b, dy, dict(padding=1, groups=4))
    assert_close(dx, rdx, bdx, 9, F64, "dx")
    assert_close(dw, rdw, bdw, 180, F64, "dw")
    assert_close(db, rdb, bdb, 180, F64, "db")


# ---------------------------------------------------------------- geometry edge cases

@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("geom", [
    # (H, W, R, S, stride, padding, dilation): whole vectors only (Q = 16, 64), long rows of
    # several 8-vector blocks, asymmetric stride and kernel, dilation, stride 3, padding
    # past the kernel (dx's phases then start inside dy), a 1x1 kernel at stride 2 (phases
    # of dx with no tap), a kernel as large as the padded input.
    (16, 16, 3, 3, 1, 1, 1),
    (5, 64, 3, 3, 1, 1, 1),
    (9, 150, 5, 5, 1, 2, 1),
    (11, 40, 3, 5, (2, 1), (1, 2), 1),
    (15, 14, 3, 3, 1, 2, 2),
    (13, 17, 3, 3, 3, 1, (1, 3)),
    (10, 9, 3, 3, 2, 4, 1),
    (7, 8, 1, 1, 2, 0, 1),
    (4, 6, 5, 5, 1, (1, 0), 1),
])
def test_geometries(geom, dtype):
    H, W, R, S, stride, padding, dilation = geom
    rng = np.random.default_rng(4)
    x, w, b = make(rng, 2, 3, H, W, 3, 1, R, S, dtype)
    for isa in ISAS:
        with mt.config_context(isa=isa):
            check_against_torch(x, w, b, dtype, stride=stride, padding=padding,
                                dilation=dilation, groups=3)
            assert last_algorithm() == "direct"


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("mult", [2, 3, 5])
def test_channel_multiplier(mult, dtype):
    """K = mult * C with groups = C: several filters per input channel."""
    rng = np.random.default_rng(5)
    x, w, b = make(rng, 3, 4, 13, 11, 4 * mult, 1, 3, 3, dtype)
    for isa, stride in itertools.product(ISAS, (1, 2)):
        with mt.config_context(isa=isa, threads=2):
            check_against_torch(x, w, b, dtype, stride=stride, padding=1, groups=4)
            assert last_algorithm() == "direct"


def test_large_planes_are_cut_into_bands():
    # A 300x280 float64 plane is ~700 KiB padded: the direct kernel takes it in bands,
    # and a single image and channel still gives both threads work.
    rng = np.random.default_rng(6)
    x, w, b = make(rng, 1, 2, 300, 280, 2, 1, 5, 5, F64)
    with mt.config_context(threads=2):
        check_against_torch(x, w, b, F64, stride=(2, 1), padding=2, groups=2)
        plan = _conv.last_plan()
    assert plan["algorithm"] == "direct" and plan["bands"] > 1, plan
    x1, w1, b1 = make(rng, 1, 1, 40, 33, 3, 1, 3, 3, F64)
    with mt.config_context(threads=2, conv_algorithm="direct"):
        check_against_torch(x1, w1, b1, F64, padding=1)
        plan = _conv.last_plan()
    assert plan["units"] >= 2 and plan["threads"] == 2, plan


def test_unused_input_never_leaks():
    """Input columns and rows no window reaches (stride leaves them over) may hold NaN or
    Inf: they must not reach y, dx, dw or db (the kernels read whole vectors)."""
    rng = np.random.default_rng(8)
    x, w, b = make(rng, 2, 3, 12, 12, 3, 1, 3, 3, F64)
    x[:, :, -1, :] = np.inf     # stride 2, no padding: row and column 11 are never read
    x[:, :, :, -1] = np.nan
    kw = dict(stride=2, groups=3)
    clean = x.copy()
    clean[:, :, -1, :] = 0
    clean[:, :, :, -1] = 0
    y, dx, dw, db = (mt.conv2d(x, w, b, **kw),) + mt.conv2d_backward(
        np.ones((2, 3, 5, 5)), x, w, **kw)
    y0, dx0, dw0, db0 = (mt.conv2d(clean, w, b, **kw),) + mt.conv2d_backward(
        np.ones((2, 3, 5, 5)), clean, w, **kw)
    for got, want in ((y, y0), (dx, dx0), (dw, dw0), (db, db0)):
        np.testing.assert_array_equal(got, want)


def test_nan_propagates_where_read():
    x = np.ones((1, 2, 7, 7))
    x[0, 1, 3, 3] = np.nan
    w = np.ones((2, 1, 3, 3))
    y = mt.conv2d(x, w, padding=1, groups=2)
    assert not np.isnan(y[0, 0]).any()
    assert np.isnan(y[0, 1, 2:5, 2:5]).all() and np.isnan(y[0, 1]).sum() == 9
    dx, dw, db = mt.conv2d_backward(np.ones_like(y), x, w, padding=1, groups=2)
    assert np.isfinite(dx).all() and np.isnan(dw[1]).all() and np.isfinite(dw[0]).all()


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_nonfinite_weight_gives_torchs_dx(bad):
    """The direct dx would multiply a weight by dy's zero padding too (0 * Inf = NaN where
    torch has a number): weights holding Inf or NaN take im2col for dx, whose products are
    torch's.  Without dx the direct kernel still runs."""
    rng = np.random.default_rng(18)
    x, w, b = make(rng, 2, 3, 9, 8, 3, 1, 3, 3, F64)
    w[1, 0, 0, 2] = bad
    kw = dict(padding=1, stride=(1, 2), groups=3)
    y, dx, dw, db = check_against_torch(x, w, b, F64, **kw)
    assert last_algorithm() == "im2col"
    assert np.isfinite(dx[:, 1]).any() and not np.isfinite(dx[:, 1]).all()
    mt.conv2d_backward(np.ones_like(y), x, w, need_input_grad=False, **kw)
    assert last_algorithm() == "direct"
    with mt.config_context(conv_algorithm="direct"):
        check_against_torch(x, w, b, F64, need_x=False, **kw)
        assert last_algorithm() == "direct"


def test_huge_stride_costs_no_memory():
    # Only the column phases the taps read are stored: a stride of 2**31 - 1 keeps one
    # window per axis and needs a few rows of scratch.
    x = np.arange(2 * 5 * 6, dtype=F64).reshape(1, 2, 5, 6)
    w = np.ones((2, 1, 2, 2))
    y = mt.conv2d(x, w, stride=2 ** 31 - 1, groups=2)
    assert last_algorithm() == "direct"
    np.testing.assert_array_equal(y[0, :, 0, 0], x[0, :, :2, :2].sum(axis=(1, 2)))
    dx, dw, db = mt.conv2d_backward(np.ones((1, 2, 1, 1)), x, w, stride=2 ** 31 - 1,
                                    groups=2)
    want = np.zeros_like(x)
    want[:, :, :2, :2] = 1
    np.testing.assert_array_equal(dx, want)
    np.testing.assert_array_equal(dw[:, 0], x[0, :, :2, :2])


def test_unbatched_out_mixed_dtypes_and_need_flags():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 8, 9)).astype(F32)
    w = rng.standard_normal((4, 1, 3, 3))                    # float64: the result is
    y = mt.conv2d(x, w, padding=1, groups=4)                 # float64
    assert y.dtype == F64 and y.shape == (4, 8, 9) and last_algorithm() == "direct"
    out = np.empty((4, 8, 9), order="F")
    assert mt.conv2d(x, w, padding=1, groups=4, out=out) is out
    np.testing.assert_array_equal(out, y)
    (ry, rdx, rdw, _), (by, bdx, bdw, _) = reference(x[None], w, None, np.ones((1, 4, 8, 9)),
                                                     dict(padding=1, groups=4))
    assert_close(y, ry[0], by[0], 9, F64, "y")
    dx, dw, db = mt.conv2d_backward(np.ones((4, 8, 9)), x, w, padding=1, groups=4)
    assert dx.shape == x.shape and db.shape == (4,)
    assert_close(dx, rdx[0], bdx[0], 9, F64, "dx")
    dx, dw2, db = mt.conv2d_backward(np.ones((4, 8, 9)), x, w, padding=1, groups=4,
                                     need_input_grad=False, need_bias_grad=False)
    assert dx is None and db is None
    np.testing.assert_array_equal(dw2, dw)


def test_tolerance_catches_one_wrong_tap():
    """The bound is tight enough that a result missing one tap fails: check it on a
    reference with one kernel tap zeroed (the tests above can fail)."""
    rng = np.random.default_rng(10)
    x, w, b = make(rng, 1, 3, 11, 11, 3, 1, 3, 3, F32)
    kw = dict(padding=1, groups=3)
    y = mt.conv2d(x, w, b, **kw)
    w_bad = w.copy()
    w_bad[1, 0, 2, 0] = 0
    (ry, _, _, _), (by, _, _, _) = reference(x, w_bad, b, None, kw)
    with pytest.raises(AssertionError):
        assert_close(y, ry, by, 10, F32, "y")


def test_results_are_deterministic_and_thread_safe():
    """dw's per-thread partials are summed in thread order: the same call gives the same
    bits; and calls from several Python threads at once (each with its own scratch) agree."""
    rng = np.random.default_rng(11)
    x, w, _ = make(rng, 4, 16, 20, 21, 16, 1, 3, 3, F32, bias=False)
    dy = rng.standard_normal((4, 16, 20, 21)).astype(F32)
    with mt.config_context(threads=2):
        first = mt.conv2d_backward(dy, x, w, padding=1, groups=16)
        y = mt.conv2d(x, w, padding=1, groups=16)

    def work(_):
        for _ in range(4):
            with mt.config_context(threads=2):
                again = mt.conv2d_backward(dy, x, w, padding=1, groups=16)
                np.testing.assert_array_equal(mt.conv2d(x, w, padding=1, groups=16), y)
            for a, b in zip(again, first):
                np.testing.assert_array_equal(a, b)

    run_in_threads(work, n=6)


def test_generic_isa_from_the_environment():
    """MICROTILE_ISA=generic at import: the portable kernels give torch's values too."""
    code = r"""
import json
import numpy as np, torch
import microtile as mt
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 5, 13, 19))
w = rng.standard_normal((10, 1, 5, 5))
y = mt.conv2d(x, w, padding=2, stride=(1, 2), groups=5)
algo = mt.conv._conv.last_plan()["algorithm"]
dx, dw, db = mt.conv2d_backward(np.ones_like(y), x, w, padding=2, stride=(1, 2), groups=5)
xt = torch.tensor(x, requires_grad=True); wt = torch.tensor(w, requires_grad=True)
yt = torch.nn.functional.conv2d(xt, wt, padding=2, stride=(1, 2), groups=5)
yt.sum().backward()
err = max(float(np.abs(a - b).max()) for a, b in
          ((y, yt.detach().numpy()), (dx, xt.grad.numpy()), (dw, wt.grad.numpy())))
print(json.dumps({"isas": list(mt.available_isas()), "algo": algo, "err": err}))
"""
    res = run_python(code, env={"MICROTILE_ISA": "generic"})
    assert res["isas"] == ["generic"] and res["algo"] == "direct", res
    assert res["err"] < 1e-12, res


# ------------------------------------------------------------------- grouped layers

@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("cfg", [
    # (C, K, groups): 2 to 16 channels per group (direct by the rule in both passes), and
    # 32 (the forward's limit), with 1 to 32 filters per group.
    (8, 8, 4), (9, 6, 3), (12, 18, 3), (16, 12, 4), (6, 36, 3), (32, 16, 4), (32, 64, 2),
    (64, 8, 2),
])
@pytest.mark.parametrize("algorithm", ["auto", "im2col", "direct"])
def test_grouped_against_torch(cfg, algorithm, dtype):
    C, K, groups = cfg
    rng = np.random.default_rng(12)
    x, w, b = make(rng, 3, C, 11, 14, K, C // groups, 3, 3, dtype)
    for threads, stride in ((1, 1), (2, 2)):
        with mt.config_context(threads=threads, conv_algorithm=algorithm):
            mt.conv2d(x, w, b, stride=stride, padding=1, groups=groups)
            assert last_algorithm() == (algorithm if algorithm != "auto" else (
                "direct" if C // groups <= DIRECT_MAX_CG_FORWARD else "im2col"))
            check_against_torch(x, w, b, dtype, stride=stride, padding=1, groups=groups)
            assert last_algorithm() == (algorithm if algorithm != "auto" else (
                "direct" if C // groups <= DIRECT_MAX_CG else "im2col"))


@pytest.mark.parametrize("cfg", [
    # (N, C, K, groups, H, pass): three groups of one image share two threads once each
    # image is cut in two; 32 groups of a 7x7 plane with 32 filters each used to run one
    # after another on GEMMs too small to be threaded (the backward's rule for "many
    # filters, small planes" counted all K filters rather than a group's).
    (1, 24, 24, 3, 28, "forward"),
    (1, 40, 20, 5, 16, "forward"),
    (1, 256, 256, 32, 7, "backward"),
])
def test_grouped_im2col_runs_groups_side_by_side(cfg):
    N, C, K, groups, H, which = cfg
    rng = np.random.default_rng(17)
    x, w, b = make(rng, N, C, H, H, K, C // groups, 3, 3, F32)
    # im2col named: 8 channels per group would take the direct kernel by the rule.
    with mt.config_context(threads=2, conv_algorithm="im2col"):
        y = mt.conv2d(x, w, b, padding=1, groups=groups)
        fwd = _conv.last_plan()
        dx, dw, db = mt.conv2d_backward(np.ones_like(y), x, w, padding=1, groups=groups)
        bwd = _conv.last_plan()
    plan = fwd if which == "forward" else bwd
    assert plan["algorithm"] == "im2col" and plan["threads_over_chunks"], plan
    with mt.config_context(threads=1, conv_algorithm="im2col"):
        check_against_torch(x, w, b, F32, padding=1, groups=groups)
        y1 = mt.conv2d(x, w, b, padding=1, groups=groups)
        dx1, dw1, db1 = mt.conv2d_backward(np.ones_like(y), x, w, padding=1, groups=groups)
    # Each output is the same GEMM dot product however the positions are cut: the same
    # bits; the gradients are summed over chunks in another order.
    np.testing.assert_array_equal(y, y1)
    for got, want in ((dx, dx1), (dw, dw1), (db, db1)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_direct_forced_on_an_ordinary_layer():
    # The direct kernel applies to any layer (groups=1 too), only slower on wide ones.
    rng = np.random.default_rng(13)
    x, w, b = make(rng, 2, 7, 9, 10, 5, 7, 3, 2, F64)
    with mt.config_context(conv_algorithm="direct", threads=2):
        check_against_torch(x, w, b, F64, stride=(1, 2), padding=(2, 1), dilation=(2, 1))
        assert last_algorithm() == "direct"


# ------------------------------------------------------------------ choosing, errors

@pytest.mark.parametrize("shape, groups, rs, want", [
    # (K, Cg), groups, filter size, (forward, backward)
    ((8, 1), 8, 3, ("direct", "direct")),         # depthwise
    ((16, 1), 8, 3, ("direct", "direct")),        # depthwise, channel multiplier 2
    ((8, 4), 2, 3, ("direct", "direct")),         # 4 channels per group
    ((16, 8), 2, 3, ("direct", "direct")),        # 8 per group
    ((32, 16), 2, 3, ("direct", "direct")),       # 16 per group, the backward's limit
    ((34, 17), 2, 3, ("direct", "im2col")),       # 17 per group
    ((64, 32), 2, 3, ("direct", "im2col")),       # 32 per group, the forward's limit
    ((66, 33), 2, 3, ("im2col", "im2col")),       # 33 per group
    ((4, 4), 1, 3, ("direct", "im2col")),         # not grouped, few filters
    ((32, 64), 1, 3, ("direct", "im2col")),       # not grouped, the limits
    ((33, 4), 1, 3, ("im2col", "im2col")),        # 33 filters, 4 channels
    ((32, 65), 1, 3, ("im2col", "im2col")),       # 65 channels
    ((64, 3), 1, 7, ("direct", "direct")),        # an RGB stem, 7x7
    ((64, 3), 1, 9, ("im2col", "im2col")),        # 9x9: too tall for the direct band rule
    ((64, 3), 1, (1, 9), ("im2col", "im2col")),   # 1x9: too wide
    ((64, 3), 1, (3, 3, 4), ("im2col", "im2col")),  # 3x3 dilated 4 reaches 9
    ((128, 3), 1, 3, ("direct", "im2col")),       # RGB, 128 filters: backward unmeasured
    ((4, 1), 1, 3, ("direct", "direct")),         # one input channel
    ((4, 1), 1, 1, ("im2col", "im2col")),         # 1x1: im2col reads x in place
])
def test_builtin_rule(shape, groups, rs, want):
    K, Cg = shape
    R, S, dil = (rs, rs, 1) if isinstance(rs, int) else (rs + (1,))[:3]
    x = np.ones((1, Cg * groups, 12, 12))
    w = np.ones((K, Cg, R, S))
    y = mt.conv2d(x, w, groups=groups, dilation=dil)
    assert last_algorithm() == want[0]
    mt.conv2d_backward(np.ones_like(y), x, w, groups=groups, dilation=dil)
    assert last_algorithm() == want[1]


def test_forced_algorithm_is_scoped_and_reported():
    x, w = np.ones((1, 4, 6, 6)), np.ones((4, 1, 3, 3))
    assert mt.get_config()["conv_algorithm"] == "auto"
    with mt.config_context(conv_algorithm="im2col"):
        assert mt.get_config()["conv_algorithm"] == "im2col"
        mt.conv2d(x, w, groups=4)
        assert last_algorithm() == "im2col"
        with mt.config_context(conv_algorithm="auto"):
            mt.conv2d(x, w, groups=4)
            assert last_algorithm() == "direct"
    mt.conv2d(x, w, groups=4)
    assert last_algorithm() == "direct"


@pytest.mark.parametrize("value", ["Winograd", "fft", "Direct", "", None, 1, True, ("direct",)])
def test_unknown_algorithm_is_a_value_error(value):
    with pytest.raises(ValueError, match="conv_algorithm must be one of"):
        with mt.config_context(conv_algorithm=value):
            pass


def test_profile_may_name_the_algorithm():
    # A tuned profile's options may set it; an unknown name makes the profile invalid.
    from microtile._config._profile import check_chosen
    assert check_chosen({"options": {"conv_algorithm": "direct"}})["options"] == {
        "conv_algorithm": "direct"}
    with pytest.raises(ValueError, match="conv_algorithm"):
        check_chosen({"options": {"conv_algorithm": "fft"}})


def test_empty_problems_on_any_algorithm():
    for algorithm in ("auto", "direct"):
        with mt.config_context(conv_algorithm=algorithm):
            assert mt.conv2d(np.ones((0, 4, 5, 5)), np.ones((4, 1, 3, 3)),
                             groups=4).shape == (0, 4, 3, 3)
            dx, dw, db = mt.conv2d_backward(np.ones((0, 4, 3, 3)), np.ones((0, 4, 5, 5)),
                                            np.ones((4, 1, 3, 3)), groups=4)
            assert dx.shape == (0, 4, 5, 5) and not dw.any() and not db.any()


# ------------------------------------------------------------------------ the nn layer

def test_depthwise_layer_gradcheck():
    rng = np.random.default_rng(14)
    for kw in (dict(kernel_size=3, padding=1), dict(kernel_size=5, stride=2, padding=2),
               dict(kernel_size=3, padding="same", bias=False)):
        layer = nn.Conv2d(4, 8, groups=4, dtype=F64, rng=rng, **kw)
        assert nn.gradcheck(layer, rng.standard_normal((2, 4, 7, 9)))
        assert last_algorithm() == "direct"


@pytest.mark.parametrize("dtype", [F32, F64])
def test_grouped_model_trains_a_step_like_torch(dtype):
    """Depthwise 3x3 (stride 2), pointwise, grouped 3x3 (4 channels per group): one SGD
    step with momentum, parameters and input gradient against torch."""
    rng = np.random.default_rng(15)
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, dtype=dtype, rng=1), nn.ReLU(),
        nn.Conv2d(8, 16, 1, dtype=dtype, rng=2), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4, dtype=dtype, rng=3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5, dtype=dtype, rng=4))
    tdt = getattr(torch, np.dtype(dtype).name)
    tmodel = torch.nn.Sequential(
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, dtype=tdt), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 1, dtype=tdt), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1, groups=4, dtype=tdt), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5, dtype=tdt))
    tmodel.load_state_dict({k: torch.from_numpy(v.copy())
                            for k, v in model.state_dict().items()})
    x = rng.standard_normal((6, 8, 15, 14)).astype(dtype)
    labels = rng.integers(0, 5, 6)
    opt = nn.SGD(model.parameters(), lr=0.1, momentum=0.9)
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.1, momentum=0.9)
    loss = nn.CrossEntropyLoss()
    tx = torch.from_numpy(x.copy()).requires_grad_()
    for _ in range(2):
        opt.zero_grad()
        value = loss.forward(model(x), labels)
        dx = model.backward(loss.backward())
        opt.step()
        topt.zero_grad()
        tx.grad = None
        tl = F.cross_entropy(tmodel(tx), torch.from_numpy(labels))
        tl.backward()
        topt.step()
    rtol = 2e-4 if dtype == F32 else 1e-10
    np.testing.assert_allclose(value, tl.item(), rtol=rtol)
    tgx = tx.grad.numpy()
    np.testing.assert_allclose(dx, tgx, rtol=rtol, atol=rtol * np.abs(tgx).max())
    for (name, p), tp in zip(model.named_parameters(), tmodel.parameters()):
        ref = tp.detach().numpy()
        np.testing.assert_allclose(p.data, ref, rtol=rtol, atol=rtol * np.abs(ref).max(),
                                   err_msg=name)


def test_depthwise_training_step_allocates_no_arrays():
    """A MobileNet-like block (depthwise + pointwise): once shapes are known a step reuses
    every buffer, as for the im2col layers."""
    rng = np.random.default_rng(16)
    model = nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1, groups=16, rng=0), nn.ReLU(),
        nn.Conv2d(16, 32, 1, rng=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=8, rng=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 6 * 6, 10, rng=3))
    x = rng.standard_normal((8, 16, 12, 12)).astype(F32)
    labels = rng.integers(0, 10, 8)
    opt = nn.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with mt.config_context(threads=2):
        assert step_allocation(model, nn.CrossEntropyLoss(), opt, x, labels) < 16 * 1024
