"""MaxPool2d, AvgPool2d and AdaptiveAvgPool2d: torch's pooling layers."""
import math

import numpy as np

from microtile.nn._dtypes import as_grad
from microtile._common._checks import as_float_array
from microtile.conv._nchw import out_size
from microtile.nn._conv import pair
from microtile.conv.pooling import (avg_pool2d, avg_pool2d_backward, max_pool2d,
                                    max_pool2d_backward, max_pool_offsets,
                                    max_pool_offsets_backward)
from microtile.nn._module import Module, check_int, per_thread
from microtile.nn._pool_kernels import adaptive_avg_pool2d


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
        y = self._buffer("y", shape, x.dtype)
        if self.kernel_size[0] * self.kernel_size[1] <= 256:
            # Each winner kept as its offset in the window, one byte per output (an int64
            # index is eight, and the public indices' check reads them twice more).
            idx = self._buffer("off", shape, np.uint8)
            max_pool_offsets(x, self.kernel_size, self.stride, self.padding, y, idx)
        else:
            y, idx = max_pool2d(x, self.kernel_size, self.stride, self.padding,
                                return_indices=True, _out=y,
                                _indices=self._buffer("idx", shape, np.int64))
        self._x = x
        self._idx = idx
        self._y_shape = y.shape
        return y

    def backward(self, dy, *, need_input_grad=True):
        dy = self._incoming(dy)
        if not need_input_grad:
            return None
        dx = self._buffer("dx", self._x.shape, dy.dtype)
        if self._idx.dtype == np.uint8:
            return max_pool_offsets_backward(dy, self._idx, self.kernel_size, self.stride,
                                             self.padding, dx)
        return max_pool2d_backward(dy, self._x, self.kernel_size, self.stride,
                                   self.padding, indices=self._idx, _dx=dx)


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


class AdaptiveAvgPool2d(Module):
    """Mean over torch's adaptive bins to a fixed output size, as
    ``torch.nn.AdaptiveAvgPool2d``: (N, C, H, W) or (C, H, W) -> (..., P, Q).

    Output row i averages input rows ``floor(i*H/P)`` to ``ceil((i+1)*H/P)`` (exclusive),
    and likewise for columns, so the bins cover the input and overlap when P does not
    divide H.  ``AdaptiveAvgPool2d(1)`` is global average pooling.

    Parameters
    ----------
    output_size : int or (int or None, int or None)
        (P, Q); None keeps that input dimension.
    """

    # The last forward's shapes, per thread (see ``Module``).
    _in_shape = per_thread()
    _out_shape = per_thread()
    _dtype = per_thread()

    def __init__(self, output_size):
        owner = "AdaptiveAvgPool2d"
        if isinstance(output_size, (tuple, list)):
            if len(output_size) != 2:
                raise ValueError(f"{owner}: output_size must be an int or a pair, got "
                                 f"{output_size!r}")
            size = tuple(None if v is None else check_int(v, "output_size", owner, 0)
                         for v in output_size)
        else:
            v = check_int(output_size, "output_size", owner, 0)
            size = (v, v)
        self._size = size
        self.output_size = output_size if isinstance(output_size, tuple) else (
            tuple(output_size) if isinstance(output_size, list) else size[0])

    def forward(self, x):
        x = as_float_array(x, "x")
        if x.ndim not in (3, 4):
            raise ValueError(f"{self!r}: input has shape {x.shape}, expected (N, C, H, W) "
                             f"or (C, H, W)")
        h, w = x.shape[-2:]
        ph = h if self._size[0] is None else self._size[0]
        pw = w if self._size[1] is None else self._size[1]
        # An empty plane is refused even when the output would be empty too (an output
        # dimension of None copies the 0): torch refuses both, and so do the pooling calls.
        if h == 0 or w == 0:
            raise ValueError(f"{self!r}: input of shape {x.shape} has no element to average "
                             f"into a {ph}x{pw} output")
        planes = math.prod(x.shape[:-2])
        if x.flags.c_contiguous:
            x3 = x.reshape(planes, h, w)
        else:
            x3 = self._buffer("x", (planes, h, w), x.dtype)
            np.copyto(x3.reshape(x.shape), x)
        y = self._buffer("y", (planes, ph, pw), x.dtype)
        adaptive_avg_pool2d(x3, y, False)
        self._in_shape = x.shape
        self._out_shape = x.shape[:-2] + (ph, pw)
        self._dtype = x.dtype
        return y.reshape(self._out_shape)

    def backward(self, dy, *, need_input_grad=True):
        """Each output gradient spread evenly over its bin (summed where bins overlap)."""
        if self._in_shape is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        dy = as_grad(dy, self._dtype, self._out_shape, self)
        if not need_input_grad:
            return None
        shape = self._in_shape
        planes = math.prod(shape[:-2])
        dx = self._buffer("dx", (planes,) + shape[-2:], dy.dtype)
        adaptive_avg_pool2d(dy.reshape((planes,) + self._out_shape[-2:]), dx, True)
        return dx.reshape(shape)

    def __repr__(self):
        return f"AdaptiveAvgPool2d(output_size={self.output_size!r})"
