"""ResNet-like CNN beside PyTorch (CPU): a training step and inference at batch 1 and 32.

Issue 14's model: 32x32 RGB input, Conv3x3-BN-ReLU stem (32 channels), a residual stage of 32
channels and one of 64 (stride 2, 1x1 conv + BN shortcut), global average pool, Linear to 10.
The model is ``examples/train_resnet_digits.py``'s, at 3 input channels, width 32 and
no dropout.  One step = zero_grad, forward, cross-entropy, backward, SGD with momentum.  Same weights,
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

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.join(_HERE, "..", "examples"))
from bench_nn import time_pair  # noqa: E402  (one timing loop for the nn benchmarks)
import train_resnet_digits as _example  # noqa: E402  (the model, and its torch mirror)


def resnet():
    return _example.resnet(in_channels=3, width=32, dropout=0.0)


def torch_mirror(model, torch):
    return _example.torch_resnet(model, in_channels=3, width=32, dropout=0.0)


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
