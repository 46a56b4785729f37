"""Residual and AdaptiveAvgPool2d against torch (float64), finite differences, a ResNet
basic block with torch's state-dict keys, and errors."""
import numpy as np
import pytest

from microtile import config_context, nn

torch = pytest.importorskip("torch")

F64 = np.float64
TOL = dict(rtol=1e-10, atol=1e-12)


class TorchResidual(torch.nn.Module):
    """The torch module the API describes: attributes named after the arguments."""

    def __init__(self, block, shortcut=None):
        super().__init__()
        self.block = block
        self.shortcut = shortcut

    def forward(self, x):
        return self.block(x) + (x if self.shortcut is None else self.shortcut(x))


def torch_basic_block(cin, cout, stride):
    tn = torch.nn
    block = tn.Sequential(tn.Conv2d(cin, cout, 3, stride, 1, bias=False), tn.BatchNorm2d(cout),
                          tn.ReLU(), tn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                          tn.BatchNorm2d(cout))
    shortcut = None
    if stride != 1 or cin != cout:
        shortcut = tn.Sequential(tn.Conv2d(cin, cout, 1, stride, bias=False),
                                 tn.BatchNorm2d(cout))
    return TorchResidual(block, shortcut)


def basic_block(cin, cout, stride):
    block = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False, dtype=F64),
                          nn.BatchNorm2d(cout, dtype=F64), nn.ReLU(),
                          nn.Conv2d(cout, cout, 3, 1, 1, bias=False, dtype=F64),
                          nn.BatchNorm2d(cout, dtype=F64))
    shortcut = None
    if stride != 1 or cin != cout:
        shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False, dtype=F64),
                                 nn.BatchNorm2d(cout, dtype=F64))
    return nn.Residual(block, shortcut)


def small_resnet(torch_version):
    if torch_version:
        tn = torch.nn
        return tn.Sequential(tn.Conv2d(3, 4, 3, padding=1, bias=False), tn.BatchNorm2d(4),
                             tn.ReLU(), torch_basic_block(4, 4, 1), tn.ReLU(),
                             torch_basic_block(4, 6, 2), tn.ReLU(), tn.AdaptiveAvgPool2d(1),
                             tn.Flatten(), tn.Linear(6, 5)).double()
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False, dtype=F64),
                         nn.BatchNorm2d(4, dtype=F64), nn.ReLU(), basic_block(4, 4, 1),
                         nn.ReLU(), basic_block(4, 6, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 5, dtype=F64))


def test_resnet_matches_torch_state_dict_train_and_eval():
    rng = np.random.default_rng(0)
    tm = small_resnet(True)
    m = small_resnet(False)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    assert list(m.state_dict()) == list(sd)
    assert "3.block.0.weight" in sd and "5.shortcut.1.running_mean" in sd
    m.load_state_dict(sd)
    for step, mode in enumerate([True, True, False, True, False]):
        m.train(mode)
        tm.train(mode)
        x = rng.standard_normal((3, 3, 9, 7))
        dy = rng.standard_normal((3, 5))
        m.zero_grad()
        y = m(x)
        dx = m.backward(dy)
        xt = torch.from_numpy(x).requires_grad_()
        tm.zero_grad()
        yt = tm(xt)
        yt.backward(torch.from_numpy(dy))
        np.testing.assert_allclose(y, yt.detach().numpy(), **TOL)
        np.testing.assert_allclose(dx, xt.grad.numpy(), **TOL)
        for (name, p), tp in zip(m.named_parameters(), tm.parameters()):
            np.testing.assert_allclose(p.grad, tp.grad.numpy(), **TOL, err_msg=name)
    for k, v in tm.state_dict().items():
        np.testing.assert_allclose(m.state_dict()[k], v.numpy(), **TOL, err_msg=k)


@pytest.mark.parametrize("shortcut", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_residual_gradcheck(shortcut, fused):
    rng = np.random.default_rng(1)
    block = nn.Sequential(nn.Linear(5, 7, dtype=F64, rng=rng), nn.Tanh(),
                          nn.Linear(7, 5, dtype=F64, rng=rng))
    sc = nn.Linear(5, 5, dtype=F64, rng=rng) if shortcut else None
    layer = nn.Residual(block, sc)
    model = nn.Sequential(layer, nn.Sigmoid()) if fused else layer
    x = rng.standard_normal((4, 5))
    assert nn.gradcheck(model, x)
    # Identity shortcut: y - x is the block's output.
    if not shortcut and not fused:
        np.testing.assert_allclose(layer(x) - x, block(x), **TOL)


def test_fused_activation_after_residual_matches_unfused():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4))
    dy = rng.standard_normal((3, 4))
    res = nn.Residual(nn.Linear(4, 4, dtype=F64, rng=0))
    relu = nn.ReLU()
    fused = nn.Sequential(res, relu)
    y = fused(x).copy()
    assert fused._plan == [(0, res, True)]       # the ReLU ran in the addition's pass
    dx = fused.backward(dy).copy()
    res2 = nn.Residual(nn.Linear(4, 4, dtype=F64, rng=0))
    y2 = nn.ReLU().forward(res2(x))
    np.testing.assert_array_equal(y, y2)
    relu2 = nn.ReLU()
    relu2(res2(x))
    np.testing.assert_array_equal(dx, res2.backward(relu2.backward(dy)))


def test_residual_modes_and_need_input_grad():
    rng = np.random.default_rng(3)
    bn = nn.BatchNorm1d(4, dtype=F64)
    drop = nn.Dropout(0.5, rng=0)
    r = nn.Residual(nn.Sequential(nn.Linear(4, 4, dtype=F64, rng=0), bn), drop)
    r.eval()
    assert not bn.training and not drop.training and not r.block.training
    x = rng.standard_normal((6, 4))
    r(x)
    assert r.backward(np.ones((6, 4)), need_input_grad=False) is None
    assert np.any(r.block[0].weight.grad != 0)
    r.train()
    assert bn.training and drop.training


def test_residual_errors():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        nn.Residual(nn.Linear(4, 3))(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\(2, 3\).*shortcut.*\(2, 5\)"):
        nn.Residual(nn.Linear(4, 3), nn.Linear(4, 5))(np.zeros((2, 4)))
    with pytest.raises(TypeError, match="block"):
        nn.Residual(3)
    with pytest.raises(TypeError, match="shortcut"):
        nn.Residual(nn.ReLU(), "x")
    with pytest.raises(RuntimeError, match="before forward"):
        nn.Residual(nn.ReLU()).backward(np.zeros(3))
    r = nn.Residual(nn.ReLU())
    r(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        r.backward(np.zeros((3, 2)))
    assert "(block): ReLU()" in repr(r)


# --- AdaptiveAvgPool2d -------------------------------------------------------------------

@pytest.mark.parametrize("in_hw,out", [((7, 5), 1), ((7, 5), 3), ((7, 5), (2, 4)),
                                       ((6, 9), (6, 9)), ((5, 5), (7, 2)), ((13, 1), (4, None)),
                                       ((1, 1), 1), ((64, 63), (5, 7))])
def test_adaptive_avg_pool_matches_torch(in_hw, out):
    rng = np.random.default_rng(sum(in_hw))
    x = rng.standard_normal((2, 3) + in_hw)
    layer = nn.AdaptiveAvgPool2d(out)
    tl = torch.nn.AdaptiveAvgPool2d(out)
    y = layer(x).copy()         # gradcheck below reuses the layer's buffers
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    xt = torch.from_numpy(x).requires_grad_()
    yt = tl(xt)
    yt.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), **TOL)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **TOL)
    if x.size < 300:
        assert nn.gradcheck(layer, x)
    # 3-D input (C, H, W) and a non-contiguous view give the same values.
    np.testing.assert_allclose(nn.AdaptiveAvgPool2d(out)(x[1]), y[1], **TOL)
    xv = np.asfortranarray(x)[:, ::-1]
    np.testing.assert_array_equal(nn.AdaptiveAvgPool2d(out)(xv),
                                  nn.AdaptiveAvgPool2d(out)(np.ascontiguousarray(xv)))


@pytest.mark.parametrize("threads", [1, 2])
def test_adaptive_avg_pool_threads_and_float32(threads):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 8, 33, 31)).astype(np.float32)
    dy = rng.standard_normal((4, 8, 3, 5)).astype(np.float32)
    xt = torch.from_numpy(x.astype(F64)).requires_grad_()
    yt = torch.nn.functional.adaptive_avg_pool2d(xt, (3, 5))
    yt.backward(torch.from_numpy(dy.astype(F64)))
    with config_context(threads=threads):
        layer = nn.AdaptiveAvgPool2d((3, 5))
        y = layer(x)
        dx = layer.backward(dy)
    assert y.dtype == np.float32 and dx.dtype == np.float32
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_adaptive_avg_pool_zero_sizes_and_errors():
    assert nn.AdaptiveAvgPool2d(2)(np.zeros((0, 2, 5, 3))).shape == (0, 2, 2, 2)
    p = nn.AdaptiveAvgPool2d(0)
    assert p(np.ones((1, 2, 5, 3))).shape == (1, 2, 0, 0)
    np.testing.assert_array_equal(p.backward(np.zeros((1, 2, 0, 0))), np.zeros((1, 2, 5, 3)))
    with pytest.raises(ValueError, match=r"\(1, 2, 0, 3\)"):
        nn.AdaptiveAvgPool2d(2)(np.ones((1, 2, 0, 3)))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        nn.AdaptiveAvgPool2d(2)(np.ones((2, 3)))
    with pytest.raises(ValueError):
        nn.AdaptiveAvgPool2d(-1)
    with pytest.raises(ValueError):
        nn.AdaptiveAvgPool2d((1, 2, 3))
    with pytest.raises(TypeError):
        nn.AdaptiveAvgPool2d(1.5)
    with pytest.raises(RuntimeError, match="before forward"):
        nn.AdaptiveAvgPool2d(1).backward(np.zeros((1, 1, 1, 1)))
    assert repr(nn.AdaptiveAvgPool2d((2, None))) == "AdaptiveAvgPool2d(output_size=(2, None))"
    assert repr(nn.AdaptiveAvgPool2d(3)) == "AdaptiveAvgPool2d(output_size=3)"
