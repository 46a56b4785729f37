"""Parameter: a trainable array and the gradient that backward passes accumulate into it."""
import contextlib
import threading

import numpy as np

from microtile.nn._dtypes import float_dtype


class Parameter:
    """A trainable array (``.data``) and its gradient (``.grad``), of one shape and dtype.

    Both arrays are owned by the parameter, C-contiguous, and never replaced: assigning to
    ``.data`` or ``.grad`` copies into them, so layers, optimizers and views taken earlier all
    keep seeing the same memory.  (One exception: ``DistributedDataParallel`` moves the
    gradient, once, into its bucket's buffer when it wraps the model.)

    ``zero_grad()`` does not touch memory: it marks the gradient as zero, and the next
    backward pass then writes it instead of adding to it (as torch's ``set_to_none`` saves
    the clearing pass).  Reading ``.grad`` in between gives zeros, as it should.

    Gradient updates hold the parameter's lock (see ``locked``), so backward passes running
    in several threads at once add up instead of overwriting each other.

    Parameters
    ----------
    data : array_like
        Initial value; float32 or float64 (other dtypes raise TypeError).  Copied.
    """

    __slots__ = ("_data", "_grad", "_grad_is_zero", "_flat_data", "_flat_grad", "_lock",
                 "_prune")

    def __init__(self, data):
        arr = np.asarray(data)
        dt = float_dtype(arr.dtype, "Parameter")
        self._data = np.array(arr, dtype=dt, order="C", copy=True)
        self._grad = np.zeros_like(self._data)
        self._grad_is_zero = True
        # Flat views made once: the optimizers' kernels take 1-D arrays.
        self._flat_data = self._data.reshape(-1)
        self._flat_grad = self._grad.reshape(-1)
        # Reentrant: a custom layer may update a parameter inside another's update.
        self._lock = threading.RLock()
        # Flat indices that nn.prune zeroed and every optimizer step zeroes again, or None.
        self._prune = None

    def __getstate__(self):
        return {"data": self._data, "grad": self._grad, "grad_is_zero": self._grad_is_zero,
                "prune": self._prune}

    def __setstate__(self, state):
        self.__init__(state["data"])
        self._grad[...] = state["grad"]
        self._grad_is_zero = state["grad_is_zero"]
        self._prune = state.get("prune")

    @property
    def data(self):
        """The value (an array owned by the parameter; update it in place or assign)."""
        return self._data

    @data.setter
    def data(self, value):
        self._copy_in(self._data, value, "data")
        self._apply_prune()

    def _apply_prune(self):
        """Zero the pruned positions again (see nn.prune): after an optimizer step or a
        load, so a pruned weight stays zero whatever was written over it."""
        if self._prune is not None:
            self._flat_data[self._prune] = 0

    @property
    def grad(self):
        """The accumulated gradient, same shape and dtype as ``data``."""
        with self._lock:
            if self._grad_is_zero:
                self._grad.fill(0)
                self._grad_is_zero = False
        return self._grad

    @grad.setter
    def grad(self, value):
        with self._lock:
            self._copy_in(self._grad, value, "grad")
            self._grad_is_zero = False

    @property
    def shape(self):
        return self._data.shape

    @property
    def dtype(self):
        return self._data.dtype

    @property
    def size(self):
        return self._data.size

    def zero_grad(self):
        """Set the gradient to zero (lazily: no pass over memory until it is needed)."""
        self._grad_is_zero = True

    def _grad_for_update(self):
        """``(grad, accumulate)`` for a backward pass: when ``accumulate`` is False the caller
        must overwrite every element (the gradient is logically zero).  Call it, and write
        the gradient, inside ``locked(param)``."""
        accumulate = not self._grad_is_zero
        self._grad_is_zero = False
        return self._grad, accumulate

    def _move_grad_to(self, flat):
        """Keep the gradient in ``flat`` (1-D, C-contiguous, this size and dtype) from now
        on, its value copied over.  DistributedDataParallel puts every gradient into its
        bucket's buffer so that the allreduce works on the gradients themselves: two copies
        of every gradient per step fewer, and one copy less of them in memory."""
        with self._lock:
            flat[...] = self._flat_grad
            self._flat_grad = flat
            self._grad = flat.reshape(self._data.shape)

    def _add_to_grad(self, value):
        """grad += value (or grad = value when the gradient is logically zero)."""
        with self._lock:
            g, accumulate = self._grad_for_update()
            if accumulate:
                np.add(g, value, out=g)
            else:
                np.copyto(g, value)

    def _copy_in(self, target, value, what):
        value = np.asarray(value)
        if value.dtype.kind not in "iuf":
            raise TypeError(f"Parameter.{what}: cannot assign an array of dtype {value.dtype}")
        if value.shape != target.shape:
            raise ValueError(f"Parameter.{what}: value has shape {value.shape}, the parameter "
                             f"has shape {target.shape}")
        np.copyto(target, value, casting="unsafe")

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype})"


@contextlib.contextmanager
def locked(*params):
    """Hold the locks of ``params`` (None entries skipped) while a backward pass reads the
    zero flags and writes the gradients.  Taken in one global order (by id), so two layers
    that share parameters can never wait on each other."""
    unique = {id(p): p for p in params if p is not None}
    locks = [unique[key]._lock for key in sorted(unique)]
    for lock in locks:
        lock.acquire()
    try:
        yield
    finally:
        for lock in reversed(locks):
            lock.release()
