"""Sparse inputs to nn (Linear forward and gradients, fit and predict without densifying) and
magnitude pruning (masks kept through optimizer steps, the sparse forward of a pruned Linear
at or below ``sparse_density``).  References are the same layers on dense arrays, in
float64, with the k*eps bound of ``_helpers``."""
import numpy as np
import pytest

sp = pytest.importorskip("scipy.sparse")

import microtile
from microtile import config_context, nn
import microtile.nn._linear as linear_module

from _helpers import FLOATS, assert_close


def sparse_batch(rng, n, f, density, dtype, fmt="csr"):
    x = sp.random(n, f, density=density, format="csr", dtype=np.float64, rng=rng)
    x.data[:] = rng.standard_normal(x.nnz)
    return x.astype(dtype).asformat(fmt)


def linear_bound(x_dense, layer, k):
    """(bound, k) for x @ W.T + b: |x| @ |W|.T + |b|, with k terms per element."""
    w = np.abs(layer.weight.data.astype(np.float64))
    b = 0 if layer.bias is None else np.abs(layer.bias.data.astype(np.float64))
    return np.abs(x_dense.astype(np.float64)) @ w.T + b


@pytest.fixture
def no_densify(monkeypatch):
    """Make every way of densifying a scipy.sparse object fail for the test's duration."""
    def refuse(*args, **kwargs):
        raise AssertionError("a sparse batch was densified")
    import scipy.sparse._base as base
    import scipy.sparse._compressed as compressed
    import scipy.sparse._matrix as matrix
    for cls in (base._spbase, compressed._cs_matrix, matrix.spmatrix):
        for name in ("toarray", "todense"):
            if name in vars(cls):
                monkeypatch.setattr(cls, name, refuse)


# --- Linear on a sparse batch ----------------------------------------------------------------

@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("fmt", ("csr", "csc", "coo"))
@pytest.mark.parametrize("bias", (True, False))
def test_linear_forward_and_gradients_on_sparse_input(dt, fmt, bias, rng):
    layer = nn.Linear(70, 33, bias=bias, dtype=dt, rng=1)
    dense = nn.Linear(70, 33, bias=bias, dtype=np.float64, rng=1)
    x = sparse_batch(rng, 41, 70, 0.1, dt, fmt)
    xd = x.toarray()
    y = layer(x)
    assert y.dtype == dt and y.shape == (41, 33)
    k = int(np.diff(sp.csr_matrix(x).indptr).max()) + 1
    assert_close(y, dense(xd), linear_bound(xd, dense, k), k, dt, "sparse forward")
    dy = rng.standard_normal((41, 33)).astype(dt)
    assert layer.backward(dy) is None            # no input gradient for a sparse input
    dense.backward(dy.astype(np.float64))
    gbound = np.abs(dy.astype(np.float64)).T @ np.abs(xd)
    assert_close(layer.weight.grad, dense.weight.grad, gbound, 41, dt, "weight grad")
    if bias:
        assert_close(layer.bias.grad, dense.bias.grad, np.abs(dy).sum(0), 41, dt, "bias grad")
    # A second backward accumulates.
    layer(x)
    layer.backward(dy)
    assert_close(layer.weight.grad, 2 * dense.weight.grad, 2 * gbound, 42, dt, "accumulated")


def test_linear_sparse_input_promotes_to_the_layer_dtype_and_checks_shape(rng):
    layer = nn.Linear(20, 5, rng=0)
    x = sparse_batch(rng, 6, 20, 0.3, np.float64)
    assert layer(x).dtype == np.float32
    with pytest.raises(ValueError, match="shape"):
        layer(sparse_batch(rng, 6, 21, 0.3, np.float32))


@pytest.mark.parametrize("dt", FLOATS)
def test_sequential_with_fused_activation_on_sparse_input(dt, rng):
    model = nn.Sequential(nn.Linear(50, 16, dtype=dt, rng=3), nn.ReLU(),
                          nn.Linear(16, 4, dtype=dt, rng=4))
    x = sparse_batch(rng, 30, 50, 0.1, dt)
    y_sparse = model(x).copy()
    y_dense = model(x.toarray()).copy()
    tol = 64 * np.finfo(dt).eps * (np.abs(y_dense).max() + 1)
    np.testing.assert_allclose(y_sparse, y_dense, rtol=0, atol=tol)
    assert model.backward(np.ones_like(y_sparse), need_input_grad=False) is None
    model(x)
    assert model.backward(np.ones_like(y_sparse)) is None      # nothing to return for x
    outer = nn.Sequential(model, nn.Tanh())
    outer(x)
    assert outer.backward(np.ones_like(y_sparse)) is None
    # A dense forward afterwards gives an input gradient again.
    model(x.toarray())
    assert model.backward(np.ones_like(y_sparse)).shape == (30, 50)


# --- fit / predict ---------------------------------------------------------------------------

@pytest.mark.parametrize("shuffle", (True, False))
def test_fit_and_predict_on_sparse_x_match_dense(shuffle, rng, no_densify):
    X = sparse_batch(rng, 150, 80, 0.05, np.float64)
    y = rng.integers(0, 3, 150)
    with pytest.raises(AssertionError, match="densified"):
        X.todense()

    def model():
        return nn.Sequential(nn.Linear(80, 24, dtype=np.float64, rng=5), nn.Tanh(),
                             nn.Linear(24, 3, dtype=np.float64, rng=6))

    m_sparse, m_dense = model(), model()
    h_sparse = nn.fit(m_sparse, nn.CrossEntropyLoss(), nn.SGD(m_sparse.parameters(), lr=0.2,
                                                             momentum=0.9),
                      X, y, epochs=3, batch_size=16, shuffle=shuffle, rng=7, progress=False,
                      validation=(X[:40], y[:40]))
    p_sparse = nn.predict(m_sparse, X, batch_size=64)
    # Dense reference, built from the CSR arrays themselves (toarray is refused here).
    Xd = np.zeros(X.shape)
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    np.add.at(Xd, (rows, X.indices), X.data)
    h_dense = nn.fit(m_dense, nn.CrossEntropyLoss(), nn.SGD(m_dense.parameters(), lr=0.2,
                                                           momentum=0.9),
                     Xd, y, epochs=3, batch_size=16, shuffle=shuffle, rng=7, progress=False,
                     validation=(Xd[:40], y[:40]))
    for key in h_dense:
        np.testing.assert_allclose(h_sparse[key], h_dense[key], rtol=1e-10, atol=1e-12)
    for ps, pd in zip(m_sparse.parameters(), m_dense.parameters()):
        np.testing.assert_allclose(ps.data, pd.data, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(p_sparse, nn.predict(m_dense, Xd), rtol=1e-9, atol=1e-12)


def test_fit_converts_other_formats_and_dtypes(rng):
    X = sparse_batch(rng, 60, 30, 0.1, np.float64, "coo")
    y = rng.integers(0, 2, 60)
    model = nn.Sequential(nn.Linear(30, 2, rng=0))
    hist = nn.fit(model, nn.CrossEntropyLoss(), nn.SGD(model.parameters(), lr=0.1), X, y,
                  epochs=1, batch_size=8, progress=False)
    assert np.isfinite(hist["loss"][0])
    assert nn.predict(model, X).dtype == np.float32
    with pytest.raises(TypeError, match="int64"):
        nn.predict(model, X.astype(np.int64))
    with pytest.raises(ValueError, match="samples"):
        nn.fit(model, nn.CrossEntropyLoss(), nn.SGD(model.parameters(), lr=0.1), X, y[:5],
               progress=False)


def test_fit_regression_with_float_targets_on_sparse_x(rng):
    X = sparse_batch(rng, 40, 25, 0.2, np.float32)
    y = rng.standard_normal((40, 2))
    model = nn.Linear(25, 2, rng=0)
    hist = nn.fit(model, nn.MSELoss(), nn.SGD(model.parameters(), lr=0.05), X, y, epochs=2,
                  batch_size=8, progress=False)
    assert set(hist) == {"loss"} and np.isfinite(hist["loss"]).all()


# --- prune -----------------------------------------------------------------------------------

def test_prune_zeroes_the_smallest_magnitudes(rng):
    model = nn.Sequential(nn.Conv2d(2, 3, 3, rng=0), nn.Flatten(), nn.Linear(12, 40, rng=1),
                          nn.ReLU(), nn.Linear(40, 5, rng=2))
    before = [layer.weight.data.copy() for layer in (model[0], model[2], model[4])]
    assert nn.prune(model, 0.7) is model
    for layer, w0 in zip((model[0], model[2], model[4]), before):
        w = layer.weight.data
        n_zero = int(round(0.7 * w.size))
        assert (w == 0).sum() == n_zero
        kept = w != 0
        np.testing.assert_array_equal(w[kept], w0[kept])       # kept weights unchanged
        assert np.abs(w0[~kept]).max() <= np.abs(w0[kept]).min()
    assert model[2].bias is not None and (model[2].bias.data != 0).all()   # biases untouched


@pytest.mark.parametrize("make_opt", (
    lambda p: nn.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
    lambda p: nn.Adam(p, lr=0.01),
    lambda p: nn.AdamW(p, lr=0.01),
    lambda p: nn.RMSprop(p, lr=0.01, momentum=0.5),
    lambda p: nn.AdaGrad(p, lr=0.1),
))
def test_pruned_weights_stay_zero_through_optimizer_steps(make_opt, rng):
    model = nn.Sequential(nn.Linear(20, 30, rng=0), nn.ReLU(), nn.Linear(30, 3, rng=1))
    nn.prune(model, 0.8)
    masks = [layer.weight.data == 0 for layer in (model[0], model[2])]
    X = rng.standard_normal((64, 20)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    nn.fit(model, nn.CrossEntropyLoss(), make_opt(model.parameters()), X, y, epochs=3,
           batch_size=8, progress=False)
    for layer, mask in zip((model[0], model[2]), masks):
        assert (layer.weight.data[mask] == 0).all()
        assert (layer.weight.data[~mask] != 0).any()      # the rest did train


def test_pruned_weights_stay_zero_through_loads_and_assignment(rng, tmp_path):
    model = nn.Sequential(nn.Linear(8, 6, rng=0), nn.ReLU(), nn.Linear(6, 2, rng=1))
    dense_state = {k: v.copy() for k, v in model.state_dict().items()}
    nn.prune(model, 0.5)
    mask = model[0].weight.data == 0
    model.load_state_dict(dense_state)
    assert (model[0].weight.data[mask] == 0).all()
    assert (model[0].weight.data[~mask] == dense_state["0.weight"][~mask]).all()
    model[0].weight.data = np.ones((6, 8))
    assert (model[0].weight.data[mask] == 0).all() and (model[0].weight.data[~mask] == 1).all()
    x = rng.standard_normal((4, 8)).astype(np.float32)
    with config_context(sparse_density=1.0):
        y_sparse = model(x).copy()
    with config_context(sparse_density=0.0):
        y_dense = model(x).copy()
    np.testing.assert_allclose(y_sparse, y_dense, rtol=1e-6, atol=1e-6)


def test_prune_again_keeps_earlier_pruning(rng):
    layer = nn.Linear(10, 10, rng=0)
    nn.prune(layer, 0.5)
    first = layer.weight.data == 0
    layer.weight.data[first] = 5.0      # written into the array: nothing re-zeroes it yet
    nn.prune(layer, 0.6)
    assert (layer.weight.data[first] == 0).all()
    assert (layer.weight.data == 0).sum() == 60


def test_prune_nothing_and_everything(rng):
    x = rng.standard_normal((5, 7)).astype(np.float32)
    layer = nn.Linear(7, 4, rng=0)
    w0 = layer.weight.data.copy()
    nn.prune(layer, 0.0)
    np.testing.assert_array_equal(layer.weight.data, w0)
    assert layer._pruned is None
    nn.prune(layer, 1.0)
    assert (layer.weight.data == 0).all()
    y = layer(x)                                   # density 0: the sparse kernel, no work
    np.testing.assert_array_equal(y, np.broadcast_to(layer.bias.data, (5, 4)))


@pytest.mark.parametrize("values", ("distinct", "ties", "specials"))
def test_prune_selection_is_a_stable_sort_prefix(values, rng):
    """prune picks the smallest magnitudes by selection, not a sort: the same positions as
    the first ``count`` of a stable argsort, ties by position, NaN last (after +inf)."""
    from microtile.nn._prune import _smallest
    if values == "distinct":
        key = rng.standard_normal(1000)
    elif values == "ties":
        key = rng.integers(0, 5, 1000).astype(np.float64)
        key[rng.random(1000) < 0.3] = -1.0                  # earlier pruned
    else:
        key = rng.integers(0, 4, 1000).astype(np.float64)
        key[rng.random(1000) < 0.2] = np.inf
        key[rng.random(1000) < 0.2] = np.nan
    order = np.argsort(key, kind="stable")
    for count in (1, 2, 37, 500, 799, 999, 1000):
        got = np.sort(_smallest(key, count))
        np.testing.assert_array_equal(got, np.sort(order[:count]), err_msg=str(count))


def test_prune_errors():
    with pytest.raises(TypeError, match="Module"):
        nn.prune(object(), 0.5)
    for bad in (-0.1, 1.5, "half", float("nan"), True):
        with pytest.raises(ValueError):
            nn.prune(nn.Linear(3, 3), bad)


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("bias", (True, False))
def test_pruned_linear_runs_on_the_sparse_kernel_at_or_below_the_density(dt, bias, rng,
                                                                          monkeypatch):
    calls = []
    real = linear_module.Linear._forward_pruned

    def spy(self, *args):
        calls.append(self)
        return real(self, *args)

    monkeypatch.setattr(linear_module.Linear, "_forward_pruned", spy)
    layer = nn.Linear(67, 65, bias=bias, dtype=dt, rng=2)
    nn.prune(layer, 0.9)
    density = (layer.weight.data != 0).mean()
    x = rng.standard_normal((33, 67)).astype(dt)[:, ::-1]       # a strided input too
    with config_context(sparse_density=density):
        y = layer(x).copy()
    assert len(calls) == 1
    with config_context(sparse_density=density / 2):
        y_dense = layer(x).copy()
    assert len(calls) == 1
    ref = x.astype(np.float64) @ layer.weight.data.T.astype(np.float64)
    if bias:
        ref += layer.bias.data
    k = int((layer.weight.data != 0).sum(1).max()) + 1
    bound = linear_bound(x, layer, k)
    assert_close(y, ref, bound, k, dt, "pruned sparse forward")
    assert_close(y_dense, ref, bound, 67, dt, "pruned dense forward")
    # With a fused activation, inside a Sequential, and an empty batch.
    model = nn.Sequential(layer, nn.Sigmoid())
    with config_context(sparse_density=density):
        ys = model(x).copy()
        assert model(x[:0]).shape == (0, 65)
    np.testing.assert_allclose(ys, 1 / (1 + np.exp(-ref)), rtol=0,
                               atol=64 * np.finfo(dt).eps * k)


@pytest.mark.parametrize("shape", ((256, 256), (65, 67), (10, 1)))
def test_ninety_percent_pruned_runs_sparse_at_the_default_density(shape, monkeypatch):
    """round(0.9 * size) pruned may leave one weight more than 10 %: still sparse."""
    calls = []
    real = linear_module.Linear._forward_pruned
    monkeypatch.setattr(linear_module.Linear, "_forward_pruned",
                        lambda self, *a: (calls.append(1), real(self, *a))[1])
    layer = nn.prune(nn.Linear(shape[1], shape[0], rng=0), 0.9)
    layer(np.ones((3, shape[1]), np.float32))
    assert calls == [1]
    nn.prune(nn.Linear(shape[1], shape[0], rng=0), 0.8)(np.ones((3, shape[1]), np.float32))
    assert calls == [1]


def test_sparse_density_config():
    assert microtile.get_config()["sparse_density"] == 0.1
    with config_context(sparse_density=0.25):
        assert microtile.get_config()["sparse_density"] == 0.25
    for bad in (-0.1, 1.01, "x", float("nan"), True):
        with pytest.raises(ValueError, match="sparse_density"):
            with config_context(sparse_density=bad):
                pass
