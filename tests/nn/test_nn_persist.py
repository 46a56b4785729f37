"""state_dict / load_state_dict and save / load."""
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
