"""Float64 references for the fuzz driver (``fuzz_driver.py``): convolution, im2col/col2im,
pooling, the nn layers and the optimizers, each with the bound its error is judged against.

Every reference takes its geometry as Python ints and never materialises a padded input: the
input row each kernel tap reads is computed per output position (``taps``), so a stride of
2**63 or a padding of 2**31 costs nothing and cannot overflow.  Sizes stay small (the driver
caps them), so plain NumPy gathers are fast enough.

A reference returns ``(ref, bound, k)``: ``bound`` is the same computation on absolute values
and ``k`` the number of roundings one result element goes through, so ``_helpers.assert_close``
applies the usual ``FACTOR * (k + 2) * eps * bound`` rule (see ``_helpers``' docstring).
"""
import math

import numpy as np

F64 = np.float64
# Roundings charged to one sigmoid/tanh evaluation (libm's exp/tanh are within a few ulps).
ACT_ROUNDINGS = 8


# --- geometry --------------------------------------------------------------------------------

def out_len(size, kernel, pad_lo, pad_hi, stride, dilation):
    """Window positions along one axis, or None when the dilated kernel exceeds the padded
    input (exact Python integers)."""
    eff = dilation * (kernel - 1) + 1
    padded = size + pad_lo + pad_hi
    if eff > padded:
        return None
    return (padded - eff) // stride + 1


def conv_pads(padding, kernel, dilation):
    """((top, bottom), (left, right)) for an int, a pair, "valid" or "same" (torch's split)."""
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        out = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    ph, pw = pair(padding)
    return (ph, ph), (pw, pw)


def pair(v):
    if isinstance(v, (tuple, list)):
        if len(v) not in (1, 2):
            raise TypeError(f"not an int or a pair: {v!r}")
        return (v[0], v[-1])
    return (v, v)


def taps(size, kernel, stride, pad_lo, dilation, count):
    """(count, kernel) input index read by tap r of output position p, ``size`` for padding
    (the driver's gathers append one zero row there)."""
    idx = np.empty((count, kernel), np.intp)
    for p in range(count):
        base = p * stride - pad_lo
        for r in range(kernel):
            h = base + r * dilation
            idx[p, r] = h if 0 <= h < size else size
    return idx


def _extended(x4, fill=0.0):
    """x4 with one extra row and column of ``fill`` at the end (where ``taps`` points padding)."""
    n, c, h, w = x4.shape
    ext = np.full((n, c, h + 1, w + 1), fill, dtype=F64)
    ext[:, :, :h, :w] = x4
    return ext


def gather(x4, hidx, widx):
    """(N, C, P, R, Q, S) windows of x4 (zeros in padding)."""
    ext = _extended(x4)
    return ext[:, :, hidx[:, :, None, None], widx[None, None, :, :]]


def scatter(cols, hidx, widx, h, w):
    """Adjoint of ``gather``: add (N, C, P, R, Q, S) back into an (N, C, H, W) image."""
    n, c = cols.shape[:2]
    acc = np.zeros((h + 1, w + 1, n, c), dtype=F64)
    hi = np.broadcast_to(hidx[:, :, None, None], cols.shape[2:])
    wi = np.broadcast_to(widx[None, None, :, :], cols.shape[2:])
    np.add.at(acc, (hi, wi), np.moveaxis(cols, (0, 1), (-2, -1)))
    return np.moveaxis(acc[:h, :w], (2, 3), (0, 1))


# --- convolution -----------------------------------------------------------------------------

def is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_ints(*values):
    """TypeError unless every value is an int or a pair of ints (the driver then knows the
    call is not a valid one and builds no reference)."""
    for v in values:
        items = v if isinstance(v, (tuple, list)) else (v,)
        if not items or not all(is_int(i) for i in items):
            raise TypeError(f"not an int or pair of ints: {v!r}")


class ConvGeom:
    """Geometry of one convolution (Python ints), or ``valid=False`` when the kernel does not
    fit the padded input."""

    def __init__(self, x_shape, w_shape, stride, padding, dilation):
        check_ints(stride, dilation)
        if padding not in ("same", "valid"):
            check_ints(padding)
        self.N, self.C, self.H, self.W = x_shape
        self.K, self.Cg, self.R, self.S = w_shape
        self.sh, self.sw = pair(stride)
        self.dh, self.dw = pair(dilation)
        (self.pt, self.pb), (self.pl, self.pr) = conv_pads(padding, (self.R, self.S),
                                                           (self.dh, self.dw))
        sane = (min(self.sh, self.sw, self.dh, self.dw, self.R, self.S) >= 1
                and min(self.pt, self.pb, self.pl, self.pr) >= 0)
        self.P = out_len(self.H, self.R, self.pt, self.pb, self.sh, self.dh) if sane else None
        self.Q = out_len(self.W, self.S, self.pl, self.pr, self.sw, self.dw) if sane else None
        self.valid = self.P is not None and self.Q is not None

    def index(self):
        return (taps(self.H, self.R, self.sh, self.pt, self.dh, self.P),
                taps(self.W, self.S, self.sw, self.pl, self.dw, self.Q))


def conv2d_ref(x4, w, b, geom, groups):
    """(y, bound, k) of conv2d in float64 on an (N, C, H, W) input."""
    hidx, widx = geom.index()
    x4, w = np.asarray(x4, F64), np.asarray(w, F64)
    cols, acols = gather(x4, hidx, widx), gather(np.abs(x4), hidx, widx)
    K, Cg = geom.K, geom.Cg
    Kg = K // groups
    y = np.zeros((geom.N, K, geom.P, geom.Q))
    bound = np.zeros_like(y)
    for g in range(groups):
        ks, cs = slice(g * Kg, (g + 1) * Kg), slice(g * Cg, (g + 1) * Cg)
        y[:, ks] = np.einsum("ncprqs,kcrs->nkpq", cols[:, cs], w[ks])
        bound[:, ks] = np.einsum("ncprqs,kcrs->nkpq", acols[:, cs], np.abs(w[ks]))
    if b is not None:
        b = np.asarray(b, F64)
        y += b[None, :, None, None]
        bound += np.abs(b)[None, :, None, None]
    return y, bound, Cg * geom.R * geom.S + 1


def conv2d_backward_ref(dy4, x4, w, geom, groups):
    """((dx, bound, k), (dw, bound, k), (db, bound, k)) in float64."""
    hidx, widx = geom.index()
    dy4, x4, w = (np.asarray(a, F64) for a in (dy4, x4, w))
    cols, acols = gather(x4, hidx, widx), gather(np.abs(x4), hidx, widx)
    K, Cg = geom.K, geom.Cg
    Kg = K // groups
    dw = np.zeros(w.shape)
    bdw = np.zeros(w.shape)
    dcols = np.zeros(cols.shape)
    bdcols = np.zeros(cols.shape)
    ady = np.abs(dy4)
    for g in range(groups):
        ks, cs = slice(g * Kg, (g + 1) * Kg), slice(g * Cg, (g + 1) * Cg)
        dw[ks] = np.einsum("nkpq,ncprqs->kcrs", dy4[:, ks], cols[:, cs])
        bdw[ks] = np.einsum("nkpq,ncprqs->kcrs", ady[:, ks], acols[:, cs])
        dcols[:, cs] = np.einsum("nkpq,kcrs->ncprqs", dy4[:, ks], w[ks])
        bdcols[:, cs] = np.einsum("nkpq,kcrs->ncprqs", ady[:, ks], np.abs(w[ks]))
    dx = scatter(dcols, hidx, widx, geom.H, geom.W)
    bdx = scatter(bdcols, hidx, widx, geom.H, geom.W)
    npq = geom.N * geom.P * geom.Q
    return ((dx, bdx, Kg * geom.R * geom.S), (dw, bdw, npq),
            (dy4.sum(axis=(0, 2, 3)), ady.sum(axis=(0, 2, 3)), npq))


def im2col_ref(x4, geom):
    """(N, C*R*S, P*Q) exactly (a gather; no arithmetic)."""
    hidx, widx = geom.index()
    cols = gather(np.asarray(x4, F64), hidx, widx)          # (N, C, P, R, Q, S)
    n, c = cols.shape[:2]
    return cols.transpose(0, 1, 3, 5, 2, 4).reshape(n, c * geom.R * geom.S, geom.P * geom.Q)


def col2im_ref(cols3, c, geom):
    """(out, bound, k): the sum of overlapping windows (at most R*S terms per element)."""
    n = cols3.shape[0]
    hidx, widx = geom.index()
    a = np.asarray(cols3, F64).reshape(n, c, geom.R, geom.S, geom.P, geom.Q)
    a = a.transpose(0, 1, 4, 2, 5, 3)                        # (N, C, P, R, Q, S)
    return (scatter(a, hidx, widx, geom.H, geom.W),
            scatter(np.abs(a), hidx, widx, geom.H, geom.W), geom.R * geom.S)


# --- pooling ---------------------------------------------------------------------------------

def pool_windows(H, W, kh, kw, sh, sw, ph, pw, P, Q):
    """[(p, q, h0, h1, w0, w1)]: the real input rows/columns under each window (Python ints:
    a kernel of 2**32 costs nothing)."""
    out = []
    for p in range(P):
        h0 = p * sh - ph
        for q in range(Q):
            w0 = q * sw - pw
            out.append((p, q, max(h0, 0), min(h0 + kh, H), max(w0, 0), min(w0 + kw, W)))
    return out


def max_pool_ref(x4, geom):
    """(y, first index of each maximum in its plane, empty) in float64; NaN wins; ``empty``
    marks windows with no real element (there is no maximum to return)."""
    x4 = np.asarray(x4, F64)
    N, C, H, W = x4.shape
    P, Q = geom[8], geom[9]
    y = np.full((N, C, P, Q), np.nan)
    idx = np.zeros((N, C, P, Q), np.int64)
    empty = np.zeros((P, Q), bool)
    for p, q, h0, h1, w0, w1 in pool_windows(H, W, *geom[2:]):
        if h1 <= h0 or w1 <= w0:
            empty[p, q] = True
            continue
        win = x4[:, :, h0:h1, w0:w1].reshape(N, C, (h1 - h0) * (w1 - w0))
        a = np.argmax(win, axis=2) if win.size else np.zeros((N, C), np.intp)
        if win.size:
            y[:, :, p, q] = np.take_along_axis(win, a[..., None], 2)[..., 0]
        ww = w1 - w0
        idx[:, :, p, q] = (h0 + a // ww) * W + (w0 + a % ww)
    return y, idx, empty


def max_pool_backward_ref(dy4, idx, x_shape):
    """dx: each dy element added at ``idx`` in its plane (float64, exact up to the sums)."""
    N, C, H, W = x_shape
    dy4 = np.asarray(dy4, F64)
    if H * W == 0:      # no maximum anywhere: the gradient of an empty input is empty
        return np.zeros(x_shape), np.zeros(x_shape), 1
    dx = np.zeros((N, C, H * W))
    bound = np.zeros((N, C, H * W))
    n_i, c_i = np.meshgrid(np.arange(N), np.arange(C), indexing="ij")
    for p in range(dy4.shape[2]):
        for q in range(dy4.shape[3]):
            np.add.at(dx, (n_i, c_i, idx[:, :, p, q]), dy4[:, :, p, q])
            np.add.at(bound, (n_i, c_i, idx[:, :, p, q]), np.abs(dy4[:, :, p, q]))
    return dx.reshape(x_shape), bound.reshape(x_shape), dy4.shape[2] * dy4.shape[3]


def avg_pool_ref(x4, geom, count_include_pad):
    """(y, bound, k, empty) in float64 (``empty`` as for ``max_pool_ref``)."""
    x4 = np.asarray(x4, F64)
    N, C, H, W = x4.shape
    kh, kw, P, Q = geom[2], geom[3], geom[8], geom[9]
    y = np.zeros((N, C, P, Q))
    bound = np.zeros_like(y)
    empty = np.zeros((P, Q), bool)
    for p, q, h0, h1, w0, w1 in pool_windows(H, W, *geom[2:]):
        real = max(h1 - h0, 0) * max(w1 - w0, 0)
        if real == 0:
            empty[p, q] = True
            continue
        div = kh * kw if count_include_pad else real
        win = x4[:, :, h0:h1, w0:w1]
        y[:, :, p, q] = win.sum(axis=(2, 3)) / div
        bound[:, :, p, q] = np.abs(win).sum(axis=(2, 3)) / div
    return y, bound, min(kh * kw, H * W) + 1, empty


def avg_pool_backward_ref(dy4, x_shape, geom, count_include_pad):
    N, C, H, W = x_shape
    dy4 = np.asarray(dy4, F64)
    kh, kw = geom[2], geom[3]
    dx = np.zeros(x_shape)
    bound = np.zeros(x_shape)
    for p, q, h0, h1, w0, w1 in pool_windows(H, W, *geom[2:]):
        real = max(h1 - h0, 0) * max(w1 - w0, 0)
        if real == 0:
            continue
        div = kh * kw if count_include_pad else real
        g = dy4[:, :, p, q][:, :, None, None] / div
        dx[:, :, h0:h1, w0:w1] += g
        bound[:, :, h0:h1, w0:w1] += np.abs(g)
    return dx, bound, dy4.shape[2] * dy4.shape[3] + 1


# --- nn layers -------------------------------------------------------------------------------
# A layer reference is described by a small dict the driver builds from the arguments it gave
# the constructor (never from the layer's own attributes): {"type": ..., ...}.  Forward returns
# (y, bound, k, cache); backward (dx, dx_bound, grads) with grads {name: (g, bound)}.  Bounds
# are the same computation on absolute values, so error propagated from an earlier layer is
# covered as it passes through |W|.


def _act(kind, z):
    if kind == "relu":
        return np.maximum(z, 0.0)
    if kind == "sigmoid":
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-z))
    return np.tanh(z)


def layer_forward(spec, params, x, bx):
    """(y, bound, roundings, cache) for one layer; ``params`` are float64 copies of the
    layer's parameters, ``bx`` the bound of x (|x| plus what came before)."""
    t = spec["type"]
    if t == "Linear":
        W, b = params["weight"], params.get("bias")
        rows = int(np.prod(x.shape[:-1]))     # not -1: a 0-wide input has 0 elements
        x2, bx2 = x.reshape(rows, W.shape[1]), bx.reshape(rows, W.shape[1])
        y, by = x2 @ W.T, bx2 @ np.abs(W).T
        if b is not None:
            y, by = y + b, by + np.abs(b)
        shape = x.shape[:-1] + (W.shape[0],)
        return y.reshape(shape), by.reshape(shape), W.shape[1] + 1, (x2, bx2)
    if t == "Conv2d":
        geom = ConvGeom(x.shape, params["weight"].shape, spec["stride"], spec["padding"],
                        spec["dilation"])
        y, _, k = conv2d_ref(x, params["weight"], params.get("bias"), geom, spec["groups"])
        by, _, _ = conv2d_ref(bx, np.abs(params["weight"]),
                              None if params.get("bias") is None else np.abs(params["bias"]),
                              geom, spec["groups"])
        return y, by, k, (x, bx, geom)
    if t in ("MaxPool2d", "AvgPool2d"):
        geom = pool_geom(x.shape, spec["kernel_size"], spec["stride"], spec["padding"])
        if t == "MaxPool2d":
            y, idx, _ = max_pool_ref(x, geom)
            by, _, _ = max_pool_ref(bx, geom)
            return y, by, 0, (x.shape, geom, idx)
        cip = spec.get("count_include_pad", True)
        y, _, k, _ = avg_pool_ref(x, geom, cip)
        by, _, _, _ = avg_pool_ref(bx, geom, cip)
        return y, by, k, (x.shape, geom, cip)
    if t == "Flatten":
        shape = flat_shape(x.shape, spec.get("start_dim", 1), spec.get("end_dim", -1))
        return x.reshape(shape), bx.reshape(shape), 0, x.shape
    if t == "ReLU":
        return _act("relu", x), bx, 0, x
    y = _act(t.lower(), x)
    return y, bx + 1.0, ACT_ROUNDINGS, (y, bx)


def layer_backward(spec, params, cache, dy, bdy):
    """(dx, dx bound, roundings, {param: (grad, bound)}) for one layer."""
    t = spec["type"]
    if t == "Linear":
        W, x2, bx2 = params["weight"], cache[0], cache[1]
        dy2, bdy2 = dy.reshape(x2.shape[0], W.shape[0]), bdy.reshape(x2.shape[0], W.shape[0])
        grads = {"weight": (dy2.T @ x2, bdy2.T @ bx2)}
        if "bias" in params:
            grads["bias"] = (dy2.sum(0), bdy2.sum(0))
        shape = dy.shape[:-1] + (W.shape[1],)
        k = max(W.shape[0], x2.shape[0]) + 1
        return (dy2 @ W).reshape(shape), (bdy2 @ np.abs(W)).reshape(shape), k, grads
    if t == "Conv2d":
        x, bx, geom = cache
        (dx, _, kx), (dw, _, kw_), (db, _, _) = conv2d_backward_ref(dy, x, params["weight"],
                                                                    geom, spec["groups"])
        (bdx, _, _), (bdw, _, _), (bdb, _, _) = conv2d_backward_ref(
            bdy, bx, np.abs(params["weight"]), geom, spec["groups"])
        grads = {"weight": (dw, bdw)}
        if "bias" in params:
            grads["bias"] = (db, bdb)
        return dx, bdx, max(kx, kw_), grads
    if t == "MaxPool2d":
        shape, _, idx = cache
        dx, _, k = max_pool_backward_ref(dy, idx, shape)
        bdx, _, _ = max_pool_backward_ref(bdy, idx, shape)
        return dx, bdx, k, {}
    if t == "AvgPool2d":
        shape, geom, cip = cache
        dx, _, k = avg_pool_backward_ref(dy, shape, geom, cip)
        bdx, _, _ = avg_pool_backward_ref(bdy, shape, geom, cip)
        return dx, bdx, k, {}
    if t == "Flatten":
        return dy.reshape(cache), bdy.reshape(cache), 0, {}
    if t == "ReLU":
        return np.where(cache > 0, dy, 0.0), bdy, 0, {}
    y, by = cache
    deriv = y * (1 - y) if t == "Sigmoid" else 1 - y * y
    # The derivative is formed from the computed y, whose own error scales with by.
    return dy * deriv, bdy * (1.0 + 2.0 * by), ACT_ROUNDINGS, {}


def pool_geom(x_shape, kernel_size, stride, padding):
    check_ints(kernel_size, padding, *(() if stride is None else (stride,)))
    kh, kw = pair(kernel_size)
    sh, sw = (kh, kw) if stride is None else pair(stride)
    ph, pw = pair(padding)
    H, W = x_shape[2], x_shape[3]
    sane = min(kh, kw, sh, sw) >= 1 and min(ph, pw) >= 0
    P = out_len(H, kh, ph, ph, sh, 1) if sane else None
    Q = out_len(W, kw, pw, pw, sw, 1) if sane else None
    return (H, W, kh, kw, sh, sw, ph, pw, P, Q)


def flat_shape(shape, start, end):
    nd = max(len(shape), 1)
    s = start + nd if start < 0 else start
    e = end + nd if end < 0 else end
    return shape[:s] + (int(np.prod(shape[s:e + 1], dtype=np.int64)),) + shape[e + 1:]


# --- losses ----------------------------------------------------------------------------------

def cross_entropy_ref(logits, labels):
    """(loss, its tolerance scale, dlogits, their bound) in float64."""
    x = np.asarray(logits, F64)
    n, c = x.shape
    m = x.max(axis=1, keepdims=True)
    e = np.exp(x - m)
    s = e.sum(axis=1, keepdims=True)
    lse = np.log(s) + m
    loss = float(np.mean(lse[:, 0] - x[np.arange(n), labels]))
    soft = e / s
    grad = soft.copy()
    grad[np.arange(n), labels] -= 1.0
    scale = float(np.mean(np.abs(x).max(axis=1) + math.log(max(c, 1)) + 1.0))
    return loss, scale, grad / n, (soft + 1.0) * (1.0 + np.abs(x).max(axis=1, keepdims=True)) / n


def mse_ref(pred, target):
    p, t = np.asarray(pred, F64), np.asarray(target, F64)
    d = p - t
    bound = np.abs(p) + np.abs(t)
    return float(np.mean(d * d)), float(np.mean(bound * bound)), 2.0 * d / d.size, \
        2.0 * bound / d.size


# --- optimizers (torch.optim's rules, float64) ------------------------------------------------

def optimizer_ref(kind, hyper, p, grads):
    """Parameter values after one step per gradient in ``grads``, and a bound on the size of
    the arithmetic for the tolerance: |p|, every update's magnitude, and the update's
    sensitivity to the rounding of its inputs.  The last matters when weight decay nearly
    cancels the gradient: ``g = grad + wd * p`` is then small with an absolute error of
    eps * (|grad| + wd |p|), and the adaptive methods divide g by about |g|, so that error
    reaches the update scaled by lr / denominator."""
    p = np.array(p, F64)
    scale = np.abs(p)
    state = {}
    wd = hyper.get("weight_decay", 0.0)
    for t, graw in enumerate(grads, start=1):
        graw = np.asarray(graw, F64)
        g = graw + wd * p
        size = np.abs(graw) + wd * np.abs(p)           # what g's rounding scales with
        if kind == "SGD":
            mom = hyper.get("momentum", 0.0)
            if mom:
                prev = np.abs(state.get("buf", 0.0))
                buf = g.copy() if t == 1 else mom * state["buf"] + g
                state["buf"] = buf
                d = g + mom * buf if hyper.get("nesterov") else buf
                size = size + mom * prev + mom * np.abs(buf)
            else:
                d = g
            upd = hyper["lr"] * d
            sens = hyper["lr"] * size
        elif kind == "Adam":
            b1, b2 = hyper.get("betas", (0.9, 0.999))
            m_prev = state.get("m", 0.0)
            m = b1 * m_prev + (1 - b1) * g
            v = b2 * state.get("v", 0.0) + (1 - b2) * g * g
            state["m"], state["v"] = m, v
            denom = np.sqrt(v) / math.sqrt(1 - b2 ** t) + hyper.get("eps", 1e-8)
            step = hyper.get("lr", 1e-3) / (1 - b1 ** t)
            upd = step * m / denom
            # torch forms m as lerp(m, g, 1 - b1) = m + (1 - b1) * (g - m), whose rounding
            # scales with |m| too (with b1 = 0 it cancels m out of g - m).
            state["sens"] = (b1 * state.get("sens", 0.0) + (1 - b1) * size
                             + np.abs(m_prev) + np.abs(m))
            with np.errstate(divide="ignore", invalid="ignore"):
                sens = np.where(denom > 0, step * state["sens"] / denom, 0.0)
        else:
            lr = hyper.get("lr", 1e-2)
            if kind == "AdaGrad":
                acc = state["acc"] = state.get("acc", 0.0) + g * g
                denom = np.sqrt(acc) + hyper.get("eps", 1e-10)
            else:  # RMSprop
                a = hyper.get("alpha", 0.99)
                acc = state["acc"] = a * state.get("acc", 0.0) + (1 - a) * g * g
                denom = np.sqrt(acc) + hyper.get("eps", 1e-8)
            upd = lr * g / denom
            with np.errstate(divide="ignore", invalid="ignore"):
                sens = np.where(denom > 0, lr * size / denom, 0.0)
        p = p - upd
        scale = scale + np.abs(upd) + np.abs(p) + sens
    return p, scale
