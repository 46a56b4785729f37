"""Validation shared by every public function: dtypes, ``out`` arrays, overlap.

Rules (docs/API.md): float32 and float64 only, other dtypes raise TypeError naming the dtype;
mixed float32/float64 compute in float64; any layout is accepted (misaligned or byte-swapped
data is copied first); ``out`` must have the exact shape (ValueError), dtype (TypeError) and
be writeable (ValueError).  A byte-swapped or misaligned ``out`` is accepted, as NumPy does:
the kernels write a native array (``out_target``) that is then copied into it.
"""
import numpy as np
cimport numpy as cnp

cnp.import_array()

cdef object F32 = np.dtype(np.float32)
cdef object F64 = np.dtype(np.float64)


cdef tuple _compact(cnp.ndarray arr):
    """(core, broadcast): ``arr`` with each stride-0 axis cut to length 1, and whether any was
    (a broadcast view's data is its core: converting only the core and broadcasting the
    result back costs the core's size, not the view's)."""
    cdef int d
    cdef bint any_zero = False
    for d in range(cnp.PyArray_NDIM(arr)):
        if cnp.PyArray_STRIDE(arr, d) == 0 and cnp.PyArray_DIM(arr, d) > 1:
            any_zero = True
            break
    if not any_zero:
        return arr, False
    idx = tuple(slice(0, 1) if st == 0 and n > 1 else slice(None)
                for st, n in zip((<object> arr).strides, (<object> arr).shape))
    return arr[idx], True


cdef cnp.ndarray _converted(cnp.ndarray arr, object dtype):
    """A native, aligned ``dtype`` copy of ``arr`` (stride-0 axes stay stride 0)."""
    core, broadcast = _compact(arr)
    out = np.array(core, dtype=dtype, order="C")     # a new array: aligned and native
    if out.dtype is not dtype:
        out = out.view(dtype)       # NumPy keeps an equal, non-canonical dtype object
    return np.broadcast_to(out, (<object> arr).shape) if broadcast else out


cpdef cnp.ndarray as_float_array(object x, str name):
    """``x`` as a native-endian, aligned float32 or float64 ndarray; TypeError otherwise.

    Byte-swapped and misaligned arrays are copied (to the native dtype, as NumPy computes
    with them); a broadcast view stays one (only its distinct elements are copied)."""
    cdef cnp.ndarray arr
    if type(x) is np.ndarray:
        arr = <cnp.ndarray> x
    else:
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise TypeError(f"{name}: cannot be read as an array ({exc})") from None
    dt = arr.dtype
    if dt is F32 or dt is F64:
        if cnp.PyArray_ISALIGNED(arr):
            return arr
        return _converted(arr, dt)
    nat = native_dtype(dt)
    if nat is not dt:
        if dt == nat and cnp.PyArray_ISALIGNED(arr):
            # An equal dtype object that is not NumPy's canonical one (unpickled arrays
            # carry these): a view, so that every later ``dtype is F32`` test holds.
            return arr.view(nat)
        return _converted(arr, nat)   # byte-swapped or misaligned
    raise TypeError(f"{name}: unsupported dtype {dt}; microtile computes in float32 and float64")


cpdef object result_dtype(tuple arrays):
    """float64 when any array is float64 (NumPy's promotion), else float32."""
    for a in arrays:
        if a is not None and (<cnp.ndarray> a).dtype is F64:
            return F64
    return F32


cpdef cnp.ndarray as_dtype(cnp.ndarray x, object dtype):
    """``x`` in ``dtype``: itself when it already is, else a copy (a broadcast view stays one:
    only its distinct elements are converted)."""
    if x.dtype is dtype:
        return x
    return _converted(x, dtype)


cpdef cnp.ndarray check_out(object out, tuple shape, object dtype, str name="out"):
    """Validate a caller's ``out`` array for a result of ``shape`` and ``dtype``."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    cdef cnp.ndarray o = <cnp.ndarray> out
    if (<object> o).shape != shape:
        raise ValueError(f"{name} has shape {(<object> o).shape}; the result has shape {shape}")
    if o.dtype != dtype and native_dtype(o.dtype) != dtype:
        raise TypeError(f"{name} has dtype {o.dtype}; the result has dtype {dtype}")
    if not o.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return o


cpdef object native_dtype(object dt):
    """float32/float64 for a byte-swapped spelling of either, else ``dt`` itself."""
    if dt.kind == "f" and dt.itemsize in (4, 8) and dt.fields is None and dt.subdtype is None:
        return F32 if dt.itemsize == 4 else F64
    return dt


cpdef cnp.ndarray out_target(cnp.ndarray o):
    """The array a kernel writes for the validated output ``o``: ``o`` itself when it is
    aligned and in native byte order, else a new native array of its shape (the caller
    copies it into ``o`` afterwards, and first from ``o`` when the result reads it)."""
    if cnp.PyArray_ISALIGNED(o) and o.dtype.isnative:
        # A view when o's dtype is equal to but not the canonical object (see as_float_array).
        return o if o.dtype is native_dtype(o.dtype) else o.view(native_dtype(o.dtype))
    return np.empty((<object> o).shape, dtype=native_dtype(o.dtype))


cdef inline bint _extent(cnp.ndarray x, char** lo, char** hi):
    """Lowest and one-past-highest byte an array touches; False when it is empty."""
    cdef int d
    cdef cnp.npy_intp n, st
    cdef char* base = <char*> cnp.PyArray_DATA(x)
    lo[0] = base
    hi[0] = base
    for d in range(cnp.PyArray_NDIM(x)):
        n = cnp.PyArray_DIM(x, d)
        if n == 0:
            return False
        st = cnp.PyArray_STRIDE(x, d) * (n - 1)
        if st < 0:
            lo[0] += st
        else:
            hi[0] += st
    hi[0] += cnp.PyArray_ITEMSIZE(x)
    return True


cpdef bint overlaps(cnp.ndarray a, cnp.ndarray b):
    """True when the memory spans of two arrays intersect (cheap and conservative, like
    ``numpy.may_share_memory``)."""
    cdef char* alo
    cdef char* ahi
    cdef char* blo
    cdef char* bhi
    if not _extent(a, &alo, &ahi) or not _extent(b, &blo, &bhi):
        return False
    return alo < bhi and blo < ahi


cpdef double real_scalar(object v, str name) except? -1.0:
    """``v`` as a C double: a Python or NumPy real number (or a 0-d real array); TypeError
    naming ``name`` for text, complex values and anything else (``float("2")`` would take a
    string, and ``float(np.complex64(1j))`` would drop the imaginary part)."""
    if type(v) is float or type(v) is int:
        return v
    if isinstance(v, (str, bytes)) or isinstance(v, complex) or np.iscomplexobj(v):
        raise TypeError(f"{name} must be a real number, got {v!r}")
    try:
        if np.ndim(v) != 0:
            raise TypeError
        return float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {v!r}") from None
