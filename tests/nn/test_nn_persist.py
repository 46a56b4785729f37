"""state_dict / load_state_dict and save / load."""
import os
import threading
import zipfile

import numpy as np
import pytest

from microtile import nn


def model(dtype=np.float32, seed=0):
    return nn.Sequential(nn.Linear(5, 7, dtype=dtype, rng=seed), nn.ReLU(),
                         nn.Linear(7, 3, bias=False, dtype=dtype, rng=seed + 1), nn.Sigmoid(),
                         nn.Linear(3, 2, dtype=dtype, rng=seed + 2))


def test_state_dict_keys_are_torch_names_and_copies():
    m = model()
    sd = m.state_dict()
    assert list(sd) == ["0.weight", "0.bias", "2.weight", "4.weight", "4.bias"]
    assert sd["0.weight"].shape == (7, 5)
    sd["0.weight"][...] = 0
    assert np.any(m[0].weight.data != 0)


def test_load_state_dict_from_torch():
    torch = pytest.importorskip("torch")
    t = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(),
                            torch.nn.Linear(7, 3, bias=False), torch.nn.Sigmoid(),
                            torch.nn.Linear(3, 2))
    m = model()
    m.load_state_dict({k: v.numpy() for k, v in t.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    np.testing.assert_allclose(m(x), t(torch.from_numpy(x)).detach().numpy(), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_save_load_round_trip_exactly(tmp_path, dtype):
    a = model(dtype, seed=0)
    a[0].weight.data[0, 0] = np.nan
    a[0].bias.data[1] = -np.inf
    path = tmp_path / "m.weights"
    nn.save(a, path)
    assert path.exists()  # the name is used as given
    b = model(dtype, seed=10)
    assert nn.load(b, path) is b
    for (ka, pa), (kb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert ka == kb and pb.dtype == dtype
        np.testing.assert_array_equal(pa.data, pb.data)
        assert pa.data.tobytes() == pb.data.tobytes()


def test_wrong_state_leaves_model_unchanged(tmp_path):
    m = model()
    before = m.state_dict()
    sd = model(seed=5).state_dict()
    bad_shape = dict(sd)
    bad_shape["4.weight"] = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match=r"'4.weight' has shape \(2, 4\)"):
        m.load_state_dict(bad_shape)
    missing = dict(sd)
    del missing["2.weight"]
    with pytest.raises(ValueError, match=r"missing keys \['2.weight'\]"):
        m.load_state_dict(missing)
    extra = dict(sd)
    extra["9.weight"] = np.zeros(3)
    with pytest.raises(ValueError, match="unexpected keys"):
        m.load_state_dict(extra)
    with pytest.raises(TypeError):
        m.load_state_dict([1, 2])
    np.savez(tmp_path / "bad.npz", **bad_shape)
    with pytest.raises(ValueError):
        nn.load(m, tmp_path / "bad.npz")
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_parameter_assignment_checks_shape():
    p = nn.Parameter(np.zeros((2, 3), np.float32))
    p.data = np.ones((2, 3))
    assert p.data.dtype == np.float32 and np.all(p.data == 1)
    with pytest.raises(ValueError, match="shape"):
        p.data = np.ones(6)
    with pytest.raises(TypeError):
        nn.Parameter(np.zeros(3, int))


def _corrupt(path, how):
    """Damage the archive ``save`` wrote at ``path`` in one of several ways."""
    data = path.read_bytes()
    if how == "truncated-half":
        path.write_bytes(data[:len(data) // 2])
    elif how == "truncated-tail":
        path.write_bytes(data[:-30])           # the zip's central directory cut short
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif how == "flipped":
        # Every byte of the first member's array data inverted: the CRC no longer matches.
        with zipfile.ZipFile(path) as z:
            info = z.infolist()[0]
        start = info.header_offset + 30 + len(info.filename) + 128
        raw = bytearray(data)
        raw[start:start + 16] = bytes(b ^ 0xFF for b in raw[start:start + 16])
        path.write_bytes(bytes(raw))
    elif how == "text":
        path.write_text("0.weight = [[1, 2]]\n")
    elif how == "npy":
        np.save(path.open("wb"), np.zeros((7, 5), np.float32))   # one array, not a dict
    elif how == "pickled":
        np.savez(path.open("wb"), **{"0.weight": np.array([object()] * 35).reshape(7, 5)})
    elif how == "strings":
        state = {k: np.full(v.shape, "x") for k, v in model().state_dict().items()}
        np.savez(path.open("wb"), **state)
    elif how == "bad-header":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("0.weight.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': 12}       \n")
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated-half", "truncated-tail", "empty", "garbage",
                                 "flipped", "text", "npy", "pickled", "strings",
                                 "bad-header"])
def test_load_corrupt_file_is_a_value_error_naming_the_path(tmp_path, how):
    """A truncated or corrupt file raised zipfile.BadZipFile (or EOFError, zlib.error,
    TypeError, ...): now a ValueError naming the path, and the model is unchanged."""
    path = tmp_path / "m.npz"
    nn.save(model(seed=3), path)
    _corrupt(path, how)
    m = model()
    before = m.state_dict()
    with pytest.raises(ValueError, match="m.npz") as info:
        nn.load(m, path)
    assert type(info.value) is ValueError
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_load_fifo_does_not_block(tmp_path):
    """A FIFO would block the open until a writer came: refused without opening.  (Run in
    a thread, so that a regression fails here instead of hanging the suite.)"""
    path = tmp_path / "m.npz"
    os.mkfifo(path)
    outcome = []

    def attempt():
        try:
            nn.load(model(), path)
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - inspected below
            outcome.append(exc)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():
        # Release the blocked open with a writer that goes away at once, then fail.
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(30)
        pytest.fail("nn.load blocked on a FIFO")
    assert isinstance(outcome[0], ValueError) and "regular file" in str(outcome[0])


def test_load_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        nn.load(model(), tmp_path / "absent.npz")


def test_load_wrong_model_names_the_path(tmp_path):
    path = tmp_path / "other.npz"
    nn.save(nn.Sequential(nn.Linear(5, 8, rng=0)), path)
    with pytest.raises(ValueError, match=r"other\.npz.*missing keys"):
        nn.load(model(), path)
