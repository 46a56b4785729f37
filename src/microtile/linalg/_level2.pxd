from microtile._common._typedefs cimport idx_t, floating
from microtile._kernels._ukernel cimport kernel_set_t

# Level-1/2 drivers at any strides (in elements), on the kernels of ``ks``.  Threads: at
# most ``n_threads`` (1 keeps the call on the calling thread).  Return 0, or -1 when scratch
# memory could not be had.

# sum x[i] * y[i]
cdef floating dot_run(const kernel_set_t* ks, idx_t n, const floating* x, idx_t incx,
                      const floating* y, idx_t incy) noexcept nogil

# y = alpha * A @ x + beta * y, A m x n; beta == 0: y not read; alpha == 0: A, x not read.
cdef int gemv_run(const kernel_set_t* ks, int n_threads, idx_t m, idx_t n, floating alpha,
                  const floating* a, idx_t rs_a, idx_t cs_a, const floating* x, idx_t incx,
                  floating beta, floating* y, idx_t incy) noexcept nogil

# A += alpha * x @ y.T, A m x n.
cdef int ger_run(const kernel_set_t* ks, int n_threads, idx_t m, idx_t n, floating alpha,
                 const floating* x, idx_t incx, const floating* y, idx_t incy,
                 floating* a, idx_t rs_a, idx_t cs_a) noexcept nogil

# A = x @ y.T, A m x n.
cdef int outer_run(const kernel_set_t* ks, int n_threads, idx_t m, idx_t n,
                   const floating* x, idx_t incx, const floating* y, idx_t incy,
                   floating* a, idx_t rs_a, idx_t cs_a) noexcept nogil
