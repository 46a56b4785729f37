"""Every tunable and option, named once.

The config layer (``_context``), the profile reader (``_profile``), the C-level parameter
struct (``_params``) and the tuner (``autotune``) all take their names, limits and defaults
from here; nothing else lists them.  This module imports nothing from microtile, so any layer
may import it.
"""

# The element types every kernel handles, in dtype-code order (0: float32, 1: float64): the
# code is the index of the per-dtype parameter struct in ``_params``.
DTYPES = ("float32", "float64")
ITEMSIZE = {"float32": 4, "float64": 8}

# How the GEMM driver splits one call across threads: the name a user or profile gives, and
# the code the driver reads (0 lets the driver choose per shape).
SPLITS = {"auto": 0, "ic": 1, "rows": 1, "jc": 2, "columns": 2}
SPLIT_NAMES = {0: "auto", 1: "ic", 2: "jc"}

# Per-dtype integer tunables of the GEMM driver and what each may be.  nopack_mnk and
# thread_mnk compare with m*n*k.
LIMITS = {
    "mc": (1, 1 << 16),
    "kc": (1, 1 << 16),
    "nc": (1, 1 << 20),
    "nopack_mnk": (0, 1 << 40),
    "thread_mnk": (0, 1 << 50),
    "nopack_a_panels": (0, 1 << 10),
}
# Every per-dtype tunable (the fields of ``_params``'s struct besides isa and n_threads).
TUNABLE = tuple(LIMITS) + ("split",)
# The cache blocking proper, which the analytical model seeds.
BLOCKING = ("mc", "kc", "nc")
# The thresholds, which the built-in defaults below seed.
THRESHOLDS = ("nopack_mnk", "thread_mnk", "nopack_a_panels", "split")

# Measured on a Zen3 (2 cores): below ~64^3 packing costs more than it saves, below ~96^3
# a second thread costs more than it saves.  The tuner re-measures both.
DEFAULT_THRESHOLDS = {"nopack_mnk": 64 ** 3, "thread_mnk": 96 ** 3, "nopack_a_panels": 4,
                      "split": 0}

# Options that are not per dtype and not read by the GEMM driver: name -> (default, lo, hi).
# conv_workspace: bytes of im2col workspace a convolution may use in all (its cap);
# conv_chunk: column bytes one thread lowers and multiplies at a time within that cap
# (1-2 MiB measured best on a Zen3 with 512 KiB L2; the tuner may set it per machine).
# sparse_density: the weight density at or below which a pruned Linear runs its forward on
# the sparse kernel instead of the dense GEMM.  The tuner measures the crossover per machine
# (autotune/sparse_search.py); the default (a float, unlike the others) for a machine without
# a profile, 0.1, puts a 90 %-pruned layer on the sparse kernel.
# conv_algorithm: how conv2d and conv2d_backward compute; one of CONV_ALGORITHMS (a name,
# not a number: its bounds are None).
OPTIONS = {"conv_workspace": (8 << 20, 64 << 10, 1 << 34),
           "conv_chunk": (2 << 20, 16 << 10, 1 << 32),
           "sparse_density": (0.1, 0.0, 1.0),
           "conv_algorithm": ("auto", None, None)}

# The convolution algorithms: "auto" lets the built-in rule choose per layer; "im2col" is
# im2col + the GEMM; "direct" the direct kernel (made for depthwise and small-group layers,
# correct for any).  Both apply to every layer; "winograd" (3x3, stride-1, undilated,
# ungrouped layers) applies to some only, and the rule chooses on the others (see
# conv.convolution._algorithm).
CONV_ALGORITHMS = ("auto", "im2col", "direct", "winograd")

# Thread counts a caller may ask for (set_num_threads, config_context).
MAX_THREADS = 1 << 12

# Activation codes the fused GEMM epilogue and the nn kernels share (``linalg._gemm.pxd``
# declares the same numbers as a C enum for nogil code).
ACTIVATIONS = {None: 0, "none": 0, "identity": 0, "relu": 1, "sigmoid": 2, "tanh": 3}


def check_int(name, value, lo, hi):
    """``value`` as a Python int in [lo, hi]; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int,)) and not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value.__index__()) if not isinstance(value, int) else value
    if not lo <= value <= hi:
        bound = f"at least {lo}" if hi == float("inf") else f"between {lo} and {hi}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_real(name, value, lo, hi):
    """``value`` as a Python float in [lo, hi]; ValueError naming ``name`` otherwise (NaN,
    text and booleans included)."""
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not lo <= value <= hi:        # False for NaN too
        raise ValueError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def validate(name, value):
    """The checked value of one tunable; ValueError when it is not allowed."""
    if name == "split":
        if isinstance(value, str) and value in SPLITS:
            return SPLITS[value]
        if value in (0, 1, 2) and not isinstance(value, bool):
            return int(value)
        raise ValueError(f"split must be one of {sorted(set(SPLITS))}, got {value!r}")
    if name == "conv_algorithm":
        if isinstance(value, str) and value in CONV_ALGORITHMS:
            return value
        raise ValueError(f"conv_algorithm must be one of {CONV_ALGORITHMS}, got {value!r}")
    if name in ("nopack_mnk", "thread_mnk") and isinstance(value, float) and value.is_integer():
        value = int(value)
    if name in OPTIONS:
        if isinstance(OPTIONS[name][0], float):
            return check_real(name, value, *OPTIONS[name][1:])
        return check_int(name, value, *OPTIONS[name][1:])
    if name not in LIMITS:
        raise ValueError(f"unknown parameter {name!r}; tunable are {TUNABLE + ('threads', 'isa')}")
    return check_int(name, value, *LIMITS[name])
