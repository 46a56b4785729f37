"""Module: what every layer shares (parameters, state dicts, reusable work buffers).

Threads: what a layer keeps between calls (its work buffers, and what ``forward`` saves for
``backward``) is kept per thread, so one model may run ``forward`` (and ``predict``) in any
number of threads at once, each thread seeing only its own buffers.  Gradients are shared:
``backward`` accumulates into ``Parameter.grad`` under the parameter's lock.
"""
import contextlib
import math
import numbers
import threading

import numpy as np

from microtile.nn._parameter import Parameter

# Shapes of one buffer kept at once: a training batch, the last partial batch, and the same
# two for validation, so fit never reallocates once it has seen each of them.
_BUFFER_SHAPES = 4


# Set while ``eval_in_this_thread`` runs: every layer in this thread computes as in eval mode.
_eval_override = threading.local()


@contextlib.contextmanager
def _set_in_this_thread(local, name, value, unset):
    """``local.name = value`` for the body, then back to what it was (``unset`` if it was
    never set): a setting of the calling thread only, nested blocks restoring in turn."""
    previous = getattr(local, name, unset)
    setattr(local, name, value)
    try:
        yield
    finally:
        setattr(local, name, previous)


def eval_in_this_thread():
    """Run the body with every layer computing as in eval mode, in the calling thread only.

    ``predict`` and ``fit``'s validation use it instead of ``eval()``/``train()``: the
    ``training`` flags are shared by all threads, so flipping them for one prediction
    would switch a BatchNorm to batch statistics (or back) under another thread.  Layers
    whose result depends on the mode read it through ``Module._in_training()``.
    """
    return _set_in_this_thread(_eval_override, "on", True, False)


# The "gradients ready" callback of this thread's backward pass, or None (see below).
_grads_ready = threading.local()


def grads_ready_hook(callback):
    """Call ``callback(layer)`` during every backward pass in this thread, as soon as a
    layer's backward has returned (its parameters' gradients for this pass are then final).

    ``Sequential`` and ``Residual`` make the calls, for each of their children except a
    child that is itself such a container (it calls for its own children instead): the
    layers named are those that ``backward_leaves`` lists (less an activation that ran
    fused into the layer before it: it has no parameters and no backward of its own).
    ``microtile.distributed`` uses it to start reducing a bucket of gradients while the
    rest of backward still runs.  Per thread, so a ``predict`` or a backward pass in
    another thread does not call it.
    """
    return _set_in_this_thread(_grads_ready, "callback", callback, None)


def grads_ready_callback():
    """This thread's ``grads_ready_hook`` callback, or None (read once per backward)."""
    return getattr(_grads_ready, "callback", None)


def backward_leaves(layer):
    """``[leaf, ...]``: the layers for which a backward of ``layer`` calls the
    ``grads_ready_hook`` callback, in the order it calls them.

    A container (an object with ``_backward_children``: Sequential, Residual) is replaced
    by its children in the order its backward visits them; anything else is a leaf.  A
    layer that occurs twice occurs twice here, as it is called twice.  ``layer`` itself is
    listed when it is a leaf (nothing calls the callback for it then: the caller of its
    backward knows when that returns).
    """
    children = getattr(layer, "_backward_children", None)
    if children is None:
        return [layer]
    out = []
    for child in children():
        out.extend(backward_leaves(child))
    return out


def hook_aware(layer):
    """Whether ``layer`` calls the ``grads_ready_hook`` callback for its own children (so
    its container must not call it for ``layer``)."""
    return getattr(layer, "_backward_children", None) is not None


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
    # Names of the buffer attributes (ndarrays that are state but not trained, such as
    # BatchNorm's running_mean), in state-dict order after the parameters; None skipped.
    _state_buffer_names = ()
    # torch's default mode; ``train``/``eval`` set it per instance.
    training = True

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy, *, need_input_grad=True):
        raise NotImplementedError

    # -- composition ----------------------------------------------------------------------
    def _named_children(self):
        """``[(name, layer), ...]``: the layers this one is made of, named as torch names
        them in state-dict keys (``"0"`` in a Sequential, ``"block"`` in a Residual)."""
        return []

    def modules(self):
        """This module and every Module inside it, depth first (as ``torch.nn.Module``)."""
        out = [self]
        for _, child in self._named_children():
            if isinstance(child, Module):
                out.extend(child.modules())
        return out

    # -- modes ----------------------------------------------------------------------------
    def train(self, mode=True):
        """Set training mode (``mode=True``) or evaluation mode here and in every layer
        inside; returns the module, as torch does.

        The mode decides what BatchNorm (batch or running statistics) and Dropout (mask or
        identity) do in ``forward``; the other layers compute the same either way.
        """
        if not isinstance(mode, bool):
            # torch raises ValueError here too.
            raise ValueError(f"train: mode must be a bool, got {mode!r}")
        self.training = mode
        for _, child in self._named_children():
            if callable(getattr(child, "train", None)):
                child.train(mode)
        return self

    def eval(self):
        """Evaluation mode, here and inside (``train(False)``); returns the module."""
        return self.train(False)

    def _in_training(self):
        """The mode ``forward`` computes in: ``training``, except inside
        ``eval_in_this_thread`` (in this thread), where it is eval."""
        return self.training and not getattr(_eval_override, "on", False)

    # -- parameters -----------------------------------------------------------------------
    def named_parameters(self, prefix=""):
        """``[(name, Parameter), ...]`` with torch's names (``"0.weight"`` in a Sequential)."""
        out = []
        for name in self._param_names:
            p = getattr(self, name, None)
            if p is not None:
                out.append((prefix + name, p))
        for name, child in self._named_children():
            sub = prefix + name + "."
            if isinstance(child, Module):
                out.extend(child.named_parameters(sub))
            elif callable(getattr(child, "parameters", None)):
                out.extend((sub + str(j), p) for j, p in enumerate(child.parameters()))
        return out

    def named_buffers(self, prefix=""):
        """``[(name, ndarray), ...]``: the non-trainable state (running statistics, ...)
        under torch's names.  The arrays are the module's own: write into them, not over."""
        out = []
        for name in self._state_buffer_names:
            b = getattr(self, name, None)
            if b is not None:
                out.append((prefix + name, b))
        for name, child in self._named_children():
            if isinstance(child, Module):
                out.extend(child.named_buffers(prefix + name + "."))
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
        """The parameters' dtype (else the floating buffers'; None when there are neither)."""
        params = self.parameters()
        if params:
            return params[0].dtype
        for _, b in self.named_buffers():
            if b.dtype.kind == "f":
                return b.dtype
        return None

    # -- state ----------------------------------------------------------------------------
    def _named_state(self, prefix=""):
        """``[(key, array), ...]`` in torch's state-dict order: each module's parameters,
        then its buffers, then its children's entries."""
        out = []
        for name in self._param_names:
            p = getattr(self, name, None)
            if p is not None:
                out.append((prefix + name, p.data))
        for name in self._state_buffer_names:
            b = getattr(self, name, None)
            if b is not None:
                out.append((prefix + name, b))
        for name, child in self._named_children():
            sub = prefix + name + "."
            if isinstance(child, Module):
                out.extend(child._named_state(sub))
            elif callable(getattr(child, "parameters", None)):
                out.extend((sub + str(j), p.data) for j, p in enumerate(child.parameters()))
        return out

    def state_dict(self):
        """A dict of copies of the parameters' and buffers' values, keyed as torch keys
        them (``"0.weight"``, ``"1.running_mean"``, ``"1.num_batches_tracked"``, ...).

        Returns
        -------
        dict of str to ndarray
        """
        return {name: a.copy() for name, a in self._named_state()}

    def load_state_dict(self, state_dict):
        """Copy values from ``state_dict`` into the parameters and buffers.

        Every key must be present with the entry's shape, and no key may be unknown;
        otherwise ``ValueError`` is raised and nothing is changed.  Values are cast to each
        entry's dtype.

        Parameters
        ----------
        state_dict : mapping of str to array_like
        """
        named = self._named_state()
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
        for name, target in named:
            v = np.asarray(state_dict[name])
            if v.dtype.kind not in "iuf":
                raise TypeError(f"load_state_dict: {name!r} has dtype {v.dtype}")
            if v.shape != target.shape:
                raise ValueError(f"load_state_dict: {name!r} has shape {v.shape}, the model "
                                 f"expects {target.shape}")
            values.append(v)
        # Everything checked: only now is anything written.
        for (_, target), v in zip(named, values):
            np.copyto(target, v, casting="unsafe")
        for p in self.parameters():
            p._apply_prune()        # pruned weights stay zero (nn.prune)


def check_int(value, name, owner, minimum=0):
    """``value`` as an int >= minimum: TypeError for a non-integer, ValueError when smaller."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{owner}: {name} must be an integer, got {value!r}")
    value = value.__index__()
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be at least {minimum}, got {value}")
    return value


def check_real(value, name, owner, lo=-math.inf, hi=math.inf):
    """``value`` as a float in [lo, hi]: TypeError for a non-number (or a bool), ValueError
    for NaN or a value outside the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r}")
    v = float(value)
    if not lo <= v <= hi:       # also rejects NaN
        raise ValueError(f"{owner}: {name} must be between {lo} and {hi}, got {value!r}")
    return v


def check_bool(value, name, owner):
    """``value`` as a bool: True/False, NumPy bools and the ints 0 and 1 (torch code often
    passes ``batch_first=1``); TypeError for anything else ("yes" is not taken as True)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{owner}: {name} must be a bool, got {value!r}")


def as_parameter(value, name):
    if not isinstance(value, Parameter):
        raise TypeError(f"{name} must be a Parameter, got {type(value).__name__}")
    return value
