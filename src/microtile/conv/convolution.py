"""Public 2-D convolution functions (NCHW, PyTorch's semantics): argument rules, layouts and
the choice of algorithm.

The arithmetic lives in ``_conv`` (im2col + GEMM drivers), ``_im2col`` (the lowering
kernels), ``_direct`` (the direct kernel: depthwise, small-group and few-channel layers) and
``_winograd`` (Winograd F(2x2,3x3) / F(4x4,3x3) for 3x3 stride-1 layers).
"""
import numpy as np

from microtile.conv import _conv, _direct, _im2col, _winograd
from microtile._common._checks import as_float_array, as_dtype, check_out, overlaps, result_dtype
from microtile._config._context import conv_choice, get_num_threads, get_option
from microtile.conv._nchw import (as_nchw, check_result, conv_padding, count, out_size, pair,
                                  reuse_out)

__all__ = ["conv2d", "conv2d_backward", "im2col", "col2im"]


def _sizes():
    # The workspace cap (all threads together) and the column bytes one thread works on at a
    # time.  Measured on a Zen3 (512 KiB L2, float32 ResNet/VGG layers): 1-2 MiB chunks beat
    # both L2-sized ones (more GEMM calls, weights re-packed) and 8 MiB ones (columns fall out
    # of cache between im2col and the GEMM) by 10-40%; the tuner may set it per machine.
    return get_option("conv_workspace"), get_option("conv_chunk")


# Where the built-in rule runs a layer on the direct kernel rather than im2col + GEMM.  The
# direct kernel's work per output is Cg*R*S taps read straight from the input; im2col writes
# Cg*R*S rows of columns and runs a GEMM with K/groups rows (a 6-row micro-kernel wastes
# most of a tile on 1-4 filters, and is skinny up to a few dozen).  Depthwise layers
# (Cg == 1) are the main case.  Measured after the tiles kept their sums in registers
# (float32, batch 8 or 32, 3x3 unless said; im2col time / direct time, 1 and 2 threads):
#   grouped, forward: Cg = 16 at 56x56 (4 groups) 1.37 / 1.37, at 28x28 (8) 1.93 / 1.86,
#     at 14x14 (32) 1.89 / 1.76; Cg = 32 at 28x28 (8) 1.15 / 1.16, at 56x56 (2) 1.01 / 1.07.
#   grouped, backward (after conv_taps' rows also kept their sums in registers): Cg = 16
#     at 14x14 (32 groups) 1.35 / 1.33, at 56x56 (4) 1.13 / 1.13; Cg = 32 at 28x28 0.86 / 0.85.
#   ungrouped, forward, K = 32: C = 3, 8, 16 at 32x32 (batch 32) 1.52-1.66; C = 16 at 56x56
#     1.26 / 1.13; C = 32 at 28x28 1.27 / 1.65; C = 64 at 28x28 1.18 / 1.31; C = 3, 5x5 at
#     112x112 1.19 / 1.52.  With K = 64: C = 3, 7x7/2 at 224x224 (ResNet's stem, batch 1
#     and 8) 1.09-1.25; C = 4 or 8 at 56x56 0.89-1.09; C = 32 at 56x56 0.82 / 0.89.
#   ungrouped, backward: direct loses (0.65-0.94 for C = 16-64) but for C = 3 (1.09-1.18).
DIRECT_MAX_CG = 16              # grouped, backward
DIRECT_MAX_CG_FORWARD = 32      # grouped, forward
DIRECT_DENSE_MAX_K = 32         # ungrouped, forward: filters ...
DIRECT_DENSE_MAX_CG = 64        # ... and input channels up to these,
DIRECT_DENSE_FEW_C = 3          # or this few input channels (any K forward, and backward
DIRECT_DENSE_FEW_C_MAX_K = 64   # up to the K measured: its dx scratch grows with K),
DIRECT_DENSE_MAX_REACH = 7      # filters reaching at most 7 rows and columns (a band holds
                                # a filter's reach of input rows; dilation counted)


# Winograd (``_winograd``) for 3x3, stride-1, undilated, ungrouped layers.
#
# Error: |y_winograd - y| <= WINOGRAD_ERROR[m] * (C*9) * eps * max|x| * max|w| (plus the
# bias's rounding), the constant measured over C = 1, 8, 64, 256 on normal data, heavy-tailed
# trained-like data (Student t with 2 degrees of freedom, x scaled by 100 and w by 10) and
# two adversarial sets (all-positive values near 1e4 and 1e3; checkerboard signs at 1e3), in
# float32 against a float64 reference (tests/conv/test_winograd.py checks it).  Largest
# error / ((C*9) * eps * max|x| * max|w|) measured: im2col 4.9, F(2x2) 5.7, F(4x4) on the
# points 0, +-1, 1/2, -2: 10.7 (on normal data 0.10-0.32, against 0.35-0.74 for the points
# 0, +-1, +-2 of Lavin and Gray, whose worst case was 9.5).  The constants allow 1.5x on
# those.  F(4x4) is used in float32 only up to WINOGRAD_F4_MAX_C input channels (the range
# measured, where its constant is ~2x im2col's); above it F(2x2).  float64 always F(4x4).
WINOGRAD_ERROR = {2: 8.0, 4: 16.0}
WINOGRAD_F4_MAX_C = 256
# The built-in rule takes Winograd for layers with at least WINOGRAD_MIN_C input and
# output channels and at least WINOGRAD_MIN_TILES output tiles of 4x4 (N * ceil(P/4) *
# ceil(Q/4)): the filter transform (K*C*36 values per call) is paid whatever the batch, the
# saving grows with the tiles.  Measured here, float32, 2 threads, medians of 15 calls in
# random interleaved order (tools/bench_conv_inference.py --algorithm winograd,im2col,auto),
# ms winograd / im2col / torch:  C64 56x56 b8 (1568 tiles) 8.5 / 19.1 / 12.9;  C128 28x28
# b8 (392) 8.4 / 17.0 / 11.3;  C256 14x14 b8 (128) 8.0 / 16.9 / 11.2;  C64 56x56 b1 (196)
# 1.18 / 3.25 / 1.87;  C128 28x28 b1 (49) 0.98 / 2.79 / 2.21;  C256 14x14 b1 (16 tiles)
# 3.2 / 2.9 / 2.4, where the 2.4M transformed filter values (three blocks of filters within
# the 8 MiB cap) are most of the work.  This shared VM is noisy (the same call differed by
# up to 1.7x within a run); Winograd beat im2col on the first five layers in all five runs
# made, and never on the last.  Layers with fewer than 64 channels were not measured and
# stay on im2col.
WINOGRAD_MIN_C = 64
WINOGRAD_MIN_TILES = 32


def _winograd_tile(N, C, K, geom, groups, dt):
    """Winograd's tile size m for this layer, or None where it does not apply: 3x3 filters,
    stride 1, dilation 1, groups 1, and its transforms within the ``conv_workspace`` cap."""
    H, W, R, S, sh, sw, pt, pl, dh, dw, P, Q = geom
    if groups != 1 or (R, S, sh, sw, dh, dw) != (3, 3, 1, 1, 1, 1):
        return None
    m = 4 if (np.dtype(dt) == np.float64 or C <= WINOGRAD_F4_MAX_C) else 2
    if not _winograd.fits((H, W, pt, pl, P, Q), N, C, K, m, np.dtype(dt).itemsize,
                          *_sizes(), get_num_threads()):
        return None
    return m


def shape_key(pass_, dt, N, C, K, groups, geom):
    """The profile's key for one convolution shape and pass ("forward" or "backward"):
    everything that decides which algorithm is fastest (dtype, sizes, geometry), nothing
    else.  ``microtile.nn.tune`` records choices under it."""
    H, W, R, S, sh, sw, pt, pl, dh, dw, P, Q = geom
    return (f"{pass_} {np.dtype(dt).name} n{N} c{C} h{H} w{W} k{K} g{groups} r{R}x{S} "
            f"s{sh}x{sw} p{pt}x{pl} d{dh}x{dw} o{P}x{Q}")


def applicable(N, Cg, K, groups, geom, dt=np.float32):
    """The algorithms that compute this layer (every named one but "auto" that applies):
    im2col and direct always, Winograd on 3x3 stride-1 undilated ungrouped layers whose
    transforms fit the workspace cap (``_winograd_tile``)."""
    if geom is not None and _winograd_tile(N, Cg * groups, K, geom, groups, dt):
        return ("im2col", "direct", "winograd")
    return ("im2col", "direct")


def _rule(N, Cg, K, groups, geom, dt=np.float32, pass_="forward"):
    """The built-in choice for ``pass_`` ("forward" or "backward"): direct for depthwise
    layers and grouped ones with at most DIRECT_MAX_CG_FORWARD (forward) or DIRECT_MAX_CG
    (backward) input channels per group; Winograd for 3x3 stride-1 ungrouped layers with at
    least WINOGRAD_MIN_C channels in and out and WINOGRAD_MIN_TILES F(4x4) tiles (where it
    applies); direct for ungrouped layers with at most DIRECT_DENSE_FEW_C input channels,
    and for the forward of those with few filters (DIRECT_DENSE_*), filters reaching up to
    7x7 (not 1x1, which im2col reads in place); im2col + GEMM for the others."""
    forward = pass_ == "forward"
    if groups > 1 and Cg <= (DIRECT_MAX_CG_FORWARD if forward else DIRECT_MAX_CG):
        return "direct"
    P, Q = geom[10], geom[11]
    if (Cg >= WINOGRAD_MIN_C and K >= WINOGRAD_MIN_C
            and N * -(-P // 4) * -(-Q // 4) >= WINOGRAD_MIN_TILES
            and _winograd_tile(N, Cg * groups, K, geom, groups, dt)):
        return "winograd"
    R, S, dh, dw = geom[2], geom[3], geom[8], geom[9]
    reach_h, reach_w = (R - 1) * dh + 1, (S - 1) * dw + 1
    if (groups == 1 and R * S > 1 and max(reach_h, reach_w) <= DIRECT_DENSE_MAX_REACH
            and ((Cg <= DIRECT_DENSE_FEW_C and (forward or K <= DIRECT_DENSE_FEW_C_MAX_K))
                 or (forward and K <= DIRECT_DENSE_MAX_K and Cg <= DIRECT_DENSE_MAX_CG))):
        return "direct"
    return "im2col"


def _algorithm(pass_, dt, N, C, K, groups, geom):
    """The algorithm for one pass of a layer: ``config_context(conv_algorithm=...)`` when it
    names one that applies; else the profile's choice for this shape (``microtile.nn.tune``)
    when it names one that applies; else the built-in rule.

    A forced algorithm that does not apply to this layer (a Winograd kernel on a 5x5 layer,
    say) falls back to the rule rather than fail, so one setting can cover a whole model;
    a profile entry that names an unknown algorithm or one that does not apply is ignored
    the same way, so no profile can give a wrong result.  Empty problems (a zero size
    anywhere) always take the im2col driver, whose zero-size rules are the tested ones."""
    Cg = C // groups if groups else 0
    P, Q = geom[10], geom[11]
    if N == 0 or Cg == 0 or K == 0 or P == 0 or Q == 0:
        return "im2col"
    ok = applicable(N, Cg, K, groups, geom, dt)
    forced = get_option("conv_algorithm")
    if forced != "auto":
        if forced in ok:
            return forced
    else:
        tuned = conv_choice(shape_key(pass_, dt, N, C, K, groups, geom))
        if tuned in ok:
            return tuned
    return _rule(N, Cg, K, groups, geom, dt, pass_)


def _weight_rows(Wt, dt):
    """w (K, Cg, R, S) as the C-contiguous (K, Cg·R·S) matrix the direct kernel reads (a view
    of a C-contiguous w, else a copy of w's logical size)."""
    return np.ascontiguousarray(as_dtype(Wt, dt)).reshape(Wt.shape[0], -1)


def _weight_matrix(Wt, dt):
    """w (K, C // groups, R, S) as the (K, C·R·S) matrix the GEMM reads: a view whenever its
    strides allow one (C-contiguous weights, broadcast ones such as ``np.broadcast_to(v,
    shape)``, slices along K), so no copy is made; otherwise a C-contiguous copy.  That copy
    has w's logical size: no more than w's own memory for an ordinary array, more only for
    a view broadcast along some but not all of C, R, S, which no matrix view can describe."""
    K = Wt.shape[0]
    crs = Wt.shape[1] * Wt.shape[2] * Wt.shape[3]
    W = as_dtype(Wt, dt)
    try:
        return np.reshape(W, (K, crs), copy=False)
    except ValueError:
        return np.ascontiguousarray(W).reshape(K, crs)


def _setup(what, X, Wt, stride, padding, dilation, groups):
    """Validate shapes and arguments; return (x as 4-D, unbatched, geometry, groups, K, P, Q)."""
    X4, unbatched = as_nchw(X, "x", what)
    if Wt.ndim != 4:
        raise ValueError(f"{what}: w must be 4-D (K, C // groups, R, S), got shape {Wt.shape}")
    groups = count(groups, "groups", what)
    N, C, H, W = X4.shape
    K, Cg, R, S = Wt.shape
    if C % groups:
        raise ValueError(f"{what}: x has {C} channels, which groups={groups} does not divide")
    if K % groups:
        raise ValueError(f"{what}: w has {K} output channels (shape {Wt.shape}), which "
                         f"groups={groups} does not divide")
    if Cg * groups != C:
        raise ValueError(f"{what}: w of shape {Wt.shape} with groups={groups} expects "
                         f"{Cg * groups} input channels, but x of shape {X.shape} has {C}")
    if R < 1 or S < 1:
        raise ValueError(f"{what}: kernel size must be positive, w has shape {Wt.shape}")
    sh, sw = pair(stride, "stride")
    dh, dw = pair(dilation, "dilation")
    (pt, pb), (pl, pr) = conv_padding(padding, (R, S), (sh, sw), (dh, dw))
    P = out_size(H, R, pt, pb, sh, dh, what, "height")
    Q = out_size(W, S, pl, pr, sw, dw, what, "width")
    check_result((N, K, P, Q), np.result_type(X4.dtype, Wt.dtype), what)
    geom = (H, W, R, S, sh, sw, pt, pl, dh, dw, P, Q)
    return X4, unbatched, geom, groups, K, P, Q


def conv2d(x, w, bias=None, *, stride=1, padding=0, dilation=1, groups=1, out=None):
    """2-D convolution (cross-correlation), as ``torch.nn.functional.conv2d``.

    Parameters
    ----------
    x : array_like, (N, C, H, W) or (C, H, W), float32 or float64
        Input, any memory layout.
    w : array_like, (K, C // groups, R, S)
        Filters.
    bias : array_like, (K,), optional
        Added to every output position of its channel.
    stride, dilation : int or (int, int)
        Positive.
    padding : int, (int, int), "valid" or "same"
        Zero padding on both sides; "same" (stride 1 only) keeps H and W, putting an odd
        extra row or column at the bottom or right, as PyTorch does.
    groups : int
        Channels are split into this many independent groups; must divide C and K.
    out : ndarray, optional
        (N, K, P, Q) array of the result dtype to write to; may not overlap an input.

    Returns
    -------
    ndarray
        (N, K, P, Q) (or (K, P, Q) for an unbatched input); float64 if any input is float64.

    Raises
    ------
    TypeError
        For a dtype other than float32/float64 or a non-integer argument.
    ValueError
        For wrong ranks, a channel/group mismatch, non-positive stride or dilation, negative
        padding, a kernel larger than the padded input, or a bad ``out``.

    Notes
    -----
    Three algorithms; ``config_context(conv_algorithm=...)`` picks one, else the profile's
    choice for the layer's shape (``microtile.nn.tune``), else the built-in rule: the direct
    kernel for depthwise layers, grouped ones with at most 32 input channels per group (16
    in the backward pass), and ungrouped ones with filters up to 7x7 and at most 3 input
    channels or (forward) at most 32 filters; Winograd for the 3x3 stride-1 ungrouped
    layers with at least 64 channels in and out and enough output (``WINOGRAD_MIN_TILES``
    4x4 tiles); im2col + GEMM for the others (``_rule`` has the measurements).

    Winograd F(4x4, 3x3) (F(2x2, 3x3) in float32 above 256 input channels) applies only to
    3x3, stride-1, undilated, ungrouped layers; forced on any other layer, the built-in rule
    chooses instead.  Its error is at most ``WINOGRAD_ERROR[m] * (C*9) * eps * max|x| *
    max|w|`` (measured constants; see ``convolution.WINOGRAD_ERROR``), a few times that of
    im2col.  Its transforms use at most ``conv_workspace`` bytes (the transformed filters,
    by blocks of filters when needed, and one chunk of transformed tiles); a layer that
    does not fit, or whose transforms meet Inf or NaN, is computed on im2col.

    im2col + GEMM per group, in chunks whose columns fit ``conv_workspace`` bytes (see
    ``config_context``) whatever the geometry: when fewer than a few output positions'
    columns fit in it, the depth is cut too.  Beyond the cap and the result, memory goes only to
    copies of operands that cannot be read as they are: x or w converted when their dtypes
    differ (a broadcast view stays one), w copied when its strides do not describe a
    (K, C·R·S) matrix (as large as w; more than w's own memory only for a view broadcast
    along some but not all of C, R, S), and w with the bias as one more column when that
    costs at most a quarter of the output.

    The direct kernel copies a band of each input plane at a time with its padding (about
    128 KiB per thread; more only when the rows a single output row reads are larger) and
    reads every filter tap from it, vectorised along the output width; threads take (image,
    group, band) units.  Memory beyond the result: that per-thread band, and a C-contiguous
    copy of w when it is not one.
    """
    X = as_float_array(x, "x")
    Wt = as_float_array(w, "w")
    B = None if bias is None else as_float_array(bias, "bias")
    X4, unbatched, geom, groups, K, P, Q = _setup("conv2d", X, Wt, stride, padding, dilation,
                                                  groups)
    if B is not None and B.shape != (K,):
        raise ValueError(f"conv2d: bias must have shape ({K},) to match w of shape {Wt.shape}, "
                         f"got {B.shape}")
    dt = result_dtype((X, Wt, B))
    N = X4.shape[0]
    shape4 = (N, K, P, Q)
    shape = shape4[1:] if unbatched else shape4
    O = None
    if out is not None:
        O = check_out(out, shape, dt)
        for name, arr in (("x", X), ("w", Wt), ("bias", B)):
            if arr is not None and overlaps(O, arr):
                raise ValueError(f"conv2d: out overlaps {name}")
    X4 = as_dtype(X4, dt)
    # Written in place when out is what the drivers write (C order, native, aligned); else
    # the result is computed apart and copied in (as NumPy does for a byte-swapped out).
    in_place = (O is not None and O.flags.c_contiguous and O.flags.aligned
                and O.dtype.isnative)
    Y = O.reshape(shape4) if in_place else np.empty(shape4, dtype=dt)
    algorithm = _algorithm("forward", dt, N, X4.shape[1], K, groups, geom)
    if algorithm == "winograd" and _conv_winograd(X4, as_dtype(Wt, dt), B, Y, geom, dt):
        pass
    elif algorithm == "direct":
        _direct.forward(X4, _weight_rows(Wt, dt), None if B is None else
                        np.ascontiguousarray(B, dtype=dt), Y, geom, groups)
    else:
        _conv_im2col(X4, Wt, B, Y, geom, groups, dt)
    if O is not None:
        if not in_place:
            O[...] = Y.reshape(shape)
        return O
    return Y[0] if unbatched else Y


def _conv_winograd(X4, Wt, B, Y, geom, dt):
    """conv2d's Winograd path into Y (N, K, P, Q), C-contiguous; False (Y undefined) when
    the caller is to compute it on im2col instead: a transform made Inf or NaN (one in a
    tile's input spreads to all its outputs, where the direct sum may have a number), or
    the layer did not fit the workspace after all."""
    H, W, R, S, sh, sw, pt, pl, dh, dw, P, Q = geom
    m = _winograd_tile(X4.shape[0], X4.shape[1], Wt.shape[0], geom, 1, dt)
    if m is None:
        return False
    Bc = None if B is None else np.ascontiguousarray(B, dtype=dt)
    return _winograd.forward(X4, Wt, Bc, Y, (H, W, pt, pl, P, Q), m,
                             *_sizes()) == _winograd.OK


def _conv_im2col(X4, Wt, B, Y, geom, groups, dt):
    """conv2d's im2col + GEMM path into Y (N, K, P, Q), C-contiguous."""
    N, K = Y.shape[0], Y.shape[1]
    P, Q = Y.shape[2], Y.shape[3]
    crs = Wt.shape[1] * Wt.shape[2] * Wt.shape[3]
    # The bias rides in the GEMM as one more weight column when copying the weights costs
    # little next to the output (at most a quarter of it); otherwise it is added to the
    # output and the weights are read in place where their strides allow.
    bias_col = B is not None and 4 * crs <= N * P * Q
    Bc = None
    if bias_col:
        Wm = np.empty((K, crs + 1), dtype=dt)
        Wm[:, :crs] = _weight_matrix(Wt, dt)
        Wm[:, crs] = B
    else:
        Wm = _weight_matrix(Wt, dt)
        if B is not None:
            Bc = np.ascontiguousarray(B, dtype=dt)
    _conv.conv2d_forward(X4, Wm, Bc, Y, geom, groups, bias_col, *_sizes())


def conv2d_backward(dy, x, w, *, stride=1, padding=0, dilation=1, groups=1,
                    need_input_grad=True, need_bias_grad=True, _dx=None, _dw=None, _db=None):
    """Gradients of ``sum(dy * conv2d(x, w, b, ...))`` with respect to x, w and b.

    Parameters
    ----------
    dy : array_like, (N, K, P, Q)
        Gradient of the loss with respect to the convolution's output.
    x, w, stride, padding, dilation, groups
        As given to ``conv2d``.
    need_input_grad, need_bias_grad : bool
        Skip the work for ``dx`` / ``db`` when False.

    Returns
    -------
    (dx, dw, db) : tuple
        ``dx`` shaped like x (None unless ``need_input_grad``), ``dw`` shaped like w, ``db``
        of shape (K,) (None unless ``need_bias_grad``).  float64 if any input is float64.

    Raises
    ------
    TypeError, ValueError
        As ``conv2d``; ValueError too when dy's shape is not the convolution's output shape.

    Notes
    -----
    The algorithm is chosen as in ``conv2d``, except that weights holding Inf or NaN take
    im2col when dx is wanted (the direct dx would also multiply them by dy's zero padding,
    giving NaN where the gradient is a number or Inf).  On the direct kernel, dx is the
    transposed convolution split by the phase of its elements modulo the stride (each phase
    a stride-1 correlation of dy with the taps that reach it), dw and db are sums over the
    image per thread in double, added up in thread order; memory beyond the results: the
    per-thread band of ``conv2d`` and (threads x (K·C/groups·R·S + K)) doubles.

    On im2col + GEMM the columns stay within ``conv_workspace`` as in ``conv2d``.  Other
    memory: the results,
    one dW-sized partial per thread that works on its own chunks (summed into dw at the end;
    a single one when the threads work inside the GEMMs), a C-ordered copy of dy unless it
    is one already (dy is as large as the forward's output), and the weight copies
    ``conv2d`` describes.
    """
    DY = as_float_array(dy, "dy")
    X = as_float_array(x, "x")
    Wt = as_float_array(w, "w")
    X4, unbatched, geom, groups, K, P, Q = _setup("conv2d_backward", X, Wt, stride, padding,
                                                  dilation, groups)
    N = X4.shape[0]
    want = (K, P, Q) if unbatched else (N, K, P, Q)
    if DY.shape != want:
        raise ValueError(f"conv2d_backward: dy has shape {DY.shape}, but the convolution of x "
                         f"{X.shape} with w {Wt.shape} has output shape {want}")
    dt = result_dtype((DY, X, Wt))
    DY4 = np.ascontiguousarray(as_dtype(DY, dt)).reshape((N, K, P, Q))
    X4 = as_dtype(X4, dt)
    crs = Wt.shape[1] * Wt.shape[2] * Wt.shape[3]
    what = "conv2d_backward"
    dx_out = reuse_out(_dx, X4.shape, dt, what, "_dx") if need_input_grad else None
    dw_out = reuse_out(_dw, Wt.shape, dt, what, "_dw")
    db_out = reuse_out(_db, (K,), dt, what, "_db") if need_bias_grad else None
    algorithm = _algorithm("backward", dt, N, X4.shape[1], K, groups, geom)
    if algorithm == "winograd":
        return _backward_winograd(DY4, X4, Wt, geom, dt, unbatched, bool(need_input_grad),
                                  bool(need_bias_grad), dx_out, dw_out, db_out)
    if algorithm == "direct":
        Wc = _weight_rows(Wt, dt)
        # The direct dx multiplies every weight by dy's zero padding too, a product col2im
        # never forms: an Inf or NaN weight would give NaN where torch gives Inf or a number.
        if need_input_grad and not _direct.all_finite(Wc):
            algorithm = "im2col"
    if algorithm == "direct":
        # Every element of the results is written: fresh ones need no clearing.
        dx = None
        if need_input_grad:
            dx = np.empty(X4.shape, dtype=dt) if dx_out is None else dx_out
        dw = np.empty(Wt.shape, dtype=dt) if dw_out is None else dw_out
        db = None
        if need_bias_grad:
            db = np.empty(K, dtype=dt) if db_out is None else db_out
        _direct.backward(DY4, X4, Wc, geom, groups, True,
                         bool(need_input_grad), bool(need_bias_grad), dx, dw.reshape(K, crs),
                         db)
        if dx is not None and unbatched:
            dx = dx[0]
        return dx, dw, db
    Wm = _weight_matrix(Wt, dt)
    dx, dwm, db = _conv.conv2d_backward(DY4, X4, Wm, geom, groups, True,
                                        bool(need_input_grad), bool(need_bias_grad),
                                        *_sizes(), dx_out,
                                        None if dw_out is None else dw_out.reshape(K, crs),
                                        db_out)
    dw = dwm.reshape(Wt.shape)
    if dx is not None and unbatched:
        dx = dx[0]
    return dx, dw, db


def _backward_winograd(DY4, X4, Wt, geom, dt, unbatched, need_x, need_b, dx_out, dw_out,
                       db_out):
    """conv2d_backward when the rule chose Winograd: dx is the stride-1 3x3 correlation of
    dy with the weights flipped and transposed (K <-> C), its padding 2 - p (a negative one
    crops), run on the Winograd forward; dw and db stay on im2col (their GEMMs have depth
    N*P*Q, no 3x3 structure to exploit on the output side)."""
    H, W, R, S, sh, sw, pt, pl, dh, dw, P, Q = geom
    N, K = DY4.shape[0], DY4.shape[1]
    C = X4.shape[1]
    crs = C * 9
    dx = None
    if need_x:
        dx = np.empty(X4.shape, dtype=dt) if dx_out is None else dx_out
        # A view: w'[c, k, r, s] = w[k, c, 2 - r, 2 - s].
        Wf = as_dtype(Wt, dt).transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]
        geom_t = (P, Q, 3, 3, 1, 1, 2 - pt, 2 - pl, 1, 1, H, W)
        if not _conv_winograd(DY4, Wf, None, dx, geom_t, dt):
            dx = None
    Wm = _weight_matrix(Wt, dt)
    # im2col computes dx too when Winograd could not (Inf or NaN in dy or w).
    dx2, dwm, db = _conv.conv2d_backward(DY4, X4, Wm, geom, 1, True, need_x and dx is None,
                                         need_b, *_sizes(),
                                         dx_out if need_x and dx is None else None,
                                         None if dw_out is None else dw_out.reshape(K, crs),
                                         db_out)
    if need_x and dx is None:
        dx = dx2
    if dx is not None and unbatched:
        dx = dx[0]
    return dx, dwm.reshape(Wt.shape), db


def _unfold_args(kernel_size, stride, padding, dilation):
    R, S = pair(kernel_size, "kernel_size")
    sh, sw = pair(stride, "stride")
    dh, dw = pair(dilation, "dilation")
    if isinstance(padding, str):
        raise TypeError(f"padding must be an int or a pair of ints, got {padding!r}")
    ph, pw = pair(padding, "padding", minimum=0)
    return R, S, sh, sw, dh, dw, ph, pw


def im2col(x, kernel_size, *, stride=1, padding=0, dilation=1):
    """Sliding windows of x as columns, as ``torch.nn.functional.unfold``.

    Parameters
    ----------
    x : array_like, (N, C, H, W) or (C, H, W)
    kernel_size, stride, dilation : int or (int, int), positive
    padding : int or (int, int), non-negative

    Returns
    -------
    ndarray
        (N, C*R*S, P*Q) (or (C*R*S, P*Q) unbatched); row (c, r, s) holds, for every output
        position, the input element under kernel tap (r, s) of channel c (zero in padding).
    """
    X = as_float_array(x, "x")
    R, S, sh, sw, dh, dw, ph, pw = _unfold_args(kernel_size, stride, padding, dilation)
    X4, unbatched = as_nchw(X, "x", "im2col")
    N, C, H, W = X4.shape
    P = out_size(H, R, ph, ph, sh, dh, "im2col", "height")
    Q = out_size(W, S, pw, pw, sw, dw, "im2col", "width")
    check_result((N, C * R * S, P * Q), X.dtype, "im2col")
    cols = np.empty((N, C * R * S, P * Q), dtype=X.dtype)
    _im2col.im2col_into(X4, cols, (H, W, R, S, sh, sw, ph, pw, dh, dw, P, Q),
                        get_num_threads())
    return cols[0] if unbatched else cols


def col2im(cols, output_size, kernel_size, *, stride=1, padding=0, dilation=1):
    """Sum columns back into an image, as ``torch.nn.functional.fold`` (im2col's adjoint).

    Parameters
    ----------
    cols : array_like, (N, C*R*S, L) or (C*R*S, L)
        L must be the number of window positions P*Q for ``output_size``.
    output_size : int or (int, int)
        (H, W) of the image.
    kernel_size, stride, padding, dilation
        As for ``im2col``.

    Returns
    -------
    ndarray
        (N, C, H, W) (or (C, H, W)): every column element added at its input position, so
        overlapping windows are summed.
    """
    Cm = as_float_array(cols, "cols")
    R, S, sh, sw, dh, dw, ph, pw = _unfold_args(kernel_size, stride, padding, dilation)
    H, W = pair(output_size, "output_size", minimum=0)
    if Cm.ndim == 2:
        Cm3, unbatched = Cm[None], True
    elif Cm.ndim == 3:
        Cm3, unbatched = Cm, False
    else:
        raise ValueError(f"col2im: cols must be 3-D (N, C*R*S, L) or 2-D, got shape {Cm.shape}")
    N, CRS, L = Cm3.shape
    if CRS % (R * S):
        raise ValueError(f"col2im: cols has {CRS} rows, not a multiple of the kernel's "
                         f"{R}x{S} = {R * S} taps")
    C = CRS // (R * S)
    P = out_size(H, R, ph, ph, sh, dh, "col2im", "height")
    Q = out_size(W, S, pw, pw, sw, dw, "col2im", "width")
    if L != P * Q:
        raise ValueError(f"col2im: cols has {L} columns, but output_size {(H, W)} with kernel "
                         f"{(R, S)} gives {P}x{Q} = {P * Q} window positions")
    check_result((N, C, H, W), Cm.dtype, "col2im")
    out = np.zeros((N, C, H, W), dtype=Cm.dtype)
    _im2col.col2im_into(_rows_contiguous(Cm3), out, (H, W, R, S, sh, sw, ph, pw, dh, dw, P, Q),
                        get_num_threads())
    return out[0] if unbatched else out


def _rows_contiguous(cols):
    """``cols`` (N, rows, L) with unit stride along L, as the col2im kernel reads it: itself
    when it has that already (any strides between rows and images, 0 included), else a copy
    of the distinct rows only (a view broadcast over images or rows stays broadcast)."""
    if cols.shape[2] <= 1 or cols.strides[2] == cols.itemsize:
        return cols
    core = cols[tuple(slice(0, 1) if st == 0 and n > 1 else slice(None)
                      for st, n in zip(cols.strides[:2], cols.shape[:2]))]
    return np.broadcast_to(np.ascontiguousarray(core), cols.shape)
