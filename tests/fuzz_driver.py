"""Fuzz driver: seeded random calls to every public microtile function, each checked against
the rules of docs/API.md.  ``tests/runtime/test_fuzz.py`` runs it in a child process, so a
crash is a failed test and not a dead test run.

Usage (from the repository root, with an in-place build)::

    PYTHONPATH=src python tests/fuzz_driver.py --seed 1 --calls 3000    # a whole run
    PYTHONPATH=src python tests/fuzz_driver.py --seed 1 --index 1234 -v # one call again
    PYTHONPATH=src python tests/fuzz_driver.py --seed 1 --calls 3000 --only conv2d,gemm

Call ``i`` of seed ``s`` draws everything from ``numpy.random.default_rng([s, i])`` and builds
its own objects, so it is reproduced by ``--index i`` alone, whatever ran before it.

What each call checks
---------------------
* A valid call returns what a float64 NumPy reference gives, within ``_helpers``' bound
  ``FACTOR * (k + 2) * eps * (|a| |b| + ...)`` (k: roundings per element), with the dtype
  NumPy's promotion gives; copies and gathers (im2col, max pooling) must be exact.
* Inputs are unchanged, bit for bit (the whole buffer a view lives in, so a write next to a
  strided view is caught as well); an ``out``/in-place array is unchanged outside its view.
* An invalid call raises ``TypeError`` or ``ValueError`` (the one the API names when it
  names one: a bad dtype is a ``TypeError`` naming the dtype, a shape mismatch or a bad
  ``out`` shape a ``ValueError``, ``backward`` before ``forward`` a ``RuntimeError``,
  gradcheck's verdict an ``AssertionError``), never anything else and never a crash; a
  result too large to exist (a padding of 2**31) is a ``ValueError``, not a ``MemoryError``.
  Each invalid call carries one injected fault, so the expected exception is unambiguous
  (when a natural one joins it, such as a kernel larger than its input, either is fine).
* Some calls are valid but extreme (a stride of 2**63, a window of 2**32 with padding 2**31):
  they may raise ``ValueError``, and when they return, the result must be right.

A quarter of the calls run inside ``config_context(threads=2, ...)``, often with
``thread_mnk=0`` (threads even for tiny products), small odd blocking (mc/kc/nc) or the
smallest convolution workspace, so the threaded, edge-tile and chunked paths see odd sizes.

Output: with ``--trace`` a line ``>>> [i] description`` on stderr before each call (the last
one names the call that crashed); at the end one line per distinct failure (its first
reproducer and how often it occurred) and a JSON summary as the last stdout line.  Exit status
0 when every call kept the rules, 1 when some did not, negative when a call crashed.

A crash in a plain build may surface calls after the one that corrupted memory (glibc notices
a damaged heap at some later ``free``, and where depends on the addresses it hands out).  Run
the same seed on the AddressSanitizer build (README, "Building") to stop at the bad access:
the last ``>>>`` line is then the culprit, and ``--index`` repeats it alone.
"""
import argparse
import faulthandler
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import threading
import traceback
import warnings

# Address-space cap: a runaway allocation becomes a MemoryError (a failed rule) instead of a
# visit from the OOM killer.  Set before NumPy and OpenMP start their threads.  AddressSanitizer
# reserves terabytes of shadow memory, so the cap is skipped under it.
DEFAULT_RLIMIT_GB = 4.0
# A single call that takes longer than this is reported as a hang (with every thread's stack);
# calls are small, so this only fires on a real deadlock or a runaway loop.
DEFAULT_HANG_SECONDS = 300.0

import numpy as np  # noqa: E402

from _helpers import FACTOR, assert_close, eps, gemm_reference  # noqa: E402
import fuzz_reference as R  # noqa: E402

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
FLOATS = (F32, F64)
BAD_DTYPES = ("int32", "int64", "bool", "float16", "complex64", "complex128", "object", "str")
PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67)
# Integers that overflow C types or are absurd for any size (each a different edge: int32,
# the largest ssize_t, just past it, past uint64, a Python bignum).
HUGE_INTS = (2 ** 31, 2 ** 40, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64, 10 ** 30)
# Results larger than this many elements cannot be valid here (memory is capped): a call
# asking for one must raise ValueError, not MemoryError.
MAX_RESULT = 1 << 28
SENTINEL = 1234.5

mt = None   # microtile, imported in main() after the address-space cap is set
nn = None


# =============================================================================================
# Random data, layouts and bad values
# =============================================================================================

def size(rng, hi, zero=0.08, one=0.12):
    """0, 1, a prime or anything up to ``hi``: the sizes that find edge tiles."""
    u = rng.random()
    if u < zero:
        return 0
    if u < zero + one:
        return 1
    if u < 0.6:
        ps = [p for p in PRIMES if p <= hi]
        return int(rng.choice(ps)) if ps else 1
    return int(rng.integers(1, hi + 1))


def choice(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def fdtype(rng):
    return choice(rng, FLOATS)


def values(rng, shape, dtype, specials=0.0):
    """Standard normal values; with probability ``specials`` one NaN, Inf, -Inf or -0.0."""
    a = rng.standard_normal(shape)
    if a.size and rng.random() < specials:
        a.flat[int(rng.integers(a.size))] = choice(rng, (np.nan, np.inf, -np.inf, -0.0))
    return a.astype(dtype)


def bad_array(rng, shape, kind):
    """An array of a dtype microtile must refuse (``kind`` from BAD_DTYPES)."""
    base = rng.standard_normal(shape)
    if kind == "object":
        out = np.empty(shape, dtype=object)
        out[...] = base
        return out
    if kind == "str":
        return np.full(shape, "1.5")
    if kind.startswith("complex"):
        return (base + 1j * base).astype(kind)
    return base.astype(kind)


# Layouts of an input.  "zero" (a stride-0 broadcast view) and "list" change what the values
# or the dtype are, so references are always computed from the array as passed.
LAYOUTS = ("C", "F", "swapped", "strided", "neg", "neg_strided", "zero", "unit_zero",
           "readonly", "unaligned", "offset", "byteswapped", "huge_strides", "list")
# Layouts an in-place or out array may have (writeable, aligned, native).
OUT_LAYOUTS = ("C", "F", "swapped", "strided", "neg", "neg_strided", "offset", "huge_strides")


def _aligned_buffer(nbytes, offset):
    """A uint8 buffer whose data starts ``offset`` bytes past a 64-byte boundary."""
    raw = np.empty(nbytes + 128, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    return raw[start:start + nbytes]


def arrange(rng, a, layout):
    """(array equal to ``a`` in the given layout, the buffer that owns its memory)."""
    a = np.asarray(a)
    if layout == "list" and a.size:      # an empty list would lose the shape
        return a.tolist(), None
    if layout == "F":
        b = np.asfortranarray(a) if a.ndim else a.copy()   # it makes a 0-d array 1-d
        return b, b
    if layout == "swapped" and a.ndim >= 2:
        b = np.ascontiguousarray(np.swapaxes(a, -1, -2))
        return np.swapaxes(b, -1, -2), b
    if layout in ("strided", "neg_strided") and a.ndim:
        steps = [int(rng.integers(2, 4)) for _ in range(a.ndim)]
        if layout == "neg_strided":
            steps = [-s for s in steps]
        big_shape = tuple(abs(s) * max(d, 1) + 1 for s, d in zip(steps, a.shape))
        big = np.full(big_shape, np.nan if a.dtype.kind == "f" else 0, dtype=a.dtype)
        view = big[tuple(slice(None, None, s) for s in steps)][tuple(slice(0, d) for d in a.shape)]
        view[...] = a
        return view, big
    if layout == "neg" and a.ndim:
        axes = [i for i in range(a.ndim) if rng.random() < 0.6] or [a.ndim - 1]
        flip = tuple(slice(None, None, -1) if i in axes else slice(None) for i in range(a.ndim))
        b = a[flip].copy()
        return b[flip], b
    if layout == "zero" and a.ndim:
        axes = [i for i in range(a.ndim) if a.shape[i] > 1]
        if axes:
            ax = choice(rng, axes)
            src = np.take(a, [0], axis=ax).copy()
            return np.broadcast_to(src, a.shape), src
    if layout == "readonly":
        b = a.copy()
        b.flags.writeable = False
        return b, b
    if layout in ("unaligned", "offset") and a.dtype.kind in "fiucb" and a.dtype.itemsize > 1:
        off = 1 if layout == "unaligned" else a.dtype.itemsize
        b = _aligned_buffer(a.nbytes, off).view(a.dtype).reshape(a.shape)
        b[...] = a
        return b, b
    if layout == "byteswapped" and a.dtype.kind in "fiuc" and a.dtype.itemsize > 1:
        b = a.astype(a.dtype.newbyteorder())
        return b, b
    if layout == "unit_zero" and a.ndim and 1 in a.shape:
        # Length-1 axes with stride 0, as x[None] and broadcasting make them.
        b = a.copy()
        strides = [0 if d == 1 else st for d, st in zip(a.shape, b.strides)]
        return np.lib.stride_tricks.as_strided(b, a.shape, strides), b
    if layout == "huge_strides" and a.ndim and any(d <= 1 for d in a.shape):
        b = a.copy()
        strides = [choice(rng, (0, 2 ** 40, -(2 ** 40), 2 ** 62, -(2 ** 62), 2 ** 63 - 8))
                   if d <= 1 else s for d, s in zip(a.shape, b.strides)]
        return np.lib.stride_tricks.as_strided(b, a.shape, strides), b
    b = a.copy()
    return b, b


def describe(x):
    """Short text for one argument: dtype, shape and strides of an array, repr otherwise."""
    if isinstance(x, np.ndarray):
        flags = "" if x.flags.writeable else " ro"
        if not x.flags.aligned:
            flags += " unaligned"
        return f"{x.dtype.str}{list(x.shape)}@{list(x.strides)}{flags}"
    if isinstance(x, list):
        return f"list{list(np.shape(np.asarray(x, dtype=object)))}"
    text = " ".join(repr(x).split())
    return text if len(text) <= 60 else text[:57] + "..."


def out_mask(owner, view):
    """Boolean mask over ``owner`` of the elements ``view`` covers (None when view is owner)."""
    if view is owner or owner is None or not isinstance(view, np.ndarray) or view.size == 0:
        return None
    start = view.__array_interface__["data"][0] - owner.__array_interface__["data"][0]
    item = owner.itemsize
    if (view.itemsize != item or item not in (1, 2, 4, 8) or start % item
            or not owner.flags.c_contiguous):
        return None
    # An unsigned integer twin of the owner's buffer, so the view's byte strides apply as is.
    mark = np.zeros(owner.size, dtype=f"u{item}")
    hit = np.lib.stride_tricks.as_strided(mark[start // item:], view.shape, view.strides)
    hit[...] = 1
    return mark.reshape(owner.shape).astype(bool)


# =============================================================================================
# One call: what it runs, what it may raise, how its result is checked
# =============================================================================================

class Call:
    """One generated call.

    ``run()`` makes the call; ``ok`` says whether it may return (it then goes to ``check``);
    ``raises`` lists the exceptions it may raise instead (empty: it must return).  ``inputs``
    are (name, owner buffer) pairs that must be unchanged afterwards, ``outs`` (name, view,
    owner) arrays that may change only inside the view.  ``post(error)`` runs after the call
    whatever happened (state checks such as "the model is unchanged").
    """

    def __init__(self, target, fault="valid", ok=True, raises=(), msg_has=None):
        self.target = target
        self.fault = fault
        self.ok = ok
        self.raises = tuple(raises)
        self.msg_has = msg_has
        self.natural = ()
        self.args = []
        self.inputs = []
        self.outs = []
        self.run = None
        self.check = None
        self.post = None
        self.threads_ok = True

    def arg(self, name, value, owner=None, *, watch=True):
        """Record an argument for the description (and its buffer to watch)."""
        self.args.append(f"{name}={describe(value)}")
        if watch and owner is not None and isinstance(owner, np.ndarray) \
                and owner.dtype != object:
            self.inputs.append((name, owner))
        return value

    def out(self, name, value, owner):
        self.args.append(f"{name}={describe(value)}")
        if isinstance(value, np.ndarray):
            self.outs.append((name, value, owner))
        return value

    def invalid(self, fault, *raises, msg_has=None):
        self.fault, self.ok, self.raises = fault, False, raises + self.natural
        self.msg_has = None if self.natural else msg_has

    def refuse(self, fault, *raises):
        """A natural fault (a kernel larger than the input, a result too large): the call is
        invalid whatever is injected later, which may then raise its own exception or this."""
        self.natural += raises
        self.invalid(fault, *raises)

    def also(self, *raises):
        """A second, natural fault (say a kernel larger than the input) joins the injected
        one: its exception is allowed too, whichever fault is set later."""
        self.natural += raises
        self.raises = self.raises + raises
        self.msg_has = None

    def either(self, fault, *raises):
        """Valid but extreme: may raise one of ``raises``; a result must still be right."""
        self.fault, self.ok, self.raises = fault, True, raises

    def describe(self):
        return f"{self.target}({', '.join(self.args)}) [{self.fault}]"


class Problem(Exception):
    """A broken rule, with a short kind for grouping."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


def snapshot(arr):
    return arr.tobytes()


def execute(call, ctx):
    """Run one call and return the broken rules as [(kind, message)]."""
    before = [(name, arr, snapshot(arr)) for name, arr in call.inputs]
    outside = []
    for name, view, owner in call.outs:
        mask = out_mask(owner, view)
        if mask is not None:
            outside.append((name, owner, mask, owner[~mask].copy()))
    problems = []
    error = None
    result = None
    try:
        if ctx and call.threads_ok:
            with mt.config_context(**ctx):
                result = call.run()
        else:
            result = call.run()
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # every exception is judged below
        error = exc
    names = "/".join(dict.fromkeys(e.__name__ for e in call.raises))
    if error is None:
        if not call.ok:
            problems.append(("accepted-invalid", f"returned {summarize(result)} for an invalid "
                                                 f"call ({call.fault}); expected {names}"))
        elif call.check is not None:
            try:
                with np.errstate(all="ignore"):
                    call.check(result)
            except (AssertionError, Problem) as exc:
                problems.append((getattr(exc, "kind", "wrong-result"), str(exc)))
            except Exception as exc:  # a bug in the check itself: say so, keep going
                problems.append(("driver-error", "the check failed: "
                                 + "".join(traceback.format_exception(exc)[-3:])))
    else:
        allowed = call.raises
        if not isinstance(error, allowed):
            kind = "raised-on-valid" if call.ok and not allowed else "wrong-exception"
            expect = "a result" if not allowed else names + (" or a result" if call.ok else "")
            problems.append((kind, f"{type(error).__name__}: {error} (expected {expect})\n"
                                   + "".join(traceback.format_exception(error)[-3:])))
        elif call.msg_has and call.msg_has not in str(error):
            problems.append(("message", f"{type(error).__name__}: {error!s} does not name "
                                        f"{call.msg_has!r}"))
    for name, arr, snap in before:
        if snapshot(arr) != snap:
            problems.append(("modified-input", f"input {name} was modified"))
    for name, owner, mask, old in outside:
        if not np.array_equal(owner[~mask], old, equal_nan=True):
            problems.append(("write-outside-out", f"{name}: a write landed outside the view"))
    if call.post is not None:
        try:
            call.post(error)
        except (AssertionError, Problem) as exc:
            problems.append((getattr(exc, "kind", "state"), str(exc)))
    return problems


def summarize(result):
    if isinstance(result, tuple):
        return "(" + ", ".join(summarize(r) for r in result) + ")"
    if isinstance(result, np.ndarray):
        return f"array {result.dtype}{list(result.shape)}"
    return describe(result)


# --- result checks -----------------------------------------------------------------------------

def native(dt):
    dt = np.dtype(dt)
    return dt.newbyteorder("=") if dt.kind == "f" else dt


def promoted(*xs):
    """The dtype NumPy's promotion gives to the float arguments as passed (byte order aside;
    Python lists are float64); arguments that are not float arrays are skipped."""
    dts = []
    for x in xs:
        if x is None or isinstance(x, (str, bytes)):
            continue
        dt = np.asarray(x).dtype
        if dt.kind == "f" and dt.itemsize in (4, 8):
            dts.append(native(dt))
    return np.result_type(*dts) if dts else F64


def f64(x):
    return np.asarray(x, dtype=F64)


def expect_array(res, shape, dtype, what):
    if not isinstance(res, np.ndarray):
        raise Problem("wrong-type", f"{what}: returned {type(res).__name__}, not an ndarray")
    if res.shape != tuple(shape):
        raise Problem("wrong-shape", f"{what}: shape {res.shape}, expected {tuple(shape)}")
    # A byte-swapped ``out`` is returned as given, in its own byte order (NumPy's rule).
    if native(res.dtype) != native(dtype):
        raise Problem("wrong-dtype", f"{what}: dtype {res.dtype}, expected {np.dtype(dtype)}")


def close(res, ref, bound, k, dtype, what):
    """``_helpers.assert_close`` after shape and dtype checks."""
    expect_array(res, np.shape(ref), dtype, what)
    assert_close(res, ref, bound, k, dtype, what)


def exact(res, ref, dtype, what):
    expect_array(res, np.shape(ref), dtype, what)
    want = np.asarray(ref, dtype=F64).astype(dtype)
    if not np.array_equal(res, want, equal_nan=True):
        bad = np.argwhere(~((res == want) | (np.isnan(res) & np.isnan(want))))[0]
        idx = tuple(int(i) for i in bad)
        raise AssertionError(f"{what}: element {idx} is {res[idx]!r}, expected {want[idx]!r} "
                             f"(should be exact)")


# =============================================================================================
# Faults shared by many generators
# =============================================================================================

def int_fault(rng, call, name, *, allow_zero=False):
    """A bad value for an int (or pair) argument; sets the call's expectation, returns it."""
    kind = choice(rng, ("str", "str", "float", "none", "negative", "zero", "huge", "bool",
                        "triple", "nested"))
    if kind == "zero" and allow_zero:
        kind = "negative"
    if kind == "str":
        v = choice(rng, ("1111", "2", np.str_("3"), b"2", ("2", 2)))
        call.invalid(f"{name}=string", TypeError, ValueError)
    elif kind == "float":
        v = choice(rng, (2.0, 1.5, (1.0, 2), np.float64(2.0)))
        call.invalid(f"{name}=float", TypeError, ValueError)
    elif kind == "none":
        v = None
        call.invalid(f"{name}=None", TypeError, ValueError)
    elif kind == "negative":
        v = choice(rng, (-1, -2, (1, -1), -(2 ** 63), -(2 ** 70)))
        call.invalid(f"{name}=negative", ValueError)
    elif kind == "zero":
        v = choice(rng, (0, (0, 1), (1, 0)))
        call.invalid(f"{name}=0", ValueError)
    elif kind == "bool":
        v = True
        call.invalid(f"{name}=bool", TypeError, ValueError)
    elif kind == "triple":
        v = (1, 1, 1)
        call.invalid(f"{name}=triple", TypeError, ValueError)
    elif kind == "nested":
        v = choice(rng, ([[1, 1]], {"a": 1}, 1 + 2j, object()))
        call.invalid(f"{name}=nonsense", TypeError, ValueError)
    else:
        v = choice(rng, HUGE_INTS)
        if rng.random() < 0.3:
            v = (1, v) if rng.random() < 0.5 else (v, 1)
        # Valid or not, the geometry decides (a stride of 2**63 is fine, a padding of 2**63
        # asks for an impossible result): the callers refuse what cannot be valid.
        call.either(f"{name}=huge", ValueError)
    return v


def array_fault(rng, call, name, shape, optional=False):
    """A replacement for a float array argument that must be refused: a bad dtype (TypeError
    naming it), None (unless the argument is optional) or a string."""
    u = rng.random()
    if optional and 0.75 <= u < 0.9:
        u = 0.95
    if u < 0.75:
        kind = choice(rng, BAD_DTYPES)
        arr = bad_array(rng, shape, kind)
        layout = choice(rng, ("C", "F", "strided", "neg", "readonly"))
        arr, _ = arrange(rng, arr, layout)
        name_in_msg = None if kind == "str" else str(np.dtype(kind))
        call.invalid(f"{name} dtype {kind}", TypeError, msg_has=name_in_msg)
        return arr
    if u < 0.9:
        call.invalid(f"{name}=None", TypeError, ValueError)
        return None
    call.invalid(f"{name}=string", TypeError, ValueError)
    return choice(rng, ("abc", "1.0", b"xyz"))


def pick(rng, p_fault, kinds):
    """A fault kind from ``kinds`` with probability ``p_fault``, else "valid"."""
    if rng.random() < p_fault:
        return choice(rng, kinds)
    return "valid"


def put(rng, call, name, base, layouts=LAYOUTS):
    """Arrange ``base`` in a random layout and record it as a watched input."""
    arr, owner = arrange(rng, base, choice(rng, layouts))
    return call.arg(name, arr, owner)


def out_arg(rng, call, shape, dtype, fault):
    """An ``out`` array (or None), honouring an out-fault; returns (out, its owner)."""
    if fault == "out_shape":
        bad = tuple(d + 1 for d in shape) if shape else (1,)
        o, own = arrange(rng, np.full(bad, np.nan, dtype), "C")
        call.invalid("out shape", ValueError)
    elif fault == "out_dtype":
        other = choice(rng, [d for d in (F32, F64, np.dtype(np.int32)) if d != dtype])
        o, own = arrange(rng, np.zeros(shape, other), "C")
        call.invalid("out dtype", TypeError)
    elif fault == "out_readonly":
        o, own = arrange(rng, np.full(shape, np.nan, dtype), choice(rng, ("readonly", "zero")))
        o.flags.writeable = False      # "zero" falls back to a plain copy when nothing repeats
        call.invalid("out read-only", ValueError)
    elif fault == "out_list":
        o, own = np.zeros(shape).tolist(), None
        call.invalid("out is a list", TypeError, ValueError)
    elif fault == "out_misaligned":
        o, own = arrange(rng, np.full(shape, np.nan, dtype), choice(rng, ("unaligned",
                                                                          "byteswapped")))
        # A byte-swapped float64 is another dtype to NumPy: TypeError is as right as ValueError.
        call.either("out unaligned/byte-swapped", ValueError, TypeError)
    else:
        o, own = arrange(rng, np.full(shape, np.nan, dtype), choice(rng, OUT_LAYOUTS))
    return call.out("out", o, own), own


OUT_FAULTS = ("out_shape", "out_dtype", "out_readonly", "out_list", "out_misaligned")


# =============================================================================================
# Linear algebra
# =============================================================================================

def gen_gemm(rng):
    call = Call("gemm")
    hi = 70 if rng.random() < 0.8 else 300
    m, n, k = size(rng, hi), size(rng, hi), size(rng, hi)
    if hi == 300:      # one long side at a time keeps a call cheap
        m, n = min(m, 40), min(n, 40)
    dta, dtb = fdtype(rng), fdtype(rng)
    ta, tb = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    alpha = choice(rng, (1.0, 1.0, 0.0, -1.5, 2, np.float32(0.5), float(rng.standard_normal())))
    beta = choice(rng, (0.0, 0.0, 1.0, -0.5, 2.0, 0))
    use_c = beta != 0 or rng.random() < 0.3
    fault = pick(rng, 0.4, ("dtype_a", "dtype_b", "dtype_c", "inner", "ndim_a", "c_missing",
                            "c_shape", "alpha", "overlap") + OUT_FAULTS)
    sp = 0.05
    a_op, b_op = values(rng, (m, k), dta, sp), values(rng, (k, n), dtb, sp)
    a_base, b_base = (a_op.T if ta else a_op), (b_op.T if tb else b_op)
    if fault == "inner":
        b_base = values(rng, (n, k + 1) if tb else (k + 1, n), dtb)
        call.invalid("inner dimensions differ", ValueError)
    if fault == "ndim_a":
        a_base = values(rng, choice(rng, ((m * k,), (1, m, k), ())), dta)
        call.invalid("a not 2-D", ValueError)
    a = put(rng, call, "a", a_base) if fault != "dtype_a" else call.arg(
        "a", array_fault(rng, call, "a", a_base.shape))
    b = put(rng, call, "b", b_base) if fault != "dtype_b" else call.arg(
        "b", array_fault(rng, call, "b", b_base.shape))
    dt = promoted(a, b)
    c = None
    c_shape = (m, n) if rng.random() < 0.85 else choice(rng, ((n,), (1, n), (m, 1)))
    if fault == "c_missing":
        beta = choice(rng, (1.0, -0.5))
        use_c = False
        call.invalid("beta != 0 without c", ValueError)
    if use_c:
        cdt = fdtype(rng) if rng.random() < 0.3 else dt
        if fault == "c_shape":
            c_shape = (m + 1, n + 2)
            call.invalid("c shape", ValueError)
        c_vals = values(rng, c_shape, cdt, sp if beta else 0.3)
        if fault == "dtype_c":
            c = call.arg("c", array_fault(rng, call, "c", c_shape, optional=True))
        else:
            c = put(rng, call, "c", c_vals)
        if c_shape != (m, n) and fault == "valid":
            call.either("c broadcast", ValueError)
        dt = promoted(a, b, c)
    if fault == "alpha":
        alpha = choice(rng, ("1.0", None, 1 + 1j, np.array([1.0, 2.0]), [1.0]))
        call.invalid("alpha not a real scalar", TypeError, ValueError)
    out = None
    in_place = (use_c and c_shape == (m, n) and fault == "valid" and isinstance(c, np.ndarray)
                and c.dtype == dt and c.flags.writeable and c.flags.aligned
                and rng.random() < 0.3)
    if in_place:
        out = c
        call.inputs = [(nm, o) for nm, o in call.inputs if nm != "c"]
        call.out("out", out, None)
    elif fault in OUT_FAULTS or (fault == "valid" and rng.random() < 0.25):
        out, _ = out_arg(rng, call, (m, n), dt, fault)
    if fault == "overlap" and m and n and k and not ta:
        big = np.zeros((m + k + 1, m + n + k + 1), dtype=dt)
        big[:m, :k] = a_op if not ta else 0
        a = big[:m, :k] if not ta else a
        out = big[:m, :n]
        call.out("out", out, big)
        call.invalid("out overlaps a", ValueError)
    c_before = None if c is None else np.array(c)
    call.arg("alpha", alpha, watch=False)
    call.arg("beta", beta, watch=False)
    call.args.append(f"trans_a={ta}, trans_b={tb}")

    def run():
        return mt.gemm(a, b, alpha=alpha, beta=beta, c=c, trans_a=ta, trans_b=tb, out=out)

    def check(res):
        A, B = np.asarray(a), np.asarray(b)
        ref, bound = gemm_reference(A.T if ta else A, B.T if tb else B, alpha, beta, c_before)
        close(res, np.broadcast_to(ref, (m, n)), np.broadcast_to(bound, (m, n)), k, dt, "gemm")
        if out is not None and res is not out:
            raise Problem("out-not-returned", "gemm: did not return out")
    call.run, call.check = run, check
    return call


def gen_matmul(rng):
    call = Call("matmul")
    n, k, m = size(rng, 40), size(rng, 40), size(rng, 40)
    nda, ndb = choice(rng, (1, 2, 2, 3, 4)), choice(rng, (1, 2, 2, 3))
    # Batch dimensions: the trailing ones of one shape, each possibly 1 (broadcast).
    batch = [size(rng, 4, zero=0.05, one=0.3) for _ in range(2)]
    ba = [choice(rng, (d, 1)) for d in batch][2 - max(nda - 2, 0):]
    bb = [choice(rng, (d, 1)) for d in batch][2 - max(ndb - 2, 0):]
    sa = tuple(ba) + ((m, k) if nda >= 2 else (k,))
    sb = tuple(bb) + ((k, n) if ndb >= 2 else (k,))
    fault = pick(rng, 0.35, ("dtype_a", "dtype_b", "inner", "batch", "scalar") + OUT_FAULTS)
    if fault == "inner":
        sb = sb[:-2] + (k + 1, n) if ndb >= 2 else (k + 1,)
        call.invalid("inner dimensions differ", ValueError)
    if fault == "batch":
        sa, sb = (2, 3, m, k), (2, k, n)
        call.invalid("batch dims do not broadcast", ValueError)
    if fault == "scalar":
        sa = ()
        call.invalid("0-d operand", ValueError)
    dta, dtb = fdtype(rng), fdtype(rng)
    av, bv = values(rng, sa, dta, 0.03), values(rng, sb, dtb, 0.03)
    a = put(rng, call, "a", av) if fault != "dtype_a" else call.arg(
        "a", array_fault(rng, call, "a", sa))
    b = put(rng, call, "b", bv) if fault != "dtype_b" else call.arg(
        "b", array_fault(rng, call, "b", sb))
    dt = promoted(a, b)
    out = None
    if call.ok:
        shape = np.matmul(np.empty(sa, np.float32), np.empty(sb, np.float32)).shape
    else:
        shape = (max(m, 1), max(n, 1))
    if fault in OUT_FAULTS or (call.ok and rng.random() < 0.2 and len(shape) >= 1):
        out, _ = out_arg(rng, call, shape, dt, fault)

    def run():
        return mt.matmul(a, b, out=out) if out is not None else mt.matmul(a, b)

    def check(res):
        A, B = f64(a), f64(b)
        ref = np.matmul(A, B)
        bound = np.matmul(np.abs(A), np.abs(B))
        res = np.asarray(res) if np.ndim(ref) == 0 else res
        close(res, ref, bound, k, dt, "matmul")
    call.run, call.check = run, check
    return call


def gen_dot(rng):
    call = Call("dot")
    n = size(rng, 300)
    fault = pick(rng, 0.35, ("dtype", "length", "ndim", "none"))
    xv, yv = values(rng, (n,), fdtype(rng), 0.05), values(rng, (n,), fdtype(rng), 0.05)
    if fault == "length":
        yv = values(rng, (n + 1,), yv.dtype)
        call.invalid("lengths differ", ValueError)
    if fault == "ndim":
        xv = values(rng, (1, n), xv.dtype)
        call.invalid("x not 1-D", ValueError)
    x = put(rng, call, "x", xv)
    y = put(rng, call, "y", yv) if fault not in ("dtype", "none") else call.arg(
        "y", array_fault(rng, call, "y", (n,)) if fault == "dtype" else None)
    if fault == "none":
        call.invalid("y=None", TypeError, ValueError)
    dt = promoted(x, y)

    def check(res):
        if type(res) is not float:
            raise Problem("wrong-type", f"dot returned {type(res).__name__}, not float")
        ref = float(np.dot(f64(x), f64(y)))
        bound = float(np.dot(np.abs(f64(x)), np.abs(f64(y))))
        assert_close(np.float64(res), ref, bound, n, dt, "dot")
    call.run, call.check = (lambda: mt.dot(x, y)), check
    return call


def gen_outer(rng):
    call = Call("outer")
    m, n = size(rng, 60), size(rng, 60)
    fault = pick(rng, 0.35, ("dtype",) + OUT_FAULTS)
    xv, yv = values(rng, (m,), fdtype(rng), 0.05), values(rng, (n,), fdtype(rng), 0.05)
    x = put(rng, call, "x", xv)
    y = put(rng, call, "y", yv) if fault != "dtype" else call.arg(
        "y", array_fault(rng, call, "y", (n,)))
    dt = promoted(x, y)
    out = None
    if fault in OUT_FAULTS or (fault == "valid" and rng.random() < 0.3):
        out, _ = out_arg(rng, call, (m, n), dt, fault)

    def check(res):
        X, Y = f64(x), f64(y)
        close(res, X[:, None] * Y[None, :], np.abs(X)[:, None] * np.abs(Y)[None, :], 0, dt,
              "outer")
    call.run = (lambda: mt.outer(x, y, out=out)) if out is not None else (lambda: mt.outer(x, y))
    call.check = check
    return call


def gen_ger(rng):
    call = Call("ger")
    m, n = size(rng, 60), size(rng, 60)
    dta = fdtype(rng)
    fault = pick(rng, 0.4, ("a_readonly", "a_list", "a_dtype", "x_dtype", "length",
                            "a_layout", "mixed", "alpha"))
    av = values(rng, (m, n), dta, 0.03)
    xv = values(rng, (m,), dta if fault != "mixed" else F64 if dta == F32 else F32, 0.03)
    yv = values(rng, (n,), dta, 0.03)
    alpha = choice(rng, (1.0, -2.0, 0.0, 0.5, 3))
    if fault == "a_readonly":
        a, owner = arrange(rng, av, choice(rng, ("readonly", "zero")))
        a.flags.writeable = False      # "zero" falls back to a plain copy when nothing repeats
        call.invalid("a read-only", ValueError)
    elif fault == "a_list":
        a, owner = av.tolist(), None
        call.invalid("a is a list", TypeError)
    elif fault == "a_dtype":
        kind = choice(rng, ("int32", "int64", "float16", "complex128", "bool"))
        a, owner = bad_array(rng, (m, n), kind), None
        call.invalid("a dtype", TypeError)
    elif fault == "a_layout":
        # Still valid: a is an input ("any memory layout is accepted") updated in place.
        a, owner = arrange(rng, av, choice(rng, ("unaligned", "byteswapped")))
        call.fault = "a misaligned or byte-swapped"
    else:
        a, owner = arrange(rng, av, choice(rng, OUT_LAYOUTS))
    if fault == "mixed":
        call.either("a float32/float64 with x of the other", TypeError, ValueError)
    call.out("a", a, owner) if isinstance(a, np.ndarray) else call.arg("a", a)
    if fault == "length":
        xv = values(rng, (m + 1,), dta)
        call.invalid("x length", ValueError)
    x = put(rng, call, "x", xv) if fault != "x_dtype" else call.arg(
        "x", array_fault(rng, call, "x", (m,)))
    y = put(rng, call, "y", yv)
    if fault == "alpha":
        alpha = choice(rng, ("2", None, 1j))
        call.invalid("alpha", TypeError, ValueError)
    call.arg("alpha", alpha, watch=False)
    a0 = np.array(a) if isinstance(a, np.ndarray) else None

    def check(res):
        if res is not a:
            raise Problem("out-not-returned", "ger: did not return a")
        X, Y = f64(x), f64(y)
        ref = f64(a0) + alpha * X[:, None] * Y[None, :]
        bound = np.abs(f64(a0)) + abs(alpha) * np.abs(X)[:, None] * np.abs(Y)[None, :]
        dt = native(a0.dtype)
        got = np.array(res, dtype=dt)       # a itself, perhaps byte-swapped
        try:
            close(got, ref, bound, 1, dt, "ger")
        except AssertionError:
            if alpha != 0:
                raise
            # alpha == 0 may return early as BLAS does (NaN in x or y then does not reach a).
            close(got, f64(a0), np.abs(f64(a0)), 1, dt, "ger")
    call.run, call.check = (lambda: mt.ger(a, x, y, alpha=alpha)), check
    return call


def gen_gemv(rng):
    call = Call("gemv")
    m, n = size(rng, 80), size(rng, 80)
    trans = bool(rng.random() < 0.5)
    alpha = choice(rng, (1.0, -0.5, 0.0, 2))
    beta = choice(rng, (0.0, 0.0, 1.0, -2.0))
    use_y = beta != 0 or rng.random() < 0.3
    fault = pick(rng, 0.4, ("dtype_a", "dtype_x", "length", "ndim", "y_missing", "y_shape")
                 + OUT_FAULTS)
    rows, cols = (n, m) if trans else (m, n)      # op(a) is (m, n)
    av = values(rng, (rows, cols), fdtype(rng), 0.03)
    xv = values(rng, (n,), fdtype(rng), 0.03)
    if fault == "length":
        xv = values(rng, (n + 1,), xv.dtype)
        call.invalid("x length", ValueError)
    if fault == "ndim":
        av = values(rng, (rows * cols,), av.dtype)
        call.invalid("a not 2-D", ValueError)
    a = put(rng, call, "a", av) if fault != "dtype_a" else call.arg(
        "a", array_fault(rng, call, "a", (rows, cols)))
    x = put(rng, call, "x", xv) if fault != "dtype_x" else call.arg(
        "x", array_fault(rng, call, "x", (n,)))
    dt = promoted(a, x)
    y = None
    if fault == "y_missing":
        beta, use_y = 1.0, False
        call.invalid("beta != 0 without y", ValueError)
    if use_y:
        yv = values(rng, (m + 1,) if fault == "y_shape" else (m,),
                    dt if rng.random() < 0.7 else fdtype(rng), 0.03 if beta else 0.3)
        if fault == "y_shape":
            call.invalid("y shape", ValueError)
        y = put(rng, call, "y", yv)
        dt = promoted(a, x, y)
    out = None
    if fault in OUT_FAULTS or (fault == "valid" and rng.random() < 0.25):
        layout = choice(rng, ("C", "strided", "neg", "neg_strided", "offset"))
        o, _ = arrange(rng, np.full((m,), np.nan, dt), layout)
        if fault in OUT_FAULTS:
            o, _ = out_arg(rng, call, (m,), dt, fault)
        else:
            call.out("out", o, None)
        out = o
    y0 = None if y is None else np.array(y)
    call.arg("alpha", alpha, watch=False)
    call.arg("beta", beta, watch=False)
    call.args.append(f"trans={trans}")

    def run():
        return mt.gemv(a, x, alpha=alpha, beta=beta, y=y, trans=trans, out=out)

    def check(res):
        A = f64(a)
        A = A.T if trans else A
        ref, bound = gemm_reference(A, f64(x)[:, None], alpha, beta,
                                    None if y0 is None else f64(y0)[:, None])
        close(res, ref[:, 0], bound[:, 0], n, dt, "gemv")
    call.run, call.check = run, check
    return call


# =============================================================================================
# Convolution and pooling
# =============================================================================================

def geometry_arg(rng, lo, hi):
    v = int(rng.integers(lo, hi + 1))
    if rng.random() < 0.25:
        return (v, int(rng.integers(lo, hi + 1)))
    return v if rng.random() < 0.8 else [v, v]


def conv_setup(rng, call, fault_kinds):
    """Shapes, geometry and one fault for conv2d / conv2d_backward."""
    g = choice(rng, (1, 1, 1, 2, 3))
    cg = size(rng, 3, zero=0.05, one=0.4)
    kg = size(rng, 3, zero=0.05, one=0.4)
    N = size(rng, 3, zero=0.1, one=0.4)
    H, W = size(rng, 11, zero=0.06, one=0.1), size(rng, 11, zero=0.06, one=0.1)
    Rk, Sk = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    kw = {"stride": geometry_arg(rng, 1, 3), "padding": geometry_arg(rng, 0, 3),
          "dilation": geometry_arg(rng, 1, 3) if rng.random() < 0.4 else 1, "groups": g}
    u = rng.random()
    if u < 0.1:
        kw["padding"] = "valid"
    elif u < 0.2:
        kw["padding"], kw["stride"] = "same", 1
    fault = pick(rng, 0.45, fault_kinds)
    return dict(g=g, C=g * cg, K=g * kg, N=N, H=H, W=W, R=Rk, S=Sk, kw=kw, fault=fault,
                unbatched=rng.random() < 0.15)


CONV_FAULTS = ("dtype_x", "dtype_w", "ndim_x", "ndim_w", "channels", "groups", "stride",
               "padding", "dilation", "padding_mode", "same_stride", "huge_stride",
               "huge_padding")


def conv_faults(rng, call, s):
    """Apply a conv fault to the setup ``s`` (shapes or keyword arguments)."""
    f, kw = s["fault"], s["kw"]
    if f == "ndim_x":
        s["x_shape"] = choice(rng, ((s["C"], s["H"] * s["W"]), (1, 1, s["C"], s["H"], s["W"])))
        call.invalid("x rank", ValueError)
    elif f == "ndim_w":
        s["w_shape"] = (s["K"], s["C"] // s["g"], s["R"])
        call.invalid("w rank", ValueError)
    elif f == "channels":
        s["w_shape"] = (s["K"], s["C"] // s["g"] + 1, s["R"], s["S"])
        call.invalid("channel mismatch", ValueError)
    elif f == "groups":
        kw["groups"] = choice(rng, (0, -1, s["C"] + s["K"] + 1, "2", 1.5, None, True))
        if kw["groups"] in (0, -1) or (isinstance(kw["groups"], int)
                                       and not isinstance(kw["groups"], bool)):
            call.invalid("groups", ValueError)
        else:
            call.invalid("groups type", TypeError, ValueError)
        if kw["groups"] == s["C"] + s["K"] + 1 and s["C"] == 0 and s["K"] == 0:
            call.either("groups with no channels", ValueError)
    elif f in ("stride", "padding", "dilation"):
        kw[f] = int_fault(rng, call, f, allow_zero=(f == "padding"))
        if f == "padding" and kw[f] is None:
            call.invalid("padding=None", TypeError, ValueError)
    elif f == "padding_mode":
        kw["padding"] = choice(rng, ("full", "SAME", "", "valid ", "causal"))
        call.invalid("padding mode", ValueError, TypeError)
    elif f == "same_stride":
        kw["padding"], kw["stride"] = "same", choice(rng, (2, (1, 2), 3))
        call.invalid("padding='same' with stride > 1", ValueError)
    elif f == "huge_stride":
        kw["stride"] = choice(rng, HUGE_INTS)
        call.either("huge stride", ValueError)
    elif f == "huge_padding":
        kw["padding"] = choice(rng, HUGE_INTS)
        call.invalid("huge padding (result too large)", ValueError)


def conv_geom(s, kw):
    """fuzz_reference.ConvGeom of a setup, or None when the arguments cannot be read."""
    try:
        geom = R.ConvGeom(s["x4_shape"], s["w_shape"], kw["stride"], kw["padding"],
                          kw["dilation"])
    except Exception:
        return None
    return geom


def build_conv(rng, call, s, dt_x, dt_w):
    """Arrays for a conv call (x, w) with faults applied; returns (x, w, xv, wv)."""
    s.setdefault("x_shape", (s["C"], s["H"], s["W"]) if s["unbatched"]
                 else (s["N"], s["C"], s["H"], s["W"]))
    s.setdefault("w_shape", (s["K"], s["C"] // s["g"], s["R"], s["S"]))
    s["x4_shape"] = (1,) + s["x_shape"] if len(s["x_shape"]) == 3 else s["x_shape"]
    xv = values(rng, s["x_shape"], dt_x, 0.03)
    wv = values(rng, s["w_shape"], dt_w, 0.03)
    x = put(rng, call, "x", xv) if s["fault"] != "dtype_x" else call.arg(
        "x", array_fault(rng, call, "x", s["x_shape"]))
    w = put(rng, call, "w", wv) if s["fault"] != "dtype_w" else call.arg(
        "w", array_fault(rng, call, "w", s["w_shape"]))
    return x, w, xv, wv


def winograd_bound(bound, geom, groups, inputs, channels, alg):
    """``bound`` widened to Winograd's documented error where the call may have run on it
    (forced, or "auto", on a 3x3 stride-1 ungrouped layer): |error| <= 16 * (channels * 9) *
    eps * max|in| * max|w| (conv.convolution; F(4x4), the larger constant).  The
    im2col-style bound sums |x||w| along each output's taps, which Winograd's transforms do
    not respect; outside those layers the bound is left as it is."""
    if alg not in ("winograd", "auto") or geom is None or groups != 1:
        return bound
    if (geom.R, geom.S, geom.sh, geom.sw, geom.dh, geom.dw) != (3, 3, 1, 1, 1, 1):
        return bound
    big = 16.0 * channels * 9
    for a in inputs:
        a = np.abs(np.asarray(a, F64))
        big *= float(a.max()) if a.size else 0.0
    return np.maximum(bound, big)


def conv_expectations(call, s, geom):
    """Natural faults: a kernel larger than the padded input, or a result too large."""
    if not call.ok:
        if geom is not None and not geom.valid:
            call.also(ValueError)
        return
    if geom is None or not geom.valid:
        call.refuse(call.fault if call.fault != "valid" else "kernel larger than input",
                    ValueError)
        return
    if s["N"] * s["K"] * geom.P * geom.Q > MAX_RESULT or \
            s["N"] * s["C"] * s["R"] * s["S"] * geom.P * geom.Q > MAX_RESULT:
        call.refuse(call.fault + " (result too large)", ValueError)


def gen_conv2d(rng):
    call = Call("conv2d")
    s = conv_setup(rng, call, CONV_FAULTS + ("bias_shape", "dtype_b") + OUT_FAULTS)
    conv_faults(rng, call, s)
    dt_x, dt_w = fdtype(rng), fdtype(rng)
    x, w, xv, wv = build_conv(rng, call, s, dt_x, dt_w)
    b = bv = None
    if rng.random() < 0.5 or s["fault"] in ("bias_shape", "dtype_b"):
        bshape = (s["K"] + 1,) if s["fault"] == "bias_shape" else (s["K"],)
        bv = values(rng, bshape, fdtype(rng) if rng.random() < 0.3 else dt_w, 0.03)
        if s["fault"] == "dtype_b":
            b = call.arg("bias", array_fault(rng, call, "bias", bshape, optional=True))
            bv = None
        else:
            b = put(rng, call, "bias", bv)
        if s["fault"] == "bias_shape":
            call.invalid("bias shape", ValueError)
    kw = s["kw"]
    geom = conv_geom(s, kw)
    conv_expectations(call, s, geom)
    dt = promoted(x, w, b)
    out = None
    if s["fault"] in OUT_FAULTS or (call.ok and rng.random() < 0.2):
        shape = ((s["K"], geom.P, geom.Q) if s["unbatched"] else
                 (s["N"], s["K"], geom.P, geom.Q)) if geom is not None and geom.valid and \
            call.ok else (1, 1, 1, 1)
        out, _ = out_arg(rng, call, shape, dt, s["fault"] if s["fault"] in OUT_FAULTS else "")
    call.args.append(", ".join(f"{k}={v!r}" for k, v in kw.items()))

    def run():
        s["alg"] = mt.get_config()["conv_algorithm"]
        if out is not None:
            return mt.conv2d(x, w, b, out=out, **kw)
        return mt.conv2d(x, w, b, **kw)

    def check(res):
        x4 = f64(x).reshape(s["x4_shape"])
        y, bound, k = R.conv2d_ref(x4, f64(w), None if b is None else f64(b), geom, kw["groups"])
        bound = winograd_bound(bound, geom, kw["groups"], (x4, w), geom.C, s.get("alg"))
        if s["unbatched"]:
            y, bound = y[0], bound[0]
        close(res, y, bound, k, dt, "conv2d")
        if out is not None and res is not out:
            raise Problem("out-not-returned", "conv2d: did not return out")
    call.run, call.check = run, check
    return call


def gen_conv2d_backward(rng):
    call = Call("conv2d_backward")
    s = conv_setup(rng, call, CONV_FAULTS + ("dy_shape", "dtype_dy"))
    conv_faults(rng, call, s)
    dt_x, dt_w = fdtype(rng), fdtype(rng)
    x, w, xv, wv = build_conv(rng, call, s, dt_x, dt_w)
    kw = s["kw"]
    geom = conv_geom(s, kw)
    conv_expectations(call, s, geom)
    if geom is not None and geom.valid and call.ok:
        dy_shape = (s["N"], s["K"], geom.P, geom.Q)
    else:
        dy_shape = (s["N"], s["K"], 1, 1)
    if s["unbatched"]:
        dy_shape = dy_shape[1:]
    if s["fault"] == "dy_shape":
        dy_shape = dy_shape[:-1] + (dy_shape[-1] + 1,)
        call.invalid("dy shape", ValueError)
    elif call.ok and (math.prod(dy_shape) > 1 << 24 or max(dy_shape) > 1 << 31):
        # An output too large to draw a dy for (a huge padding, say, even with N = 0): a
        # small dy, so the call is one with a wrong dy shape (seed 9 of conv2d_backward drew
        # a (0, 3, 2^64 + 5, 2^64 - 1) dy that NumPy refused, a driver error).
        dy_shape = dy_shape[:-2] + (1, 1)
        call.invalid("dy shape", ValueError)
    dyv = values(rng, dy_shape, fdtype(rng), 0.03)
    dy = put(rng, call, "dy", dyv) if s["fault"] != "dtype_dy" else call.arg(
        "dy", array_fault(rng, call, "dy", dy_shape))
    need_dx, need_db = bool(rng.random() < 0.8), bool(rng.random() < 0.7)
    dt = promoted(dy, x, w)
    call.args.append(", ".join(f"{k}={v!r}" for k, v in kw.items())
                     + f", need_input_grad={need_dx}, need_bias_grad={need_db}")

    def run():
        s["alg"] = mt.get_config()["conv_algorithm"]
        return mt.conv2d_backward(dy, x, w, need_input_grad=need_dx, need_bias_grad=need_db,
                                  **kw)

    def check(res):
        if not (isinstance(res, tuple) and len(res) == 3):
            raise Problem("wrong-type", f"conv2d_backward returned {summarize(res)}")
        dx, dw, db = res
        x4 = f64(x).reshape(s["x4_shape"])
        dy4 = f64(dy).reshape((s["x4_shape"][0], s["K"], geom.P, geom.Q))
        (rdx, bdx, kx), (rdw, bdw, kw_), (rdb, bdb, kb) = R.conv2d_backward_ref(
            dy4, x4, f64(w), geom, kw["groups"])
        # dx on Winograd is the flipped 3x3 correlation of dy: K channels in.
        bdx = winograd_bound(bdx, geom, kw["groups"], (dy4, w), geom.K, s.get("alg"))
        if s["unbatched"]:
            rdx, bdx = rdx[0], bdx[0]
        if need_dx:
            close(dx, rdx, bdx, kx, dt, "conv2d_backward dx")
        elif dx is not None:
            raise Problem("wrong-result", "conv2d_backward: dx should be None")
        close(dw, rdw, bdw, kw_, dt, "conv2d_backward dw")
        if need_db:
            close(db, rdb, bdb, kb, dt, "conv2d_backward db")
        elif db is not None:
            raise Problem("wrong-result", "conv2d_backward: db should be None")
    call.run, call.check = run, check
    return call


UNFOLD_FAULTS = ("dtype", "ndim", "kernel_size", "stride", "padding", "dilation",
                 "padding_str", "huge_stride")


def unfold_setup(rng, call, extra=()):
    kw = {"stride": geometry_arg(rng, 1, 3), "padding": geometry_arg(rng, 0, 2),
          "dilation": geometry_arg(rng, 1, 2) if rng.random() < 0.4 else 1}
    ks = geometry_arg(rng, 1, 4)
    fault = pick(rng, 0.45, UNFOLD_FAULTS + extra)
    if fault in ("stride", "padding", "dilation"):
        kw[fault] = int_fault(rng, call, fault, allow_zero=(fault == "padding"))
    elif fault == "kernel_size":
        ks = int_fault(rng, call, "kernel_size")
    elif fault == "padding_str":
        kw["padding"] = choice(rng, ("same", "valid"))
        call.invalid("string padding", TypeError, ValueError)
    elif fault == "huge_stride":
        kw["stride"] = choice(rng, HUGE_INTS)
        call.either("huge stride", ValueError)
    return ks, kw, fault


def unfold_geom(x4_shape, ks, kw):
    try:
        R.check_ints(ks)
        kh, kwid = R.pair(ks)
        geom = R.ConvGeom(x4_shape, (1, x4_shape[1], kh, kwid), kw["stride"], kw["padding"],
                          kw["dilation"])
        return geom if geom.valid else None
    except Exception:
        return None


def gen_im2col(rng):
    call = Call("im2col")
    ks, kw, fault = unfold_setup(rng, call)
    N, C = size(rng, 3, one=0.4), size(rng, 4, one=0.4)
    H, W = size(rng, 10), size(rng, 10)
    unbatched = rng.random() < 0.15
    shape = (C, H, W) if unbatched else (N, C, H, W)
    if fault == "ndim":
        shape = choice(rng, ((H, W), (1, N, C, H, W)))
        call.invalid("x rank", ValueError)
    xv = values(rng, shape, fdtype(rng), 0.05)
    x = put(rng, call, "x", xv) if fault != "dtype" else call.arg(
        "x", array_fault(rng, call, "x", shape))
    x4_shape = (1,) + shape if unbatched else shape
    geom = unfold_geom(x4_shape, ks, kw) if len(x4_shape) == 4 else None
    if not call.ok and geom is None:
        call.also(ValueError)
    if call.ok and geom is None:
        call.refuse(call.fault if call.fault != "valid" else "kernel larger than input",
                    ValueError)
    elif call.ok and x4_shape[0] * C * geom.R * geom.S * geom.P * geom.Q > MAX_RESULT:
        call.refuse(call.fault + " (result too large)", ValueError)
    call.args.append(f"kernel_size={ks!r}, " + ", ".join(f"{k}={v!r}" for k, v in kw.items()))

    def check(res):
        ref = R.im2col_ref(f64(x).reshape(x4_shape), geom)
        exact(res, ref[0] if unbatched else ref, promoted(x), "im2col")
    call.run, call.check = (lambda: mt.im2col(x, ks, **kw)), check
    return call


def gen_col2im(rng):
    call = Call("col2im")
    ks, kw, fault = unfold_setup(rng, call, ("columns", "rows", "output_size", "output_neg"))
    N, C = size(rng, 3, one=0.4), size(rng, 4, one=0.4)
    H, W = size(rng, 10), size(rng, 10)
    if fault == "valid" and rng.random() < 0.2:
        # A single window (one column, L = 1): the shape where a column axis of stride 0
        # or of any stride is still a valid layout.
        kw["padding"], kw["dilation"] = 0, 1
        H, W = R.pair(ks)
    out_size = (H, W) if rng.random() < 0.7 else (H if H == W else (H, W))
    unbatched = rng.random() < 0.15
    geom = unfold_geom((1, C, H, W), ks, kw)
    if not call.ok and geom is None:
        call.also(ValueError)
    if call.ok and geom is None:
        call.refuse(call.fault if call.fault != "valid" else "kernel larger than output",
                    ValueError)
    if geom is not None:
        rows, L = C * geom.R * geom.S, geom.P * geom.Q
    else:
        rows, L = max(C, 1), 4
    if max(N, 1) * max(rows, 1) * max(L, 1) > MAX_RESULT:   # a 0 elsewhere does not make
        # huge columns possible to build
        if call.ok:
            call.refuse(call.fault + " (result too large)", ValueError)
        rows, L = max(C, 1), 4       # columns that can exist; the call is refused anyway
    if fault == "columns" and call.ok:
        L += 1
        call.invalid("wrong number of columns", ValueError)
    elif fault == "rows" and call.ok and geom is not None and geom.R * geom.S > 1:
        rows += 1
        call.invalid("rows not a multiple of the taps", ValueError)
    elif fault == "output_size":
        out_size = int_fault(rng, call, "output_size", allow_zero=True)
        if call.fault == "output_size=huge":      # the columns cannot match
            call.invalid("output_size=huge", ValueError)
    elif fault == "output_neg":
        out_size = choice(rng, (-1, (H, -W - 1), (-(2 ** 63), W)))
        call.invalid("negative output_size", ValueError)
    shape = (rows, L) if unbatched else (N, rows, L)
    if fault == "ndim":
        shape = choice(rng, ((rows * L,), (1, N, rows, L)))
        call.invalid("cols rank", ValueError)
    cv = values(rng, shape, fdtype(rng), 0.05)
    cols = put(rng, call, "cols", cv) if fault != "dtype" else call.arg(
        "cols", array_fault(rng, call, "cols", shape))
    call.args.append(f"output_size={out_size!r}, kernel_size={ks!r}, "
                     + ", ".join(f"{k}={v!r}" for k, v in kw.items()))

    def check(res):
        c3 = f64(cols).reshape((1,) + shape if unbatched else shape)
        ref, bound, k = R.col2im_ref(c3, C, geom)
        if unbatched:
            ref, bound = ref[0], bound[0]
        close(res, ref, bound, k, promoted(cols), "col2im")
    call.run = lambda: mt.col2im(cols, out_size, ks, **kw)
    call.check = check
    return call


POOL_FAULTS = ("dtype", "ndim", "kernel_size", "stride", "padding", "padding_big",
               "huge_window", "huge_stride")


def pool_setup(rng, call, extra=()):
    kh, kw_ = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    ks = kh if rng.random() < 0.6 else (kh, kw_)
    kh, kw_ = R.pair(ks)
    stride = None if rng.random() < 0.4 else geometry_arg(rng, 1, 3)
    ph, pw = int(rng.integers(0, kh // 2 + 1)), int(rng.integers(0, kw_ // 2 + 1))
    padding = ph if ph == pw and rng.random() < 0.6 else (ph, pw)
    fault = pick(rng, 0.4, POOL_FAULTS + extra)
    if fault in ("kernel_size", "stride", "padding"):
        v = int_fault(rng, call, fault, allow_zero=(fault == "padding"))
        if fault == "kernel_size":
            ks = v
        elif fault == "stride":
            stride = v
            if v is None:      # None is the default stride
                call.fault, call.ok, call.raises = "valid", True, ()
        else:
            padding = v
    elif fault == "padding_big":
        padding = (kh // 2 + 1, pw)
        call.invalid("padding more than half the kernel", ValueError)
    elif fault == "huge_window":
        big = choice(rng, (2 ** 31, 2 ** 32, 2 ** 62, 2 ** 63))
        ks, padding, stride = big, big // 2, choice(rng, (None, 1, big))
        call.either("window of 2**k with padding 2**(k-1)", ValueError)
    elif fault == "huge_stride":
        stride = choice(rng, HUGE_INTS)
        call.either("huge stride", ValueError)
    return ks, stride, padding, fault


def pool_input(rng, call, fault, nan_ok=True):
    N, C = size(rng, 3, one=0.4), size(rng, 4, one=0.4)
    H, W = size(rng, 10, zero=0.1), size(rng, 10, zero=0.1)
    unbatched = rng.random() < 0.15
    shape = (C, H, W) if unbatched else (N, C, H, W)
    if fault == "ndim":
        shape = choice(rng, ((H, W), (1, N, C, H, W)))
        call.invalid("x rank", ValueError)
    xv = values(rng, shape, fdtype(rng), 0.05 if nan_ok else 0.0)
    x = put(rng, call, "x", xv) if fault != "dtype" else call.arg(
        "x", array_fault(rng, call, "x", shape))
    return x, xv, shape, unbatched


def pool_geometry(call, x4_shape, ks, stride, padding, *, average, backward=False):
    """The geometry of a valid call, adjusting the expectation for natural faults: a window
    larger than the padded input, or an input plane with an H or W of 0 (no element under any
    window: no maximum, no average; torch refuses it too): both must raise ValueError."""
    if len(x4_shape) != 4:
        return None
    try:
        geom = R.pool_geom(x4_shape, ks, stride, padding)
    except Exception:
        return None
    if not call.ok:
        if (geom[8] is None or geom[9] is None or 0 in x4_shape[2:]
                or 2 * geom[6] > geom[2] or 2 * geom[7] > geom[3]):
            call.also(ValueError)
        return None
    if 2 * geom[6] > geom[2] or 2 * geom[7] > geom[3]:
        call.refuse(call.fault if call.fault != "valid" else "padding over half the window",
                    ValueError)
        return None
    if x4_shape[2] == 0 or x4_shape[3] == 0:
        # No element under any window: no maximum, no average (torch refuses too).
        call.refuse(call.fault if call.fault != "valid" else "empty input plane", ValueError)
        return None
    if geom[8] is None or geom[9] is None:
        call.refuse(call.fault if call.fault != "valid" else "window larger than input",
                    ValueError)
        return None
    if x4_shape[0] * x4_shape[1] * geom[8] * geom[9] > MAX_RESULT:
        call.refuse(call.fault + " (result too large)", ValueError)
        return None
    return geom


def gen_max_pool2d(rng):
    call = Call("max_pool2d")
    ks, stride, padding, fault = pool_setup(rng, call)
    x, xv, shape, unbatched = pool_input(rng, call, fault)
    x4_shape = (1,) + shape if unbatched else shape
    geom = pool_geometry(call, x4_shape, ks, stride, padding, average=False)
    want_idx = bool(rng.random() < 0.5)
    call.args.append(f"kernel_size={ks!r}, stride={stride!r}, padding={padding!r}, "
                     f"return_indices={want_idx}")

    def check(res):
        y, idx = res if want_idx else (res, None)
        ref, ridx, _ = R.max_pool_ref(f64(x).reshape(x4_shape), geom)
        if unbatched:
            ref, ridx = ref[0], ridx[0]
        exact(y, ref, promoted(x), "max_pool2d")
        if want_idx:
            expect_array(idx, ref.shape, np.dtype(np.int64), "max_pool2d indices")
            ok = np.isnan(ref) | (idx == ridx)
            if not ok.all():
                i = tuple(int(v) for v in np.argwhere(~ok)[0])
                raise AssertionError(f"max_pool2d indices: {i} is {idx[i]}, expected {ridx[i]} "
                                     f"(first maximum in row-major order)")
    call.run = lambda: mt.max_pool2d(x, ks, stride, padding, return_indices=want_idx)
    call.check = check
    return call


def gen_avg_pool2d(rng):
    call = Call("avg_pool2d")
    ks, stride, padding, fault = pool_setup(rng, call)
    x, xv, shape, unbatched = pool_input(rng, call, fault)
    x4_shape = (1,) + shape if unbatched else shape
    geom = pool_geometry(call, x4_shape, ks, stride, padding, average=True)
    cip = bool(rng.random() < 0.6)
    call.args.append(f"kernel_size={ks!r}, stride={stride!r}, padding={padding!r}, "
                     f"count_include_pad={cip}")

    def check(res):
        ref, bound, k, empty = R.avg_pool_ref(f64(x).reshape(x4_shape), geom, cip)
        if unbatched:
            ref, bound = ref[0], bound[0]
        expect_array(res, ref.shape, promoted(x), "avg_pool2d")
        if empty.any():
            # The average of no element: 0 (nothing summed), or NaN (0/0) when padding does
            # not count; anything else is garbage.
            got = res[..., empty]
            fine = (got == 0) | (np.isnan(got) if not cip else False)
            if not fine.all():
                raise AssertionError(f"avg_pool2d: a window over no input element gave "
                                     f"{got[~fine][0]!r}")
            res = res.copy()
            res[..., empty] = 0
        close(res, ref, bound, k, promoted(x), "avg_pool2d")
    call.run = lambda: mt.avg_pool2d(x, ks, stride, padding, count_include_pad=cip)
    call.check = check
    return call


def gen_max_pool2d_backward(rng):
    call = Call("max_pool2d_backward")
    ks, stride, padding, fault = pool_setup(rng, call, ("dy_shape", "dtype_dy", "indices_dtype",
                                                        "indices_range", "indices_shape"))
    x, xv, shape, unbatched = pool_input(rng, call, fault, nan_ok=False)
    x4_shape = (1,) + shape if unbatched else shape
    geom = pool_geometry(call, x4_shape, ks, stride, padding, average=False, backward=True)
    if geom is not None:
        oshape = x4_shape[:2] + (geom[8], geom[9])
    else:
        oshape = x4_shape[:2] + (1, 1) if len(x4_shape) == 4 else (1, 1, 1, 1)
    dshape = oshape[1:] if unbatched else oshape
    if fault == "dy_shape":
        dshape = dshape[:-1] + (dshape[-1] + 1,)
        call.invalid("dy shape", ValueError)
    dyv = values(rng, dshape, fdtype(rng), 0.03)
    dy = put(rng, call, "dy", dyv) if fault != "dtype_dy" else call.arg(
        "dy", array_fault(rng, call, "dy", dshape))
    indices = None
    ridx = None
    if geom is not None:
        _, ridx, _ = R.max_pool_ref(f64(x).reshape(x4_shape), geom)
    if fault.startswith("indices") or (call.ok and rng.random() < 0.4):
        ishape = dshape
        iv = (ridx[0] if unbatched else ridx) if ridx is not None else np.zeros(ishape, np.int64)
        if fault == "indices_dtype":
            iv = iv.astype(choice(rng, (np.float64, np.float32, np.bool_, np.complex128)))
            call.invalid("indices not integers", TypeError)
        elif fault == "indices_range" and iv.size:
            iv = iv.copy()
            iv.flat[int(rng.integers(iv.size))] = choice(rng, (-1, shape[-1] * shape[-2],
                                                               2 ** 40, -(2 ** 62)))
            call.invalid("index outside the plane", ValueError)
        elif fault == "indices_shape":
            iv = np.zeros(ishape[:-1] + (ishape[-1] + 1,), np.int64)
            call.invalid("indices shape", ValueError)
        else:
            iv = iv.astype(choice(rng, (np.int64, np.int32, np.intp)))
        indices = put(rng, call, "indices", iv, ("C", "F", "strided", "neg", "readonly"))
    call.args.append(f"kernel_size={ks!r}, stride={stride!r}, padding={padding!r}")
    dt = promoted(dy, x)

    def check(res):
        x4 = f64(x).reshape(x4_shape)
        idx = ridx if indices is None else np.asarray(indices, np.int64).reshape(ridx.shape)
        ref, bound, k = R.max_pool_backward_ref(f64(dy).reshape(oshape), idx, x4.shape)
        if unbatched:
            ref, bound = ref[0], bound[0]
        close(res, ref, bound, k, dt, "max_pool2d_backward")

    def run():
        if indices is not None:
            return mt.max_pool2d_backward(dy, x, ks, stride, padding, indices=indices)
        return mt.max_pool2d_backward(dy, x, ks, stride, padding)
    call.run, call.check = run, check
    return call


def gen_avg_pool2d_backward(rng):
    call = Call("avg_pool2d_backward")
    ks, stride, padding, fault = pool_setup(rng, call, ("dy_shape", "dtype_dy", "input_shape"))
    if fault == "valid" and rng.random() < 0.1:
        fault = "input_shape"           # the one size argument given as a tuple of ints
    N, C = size(rng, 3, one=0.4), size(rng, 4, one=0.4)
    H, W = size(rng, 10, zero=0.1), size(rng, 10, zero=0.1)
    unbatched = rng.random() < 0.15
    in_shape = (C, H, W) if unbatched else (N, C, H, W)
    x4_shape = (1,) + in_shape if unbatched else in_shape
    if fault == "input_shape":
        in_shape = choice(rng, ((H, W), (N, C, -H - 1, W), (N, C, str(H), W),
                                (N, C, H, "1111"), ("1", C, H, W), None, "abc",
                                (N, C, H, W, 1), (N, C, 2.5, W), (N, C, H, float(W))))
        call.invalid("input_shape", TypeError, ValueError)
    if fault == "ndim":
        in_shape = (H, W)
        call.invalid("input_shape rank", ValueError)
    if fault == "dtype":
        fault = "dtype_dy"
    geom = pool_geometry(call, x4_shape, ks, stride, padding, average=True, backward=True)
    oshape = x4_shape[:2] + ((geom[8], geom[9]) if geom is not None else (1, 1))
    dshape = oshape[1:] if unbatched else oshape
    if fault == "dy_shape":
        dshape = dshape[:-1] + (dshape[-1] + 1,)
        call.invalid("dy shape", ValueError)
    dyv = values(rng, dshape, fdtype(rng), 0.03)
    dy = put(rng, call, "dy", dyv) if fault != "dtype_dy" else call.arg(
        "dy", array_fault(rng, call, "dy", dshape))
    cip = bool(rng.random() < 0.6)
    call.args.append(f"input_shape={in_shape!r}, kernel_size={ks!r}, stride={stride!r}, "
                     f"padding={padding!r}, count_include_pad={cip}")

    def check(res):
        ref, bound, k = R.avg_pool_backward_ref(f64(dy).reshape(oshape), x4_shape, geom, cip)
        if unbatched:
            ref, bound = ref[0], bound[0]
        close(res, ref, bound, k, promoted(dy), "avg_pool2d_backward")
    call.run = lambda: mt.avg_pool2d_backward(dy, in_shape, ks, stride, padding,
                                              count_include_pad=cip)
    call.check = check
    return call


# =============================================================================================
# Threads and configuration
# =============================================================================================

def gen_threads(rng):
    """set_num_threads(n[, force=True]): a count above the usable CPUs is capped with a
    RuntimeWarning unless forced; forced counts stop at MAX_THREADS."""
    from microtile._config._hwinfo import usable_cpus
    call = Call("set_num_threads")
    call.threads_ok = False
    force = rng.random() < 0.3
    fault = pick(rng, 0.5, ("bad",))
    if fault == "bad":
        bad = (0, -1, -(2 ** 63), "2", None, 2.5, True, np.float64(2.0), [2], "abc")
        n = choice(rng, bad + ((2 ** 12 + 1, 2 ** 70) if force else ()))
        call.invalid("bad thread count", TypeError, ValueError)
    elif rng.random() < 0.1 and not force:
        n = choice(rng, (2 ** 12 + 1, 2 ** 70))        # capped, not refused
    else:
        n = int(rng.integers(1, 9)) if rng.random() < 0.8 else np.int64(rng.integers(1, 5))
    call.arg("n", n, watch=False)
    kw = {"force": True} if force else {}
    if force:
        call.arg("force", True, watch=False)
    expected = None if not call.ok else int(n) if force else min(int(n), usable_cpus())
    state = {}

    def run():
        state["before"] = mt.get_num_threads()
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                mt.set_num_threads(n, **kw)
            got = mt.get_num_threads()
            with mt.config_context(threads=2):
                inside = mt.get_num_threads()
            capped = any(issubclass(w.category, RuntimeWarning) for w in seen)
            return got, inside, capped
        finally:
            state["after_call"] = mt.get_num_threads()
            mt.set_num_threads(state["before"], force=True)

    def check(res):
        got, inside, capped = res
        if got != expected or type(got) is not int:
            raise AssertionError(f"get_num_threads() returned {got!r} after "
                                 f"set_num_threads({n!r}, **{kw}); expected {expected}")
        if capped != (expected < int(n)):
            raise AssertionError(f"set_num_threads({n!r}, **{kw}) "
                                 f"{'warned' if capped else 'did not warn'} (capped at "
                                 f"{expected})")
        if inside != 2:
            raise AssertionError(f"get_num_threads() is {inside} inside config_context(threads=2)")

    def post(error):
        if error is not None and state.get("after_call") != state.get("before"):
            raise AssertionError(f"a refused set_num_threads({n!r}) changed the thread count "
                                 f"from {state['before']} to {state['after_call']}")
    call.run, call.check, call.post = run, check, post
    return call


def gen_config_context(rng):
    call = Call("config_context")
    call.threads_ok = False
    kw = {}
    if rng.random() < 0.5:
        kw["threads"] = int(rng.integers(1, 5))
    if rng.random() < 0.5:
        kw["dtype"] = choice(rng, ("float32", "float64", np.float32, np.float64,
                                   np.dtype("float32"), F64))
    for name, lo, hi in (("mc", 1, 400), ("kc", 1, 600), ("nc", 1, 3000),
                         ("nopack_a_panels", 0, 8)):
        if rng.random() < 0.3:
            kw[name] = int(rng.integers(lo, hi + 1))
    if rng.random() < 0.2:
        kw["split"] = choice(rng, ("auto", "ic", "jc", "rows", "columns", 0, 1, 2))
    if rng.random() < 0.2:
        kw[choice(rng, ("nopack_mnk", "thread_mnk"))] = choice(rng, (0, 1, 10 ** 6, 2 ** 40))
    if rng.random() < 0.2:
        kw["conv_workspace"] = choice(rng, (64 << 10, 1 << 20, 3 << 20))
    if rng.random() < 0.15:
        kw["isa"] = choice(rng, tuple(mt.available_isas()))
    if rng.random() < 0.15:
        kw["conv_algorithm"] = choice(rng, ("auto", "im2col", "direct", "winograd"))
    fault = pick(rng, 0.45, ("unknown", "value", "dtype"))
    if fault == "unknown":
        kw[choice(rng, ("mr", "nr", "blocking", "thread", "MC", ""))] = 4
        call.invalid("unknown parameter", ValueError)
    elif fault == "value":
        name = choice(rng, ("mc", "kc", "nc", "threads", "nopack_a_panels", "split", "isa",
                            "conv_workspace", "conv_chunk", "conv_algorithm"))
        kw[name] = choice(rng, (-1, 2 ** 70, "96", None, 2.5, True, [4], float("nan"))
                          + ((0,) if name != "nopack_a_panels" else ()))
        if name == "split":
            kw[name] = choice(rng, ("diagonal", 3, -1, None, True))
        if name == "isa":
            kw[name] = choice(rng, ("avx512", "", None, 3))
        call.invalid(f"bad {name}", ValueError)
    elif fault == "dtype":
        kw["dtype"] = choice(rng, ("float16", "int32", np.int32, "f4 ", "x", 3))
        call.invalid("bad dtype", ValueError)
    call.args.append(", ".join(f"{k}={v!r}" for k, v in kw.items()))
    dtn = kw.get("dtype")
    dtn = None if dtn is None else np.dtype(dtn).name if fault != "dtype" else None
    m, n, k = size(rng, 40), size(rng, 40), size(rng, 40)
    gdt = np.dtype(dtn) if dtn else fdtype(rng)
    a, b = values(rng, (m, k), gdt), values(rng, (k, n), gdt)
    state = {}

    def run():
        state["before"] = mt.get_config()
        try:
            with mt.config_context(**kw):
                cfg = mt.get_config()
                threads = mt.get_num_threads()
                c = mt.gemm(a, b)
            return cfg, threads, c
        finally:
            state["after"] = mt.get_config()

    def check(res):
        cfg, threads, c = res
        if "threads" in kw and threads != kw["threads"]:
            raise AssertionError(f"get_num_threads() is {threads} inside "
                                 f"config_context(threads={kw['threads']})")
        for name in ("mc", "kc", "nc", "nopack_a_panels"):
            if name in kw:
                for d in ("float32", "float64"):
                    if (dtn is None or dtn == d) and cfg[d][name] != kw[name]:
                        raise AssertionError(f"get_config()[{d!r}][{name!r}] is "
                                             f"{cfg[d][name]} inside config_context({name}="
                                             f"{kw[name]})")
        ref, bound = gemm_reference(a, b)
        close(c, ref, bound, k, gdt, "gemm inside config_context")

    def post(error):
        if "before" in state and state["after"] != state["before"]:
            diff = {k: (state["before"].get(k), state["after"].get(k)) for k in state["after"]
                    if state["after"].get(k) != state["before"].get(k)}
            raise AssertionError(f"get_config() differs after the with block: {diff}")
    call.run, call.check, call.post = run, check, post
    return call


def gen_concurrent(rng):
    """Two Python threads calling kernels at once, each in its own config_context."""
    call = Call("threads_concurrent")
    call.threads_ok = False
    jobs = []
    for t in range(2):
        m, n, k = size(rng, 50, zero=0.02), size(rng, 50, zero=0.02), size(rng, 90, zero=0.02)
        dt = fdtype(rng)
        jobs.append((values(rng, (m, k), dt), values(rng, (k, n), dt), int(rng.integers(1, 3)),
                     choice(rng, (0, 10 ** 9))))
    call.args.append("; ".join(f"gemm {a.dtype}{a.shape}x{b.shape} threads={t} thread_mnk={tm}"
                               for a, b, t, tm in jobs))
    results = [None, None]

    def worker(i):
        a, b, t, tm = jobs[i]
        try:
            with mt.config_context(threads=t, thread_mnk=tm):
                outs = [mt.gemm(a, b) for _ in range(3)]
                results[i] = (outs, mt.get_num_threads())
        except Exception as exc:  # reported by the main thread
            results[i] = exc

    def run():
        ths = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    def check(res):
        for (a, b, t, _), (outs, threads) in zip(jobs, res):
            if threads != t:
                raise AssertionError(f"a thread's config_context(threads={t}) reads {threads}")
            ref, bound = gemm_reference(a, b)
            for o in outs:
                close(o, ref, bound, a.shape[1], a.dtype, "gemm from two Python threads")
    call.run, call.check = run, check
    return call


# =============================================================================================
# microtile.nn
# =============================================================================================

def random_layer_spec(rng, dtype, in_shape=None):
    """A layer spec (constructor arguments) and an input shape it accepts."""
    kind = choice(rng, ("Linear", "Linear", "Conv2d", "Conv2d", "MaxPool2d", "AvgPool2d",
                        "Flatten", "ReLU", "Sigmoid", "Tanh"))
    if kind == "Linear":
        fi, fo = size(rng, 24, zero=0.05), size(rng, 24, zero=0.05)
        lead = choice(rng, ((size(rng, 9),), (size(rng, 9),), (2, size(rng, 5)), ()))
        return ({"type": kind, "args": (fi, fo), "bias": bool(rng.random() < 0.8)},
                lead + (fi,))
    if kind == "Conv2d":
        g = choice(rng, (1, 1, 2))
        cin, cout = g * size(rng, 3, zero=0, one=0.4), g * size(rng, 3, zero=0, one=0.4)
        k = geometry_arg(rng, 1, 3)
        spec = {"type": kind, "args": (cin, cout, k), "stride": geometry_arg(rng, 1, 2),
                "padding": geometry_arg(rng, 0, 2), "dilation": choice(rng, (1, 1, 2)),
                "groups": g, "bias": bool(rng.random() < 0.8)}
        if rng.random() < 0.15:
            spec["padding"], spec["stride"] = "same", 1
        kh, kw = R.pair(k)
        H = size(rng, 8, zero=0) + 2 * kh
        W = size(rng, 8, zero=0) + 2 * kw
        return spec, (size(rng, 3, zero=0.1), cin, H, W)
    if kind in ("MaxPool2d", "AvgPool2d"):
        k = int(rng.integers(1, 4))
        spec = {"type": kind, "kernel_size": k,
                "stride": None if rng.random() < 0.5 else int(rng.integers(1, 3)),
                "padding": int(rng.integers(0, k // 2 + 1))}
        if kind == "AvgPool2d" and rng.random() < 0.3:
            spec["count_include_pad"] = False
        return spec, (size(rng, 3, zero=0.1), size(rng, 3), size(rng, 8, zero=0) + k,
                      size(rng, 8, zero=0) + k)
    if kind == "Flatten":
        shape = tuple(size(rng, 4, zero=0.05) for _ in range(int(rng.integers(2, 5))))
        return {"type": kind}, shape
    return {"type": kind}, tuple(size(rng, 7, zero=0.05) for _ in range(int(rng.integers(1, 4))))


def make_layer(spec, dtype, seed):
    t = spec["type"]
    if t == "Linear":
        return nn.Linear(*spec["args"], bias=spec["bias"], dtype=dtype, rng=seed)
    if t == "Conv2d":
        return nn.Conv2d(*spec["args"], stride=spec["stride"], padding=spec["padding"],
                         dilation=spec["dilation"], groups=spec["groups"], bias=spec["bias"],
                         dtype=dtype, rng=seed)
    if t == "MaxPool2d":
        return nn.MaxPool2d(spec["kernel_size"], spec["stride"], spec["padding"])
    if t == "AvgPool2d":
        kw = {}
        if "count_include_pad" in spec:
            kw["count_include_pad"] = spec["count_include_pad"]
        return nn.AvgPool2d(spec["kernel_size"], spec["stride"], spec["padding"], **kw)
    return getattr(nn, t)()


def params64(layer):
    return {name: f64(p.data).copy() for name, p in layer.named_parameters()}


def chain_reference(specs, layers, x, dy):
    """Forward and backward of a chain of layers in float64, with bounds and the roundings
    charged to every element (summed over the chain)."""
    caches, k_total = [], 0
    h, bh = f64(x), np.abs(f64(x))
    pars = [params64(layer) for layer in layers]
    for spec, prm in zip(specs, pars):
        h, bh, k, cache = R.layer_forward(spec, prm, h, bh)
        caches.append(cache)
        k_total += k + 2
    y, by = h, bh
    g, bg = f64(dy), np.abs(f64(dy))
    grads = [None] * len(layers)
    kb = k_total
    for i in range(len(layers) - 1, -1, -1):
        g, bg, k, grads[i] = R.layer_backward(specs[i], pars[i], caches[i], g, bg)
        kb += k + 2
    return (y, by, k_total), (g, bg, kb), grads


LAYER_FAULTS = ("ctor", "x_dtype", "x_shape", "dy_shape", "dy_dtype", "backward_first",
                "x_none")


def ctor_fault(rng, call, spec):
    """Spoil one constructor argument of ``spec`` (in place)."""
    t = spec["type"]
    if t == "Linear":
        args = list(spec["args"])
        i = int(rng.integers(2))
        args[i] = choice(rng, (-1, "3", 2.5, None, 2 ** 70))
        spec["args"] = tuple(args)
        call.invalid("Linear size", TypeError, ValueError)
        if args[i] == 2 ** 70:
            call.invalid("Linear size huge", ValueError)
    elif t == "Conv2d":
        key = choice(rng, ("kernel", "stride", "padding", "dilation", "groups", "dtype"))
        if key == "kernel":
            spec["args"] = spec["args"][:2] + (choice(rng, (0, -1, "3", (1, 0), None)),)
        elif key == "groups":
            spec["groups"] = choice(rng, (0, -2, 7 * spec["args"][0] + 1, "1"))
        elif key == "dtype":
            spec["dtype"] = choice(rng, (np.int32, np.float16, "complex64", object))
            call.invalid("Conv2d dtype", TypeError)
            return
        else:
            spec[key] = choice(rng, (0, -1, "1", None, 1.5, "bogus")) if key != "padding" \
                else choice(rng, (-1, "full", None, (1, -1), 2.5))
        call.invalid(f"Conv2d {key}", TypeError, ValueError)
    elif t in ("MaxPool2d", "AvgPool2d"):
        key = choice(rng, ("kernel_size", "stride", "padding"))
        spec[key] = choice(rng, (0, -1, "2", 1.5)) if key != "padding" else \
            choice(rng, (-1, "1", spec["kernel_size"] + 1))
        call.invalid(f"{t} {key}", TypeError, ValueError)
    else:
        spec["dtype_fault"] = True
        call.invalid("ctor", TypeError)


def gen_layer(rng):
    dtype = fdtype(rng)
    spec, in_shape = random_layer_spec(rng, dtype)
    call = Call("nn." + spec["type"])
    fault = pick(rng, 0.4, LAYER_FAULTS)
    seed = int(rng.integers(1 << 30))
    if fault == "ctor":
        ctor_fault(rng, call, spec)
        if spec.get("dtype_fault"):
            # Parameter-free layers take no arguments (Flatten: dimensions): give a bad one.
            arg = choice(rng, ("x", 3.5, None)) if spec["type"] == "Flatten" else \
                choice(rng, ("x", 3, None))
            call.run = lambda: getattr(nn, spec["type"])(arg)
            call.invalid(f"{spec['type']}({arg!r})", TypeError, ValueError)
        else:
            dt = spec.get("dtype", dtype)
            call.run = lambda: make_layer(spec, dt, seed)
        call.args.append(repr({k: v for k, v in spec.items() if k != "dtype_fault"}))
        return call
    layer = make_layer(spec, dtype, seed)
    call.args.append(f"{layer!r} dtype={dtype.name}")
    xdt = dtype if rng.random() < 0.7 else fdtype(rng)
    xv = values(rng, in_shape, xdt)
    geom_ok = True
    try:
        y_shape = R.layer_forward(spec, params64(layer), f64(xv), np.abs(f64(xv)))[0].shape
    except Exception:
        y_shape, geom_ok = None, False
    if fault == "x_dtype":
        x = call.arg("x", array_fault(rng, call, "x", in_shape))
    elif fault == "x_none":
        x = call.arg("x", None)
        call.invalid("x=None", TypeError, ValueError)
    elif fault == "x_shape" and spec["type"] not in ("ReLU", "Sigmoid", "Tanh"):
        if spec["type"] == "Linear":
            bad = in_shape[:-1] + (in_shape[-1] + 1,)
        elif spec["type"] == "Flatten":
            bad = (3,)                 # nothing after dimension 0 to flatten
        else:
            bad = choice(rng, (in_shape[1:], in_shape[:2] + (0,) + in_shape[3:]
                               if spec["type"] == "Conv2d" else in_shape[1:]))
            if spec["type"] == "Conv2d" and rng.random() < 0.5:
                bad = in_shape[:1] + (in_shape[1] + 1,) + in_shape[2:]
        x = put(rng, call, "x", values(rng, bad, xdt))
        call.invalid("x shape", ValueError)
    else:
        x = put(rng, call, "x", xv, ("C", "F", "strided", "neg", "readonly", "unaligned",
                                     "offset", "byteswapped", "list", "swapped"))
        if not geom_ok:
            call.refuse("input smaller than the window", ValueError)
    dyv = values(rng, y_shape if y_shape is not None else (1,), dtype)
    if fault == "dy_shape":
        dyv = values(rng, (y_shape or (1,))[:-1] + ((y_shape or (1,))[-1] + 1,), dtype)
        call.invalid("dy shape", ValueError)
    if fault == "dy_dtype":
        dy = call.arg("dy", array_fault(rng, call, "dy", dyv.shape))
    else:
        dy = put(rng, call, "dy", dyv, ("C", "F", "strided", "neg", "readonly", "byteswapped"))
    if fault == "backward_first":
        call.invalid("backward before forward", RuntimeError)

    def run():
        if fault == "backward_first":
            return layer.backward(dy)
        y = np.array(layer(x), copy=True)
        dx = layer.backward(dy)
        dx = None if dx is None else np.array(dx, copy=True)
        grads = {name: np.array(p.grad, copy=True) for name, p in layer.named_parameters()}
        return y, dx, grads

    # A layer with parameters computes in their dtype (the input is rounded to it first); one
    # without computes in the input's.
    dt = dtype if layer.parameters() else promoted(x)

    def check(res):
        y, dx, grads = res
        xin = np.asarray(np.asarray(x), dtype=dt)
        (ry, by, kf), (rdx, bdx, kb), rgrads = chain_reference([spec], [layer], xin, dyv)
        close(y, ry, by, kf, dt, f"{spec['type']} forward")
        if dx is None:
            return
        # Without parameters the API fixes no dtype for dx: the forward's, or dy's (Flatten
        # only reshapes dy) are both fine, each judged in its own precision.
        dx_dt = dt if layer.parameters() or dx.dtype != promoted(dy) else promoted(dy)
        close(dx, rdx, bdx, kb, dx_dt, f"{spec['type']} backward dx")
        for name, (g, bg) in (rgrads[0] or {}).items():
            close(grads[name], g, bg, kb, dt, f"{spec['type']} grad of {name}")
    call.run, call.check = run, check
    return call


# The layers issue 14 added: robustness and the rules that need no reference (their values are
# compared with torch in tests/nn): hostile constructor arguments and inputs are refused with
# TypeError/ValueError, a valid forward/backward keeps shapes and dtypes, gives finite values on
# finite input and leaves its inputs alone, in training and in eval mode.
MORE_LAYERS = ("BatchNorm1d", "BatchNorm2d", "Dropout", "LeakyReLU", "GELU", "SiLU", "Softmax",
               "LogSoftmax", "AdaptiveAvgPool2d", "Residual", "LSTM", "GRU", "RNN", "LastStep")


def more_layer_setup(rng, kind, dtype):
    """(constructor, input shape, output shape or None for "same as input", description)."""
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        c = size(rng, 6, zero=0.05)
        n = size(rng, 5, zero=0.05)
        tail = ((size(rng, 5, zero=0.05),) if rng.random() < 0.5 else ()) \
            if kind == "BatchNorm1d" else (size(rng, 5, zero=0.05), size(rng, 5, zero=0.05))
        kw = {"momentum": choice(rng, (0.1, None, 0.7)), "affine": bool(rng.random() < 0.7),
              "track_running_stats": bool(rng.random() < 0.8)}
        return (lambda: getattr(nn, kind)(c, dtype=dtype, **kw)), (n, c) + tail, None, \
            f"{kind}({c}, {kw})"
    shape = tuple(size(rng, 6, zero=0.05) for _ in range(int(rng.integers(1, 5))))
    if kind == "Dropout":
        p = choice(rng, (0.0, 0.2, 0.5, 1.0))
        seed = int(rng.integers(1 << 30))
        return (lambda: nn.Dropout(p, rng=seed)), shape, None, f"Dropout({p})"
    if kind == "LeakyReLU":
        slope = choice(rng, (0.01, 0.2, -0.5, 0.0))
        return (lambda: nn.LeakyReLU(slope)), shape, None, f"LeakyReLU({slope})"
    if kind == "GELU":
        approx = choice(rng, ("none", "tanh"))
        return (lambda: nn.GELU(approx)), shape, None, f"GELU({approx!r})"
    if kind in ("Softmax", "LogSoftmax"):
        dim = int(rng.integers(-len(shape), len(shape)))
        return (lambda: getattr(nn, kind)(dim)), shape, None, f"{kind}({dim})"
    if kind == "AdaptiveAvgPool2d":
        h, w = size(rng, 7), size(rng, 7)
        out = choice(rng, ((size(rng, 4), size(rng, 4)), size(rng, 4), (None, size(rng, 3))))
        four = (size(rng, 3, zero=0.05), size(rng, 3, zero=0.05), h, w)
        oh, ow = (out, out) if isinstance(out, int) else out
        oshape = four[:2] + (h if oh is None else oh, w if ow is None else ow)
        return (lambda: nn.AdaptiveAvgPool2d(out)), four, oshape, f"AdaptiveAvgPool2d({out!r})"
    if kind == "Residual":
        f = size(rng, 9)
        seed = int(rng.integers(1 << 30))
        shortcut = rng.random() < 0.3
        make = (lambda: nn.Residual(nn.Sequential(nn.Linear(f, f, dtype=dtype, rng=seed),
                                                  nn.Tanh()),
                                    nn.Linear(f, f, dtype=dtype, rng=seed + 1) if shortcut
                                    else None))
        return make, (size(rng, 6, zero=0.05), f), None, f"Residual(Linear({f},{f}))"
    if kind in ("LSTM", "GRU", "RNN"):
        f, h = max(size(rng, 7), 1), max(size(rng, 7), 1)     # torch refuses 0 as well
        t, n = size(rng, 5, zero=0.05), size(rng, 4, zero=0.05)
        kw = {"num_layers": choice(rng, (1, 1, 2)), "bias": bool(rng.random() < 0.8),
              "batch_first": bool(rng.random() < 0.5)}
        if kind == "RNN":
            kw["nonlinearity"] = choice(rng, ("tanh", "relu"))
        seed = int(rng.integers(1 << 30))
        lead = (n, t) if kw["batch_first"] else (t, n)
        return (lambda: getattr(nn, kind)(f, h, dtype=dtype, rng=seed, **kw)), lead + (f,), \
            lead + (h,), f"{kind}({f}, {h}, {kw})"
    if kind == "LastStep":
        bf = bool(rng.random() < 0.5)
        t, n, f = max(size(rng, 5), 1), size(rng, 4, zero=0.05), size(rng, 5, zero=0.05)
        return (lambda: nn.LastStep(batch_first=bf)), ((n, t, f) if bf else (t, n, f)), \
            (n, f), f"LastStep(batch_first={bf})"
    return (lambda: getattr(nn, kind)()), shape, None, f"{kind}()"


def more_layer_bad_ctor(rng, kind):
    """A constructor call with one hostile argument."""
    bad = choice(rng, (-1, "3", 2.5, None, [1], float("nan")))
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        key = choice(rng, ("num_features", "eps", "momentum", "affine"))
        if key == "num_features":
            return lambda: getattr(nn, kind)(choice(rng, (-1, "3", 2.5, None)))
        # Any eps >= 0 is valid (as torch); momentum lies in [0, 1] or is None.
        val = {"eps": (-1.0, "x", float("nan")), "momentum": (-1.0, "x", float("nan"), 2.0),
               "affine": ("yes", 2, None)}[key]
        val = choice(rng, val)
        return lambda: getattr(nn, kind)(3, **{key: val})
    if kind == "Dropout":
        return lambda: nn.Dropout(choice(rng, (-0.1, 1.5, "0.5", None, float("nan"))))
    if kind == "GELU":
        return lambda: nn.GELU(choice(rng, ("bogus", None, 1)))
    if kind in ("Softmax", "LogSoftmax"):
        return lambda: getattr(nn, kind)(choice(rng, ("1", 1.5, None)))
    if kind == "AdaptiveAvgPool2d":
        # An output size of 0 is allowed (torch gives an empty result); -1 is not.
        return lambda: nn.AdaptiveAvgPool2d(choice(rng, (-1, "2", (2, -1), 1.5, (1, 2, 3))))
    if kind == "Residual":
        return lambda: nn.Residual(choice(rng, (3, None, "block")))
    if kind == "LeakyReLU":
        return lambda: nn.LeakyReLU(choice(rng, ("x", None, [0.1])))
    if kind in ("LSTM", "GRU", "RNN"):
        args = [3, 4]
        args[int(rng.integers(2))] = choice(rng, (-1, 0, "3", 2.5, None))
        kw = choice(rng, ({}, {"num_layers": choice(rng, (0, -1, "2", 1.5))},
                          {"nonlinearity": "sigmoid"} if kind == "RNN" else {"num_layers": 0}))
        return lambda: getattr(nn, kind)(*args, **kw) if kw else getattr(nn, kind)(*args)
    if kind == "LastStep":
        return lambda: nn.LastStep(batch_first=choice(rng, ("yes", 2, None)))
    return lambda: getattr(nn, kind)(bad)


def gen_more_layers(rng):
    kind = choice(rng, MORE_LAYERS)
    call = Call("nn." + kind)
    dtype = fdtype(rng)
    fault = pick(rng, 0.35, ("ctor", "x_dtype", "x_rank", "dy_shape", "backward_first"))
    if fault == "ctor" and kind != "SiLU":
        call.run = more_layer_bad_ctor(rng, kind)
        call.args.append(f"{kind}(<hostile argument>)")
        call.invalid("constructor argument", TypeError, ValueError)
        return call
    make, in_shape, out_shape, text = more_layer_setup(rng, kind, dtype)
    layer = make()
    train = rng.random() < 0.7
    layer.train() if train else layer.eval()
    call.args.append(f"{text} {'train' if train else 'eval'} dtype={dtype.name}")
    xdt = dtype if rng.random() < 0.7 else fdtype(rng)
    xv = values(rng, in_shape, xdt)
    if fault == "x_dtype":
        x = call.arg("x", array_fault(rng, call, "x", in_shape))
    elif fault == "x_rank" and kind in ("BatchNorm1d", "BatchNorm2d", "AdaptiveAvgPool2d",
                                        "Residual", "LSTM", "GRU", "RNN", "LastStep"):
        x = put(rng, call, "x", values(rng, in_shape + (2, 2, 2), xdt))
        call.invalid("x rank", ValueError)
    else:
        x = put(rng, call, "x", xv, ("C", "F", "strided", "neg", "readonly", "unaligned",
                                     "byteswapped", "swapped"))
    if kind == "AdaptiveAvgPool2d" and call.ok:
        if in_shape[2] == 0 or in_shape[3] == 0:
            call.refuse("empty input plane (nothing to average)", ValueError)  # as torch
        elif in_shape[1] == 0:
            call.either("no channels", ValueError)                              # torch refuses
    if kind in ("BatchNorm1d", "BatchNorm2d") and train and call.ok:
        per_channel = in_shape[0] * int(np.prod(in_shape[2:], dtype=np.int64))
        if per_channel <= 1 and in_shape[1]:
            call.either("one value per channel in training", ValueError)   # torch refuses
    y_shape = out_shape or in_shape
    dyv = values(rng, y_shape, dtype)
    if fault == "dy_shape":
        dyv = values(rng, y_shape[:-1] + (y_shape[-1] + 1,), dtype)
        call.invalid("dy shape", ValueError)
    dy = put(rng, call, "dy", dyv, ("C", "F", "strided", "neg", "readonly"))
    if fault == "backward_first":
        call.invalid("backward before forward", RuntimeError)
    has_params = bool(layer.parameters())

    def run():
        if fault == "backward_first":
            return layer.backward(dy)
        y = np.array(layer(x), copy=True)
        dx = layer.backward(dy)
        return y, None if dx is None else np.array(dx, copy=True)

    def check(res):
        y, dx = res
        want = dtype if has_params or kind.startswith("BatchNorm") else promoted(x)
        expect_array(y, y_shape, want, f"{kind} forward")
        if not np.isfinite(y).all() and np.isfinite(xv).all():
            raise Problem("wrong-result", f"{kind} forward: non-finite output on finite input")
        if dx is not None:
            if dx.shape != tuple(in_shape):
                raise Problem("wrong-shape", f"{kind} backward: dx shape {dx.shape}, "
                                             f"expected {tuple(in_shape)}")
            if not np.isfinite(dx).all() and np.isfinite(xv).all():
                raise Problem("wrong-result", f"{kind} backward: non-finite dx")
    call.run, call.check = run, check
    return call


def random_sparse(rng, shape, dtype, idx_dtype, messy):
    """A CSR matrix built from raw arrays (so duplicates and unsorted indices survive when
    ``messy``), and its float64 dense value."""
    import scipy.sparse as sp
    rows, cols = shape
    density = choice(rng, (0.0, 0.05, 0.3, 1.0))
    per_row = [int(rng.binomial(cols, density)) if cols else 0 for _ in range(rows)]
    indptr = np.concatenate(([0], np.cumsum(per_row))).astype(idx_dtype)
    idx = []
    for r in range(rows):
        c = rng.choice(cols, per_row[r], replace=messy) if per_row[r] else np.zeros(0, int)
        idx.append(c if messy else np.sort(c))
    indices = (np.concatenate(idx) if idx else np.zeros(0)).astype(idx_dtype)
    data = values(rng, (len(indices),), dtype)
    mat = sp.csr_matrix((data, indices, indptr), shape=shape)
    dense = np.zeros(shape)
    magnitude = np.zeros(shape)     # duplicates' magnitudes added: what the bound must use
    for r in range(rows):
        for j in range(indptr[r], indptr[r + 1]):
            dense[r, indices[j]] += float(data[j])
            magnitude[r, indices[j]] += abs(float(data[j]))
    return mat, (dense, magnitude)


def gen_spmm(rng):
    """spmm with the sparse operand on either side, in any scipy format, messy or malformed."""
    call = Call("spmm")
    try:
        import scipy.sparse  # noqa: F401
    except ImportError:       # an optional dependency: nothing to fuzz without it
        call.run, call.check = (lambda: None), None
        return call
    m, k, n = size(rng, 30), size(rng, 30), size(rng, 30)
    dt_s, dt_d = fdtype(rng), fdtype(rng)
    idx_dtype = choice(rng, (np.int32, np.int64))
    sparse_left = rng.random() < 0.5
    fault = pick(rng, 0.35, ("malformed", "both_sparse", "no_sparse", "inner", "dtype"))
    s_shape = (m, k) if sparse_left else (k, n)
    mat, (sdense, smag) = random_sparse(rng, s_shape, dt_s, idx_dtype, rng.random() < 0.3)
    fmt = choice(rng, ("csr", "csr", "csc", "coo", "lil", "T"))
    if fmt == "T":            # a CSC transpose: free for the kernels
        mat, sdense = mat.T.tocsc().T, sdense
    elif fmt != "csr":
        mat = mat.asformat(fmt)
    d_shape = (k, n) if sparse_left else (m, k)
    dv = values(rng, d_shape, dt_d)
    if fault == "inner":
        dv = values(rng, (d_shape[0] + 1, d_shape[1]) if sparse_left
                     else (d_shape[0], d_shape[1] + 1), dt_d)
        call.invalid("inner dimensions differ", ValueError)
    if fault == "malformed" and mat.format in ("csr", "csc"):
        kind = choice(rng, ("index", "indptr_order", "indptr_end"))
        mat = mat.copy()
        if kind == "index" and mat.nnz:
            mat.indices[int(rng.integers(mat.nnz))] = choice(rng, (-1, 10 ** 6))
        elif kind == "indptr_order" and len(mat.indptr) > 2 and mat.nnz:
            mat.indptr[1] = mat.indptr[-1] + 1
        else:
            mat.indptr[-1] = mat.nnz + int(rng.integers(1, 4))
        call.invalid(f"malformed {mat.format} ({kind})", ValueError)
    dense = put(rng, call, "b" if sparse_left else "a", dv, ("C", "F", "strided", "neg",
                                                          "readonly", "unaligned",
                                                          "byteswapped"))
    if fault == "dtype":
        mat = mat.astype(np.int32)
        call.invalid("sparse dtype int32", TypeError)
    a, b = (mat, dense) if sparse_left else (dense, mat)
    if fault == "both_sparse":
        a, b = (mat, mat.T) if sparse_left else (mat.T, mat)
        call.invalid("both sparse", TypeError, ValueError)
    elif fault == "no_sparse":
        a, b = (sdense, dense) if sparse_left else (dense, sdense)
        call.invalid("neither sparse", TypeError)
    call.args.append(f"{'sparse @ dense' if sparse_left else 'dense @ sparse'} "
                     f"{mat.format} {mat.dtype} idx {idx_dtype.__name__} nnz={mat.nnz}")
    alpha = choice(rng, (1.0, 1.0, -0.5, 0.0))
    dt = np.result_type(native(dt_s), native(dt_d))

    def run():
        return mt.spmm(a, b, alpha=alpha)

    def check(res):
        da = f64(dense)
        ref = gemm_reference(sdense, da, alpha)[0] if sparse_left else \
            gemm_reference(da, sdense, alpha)[0]
        bound = abs(alpha) * (smag @ np.abs(da) if sparse_left else np.abs(da) @ smag)
        close(res, ref, bound, max(k, 1), dt, "spmm")
    call.run, call.check = run, check
    return call


def gen_sequential(rng):
    """An MLP or a small CNN in float64 (a chain of float32 roundings near ReLU's kink could
    flip a gradient; float64's are far too small to)."""
    dtype = F64
    seed = int(rng.integers(1 << 30))
    if rng.random() < 0.5:
        fi, hid, fo = size(rng, 20, zero=0.05), size(rng, 20, zero=0.05), size(rng, 10, zero=0)
        act = choice(rng, ("ReLU", "Tanh", "Sigmoid"))
        specs = [{"type": "Linear", "args": (fi, hid), "bias": bool(rng.random() < 0.8)},
                 {"type": act},
                 {"type": "Linear", "args": (hid, fo), "bias": True}]
        if rng.random() < 0.4:
            specs.append({"type": choice(rng, ("ReLU", "Tanh", "Sigmoid"))})
        in_shape = (size(rng, 9),) + ((fi,) if rng.random() < 0.8 else (3, fi))
    else:
        cin, cout = size(rng, 3, zero=0, one=0.3), size(rng, 4, zero=0, one=0.3)
        H = W = int(rng.integers(4, 10))
        k = int(rng.integers(1, 4))
        pool = choice(rng, ("MaxPool2d", "AvgPool2d"))
        conv = {"type": "Conv2d", "args": (cin, cout, k), "stride": 1, "padding": k // 2,
                "dilation": 1, "groups": 1, "bias": True}
        p = (H + 2 * (k // 2) - k + 1) // 2
        specs = [conv, {"type": choice(rng, ("ReLU", "Tanh"))},
                 {"type": pool, "kernel_size": 2, "stride": None, "padding": 0},
                 {"type": "Flatten"},
                 {"type": "Linear", "args": (cout * p * p, size(rng, 6, zero=0)), "bias": True}]
        in_shape = (size(rng, 3, zero=0.1), cin, H, W)
    layers = [make_layer(s, dtype, seed + i) for i, s in enumerate(specs)]
    model = nn.Sequential(*layers)
    call = Call("nn.Sequential")
    call.args.append(" ".join(repr(model).split()))
    fault = pick(rng, 0.3, ("x_shape", "dy_shape", "backward_first", "x_dtype"))
    xv = values(rng, in_shape, dtype)
    if fault == "x_shape":
        xv = values(rng, in_shape[:-1] + (in_shape[-1] + 3,), dtype)
        call.invalid("x shape", ValueError)
    x = put(rng, call, "x", xv, ("C", "F", "strided", "neg", "readonly", "offset", "list")) \
        if fault != "x_dtype" else call.arg("x", array_fault(rng, call, "x", in_shape))
    h = np.zeros(in_shape)
    for s_, layer in zip(specs, layers):
        h = R.layer_forward(s_, params64(layer), h, h)[0]
    y_shape = h.shape
    dyv = values(rng, y_shape, dtype)
    if fault == "dy_shape":
        dyv = values(rng, y_shape[:-1] + (y_shape[-1] + 1,), dtype)
        call.invalid("dy shape", ValueError)
    dy = put(rng, call, "dy", dyv, ("C", "F", "strided", "neg", "readonly"))
    if fault == "backward_first":
        call.invalid("backward before forward", RuntimeError)

    def run():
        if fault == "backward_first":
            return model.backward(dy)
        y = np.array(model(x), copy=True)
        dx = np.array(model.backward(dy), copy=True)
        grads = [{n: np.array(p.grad, copy=True) for n, p in layer.named_parameters()}
                 for layer in layers]
        return y, dx, grads

    def check(res):
        y, dx, grads = res
        (ry, by, kf), (rdx, bdx, kb), rgrads = chain_reference(specs, layers, f64(x), f64(dy))
        close(y, ry, by, kf, dtype, "Sequential forward")
        close(dx, rdx, bdx, kb, dtype, "Sequential backward dx")
        for i, rg in enumerate(rgrads):
            for name, (g, bg) in (rg or {}).items():
                close(grads[i][name], g, bg, kb, dtype, f"Sequential layer {i} grad of {name}")
    call.run, call.check = run, check
    return call


def gen_loss(rng):
    if rng.random() < 0.5:
        return gen_cross_entropy(rng)
    return gen_mse(rng)


def gen_cross_entropy(rng):
    call = Call("nn.CrossEntropyLoss")
    n, c = size(rng, 20, zero=0.05), size(rng, 12, zero=0.03)
    dt = fdtype(rng)
    fault = pick(rng, 0.45, ("labels_float", "labels_range", "labels_shape", "logits_ndim",
                             "logits_dtype", "backward_first", "labels_none"))
    lv = values(rng, (n, c), dt, 0.0) * choice(rng, (1.0, 1.0, 30.0))
    ldt = choice(rng, (np.int64, np.int32, np.uint8, np.intp))
    lab = rng.integers(0, max(c, 1), n).astype(ldt)
    if c == 0 and n:
        call.invalid("no classes", ValueError)
    if fault == "labels_float":
        lab = lab.astype(choice(rng, (np.float64, np.float32, np.bool_)))
        call.invalid("labels not integers", TypeError)
    elif fault == "labels_range" and n:
        lab = lab.astype(np.int64)
        lab[int(rng.integers(n))] = choice(rng, (-1, c, c + 5, 2 ** 62, -(2 ** 63)))
        call.invalid("label out of range", ValueError)
    elif fault == "labels_shape":
        lab = np.zeros((n + 1,), np.int64) if rng.random() < 0.5 else np.zeros((n, 1), np.int64)
        call.invalid("labels shape", ValueError)
    elif fault == "labels_none":
        lab = None
        call.invalid("labels=None", TypeError, ValueError)
    if fault == "logits_ndim":
        lv = values(rng, (n * max(c, 1),), dt)
        call.invalid("logits rank", ValueError)
    logits = put(rng, call, "logits", lv) if fault != "logits_dtype" else call.arg(
        "logits", array_fault(rng, call, "logits", (n, c)))
    labels = put(rng, call, "labels", lab, ("C", "strided", "neg", "readonly")) \
        if lab is not None else call.arg("labels", None)
    if fault == "backward_first":
        call.invalid("backward before forward", RuntimeError)
    loss_fn = nn.CrossEntropyLoss()

    def run():
        if fault == "backward_first":
            return loss_fn.backward()
        value = loss_fn(logits, labels)
        return value, np.array(loss_fn.backward(), copy=True)

    def check(res):
        value, grad = res
        rdt = native(np.asarray(logits).dtype)
        if n == 0:
            if not (isinstance(value, float) and math.isnan(value)):
                raise AssertionError(f"CrossEntropyLoss of an empty batch is {value!r}, not NaN")
            return
        ref, scale, rgrad, gbound = R.cross_entropy_ref(logits, np.asarray(labels, np.int64))
        tol = FACTOR * (c + 4) * eps(rdt) * scale
        if not isinstance(value, float) or not abs(value - ref) <= tol:
            raise AssertionError(f"CrossEntropyLoss: {value!r}, reference {ref!r}, "
                                 f"tolerance {tol:.3g}")
        close(grad, rgrad, gbound, c + 4, rdt, "CrossEntropyLoss backward")
    call.run, call.check = run, check
    return call


def gen_mse(rng):
    call = Call("nn.MSELoss")
    shape = tuple(size(rng, 8, zero=0.05) for _ in range(int(rng.integers(1, 4))))
    fault = pick(rng, 0.4, ("shape", "dtype", "backward_first", "none"))
    pv, tv = values(rng, shape, fdtype(rng)), values(rng, shape, fdtype(rng))
    if fault == "shape":
        tv = values(rng, shape + (2,), tv.dtype)
        call.invalid("shapes differ", ValueError)
    pred = put(rng, call, "pred", pv)
    if fault == "dtype":
        target = call.arg("target", array_fault(rng, call, "target", shape))
    elif fault == "none":
        target = call.arg("target", None)
        call.invalid("target=None", TypeError, ValueError)
    else:
        target = put(rng, call, "target", tv)
    if fault == "backward_first":
        call.invalid("backward before forward", RuntimeError)
    loss_fn = nn.MSELoss()

    def run():
        if fault == "backward_first":
            return loss_fn.backward()
        value = loss_fn(pred, target)
        return value, np.array(loss_fn.backward(), copy=True)

    def check(res):
        value, grad = res
        rdt = F32 if F32 in (native(pv.dtype), native(tv.dtype)) else F64
        size_ = int(np.prod(shape))
        if size_ == 0:
            if not (isinstance(value, float) and math.isnan(value)):
                raise AssertionError(f"MSELoss of empty arrays is {value!r}, not NaN")
            return
        ref, scale, rgrad, gbound = R.mse_ref(pred, target)
        tol = FACTOR * (size_ + 4) * eps(rdt) * scale
        if not isinstance(value, float) or not abs(value - ref) <= tol:
            raise AssertionError(f"MSELoss: {value!r}, reference {ref!r}, tolerance {tol:.3g}")
        expect_array(grad, shape, native(np.asarray(grad).dtype), "MSELoss backward")
        assert_close(grad, rgrad, gbound, 4, rdt, "MSELoss backward")
    call.run, call.check = run, check
    return call


OPTIMIZERS = ("SGD", "Adam", "AdaGrad", "RMSprop")


def gen_optimizer(rng):
    kind = choice(rng, OPTIMIZERS)
    call = Call(f"nn.{kind}.step")
    params = []
    for _ in range(int(rng.integers(1, 4))):
        shape = tuple(size(rng, 7, zero=0.05) for _ in range(int(rng.integers(1, 3))))
        params.append(nn.Parameter(values(rng, shape, fdtype(rng))))
    hyper = {}
    if kind == "SGD":
        hyper["lr"] = float(choice(rng, (0.1, 0.01, 1.0, 0.0)))
        if rng.random() < 0.6:
            hyper["momentum"] = float(choice(rng, (0.9, 0.5, 0.0)))
            if hyper["momentum"] and rng.random() < 0.5:
                hyper["nesterov"] = True
    else:
        if rng.random() < 0.7:
            hyper["lr"] = float(choice(rng, (1e-3, 1e-2, 0.1)))
        if kind == "Adam" and rng.random() < 0.4:
            hyper["betas"] = (float(choice(rng, (0.9, 0.0, 0.5))),
                              float(choice(rng, (0.999, 0.9, 0.0))))
        if kind == "RMSprop" and rng.random() < 0.4:
            hyper["alpha"] = float(choice(rng, (0.9, 0.0, 0.5)))
        if rng.random() < 0.3:
            # Not 0: a zero gradient then gives 0/0, and which of inf and NaN follows
            # depends on the order of operations.
            hyper["eps"] = float(choice(rng, (1e-8, 1e-3, 1e-12)))
    if kind in ("SGD", "Adam") and rng.random() < 0.4:
        hyper["weight_decay"] = float(choice(rng, (1e-2, 0.5)))
    fault = pick(rng, 0.35, ("hyper", "params_empty", "params_single", "params_other",
                             "params_twice"))
    ctor_params = params
    if fault == "hyper":
        name = choice(rng, ("lr", "eps", "weight_decay", "momentum", "betas", "alpha",
                            "nesterov"))
        if name == "betas" and kind == "Adam":
            hyper["betas"] = choice(rng, ((1.0, 0.9), (0.9, -0.1), (0.9,), "ab", None,
                                          (float("nan"), 0.9)))
        elif name == "nesterov" and kind == "SGD":
            hyper["momentum"], hyper["nesterov"] = 0.0, True
        elif name == "momentum" and kind == "SGD":
            hyper["momentum"] = choice(rng, (-0.5, float("nan"), "x"))
        elif name == "alpha" and kind == "RMSprop":
            hyper["alpha"] = choice(rng, (-0.1, float("nan"), "x"))
        elif name == "weight_decay" and kind in ("SGD", "Adam"):
            hyper["weight_decay"] = choice(rng, (-1.0, float("nan")))
        elif name == "eps" and kind != "SGD":
            hyper["eps"] = choice(rng, (-1e-8, float("nan"), None))
        else:
            hyper["lr"] = choice(rng, (-0.1, float("nan"), "abc", None, 1j))
        call.invalid(f"bad {name}", TypeError, ValueError)
    elif fault == "params_empty":
        ctor_params = []
        call.invalid("no parameters", ValueError)
    elif fault == "params_single":
        ctor_params = params[0]
        call.invalid("a single Parameter", TypeError)
    elif fault == "params_other":
        ctor_params = params + [choice(rng, (np.zeros(3), 3.0, None))]
        call.invalid("a non-Parameter", TypeError)
    elif fault == "params_twice":
        ctor_params = params + [params[0]]
        call.invalid("a Parameter twice", ValueError)
    steps = int(rng.integers(1, 4))
    grads = [[values(rng, p.shape, p.dtype) if rng.random() < 0.9 else None for p in params]
             for _ in range(steps)]
    starts = [np.array(p.data, copy=True) for p in params]
    call.args.append(f"params={[f'{p.dtype}{list(p.shape)}' for p in params]}, {hyper}, "
                     f"steps={steps}")

    def run():
        opt = getattr(nn, kind)(ctor_params, **hyper)
        used = [[None] * len(params) for _ in range(steps)]
        for t in range(steps):
            opt.zero_grad()
            for i, p in enumerate(params):
                if grads[t][i] is not None:
                    p.grad = grads[t][i]
                used[t][i] = np.array(p.grad, copy=True)
            opt.step()
        return [np.array(p.data, copy=True) for p in params], used

    def check(res):
        finals, used = res
        for i, (p0, got) in enumerate(zip(starts, finals)):
            ref, scale = R.optimizer_ref(kind, hyper, p0, [used[t][i] for t in range(steps)])
            close(got, ref, scale, 16 * steps, native(p0.dtype), f"{kind} parameter {i}")
    call.run, call.check = run, check
    return call


def gen_gradcheck(rng):
    call = Call("nn.gradcheck")
    dtype = F64 if rng.random() < 0.7 else F32
    seed = int(rng.integers(1 << 30))
    kind = choice(rng, ("Linear", "Tanh", "Sigmoid", "Conv2d", "AvgPool2d", "Flatten", "MLP",
                        "fn", "fn_wrong", "loss"))
    target = None
    if kind == "Linear":
        fi, fo = int(rng.integers(1, 5)), int(rng.integers(1, 4))
        obj, shape = nn.Linear(fi, fo, dtype=dtype, rng=seed), (int(rng.integers(1, 3)), fi)
    elif kind in ("Tanh", "Sigmoid"):
        obj, shape = getattr(nn, kind)(), (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    elif kind == "Conv2d":
        obj, shape = nn.Conv2d(1, 2, 2, dtype=dtype, rng=seed), (1, 1, 3, 3)
    elif kind == "AvgPool2d":
        obj, shape = nn.AvgPool2d(2, 1), (1, 1, 3, 3)
    elif kind == "Flatten":
        obj, shape = nn.Flatten(), (2, 2, 2)
    elif kind == "MLP":
        obj = nn.Sequential(nn.Linear(3, 3, dtype=dtype, rng=seed), nn.Tanh(),
                            nn.Linear(3, 2, dtype=dtype, rng=seed + 1))
        shape = (2, 3)
    elif kind == "loss":
        obj, shape = nn.MSELoss(), (2, 3)
        target = values(rng, shape, dtype)
    else:
        wrong = 1.0 if kind == "fn_wrong" else 0.0

        def sine(x):
            return np.sin(x), (lambda dy: dy * (np.cos(x) + wrong))
        obj = sine
        shape = (int(rng.integers(1, 6)),)
    expect_true = kind != "fn_wrong"
    if not expect_true:
        call.invalid("a wrong gradient", AssertionError)
    xv = values(rng, shape, dtype) * 0.8
    fault = pick(rng, 0.35, ("eps", "x_dtype", "x_none", "not_callable", "tol"))
    kw = {}
    if fault == "eps":
        # A negative step is a central difference taken the other way round: fine, if the
        # step suits the dtype (float32 needs its default 1e-3).
        neg = -1e-6 if dtype == F64 else -1e-3
        kw["eps"] = choice(rng, (0, 0.0, float("nan"), float("inf"), "abc", neg))
        if kw["eps"] == neg:
            call.either("negative eps", ValueError)
            if not expect_true:
                call.invalid("a wrong gradient, negative eps", AssertionError, ValueError)
        else:
            call.invalid(f"eps={kw['eps']!r}", TypeError, ValueError)
    elif fault == "tol":
        kw[choice(rng, ("rtol", "atol"))] = choice(rng, ("x", float("nan"), -1.0))
        call.invalid("bad tolerance", TypeError, ValueError)
        if not expect_true:
            call.invalid("bad tolerance", TypeError, ValueError, AssertionError)
    elif fault == "not_callable":
        obj = choice(rng, (3, "layer", None, np.zeros(3)))
        call.invalid("not a layer or function", TypeError)
    if fault == "x_dtype":
        x = call.arg("x", array_fault(rng, call, "x", shape))
    elif fault == "x_none":
        x = call.arg("x", None)
        call.invalid("x=None", TypeError, ValueError)
    else:
        # A list is float64, whose default step is far below float32 parameters' resolution:
        # only float64 models get one.
        x = put(rng, call, "x", xv, ("C", "F", "strided", "neg", "readonly")
                + (("list",) if dtype == F64 else ()))
    if target is not None:
        kw["target"] = target
    call.args.append(f"{kind} {' '.join(repr(obj).split())} dtype={dtype.name}, {kw}")
    layer_state = []
    if hasattr(obj, "named_parameters"):
        for _, p in obj.named_parameters():
            layer_state.append((p, np.array(p.data, copy=True), np.array(p.grad, copy=True)))

    def run():
        return nn.gradcheck(obj, x, **kw)

    def check(res):
        if res is not True:
            raise AssertionError(f"gradcheck returned {res!r}, expected True")

    def post(error):
        for p, data, grad in layer_state:
            if not np.array_equal(p.data, data, equal_nan=True):
                raise Problem("modified-input", "gradcheck left a parameter changed")
            if not np.array_equal(p.grad, grad, equal_nan=True):
                raise Problem("modified-input", "gradcheck left a gradient changed")
    call.run, call.check, call.post = run, check, post
    return call


def small_model(rng, dtype, seed):
    if rng.random() < 0.5:
        a, b, c = size(rng, 6, zero=0.05), size(rng, 6, zero=0.05), size(rng, 4, zero=0.05)
        return nn.Sequential(nn.Linear(a, b, dtype=dtype, rng=seed), nn.ReLU(),
                             nn.Linear(b, c, bias=bool(rng.random() < 0.7), dtype=dtype,
                                       rng=seed + 1))
    if rng.random() < 0.5:
        return nn.Sequential(nn.Conv2d(2, 3, 2, dtype=dtype, rng=seed), nn.Tanh(),
                             nn.Flatten(), nn.Linear(12, 2, dtype=dtype, rng=seed + 1))
    return nn.Linear(size(rng, 5), size(rng, 5), dtype=dtype, rng=seed)


def state_fault(rng, call, state):
    """A spoiled copy of a state dict, and the expectation."""
    bad = dict(state)
    keys = list(bad)
    kind = choice(rng, ("missing", "extra", "shape", "dtype", "not_mapping", "object"))
    if kind == "missing" and keys:
        del bad[choice(rng, keys)]
        call.invalid("missing key", ValueError)
    elif kind == "extra" or not keys:
        bad[choice(rng, ("9.weight", "weight ", "extra", ""))] = np.zeros(2)
        call.invalid("unexpected key", ValueError)
    elif kind == "shape":
        k = choice(rng, keys)
        bad[k] = np.zeros(bad[k].shape + (1,)) if rng.random() < 0.5 else np.zeros(
            tuple(d + 1 for d in bad[k].shape))
        call.invalid("wrong shape", ValueError)
    elif kind == "dtype":
        k = choice(rng, keys)
        bad[k] = bad_array(rng, bad[k].shape, choice(rng, ("complex128", "object", "str")))
        call.invalid("bad dtype", TypeError, ValueError)
    elif kind == "object":
        bad[choice(rng, keys)] = None
        call.invalid("None value", TypeError, ValueError)
    else:
        bad = choice(rng, (list(state.items()), None, "state", 3))
        call.invalid("not a mapping", TypeError)
    return bad


def gen_state_dict(rng):
    call = Call("nn.load_state_dict")
    dtype = fdtype(rng)
    seed = int(rng.integers(1 << 30))
    model = small_model(rng, dtype, seed)
    target = make_like(model, dtype, seed + 12345)    # same architecture, other weights
    call.args.append(f"{' '.join(repr(model).split())} dtype={dtype.name}")
    state = model.state_dict()
    src_dt = fdtype(rng)
    # Values of either dtype and any layout (a state dict may come from anywhere).
    layouts = ("C", "F", "strided", "neg", "byteswapped", "readonly")
    state = {k: arrange(rng, v.astype(src_dt), choice(rng, layouts))[0]
             for k, v in state.items()}
    fault = pick(rng, 0.5, ("state",))
    load = state_fault(rng, call, state) if fault == "state" else state
    before = target.state_dict()

    def run():
        sd = model.state_dict()
        kept = {k: v.copy() for k, v in sd.items()}
        # The dict holds copies: changing it must not change the model.
        for v in sd.values():
            v += 1.0
        if any(not np.array_equal(model.state_dict()[k], kept[k]) for k in sd):
            raise Problem("state", "state_dict() values share memory with the parameters")
        target.load_state_dict(load)
        return target.state_dict()

    def check(res):
        want = {k: np.asarray(v).astype(dtype) for k, v in state.items()}
        if sorted(res) != sorted(want):
            raise AssertionError(f"state_dict keys {sorted(res)}, expected {sorted(want)}")
        for k in want:
            if not np.array_equal(res[k], want[k]):
                raise AssertionError(f"load_state_dict: {k} differs after loading")

    def post(error):
        if error is not None and any(not np.array_equal(v, target.state_dict()[k])
                                     for k, v in before.items()):
            raise Problem("state", "a refused load_state_dict changed the model")
    call.run, call.check, call.post = run, check, post
    return call


def make_like(model, dtype, seed):
    """A model of the same architecture as ``model`` with other initial weights."""
    if isinstance(model, nn.Linear):
        return nn.Linear(model.in_features, model.out_features, bias=model.bias is not None,
                         dtype=dtype, rng=seed)
    layers = []
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Linear):
            layers.append(nn.Linear(layer.in_features, layer.out_features,
                                    bias=layer.bias is not None, dtype=dtype, rng=seed + i))
        elif isinstance(layer, nn.Conv2d):
            layers.append(nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                    dtype=dtype, rng=seed + i))
        else:
            layers.append(type(layer)())
    return nn.Sequential(*layers)


TMPDIR = None


def gen_save_load(rng):
    call = Call("nn.load")
    dtype = fdtype(rng)
    seed = int(rng.integers(1 << 30))
    model = small_model(rng, dtype, seed)
    target = make_like(model, dtype, seed + 999)
    path = os.path.join(TMPDIR, f"model_{seed}.npz")
    call.args.append(" ".join(repr(model).split()))
    fault = pick(rng, 0.5, ("garbage", "truncated", "empty", "text", "missing_file",
                            "pickled", "wrong_keys"))
    before = target.state_dict()

    def prepare():
        if fault == "garbage":
            with open(path, "wb") as f:
                f.write(rng.bytes(int(rng.integers(1, 300))))
        elif fault == "truncated":
            nn.save(model, path)
            with open(path, "rb") as f:
                data = f.read()
            with open(path, "wb") as f:
                f.write(data[:int(rng.integers(1, max(len(data) - 1, 2)))])
        elif fault == "empty":
            open(path, "wb").close()
        elif fault == "text":
            with open(path, "w") as f:
                f.write("not a model\n")
        elif fault == "missing_file":
            if os.path.exists(path):
                os.remove(path)
        elif fault == "pickled":
            np.savez(path, **{k: np.array([None, 1], dtype=object) for k in before})
        elif fault == "wrong_keys":
            np.savez(path, **{"x" + k: v for k, v in before.items()})
        else:
            nn.save(model, path)

    if fault in ("garbage", "truncated", "empty", "text", "pickled", "wrong_keys"):
        call.invalid(f"{fault} file", ValueError)
    elif fault == "missing_file":
        call.invalid("missing file", OSError, ValueError)
    call.args.append(f"file: {fault}")

    def run():
        prepare()
        try:
            nn.load(target, path)
            return target.state_dict()
        finally:
            if os.path.exists(path):
                os.remove(path)

    def check(res):
        want = model.state_dict()
        for k, v in want.items():
            if not np.array_equal(res[k], v):
                raise AssertionError(f"save/load: {k} differs after the round trip")

    def post(error):
        if error is not None and any(not np.array_equal(v, target.state_dict()[k])
                                     for k, v in before.items()):
            raise Problem("state", "a refused load changed the model")
    call.run, call.check, call.post = run, check, post
    return call


# =============================================================================================
# The run
# =============================================================================================

GENERATORS = {
    "gemm": (gen_gemm, 3.0), "matmul": (gen_matmul, 2.0), "dot": (gen_dot, 1.0),
    "outer": (gen_outer, 1.0), "ger": (gen_ger, 1.0), "gemv": (gen_gemv, 1.5),
    "conv2d": (gen_conv2d, 3.0), "conv2d_backward": (gen_conv2d_backward, 2.0),
    "im2col": (gen_im2col, 1.5), "col2im": (gen_col2im, 1.5),
    "max_pool2d": (gen_max_pool2d, 1.5), "max_pool2d_backward": (gen_max_pool2d_backward, 1.0),
    "avg_pool2d": (gen_avg_pool2d, 1.5), "avg_pool2d_backward": (gen_avg_pool2d_backward, 1.0),
    "set_num_threads": (gen_threads, 0.4), "config_context": (gen_config_context, 1.0),
    "threads_concurrent": (gen_concurrent, 0.3),
    "nn.layer": (gen_layer, 4.0), "nn.Sequential": (gen_sequential, 1.2),
    "nn.loss": (gen_loss, 1.5), "nn.optimizer": (gen_optimizer, 1.5),
    "nn.gradcheck": (gen_gradcheck, 0.7), "nn.state_dict": (gen_state_dict, 0.8),
    "nn.save_load": (gen_save_load, 0.4), "nn.more_layers": (gen_more_layers, 2.0),
    "spmm": (gen_spmm, 1.5),
}


def random_context(rng):
    """config_context overrides for one call: a quarter on 2 threads (often with threading
    forced on tiny sizes), some with small odd blocking, the smallest conv workspace or a
    forced convolution algorithm."""
    ctx = {}
    if rng.random() < 0.25:
        ctx["threads"] = 2
        if rng.random() < 0.6:
            ctx["thread_mnk"] = 0
    if rng.random() < 0.15:
        ctx["mc"], ctx["kc"], ctx["nc"] = (int(rng.integers(1, 25)), int(rng.integers(1, 40)),
                                           int(rng.integers(1, 60)))
    if rng.random() < 0.1:
        ctx["nopack_mnk"] = choice(rng, (0, 2 ** 40))
    if rng.random() < 0.1:
        ctx["conv_workspace"], ctx["conv_chunk"] = 64 << 10, 16 << 10
    if rng.random() < 0.15:     # any algorithm on any layer (Winograd falls back where it
        ctx["conv_algorithm"] = choice(rng, ("im2col", "direct", "winograd"))  # does not apply)
    return ctx


def build(seed, index, only=None):
    """(call, context) of call ``index`` of run ``seed``."""
    rng = np.random.default_rng([seed, index])
    names = [n for n in GENERATORS if not only or n in only]
    weights = np.array([GENERATORS[n][1] for n in names])
    name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    call = GENERATORS[name][0](rng)
    ctx = random_context(rng)
    return call, ctx


def reproducer(seed, index, only=None):
    """The command that repeats call ``index`` (``only`` changes which call that is)."""
    extra = f" --only {','.join(sorted(only))}" if only else ""
    return f"PYTHONPATH=src python tests/fuzz_driver.py --seed {seed}{extra} --index {index} -v"


def bind():
    """Import microtile into this module (main() does it after capping the address space;
    tests that use ``build``/``execute`` in-process call it first)."""
    global mt, nn
    import microtile
    from microtile import nn as _nn
    mt, nn = microtile, _nn


def crash_call():
    """A call that segfaults, for the test that checks a crash is reported (--crash-at)."""
    import ctypes
    call = Call("selftest_crash")
    call.run = lambda: ctypes.string_at(0)
    return call


def parse_indices(text):
    """``"5"``, ``"3-7,12"``: call indices in the order given."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def main(argv=None):
    global TMPDIR
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calls", type=int, default=3000, help="number of calls (the budget)")
    ap.add_argument("--start", type=int, default=0, help="first call index")
    ap.add_argument("--index", type=parse_indices,
                    help="run only these calls, e.g. 1234 or 10-20,57 (implies -v)")
    ap.add_argument("--only", help="comma-separated generator names (see GENERATORS)")
    ap.add_argument("--trace", action="store_true", help="print each call to stderr first")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--rlimit-gb", type=float, default=DEFAULT_RLIMIT_GB,
                    help="address-space cap in GiB (0: none; skipped under ASan)")
    ap.add_argument("--hang-seconds", type=float, default=DEFAULT_HANG_SECONDS)
    ap.add_argument("--max-shown", type=int, default=40, help="distinct failures printed")
    ap.add_argument("--crash-at", type=int, help=argparse.SUPPRESS)   # self-test: segfault
    args = ap.parse_args(argv)

    asan = "libasan" in os.environ.get("LD_PRELOAD", "")
    if args.rlimit_gb and not asan:
        cap = int(args.rlimit_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    faulthandler.enable()
    bind()
    warnings.simplefilter("ignore")
    TMPDIR = tempfile.mkdtemp(prefix="microtile_fuzz_")
    only = set(args.only.split(",")) if args.only else None
    if only and only - set(GENERATORS):
        ap.error(f"unknown generators {sorted(only - set(GENERATORS))}; "
                 f"known: {', '.join(GENERATORS)}")
    indices = args.index if args.index is not None else range(args.start,
                                                              args.start + args.calls)
    verbose = args.verbose or args.index is not None
    failures = {}
    counts = {"calls": 0, "valid": 0, "invalid": 0, "extreme": 0, "two_threads": 0}
    per_target = {}
    try:
        for i in indices:
            try:
                call, ctx = build(args.seed, i, only)
                if i == args.crash_at:
                    call, ctx = crash_call(), {}
            except Exception as exc:  # a bug in a generator: report it, keep going
                call = Call("driver")
                call.run, ctx = (lambda exc=exc: (_ for _ in ()).throw(exc)), {}
                call.fault = "generator error"
            line = f"[{i}] {call.describe()}" + (f" ctx={ctx}" if ctx and call.threads_ok else "")
            if args.trace or verbose:
                print(">>> " + line, file=sys.stderr, flush=True)
            if args.hang_seconds:
                faulthandler.dump_traceback_later(args.hang_seconds, exit=True)
            problems = execute(call, ctx)
            if args.hang_seconds:
                faulthandler.cancel_dump_traceback_later()
            counts["calls"] += 1
            kind = ("invalid" if not call.ok else "extreme" if call.raises else "valid")
            counts[kind] += 1
            if ctx.get("threads") == 2 and call.threads_ok:
                counts["two_threads"] += 1
            per_target[call.target] = per_target.get(call.target, 0) + 1
            for pkind, msg in problems:
                fault = call.fault.split("=")[0] if "=" in call.fault else call.fault
                first = msg.splitlines()[0] if msg else ""
                exc = first.split(":")[0] if pkind in ("wrong-exception", "raised-on-valid") \
                    else ""
                key = (call.target, fault, pkind, exc)
                entry = failures.setdefault(key, {"target": call.target, "fault": call.fault,
                                                  "kind": pkind, "count": 0, "index": i,
                                                  "call": line, "message": msg})
                entry["count"] += 1
                if verbose:
                    print(f"FAIL [{i}] {pkind}: {msg}", file=sys.stderr)
            if verbose and not problems:
                print(f"ok [{i}]", file=sys.stderr)
    finally:
        shutil.rmtree(TMPDIR, ignore_errors=True)
    shown = sorted(failures.values(), key=lambda e: (e["target"], e["index"]))
    print(f"fuzz seed {args.seed}: {counts['calls']} calls ({counts['valid']} valid, "
          f"{counts['invalid']} invalid, {counts['extreme']} extreme; "
          f"{counts['two_threads']} on 2 threads); {len(shown)} distinct failures")
    for e in shown[:args.max_shown]:
        first = e["message"].splitlines()[0] if e["message"] else ""
        print(f"\nFAIL {e['target']} [{e['fault']}] {e['kind']} x{e['count']}: {first}\n"
              f"  call: {e['call']}\n  rerun: {reproducer(args.seed, e['index'], only)}")
    if len(shown) > args.max_shown:
        print(f"\n... and {len(shown) - args.max_shown} more")
    print(json.dumps({"seed": args.seed, "counts": counts, "per_target": per_target,
                      "failures": [{k: e[k] for k in ("target", "fault", "kind", "count",
                                                      "index")}
                                   | {"message": e["message"].splitlines()[0]
                                      if e["message"] else ""} for e in shown]}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
