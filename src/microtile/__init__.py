"""microtile: BLIS-style CPU kernels for GEMM, convolution and small neural networks.

Every kernel releases the GIL and is safe to call from several Python threads at once.
See ``get_config()`` for the ISA, threads and blocking in use.
"""
from microtile._version import __version__
from microtile._common import _mt_pool  # noqa: F401  (its file name is what threadpoolctl matches)
from microtile._config._context import (config_context, get_config, get_num_threads,
                                        set_num_threads, _init as _init_config)
from microtile._kernels._dispatch import available_isas
from microtile.linalg import dot, gemm, gemv, ger, matmul, outer
from microtile.conv import (avg_pool2d, avg_pool2d_backward, col2im, conv2d, conv2d_backward,
                            im2col, max_pool2d, max_pool2d_backward)
from microtile.sparse import spmm

_init_config()

from microtile._config._threadpool import register as _register_threadpool  # noqa: E402

_register_threadpool()
del _register_threadpool, _init_config

from microtile import nn  # noqa: E402,F401  (subpackage; imports only core modules above)

__all__ = [
    "__version__", "gemm", "matmul", "dot", "outer", "ger", "gemv", "spmm",
    "conv2d", "conv2d_backward", "im2col", "col2im",
    "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
    "get_num_threads", "set_num_threads", "get_config", "config_context", "available_isas",
]
