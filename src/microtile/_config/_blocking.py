"""The analytical blocking model (Low, Igual, Smith and Quintana-Orti, "Analytical modeling
is enough for high-performance BLIS", ACM TOMS 2016), from cache geometry alone.

kc: an mr x kc micro-panel of A and an nr x kc micro-panel of B share L1, one way kept for C;
mc: the mc x kc block of A takes half the L2 ways left after B's micro-panel (the other half
holds C's tiles and the next panels the hardware prefetches); nc: the kc x nc block of B fills
the L3 ways left after A's block, divided among the cores that share the L3; without an L3,
nc is bounded only by NC_MAX.

Two departures from the paper, both measured on a Zen3: the L1 ways given to A are not rounded
down to a whole number (with 6x16 float32 tiles rounding gives kc = 168, a tenth slower than
kc = 256..320), and A's L2 share is halved (the paper's mc = 582 float32 loses 5-10 % to 144).
"""
import math

# When the OS says nothing: a small, common geometry (safe on anything made since 2010).
FALLBACK = {
    1: {"size": 32 * 1024, "ways": 8, "line": 64},
    2: {"size": 256 * 1024, "ways": 4, "line": 64},
    3: {"size": 2 * 1024 * 1024, "ways": 16, "line": 64},
}
# The L3 of a VM or a many-core part is shared with neighbours the OS does not show: measured
# on a 2-vCPU Zen3 slice, nc = 2048 beats 4096 by about 3 %.
NC_MAX = 2048
MC_MAX = 4096
KC_MIN, KC_MAX = 64, 1024


def _geometry(caches, level):
    """(size, ways, line, sets, sharing) of a level, falling back field by field."""
    found = next((c for c in caches if c.get("level") == level), {}) or {}
    fb = FALLBACK[level]
    size = found.get("size") or fb["size"]
    ways = found.get("ways") or fb["ways"]
    line = found.get("line") or fb["line"]
    # The size wins over a reported set count: a tuner may substitute a measured size, and
    # the model must then see that size's sets.
    sets = max(1, size // (ways * line))
    sharing = found.get("shared_cpus") or 1
    return size, ways, line, sets, sharing


def analytical_blocking(caches, mr, nr, itemsize, cores=1):
    """Block sizes {"mc", "kc", "nc"} for an mr x nr micro-kernel on elements of ``itemsize``
    bytes, given caches as ``_hwinfo.read_caches`` lists them (missing levels fall back)."""
    _, w1, l1, n1, _ = _geometry(caches, 1)
    ways_a = max(1.0, (w1 - 1) / (1 + nr / mr))
    kc = int(ways_a * n1 * l1 // (mr * itemsize))
    kc = int(min(KC_MAX, max(KC_MIN, kc // 32 * 32)))

    _, w2, l2, n2, _ = _geometry(caches, 2)
    ways_b2 = math.ceil(nr * kc * itemsize / (n2 * l2))
    ways_a2 = max(1, (w2 - 1 - ways_b2) // 2)
    mc = ways_a2 * n2 * l2 // (kc * itemsize)
    mc = int(max(mr, min(MC_MAX, mc) // mr * mr))

    return {"mc": mc, "kc": kc, "nc": model_nc(caches, mc, kc, nr, itemsize, cores)}


def model_nc(caches, mc, kc, nr, itemsize, cores=1):
    """The model's nc for given mc and kc: the kc x nc block of B in the L3 ways that A's
    block leaves, divided among the cores sharing the L3 (the tuner asks again once it has
    measured its own mc and kc: a deeper kc needs a narrower block)."""
    levels = {c.get("level") for c in caches if c.get("size")}
    if 2 in levels and 3 not in levels:
        # The L2 is the last level (many Arm cores): B's block streams from memory and is
        # reused from L1 a micro-panel at a time, so nothing bounds nc but the buffer.
        return NC_MAX // nr * nr
    s3, w3, l3, n3, share3 = _geometry(caches, 3)
    ways_a3 = math.ceil(mc * kc * itemsize / (n3 * l3))
    ways_b3 = max(1, w3 - 1 - ways_a3)
    nc = ways_b3 * n3 * l3 // (kc * itemsize)
    nc //= max(1, min(share3, cores))
    return int(max(nr, min(NC_MAX, nc) // nr * nr))
