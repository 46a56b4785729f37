"""fit with a scheduler, callbacks, EarlyStopping and a progress callable.

The figures EarlyStopping watches come from a scripted loss (a fixed value per epoch and a
zero gradient), and the weights from SGD's weight decay alone, so which epoch stops, which
is best and what the weights were then are all known exactly."""
import numpy as np
import pytest

from microtile import nn
from microtile.nn import lr_scheduler as sched

X = np.linspace(-1, 1, 16).reshape(8, 2)
Y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
BATCH = 4       # 2 batches per epoch


class ScriptedLoss:
    """``forward`` returns ``script[epoch]`` for every batch of that epoch; the gradient is
    zero, so only weight decay moves the weights."""

    def __init__(self, script, batches_per_epoch=2):
        self.script = list(script)
        self.per_epoch = batches_per_epoch
        self.calls = 0

    def forward(self, pred, target):
        self._shape = pred.shape
        value = self.script[self.calls // self.per_epoch]
        self.calls += 1
        return value

    def backward(self):
        return np.zeros(self._shape)


def model_and_opt(lr=0.1, weight_decay=0.5):
    model = nn.Sequential(nn.Linear(2, 3, dtype=np.float64, rng=0))
    return model, nn.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)


def weights_after(epochs):
    """The weights of an uninterrupted run of ``epochs`` epochs (decay only)."""
    model, opt = model_and_opt()
    nn.fit(model, ScriptedLoss([0.0] * epochs), opt, X, Y, epochs=epochs, batch_size=BATCH,
           shuffle=False, progress=False)
    return model.state_dict()


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_early_stopping_stops_and_restores_the_best_epoch():
    # Best 3.0 at epoch 2; 3.5 and 3.2 do not improve -> stop after epoch 4 (patience 2).
    script = [5.0, 4.0, 3.0, 3.5, 3.2, 1.0, 1.0]
    model, opt = model_and_opt()
    es = nn.EarlyStopping(monitor="loss", patience=2)
    hist = nn.fit(model, ScriptedLoss(script), opt, X, Y, epochs=7, batch_size=BATCH,
                  shuffle=False, progress=False, callbacks=[es])
    assert hist["loss"] == script[:5] and len(hist["accuracy"]) == 5
    assert (es.best, es.best_epoch, es.stopped_epoch) == (3.0, 2, 4)
    assert_state_equal(model.state_dict(), weights_after(3))
    # The restored weights are not those training ended with.
    assert not np.array_equal(model[0].weight.data, weights_after(5)["0.weight"])


def test_early_stopping_without_restore_keeps_the_last_weights():
    model, opt = model_and_opt()
    es = nn.EarlyStopping(monitor="loss", patience=1, restore_best=False)
    hist = nn.fit(model, ScriptedLoss([2.0, 2.0, 1.0]), opt, X, Y, epochs=3, batch_size=BATCH,
                  shuffle=False, progress=False, callbacks=es)
    assert len(hist["loss"]) == 2 and es.stopped_epoch == 1
    assert_state_equal(model.state_dict(), weights_after(2))


def test_min_delta_and_patience_zero():
    # With min_delta 0.05 an epoch must beat best - 0.05: 2.96 after 3.0 does not.
    es = nn.EarlyStopping(monitor="m", patience=3, min_delta=0.05, restore_best=False)
    stops = [es.on_epoch_end(e, {"m": v}) for e, v in enumerate([3.0, 2.96, 2.95, 2.9, 2.88,
                                                                 2.87, 2.86])]
    assert stops == [False, False, False, False, False, False, True]
    assert (es.best, es.best_epoch, es.wait) == (2.9, 3, 3)
    # patience 0: the first epoch without improvement stops.
    es = nn.EarlyStopping(monitor="m", patience=0)
    assert [es.on_epoch_end(e, {"m": v}) for e, v in enumerate([1.0, 0.5, 0.5])] == [
        False, False, True]
    # NaN never improves.
    es = nn.EarlyStopping(monitor="m", patience=1)
    assert es.on_epoch_end(0, {"m": float("nan")}) is True and es.best_epoch is None


def test_early_stopping_starts_afresh_in_each_fit():
    model, opt = model_and_opt()
    es = nn.EarlyStopping(monitor="loss", patience=1)
    nn.fit(model, ScriptedLoss([1.0, 2.0]), opt, X, Y, epochs=2, batch_size=BATCH,
           progress=False, callbacks=[es])
    assert es.stopped_epoch == 1
    hist = nn.fit(model, ScriptedLoss([5.0, 4.0, 3.0]), opt, X, Y, epochs=3, batch_size=BATCH,
                  progress=False, callbacks=[es])
    assert len(hist["loss"]) == 3 and es.stopped_epoch is None and es.best == 3.0


def test_early_stopping_monitors_validation_loss():
    # Validation calls the loss too: 2 training calls, then 1 validation call, per epoch;
    # the validation losses are 1, 2, 3.
    model, opt = model_and_opt()
    loss = ScriptedLoss([9.0, 9.0, 1.0, 9.0, 9.0, 2.0, 9.0, 9.0, 3.0], batches_per_epoch=1)
    es = nn.EarlyStopping(patience=1)
    hist = nn.fit(model, loss, opt, X, Y, epochs=3, batch_size=BATCH, shuffle=False,
                  progress=False, validation=(X, Y), callbacks=[es])
    assert hist["val_loss"] == [1.0, 2.0] and es.best_epoch == 0 and es.stopped_epoch == 1
    assert_state_equal(model.state_dict(), weights_after(1))


class Recorder:
    def __init__(self, stop_at=None, opt=None):
        self.calls = []
        self.models = []
        self.stop_at = stop_at
        self.opt = opt

    def set_model(self, model):
        self.models.append(model)

    def on_epoch_end(self, epoch, logs):
        lr = self.opt.param_groups[0]["lr"] if self.opt is not None else None
        self.calls.append((epoch, dict(logs), lr))
        return epoch == self.stop_at


def test_callbacks_see_every_epoch_and_can_stop():
    rng = np.random.default_rng(0)
    Xr = rng.standard_normal((20, 2))
    yr = rng.integers(0, 3, 20)
    model = nn.Sequential(nn.Linear(2, 3, dtype=np.float64, rng=0))
    opt = nn.SGD(model.parameters(), lr=0.1)
    first, second = Recorder(stop_at=2), Recorder()
    hist = nn.fit(model, nn.CrossEntropyLoss(), opt, Xr, yr, epochs=6, batch_size=8, rng=0,
                  progress=False, validation=(Xr[:5], yr[:5]),
                  callbacks=(first, object(), second))
    assert len(hist["loss"]) == 3
    for rec in (first, second):
        assert rec.models == [model]
        assert [c[0] for c in rec.calls] == [0, 1, 2]
        for e, logs, _ in rec.calls:
            assert logs == {k: v[e] for k, v in hist.items()}
    assert set(first.calls[0][1]) == {"loss", "accuracy", "val_loss", "val_accuracy"}


def test_fit_steps_the_scheduler_once_per_epoch():
    def run(manual):
        model, opt = model_and_opt(lr=0.2, weight_decay=0.3)
        s = sched.StepLR(opt, step_size=2, gamma=0.5)
        loss = ScriptedLoss([1.0] * 5)
        if manual:
            for _ in range(5):
                for start in range(0, 8, BATCH):
                    opt.zero_grad()
                    out = model.forward(X[start:start + BATCH])
                    loss.forward(out, Y[start:start + BATCH])
                    model.backward(loss.backward())
                    opt.step()
                s.step()
            return model, opt, None
        rec = Recorder(opt=opt)
        nn.fit(model, loss, opt, X, Y, epochs=5, batch_size=BATCH, shuffle=False,
               progress=False, scheduler=s, callbacks=[rec])
        return model, opt, rec
    model, opt, rec = run(False)
    ref, ref_opt, _ = run(True)
    assert_state_equal(model.state_dict(), ref.state_dict())
    # Callbacks run after the scheduler: they see the next epoch's rate.
    assert [c[2] for c in rec.calls] == [0.2, 0.1, 0.1, 0.05, 0.05]
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == 0.05


class PlateauSpy(sched.ReduceLROnPlateau):
    def __init__(self, opt):
        super().__init__(opt, patience=0)
        self.metrics = []

    def step(self, metric):
        self.metrics.append(metric)
        super().step(metric)


@pytest.mark.parametrize("validation", [False, True])
def test_plateau_scheduler_gets_val_loss_or_loss(validation):
    rng = np.random.default_rng(1)
    Xr = rng.standard_normal((24, 2))
    yr = rng.integers(0, 3, 24)
    model = nn.Sequential(nn.Linear(2, 3, dtype=np.float64, rng=0))
    opt = nn.SGD(model.parameters(), lr=0.5)
    spy = PlateauSpy(opt)
    hist = nn.fit(model, nn.CrossEntropyLoss(), opt, Xr, yr, epochs=4, batch_size=8, rng=0,
                  progress=False, scheduler=spy,
                  validation=(Xr[:6], yr[:6]) if validation else None)
    assert spy.metrics == hist["val_loss" if validation else "loss"]
    assert spy.last_epoch == 4


def test_progress_callable(capsys):
    calls = []
    rng = np.random.default_rng(2)
    Xr = rng.standard_normal((10, 2))
    yr = rng.integers(0, 3, 10)
    model = nn.Sequential(nn.Linear(2, 3, dtype=np.float64, rng=0))
    hist = nn.fit(model, nn.CrossEntropyLoss(), nn.SGD(model.parameters(), lr=0.1), Xr, yr,
                  epochs=2, batch_size=4, rng=0, validation=(Xr, yr),
                  progress=lambda *a: calls.append(a))
    # 3 batches (4, 4, 2) per epoch, then the epoch's end with batch == n_batches.
    assert [(e, b, n) for e, b, n, _ in calls] == [(e, b, 3) for e in (0, 1) for b in range(4)]
    for e in (0, 1):
        per_batch = [c[3] for c in calls if c[0] == e]
        assert set(per_batch[0]) == {"loss", "accuracy"}
        assert per_batch[2]["loss"] == pytest.approx(hist["loss"][e], rel=1e-12)
        assert per_batch[3] == {k: v[e] for k, v in hist.items()}
    assert capsys.readouterr() == ("", "")


def test_fit_callback_errors():
    model, opt = model_and_opt()
    loss = ScriptedLoss([1.0] * 4)
    with pytest.raises(TypeError, match="scheduler"):
        nn.fit(model, loss, opt, X, Y, scheduler=object(), progress=False)
    with pytest.raises(TypeError, match="callbacks"):
        nn.fit(model, loss, opt, X, Y, callbacks=5, progress=False)

    class Bad:
        on_epoch_end = 3
    with pytest.raises(TypeError, match="on_epoch_end"):
        nn.fit(model, loss, opt, X, Y, callbacks=[Bad()], progress=False)
    with pytest.raises(ValueError, match="validation="):
        nn.fit(model, loss, opt, X, Y, callbacks=[nn.EarlyStopping()], progress=False)
    with pytest.raises(ValueError, match="patience"):
        nn.EarlyStopping(patience=-1)
    with pytest.raises(ValueError, match="min_delta"):
        nn.EarlyStopping(min_delta=-0.1)
    with pytest.raises(TypeError, match="monitor"):
        nn.EarlyStopping(monitor=None)


def test_fit_resumes_bitwise_from_state_dicts():
    """6 epochs in one fit equal 3 epochs, a save of model, optimizer and schedule, and 3
    more epochs in new objects loaded from the save."""
    rng = np.random.default_rng(3)
    Xr = rng.standard_normal((30, 4))
    yr = rng.integers(0, 3, 30)

    def build(seed):
        model = nn.Sequential(nn.Linear(4, 8, dtype=np.float64, rng=seed), nn.Tanh(),
                              nn.Linear(8, 3, dtype=np.float64, rng=seed + 1))
        opt = nn.AdamW([{"params": model[0].parameters()},
                        {"params": model[2].parameters(), "lr": 3e-3}], lr=1e-2)
        return model, opt, sched.CosineAnnealingLR(opt, T_max=4, eta_min=1e-4)

    def run(model, opt, s, epochs):
        return nn.fit(model, nn.CrossEntropyLoss(), opt, Xr, yr, epochs=epochs, batch_size=7,
                      shuffle=False, progress=False, scheduler=s)

    full = build(0)
    hist = run(*full, 6)

    first = build(0)
    h1 = run(*first, 3)
    saved = (first[0].state_dict(), first[1].state_dict(), first[2].state_dict())
    second = build(10)      # other initial weights: everything must come from the save
    second[0].load_state_dict(saved[0])
    second[1].load_state_dict(saved[1])
    second[2].load_state_dict(saved[2])
    h2 = run(*second, 3)
    assert h1["loss"] + h2["loss"] == hist["loss"]
    assert_state_equal(second[0].state_dict(), full[0].state_dict())
    assert second[2].get_last_lr() == full[2].get_last_lr()


class Plain:
    """A model that is not a Module: forward, backward and parameters only (no state_dict),
    so EarlyStopping must keep and restore the parameters themselves."""

    def __init__(self):
        self.inner = nn.Linear(2, 3, dtype=np.float64, rng=0)

    def forward(self, x):
        return self.inner.forward(x)

    def backward(self, dy):
        return self.inner.backward(dy)

    def parameters(self):
        return self.inner.parameters()


def test_early_stopping_restores_a_model_without_state_dict():
    model = Plain()
    opt = nn.SGD(model.parameters(), lr=0.1, weight_decay=0.5)
    es = nn.EarlyStopping(monitor="loss", patience=1)
    nn.fit(model, ScriptedLoss([2.0, 1.0, 1.5, 0.0]), opt, X, Y, epochs=4, batch_size=BATCH,
           shuffle=False, progress=False, callbacks=[es])
    assert es.stopped_epoch == 2
    want = weights_after(2)
    np.testing.assert_array_equal(model.inner.weight.data, want["0.weight"])
    np.testing.assert_array_equal(model.inner.bias.data, want["0.bias"])
