"""Linear's forward GEMM with bias and activation: fused when the core offers it.

``microtile.linalg._api.linear_forward(x, weight, bias, activation, out)`` applies the bias and
the activation in the GEMM's write-back (no second pass over the output).  Until a build has
it, the fallback is the GEMM followed by one in-place bias + activation pass.  Everything in
``microtile.nn`` goes through ``linear_forward`` below, so the switch is this module alone.
"""
from microtile.linalg import _api as _linalg
from microtile.linalg._api import gemm
from microtile.nn._act_kernels import ACT_CODES, bias_act

_FUSED = getattr(_linalg, "linear_forward", None)


def linear_forward(x, weight, bias, activation, out):
    """out = act(x @ weight.T + bias); ``activation`` is None, "relu", "sigmoid" or "tanh".

    ``x`` (m, k) any layout, ``weight`` (n, k), ``bias`` (n,) or None, ``out`` (m, n)
    C-contiguous of the weight's dtype.  Returns ``out``.
    """
    if _FUSED is not None:
        return _FUSED(x, weight, bias=bias, activation=activation, out=out)
    gemm(x, weight, trans_b=True, out=out)
    if bias is not None or activation is not None:
        bias_act(out, bias, ACT_CODES[activation])
    return out
