"""Flatten: collapse dimensions start_dim..end_dim into one (a view when the layout allows)."""
import numpy as np

from microtile._common._checks import as_float_array
from microtile.nn._module import Module, check_int, per_thread


class Flatten(Module):
    """Reshape (N, C, H, W) to (N, C*H*W), as ``torch.nn.Flatten`` (start_dim=1, end_dim=-1).

    Parameters
    ----------
    start_dim, end_dim : int
        First and last dimension to merge (negative counts from the end).
    """

    # The shapes of the last forward, per thread (see ``Module``).
    _in_shape = per_thread()
    _out_shape = per_thread()

    def __init__(self, start_dim=1, end_dim=-1):
        # int() would take 3.5 as 3: a dimension is an integer or an error, as in torch.
        self.start_dim = check_int(start_dim, "start_dim", "Flatten", minimum=-(2 ** 63))
        self.end_dim = check_int(end_dim, "end_dim", "Flatten", minimum=-(2 ** 63))

    def forward(self, x):
        x = as_float_array(x, "x")
        nd = max(x.ndim, 1)
        s = self.start_dim + nd if self.start_dim < 0 else self.start_dim
        e = self.end_dim + nd if self.end_dim < 0 else self.end_dim
        if not (0 <= s < nd and 0 <= e < nd) or s > e:
            raise ValueError(f"{self!r}: cannot flatten dimensions {self.start_dim}..."
                             f"{self.end_dim} of an input of shape {x.shape}")
        shape = x.shape
        if x.ndim:
            merged = int(np.prod(shape[s:e + 1], dtype=np.int64))
            shape = shape[:s] + (merged,) + shape[e + 1:]
        self._in_shape = x.shape
        self._out_shape = shape
        return x.reshape(shape)

    def backward(self, dy, *, need_input_grad=True):
        if self._in_shape is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        arr = as_float_array(dy, "dy")
        if arr.shape != self._out_shape:
            raise ValueError(f"{self!r}: gradient has shape {arr.shape}, the forward output "
                             f"had shape {self._out_shape}")
        if not need_input_grad:
            return None
        return arr.reshape(self._in_shape)

    def __repr__(self):
        return f"Flatten(start_dim={self.start_dim}, end_dim={self.end_dim})"
