"""Configuration: threads, ISA, and the blocking per dtype.

At import the values come from, in order: the analytical model of the caches the OS reports
(``_blocking``), then the per-machine profile the tuner wrote (``_profile``), then environment
variables for the thread count.  ``config_context`` overrides any of them for the duration of
a ``with`` block, on the current thread (or async task) only.
"""
import contextlib
import os
import warnings

import numpy as np

from microtile._config import _blocking, _hwinfo, _params, _profile
from microtile._kernels import _dispatch
from microtile._version import __version__
from microtile._config._schema import (DEFAULT_THRESHOLDS, DTYPES, ITEMSIZE, MAX_THREADS,
                                       OPTIONS, SPLIT_NAMES, check_int, validate)

_state = {
    "isa": None,
    "threads": 1,
    "force_threads": False,   # MICROTILE_FORCE_THREADS: every count is taken as given
    "forced_max": 0,          # the largest count set above the usable CPUs with force
    "threads_chosen": False,  # a thread variable at import, or set_num_threads, chose it
    "profile": None,
    "profile_status": "missing",
    "defaults": {},      # dtype -> analytical + built-in values
    "base": {},          # dtype -> values in force (defaults, then profile)
    "options": {name: spec[0] for name, spec in OPTIONS.items()},
    "conv_choices": {},  # shape key -> algorithm, from the profile (microtile.nn.tune)
}


# Environment variables that set the thread count at import, in order of precedence.
THREAD_ENV = ("MICROTILE_NUM_THREADS", "OMP_NUM_THREADS")
# Set to 1 to take every thread count as given, even above the usable CPUs.
FORCE_ENV = "MICROTILE_FORCE_THREADS"


def _threads_from_env():
    """(count, variable) from the first thread variable that holds a positive integer, else
    (usable CPUs, None).  Unusable values warn and are skipped; a count is never rejected
    here for being large (``set_num_threads`` caps it)."""
    for var in THREAD_ENV:
        text = os.environ.get(var, "").strip()
        if not text:
            continue
        try:
            # OMP_NUM_THREADS may list one count per nesting level ("4,2"): the first is ours.
            n = int(text.split(",")[0])
        except ValueError:
            n = 0
        if n >= 1:
            return n, var
        warnings.warn(f"{var}={text[:40]!r} is not a positive integer; ignored",
                      RuntimeWarning, stacklevel=4)
    return _hwinfo.usable_cpus(), None


def _force_from_env():
    return os.environ.get(FORCE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


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
        _state["conv_choices"] = dict(chosen.get("conv_algorithms", {}))
    for code, dtype in enumerate(DTYPES):
        _params.set_base(code, _state["base"][dtype])
    _state["force_threads"] = _force_from_env()
    n, var = _threads_from_env()
    _set_threads(n, force=_state["force_threads"], source=var and f"{var}={n}",
                 stacklevel=4)
    _state["threads_chosen"] = var is not None


def conv_choice(key):
    """The algorithm the profile records for a convolution shape key (None: none)."""
    return _state["conv_choices"].get(key)


def set_conv_choices(choices):
    """Put per-shape convolution choices in force in this process (``microtile.nn.tune``
    does, after writing them to the profile)."""
    _state["conv_choices"].update(choices)


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
        return 1  # see _params: a forked child runs on one thread
    ov = _params.override.get()
    if ov is not None and "threads" in ov:
        return ov["threads"]
    return _params.get_threads()


def set_num_threads(n, *, force=False):
    """Set the number of threads microtile's kernels use at most.

    More threads than this process may run on at once (its CPU affinity, capped by a cgroup
    CPU quota) only make every parallel region wait for threads that have no CPU: such a
    count is capped at the usable CPUs, with a ``RuntimeWarning``, unless ``force`` is true
    or the environment variable ``MICROTILE_FORCE_THREADS=1`` was set at import.
    ``get_num_threads()`` returns the count in force after the cap.

    Parameters
    ----------
    n : int
        At least 1.  The environment variables ``MICROTILE_NUM_THREADS`` (then
        ``OMP_NUM_THREADS``) set it at import, under the same cap.
    force : bool, optional
        Use ``n`` threads even if that is more than the usable CPUs (up to 4096): for
        experiments with oversubscription.

    Raises
    ------
    ValueError
        When ``n`` is not an integer, is below 1, or is above 4096 with ``force``.

    Notes
    -----
    ``threadpoolctl.threadpool_limits(n)`` calls this as a limit: above the usable CPUs it
    means all of them (or the count last forced), without a warning.
    ``config_context(threads=n)`` overrides the count for one block and is not capped.
    """
    _set_threads(n, force=bool(force) or _state["force_threads"], source=None, stacklevel=3)
    _state["threads_chosen"] = True


def threads_chosen():
    """Whether the thread count was chosen (``MICROTILE_NUM_THREADS`` or ``OMP_NUM_THREADS``
    at import, or ``set_num_threads``) rather than defaulted to the usable CPUs.
    ``microtile.distributed`` divides the CPUs among the ranks of a machine only when it
    was not (a ``threadpool_limits`` block is a temporary limit, not a choice)."""
    return _state["threads_chosen"]


def _set_threads(n, *, force, source, stacklevel, quiet=False):
    """The thread count in force becomes ``n``, capped at the usable CPUs unless ``force``.

    ``source`` names where an import-time count came from ("MICROTILE_NUM_THREADS=5000"):
    such a count is never an error, so one above MAX_THREADS is clamped rather than
    refused.  ``quiet`` caps without a warning (threadpoolctl's limits)."""
    if source is None:
        # Without force any count is accepted here and capped below.
        n = check_int("set_num_threads: n", n, 1, MAX_THREADS if force else float("inf"))
    usable = _hwinfo.usable_cpus()
    what = source or f"set_num_threads({n})"
    if force:
        if n > MAX_THREADS:
            warnings.warn(f"{what}: more than {MAX_THREADS} threads; using {MAX_THREADS}",
                          RuntimeWarning, stacklevel=stacklevel)
            n = MAX_THREADS
        if n > usable:
            _state["forced_max"] = max(_state["forced_max"], n)
    else:
        cap = max(usable, _state["forced_max"]) if quiet else usable
        if n > cap:
            if not quiet:
                warnings.warn(
                    f"{what} asks for more threads than the {usable} CPU(s) this process may "
                    f"use (affinity and cgroup quota); using {usable}. Threads beyond the CPUs "
                    f"only wait for each other: pass force=True to set_num_threads, or set "
                    f"{FORCE_ENV}=1, to use them anyway.", RuntimeWarning, stacklevel=stacklevel)
            n = cap
    _state["threads"] = n
    _params.set_threads(n)


def _limit_threads(n):
    """threadpoolctl's ``set_num_threads``: ``n`` as an upper limit, quietly capped at the
    usable CPUs (or at a count forced earlier, so that leaving a ``threadpool_limits``
    block restores it)."""
    _set_threads(min(max(1, int(n)), MAX_THREADS), force=_state["force_threads"], source=None,
                 stacklevel=3, quiet=True)


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



def defaults(dtype):
    """The analytical-model values for a dtype, before any profile (for the tuner)."""
    return dict(_state["defaults"][dtype])


def _dtype_name(value):
    """"float32" or "float64" for anything NumPy reads as that dtype (a name, a dtype, a
    scalar type such as ``np.float32``); ValueError naming ``value`` otherwise."""
    try:
        name = np.dtype(value).name
    except Exception:  # noqa: BLE001 - NumPy raises TypeError, ValueError, ... for non-dtypes
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} (a name, a NumPy dtype or scalar "
                         f"type), got {value!r}")
    return name


@contextlib.contextmanager
def config_context(**overrides):
    """Temporarily override tunable parameters on this thread.

    Parameters
    ----------
    dtype : {"float32", "float64"}, numpy dtype or scalar type, optional
        Apply the blocking overrides to this dtype only (default: both): ``"float32"``,
        ``np.float32`` and ``np.dtype("float32")`` are the same.
    threads : int, optional
        Thread count for calls inside the block, 1 to 4096, taken as given (not capped at
        the usable CPUs as ``set_num_threads`` does): a block is an explicit experiment,
        which may oversubscribe on purpose.
    isa : str, optional
        Kernel set, one of ``microtile.available_isas()``.
    mc, kc, nc, nopack_mnk, thread_mnk, nopack_a_panels, split : optional
        Blocking and threading parameters (see ``get_config``).
    conv_workspace, conv_chunk : int, optional
        Bytes of im2col columns a convolution may use in all, and per thread at a time.
    conv_algorithm : {"auto", "im2col", "direct", "winograd"}, optional
        How ``conv2d`` and ``conv2d_backward`` compute.  ``"auto"`` (the default) takes the
        profile's choice for the layer's shape where ``microtile.nn.tune`` recorded one,
        else the built-in rule: the direct kernel for depthwise layers, grouped ones with
        at most 32 input channels per group (16 in the backward pass) and small ungrouped
        ones (at most 3 input channels, or 32 filters in the forward pass), Winograd for
        3x3 stride-1 ungrouped layers with at least 64 channels in and out and enough
        output positions, im2col + GEMM otherwise.  ``"im2col"`` and ``"direct"`` force
        that algorithm; each applies to every layer (the direct kernel is slow on layers
        with many channels per group, never wrong).  ``"winograd"`` forces Winograd where
        it applies (3x3 filters, stride 1, dilation 1, groups 1, its transforms within
        ``conv_workspace``) and leaves the other layers to the rule; in the backward pass
        it computes dx (dw and db stay on im2col).  Its error is a few times im2col's (see
        ``conv2d``).
    sparse_density : float, optional
        Weight density at or below which a pruned ``Linear`` runs on the sparse kernel.

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
        dtype = _dtype_name(dtype)
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
