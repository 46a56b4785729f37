"""Learning-rate schedules with torch.optim.lr_scheduler's step semantics.

A scheduler sets ``group["lr"]`` of its optimizer's parameter groups each time ``step()`` is
called (once per epoch, after that epoch's optimizer steps).  The arithmetic is torch's,
operation by operation (CosineAnnealingLR's recursive form included), so the learning
rates here and torch's are the same floats at every step.  ``state_dict()`` has torch's
keys, so a schedule saved by either continues in the other.

Like torch's, constructing ``StepLR``, ``ExponentialLR`` or ``CosineAnnealingLR`` records
each group's starting ``lr`` as ``group["initial_lr"]`` (kept if already there: a resumed
optimizer keeps its first rate) and takes the first step, to epoch 0, which leaves the rates
as they are.
"""
import math
from collections.abc import Mapping
from numbers import Real

from microtile.nn._module import check_int
from microtile.nn._optimizers import Optimizer

__all__ = ["LRScheduler", "StepLR", "ExponentialLR", "CosineAnnealingLR", "ReduceLROnPlateau"]


def _real(value, name, owner, minimum=None, below=None):
    """``value`` as a finite float, optionally >= ``minimum`` and < ``below``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (minimum is not None and v < minimum) or (
            below is not None and v >= below):
        bounds = []
        if minimum is not None:
            bounds.append(f">= {minimum}")
        if below is not None:
            bounds.append(f"< {below}")
        raise ValueError(f"{owner}: invalid {name} {value!r} (must be finite"
                         f"{', ' + ' and '.join(bounds) if bounds else ''})")
    return v


def _lr_list(values, n, name, owner):
    try:
        values = list(values)
    except TypeError:
        raise TypeError(f"{owner}: {name} must be a list, got {type(values).__name__}") from None
    if len(values) != n:
        raise ValueError(f"{owner}: {name} has {len(values)} entries, the optimizer "
                         f"{n} parameter groups")
    return [_real(v, f"{name} entry", owner, 0.0) for v in values]


def _check_optimizer(optimizer, owner):
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{owner}: expected a microtile.nn optimizer, got "
                        f"{type(optimizer).__name__}")
    return optimizer


class _Stateful:
    """``state_dict`` / ``load_state_dict`` over a fixed set of torch's keys.

    ``_keys`` maps each key to a checker ``(value, owner) -> value``; loading checks every
    value (and that the keys are exactly these) before setting any.  ``_torch_flags`` are
    torch's bookkeeping flags, saved as False and accepted (and otherwise ignored) on load,
    so the dicts of both libraries load in either.
    """

    _torch_flags = ()

    def _keys(self):
        raise NotImplementedError

    def state_dict(self):
        """The schedule's state (everything but the optimizer), with torch's keys.

        Returns
        -------
        dict
        """
        out = {}
        for key in self._keys():
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, list) else value
        for flag in self._torch_flags:
            out[flag] = False
        return out

    def load_state_dict(self, state_dict):
        """Restore a state saved by ``state_dict`` (here or by torch).  The optimizer's
        learning rates are not changed: load the optimizer's own state for those.

        Raises
        ------
        ValueError
            A missing or unknown key, or a value out of range (nothing is changed).
        TypeError
            Not a dict, or a value of the wrong type.
        """
        owner = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{owner}: expected a dict, got {type(state_dict).__name__}")
        keys = set(state_dict)
        checks = self._keys()
        missing = sorted(set(checks) - keys)
        unknown = sorted(map(str, keys - set(checks) - set(self._torch_flags)))
        if missing or unknown:
            parts = ([f"missing keys {missing}"] if missing else []) + (
                [f"unknown keys {unknown}"] if unknown else [])
            raise ValueError(f"{owner}: {'; '.join(parts)}")
        values = {key: check(state_dict[key], owner) for key, check in checks.items()}
        self._check_loaded(values, owner)
        for key, value in values.items():
            setattr(self, key, value)

    def _check_loaded(self, values, owner):
        """Checks between loaded values (all present and individually valid)."""

    def get_last_lr(self):
        """The learning rates the last ``step`` left in the parameter groups.

        Returns
        -------
        list of float
        """
        return list(self._last_lr)


class LRScheduler(_Stateful):
    """Base class of the epoch schedules: ``step()`` moves to the next epoch and sets every
    group's ``lr`` to ``_next_lrs()``.

    Parameters
    ----------
    optimizer : Optimizer
    """

    _torch_flags = ("_is_initial", "_get_lr_called_within_step")

    def __init__(self, optimizer):
        owner = type(self).__name__
        self.optimizer = _check_optimizer(optimizer, owner)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = -1
        self._step_count = 0
        self._initial = True
        try:
            self.step()
        finally:
            self._initial = False

    def step(self):
        """Move to the next epoch and set each group's learning rate for it."""
        groups = self.optimizer.param_groups
        if len(self.base_lrs) != len(groups):
            raise ValueError(f"{type(self).__name__}: the optimizer has {len(groups)} parameter "
                             f"groups, the schedule was made for {len(self.base_lrs)}")
        self._step_count += 1
        self.last_epoch += 1
        for group, lr in zip(groups, self._next_lrs()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in groups]

    def _next_lrs(self):
        raise NotImplementedError

    def _common_keys(self):
        owner_groups = len(self.optimizer.param_groups)
        return {
            "base_lrs": lambda v, o: _lr_list(v, owner_groups, "base_lrs", o),
            "last_epoch": lambda v, o: check_int(v, "last_epoch", o, -1),
            "_step_count": lambda v, o: check_int(v, "_step_count", o, 0),
            "_last_lr": lambda v, o: _lr_list(v, owner_groups, "_last_lr", o),
        }


class StepLR(LRScheduler):
    """Multiply every group's learning rate by ``gamma`` every ``step_size`` epochs
    (``torch.optim.lr_scheduler.StepLR``).

    Parameters
    ----------
    optimizer : Optimizer
    step_size : int, >= 1
    gamma : float, >= 0
    """

    def __init__(self, optimizer, step_size, gamma=0.1):
        self.step_size = check_int(step_size, "step_size", "StepLR", 1)
        self.gamma = _real(gamma, "gamma", "StepLR", 0.0)
        super().__init__(optimizer)

    def _next_lrs(self):
        groups = self.optimizer.param_groups
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return [group["lr"] for group in groups]
        return [group["lr"] * self.gamma for group in groups]

    def _keys(self):
        return {"step_size": lambda v, o: check_int(v, "step_size", o, 1),
                "gamma": lambda v, o: _real(v, "gamma", o, 0.0), **self._common_keys()}


class ExponentialLR(LRScheduler):
    """Multiply every group's learning rate by ``gamma`` every epoch
    (``torch.optim.lr_scheduler.ExponentialLR``).

    Parameters
    ----------
    optimizer : Optimizer
    gamma : float, >= 0
    """

    def __init__(self, optimizer, gamma):
        self.gamma = _real(gamma, "gamma", "ExponentialLR", 0.0)
        super().__init__(optimizer)

    def _next_lrs(self):
        groups = self.optimizer.param_groups
        if self._initial:
            return [group["lr"] for group in groups]
        return [group["lr"] * self.gamma for group in groups]

    def _keys(self):
        return {"gamma": lambda v, o: _real(v, "gamma", o, 0.0), **self._common_keys()}


class CosineAnnealingLR(LRScheduler):
    """Cosine annealing from each group's initial rate to ``eta_min`` over ``T_max`` epochs,
    then back up, and so on (``torch.optim.lr_scheduler.CosineAnnealingLR``, in its
    recursive form: each rate follows from the current one, so changes made to ``lr`` from
    outside carry on through the schedule, as in torch).

    Parameters
    ----------
    optimizer : Optimizer
    T_max : int, >= 1
        Epochs from the initial rate down to ``eta_min``.
    eta_min : float, >= 0
    """

    def __init__(self, optimizer, T_max, eta_min=0.0):
        self.T_max = check_int(T_max, "T_max", "CosineAnnealingLR", 1)
        self.eta_min = _real(eta_min, "eta_min", "CosineAnnealingLR", 0.0)
        super().__init__(optimizer)

    def _next_lrs(self):
        groups = self.optimizer.param_groups
        e, T, lo = self.last_epoch, self.T_max, self.eta_min
        if self._initial:
            return [group["lr"] for group in groups]
        if (e - 1 - T) % (2 * T) == 0:
            # At the bottom the recursion's ratio is 0/0: torch steps up by the first
            # increment of the rising half instead.
            return [group["lr"] + (base - lo) * (1 - math.cos(math.pi / T)) / 2
                    for base, group in zip(self.base_lrs, groups)]
        return [(1 + math.cos(math.pi * e / T)) / (1 + math.cos(math.pi * (e - 1) / T))
                * (group["lr"] - lo) + lo for group in groups]

    def _keys(self):
        return {"T_max": lambda v, o: check_int(v, "T_max", o, 1),
                "eta_min": lambda v, o: _real(v, "eta_min", o, 0.0), **self._common_keys()}


def _choice(options, name):
    def check(value, owner):
        if value not in options:
            raise ValueError(f"{owner}: {name} must be one of {list(options)}, got {value!r}")
        return value
    return check


class ReduceLROnPlateau(_Stateful):
    """Multiply the learning rates by ``factor`` when a metric has stopped improving for
    more than ``patience`` epochs (``torch.optim.lr_scheduler.ReduceLROnPlateau``).

    ``step(metric)`` after each epoch.  In ``"min"`` mode the metric improves when it is
    below ``best * (1 - threshold)`` (``threshold_mode="rel"``) or ``best - threshold``
    (``"abs"``); in ``"max"`` mode above ``best * (1 + threshold)`` or ``best + threshold``.
    After a reduction, ``cooldown`` epochs pass before bad epochs count again.  A rate never
    goes below its group's ``min_lr``, and changes smaller than ``eps`` are skipped.

    Parameters
    ----------
    optimizer : Optimizer
    mode : {"min", "max"}
    factor : float in [0, 1)
    patience : int, >= 0
    threshold : float, >= 0
    threshold_mode : {"rel", "abs"}
    cooldown : int, >= 0
    min_lr : float or list of float (one per group), >= 0
    eps : float, >= 0
    """

    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0.0, eps=1e-8):
        owner = "ReduceLROnPlateau"
        self.optimizer = _check_optimizer(optimizer, owner)
        n = len(optimizer.param_groups)
        self.mode = _choice(("min", "max"), "mode")(mode, owner)
        self.factor = _real(factor, "factor", owner, 0.0, 1.0)
        self.patience = check_int(patience, "patience", owner, 0)
        self.threshold = _real(threshold, "threshold", owner, 0.0)
        self.threshold_mode = _choice(("rel", "abs"), "threshold_mode")(threshold_mode, owner)
        self.cooldown = check_int(cooldown, "cooldown", owner, 0)
        if isinstance(min_lr, (list, tuple)):
            self.min_lrs = _lr_list(min_lr, n, "min_lr", owner)
            self.default_min_lr = None
        else:
            self.default_min_lr = _real(min_lr, "min_lr", owner, 0.0)
            self.min_lrs = [self.default_min_lr] * n
        self.eps = _real(eps, "eps", owner, 0.0)
        self.last_epoch = 0
        self._last_lr = [group["lr"] for group in optimizer.param_groups]
        self.mode_worse = math.inf if self.mode == "min" else -math.inf
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    def _is_better(self, a, best):
        if self.mode == "min":
            return a < (best * (1.0 - self.threshold) if self.threshold_mode == "rel"
                        else best - self.threshold)
        return a > (best * (self.threshold + 1.0) if self.threshold_mode == "rel"
                    else best + self.threshold)

    def step(self, metric):
        """Record the epoch's ``metric`` and reduce the rates if it has plateaued.

        Parameters
        ----------
        metric : float
            NaN never counts as an improvement.
        """
        current = float(metric)
        self.last_epoch += 1
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0     # bad epochs in the cooldown do not count
        if self.num_bad_epochs > self.patience:
            self._reduce()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _reduce(self):
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise ValueError(f"ReduceLROnPlateau: the optimizer has {len(groups)} parameter "
                                 f"groups but min_lr lists {len(self.min_lrs)}")
            self.min_lrs = [self.default_min_lr] * len(groups)
        for group, min_lr in zip(groups, self.min_lrs):
            old = float(group["lr"])
            new = max(old * self.factor, min_lr)
            if old - new > self.eps:
                group["lr"] = new

    def _keys(self):
        n = len(self.optimizer.param_groups)

        def default_min_lr(v, o):
            return None if v is None else _real(v, "default_min_lr", o, 0.0)

        def best(v, o):
            v = float(v)
            if math.isnan(v):
                raise ValueError(f"{o}: best is NaN")
            return v

        return {
            "factor": lambda v, o: _real(v, "factor", o, 0.0, 1.0),
            "default_min_lr": default_min_lr,
            "min_lrs": lambda v, o: _lr_list(v, n, "min_lrs", o),
            "patience": lambda v, o: check_int(v, "patience", o, 0),
            "cooldown": lambda v, o: check_int(v, "cooldown", o, 0),
            "eps": lambda v, o: _real(v, "eps", o, 0.0),
            "last_epoch": lambda v, o: check_int(v, "last_epoch", o, 0),
            "_last_lr": lambda v, o: _lr_list(v, n, "_last_lr", o),
            "mode_worse": lambda v, o: float(v),
            "mode": _choice(("min", "max"), "mode"),
            "threshold": lambda v, o: _real(v, "threshold", o, 0.0),
            "threshold_mode": _choice(("rel", "abs"), "threshold_mode"),
            "best": best,
            "cooldown_counter": lambda v, o: check_int(v, "cooldown_counter", o, 0),
            "num_bad_epochs": lambda v, o: check_int(v, "num_bad_epochs", o, 0),
        }

    def _check_loaded(self, values, owner):
        # torch recomputes mode_worse from mode on load; a mismatch means a corrupt dict.
        want = math.inf if values["mode"] == "min" else -math.inf
        if values["mode_worse"] != want:
            raise ValueError(f"{owner}: mode_worse {values['mode_worse']} does not go with "
                             f"mode {values['mode']!r}")
