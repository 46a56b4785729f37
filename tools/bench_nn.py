"""Training-step benchmark: microtile.nn against the same model in PyTorch (CPU).

One step = zero_grad, forward, loss (softmax cross-entropy), backward, SGD with momentum.
Both libraries get the same weights, the same batch, the same thread count; their steps are
timed in alternating rounds and the medians compared (float32).

    flock -x /tmp/microtile-bench.lock python tools/bench_nn.py [--threads 2] [--rounds 7]

Not a test: the figures go in the issue's closing note.
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np

import microtile
from microtile import nn

MLPS = [((784, 1024, 1024, 10), 256), ((784, 256, 256, 10), 64),
        ((256, 512, 512, 512, 10), 1024)]
# A small CNN: conv 3x3 (pad 1) + ReLU + 2x2 max-pool + linear, on 28x28 single-channel images.
CNN = dict(batch=64, channels=1, size=28, filters=16, classes=10)


def mlp_pair(sizes, torch, seed=0, fused=True):
    """A microtile MLP and the same torch one.  ``fused=False`` puts each Linear in a
    Sequential of its own, so the ReLU after it runs as a separate pass instead of in the
    GEMM's write-back."""
    layers, tlayers = [], []
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1], rng=seed + i)
        tl = torch.nn.Linear(sizes[i], sizes[i + 1])
        with torch.no_grad():
            tl.weight.copy_(torch.from_numpy(lin.weight.data))
            tl.bias.copy_(torch.from_numpy(lin.bias.data))
        layers.append(lin if fused else nn.Sequential(lin))
        tlayers.append(tl)
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            tlayers.append(torch.nn.ReLU())
    return nn.Sequential(*layers), torch.nn.Sequential(*tlayers)


def cnn_pair(torch, seed=0):
    c, f, s, k = CNN["channels"], CNN["filters"], CNN["size"], CNN["classes"]
    conv = nn.Conv2d(c, f, 3, padding=1, rng=seed)
    lin = nn.Linear(f * (s // 2) ** 2, k, rng=seed + 1)
    model = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), lin)
    tconv = torch.nn.Conv2d(c, f, 3, padding=1)
    tlin = torch.nn.Linear(f * (s // 2) ** 2, k)
    tmodel = torch.nn.Sequential(tconv, torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                 torch.nn.Flatten(), tlin)
    tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    return model, tmodel


def steps(model, tmodel, x, labels, torch, lr=0.01, momentum=0.9):
    loss = nn.CrossEntropyLoss()
    opt = nn.SGD(model.parameters(), lr=lr, momentum=momentum)
    topt = torch.optim.SGD(tmodel.parameters(), lr=lr, momentum=momentum)
    tx = torch.from_numpy(x)
    ty = torch.from_numpy(labels.astype(np.int64))
    tloss = torch.nn.CrossEntropyLoss()

    def mt_step():
        opt.zero_grad()
        out = model.forward(x)
        loss.forward(out, labels)
        model.backward(loss.backward(), need_input_grad=False)
        opt.step()

    def torch_step():
        topt.zero_grad()
        out = tmodel(tx)
        tloss(out, ty).backward()
        topt.step()
    return mt_step, torch_step


def time_many(fns, rounds, min_time):
    """Per-call medians of each of ``fns``, timed in alternating rounds of about
    ``min_time`` each (so a change in the host's speed reaches all of them alike)."""
    for fn in fns:  # warm up: buffers, packing scratch, thread pools
        for _ in range(3):
            fn()
    reps = []
    for fn in fns:
        t0 = time.perf_counter()
        fn()
        reps.append(max(1, int(min_time / max(time.perf_counter() - t0, 1e-6))))
    acc = [[] for _ in fns]
    for _ in range(rounds):
        for fn, n, a in zip(fns, reps, acc):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            a.append((time.perf_counter() - t0) / n)
    return tuple(statistics.median(a) for a in acc)


def time_pair(f, g, rounds, min_time):
    """Per-step medians of f and g, timed in alternating rounds of about ``min_time`` each."""
    return time_many((f, g), rounds, min_time)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.15, help="seconds per timed round")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", choices=["mlp", "cnn", "infer"], default=None,
                    help="infer: the 784-1024-1024-10 MLP's forward (eval, no grad) at "
                         "batch 1, 32 and 256 instead of training steps")
    ap.add_argument("--epilogue", choices=["fused", "separate"], default="fused",
                    help="Linear forward: the activation applied in the GEMM's write-back "
                         "(fused, what Sequential does), or as a layer of its own, a second "
                         "pass over the output (separate)")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_nn: PyTorch is not installed (pip install torch)", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    microtile.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    cases = []
    if args.only in (None, "mlp"):
        for sizes, batch in MLPS:
            cases.append(("-".join(map(str, sizes)), batch,
                          lambda s=sizes: mlp_pair(s, torch, fused=args.epilogue == "fused"),
                          (batch, sizes[0]), sizes[-1]))
    if args.only in (None, "cnn"):
        b = CNN["batch"]
        cases.append((f"cnn c{CNN['channels']} {CNN['size']}x{CNN['size']} "
                      f"conv3x3x{CNN['filters']}+relu+pool2+fc", b,
                      lambda: cnn_pair(torch),
                      (b, CNN["channels"], CNN["size"], CNN["size"]), CNN["classes"]))
    if args.only == "infer":
        sizes = MLPS[0][0]
        for batch in (1, 32, 256):
            model, tmodel = mlp_pair(sizes, torch)
            model.eval()
            tmodel.eval()
            x = rng.standard_normal((batch, sizes[0])).astype(np.float32)
            tx = torch.from_numpy(x)

            def g(tmodel=tmodel, tx=tx):
                with torch.no_grad():
                    return tmodel(tx)
            f = (lambda model=model, x=x: model.forward(x))
            np.testing.assert_allclose(f(), g().numpy(), rtol=1e-3, atol=1e-4)
            tm, tt = time_pair(f, g, args.rounds, args.min_time)
            rows.append(dict(model="-".join(map(str, sizes)) + " inference", batch=batch,
                             microtile_ms=tm * 1e3, torch_ms=tt * 1e3, speedup=tt / tm,
                             microtile_samples_per_s=batch / tm))
    for name, batch, make, xshape, classes in cases:
        model, tmodel = make()
        x = rng.standard_normal(xshape).astype(np.float32)
        labels = rng.integers(0, classes, batch)
        f, g = steps(model, tmodel, x, labels, torch)
        tm, tt = time_pair(f, g, args.rounds, args.min_time)
        rows.append(dict(model=name, batch=batch, microtile_ms=tm * 1e3, torch_ms=tt * 1e3,
                         speedup=tt / tm, microtile_samples_per_s=batch / tm))
    if args.json:
        print(json.dumps(dict(threads=args.threads, rows=rows), indent=2))
        return 0
    what = "inference (forward)" if args.only == "infer" else "training step"
    print(f"{what}, float32, {args.threads} threads, medians of {args.rounds} "
          f"interleaved rounds (torch {torch.__version__}, microtile {microtile.__version__}, "
          f"Linear epilogue {args.epilogue})")
    print(f"{'model':44s} {'batch':>5s} {'microtile ms':>12s} {'torch ms':>9s} {'speedup':>8s}")
    for r in rows:
        print(f"{r['model']:44s} {r['batch']:5d} {r['microtile_ms']:12.3f} {r['torch_ms']:9.3f} "
              f"{r['speedup']:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
