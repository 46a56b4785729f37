"""Losses: softmax cross-entropy over class logits, and mean squared error."""
import math

import numpy as np

from microtile._common._checks import as_float_array
from microtile.nn._loss_kernels import check_labels, softmax_xent
from microtile.nn._module import ThreadState, per_thread

_INTP = np.dtype(np.intp)


class _Loss(ThreadState):
    """A loss keeps the gradient of its last ``forward`` for ``backward``, per thread: one
    loss object may serve several threads at once (see ``Module``)."""
    _grad = per_thread()

    def __call__(self, pred, target):
        return self.forward(pred, target)

    def backward(self):
        """Gradient of the last ``forward``'s loss with respect to its first argument.

        The array is the loss's own buffer, overwritten by the next ``forward``.
        """
        if self._grad is None:
            raise RuntimeError(f"{type(self).__name__}: backward called before forward")
        return self._grad

    def __repr__(self):
        return f"{type(self).__name__}()"


class CrossEntropyLoss(_Loss):
    """Mean over the batch of ``-log softmax(logits)[label]`` (torch's CrossEntropyLoss).

    The log-softmax is taken around each row's maximum, so large logits do not overflow.
    The gradient ``(softmax - onehot) / N`` is produced in the same pass as the loss.
    """

    def forward(self, logits, labels):
        """Mean cross-entropy of ``logits`` (N, C) against integer ``labels`` (N,) in [0, C).

        Returns
        -------
        float
            NaN for an empty batch (as torch).
        """
        x = as_float_array(logits, "logits")
        if x.ndim != 2:
            raise ValueError(f"CrossEntropyLoss: logits must be (N, C), got shape {x.shape}")
        lab = np.asarray(labels)
        if lab.dtype.kind not in "iu":
            raise TypeError(f"CrossEntropyLoss: labels must be integers, got dtype {lab.dtype}")
        n, c = x.shape
        if lab.shape != (n,):
            raise ValueError(f"CrossEntropyLoss: labels have shape {lab.shape}, logits have "
                             f"shape {x.shape}; expected labels of shape ({n},)")
        if lab.dtype != _INTP or not lab.flags.c_contiguous:
            if lab.dtype.kind == "u" and lab.size and lab.max() > np.iinfo(np.intp).max:
                raise ValueError("CrossEntropyLoss: label out of range")
            lab = np.ascontiguousarray(lab, dtype=_INTP)
        if n and c == 0:
            raise ValueError("CrossEntropyLoss: logits have no classes")
        bad = check_labels(lab, c)
        if bad >= 0:
            raise ValueError(f"CrossEntropyLoss: label {lab[bad]} at index {bad} is outside "
                             f"[0, {c})")
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        g = self._buffer("grad", x.shape, x.dtype)
        total = softmax_xent(x, lab, g, 1.0 / n if n else 0.0)
        self._grad = g
        return total / n if n else math.nan


class MSELoss(_Loss):
    """Mean over all elements of ``(pred - target) ** 2`` (torch's MSELoss)."""

    def forward(self, pred, target):
        """Mean squared error of two arrays of the same shape.

        Returns
        -------
        float
            NaN for empty arrays (as torch).
        """
        p = as_float_array(pred, "pred")
        t = as_float_array(target, "target")
        if p.shape != t.shape:
            raise ValueError(f"MSELoss: pred has shape {p.shape}, target has shape {t.shape}")
        g = self._buffer("grad", p.shape, p.dtype)
        # The difference is formed in float64 when either side is float64, then kept in the
        # prediction's dtype: the gradient belongs to pred.
        np.subtract(p, t, out=g, casting="same_kind")
        n = g.size
        if n == 0:
            self._grad = g
            return math.nan
        flat = g.reshape(-1)
        total = float(np.dot(flat, flat))
        np.multiply(g, 2.0 / n, out=g)
        self._grad = g
        return total / n
