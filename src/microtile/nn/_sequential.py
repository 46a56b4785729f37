"""Sequential: layers applied in order, with an activation folded into the layer before it,
and in eval mode a BatchNorm folded into the Linear or Conv2d before it."""
from microtile.nn._activation import _Activation
from microtile.nn._module import Module, grads_ready_callback, hook_aware, per_thread
from microtile.nn._norm import _BatchNorm


class Sequential(Module):
    """A chain of layers: ``forward`` applies them in order, ``backward`` in reverse.

    A Linear, Conv2d, BatchNorm or Residual followed by ReLU, Sigmoid or Tanh runs as one
    step: the activation is applied while the layer writes its output, and its derivative
    while the layer reads the incoming gradient, saving a pass over the activations each
    way.  The results are the same as running the two layers separately.  (LeakyReLU,
    GELU and SiLU need their input for the backward pass, so they always run on their own.)

    In eval mode a BatchNorm that uses its running statistics and directly follows a
    Linear (2-D input) or Conv2d is folded into it: the layer runs once with its weights
    scaled per output channel and the normalisation's shift as its bias (added, with a
    following ReLU, Sigmoid or Tanh, as the output is written), so the BatchNorm costs no
    pass over the output.  The results equal the two layers' to rounding.  A ``backward``
    after such a forward first runs the two layers again unfolded (eval-mode gradients are
    rare, and the folded forward keeps nothing they need).

    Parameters
    ----------
    *layers
        Objects with ``forward``/``backward`` (and optionally ``parameters``).
    """

    # The last forward's steps (which layers ran fused), per thread (see ``Module``).
    _plan = per_thread()

    def __init__(self, *layers):
        for i, layer in enumerate(layers):
            if not (callable(getattr(layer, "forward", None))
                    and callable(getattr(layer, "backward", None))):
                raise TypeError(f"Sequential: argument {i} ({type(layer).__name__}) is not a "
                                f"layer (it needs forward and backward)")
        self.layers = tuple(layers)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def _named_children(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    def _backward_children(self):
        """The layers in the order ``backward`` visits them (see ``grads_ready_hook``)."""
        return self.layers[::-1]

    def forward(self, x):
        """Apply every layer; a ValueError names the layer (index and repr) it came from."""
        layers = self.layers
        n = len(layers)
        plan = []
        i = 0
        while i < n:
            layer = layers[i]
            nxt = layers[i + 1] if i + 1 < n else None
            try:
                if isinstance(nxt, _BatchNorm) and nxt._folds_into(layer):
                    after = layers[i + 2] if i + 2 < n else None
                    act = (after if isinstance(after, _Activation)
                           and type(after)._act_name is not None else None)
                    y = layer._forward_folded(x, nxt, act._act_name if act else None)
                    if y is not None:
                        if act is not None:
                            act._adopt_output(y)
                        plan.append((i, layer, (nxt, act, x)))
                        x = y
                        i += 3 if act is not None else 2
                        continue
                if (isinstance(nxt, _Activation) and getattr(layer, "_fusable", False)
                        and type(nxt)._act_name is not None):
                    x = layer._forward(x, nxt._act_name)
                    nxt._adopt_output(x)
                    plan.append((i, layer, True))
                    i += 2
                    continue
                x = layer.forward(x)
            except ValueError as exc:
                self._plan = None
                raise ValueError(f"Sequential layer {i} ({layer!r}): {exc}") from exc
            plan.append((i, layer, False))
            i += 1
        self._plan = plan
        return x

    def backward(self, dy, *, need_input_grad=True):
        """Back-propagate ``dy`` through every layer; returns dL/dx (None when
        ``need_input_grad`` is False, which spares the first layer's input-gradient GEMM)."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("Sequential: backward called before forward")
        ready = grads_ready_callback()
        for k in range(len(plan) - 1, -1, -1):
            i, layer, how = plan[k]
            need = need_input_grad or k > 0
            try:
                if isinstance(how, tuple):
                    dy = self._unfolded_backward(layer, how, dy, ready)
                if isinstance(layer, Module):
                    dy = layer.backward(dy, need_input_grad=need)
                else:
                    dy = layer.backward(dy)
            except ValueError as exc:
                raise ValueError(f"Sequential layer {i} ({layer!r}): {exc}") from exc
            if dy is None and need and not (k == 0 and getattr(layer, "_no_input_grad", False)):
                raise RuntimeError(f"Sequential layer {i} ({layer!r}) returned no gradient")
            if ready is not None and not hook_aware(layer):
                # This layer's gradients are final: a data-parallel wrapper may start
                # reducing them while the layers before it run their backward.
                ready(layer)
        return dy

    @staticmethod
    def _unfolded_backward(layer, how, dy, ready):
        """Backward through a BatchNorm (and activation) that ran folded into ``layer``:
        the two run again unfolded on the kept input, then the BatchNorm's backward; returns
        the gradient for ``layer``'s output (``layer``'s own backward follows)."""
        bn, act, x = how
        z = layer._forward(x, None)
        bn._forward(z, act._act_name if act is not None else None)
        dy = bn.backward(dy)
        if ready is not None and not hook_aware(bn):
            ready(bn)
        return dy

    @property
    def _no_input_grad(self):
        """Whether this thread's last forward began with a layer that has no input gradient
        to give (a Linear fed a sparse batch): backward then returns None."""
        plan = self._plan
        return bool(plan) and getattr(plan[0][1], "_no_input_grad", False)

    def __repr__(self):
        if not self.layers:
            return "Sequential()"
        body = "\n".join(f"  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(\n{body}\n)"
