"""Recurrent layers RNN, LSTM and GRU (torch's equations, weights and names), and LastStep.

Per layer and sequence the work is: the input projection of all T steps as one GEMM
(T*N x k*H, biases in its write-back), then the time loop in ``_rnn_kernels`` (W_hh packed
once; per step one job on the thread pool whose items multiply by it and apply the cell to
their tiles, all without the GIL), and in backward, after the loop, one GEMM per weight
over the stacked gate gradients of all steps and one for the input gradient.  Everything
the loops touch is a per-thread reusable buffer (see ``Module``; the packed W_hh too), so
once the shapes have been seen a training step allocates nothing but a few small views.

Internally sequences are time-major, (T, N, features) C-contiguous, one step a block of N
rows; a ``batch_first`` input is copied into that layout once (and the output and input
gradient back), which costs one pass over them against the GEMMs' k*H passes.
"""
import math

import numpy as np

from microtile._common._checks import as_float_array
from microtile._config._schema import ACTIVATIONS
from microtile.linalg._api import gemm, linear_forward
from microtile.nn._act_kernels import act_backward_colsum, colsum_work_size
from microtile.nn._dtypes import as_grad, as_input, float_dtype
from microtile.nn._init import as_generator
from microtile.nn._module import Module, check_bool, check_int, per_thread
from microtile.nn._parameter import Parameter, locked
from microtile.nn._rnn_kernels import (gru_backward, gru_forward, lstm_backward, lstm_forward,
                                       rnn_backward, rnn_forward, work_size)

_F64 = np.dtype(np.float64)

# Gates per cell: the weights are (gates * hidden_size, features), blocks in torch's order
# (LSTM i, f, g, o; GRU r, z, n).
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}



class _RecurrentBase(Module):
    """What RNN, LSTM and GRU share: parameters, validation, the layer loop."""

    _mode = None
    # What forward saves for backward, and the states it reports, per thread (see Module).
    _saved = per_thread()
    h_n = per_thread()
    dh0 = per_thread()

    def __init__(self, input_size, hidden_size, num_layers, bias, batch_first, dtype, rng):
        owner = type(self).__name__
        self.input_size = check_int(input_size, "input_size", owner, minimum=1)   # as torch
        self.hidden_size = check_int(hidden_size, "hidden_size", owner, minimum=1)
        self.num_layers = check_int(num_layers, "num_layers", owner, minimum=1)
        self.bias = check_bool(bias, "bias", owner)
        self.batch_first = check_bool(batch_first, "batch_first", owner)
        dt = float_dtype(dtype, owner)
        gen = as_generator(rng)
        H = self.hidden_size
        gh = _GATES[self._mode] * H
        # torch: every weight and bias uniform in +-1/sqrt(hidden_size), drawn in
        # state-dict order.
        bound = 1.0 / math.sqrt(H)
        names = []
        for layer in range(self.num_layers):
            fan = self.input_size if layer == 0 else H
            shapes = [(f"weight_ih_l{layer}", (gh, fan)), (f"weight_hh_l{layer}", (gh, H))]
            if self.bias:
                shapes += [(f"bias_ih_l{layer}", (gh,)), (f"bias_hh_l{layer}", (gh,))]
            for name, shape in shapes:
                setattr(self, name, Parameter(gen.uniform(-bound, bound, shape).astype(dt)))
                names.append(name)
        self._param_names = tuple(names)

    # -- helpers -------------------------------------------------------------------------
    def _weights(self, layer):
        """(weight_ih, weight_hh, bias_ih, bias_hh) Parameters of one layer (biases None
        without bias)."""
        get = self.__dict__.get
        return (get(f"weight_ih_l{layer}"), get(f"weight_hh_l{layer}"),
                get(f"bias_ih_l{layer}"), get(f"bias_hh_l{layer}"))

    def _state_arg(self, value, name, n, unbatched, dt):
        """An initial state as (num_layers, N, H) in ``dt`` (torch's shape; (num_layers, H)
        for an unbatched input)."""
        arr = as_input(value, dt, name)
        L, H = self.num_layers, self.hidden_size
        want = (L, H) if unbatched else (L, n, H)
        if arr.shape != want:
            raise ValueError(f"{self!r}: {name} has shape {arr.shape}, expected {want}")
        return arr.reshape(L, 1, H) if unbatched else arr

    def _work(self, N, backward, dt):
        """The time loop's reusable workspace (the packed W_hh, see ``work_size``)."""
        size = work_size(self._mode, N, self.hidden_size, backward, dt == _F64)
        return self._buffer(("work", backward), (size,), dt)

    def _time_major(self, x):
        """The input as (T, N, I) (a view), and whether it was unbatched (2-D)."""
        if x.ndim == 2:
            return x[:, None, :], True
        if x.ndim != 3:
            order = "N, T" if self.batch_first else "T, N"
            raise ValueError(f"{self!r}: input must be 3-D ({order}, input_size) or 2-D "
                             f"(T, input_size), got shape {x.shape}")
        return (x.transpose(1, 0, 2) if self.batch_first else x), False

    def _rows(self, a3, key):
        """A (T, N, F) array as C-contiguous (T*N, F) rows: a view when it already is, else
        a copy into a reusable buffer."""
        T, N, F = a3.shape
        if a3.flags.c_contiguous:
            return a3.reshape(T * N, F)
        buf = self._buffer(key, (T * N, F), a3.dtype)
        np.copyto(buf.reshape(T, N, F), a3)
        return buf

    def _to_caller(self, rows, T, N, F, unbatched, key):
        """Time-major (T*N, F) rows in the caller's layout: (T, F) unbatched, (N, T, F) with
        batch_first (a copy into a buffer), else (T, N, F)."""
        if unbatched:
            return rows.reshape(T, F)
        if self.batch_first:
            out = self._buffer(key, (N, T, F), rows.dtype)
            np.copyto(out, rows.reshape(T, N, F).transpose(1, 0, 2))
            return out
        return rows.reshape(T, N, F)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x, h0=None):
        """Run the layers over the sequence ``x``; returns the last layer's output sequence.

        Parameters
        ----------
        x : array_like
            (T, N, input_size), or (N, T, input_size) with ``batch_first``, or an unbatched
            (T, input_size).
        h0 : array_like or None
            The initial hidden state (num_layers, N, hidden_size) ((num_layers, hidden_size)
            unbatched); for an LSTM the pair ``(h_0, c_0)``.  None: zeros.

        Returns
        -------
        ndarray
            (T, N, hidden_size) (``batch_first``: (N, T, hidden_size); unbatched:
            (T, hidden_size)).  The final states are left in ``h_n`` (and ``c_n``).
        """
        dt = self.weight_ih_l0.dtype
        x = as_input(x, dt)
        x3, unbatched = self._time_major(x)
        T, N, n_in = x3.shape
        if n_in != self.input_size:
            raise ValueError(f"{self!r}: input has shape {x.shape}, expected input_size "
                             f"{self.input_size} in the last dimension")
        states = self._initial_states(h0, N, unbatched, dt)
        self._saved = None
        H, L = self.hidden_size, self.num_layers
        rows = self._rows(x3, "x")
        per_layer = []
        finals = [self._buffer(("final", k), (L, N, H), dt)
                  for k in range(len(self._state_names))]
        for layer in range(L):
            init = None if states is None else [s[layer] for s in states]
            saved = self._layer_forward(layer, rows, T, N, init, dt)
            per_layer.append((rows, saved))
            rows = saved[0][N:]          # this layer's h_1..h_T: the next one's input
            for k, buf in enumerate(saved[:len(finals)]):
                np.copyto(finals[k][layer], buf[T * N:])
        self._saved = (per_layer, T, N, unbatched, states is not None)
        for name, f in zip(self._state_names, finals):
            setattr(self, name, f.reshape(L, H) if unbatched else f)
        for name in self._grad_names:
            setattr(self, name, None)
        return self._to_caller(rows, T, N, H, unbatched, "y")

    def __call__(self, x, h0=None):
        return self.forward(x, h0)

    def _initial_states(self, h0, n, unbatched, dt):
        """The initial states as a list of (num_layers, N, H) arrays (one, or (h, c) for the
        LSTM), or None."""
        if h0 is None:
            return None
        return [self._state_arg(h0, "h0", n, unbatched, dt)]

    def _fill_state(self, buf, n, init):
        """First N rows of a ((T+1)*N, H) state buffer: the layer's initial state or zeros."""
        if init is None:
            buf[:n].fill(0)
        else:
            np.copyto(buf[:n], init)

    # -- backward --------------------------------------------------------------------------
    def backward(self, dy, *, need_input_grad=True):
        """Back-propagate through time; accumulates every weight's gradient and returns
        dL/dx (None when ``need_input_grad`` is False).

        The gradients of the initial state go to ``dh0`` (and ``dc0``) when ``forward`` was
        given one (else they are None).  No gradient flows in through ``h_n``/``c_n``: ``dy``
        is that of the output sequence only.
        """
        saved = self._saved
        if saved is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        per_layer, T, N, unbatched, has_h0 = saved
        H, L = self.hidden_size, self.num_layers
        dt = self.weight_ih_l0.dtype
        if unbatched:
            out_shape = (T, H)
        else:
            out_shape = (N, T, H) if self.batch_first else (T, N, H)
        dy = as_grad(dy, dt, out_shape, self)
        if unbatched:
            dy3 = dy[:, None, :]
        else:
            dy3 = dy.transpose(1, 0, 2) if self.batch_first else dy
        grads0 = ([self._buffer(("d0", k), (L, N, H), dt) for k in range(len(self._grad_names))]
                  if has_h0 else None)
        dx = None
        for layer in range(L - 1, -1, -1):
            x_rows, fwd = per_layer[layer]
            need_dx = layer > 0 or need_input_grad
            carries = self._layer_backward(layer, fwd, dy3, T, N, has_h0, x_rows, need_dx, dt)
            if grads0 is not None:
                for g, c in zip(grads0, carries):
                    np.copyto(g[layer], c)
            if need_dx:
                dx = carries[-1]
                dy3 = dx.reshape(T, N, dx.shape[1])
        for k, name in enumerate(self._grad_names):
            g = None if grads0 is None else grads0[k]
            setattr(self, name, g.reshape(L, H) if unbatched and g is not None else g)
        if not need_input_grad:
            return None
        return self._to_caller(dx, T, N, self.input_size, unbatched, "dx_caller")

    def _accumulate(self, layer, x_rows, h_rows, dgx, dgh, skip, dt):
        """After a layer's time loop: dW_ih += dGxᵀ X and dW_hh += dGhᵀ H_prev (one GEMM
        each over all steps), the biases += the column sums.  ``skip`` leading rows are left
        out of the dW_hh product (step 0 without an initial state: its H_prev is zero)."""
        w_ih, w_hh, b_ih, b_hh = self._weights(layer)
        with locked(w_ih, w_hh, b_ih, b_hh):
            for w, a, b in ((w_ih, dgx, x_rows), (w_hh, dgh[skip:], h_rows[skip:])):
                g, acc = w._grad_for_update()
                if acc:
                    gemm(a, b, trans_a=True, beta=1.0, c=g, out=g)
                else:
                    gemm(a, b, trans_a=True, out=g)
            if b_ih is not None:
                sums = self._colsum(dgx, 0, dt)
                b_ih._add_to_grad(sums)
                # LSTM and RNN: both biases get the same sums (dgh is dgx), computed once.
                b_hh._add_to_grad(sums if dgh is dgx else self._colsum(dgh, 1, dt))

    def _colsum(self, d, which, dt):
        """Column sums of the stacked gate gradients (float64 partial sums) in a buffer."""
        gh = d.shape[1]
        work = self._buffer("colsum", (colsum_work_size(gh),), _F64)
        sums = self._buffer(("bsum", which), (gh,), dt)
        act_backward_colsum(0, d, d, None, sums, work, False)
        return sums

    def _input_grad(self, layer, dgx, need_dx, T, N, dt):
        """dX = dGx W_ih (one GEMM over all steps) into a reusable buffer, or None."""
        if not need_dx:
            return None
        w_ih = self._weights(layer)[0].data
        # Layers above 0 share one buffer: layer l's dX is written only after its loop has
        # read the dY it replaces.
        key = "dx" if layer == 0 else "dh_seq"
        out = self._buffer(key, (T * N, w_ih.shape[1]), dt)
        gemm(dgx, w_ih, out=out)
        return out

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        return s

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"


class LSTM(_RecurrentBase):
    """Long short-term memory layers with torch's equations, gate order and weight names.

    Per step, with gates in the order i, f, g, o::

        i = sigmoid(W_ii x + b_ii + W_hi h + b_hi)    f = sigmoid(... f block ...)
        g = tanh(... g block ...)                     o = sigmoid(... o block ...)
        c' = f * c + i * g                            h' = o * tanh(c')

    Parameters
    ----------
    input_size, hidden_size : int
    num_layers : int
        Stacked layers, each taking the previous one's output sequence.
    bias : bool
        Whether the layers have ``bias_ih_l{k}`` and ``bias_hh_l{k}``.
    batch_first : bool
        Inputs and outputs are (N, T, features) instead of (T, N, features); the states
        are (num_layers, N, hidden_size) either way.
    dtype : float32 or float64
    rng : numpy.random.Generator, int or None
        Source of the initial values: every weight and bias uniform in
        +-1/sqrt(hidden_size), as torch.

    Attributes
    ----------
    weight_ih_l{k}, weight_hh_l{k} : Parameter
        (4*hidden_size, input_size or hidden_size) and (4*hidden_size, hidden_size).
    bias_ih_l{k}, bias_hh_l{k} : Parameter
        (4*hidden_size,), when ``bias``.
    h_n, c_n : ndarray
        The final states of the last ``forward`` (num_layers, N, hidden_size).
    dh0, dc0 : ndarray or None
        After ``backward``, the gradients of the initial states given to ``forward``.

    Notes
    -----
    ``y = lstm(x, (h0, c0))`` returns torch's first result; ``lstm.backward(dy)`` returns
    dx.  The returned arrays (and ``h_n``, ``c_n``, ``dh0``, ``dc0``) are reused by the next
    call in the same thread: copy what you keep.
    """

    _mode = "LSTM"
    _state_names = ("h_n", "c_n")
    _grad_names = ("dh0", "dc0")
    c_n = per_thread()
    dc0 = per_thread()

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 *, dtype=np.float32, rng=None):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dtype, rng)

    def _initial_states(self, h0, n, unbatched, dt):
        if h0 is None:
            return None
        if not (isinstance(h0, (tuple, list)) and len(h0) == 2):
            raise TypeError(f"{self!r}: the initial state must be a pair (h_0, c_0), got "
                            f"{type(h0).__name__}")
        return [self._state_arg(h0[0], "h_0", n, unbatched, dt),
                self._state_arg(h0[1], "c_0", n, unbatched, dt)]

    def _layer_forward(self, layer, x_rows, T, N, init, dt):
        w_ih, w_hh, b_ih, b_hh = self._weights(layer)
        H = self.hidden_size
        G = self._buffer(("G", layer), (T * N, 4 * H), dt)
        bias = None
        if b_ih is not None:
            # b_ih + b_hh added once, in the projection's write-back.
            bias = self._buffer(("bias", layer), (4 * H,), dt)
            np.add(b_ih.data, b_hh.data, out=bias)
        linear_forward(x_rows, w_ih.data, bias=bias, out=G)
        Hb = self._buffer(("H", layer), ((T + 1) * N, H), dt)
        Cb = self._buffer(("C", layer), ((T + 1) * N, H), dt)
        self._fill_state(Hb, N, None if init is None else init[0])
        self._fill_state(Cb, N, None if init is None else init[1])
        if T * N:
            lstm_forward(G, Hb, Cb, w_hh.data, N, init is not None, self._work(N, False, dt))
        return Hb, Cb, G

    def _layer_backward(self, layer, fwd, dy3, T, N, has_h0, x_rows, need_dx, dt):
        Hb, Cb, G = fwd
        H = self.hidden_size
        dG = self._buffer("dG", (T * N, 4 * H), dt)
        dh = self._buffer("dh", (N, H), dt)
        dc = self._buffer("dc", (N, H), dt)
        if T * N:
            lstm_backward(G, Cb, dy3, self._weights(layer)[1].data, dG, dh, dc, has_h0,
                          self._work(N, True, dt))
        else:
            dh.fill(0)
            dc.fill(0)
        self._accumulate(layer, x_rows, Hb[:T * N], dG, dG, 0 if has_h0 else N, dt)
        return dh, dc, self._input_grad(layer, dG, need_dx, T, N, dt)


class GRU(_RecurrentBase):
    """Gated recurrent unit layers with torch's equations, gate order and weight names.

    Per step, with gates in the order r, z, n::

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        h' = (1 - z) * n + z * h

    Parameters, attributes and notes are those of ``LSTM`` with 3*hidden_size rows per
    weight and no cell state (no ``c_n``/``dc0``; the initial state is one array).
    """

    _mode = "GRU"
    _state_names = ("h_n",)
    _grad_names = ("dh0",)

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 *, dtype=np.float32, rng=None):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dtype, rng)

    def _layer_forward(self, layer, x_rows, T, N, init, dt):
        w_ih, w_hh, b_ih, b_hh = self._weights(layer)
        H = self.hidden_size
        G = self._buffer(("G", layer), (T * N, 3 * H), dt)
        linear_forward(x_rows, w_ih.data, bias=None if b_ih is None else b_ih.data, out=G)
        Hb = self._buffer(("H", layer), ((T + 1) * N, H), dt)
        HN = self._buffer(("HN", layer), (T * N, H), dt)
        self._fill_state(Hb, N, None if init is None else init[0])
        if T * N:
            # Without bias the kernel does not read b_hh; it still takes a (3H,) array.
            gru_forward(G, Hb, HN, w_hh.data, G[0] if b_hh is None else b_hh.data,
                        b_hh is not None, N, init is not None, self._work(N, False, dt))
        return Hb, HN, G

    def _layer_backward(self, layer, fwd, dy3, T, N, has_h0, x_rows, need_dx, dt):
        Hb, HN, G = fwd
        H = self.hidden_size
        dGx = self._buffer("dG", (T * N, 3 * H), dt)
        dGh = self._buffer("dGh", (T * N, 3 * H), dt)
        dh = self._buffer("dh", (N, H), dt)
        if T * N:
            gru_backward(G, Hb, HN, dy3, self._weights(layer)[1].data, dGx, dGh, dh, has_h0,
                         self._work(N, True, dt))
        else:
            dh.fill(0)
        self._accumulate(layer, x_rows, Hb[:T * N], dGx, dGh, 0 if has_h0 else N, dt)
        return dh, self._input_grad(layer, dGx, need_dx, T, N, dt)


class RNN(_RecurrentBase):
    """Elman recurrent layers, ``h' = act(W_ih x + b_ih + W_hh h + b_hh)``, as torch's RNN.

    Parameters
    ----------
    nonlinearity : {"tanh", "relu"}
        ``act``.  The other parameters, attributes and notes are those of ``LSTM``, with
        hidden_size rows per weight and no cell state.

    Notes
    -----
    Each step is one GEMM whose write-back applies the activation: there is no separate
    pass over the states.
    """

    _state_names = ("h_n",)
    _grad_names = ("dh0",)

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, *, dtype=np.float32, rng=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu', got "
                             f"{nonlinearity!r}")
        self.nonlinearity = nonlinearity
        self._mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        self._act = ACTIVATIONS[nonlinearity]
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dtype, rng)

    def _layer_forward(self, layer, x_rows, T, N, init, dt):
        w_ih, w_hh, b_ih, b_hh = self._weights(layer)
        H = self.hidden_size
        Hb = self._buffer(("H", layer), ((T + 1) * N, H), dt)
        bias = None
        if b_ih is not None:
            bias = self._buffer(("bias", layer), (H,), dt)
            np.add(b_ih.data, b_hh.data, out=bias)
        # The projection goes straight into the rows of h_1..h_T; each step's GEMM adds the
        # recurrent product and applies the activation in place.
        linear_forward(x_rows, w_ih.data, bias=bias, out=Hb[N:])
        self._fill_state(Hb, N, None if init is None else init[0])
        if T * N:
            rnn_forward(Hb, w_hh.data, N, self._act, init is not None)
        return (Hb,)

    def _layer_backward(self, layer, fwd, dy3, T, N, has_h0, x_rows, need_dx, dt):
        (Hb,) = fwd
        H = self.hidden_size
        dG = self._buffer("dG", (T * N, H), dt)
        dh = self._buffer("dh", (N, H), dt)
        if T * N:
            rnn_backward(Hb, dy3, self._weights(layer)[1].data, dG, dh, self._act, has_h0)
        else:
            dh.fill(0)
        self._accumulate(layer, x_rows, Hb[:T * N], dG, dG, 0 if has_h0 else N, dt)
        return dh, self._input_grad(layer, dG, need_dx, T, N, dt)

    def extra_repr(self):
        s = super().extra_repr()
        if self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        return s


class LastStep(Module):
    """The last time step of a sequence: (N, T, F) with ``batch_first``, else (T, N, F),
    to (N, F).

    ``Sequential(LSTM(..., batch_first=True), LastStep(batch_first=True), Linear(...))``
    classifies sequences.  Backward puts the gradient at the last step and zeros elsewhere.

    Parameters
    ----------
    batch_first : bool
    """

    _in_shape = per_thread()

    def __init__(self, batch_first=False):
        self.batch_first = check_bool(batch_first, "batch_first", "LastStep")

    def forward(self, x):
        x = as_float_array(x, "x")
        if x.ndim != 3 or x.shape[1 if self.batch_first else 0] == 0:
            order = "N, T" if self.batch_first else "T, N"
            raise ValueError(f"{self!r}: input must be 3-D ({order}, F) with at least one "
                             f"step, got shape {x.shape}")
        self._in_shape = (x.shape, x.dtype)
        return x[:, -1] if self.batch_first else x[-1]

    def backward(self, dy, *, need_input_grad=True):
        saved = self._in_shape
        if saved is None:
            raise RuntimeError(f"{self!r}: backward called before forward")
        shape, dt = saved
        out_shape = (shape[0] if self.batch_first else shape[1], shape[2])
        dy = as_grad(dy, dt, out_shape, self)
        if not need_input_grad:
            return None
        dx = self._buffer("dx", shape, dt)
        dx.fill(0)
        if self.batch_first:
            dx[:, -1] = dy
        else:
            dx[-1] = dy
        return dx

    def __repr__(self):
        return f"LastStep(batch_first={self.batch_first})"
