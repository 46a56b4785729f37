"""Conv2d, MaxPool2d, AvgPool2d layers and small CNNs (need microtile's convolution kernels)."""
import numpy as np
import pytest

import microtile
from microtile import nn

pytestmark = pytest.mark.skipif(not hasattr(microtile, "conv2d"),
                                reason="microtile.conv2d is not in this build")

F64 = np.float64


def rand(rng, *shape, dtype=F64):
    return rng.standard_normal(shape).astype(dtype)


def distinct(rng, *shape):
    """Values with well separated order (pooling's argmax does not flip under +-eps)."""
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) * 0.01 + rng.uniform(-1, 1)).astype(F64)


@pytest.mark.parametrize("kw", [
    dict(in_channels=2, out_channels=3, kernel_size=3),
    dict(in_channels=3, out_channels=4, kernel_size=(2, 3), stride=2, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, dilation=2, padding=2, groups=2),
    dict(in_channels=3, out_channels=3, kernel_size=3, padding="same", groups=3, bias=False),
    dict(in_channels=2, out_channels=2, kernel_size=1, padding="valid"),
])
def test_conv2d_gradcheck(kw):
    rng = np.random.default_rng(0)
    layer = nn.Conv2d(dtype=F64, rng=rng, **kw)
    x = rand(rng, 2, kw["in_channels"], 7, 6)
    assert nn.gradcheck(layer, x)


@pytest.mark.parametrize("kernel,stride,padding", [(2, None, 0), (3, 2, 1), ((2, 3), (1, 2), 0)])
def test_pool_gradcheck(kernel, stride, padding):
    rng = np.random.default_rng(1)
    x = distinct(rng, 2, 3, 7, 8)
    assert nn.gradcheck(nn.MaxPool2d(kernel, stride, padding), x)
    assert nn.gradcheck(nn.AvgPool2d(kernel, stride, padding), rand(rng, 2, 3, 7, 8))
    assert nn.gradcheck(nn.AvgPool2d(kernel, stride, padding, count_include_pad=False),
                        rand(rng, 2, 3, 7, 8))


def small_cnn(dtype=F64, rng=0, act=nn.ReLU):
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, dtype=dtype, rng=rng), act(),
                         nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3, dtype=dtype, rng=rng), act(),
                         nn.AvgPool2d(2),
                         nn.Flatten(),
                         nn.Linear(6, 5, dtype=dtype, rng=rng))


def test_whole_cnn_gradcheck():
    rng = np.random.default_rng(2)
    model = small_cnn(act=nn.Tanh)
    assert nn.gradcheck(model, distinct(rng, 2, 1, 8, 8))


@pytest.mark.parametrize("act", [nn.ReLU, nn.Sigmoid, nn.Tanh])
def test_conv_fusion_matches_separate_layers(act):
    rng = np.random.default_rng(3)
    conv = nn.Conv2d(3, 5, 3, padding=1, dtype=F64, rng=rng)
    a = act()
    seq = nn.Sequential(conv, a)
    x = rand(rng, 2, 3, 6, 5)
    dy = rand(rng, 2, 5, 6, 5)
    y1 = seq(x).copy()
    seq.zero_grad()
    dx1 = seq.backward(dy).copy()
    g1 = conv.weight.grad.copy()
    y2 = a(conv(x)).copy()
    conv.zero_grad()
    dx2 = conv.backward(a.backward(dy)).copy()
    np.testing.assert_allclose(y1, y2, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(conv.weight.grad, g1, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cnn_forward_backward_against_torch(dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    model = small_cnn(dtype, rng=5)
    tdt = getattr(torch, np.dtype(dtype).name)
    tmodel = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1, dtype=tdt), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 6, 3, dtype=tdt), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(6, 5, dtype=tdt))
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    x = rand(rng, 9, 1, 8, 8, dtype=dtype)
    labels = rng.integers(0, 5, 9)
    loss = nn.CrossEntropyLoss()
    value = loss.forward(model(x), labels)
    dx = model.backward(loss.backward())
    tx = torch.from_numpy(x).requires_grad_()
    tl = torch.nn.functional.cross_entropy(tmodel(tx), torch.from_numpy(labels))
    tl.backward()
    rtol = 1e-4 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(value, tl.item(), rtol=rtol)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=rtol,
                               atol=rtol * np.abs(tx.grad.numpy()).max())
    for (name, p), tp in zip(model.named_parameters(), tmodel.parameters()):
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=rtol,
                                   atol=rtol * np.abs(tp.grad.numpy()).max(), err_msg=name)


def test_conv_init_bounds():
    conv = nn.Conv2d(8, 16, (3, 5), groups=2, rng=0)
    assert conv.weight.shape == (16, 4, 3, 5)
    bound = 1 / np.sqrt(4 * 3 * 5)
    assert np.abs(conv.weight.data).max() <= bound
    assert np.abs(conv.weight.data).max() > 0.95 * bound
    assert np.abs(conv.bias.data).max() <= bound


def test_cnn_learns_bar_orientation():
    """Horizontal against vertical bars at random positions: needs the convolution."""
    rng = np.random.default_rng(6)
    n = 256
    X = rng.normal(0, 0.3, (n, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 2, n)
    pos = rng.integers(0, 8, n)
    for i in range(n):
        if y[i]:
            X[i, 0, pos[i], :] += 1.5
        else:
            X[i, 0, :, pos[i]] += 1.5
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, rng=0), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(64, 2, rng=1))
    hist = nn.fit(model, nn.CrossEntropyLoss(), nn.Adam(model.parameters(), lr=1e-2), X, y,
                  epochs=15, batch_size=32, rng=0, progress=False)
    assert hist["accuracy"][-1] > 0.95, hist["accuracy"]


def test_conv_errors():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(RuntimeError, match="before forward"):
        conv.backward(np.zeros((1, 4, 1, 1), np.float32))
    with pytest.raises(RuntimeError, match="before forward"):
        nn.MaxPool2d(2).backward(np.zeros((1, 1, 1, 1)))
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(3, 2, 3))
    with pytest.raises(ValueError, match=r"layer 2 \(Conv2d\(3, 2.*\(2, 4, 6, 6\)"):
        model(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="smaller than"):
        conv(np.zeros((1, 3, 2, 2), np.float32))
    with pytest.raises(ValueError, match="groups"):
        nn.Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="same"):
        nn.Conv2d(3, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError):
        nn.Conv2d(3, 4, 0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        nn.MaxPool2d(2)(np.zeros((4, 4)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reused_gradient_buffers_are_cleared(dtype):
    """The private buffers the layers pass in start full of garbage: the results must equal
    those of freshly allocated ones (dx, dW partials and pooling dx are cleared in place)."""
    rng = np.random.default_rng(21)
    x = rand(rng, 5, 6, 9, 7, dtype=dtype)
    w = rand(rng, 4, 3, 3, 2, dtype=dtype)
    dy = rand(rng, 5, 4, 5, 8, dtype=dtype)
    kw = dict(stride=(2, 1), padding=1, groups=2)
    ref = microtile.conv2d_backward(dy, x, w, **kw)
    bufs = [np.full(x.shape, np.nan, dtype), np.full(w.shape, np.nan, dtype),
            np.full((4,), np.nan, dtype)]
    for _ in range(2):
        got = microtile.conv2d_backward(dy, x, w, **kw, _dx=bufs[0], _dw=bufs[1], _db=bufs[2])
        for r, g, b in zip(ref, got, bufs):
            assert g is b or g.base is b
            np.testing.assert_array_equal(g, r)
    with pytest.raises(ValueError, match="_dw"):
        microtile.conv2d_backward(dy, x, w, **kw, _dw=np.empty((4, 3, 3, 3), dtype))
    py = rand(rng, 5, 6, 4, 3, dtype=dtype)
    for fn, args in ((microtile.max_pool2d_backward, (py, x, 2)),
                     (microtile.avg_pool2d_backward, (py, x.shape, 2))):
        ref = fn(*args)
        buf = np.full(x.shape, np.nan, dtype)
        for _ in range(2):
            assert fn(*args, _dx=buf) is buf
            np.testing.assert_array_equal(buf, ref)


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 2, 1), (3, 1, 1), ((2, 3), (1, 2), (1, 1)),
                                                    (5, 3, 2), (1, 1, 0), (17, 1, 0)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_max_pool_layer_keeps_window_offsets_and_matches_torch(kernel, stride, padding, dtype):
    """MaxPool2d keeps each winner as a one-byte offset in its window (windows up to 256
    elements; 17x17 takes the int64 indices) and its vectorised forward agrees with torch's
    values and gradients: odd sizes, padding, overlapping windows, ties, NaN, all -inf, a
    transposed input."""
    import torch
    rng = np.random.default_rng(7)
    x = rng.integers(-3, 4, (2, 3, 19, 23)).astype(dtype)      # many ties
    x[0, 0, 5, 7] = np.nan
    x[1, 2] = -np.inf
    xt = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)   # strides
    layer = nn.MaxPool2d(kernel, stride, padding)
    tl = torch.nn.MaxPool2d(kernel, stride, padding)
    for inp in (x, xt):
        y = layer.forward(inp)
        assert layer._idx.dtype == (np.uint8 if kernel != 17 else np.int64)
        tx = torch.from_numpy(np.array(inp)).requires_grad_()
        ty = tl(tx)
        np.testing.assert_array_equal(y, ty.detach().numpy())
        dy = rng.standard_normal(y.shape).astype(dtype)
        dx = layer.backward(dy)
        ty.backward(torch.from_numpy(dy))
        np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-6, atol=1e-6)
