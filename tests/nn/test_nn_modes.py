"""train()/eval() modes and buffers in state dicts (Module machinery, any layer)."""
import threading

import numpy as np
import pytest

from microtile import nn


class Counter(nn.Module):
    """An identity layer with a buffer, recording the mode each forward ran in."""
    _state_buffer_names = ("count", "stat")

    def __init__(self, n=3):
        self.count = np.zeros((), np.int64)
        self.stat = np.zeros(n, np.float32)
        self.modes = []

    def forward(self, x):
        self.modes.append(self._in_training())
        return np.asarray(x)

    def backward(self, dy, *, need_input_grad=True):
        return dy


def model():
    return nn.Sequential(nn.Linear(3, 4, rng=0), Counter(4), nn.ReLU(),
                         nn.Sequential(nn.Linear(4, 2, rng=1), Counter(2)))


def test_modes_recurse_and_return_the_module():
    m = model()
    assert m.training and all(x.training for x in m.modules())
    assert len(m.modules()) == 7
    assert m.eval() is m
    assert not m.training and not any(x.training for x in m.modules())
    assert m.train() is m and all(x.training for x in m.modules())
    m[3].eval()
    assert m.training and not m[3].training and not m[3][1].training and m[1].training
    assert m.train(False) is m and not any(x.training for x in m.modules())


@pytest.mark.parametrize("bad", [1, 0, None, "eval", np.bool_(True)])
def test_train_mode_must_be_a_bool(bad):
    with pytest.raises(ValueError, match="bool"):
        nn.ReLU().train(bad)


def test_state_dict_has_buffers_in_torch_order():
    m = model()
    assert list(m.state_dict()) == ["0.weight", "0.bias", "1.count", "1.stat", "3.0.weight",
                                    "3.0.bias", "3.1.count", "3.1.stat"]
    assert [k for k, _ in m.named_buffers()] == ["1.count", "1.stat", "3.1.count", "3.1.stat"]
    sd = m.state_dict()
    assert sd["1.count"].shape == () and sd["1.count"].dtype == np.int64
    sd["1.stat"][:] = 5          # a copy
    assert not m[1].stat.any()


def test_load_state_dict_writes_buffers_in_place():
    m = model()
    stat = m[1].stat
    sd = m.state_dict()
    sd["1.count"] = np.array(7)
    sd["1.stat"] = np.arange(4.0)
    sd["3.1.stat"] = [1.5, 2.5]
    m.load_state_dict(sd)
    assert m[1].stat is stat and m[1].count == 7 and m[1].count.dtype == np.int64
    np.testing.assert_array_equal(stat, np.arange(4.0))
    np.testing.assert_array_equal(m[3][1].stat, [1.5, 2.5])


@pytest.mark.parametrize("how", ["missing", "shape", "scalar-shape", "extra", "dtype"])
def test_bad_buffer_entry_raises_and_changes_nothing(how):
    m = model()
    before = m.state_dict()
    sd = {k: v + 1 for k, v in before.items()}
    if how == "missing":
        del sd["3.1.count"]
    elif how == "shape":
        sd["3.1.stat"] = np.zeros(3)
    elif how == "scalar-shape":
        sd["1.count"] = np.zeros(1, np.int64)
    elif how == "extra":
        sd["1.running_mean"] = np.zeros(4)
    else:
        sd["1.stat"] = np.array(["a"] * 4)
    with pytest.raises(TypeError if how == "dtype" else ValueError, match=r"3\.1\.|1\.|keys"):
        m.load_state_dict(sd)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_predict_runs_in_eval_mode_without_touching_the_flags():
    m = model()
    x = np.ones((5, 3), np.float32)
    nn.predict(m, x, batch_size=2)
    assert m[1].modes == [False] * 3 and m[3][1].modes == [False] * 3
    assert all(x.training for x in m.modules())
    m.eval()
    m[1].modes.clear()
    nn.predict(m, x)
    assert m[1].modes == [False] and not any(x.training for x in m.modules())
    m.train()
    m[1].modes.clear()
    m(x)
    assert m[1].modes == [True]


def test_predict_eval_mode_is_per_thread():
    """A predict in one thread does not switch a forward in another to eval mode."""
    m = model()
    x = np.ones((2, 3), np.float32)
    inside = threading.Event()
    release = threading.Event()
    seen = []

    class Blocking(Counter):
        def forward(self, x):
            inside.set()
            assert release.wait(30)
            return super().forward(x)

    probe = Blocking(4)
    slow = nn.Sequential(nn.Linear(3, 4, rng=0), probe)
    t = threading.Thread(target=lambda: seen.append(nn.predict(slow, x)))
    t.start()
    assert inside.wait(30)
    m(x)                                  # runs while the other thread is inside predict
    release.set()
    t.join(30)
    assert m[1].modes == [True] and probe.modes == [False] and len(seen) == 1


def test_fit_trains_in_training_mode_and_validates_in_eval_mode():
    rng = np.random.default_rng(0)
    m = model()
    m.eval()
    X = rng.standard_normal((6, 3)).astype(np.float32)
    y = rng.integers(0, 2, 6)
    nn.fit(m, nn.CrossEntropyLoss(), nn.SGD(m.parameters(), lr=0.1), X, y, epochs=2,
           batch_size=3, progress=False, validation=(X[:4], y[:4]))
    # Per epoch: two training steps, then one validation batch.
    assert m[1].modes == [True, True, False] * 2
    assert all(x.training for x in m.modules())
