"""Public 2-D pooling functions (NCHW, PyTorch's semantics with ceil_mode=False).

Argument rules here; the plane kernels live in ``_pooling``.
"""
import numpy as np

from microtile.conv import _pooling
from microtile._common._checks import as_float_array, as_dtype, result_dtype
from microtile._config._context import get_num_threads
from microtile.conv._nchw import as_nchw, check_result, out_size, pair, reuse_out, shape_arg

__all__ = ["max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward"]


def _pool_args(what, shape, kernel_size, stride, padding):
    """Geometry tuple (H, W, kh, kw, sh, sw, ph, pw, P, Q) for an input of ``shape`` (4-D)."""
    kh, kw = pair(kernel_size, "kernel_size")
    sh, sw = (kh, kw) if stride is None else pair(stride, "stride")
    if isinstance(padding, str):
        raise TypeError(f"{what}: padding must be an int or a pair of ints, got {padding!r}")
    ph, pw = pair(padding, "padding", minimum=0)
    if 2 * ph > kh or 2 * pw > kw:
        raise ValueError(f"{what}: padding {(ph, pw)} must be at most half the kernel size "
                         f"{(kh, kw)}")
    H, W = shape[2], shape[3]
    if H == 0 or W == 0:
        # Every window would hold padding only: no maximum (and no index) to give, no
        # average of nothing.  PyTorch refuses such an input too.
        raise ValueError(f"{what}: the input planes are empty ({H}x{W}, input shape "
                         f"{tuple(shape)}); pooling needs a height and width of at least 1")
    P = out_size(H, kh, ph, ph, sh, 1, what, "height")
    Q = out_size(W, kw, pw, pw, sw, 1, what, "width")
    return (H, W, kh, kw, sh, sw, ph, pw, P, Q)


def _zeroed(arr, shape, dt, what):
    """A zero (shape, dt) array to add gradients into: ``arr`` cleared in place when given."""
    if arr is None:
        return np.zeros(shape, dtype=dt)
    arr = reuse_out(arr, shape, dt, what, "_dx")
    arr.fill(0)
    return arr


def _dy4(what, dy, out_shape, unbatched, dt):
    DY = as_float_array(dy, "dy")
    want = out_shape[1:] if unbatched else out_shape
    if DY.shape != want:
        raise ValueError(f"{what}: dy has shape {DY.shape}; the pooling output has shape {want}")
    return DY, np.ascontiguousarray(as_dtype(DY, dt)).reshape(out_shape)


def max_pool2d(x, kernel_size, stride=None, padding=0, *, return_indices=False, _out=None,
               _indices=None):
    """2-D max pooling, as ``torch.nn.functional.max_pool2d`` (ceil_mode=False).

    Parameters
    ----------
    x : array_like, (N, C, H, W) or (C, H, W), float32 or float64
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to ``kernel_size``.
    padding : int or (int, int)
        Implicit -inf padding, at most half the kernel size; it never wins.
    return_indices : bool
        Also return, for each output, the flat index ``h * W + w`` of the chosen maximum in
        its (H, W) plane (int64).

    Returns
    -------
    ndarray or (ndarray, ndarray)
        (N, C, P, Q) maxima, plus the indices when asked.  Ties go to the first maximum in
        row-major order; a NaN in a window makes the output NaN.
    """
    X = as_float_array(x, "x")
    X4, unbatched = as_nchw(X, "x", "max_pool2d")
    geom = _pool_args("max_pool2d", X4.shape, kernel_size, stride, padding)
    shape = X4.shape[:2] + geom[8:]
    y = reuse_out(_out, shape, X.dtype, "max_pool2d", "_out")
    if y is None:
        y = np.empty(shape, dtype=X.dtype)
    idx = None
    if return_indices:
        idx = reuse_out(_indices, shape, np.int64, "max_pool2d", "_indices")
        if idx is None:
            idx = np.empty(shape, dtype=np.int64)
    _pooling.max_pool_into(X4, y, idx, geom, get_num_threads())
    if unbatched:
        y = y[0]
        idx = idx[0] if idx is not None else None
    return (y, idx) if return_indices else y


def max_pool_offsets(x, kernel_size, stride, padding, y, offsets):
    """Private (``nn.MaxPool2d``): ``max_pool2d`` of a 4-D x into y, each winner kept in
    ``offsets`` (uint8, y's shape, C-contiguous) as its offset r*kw + s in its window, for
    windows of at most 256 elements."""
    X4 = as_float_array(x, "x")
    geom = _pool_args("max_pool2d", X4.shape, kernel_size, stride, padding)
    _pooling.max_pool_into(X4, y, None, geom, get_num_threads(), offsets)
    return y


def max_pool_offsets_backward(dy, offsets, kernel_size, stride, padding, dx):
    """Private (``nn.MaxPool2d``): the gradient of ``max_pool_offsets`` into dx (x's shape
    and dtype, C-contiguous; zeroed here) from the offsets it wrote."""
    geom = _pool_args("max_pool2d_backward", dx.shape, kernel_size, stride, padding)
    dy4 = np.ascontiguousarray(dy, dtype=dx.dtype)
    # Zeroed, then one add per output: a pass that wrote all of dx at once (dy at the
    # winner, 0 elsewhere) measured 3x slower (42 against 14 ms, 2x2/2 on (32,64,112,112)).
    dx.fill(0)
    _pooling.max_pool_backward_into(dy4, None, None, dx, geom, get_num_threads(), offsets)
    return dx


def max_pool2d_backward(dy, x, kernel_size, stride=None, padding=0, *, indices=None,
                        _dx=None):
    """Gradient of ``max_pool2d`` with respect to x.

    Parameters
    ----------
    dy : array_like
        Gradient with respect to the pooling output.
    x, kernel_size, stride, padding
        As given to ``max_pool2d``.
    indices : array_like of ints, optional
        The indices ``max_pool2d(..., return_indices=True)`` returned; when omitted the
        maxima are found again in x (same choice, first in row-major order on ties).

    Returns
    -------
    ndarray
        Shaped like x: each dy element added at the position of its window's maximum.
    """
    X = as_float_array(x, "x")
    X4, unbatched = as_nchw(X, "x", "max_pool2d_backward")
    geom = _pool_args("max_pool2d_backward", X4.shape, kernel_size, stride, padding)
    out_shape = X4.shape[:2] + geom[8:]
    dt = result_dtype((as_float_array(dy, "dy"), X))
    DY, dy4 = _dy4("max_pool2d_backward", dy, out_shape, unbatched, dt)
    idx = None
    if indices is not None:
        I = np.asarray(indices)
        if I.dtype.kind not in "iu":
            raise TypeError(f"max_pool2d_backward: indices must be integers, got {I.dtype}")
        if I.shape != DY.shape:
            raise ValueError(f"max_pool2d_backward: indices have shape {I.shape}; dy has "
                             f"shape {DY.shape}")
        if I.size and (I.min() < 0 or I.max() >= geom[0] * geom[1]):
            raise ValueError(f"max_pool2d_backward: indices must lie in [0, {geom[0] * geom[1]})"
                             f" for an input plane of {geom[0]}x{geom[1]}")
        idx = np.ascontiguousarray(I, dtype=np.int64).reshape(out_shape)
    dx = _zeroed(_dx, X4.shape, dt, "max_pool2d_backward")
    _pooling.max_pool_backward_into(dy4, idx, None if idx is not None else as_dtype(X4, dt), dx,
                                    geom, get_num_threads())
    return dx[0] if unbatched else dx


def avg_pool2d(x, kernel_size, stride=None, padding=0, *, count_include_pad=True, _out=None):
    """2-D average pooling, as ``torch.nn.functional.avg_pool2d`` (ceil_mode=False).

    Parameters
    ----------
    x : array_like, (N, C, H, W) or (C, H, W), float32 or float64
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to ``kernel_size``.
    padding : int or (int, int)
        Zero padding, at most half the kernel size.
    count_include_pad : bool
        Divide by the full window size (True) or by the number of real elements (False).

    Returns
    -------
    ndarray
        (N, C, P, Q).
    """
    X = as_float_array(x, "x")
    X4, unbatched = as_nchw(X, "x", "avg_pool2d")
    geom = _pool_args("avg_pool2d", X4.shape, kernel_size, stride, padding)
    y = reuse_out(_out, X4.shape[:2] + geom[8:], X.dtype, "avg_pool2d", "_out")
    if y is None:
        y = np.empty(X4.shape[:2] + geom[8:], dtype=X.dtype)
    _pooling.avg_pool_into(X4, y, bool(count_include_pad), geom, get_num_threads())
    return y[0] if unbatched else y


def avg_pool2d_backward(dy, input_shape, kernel_size, stride=None, padding=0, *,
                        count_include_pad=True, _dx=None):
    """Gradient of ``avg_pool2d`` with respect to its input.

    Parameters
    ----------
    dy : array_like
        Gradient with respect to the pooling output.
    input_shape : tuple of ints
        Shape of the pooled input, (N, C, H, W) or (C, H, W).
    kernel_size, stride, padding, count_include_pad
        As given to ``avg_pool2d``.

    Returns
    -------
    ndarray
        Of ``input_shape`` and dy's dtype: each dy element spread evenly over its window.
    """
    shape = shape_arg(input_shape, "input_shape", "avg_pool2d_backward", (4, 3))
    check_result(shape, as_float_array(dy, "dy").dtype, "avg_pool2d_backward")
    unbatched = len(shape) == 3
    shape4 = (1,) + shape if unbatched else shape
    geom = _pool_args("avg_pool2d_backward", shape4, kernel_size, stride, padding)
    dt = as_float_array(dy, "dy").dtype
    _, dy4 = _dy4("avg_pool2d_backward", dy, shape4[:2] + geom[8:], unbatched, dt)
    dx = _zeroed(_dx, shape4, dt, "avg_pool2d_backward")
    _pooling.avg_pool_backward_into(dy4, dx, bool(count_include_pad), geom, get_num_threads())
    return dx[0] if unbatched else dx
