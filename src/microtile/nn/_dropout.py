"""Dropout: zero random elements in training mode, the identity in eval mode."""
import numpy as np

from microtile._common._checks import as_float_array
from microtile.nn._act_kernels import dropout_backward, dropout_forward, dropout_threshold
from microtile.nn._dtypes import as_grad
from microtile.nn._init import as_generator
from microtile.nn._module import Module, check_real, per_thread


class Dropout(Module):
    """Zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)``, in
    training mode; in eval mode (and with ``p = 0``) the input is returned as it is.  As
    ``torch.nn.Dropout``.

    Parameters
    ----------
    p : float in [0, 1]
        Probability of an element being zeroed, to within 2^-33 (``p = 1``, or a ``p``
        within 2^-33 of it, zeroes everything).
    rng : numpy.random.Generator, int or None
        The layer's own source of masks (a seed gives reproducible masks).

    Notes
    -----
    Each forward takes one 64-bit key from ``rng``; the mask's random numbers follow from
    the key and each element's position (generators seeded per block of elements, drawn
    on the thread pool; see ``nn/_dropout_mask.h``), so a seed gives the same masks
    whatever the number of threads.  The mask is kept as one byte per element in a buffer
    of this layer and reused by ``backward``, which scales the gradient by the same mask;
    no array is allocated once the shapes have been seen.  Like torch, the mask
    multiplies: NaN in a dropped element stays NaN.  Threads share the generator (NumPy's
    generators lock), each keeps its own mask.
    """

    # The last forward's mask (None when it was the identity) and its output shape and
    # dtype, per thread (see ``Module``).
    _keep = per_thread()
    _shape = per_thread()
    _dtype = per_thread()

    def __init__(self, p=0.5, *, rng=None):
        self.p = check_real(p, "p", "Dropout", 0.0, 1.0)
        self.rng = as_generator(rng)

    def _scale(self):
        # torch: p = 1 multiplies by zeros (not by an infinite scale).  A p within 2^-33
        # of 1 keeps no element (dropout_threshold), whatever the scale.
        return 0.0 if self.p == 1.0 else 1.0 / (1.0 - self.p)

    def forward(self, x):
        """``x`` with random elements zeroed and the rest scaled (training mode), or ``x``."""
        x = as_float_array(x, "x")
        self._shape = x.shape
        self._dtype = x.dtype
        if not self._in_training() or self.p == 0.0:
            self._keep = None
            return x
        keep = self._buffer("keep", x.shape, np.uint8)
        key = int(self.rng.integers(0, 1 << 64, dtype=np.uint64, endpoint=False))
        y = self._buffer("y", x.shape, x.dtype)
        if x.flags.c_contiguous:
            src = x.reshape(-1)
        else:
            np.copyto(y, x)
            src = y.reshape(-1)
        dropout_forward(src, y.reshape(-1), keep.reshape(-1), key, dropout_threshold(self.p),
                        self._scale())
        self._keep = keep
        return y

    def backward(self, dy, *, need_input_grad=True):
        """``dy`` masked and scaled as the last forward's output was (``dy`` itself after an
        identity forward)."""
        if self._shape is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        dy = as_grad(dy, self._dtype, self._shape, self)
        if not need_input_grad:
            return None
        keep = self._keep
        if keep is None:
            return dy
        dx = self._buffer("dx", keep.shape, self._dtype)
        dropout_backward(dy.reshape(-1), keep.reshape(-1), dx.reshape(-1), self._scale())
        return dx

    def __repr__(self):
        return f"Dropout(p={self.p})"
