"""BatchNorm1d / BatchNorm2d against torch (float64), finite differences, running statistics,
modes, state dicts and errors."""
import numpy as np
import pytest

from microtile import config_context, nn

torch = pytest.importorskip("torch")

F64 = np.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def pair(cls, c, rng, **kw):
    """A microtile layer and a torch layer with the same (random affine) state."""
    m = cls(c, dtype=F64, **kw)
    t = getattr(torch.nn, cls.__name__)(c, **kw).double()
    if m.affine:
        m.weight.data = rng.standard_normal(c)
        m.bias.data = rng.standard_normal(c)
    t.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
    return m, t


def torch_step(t, x, dy):
    xt = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_()
    t.zero_grad()
    yt = t(xt)
    yt.backward(torch.from_numpy(dy))
    grads = [p.grad.numpy() for p in t.parameters()]
    return yt.detach().numpy(), xt.grad.numpy(), grads


def check_step(m, t, x, dy):
    m.zero_grad()
    y = m(x)
    dx = m.backward(dy)
    ty, tdx, tgrads = torch_step(t, x, dy)
    np.testing.assert_allclose(y, ty, **TOL)
    np.testing.assert_allclose(dx, tdx, **TOL)
    for p, g in zip(m.parameters(), tgrads):
        np.testing.assert_allclose(p.grad, g, **TOL)
    for k, v in t.state_dict().items():
        np.testing.assert_allclose(m.state_dict()[k], v.numpy(), **TOL)


SHAPES = [(nn.BatchNorm1d, (2, 1)), (nn.BatchNorm1d, (7, 3)), (nn.BatchNorm1d, (63, 5)),
          (nn.BatchNorm1d, (1, 3, 2)), (nn.BatchNorm1d, (3, 7, 11)),
          (nn.BatchNorm2d, (1, 3, 1, 2)), (nn.BatchNorm2d, (2, 3, 5, 7)),
          (nn.BatchNorm2d, (5, 13, 3, 1))]


@pytest.mark.parametrize("cls,shape", SHAPES)
@pytest.mark.parametrize("kw", [{}, {"affine": False}, {"momentum": None},
                                {"track_running_stats": False}, {"momentum": 0.7, "eps": 0.5}])
def test_matches_torch_over_steps_then_in_eval(cls, shape, kw):
    rng = np.random.default_rng(sum(shape))
    m, t = pair(cls, shape[1], rng, **kw)
    for step in range(4):
        # An offset far larger than the spread: the statistics must not cancel.
        x = rng.standard_normal(shape) * (step + 1) + 100.0 * rng.standard_normal()
        check_step(m, t, x, rng.standard_normal(shape))
    if m.track_running_stats:
        assert m.num_batches_tracked == 4 and m.num_batches_tracked.dtype == np.int64
    m.eval()
    t.eval()
    for _ in range(2):
        check_step(m, t, rng.standard_normal(shape) + 3, rng.standard_normal(shape))
    if m.track_running_stats:
        assert m.num_batches_tracked == 4       # eval mode changes no statistics


@pytest.mark.parametrize("cls,shape", SHAPES[1:3] + SHAPES[4:])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(cls, shape, training):
    rng = np.random.default_rng(7)
    m, _ = pair(cls, shape[1], rng)
    m.running_mean[:] = rng.standard_normal(shape[1])
    m.running_var[:] = rng.uniform(0.5, 2, shape[1])
    m.train(training)
    assert nn.gradcheck(m, rng.standard_normal(shape))


@pytest.mark.parametrize("training", [True, False])
def test_non_contiguous_inputs_give_the_same_results(training):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((6, 5, 9, 8))
    views = [base[:, :, ::2, 1:5], np.asfortranarray(base), base[::-1, ::-1],
             base.transpose(0, 1, 3, 2)]
    for x in views:
        a, _ = pair(nn.BatchNorm2d, 5, np.random.default_rng(0))
        b, _ = pair(nn.BatchNorm2d, 5, np.random.default_rng(0))
        a.train(training)
        b.train(training)
        dy = rng.standard_normal(x.shape)
        y1 = a(x).copy()
        dx1 = a.backward(dy[:, :, ::-1]).copy()      # a strided gradient too
        y2 = b(np.ascontiguousarray(x))
        dx2 = b.backward(np.ascontiguousarray(dy[:, :, ::-1]))
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(dx1, dx2)
        np.testing.assert_array_equal(a.running_var, b.running_var)
        np.testing.assert_array_equal(a.weight.grad, b.weight.grad)
    x1 = rng.standard_normal((7, 4, 3))
    m1, _ = pair(nn.BatchNorm1d, 4, np.random.default_rng(1))
    m2, _ = pair(nn.BatchNorm1d, 4, np.random.default_rng(1))
    np.testing.assert_array_equal(m1(x1[:, :, ::-1]), m2(np.ascontiguousarray(x1[:, :, ::-1])))


@pytest.mark.parametrize("shape", [(8, 3, 64, 64), (2, 1, 181, 181), (40, 37, 31, 1)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_large_inputs_on_several_threads(shape, threads):
    """Sizes past the single-thread cutoff, with fewer planes than threads too."""
    rng = np.random.default_rng(11)
    cls = nn.BatchNorm2d
    with config_context(threads=threads):
        m, t = pair(cls, shape[1], rng)
        for _ in range(2):
            check_step(m, t, rng.standard_normal(shape) + 2, rng.standard_normal(shape))


def test_float32_statistics_are_accumulated_in_float64():
    """float32 data around 1e4 with unit spread: a float32 running sum (or raw moments)
    would lose the variance; the result must match float64 arithmetic on the same
    float32 values to float32 rounding."""
    rng = np.random.default_rng(5)
    x = (1e4 + rng.standard_normal((512, 4, 33))).astype(np.float32)
    m = nn.BatchNorm1d(4)
    y = m(x)
    x64 = x.astype(F64)
    mean = x64.mean(axis=(0, 2), keepdims=True)
    var = x64.var(axis=(0, 2), keepdims=True)
    ref = (x64 - mean) / np.sqrt(var + 1e-5)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=0, atol=4e-6 * np.abs(ref).max())
    n = x.shape[0] * x.shape[2]
    np.testing.assert_allclose(m.running_var, 0.9 + 0.1 * var.ravel() * n / (n - 1),
                               rtol=1e-6)
    np.testing.assert_allclose(m.running_mean, 0.1 * mean.ravel(), rtol=1e-6)


def test_float32_layer_matches_torch():
    rng = np.random.default_rng(6)
    m = nn.BatchNorm2d(3)
    t = torch.nn.BatchNorm2d(3)
    for _ in range(3):
        x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        m.zero_grad()
        y, dx = m(x), m.backward(dy)
        ty, tdx, (gw, gb) = torch_step(t, x, dy)
        np.testing.assert_allclose(y, ty, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx, tdx, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(m.weight.grad, gw, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(m.bias.grad, gb, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(m.running_var, t.running_var.numpy(), rtol=1e-6)


def test_state_dict_from_torch_model_gives_the_same_outputs():
    rng = np.random.default_rng(8)
    tm = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                             torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 25, 6),
                             torch.nn.BatchNorm1d(6)).double()
    with torch.no_grad():
        tm(torch.from_numpy(rng.standard_normal((8, 2, 5, 5))))  # running stats not trivial
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, dtype=F64), nn.BatchNorm2d(4, dtype=F64),
                      nn.ReLU(), nn.Flatten(), nn.Linear(100, 6, dtype=F64),
                      nn.BatchNorm1d(6, dtype=F64))
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    assert list(m.state_dict()) == list(sd)
    assert "1.num_batches_tracked" in sd and sd["1.num_batches_tracked"].shape == ()
    m.load_state_dict(sd)
    x = rng.standard_normal((3, 2, 5, 5))
    for mode in (False, True):
        m.train(mode)
        tm.train(mode)
        with torch.no_grad():
            np.testing.assert_allclose(m(x), tm(torch.from_numpy(x)).numpy(), **TOL)
    for k, v in tm.state_dict().items():
        np.testing.assert_allclose(m.state_dict()[k], v.numpy(), **TOL)


def test_load_state_dict_with_misshapen_running_stat_changes_nothing():
    m = nn.Sequential(nn.Linear(3, 4, rng=0), nn.BatchNorm1d(4))
    m(np.random.default_rng(0).standard_normal((5, 3)))
    before = m.state_dict()
    for key, bad in [("1.running_var", np.ones(5)), ("1.num_batches_tracked", np.ones(1)),
                     ("1.running_mean", None)]:
        sd = {k: v * 2 for k, v in before.items()}
        if bad is None:
            del sd[key]
        else:
            sd[key] = bad
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            m.load_state_dict(sd)
        for k, v in m.state_dict().items():
            np.testing.assert_array_equal(v, before[k])


def test_predict_uses_running_statistics_and_leaves_them():
    rng = np.random.default_rng(9)
    m = nn.BatchNorm1d(3, dtype=F64)
    m(rng.standard_normal((10, 3)) * 2 + 1)
    stats = {k: v.copy() for k, v in m.state_dict().items()}
    x = rng.standard_normal((4, 3))
    out = nn.predict(m, x)
    ref = (x - stats["running_mean"]) / np.sqrt(stats["running_var"] + 1e-5)
    np.testing.assert_allclose(out, ref, **TOL)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, stats[k])
    assert m.training


def test_one_value_per_channel_is_an_error_only_in_training():
    m = nn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(np.ones((1, 3)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm2d(3)(np.ones((1, 3, 1, 1)))
    assert m.num_batches_tracked == 0
    m.eval()
    np.testing.assert_allclose(m(np.ones((1, 3))), np.full((1, 3), 1 / np.sqrt(1 + 1e-5)),
                               rtol=1e-6)


@pytest.mark.parametrize("shape", [(0, 3), (4, 3, 0)])
def test_empty_batch(shape):
    """As torch: an empty result, the counter advances, the statistics stay."""
    m = nn.BatchNorm1d(3, dtype=F64)
    m.weight.grad = np.full(3, 5.0)
    y = m(np.zeros(shape))
    assert y.shape == shape
    assert m.num_batches_tracked == 1
    np.testing.assert_array_equal(m.running_mean, 0)
    np.testing.assert_array_equal(m.running_var, 1)
    assert m.backward(np.zeros(shape)).shape == shape
    np.testing.assert_array_equal(m.weight.grad, 5.0)     # nothing added
    m.zero_grad()
    m(np.zeros(shape))
    m.backward(np.zeros(shape))
    np.testing.assert_array_equal(m.bias.grad, 0.0)


def test_gradients_accumulate_and_need_input_grad():
    rng = np.random.default_rng(10)
    m = nn.BatchNorm2d(2, dtype=F64)
    x, dy = rng.standard_normal((3, 2, 4, 4)), rng.standard_normal((3, 2, 4, 4))
    m(x)
    assert m.backward(dy, need_input_grad=False) is None
    g1 = m.weight.grad.copy()
    m(x)
    m.backward(dy)
    np.testing.assert_allclose(m.weight.grad, 2 * g1, **TOL)


def test_errors():
    with pytest.raises(ValueError, match=r"\(4, 3, 2, 2\).*\(N, 3\) or \(N, 3, L\)"):
        nn.BatchNorm1d(3)(np.zeros((4, 3, 2, 2)))
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        nn.BatchNorm1d(3)(np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        nn.BatchNorm2d(3)(np.zeros((4, 3, 2)))
    with pytest.raises(RuntimeError, match="before forward"):
        nn.BatchNorm2d(3).backward(np.zeros((1, 3, 2, 2)))
    m = nn.BatchNorm2d(3)
    m(np.ones((2, 3, 2, 2)))
    with pytest.raises(ValueError, match=r"gradient has shape \(2, 3, 2, 1\)"):
        m.backward(np.zeros((2, 3, 2, 1)))
    with pytest.raises(TypeError, match="int64"):
        m(np.ones((2, 3, 2, 2), np.int64))
    for kw, exc in [({"momentum": 1.5}, ValueError), ({"momentum": float("nan")}, ValueError),
                    ({"eps": -1.0}, ValueError), ({"eps": "1"}, TypeError),
                    ({"affine": "yes"}, TypeError), ({"affine": 2}, TypeError), ({"dtype": np.int32}, TypeError),
                    ({"num_features": -1}, ValueError), ({"num_features": 2.0}, TypeError)]:
        kw = {"num_features": 3, **kw}
        with pytest.raises(exc):
            nn.BatchNorm1d(**kw)
    assert repr(nn.BatchNorm1d(3)) == ("BatchNorm1d(3, eps=1e-05, momentum=0.1, affine=True, "
                                       "track_running_stats=True)")


def test_dtype_of_a_layer_without_parameters():
    m = nn.BatchNorm1d(3, affine=False, track_running_stats=False, dtype=F64)
    assert m.parameters() == [] and m.state_dict() == {} and m.dtype == F64
    assert m(np.ones((2, 3), np.float32)).dtype == F64


def test_save_load_round_trip_keeps_buffers(tmp_path):
    rng = np.random.default_rng(12)
    a = nn.Sequential(nn.Linear(3, 4, rng=0), nn.BatchNorm1d(4))
    nbt = a[1].num_batches_tracked
    for _ in range(3):
        a(rng.standard_normal((5, 3)))
    assert a[1].num_batches_tracked is nbt and nbt == 3      # updated in place
    nn.save(a, tmp_path / "m.npz")
    b = nn.Sequential(nn.Linear(3, 4, rng=1), nn.BatchNorm1d(4))
    nn.load(b, tmp_path / "m.npz")
    for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and v.dtype == v2.dtype
        np.testing.assert_array_equal(v, v2)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(nn.predict(a, x), nn.predict(b, x))


def test_fit_updates_running_stats_from_training_batches_only():
    """Validation runs in eval mode: data far from the training data must not move the
    running mean, and its loss uses the running statistics."""
    rng = np.random.default_rng(13)
    X = rng.standard_normal((32, 3))
    y = rng.integers(0, 2, 32)
    m = nn.Sequential(nn.BatchNorm1d(3, dtype=F64), nn.Linear(3, 2, dtype=F64, rng=0))
    ref = nn.Sequential(nn.BatchNorm1d(3, dtype=F64), nn.Linear(3, 2, dtype=F64, rng=0))
    kw = dict(epochs=2, batch_size=8, shuffle=False, progress=False)
    nn.fit(ref, nn.CrossEntropyLoss(), nn.SGD(ref.parameters(), lr=0.1), X, y, **kw)
    h = nn.fit(m, nn.CrossEntropyLoss(), nn.SGD(m.parameters(), lr=0.1), X, y,
               validation=(X + 1000.0, y), **kw)
    for k, v in ref.state_dict().items():
        np.testing.assert_array_equal(m.state_dict()[k], v)
    assert m[0].num_batches_tracked == 8
    assert m.training
    # In eval mode the shifted data are normalised with the running statistics: the loss
    # is huge.  (Batch statistics would have removed the shift.)
    assert h["val_loss"][-1] > 10 * h["loss"][-1]


def test_gradcheck_leaves_running_statistics_alone():
    rng = np.random.default_rng(14)
    m = nn.Sequential(nn.Linear(3, 4, dtype=F64, rng=0), nn.BatchNorm1d(4, dtype=F64))
    m(rng.standard_normal((6, 3)))
    before = m.state_dict()
    assert nn.gradcheck(m, rng.standard_normal((5, 3)))
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_copies_and_pickles_keep_buffers_and_modes():
    import copy
    import pickle
    rng = np.random.default_rng(15)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, dtype=F64, rng=0), nn.BatchNorm2d(3, dtype=F64),
                      nn.Residual(nn.Sequential(nn.Dropout(0.3, rng=1), nn.GELU())),
                      nn.AdaptiveAvgPool2d(1))
    m(rng.standard_normal((4, 2, 5, 5)))
    m.eval()
    x = rng.standard_normal((2, 2, 5, 5))
    y = m(x).copy()
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert not any(c.training for c in clone.modules())
        np.testing.assert_array_equal(clone(x), y)
        assert clone[1].running_mean is not m[1].running_mean
        np.testing.assert_array_equal(clone[1].running_var, m[1].running_var)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Sigmoid, nn.Tanh])
@pytest.mark.parametrize("cls,shape", [(nn.BatchNorm2d, (3, 4, 5, 6)),
                                       (nn.BatchNorm1d, (9, 5)),
                                       (nn.BatchNorm2d, (8, 3, 64, 64))])
@pytest.mark.parametrize("training", [True, False])
def test_fused_activation_matches_separate_layers(act, cls, shape, training):
    """In a Sequential the activation after a BatchNorm runs inside it: the same numbers
    as the two layers run one after the other (ReLU within the kernels' passes)."""
    rng = np.random.default_rng(16)
    c = shape[1]
    fused_bn, _ = pair(cls, c, np.random.default_rng(1))
    plain_bn, _ = pair(cls, c, np.random.default_rng(1))
    for m in (fused_bn, plain_bn):
        m.running_mean[:] = rng.standard_normal(c)
        m.running_var[:] = rng.uniform(0.5, 2, c)
        m.train(training)
    plain_bn.running_mean[:] = fused_bn.running_mean
    plain_bn.running_var[:] = fused_bn.running_var
    fused = nn.Sequential(fused_bn, act())
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    dy.flat[::7] = np.nan      # where ReLU cut the output, a NaN gradient must stay out
    y = fused(x)
    assert fused._plan == [(0, fused_bn, True)]
    dx = fused.backward(dy)
    a = act()
    y_ref = a(plain_bn(x))
    dx_ref = plain_bn.backward(a.backward(dy))
    np.testing.assert_allclose(y, y_ref, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-9, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(fused_bn.weight.grad, plain_bn.weight.grad, rtol=1e-9,
                               atol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(fused_bn.running_var, plain_bn.running_var)


def test_fused_relu_gradcheck_and_torch():
    rng = np.random.default_rng(17)
    m, t = pair(nn.BatchNorm2d, 3, rng)
    model = nn.Sequential(m, nn.ReLU())
    tmodel = torch.nn.Sequential(t, torch.nn.ReLU())
    for _ in range(2):
        x = rng.standard_normal((4, 3, 5, 5))
        dy = rng.standard_normal(x.shape)
        m.zero_grad()
        y, dx = model(x), model.backward(dy)
        ty, tdx, tgrads = torch_step(tmodel, x, dy)
        np.testing.assert_allclose(y, ty, **TOL)
        np.testing.assert_allclose(dx, tdx, **TOL)
        for p, g in zip(m.parameters(), tgrads):
            np.testing.assert_allclose(p.grad, g, **TOL)
    x = rng.standard_normal((3, 3, 2, 3))
    assert nn.gradcheck(model, np.where(np.abs(x) < 0.1, 0.5, x))


# -- eval-mode BatchNorm folded into the Linear or Conv2d before it ---------------------------

def _with_running_stats(model, x, steps=3):
    """Train-mode forwards so that every BatchNorm holds running statistics far from 0/1."""
    model.train()
    for _ in range(steps):
        model.forward(x)
    model.eval()


def _separately(layers, x):
    """The layers one by one (no folding, no fusion): the reference for a folded run."""
    for layer in layers:
        x = layer.forward(x)
    return x


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bias,affine,act", [(False, True, nn.ReLU), (True, True, None),
                                             (True, False, nn.Tanh), (False, True, nn.Sigmoid)])
@pytest.mark.parametrize("kind", ["conv", "conv-stride-groups", "linear"])
def test_eval_batchnorm_folded_matches_layers_and_torch(kind, bias, affine, act, dtype):
    rng = np.random.default_rng(3)
    if kind == "linear":
        first = nn.Linear(13, 7, bias=bias, dtype=dtype, rng=1)
        bn = nn.BatchNorm1d(7, affine=affine, dtype=dtype)
        x = (rng.standard_normal((9, 13)) * 3 + 1).astype(dtype)
    else:
        extra = dict(stride=2, groups=3) if kind == "conv-stride-groups" else {}
        first = nn.Conv2d(6, 9, 3, padding=1, bias=bias, dtype=dtype, rng=1, **extra)
        bn = nn.BatchNorm2d(9, affine=affine, dtype=dtype)
        x = (rng.standard_normal((3, 6, 7, 5)) * 3 + 1).astype(dtype)
    if affine:
        bn.weight.data[...] = rng.uniform(0.5, 2.0, bn.num_features)
        bn.bias.data[...] = rng.standard_normal(bn.num_features)
    layers = [first, bn] + ([act()] if act else [])
    model = nn.Sequential(*layers)
    _with_running_stats(model, x)
    y = model.forward(x).copy()
    assert isinstance(model._plan[0][2], tuple)         # it ran folded
    ref = _separately(layers, x)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(y, ref, **tol)
    # torch, eval mode, same parameters and running statistics
    tl = [(torch.nn.Linear(13, 7, bias=bias) if kind == "linear" else
           torch.nn.Conv2d(6, 9, 3, padding=1, bias=bias, **({} if kind == "conv" else
                                                             dict(stride=2, groups=3)))),
          (torch.nn.BatchNorm1d if kind == "linear" else torch.nn.BatchNorm2d)(
              bn.num_features, affine=affine)]
    if act:
        tl.append({nn.ReLU: torch.nn.ReLU, nn.Tanh: torch.nn.Tanh,
                   nn.Sigmoid: torch.nn.Sigmoid}[act]())
    tm = torch.nn.Sequential(*tl).double()
    sd = {f"0.{k}": torch.from_numpy(np.array(v, np.float64)) for k, v in
          first.state_dict().items()}
    sd.update({f"1.{k}": torch.from_numpy(np.array(v, np.float64 if k != "num_batches_tracked"
                                                   else np.int64))
               for k, v in bn.state_dict().items()})
    tm.load_state_dict(sd)
    tm.eval()
    xt = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    yt = tm(xt)
    np.testing.assert_allclose(y, yt.detach().numpy(), **tol)
    # backward in eval mode: the folded forward is undone, gradients as torch's
    dy = rng.standard_normal(y.shape).astype(dtype)
    model.zero_grad()
    dx = model.backward(dy)
    yt.backward(torch.from_numpy(dy.astype(np.float64)))
    gtol = dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **gtol)
    np.testing.assert_allclose(first.weight.grad, tm[0].weight.grad.numpy(), **gtol)
    if affine:
        np.testing.assert_allclose(bn.weight.grad, tm[1].weight.grad.numpy(), **gtol)
        np.testing.assert_allclose(bn.bias.grad, tm[1].bias.grad.numpy(), **gtol)


def test_batchnorm_is_not_folded_where_it_would_change_the_result():
    """Training mode, no running statistics, a 3-D Linear input (BatchNorm1d's channels are
    then dimension 1, not the features), a BatchNorm not right after the layer, and an
    unbatched convolution input all run the layers one by one, with their usual results or
    errors."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 4, 6, 6))
    conv = nn.Conv2d(4, 4, 3, padding=1, dtype=np.float64, rng=0)
    for bn, mode in ((nn.BatchNorm2d(4, dtype=np.float64), "train"),
                     (nn.BatchNorm2d(4, track_running_stats=False, dtype=np.float64), "eval")):
        model = nn.Sequential(conv, bn)
        model.train() if mode == "train" else model.eval()
        y = model.forward(x)
        assert model._plan[0][2] is False
        np.testing.assert_allclose(y, _separately([conv, bn], x), rtol=1e-12, atol=1e-12)
    lin = nn.Linear(6, 4, dtype=np.float64, rng=0)
    bn1 = nn.BatchNorm1d(4, dtype=np.float64)
    model = nn.Sequential(lin, bn1)
    model.eval()
    x3 = rng.standard_normal((2, 4, 6))
    np.testing.assert_allclose(model.forward(x3), _separately([lin, bn1], x3), rtol=1e-12)
    assert model._plan[0][2] is False
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, dtype=np.float64, rng=0),
                          nn.BatchNorm2d(4, dtype=np.float64))
    model.eval()
    with pytest.raises(ValueError, match="expected \\(N, 4, H, W\\)"):
        model.forward(x[0])     # the same error as without folding


def test_folding_leaves_parameters_and_statistics_untouched():
    rng = np.random.default_rng(5)
    conv = nn.Conv2d(3, 5, 3, dtype=np.float64, rng=0)
    bn = nn.BatchNorm2d(5, dtype=np.float64)
    model = nn.Sequential(conv, bn, nn.ReLU())
    _with_running_stats(model, rng.standard_normal((4, 3, 8, 8)))
    before = {k: np.array(v, copy=True) for k, v in model.state_dict().items()}
    model.forward(rng.standard_normal((2, 3, 8, 8)))
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
