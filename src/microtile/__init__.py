"""microtile: BLIS-style CPU kernels for GEMM, convolution and small neural networks.

Every kernel releases the GIL and is safe to call from several Python threads at once.
See ``get_config()`` for the ISA, threads and blocking in use.
"""
from microtile._version import __version__
from microtile import _mt_openmp  # noqa: F401  (its file name is what threadpoolctl matches)
from microtile._config import (config_context, get_config, get_num_threads,
                               set_num_threads, _init as _init_config)
from microtile._dispatch import available_isas
from microtile._linalg import dot, gemm, gemv, ger, matmul, outer

_init_config()

from microtile._threadpool import register as _register_threadpool  # noqa: E402

_register_threadpool()
del _register_threadpool, _init_config

__all__ = [
    "__version__", "gemm", "matmul", "dot", "outer", "ger", "gemv",
    "get_num_threads", "set_num_threads", "get_config", "config_context", "available_isas",
]
