"""Optimizers with torch.optim's update rules, parameter groups and state dicts.

The arithmetic is in ``microtile.nn._optim_kernels`` (nogil loops, one call per parameter per
step); these classes validate the hyper-parameters, keep the parameter groups and the
per-parameter state buffers (allocated on a parameter's first step and reused after), and
convert the state to and from torch's ``state_dict`` layout::

    {"state": {index: {"step": 3.0, "exp_avg": array, ...}},
     "param_groups": [{"lr": 0.1, ..., "params": [0, 1, ...]}, ...]}

where ``index`` counts the parameters through the groups in order.  Names, keys and values
are torch's, so ``{"state": {i: {k: v.numpy() ...}}, ...}`` made from a torch optimizer's
state dict loads here and continues with the same numbers (and the other way round: torch
accepts the Python floats used here for ``step``).
"""
import math
from collections.abc import Mapping

import numpy as np

from microtile.nn import _optim_kernels as _optim
from microtile.nn._module import check_bool
from microtile.nn._parameter import Parameter

class _Required:
    """The default of a hyper-parameter every group must set (SGD's lr)."""

    def __repr__(self):
        return "<required>"


_REQUIRED = _Required()

# Torch's implementation switches, with torch's defaults: they choose how torch computes
# (for-each over tensor lists, fused kernels, autograd through the step, CUDA graphs), not
# what, so any value (None or a bool) is accepted and kept: a torch state dict loads as is.
_SWITCHES = {"foreach": None, "fused": None, "differentiable": False, "capturable": False}


def _sw(name):
    """An ``_options`` entry for one of torch's switches."""
    return (name, _SWITCHES[name], "switch")


def _nonneg(value, name, owner):
    v = float(value)
    if not v >= 0.0:  # also rejects NaN
        raise ValueError(f"{owner}: invalid {name} {value!r} (must be >= 0)")
    return v


def _beta_pair(betas, owner):
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: betas must be a pair of floats, got {betas!r}") from None
    for k, b in enumerate((b1, b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{owner}: invalid beta parameter at index {k}: {b}")
    return (b1, b2)


def _switch(value, name, owner):
    if value is None:
        return None
    return check_bool(value, name, owner)


def _keys_error(owner, where, missing=(), unknown=()):
    parts = []
    if missing:
        parts.append(f"missing keys {sorted(missing)}")
    if unknown:
        parts.append(f"unknown keys {sorted(map(str, unknown))}")
    return ValueError(f"{owner}: {where}: {'; '.join(parts)}")


class Optimizer:
    """Base class: parameter groups, per-parameter state, ``step``, state dicts.

    A subclass lists its group options in torch's key order in ``_options`` as
    ``(name, default, kind)``: ``"hyper"`` options are validated by ``_check_hyper``;
    ``"fixed"`` ones are torch options implemented at one value only (a group or state dict
    giving another value raises); ``"switch"`` ones are torch's implementation switches
    (see ``_SWITCHES``).  ``_update(p, group)`` updates one parameter; ``_state_keys(group)``
    gives ``(required, allowed)`` names of a parameter's state entries.

    Parameters
    ----------
    params : iterable of Parameter, or iterable of dict
        The parameters, or parameter groups: dicts with ``"params"`` (a Parameter or an
        iterable of them) and any option, which overrides ``defaults`` for that group.
    defaults : dict
        The options given to the constructor.
    """

    _options = ()

    def __init__(self, params, defaults):
        owner = type(self).__name__
        if isinstance(params, (Parameter, Mapping)):
            raise TypeError(f"{owner}: params must be an iterable of Parameters or of "
                            f"parameter groups, not a single {type(params).__name__}")
        try:
            groups = list(params)
        except TypeError:
            raise TypeError(f"{owner}: params must be an iterable of Parameters or of "
                            f"parameter groups, got {type(params).__name__}") from None
        if not groups:
            raise ValueError(f"{owner}: got an empty parameter list")
        self.defaults = self._check_group(dict(defaults), "defaults", fill=False)
        self.param_groups = []
        self.state = {}
        if not isinstance(groups[0], Mapping):
            groups = [{"params": groups}]
        for k, g in enumerate(groups):
            if not isinstance(g, Mapping):
                raise TypeError(f"{owner}: params[{k}] is a {type(g).__name__}; a list of "
                                f"parameter groups must hold only dicts")
            self.add_param_group(g)

    # -- groups -----------------------------------------------------------------------------
    def add_param_group(self, param_group):
        """Add a parameter group (a dict with ``"params"`` and any options; the options it
        leaves out take the constructor's values).

        Raises
        ------
        ValueError
            A parameter already in a group (or twice in this one), an unknown option, or an
            invalid value.
        TypeError
            ``params`` holds something other than Parameters.
        """
        owner = type(self).__name__
        if not isinstance(param_group, Mapping):
            raise TypeError(f"{owner}: a parameter group must be a dict, got "
                            f"{type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError(f"{owner}: a parameter group needs a 'params' entry")
        where = f"param_groups[{len(self.param_groups)}]"
        params = param_group["params"]
        if isinstance(params, Parameter):
            params = [params]
        elif isinstance(params, (Mapping, np.ndarray)):
            raise TypeError(f"{owner}: {where}['params'] must be Parameters, got a "
                            f"{type(params).__name__}")
        params = list(params)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for i, p in enumerate(params):
            if not isinstance(p, Parameter):
                raise TypeError(f"{owner}: params[{i}] is a {type(p).__name__}, not a Parameter")
            if id(p) in seen:
                raise ValueError(f"{owner}: params[{i}] appears twice (parameters may be in "
                                 f"one group, once)")
            seen.add(id(p))
        options = {k: v for k, v in param_group.items() if k != "params"}
        for k, v in self.defaults.items():
            options.setdefault(k, v)
        # "params" first, as torch orders a group
        group = {"params": params, **self._check_group(options, where, fill=True)}
        self.param_groups.append(group)
        for p in params:
            self._new_param(p, group)

    def _check_group(self, options, where, fill):
        """``options`` validated and in torch's key order.  With ``fill`` the fixed options and
        switches left out take their values (a group's hyper-parameters must all be there);
        without, only what is given is checked (the constructor's defaults)."""
        owner = type(self).__name__
        known = {name for name, _, _ in self._options} | {"initial_lr"}
        unknown = [k for k in options if k not in known]
        if unknown:
            raise _keys_error(owner, where, unknown=unknown)
        out = {}
        missing = []
        for name, default, kind in self._options:
            if name not in options:
                if kind == "hyper" and fill:
                    missing.append(name)
                elif kind != "hyper" and fill:
                    out[name] = default
                continue
            value = options[name]
            if kind == "fixed":
                try:
                    same = value is default or bool(value == default)
                except (TypeError, ValueError):     # an array, say
                    same = False
                if not same:
                    raise ValueError(f"{owner}: {where}: {name}={value!r} is not supported "
                                     f"(only {default!r})")
                out[name] = default
            elif kind == "switch":
                out[name] = _switch(value, name, owner)
            elif value is _REQUIRED:
                # SGD without lr: allowed in the defaults if every group gives its own.
                if fill:
                    missing.append(name)
            else:
                out[name] = value
        if missing:
            raise _keys_error(owner, where, missing=missing)
        self._check_hyper(out, owner)
        if "initial_lr" in options:
            # Set by a learning-rate scheduler (as torch's do): the lr it started from.
            out["initial_lr"] = _nonneg(options["initial_lr"], "initial_lr", owner)
        return out

    def _check_hyper(self, group, owner):
        """Validate and normalise the hyper-parameters present in ``group`` in place."""
        for name in ("lr", "eps", "weight_decay", "momentum", "alpha"):
            if name in group:
                group[name] = _nonneg(group[name], "learning rate" if name == "lr" else name,
                                      owner)

    def _new_param(self, p, group):
        """Called once for each parameter a group adds (AdaGrad sets up its state here)."""

    @property
    def params(self):
        """Every parameter, through the groups in order (the state-dict indices)."""
        return [p for g in self.param_groups for p in g["params"]]

    # -- stepping ---------------------------------------------------------------------------
    def zero_grad(self):
        """Set every parameter's gradient to zero."""
        for g in self.param_groups:
            for p in g["params"]:
                p.zero_grad()

    def step(self):
        """Update every parameter in place from its gradient, with its group's options."""
        for group in self.param_groups:
            for p in group["params"]:
                with p._lock:       # not while a backward pass in another thread adds to grad
                    if p._grad_is_zero:
                        # No backward since zero_grad: the update sees a zero gradient.
                        p._grad.fill(0)
                        p._grad_is_zero = False
                    self._update(p, group)
                    p._apply_prune()        # pruned weights stay zero (nn.prune)

    def _update(self, p, group):
        raise NotImplementedError

    def _buffers(self, p, names):
        """The state entry of ``p``, with a zeroed buffer (param-shaped) for each of ``names``
        it lacks and ``step`` 0 when new."""
        st = self.state.get(p)
        if st is None:
            st = self.state[p] = {"step": 0}
        for name in names:
            if name not in st:
                st[name] = np.zeros(p.shape, p.dtype)
        return st

    def _state_keys(self, group):
        """``(required, allowed)``: the names a state entry of a parameter in ``group`` must
        have, and those it may have."""
        raise NotImplementedError

    # -- state dicts ------------------------------------------------------------------------
    def state_dict(self):
        """The optimizer's state in torch's layout (copies: later steps do not change it).

        Returns
        -------
        dict
            ``{"state": {index: {name: value}}, "param_groups": [group, ...]}``: ``index``
            counts the parameters through the groups; state buffers are arrays of the
            parameter's shape and dtype, ``step`` a float (torch keeps a float tensor);
            each group holds its options and ``"params"``, the list of its indices.
        """
        index = {}
        groups = []
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = []
            for p in g["params"]:
                index[id(p)] = len(index)
                packed["params"].append(index[id(p)])
            groups.append(packed)
        state = {}
        for p in self.params:
            st = self.state.get(p)
            if st is not None:
                state[index[id(p)]] = {k: (float(v) if k == "step" else np.array(v, copy=True))
                                       for k, v in st.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore a state saved by ``state_dict`` (here or, converted to arrays, by torch).

        Groups must match this optimizer's in number and size; group options replace the
        current ones; each state entry must have the names the optimizer keeps for its
        group's options, arrays of the parameter's shape (cast to its dtype) and an integral
        ``step``.  Anything else raises and leaves the optimizer unchanged.

        Parameters
        ----------
        state_dict : dict

        Raises
        ------
        ValueError
            A missing or unknown key, a group or parameter count that differs, a wrong shape
            or an invalid option.
        TypeError
            Not a dict, or arrays of a non-numeric dtype.
        """
        owner = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{owner}.load_state_dict: expected a dict, got "
                            f"{type(state_dict).__name__}")
        keys = set(state_dict)
        if keys != {"state", "param_groups"}:
            raise _keys_error(owner, "load_state_dict", {"state", "param_groups"} - keys,
                              keys - {"state", "param_groups"})
        saved_groups = list(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{owner}.load_state_dict: the state dict has {len(saved_groups)} "
                             f"parameter groups, the optimizer {len(self.param_groups)}")
        new_groups = []
        id_map = {}
        for k, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"load_state_dict: param_groups[{k}]"
            if not isinstance(saved, Mapping) or "params" not in saved:
                raise ValueError(f"{owner}: {where} is not a dict with 'params'")
            indices = list(saved["params"])
            if len(indices) != len(group["params"]):
                raise ValueError(f"{owner}: {where} has {len(indices)} parameters, the "
                                 f"optimizer's group {len(group['params'])}")
            for i, p in zip(indices, group["params"]):
                if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i in id_map:
                    raise ValueError(f"{owner}: {where}: parameter index {i!r} is not a "
                                     f"distinct integer")
                id_map[int(i)] = (p, k)
            options = {key: v for key, v in saved.items() if key != "params"}
            new_groups.append({"params": group["params"],
                               **self._check_group(options, where, fill=True)})
        saved_state = state_dict["state"]
        if not isinstance(saved_state, Mapping):
            raise TypeError(f"{owner}.load_state_dict: 'state' must be a dict, got "
                            f"{type(saved_state).__name__}")
        new_state = {}
        for i, entry in saved_state.items():
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or int(i) not in id_map:
                raise ValueError(f"{owner}.load_state_dict: state for parameter index {i!r}, "
                                 f"which no group lists")
            p, k = id_map[int(i)]
            new_state[p] = self._load_entry(entry, p, new_groups[k], f"state[{i}]")
        # Everything checked: only now is anything replaced.
        self.param_groups[:] = new_groups
        self.state = new_state

    def _load_entry(self, entry, p, group, where):
        owner = type(self).__name__
        if not isinstance(entry, Mapping):
            raise ValueError(f"{owner}.load_state_dict: {where} is not a dict")
        required, allowed = self._state_keys(group)
        keys = set(entry)
        if not required <= keys <= allowed:
            raise _keys_error(owner, f"load_state_dict: {where}", required - keys,
                              keys - allowed)
        out = {}
        for name, value in entry.items():
            if name == "step":
                try:
                    step = float(value)
                except (TypeError, ValueError):
                    raise ValueError(f"{owner}.load_state_dict: {where}['step'] is "
                                     f"{value!r}, not a number") from None
                if not (math.isfinite(step) and step >= 0 and step.is_integer()):
                    raise ValueError(f"{owner}.load_state_dict: {where}['step'] must be a "
                                     f"whole number >= 0, got {value!r}")
                out[name] = int(step)
                continue
            arr = np.asarray(value)
            if arr.dtype.kind not in "iuf":
                raise TypeError(f"{owner}.load_state_dict: {where}[{name!r}] has dtype "
                                f"{arr.dtype}")
            if arr.shape != p.shape:
                raise ValueError(f"{owner}.load_state_dict: {where}[{name!r}] has shape "
                                 f"{arr.shape}, the parameter {p.shape}")
            out[name] = np.array(arr, dtype=p.dtype, order="C", copy=True)
        return out


def _flat(a):
    return None if a is None else a.reshape(-1)


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum, weight decay.

    As ``torch.optim.SGD`` (dampening 0): ``g = grad + weight_decay * p``;
    with momentum ``buf = g`` on the first step, then ``buf = momentum * buf + g``, and the step
    direction is ``buf`` (or ``g + momentum * buf`` with Nesterov); ``p -= lr * direction``.
    State: ``momentum_buffer`` (with momentum only).

    Parameters
    ----------
    params : iterable of Parameter or of dict (parameter groups)
    lr : float
    momentum, weight_decay : float, >= 0
    nesterov : bool
        Needs ``momentum > 0``.
    """

    _options = (("lr", _REQUIRED, "hyper"), ("momentum", 0.0, "hyper"),
                ("dampening", 0, "fixed"), ("weight_decay", 0.0, "hyper"),
                ("nesterov", False, "hyper"), ("maximize", False, "fixed"),
                _sw("foreach"), _sw("differentiable"), _sw("fused"))

    def __init__(self, params, lr=_REQUIRED, momentum=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov))

    def _check_hyper(self, group, owner):
        super()._check_hyper(group, owner)
        if "nesterov" in group:
            group["nesterov"] = check_bool(group["nesterov"], "nesterov", owner)
            if group["nesterov"] and group.get("momentum", 0.0) == 0:
                raise ValueError(f"{owner}: Nesterov momentum needs a momentum > 0")

    def _update(self, p, group):
        momentum = group["momentum"]
        buf = None
        first = False
        if momentum != 0:
            st = self.state.get(p)
            if st is None:
                st = self.state[p] = {}
            buf = st.get("momentum_buffer")
            if buf is None:
                # torch starts the buffer as a copy of the first gradient: the kernel
                # writes it whole, so it need not be zeroed.
                buf = st["momentum_buffer"] = np.empty(p.shape, p.dtype)
                first = True
        _optim.sgd_step(p._flat_data, p._flat_grad, _flat(buf), group["lr"], momentum,
                        group["weight_decay"], group["nesterov"], first)

    def _state_keys(self, group):
        if group["momentum"] != 0:
            return {"momentum_buffer"}, {"momentum_buffer"}
        return set(), {"momentum_buffer"}


class Adam(Optimizer):
    """Adam (``torch.optim.Adam`` with amsgrad off; weight decay added to the gradient, or
    applied to the parameter with ``decoupled_weight_decay``, which is AdamW).

    State: ``step``, ``exp_avg``, ``exp_avg_sq``.

    Parameters
    ----------
    params : iterable of Parameter or of dict (parameter groups)
    lr : float
    betas : (float, float)
        Each in [0, 1).
    eps, weight_decay : float, >= 0
    decoupled_weight_decay : bool
        As torch: AdamW's rule, ``p *= 1 - lr * weight_decay`` before each step.
    """

    _options = (("lr", 1e-3, "hyper"), ("betas", (0.9, 0.999), "hyper"), ("eps", 1e-8, "hyper"),
                ("weight_decay", 0.0, "hyper"), ("amsgrad", False, "fixed"),
                ("maximize", False, "fixed"), _sw("foreach"), _sw("capturable"),
                _sw("differentiable"), _sw("fused"), ("decoupled_weight_decay", False, "hyper"))

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 decoupled_weight_decay=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled_weight_decay))

    def _check_hyper(self, group, owner):
        super()._check_hyper(group, owner)
        if "betas" in group:
            group["betas"] = _beta_pair(group["betas"], owner)
        if "decoupled_weight_decay" in group:
            group["decoupled_weight_decay"] = check_bool(group["decoupled_weight_decay"],
                                                    "decoupled_weight_decay", owner)

    def _update(self, p, group):
        st = self._buffers(p, ("exp_avg", "exp_avg_sq"))
        st["step"] += 1
        b1, b2 = group["betas"]
        _optim.adam_step(p._flat_data, p._flat_grad, _flat(st["exp_avg"]),
                         _flat(st["exp_avg_sq"]), group["lr"], b1, b2, group["eps"],
                         group["weight_decay"], st["step"], group["decoupled_weight_decay"])

    def _state_keys(self, group):
        names = {"step", "exp_avg", "exp_avg_sq"}
        return names, names


class AdamW(Adam):
    """AdamW (``torch.optim.AdamW``, amsgrad off): Adam whose weight decay shrinks the
    parameter, ``p *= 1 - lr * weight_decay``, instead of entering the moments.

    State: ``step``, ``exp_avg``, ``exp_avg_sq``.

    Parameters
    ----------
    params : iterable of Parameter or of dict (parameter groups)
    lr : float
    betas : (float, float)
        Each in [0, 1).
    eps, weight_decay : float, >= 0
    """

    _options = tuple((n, True, "fixed") if n == "decoupled_weight_decay" else (n, d, k)
                     for n, d, k in Adam._options)
    _options = tuple((n, 1e-2, k) if n == "weight_decay" else (n, d, k) for n, d, k in _options)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        Optimizer.__init__(self, params, dict(lr=lr, betas=betas, eps=eps,
                                              weight_decay=weight_decay))


class AdaGrad(Optimizer):
    """AdaGrad (``torch.optim.Adagrad`` with lr_decay 0 and a zero initial accumulator):
    ``g = grad + weight_decay * p``, ``sum += g * g``, ``p -= lr * g / (sqrt(sum) + eps)``.

    State: ``step``, ``sum`` (created with the optimizer, as torch does).

    Parameters
    ----------
    params : iterable of Parameter or of dict (parameter groups)
    lr, eps, weight_decay : float, >= 0
    """

    _options = (("lr", 1e-2, "hyper"), ("lr_decay", 0, "fixed"), ("eps", 1e-10, "hyper"),
                ("weight_decay", 0.0, "hyper"), ("initial_accumulator_value", 0, "fixed"),
                _sw("foreach"), ("maximize", False, "fixed"), _sw("differentiable"),
                _sw("fused"))

    def __init__(self, params, lr=1e-2, eps=1e-10, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))

    def _new_param(self, p, group):
        self._buffers(p, ("sum",))

    def _update(self, p, group):
        st = self._buffers(p, ("sum",))
        st["step"] += 1
        _optim.adagrad_step(p._flat_data, p._flat_grad, _flat(st["sum"]), group["lr"],
                            group["eps"], group["weight_decay"])

    def _state_keys(self, group):
        return {"step", "sum"}, {"step", "sum"}


class RMSprop(Optimizer):
    """RMSprop (``torch.optim.RMSprop``): ``g = grad + weight_decay * p``,
    ``square_avg = alpha * square_avg + (1 - alpha) * g * g``; centered, ``grad_avg`` is the
    same average of ``g`` and ``avg = sqrt(square_avg - grad_avg**2) + eps``, else
    ``avg = sqrt(square_avg) + eps``; with momentum ``buf = momentum * buf + g / avg`` and
    ``p -= lr * buf``, else ``p -= lr * g / avg``.

    State: ``step``, ``square_avg``, ``momentum_buffer`` (momentum > 0), ``grad_avg``
    (centered).

    Parameters
    ----------
    params : iterable of Parameter or of dict (parameter groups)
    lr, alpha, eps, weight_decay, momentum : float, >= 0
    centered : bool
    """

    _options = (("lr", 1e-2, "hyper"), ("momentum", 0.0, "hyper"), ("alpha", 0.99, "hyper"),
                ("eps", 1e-8, "hyper"), ("centered", False, "hyper"),
                ("weight_decay", 0.0, "hyper"), _sw("capturable"), _sw("foreach"),
                ("maximize", False, "fixed"), _sw("differentiable"))

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered))

    def _check_hyper(self, group, owner):
        super()._check_hyper(group, owner)
        if "centered" in group:
            group["centered"] = check_bool(group["centered"], "centered", owner)

    def _wanted(self, group):
        names = ["square_avg"]
        if group["momentum"] > 0:
            names.append("momentum_buffer")
        if group["centered"]:
            names.append("grad_avg")
        return names

    def _update(self, p, group):
        st = self._buffers(p, self._wanted(group))
        st["step"] += 1
        _optim.rmsprop_step(p._flat_data, p._flat_grad, _flat(st["square_avg"]),
                            _flat(st["grad_avg"]) if group["centered"] else None,
                            _flat(st.get("momentum_buffer")), group["lr"], group["alpha"],
                            group["eps"], group["weight_decay"], group["momentum"])

    def _state_keys(self, group):
        return ({"step", *self._wanted(group)},
                {"step", "square_avg", "momentum_buffer", "grad_avg"})
