"""Two builds of microtile side by side: GEMM, convolution and training steps, A/B interleaved.

    python tools/compare_builds.py --a /path/to/old/src --b src [--rounds 6] [--quick]

Each round starts one process per build, A then B, B then A in the next round, so a spell
of host load falls on both builds alike.  Every process times the same cases (checked
against NumPy in float64 first) and, for GEMM, NumPy beside them in the same process, so
the ratio to NumPy cancels the load the process saw.  The report gives, per case, the
median over rounds of each build's figure, and B / A of the medians.  A directory given
for a build is put first on ``PYTHONPATH`` (it must hold the in-place built ``microtile``).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

# What one process runs: printed as JSON on its last line.
CHILD = r'''
import json, sys, time
import numpy as np
import microtile as mt
from threadpoolctl import threadpool_limits

QUICK = bool(int(sys.argv[1]))
SAMPLES = 3
MIN_TIME = 0.1 if QUICK else 0.2


def best_rate(fn, work):
    """Median of SAMPLES timings, each repeated for at least MIN_TIME, as work / s."""
    fn()
    rates = []
    for _ in range(SAMPLES):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= MIN_TIME:
                break
        rates.append(work * n / dt)
    return sorted(rates)[len(rates) // 2]


out = {}
rng = np.random.default_rng(0)
gemm_shapes = [(64, 64, 64), (256, 256, 256), (1024, 1024, 1024), (256, 4096, 784),
               (4096, 256, 64), (32, 1024, 784)]
if QUICK:
    gemm_shapes = gemm_shapes[:3]
for threads in (1, 2):
    for dt in (np.float32, np.float64):
        for m, n, k in gemm_shapes:
            a = rng.standard_normal((m, k)).astype(dt)
            b = rng.standard_normal((k, n)).astype(dt)
            ref = a.astype(np.float64) @ b.astype(np.float64)
            tol = 4 * k * np.finfo(dt).eps * (np.abs(a).astype(np.float64) @ np.abs(b))
            with mt.config_context(threads=threads), threadpool_limits(threads):
                c = mt.gemm(a, b)
                if not np.all(np.abs(c - ref) <= tol):
                    raise SystemExit(f"gemm {m}x{n}x{k} {dt.__name__}: wrong result")
                g_mt = best_rate(lambda: mt.gemm(a, b), 2e-9 * m * n * k)
                g_np = best_rate(lambda: a @ b, 2e-9 * m * n * k)
            key = f"gemm {m}x{n}x{k} {np.dtype(dt).name} {threads}t"
            out[key + " GFLOP/s"] = g_mt
            out[key + " / numpy"] = g_mt / g_np

layers = [(8, 64, 56, 64, 3, 1), (8, 128, 28, 128, 3, 1), (8, 256, 14, 256, 1, 0),
          (8, 3, 224, 64, 7, 3)]
if QUICK:
    layers = layers[:2]
with mt.config_context(threads=2):
    for N, C, H, K, R, pad in layers:
        x = rng.standard_normal((N, C, H, H)).astype(np.float32)
        w = rng.standard_normal((K, C, R, R)).astype(np.float32)
        y = mt.conv2d(x, w, padding=pad)
        P = y.shape[2]
        flops = 2e-9 * N * K * P * P * C * R * R
        out[f"conv fwd N{N} C{C} {H}x{H} K{K} {R}x{R} GFLOP/s"] = best_rate(
            lambda: mt.conv2d(x, w, padding=pad), flops)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        out[f"conv fwd+bwd N{N} C{C} {H}x{H} K{K} {R}x{R} GFLOP/s"] = best_rate(
            lambda: (mt.conv2d(x, w, padding=pad), mt.conv2d_backward(dy, x, w, padding=pad)),
            3 * flops)

from microtile import nn
with mt.config_context(threads=2):
    for name, model, xs, classes in [
        ("mlp 784-512-256-10 b128",
         nn.Sequential(nn.Linear(784, 512, rng=0), nn.ReLU(), nn.Linear(512, 256, rng=1),
                       nn.ReLU(), nn.Linear(256, 10, rng=2)), (128, 784), 10),
        ("cnn c3 32x32 conv32+pool+fc b64",
         nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, rng=0), nn.ReLU(), nn.MaxPool2d(2),
                       nn.Flatten(), nn.Linear(32 * 16 * 16, 10, rng=1)), (64, 3, 32, 32), 10)]:
        x = rng.standard_normal(xs).astype(np.float32)
        labels = rng.integers(0, classes, xs[0])
        loss = nn.CrossEntropyLoss()
        opt = nn.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
            opt.zero_grad()
            loss.forward(model(x), labels)
            model.backward(loss.backward())
            opt.step()
        out[f"train step {name} steps/s"] = best_rate(step, 1.0)
print(json.dumps(out))
'''


def run(path, quick):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([path] + [p for p in [env.get("PYTHONPATH")] if p])
    res = subprocess.run([sys.executable, "-c", CHILD, str(int(quick))], env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"the build at {path} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="source directory of build A (e.g. the old one)")
    ap.add_argument("--b", required=True, help="source directory of build B")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help="fewer cases and shorter samples")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results = {"a": [], "b": []}
    for r in range(args.rounds):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        for side in order:
            results[side].append(run(getattr(args, side), args.quick))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    keys = list(results["a"][0])
    rows = []
    for key in keys:
        ma = statistics.median(d[key] for d in results["a"])
        mb = statistics.median(d[key] for d in results["b"])
        rows.append((key, ma, mb, mb / ma))
    if args.json:
        print(json.dumps([dict(case=k, a=a, b=b, b_over_a=q) for k, a, b, q in rows], indent=1))
        return 0
    print(f"medians of {args.rounds} interleaved rounds; A = {args.a}, B = {args.b}")
    print(f"{'case':58s} {'A':>9s} {'B':>9s} {'B/A':>6s}")
    for key, a, b, q in rows:
        print(f"{key:58s} {a:9.3f} {b:9.3f} {q:6.3f}")
    ratios = [q for key, _, _, q in rows if not key.endswith("/ numpy")]
    geo = statistics.geometric_mean(ratios)
    print(f"geometric mean of B/A over {len(ratios)} speed figures: {geo:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
