"""The convolution option: ``conv_chunk`` (the column bytes one thread lowers and
multiplies at a time) raced on a float32 ``conv2d``, checked against ``conv_reference``."""
import math

import numpy as np

from autotune import measure
from autotune.tuning import KEEP_MARGIN


def conv_reference(x, w, padding):
    """float64 NCHW convolution (stride 1, no dilation) and the same of |x|, |w|."""
    from numpy.lib.stride_tricks import sliding_window_view
    x64 = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    w64 = w.astype(np.float64)
    r, s = w.shape[2], w.shape[3]
    win = sliding_window_view(x64, (r, s), axis=(2, 3))       # N, C, P, Q, R, S
    ref = np.einsum("ncpqrs,kcrs->nkpq", win, w64, optimize=True)
    bound = np.einsum("ncpqrs,kcrs->nkpq", np.abs(win), np.abs(w64), optimize=True)
    return ref, bound


def search_conv_chunk(t, conv, default, shape=(8, 64, 28, 28, 128, 3)):
    """The column chunk (bytes one thread lowers and multiplies at a time) that makes
    ``conv(x, w, padding=p)`` fastest; float32, with the tuned threads.  ``conv`` is
    ``microtile.conv2d``.  (The workspace cap itself is a memory limit, the user's to set.)"""
    deadline = t.deadline("conv")
    n, c, h, wd, k, r = shape
    rng = np.random.default_rng(t.seed)
    x = rng.uniform(-1, 1, (n, c, h, wd)).astype(np.float32)
    w = rng.uniform(-1, 1, (k, c, r, r)).astype(np.float32)
    pad = r // 2
    ref, bound = conv_reference(x, w, pad)
    bound = (c * r * r + 2) * float(np.finfo(np.float32).eps) * bound + 1e-30
    flops = 2.0 * ref.size * c * r * r
    sizes = [1 << 20, 2 << 20, 4 << 20] if t.quick else [512 << 10, 1 << 20, 2 << 20,
                                                        4 << 20, 8 << 20]
    if default not in sizes:
        sizes.append(default)
    cands = [{"conv_chunk": v} for v in sorted(sizes)]
    base = {"threads": t.threads}

    def check(cand):
        import microtile
        with microtile.config_context(**base, **cand):
            y = conv(x, w, padding=pad)
        y = np.asarray(y, dtype=np.float64)
        if y.shape != ref.shape or not np.isfinite(y).all():
            return math.inf
        return float(np.max(np.abs(y - ref) / bound))

    def sample(cand):
        import microtile
        with microtile.config_context(**base, **cand):
            sec = measure.timed(lambda: conv(x, w, padding=pad), 0.02)
        return flops / sec / 1e9

    res = measure.race(cands, sample, check, rounds=t.s["rounds"], top=3,
                       extra_rounds=t.s["extra"], deadline=deadline, seed=t.seed)
    w_ = res.winner
    if w_ is None:
        raise RuntimeError("conv2d: no chunk size gave a correct result")
    inc = {"conv_chunk": default}
    chosen = inc if res.score(w_) < res.score(inc) * KEEP_MARGIN else w_
    t.say(f"conv2d chunk: {chosen['conv_chunk'] >> 10} KiB per thread ("
          + ", ".join(f"{cd['conv_chunk'] >> 10} KiB {res.score(cd):.1f}" for cd in cands)
          + " GFLOP/s)")
    t.evidence["conv_chunk"] = {"shape": list(shape), "results": res.summary(),
                                "chosen": chosen["conv_chunk"]}
    return chosen["conv_chunk"]
