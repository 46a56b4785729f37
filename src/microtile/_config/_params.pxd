from microtile._common._typedefs cimport idx_t

# Blocking and threading of one GEMM call; filled by the config layer from the tuned profile
# or the analytical model (see ``_context``); the names and limits of the tunable fields
# are ``_schema``'s.
ctypedef struct gemm_params:
    int isa             # kernel set id (``_dispatch.isa_id``)
    int n_threads       # threads to use at most
    idx_t mc            # rows of A per packed block (L2)
    idx_t kc            # depth of a packed block (L1: a kc x nr panel of B)
    idx_t nc            # columns of B per packed block (L3)
    double nopack_mnk   # m*n*k at or below which operands are read in place where layouts allow
    double thread_mnk   # m*n*k below which a call stays on one thread
    int nopack_a_panels # n <= this many nr-panels: A is read in place rather than packed
    int split           # 0 auto, 1 rows (ic loop), 2 columns (jc/jr loops)

# The parameters in effect for dtype code 0 (float32) or 1 (float64) on this thread: the
# process-wide values, with any ``config_context`` overrides applied.  Needs the GIL.
cdef int current_params(int dtype_code, gemm_params* out) except -1
