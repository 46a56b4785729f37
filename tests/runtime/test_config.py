"""get_config, config_context (override, restore, nest, per thread, validation) and the
profile status at import."""
import json
import os
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


@pytest.mark.parametrize("dtype", [np.float32, np.dtype("float32"), "float32", "f4",
                                   np.float64, np.dtype("float64"), "float64", float],
                         ids=lambda d: repr(d))
def test_config_context_dtype_spellings(dtype):
    """config_context(dtype=np.float32) raised: a dtype, a scalar type and a name all name
    the same dtype, as everywhere in NumPy."""
    name = np.dtype(dtype).name
    other = "float64" if name == "float32" else "float32"
    before = get_config()
    with config_context(dtype=dtype, mc=37, kc=41):
        cfg = get_config()
        assert (cfg[name]["mc"], cfg[name]["kc"]) == (37, 41)
        assert cfg[other] == before[other]
    assert get_config() == before


@pytest.mark.parametrize("dtype", [np.float16, np.int32, "int64", np.dtype("complex64"),
                                   "nonsense", 3, 1.5, object(), [np.float32],
                                   np.zeros(2, np.float32), bool, ""],
                         ids=lambda d: type(d).__name__ + ":" + repr(d)[:20])
def test_config_context_bad_dtype_names_the_value(dtype):
    before = get_config()
    with pytest.raises(ValueError, match="dtype") as info:
        with config_context(dtype=dtype, mc=37):
            pass
    assert repr(dtype)[:10] in str(info.value)
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


# --- profiles that must not hang, exhaust memory or raise at import --------------------------
# The reported cases each import in a child with a timeout (a hang fails the test through
# TimeoutExpired instead of hanging the suite); the whole matrix of bad values goes through
# the same reader in this process.

def _loadable_doc(**chosen):
    """A profile this machine and version would load, with ``chosen`` as its chosen section."""
    from microtile._config import _profile
    return {"schema_version": _profile.SCHEMA_VERSION,
            "library_version": _profile.library_version(),
            "fingerprint": _profile.fingerprint(),
            "isa": get_config()["isa"],
            "chosen": chosen}


_PLACEHOLDER = 123456789


def _doc_with(where, literal):
    """A loadable profile's JSON text with ``literal`` (JSON source) at ``where`` (a key of
    "chosen", or "section.key")."""
    section, _, key = where.rpartition(".")
    chosen = {"float64": {"mc": 24}}
    if section:
        chosen.setdefault(section, {})[key] = _PLACEHOLDER
    else:
        chosen[key] = _PLACEHOLDER
    text = json.dumps(_loadable_doc(**chosen))
    assert text.count(str(_PLACEHOLDER)) == 1
    return text.replace(str(_PLACEHOLDER), literal)


@pytest.fixture(scope="module")
def builtin_import(tmp_path_factory):
    """What a child imports with no profile at all (the built-in blocking)."""
    return run_python(_STATUS_CODE, env={"XDG_CACHE_HOME": tmp_path_factory.mktemp("none")},
                      timeout=60)


def _import_with_profile(tmp_path, path):
    return run_python(_STATUS_CODE, env={"XDG_CACHE_HOME": tmp_path / "none",
                                         "MICROTILE_PROFILE": path}, timeout=60)


def _assert_invalid_once(res, builtin, path):
    assert res["status"] == "invalid", res
    assert res["profile"] == str(path)
    assert res["ok"], "gemm gave a wrong result with an invalid profile"
    assert res["mc"] == builtin["mc"], "an invalid profile changed the blocking"
    related = [w for w in res["warnings"] if "profile" in w.lower()]
    assert len(related) == 1, res["warnings"]


_HUGE = "1" + "0" * 400          # a JSON integer far beyond any C type
_VERY_HUGE = "9" * 5000          # beyond Python's int-from-string digit limit


def _write_case(tmp_path, case):
    """The profile path for one reported case (made on demand)."""
    from microtile._config import _profile
    if case == "fifo":
        path = tmp_path / "fifo.json"
        os.mkfifo(path)
        return path
    if case.startswith("/dev/"):
        if not os.path.exists(case):
            pytest.skip(f"no {case}")
        return case
    path = tmp_path / "p.json"
    if case == "nested-1000":
        text = json.dumps(_loadable_doc(float64={"mc": 24}))
        text = text[:-1] + ', "deep": ' + "[" * 1000 + "]" * 1000 + "}"
    elif case == "too-large":
        doc = _loadable_doc(float64={"mc": 24})
        doc["pad"] = "x" * _profile.MAX_PROFILE_BYTES     # valid JSON, but no profile
        text = json.dumps(doc)
    else:
        where, literal = {"threads-inf": ("threads", "Infinity"),
                          "mc-inf": ("float64.mc", "Infinity"),
                          "mc-float": ("float64.mc", "96.5"),
                          "mc-string": ("float64.mc", '"96"'),
                          "mc-huge": ("float64.mc", _HUGE),
                          "threads-huge": ("threads", _VERY_HUGE)}[case]
        text = _doc_with(where, literal)
    path.write_text(text)
    return path


def test_loadable_doc_loads(tmp_path, builtin_import):
    """The control for the tests below: without the bad value, the same profile loads."""
    path = tmp_path / "p.json"
    path.write_text(_doc_with("threads", "1"))
    res = _import_with_profile(tmp_path, path)
    assert res["status"] == "loaded" and res["mc"] == 24 != builtin_import["mc"]
    assert not [w for w in res["warnings"] if "profile" in w.lower()]


@pytest.mark.parametrize("case", ["fifo", "/dev/zero", "nested-1000", "too-large",
                                  "threads-inf", "mc-inf", "mc-float", "mc-string", "mc-huge",
                                  "threads-huge"])
def test_reported_profiles_import_as_invalid(tmp_path, builtin_import, case):
    """A FIFO blocked import forever, /dev/zero read without end, deep nesting raised
    RecursionError and Infinity for "threads" OverflowError: each is now "invalid", with
    one warning, and the built-in blocking."""
    path = _write_case(tmp_path, case)
    _assert_invalid_once(_import_with_profile(tmp_path, path), builtin_import, path)


@pytest.mark.parametrize("where", ["float64.mc", "threads", "options.conv_chunk",
                                   "float64.thread_mnk"])
@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "96.5", "1e300", '"96"',
                                     "true", "null", "[96]", "{}", "-5", _HUGE, _VERY_HUGE],
                         ids=["inf", "-inf", "nan", "float", "1e300", "string", "bool", "null",
                              "list", "object", "negative", "huge", "very-huge"])
def test_profile_bad_integer_is_invalid_not_an_error(tmp_path, where, literal):
    """Every JSON value that is not an integer in range, where an integer belongs."""
    from microtile._config import _profile
    path = tmp_path / "p.json"
    path.write_text(_doc_with(where, literal))
    status, reason = _profile.read(str(path))
    assert status == "invalid", reason
    assert len(reason) < 400, "the reason quoted in the warning is bounded"
    good = {"threads": "1", "options.conv_chunk": str(1 << 20)}.get(where, "64")
    path.write_text(_doc_with(where, good))
    assert _profile.read(str(path))[0] == "loaded"       # only the bad value was wrong


@pytest.mark.parametrize("content", ["[" * 100_000, "[" * 100_000 + "]" * 100_000,
                                     '{"schema_version": 1, "a": ' + "{\"a\": " * 50_000],
                         ids=["open", "closed", "objects"])
def test_profile_nested_very_deeply_is_invalid(tmp_path, content):
    from microtile._config import _profile
    path = tmp_path / "deep.json"
    path.write_text(content)
    assert _profile.read(str(path))[0] == "invalid"


@pytest.mark.parametrize("version, status", [("true", "invalid"), ("1.0", "invalid"),
                                             ('"1"', "invalid"), ("Infinity", "invalid"),
                                             (_HUGE, "stale"), ("2", "stale")])
def test_profile_odd_schema_version(tmp_path, version, status):
    """schema_version must be an integer: True (== 1 in Python) is not one; a huge one is
    a future schema (stale)."""
    from microtile._config import _profile
    text = json.dumps(_loadable_doc(float64={"mc": 24}))
    path = tmp_path / "p.json"
    path.write_text(text.replace('"schema_version": 1', f'"schema_version": {version}'))
    assert _profile.read(str(path))[0] == status


def test_profile_reader_refuses_a_fifo_without_opening_it(tmp_path):
    """In process too: a FIFO is refused (the open would block until a writer came)."""
    from microtile._config import _profile
    path = tmp_path / "fifo"
    os.mkfifo(path)
    done = []
    t = threading.Thread(target=lambda: done.append(_profile.read(str(path))), daemon=True)
    t.start()
    t.join(30)
    assert done and done[0][0] == "invalid", "reading a FIFO blocked"


def test_autotune_show_does_not_block_on_a_fifo(tmp_path):
    """``python -m autotune --show`` reads the raw document with the same bounded reader."""
    import autotune
    path = tmp_path / "fifo.json"
    os.mkfifo(path)
    code = ("import json, contextlib, io; from autotune import __main__ as cli; "
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf): rc = cli.main(['--show', '--json', "
            f"'--profile', {str(path)!r}])\n"
            "print(json.dumps([rc, json.loads(buf.getvalue())['status']]))")
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(m.__file__)))
             for m in (microtile, autotune)]
    rc, status = run_python(code, env={"PYTHONPATH": os.pathsep.join(roots)}, timeout=60)
    assert (rc, status) == (0, "invalid")
