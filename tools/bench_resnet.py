"""ResNet-like CNN beside PyTorch (CPU): a training step and inference at batch 1 and 32.

Issue 14's model: 32x32 RGB input, Conv3x3-BN-ReLU stem (32 channels), a residual stage of 32
channels and one of 64 (stride 2, 1x1 conv + BN shortcut), global average pool, Linear to 10.
One step = zero_grad, forward, cross-entropy, backward, SGD with momentum.  Same weights,
batch and threads for both; timed in alternating rounds, medians compared (float32), results
checked (eval-mode outputs agree) before timing.

    flock -x /tmp/microtile-bench.lock python tools/bench_resnet.py [--threads 2] [--rounds 7]

Not a test: the figures go in the issue's closing note.
"""
import argparse
import os
import sys

import numpy as np

import microtile
from microtile import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nn import time_pair  # noqa: E402  (one timing loop for the nn benchmarks)


def resnet(width=32, classes=10, seed=0):
    def block(cin, cout, stride, s):
        body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False, rng=s),
            nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False, rng=s + 1), nn.BatchNorm2d(cout))
        short = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False, rng=s + 2), nn.BatchNorm2d(cout))
        return nn.Residual(body, short)
    w2 = 2 * width
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False, rng=seed), nn.BatchNorm2d(width),
        nn.ReLU(), block(width, width, 1, seed + 10), nn.ReLU(),
        block(width, w2, 2, seed + 20), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(w2, classes, rng=seed + 30))


def torch_mirror(model, torch, width=32, classes=10):
    tnn = torch.nn

    class Res(tnn.Module):
        def __init__(self, body, shortcut=None):
            super().__init__()
            self.block, self.shortcut = body, shortcut

        def forward(self, x):
            return self.block(x) + (x if self.shortcut is None else self.shortcut(x))

    def block(cin, cout, stride):
        body = tnn.Sequential(tnn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                              tnn.BatchNorm2d(cout), tnn.ReLU(),
                              tnn.Conv2d(cout, cout, 3, 1, 1, bias=False), tnn.BatchNorm2d(cout))
        short = None if stride == 1 and cin == cout else tnn.Sequential(
            tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout))
        return Res(body, short)
    w2 = 2 * width
    t = tnn.Sequential(tnn.Conv2d(3, width, 3, 1, 1, bias=False), tnn.BatchNorm2d(width),
                       tnn.ReLU(), block(width, width, 1), tnn.ReLU(), block(width, w2, 2),
                       tnn.ReLU(), tnn.AdaptiveAvgPool2d(1), tnn.Flatten(),
                       tnn.Linear(w2, classes))
    t.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    return t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per timed round")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_resnet: PyTorch is not installed", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    microtile.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    model = resnet()
    tmodel = torch_mirror(model, torch)
    rows = []

    # Inference (eval mode): outputs checked against torch first.
    model.eval()
    tmodel.eval()
    for batch in (1, 32):
        x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        tx = torch.from_numpy(x)
        with torch.no_grad():
            ref = tmodel(tx).numpy()
        got = model(x)
        err = float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))
        assert err < 1e-4, f"inference differs from torch: relative error {err:.2e}"

        def g(tx=tx):
            with torch.no_grad():
                tmodel(tx)
        tm, tt = time_pair(lambda x=x: model(x), g, args.rounds, args.min_time)
        rows.append((f"inference batch {batch}", tm, tt))

    # Training step (train mode).
    model.train()
    tmodel.train()
    batch = 32
    x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, batch)
    loss, tloss = nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss()
    opt = nn.SGD(model.parameters(), lr=0.01, momentum=0.9)
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.01, momentum=0.9)
    tx, ty = torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))

    def mt_step():
        opt.zero_grad()
        loss.forward(model.forward(x), labels)
        model.backward(loss.backward(), need_input_grad=False)
        opt.step()

    def torch_step():
        topt.zero_grad()
        tloss(tmodel(tx), ty).backward()
        topt.step()
    tm, tt = time_pair(mt_step, torch_step, args.rounds, args.min_time)
    rows.append((f"training step batch {batch}", tm, tt))

    print(f"ResNet-like CNN (32x32x3, stages 32/64, BN), float32, {args.threads} threads, "
          f"medians of {args.rounds} interleaved rounds (torch {torch.__version__})")
    print(f"{'case':28s} {'microtile ms':>12s} {'torch ms':>9s} {'speedup':>8s}")
    for name, tm, tt in rows:
        print(f"{name:28s} {tm * 1e3:12.3f} {tt * 1e3:9.3f} {tt / tm:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
