"""Winograd (Toom-Cook) transform matrices for F(m, r), built exactly from their points.

One output tile of m x m values of a correlation with an r x r kernel is

    Y = AT [ (G g GT) * (BT d B) ] A        (* elementwise, d the alpha x alpha input tile,
                                              alpha = m + r - 1)

Written as the transpose of a linear convolution computed by evaluating both polynomials at
alpha - 1 finite points p_j and at infinity, multiplying, and interpolating back:

* G  (alpha x r):     G[j, k] = p_j**k            (infinity: the leading coefficient, k = r-1)
* AT (m x alpha):     AT[i, j] = p_j**i           (infinity: i = m-1)
* BT (alpha x alpha): the inverse transpose of the alpha x alpha evaluation matrix.

Row j of G may be divided by any nonzero number if row j of BT is multiplied by it; here
each finite row of G is divided by prod_{l != j} (p_j - p_l), which makes BT's entries
small integers for integer and half-integer points.  Everything is computed in exact
fractions and rounded to float64 once, so the only error left is that of the arithmetic
of the convolution itself.

Which points: the error of Winograd convolution grows with the tile, and for a given tile
depends on the points (Barabasz, Anderson, Soodhalter and Gregg 2018, "Error analysis and
improving the accuracy of Winograd convolution for deep neural networks").  The sets below
were measured on this machine in float32 (figures beside ``convolution.WINOGRAD_ERROR``).
"""
from fractions import Fraction

import numpy as np

# m -> the finite points (the last point is always infinity).
#   F(2x2, 3x3): 0, 1, -1 (Lavin and Gray 2016); its entries are 0, +-1, +-1/2.
#   F(4x4, 3x3): 0, +-1, 1/2, -2.  Of the sets tried (0,+-1,+-2 of Lavin and Gray;
#   0,+-1,+-1/2; 0,+-1,2,-1/2; this one) its error was the smallest on normal data (2-4x
#   below Lavin's) and about Lavin's on adversarial data (see convolution.WINOGRAD_ERROR).
POINTS = {
    2: (Fraction(0), Fraction(1), Fraction(-1)),
    4: (Fraction(0), Fraction(1), Fraction(-1), Fraction(1, 2), Fraction(-2)),
}


def _inverse(a):
    """Exact inverse of a square matrix of Fractions (Gauss-Jordan)."""
    n = len(a)
    m = [list(row) + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(a)]
    for col in range(n):
        piv = next(r for r in range(col, n) if m[r][col] != 0)
        m[col], m[piv] = m[piv], m[col]
        p = m[col][col]
        m[col] = [v / p for v in m[col]]
        for r in range(n):
            if r != col and m[r][col] != 0:
                f = m[r][col]
                m[r] = [a_ - f * b_ for a_, b_ in zip(m[r], m[col])]
    return [row[n:] for row in m]


def matrices(m, r=3, points=None):
    """(BT, G, AT) as float64 arrays for F(m x m, r x r) on ``points`` (alpha - 1 finite
    points, distinct; default ``POINTS[m]``)."""
    pts = list(POINTS[m] if points is None else [Fraction(p) for p in points])
    alpha = m + r - 1
    if len(pts) != alpha - 1 or len(set(pts)) != len(pts):
        raise ValueError(f"F({m},{r}) needs {alpha - 1} distinct finite points, got {pts}")
    # Evaluation of a degree alpha-1 polynomial at the points and at infinity.
    V = [[p ** i for i in range(alpha)] for p in pts] + [[Fraction(int(i == alpha - 1))
                                                          for i in range(alpha)]]
    Vinv = _inverse(V)
    BT = [[Vinv[i][j] for i in range(alpha)] for j in range(alpha)]     # V^-T
    G = [[p ** k for k in range(r)] for p in pts] + [[Fraction(int(k == r - 1))
                                                      for k in range(r)]]
    AT = [[p ** i for p in pts] + [Fraction(int(i == m - 1))] for i in range(m)]
    for j, p in enumerate(pts):
        f = Fraction(1)
        for q in pts:
            if q != p:
                f *= p - q
        G[j] = [v / f for v in G[j]]
        BT[j] = [v * f for v in BT[j]]
    return tuple(np.array([[float(v) for v in row] for row in mat])
                 for mat in (BT, G, AT))
