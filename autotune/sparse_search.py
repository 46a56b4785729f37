"""The sparse option: ``sparse_density``, the weight density at or below which a pruned
``nn.Linear`` runs its forward on the sparse kernel (spmm with the kept weights as CSR)
instead of the dense GEMM.

The crossover is measured on what the library runs: float32 ``nn.Linear`` layers of the
shapes nn models use, magnitude-pruned with ``nn.prune`` step by step down a ladder of
densities (as iterative pruning does), their forward on a batch timed with the sparse path
forced (``sparse_density=1``) and with the dense one forced (``sparse_density=0``) in
interleaved rounds (``tuning.sweep``), each path's output checked against a float64 product
before it is timed.  The value kept is the largest density of the ladder at which the sparse
forward is faster by ``SPARSE_MARGIN`` (``choose_density``).
"""
import math
import time

import numpy as np

from autotune import tuning
from microtile import nn

# (out_features, in_features) of the layers timed, batch BATCH: a pruned 4096x4096 layer (the
# issue's measure) and a common 1024-wide one.  --quick times the smaller one only.
SHAPES = {True: [(1024, 1024)], False: [(4096, 4096), (1024, 1024)]}
BATCH = 256
DENSITIES = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02)
# How much faster the sparse forward must be.  At the crossover the two are equal, and a
# layer pruned less evenly than a random one (real magnitudes cluster in rows) or a batch of
# another size can tip it back; a sparse forward chosen at a loss costs more than a dense one
# kept a little too long.
SPARSE_MARGIN = 1.10
# Every CHECK_STRIDE-th row of the batch is checked against the float64 product: every
# output of the layer and every column block of both kernels, at 1/16 of a full reference.
CHECK_STRIDE = 16
# Seconds a timing sample lasts at least: several forwards of the small layer per sample, one
# of the large.
MIN_SECONDS = 0.01


class PrunedLinear:
    """A float32 ``nn.Linear`` and a batch, with the interface of ``measure.Problem``
    (``dtype``, ``flops``, ``out``, ``run()``, ``error()``), so that ``tuning.sweep`` checks
    and times its forward under config overrides.

    Parameters
    ----------
    out_features, in_features, batch : int
    seed : int
        Seeds the weights and the batch.

    Notes
    -----
    ``flops`` is the dense product's (2 * batch * in * out) on either path, so the ratio of
    two rates is the ratio of the two paths' speeds.
    """

    def __init__(self, out_features, in_features, batch, seed=0):
        self.shape = (out_features, in_features)
        self.layer = nn.Linear(in_features, out_features, dtype=np.float32, rng=seed)
        self.x = np.random.default_rng(seed + 1).uniform(
            -1, 1, (batch, in_features)).astype(np.float32)
        self.dtype = np.dtype(np.float32)
        self.flops = 2.0 * batch * in_features * out_features
        self.density = 1.0
        # What the last forward returned (the layer's own reused buffer once it has run).
        self._y = np.full((batch, out_features), np.nan, np.float32)
        self.ref = self.bound = None

    def __repr__(self):
        return (f"Linear({self.shape[1]}, {self.shape[0]}) at density {self.density:g}, "
                f"batch {len(self.x)}")

    def prune_to(self, density):
        """Prune the layer to ``density`` (kept fraction, at most the current one: weights
        pruned before stay pruned) and compute the float64 reference of the checked rows.

        Parameters
        ----------
        density : float
        """
        nn.prune(self.layer, 1.0 - density)
        self.density = density
        x64 = self.x[::CHECK_STRIDE].astype(np.float64)
        w64 = self.layer.weight.data.astype(np.float64)
        b64 = self.layer.bias.data.astype(np.float64)
        self.ref = x64 @ w64.T + b64
        # measure.Problem's bound for in_features products plus the bias.
        eps = float(np.finfo(np.float32).eps)
        self.bound = ((self.shape[1] + 3) * eps * (np.abs(x64) @ np.abs(w64).T + np.abs(b64))
                      + np.finfo(np.float32).tiny)

    @property
    def out(self):
        """The last forward's output: ``measure.check`` fills it with NaN before a run, so a
        path that left it unwritten cannot pass."""
        return self._y

    def run(self):
        self._y = self.layer.forward(self.x)

    def error(self):
        """Largest error of the checked rows as a multiple of the bound (<= 1 is correct)."""
        y = self._y[::CHECK_STRIDE]
        if y.shape != self.ref.shape or not np.isfinite(y).all():
            return math.inf
        return float(np.max(np.abs(y - self.ref) / self.bound))


def choose_density(densities, speedups, margin=SPARSE_MARGIN):
    """The largest of ``densities`` at which the sparse forward wins by ``margin``.

    Parameters
    ----------
    densities : sequence of float
        In any order.
    speedups : sequence of float
        Sparse forward speed over dense forward speed at each density.
    margin : float
        A density counts as won where the speed-up is above ``margin``.

    Returns
    -------
    float
        One of ``densities``, or 0.0 when the sparse forward wins at none of them.

    Notes
    -----
    Sorted by density, the sparse path is used below a cut placed where the summed log of
    speed-up over margin is largest (``tuning.best_cut``), not at the first density that
    loses: one noisy density cannot move the choice far.
    """
    if len(densities) != len(speedups):
        raise ValueError(f"{len(densities)} densities but {len(speedups)} speed-ups")
    order = sorted(range(len(densities)), key=lambda i: densities[i])
    i = tuning.best_cut([speedups[j] / margin for j in order], favour_low=True)
    return float(densities[order[i - 1]]) if i else 0.0


def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def search_sparse_density(t, base=None, shapes=None, densities=DENSITIES, batch=BATCH):
    """Measure ``sparse_density`` on this machine with ``t.threads`` threads.

    Parameters
    ----------
    t : tuning.Tuning
        Its ``quick`` picks the shapes and its settings the rounds; the step's time budget
        is ``t.deadline("sparse")``.
    base : dict, optional
        ``config_context`` overrides under which both paths run (the tuned float32
        blocking, so the dense GEMM timed is the one the profile will hold).
    shapes : list of (out_features, in_features), optional
        Default ``SHAPES[t.quick]``.
    densities : sequence of float
        The ladder, measured from the densest down.
    batch : int

    Returns
    -------
    float or None
        The chosen density; None when it could not be measured cleanly (the samples spread
        too much, or the budget ran out before the sparse path won anywhere), and the
        library's default should stay.

    Raises
    ------
    RuntimeError
        When either path computes a wrong result.
    """
    deadline = t.deadline("sparse")
    shapes = SHAPES[bool(t.quick)] if shapes is None else shapes
    base = {"threads": t.threads, **(base or {})}
    configs = {"sparse": {"sparse_density": 1.0}, "dense": {"sparse_density": 0.0}}
    probs = [PrunedLinear(o, i, batch, seed=t.seed + n) for n, (o, i) in enumerate(shapes)]
    ladder = sorted(densities, reverse=True)
    measured, per_shape = [], {f"{o}x{i}": [] for o, i in shapes}
    for d in ladder:
        if measured and time.perf_counter() > deadline:
            break
        for p in probs:
            p.prune_to(d)
        med = tuning.sweep(t, probs, configs, base, t.s["sweep_rounds"], MIN_SECONDS)
        if tuning.too_noisy(t, "sparse_density"):
            return None
        ups = [m["sparse"] / m["dense"] for m in med]
        for (o, i), r in zip(shapes, ups):
            per_shape[f"{o}x{i}"].append(round(r, 3))
        measured.append((d, _geomean(ups)))
    ds = [d for d, _ in measured]
    combined = [r for _, r in measured]
    value = choose_density(ds, combined)
    complete = len(measured) == len(ladder)
    if value == 0.0 and not complete:
        value = None        # lost at the densities measured; the rest of the ladder unknown
    t.evidence["sparse_density"] = {
        "batch": batch, "shapes": [list(s) for s in shapes], "threads": t.threads,
        "densities": ds, "speedup": per_shape, "combined": [round(r, 3) for r in combined],
        "margin": SPARSE_MARGIN, "complete": complete, "chosen": value}
    ladder_text = " ".join(f"{d:g}:{r:.2f}" for d, r in measured)
    if value is None:
        t.say(f"sparse_density: out of time before the sparse forward won ({ladder_text} "
              "sparse/dense speed); keeping the default")
    elif value == 0.0:
        t.say(f"sparse_density: the sparse forward is not faster by {SPARSE_MARGIN:.2f}x at "
              f"any density down to {min(ds):g} ({ladder_text}); pruned layers stay dense")
    else:
        t.say(f"sparse_density: {value:g}, pruned Linear layers at or below it run sparse "
              f"({ladder_text} sparse/dense speed, {batch}-row batches)")
    return value
