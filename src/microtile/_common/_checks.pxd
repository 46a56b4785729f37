# Input rules shared by every public function (docs/API.md, "Rules that hold for every function").
cimport numpy as cnp

cpdef cnp.ndarray as_float_array(object x, str name)
cpdef object result_dtype(tuple arrays)
cpdef cnp.ndarray as_dtype(cnp.ndarray x, object dtype)
cpdef cnp.ndarray check_out(object out, tuple shape, object dtype, str name=*)
cpdef bint overlaps(cnp.ndarray a, cnp.ndarray b)
cpdef object native_dtype(object dt)
cpdef cnp.ndarray out_target(cnp.ndarray o)
cpdef double real_scalar(object v, str name) except? -1.0
