"""Optimizers: hand-computed updates, a float64 NumPy reference, and torch.optim parity."""
import numpy as np
import pytest

from microtile import nn

F64 = np.float64


def make_param(values, dtype=F64):
    return nn.Parameter(np.asarray(values, dtype=dtype))


def run(opt_cls, kwargs, p0, grads, dtype=F64):
    p = make_param(p0, dtype)
    opt = opt_cls([p], **kwargs)
    out = []
    for g in grads:
        opt.zero_grad()
        p.grad = g
        opt.step()
        out.append(p.data.astype(F64).copy())
    return out


# --- tiny cases worked out by hand -------------------------------------------------------

def test_sgd_by_hand():
    # p = 1, g = 0.5 then 0.25; lr 0.1, momentum 0.9:
    # step 1: buf = 0.5, p = 1 - 0.05 = 0.95
    # step 2: buf = 0.9*0.5 + 0.25 = 0.7, p = 0.95 - 0.07 = 0.88
    out = run(nn.SGD, dict(lr=0.1, momentum=0.9), [1.0], [[0.5], [0.25]])
    np.testing.assert_allclose([o[0] for o in out], [0.95, 0.88], rtol=1e-15)
    # Nesterov: step 1 direction g + 0.9*buf = 0.95 -> p = 0.905;
    # step 2: buf = 0.7, direction 0.25 + 0.63 = 0.88 -> p = 0.905 - 0.088 = 0.817
    out = run(nn.SGD, dict(lr=0.1, momentum=0.9, nesterov=True), [1.0], [[0.5], [0.25]])
    np.testing.assert_allclose([o[0] for o in out], [0.905, 0.817], rtol=1e-15)
    # weight decay 0.1: g = 0.5 + 0.1 = 0.6 -> p = 1 - 0.06 = 0.94
    out = run(nn.SGD, dict(lr=0.1, weight_decay=0.1), [1.0], [[0.5]])
    np.testing.assert_allclose(out[0][0], 0.94, rtol=1e-15)


def test_adam_by_hand():
    # First Adam step moves every coordinate by lr * sign(g) (up to eps): m_hat = g, v_hat = g^2.
    out = run(nn.Adam, dict(lr=0.01, eps=0.0), [1.0, -2.0, 3.0], [[0.5, -4.0, 1e-3]])
    np.testing.assert_allclose(out[0], [0.99, -1.99, 2.99], rtol=1e-14)
    # Second step with g = 0.5 then -0.5 (betas 0.5, 0.5): m = 0.25 -> -0.125, m_hat = -1/6;
    # v = 0.125 -> 0.1875, v_hat = 0.25; step = lr * (-1/6) / 0.5 = -lr/3.
    out = run(nn.Adam, dict(lr=0.3, betas=(0.5, 0.5), eps=0.0), [0.0], [[0.5], [-0.5]])
    np.testing.assert_allclose([o[0] for o in out], [-0.3, -0.3 + 0.1], rtol=1e-14)


def test_adagrad_and_rmsprop_by_hand():
    # AdaGrad: sum = 4 -> p = 1 - 0.1 * 2/2 = 0.9; sum = 4 + 1 = 5 -> p -= 0.1 * 1/sqrt(5)
    out = run(nn.AdaGrad, dict(lr=0.1, eps=0.0), [1.0], [[2.0], [1.0]])
    np.testing.assert_allclose([o[0] for o in out], [0.9, 0.9 - 0.1 / np.sqrt(5)], rtol=1e-15)
    # RMSprop alpha 0.75: avg = 0.25*4 = 1 -> p = 1 - 0.1*2/1 = 0.8;
    # avg = 0.75 + 0.25*1 = 1 -> p = 0.8 - 0.1
    out = run(nn.RMSprop, dict(lr=0.1, alpha=0.75, eps=0.0), [1.0], [[2.0], [1.0]])
    np.testing.assert_allclose([o[0] for o in out], [0.8, 0.7], rtol=1e-15)


# --- a float64 reference written from torch's documented algorithms ----------------------

def reference(name, kw, p0, grads):
    p = p0.astype(F64).copy()
    s1 = np.zeros_like(p)
    s2 = np.zeros_like(p)
    out = []
    for t, g in enumerate(grads, start=1):
        g = g.astype(F64)
        if name == "sgd":
            g = g + kw.get("weight_decay", 0) * p
            mu = kw.get("momentum", 0)
            if mu:
                s1 = g.copy() if t == 1 else mu * s1 + g
                g = g + mu * s1 if kw.get("nesterov") else s1
            p = p - kw["lr"] * g
        elif name == "adam":
            b1, b2 = kw.get("betas", (0.9, 0.999))
            g = g + kw.get("weight_decay", 0) * p
            s1 = b1 * s1 + (1 - b1) * g
            s2 = b2 * s2 + (1 - b2) * g * g
            mhat = s1 / (1 - b1 ** t)
            denom = np.sqrt(s2) / np.sqrt(1 - b2 ** t) + kw.get("eps", 1e-8)
            p = p - kw.get("lr", 1e-3) * mhat / denom
        elif name == "adagrad":
            s1 = s1 + g * g
            p = p - kw.get("lr", 1e-2) * g / (np.sqrt(s1) + kw.get("eps", 1e-10))
        elif name == "rmsprop":
            a = kw.get("alpha", 0.99)
            s1 = a * s1 + (1 - a) * g * g
            p = p - kw.get("lr", 1e-2) * g / (np.sqrt(s1) + kw.get("eps", 1e-8))
        out.append(p.copy())
    return out


CASES = [
    ("sgd", nn.SGD, dict(lr=0.05)),
    ("sgd", nn.SGD, dict(lr=0.05, momentum=0.9)),
    ("sgd", nn.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-2)),
    ("adam", nn.Adam, dict()),
    ("adam", nn.Adam, dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
    ("adagrad", nn.AdaGrad, dict()),
    ("adagrad", nn.AdaGrad, dict(lr=0.5, eps=1e-3)),
    ("rmsprop", nn.RMSprop, dict()),
    ("rmsprop", nn.RMSprop, dict(lr=1e-3, alpha=0.9, eps=1e-5)),
]


@pytest.mark.parametrize("name,cls,kw", CASES)
@pytest.mark.parametrize("size", [1, 7, 70001])  # 70001: the threaded path with a ragged tail
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_against_reference(name, cls, kw, size, dtype):
    rng = np.random.default_rng(size)
    p0 = rng.standard_normal(size).astype(dtype)
    grads = [rng.standard_normal(size).astype(dtype) for _ in range(4)]
    got = run(cls, kw, p0, grads, dtype)
    want = reference(name, kw, p0, grads)
    rtol = 1e-12 if dtype == F64 else 3e-5
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol)


TORCH_CASES = [
    (nn.SGD, "SGD", dict(lr=0.05, momentum=0.9)),
    (nn.SGD, "SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    (nn.SGD, "SGD", dict(lr=0.1)),
    (nn.Adam, "Adam", dict(lr=1e-2)),
    (nn.Adam, "Adam", dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.05)),
    (nn.AdaGrad, "Adagrad", dict(lr=0.1)),
    (nn.RMSprop, "RMSprop", dict(lr=1e-2, alpha=0.9)),
]


@pytest.mark.parametrize("cls,tname,kw", TORCH_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_against_torch_optim(cls, tname, kw, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    shapes = [(257, 65), (65,), (3,)]
    mine = [nn.Parameter(rng.standard_normal(s).astype(dtype)) for s in shapes]
    theirs = [torch.nn.Parameter(torch.from_numpy(p.data.copy())) for p in mine]
    opt = cls(mine, **kw)
    topt = getattr(torch.optim, tname)(theirs, **kw)
    for _ in range(6):
        opt.zero_grad()
        topt.zero_grad()
        for p, tp in zip(mine, theirs):
            g = rng.standard_normal(p.shape).astype(dtype)
            p.grad = g
            tp.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
    rtol = 1e-12 if dtype == F64 else 1e-5
    for p, tp in zip(mine, theirs):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=rtol, atol=rtol)


def test_zero_grad_is_lazy_but_reads_as_zero():
    p = make_param(np.ones(5))
    p.grad = np.full(5, 3.0)
    opt = nn.SGD([p], lr=1.0)
    opt.zero_grad()
    np.testing.assert_array_equal(p.grad, 0.0)
    p.grad = np.full(5, 2.0)
    opt.zero_grad()
    opt.step()  # no backward since zero_grad: a zero gradient, no movement
    np.testing.assert_array_equal(p.data, 1.0)


def test_optimizer_errors():
    p = make_param([1.0])
    with pytest.raises(ValueError, match="empty"):
        nn.SGD([], lr=0.1)
    with pytest.raises(TypeError):
        nn.SGD(p, lr=0.1)
    with pytest.raises(TypeError):
        nn.SGD([np.zeros(3)], lr=0.1)
    with pytest.raises(ValueError, match="twice"):
        nn.SGD([p, p], lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        nn.SGD([p], lr=-1)
    with pytest.raises(ValueError, match="Nesterov"):
        nn.SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="beta"):
        nn.Adam([p], betas=(1.0, 0.9))
    with pytest.raises(ValueError):
        nn.RMSprop([p], eps=float("nan"))
    with pytest.raises(ValueError):
        nn.AdaGrad([p], lr=-0.1)
