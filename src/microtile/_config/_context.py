"""Configuration: threads, ISA, and the blocking per dtype.

At import the values come from, in order: the analytical model of the caches the OS reports
(``_blocking``), then the per-machine profile the tuner wrote (``_profile``), then environment
variables for the thread count.  ``config_context`` overrides any of them for the duration of
a ``with`` block, on the current thread (or async task) only.
"""
import contextlib
import os
import warnings

from microtile._config import _blocking, _hwinfo, _params, _profile
from microtile._kernels import _dispatch
from microtile._version import __version__
from microtile._config._schema import (DEFAULT_THRESHOLDS, DTYPES, ITEMSIZE, MAX_THREADS,
                                       OPTIONS, SPLIT_NAMES, check_int, validate)

_state = {
    "isa": None,
    "threads": 1,
    "profile": None,
    "profile_status": "missing",
    "defaults": {},      # dtype -> analytical + built-in values
    "base": {},          # dtype -> values in force (defaults, then profile)
    "options": {name: spec[0] for name, spec in OPTIONS.items()},
}


def _threads_from_env():
    for var in ("MICROTILE_NUM_THREADS", "OMP_NUM_THREADS"):
        text = os.environ.get(var, "").strip()
        if not text:
            continue
        try:
            n = int(text.split(",")[0])
            if n >= 1:
                return n
        except ValueError:
            pass
        warnings.warn(f"{var}={text!r} is not a positive integer; ignored", RuntimeWarning,
                      stacklevel=3)
    return _hwinfo.usable_cpus()


def _init():
    isa = _dispatch.default_isa()
    _state["isa"] = isa
    _params.set_isa(_dispatch.isa_id(isa))
    caches = _hwinfo.read_caches()
    cores = _hwinfo.usable_cpus()
    for code, dtype in enumerate(DTYPES):
        mr, nr = _dispatch.kernel_shape(isa, code)
        values = _blocking.analytical_blocking(caches, mr, nr, ITEMSIZE[dtype], cores)
        values.update(DEFAULT_THRESHOLDS)
        _state["defaults"][dtype] = dict(values)
        _state["base"][dtype] = dict(values)
    path, status, chosen = _profile.load_for_import(isa)
    _state["profile"], _state["profile_status"] = path, status
    if status == "loaded":
        for dtype in DTYPES:
            _state["base"][dtype].update(chosen.get(dtype, {}))
        _state["options"].update({k: v for k, v in chosen.get("options", {}).items()
                                  if k in OPTIONS})
    for code, dtype in enumerate(DTYPES):
        _params.set_base(code, _state["base"][dtype])
    set_num_threads(_threads_from_env())


def get_option(name):
    """The value in force of a non-GEMM option (see ``OPTIONS``), overrides included."""
    ov = _params.override.get()
    if ov is not None and name in ov.get("options", {}):
        return ov["options"][name]
    return _state["options"][name]


def get_num_threads():
    """Number of threads microtile's kernels use at most (in this context).

    Returns
    -------
    int
    """
    if _params.forked():
        return 1  # see _params: OpenMP does not survive fork()
    ov = _params.override.get()
    if ov is not None and "threads" in ov:
        return ov["threads"]
    return _params.get_threads()


def set_num_threads(n):
    """Set the number of threads microtile's kernels use at most.

    Parameters
    ----------
    n : int
        At least 1.  ``threadpoolctl.threadpool_limits`` calls this too.
    """
    n = check_int("threads", n, 1, MAX_THREADS)
    _state["threads"] = n
    _params.set_threads(n)


def get_config():
    """The configuration in effect: version, ISA, threads, profile, and blocking per dtype.

    Returns
    -------
    dict
        ``"version"``, ``"isa"``, ``"threads"``, ``"profile"``, ``"profile_status"``, and for
        ``"float32"`` and ``"float64"`` a dict with ``"mr"``, ``"nr"``, ``"mc"``, ``"kc"``,
        ``"nc"``, ``"nopack_mnk"``, ``"thread_mnk"``, ``"nopack_a_panels"`` and ``"split"``.
    """
    out = {
        "version": __version__,
        "threads": get_num_threads(),
        "profile": _state["profile"],
        "profile_status": _state["profile_status"],
        "openmp": _openmp_enabled(),
    }
    out.update({name: get_option(name) for name in OPTIONS})
    for code, dtype in enumerate(DTYPES):
        eff = _params.effective(code)
        isa = _dispatch.ISA_NAMES[eff["isa"]]
        out["isa"] = isa
        mr, nr = _dispatch.kernel_shape(isa, code)
        out[dtype] = {"mr": mr, "nr": nr, "mc": eff["mc"], "kc": eff["kc"], "nc": eff["nc"],
                      "nopack_mnk": int(eff["nopack_mnk"]), "thread_mnk": int(eff["thread_mnk"]),
                      "nopack_a_panels": eff["nopack_a_panels"],
                      "split": SPLIT_NAMES[eff["split"]]}
    return out


def _openmp_enabled():
    from microtile._common._mt_openmp import openmp_enabled
    return openmp_enabled()


def defaults(dtype):
    """The analytical-model values for a dtype, before any profile (for the tuner)."""
    return dict(_state["defaults"][dtype])


@contextlib.contextmanager
def config_context(**overrides):
    """Temporarily override tunable parameters on this thread.

    Parameters
    ----------
    dtype : {"float32", "float64"}, optional
        Apply the blocking overrides to this dtype only (default: both).
    threads : int, optional
        Thread count for calls inside the block.
    isa : str, optional
        Kernel set, one of ``microtile.available_isas()``.
    mc, kc, nc, nopack_mnk, thread_mnk, nopack_a_panels, split : optional
        Blocking and threading parameters (see ``get_config``).

    Raises
    ------
    ValueError
        For an unknown name or a value out of range.

    Examples
    --------
    >>> with config_context(dtype="float32", mc=96, kc=256, nc=4096, threads=1):
    ...     c = gemm(a, b)
    """
    dtype = overrides.pop("dtype", None)
    if dtype is not None:
        dtype = str(getattr(dtype, "name", dtype))
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    new = {}
    if "threads" in overrides:
        new["threads"] = check_int("threads", overrides.pop("threads"), 1, MAX_THREADS)
    if "isa" in overrides:
        new["isa"] = _dispatch.isa_id(overrides.pop("isa"))
    options = {name: validate(name, overrides.pop(name)) for name in list(overrides)
               if name in OPTIONS}
    if options:
        new["options"] = options
    blocking = {name: validate(name, value) for name, value in overrides.items()}
    old = _params.override.get()
    merged = {} if old is None else {key: (dict(v) if isinstance(v, dict) else v)
                                     for key, v in old.items()}
    if "options" in new:
        new["options"] = {**merged.get("options", {}), **new["options"]}
    merged.update(new)
    for code, name in enumerate(DTYPES):
        if blocking and (dtype is None or dtype == name):
            merged.setdefault(code, {}).update(blocking)
    token = _params.override.set(merged)
    try:
        yield
    finally:
        _params.override.reset(token)
