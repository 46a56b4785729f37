"""The thresholds: ``split`` (ic vs jc vs the driver's own choice, raced on square, tall,
wide and skinny shapes), and from sweeps over sizes ``thread_mnk`` (the size below which one
thread beats them all), ``nopack_mnk`` and ``nopack_a_panels`` (up to where reading the
operands in place beats packing them)."""
import math

from autotune import measure
from autotune.tuning import SPLIT_MARGIN, best_cut, sweep, too_noisy
from microtile._config._schema import SPLIT_NAMES

# At 256^3 more threads cannot lose on free cores: a speed-up below this there means another
# process took a core during the thread sweep.
CONTAMINATED_SPEEDUP = 0.9


def split_shapes(n):
    """Square, tall, wide and skinny (convolution-like) shapes for the split race."""
    return [(n, n, n), (4 * n, n // 4, n // 2), (n // 4, 4 * n, n // 2), (3136, 64, 576)]


def split_thread_counts(threads):
    """Thread counts the split is measured at: 2, the powers of two between, and ``threads``
    (a handful even on a big machine)."""
    counts, n = [], 2
    while n < threads:
        counts.append(n)
        n *= 2
    return counts + [threads] if threads > 1 else []


def search_split(t, block):
    """ic vs jc (vs the driver's own choice, "auto") at each of ``split_thread_counts``;
    the driver holds one split per dtype, so the tuned thread count's result is chosen and
    the others are kept as evidence."""
    size = 1024 if t.dtype == "float32" else 768
    probs = [t.problem(*s, seed=t.seed + i) for i, s in enumerate(split_shapes(size))]
    cands = [{"split": name} for name in SPLIT_NAMES.values()]   # auto, ic, jc
    auto = cands[0]
    chosen = auto
    counts = split_thread_counts(t.threads)
    for nt in counts:
        base = {**t.pinned, "threads": nt, "thread_mnk": 0, **block}

        def sample(c):  # geometric mean over the shapes
            logs = [math.log(measure.gflops(p, {**base, **c})) for p in probs]
            return math.exp(sum(logs) / len(logs))

        def check(c):
            return max(measure.check(p, {**base, **c}) for p in probs)

        deadline = t.deadline("split")
        res = measure.race(cands, sample, check, rounds=t.s["rounds"], top=3,
                           extra_rounds=t.s["extra"], deadline=deadline, seed=t.seed)
        w = res.winner
        if w is None:
            raise RuntimeError(f"{t.dtype}: no split computed a correct result")
        pick = auto if res.score(w) < res.score(auto) * SPLIT_MARGIN else w
        t.say(f"{t.dtype} split on {nt} threads: {pick['split']} ("
              + ", ".join(f"{c['split']} {res.score(c):.1f}" for c in cands) + " GFLOP/s)")
        t.evidence.setdefault("split", {})[str(nt)] = {
            "shapes": [list(s) for s in split_shapes(size)], "results": res.summary(),
            "chosen": pick["split"]}
        if nt == t.threads:
            chosen = pick
    return chosen["split"]


def _mid(a, b):
    return int(math.sqrt(a * b))


def search_thread_mnk(t, block, split):
    """The m*n*k below which one thread is faster than ``t.threads``."""
    sizes = [16, 24, 32, 48, 64, 96, 128, 192, 256]
    probs = [t.problem(s, s, s) for s in sizes]
    for attempt in range(2):
        med = sweep(t, probs, {"one": {"threads": 1},
                               "all": {"threads": t.threads, "thread_mnk": 0}},
                    {**block, "split": split}, t.s["sweep_rounds"], 0.004)
        ratios = [m["all"] / m["one"] for m in med]
        # At 256^3 (a millisecond of work) more threads cannot lose on free cores; if
        # they do, another process took a core during the sweep.
        if ratios[-1] >= CONTAMINATED_SPEEDUP:
            break
        t.say(f"{t.dtype} threads: {t.threads} threads ran {ratios[-1]:.2f}x one thread at "
              f"256^3; other processes were using the CPUs"
              + ("; measuring again" if attempt == 0 else ""))
        if attempt == 0 and t.quiet is not None:
            t.quiet(True)
    else:
        t.evidence["thread_mnk"] = {"sizes": sizes, "speedup": [round(r, 3) for r in ratios],
                                    "threads": t.threads, "chosen": None,
                                    "contaminated": True}
        return None
    i = best_cut(ratios, favour_low=False)
    mnk = [s ** 3 for s in sizes]
    if i == 0:
        value = mnk[0]
    elif i == len(sizes):
        value = mnk[-1] * 2
    else:
        value = _mid(mnk[i - 1], mnk[i])
    t.say(f"{t.dtype} threads pay from about {round(value ** (1 / 3))}^3 ("
          + " ".join(f"{s}:{r:.2f}" for s, r in zip(sizes, ratios)) + " speed-up)")
    t.evidence["thread_mnk"] = {"sizes": sizes, "speedup": [round(r, 3) for r in ratios],
                                "threads": t.threads, "chosen": value}
    return value


def search_nopack(t, block, default):
    """The m*n*k at or below which reading A and B in place beats packing them."""
    sizes = [8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    probs = [t.problem(s, s, s) for s in sizes]
    med = sweep(t, probs, {"inplace": {"nopack_mnk": 1 << 40}, "packed": {"nopack_mnk": 0}},
                {"threads": 1, **block}, t.s["sweep_rounds"], 0.003)
    if too_noisy(t, "nopack_mnk"):
        return None
    ratios = [m["inplace"] / m["packed"] for m in med]
    mnk = [s ** 3 for s in sizes]
    matters = max(abs(math.log(r)) for r in ratios) > math.log(1.03)
    i = best_cut(ratios, favour_low=True)
    if not matters:
        value = default
    elif i == 0:
        value = 0
    elif i == len(sizes):
        value = mnk[-1]
    else:
        value = _mid(mnk[i - 1], mnk[i])
    t.say(f"{t.dtype} no-pack path up to about {round(value ** (1 / 3))}^3 ("
          + " ".join(f"{s}:{r:.2f}" for s, r in zip(sizes, ratios)) + " in-place/packed)"
          + ("" if matters else "; under 3 % either way, default kept"))
    t.evidence["nopack_mnk"] = {"sizes": sizes, "ratio": [round(r, 3) for r in ratios],
                                "matters": matters, "chosen": value}
    return value


def search_nopack_a(t, block, default):
    """How many nr-wide column panels of B (at most) make reading A in place pay."""
    panels = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    mk = 512
    probs = [t.problem(mk, p * t.nr, mk) for p in panels]
    med = sweep(t, probs, {"inplace": {"nopack_a_panels": 1 << 10},
                           "packed": {"nopack_a_panels": 0}},
                {"threads": 1, "nopack_mnk": 0, **block}, t.s["sweep_rounds"], 0.003)
    if too_noisy(t, "nopack_a_panels"):
        return None
    ratios = [m["inplace"] / m["packed"] for m in med]
    matters = max(abs(math.log(r)) for r in ratios) > math.log(1.03)
    i = best_cut(ratios, favour_low=True)
    value = (panels[i - 1] if i else 0) if matters else default
    t.say(f"{t.dtype} A read in place up to {value} column panel(s) ("
          + " ".join(f"{p}:{r:.2f}" for p, r in zip(panels, ratios)) + " in-place/packed)"
          + ("" if matters else "; under 3 % either way, default kept"))
    t.evidence["nopack_a_panels"] = {"m": mk, "k": mk, "panels": panels,
                                     "ratio": [round(r, 3) for r in ratios],
                                     "matters": matters, "chosen": value}
    return value
