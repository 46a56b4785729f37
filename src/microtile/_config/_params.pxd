from microtile.linalg._gemm cimport gemm_params

# The parameters in effect for dtype code 0 (float32) or 1 (float64) on this thread: the
# process-wide values, with any ``config_context`` overrides applied.  Needs the GIL.
cdef int current_params(int dtype_code, gemm_params* out) except -1
