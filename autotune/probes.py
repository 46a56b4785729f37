"""What the machine is: its caches (as the OS and CPUID describe them, and as a latency curve
shows them), its ISA, the CPUs this process may use, and the micro-kernel's peak.

The OS is often wrong in virtual machines: a guest may be told it has a 32 MiB L3 while
other tenants hold most of it, or be told nothing at all.  So every level is confirmed by a
pointer-chasing curve; when the two disagree both are recorded, the disagreement is stated,
and the measured size feeds the model.
"""
import math
import os
import sys
import time

import numpy as np

import microtile
from microtile._config import _blocking, _hwinfo
from microtile._config._schema import DTYPES, ITEMSIZE
from microtile._kernels import _dispatch

# A point joins the current plateau while its latency stays below this factor of the
# plateau's level; a rise beyond it starts a transition.
PLATEAU_RISE = 1.25
MIN_PLATEAU = 3
MERGE_RATIO = 1.3
# The OS size agrees with a measured step when it lies within this factor of the step's
# interval [largest size that fits, smallest size that does not].
AGREE_SLACK = 1.5
CHASE_LINE = 64
PAGE = 4096


def os_caches(sysfs_root=None, cpuid=True):
    """Caches as the operating system (and, if readable, CPUID) describe them.

    Returns ``{"source", "caches", "sources"}``: ``caches`` from the first source that gives
    sizes (sysfs or macOS sysctl, then CPUID), ``sources`` every source's own list.
    """
    sources = {}
    sources["os"] = (_hwinfo.read_caches() if sysfs_root is None
                     else _hwinfo.read_caches(sysfs_root))
    if cpuid:
        try:
            from microtile._probes import _cpuid
            sources["cpuid"] = _cpuid.caches()
        except ImportError:
            sources["cpuid"] = []
    for name in ("os", "cpuid"):
        found = [c for c in sources.get(name, []) if c.get("size")]
        if found:
            return {"source": name, "caches": found, "sources": sources}
    return {"source": None, "caches": [], "sources": sources}


def curve_sizes(max_bytes, min_bytes=4096):
    """Buffer sizes at half-octave steps (2^k and 1.5 * 2^k) from min_bytes to max_bytes."""
    sizes = []
    s = min_bytes
    while s <= max_bytes:
        sizes.append(s)
        if s * 3 // 2 <= max_bytes:
            sizes.append(s * 3 // 2)
        s *= 2
    return sizes


def chase_order(nbytes, line, rng):
    """A random cyclic visiting order of the buffer's lines, page by page.

    Pages are visited in random order and the lines of each page in random order, so the
    prefetchers see no stride while the TLB sees one new page every 64 loads: the curve
    then steps at the caches, not at the TLB's reach.
    """
    nlines = max(1, nbytes // line)
    per_page = max(1, min(PAGE // line, nlines))
    npages = nlines // per_page
    pages = rng.permutation(npages).astype(np.int64)
    within = rng.permuted(np.tile(np.arange(per_page, dtype=np.int64), (npages, 1)), axis=1)
    return (pages[:, None] * per_page + within).ravel()


def latency_points(sizes, *, line=CHASE_LINE, rounds=2, rng=None, deadline=None,
                   best=None):
    """``{size: ns_per_load}``, the fastest of ``rounds`` measurements per size (merged
    into ``best`` when given).

    Rounds sweep all sizes in turn, so a burst of load from another process spoils one
    round's point, not the minimum; the minimum because load only ever adds latency.
    """
    from microtile._probes import _latency
    rng = np.random.default_rng(rng)
    best = {} if best is None else best
    for r in range(rounds):
        if r and deadline is not None and time.perf_counter() > deadline:
            break
        for s in sizes:
            chain = _latency.Chain(s, chase_order(s, line, rng), line)
            slots = chain.slots
            chain.chase(min(2 * slots, 1 << 18) + 8)          # bring it into the caches
            # Enough loads to pass over every line twice, 2^18 at least so that the timer
            # resolution does not matter, 2^19 at most (60 ms from memory).
            count = int(min(max(2 * slots, 1 << 18), 1 << 19))
            t0 = time.perf_counter()
            chain.chase(count)
            ns = (time.perf_counter() - t0) / (count // 8 * 8) * 1e9
            best[s] = min(best.get(s, math.inf), ns)
    return best


def latency_curve(max_bytes, *, rounds=2, rng=None, deadline=None):
    """``[(size_bytes, ns_per_load), ...]`` at half-octave sizes up to ``max_bytes``."""
    sizes = curve_sizes(max_bytes)
    best = latency_points(sizes, rounds=rounds, rng=rng, deadline=deadline)
    return [(s, best[s]) for s in sizes]


def confirm(curve, os_list, *, rounds=3, rng=None, deadline=None):
    """Re-measure the part of the curve around every level where the OS and the curve
    disagree, so that a burst of load during the first sweep cannot pass for a smaller
    cache.  Returns the improved curve."""
    levels, _, _ = reconcile(os_list, find_steps(curve))
    lo_hi = []
    for lv in levels:
        if lv["agree"] is False:
            sizes = [x for x in (lv["os_size"], lv["measured_fits"], lv["measured_exceeds"]) if x]
            lo_hi.append((min(sizes) / 2, max(sizes) * 2))
    if not lo_hi:
        return curve
    redo = [s for s, _ in curve if any(lo <= s <= hi for lo, hi in lo_hi)]
    best = latency_points(redo, rounds=rounds, rng=rng, deadline=deadline,
                          best={s: ns for s, ns in curve})
    return [(s, best[s]) for s, _ in curve]


def find_plateaus(curve):
    """Group a latency curve into plateaus: ``[{"sizes": [...], "ns": level}]``.

    Runs: a point joins the current run while its latency stays within PLATEAU_RISE of the
    run's fastest point (falls always join: load only ever adds latency, so a dip is the
    truth and a bump is noise).  Runs of fewer than MIN_PLATEAU points between two others
    are transitions, not caches (a cache gradually filling by conflict misses gives two or
    so such points); neighbouring runs whose levels differ by less than MERGE_RATIO are one
    plateau.
    """
    runs = []
    for size, ns in curve:
        if runs and ns <= runs[-1]["min"] * PLATEAU_RISE:
            runs[-1]["sizes"].append(size)
            runs[-1]["all"].append(ns)
            runs[-1]["min"] = min(runs[-1]["min"], ns)
        else:
            runs.append({"sizes": [size], "all": [ns], "min": ns})
    kept = []
    for i, r in enumerate(runs):
        last = i == len(runs) - 1
        big_jump = bool(kept) and r["min"] >= 2 * kept[-1]["min"]
        if i == 0 or len(r["sizes"]) >= MIN_PLATEAU or (last and (len(r["sizes"]) >= 2
                                                                  or big_jump)):
            kept.append(r)
    merged = []
    for r in kept:
        if merged and r["min"] < merged[-1]["min"] * MERGE_RATIO:
            m = merged[-1]
            m["sizes"] += r["sizes"]
            m["all"] += r["all"]
            m["min"] = min(m["min"], r["min"])
        else:
            merged.append({"sizes": list(r["sizes"]), "all": list(r["all"]), "min": r["min"]})
    return [{"sizes": m["sizes"], "ns": float(np.median(m["all"]))} for m in merged]


def find_steps(curve):
    """The cache boundaries a latency curve shows.

    For each pair of neighbouring plateaus, the boundary is where the curve crosses the
    geometric mean of their levels: ``fits`` is the largest measured size below it (a
    conservative capacity), ``exceeds`` the next measured size.
    """
    plateaus = find_plateaus(curve)
    steps = []
    for lo, hi in zip(plateaus, plateaus[1:]):
        mid = math.sqrt(lo["ns"] * hi["ns"])
        inside = [(s, ns) for s, ns in curve if lo["sizes"][0] <= s < hi["sizes"][0]]
        fits = max((s for s, ns in inside if ns <= mid), default=lo["sizes"][-1])
        exceeds = min((s for s, _ in curve if s > fits), default=None)
        steps.append({"fits": fits, "exceeds": exceeds, "ns_below": lo["ns"],
                      "ns_above": hi["ns"]})
    return steps


def reconcile(os_list, steps, curve_max=None):
    """Per level: what the OS said, what the curve showed, and the size the model uses.

    Steps are matched to levels in order (the first step is L1's edge).  A level agrees when
    its OS size lies within AGREE_SLACK of the step's [fits, exceeds] interval; then the OS
    size is used (it is exact).  Otherwise the measured ``fits`` is used and a note says so.
    A level the curve could not reach (beyond ``curve_max``) keeps the OS size.
    """
    by_level = {c["level"]: c for c in os_list if c.get("level")}
    n_levels = max([len(steps)] + list(by_level))
    levels, notes, model = [], [], []
    for lvl in range(1, n_levels + 1):
        osc = by_level.get(lvl, {})
        step = steps[lvl - 1] if lvl - 1 < len(steps) else None
        os_size = osc.get("size")
        entry = {"level": lvl, "os_size": os_size, "measured_fits": None,
                 "measured_exceeds": None, "agree": None, "used": os_size, "source": "os"}
        if step is not None:
            entry["measured_fits"] = step["fits"]
            entry["measured_exceeds"] = step["exceeds"]
            hi = step["exceeds"] or step["fits"]
            if os_size:
                agree = step["fits"] / AGREE_SLACK <= os_size <= hi * AGREE_SLACK
                entry["agree"] = bool(agree)
                if not agree:
                    entry["used"] = step["fits"]
                    entry["source"] = "measured"
                    notes.append(f"L{lvl}: the OS reports {fmt_bytes(os_size)} but the latency "
                                 f"curve steps between {fmt_bytes(step['fits'])} and "
                                 f"{fmt_bytes(step['exceeds']) if step['exceeds'] else '?'}; "
                                 f"using {fmt_bytes(step['fits'])}")
            else:
                entry["used"] = step["fits"]
                entry["source"] = "measured"
                notes.append(f"L{lvl}: the OS reports no size; measured {fmt_bytes(step['fits'])}")
        elif os_size:
            reach = "beyond the curve's largest buffer" if (
                curve_max and os_size * 1.5 > curve_max) else "no step seen"
            notes.append(f"L{lvl}: {fmt_bytes(os_size)} from the OS not confirmed ({reach})")
        levels.append(entry)
        if entry["used"]:
            model.append({"level": lvl, "type": osc.get("type", "Unified"),
                          "size": entry["used"], "line": osc.get("line"),
                          "ways": osc.get("ways"), "sets": None,
                          "shared_cpus": osc.get("shared_cpus")})
    return levels, notes, model


def fmt_bytes(n):
    if n is None:
        return "?"
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % (div // 4 or 1) == 0:
            v = n / div
            return f"{v:g} {unit}"
    return f"{n} B"


def cpu_info():
    """Model, architecture and the CPUs this process may use (affinity and cgroup quota)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "model": _hwinfo.cpu_model(),
        "machine": _hwinfo.machine(),
        "platform": sys.platform,
        "os_cpu_count": os.cpu_count(),
        "affinity": affinity,
        "cgroup_limit": _hwinfo.cgroup_cpu_limit(),
        "usable": _hwinfo.usable_cpus(),
    }


def isa_info():
    """What the CPU and OS support, what microtile can run, and what it runs now."""
    isa = microtile.get_config()["isa"]
    return {
        "features": _dispatch.cpu_features(),
        "available": list(_dispatch.available_isas()),
        "in_use": isa,
        "kernels": {dt: list(_dispatch.kernel_shape(isa, code))
                    for code, dt in enumerate(DTYPES)},
    }


def fma_peak(isa, dtype, threads=1, seconds=0.15, repeats=3):
    """GFLOP/s of microtile's packed micro-kernel on L1-resident panels: the best of
    ``repeats`` runs of about ``seconds`` each (the best, since load only slows it)."""
    from microtile._probes import _peak
    code = DTYPES.index(dtype)
    isa_id = _dispatch.isa_id(isa)
    mr, nr = _dispatch.kernel_shape(isa, code)
    itemsize = ITEMSIZE[dtype]
    # A's and B's panels together take at most half of a 32 KiB L1.
    k = max(16, min(256, 16384 // ((mr + nr) * itemsize)))
    reps = 64
    while True:  # calibrate: grow until one run takes a tenth of the target
        t0 = time.perf_counter()
        _peak.run(isa_id, code, k, reps, threads)
        dt = time.perf_counter() - t0
        if dt > seconds / 10 or reps > 1 << 26:
            break
        reps *= 4
    reps = max(1, int(reps * seconds / max(dt, 1e-9)))
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        flops = _peak.run(isa_id, code, k, reps, threads)
        best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    return best


def model_blocking(caches, isa, cores):
    """The analytical model's mc/kc/nc per dtype for a cache list (see ``_blocking``)."""
    out = {}
    for code, dt in enumerate(DTYPES):
        mr, nr = _dispatch.kernel_shape(isa, code)
        out[dt] = _blocking.analytical_blocking(caches, mr, nr, ITEMSIZE[dt], cores)
    return out


def probe(*, quick=False, threads=None, dtypes=DTYPES, progress=None, rng=None):
    """Everything the search needs to know about this machine, as a JSON-able dict."""
    say = progress or (lambda msg: None)
    cpu = cpu_info()
    threads = threads or cpu["usable"]
    isa = isa_info()
    say(f"CPU: {cpu['model']} ({cpu['machine']}), {cpu['usable']} usable CPU(s); "
        f"kernels {isa['in_use']}")
    osc = os_caches()
    say("caches (" + (osc["source"] or "none reported") + "): " + (", ".join(
        f"L{c['level']} {fmt_bytes(c['size'])}" for c in osc["caches"]) or "-"))
    largest = max([c["size"] for c in osc["caches"]] + [0])
    # Reach twice the last level, so the step into memory shows; 64 MiB at most in --quick.
    max_bytes = min(max(2 * largest, 16 << 20), (64 << 20) if quick else (128 << 20))
    t0 = time.perf_counter()
    curve = latency_curve(max_bytes, rounds=2 if quick else 3, rng=rng,
                          deadline=t0 + (4 if quick else 20))
    curve = confirm(curve, osc["caches"], rounds=1 if quick else 4, rng=rng,
                    deadline=t0 + (6 if quick else 30))
    steps = find_steps(curve)
    levels, notes, model_caches = reconcile(osc["caches"], steps, max_bytes)
    say(f"latency curve: {len(curve)} sizes up to {fmt_bytes(max_bytes)} in "
        f"{time.perf_counter() - t0:.1f} s; steps at " + (", ".join(
            f"{fmt_bytes(s['fits'])}" for s in steps) or "none"))
    for note in notes:
        say("  note: " + note)
    peak = {}
    # Many short runs, the best kept: a peak is what the core does when nothing else runs,
    # and on a shared machine that is true of some runs, not of their average.
    sec, reps = (0.04, 5) if quick else (0.08, 9)
    for dt in dtypes:
        one = fma_peak(isa["in_use"], dt, 1, sec, reps)
        entry = {"1": round(one, 2)}
        if threads > 1:
            entry[str(threads)] = round(fma_peak(isa["in_use"], dt, threads, sec, reps), 2)
        peak[dt] = entry
        say(f"micro-kernel peak {dt}: {one:.1f} GFLOP/s per core"
            + (f", {entry[str(threads)]:.1f} on {threads} threads" if threads > 1 else ""))
    return {
        "cpu": cpu,
        "isa": isa,
        "caches": {
            "os_source": osc["source"],
            "os": osc["sources"].get("os", []),
            "cpuid": osc["sources"].get("cpuid", []),
            "latency_curve": [[s, round(ns, 3)] for s, ns in curve],
            "steps": steps,
            "levels": levels,
            "notes": notes,
            "model": model_caches,
        },
        "peak_gflops": peak,
        "model_blocking": model_blocking(model_caches, isa["in_use"], cpu["usable"]),
        "os_model_blocking": model_blocking(osc["caches"], isa["in_use"], cpu["usable"]),
    }


def parallel_efficiency(isa, threads, seconds=0.03):
    """How much of ``threads`` cores this process gets right now: the micro-kernel's rate on
    ``threads`` threads over ``threads`` times its rate on one (about 1.0 on an idle
    machine; far less when other processes hold some of the cores)."""
    if threads <= 1:
        return 1.0
    one = fma_peak(isa, "float64", 1, seconds, repeats=2)
    many = fma_peak(isa, "float64", threads, seconds, repeats=2)
    return many / (threads * one) if one > 0 else 0.0


def load_now(isa, threads, ref_peak, seconds=0.03):
    """(single, parallel): this core's micro-kernel rate now over ``ref_peak`` (the float64
    per-core peak probed at the start), and the parallel efficiency on ``threads``."""
    one = fma_peak(isa, "float64", 1, seconds, repeats=2)
    if threads <= 1:
        return (min(1.0, one / ref_peak) if ref_peak else 1.0), 1.0
    many = fma_peak(isa, "float64", threads, seconds, repeats=2)
    # A short single-thread run can come out low by itself; if every thread ran at full
    # speed, this core was not shared either.
    best_one = max(one, many / threads)
    single = min(1.0, best_one / ref_peak) if ref_peak else 1.0
    return single, (many / (threads * one) if one > 0 else 0.0)


def wait_quiet(isa, threads, ref_peak, *, need_parallel, tries=3, pause=1.0,
               need_single=0.7, need_par=0.75, say=None):
    """Check the load up to ``tries`` times, pausing between, until this core runs at
    ``need_single`` of its probed peak (and, with ``need_parallel``, the threads at
    ``need_par`` efficiency).  Returns the last (single, parallel) figures.  Decisions
    measured while other processes hold the cores would be about them, not this machine."""
    single, par = load_now(isa, threads if need_parallel else 1, ref_peak)
    for _ in range(tries - 1):
        if single >= need_single and (not need_parallel or par >= need_par):
            break
        if say:
            what = (f"this core at {single:.0%} of its peak" +
                    (f", {threads} threads at {par:.0%} efficiency" if need_parallel else ""))
            say(f"other processes are using the CPUs ({what}); waiting {pause:g} s")
        time.sleep(pause)
        single, par = load_now(isa, threads if need_parallel else 1, ref_peak)
    return single, par


def wait_for_cores(isa, threads, *, tries=3, pause=1.0, need=0.75, say=None):
    """The parallel efficiency, after waiting (up to ``tries`` checks) for it to reach
    ``need``."""
    return wait_quiet(isa, threads, None, need_parallel=True, tries=tries, pause=pause,
                      need_single=0.0, need_par=need, say=say)[1]
