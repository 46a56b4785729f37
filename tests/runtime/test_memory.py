"""No memory growth: reference counts of the inputs, Python allocations (tracemalloc), C
heap in use (glibc mallinfo2, or RSS elsewhere) over 10 000 small calls, big calls, error
paths and short-lived threads.

Each check warms up first (scratch buffers are per thread and reused by design), then
repeats the same work and allows a small fraction of what one leaked object per call would
cost."""
import ctypes
import ctypes.util
import gc
import os
import sys
import threading
import tracemalloc

import numpy as np
import pytest

import microtile

from _helpers import UNDER_ASAN, run_python

# Growth is read from glibc's allocator and the resident set; under AddressSanitizer neither
# means anything (its allocator replaces glibc's and holds freed blocks in a 256 MB
# quarantine), so those tests run on the normal build only.
glibc_heap_only = pytest.mark.skipif(UNDER_ASAN, reason="AddressSanitizer replaces malloc")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]


def _heap_probe():
    """A function returning the bytes the C heap has handed out (all arenas plus mmapped
    chunks), or the resident set size where glibc's mallinfo2 is missing."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallinfo2 = libc.mallinfo2
        mallinfo2.restype = _MallInfo2

        def in_use():
            info = mallinfo2()
            return info.uordblks + info.hblkhd
        in_use()
        return in_use, "malloc in use"
    except (OSError, AttributeError):
        page = os.sysconf("SC_PAGE_SIZE")

        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page
        return rss, "RSS"


HEAP, HEAP_KIND = _heap_probe()


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def growth(fn, repeat, warmup):
    """(C heap growth, Python allocation growth) over ``repeat`` calls of ``fn`` after
    ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    gc.collect()
    tracemalloc.start()
    try:
        py0 = tracemalloc.get_traced_memory()[0]
        heap0 = HEAP()
        for _ in range(repeat):
            fn()
        gc.collect()
        return HEAP() - heap0, tracemalloc.get_traced_memory()[0] - py0
    finally:
        tracemalloc.stop()


def _small_gemm_calls():
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal(s) for s in ((8, 8), (5, 7), (7, 3), (1, 1), (6, 16))]
    f32 = [m.astype(np.float32) for m in mats]
    out = np.empty((8, 8))
    state = {"i": 0}

    def call():
        i = state["i"] = state["i"] + 1
        k = i % 5
        if k == 0:
            microtile.gemm(mats[0], mats[0], beta=1.0, c=mats[0], out=out)
        elif k == 1:
            microtile.gemm(mats[1], mats[2].T, trans_b=True)
        elif k == 2:
            microtile.gemm(f32[2], f32[1], trans_a=True, trans_b=True, alpha=2.0)
        elif k == 3:
            microtile.gemm(mats[3], f32[3], beta=0.5, c=mats[3])
        else:
            microtile.gemm(f32[4].T, mats[4], beta=1.0, c=np.float64(1.0))
    return call


@glibc_heap_only
def test_no_growth_over_10000_small_gemm_calls():
    call = _small_gemm_calls()
    rss0 = None
    for _ in range(1000):
        call()
    gc.collect()
    rss0 = rss_bytes()
    heap, py = growth(call, 10_000, 0)
    rss = rss_bytes() - rss0
    # One leaked 8x8 result would be ~6 MB, one leaked float object 240 kB.
    assert heap < 256 * 1024, f"{HEAP_KIND} grew by {heap} bytes over 10 000 calls"
    assert py < 64 * 1024, f"Python allocations grew by {py} bytes over 10 000 calls"
    assert rss < 8 * 1024 * 1024, f"RSS grew by {rss} bytes over 10 000 calls"


@glibc_heap_only
def test_no_growth_big_gemm_calls():
    rng = np.random.default_rng(1)
    shapes = [(700, 650, 600), (400, 900, 300), (1000, 64, 700), (64, 1000, 500)]
    arrays = [(rng.standard_normal((m, k)), rng.standard_normal((k, n))) for m, n, k in shapes]
    state = {"i": 0}

    def call():
        state["i"] += 1
        a, b = arrays[state["i"] % len(arrays)]
        microtile.gemm(a, b)
        microtile.gemm(a.astype(np.float32), b.astype(np.float32))

    heap, py = growth(call, 24, 8)
    # One leaked result is >= 0.5 MB; a leaked packing buffer several MB.
    assert heap < 2 * 1024 * 1024, f"{HEAP_KIND} grew by {heap} bytes over 24 big calls"
    assert py < 64 * 1024


@glibc_heap_only
def test_no_growth_on_error_paths():
    a, b = np.ones((3, 4)), np.ones((5, 6))
    ro = np.zeros((3, 6))
    ro.flags.writeable = False
    bad_calls = [
        lambda: microtile.gemm(a, b),
        lambda: microtile.gemm(a, np.ones((4, 6)), out=ro),
        lambda: microtile.gemm(a, np.ones((4, 6)), out=np.zeros((3, 6), np.float32)),
        lambda: microtile.gemm(np.ones((3, 4), np.int64), b),
        lambda: microtile.gemm(a, np.ones((4, 6)), beta=1.0),
        lambda: microtile.gemm(a, np.ones((4, 6)), beta=1.0, c=np.ones((2, 2))),
    ]

    def call():
        for bad in bad_calls:
            try:
                bad()
            except (TypeError, ValueError):
                pass
            else:
                raise AssertionError("expected an error")

    heap, py = growth(call, 2000, 100)
    assert heap < 256 * 1024, f"{HEAP_KIND} grew by {heap} bytes over 12 000 failing calls"
    assert py < 64 * 1024, f"Python allocations grew by {py} bytes over 12 000 failing calls"


@glibc_heap_only
def test_no_growth_with_short_lived_threads():
    """Each new thread gets its own packing buffers; they must be freed when it exits."""
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((300, 280)), rng.standard_normal((280, 310))

    def round_of_threads():
        threads = [threading.Thread(target=microtile.gemm, args=(a, b)) for _ in range(24)]
        for t in threads:
            t.start()
            t.join()

    round_of_threads()
    round_of_threads()
    gc.collect()
    heap0 = HEAP()
    round_of_threads()
    round_of_threads()
    gc.collect()
    heap = HEAP() - heap0
    # A leak would be >= 0.5 MB per thread: 24 MB for the 48 threads measured.
    assert heap < 4 * 1024 * 1024, f"{HEAP_KIND} grew by {heap} bytes over 48 threads"


# Each: the arrays whose references must not leak, and one call using them.
def _ref_cases():
    rng = np.random.default_rng(3)
    a, b, c = rng.standard_normal((6, 5)), rng.standard_normal((5, 7)), rng.standard_normal((6, 7))
    x, y, z = rng.standard_normal(5), rng.standard_normal(6), rng.standard_normal(5)
    out67, out6 = np.empty((6, 7)), np.empty(6)
    s = rng.standard_normal((3, 6, 5))
    return {
        "gemm": ((a, b, c, out67), lambda: microtile.gemm(a, b, beta=1.0, c=c, out=out67)),
        "gemm_error": ((a, c), lambda: _swallow(lambda: microtile.gemm(a, c))),
        "matmul": ((s, b), lambda: microtile.matmul(s, b)),
        "matmul_error": ((s, c), lambda: _swallow(lambda: microtile.matmul(s, c))),
        "dot": ((x, z), lambda: microtile.dot(x, z)),
        "outer": ((x, y), lambda: microtile.outer(x, y)),
        "ger": ((c, y, np.ones(7)), lambda: microtile.ger(c, y, np.ones(7), alpha=0.0)),
        "gemv": ((a, x, y, out6), lambda: microtile.gemv(a, x, beta=1.0, y=y, out=out6)),
        "gemv_error": ((a, y), lambda: _swallow(lambda: microtile.gemv(a, y))),
    }


def _swallow(fn):
    try:
        fn()
    except (TypeError, ValueError):
        return
    raise AssertionError("expected an error")


@pytest.mark.parametrize("name", list(_ref_cases()))
def test_reference_counts_unchanged(name):
    arrays, call = _ref_cases()[name]
    call()
    before = [sys.getrefcount(v) for v in arrays]
    for _ in range(1000):
        call()
    after = [sys.getrefcount(v) for v in arrays]
    assert after == before, f"{name}: reference counts went from {before} to {after}"


@pytest.mark.parametrize("name", ["matmul", "dot", "outer", "ger", "gemv"])
@glibc_heap_only
def test_no_growth_level2_and_matmul(name):
    _, call = _ref_cases()[name]
    heap, py = growth(call, 5000, 200)
    assert heap < 256 * 1024, f"{name}: {HEAP_KIND} grew by {heap} bytes over 5000 calls"
    assert py < 64 * 1024, f"{name}: Python allocations grew by {py} bytes over 5000 calls"


# --- bounded memory: huge operands that cost little memory -----------------------------------
#
# Each case runs in a child process under an address-space limit (RLIMIT_AS), so a
# regression fails the test with a MemoryError instead of bringing in the OOM killer.

_HEAP_CHILD = r"""
import ctypes, ctypes.util, json, resource
import numpy as np
import microtile

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
try:
    _mi = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    _mi.restype = MallInfo2
    def heap():
        info = _mi()
        return info.uordblks + info.hblkhd
    heap()
except (OSError, AttributeError):
    def heap():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""


def _run_limited(code, limit_gb, timeout=300):
    """run_python with the child's address space limited to ``limit_gb`` GiB."""
    import resource

    limit = int(limit_gb * 2 ** 30)

    def set_limit():
        # AddressSanitizer reserves ~15 TB of shadow address space at start, so no address
        # limit can apply under it; its allocator still turns a huge request into a
        # MemoryError (allocator_may_return_null=1, README "Sanitizers").
        if not UNDER_ASAN:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return run_python(_HEAP_CHILD + code, timeout=timeout, preexec_fn=set_limit)


def test_gemv_on_an_8_byte_broadcast_input_of_2_31_elements():
    # (3, 2**31 + 3) and (2**31 + 3,) views of one float64 each: the strided operands were
    # gathered whole into per-thread scratch (16 GB each; the OOM killer took the machine at
    # 24 GB).  Now they are read in blocks: the child's 2 GiB are plenty.
    res = _run_limited(r"""
n = 2 ** 31 + 3
y = microtile.gemv(np.broadcast_to(1.0, (3, n)), np.broadcast_to(1.0, (n,)))
print(json.dumps({"y": y.tolist(), "n": n}))
""", limit_gb=2)
    assert res["y"] == [float(res["n"])] * 3      # sums of ones below 2**53 are exact


def test_no_large_scratch_kept_after_the_call():
    # gemv with n = 10**8 left 1.5 GB of per-thread scratch allocated after it returned;
    # ger/outer gathered a strided y whole; a GEMM whose blocking packs over 64 MiB of B
    # kept that buffer.  Now what a call leaves allocated stays under 64 MiB.
    res = _run_limited(r"""
from microtile._common import _scratch
n = 10 ** 8
out = {}
base = heap()
y = microtile.gemv(np.broadcast_to(2.0, (5, n)), np.broadcast_to(0.5, (n,)))
out["gemv"] = heap() - base
out["gemv_y"] = y.tolist()
a = np.zeros((2, n // 4), np.float32)
base = heap()
microtile.ger(a, np.ones(2, np.float32), np.broadcast_to(np.float32(3.0), (n // 4,)))
out["ger"] = heap() - base
out["ger_ok"] = bool((a == 3.0).all())
del a
b = np.asfortranarray(np.ones((3000, 3000)))
base = heap()
with microtile.config_context(dtype="float64", kc=4096, nc=4096, threads=2):
    c = microtile.gemm(np.ones((8, 3000)), b)
out["gemm"] = heap() - base - c.nbytes
out["gemm_ok"] = bool((c == 3000.0).all())
out["held"] = _scratch.held_bytes()
out["keep"] = _scratch.keep_max()
print(json.dumps(out))
""", limit_gb=3)
    assert res["gemv_y"] == [1e8] * 5 and res["ger_ok"] and res["gemm_ok"]
    limit = 64 * 2 ** 20
    assert res["keep"] == limit
    for name in ("gemv", "ger", "gemm"):
        assert res[name] < limit, f"{name} left {res[name]} bytes allocated"
    assert res["held"] <= 4 * limit


@pytest.mark.parametrize("batch", [2 ** 26, 2 ** 31])
def test_matmul_empty_result_with_a_huge_broadcast_batch(batch):
    # 2**26 took 13 s and 2.6 GB (NumPy: 0.13 s); 2**31 asked for 16 GB of offsets.
    res = _run_limited(r"""
batch = %d
a = np.broadcast_to(np.ones((1, 0, 4)), (batch, 0, 4))
b = np.broadcast_to(np.ones((1, 4, 5)), (batch, 4, 5))
c = np.ones((5, 0))
r1 = microtile.matmul(a, b)
r2 = microtile.matmul(b, c)
print(json.dumps({"s1": r1.shape, "s2": r2.shape}))
""" % batch, limit_gb=1)
    assert tuple(res["s1"]) == (batch, 0, 5) and tuple(res["s2"]) == (batch, 4, 0)


def test_conv2d_broadcast_weight_stays_within_the_workspace_cap():
    # A stride-0 (1, 1, 3000, 3000) weight: the weight was copied whole (72 MB) and one
    # output position's column (72 MB) ignored the 8 MiB conv_workspace cap (at 20000 x
    # 20000, 3 GB each).  The weight is now read in place and the depth sliced: the peak
    # grows by less than the cap plus 16 MiB of GEMM packing and interpreter slack.
    res = _run_limited(r"""
x = np.broadcast_to(1.0, (1, 1, 3000, 3000))
w = np.broadcast_to(0.5, (1, 1, 3000, 3000))
microtile.conv2d(np.ones((1, 1, 8, 8)), np.ones((1, 1, 3, 3)))   # warm up
p0 = peak()
y = microtile.conv2d(x, w)
fwd = peak() - p0
p0 = peak()
dx, dw, db = microtile.conv2d_backward(np.ones((1, 1, 1, 1)), x, w, need_input_grad=False)
bwd = peak() - p0
print(json.dumps({"y": y.tolist(), "fwd": fwd, "bwd": bwd, "dw": dw.nbytes,
                  "dw_ok": bool((dw == 1.0).all()), "cap": microtile.get_config()
                  .get("conv_workspace", 8 << 20)}))
""", limit_gb=2)
    assert res["y"] == [[[[4.5e6]]]]
    assert res["dw_ok"]
    slack = 16 * 2 ** 20
    assert res["fwd"] < res["cap"] + slack, res
    # The backward's results: dW itself, and one dW-sized partial per thread that summed
    # into it (here one: the work is threaded inside the GEMMs, not over chunks).
    assert res["bwd"] < 2 * res["dw"] + res["cap"] + slack, res
