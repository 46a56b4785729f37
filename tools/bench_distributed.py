"""Data-parallel throughput: 1 process x T threads against P processes x T/P threads.

The same global batch either way (each of the P ranks gets batch / P), float32, one step =
zero_grad, forward, softmax cross-entropy, backward, SGD with momentum.  Models: the
784-1024-1024-10 MLP (batch 256) and bench_nn.py's small CNN (batch 64).

    flock -x /tmp/microtile-bench.lock python tools/bench_distributed.py [--rounds 5]
    python tools/bench_distributed.py --smoke      # tiny sizes, one round: does it run?

The script is its own driver: it launches one worker per configuration and round (``python
tools/bench_distributed.py --worker ...``, the P-rank one under ``mpirun -n P``),
alternating which goes first, and reports the medians over rounds of each worker's median
step.  Per step of the P-rank run it also reports:

- ``wait``: the time ``ddp.backward`` spends waiting for the allreduces after the module's
  backward has returned (the communication backward did not hide);
- ``comm``: the same wait when no bucket starts before backward has finished (the whole
  allreduce time, measured in a second series of steps with overlap turned off);
- ``hidden``: 1 - wait / comm, the share of the communication that backward hides;
- ``copy``: the time spent preparing the buckets (scaling the gradients, which live in
  them, by this rank's weight) and posting the allreduces.  Through shared memory it is
  publishing each bucket, which sums and copies whatever the other ranks' progress
  already allows: part of the summing lands here and not in ``wait`` or ``comm``, so
  ``hidden`` compares the transports only roughly.

``--transport mpi`` sums through MPI's allreduce even though the ranks share this machine
(by default they sum through shared memory, see ``microtile.distributed._node``).

``--project`` adds a model of scaling to more ranks over a network: a ring allreduce of S
gradient bytes on P ranks moves 2 (P - 1) / P * S bytes per rank in 2 (P - 1) messages,
so it takes 2 (P - 1) / P * S / bandwidth + 2 (P - 1) * latency; the measured per-rank
compute (forward, backward, step at batch B per rank) and backward time bound how much of
it hides.  Not a test: the figures go in the issue's closing note.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

MLP = ((784, 1024, 1024, 10), 256)
CNN = dict(batch=64, channels=1, size=28, filters=16, classes=10)
SMOKE_MLP = ((32, 64, 64, 10), 16)
SMOKE_CNN = dict(batch=8, channels=1, size=8, filters=4, classes=10)


# --- worker ----------------------------------------------------------------------------

def build(kind, smoke, seed=0):
    from microtile import nn

    if kind == "mlp":
        sizes, batch = SMOKE_MLP if smoke else MLP
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], rng=seed + i))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers), batch, (sizes[0],), sizes[-1]
    c = SMOKE_CNN if smoke else CNN
    s, f = c["size"], c["filters"]
    model = nn.Sequential(nn.Conv2d(c["channels"], f, 3, padding=1, rng=seed), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(f * (s // 2) ** 2, c["classes"], rng=seed + 1))
    return model, c["batch"], (c["channels"], s, s), c["classes"]


def worker(args):
    """Time ``--steps`` steps (after warm-up) in this process; print one JSON line (rank 0)."""
    from microtile import nn

    if args.transport == "mpi":
        from microtile.distributed import _buckets
        _buckets.NODE_EXCHANGE = False
    model, batch, shape, classes = build(args.model, args.smoke)
    procs = args.procs
    ddp = None
    if procs > 1:
        from microtile.distributed import DistributedDataParallel, world_size

        if world_size() != procs:
            raise SystemExit(f"worker: expected {procs} ranks, got {world_size()}")
        ddp = DistributedDataParallel(model, bucket_cap_mb=args.bucket_cap_mb)
    net = ddp if ddp is not None else model
    r = 0 if ddp is None else ddp.comm.Get_rank()
    rng = np.random.default_rng(100 + r)
    x = rng.standard_normal((batch // procs,) + shape).astype(np.float32)
    labels = rng.integers(0, classes, batch // procs)
    loss = nn.CrossEntropyLoss()
    opt = nn.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad()
        out = net.forward(x)
        loss.forward(out, labels)
        net.backward(loss.backward(), need_input_grad=False)
        opt.step()

    def series(n):
        times, stats = [], []
        if ddp is not None:
            ddp.comm.Barrier()
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            if ddp is not None:
                stats.append(dict(ddp._reducer.last_step))
        return times, stats

    for _ in range(args.warmup):
        step()
    times, stats = series(args.steps)
    out = {"step": statistics.median(times)}
    if ddp is not None:
        for key, name in (("wait_seconds", "wait"), ("launch_seconds", "copy"),
                          ("backward_seconds", "backward")):
            out[name] = statistics.median(s[key] for s in stats)
        out["buckets"] = stats[0]["buckets"]
        out["transport"] = ddp._reducer.transport
        ddp._reducer.overlap = False
        times_seq, stats_seq = series(args.steps)
        out["step_no_overlap"] = statistics.median(times_seq)
        out["comm"] = statistics.median(s["wait_seconds"] for s in stats_seq)
        out["grad_bytes"] = sum(b.nbytes for b in ddp._reducer.buckets)
    if r == 0:
        print(json.dumps(out), flush=True)


# --- driver ----------------------------------------------------------------------------

def launch(args, kind, procs, threads):
    """One worker run; returns its JSON."""
    env = dict(os.environ, MICROTILE_NUM_THREADS=str(threads))
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", kind,
           "--procs", str(procs), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--bucket-cap-mb", str(args.bucket_cap_mb), "--transport", args.transport]
    cmd += ["--smoke"] if args.smoke else []
    if procs > 1:
        cmd = ["mpirun", "-n", str(procs), "--bind-to", args.bind, "-x",
               "MICROTILE_NUM_THREADS"] + (["--oversubscribe"] if args.smoke else []) + cmd
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"bench_distributed: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def project(row, ranks=(8, 16, 32, 64), links=((10e9, 5e-6), (25e9, 5e-6), (100e9, 2e-6))):
    """Ring-allreduce model of P ranks over a network (see the module's docstring)."""
    s = row["grad_bytes"]
    compute = row["p_step"] - row["wait"]      # a rank's step less its unhidden wait
    backward = row["backward"]
    lines = []
    for bandwidth, latency in links:
        for p in ranks:
            comm = 2 * (p - 1) / p * s / (bandwidth / 8) + 2 * (p - 1) * latency
            exposed_none = comm                          # nothing hidden
            exposed_best = max(0.0, comm - backward)     # hidden behind all of backward
            lines.append(
                f"  {bandwidth / 1e9:5.0f} Gb/s {latency * 1e6:3.0f} us  P={p:3d}: allreduce "
                f"{comm * 1e3:7.2f} ms; efficiency {compute / (compute + exposed_none):5.1%} "
                f"without overlap, up to {compute / (compute + exposed_best):5.1%} with it")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="threads of the one process")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per worker run")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--bucket-cap-mb", type=float, default=25.0)
    ap.add_argument("--transport", choices=["auto", "mpi"], default="auto",
                    help="auto: shared memory among ranks on one machine; mpi: MPI's "
                         "allreduce always")
    ap.add_argument("--bind", default="core", help="mpirun --bind-to for the ranks")
    ap.add_argument("--models", nargs="+", choices=["mlp", "cnn"], default=["mlp", "cnn"])
    ap.add_argument("--model", choices=["mlp", "cnn"], help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny models, one round, few steps: checks that everything runs")
    ap.add_argument("--project", action="store_true",
                    help="also print the ring-allreduce model of 8-64 ranks over a network")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.smoke:
        args.rounds, args.steps, args.warmup = 1, 3, 1
    if args.threads % args.procs:
        ap.error("--threads must be a multiple of --procs")
    per_rank = args.threads // args.procs
    rows = []
    for kind in args.models:
        one, many = [], []
        for rnd in range(args.rounds):
            runs = [("one", 1, args.threads), ("many", args.procs, per_rank)]
            for which, procs, threads in (runs if rnd % 2 == 0 else runs[::-1]):
                (one if which == "one" else many).append(launch(args, kind, procs, threads))
        med = {k: statistics.median(m[k] for m in many) for k in many[0] if k != "transport"}
        t1 = statistics.median(o["step"] for o in one)
        _, batch, _, _ = build(kind, args.smoke)
        rows.append(dict(model=kind, batch=batch, one_step=t1, p_step=med["step"],
                         ratio=t1 / med["step"], wait=med["wait"], comm=med["comm"],
                         hidden=(1 - med["wait"] / med["comm"]) if med["comm"] > 0 else 0.0,
                         copy=med["copy"], backward=med["backward"],
                         p_step_no_overlap=med["step_no_overlap"],
                         buckets=int(med["buckets"]), grad_bytes=int(med["grad_bytes"]),
                         transport=many[0].get("transport", "none")))
    if args.json:
        print(json.dumps(dict(procs=args.procs, threads=args.threads, rows=rows), indent=2))
        return 0
    p, t = args.procs, args.threads
    print(f"float32 training step, global batch fixed; 1 x {t} threads against {p} x {per_rank}"
          f" (mpirun --bind-to {args.bind}); medians of {args.rounds} interleaved rounds of "
          f"{args.steps} steps" + (" [SMOKE: tiny sizes, not a measurement]" if args.smoke
                                   else ""))
    print(f"{'model':5s} {'batch':>5s} {f'1x{t} ms':>9s} {f'{p}x{per_rank} ms':>9s} "
          f"{'ratio':>6s} {'wait ms':>8s} {'comm ms':>8s} {'hidden':>7s} {'copy ms':>8s} "
          f"{'no-overlap ms':>13s} {'buckets':>7s} {'grad MB':>8s}")
    for r in rows:
        print(f"{r['model']:5s} {r['batch']:5d} {r['one_step'] * 1e3:9.3f} "
              f"{r['p_step'] * 1e3:9.3f} {r['ratio']:6.2f} {r['wait'] * 1e3:8.3f} "
              f"{r['comm'] * 1e3:8.3f} {r['hidden']:7.1%} {r['copy'] * 1e3:8.3f} "
              f"{r['p_step_no_overlap'] * 1e3:13.3f} {r['buckets']:7d} "
              f"{r['grad_bytes'] / 2**20:8.2f}")
        if args.project:
            print(f"{r['model']}: {p}-rank compute {(r['p_step'] - r['wait']) * 1e3:.2f} ms, "
                  f"backward {r['backward'] * 1e3:.2f} ms, gradients "
                  f"{r['grad_bytes'] / 2**20:.2f} MB; over a network:")
            print("\n".join(project(r)))
    print(f"gradients summed through: {rows[0]['transport'] if rows else '-'}")
    print("ratio: throughput of the ranks over that of the one process (goal: >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
