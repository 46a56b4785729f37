"""Ctrl-C during a long kernel: the call stops early with KeyboardInterrupt, and the process
(thread pools, scratch, later calls) is sound afterwards.

Each case runs in a child interpreter (a SIGINT must reach a main thread that is inside the
kernel).  A helper thread sends SIGINT shortly after the main thread enters the call.
"Stopped early" is read from the output, not from a clock: ``out`` starts as NaN, and an
interrupted call leaves some of it unwritten (NaN, or the 0 a kernel clears it to first), where a call that ran to the end (and only
then let the interpreter raise KeyboardInterrupt) would have written all of it.  The work is
sized to take well over a second on the 2-core VM, so the signal, sent 50 ms in, arrives
while it runs even on a much faster machine.  How soon the call stops (about 10-60 ms here)
is measured by hand (see the issue's note), not asserted.

spmm's scatter form clears its output before it adds into it, so there "stopped early" is
read from sums instead: with positive operands, an output column whose sum falls short of
the one implied by the matrix's row or column sums (an O(nnz + size) identity) is missing
terms.
"""
import pytest

from _helpers import run_python

_CHILD = r"""
import json, os, signal, threading, time
import numpy as np
import microtile as mt

rng = np.random.default_rng(0)
CASE = {case!r}
if CASE == "gemm":
    a = rng.standard_normal((3000, 3000))
    out = np.full((3000, 3000), np.nan)
    call = lambda: mt.gemm(a, a, out=out)
elif CASE == "matmul":          # a stack of products: the batch loop polls too
    a = rng.standard_normal((40, 500, 900))
    b = rng.standard_normal((900, 700))
    out = np.full((40, 500, 700), np.nan)
    call = lambda: mt.matmul(a, b, out=out)
elif CASE == "conv2d":
    x = rng.standard_normal((8, 64, 128, 128))
    w = rng.standard_normal((128, 64, 3, 3))
    out = np.full((8, 128, 128, 128), np.nan)
    call = lambda: mt.conv2d(x, w, padding=1, out=out)
elif CASE == "depthwise":       # the direct kernel (a 41x41 filter per channel)
    x = rng.standard_normal((4, 64, 192, 192))
    w = rng.standard_normal((64, 1, 41, 41))
    out = np.full((4, 64, 192, 192), np.nan)
    call = lambda: mt.conv2d(x, w, padding=20, groups=64, out=out)
elif CASE == "depthwise_backward":
    x = rng.standard_normal((4, 64, 192, 192))
    w = rng.standard_normal((64, 1, 41, 41))
    dy = rng.standard_normal((4, 64, 192, 192))
    out = np.full(x.shape, np.nan)
    call = lambda: mt.conv2d_backward(dy, x, w, padding=20, groups=64, _dx=out)
elif CASE == "conv2d_backward":  # its private _dx is the output watched
    x = rng.standard_normal((8, 64, 128, 128))
    w = rng.standard_normal((128, 64, 3, 3))
    dy = rng.standard_normal((8, 128, 128, 128))
    out = np.full(x.shape, np.nan)
    call = lambda: mt.conv2d_backward(dy, x, w, padding=1, _dx=out)
else:                           # spmm: the row gather (a @ x) or the scatter (a.T @ x)
    import scipy.sparse as sp
    R, PER, N = 20000, 200, 512                 # 4e6 nonzeros, ~3 s on one thread here
    a = sp.csr_matrix((rng.uniform(0.5, 1.0, R * PER),
                       rng.integers(0, R, R * PER).astype(np.int32),
                       np.arange(R + 1, dtype=np.int32) * PER), shape=(R, R))
    x = rng.uniform(0.5, 1.0, (R, N))
    out = np.full((R, N), np.nan)
    s = a if CASE == "spmm" else a.T
    call = lambda: mt.spmm(s, x, out=out)
    # ones @ (s @ x) == (ones @ s) @ x: what each column of a finished product sums to.
    want = np.asarray(s.sum(axis=0)).ravel() @ x
    short = lambda: int((~(np.abs(out.sum(axis=0) - want) <= 1e-9 * want)).sum())

entered = threading.Event()
def interrupt():
    entered.wait()
    time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGINT)
threading.Thread(target=interrupt, daemon=True).start()
outcome = "returned"
try:
    entered.set()
    call()
except KeyboardInterrupt:
    outcome = "interrupted"
# Not computed: still NaN, or 0 where the kernel clears before it adds (dx); no finished
# element of a product of random normals is exactly 0.  spmm: columns missing terms.
unwritten = short() if CASE.startswith("spmm") else int((np.isnan(out) | (out == 0)).sum())
# Afterwards: a threaded product and a convolution are still right.
p = rng.standard_normal((257, 263))
q = rng.standard_normal((263, 251))
ok_gemm = bool(np.allclose(mt.gemm(p, q), p @ q, rtol=1e-12, atol=1e-10))
xs, ws = rng.standard_normal((2, 3, 9, 9)), rng.standard_normal((4, 3, 3, 3))
ref = np.zeros((2, 4, 7, 7))
for r in range(3):
    for s in range(3):
        ref += np.einsum("nchw,kc->nkhw", xs[:, :, r:r + 7, s:s + 7], ws[:, :, r, s])
ok_conv = bool(np.allclose(mt.conv2d(xs, ws), ref, rtol=1e-12, atol=1e-10))
ok_spmm = True
if CASE.startswith("spmm"):     # and spmm itself, both forms, threaded when allowed
    small = a[:3000, :3000]
    d = rng.standard_normal((3000, 70))
    ok_spmm = bool(np.allclose(mt.spmm(small, d), small @ d, rtol=1e-12, atol=1e-10)
                   and np.allclose(mt.spmm(small.T, d), small.T @ d, rtol=1e-12,
                                   atol=1e-10))
print(json.dumps({{"outcome": outcome, "unwritten": unwritten, "size": int(out.size),
                  "ok_gemm": ok_gemm, "ok_conv": ok_conv, "ok_spmm": ok_spmm}}))
"""


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", ["gemm", "matmul", "conv2d", "conv2d_backward", "depthwise",
                                  "depthwise_backward", "spmm", "spmm_scatter"])
def test_ctrl_c_stops_a_long_kernel(case, threads):
    if case.startswith("spmm"):
        pytest.importorskip("scipy.sparse")
    res = run_python(_CHILD.format(case=case), env={"MICROTILE_NUM_THREADS": threads},
                     timeout=300)
    assert res["outcome"] == "interrupted", res
    assert res["unwritten"] > 0, f"the call ran to the end before the interrupt: {res}"
    assert res["ok_gemm"] and res["ok_conv"] and res["ok_spmm"], res


def test_a_call_in_another_thread_is_not_polled():
    """Only the main thread runs signal handlers: a long call from another thread runs to the
    end (it never takes the GIL to poll), and the main thread's KeyboardInterrupt arrives
    there as usual."""
    code = r"""
import json, os, signal, threading, time
import numpy as np
import microtile as mt
a = np.random.default_rng(0).standard_normal((1500, 1500))
out = np.full((1500, 1500), np.nan)
worker = threading.Thread(target=lambda: mt.gemm(a, a, out=out))
worker.start()
outcome = "none"
try:
    time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(10)
except KeyboardInterrupt:
    outcome = "main interrupted"
worker.join()
print(json.dumps({"outcome": outcome, "unwritten": int(np.isnan(out).sum()),
                  "right": bool(np.allclose(out, a @ a))}))
"""
    res = run_python(code, timeout=300)
    assert res == {"outcome": "main interrupted", "unwritten": 0, "right": True}
