"""microtile.nn.tune and the per-shape convolution choices it keeps in the profile: what is
recorded, that later processes use it, and that no profile entry (stale, damaged, or naming
an algorithm that does not apply) can change a result."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from microtile import config_context, nn
from microtile._config import _context, _profile
from microtile.conv import convolution


@pytest.fixture(autouse=True)
def _own_choices():
    """Each test starts with no per-shape choices in force and leaves none behind."""
    saved = dict(_context._state["conv_choices"])
    _context._state["conv_choices"].clear()
    yield
    _context._state["conv_choices"].clear()
    _context._state["conv_choices"].update(saved)


def _model():
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, rng=0), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=4, rng=1),
                         nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=4, rng=1))


def test_tune_records_a_checked_choice_per_shape_and_pass(tmp_path):
    model = _model()
    x = np.random.default_rng(0).standard_normal((2, 4, 9, 7)).astype(np.float32)
    path = tmp_path / "profile.json"
    out = nn.tune(model, x, rounds=1, profile=path)
    # Two distinct shapes (the two grouped layers share one), each with both passes.
    assert len(out) == 4
    assert {k.split()[0] for k in out} == {"forward", "backward"}
    for key, r in out.items():
        # Every algorithm that applies: Winograd too on the ungrouped 3x3 layer.
        want = set(convolution.applicable(2, 1, 8, 4, None))
        assert set(r["seconds"]) == want | ({"winograd"} if " g1 " in key else set())
        assert r["algorithm"] in r["seconds"] and r["rule"] in r["seconds"]
        assert _context.conv_choice(key) == r["algorithm"]
    status, doc = _profile.read(str(path))
    assert status == "loaded"
    assert doc["conv_algorithms"] == {k: r["algorithm"] for k, r in out.items()}
    # The model computes what it computed before, whichever algorithms won.
    y = model.forward(x).copy()
    with config_context(conv_algorithm="im2col"):
        ref = model.forward(x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_tune_keeps_other_profile_content_and_adds_to_earlier_choices(tmp_path):
    path = str(tmp_path / "p.json")
    doc = _profile.new_document(_context.get_config()["isa"])
    doc["chosen"] = {"options": {"sparse_density": 0.25}}
    doc["conv_algorithms"] = {"forward float32 n1 earlier": "direct"}
    _profile.write_atomic(path, doc)
    x = np.random.default_rng(1).standard_normal((1, 4, 6, 6)).astype(np.float32)
    nn.tune(nn.Sequential(nn.Conv2d(4, 4, 3, rng=0)), x, rounds=1, profile=path)
    status, got = _profile.read(path)
    assert status == "loaded"
    assert got["chosen"]["options"]["sparse_density"] == 0.25
    assert got["conv_algorithms"]["forward float32 n1 earlier"] == "direct"
    assert len(got["conv_algorithms"]) == 3


def test_tune_refuses_a_stale_profile_and_leaves_it(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"schema_version": _profile.SCHEMA_VERSION,
                                "library_version": "0.0", "chosen": {}}))
    before = path.read_bytes()
    x = np.zeros((1, 4, 6, 6), np.float32)
    with pytest.raises(RuntimeError, match="stale"):
        nn.tune(nn.Sequential(nn.Conv2d(4, 4, 3, rng=0)), x, rounds=1, profile=path)
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="rounds"):
        nn.tune(nn.Sequential(nn.Conv2d(4, 4, 3, rng=0)), x, rounds=0, profile=path)


def _layer_key(pass_, x, w, **kw):
    X4, _, geom, groups, K, P, Q = convolution._setup("t", x, w, kw.get("stride", 1),
                                                       kw.get("padding", 0), 1,
                                                       kw.get("groups", 1))
    return convolution.shape_key(pass_, w.dtype, X4.shape[0], X4.shape[1], K, groups, geom)


def test_a_recorded_choice_is_used_and_one_that_does_not_apply_is_not(monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 6, 9, 9))
    w = rng.standard_normal((6, 3, 3, 3))
    key = _layer_key("forward", x, w, padding=1, groups=2)
    geom_args = (2, 6, 6, 2)
    X4, _, geom, *_ = convolution._setup("t", x, w, 1, 1, 1, 2)
    assert convolution._algorithm("forward", w.dtype, 2, 6, 6, 2, geom) == "direct"
    _context.set_conv_choices({key: "im2col"})
    assert convolution._algorithm("forward", w.dtype, 2, 6, 6, 2, geom) == "im2col"
    assert convolution._algorithm("backward", w.dtype, 2, 6, 6, 2, geom) == "direct"
    with config_context(conv_algorithm="direct"):     # a forced algorithm wins
        assert convolution._algorithm("forward", w.dtype, 2, 6, 6, 2, geom) == "direct"
    ref = convolution.conv2d(x, w, padding=1, groups=2)
    # An algorithm that does not apply to this layer is ignored: the rule decides.
    monkeypatch.setattr(convolution, "applicable", lambda *a: ("direct",))
    assert convolution._algorithm("forward", w.dtype, 2, 6, 6, 2, geom) == "direct"
    np.testing.assert_allclose(convolution.conv2d(x, w, padding=1, groups=2), ref,
                               rtol=1e-12, atol=1e-12)
    del geom_args


def test_damaged_choices_are_dropped_one_by_one():
    good = {"forward float32 n1 c1": "direct", "backward float64 n2": "im2col"}
    bad = {"forward x": "winograd9", "forward y": 3, "forward z": "auto", 5: "direct",
           "k" * 500: "direct"}
    assert _profile.check_conv_choices({**good, **bad}) == good
    assert _profile.check_conv_choices(["direct"]) == {}
    assert _profile.check_conv_choices(None) == {}


_CHILD = """
import json, sys, numpy as np
from microtile._config import _context
from microtile.conv import convolution
x = np.random.default_rng(3).standard_normal((2, 6, 9, 9))
w = np.random.default_rng(4).standard_normal((6, 3, 3, 3))
X4, _, geom, *_ = convolution._setup("t", x, w, 1, 1, 1, 2)
y = convolution.conv2d(x, w, padding=1, groups=2)
print(json.dumps({"algorithm": convolution._algorithm("forward", w.dtype, 2, 6, 6, 2, geom),
                  "status": _context.get_config()["profile_status"], "y": y.ravel()[:50].tolist()}))
"""


@pytest.mark.parametrize("entry", ["im2col", "winograd9", 7])
def test_a_later_process_uses_the_profile_choice_or_the_rule(tmp_path, entry):
    x = np.random.default_rng(3).standard_normal((2, 6, 9, 9))
    w = np.random.default_rng(4).standard_normal((6, 3, 3, 3))
    key = _layer_key("forward", x, w, padding=1, groups=2)
    path = str(tmp_path / "p.json")
    doc = _profile.new_document(_context.get_config()["isa"])
    doc["conv_algorithms"] = {key: entry}
    _profile.write_atomic(path, doc)
    env = dict(os.environ, MICROTILE_PROFILE=path)
    run = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    got = json.loads(run.stdout)
    assert got["status"] == "loaded"
    assert got["algorithm"] == ("im2col" if entry == "im2col" else "direct")
    ref = convolution.conv2d(x, w, padding=1, groups=2).ravel()[:50]
    np.testing.assert_allclose(got["y"], ref, rtol=1e-12, atol=1e-12)
