"""MaxPool2d and AvgPool2d: torch's pooling layers on microtile's pooling functions."""
import numpy as np

from microtile.nn._dtypes import as_grad
from microtile._common._checks import as_float_array
from microtile.conv._nchw import out_size
from microtile.nn._conv import pair
from microtile.conv.pooling import (avg_pool2d, avg_pool2d_backward, max_pool2d,
                                    max_pool2d_backward)
from microtile.nn._module import Module, per_thread


class _Pool2d(Module):
    # What forward saves for backward, per thread (see ``Module``).
    _x = per_thread()
    _idx = per_thread()
    _y_shape = per_thread()

    def __init__(self, kernel_size, stride=None, padding=0):
        owner = type(self).__name__
        self.kernel_size = pair(kernel_size, "kernel_size", owner, 1)
        self.stride = self.kernel_size if stride is None else pair(stride, "stride", owner, 1)
        self.padding = pair(padding, "padding", owner, 0)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"{owner}: padding {self.padding} must be at most half the kernel "
                             f"size {self.kernel_size}")

    def _check(self, x):
        x = as_float_array(x, "x")
        if x.ndim != 4:
            raise ValueError(f"{self!r}: input has shape {x.shape}, expected (N, C, H, W)")
        return x

    def output_shape(self, input_shape):
        """(N, C, P, Q) for an (N, C, H, W) input; ValueError when the window does not fit."""
        n, c, h, w = input_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (n, c, out_size(h, kh, ph, ph, sh, 1, repr(self), "height"),
                out_size(w, kw, pw, pw, sw, 1, repr(self), "width"))

    def __repr__(self):
        return (f"{type(self).__name__}(kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding})")

    def _incoming(self, dy):
        """dy checked against the last forward (RuntimeError when there was none)."""
        if self._x is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        return as_grad(dy, self._x.dtype, self._y_shape, self)


class MaxPool2d(_Pool2d):
    """Maximum over windows, as ``torch.nn.MaxPool2d`` (ceil_mode False).

    Parameters
    ----------
    kernel_size : int or (int, int)
    stride : int, (int, int) or None
        Defaults to ``kernel_size``.
    padding : int or (int, int)
        Implicit -inf padding (never chosen as a maximum); at most half the kernel.
    """

    def forward(self, x):
        x = self._check(x)
        shape = self.output_shape(x.shape)
        y, idx = max_pool2d(x, self.kernel_size, self.stride, self.padding,
                            return_indices=True,
                            _out=self._buffer("y", shape, x.dtype),
                            _indices=self._buffer("idx", shape, np.int64))
        self._x = x
        self._idx = idx
        self._y_shape = y.shape
        return y

    def backward(self, dy, *, need_input_grad=True):
        dy = self._incoming(dy)
        if not need_input_grad:
            return None
        return max_pool2d_backward(dy, self._x, self.kernel_size, self.stride,
                                   self.padding, indices=self._idx,
                                   _dx=self._buffer("dx", self._x.shape, dy.dtype))


class AvgPool2d(_Pool2d):
    """Mean over windows, as ``torch.nn.AvgPool2d`` (count_include_pad True by default).

    Parameters
    ----------
    kernel_size : int or (int, int)
    stride : int, (int, int) or None
        Defaults to ``kernel_size``.
    padding : int or (int, int)
    count_include_pad : bool
        Whether zero padding counts in the divisor.
    """

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad=True):
        super().__init__(kernel_size, stride, padding)
        self.count_include_pad = bool(count_include_pad)

    def forward(self, x):
        x = self._check(x)
        y = avg_pool2d(x, self.kernel_size, self.stride, self.padding,
                       count_include_pad=self.count_include_pad,
                       _out=self._buffer("y", self.output_shape(x.shape), x.dtype))
        self._x = x
        self._y_shape = y.shape
        return y

    def backward(self, dy, *, need_input_grad=True):
        dy = self._incoming(dy)
        if not need_input_grad:
            return None
        return avg_pool2d_backward(dy, self._x.shape, self.kernel_size, self.stride,
                                   self.padding, count_include_pad=self.count_include_pad,
                                   _dx=self._buffer("dx", self._x.shape, dy.dtype))
