"""Activations: ReLU, Sigmoid, Tanh, LeakyReLU, GELU, SiLU (element-wise, numerically safe
for any input) and Softmax, LogSoftmax (along one axis).

Each keeps only its output for the backward pass (every derivative is a function of it), which
is also what lets a Sequential fold an activation into the layer before it: the Linear or
Conv2d then applies it on write-back and the activation just records the shared output.
"""
import math

import numpy as np

from microtile._common._checks import as_float_array
from microtile.nn._act_kernels import POINTWISE, act_backward, act_forward, pointwise, softmax
from microtile.nn._dtypes import as_grad
from microtile.nn._module import Module, check_int, check_real, per_thread


class _Activation(Module):
    _code = 0
    _act_name = None
    # The output, kept per thread for backward (see ``Module``).
    _y = per_thread()

    def forward(self, x):
        """Apply the activation element-wise; same shape and dtype as ``x``."""
        x = as_float_array(x, "x")
        y = self._buffer("y", x.shape, x.dtype)
        if x.flags.c_contiguous:
            act_forward(x.reshape(-1), y.reshape(-1), self._code)
        else:
            np.copyto(y, x)
            flat = y.reshape(-1)
            act_forward(flat, flat, self._code)
        self._y = y
        return y

    def backward(self, dy, *, need_input_grad=True):
        """Gradient with respect to the input, from the output kept by ``forward``."""
        y = self._y
        if y is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        dy = as_grad(dy, y.dtype, y.shape, self)
        if not need_input_grad:
            return None
        dx = self._buffer("dx", y.shape, y.dtype)
        act_backward(self._code, y.reshape(-1), dy.reshape(-1), dx.reshape(-1))
        return dx

    def _adopt_output(self, y):
        """The previous layer applied this activation on write-back and produced ``y``."""
        self._y = y

    def __repr__(self):
        return f"{type(self).__name__}()"


class ReLU(_Activation):
    """max(x, 0) element-wise, as torch.relu: NaN stays NaN, and backward passes the
    gradient through wherever the input is not <= 0 (so at NaN too)."""
    _code = 1
    _act_name = "relu"


class Sigmoid(_Activation):
    """1 / (1 + exp(-x)), evaluated without overflow for any input."""
    _code = 2
    _act_name = "sigmoid"


class Tanh(_Activation):
    """tanh(x) element-wise."""
    _code = 3
    _act_name = "tanh"


class _InputActivation(Module):
    """An element-wise activation whose derivative needs the input: it keeps the input
    (the caller's array when C-contiguous, else a copy in a buffer) for ``backward``.
    Not folded into a preceding Linear or Conv2d, whose fused backward has only the
    output.  A write-back that stored both the Linear's output and the activation's was
    measured and left out: 0.84-1.06x the separate pass (784-1024-1024-10 and
    256->4096 at batch 2048, GELU and SiLU, 2 threads), because computing these costs about
    2 ns an element on a core, ten times the memory pass it saves."""
    _name = None
    # The input, kept per thread for backward (see ``Module``).
    _x = per_thread()

    def _alpha(self):
        return 0.0

    def forward(self, x):
        """Apply the activation element-wise; same shape and dtype as ``x``."""
        x = as_float_array(x, "x")
        if not x.flags.c_contiguous:
            xc = self._buffer("x", x.shape, x.dtype)
            np.copyto(xc, x)
            x = xc
        y = self._buffer("y", x.shape, x.dtype)
        pointwise(POINTWISE[self._name], self._alpha(), x.reshape(-1), None, y.reshape(-1))
        self._x = x
        return y

    def backward(self, dy, *, need_input_grad=True):
        """Gradient with respect to the input kept by ``forward``."""
        x = self._x
        if x is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        dy = as_grad(dy, x.dtype, x.shape, self)
        if not need_input_grad:
            return None
        dx = self._buffer("dx", x.shape, x.dtype)
        pointwise(POINTWISE[self._name], self._alpha(), x.reshape(-1), dy.reshape(-1),
                  dx.reshape(-1))
        return dx

    def __repr__(self):
        return f"{type(self).__name__}()"


class LeakyReLU(_InputActivation):
    """``x`` where ``x > 0``, else ``negative_slope * x``, as ``torch.nn.LeakyReLU``.

    Parameters
    ----------
    negative_slope : float
        Any finite number (a negative one too, as torch allows).
    """
    _name = "leaky_relu"

    def __init__(self, negative_slope=0.01):
        self.negative_slope = check_real(negative_slope, "negative_slope", "LeakyReLU")
        if not math.isfinite(self.negative_slope):
            raise ValueError(f"LeakyReLU: negative_slope must be finite, got {negative_slope!r}")

    def _alpha(self):
        return self.negative_slope

    def __repr__(self):
        return f"LeakyReLU(negative_slope={self.negative_slope})"


class GELU(_InputActivation):
    """``x * Phi(x)`` (Phi the standard normal CDF), as ``torch.nn.GELU``.

    Parameters
    ----------
    approximate : {"none", "tanh"}
        ``"tanh"`` uses torch's approximation
        ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``.

    Notes
    -----
    float32 is computed without libm: Phi from a polynomial fit times ``exp(-x^2/2)``
    (within a few ulp, the far left tail included), and the tanh form as the equal
    ``x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))``, which keeps the left tail that
    ``1 + tanh(...)`` cancels to 0 in float32 (torch's value at x = -5 is 30 % off).
    """

    def __init__(self, approximate="none"):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got "
                             f"{approximate!r}")
        self.approximate = approximate
        self._name = "gelu" if approximate == "none" else "gelu_tanh"

    def __repr__(self):
        return f"GELU(approximate={self.approximate!r})"


class SiLU(_InputActivation):
    """``x * sigmoid(x)`` (the swish), as ``torch.nn.SiLU``."""
    _name = "silu"


class _Softmax(Module):
    """Softmax or log-softmax along ``dim``; keeps its output for ``backward``."""
    _log = False
    # The output and its (outer, length, inner) view, per thread (see ``Module``).
    _y = per_thread()
    _geometry = per_thread()

    def __init__(self, dim=-1):
        self.dim = check_int(dim, "dim", type(self).__name__, minimum=-(2 ** 63))

    def forward(self, x):
        """Along ``dim``: the maximum is subtracted first, so no input overflows."""
        x = as_float_array(x, "x")
        nd = max(x.ndim, 1)         # a 0-d input is one element along dim 0, as in torch
        if not -nd <= self.dim < nd:
            raise np.exceptions.AxisError(self.dim, nd, type(self).__name__)
        d = self.dim % nd
        shape = x.shape if x.ndim else (1,)
        geometry = (math.prod(shape[:d]), shape[d], math.prod(shape[d + 1:]))
        if not x.flags.c_contiguous:
            xc = self._buffer("x", x.shape, x.dtype)
            np.copyto(xc, x)
            x = xc
        y = self._buffer("y", x.shape, x.dtype)
        softmax(x.reshape(-1), None, y.reshape(-1), *geometry, self._log)
        self._y = y
        self._geometry = geometry
        return y

    def backward(self, dy, *, need_input_grad=True):
        """Gradient with respect to the input, from the output kept by ``forward``."""
        y = self._y
        if y is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        dy = as_grad(dy, y.dtype, y.shape, self)
        if not need_input_grad:
            return None
        dx = self._buffer("dx", y.shape, y.dtype)
        softmax(y.reshape(-1), dy.reshape(-1), dx.reshape(-1), *self._geometry, self._log)
        return dx

    def __repr__(self):
        return f"{type(self).__name__}(dim={self.dim})"


class Softmax(_Softmax):
    """``exp(x) / sum(exp(x))`` along ``dim``, as ``torch.nn.Softmax`` (sums in float64).

    Parameters
    ----------
    dim : int
        The axis normalised (negative counts from the end); out of range raises
        ``numpy.exceptions.AxisError`` (an IndexError and a ValueError).
    """


class LogSoftmax(_Softmax):
    """``x - log(sum(exp(x)))`` along ``dim``, as ``torch.nn.LogSoftmax``: computed around
    the maximum, so it is finite for any finite input (no log of an underflowed softmax).

    Parameters
    ----------
    dim : int
    """
    _log = True
