"""Optimizers with torch.optim's update rules, updating parameters in place.

The arithmetic is in ``microtile.nn._optim_kernels`` (nogil loops, one call per parameter per step);
these classes keep the hyper-parameters and the per-parameter state buffers, which are
allocated on the first step and reused after.
"""
import numpy as np

from microtile.nn import _optim_kernels as _optim
from microtile.nn._parameter import Parameter


def _nonneg(value, name, owner):
    v = float(value)
    if not v >= 0.0:  # also rejects NaN
        raise ValueError(f"{owner}: invalid {name} {value!r} (must be >= 0)")
    return v


class Optimizer:
    """Base class: a list of Parameters and per-parameter state."""

    def __init__(self, params):
        if isinstance(params, Parameter):
            raise TypeError(f"{type(self).__name__}: params must be an iterable of Parameters, "
                            f"not a single Parameter")
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        seen = set()
        for i, p in enumerate(params):
            if not isinstance(p, Parameter):
                raise TypeError(f"{type(self).__name__}: params[{i}] is a "
                                f"{type(p).__name__}, not a Parameter")
            if id(p) in seen:
                raise ValueError(f"{type(self).__name__}: params[{i}] appears twice")
            seen.add(id(p))
        self.params = params
        self.state = [None] * len(params)
        self.step_count = 0

    def zero_grad(self):
        """Set every parameter's gradient to zero."""
        for p in self.params:
            p.zero_grad()

    def step(self):
        """Update every parameter in place from its gradient."""
        self.step_count += 1
        for i, p in enumerate(self.params):
            with p._lock:       # not while a backward pass in another thread adds to grad
                if p._grad_is_zero:
                    # No backward since zero_grad: the update sees a zero gradient.
                    p._grad.fill(0)
                    p._grad_is_zero = False
                self._update(i, p)

    def _state_buffers(self, i, p, names):
        st = self.state[i]
        if st is None:
            st = self.state[i] = {name: np.zeros(p.size, p.dtype) for name in names}
            st["step"] = 0
        return st


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum, weight decay.

    As ``torch.optim.SGD`` (dampening 0): ``g = grad + weight_decay * p``;
    with momentum ``buf = g`` on the first step, then ``buf = momentum * buf + g``, and the step
    direction is ``buf`` (or ``g + momentum * buf`` with Nesterov); ``p -= lr * direction``.

    Parameters
    ----------
    params : iterable of Parameter
    lr : float
    momentum, weight_decay : float, >= 0
    nesterov : bool
        Needs ``momentum > 0``.
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params)
        self.lr = _nonneg(lr, "learning rate", "SGD")
        self.momentum = _nonneg(momentum, "momentum", "SGD")
        self.weight_decay = _nonneg(weight_decay, "weight_decay", "SGD")
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0:
            raise ValueError("SGD: Nesterov momentum needs a momentum > 0")

    def _update(self, i, p):
        buf = None
        first = False
        if self.momentum != 0:
            st = self._state_buffers(i, p, ("momentum_buffer",))
            buf = st["momentum_buffer"]
            first = st["step"] == 0
            st["step"] += 1
        _optim.sgd_step(p._flat_data, p._flat_grad, buf, self.lr, self.momentum,
                        self.weight_decay, self.nesterov, first)


class Adam(Optimizer):
    """Adam (``torch.optim.Adam`` with amsgrad off; weight decay added to the gradient).

    Parameters
    ----------
    params : iterable of Parameter
    lr : float
    betas : (float, float)
        Each in [0, 1).
    eps, weight_decay : float, >= 0
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params)
        self.lr = _nonneg(lr, "learning rate", "Adam")
        try:
            b1, b2 = (float(b) for b in betas)
        except (TypeError, ValueError):
            raise ValueError(f"Adam: betas must be a pair of floats, got {betas!r}") from None
        for k, b in enumerate((b1, b2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Adam: invalid beta parameter at index {k}: {b}")
        self.betas = (b1, b2)
        self.eps = _nonneg(eps, "epsilon", "Adam")
        self.weight_decay = _nonneg(weight_decay, "weight_decay", "Adam")

    def _update(self, i, p):
        st = self._state_buffers(i, p, ("exp_avg", "exp_avg_sq"))
        st["step"] += 1
        _optim.adam_step(p._flat_data, p._flat_grad, st["exp_avg"], st["exp_avg_sq"], self.lr,
                         self.betas[0], self.betas[1], self.eps, self.weight_decay, st["step"])


class AdaGrad(Optimizer):
    """AdaGrad (``torch.optim.Adagrad`` with lr_decay 0 and a zero initial accumulator):
    ``sum += g * g``, ``p -= lr * g / (sqrt(sum) + eps)``.

    Parameters
    ----------
    params : iterable of Parameter
    lr, eps : float, >= 0
    """

    def __init__(self, params, lr=1e-2, eps=1e-10):
        super().__init__(params)
        self.lr = _nonneg(lr, "learning rate", "AdaGrad")
        self.eps = _nonneg(eps, "epsilon", "AdaGrad")

    def _update(self, i, p):
        st = self._state_buffers(i, p, ("sum",))
        st["step"] += 1
        _optim.adagrad_step(p._flat_data, p._flat_grad, st["sum"], self.lr, self.eps)


class RMSprop(Optimizer):
    """RMSprop (``torch.optim.RMSprop``, not centered, no momentum):
    ``avg = alpha * avg + (1 - alpha) * g * g``, ``p -= lr * g / (sqrt(avg) + eps)``.

    Parameters
    ----------
    params : iterable of Parameter
    lr, alpha, eps : float, >= 0
    """

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8):
        super().__init__(params)
        self.lr = _nonneg(lr, "learning rate", "RMSprop")
        self.alpha = _nonneg(alpha, "alpha", "RMSprop")
        self.eps = _nonneg(eps, "epsilon", "RMSprop")

    def _update(self, i, p):
        st = self._state_buffers(i, p, ("square_avg",))
        st["step"] += 1
        _optim.rmsprop_step(p._flat_data, p._flat_grad, st["square_avg"], self.lr, self.alpha,
                            self.eps)

