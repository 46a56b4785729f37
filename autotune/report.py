"""The tuned result beside NumPy at reference sizes, and the tables the CLI prints.

Both libraries are held to the same thread count (threadpoolctl for NumPy's BLAS,
``config_context`` for microtile) and timed in alternating blocks with a pause before each:
OpenBLAS's and libgomp's workers spin for a while after a call, and on a machine with few
cores whichever library runs second would otherwise share its cores with the other's
spinning threads.
"""
import time

import numpy as np
from threadpoolctl import threadpool_limits

import microtile
from autotune import measure
from microtile._config._schema import DTYPES

REFERENCE = {
    True: [(256, 256, 256), (1024, 1024, 1024), (3136, 64, 576)],
    False: [(64, 64, 64), (256, 256, 256), (1024, 1024, 1024), (2048, 2048, 2048),
            (4096, 256, 64), (3136, 64, 576)],
}
# OpenBLAS's workers spin for up to ~0.2 s after a call (measured here: microtile on 2
# threads runs 30x slower in that window); libgomp's for well under 0.06 s.
PAUSE_AFTER_NUMPY = 0.25
PAUSE_AFTER_MICROTILE = 0.06


def compare(dtype, shapes, overrides, threads, blocks=3, block_seconds=0.05, seed=7):
    """Median GFLOP/s of microtile (under ``overrides``) and of NumPy on each shape.

    Blocks alternate between the libraries; a block times every shape, so the pauses that
    let the other library's threads go to sleep are paid once per block, not per shape.
    """
    probs = [measure.Problem(m, n, k, dtype, seed=seed) for m, n, k in shapes]
    cfg = {"threads": threads, **overrides}
    errs = []
    for p in probs:
        err = measure.check(p, cfg)
        if err > 1.0:
            raise RuntimeError(f"{dtype} {p.m}x{p.n}x{p.k}: the chosen parameters give a "
                               f"wrong result (error {err:.3g} x the bound)")
        errs.append(err)
    outs = [np.empty_like(p.out) for p in probs]
    mt = [[] for _ in probs]
    npy = [[] for _ in probs]
    with threadpool_limits(limits=threads, user_api="blas"):
        for b in range(blocks):
            for which in (("np", "mt") if b % 2 == 0 else ("mt", "np")):
                if which == "mt":
                    time.sleep(PAUSE_AFTER_NUMPY)
                    with microtile.config_context(dtype=dtype, **cfg):
                        for i, p in enumerate(probs):
                            mt[i].append(measure.timed(p.run, block_seconds))
                else:
                    time.sleep(PAUSE_AFTER_MICROTILE)
                    for i, p in enumerate(probs):
                        a, bb, o = p.a, p.b, outs[i]
                        npy[i].append(measure.timed(lambda: np.matmul(a, bb, out=o),
                                                    block_seconds))
    rows = []
    for i, p in enumerate(probs):
        rows.append({"dtype": dtype, "m": p.m, "n": p.n, "k": p.k, "threads": threads,
                     "microtile_gflops": round(p.flops / float(np.median(mt[i])) / 1e9, 2),
                     "numpy_gflops": round(p.flops / float(np.median(npy[i])) / 1e9, 2),
                     "error_ratio": round(errs[i], 4)})
    return rows


def reference_table(chosen, dtypes, threads, quick, peak=None, say=None):
    """Rows of :func:`compare` for every reference shape and dtype."""
    rows = []
    for dt in dtypes:
        p = (peak or {}).get(dt, {})
        # Per-core peak times threads: a multi-thread peak measured while other processes
        # held a core would flatter every figure.
        top = p.get("1", 0) * threads
        for row in compare(dt, REFERENCE[bool(quick)], chosen[dt], threads,
                           blocks=3 if quick else 5):
            row["percent_of_peak"] = (round(100 * row["microtile_gflops"] / top, 1)
                                      if top else None)
            rows.append(row)
            if say:
                say(f"reference {dt} {row['m']}x{row['n']}x{row['k']}: microtile "
                    f"{row['microtile_gflops']:.1f}, NumPy {row['numpy_gflops']:.1f} GFLOP/s")
    return rows


def _cube(v):
    """m*n*k thresholds read best as the cube they equal."""
    if not isinstance(v, (int, float)) or v <= 0:
        return str(v)
    return f"{round(v ** (1 / 3))}^3"


def params_table(doc):
    """The chosen parameters per dtype, with the analytical model's beside them."""
    chosen = doc.get("chosen", {})
    kernels = doc.get("probed", {}).get("isa", {}).get("kernels", {})
    model = doc.get("probed", {}).get("model_blocking", {})
    lines = [f"{'':10}{'kernel':>8}{'mc':>7}{'kc':>7}{'nc':>7}{'threads from':>14}"
             f"{'no-pack to':>12}{'A in place':>12}{'split':>7}"]
    for dt in DTYPES:
        c = chosen.get(dt)
        if not c:
            continue
        mr, nr = kernels.get(dt, ("?", "?"))
        lines.append(f"{dt:10}{f'{mr}x{nr}':>8}{c.get('mc', '-'):>7}{c.get('kc', '-'):>7}"
                     f"{c.get('nc', '-'):>7}{_cube(c.get('thread_mnk')):>14}"
                     f"{_cube(c.get('nopack_mnk')):>12}{c.get('nopack_a_panels', '-'):>12}"
                     f"{str(c.get('split', '-')):>7}")
        if dt in model:
            m = model[dt]
            lines.append(f"{'  model':10}{'':>8}{m['mc']:>7}{m['kc']:>7}{m['nc']:>7}")
    opts = chosen.get("options") or {}
    search = doc.get("measured", {}).get("search", {})
    found = search.get("options", {}) if isinstance(search, dict) else {}
    for name, value in opts.items():
        lines.append(f"{name} = {value}")
        if name == "sparse_density":
            lines[-1] += _sparse_ladder(found.get("sparse_density"))
    return "\n".join(lines)


def _sparse_ladder(ev):
    """What sparse_density was chosen from, when the run measured it: the sparse forward's
    speed over the dense one down the density ladder."""
    if not isinstance(ev, dict) or not ev.get("densities"):
        return ""
    ladder = " ".join(f"{d:g}:{r:.2f}x" for d, r in zip(ev["densities"], ev["combined"]))
    return (" (a pruned Linear at or below it runs sparse)\n  forward speed, sparse over "
            f"dense, by density: {ladder}")


def gflops_table(rows, conditions=None):
    lines = [f"{'dtype':9}{'m x n x k':>18}{'threads':>9}{'microtile':>11}{'NumPy':>9}"
             f"{'ratio':>7}{'of peak':>9}"]
    for r in rows:
        shape = f"{r['m']}x{r['n']}x{r['k']}"
        ratio = r["microtile_gflops"] / r["numpy_gflops"] if r["numpy_gflops"] else float("nan")
        pk = f"{r['percent_of_peak']:.0f} %" if r.get("percent_of_peak") else "-"
        lines.append(f"{r['dtype']:9}{shape:>18}{r['threads']:>9}"
                     f"{r['microtile_gflops']:>11.1f}{r['numpy_gflops']:>9.1f}{ratio:>7.2f}"
                     f"{pk:>9}")
    lines.append("GFLOP/s, medians of alternating blocks; NumPy held to the same threads.")
    effs = [v for v in (conditions or {}).values() if isinstance(v, (int, float))]
    if effs and min(effs) < 0.75:
        lines.append(f"Other processes were using the CPUs while this was measured (threads "
                     f"ran at {min(effs):.0%} efficiency): multi-thread figures are low.")
    return "\n".join(lines)


def summary(doc, path):
    """The text the CLI ends with."""
    probed = doc.get("probed", {})
    cpu = probed.get("cpu", {})
    tuner = doc.get("tuner", {})
    head = [f"microtile {doc.get('library_version')} on {cpu.get('model', '?')}: "
            f"{cpu.get('usable', '?')} usable CPU(s), kernels {doc.get('isa')}, "
            f"tuned for {tuner.get('threads', '?')} thread(s) "
            f"({tuner.get('mode', '?')} run, {tuner.get('seconds', 0):.0f} s)"]
    for note in probed.get("caches", {}).get("notes", []):
        head.append("note: " + note)
    peak = probed.get("peak_gflops", {})
    if peak:
        head.append("micro-kernel peak per core: " + ", ".join(
            f"{dt} {v.get('1', 0):.1f} GFLOP/s" for dt, v in peak.items()))
    parts = ["\n".join(head), params_table(doc)]
    rows = doc.get("measured", {}).get("reference", [])
    if rows:
        parts.append(gflops_table(rows, doc.get("measured", {}).get("reference_conditions")))
    busy = sorted({f"{dt} {name}" for dt, ev in doc.get("measured", {}).get("search", {}).items()
                   if isinstance(ev, dict) for name in ev.get("busy", [])})
    if busy:
        parts.append("Kept at their defaults because other processes held the CPUs while "
                     "they were measured: " + ", ".join(busy) + ". Re-run on a quiet machine.")
    parts.append(f"profile: {path}")
    return "\n\n".join(parts)
