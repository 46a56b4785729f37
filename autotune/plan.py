"""The plan of one dtype's search (``tune_dtype``): which steps run, in which order, on how
many threads, and which defaults stay when a step is skipped or cannot measure cleanly.

Order of the steps, each fixing what the next one builds on:

1. mc, kc — on a 1024^3 GEMM timed on one thread and on all (the geometric mean: the
   blocks size per-core caches, but two cores' blocks share the L3): a coarse scan around
   the analytical model's values, then a local search: race the centre against its
   neighbours (each of mc and kc up and down by a factor, and both together the way that
   keeps the block's footprint), move to a winner that beats the centre by more than the
   noise, shrink the factor when the centre holds.
2. nc — a ladder of values and the model's, on a wide GEMM whose n spans several of them;
   then the blocking search's best few with that nc, and the model's point, raced again.
3. split (ic vs jc) — with the tuned threads, over square, tall, wide and skinny shapes.
4. thread_mnk — the size below which one thread beats them all.
5. nopack_mnk and nopack_a_panels — where reading operands in place beats packing them.

Steps that decide how threads behave are skipped (their defaults kept) when other
processes hold the cores.  The steps themselves are in ``blocking_search`` (1, 2) and
``thresholds`` (3-5); the margins a challenger must beat the incumbent by, in ``tuning``.
"""
from autotune import blocking_search, thresholds
from autotune.tuning import check_load
from microtile._config._schema import BLOCKING, SPLIT_NAMES, TUNABLE


def tune_dtype(t, model, defaults, nc_model=None):
    """Run every step for one dtype; returns the chosen overrides (a ``config_context``
    dict for ``t.dtype``) and fills ``t.evidence``.

    ``nc_model(mc, kc)``: the analytical model's nc for the measured mc and kc, which seeds
    the nc step (default: the model's own nc).  Steps that decide how threads behave are
    skipped (defaults kept) when other processes hold the cores; nc is then measured on one
    thread instead of all.
    """
    seeds = [model, defaults]
    chosen = {}
    t.pinned = {k: defaults[k] for k in TUNABLE if k in defaults}
    if t.quiet is not None:
        busy, _, par = check_load(t, "blocking", t.threads > 1)
        if busy:
            t.joint = False
            t.say(f"{t.dtype} blocking: other processes hold the CPUs ({t.threads} threads "
                  f"at {par:.0%} efficiency); timing it on one thread only")
    block = blocking_search.search_blocking(t, seeds, model["nc"])
    chosen.update(block)
    nc_seed = nc_model(block["mc"], block["kc"]) if nc_model else model["nc"]
    if nc_seed != model["nc"]:
        t.say(f"{t.dtype} nc: the model gives {nc_seed} for kc={block['kc']} "
              f"(and {model['nc']} for its own kc={model['kc']})")
    chosen["nc"] = nc_seed

    def cur():
        return {k: chosen[k] for k in BLOCKING}

    def joint():
        fin = [{**c, "nc": chosen["nc"]} for c in t.evidence["blocking"]["finalists"]]
        pick = blocking_search.search_joint(t, fin, model)
        chosen.update(pick)
        return pick

    # (name, kind, step): kind "single" runs on one thread, "threaded" needs free cores
    # or is skipped, "either" runs on all threads when the cores are free, else on one.
    steps = [
        ("nc", "either", lambda n: blocking_search.search_nc(t, block, nc_seed, n)),
        ("joint", "threaded", lambda n: joint()),
        ("split", "threaded", lambda n: thresholds.search_split(t, cur())),
        ("thread_mnk", "threaded", lambda n: thresholds.search_thread_mnk(
            t, cur(), chosen.get("split", "auto"))),
        ("nopack_mnk", "single", lambda n: thresholds.search_nopack(
            t, cur(), defaults["nopack_mnk"])),
        ("nopack_a_panels", "single", lambda n: thresholds.search_nopack_a(
            t, cur(), defaults["nopack_a_panels"])),
    ]
    skipped = []
    for name, kind, step in steps:
        keep = None if name == "joint" else (nc_seed if name == "nc" else defaults[name])
        if t.out_of_time():
            skipped.append(name)
            if keep is not None:
                chosen[name] = keep
            continue
        if kind == "threaded" and t.threads == 1:
            if keep is not None:
                chosen[name] = keep
            continue
        nthreads = 1
        if t.quiet is not None:
            busy, single, par = check_load(t, name, kind != "single" and t.threads > 1)
            if busy and kind == "threaded":
                t.say(f"{t.dtype} {name}: other processes hold the CPUs ({t.threads} threads "
                      f"at {par:.0%} efficiency, this core at {single:.0%}); keeping "
                      + ("the default" if keep is not None else "the one-thread choice"))
                t.evidence.setdefault("busy", []).append(name)
                if keep is not None:
                    chosen[name] = keep
                continue
            if kind == "either" and not busy:
                nthreads = t.threads
        elif kind == "either":
            nthreads = t.threads
        value = step(nthreads)
        if name == "joint":
            continue
        if value is None:           # the step could not measure cleanly: keep the default
            t.evidence.setdefault("busy", []).append(name)
            value = keep
        chosen[name] = value
    if skipped:
        t.say(f"{t.dtype}: out of time, kept defaults for " + ", ".join(skipped))
        t.evidence["skipped"] = skipped
    if isinstance(chosen.get("split"), int):
        chosen["split"] = SPLIT_NAMES[chosen["split"]]
    return chosen
