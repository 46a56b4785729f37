"""Residual: y = block(x) + shortcut(x) (or + x), the building block of ResNets."""
import numpy as np

from microtile._common._checks import as_float_array
from microtile._config._schema import ACTIVATIONS
from microtile.nn._act_kernels import act_backward, act_forward
from microtile.nn._dtypes import as_grad
from microtile.nn._module import Module, grads_ready_callback, hook_aware, per_thread


def _is_layer(obj):
    return callable(getattr(obj, "forward", None)) and callable(getattr(obj, "backward", None))


def _backward(layer, dy, need_input_grad, ready):
    if isinstance(layer, Module):
        out = layer.backward(dy, need_input_grad=need_input_grad)
    else:
        out = layer.backward(dy)
    if ready is not None and not hook_aware(layer):
        ready(layer)        # its gradients are final (see grads_ready_hook)
    return out


class Residual(Module):
    """``y = block(x) + shortcut(x)``, or ``block(x) + x`` when ``shortcut`` is None.

    ``backward`` sends the output gradient through both paths and returns the sum of their
    input gradients.  A ResNet basic block is::

        Sequential(Residual(Sequential(Conv2d(c, c, 3, padding=1, bias=False), BatchNorm2d(c),
                                       ReLU(), Conv2d(c, c, 3, padding=1, bias=False),
                                       BatchNorm2d(c)),
                            shortcut),
                   ReLU())

    Inside a Sequential, an activation right after the Residual is applied in the same
    pass as the addition (as for Linear and Conv2d).

    Parameters
    ----------
    block : layer
    shortcut : layer or None
        Its output must have the block's output shape (``ValueError`` naming both shapes
        otherwise); None is the identity, so the block must keep the input's shape.

    Notes
    -----
    State-dict keys are prefixed ``block.`` and ``shortcut.``, as for a torch module with
    attributes named after the constructor's arguments.
    """

    _fusable = True
    # What forward saves for backward, per thread (see ``Module``).
    _y = per_thread()
    _act = per_thread()
    _x_shape = per_thread()
    _x_dtype = per_thread()

    def __init__(self, block, shortcut=None):
        if not _is_layer(block):
            raise TypeError(f"Residual: block ({type(block).__name__}) is not a layer (it "
                            f"needs forward and backward)")
        if shortcut is not None and not _is_layer(shortcut):
            raise TypeError(f"Residual: shortcut ({type(shortcut).__name__}) is not a layer "
                            f"(it needs forward and backward)")
        self.block = block
        self.shortcut = shortcut

    def _named_children(self):
        out = [("block", self.block)]
        if self.shortcut is not None:
            out.append(("shortcut", self.shortcut))
        return out

    def _backward_children(self):
        """The paths in the order ``backward`` visits them (see ``grads_ready_hook``)."""
        return (self.block,) if self.shortcut is None else (self.block, self.shortcut)

    def forward(self, x):
        """``block(x) + shortcut(x)`` (``+ x`` without a shortcut)."""
        return self._forward(x, None)

    def _forward(self, x, activation):
        x = as_float_array(x, "x")
        a = self.block.forward(x)
        b = x if self.shortcut is None else self.shortcut.forward(x)
        if a.shape != b.shape:
            what = "the input" if self.shortcut is None else "the shortcut's output"
            raise ValueError(f"Residual: the block's output has shape {a.shape} but {what} "
                             f"has shape {b.shape}")
        # The block's dtype: a float64 batch through the identity into a float32 model
        # rounds, as every layer of that model does.
        y = self._buffer("y", a.shape, a.dtype)
        np.add(a, b, out=y, casting="same_kind")
        code = ACTIVATIONS[activation]
        if code:
            flat = y.reshape(-1)
            act_forward(flat, flat, code)
        self._y = y
        self._act = code
        self._x_shape = x.shape
        self._x_dtype = x.dtype
        return y

    def backward(self, dy, *, need_input_grad=True):
        """Back-propagate through both paths (accumulating their parameters' gradients);
        return the sum of their input gradients (None if not ``need_input_grad``)."""
        y = self._y
        if y is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        dy = as_grad(dy, y.dtype, y.shape, self)
        if self._act:
            dz = self._buffer("dz", y.shape, y.dtype)
            act_backward(self._act, y.reshape(-1), dy.reshape(-1), dz.reshape(-1))
            dy = dz
        need = bool(need_input_grad)
        ready = grads_ready_callback()
        da = _backward(self.block, dy, need, ready)
        db = dy if self.shortcut is None else _backward(self.shortcut, dy, need, ready)
        if not need:
            return None
        dx = self._buffer("dx", self._x_shape, self._x_dtype)
        np.add(da, db, out=dx, casting="same_kind")
        return dx

    def __repr__(self):
        block = repr(self.block).replace("\n", "\n  ")
        if self.shortcut is None:
            return f"Residual(\n  (block): {block}\n)"
        shortcut = repr(self.shortcut).replace("\n", "\n  ")
        return f"Residual(\n  (block): {block}\n  (shortcut): {shortcut}\n)"
