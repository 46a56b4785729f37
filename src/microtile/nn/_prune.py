"""Magnitude pruning: ``prune`` zeroes the smallest weights of every Linear and Conv2d and
keeps them at zero through optimizer steps; a pruned Linear sparse enough runs its forward
on the sparse kernel.

The pruned positions live on the weight ``Parameter`` (``_prune``: flat indices), and
``Optimizer.step`` zeroes them again after every update, so momentum, weight decay or Adam's
moments can never revive them.  A Linear also keeps the CSR structure of its kept weights
(``PrunedStructure``), fixed at pruning time: a forward only gathers the current values.
"""
import numpy as np

from microtile.nn._conv import Conv2d
from microtile.nn._linear import Linear
from microtile.nn._module import Module

__all__ = ["prune"]


class PrunedStructure:
    """The CSR structure (int64 indices) of the kept entries of a 2-D weight.

    Attributes
    ----------
    indptr, indices : ndarray of int64
    flat : ndarray of int64
        Position of each kept entry in the flattened weight, in CSR order.
    density : float
        Kept entries over all entries.
    """

    def __init__(self, keep):
        rows, cols = keep.shape
        self.flat = np.flatnonzero(keep).astype(np.int64)
        self.indices = (self.flat % max(cols, 1)).astype(np.int64)
        self.indptr = np.zeros(rows + 1, np.int64)
        np.cumsum(keep.sum(axis=1), out=self.indptr[1:])
        self.density = self.flat.size / keep.size if keep.size else 1.0
        self._size = keep.size

    def sparse_at(self, threshold):
        """Whether the density is at or below ``threshold``, to the nearest whole weight:
        prune(amount=0.9) keeps round(0.1 * size) weights, which may be one more than
        0.1 * size, and such a layer is 90 % pruned all the same."""
        return self.flat.size <= threshold * self._size + 0.5

    def values(self, weight):
        """The kept entries of ``weight`` (its current values), CSR-ordered, contiguous."""
        return weight.reshape(-1).take(self.flat)


def _smallest(key, count):
    """Positions of the ``count`` smallest entries of the 1-D ``key``, ties broken by
    position: the first ``count`` of a stable argsort, found by selection in O(size) instead
    (a stable sort of a 4096x4096 layer's magnitudes took 6 s, and the tuner prunes such
    layers)."""
    if count >= key.size:
        return np.arange(key.size)
    kth = np.partition(key, count - 1)[count - 1]
    if np.isnan(kth):
        # NaN magnitudes sort last, after +inf, which comparisons cannot tell apart.
        return np.argsort(key, kind="stable")[:count]
    below = np.flatnonzero(key < kth)
    ties = np.flatnonzero(key == kth)[:count - below.size]
    return np.concatenate((below, ties))


def _targets(module):
    """Every Linear and Conv2d in ``module`` (itself included), each once."""
    seen, out = set(), []

    def visit(m):
        if id(m) in seen:
            return
        seen.add(id(m))
        if isinstance(m, (Linear, Conv2d)):
            out.append(m)
        for _, child in getattr(m, "_named_children", lambda: [])():
            if child is not None:
                visit(child)

    visit(module)
    return out


def prune(module, amount):
    """Magnitude pruning in place.

    In every ``Linear`` and ``Conv2d`` under ``module`` (itself included), the fraction
    ``amount`` of weights with the smallest magnitude becomes zero and stays zero through
    later optimizer steps.  Pruning again prunes the fraction ``amount`` of all the weights
    anew, keeping earlier pruned ones pruned (they are the smallest: zero).  A ``Linear``
    whose density (kept fraction) is at or below ``get_config()["sparse_density"]`` then
    runs its forward on the sparse kernel.

    Parameters
    ----------
    module : Module
    amount : float
        Fraction in [0, 1] of each layer's weights to prune; ``round(amount * size)``
        weights are zeroed (ties broken by position).

    Returns
    -------
    Module
        ``module`` itself.

    Raises
    ------
    TypeError
        When ``module`` is not a Module.
    ValueError
        When ``amount`` is not a number in [0, 1].
    """
    if not isinstance(module, Module):
        raise TypeError(f"prune: module must be a microtile.nn Module, got "
                        f"{type(module).__name__}")
    if isinstance(amount, (bool, str, bytes)):
        raise ValueError(f"prune: amount must be a number in [0, 1], got {amount!r}")
    try:
        amount = float(amount)
    except (TypeError, ValueError):
        raise ValueError(f"prune: amount must be a number in [0, 1], got {amount!r}") from None
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"prune: amount must be in [0, 1], got {amount}")
    for layer in _targets(module):
        w = layer.weight
        flat = w._flat_data
        n_prune = int(round(amount * flat.size))
        old = w._prune
        pruned = np.zeros(flat.size, bool)
        if old is not None:
            pruned[old] = True
        if n_prune:
            # Already-pruned weights first (whatever a state load put there), then by
            # magnitude, ties broken by position.
            key = np.where(pruned, -1.0, np.abs(flat.astype(np.float64)))
            pruned[_smallest(key, n_prune)] = True
        idx = np.flatnonzero(pruned)
        w._prune = idx if idx.size else None
        flat[idx] = 0
        if isinstance(layer, Linear):
            layer._pruned = (PrunedStructure(~pruned.reshape(w.shape))
                             if idx.size else None)
    return module
