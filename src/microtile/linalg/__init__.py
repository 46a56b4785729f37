"""Linear algebra: the BLIS frame and its public entry points.

``_gemm`` is the blocked driver (five loops, threading, edge tiles, fused epilogue),
``_pack`` packs operands into micro-panels, ``_level2`` holds the dot/gemv/ger/outer drivers,
and ``_api`` validates the public calls and runs the drivers without the GIL.  The
micro-kernels they call are ``microtile._kernels``'s.
"""
from microtile.linalg._api import dot, gemm, gemv, ger, matmul, outer

__all__ = ["gemm", "matmul", "dot", "outer", "ger", "gemv"]
