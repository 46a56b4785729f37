"""Thread safety (16 Python threads at once), GIL release, the thread-count API, its
environment variables at import, and threadpoolctl."""
import math
import os
import threading
import time
import warnings

import numpy as np
import pytest

import microtile
from microtile import config_context

from _helpers import FLOATS, assert_gemm, rand, run_in_threads, run_python

N_PY_THREADS = 16


def _shapes(i):
    """Different shapes per thread, from tiny to multi-threaded-internally."""
    base = [(1, 1, 1), (7, 5, 3), (37, 41, 29), (130, 97, 120), (64, 200, 65), (211, 13, 300)]
    return [tuple(d + i for d in s) for s in base]


def _gemm_work(i):
    rng = np.random.default_rng(1000 + i)
    dt = FLOATS[i % 2]
    # Each thread also carries its own config: the overrides must not bleed across threads.
    with config_context(threads=1 + i % 2, mc=6 + 5 * i, kc=8 + 7 * i, thread_mnk=0):
        for _ in range(3):
            for m, n, k in _shapes(i):
                ta = bool(i % 3 == 0)
                a = rand(rng, (k, m) if ta else (m, k), dt)
                b, c = rand(rng, (k, n), dt), rand(rng, (m, n), dt)
                res = microtile.gemm(a, b, trans_a=ta, alpha=0.5, beta=-1.0, c=c)
                assert_gemm(res, a.T if ta else a, b, 0.5, -1.0, c, what=f"thread {i}")
                assert microtile.get_num_threads() == 1 + i % 2


def _matmul_work(i):
    rng = np.random.default_rng(2000 + i)
    dt = FLOATS[i % 2]
    for _ in range(3):
        for m, n, k in _shapes(i)[:5]:
            a, b = rand(rng, (3, m, k), dt), rand(rng, (k, n), dt)
            assert_gemm(microtile.matmul(a, b), a, b, what=f"matmul thread {i}")


def _gemv_work(i):
    rng = np.random.default_rng(3000 + i)
    dt = FLOATS[i % 2]
    for _ in range(3):
        for m, n, _k in _shapes(i):
            a, x = rand(rng, (m, n), dt), rand(rng, n, dt)
            y = microtile.gemv(a, x)
            assert_gemm(np.asarray(y)[:, None], a, x[:, None], what=f"gemv thread {i}")


def _mixed_work(i):
    (_gemm_work, _matmul_work, _gemv_work)[i % 3](i)


def test_16_threads_gemm():
    run_in_threads(_gemm_work)


def test_16_threads_matmul():
    run_in_threads(_matmul_work)


def test_16_threads_gemv():
    run_in_threads(_gemv_work)


def test_16_threads_mixed_while_thread_count_changes():
    """gemm, matmul and gemv at once while another thread flips set_num_threads."""
    saved = microtile.get_num_threads()
    stop = threading.Event()
    lock = threading.Lock()
    remaining = [N_PY_THREADS]

    def work(i):
        if i < 0:
            n = 0
            while not stop.is_set():
                microtile.set_num_threads(1 + n % 2, force=True)
                n += 1
                time.sleep(0.001)
            return
        try:
            _mixed_work(i)
        finally:
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    stop.set()

    try:
        run_in_threads(work, extra=True)
    finally:
        stop.set()
        microtile.set_num_threads(saved, force=True)


def _another_thread_runs_during(call, tries=200):
    """True when another Python thread gets to run while ``call()`` is in progress.

    The switch interval is set far beyond the test's length, so the interpreter never takes
    the GIL from this thread by itself: the only way the other thread can run before this
    one blocks (in ``join``) is a call that releases the GIL.  A flag set just before and
    cleared just after each call tells the other thread where this one is.  No clock is
    read: a loaded machine can delay the other thread, not change what it sees."""
    import sys
    in_call = [False]
    seen = []
    ready = threading.Event()

    def other():
        ready.wait()
        seen.append(in_call[0])

    t = threading.Thread(target=other)
    t.start()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        ready.set()
        for _ in range(tries):
            in_call[0] = True
            call()
            in_call[0] = False
            if seen:
                break
    finally:
        in_call[0] = False
        sys.setswitchinterval(old)
        t.join(60)
    assert seen, "the other thread never ran"
    return seen[0]


def _holds_the_gil():
    total = 0
    for i in range(20_000):
        total += i
    return total


def test_gemm_releases_the_gil():
    """While one thread multiplies, another Python thread runs (the kernels drop the GIL).
    The probe is checked on a pure-Python loop first, which must not let the other in."""
    assert not _another_thread_runs_during(_holds_the_gil, tries=20)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 300))
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    w = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    with config_context(threads=1):
        assert _another_thread_runs_during(lambda: microtile.gemm(a, a)), "gemm"
        assert _another_thread_runs_during(lambda: microtile.matmul(a, a)), "matmul"
        assert _another_thread_runs_during(lambda: microtile.conv2d(x, w)), "conv2d"


def test_get_set_num_threads():
    saved = microtile.get_num_threads()
    usable = _usable_cpus()
    try:
        for n in sorted({1, usable, saved}):
            microtile.set_num_threads(n, force=True)
            assert microtile.get_num_threads() == n
            assert microtile.get_config()["threads"] == n
        microtile.set_num_threads(usable + 1, force=True)
        assert microtile.get_num_threads() == usable + 1
        # More threads than cores or tiles still gives correct results.
        rng = np.random.default_rng(1)
        a, b = rand(rng, (300, 200), np.float64), rand(rng, (200, 250), np.float64)
        assert_gemm(microtile.gemm(a, b), a, b)
        a, b = rand(rng, (5, 200), np.float32), rand(rng, (200, 7), np.float32)
        with config_context(thread_mnk=0):
            assert_gemm(microtile.gemm(a, b), a, b)
    finally:
        microtile.set_num_threads(saved, force=True)
    assert microtile.get_num_threads() == saved


@pytest.mark.parametrize("n", ["usable+1", 4096, 5000, 99999, 10 ** 30])
def test_set_num_threads_above_usable_warns_and_caps(n):
    """More threads than usable CPUs only wait for each other (4,096 made conv2d_backward
    1,000x slower): capped at the usable CPUs with a RuntimeWarning, never a ValueError."""
    usable = _usable_cpus()
    n = usable + 1 if n == "usable+1" else n
    saved = microtile.get_num_threads()
    try:
        with pytest.warns(RuntimeWarning, match="force"):
            microtile.set_num_threads(n)
        assert microtile.get_num_threads() == usable == microtile.get_config()["threads"]
    finally:
        microtile.set_num_threads(saved, force=True)


def test_set_num_threads_force():
    usable = _usable_cpus()
    saved = microtile.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            microtile.set_num_threads(usable + 3, force=True)
        assert microtile.get_num_threads() == usable + 3 == microtile.get_config()["threads"]
        with pytest.raises(ValueError, match="4096"):
            microtile.set_num_threads(5000, force=True)
        assert microtile.get_num_threads() == usable + 3
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            microtile.set_num_threads(usable)         # at the limit: no warning
        assert microtile.get_num_threads() == usable
    finally:
        microtile.set_num_threads(saved, force=True)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", None, True])
def test_set_num_threads_rejects_non_positive(bad):
    saved = microtile.get_num_threads()
    with pytest.raises(ValueError):
        microtile.set_num_threads(bad)
    assert microtile.get_num_threads() == saved


def test_config_context_threads_wins_over_set_num_threads():
    saved = microtile.get_num_threads()
    try:
        microtile.set_num_threads(2, force=True)
        with config_context(threads=1):
            assert microtile.get_num_threads() == 1
        assert microtile.get_num_threads() == 2
        # A block is an explicit experiment: its count is taken as given, not capped.
        with config_context(threads=_usable_cpus() + 2):
            assert microtile.get_num_threads() == _usable_cpus() + 2
    finally:
        microtile.set_num_threads(saved, force=True)


def _usable_cpus():
    """CPUs this process may use: affinity, capped by a cgroup v2/v1 CPU quota."""
    n = len(os.sched_getaffinity(0))
    quota = None
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            q, period = f.read().split()[:2]
            if q != "max":
                quota = int(q) / int(period)
    except (OSError, ValueError):
        try:
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
                q = int(f.read())
            with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                period = int(f.read())
            if q > 0:
                quota = q / period
        except (OSError, ValueError):
            pass
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return n


_THREADS_CODE = r"""
import json, os, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import microtile
    import numpy as np
    from microtile import nn
    tasks = len(os.listdir("/proc/self/task"))
    x = np.linspace(-1, 1, 1 << 17).astype(np.float32)
    ok = bool((nn.ReLU()(x) == np.maximum(x, 0)).all())     # a parallel region on every thread
    started = len(os.listdir("/proc/self/task")) - tasks
print(json.dumps({"threads": microtile.get_num_threads(),
                  "config": microtile.get_config()["threads"], "ok": ok, "started": started,
                  "warnings": [str(w.message) for w in caught
                               if issubclass(w.category, RuntimeWarning)]}))
"""
FORCE = {"MICROTILE_FORCE_THREADS": "1"}


@pytest.mark.parametrize("env, expected", [
    ({"MICROTILE_NUM_THREADS": "1"}, 1),
    ({"OMP_NUM_THREADS": "1"}, 1),
    ({"MICROTILE_NUM_THREADS": "1", "OMP_NUM_THREADS": "4"}, 1),
    ({"OMP_NUM_THREADS": "1,3"}, 1),
    ({"MICROTILE_NUM_THREADS": "3", **FORCE}, 3),
    ({"OMP_NUM_THREADS": "5", **FORCE}, 5),
    ({"MICROTILE_NUM_THREADS": "7", "OMP_NUM_THREADS": "1", **FORCE}, 7),
    ({}, None),
], ids=["microtile", "omp", "microtile-beats-omp", "omp-nested", "microtile-forced",
        "omp-forced", "microtile-beats-omp-forced", "cpu-count"])
def test_thread_count_at_import(env, expected):
    res = run_python(_THREADS_CODE, env=env)
    expected = _usable_cpus() if expected is None else expected
    assert res["threads"] == expected == res["config"]
    assert res["ok"] and not res["warnings"], res


@pytest.mark.parametrize("var, value", [
    ("OMP_NUM_THREADS", "5000"), ("MICROTILE_NUM_THREADS", "99999"),
    ("MICROTILE_NUM_THREADS", "4096"), ("MICROTILE_NUM_THREADS", "usable+1"),
    ("OMP_NUM_THREADS", "9" * 40)])
def test_thread_env_above_usable_is_capped_with_a_warning(var, value):
    """OMP_NUM_THREADS=5000 made import raise ValueError; MICROTILE_NUM_THREADS=4096 started
    4,097 threads.  Now: the usable CPUs, one RuntimeWarning naming the variable, and no
    more threads started than that."""
    usable = _usable_cpus()
    value = str(usable + 1) if value == "usable+1" else value
    res = run_python(_THREADS_CODE, env={var: value})
    assert res["threads"] == usable == res["config"], res
    assert res["ok"]
    assert res["started"] <= usable - 1, f"{res['started']} threads started"
    assert len(res["warnings"]) == 1 and var in res["warnings"][0], res["warnings"]


def test_thread_env_forced_above_max_is_clamped_not_an_error():
    res = run_python(_THREADS_CODE, env={"MICROTILE_NUM_THREADS": "99999", **FORCE})
    assert res["threads"] == 4096 == res["config"]
    assert len(res["warnings"]) == 1 and "4096" in res["warnings"][0]


def test_force_env_applies_to_set_num_threads():
    code = ("import json, warnings, microtile; warnings.simplefilter('error'); "
            "microtile.set_num_threads(microtile.get_num_threads() + 5); "
            "print(json.dumps(microtile.get_num_threads()))")
    assert run_python(code, env={"MICROTILE_NUM_THREADS": "1", **FORCE}) == 6


def test_thread_count_follows_affinity():
    """A process pinned to one CPU defaults to one thread, and caps a larger request."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    cpu = min(os.sched_getaffinity(0))
    res = run_python(_THREADS_CODE, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    assert res["threads"] == 1
    res = run_python(_THREADS_CODE, env={"MICROTILE_NUM_THREADS": "2"},
                     preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    assert res["threads"] == 1 and len(res["warnings"]) == 1


@pytest.mark.parametrize("value", ["abc", "0", "-3", "", "1e3", "2.5"])
def test_bad_thread_env_does_not_break_import(value):
    res = run_python(_THREADS_CODE, env={"MICROTILE_NUM_THREADS": value})
    assert res["threads"] == _usable_cpus()
    assert len(res["warnings"]) == (1 if value else 0), res["warnings"]


def _microtile_pools(info):
    return [e for e in info if e.get("user_api") == "microtile"]


def test_threadpoolctl_lists_and_limits():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    saved = microtile.get_num_threads()
    try:
        microtile.set_num_threads(2, force=True)
        pools = _microtile_pools(threadpoolctl.threadpool_info())
        assert len(pools) == 1, threadpoolctl.threadpool_info()
        assert pools[0]["num_threads"] == 2
        assert pools[0]["version"] == microtile.__version__
        with threadpoolctl.threadpool_limits(1):
            assert microtile.get_num_threads() == 1
            assert _microtile_pools(threadpoolctl.threadpool_info())[0]["num_threads"] == 1
            rng = np.random.default_rng(2)
            a, b = rand(rng, (200, 150), np.float64), rand(rng, (150, 170), np.float64)
            assert_gemm(microtile.gemm(a, b), a, b)
        assert microtile.get_num_threads() == 2
        with threadpoolctl.threadpool_limits(limits=1, user_api="microtile"):
            assert microtile.get_num_threads() == 1
        assert microtile.get_num_threads() == 2
    finally:
        microtile.set_num_threads(saved, force=True)


_LIMITS_CODE = r"""
import json, warnings, threadpoolctl, microtile
warnings.simplefilter("error")              # a limit is not a request: no warning
usable = microtile.get_num_threads()
out = {"usable": usable}
with threadpoolctl.threadpool_limits(usable + 7, user_api="microtile"):
    out["above"] = microtile.get_num_threads()
out["after_above"] = microtile.get_num_threads()
microtile.set_num_threads(usable + 2, force=True)
with threadpoolctl.threadpool_limits(1):
    out["inside"] = microtile.get_num_threads()
out["restored"] = microtile.get_num_threads()
print(json.dumps(out))
"""


def test_threadpoolctl_limit_above_usable_caps_quietly_and_restores_a_forced_count():
    """threadpool_limits(n) is an upper limit: above the usable CPUs it means all of them,
    and leaving a block restores a count that was forced above them."""
    pytest.importorskip("threadpoolctl")
    res = run_python(_LIMITS_CODE)
    usable = res["usable"]
    assert usable == _usable_cpus()
    assert res["above"] == usable == res["after_above"]
    assert res["inside"] == 1
    assert res["restored"] == usable + 2


def test_threadpoolctl_in_fresh_process():
    """The pool is listed as soon as microtile is imported, without any other call."""
    code = ("import json, threadpoolctl, microtile; "
            "print(json.dumps([e for e in threadpoolctl.threadpool_info() "
            "if e.get('user_api') == 'microtile']))")
    pools = run_python(code, env={"MICROTILE_NUM_THREADS": "2", **FORCE})
    assert len(pools) == 1 and pools[0]["num_threads"] == 2


_FORK_CODE = r"""
import json, os, signal, time
import numpy as np, microtile
microtile.set_num_threads(2, force=True)
rng = np.random.default_rng(0)
a = rng.standard_normal((400, 400))
s = rng.standard_normal((64, 20, 20))
x = rng.standard_normal(400)
want = (a @ a, np.matmul(s, s), a @ x)
microtile.gemm(a, a)                  # the parent's OpenMP threads have run
pid = os.fork()
if pid == 0:
    got = (microtile.gemm(a, a), microtile.matmul(s, s), microtile.gemv(a, x))
    ok = all(np.allclose(g, w, rtol=1e-12, atol=1e-10) for g, w in zip(got, want))
    os._exit(0 if ok else 3)
deadline = time.monotonic() + 8
status = None
while time.monotonic() < deadline:
    done, st = os.waitpid(pid, os.WNOHANG)
    if done:
        status = os.waitstatus_to_exitcode(st)
        break
    time.sleep(0.02)
if status is None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
print(json.dumps({"status": status}))
"""


def test_threaded_calls_work_in_a_forked_child():
    """multiprocessing's default start method on Linux is fork: a child of a process that
    has already run microtile's threads must still compute (not hang on the parent's
    OpenMP pool, whose threads do not exist in the child)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    res = run_python(_FORK_CODE, timeout=60)
    assert res["status"] is not None, "the forked child hung in a threaded call"
    assert res["status"] == 0, f"the forked child computed wrong results ({res['status']})"


@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threaded_phases_are_race_free(threads, dtype):
    # Several jc and pc steps per call, so the team reuses B's buffer and C's tiles between
    # phases: a missing barrier shows as a result that differs from the one-thread result.
    # Each tile is summed in the same order whatever thread computes it, so results must be
    # bitwise equal.
    rng = np.random.default_rng(threads)
    a = rng.standard_normal((301, 517)).astype(dtype)
    b = rng.standard_normal((517, 389)).astype(dtype)
    c0 = rng.standard_normal((301, 389)).astype(dtype)
    with microtile.config_context(threads=1, mc=24, kc=40, nc=64, thread_mnk=0):
        ref = microtile.gemm(a, b, alpha=0.5, beta=2.0, c=c0)
    with microtile.config_context(threads=threads, mc=24, kc=40, nc=64, thread_mnk=0):
        for _ in range(30):
            got = microtile.gemm(a, b, alpha=0.5, beta=2.0, c=c0)
            assert np.array_equal(got, ref)


# --- microtile's own pool (issue 11) ---------------------------------------------------------

@pytest.mark.parametrize("nt", [1, 2, 3, 8])
@pytest.mark.parametrize("n_items", [1, 7, 2000])
def test_pool_runs_every_claimed_item_exactly_once(nt, n_items):
    """The pool's contract: each item is claimed once, by a thread numbered below nt, and
    pool_run returns only after every claimed item has run (runs are all 1 on return)."""
    from microtile._common._mt_pool import _claim_check
    owner, runs, took = _claim_check(nt, n_items)
    assert runs.min() == 1 and runs.max() == 1
    assert owner.min() >= 0 and owner.max() < nt
    assert 1 <= took <= nt
    assert len(set(owner.tolist())) <= took


def test_pool_info_and_spin_setting():
    from microtile._common._mt_pool import pool_info, set_pool_spin
    info = pool_info()
    assert info["threads"] and info["spin"] > 0
    old = set_pool_spin(0.0)
    try:
        assert pool_info()["spin"] == 0.0
        # Helpers that sleep at once after each job still compute right.
        rng = np.random.default_rng(5)
        a, b = rand(rng, (300, 200), np.float64), rand(rng, (200, 250), np.float64)
        with config_context(threads=2, thread_mnk=0):
            for _ in range(5):
                assert_gemm(microtile.gemm(a, b), a, b)
        with pytest.raises(ValueError):
            set_pool_spin(-1)
    finally:
        set_pool_spin(old)


_HOG = "import time\nt = time.time() + 120\nwhile time.time() < t:\n    pass\n"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_exact_while_another_process_hogs_a_core(dtype):
    """Another process busy on one core makes the helper late, or absent, for parts of calls:
    every result must still be the one-thread result, bitwise (each tile sums in the same
    order whichever thread computes it)."""
    import subprocess
    import sys
    rng = np.random.default_rng(11)
    shapes = [(256, 256, 256), (301, 389, 517), (32, 1024, 784), (1000, 64, 90), (97, 513, 1)]
    cases = []
    for m, n, k in shapes:
        a, b = rand(rng, (m, k), dtype), rand(rng, (k, n), dtype)
        with config_context(threads=1):
            cases.append((a, b, microtile.gemm(a, b)))
    hog = subprocess.Popen([sys.executable, "-c", _HOG])
    try:
        with config_context(threads=2, thread_mnk=0):
            for _ in range(20):
                for a, b, ref in cases:
                    assert np.array_equal(microtile.gemm(a, b), ref)
        with config_context(threads=2, thread_mnk=0, mc=24, kc=40, nc=64):
            a, b, _ = cases[1]
            with config_context(threads=1):
                ref = microtile.gemm(a, b)
            for _ in range(20):
                assert np.array_equal(microtile.gemm(a, b), ref)
    finally:
        hog.kill()
        hog.wait()
