"""Module: what every layer shares (parameters, state dicts, reusable work buffers).

Threads: what a layer keeps between calls (its work buffers, and what ``forward`` saves for
``backward``) is kept per thread, so one model may run ``forward`` (and ``predict``) in any
number of threads at once, each thread seeing only its own buffers.  Gradients are shared:
``backward`` accumulates into ``Parameter.grad`` under the parameter's lock.
"""
import threading

import numpy as np

from microtile.nn._parameter import Parameter

# Shapes of one buffer kept at once: a training batch, the last partial batch, and the same
# two for validation, so fit never reallocates once it has seen each of them.
_BUFFER_SHAPES = 4


class per_thread:
    """A layer attribute with one value per thread (None in a thread that never set it).

    Declared on the class (``_y = per_thread()``), it reads and writes the instance's
    ``threading.local``, so the code that saves a forward's output for the backward pass
    stays ``self._y = y`` and another thread's forward cannot overwrite it.
    """

    def __set_name__(self, owner, name):
        self.name = name

    # Both run on every layer call, so they read the instance's threading.local straight
    # from its __dict__ rather than through _thread_state (one Python call fewer each).
    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        local = obj.__dict__.get("_tls")
        return None if local is None else getattr(local, self.name, None)

    def __set__(self, obj, value):
        local = obj.__dict__.get("_tls")
        setattr(obj._thread_state() if local is None else local, self.name, value)


class ThreadState:
    """Per-thread state and reusable buffers (the part of a layer or loss that a call
    overwrites).  A thread's buffers go when the thread ends; copies and pickles of the
    object start without any."""

    def _thread_state(self):
        d = self.__dict__
        local = d.get("_tls")
        if local is None:
            # setdefault is atomic under the GIL: two threads racing here get one object.
            local = d.setdefault("_tls", threading.local())
        return local

    def _buffer(self, key, shape, dtype):
        """A reusable array of ``shape`` and ``dtype`` for ``key`` in this thread (contents
        undefined)."""
        local = self._thread_state()
        try:
            bufs = local.bufs
        except AttributeError:
            bufs = local.bufs = {}
        lst = bufs.get(key)
        if lst is None:
            lst = bufs[key] = []
        for i, a in enumerate(lst):
            if a.shape == shape and a.dtype == dtype:
                if i:
                    lst.insert(0, lst.pop(i))
                return a
        a = np.empty(shape, dtype)
        lst.insert(0, a)
        del lst[_BUFFER_SHAPES:]
        return a

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_tls", None)     # a threading.local neither pickles nor copies
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)


class Module(ThreadState):
    """Base class of the layers: ``y = m(x)``, ``dx = m.backward(dy)``, ``m.parameters()``.

    Arrays a module returns from ``forward`` and ``backward`` are its own work buffers: they
    are reused by the next call with the same shapes in the same thread (that is what keeps
    a training step free of allocations), so copy a result you want to keep across calls.

    Threads: one module may run ``forward`` in several threads at once; each thread has its
    own buffers and its own saved state, so its results and its ``backward`` are those of
    its own last ``forward``.  ``backward`` in several threads accumulates every thread's
    gradient into the shared ``Parameter.grad`` (under a lock per parameter).  An optimizer
    step changes the weights under any ``forward`` running at the time: train a model in
    one thread at a time.
    """

    # Names of the Parameter attributes, in state-dict order (None entries are skipped).
    _param_names = ()

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy, *, need_input_grad=True):
        raise NotImplementedError

    # -- parameters -----------------------------------------------------------------------
    def named_parameters(self, prefix=""):
        """``[(name, Parameter), ...]`` with torch's names (``"0.weight"`` in a Sequential)."""
        out = []
        for name in self._param_names:
            p = getattr(self, name, None)
            if p is not None:
                out.append((prefix + name, p))
        return out

    def parameters(self):
        """The trainable parameters, in state-dict order."""
        return [p for _, p in self.named_parameters()]

    def zero_grad(self):
        """Set every parameter's gradient to zero."""
        for p in self.parameters():
            p.zero_grad()

    @property
    def dtype(self):
        """The parameters' dtype (None for a module without parameters)."""
        params = self.parameters()
        return params[0].dtype if params else None

    # -- state ----------------------------------------------------------------------------
    def state_dict(self):
        """A dict of copies of the parameters' values, keyed as torch keys them.

        Returns
        -------
        dict of str to ndarray
        """
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state_dict):
        """Copy values from ``state_dict`` into the parameters.

        Every key must be present with the parameter's shape, and no key may be unknown;
        otherwise ``ValueError`` is raised and no parameter is changed.  Values are cast to
        each parameter's dtype.

        Parameters
        ----------
        state_dict : mapping of str to array_like
        """
        named = self.named_parameters()
        try:
            keys = set(state_dict.keys())
        except AttributeError:
            raise TypeError(f"load_state_dict: expected a mapping, got "
                            f"{type(state_dict).__name__}") from None
        expected = [name for name, _ in named]
        missing = [k for k in expected if k not in keys]
        unexpected = sorted(keys - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing keys {missing}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected}")
            raise ValueError(f"load_state_dict: {'; '.join(parts)}")
        values = []
        for name, p in named:
            v = np.asarray(state_dict[name])
            if v.dtype.kind not in "iuf":
                raise TypeError(f"load_state_dict: {name!r} has dtype {v.dtype}")
            if v.shape != p.shape:
                raise ValueError(f"load_state_dict: {name!r} has shape {v.shape}, the model "
                                 f"expects {p.shape}")
            values.append(v)
        # Everything checked: only now is anything written.
        for (_, p), v in zip(named, values):
            np.copyto(p.data, v, casting="unsafe")


def check_int(value, name, owner, minimum=0):
    """``value`` as an int >= minimum: TypeError for a non-integer, ValueError when smaller."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{owner}: {name} must be an integer, got {value!r}")
    value = value.__index__()
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be at least {minimum}, got {value}")
    return value


def as_parameter(value, name):
    if not isinstance(value, Parameter):
        raise TypeError(f"{name} must be a Parameter, got {type(value).__name__}")
    return value
