"""CrossEntropyLoss and MSELoss: values, gradients, stability, torch parity, errors."""
import math
import warnings

import numpy as np
import pytest

from microtile import nn

F64 = np.float64


def ref_xent(logits, labels):
    x = logits.astype(F64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    p = np.exp(x - lse[:, None])
    onehot = np.zeros_like(x)
    onehot[np.arange(len(labels)), labels] = 1
    return float(np.mean(lse - x[np.arange(len(labels)), labels])), (p - onehot) / len(labels)


@pytest.mark.parametrize("n,c", [(1, 1), (1, 2), (7, 3), (64, 10), (257, 129)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_against_reference(n, c, dtype):
    rng = np.random.default_rng(n * c)
    x = (rng.standard_normal((n, c)) * 3).astype(dtype)
    labels = rng.integers(0, c, n)
    loss = nn.CrossEntropyLoss()
    value = loss.forward(x, labels)
    ref, gref = ref_xent(x, labels)
    tol = 8 * c * np.finfo(dtype).eps
    assert isinstance(value, float)
    assert abs(value - ref) <= tol * (1 + abs(ref))
    g = loss.backward()
    assert g.dtype == dtype and g.shape == (n, c)
    np.testing.assert_allclose(g, gref, atol=tol / n)


def test_cross_entropy_gradcheck():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 5))
    assert nn.gradcheck(nn.CrossEntropyLoss(), x, target=rng.integers(0, 5, 6))


def test_cross_entropy_large_logits_do_not_overflow():
    x = np.array([[1e4, 0.0, -1e4], [-3e38, 3e38, 0.0]], np.float32)
    loss = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = loss.forward(x, np.array([0, 1]))
    assert value == 0.0
    assert np.all(np.isfinite(loss.backward()))
    value = loss.forward(x, np.array([2, 0]))
    assert math.isclose(value, (2e4 + 6e38) / 2, rel_tol=1e-6)


def test_cross_entropy_nan_propagates():
    loss = nn.CrossEntropyLoss()
    assert math.isnan(loss.forward(np.array([[0.0, np.nan], [1.0, 2.0]]), np.array([0, 1])))
    assert math.isnan(loss.forward(np.array([[np.nan, 0.0]]), np.array([1])))


def assert_matches_torch(torch, loss, torch_loss, x, target, grad_rtol, grad_atol=0.0):
    """``loss`` on (x, target) against torch's ``torch_loss``: the value to rtol 1e-13, the
    gradient with respect to x to the given tolerances."""
    value = loss.forward(x, target)
    tx = torch.from_numpy(x).requires_grad_()
    tl = torch_loss(tx, torch.from_numpy(target))
    tl.backward()
    np.testing.assert_allclose(value, tl.item(), rtol=1e-13)
    np.testing.assert_allclose(loss.backward(), tx.grad.numpy(), rtol=grad_rtol, atol=grad_atol)


def test_cross_entropy_against_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((33, 7)) * 4
    labels = rng.integers(0, 7, 33)
    assert_matches_torch(torch, nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss(), x, labels,
                         grad_rtol=1e-12, grad_atol=1e-16)


def test_cross_entropy_any_label_dtype_and_layout():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((12, 4))
    labels = rng.integers(0, 4, 12)
    ref = nn.CrossEntropyLoss().forward(x, labels)
    for lab in (labels.astype(np.uint8), labels.astype(np.int32), labels[::-1][::-1],
                np.repeat(labels, 2)[::2]):
        assert nn.CrossEntropyLoss().forward(x, lab) == ref
    xf = np.asfortranarray(x)
    assert nn.CrossEntropyLoss().forward(xf, labels) == ref


def test_cross_entropy_errors():
    loss = nn.CrossEntropyLoss()
    with pytest.raises(RuntimeError, match="before forward"):
        loss.backward()
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match="label 4 at index 1"):
        loss.forward(x, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="label -1 at index 2"):
        loss.forward(x, np.array([0, 1, -1]))
    with pytest.raises(TypeError, match="integers"):
        loss.forward(x, np.array([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        loss.forward(x, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        loss.forward(np.zeros(4), np.array([0]))
    with pytest.raises(TypeError, match="int64"):
        loss.forward(np.zeros((3, 4), np.int64), np.array([0, 1, 2]))
    assert math.isnan(loss.forward(np.zeros((0, 4)), np.zeros(0, int)))
    assert loss.backward().shape == (0, 4)


@pytest.mark.parametrize("shape", [(1,), (7, 3), (4, 3, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mse(shape, dtype):
    rng = np.random.default_rng(4)
    p = rng.standard_normal(shape).astype(dtype)
    t = rng.standard_normal(shape).astype(dtype)
    loss = nn.MSELoss()
    value = loss.forward(p, t)
    d = p.astype(F64) - t.astype(F64)
    tol = 8 * d.size * np.finfo(dtype).eps
    assert abs(value - np.mean(d * d)) <= tol * np.mean(d * d)
    g = loss.backward()
    assert g.dtype == dtype
    np.testing.assert_allclose(g, 2 * d / d.size, rtol=4 * np.finfo(dtype).eps)
    if dtype == F64:
        assert nn.gradcheck(nn.MSELoss(), p, target=t)


def test_mse_against_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    p = rng.standard_normal((9, 4))
    t = rng.standard_normal((9, 4))
    assert_matches_torch(torch, nn.MSELoss(), torch.nn.MSELoss(), p, t, grad_rtol=1e-13)


def test_mse_errors_and_inputs_untouched():
    loss = nn.MSELoss()
    with pytest.raises(RuntimeError):
        loss.backward()
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        loss.forward(np.zeros(3), np.zeros(4))
    with pytest.raises(TypeError):
        loss.forward(np.zeros(3), np.zeros(3, int))
    p = np.ones(3)
    p.setflags(write=False)
    t = np.zeros(3)
    assert loss.forward(p, t) == 1.0
    np.testing.assert_array_equal(p, 1.0)
    assert math.isnan(loss.forward(np.zeros(0), np.zeros(0)))
