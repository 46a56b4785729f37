"""Linear: y = act(x @ weight.T + bias) forward, GEMMs with transpose flags backward."""
import math

import numpy as np

from microtile.linalg._api import gemm, linear_forward
from microtile._config._context import get_option
from microtile._config._schema import ACTIVATIONS
from microtile.nn._act_kernels import (act_backward, act_backward_colsum, act_forward,
                                       colsum_work_size)
from microtile.sparse._format import is_sparse
from microtile.sparse._spmm import csr_product
from microtile.sparse.products import spmm
from microtile.nn._linear_kernels import linear_weight_and_input_grads
from microtile.nn._dtypes import as_grad, as_input, float_dtype
from microtile.nn._init import as_generator, bias_uniform, kaiming_uniform
from microtile.nn._module import Module, check_int, per_thread
from microtile.nn._parameter import Parameter, locked

_F64 = np.dtype(np.float64)

# Multiply-adds per GEMM from which the two backward GEMMs run side by side (below it, one
# threaded GEMM after the other starts faster).
PAIR_MIN_MACS = 1 << 22


class Linear(Module):
    """Fully connected layer with torch's layout and initialisation.

    ``y = x @ weight.T + bias`` with ``weight`` of shape (out_features, in_features).  The
    input may have any number of leading dimensions: (..., in_features) -> (..., out_features).

    Parameters
    ----------
    in_features, out_features : int
    bias : bool
        Whether to learn an additive bias.
    dtype : float32 or float64
    rng : numpy.random.Generator, int or None
        Source of the initial values (torch's default: Kaiming-uniform with a = sqrt(5),
        bias uniform in +-1/sqrt(in_features)).

    Notes
    -----
    Backward computes ``dW += dYᵀ·X`` and ``dX = dY·W`` as GEMMs on the stored arrays with
    transpose flags (no transposed copy), and the bias gradient as column sums in the same
    pass that applies a fused activation's derivative.

    A scipy.sparse (N, in_features) input runs forward and the weight gradient on the sparse
    kernels (``spmm``); ``backward`` then returns None (no input gradient).  The kernels
    want the weight as (in_features, out_features) rows, so each such call makes one
    transposed copy of the weight (or of its gradient) in a reused buffer.

    After ``nn.prune``, a layer whose kept fraction of weights is at or below
    ``get_config()["sparse_density"]`` runs its forward on the sparse kernel with the
    weight's kept entries (the structure is fixed at pruning time; only the values are
    gathered per call).
    """

    _param_names = ("weight", "bias")
    _fusable = True
    # What forward saves for backward, per thread (see ``Module``).
    _x2 = per_thread()
    _y2 = per_thread()
    _act = per_thread()
    _in_shape = per_thread()
    # The CSR structure of the kept weights after nn.prune (a ``PrunedStructure``), or None.
    _pruned = None

    def __init__(self, in_features, out_features, bias=True, *, dtype=np.float32, rng=None):
        self.in_features = check_int(in_features, "in_features", "Linear")
        self.out_features = check_int(out_features, "out_features", "Linear")
        dt = float_dtype(dtype, "Linear")
        gen = as_generator(rng)
        self.weight = Parameter(kaiming_uniform(gen, (self.out_features, self.in_features),
                                                self.in_features, dt))
        self.bias = (Parameter(bias_uniform(gen, (self.out_features,), self.in_features, dt))
                     if bias else None)

    def forward(self, x):
        """``x @ weight.T + bias`` for ``x`` of shape (..., in_features)."""
        return self._forward(x, None)

    def _forward(self, x, activation):
        if is_sparse(x):
            return self._forward_sparse_input(x, activation)
        dt = self.weight.dtype
        x = as_input(x, dt)
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self!r}: input has shape {x.shape}, expected (..., "
                             f"{self.in_features})")
        # The row count spelled out: reshape(-1, 0) cannot infer it when in_features is 0.
        x2 = x if x.ndim == 2 else x.reshape(math.prod(x.shape[:-1]), self.in_features)
        y2 = self._buffer("y", (x2.shape[0], self.out_features), dt)
        bias = self.bias.data if self.bias is not None else None
        pruned = self._pruned
        if pruned is not None and pruned.sparse_at(get_option("sparse_density")):
            self._forward_pruned(pruned, x2, bias, activation, y2)
        else:
            linear_forward(x2, self.weight.data, bias=bias, activation=activation, out=y2)
        self._x2 = x2
        self._y2 = y2
        self._act = ACTIVATIONS[activation]
        self._in_shape = x.shape
        if x.ndim == 2:
            return y2
        return y2.reshape(x.shape[:-1] + (self.out_features,))

    _folds_batchnorm = True

    def _out_channels(self):
        return self.out_features

    def _forward_folded(self, x, bn, activation):
        """act(bn(x @ weight.T + bias)) for an eval-mode BatchNorm1d ``bn`` in one GEMM
        (see ``Sequential``), or None when it does not apply (an input that is not a dense
        2-D batch, or a pruned layer on its sparse kernel): the caller then runs the layers
        one by one."""
        if is_sparse(x) or self._pruned is not None:
            return None
        dt = self.weight.dtype
        x = as_input(x, dt)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            return None
        w, b = bn._fold(self.weight.data, None if self.bias is None else self.bias.data,
                        self.weight.shape)
        y = self._buffer("y", (x.shape[0], self.out_features), dt)
        linear_forward(x, w, bias=b, activation=activation, out=y)
        return y

    def _forward_pruned(self, pruned, x2, bias, activation, y2):
        """y2 = act(x2 @ weight.T + bias) with the kept weights as CSR: yᵀ = W @ xᵀ on the
        row-gather kernel, which streams rows of xᵀ (so xᵀ and yᵀ are made contiguous in
        reused buffers)."""
        dt = y2.dtype
        n = x2.shape[0]
        xt = self._buffer("xt", (self.in_features, n), dt)
        np.copyto(xt, x2.T)
        yt = self._buffer("yt", (self.out_features, n), dt)
        beta = 0.0
        if bias is not None:
            np.copyto(yt, bias[:, None])
            beta = 1.0
        csr_product(False, pruned.indptr, pruned.indices, pruned.values(self.weight.data),
                    self.in_features, xt, yt, 1.0, beta)
        np.copyto(y2, yt.T)
        self._activate(y2, activation)

    @staticmethod
    def _activate(y2, activation):
        code = ACTIVATIONS[activation]
        if code:
            flat = y2.reshape(-1)
            act_forward(flat, flat, code)

    def _forward_sparse_input(self, x, activation):
        """Forward on a scipy.sparse batch: y = x @ weight.T + bias on the sparse kernel,
        never densifying x."""
        dt = self.weight.dtype
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"{self!r}: sparse input has shape {x.shape}, expected (N, "
                             f"{self.in_features})")
        if x.dtype != dt:
            x = x.astype(dt)
        n = x.shape[0]
        wt = self._buffer("wt", (self.in_features, self.out_features), dt)
        np.copyto(wt, self.weight.data.T)
        y2 = self._buffer("y", (n, self.out_features), dt)
        if self.bias is not None:
            spmm(x, wt, beta=1.0, c=self.bias.data, out=y2)
        else:
            spmm(x, wt, out=y2)
        self._activate(y2, activation)
        self._x2 = x
        self._y2 = y2
        self._act = ACTIVATIONS[activation]
        self._in_shape = x.shape
        return y2

    def backward(self, dy, *, need_input_grad=True):
        """Accumulate the parameter gradients; return dL/dx (None if not ``need_input_grad``).

        When the layer ran with a fused activation (inside a Sequential), ``dy`` is the
        gradient with respect to the activation's output.
        """
        x2, y2 = self._x2, self._y2
        if x2 is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        dt = y2.dtype
        out_shape = self._in_shape[:-1] + (self.out_features,)
        dy = as_grad(dy, dt, out_shape, self)
        dy2 = dy if dy.ndim == 2 else dy.reshape(y2.shape)
        act = self._act
        dz = self._buffer("dz", y2.shape, dt) if act else dy2
        sparse_x = is_sparse(x2)
        # No input gradient for a sparse input (the API's rule: it would be dense).
        dx = self._buffer("dx", x2.shape, dt) if need_input_grad and not sparse_x else None
        # The gradients are shared by every thread: written under their locks.
        with locked(self.weight, self.bias):
            if self.bias is not None:
                gb, acc = self.bias._grad_for_update()
                work = self._buffer("colsum", (colsum_work_size(self.out_features),), _F64)
                act_backward_colsum(act, y2, dy2, dz if act else None, gb, work, acc)
            elif act:
                act_backward(act, y2.reshape(-1), dy2.reshape(-1), dz.reshape(-1))
            gw, acc = self.weight._grad_for_update()
            if sparse_x:
                # dWᵀ = xᵀ @ dz: the scatter kernel, one nonzero of x at a time.
                if acc:
                    spmm(dz.T, x2, beta=1.0, c=gw, out=gw)
                else:
                    spmm(dz.T, x2, out=gw)
            elif (dx is None
                    or x2.shape[0] * self.in_features * self.out_features < PAIR_MIN_MACS
                    or not dz.flags.c_contiguous or not x2.flags.aligned
                    or not linear_weight_and_input_grads(dz, x2, self.weight.data, gw, dx,
                                                         acc)):
                if acc:
                    gemm(dz, x2, trans_a=True, beta=1.0, c=gw, out=gw)
                else:
                    gemm(dz, x2, trans_a=True, out=gw)
                if dx is not None:
                    gemm(dz, self.weight.data, out=dx)
        if dx is None:
            return None
        return dx if len(self._in_shape) == 2 else dx.reshape(self._in_shape)

    @property
    def _no_input_grad(self):
        """True after this thread's forward on a sparse input: backward returns None then
        (``Sequential`` accepts that from its first layer)."""
        return is_sparse(self._x2)

    def __repr__(self):
        return (f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None})")
