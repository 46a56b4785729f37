"""Element-wise activations: ReLU, Sigmoid, Tanh (numerically safe for any input).

Each keeps only its output for the backward pass (every derivative is a function of it), which
is also what lets a Sequential fold an activation into the layer before it: the Linear or
Conv2d then applies it on write-back and the activation just records the shared output.
"""
import numpy as np

from microtile._common._checks import as_float_array
from microtile.nn._act_kernels import act_backward, act_forward
from microtile.nn._dtypes import as_grad
from microtile.nn._module import Module, per_thread


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
