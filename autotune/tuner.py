"""One tuning run from start to finish: probe, search each dtype, measure the result beside
NumPy, and assemble the profile document (the caller writes it)."""
import time

from threadpoolctl import threadpool_limits

import microtile
from autotune import conv_search, plan, probes, profile, report, sparse_search, tuning
from microtile._config import _blocking, _context as _config
from microtile._config._schema import DTYPES, ITEMSIZE, SPLIT_NAMES
from microtile._kernels import _dispatch

# Wall-clock limits: searches stop by these (seconds from the start) so that the reference
# table and the write still fit in the promise (60 s for --quick, 10 minutes in full).
HARD_LIMIT = {True: 44.0, False: 520.0}


def _split_name(value):
    return SPLIT_NAMES.get(value, value)


def run(*, quick=False, threads=None, dtypes=DTYPES, say=None, path=None, seed=0):
    """Tune and return the profile document (not yet written)."""
    say = say or (lambda msg: None)
    t_start = time.perf_counter()
    hard = t_start + HARD_LIMIT[bool(quick)]
    cpu_usable = probes.cpu_info()["usable"]
    threads = threads or cpu_usable
    if threads > cpu_usable:
        say(f"warning: tuning for {threads} threads on {cpu_usable} usable CPU(s)")
    isa = microtile.get_config()["isa"]
    # NumPy computes the references; one BLAS thread keeps its workers from spinning on
    # the cores microtile is being timed on.
    with threadpool_limits(limits=1, user_api="blas"):
        probed = probes.probe(quick=quick, threads=threads, dtypes=dtypes, progress=say,
                              rng=seed)
        chosen = {}
        evidence = {}
        ref_peak = probed["peak_gflops"].get("float64", {}).get("1") or probes.fma_peak(
            isa, "float64", 1, 0.1)

        def quiet(need_parallel):
            # --quick waits only before thread-count decisions (which load spoils); the
            # single-threaded steps just record the load they ran under.
            tries = (2 if need_parallel else 1) if quick else 5
            return probes.wait_quiet(isa, threads, ref_peak, need_parallel=need_parallel,
                                     tries=tries, say=say)

        for dt in dtypes:
            code = DTYPES.index(dt)
            mr, nr = _dispatch.kernel_shape(isa, code)
            defaults = _config.defaults(dt)
            defaults["split"] = _split_name(defaults["split"])
            model = {**defaults, **probed["model_blocking"][dt]}
            say(f"{dt}: {mr}x{nr} kernel; model mc={model['mc']} kc={model['kc']} "
                f"nc={model['nc']} (OS-only model mc={defaults['mc']} kc={defaults['kc']} "
                f"nc={defaults['nc']})")
            t = tuning.Tuning(dt, mr, nr, threads, quick=quick, say=say, hard_deadline=hard,
                              seed=seed, quiet=quiet)
            itemsize = ITEMSIZE[dt]
            chosen[dt] = plan.tune_dtype(
                t, model, defaults,
                nc_model=lambda mc, kc, nr=nr, size=itemsize: _blocking.model_nc(
                    probed["caches"]["model"], mc, kc, nr, size, probed["cpu"]["usable"]))
            evidence[dt] = t.evidence
        options = {}
        if "float32" in dtypes and time.perf_counter() < hard:
            t = tuning.Tuning("float32", 1, 1, threads, quick=quick, say=say,
                              hard_deadline=hard, seed=seed, quiet=quiet)
            options["conv_chunk"] = conv_search.search_conv_chunk(
                t, microtile.conv2d, _config.get_option("conv_chunk"))
            if time.perf_counter() < hard:
                # Against the dense GEMM as this run tuned it.
                density = sparse_search.search_sparse_density(t, base=chosen.get("float32"))
                if density is not None:
                    options["sparse_density"] = density
            else:
                say("sparse_density: out of time; keeping the default")
                t.evidence["sparse_density"] = {"skipped": "out of time"}
            evidence["options"] = t.evidence
    if path is not None:
        previous = profile.previous_chosen(path, isa)
        for dt in DTYPES:
            if dt not in chosen and previous.get(dt):
                kept = dict(previous[dt])
                if "split" in kept:
                    kept["split"] = _split_name(kept["split"])
                chosen[dt] = kept
                say(f"{dt}: not tuned in this run; keeping the existing profile's values")
        if not options and previous.get("options"):
            options = dict(previous["options"])
    if options:
        chosen["options"] = options
    say("measuring the result beside NumPy")
    conditions = {}
    if threads > 1:
        conditions["efficiency_before"] = round(probes.wait_for_cores(
            isa, threads, tries=3 if quick else 6, say=say), 3)
    rows = report.reference_table(chosen, dtypes, threads, quick, probed["peak_gflops"], say)
    if threads > 1:
        conditions["efficiency_after"] = round(probes.parallel_efficiency(isa, threads), 3)
    tuner = {"mode": "quick" if quick else "full", "threads": threads, "dtypes": list(dtypes),
             "seconds": round(time.perf_counter() - t_start, 1)}
    return profile.build(isa=isa, probed=probed, chosen=chosen,
                         measured={"reference": rows, "reference_conditions": conditions,
                                   "search": evidence}, tuner=tuner)
