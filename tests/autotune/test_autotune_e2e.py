"""One real ``python -m autotune --quick`` from start to finish, in a temporary cache
directory, then ``import microtile`` loading what it wrote.  Takes about 30 s (the promise is
under 60 s on a 2-core machine); set MICROTILE_SKIP_TUNER_E2E=1 to leave it out."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from autotune_env import child_env

# The repository root (this file is tests/autotune/<name>.py).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(os.environ.get("MICROTILE_SKIP_TUNER_E2E", "") not in ("", "0"),
                                reason="MICROTILE_SKIP_TUNER_E2E is set")


def test_quick_run_end_to_end(tmp_path):
    # How long it takes is the benchmarks' business (a loaded machine can double it); the
    # timeout only turns a hang into a failure.
    env = child_env(XDG_CACHE_HOME=tmp_path)
    r = subprocess.run([sys.executable, "-m", "autotune", "--quick", "--json"], env=env,
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "[" in r.stderr and "s]" in r.stderr          # progress was shown
    out = json.loads(r.stdout)                           # stdout is nothing but the JSON
    path = str(tmp_path / "microtile" / "profile.json")
    assert out["path"] == path and os.path.exists(path)
    doc = json.load(open(path))
    assert doc["tuner"]["mode"] == "quick"
    for dt in ("float32", "float64"):
        assert {"mc", "kc", "nc", "thread_mnk", "nopack_mnk", "split"} <= set(doc["chosen"][dt])
        assert any(r["dtype"] == dt and r["numpy_gflops"] > 0 and r["microtile_gflops"] > 0
                   for r in doc["measured"]["reference"])
    # sparse_density was measured (or, on a machine too busy for it, left at the default
    # with the reason recorded), and the profile holds a usable value either way.
    sparse = doc["measured"]["search"].get("options", {}).get("sparse_density",
                                                              {"skipped": "no options step"})
    assert (sparse.get("noisy") or sparse.get("skipped")
            or sparse["chosen"] in (None, 0.0, *sparse["densities"]))
    if "sparse_density" in doc["chosen"].get("options", {}):
        assert 0.0 <= doc["chosen"]["options"]["sparse_density"] <= 1.0
        assert sparse["chosen"] == doc["chosen"]["options"]["sparse_density"]
    assert doc["probed"]["caches"]["latency_curve"]
    assert doc["probed"]["peak_gflops"]["float32"]["1"] > 0

    # A fresh interpreter loads it, uses it, and still computes correctly.
    script = ("import json, numpy as np, microtile; c = microtile.get_config(); "
              "rng = np.random.default_rng(0); a = rng.standard_normal((301, 257)); "
              "b = rng.standard_normal((257, 263)); "
              "err = float(np.max(np.abs(microtile.gemm(a.astype(np.float32), "
              "b.astype(np.float32)) - a @ b))); "
              "print(json.dumps({'status': c['profile_status'], 'path': c['profile'], "
              "'f32': c['float32'], 'f64': c['float64'], 'err': err}))")
    r2 = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                        text=True, timeout=60, cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    got = json.loads(r2.stdout)
    assert got["status"] == "loaded" and got["path"] == path
    for key in ("mc", "kc", "nc", "split"):
        assert got["f32"][key] == doc["chosen"]["float32"][key]
        assert got["f64"][key] == doc["chosen"]["float64"][key]
    assert got["err"] < 257 * np.finfo(np.float32).eps * 20

    r3 = subprocess.run([sys.executable, "-m", "autotune", "--show"], env=env,
                        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r3.returncode == 0 and "loaded" in r3.stdout and "NumPy" in r3.stdout
    r4 = subprocess.run([sys.executable, "-m", "autotune", "--reset"], env=env,
                        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r4.returncode == 0 and not os.path.exists(path)


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_ctrl_c_leaves_the_old_profile(tmp_path, inherited):
    """SIGINT in the middle of a real run: exit 1, the old profile untouched.  "ignored" is
    how a shell without job control starts a background job (and how this test once ran in
    a fresh clone): SIGINT inherited as SIG_IGN, which the tuner must override, or the run
    finishes and exits 0."""
    import signal
    from autotune import profile
    import microtile
    path = tmp_path / "microtile" / "profile.json"
    old = profile.build(isa=microtile.get_config()["isa"], probed={},
                        chosen={"float32": {"mc": 96}}, measured={},
                        tuner={"mode": "quick", "threads": 1, "seconds": 0})
    profile.write(str(path), old)
    before = path.read_text()
    env = child_env(XDG_CACHE_HOME=tmp_path)
    disposition = signal.SIG_IGN if inherited == "ignored" else signal.SIG_DFL
    p = subprocess.Popen([sys.executable, "-m", "autotune", "--quick"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=tmp_path,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    # Wait until the search is under way (its first progress line that names the blocking
    # search), then interrupt it as Ctrl-C would.
    # (A watchdog kills a child that hangs silently, so the loop cannot wait forever.)
    import threading
    watchdog = threading.Timer(600, p.kill)
    watchdog.start()
    try:
        seen = []
        for line in p.stderr:
            seen.append(line)
            if "blocking" in line:
                break
        assert p.poll() is None, "the tuner ended before the search began:\n" + "".join(seen)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        watchdog.cancel()
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 1, "".join(seen) + err
    assert "interrupted" in err and "unchanged" in err
    assert path.read_text() == before
    assert sorted(os.listdir(path.parent)) == ["profile.json", "profile.json.lock"]
