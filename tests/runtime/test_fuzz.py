"""Fuzzing every public function (``tests/fuzz_driver.py``) in a child process.

The driver makes a few thousand seeded random calls (shapes with 0, 1 and primes; every
memory layout; float32, float64, mixed and refused dtypes; bad and extreme arguments; a
quarter of them on two threads) and checks each against docs/API.md's rules: the float64
reference within the error bound, inputs untouched, only TypeError/ValueError (or the
exception the API names) for invalid input.  It runs in a child so that a segfault or an
abort fails this test instead of ending the test run; the child's address space is capped, so
a runaway allocation is a MemoryError, not a visit from the OOM killer.

A failure names every broken rule once, with the command that repeats its first occurrence
(``--seed S --index I``).  A crash names the call that was running.  A plain build may notice
heap corruption only at a later ``free``; the AddressSanitizer build (README, "Building")
stops at the bad access itself.

``MICROTILE_FUZZ_SEEDS`` (comma-separated) and ``MICROTILE_FUZZ_CALLS`` run other or longer
fuzz runs with the same test (a soak: ``MICROTILE_FUZZ_CALLS=100000``).

The other tests here check the instrument: that each kind of broken rule is reported, that a
crash is, and that a call is rebuilt identically from its seed and index alone.
"""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from _helpers import child_env

import fuzz_driver as D

DRIVER = os.path.abspath(D.__file__)
SEEDS = tuple(int(s) for s in os.environ.get("MICROTILE_FUZZ_SEEDS", "1,2").split(","))
# Two runs of 4000 calls take ~10 s together on the 2-core VM (a few times that when loaded).
CALLS = int(os.environ.get("MICROTILE_FUZZ_CALLS", "4000"))
# Only a hang should come near this: the driver also stops any single call after
# DEFAULT_HANG_SECONDS with every thread's stack.
CHILD_TIMEOUT = 900
# Lines of the child's stderr quoted when it dies (its last calls and faulthandler's stacks).
TAIL_LINES = 40


def run_driver(seed, calls, *extra):
    """(return code, stdout, stderr) of a driver run in a fresh interpreter.  One OpenMP thread
    by default (calls opt into two) and one OpenBLAS thread for the references, so the child
    does not compete with itself on a loaded machine."""
    env = child_env({"MICROTILE_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1,
                     "OMP_NUM_THREADS": None})
    cmd = [sys.executable, DRIVER, "--seed", str(seed), "--calls", str(calls), "--trace",
           *extra]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return None, out, err
    return proc.returncode, proc.stdout, proc.stderr


def verdict(seed, rc, out, err):
    """None when the run kept every rule, else the report to fail with."""
    # A run that got to the end prints its JSON summary last.  Without it the child died:
    # by a signal, or with status 1 from a sanitizer (ASan reports and exits that way).
    lines = out.rstrip().splitlines()
    finished = bool(lines) and lines[-1].startswith("{")
    if rc == 0 and finished:
        return None
    if rc == 1 and finished:   # what broke, one line each (stdout, minus its JSON)
        return "\n".join(line for line in out.splitlines() if not line.startswith("{"))
    calls = [line for line in err.splitlines() if line.startswith(">>> ")]
    last = calls[-1][4:] if calls else "(none started)"
    index = last[1:last.index("]")] if last.startswith("[") else "?"
    if rc is None:
        what = f"did not finish within {CHILD_TIMEOUT} s (a hang?)"
    elif rc < 0:
        what = f"was killed by {signal.Signals(-rc).name}"
    elif "Sanitizer" in err or "runtime error:" in err:      # ASan; UBSan
        what = f"was stopped by a sanitizer (status {rc})"
    else:
        what = f"exited with status {rc} before the end"
    tail = "\n".join(err.splitlines()[-TAIL_LINES:])
    return (f"the fuzz driver (seed {seed}) {what} during call {last}\n"
            f"repeat it:  {D.reproducer(seed, index)}\n"
            f"(a plain build may notice heap corruption only in a later call: run the seed "
            f"under the AddressSanitizer build to stop at the bad access)\n"
            f"--- last lines of its stderr\n{tail}")


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_public_api(seed):
    """Every public function, thousands of random calls: no crash, no broken rule."""
    rc, out, err = run_driver(seed, CALLS)
    report = verdict(seed, rc, out, err)
    assert report is None, report


# --- the instrument itself --------------------------------------------------------------------

def test_a_crash_is_reported_with_its_call():
    rc, out, err = run_driver(0, 5, "--crash-at", "3")
    report = verdict(0, rc, out, err)
    assert report is not None, (rc, out, err[-2000:])
    # SIGSEGV on a plain build; status 1 after AddressSanitizer's report on the sanitized one.
    assert "killed by SIGSEGV" in report or "stopped by a sanitizer" in report, report
    assert "during call [3] selftest_crash" in report and "--seed 0 --index 3" in report


@pytest.fixture
def driver():
    D.bind()
    return D


def _call(driver, run, check=None, ok=True, raises=()):
    call = driver.Call("selftest", ok=ok, raises=raises)
    call.run, call.check = run, check
    return call


def _kinds(driver, call):
    return [kind for kind, _ in driver.execute(call, {})]


def test_each_broken_rule_is_reported(driver):
    a = np.arange(6.0).reshape(2, 3)

    def check_ones(res):
        driver.close(res, np.ones((2, 3)), np.ones((2, 3)), 1, np.dtype(np.float64), "ones")
    # A wrong value: off by one ulp-scaled tolerance is not off by 1.
    assert _kinds(driver, _call(driver, lambda: np.zeros((2, 3)), check_ones)) == ["wrong-result"]
    assert _kinds(driver, _call(driver, lambda: np.ones((2, 3)), check_ones)) == []
    # Wrong dtype or shape.
    assert _kinds(driver, _call(driver, lambda: np.ones((2, 3), np.float32), check_ones)) == \
        ["wrong-dtype"]
    assert _kinds(driver, _call(driver, lambda: np.ones((3, 2)), check_ones)) == ["wrong-shape"]

    def overflow():
        raise OverflowError("Python int too large to convert to C ssize_t")
    # A valid call that raises; an invalid one that raises the wrong thing or nothing.
    assert _kinds(driver, _call(driver, overflow)) == ["raised-on-valid"]
    assert _kinds(driver, _call(driver, overflow, ok=False, raises=(ValueError,))) == \
        ["wrong-exception"]
    assert _kinds(driver, _call(driver, lambda: 1.0, ok=False, raises=(ValueError,))) == \
        ["accepted-invalid"]
    # Extreme-but-valid: the exception named is fine, a result is checked.
    assert _kinds(driver, _call(driver, overflow, raises=(OverflowError,))) == []

    # An input written to, or an out array written outside its view.
    def scribble():
        a[0, 0] += 1
    call = _call(driver, scribble)
    call.inputs.append(("a", a))
    assert _kinds(driver, call) == ["modified-input"]
    big = np.zeros((5, 7))
    view = big[::2, ::3]

    def spill():
        big[1, 1] = 3.0
    call = _call(driver, spill)
    call.outs.append(("out", view, big))
    assert _kinds(driver, call) == ["write-outside-out"]

    # A dtype refused without naming it.
    def vague():
        raise TypeError("unsupported input")
    call = _call(driver, vague)
    call.invalid("x dtype int32", TypeError, msg_has="int32")
    assert _kinds(driver, call) == ["message"]


def test_gemm_check_catches_one_dropped_term(driver):
    """The bound the driver judges with is tight enough to see a single missing product."""
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((13, 29)), rng.standard_normal((29, 11))
    wrong = a[:, 1:] @ b[1:, :]
    ref, bound = D.gemm_reference(a, b)
    with pytest.raises(AssertionError):
        driver.close(wrong, ref, bound, 29, np.dtype(np.float64), "gemm")


def test_a_call_is_rebuilt_from_its_seed_and_index(driver):
    for index in (0, 1, 17, 2999):
        first, ctx1 = driver.build(5, index)
        again, ctx2 = driver.build(5, index)
        assert first.describe() == again.describe() and ctx1 == ctx2
