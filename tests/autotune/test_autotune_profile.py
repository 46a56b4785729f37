"""The profile: what import makes of good, corrupt, truncated, foreign and future ones, and
writes that can never be torn."""
import json
import os
import subprocess
import sys
import threading
import time
import warnings

import pytest

import microtile
from microtile._config import _profile
from autotune import profile as tprofile
from autotune_env import child_env, import_roots

# The repository root (this file is tests/autotune/<name>.py).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ISA = microtile.get_config()["isa"]


def good_doc(**chosen_overrides):
    chosen = {
        "float32": {"mc": 120, "kc": 200, "nc": 2048, "thread_mnk": 100 ** 3,
                    "nopack_mnk": 40 ** 3, "nopack_a_panels": 3, "split": "ic"},
        "float64": {"mc": 66, "kc": 160, "nc": 1024},
        "options": {"conv_workspace": 4 << 20},
    }
    chosen.update(chosen_overrides)
    return tprofile.build(isa=ISA, probed={"note": "test"}, chosen=chosen,
                          measured={"reference": []},
                          tuner={"mode": "quick", "threads": 1, "seconds": 0.0})


def write(path, doc):
    _profile.write_atomic(str(path), doc)
    return str(path)


def env_for(path=None, **extra):
    return child_env(MICROTILE_PROFILE=path or os.path.join(ROOT, "no-such-profile"), **extra)


CONFIG_SCRIPT = ("import json, microtile; c = microtile.get_config(); "
                 "print(json.dumps({k: c[k] for k in ('profile', 'profile_status', "
                 "'float32', 'float64', 'conv_workspace')}))")


def import_config(env):
    r = subprocess.run([sys.executable, "-c", CONFIG_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=60, cwd=os.path.dirname(ROOT))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


@pytest.fixture(scope="module")
def builtin_config():
    return import_config(env_for(None))[0]


# ---- reading --------------------------------------------------------------------------

def test_good_profile_loads(tmp_path):
    path = write(tmp_path / "p.json", good_doc())
    status, data = _profile.read(path)
    assert status == "loaded"
    assert data["chosen"]["float32"]["mc"] == 120
    assert data["chosen"]["float32"]["split"] == 1          # "ic", as the driver codes it


def test_missing(tmp_path):
    assert _profile.read(str(tmp_path / "none.json")) == ("missing", None)


@pytest.mark.parametrize("content", [b"", b"{", b"\x00\xff\xfe garbage", b"[1, 2, 3]",
                                     b'{"schema_version": "1"}', b"null"])
def test_unreadable_is_invalid(tmp_path, content):
    path = tmp_path / "p.json"
    path.write_bytes(content)
    assert _profile.read(str(path))[0] == "invalid"


def test_truncated_is_invalid(tmp_path):
    text = json.dumps(good_doc())
    for cut in (1, len(text) // 3, len(text) - 2):
        path = tmp_path / f"p{cut}.json"
        path.write_text(text[:cut])
        assert _profile.read(str(path))[0] == "invalid", cut


def test_directory_is_invalid(tmp_path):
    assert _profile.read(str(tmp_path))[0] == "invalid"


def test_foreign_machine_is_stale(tmp_path):
    doc = good_doc()
    doc["fingerprint"]["model"] = "Some Other CPU 9000"
    status, reason = _profile.read(write(tmp_path / "p.json", doc))
    assert status == "stale" and "another machine" in reason
    doc = good_doc()
    doc["fingerprint"]["usable_cpus"] += 7
    assert _profile.read(write(tmp_path / "q.json", doc))[0] == "stale"


def test_future_versions_are_stale(tmp_path):
    doc = good_doc()
    doc["schema_version"] = _profile.SCHEMA_VERSION + 1
    doc["chosen"]["float32"]["new_knob"] = 3            # whatever a future tuner adds
    assert _profile.read(write(tmp_path / "p.json", doc))[0] == "stale"
    doc = good_doc()
    doc["library_version"] = "99.0"
    assert _profile.read(write(tmp_path / "q.json", doc))[0] == "stale"


@pytest.mark.parametrize("dtype,bad", [
    ("float32", {"mc": 0}), ("float32", {"kc": -5}), ("float32", {"nc": 10 ** 9}),
    ("float32", {"mc": True}), ("float32", {"kc": 1.5}), ("float32", {"mc": "96"}),
    ("float32", {"split": "diagonal"}), ("float64", {"thread_mnk": -1}),
    ("float64", {"nopack_mnk": float("nan")}), ("float64", {"mr": 8}),
    ("float64", {"kc": 60000, "nc": 60000}),            # 27 GiB of packed B
])
def test_out_of_range_values_are_rejected(tmp_path, dtype, bad):
    doc = good_doc()
    doc["chosen"][dtype].update(bad)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    status, reason = _profile.read(str(path))
    assert status == "invalid", bad
    assert "rejected" in reason


@pytest.mark.parametrize("option,bad", [("conv_workspace", 12), ("sparse_density", 1.5),
                                        ("sparse_density", -0.1), ("sparse_density", "0.1"),
                                        ("sparse_density", None)])
def test_bad_option_is_rejected(tmp_path, option, bad):
    doc = good_doc()
    doc["chosen"]["options"][option] = bad
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    assert _profile.read(str(path))[0] == "invalid"


def test_sparse_density_round_trip(tmp_path):
    """The tuner's sparse_density, written by the tuner's own writer, is what a fresh
    interpreter uses: get_config reports it and a pruned Linear follows it."""
    doc = good_doc(options={"conv_workspace": 4 << 20, "sparse_density": 0.25})
    path = str(tmp_path / "p.json")
    tprofile.write(path, doc)
    script = ("import json, numpy as np, microtile\n"
              "from microtile import nn\n"
              "import microtile.nn._linear as L\n"
              "calls = []\n"
              "real = L.Linear._forward_pruned\n"
              "L.Linear._forward_pruned = lambda self, *a: (calls.append(1), real(self, *a))\n"
              "x = np.ones((2, 20), np.float32)\n"
              "nn.prune(nn.Linear(20, 10, rng=0), 0.8)(x)\n"     # density 0.2: sparse
              "nn.prune(nn.Linear(20, 10, rng=0), 0.7)(x)\n"     # density 0.3: dense
              "c = microtile.get_config()\n"
              "print(json.dumps({'status': c['profile_status'], "
              "'sparse_density': c['sparse_density'], 'calls': len(calls)}))")
    r = subprocess.run([sys.executable, "-c", script], env=env_for(path), capture_output=True,
                       text=True, timeout=60, cwd=os.path.dirname(ROOT))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"status": "loaded", "sparse_density": 0.25, "calls": 1}


def test_builder_refuses_what_import_would_reject():
    with pytest.raises(ValueError):
        good_doc(float32={"mc": 0})


def test_warns_once_per_path(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    path.write_text("{ not json")
    monkeypatch.setenv("MICROTILE_PROFILE", str(path))
    monkeypatch.setattr(_profile, "_warned", set())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            assert _profile.load_for_import(ISA) == (str(path), "invalid", {})
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    assert "invalid" in str(rec[0].message)


def test_profile_for_another_isa_keeps_only_options(tmp_path, monkeypatch):
    doc = good_doc()
    doc["isa"] = "some-other-isa"
    monkeypatch.setenv("MICROTILE_PROFILE", write(tmp_path / "p.json", doc))
    path, status, chosen = _profile.load_for_import(ISA)
    assert status == "loaded"
    assert "float32" not in chosen and chosen["options"]["conv_workspace"] == 4 << 20


def test_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("MICROTILE_PROFILE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _profile.profile_path() == str(tmp_path / "microtile" / "profile.json")
    assert tprofile.resolve_path(None) == str(tmp_path / "microtile" / "profile.json")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")     # the spec says: ignore it
    assert _profile.default_path().startswith(os.path.expanduser("~"))
    monkeypatch.setenv("MICROTILE_PROFILE", str(tmp_path / "x.json"))
    assert tprofile.resolve_path(None) == str(tmp_path / "x.json")
    assert tprofile.resolve_path(str(tmp_path / "y.json")) == str(tmp_path / "y.json")


# ---- what import does with them --------------------------------------------------------

def _bad_profiles(tmp_path):
    text = json.dumps(good_doc())
    foreign = good_doc()
    foreign["fingerprint"]["model"] = "Other"
    future = good_doc()
    future["schema_version"] = 99
    out_of_range = good_doc()
    out_of_range["chosen"]["float32"]["kc"] = 0
    cases = {"corrupt": ("invalid", "\x00{{{"), "truncated": ("invalid", text[: len(text) // 2]),
             "foreign": ("stale", json.dumps(foreign)), "future": ("stale", json.dumps(future)),
             "out_of_range": ("invalid", json.dumps(out_of_range))}
    for name, (status, body) in cases.items():
        (tmp_path / f"{name}.json").write_text(body)
    return {name: (status, tmp_path / f"{name}.json") for name, (status, _) in cases.items()}


def test_import_with_bad_profiles_warns_once_and_uses_defaults(tmp_path, builtin_config):
    for name, (status, path) in _bad_profiles(tmp_path).items():
        cfg, err = import_config(env_for(path))
        assert cfg["profile_status"] == status, name
        assert cfg["profile"] == str(path)
        assert err.count("RuntimeWarning") == 1, (name, err)
        assert cfg["float32"] == builtin_config["float32"], name
        assert cfg["float64"] == builtin_config["float64"], name


def test_import_with_good_profile_applies_it(tmp_path):
    path = write(tmp_path / "p.json", good_doc())
    cfg, err = import_config(env_for(path))
    assert "Warning" not in err
    assert cfg["profile_status"] == "loaded"
    assert (cfg["float32"]["mc"], cfg["float32"]["kc"], cfg["float32"]["nc"]) == (120, 200, 2048)
    assert cfg["float32"]["split"] == "ic"
    assert (cfg["float64"]["mc"], cfg["float64"]["kc"]) == (66, 160)
    assert cfg["conv_workspace"] == 4 << 20


def test_import_reads_the_xdg_cache(tmp_path):
    write(tmp_path / "microtile" / "profile.json", good_doc())
    env = env_for(None, XDG_CACHE_HOME=str(tmp_path))
    del env["MICROTILE_PROFILE"]
    cfg, _ = import_config(env)
    assert cfg["profile"] == str(tmp_path / "microtile" / "profile.json")
    assert cfg["profile_status"] == "loaded"


def test_generic_isa_ignores_blocking_tuned_for_avx2(tmp_path, builtin_config):
    if ISA == "generic":
        pytest.skip("only the generic kernels here")
    path = write(tmp_path / "p.json", good_doc())
    cfg, err = import_config(env_for(path, MICROTILE_ISA="generic"))
    assert cfg["profile_status"] == "loaded" and "Warning" not in err
    assert cfg["float32"]["mc"] != 120 or cfg["float32"]["kc"] != 200


# ---- writes ---------------------------------------------------------------------------

WRITER = """
import sys
sys.path[:0] = {paths!r}
from microtile._config import _profile
doc = {{"writer": sys.argv[1], "pad": "x" * 200000}}
for i in range(60):
    doc["i"] = i
    _profile.write_atomic(sys.argv[2], doc)
"""


def test_concurrent_writers_never_leave_a_torn_file(tmp_path):
    path = tmp_path / "p.json"
    script = WRITER.format(paths=import_roots())
    procs = [subprocess.Popen([sys.executable, "-c", script, w, str(path)]) for w in "AB"]
    reads = 0
    while any(p.poll() is None for p in procs):
        try:
            with open(path) as f:
                doc = json.load(f)           # a torn file would fail to parse
        except FileNotFoundError:
            continue
        assert doc["writer"] in "AB" and len(doc["pad"]) == 200000
        reads += 1
    assert all(p.returncode == 0 for p in procs)
    assert reads > 0
    assert json.load(open(path))["i"] == 59
    assert os.listdir(tmp_path) == ["p.json"]        # no temporary files left behind


def test_failed_write_leaves_the_old_profile(tmp_path, monkeypatch):
    path = write(tmp_path / "p.json", good_doc())
    before = open(path).read()

    def explode(obj, f, **kw):
        f.write('{"half": ')
        raise OSError("disk full")

    monkeypatch.setattr(_profile.json, "dump", explode)
    with pytest.raises(OSError):
        _profile.write_atomic(path, {"new": 1})
    assert open(path).read() == before
    assert os.listdir(tmp_path) == ["p.json"]


def test_run_lock_serialises_two_runs(tmp_path):
    """The second run waits for the first: it says so, and gets the lock only after the
    first let go.  (Checked by the order of events, not by how long anything took.)"""
    path = str(tmp_path / "p.json")
    held = threading.Event()
    said = []
    events = []

    def first():
        with tprofile.run_lock(path):
            held.set()
            # Hold the lock until the second run has found it taken (it says so first).
            for _ in range(6000):
                if said:
                    break
                time.sleep(0.01)
            events.append("first released")

    th = threading.Thread(target=first)
    th.start()
    held.wait(60)
    with tprofile.run_lock(path, said.append):
        events.append("second acquired")
    th.join(60)
    assert said and "waiting" in said[0]
    assert events == ["first released", "second acquired"]


def test_oversized_evidence_is_left_out_so_import_can_read_the_profile(tmp_path):
    """Import reads at most MAX_PROFILE_BYTES: the tuner never writes more (the search
    evidence goes first), and the library's writer refuses to."""
    doc = good_doc()
    doc["measured"]["search"] = {"padding": "x" * _profile.MAX_PROFILE_BYTES}
    path = str(tmp_path / "p.json")
    with pytest.raises(_profile.ProfileTooLarge):
        _profile.write_atomic(path, doc)
    assert os.listdir(tmp_path) == []
    tprofile.write(path, doc)
    status, data = _profile.read(path)
    assert status == "loaded", data
    assert data["chosen"]["float32"]["mc"] == 120
    assert "left out" in data["measured"]["search"]
    assert data["measured"]["reference"] == []
