"""BatchNorm1d and BatchNorm2d: torch's batch normalisation, with running statistics."""
import math

import numpy as np

from microtile._config._schema import ACTIVATIONS
from microtile.nn import _norm_kernels as _kernels
from microtile.nn._act_kernels import act_backward, act_forward
from microtile.nn._dtypes import as_grad, as_input, float_dtype
from microtile.nn._module import Module, check_bool, check_int, check_real, per_thread
from microtile.nn._parameter import Parameter, locked

_F64 = np.dtype(np.float64)
# Rows of the per-channel float64 arrays the kernels fill: what the forward saves for the
# backward (mean, 1/std, scale, shift) and the backward's sums and coefficients.
_SAVED_ROWS = 4
_COEF_ROWS = 5
_RELU = ACTIVATIONS["relu"]


class _BatchNorm(Module):
    """What BatchNorm1d and BatchNorm2d share; subclasses say which input ranks they take."""

    _param_names = ("weight", "bias")
    _state_buffer_names = ("running_mean", "running_var", "num_batches_tracked")
    _ranks = ()
    _expected = ""
    # A following ReLU, Sigmoid or Tanh in a Sequential is applied by this layer (ReLU in
    # the kernels' own passes, the others in one pass over the output, as Conv2d does).
    _fusable = True
    # What forward saves for backward, per thread (see ``Module``).
    _x3 = per_thread()
    _y3 = per_thread()
    _act = per_thread()
    _saved = per_thread()
    _batch_stats = per_thread()
    _in_shape = per_thread()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, dtype=np.float32):
        owner = type(self).__name__
        self.num_features = check_int(num_features, "num_features", owner, 0)
        self.eps = check_real(eps, "eps", owner, 0.0, math.inf)
        # None: running estimates are the cumulative average of every batch (as torch).
        self.momentum = (None if momentum is None
                         else check_real(momentum, "momentum", owner, 0.0, 1.0))
        self.affine = check_bool(affine, "affine", owner)
        self.track_running_stats = check_bool(track_running_stats, "track_running_stats",
                                               owner)
        self._dtype = dt = float_dtype(dtype, owner)
        c = self.num_features
        self.weight = Parameter(np.ones(c, dt)) if self.affine else None
        self.bias = Parameter(np.zeros(c, dt)) if self.affine else None
        if self.track_running_stats:
            self.running_mean = np.zeros(c, dt)
            self.running_var = np.ones(c, dt)
            self.num_batches_tracked = np.zeros((), np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    @property
    def dtype(self):
        """The layer's dtype (its parameters', buffers' and outputs')."""
        return self._dtype

    def reset_running_stats(self):
        """Running mean 0, running variance 1, no batches tracked (as torch)."""
        if self.track_running_stats:
            self.running_mean.fill(0)
            self.running_var.fill(1)
            self.num_batches_tracked.fill(0)

    def _folds_into(self, layer):
        """Whether this layer, right after ``layer`` in a Sequential, can run folded into it
        (``layer._forward_folded``): eval mode with running statistics, and ``layer`` a
        Linear or Conv2d of this dtype whose outputs are this layer's channels."""
        return (getattr(layer, "_folds_batchnorm", False) and not self._in_training()
                and self.running_mean is not None and layer.weight.dtype == self._dtype
                and layer._out_channels() == self.num_features)

    def _fold(self, weight, bias, shape):
        """(w, b) for a layer whose output then goes through this one in eval mode: the
        weight scaled by weight / sqrt(running_var + eps) along its first axis, the bias
        (None for none) shifted to (bias - running_mean) * scale + self.bias; computed in
        float64, written into buffers of this layer (``shape`` is the weight's)."""
        scale = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
        if self.affine:
            scale = scale * self.weight.data
        shift = -self.running_mean * scale
        if bias is not None:
            shift = shift + bias * scale
        if self.affine:
            shift = shift + self.bias.data
        w = self._buffer("fold_w", shape, self._dtype)
        np.multiply(weight, scale.reshape((-1,) + (1,) * (len(shape) - 1)), out=w,
                    casting="unsafe")
        b = self._buffer("fold_b", (self.num_features,), self._dtype)
        b[...] = shift
        return w, b

    def forward(self, x):
        """Normalise ``x`` per channel (dimension 1): batch statistics in training mode
        (or without running statistics), the running estimates in eval mode."""
        return self._forward(x, None)

    def _forward(self, x, activation):
        dt = self._dtype
        x = as_input(x, dt)
        if x.ndim not in self._ranks or x.shape[1] != self.num_features:
            raise ValueError(f"{self!r}: input has shape {x.shape}, expected "
                             f"{self._expected.format(c=self.num_features)}")
        n, c = x.shape[0], x.shape[1]
        shape3 = (n, c, math.prod(x.shape[2:]))
        if x.flags.c_contiguous:
            x3 = x.reshape(shape3)
        else:
            # Gathered into a buffer of this layer: the kernels stream planes.
            x3 = self._buffer("x", shape3, dt)
            np.copyto(x3.reshape(x.shape), x)
        training = self._in_training()
        if training and shape3[0] * shape3[2] == 1:
            raise ValueError(f"{self!r}: expected more than 1 value per channel when "
                             f"training, got input of shape {x.shape}")
        tracking = self.running_mean is not None
        batch_stats = training or not tracking
        update = training and tracking
        factor = 0.0
        if update:
            self.num_batches_tracked += 1       # in place: the buffer stays the same array
            factor = (1.0 / int(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
        y = self._buffer("y", shape3, dt)
        saved = self._buffer("saved", (_SAVED_ROWS, c), _F64)
        code = ACTIVATIONS[activation]
        _kernels.batch_norm_forward(
            x3, y, _data(self.weight), _data(self.bias), self.running_mean, self.running_var,
            batch_stats, update, factor, self.eps, saved,
            self._buffer("work", (_kernels.work_size(c),), _F64), code == _RELU)
        if code and code != _RELU:
            flat = y.reshape(-1)
            act_forward(flat, flat, code)
        self._x3 = x3
        self._y3 = y
        self._act = code
        self._saved = saved
        self._batch_stats = batch_stats
        self._in_shape = x.shape
        return y.reshape(x.shape)

    def backward(self, dy, *, need_input_grad=True):
        """Accumulate the gradients of ``weight`` and ``bias``; return dL/dx (None if not
        ``need_input_grad``).  After a forward with batch statistics the gradient includes
        their dependence on x, as torch's.  When the layer ran with a fused activation
        (inside a Sequential), ``dy`` is the gradient with respect to the activation's
        output."""
        x3 = self._x3
        if x3 is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        dt = x3.dtype
        dy = as_grad(dy, dt, self._in_shape, self).reshape(x3.shape)
        c = x3.shape[1]
        y3, code = self._y3, self._act
        if code and code != _RELU:
            dz = self._buffer("dz", x3.shape, dt)
            act_backward(code, y3.reshape(-1), dy.reshape(-1), dz.reshape(-1))
            dy = dz
        dx = self._buffer("dx", x3.shape, dt) if need_input_grad else None
        coef = self._buffer("coef", (_COEF_ROWS, c), _F64)
        work = self._buffer("work", (_kernels.work_size(c),), _F64)
        with locked(self.weight, self.bias):
            if self.affine:
                gw, acc_w = self.weight._grad_for_update()
                gb, acc_b = self.bias._grad_for_update()
            else:
                gw = gb = None
                acc_w = acc_b = False
            _kernels.batch_norm_backward(x3, dy, y3 if code == _RELU else None, dx,
                                         _data(self.weight), self._saved, self._batch_stats,
                                         gw, gb, acc_w, acc_b, coef, work)
        return None if dx is None else dx.reshape(self._in_shape)

    def __repr__(self):
        return (f"{type(self).__name__}({self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats})")


def _data(param):
    return None if param is None else param.data


class BatchNorm1d(_BatchNorm):
    """Batch normalisation over (N, C) or (N, C, L) inputs, as ``torch.nn.BatchNorm1d``.

    In training mode each channel is normalised with the batch's mean and biased variance
    (over N, and L), and the running estimates move towards the batch's mean and unbiased
    variance: ``running = (1 - momentum) * running + momentum * batch``.  In eval mode the
    running estimates are used.  Without running statistics the batch's are used in both
    modes.  ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float
        Added to the variance, >= 0.
    momentum : float in [0, 1] or None
        Weight of the new batch in the running estimates; None gives the cumulative
        average over all batches (weight ``1 / num_batches_tracked``).
    affine : bool
        Learn a per-channel ``weight`` (initially 1) and ``bias`` (initially 0).
    track_running_stats : bool
        Keep the buffers ``running_mean`` (0), ``running_var`` (1) and
        ``num_batches_tracked`` (an int64 scalar array, counted in training mode).
    dtype : float32 or float64

    Notes
    -----
    Statistics are accumulated in float64 (in one pass, around each channel's first value),
    so a float32 layer's statistics over a large batch keep their digits.  Training on a
    batch with one value per channel raises ``ValueError``, as torch.
    """
    _ranks = (2, 3)
    _expected = "(N, {c}) or (N, {c}, L)"


class BatchNorm2d(_BatchNorm):
    """Batch normalisation over (N, C, H, W) inputs, as ``torch.nn.BatchNorm2d``.

    The statistics of each channel are taken over N, H and W; otherwise as
    :class:`BatchNorm1d` (same parameters).
    """
    _ranks = (4,)
    _expected = "(N, {c}, H, W)"
