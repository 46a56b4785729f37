"""Helpers the tests import (``from _helpers import ...``): float64 references with error
bounds derived from the arithmetic, array layouts, and a helper to run microtile in a fresh
interpreter.  Fixtures and the Hypothesis profiles are in ``conftest.py``.

Error bound
-----------
A dot product of length k summed in any order (with or without FMA) in a precision with unit
round-off u = eps/2 is within gamma_k = k*u/(1 - k*u) of the exact value, relative to
``sum |a_i| |b_i|``.  ``alpha * A @ B + beta * C`` adds at most three more roundings (the
scalings, the final addition and the cast of alpha/beta to float32).  The float64 reference
has an error of the same form in float64.  Hence, elementwise,

    |C - C_ref| <= FACTOR * (k + 2) * (eps(dtype) * (|alpha| |A| @ |B| + |beta| |C0|) + tiny)

(tiny, the smallest subnormal, bounds the absolute error of an operation that underflows)

with FACTOR = 2 as a safety margin; this is still ~1e-13 relative for float64 at k = 300,
so a single dropped, doubled or misplaced product is always caught (see
``linalg/test_gemm.py::test_tolerance_catches_one_wrong_term``).
"""
import json
import os
import subprocess
import sys
import threading

import numpy as np

FACTOR = 2.0
FLOATS = (np.float32, np.float64)

# Sizes worth hitting on purpose: 0, 1, primes, and both sides of every multiple of the
# micro-tile sizes (6x16 / 6x8 AVX2, 4x8 / 4x4 generic) and of a few cache blocks.
PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73,
          79, 83, 89, 97, 101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163,
          167, 173, 179, 181, 191, 193, 197, 199, 211, 223, 227, 229, 233, 239, 241, 251,
          257, 263, 269, 271, 277, 281, 283, 293)
EDGE_SIZES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 15, 16, 17, 18, 23, 24, 25, 31, 32,
              33, 47, 48, 49, 63, 64, 65, 95, 96, 97, 127, 128, 129, 167, 168, 169, 191, 192,
              193, 255, 256, 257, 300)


def eps(dtype):
    return float(np.finfo(dtype).eps)


def result_dtype(*arrays):
    """NumPy's promotion among float32/float64 (what microtile must follow)."""
    return np.result_type(*[np.asarray(x).dtype for x in arrays if x is not None])


def gemm_reference(a, b, alpha=1.0, beta=0.0, c=None):
    """(ref, bound): ``alpha * a @ b + beta * c`` in float64 and ``|alpha||a|@|b| + |beta||c|``.

    ``a`` and ``b`` are op(a), op(b) (already transposed), any number of leading batch
    dimensions.  BLAS semantics: alpha == 0 does not touch a/b, beta == 0 does not touch c.
    """
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    shape = np.broadcast_shapes(a64.shape[:-2], b64.shape[:-2]) + (a64.shape[-2], b64.shape[-1])
    ref = np.zeros(shape)
    bound = np.zeros(shape)
    if alpha != 0:
        ref += alpha * np.matmul(a64, b64)
        bound += abs(alpha) * np.matmul(np.abs(a64), np.abs(b64))
    if beta != 0 and c is not None:
        c64 = np.asarray(c, dtype=np.float64)
        ref += beta * c64
        bound += abs(beta) * np.abs(c64)
    return ref, bound


def assert_close(result, ref, bound, k, dtype, what=""):
    """Elementwise ``|result - ref| <= FACTOR*(k+2)*eps(dtype)*bound``; NaN and Inf must match
    the reference exactly.  The message names the worst element."""
    result = np.asarray(result)
    ref = np.asarray(ref, dtype=np.float64)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), ref.shape)
    assert result.shape == ref.shape, f"{what}: shape {result.shape}, expected {ref.shape}"
    r64 = result.astype(np.float64)
    nan_ref, nan_res = np.isnan(ref), np.isnan(r64)
    if (nan_ref != nan_res).any():
        idx = tuple(int(i) for i in np.argwhere(nan_ref != nan_res)[0])
        raise AssertionError(f"{what}: NaN mismatch at {idx}: got {r64[idx]}, expected {ref[idx]}")
    inf_ref = np.isinf(ref)
    if (np.isinf(r64) != inf_ref).any() or (r64[inf_ref] != ref[inf_ref]).any():
        bad = (np.isinf(r64) != inf_ref) | (inf_ref & (r64 != ref))
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(f"{what}: Inf mismatch at {idx}: got {r64[idx]}, expected {ref[idx]}")
    fin = np.isfinite(ref)
    # Underflow: each of the k + 2 operations may also be off by half the smallest
    # subnormal in absolute terms (matters only for subnormal alpha, beta or data).
    tiny = float(np.finfo(dtype).smallest_subnormal)
    tol = FACTOR * (k + 2) * (eps(dtype) * np.where(fin, bound, 0.0) + tiny)
    err = np.where(fin, np.abs(r64 - np.where(fin, ref, 0.0)), 0.0)
    excess = err - tol
    if excess.size and excess.max() > 0:
        idx = tuple(int(i) for i in np.unravel_index(np.argmax(excess), excess.shape))
        raise AssertionError(
            f"{what}: |result - ref| = {err[idx]:.3e} > tol {tol[idx]:.3e} at {idx} "
            f"(result {r64[idx]!r}, ref {ref[idx]!r}, k={k}, dtype={np.dtype(dtype).name}, "
            f"{int((excess > 0).sum())} of {excess.size} elements off)")


def assert_gemm(result, a_op, b_op, alpha=1.0, beta=0.0, c=None, what="gemm"):
    """Check ``result`` against ``alpha*a_op@b_op + beta*c`` with the k*eps bound, and its
    dtype against NumPy's promotion of the inputs."""
    dt = result_dtype(a_op, b_op, c)
    assert np.asarray(result).dtype == dt, f"{what}: dtype {np.asarray(result).dtype}, expected {dt}"
    ref, bound = gemm_reference(a_op, b_op, alpha, beta, c)
    assert_close(result, ref, bound, np.shape(a_op)[-1], dt, what)


# --- layouts ---------------------------------------------------------------------------------

LAYOUTS = ("C", "F", "strided", "neg_rows", "neg_cols", "neg_both", "neg_strided", "readonly",
           "unaligned", "byteswapped")
SENTINEL = 1234.5  # fills the memory around strided views, to catch reads/writes outside them


def with_layout(x, layout):
    """An array equal to ``x`` (2-D or more) with the given memory layout.

    Strided views sit in a larger buffer filled with NaN, so an out-of-view read shows up as
    NaN in the result."""
    x = np.asarray(x)
    if layout == "C":
        return np.ascontiguousarray(x)
    if layout == "F":
        return np.asfortranarray(x)
    if layout in ("strided", "neg_strided"):
        steps = (2, 3) + (2,) * (x.ndim - 2)
        if layout == "neg_strided":
            steps = tuple(-s for s in steps)
        big = np.full(tuple(abs(s) * max(d, 1) + 1 for s, d in zip(steps, x.shape)), np.nan,
                      dtype=x.dtype)
        view = big[tuple(slice(None, None, s) for s in steps)]
        view = view[tuple(slice(0, d) for d in x.shape)]
        view[...] = x
        return view
    if layout in ("neg_rows", "neg_cols", "neg_both"):
        axes = {"neg_rows": (0,), "neg_cols": (x.ndim - 1,), "neg_both": tuple(range(x.ndim))}
        flip = tuple(slice(None, None, -1) if i in axes[layout] else slice(None)
                     for i in range(x.ndim))
        return x[flip].copy()[flip]
    if layout == "readonly":
        y = x.copy()
        y.flags.writeable = False
        return y
    if layout == "unaligned":
        raw = np.empty(x.nbytes + 1, dtype=np.uint8)
        y = raw[1:].view(x.dtype).reshape(x.shape)
        y[...] = x
        return y
    if layout == "byteswapped":
        return x.astype(x.dtype.newbyteorder())
    raise ValueError(layout)


VEC_LAYOUTS = ("C", "strided", "neg", "neg_strided", "readonly", "unaligned", "byteswapped")


def vec_layout(x, layout):
    """A 1-D array equal to ``x`` with the given layout; strided ones live in a NaN buffer."""
    x = np.asarray(x)
    if layout in ("strided", "neg_strided"):
        step = 3 if layout == "strided" else -2
        big = np.full(abs(step) * max(len(x), 1) + 1, np.nan, dtype=x.dtype)
        view = big[::step][:len(x)]
        view[...] = x
        return view
    if layout == "neg":
        return x[::-1].copy()[::-1]
    if layout == "C":
        return x.copy()
    return with_layout(x, layout)


OUT_LAYOUTS = ("C", "F", "strided", "neg_rows", "neg_both", "neg_strided")


def make_out(shape, dtype, layout):
    """(out, big): a writeable ``out`` of the given layout, and the buffer it lives in (filled
    with SENTINEL so that writes outside the view can be detected), or None."""
    if layout in ("strided", "neg_strided"):
        steps = (2, 3) if layout == "strided" else (-2, -3)
        big = np.full((2 * max(shape[0], 1) + 1, 3 * max(shape[1], 1) + 1), SENTINEL, dtype)
        out = big[::steps[0], ::steps[1]][:shape[0], :shape[1]]
        out[...] = np.nan
        return out, big
    out = with_layout(np.full(shape, np.nan, dtype), layout)
    return out, None


def assert_outside_untouched(out, big):
    """Every element of ``big`` outside the view ``out`` still holds SENTINEL (call after the
    result in ``out`` has been checked: it overwrites ``out``)."""
    if big is None:
        return
    out[...] = SENTINEL
    assert (big == SENTINEL).all(), "a write landed outside the out view"


def rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# --- subprocesses ----------------------------------------------------------------------------

_SRC_DIR = None


def _import_root():
    global _SRC_DIR
    if _SRC_DIR is None:
        import microtile
        _SRC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(microtile.__file__)))
    return _SRC_DIR


# The AddressSanitizer build's runtime is preloaded (README, "Sanitizers"): it replaces
# malloc, quarantines freed memory and reserves ~15 TB of shadow address space.
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")


def child_env(env=None):
    """Environment for a fresh interpreter that imports this microtile: no MICROTILE_* or
    OMP_NUM_THREADS variables unless ``env`` sets them (a value of None removes one), except
    MICROTILE_ISA: a run of the suite on the portable kernels starts its children on them
    too (a profile the parent writes names its own kernel set)."""
    child = {k: v for k, v in os.environ.items()
             if (not k.startswith("MICROTILE_") or k == "MICROTILE_ISA")
             and k not in ("OMP_NUM_THREADS",)}
    child["PYTHONPATH"] = os.pathsep.join(
        [_import_root()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    for key, value in (env or {}).items():
        if value is None:
            child.pop(key, None)
        else:
            child[key] = str(value)
    return child


def run_python(code, env=None, timeout=120, preexec_fn=None):
    """Run ``code`` in a fresh interpreter that imports this microtile; return what it
    printed on its last stdout line, parsed as JSON.  The environment is ``child_env(env)``."""
    child = child_env(env)
    proc = subprocess.run([sys.executable, "-c", code], env=child, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec_fn)
    assert proc.returncode == 0, (f"child failed ({proc.returncode}):\n--- stdout\n{proc.stdout}"
                                  f"\n--- stderr\n{proc.stderr}")
    lines = proc.stdout.strip().splitlines()
    assert lines, f"child printed nothing; stderr:\n{proc.stderr}"
    return json.loads(lines[-1])


def run_in_threads(work, n=16, extra=None, timeout=120):
    """Start ``n`` Python threads running ``work(index)`` together (one more, index -1, when
    ``extra``); fail on the first error or on a thread still alive after ``timeout`` s."""
    barrier = threading.Barrier(n + (extra is not None), timeout=60)
    errors = []

    def wrap(i):
        try:
            barrier.wait()
            work(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((i, exc))

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    if extra is not None:
        threads.append(threading.Thread(target=wrap, args=(-1,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        i, exc = errors[0]
        raise AssertionError(f"{len(errors)} thread(s) failed; thread {i}: {exc!r}") from exc


def step_allocation(model, loss, opt, x, labels):
    """Peak bytes Python traced over three training steps of an ``nn`` model, after two
    that settle the buffers (a step that allocates nothing once shapes are known stays at a
    few KiB: Python's own small objects)."""
    import tracemalloc

    def step():
        opt.zero_grad()
        out = model.forward(x)
        loss.forward(out, labels)
        model.backward(loss.backward(), need_input_grad=False)
        opt.step()
    step()
    step()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for _ in range(3):
            step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak - base
