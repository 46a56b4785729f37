"""get_config, config_context (override, restore, nest, per thread, validation) and the
profile status at import."""
import threading

import numpy as np
import pytest

import microtile
from microtile import config_context, get_config

from _helpers import run_python

BLOCKING = ("mr", "nr", "mc", "kc", "nc")
STATUSES = ("loaded", "missing", "stale", "invalid")


def test_get_config_keys_and_types():
    cfg = get_config()
    for key in ("version", "isa", "threads", "profile", "profile_status", "float32", "float64"):
        assert key in cfg, key
    assert cfg["version"] == microtile.__version__
    assert cfg["isa"] in microtile.available_isas()
    assert cfg["threads"] == microtile.get_num_threads() >= 1
    assert cfg["profile"] is None or isinstance(cfg["profile"], str)
    assert cfg["profile_status"] in STATUSES
    for dtype in ("float32", "float64"):
        for key in BLOCKING:
            value = cfg[dtype][key]
            assert isinstance(value, int) and not isinstance(value, bool), (dtype, key, value)
            assert value >= 1, (dtype, key, value)
        # A block holds at least one micro-tile's worth after rounding; the micro-tile fits
        # the registers of a real CPU.
        assert cfg[dtype]["mr"] * cfg[dtype]["nr"] <= 256


def test_avx2_kernel_shapes_when_available():
    """On an AVX2/FMA CPU (this machine) the 6x16 float32 / 6x8 float64 kernels are in use."""
    if "avx2-fma" not in microtile.available_isas():
        pytest.skip("no AVX2/FMA here")
    with config_context(isa="avx2-fma"):
        cfg = get_config()
    assert (cfg["float32"]["mr"], cfg["float32"]["nr"]) == (6, 16)
    assert (cfg["float64"]["mr"], cfg["float64"]["nr"]) == (6, 8)


def test_get_config_returns_a_copy():
    """Mutating the returned dict changes nothing."""
    before = get_config()
    cfg = get_config()
    cfg["float64"]["mc"] = before["float64"]["mc"] + 1
    cfg["threads"] = 999
    assert get_config() == before


def test_config_context_overrides_and_restores():
    before = get_config()
    with config_context(mc=48, kc=64, nc=512, threads=1):
        cfg = get_config()
        for dtype in ("float32", "float64"):
            assert (cfg[dtype]["mc"], cfg[dtype]["kc"], cfg[dtype]["nc"]) == (48, 64, 512)
            # The micro-kernel shape is not a tunable of config_context.
            assert cfg[dtype]["mr"] == before[dtype]["mr"]
        assert cfg["threads"] == 1 and microtile.get_num_threads() == 1
    assert get_config() == before


def test_config_context_per_dtype():
    before = get_config()
    with config_context(dtype="float32", mc=96, kc=256, nc=4096):
        cfg = get_config()
        assert (cfg["float32"]["mc"], cfg["float32"]["kc"], cfg["float32"]["nc"]) == (96, 256, 4096)
        assert cfg["float64"] == before["float64"]
    with config_context(dtype="float64", kc=17):
        assert get_config()["float64"]["kc"] == 17
        assert get_config()["float32"] == before["float32"]
    assert get_config() == before


def test_config_context_nests():
    before = get_config()
    with config_context(mc=48):
        with config_context(kc=32, threads=1):
            cfg = get_config()
            assert cfg["float64"]["mc"] == 48 and cfg["float64"]["kc"] == 32
            assert cfg["threads"] == 1
            with config_context(mc=24):
                assert get_config()["float64"]["mc"] == 24
                assert get_config()["float64"]["kc"] == 32
            assert get_config()["float64"]["mc"] == 48
        cfg = get_config()
        assert cfg["float64"]["mc"] == 48
        assert cfg["float64"]["kc"] == before["float64"]["kc"]
        assert cfg["threads"] == before["threads"]
    assert get_config() == before


def test_config_context_restores_after_exception():
    before = get_config()
    with pytest.raises(KeyError):
        with config_context(mc=7, threads=1, isa="generic"):
            raise KeyError("boom")
    assert get_config() == before


def test_config_context_isa():
    with config_context(isa="generic"):
        assert get_config()["isa"] == "generic"
    assert get_config()["isa"] in microtile.available_isas()


def test_config_context_is_per_thread():
    """An override on one thread is invisible to another, in both directions, while both
    are inside their blocks at the same time."""
    before = get_config()
    barrier = threading.Barrier(2, timeout=30)
    seen = {}

    def worker():
        seen["outside"] = get_config()
        with config_context(mc=12, threads=1):
            barrier.wait()          # main is inside its own block now
            seen["inside"] = get_config()
            barrier.wait()          # main has looked
        barrier.wait()

    t = threading.Thread(target=worker)
    t.start()
    with config_context(kc=20):
        barrier.wait()
        mine = get_config()
        barrier.wait()
    barrier.wait()
    t.join()
    assert seen["outside"] == before
    assert seen["inside"]["float64"]["mc"] == 12 and seen["inside"]["threads"] == 1
    assert seen["inside"]["float64"]["kc"] == before["float64"]["kc"], "main's kc leaked"
    assert mine["float64"]["kc"] == 20
    assert mine["float64"]["mc"] == before["float64"]["mc"], "the worker's mc leaked"
    assert mine["threads"] == before["threads"], "the worker's threads leaked"
    assert get_config() == before


def test_config_context_does_not_leak_into_new_threads():
    """A thread started inside a block runs with the process-wide values, like NumPy's
    errstate (a fresh thread has a fresh context)."""
    before = get_config()
    seen = {}
    with config_context(mc=11):
        t = threading.Thread(target=lambda: seen.setdefault("cfg", get_config()))
        t.start()
        t.join()
    assert seen["cfg"]["float64"]["mc"] == before["float64"]["mc"]


@pytest.mark.parametrize("kwargs", [
    dict(mc=0), dict(mc=-1), dict(kc=0), dict(nc=0), dict(nc=-4096), dict(mc=1.5),
    dict(kc="256"), dict(nc=None), dict(mc=True), dict(threads=0), dict(threads=-2),
    dict(threads=1.5), dict(isa="sse9"), dict(isa=""), dict(dtype="float16"),
    dict(dtype="int32", mc=8), dict(split="diagonal"), dict(no_such_parameter=1),
    dict(mc=10 ** 30),
], ids=lambda d: ",".join(f"{k}={v!r}" for k, v in d.items()))
def test_config_context_invalid_values(kwargs):
    before = get_config()
    with pytest.raises(ValueError):
        with config_context(**kwargs):
            pass
    assert get_config() == before


def test_config_context_accepts_numpy_integers():
    with config_context(mc=np.int64(30), kc=np.int32(40)):
        assert get_config()["float64"]["mc"] == 30
        assert get_config()["float64"]["kc"] == 40


_STATUS_CODE = r"""
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import microtile
    import numpy as np
    c = microtile.gemm(np.eye(3), np.arange(9.0).reshape(3, 3))
cfg = microtile.get_config()
print(json.dumps({"status": cfg["profile_status"], "profile": cfg["profile"],
                  "ok": bool((c == np.arange(9.0).reshape(3, 3)).all()),
                  "mc": cfg["float64"]["mc"],
                  "warnings": [str(w.message) for w in caught]}))
"""


def test_profile_missing(tmp_path):
    res = run_python(_STATUS_CODE, env={"XDG_CACHE_HOME": tmp_path})
    assert res["status"] == "missing"
    assert res["profile"] is None
    assert res["ok"]
    assert not [w for w in res["warnings"] if "profile" in w.lower()]


def test_profile_env_naming_absent_file(tmp_path):
    res = run_python(_STATUS_CODE, env={"XDG_CACHE_HOME": tmp_path,
                                        "MICROTILE_PROFILE": tmp_path / "nope.json"})
    assert res["status"] == "missing"
    assert res["ok"]


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"", b"[1, 2, 3]",
                                     b"{}", b'{"schema_version": "one"}'],
                         ids=["truncated", "binary", "empty", "list", "empty-object",
                              "bad-schema-type"])
def test_profile_invalid_warns_once_and_import_works(tmp_path, content):
    bad = tmp_path / "profile.json"
    bad.write_bytes(content)
    missing = run_python(_STATUS_CODE, env={"XDG_CACHE_HOME": tmp_path / "empty"})
    res = run_python(_STATUS_CODE, env={"XDG_CACHE_HOME": tmp_path / "empty",
                                        "MICROTILE_PROFILE": bad})
    assert res["status"] == "invalid"
    assert res["profile"] == str(bad)
    assert res["ok"], "gemm gave a wrong result with an invalid profile"
    assert res["mc"] == missing["mc"], "an invalid profile changed the blocking"
    related = [w for w in res["warnings"] if "profile" in w.lower()]
    assert len(related) == 1, res["warnings"]


def test_profile_unreadable_directory_is_invalid_not_a_crash(tmp_path):
    """A path that exists but cannot be read as a file (a directory)."""
    res = run_python(_STATUS_CODE, env={"XDG_CACHE_HOME": tmp_path / "empty",
                                        "MICROTILE_PROFILE": tmp_path})
    assert res["status"] == "invalid"
    assert res["ok"]


@pytest.mark.parametrize("value", ["bogus", "avx512-nope", ""])
def test_unknown_isa_env_does_not_break_import(value):
    res = run_python("import json, microtile; c = microtile.get_config(); "
                     "print(json.dumps([c['isa'], list(microtile.available_isas())]))",
                     env={"MICROTILE_ISA": value})
    isa, available = res
    assert isa in available
