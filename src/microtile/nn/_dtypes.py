"""The two dtypes a model may have, and how inputs are brought to a layer's dtype."""
import numpy as np

from microtile._common._checks import as_float_array

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def float_dtype(dtype, where):
    """``dtype`` as a numpy dtype if it is float32 or float64; TypeError naming it otherwise."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{where}: {dtype!r} is not a dtype") from None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{where}: unsupported dtype {dt}; models are float32 or float64")
    return dt


def as_input(x, dtype, name="x"):
    """``x`` as an array of ``dtype`` (the layer's); TypeError for non-float dtypes.

    A layer computes in its own dtype, so a float64 batch fed to a float32 model is rounded
    to float32 (a copy); ``fit`` and ``predict`` convert the whole data set once instead.
    """
    arr = as_float_array(x, name)
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    return arr


def as_grad(dy, dtype, shape, owner):
    """An upstream gradient checked against the forward output's shape, in ``dtype``,
    C-contiguous (the element-wise kernels stream it).  ``owner`` (the layer) is named in
    the error."""
    arr = as_float_array(dy, "dy")
    if arr.shape != shape:
        raise ValueError(f"{owner!r}: gradient has shape {arr.shape}, the forward output had "
                         f"shape {shape}")
    if arr.dtype != dtype or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=dtype)
    return arr
