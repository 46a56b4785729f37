"""microtile.nn.tune: the fastest convolution algorithm for each of a model's layer shapes,
measured on this machine and kept in the profile."""
import statistics
import time

import numpy as np

from microtile._config import _profile
from microtile._config._context import config_context, get_config, set_conv_choices
from microtile.conv import convolution
from microtile.nn._conv import Conv2d

# A candidate must agree with the float64 reference within this fraction of the reference's
# largest magnitude.  It is a guard against a broken kernel, not a precision contest: the
# im2col GEMM of a float32 layer with C·R·S up to ~10^4 terms stays near 1e-6 here, the
# Winograd tiles a few times that; float64 is held 1e4 times tighter.
_TOLERANCE = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-9}
# Seconds one timed sample aims for (calls repeat until it is reached), so that a 50 µs layer
# is timed over many calls and a 50 ms one once.
_SAMPLE_SECONDS = 0.02
# Another algorithm replaces the built-in rule's only when its median is this much lower:
# the rule's choice is kept where the two are within the noise of a shared machine.
_MARGIN = 0.03


def _conv_calls(model, x):
    """(layer, input) for every Conv2d call in one forward of ``model`` on ``x`` (in the
    model's current mode), in call order."""
    calls = []
    layers = [m for m in model.modules() if isinstance(m, Conv2d)]
    saved = []
    for layer in layers:
        for name in ("_forward", "_forward_folded"):
            inner = getattr(layer, name)

            def spy(inp, *rest, _inner=inner, _layer=layer):
                calls.append((_layer, inp))
                return _inner(inp, *rest)
            saved.append((layer, name))
            setattr(layer, name, spy)
    try:
        model.forward(x)
    finally:
        for layer, name in saved:
            delattr(layer, name)     # back to the class's method
    return calls


def _time(fn, rounds):
    """Median seconds per call of each function in ``fn`` (a dict), sampled in interleaved
    rounds."""
    reps = {}
    for name, f in fn.items():
        f()                                  # warm up: buffers, packing scratch, threads
        t0 = time.perf_counter()
        f()
        reps[name] = max(1, int(_SAMPLE_SECONDS / max(time.perf_counter() - t0, 1e-7)))
    samples = {name: [] for name in fn}
    for _ in range(rounds):
        for name, f in fn.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                f()
            samples[name].append((time.perf_counter() - t0) / reps[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def _close(got, ref, dt):
    scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, np.finfo(dt).tiny)
    return bool(np.all(np.isfinite(got))) and float(np.max(np.abs(got - ref))) <= (
        _TOLERANCE[np.dtype(dt)] * scale)


def tune(model, x, *, rounds=5, profile=None):
    """Time every convolution algorithm on each of ``model``'s convolution shapes and keep
    the fastest in the profile.

    One forward of ``model`` on ``x`` (in its current mode) finds the shapes of its Conv2d
    layers.  For each distinct shape, every algorithm that applies (see
    ``config_context(conv_algorithm=...)``) runs the forward and the backward pass on the
    layer's own input and weights; each result is checked against a float64 reference
    (agreeing within 1e-3 of its largest magnitude in float32, 1e-9 in float64) before its
    time counts.  Times are medians of ``rounds`` interleaved samples.  The winner of each
    pass is recorded in the profile under a key for the shape, so later processes use it
    without measuring; the built-in rule's algorithm is kept unless another is at least 3 %
    faster.  The choices take effect in this process at once.
    ``config_context(conv_algorithm=...)`` still overrides them.

    Parameters
    ----------
    model : Module
        The model, called as it will be used (train or eval mode, batch size): the shapes
        are its layers' for this ``x``.
    x : array_like
        An input batch.
    rounds : int, optional
        Timed samples per candidate and pass (at least 1).
    profile : str or os.PathLike, optional
        The profile file to update: by default the one in force (``MICROTILE_PROFILE``, else
        the user cache directory).  It is created when missing (a profile with nothing else
        tuned, which ``python -m autotune`` later replaces).

    Returns
    -------
    dict
        Per shape key: ``{"algorithm": winner, "rule": the built-in rule's choice,
        "seconds": {algorithm: median seconds}}``.

    Raises
    ------
    ValueError
        For ``rounds`` below 1, or an ``x`` the model does not take.
    RuntimeError
        When the profile there is stale, invalid or another kernel set's (nothing is
        written), or a candidate disagrees with the reference (a kernel bug to report).

    Notes
    -----
    A later ``python -m autotune`` writes a new profile without these choices (they were
    timed with the old blocking): run ``tune`` again after it.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"tune: rounds must be a positive integer, got {rounds!r}")
    results = {}
    for layer, inp in _conv_calls(model, x):
        w = layer.weight.data
        dt = w.dtype
        kw = layer._kw()
        X4, _, geom, groups, K, P, Q = convolution._setup("tune", np.asarray(inp), w,
                                                           kw["stride"], kw["padding"],
                                                           kw["dilation"], kw["groups"])
        N, C = X4.shape[0], X4.shape[1]
        ok = convolution.applicable(N, C // groups, K, groups, geom, dt)
        if N == 0 or P == 0 or Q == 0 or len(ok) < 2:
            continue
        fkey = convolution.shape_key("forward", dt, N, C, K, groups, geom)
        if fkey in results:
            continue
        bkey = convolution.shape_key("backward", dt, N, C, K, groups, geom)
        xs = np.ascontiguousarray(X4, dtype=dt)
        b = None if layer.bias is None else layer.bias.data
        dy = np.random.default_rng(0).standard_normal((N, K, P, Q)).astype(dt)
        with config_context(conv_algorithm="im2col"):
            ref_y = convolution.conv2d(xs.astype(np.float64), w.astype(np.float64),
                                       None if b is None else b.astype(np.float64), **kw)
            ref_g = convolution.conv2d_backward(dy.astype(np.float64), xs.astype(np.float64),
                                                w.astype(np.float64), **kw,
                                                need_bias_grad=b is not None)
        fwd, bwd = {}, {}
        for name in ok:
            with config_context(conv_algorithm=name):
                y = convolution.conv2d(xs, w, b, **kw)
                g = convolution.conv2d_backward(dy, xs, w, **kw, need_bias_grad=b is not None)
            for got, ref, what in ((y, ref_y, "forward"), (g[0], ref_g[0], "dx"),
                                   (g[1], ref_g[1], "dw")):
                if not _close(got, ref, dt):
                    raise RuntimeError(f"tune: the {name!r} convolution disagrees with the "
                                       f"reference ({what}) on {fkey}")

            def f(name=name):
                with config_context(conv_algorithm=name):
                    convolution.conv2d(xs, w, b, **kw)

            def gb(name=name):
                with config_context(conv_algorithm=name):
                    convolution.conv2d_backward(dy, xs, w, **kw, need_bias_grad=b is not None)
            fwd[name], bwd[name] = f, gb
        for key, fns, pass_ in ((fkey, fwd, "forward"), (bkey, bwd, "backward")):
            rule = convolution._rule(N, C // groups, K, groups, geom, dt, pass_)
            seconds = _time(fns, rounds)
            best = min(seconds, key=seconds.get)
            if best != rule and seconds[best] > (1 - _MARGIN) * seconds[rule]:
                best = rule
            results[key] = {"algorithm": best, "rule": rule, "seconds": seconds}
    choices = {key: r["algorithm"] for key, r in results.items()}
    if choices:
        path = _profile.profile_path() if profile is None else str(profile)

        def edit(doc):
            doc["conv_algorithms"] = {**doc.get("conv_algorithms", {}), **choices}
        _profile.update(path, get_config()["isa"], edit)
        set_conv_choices(choices)
    return results
