"""gradcheck: analytic gradients against central finite differences."""
import math
import numbers

import numpy as np

from microtile._common._checks import as_float_array

# Defaults per dtype: (eps, rtol, atol).  float64 as torch.autograd.gradcheck; float32 can
# only be checked loosely (its rounding error divided by eps swamps small differences).
_DEFAULTS = {np.dtype(np.float64): (1e-6, 1e-3, 1e-5), np.dtype(np.float32): (1e-3, 1e-2, 1e-2)}


def _as_scalar_objective(fn_or_layer, target, r_seed=0):
    """(objective(x) -> float, analytic(x) -> (dx, [(name, param, dparam)]), params)."""
    if target is not None:
        loss = fn_or_layer
        if not (callable(getattr(loss, "forward", None))
                and callable(getattr(loss, "backward", None))):
            raise TypeError(f"gradcheck: with target=, expected a loss (forward(pred, target)"
                            f"/backward()), got {type(loss).__name__}")

        def value(x):
            return float(loss.forward(x, target))

        def analytic(x):
            loss.forward(x, target)
            return np.array(loss.backward(), dtype=np.float64), []
        return value, analytic, []

    is_layer = callable(getattr(fn_or_layer, "backward", None)) and callable(
        getattr(fn_or_layer, "forward", None))
    state = {}

    if is_layer:
        layer = fn_or_layer
        named = (layer.named_parameters() if callable(getattr(layer, "named_parameters", None))
                 else [(str(i), p) for i, p in enumerate(getattr(layer, "parameters",
                                                                 lambda: [])())])

        def run(x):
            return layer.forward(x), None
    else:
        if not callable(fn_or_layer):
            raise TypeError("gradcheck: expected a layer (forward/backward), a loss with "
                            "target=, or a callable returning (y, vjp)")
        named = []

        def run(x):
            res = fn_or_layer(x)
            if not (isinstance(res, tuple) and len(res) == 2 and callable(res[1])):
                raise TypeError("gradcheck: a function must return (y, vjp) with vjp(dy) -> dx")
            return res

    def weights(y):
        r = state.get("r")
        if r is None:
            y = np.asarray(y)
            r = np.random.default_rng(r_seed).standard_normal(y.shape)
            state["r"] = r
        return r

    def value(x):
        y, _ = run(x)
        y64 = np.asarray(y, dtype=np.float64)
        return float(np.sum(weights(y64) * y64))

    def analytic(x):
        y, vjp = run(x)
        r = weights(y)
        dy = r.astype(np.asarray(y).dtype) if np.ndim(y) else np.asarray(y).dtype.type(r)
        for _, p in named:
            p.zero_grad()
        dx = layer.backward(dy) if is_layer else vjp(dy)
        grads = [(name, p, np.array(p.grad, dtype=np.float64)) for name, p in named]
        return np.array(dx, dtype=np.float64), grads
    return value, analytic, named


def _numeric(value, arr, eps):
    """Central differences of value() over every element of ``arr`` (perturbed in place)."""
    # Indexed in place: reshape(-1) would perturb a copy of an F-ordered or strided array.
    out = np.empty(arr.shape, np.float64)
    for idx in np.ndindex(arr.shape):
        orig = arr[idx]
        arr[idx] = orig + eps
        up = value()
        arr[idx] = orig - eps
        down = value()
        arr[idx] = orig
        out[idx] = (up - down) / (2 * eps)
    return out


def _setting(name, value, default, *, zero_ok):
    """``value`` (or ``default`` when None) as a finite float, > 0 or, with ``zero_ok``,
    >= 0; TypeError or ValueError naming ``name`` otherwise."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"gradcheck: {name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
        raise ValueError(f"gradcheck: {name} must be a finite number "
                         f"{'>= 0' if zero_ok else '> 0'}, got {value!r}")
    return v


def gradcheck(fn_or_layer, x, *, eps=None, rtol=None, atol=None, target=None):
    """Compare analytic gradients with central finite differences.

    Parameters
    ----------
    fn_or_layer
        One of:

        * a layer or model (``forward``/``backward``): the gradients of ``sum(r * y)`` for a
          fixed random ``r`` with respect to ``x`` and to every parameter are checked;
        * a loss (``forward(pred, target)``/``backward()``) together with ``target``: the
          gradient of the loss with respect to ``pred = x``;
        * a function ``f(x) -> (y, vjp)`` where ``vjp(dy)`` returns dL/dx for L = sum(dy * y).
    x : array_like, float32 or float64
        The point to check at (not modified).  float64 is what makes the check tight.
    eps : float, optional
        Finite-difference step (1e-6 for float64, 1e-3 for float32); finite and > 0.
    rtol, atol : float, optional
        An element passes when ``|analytic - numeric| <= atol + rtol * |numeric|``
        (float64: 1e-3 and 1e-5; float32: 1e-2 and 1e-2); finite and >= 0 (both 0 asks
        for exact agreement).
    target : array_like, optional
        The target, when ``fn_or_layer`` is a loss.

    Returns
    -------
    True

    Raises
    ------
    AssertionError
        Naming the worst element (input or parameter, index, both values) when any differs.
    ValueError
        When ``eps`` is not > 0 or ``rtol``/``atol`` not >= 0 (or any is NaN or infinite);
        TypeError when one is not a real number.

    Notes
    -----
    The parameters' gradients and the layer's buffers (running statistics) are restored
    afterwards.  A layer with Dropout is checked in eval mode (a new mask per evaluation
    has no derivative to compare).
    """
    x = np.array(as_float_array(x, "x"), copy=True)
    d_eps, d_rtol, d_atol = _DEFAULTS[x.dtype]
    eps = _setting("eps", eps, d_eps, zero_ok=False)
    rtol = _setting("rtol", rtol, d_rtol, zero_ok=True)
    atol = _setting("atol", atol, d_atol, zero_ok=True)
    value, analytic, named = _as_scalar_objective(fn_or_layer, target)
    saved = [(p, p._grad.copy(), p._grad_is_zero) for _, p in named]
    # Buffers too: every forward of a BatchNorm in training mode moves its running
    # statistics, and a check should leave the model as it found it.
    buffers = (fn_or_layer.named_buffers()
               if callable(getattr(fn_or_layer, "named_buffers", None)) else [])
    saved_buffers = [(b, b.copy()) for _, b in buffers]
    try:
        dx, grads = analytic(x)
        if dx.shape != x.shape:
            raise AssertionError(f"gradcheck: the input gradient has shape {dx.shape}, the "
                                 f"input has shape {x.shape}")
        checks = [("input x", dx, _numeric(lambda: value(x), x, eps))]
        for name, p, g in grads:
            checks.append((f"parameter {name!r}", g, _numeric(lambda: value(x), p.data, eps)))
    finally:
        for p, g, zero in saved:
            p._grad[...] = g
            p._grad_is_zero = zero
        for b, value_before in saved_buffers:
            np.copyto(b, value_before)
    worst = None
    for what, a, n in checks:
        if a.size == 0:
            continue
        tol = atol + rtol * np.abs(n)
        diff = np.abs(a - n)
        # NaN anywhere counts as the worst possible mismatch; with a zero tolerance (rtol =
        # atol = 0, or rtol = 0 where numeric is 0) only an exact match passes.
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(np.isnan(diff), np.inf,
                             np.where(diff == 0, 0.0, diff / tol))
        i = int(np.argmax(ratio))
        if worst is None or ratio.flat[i] > worst[0]:
            worst = (ratio.flat[i], what, np.unravel_index(i, a.shape), a.flat[i], n.flat[i],
                     diff.flat[i], tol.flat[i], a.shape)
    if worst is not None and not worst[0] <= 1.0:
        _, what, idx, a, n, diff, tol, shape = worst
        raise AssertionError(
            f"gradcheck: gradient with respect to {what} (shape {shape}) differs at index "
            f"{tuple(int(i) for i in idx)}: analytic {a!r}, numerical {n!r}, difference "
            f"{diff:.3g} > tolerance {tol:.3g} (eps={eps}, rtol={rtol}, atol={atol})")
    return True
