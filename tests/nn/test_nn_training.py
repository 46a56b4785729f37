"""fit / predict: learning a synthetic task, history, batching, progress bar, errors."""
import io

import numpy as np
import pytest

from microtile import nn
from microtile.nn._progress import Progress


def spirals(n_per_class=60, classes=3, seed=0):
    """Interleaved spirals: not linearly separable, so a hidden layer must learn."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(classes):
        r = np.linspace(0.1, 1, n_per_class)
        t = np.linspace(c * 4, (c + 1) * 4, n_per_class) + rng.standard_normal(n_per_class) * 0.2
        xs.append(np.c_[r * np.sin(t), r * np.cos(t)])
        ys.append(np.full(n_per_class, c))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def mlp(dtype=np.float32, seed=0):
    return nn.Sequential(nn.Linear(2, 64, dtype=dtype, rng=seed), nn.ReLU(),
                         nn.Linear(64, 64, dtype=dtype, rng=seed + 1), nn.Tanh(),
                         nn.Linear(64, 3, dtype=dtype, rng=seed + 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mlp_learns_spirals(dtype):
    X, y = spirals()
    model = mlp(dtype)
    opt = nn.Adam(model.parameters(), lr=1e-2)
    hist = nn.fit(model, nn.CrossEntropyLoss(), opt, X, y, epochs=60, batch_size=32, rng=0,
                  progress=False)
    assert set(hist) == {"loss", "accuracy"}
    assert len(hist["loss"]) == 60
    assert hist["loss"][-1] < 0.3 * hist["loss"][0]
    acc = np.mean(nn.predict(model, X).argmax(1) == y)
    assert acc > 0.9, acc
    assert hist["accuracy"][-1] > 0.85


def test_regression_with_mse_and_sgd():
    rng = np.random.default_rng(1)
    X = rng.uniform(-1, 1, (256, 3))
    y = np.c_[np.sin(2 * X[:, 0]) + X[:, 1] * X[:, 2]]
    model = nn.Sequential(nn.Linear(3, 32, dtype=np.float64, rng=0), nn.Tanh(),
                          nn.Linear(32, 1, dtype=np.float64, rng=1))
    opt = nn.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hist = nn.fit(model, nn.MSELoss(), opt, X, y, epochs=80, batch_size=50, rng=0,
                  progress=False)
    assert set(hist) == {"loss"}
    assert hist["loss"][-1] < 0.05 * hist["loss"][0]


def test_mse_with_integer_targets():
    rng = np.random.default_rng(2)
    X = rng.uniform(-1, 1, (64, 2))
    y = (X[:, :1] > 0).astype(np.int64)
    model = nn.Sequential(nn.Linear(2, 8, dtype=np.float64, rng=0), nn.Tanh(),
                          nn.Linear(8, 1, dtype=np.float64, rng=1))
    hist = nn.fit(model, nn.MSELoss(), nn.Adam(model.parameters(), lr=1e-2), X, y, epochs=30,
                  batch_size=16, rng=0, progress=False)
    assert set(hist) == {"loss"} and hist["loss"][-1] < 0.5 * hist["loss"][0]


def test_history_with_validation_and_partial_batch():
    X, y = spirals(n_per_class=35)  # 105 samples: batches of 32 leave 9
    model = mlp()
    opt = nn.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen = []
    orig = model.forward

    def spy(x):
        seen.append(x.shape[0])
        return orig(x)
    model.forward = spy
    hist = nn.fit(model, nn.CrossEntropyLoss(), opt, X, y, epochs=3, batch_size=32, rng=0,
                  progress=False, validation=(X[:50], y[:50]))
    assert set(hist) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 3 for v in hist.values())
    # Per epoch: three full batches, the partial batch, then one validation batch.
    assert seen == [32, 32, 32, 9, 50] * 3
    assert all(0 <= a <= 1 for a in hist["accuracy"] + hist["val_accuracy"])


def test_epoch_loss_is_the_sample_weighted_mean():
    X, y = spirals(n_per_class=5)  # 15 samples
    model = mlp()
    opt = nn.SGD(model.parameters(), lr=0.0)  # lr 0: the model does not change
    hist = nn.fit(model, nn.CrossEntropyLoss(), opt, X, y, epochs=1, batch_size=4,
                  shuffle=False, progress=False)
    full = nn.CrossEntropyLoss().forward(nn.predict(model, X), y)
    np.testing.assert_allclose(hist["loss"][0], full, rtol=1e-5)
    acc = np.mean(nn.predict(model, X).argmax(1) == y)
    assert hist["accuracy"][0] == pytest.approx(acc)


def test_shuffle_is_reproducible_with_rng():
    X, y = spirals(n_per_class=20)
    results = []
    for _ in range(2):
        model = mlp(seed=3)
        opt = nn.SGD(model.parameters(), lr=0.05)
        nn.fit(model, nn.CrossEntropyLoss(), opt, X, y, epochs=2, batch_size=16,
               rng=np.random.default_rng(5), progress=False)
        results.append(model[0].weight.data.copy())
    np.testing.assert_array_equal(results[0], results[1])


def test_fit_does_not_modify_inputs():
    X, y = spirals(n_per_class=10)
    X0, y0 = X.copy(), y.copy()
    X.setflags(write=False)
    model = mlp()
    nn.fit(model, nn.CrossEntropyLoss(), nn.SGD(model.parameters(), lr=0.1), X, y,
           epochs=2, progress=False)
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(y, y0)


def test_predict_batches_and_copies():
    X, _ = spirals(n_per_class=100)
    model = mlp()
    full = model(X).copy()
    out = nn.predict(model, X, batch_size=7)
    np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-6)
    out2 = nn.predict(model, X[:3])
    np.testing.assert_allclose(out[:7], nn.predict(model, X[:7]), rtol=1e-5, atol=1e-6)
    assert not np.shares_memory(out2, model[4]._y2)
    assert nn.predict(model, X[:0]).shape == (0, 3)
    assert nn.predict(model, X.astype(np.float64)).dtype == np.float32


class FakeTTY(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self._tty = tty

    def isatty(self):
        return self._tty


def test_progress_bar_only_on_a_terminal():
    for tty, enabled, drawn in [(True, True, True), (False, True, False), (True, False, False)]:
        stream = FakeTTY(tty)
        bar = Progress(100, 2, enabled=enabled, stream=stream)
        bar.start_epoch(0)
        bar.update(50, 0.5, 0.9, force=True)
        bar.end_epoch(100, 0.4, 0.95, " val_loss 0.3")
        text = stream.getvalue()
        assert bool(text) == drawn
        if drawn:
            assert "epoch 1/2" in text and "100/100" in text and "val_loss 0.3" in text
            assert "\r" in text and text.endswith("\n")


def test_fit_prints_nothing_when_not_a_tty(capsys):
    X, y = spirals(n_per_class=10)
    model = mlp()
    nn.fit(model, nn.CrossEntropyLoss(), nn.SGD(model.parameters(), lr=0.1), X, y,
           epochs=1, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_fit_errors():
    X, y = spirals(n_per_class=10)
    model = mlp()
    loss = nn.CrossEntropyLoss()
    opt = nn.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="samples"):
        nn.fit(model, loss, opt, X, y[:-1], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        nn.fit(model, loss, opt, X, y, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="no samples"):
        nn.fit(model, loss, opt, X[:0], y[:0], progress=False)
    with pytest.raises(TypeError):
        nn.fit(model, loss, opt, X.astype(int), y, progress=False)
    with pytest.raises(ValueError, match="validation"):
        nn.fit(model, loss, opt, X, y, validation=X, progress=False)
    bad = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(7, 3))
    with pytest.raises(ValueError, match="layer 2"):
        nn.fit(bad, loss, nn.SGD(bad.parameters(), lr=0.1), X, y, progress=False)
