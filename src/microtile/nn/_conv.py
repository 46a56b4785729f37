"""Conv2d: torch's layer on microtile.conv2d / conv2d_backward (NCHW, groups, dilation)."""
import numpy as np

from microtile._config._schema import ACTIVATIONS
from microtile.nn._act_kernels import act_backward, act_forward
from microtile.nn._dtypes import as_grad, as_input, float_dtype
from microtile.nn._init import as_generator, bias_uniform, kaiming_uniform
from microtile.conv.convolution import conv2d, conv2d_backward
from microtile.nn._module import Module, check_int, per_thread
from microtile.nn._parameter import Parameter


def pair(value, name, owner, minimum):
    """An int or a pair of ints as an (h, w) tuple, each at least ``minimum``."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{owner}: {name} must be an int or a pair, got {value!r}")
        return (check_int(value[0], name, owner, minimum),
                check_int(value[1], name, owner, minimum))
    v = check_int(value, name, owner, minimum)
    return (v, v)


class Conv2d(Module):
    """2-D convolution with torch's argument meanings, weight layout and initialisation.

    ``x`` (N, C, H, W) -> (N, K, P, Q) with ``weight`` (K, C // groups, R, S) and ``bias`` (K,).

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, dilation : int or (int, int)
    padding : int, (int, int), "valid" or "same" ("same" needs stride 1)
    groups : int
        Divides both channel counts.
    bias : bool
    dtype : float32 or float64
    rng : numpy.random.Generator, int or None
    """

    _param_names = ("weight", "bias")
    _fusable = True
    # What forward saves for backward, per thread (see ``Module``).
    _x = per_thread()
    _y = per_thread()
    _act = per_thread()

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, *, dtype=np.float32, rng=None):
        owner = "Conv2d"
        self.in_channels = check_int(in_channels, "in_channels", owner, 1)
        self.out_channels = check_int(out_channels, "out_channels", owner, 1)
        self.kernel_size = pair(kernel_size, "kernel_size", owner, 1)
        self.stride = pair(stride, "stride", owner, 1)
        self.dilation = pair(dilation, "dilation", owner, 1)
        self.groups = check_int(groups, "groups", owner, 1)
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(f"Conv2d: padding must be an int, a pair, 'valid' or 'same', "
                                 f"got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("Conv2d: padding='same' needs stride 1")
            self.padding = padding
        else:
            self.padding = pair(padding, "padding", owner, 0)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"Conv2d: groups={self.groups} must divide in_channels="
                             f"{self.in_channels} and out_channels={self.out_channels}")
        dt = float_dtype(dtype, owner)
        gen = as_generator(rng)
        r, s = self.kernel_size
        fan_in = self.in_channels // self.groups * r * s
        self.weight = Parameter(kaiming_uniform(
            gen, (self.out_channels, self.in_channels // self.groups, r, s), fan_in, dt))
        self.bias = (Parameter(bias_uniform(gen, (self.out_channels,), fan_in, dt))
                     if bias else None)

    def _padding_hw(self):
        """Padding before and after along each axis (torch's split for 'same')."""
        if self.padding == "valid":
            return (0, 0), (0, 0)
        if self.padding == "same":
            out = []
            for d, k in zip(self.dilation, self.kernel_size):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return out[0], out[1]
        ph, pw = self.padding
        return (ph, ph), (pw, pw)

    def output_shape(self, input_shape):
        """(N, K, P, Q) for an input of shape (N, C, H, W); ValueError when it does not fit."""
        if len(input_shape) != 4 or input_shape[1] != self.in_channels:
            raise ValueError(f"{self!r}: input has shape {tuple(input_shape)}, expected "
                             f"(N, {self.in_channels}, H, W)")
        n, _, h, w = input_shape
        pad = self._padding_hw()
        out = []
        for size, (lo, hi), d, k, st in zip((h, w), pad, self.dilation, self.kernel_size,
                                            self.stride):
            span = d * (k - 1) + 1
            if size + lo + hi < span:
                raise ValueError(f"{self!r}: input of shape {tuple(input_shape)} is smaller "
                                 f"than the (dilated) kernel")
            out.append((size + lo + hi - span) // st + 1)
        return (n, self.out_channels, out[0], out[1])

    def _kw(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)

    def forward(self, x):
        """The convolution of ``x`` (N, C, H, W)."""
        return self._forward(x, None)

    def _forward(self, x, activation):
        dt = self.weight.dtype
        x = as_input(x, dt)
        shape = self.output_shape(x.shape)
        y = self._buffer("y", shape, dt)
        bias = self.bias.data if self.bias is not None else None
        conv2d(x, self.weight.data, bias, out=y, **self._kw())
        code = self._activate(y, activation)
        self._x = x
        self._y = y
        self._act = code
        return y

    _folds_batchnorm = True

    def _out_channels(self):
        return self.out_channels

    def _forward_folded(self, x, bn, activation):
        """act(bn(conv(x))) for an eval-mode BatchNorm2d ``bn`` in one convolution (see
        ``Sequential``), or None for an unbatched input (the caller then runs the layers one
        by one, and BatchNorm2d names the problem)."""
        dt = self.weight.dtype
        x = as_input(x, dt)
        if x.ndim != 4:
            return None
        shape = self.output_shape(x.shape)
        w, b = bn._fold(self.weight.data, None if self.bias is None else self.bias.data,
                        self.weight.shape)
        y = self._buffer("y", shape, dt)
        conv2d(x, w, b, out=y, **self._kw())
        self._activate(y, activation)
        return y

    @staticmethod
    def _activate(y, activation):
        """A fused activation applied to the output in place (the convolution drivers have
        no epilogue for it); returns its code."""
        code = ACTIVATIONS[activation]
        if code:
            flat = y.reshape(-1)
            act_forward(flat, flat, code)
        return code

    def backward(self, dy, *, need_input_grad=True):
        """Accumulate the parameter gradients; return dL/dx (None if not ``need_input_grad``)."""
        x, y = self._x, self._y
        if x is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        dy = as_grad(dy, y.dtype, y.shape, self)
        if self._act:
            dz = self._buffer("dz", y.shape, y.dtype)
            act_backward(self._act, y.reshape(-1), dy.reshape(-1), dz.reshape(-1))
        else:
            dz = dy
        # dx, dW and db land in buffers kept between steps (the kernel zeroes what it adds
        # into), so a training step of known shapes allocates no arrays.
        w = self.weight.data
        dx, dw, db = conv2d_backward(
            dz, x, w, need_input_grad=bool(need_input_grad),
            need_bias_grad=self.bias is not None, **self._kw(),
            _dx=self._buffer("dx", x.shape, y.dtype) if need_input_grad else None,
            _dw=self._buffer("dw", w.shape, y.dtype),
            _db=self._buffer("db", (w.shape[0],), y.dtype) if self.bias is not None else None)
        self.weight._add_to_grad(dw)
        if self.bias is not None:
            self.bias._add_to_grad(db)
        return dx if need_input_grad else None

    def __repr__(self):
        extra = ""
        if self.stride != (1, 1):
            extra += f", stride={self.stride}"
        if self.padding != (0, 0):
            extra += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            extra += f", dilation={self.dilation}"
        if self.groups != 1:
            extra += f", groups={self.groups}"
        if self.bias is None:
            extra += ", bias=False"
        return (f"Conv2d({self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}{extra})")
