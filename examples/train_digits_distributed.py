"""Train the digits MLP (or CNN) of train_digits.py data-parallel over MPI.

    pip install "microtile[mpi]" scikit-learn     # and an MPI: apt-get install openmpi-bin
    mpirun -n 2 python examples/train_digits_distributed.py --check
    python examples/train_digits_distributed.py    # one process: the same accuracy

The global batch (``--global-batch``, summed over the ranks) is kept whatever the number
of ranks, so every run takes the same optimizer steps on the same samples and reaches the
same test accuracy (in float64 the weights agree to rounding; float32 may differ in the
last digits).  ``--check`` also trains the model in one process on rank 0 and prints both
accuracies and the largest difference between the weights.
"""
import argparse
import os
import sys
import time

import numpy as np

import microtile
from microtile import nn

try:
    from microtile.distributed import DistributedDataParallel, rank, world_size
except ImportError as exc:
    sys.exit(f"train_digits_distributed: {exc}")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import cnn, load_digits_split, mlp  # noqa: E402  (the same data, models)


def build(kind, dtype, seed):
    return (mlp if kind == "mlp" else cnn)(dtype, np.random.default_rng(seed))


def train(model, Xtr, ytr, batch_size, epochs, seed, progress):
    opt = nn.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return nn.fit(model, nn.CrossEntropyLoss(), opt, Xtr, ytr, epochs=epochs,
                  batch_size=batch_size, rng=seed, progress=progress)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--global-batch", type=int, default=64,
                    help="samples per step over all ranks (a multiple of the rank count)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true",
                    help="also train in one process on rank 0 and compare")
    args = ap.parse_args(argv)
    r, p = rank(), world_size()
    if args.global_batch % p:
        sys.exit(f"--global-batch {args.global_batch} is not a multiple of {p} ranks")
    Xtr, ytr, Xte, yte = load_digits_split(args.seed)
    if args.model == "cnn":
        Xtr, Xte = Xtr[:, None], Xte[:, None]
    dtype = np.dtype(args.dtype)
    # Every rank may build its own weights: wrapping copies rank 0's into all of them.
    model = DistributedDataParallel(build(args.model, dtype, args.seed + r))
    if r == 0:
        print(f"digits {args.model}: {p} rank(s) x {microtile.get_num_threads()} thread(s), "
              f"{args.global_batch // p} samples per rank per step, {args.dtype}")
    t0 = time.perf_counter()
    hist = train(model, Xtr, ytr, args.global_batch // p, args.epochs, args.seed,
                 progress=r == 0)
    seconds = time.perf_counter() - t0
    # Each rank can predict on its own: the replicas hold the same weights and statistics.
    acc = float(np.mean(nn.predict(model, Xte).argmax(axis=1) == yte))
    if r == 0:
        print(f"{p} rank(s): {args.epochs} epochs in {seconds:.2f} s, final training loss "
              f"{hist['loss'][-1]:.6f}, test accuracy {acc:.4f}")
    if args.check and r == 0:
        alone = build(args.model, dtype, args.seed)
        h1 = train(alone, Xtr, ytr, args.global_batch, args.epochs, args.seed,
                   progress=False)
        acc1 = float(np.mean(nn.predict(alone, Xte).argmax(axis=1) == yte))
        diff = max(float(np.abs(a.data - b.data).max())
                   for a, b in zip(alone.parameters(), model.parameters()))
        print(f"1 process, batch {args.global_batch}: final training loss "
              f"{h1['loss'][-1]:.6f}, test accuracy {acc1:.4f}; largest weight difference "
              f"{diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
