"""Argument rules shared by the NCHW convolution and pooling functions (PyTorch's semantics).

int-or-pair parsing, padding modes, output sizes, and the rank checks, each raising a
ValueError or TypeError that names the argument and the value.
"""
import operator

import numpy as np

# The largest kernel size, stride, padding, dilation or group count accepted (torch's pooling
# takes int32 too).  The kernels form products of two such numbers and sums of a few
# products in 64-bit integers; below 2**31 each none of them can overflow.
MAX_ARG = 2 ** 31 - 1


def _is_text(value):
    # Strings are never sizes: "1111" is not (1, 1, 1, 1), nor "12" twelve.
    return isinstance(value, (str, bytes, np.str_, np.bytes_)) or (
        isinstance(value, np.ndarray) and value.dtype.kind in "SUO" and value.ndim == 0)


def pair(value, name, *, minimum=1):
    """``value`` as an (h, w) pair of ints, each at least ``minimum`` and at most MAX_ARG."""
    # Plain ints and pairs of them first: the general checks cost ~2 us per argument, a
    # tenth of a small conv2d's Python time.
    if type(value) is int:
        out = (value, value)
    elif (type(value) is tuple and len(value) == 2 and type(value[0]) is int
          and type(value[1]) is int):
        out = value
    else:
        out = _general_pair(value, name)
    if out[0] < minimum or out[1] < minimum:
        rule = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    if out[0] > MAX_ARG or out[1] > MAX_ARG:
        raise ValueError(f"{name} must be at most {MAX_ARG} (2**31 - 1), got {value!r}")
    return out


def _general_pair(value, name):
    """``pair`` for anything but a plain int or a tuple of two (NumPy integers, lists, 1-D
    arrays, one-element sequences); TypeError/ValueError for what is not a pair of ints."""
    if _is_text(value) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if np.ndim(value) == 0:
        try:
            v = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
        out = (v, v)
    else:
        try:
            items = list(value)
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
        if len(items) == 1:
            items = items * 2
        if len(items) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        out = []
        for item in items:
            if isinstance(item, (bool, np.bool_)) or _is_text(item):
                raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
            try:
                out.append(operator.index(item))
            except TypeError:
                raise TypeError(f"{name} must be an int or a pair of ints, "
                                f"got {value!r}") from None
        out = tuple(out)
    return out


def count(value, name, what):
    """``value`` as one int in [1, MAX_ARG] (``groups``); TypeError for anything else."""
    if type(value) is int and 1 <= value <= MAX_ARG:
        return value
    if isinstance(value, (bool, np.bool_)) or _is_text(value):
        raise TypeError(f"{what}: {name} must be an int, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{what}: {name} must be an int, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{what}: {name} must be positive, got {value}")
    if value > MAX_ARG:
        raise ValueError(f"{what}: {name} must be at most {MAX_ARG} (2**31 - 1), got {value}")
    return value


def shape_arg(value, name, what, ndims):
    """``value`` as a tuple of ``ndims`` non-negative ints (a shape argument such as
    ``input_shape``); TypeError naming it for strings and non-integers."""
    bad = TypeError(f"{what}: {name} must be a tuple of ints, got {value!r}")
    try:
        if _is_text(value) or np.ndim(value) != 1:
            raise bad
    except ValueError:      # NumPy's word for a ragged sequence
        raise bad from None
    items = []
    for item in value:
        if isinstance(item, (bool, np.bool_)) or _is_text(item):
            raise bad
        try:
            items.append(operator.index(item))
        except TypeError:
            raise bad from None
    if len(items) not in ndims or min(items, default=0) < 0:
        raise ValueError(f"{what}: {name} must have {' or '.join(map(str, ndims))} "
                         f"non-negative sizes, got {value!r}")
    return tuple(items)


# The most bytes an array can hold (NumPy's limit is its index type).
_MAX_BYTES = int(np.iinfo(np.intp).max)


def check_result(shape, dtype, what):
    """ValueError when an array of ``shape`` could not exist (its byte count overflows),
    before NumPy says so without naming the call."""
    total = dtype.itemsize if isinstance(dtype, np.dtype) else np.dtype(dtype).itemsize
    for d in shape:
        total *= d
    if total > _MAX_BYTES:   # (np.iinfo itself took 2-3 us of a small conv2d's ~25)
        raise ValueError(f"{what}: the result would have shape {tuple(shape)}, more bytes than "
                         "an array can hold (check padding, stride and output_size)")


def conv_padding(padding, kernel, stride, dilation):
    """((top, bottom), (left, right)) for an int, a pair, "valid" or "same"."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
            out = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                # As PyTorch: an odd total puts the extra row/column at the bottom/right.
                out.append((total // 2, total - total // 2))
            return tuple(out)
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    ph, pw = pair(padding, "padding", minimum=0)
    return (ph, ph), (pw, pw)


def out_size(size, kernel, pad_lo, pad_hi, stride, dilation, what, axis):
    """Output length of a sliding window; ValueError when the window exceeds the input."""
    eff = dilation * (kernel - 1) + 1
    padded = size + pad_lo + pad_hi
    if eff > padded:
        raise ValueError(f"{what}: kernel {axis} {kernel} (dilated to {eff}) is larger than the "
                         f"padded input {axis} {padded} ({size} + padding {pad_lo + pad_hi})")
    return (padded - eff) // stride + 1


def as_nchw(arr, name, what):
    """(array as 4-D, True if it was 3-D (unbatched)); ValueError for any other rank."""
    if arr.ndim == 4:
        return arr, False
    if arr.ndim == 3:
        return arr[None], True
    raise ValueError(f"{what}: {name} must be 4-D (N, C, H, W) or 3-D (C, H, W), "
                     f"got shape {arr.shape}")


def reuse_out(arr, shape, dt, what, name):
    """``arr`` when it is a C-contiguous (shape, dt) array to write a result into, else an error
    (the private ``_out=`` / ``_dx=`` arguments the nn layers pass to reuse buffers between
    steps)."""
    if arr is None:
        return None
    if (not isinstance(arr, np.ndarray) or arr.shape != tuple(shape) or arr.dtype != dt
            or not arr.flags.c_contiguous or not arr.flags.writeable):
        raise ValueError(f"{what}: {name} must be a writeable C-contiguous {np.dtype(dt)} "
                         f"array of shape {tuple(shape)}")
    return arr
