"""Fit the polynomial P of the float32 normal CDF in ``nn/_act_math.h`` and ``nn/_act_simd.h``.

erfc(z) / 2 = t P(t) e^(-z^2) with t = 1 / (1 + z/2), so P(t) = erfc(z) e^(z^2) / (2t), a
smooth function of t on [1/6, 1] (z in [0, 10]; beyond, e^(-z^2) < 4e-44 and the CDF is
below float32's smallest subnormal times GELU's argument).  The fit minimises the relative
error: least squares on Chebyshev nodes, reweighted by the error (Lawson's iteration towards
minimax), then each coefficient is rounded to float32 in turn and the higher ones refitted.
Prints the coefficients (constant term first) and the worst relative error on a fine grid.

    python tools/fit_normal_cdf.py [--degree 9]

Needs scipy (erfcx).  Not a benchmark or a test: it documents where the constants come from.
"""
import argparse

import numpy as np
from scipy.special import erfcx

T_MIN = 1 / (1 + 5.0)       # z = 10


def target(t):
    z = 2 * (1 / t - 1)
    return 0.5 * erfcx(z) / t


def lawson(V, f, iters):
    """Coefficients minimising max |V c / f - 1| approximately (Lawson's reweighting)."""
    w = np.ones(len(f))
    for _ in range(iters):
        sw = np.sqrt(w)
        c = np.linalg.lstsq((V / f[:, None]) * sw[:, None], sw, rcond=None)[0]
        err = np.abs(V @ c / f - 1)
        w = w * (err + 1e-30)
        w /= w.sum()
    return c


def fit(degree, nodes=8000, iters=300):
    k = np.arange(nodes)
    t = 0.5 * (T_MIN + 1) + 0.5 * (1 - T_MIN) * np.cos(np.pi * (k + 0.5) / nodes)
    f = target(t)
    V = np.vander(t, degree + 1, increasing=True)
    c = lawson(V, f, iters)
    for i in range(degree + 1):
        c[i] = np.float32(c[i])
        if i < degree:
            # refit the remaining coefficients to what the rounded ones leave
            rest = f - V[:, :i + 1] @ c[:i + 1]
            c[i + 1:] = _refit(V[:, i + 1:], rest, f, iters // 3)
    return c


def _refit(Vr, rest, f, iters):
    w = np.ones(len(f))
    for _ in range(iters):
        sw = np.sqrt(w)
        sol = np.linalg.lstsq((Vr / f[:, None]) * sw[:, None], (rest / f) * sw,
                              rcond=None)[0]
        err = np.abs((Vr @ sol - rest) / f)
        w = w * (err + 1e-30)
        w /= w.sum()
    return sol


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--degree", type=int, default=9)
    args = ap.parse_args(argv)
    c = fit(args.degree)
    t = np.linspace(T_MIN, 1, 400001)
    err = np.max(np.abs(np.polynomial.polynomial.polyval(t, c) / target(t) - 1))
    print(f"degree {args.degree}: worst relative error {err:.2e} (float32 coefficients)")
    for i, ci in enumerate(c):
        print(f"  t^{i}: {float(np.float32(ci))!r}f")


if __name__ == "__main__":
    main()
