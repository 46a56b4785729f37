"""Recurrent layers (RNN, LSTM, GRU) and LastStep: torch parity in float64 (outputs, final
states, every gradient), finite differences, layouts, float32 accuracy, large inputs,
state dicts, composition with Sequential and fit, errors.

Tolerances come from the arithmetic.  A result's rounding error is at most about
``k * eps`` relative to its terms' magnitudes for each sum of k rounded products on its way
(the GEMM bound).  Along the recurrence each step adds one step's sums (input_size +
hidden_size terms) in every layer, and an error made at one step reaches later ones scaled
by at most a constant (the gate functions and their derivatives have slopes of at most 1,
the weights are at most 1/sqrt(hidden_size)); a weight gradient then adds one sum over all
T*N rows.  So ``depth = (input_size + hidden_size) * T * num_layers + T * N`` and the bound
is ``SLACK * depth * eps * max(1, |reference|)``, SLACK covering the constant and the
inputs' size (standard normal, |x| < 5).  Observed errors stay two to three orders of
magnitude below it, and any wrong formula is off by far more.
"""
import pickle
import threading
import warnings

import numpy as np
import pytest

import microtile
from microtile import config_context, nn

from _helpers import step_allocation

torch = pytest.importorskip("torch")

F64 = np.float64
SLACK = 8
CELLS = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")


def make(cell, I, H, **kw):
    """(ours, torch's) with the same weights (ours drawn, then loaded into torch)."""
    dt = kw.pop("dtype", F64)
    extra = {}
    if cell.startswith("RNN"):
        extra["nonlinearity"] = cell[4:].lower()
    name = "RNN" if cell.startswith("RNN") else cell
    ours = getattr(nn, name)(I, H, dtype=dt, rng=kw.pop("rng", 0), **extra, **kw)
    ref = getattr(torch.nn, name)(I, H, dtype=torch.float64, **extra, **kw)
    ref.load_state_dict({k: torch.from_numpy(np.asarray(v, F64))
                         for k, v in ours.state_dict().items()})
    return ours, ref


def bound(dtype, depth, ref, scale=1.0):
    return SLACK * depth * float(np.finfo(dtype).eps) * scale * max(1.0, float(np.abs(ref).max(
        initial=0.0)))


def check(name, got, ref, tol):
    got = np.asarray(got, F64)
    ref = np.asarray(ref, F64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape}, expected {ref.shape}"
    assert np.isfinite(got).all(), f"{name}: not finite"
    if got.size:
        err = np.abs(got - ref)
        i = np.unravel_index(np.argmax(err), err.shape)
        assert err[i] <= tol, f"{name}: |{got[i]} - {ref[i]}| = {err[i]:.3g} > {tol:.3g} at {i}"


def run_pair(cell, T, N, I, H, *, num_layers=1, batch_first=False, with_h0=False, rng,
             dtype=F64, x_scale=1.0, unbatched=False, bias=True):
    """Forward and backward through ours and torch's on the same data; returns a list of
    (name, ours, torch's) and the chain depth of the arithmetic."""
    ours, ref = make(cell, I, H, num_layers=num_layers, batch_first=batch_first, bias=bias,
                     dtype=dtype, rng=int(rng.integers(1 << 30)))
    L = num_layers
    if unbatched:
        xshape, sshape, yshape = (T, I), (L, H), (T, H)
    else:
        xshape = (N, T, I) if batch_first else (T, N, I)
        sshape = (L, N, H)
        yshape = (N, T, H) if batch_first else (T, N, H)
    # Data representable in ``dtype`` so that both sides start from the same numbers.
    x = (rng.standard_normal(xshape) * x_scale).astype(dtype)
    dy = rng.standard_normal(yshape).astype(dtype)
    lstm = cell == "LSTM"
    xt = torch.tensor(x.astype(F64), requires_grad=True)
    if with_h0:
        h0 = rng.standard_normal(sshape).astype(dtype)
        c0 = rng.standard_normal(sshape).astype(dtype)
        h0t = torch.tensor(h0.astype(F64), requires_grad=True)
        c0t = torch.tensor(c0.astype(F64), requires_grad=True)
        y = ours(x, (h0, c0) if lstm else h0)
        yt, st = ref(xt, (h0t, c0t) if lstm else h0t)
    else:
        y = ours(x)
        yt, st = ref(xt)
    pairs = [("output", y.copy(), yt.detach().numpy())]
    pairs.append(("h_n", ours.h_n.copy(), (st[0] if lstm else st).detach().numpy()))
    if lstm:
        pairs.append(("c_n", ours.c_n.copy(), st[1].detach().numpy()))
    dx = ours.backward(dy)
    yt.backward(torch.from_numpy(dy.astype(F64)))
    pairs.append(("dx", dx.copy(), xt.grad.numpy()))
    tparams = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        pairs.append((name + ".grad", p.grad.copy(), tparams[name].grad.numpy()))
    if with_h0:
        pairs.append(("dh0", ours.dh0.copy(), h0t.grad.numpy()))
        if lstm:
            pairs.append(("dc0", ours.dc0.copy(), c0t.grad.numpy()))
    else:
        assert ours.dh0 is None
    depth = (I + H) * T * L + T * N
    return pairs, depth


def assert_pairs(pairs, depth, dtype, scale=1.0):
    for name, got, ref in pairs:
        check(name, got, ref, bound(dtype, depth, ref, scale))


# --- torch parity in float64 ---------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
def test_matches_torch(cell, num_layers, batch_first, with_h0, rng):
    pairs, depth = run_pair(cell, 5, 3, 4, 7, num_layers=num_layers, batch_first=batch_first,
                            with_h0=with_h0, rng=rng)
    assert_pairs(pairs, depth, F64)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("T,N,I,H", [(1, 1, 1, 1), (1, 4, 3, 7), (6, 1, 5, 63), (3, 2, 1, 1),
                                     (4, 5, 9, 63), (2, 8, 4, 17), (3, 13, 5, 40),
                                     (2, 32, 3, 33)])
def test_odd_sizes_match_torch(cell, T, N, I, H, rng):
    # Batches of 8, 13 and 32 end in a partial group of rows (2, 1 and 2 of the 6-row
    # micro-tile): the step's product runs the rows kernel there.
    for batch_first, with_h0, layers in ((False, True, 2), (True, False, 1)):
        pairs, depth = run_pair(cell, T, N, I, H, num_layers=layers, batch_first=batch_first,
                                with_h0=with_h0, rng=rng)
        assert_pairs(pairs, depth, F64)


@pytest.mark.parametrize("cell", CELLS)
def test_without_bias_matches_torch(cell, rng):
    pairs, depth = run_pair(cell, 4, 3, 5, 6, num_layers=2, with_h0=True, bias=False, rng=rng)
    names = [p[0] for p in pairs]
    assert not any(n.startswith("bias") for n in names)
    assert_pairs(pairs, depth, F64)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("with_h0", [False, True])
def test_unbatched_input_matches_torch(cell, with_h0, rng):
    pairs, depth = run_pair(cell, 5, 1, 3, 4, num_layers=2, with_h0=with_h0, unbatched=True,
                            rng=rng)
    assert_pairs(pairs, depth, F64)


# --- finite differences --------------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_gradcheck(cell, batch_first, rng):
    ours, _ = make(cell, 3, 4, num_layers=2, batch_first=batch_first, rng=7)
    x = rng.standard_normal((2, 4, 3) if batch_first else (4, 2, 3))
    if cell == "RNN_RELU":
        # Finite differences (steps of 1e-6) must not cross ReLU's kink: every
        # pre-activation of this draw is checked to be well away from zero.
        xt = x.transpose(1, 0, 2) if batch_first else x
        assert np.abs(relu_rnn_preactivations(ours, xt)).min() > 1e-3
    assert nn.gradcheck(ours, x)


def relu_rnn_preactivations(layer, x):
    """Every pre-activation of a ReLU RNN over the time-major ``x``, computed in NumPy."""
    pre = []
    for k in range(layer.num_layers):
        w_ih = getattr(layer, f"weight_ih_l{k}").data
        w_hh = getattr(layer, f"weight_hh_l{k}").data
        b = getattr(layer, f"bias_ih_l{k}").data + getattr(layer, f"bias_hh_l{k}").data
        h = np.zeros((x.shape[1], w_hh.shape[1]))
        outs = []
        for t in range(x.shape[0]):
            a = x[t] @ w_ih.T + h @ w_hh.T + b
            pre.append(a)
            h = np.maximum(a, 0)
            outs.append(h)
        x = np.stack(outs)
    return np.concatenate(pre)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN_TANH"])
def test_gradcheck_initial_state(cell, rng):
    """dh0 (and dc0) against finite differences in h0 (and c0)."""
    ours, _ = make(cell, 2, 3, num_layers=2, rng=3)
    x = rng.standard_normal((3, 2, 2))
    h0 = rng.standard_normal((2, 2, 3))
    c0 = rng.standard_normal((2, 2, 3))
    lstm = cell == "LSTM"

    def of_h0(h):
        y = ours(x, (h, c0) if lstm else h)

        def vjp(dy):
            ours.backward(dy)
            return ours.dh0.copy()
        return y, vjp
    assert nn.gradcheck(of_h0, h0)
    if lstm:
        def of_c0(c):
            y = ours(x, (h0, c))

            def vjp(dy):
                ours.backward(dy)
                return ours.dc0.copy()
            return y, vjp
        assert nn.gradcheck(of_c0, c0)


# --- layouts --------------------------------------------------------------------------------

def _layouts(a):
    """Views equal to ``a`` with other memory layouts."""
    big = np.full(tuple(2 * d + 1 for d in a.shape), np.nan, a.dtype)
    strided = big[::2, ::2, ::2][:a.shape[0], :a.shape[1], :a.shape[2]]
    strided[...] = a
    neg = a[::-1, :, ::-1].copy()[::-1, :, ::-1]
    ro = a.copy()
    ro.flags.writeable = False
    return {"F": np.asfortranarray(a), "strided": strided, "negative": neg, "readonly": ro}


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_layout_does_not_change_results(cell, batch_first, rng):
    ours, _ = make(cell, 3, 5, num_layers=2, batch_first=batch_first, rng=1)
    x = rng.standard_normal((4, 6, 3))
    dy = rng.standard_normal((4, 6, 5))
    y_ref = ours(x).copy()
    dx_ref = ours.backward(dy).copy()
    grads_ref = [p.grad.copy() for p in ours.parameters()]
    for name, xl in _layouts(x).items():
        for dname, dyl in (("C", dy), (name, _layouts(dy)[name])):
            ours.zero_grad()
            x_before = np.array(xl)
            y = ours(xl)
            np.testing.assert_array_equal(y, y_ref, err_msg=f"x {name}")
            dx = ours.backward(dyl)
            np.testing.assert_array_equal(dx, dx_ref, err_msg=f"x {name}, dy {dname}")
            for p, g in zip(ours.parameters(), grads_ref):
                np.testing.assert_array_equal(p.grad, g, err_msg=f"x {name}, dy {dname}")
            np.testing.assert_array_equal(xl, x_before)     # inputs are never modified


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_initial_state_layout_does_not_change_results(cell, rng):
    ours, _ = make(cell, 3, 5, num_layers=2, rng=2)
    x = rng.standard_normal((4, 3, 3))
    h0 = rng.standard_normal((2, 3, 5))
    c0 = rng.standard_normal((2, 3, 5))
    lstm = cell == "LSTM"
    y_ref = ours(x, (h0, c0) if lstm else h0).copy()
    for name, h in _layouts(h0).items():
        c = _layouts(c0)[name]
        np.testing.assert_array_equal(ours(x, (h, c) if lstm else h), y_ref, err_msg=name)


# --- float32 --------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_float32_accuracy_against_float64_torch(cell, batch_first, rng):
    pairs, depth = run_pair(cell, 7, 4, 6, 9, num_layers=2, batch_first=batch_first,
                            with_h0=True, rng=rng, dtype=np.float32)
    for name, got, _ in pairs:
        assert got.dtype == np.float32, name
    assert_pairs(pairs, depth, np.float32)


def test_float64_input_to_float32_layer_computes_in_float32(rng):
    lstm = nn.LSTM(3, 4, rng=0)
    x = rng.standard_normal((2, 3, 3))
    y = lstm(x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, lstm(x.astype(np.float32)))


# --- large inputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [np.float32, F64])
def test_large_inputs_saturate_without_warnings(cell, dtype, rng):
    """|x| ~ 1e3 drives the gates deep into saturation: no overflow warning, no NaN, and
    the same numbers as torch (errors scale with the pre-activations' size)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            pairs, depth = run_pair(cell, 6, 3, 4, 5, num_layers=2, with_h0=True, rng=rng,
                                    dtype=dtype, x_scale=1e3)
    for name, got, _ in pairs:
        assert np.isfinite(got).all(), name
    assert_pairs(pairs, depth, dtype, scale=1e3)


# --- zero sizes -----------------------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_zero_batch_and_zero_steps(cell, rng):
    ours, _ = make(cell, 3, 4, num_layers=2, batch_first=True)
    y = ours(np.zeros((0, 5, 3)))
    assert y.shape == (0, 5, 4) and ours.h_n.shape == (2, 0, 4)
    assert ours.backward(np.zeros((0, 5, 4))).shape == (0, 5, 3)
    # No steps: the final state is the initial one, and its gradient is zero.
    h0 = rng.standard_normal((2, 3, 4))
    c0 = rng.standard_normal((2, 3, 4))
    y = ours(np.zeros((3, 0, 3)), (h0, c0) if cell == "LSTM" else h0)
    assert y.shape == (3, 0, 4)
    np.testing.assert_array_equal(ours.h_n, h0)
    if cell == "LSTM":
        np.testing.assert_array_equal(ours.c_n, c0)
    ours.zero_grad()
    assert ours.backward(np.zeros((3, 0, 4))).shape == (3, 0, 3)
    np.testing.assert_array_equal(ours.dh0, 0)
    for p in ours.parameters():
        np.testing.assert_array_equal(p.grad, 0)


# --- protocol -------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", CELLS)
def test_backward_accumulates_and_need_input_grad(cell, rng):
    ours, _ = make(cell, 3, 4, num_layers=2)
    x = rng.standard_normal((5, 2, 3))
    dy = rng.standard_normal((5, 2, 4))
    ours(x)
    ours.backward(dy)
    once = [p.grad.copy() for p in ours.parameters()]
    ours(x)
    assert ours.backward(dy, need_input_grad=False) is None
    for p, g in zip(ours.parameters(), once):
        np.testing.assert_allclose(p.grad, 2 * g, rtol=1e-14, atol=1e-15)


def test_backward_before_forward_and_wrong_gradient_shape():
    lstm = nn.LSTM(3, 4)
    with pytest.raises(RuntimeError, match="before forward"):
        lstm.backward(np.zeros((2, 1, 4)))
    lstm(np.zeros((2, 1, 3), np.float32))
    with pytest.raises(ValueError, match=r"LSTM\(3, 4\).*\(2, 1, 5\)"):
        lstm.backward(np.zeros((2, 1, 5)))
    with pytest.raises(RuntimeError, match="before forward"):
        nn.LastStep().backward(np.zeros((2, 3)))


def test_state_carried_between_calls_equals_one_long_sequence(rng):
    """Feeding h_n, c_n back as the next call's initial state continues the sequence."""
    lstm = nn.LSTM(3, 5, num_layers=2, dtype=F64, rng=2)
    x = rng.standard_normal((8, 2, 3))
    whole = lstm(x).copy()
    first = lstm(x[:5]).copy()
    second = lstm(x[5:], (lstm.h_n, lstm.c_n))
    np.testing.assert_allclose(np.concatenate([first, second]), whole, rtol=0, atol=1e-15)


@pytest.mark.parametrize("cell", CELLS)
def test_initialisation_and_names(cell):
    ours, ref = make(cell, 3, 16, num_layers=2)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for name, p in ours.named_parameters():
        assert p.shape == tuple(ref.state_dict()[name].shape), name
        assert np.abs(p.data).max() <= 1 / 4 and np.abs(p.data).max() > 0.2, name
    assert ours.dtype == F64
    assert nn.LSTM(3, 4).dtype == np.float32
    a = nn.GRU(3, 4, rng=5).state_dict()
    b = nn.GRU(3, 4, rng=5).state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("cell", CELLS)
def test_torch_state_dict_loads_and_gives_the_same_outputs(cell, rng):
    torch.manual_seed(0)
    name = "RNN" if cell.startswith("RNN") else cell
    extra = {"nonlinearity": cell[4:].lower()} if cell.startswith("RNN") else {}
    ref = getattr(torch.nn, name)(4, 6, num_layers=2, batch_first=True, dtype=torch.float64,
                                  **extra)
    ours = getattr(nn, name)(4, 6, num_layers=2, batch_first=True, dtype=F64, **extra)
    ours.load_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    x = rng.standard_normal((3, 5, 4))
    with torch.no_grad():
        yt, _ = ref(torch.from_numpy(x))
    check("output", ours(x), yt.numpy(), bound(F64, (4 + 6) * 5 * 2 + 5 * 3, yt.numpy()))
    # And the model round-trips through save/load (keys, shapes, values).
    copy = getattr(nn, name)(4, 6, num_layers=2, batch_first=True, dtype=F64, rng=1, **extra)
    copy.load_state_dict(ours.state_dict())
    np.testing.assert_array_equal(copy(x), ours(x))


def test_save_and_load_a_sequence_model(tmp_path, rng):
    model = nn.Sequential(nn.GRU(3, 4, num_layers=2, batch_first=True, dtype=F64, rng=0),
                          nn.LastStep(batch_first=True), nn.Linear(4, 2, dtype=F64, rng=1))
    path = tmp_path / "seq.npz"
    nn.save(model, path)
    other = nn.Sequential(nn.GRU(3, 4, num_layers=2, batch_first=True, dtype=F64, rng=5),
                          nn.LastStep(batch_first=True), nn.Linear(4, 2, dtype=F64, rng=6))
    nn.load(other, path)
    x = rng.standard_normal((2, 5, 3))
    np.testing.assert_array_equal(other(x), model(x))
    with pytest.raises(ValueError, match="weight_hh_l1"):
        nn.load(nn.Sequential(nn.GRU(3, 4, batch_first=True), nn.LastStep(batch_first=True),
                              nn.Linear(4, 2)), path)


def test_pickle_and_threads(rng):
    """A pickled layer computes the same; threads running one layer get their own results."""
    gru = nn.GRU(3, 8, num_layers=2, dtype=F64, rng=4)
    clone = pickle.loads(pickle.dumps(gru))
    xs = [rng.standard_normal((6, 2, 3)) for _ in range(4)]
    expected = [clone(x).copy() for x in xs]
    results = {}

    def work(i):
        for _ in range(20):
            y = gru(xs[i])
            results[i] = (y.copy(), gru.h_n.copy())
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        np.testing.assert_array_equal(results[i][0], expected[i])
        np.testing.assert_array_equal(results[i][1][-1], expected[i][-1])


# --- LastStep, Sequential, fit --------------------------------------------------------------

@pytest.mark.parametrize("batch_first", [False, True])
def test_last_step(batch_first, rng):
    x = rng.standard_normal((4, 5, 3))
    layer = nn.LastStep(batch_first=batch_first)
    y = layer(x)
    np.testing.assert_array_equal(y, x[:, -1] if batch_first else x[-1])
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    expect = np.zeros_like(x)
    if batch_first:
        expect[:, -1] = dy
    else:
        expect[-1] = dy
    np.testing.assert_array_equal(dx, expect)
    assert nn.gradcheck(layer, x)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_sequence_classifier_matches_torch(cell, rng):
    """Sequential(cell, LastStep, Linear): keys, outputs and every gradient as torch's."""
    Rec = getattr(nn, cell)
    model = nn.Sequential(Rec(3, 6, num_layers=2, batch_first=True, dtype=F64, rng=0),
                          nn.LastStep(batch_first=True), nn.Linear(6, 4, dtype=F64, rng=1))

    class Ref(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rec = getattr(torch.nn, cell)(3, 6, num_layers=2, batch_first=True,
                                               dtype=torch.float64)
            self.fc = torch.nn.Linear(6, 4, dtype=torch.float64)

        def forward(self, x):
            return self.fc(self.rec(x)[0][:, -1])
    ref = Ref()
    sd = model.state_dict()
    assert [k for k in sd if k.startswith("0.")] == [
        "0." + k for k in ref.rec.state_dict()]
    ref.rec.load_state_dict({k[2:]: torch.from_numpy(v) for k, v in sd.items()
                             if k.startswith("0.")})
    ref.fc.load_state_dict({k[2:]: torch.from_numpy(v) for k, v in sd.items()
                            if k.startswith("2.")})
    x = rng.standard_normal((5, 7, 3))
    dy = rng.standard_normal((5, 4))
    y = model(x)
    dx = model.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    yt = ref(xt)
    yt.backward(torch.from_numpy(dy))
    depth = (3 + 6) * 7 * 2 + 7 * 5 + 6
    check("output", y, yt.detach().numpy(), bound(F64, depth, yt.detach().numpy()))
    check("dx", dx, xt.grad.numpy(), bound(F64, depth, xt.grad.numpy()))
    tg = {f"0.{k}": v.grad.numpy() for k, v in ref.rec.named_parameters()}
    tg.update({f"2.{k}": v.grad.numpy() for k, v in ref.fc.named_parameters()})
    for name, p in model.named_parameters():
        check(name, p.grad, tg[name], bound(F64, depth, tg[name]))


def test_fit_learns_a_sequence_task():
    """Whether the first step's feature is positive, read at the last step: only a layer
    that carries state through the sequence can learn it."""
    data = np.random.default_rng(0)
    X = data.standard_normal((256, 8, 2)).astype(np.float32)
    y = (X[:, 0, 0] > 0).astype(np.int64)
    model = nn.Sequential(nn.LSTM(2, 12, batch_first=True, rng=1),
                          nn.LastStep(batch_first=True), nn.Linear(12, 2, rng=2))
    opt = nn.Adam(model.parameters(), lr=0.03)
    hist = nn.fit(model, nn.CrossEntropyLoss(), opt, X, y, epochs=40, batch_size=32, rng=3,
                  progress=False)
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]
    assert hist["accuracy"][-1] >= 0.9
    pred = nn.predict(model, X).argmax(axis=1)
    assert (pred == y).mean() >= 0.9


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_training_step_allocates_no_arrays(cell):
    """Once shapes are known a training step reuses every buffer (gates, states, stacked
    gate gradients, the batch-first copies): the traced peak over three steps stays far
    below one gate array (20 x 32 x 4*64 float32 = 640 KiB for the LSTM)."""
    rng = np.random.default_rng(16)
    model = nn.Sequential(getattr(nn, cell)(16, 64, num_layers=2, batch_first=True, rng=0),
                          nn.LastStep(batch_first=True), nn.Linear(64, 5, rng=1))
    x = rng.standard_normal((32, 20, 16)).astype(np.float32)
    labels = rng.integers(0, 5, 32)
    opt = nn.Adam(model.parameters())
    assert step_allocation(model, nn.CrossEntropyLoss(), opt, x, labels) < 16 * 1024


@pytest.mark.parametrize("cell", CELLS)
def test_gate_pass_split_over_threads_matches_torch(cell, rng):
    """A step with N * gates * H >= 2**15 elements splits its gate pass over the threads;
    the result is torch's as on one thread (forced to 2 threads whatever the machine)."""
    H = 128 if cell.startswith("RNN") else 64
    N = 2 ** 15 // H + 3      # not a multiple of the thread count: uneven row blocks
    if cell == "LSTM":
        N = 2 ** 15 // (4 * H) + 3
    elif cell == "GRU":
        N = 2 ** 15 // (3 * H) + 3
    with config_context(threads=2):
        pairs, depth = run_pair(cell, 3, N, 5, H, with_h0=True, rng=rng)
    assert_pairs(pairs, depth, F64)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("isa", microtile.available_isas())
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("N,H", [(1, 130), (6, 17), (7, 40), (13, 9), (50, 33), (50, 520)])
def test_fused_step_row_groups_match_torch(cell, isa, threads, N, H, rng):
    """The fused steps' row cases on both kernel sets: batch below the micro-tile's rows (dot
    products on W_hh's rows; H = 130 puts batch 1 on two threads), whole row groups, a
    partial last group (the rows micro-kernel on AVX2, the whole group ending at the last
    row on the portable set), more groups than one item takes (H = 520: 33 blocks of 16
    units, several row groups per item on two threads, the last item partial), and blocks
    of units past H."""
    with config_context(isa=isa, threads=threads):
        pairs, depth = run_pair(cell, 4, N, 3, H, with_h0=True, rng=rng)
    assert_pairs(pairs, depth, F64)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_any_thread_count_gives_the_same_bits(cell):
    """A step's items are claimed from both ends (the caller from the front, helpers from
    the back): every item runs once whatever the team, so 1 to 4 threads (more than the
    cores: helpers share them) give the same bits, forward and backward, for 2 layers
    (the biases' column sums to a float32 ulp)."""
    x = np.random.default_rng(3).standard_normal((20, 33, 40)).astype(np.float32)
    layer = getattr(nn, cell)(40, 70, num_layers=2, rng=1)
    results = []
    for threads in (1, 2, 3, 4):
        with config_context(threads=threads):
            layer.zero_grad()
            y = layer.forward(x).copy()
            dx = layer.backward(np.ones_like(y)).copy()
            grads = [(n, p.grad.copy()) for n, p in layer.named_parameters()]
        results.append((y, dx, grads))
    for y, dx, grads in results[1:]:
        np.testing.assert_array_equal(y, results[0][0])
        np.testing.assert_array_equal(dx, results[0][1])
        for (name, g), (_, g0) in zip(grads, results[0][2]):
            if name.startswith("bias"):
                # Column sums over threads' float64 partials, rounded once to float32: the
                # order of the partials may move the rounding by one float32 ulp.
                np.testing.assert_allclose(g, g0, rtol=0,
                                           atol=np.finfo(np.float32).eps * np.abs(g0).max())
            else:
                np.testing.assert_array_equal(g, g0, err_msg=name)


# --- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_input_errors_name_the_layer(cell):
    layer = getattr(nn, cell)(3, 4, num_layers=2)
    with pytest.raises(ValueError, match=rf"{cell}\(3, 4, num_layers=2\).*3-D"):
        layer(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=rf"{cell}\(3, 4, num_layers=2\).*3-D"):
        layer(np.zeros((1, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match=rf"{cell}\(3, 4, num_layers=2\).*input_size 3"):
        layer(np.zeros((2, 2, 5), np.float32))
    with pytest.raises(TypeError, match="int64"):
        layer(np.zeros((2, 2, 3), np.int64))
    bad_h = np.zeros((1, 2, 4), np.float32)
    with pytest.raises((ValueError, TypeError), match=r"\(1, 2, 4\)|pair"):
        layer(np.zeros((2, 2, 3), np.float32), (bad_h, bad_h) if cell == "LSTM" else bad_h)
    with pytest.raises(ValueError, match=r"Sequential layer 0 \(" + cell):
        nn.Sequential(layer)(np.zeros((2, 2, 5), np.float32))


def test_lstm_initial_state_must_be_a_pair():
    lstm = nn.LSTM(3, 4)
    with pytest.raises(TypeError, match="pair"):
        lstm(np.zeros((2, 1, 3), np.float32), np.zeros((1, 1, 4)))


def test_constructor_errors():
    with pytest.raises(ValueError, match="hidden_size"):
        nn.LSTM(3, 0)
    with pytest.raises(ValueError, match="input_size"):     # torch refuses 0 too (fuzz)
        nn.LSTM(0, 4)
    with pytest.raises(ValueError, match="num_layers"):
        nn.GRU(3, 4, num_layers=0)
    with pytest.raises(TypeError, match="input_size"):
        nn.RNN(3.5, 4)
    with pytest.raises(ValueError, match="nonlinearity"):
        nn.RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(TypeError, match="float16"):
        nn.LSTM(3, 4, dtype=np.float16)
    with pytest.raises(ValueError, match="LastStep"):
        nn.LastStep()(np.zeros((0, 2, 3)))
    with pytest.raises(ValueError, match="LastStep"):
        nn.LastStep()(np.zeros((2, 3)))
    assert repr(nn.RNN(3, 4, nonlinearity="relu", bias=False)) == (
        "RNN(3, 4, bias=False, nonlinearity='relu')")


def test_sequence_example_trains_like_torch(capsys):
    """examples/sequence_digits.py: in float64 the per-epoch losses of microtile and torch
    (same weights, same batches) print the same to their 6 decimals (one unit of the last
    printed digit allowed for rounding at a .5 boundary)."""
    pytest.importorskip("sklearn")
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "sequence_digits.py")
    spec = importlib.util.spec_from_file_location("sequence_digits", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    # One thread: torch's OpenMP team spins for seconds per step on a loaded 2-core
    # machine.  The example sets both libraries' thread counts; put them back afterwards.
    threads = (microtile.get_num_threads(), torch.get_num_threads())
    try:
        for cell in ("lstm", "gru"):
            assert example.main(["--cell", cell, "--epochs", "2", "--hidden", "8",
                                 "--dtype", "float64", "--threads", "1"]) == 0
            rows = [line.split() for line in capsys.readouterr().out.splitlines()
                    if line.split() and line.split()[0].isdigit()]
            assert len(rows) == 2
            for _, ours, theirs in rows:
                assert abs(float(ours) - float(theirs)) <= 1.0000001e-6, (cell, ours, theirs)
    finally:
        microtile.set_num_threads(threads[0])
        torch.set_num_threads(threads[1])
