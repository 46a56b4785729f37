"""Module: what every layer shares (parameters, state dicts, reusable work buffers)."""
import numpy as np

from microtile.nn._parameter import Parameter

# Shapes of one buffer kept at once: a training batch, the last partial batch, and the same
# two for validation, so fit never reallocates once it has seen each of them.
_BUFFER_SHAPES = 4


class Module:
    """Base class of the layers: ``y = m(x)``, ``dx = m.backward(dy)``, ``m.parameters()``.

    Arrays a module returns from ``forward`` and ``backward`` are its own work buffers: they
    are reused by the next call with the same shapes (that is what keeps a training step free
    of allocations), so copy a result you want to keep across calls.
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

    # -- work buffers ---------------------------------------------------------------------
    def _buffer(self, key, shape, dtype):
        """A reusable array of ``shape`` and ``dtype`` for ``key`` (contents undefined)."""
        try:
            bufs = self.__dict__["_bufs"]
        except KeyError:
            bufs = self.__dict__["_bufs"] = {}
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
