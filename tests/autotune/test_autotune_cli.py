"""``python -m autotune``: arguments, exit codes, --show/--reset/--json, and what a failed
or interrupted run leaves behind (the old profile, untouched)."""
import json
import os

import pytest

import microtile
from autotune import __main__ as cli
from autotune import plan, probes, report, sparse_search, tuner
from microtile._config import _profile

ISA = microtile.get_config()["isa"]


@pytest.fixture
def profile_path(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MICROTILE_PROFILE", raising=False)
    return str(tmp_path / "cache" / "microtile" / "profile.json")


def existing_profile(path):
    from autotune import profile
    doc = profile.build(isa=ISA, probed={}, chosen={
        "float32": {"mc": 96, "kc": 256, "nc": 4096},
        "float64": {"mc": 72, "kc": 256, "nc": 2048, "split": "jc"}},
        measured={}, tuner={"mode": "full", "threads": 2, "seconds": 1.0})
    _profile.write_atomic(path, doc)
    return open(path).read()


@pytest.mark.parametrize("argv", [
    ["--threads", "0"], ["--threads", "two"], ["--threads", "-3"], ["--dtype", "float16"],
    ["--show", "--reset"], ["--show", "--quick"], ["--reset", "--dtype", "float32"],
    ["--bogus"], ["extra"], ["--profile"],
])
def test_bad_arguments_exit_2(argv, capsys, profile_path):
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip()


def test_profile_path_that_is_a_directory_exits_2(tmp_path, capsys):
    assert cli.main(["--show", "--profile", str(tmp_path)]) == 2
    assert "directory" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--quick", "--threads", "--dtype", "--profile", "--show", "--reset", "--json"):
        assert flag in out


def test_show_and_reset_without_a_profile(profile_path, capsys):
    assert cli.main(["--show"]) == 0
    assert "missing" in capsys.readouterr().out
    assert cli.main(["--show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "missing" and shown["path"] == profile_path
    assert cli.main(["--reset"]) == 0
    assert "no profile" in capsys.readouterr().out


def test_show_then_reset(profile_path, capsys):
    existing_profile(profile_path)
    assert cli.main(["--show"]) == 0
    out = capsys.readouterr().out
    assert "loaded" in out and profile_path in out and "float64" in out
    assert cli.main(["--show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "loaded"
    assert shown["profile"]["chosen"]["float64"]["split"] == "jc"
    assert cli.main(["--reset", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": profile_path, "removed": True}
    assert not os.path.exists(profile_path)


def test_show_an_invalid_profile(profile_path, capsys):
    os.makedirs(os.path.dirname(profile_path))
    open(profile_path, "w").write("{ truncated")
    assert cli.main(["--show"]) == 0
    assert "invalid" in capsys.readouterr().out


def test_explicit_profile_path(tmp_path, capsys):
    path = str(tmp_path / "elsewhere.json")
    existing_profile(path)
    assert cli.main(["--show", "--json", "--profile", path]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == path


@pytest.mark.parametrize("exc,words", [(RuntimeError("no candidate was correct"), "no candidate"),
                                       (KeyboardInterrupt(), "interrupted"),
                                       (MemoryError(), "MemoryError")])
def test_failure_exits_1_and_keeps_the_old_profile(profile_path, capsys, monkeypatch, exc,
                                                   words):
    before = existing_profile(profile_path)

    def boom(**kw):
        raise exc

    monkeypatch.setattr(tuner, "run", boom)
    assert cli.main(["--quick"]) == 1
    err = capsys.readouterr().err
    assert words in err and "unchanged" in err
    assert open(profile_path).read() == before
    assert sorted(os.listdir(os.path.dirname(profile_path))) == ["profile.json",
                                                                "profile.json.lock"]


@pytest.fixture
def fake_measurements(monkeypatch):
    """Probing and searching replaced by instant fakes: the orchestration is under test."""
    calls = []

    def probe(**kw):
        caches = [{"level": 1, "size": 32768, "ways": 8, "line": 64}]
        return {"peak_gflops": {"float32": {"1": 50.0}, "float64": {"1": 25.0}},
                "model_blocking": probes.model_blocking(caches, ISA, 1),
                "caches": {"notes": []}, "cpu": {"model": "fake", "usable": 1},
                "isa": {"kernels": {"float32": [6, 16], "float64": [6, 8]}}}

    def tune_dtype(t, model, defaults, nc_model=None):
        calls.append(t.dtype)
        t.say(f"{t.dtype} searching")
        return {**{k: model[k] for k in ("mc", "kc", "nc")}, "mc": 48, "split": "auto"}

    def reference_table(chosen, dtypes, threads, quick, peak=None, say=None):
        return [{"dtype": dt, "m": 8, "n": 8, "k": 8, "threads": threads,
                 "microtile_gflops": 1.0, "numpy_gflops": 1.0, "percent_of_peak": 1.0}
                for dt in dtypes]

    def search_sparse_density(t, base=None):
        t.evidence["sparse_density"] = {"densities": [0.5, 0.1, 0.05],
                                        "combined": [0.4, 0.95, 1.7], "chosen": 0.05}
        return 0.05

    monkeypatch.setattr(probes, "probe", probe)
    monkeypatch.setattr(plan, "tune_dtype", tune_dtype)
    monkeypatch.setattr(sparse_search, "search_sparse_density", search_sparse_density)
    monkeypatch.setattr(report, "reference_table", reference_table)
    return calls


def test_run_writes_a_profile_import_accepts(profile_path, capsys, fake_measurements):
    assert cli.main(["--quick", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert "float32 searching" in err                      # progress goes to stderr
    assert "microtile" in out and "NumPy" in out and "mc" in out   # the final table
    assert "sparse_density = 0.05" in out and "0.1:0.95x 0.05:1.70x" in out
    status, data = _profile.read(profile_path)
    assert status == "loaded"
    assert data["chosen"]["float32"]["mc"] == 48
    assert data["chosen"]["options"]["sparse_density"] == 0.05
    assert data["tuner"]["mode"] == "quick" and data["tuner"]["threads"] == 1


def test_json_output_is_only_json(profile_path, capsys, fake_measurements):
    assert cli.main(["--json", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert doc["status"] == "written" and doc["path"] == profile_path
    assert doc["profile"]["tuner"]["mode"] == "full"
    for key in ("schema_version", "fingerprint", "library_version", "probed", "chosen",
                "measured"):
        assert key in doc["profile"]


def test_one_dtype_keeps_the_other_from_the_old_profile(profile_path, capsys,
                                                        fake_measurements):
    existing_profile(profile_path)
    assert cli.main(["--dtype", "float32", "--threads", "1"]) == 0
    assert fake_measurements == ["float32"]
    status, data = _profile.read(profile_path)
    assert status == "loaded"
    assert data["chosen"]["float32"]["mc"] == 48
    assert data["chosen"]["float64"]["mc"] == 72 and data["chosen"]["float64"]["split"] == 2


def test_python_dash_m_entry_point(tmp_path):
    import subprocess
    import sys
    from autotune_env import child_env
    env = child_env(XDG_CACHE_HOME=tmp_path)
    r = subprocess.run([sys.executable, "-m", "autotune", "--threads", "nope"], env=env,
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "--threads" in r.stderr
    r = subprocess.run([sys.executable, "-m", "autotune", "--show"], env=env,
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0 and "missing" in r.stdout


# --- signals: where a Ctrl-C could be lost or misreported --------------------------------------

_SIGNAL_CHILD = r"""
import json, os, signal, sys, time
from autotune import __main__ as cli, profile, tuner
import microtile

path, when = sys.argv[1], sys.argv[2]
new_doc = profile.build(isa=microtile.get_config()["isa"], probed={"new": True},
                        chosen={"float32": {"mc": 48}}, measured={},
                        tuner={"mode": "quick", "threads": 1, "seconds": 0})

def interrupt():
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(200):        # Python runs the handler at the next bytecode
        time.sleep(0.01)

def fake_run(**kw):
    if when == "search":
        interrupt()
    return new_doc

real_write = profile.write

def write_then_interrupt(p, doc):
    real_write(p, doc)
    interrupt()                 # after os.replace: the new profile is in place

tuner.run = fake_run
if when == "write":
    profile.write = write_then_interrupt
rc = cli.main(["--quick", "--profile", path])
handler = signal.getsignal(signal.SIGINT)
print(json.dumps({"rc": rc, "sigint": "ignored" if handler == signal.SIG_IGN else
                  "default" if handler is signal.default_int_handler else repr(handler)}))
"""


def _run_signal_child(tmp_path, when, inherited):
    import signal
    import subprocess
    import sys
    from autotune_env import child_env
    path = tmp_path / "profile.json"
    before = existing_profile(str(path))
    disposition = signal.SIG_IGN if inherited == "ignored" else signal.SIG_DFL
    r = subprocess.run([sys.executable, "-c", _SIGNAL_CHILD, str(path), when],
                       env=child_env(), capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                      disposition))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr, before, path


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_sigint_during_the_search_interrupts_even_if_inherited_ignored(tmp_path, inherited):
    """The tuner exited 0 after SIGINT: started from a shell without job control (a
    background job, a CI runner), it inherits SIGINT as "ignore", Python then installs no
    KeyboardInterrupt handler, and the run went on to write its profile.  The tuner now
    installs its own handler whatever it inherited."""
    res, err, before, path = _run_signal_child(tmp_path, "search", inherited)
    assert res["rc"] == 1, err
    assert "interrupted" in err and "unchanged" in err
    assert path.read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["profile.json", "profile.json.lock"]
    assert res["sigint"] == inherited          # the handler it found is back


def test_sigint_after_the_profile_is_written_is_not_reported_as_unchanged(tmp_path):
    """A signal that lands once the new profile is in place cannot make the run
    "interrupted; the previous profile is unchanged" (that was reported, exit 1, with the
    new profile on disk): the run completes, exit 0, and says the signal came too late."""
    res, err, before, path = _run_signal_child(tmp_path, "write", "default")
    assert res["rc"] == 0, err
    assert "unchanged" not in err and "SIGINT" in err and "in place" in err
    status, data = _profile.read(str(path))
    assert status == "loaded" and data["probed"] == {"new": True}
