"""LeakyReLU, GELU, SiLU, Softmax, LogSoftmax against torch (float64 and float32), finite
differences, extreme inputs, layouts and errors."""
import numpy as np
import pytest

from microtile import config_context, nn

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = dict(rtol=1e-12, atol=1e-14)

ELEMENTWISE = [
    (lambda: nn.LeakyReLU(), lambda t: F.leaky_relu(t, 0.01)),
    (lambda: nn.LeakyReLU(0.2), lambda t: F.leaky_relu(t, 0.2)),
    (lambda: nn.LeakyReLU(-1.5), lambda t: F.leaky_relu(t, -1.5)),
    (lambda: nn.GELU(), F.gelu),
    (lambda: nn.GELU("tanh"), lambda t: F.gelu(t, approximate="tanh")),
    (lambda: nn.SiLU(), F.silu),
]
ELEMENTWISE_IDS = ["leaky", "leaky0.2", "leaky-neg", "gelu", "gelu-tanh", "silu"]


def torch_fwd_bwd(fn, x, dy):
    xt = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_()
    yt = fn(xt)
    yt.backward(torch.from_numpy(np.ascontiguousarray(dy)))
    return yt.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize("make,fn", ELEMENTWISE, ids=ELEMENTWISE_IDS)
@pytest.mark.parametrize("shape", [(1,), (7, 63), (3, 5, 11)])
def test_elementwise_matches_torch_float64(make, fn, shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape) * 4
    dy = rng.standard_normal(shape)
    layer = make()
    y = layer(x)
    dx = layer.backward(dy)
    ty, tdx = torch_fwd_bwd(fn, x, dy)
    np.testing.assert_allclose(y, ty, **TOL)
    np.testing.assert_allclose(dx, tdx, **TOL)


@pytest.mark.parametrize("make,fn", ELEMENTWISE, ids=ELEMENTWISE_IDS)
def test_elementwise_float32_extremes_match_torch(make, fn):
    """Large, tiny, infinite and NaN inputs give what torch gives (NaN where it does), except
    that a derivative torch loses to an overflow of x*x (tanh-GELU's at |x| = 1e30 in
    float32) may be its limit, 0 or 1, instead of NaN."""
    x = np.array([-np.inf, -1e30, -1000, -90, -20, -1e-30, 0, 1e-30, 3, 20, 90, 1000, 1e30,
                  np.inf, np.nan], np.float32)
    for dt in (np.float32, np.float64):
        xx = x.astype(dt)
        dy = np.ones_like(xx)
        layer = make()
        y, dx = layer(xx), layer.backward(dy)
        ty, tdx = torch_fwd_bwd(fn, xx, dy)
        limit = np.isnan(tdx) & np.isfinite(xx) & ~np.isnan(dx)
        tdx = np.where(limit, (xx > 0).astype(dt), tdx)
        assert np.count_nonzero(limit) <= 2
        assert y.dtype == dt
        np.testing.assert_allclose(y, ty, rtol=1e-6, atol=1e-30, equal_nan=True)
        np.testing.assert_allclose(dx, tdx, rtol=1e-6, atol=1e-30, equal_nan=True)


@pytest.mark.parametrize("make,fn", ELEMENTWISE, ids=ELEMENTWISE_IDS)
def test_elementwise_gradcheck_and_float32(make, fn):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 9))
    x = np.where(np.abs(x) < 0.05, 0.5, x)      # away from LeakyReLU's kink
    assert nn.gradcheck(make(), x)
    x32 = (rng.standard_normal((5, 200)) * 3).astype(np.float32)
    dy = rng.standard_normal(x32.shape).astype(np.float32)
    layer = make()
    y, dx = layer(x32), layer.backward(dy)
    ty, tdx = torch_fwd_bwd(fn, x32, dy)
    np.testing.assert_allclose(y, ty, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(dx, tdx, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("cls,fn", [(nn.Softmax, F.softmax), (nn.LogSoftmax, F.log_softmax)])
@pytest.mark.parametrize("shape,dim", [((7,), 0), ((5, 63), -1), ((5, 63), 0), ((3, 4, 5), 1),
                                       ((2, 3, 1, 7), -2), ((2, 3, 4, 7), 0), ((1, 1), 1)])
def test_softmax_matches_torch(cls, fn, shape, dim):
    rng = np.random.default_rng(len(shape) * 10 + dim)
    x = rng.standard_normal(shape) * 5
    dy = rng.standard_normal(shape)
    layer = cls(dim)
    y = layer(x)
    dx = layer.backward(dy)
    ty, tdx = torch_fwd_bwd(lambda t: fn(t, dim=dim), x, dy)
    np.testing.assert_allclose(y, ty, **TOL)
    np.testing.assert_allclose(dx, tdx, **TOL)
    if x.size <= 64:
        assert nn.gradcheck(cls(dim), x)


@pytest.mark.parametrize("cls,fn", [(nn.Softmax, F.softmax), (nn.LogSoftmax, F.log_softmax)])
def test_softmax_is_numerically_safe(cls, fn):
    x = np.array([[1000.0, 0.0, -1000.0], [-1e308, -1e308, -1e308], [80, 90, 100],
                  [-745, -800, -740]])
    y = cls()(x)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, fn(torch.from_numpy(x), dim=-1).numpy(), rtol=1e-12,
                               atol=1e-300)
    x32 = (np.random.default_rng(2).standard_normal((4, 1000)) * 50).astype(np.float32)
    y32 = cls()(x32)
    assert y32.dtype == np.float32 and np.all(np.isfinite(y32))
    np.testing.assert_allclose(y32, fn(torch.from_numpy(x32.astype(np.float64)), -1).numpy(),
                               rtol=1e-5, atol=1e-30 if cls is nn.Softmax else 1e-4)
    if cls is nn.Softmax:
        np.testing.assert_allclose(y32.sum(axis=1, dtype=np.float64), 1.0, rtol=1e-5)


@pytest.mark.parametrize("cls", [nn.Softmax, nn.LogSoftmax])
def test_softmax_nan_row_stays_nan_others_not(cls):
    x = np.array([[0.0, np.nan, 1.0], [1.0, 2.0, 3.0]])
    y = cls()(x)
    assert np.all(np.isnan(y[0])) and np.all(np.isfinite(y[1]))


@pytest.mark.parametrize("cls", [nn.Softmax, nn.LogSoftmax, nn.GELU, nn.SiLU, nn.LeakyReLU])
@pytest.mark.parametrize("threads", [1, 2])
def test_layouts_and_threads_give_the_same_results(cls, threads):
    base = np.random.default_rng(3).standard_normal((40, 37, 30))   # past the cutoff
    dy = np.random.default_rng(4).standard_normal((30, 37, 40))
    ref = cls()
    want_y = ref(np.ascontiguousarray(base.T)).copy()
    want_dx = ref.backward(dy).copy()
    with config_context(threads=threads):
        for x in (base.T, np.ascontiguousarray(base.T)):
            layer = cls()
            np.testing.assert_array_equal(layer(x), want_y)
            np.testing.assert_array_equal(layer.backward(dy[:, ::-1][:, ::-1]), want_dx)


def test_in_a_model_against_torch():
    rng = np.random.default_rng(5)
    tm = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 8),
                             torch.nn.SiLU(), torch.nn.Linear(8, 5), torch.nn.LeakyReLU(0.1),
                             torch.nn.Linear(5, 4), torch.nn.LogSoftmax(dim=1)).double()
    m = nn.Sequential(nn.Linear(6, 8, dtype=np.float64), nn.GELU(),
                      nn.Linear(8, 8, dtype=np.float64), nn.SiLU(),
                      nn.Linear(8, 5, dtype=np.float64), nn.LeakyReLU(0.1),
                      nn.Linear(5, 4, dtype=np.float64), nn.LogSoftmax(dim=1))
    m.load_state_dict({k: v.numpy() for k, v in tm.state_dict().items()})
    x = rng.standard_normal((9, 6))
    dy = rng.standard_normal((9, 4))
    y = m(x)
    dx = m.backward(dy)
    ty, tdx = torch_fwd_bwd(tm, x, dy)
    np.testing.assert_allclose(y, ty, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(dx, tdx, rtol=1e-11, atol=1e-13)
    for p, tp in zip(m.parameters(), tm.parameters()):
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-11, atol=1e-13)


def test_zero_size_and_scalar():
    for layer in (nn.GELU(), nn.Softmax(1), nn.LogSoftmax(0), nn.SiLU()):
        x = np.zeros((0, 3))
        assert layer(x).shape == (0, 3) and layer.backward(x).shape == (0, 3)
    assert nn.Softmax(1)(np.zeros((2, 0))).shape == (2, 0)
    assert nn.Softmax()(np.array(3.0)) == 1.0
    assert nn.LogSoftmax(0)(np.array(3.0)) == 0.0


def test_errors():
    with pytest.raises(np.exceptions.AxisError):
        nn.Softmax(2)(np.zeros((2, 3)))
    with pytest.raises(IndexError):
        nn.LogSoftmax(-3)(np.zeros((2, 3)))
    with pytest.raises(TypeError):
        nn.Softmax(1.0)
    with pytest.raises(ValueError, match="approximate"):
        nn.GELU("erf")
    with pytest.raises(TypeError):
        nn.LeakyReLU("0.1")
    with pytest.raises(ValueError):
        nn.LeakyReLU(float("nan"))
    for layer in (nn.GELU(), nn.Softmax(), nn.LeakyReLU()):
        with pytest.raises(RuntimeError, match="before forward"):
            layer.backward(np.zeros(3))
        layer(np.zeros((2, 3)))
        with pytest.raises(ValueError, match=r"\(3, 2\)"):
            layer.backward(np.zeros((3, 2)))
        with pytest.raises(TypeError, match="int"):
            layer(np.zeros(3, np.int32))
    assert repr(nn.GELU("tanh")) == "GELU(approximate='tanh')"
    assert repr(nn.LeakyReLU()) == "LeakyReLU(negative_slope=0.01)"
    assert repr(nn.Softmax()) == "Softmax(dim=-1)"


@pytest.mark.parametrize("make", [nn.Sigmoid, nn.Tanh, nn.SiLU, nn.GELU,
                                  lambda: nn.GELU("tanh")],
                         ids=["sigmoid", "tanh", "silu", "gelu", "gelu-tanh"])
def test_float32_value_does_not_depend_on_where_the_element_sits(make):
    """The float32 loops take two vectors per turn, then one, then a masked part, and
    threads split long arrays into shares at any element: an element gives the same bits
    forward and backward whichever of them it falls in (every offset and length up to past
    two vectors on one thread; arrays long enough to be split, 2^15 elements and more, at
    odd offsets on two threads)."""
    from microtile import set_num_threads, get_num_threads
    rng = np.random.default_rng(5)
    big = (1 << 15) + 101
    x = (rng.standard_normal(big) * 4).astype(np.float32)
    dy = rng.standard_normal(big).astype(np.float32)
    layer = make()
    before = get_num_threads()
    try:
        set_num_threads(1)
        full, gfull = layer(x).copy(), layer.backward(dy).copy()
        cases = {1: [(off, n) for off in range(9)
                     for n in (1, 7, 8, 9, 15, 16, 17, 24, 31, 33, 47, 64)],
                 2: [(off, n) for off in (0, 1, 3, 7) for n in (1 << 15, (1 << 15) + 37)]}
        for threads, spans in cases.items():
            set_num_threads(threads)
            for off, n in spans:
                y = layer(x[off:off + n].copy())
                g = layer.backward(dy[off:off + n].copy())
                assert np.array_equal(y, full[off:off + n]), (threads, off, n)
                assert np.array_equal(g, gfull[off:off + n]), (threads, off, n)
    finally:
        set_num_threads(before)
