"""Train a small MLP and a small CNN on scikit-learn's 8x8 handwritten digits with microtile.nn.

    pip install scikit-learn        # the data set ships inside scikit-learn
    python examples/train_digits.py [--epochs 30] [--threads 2] [--dtype float32]

Prints the test accuracy and the training throughput (samples per second) of each model.
The CNN needs microtile's convolution kernels (microtile.conv2d).
"""
import argparse
import sys
import time

import numpy as np

import microtile
from microtile import nn


def load_digits_split(seed=0, test_fraction=0.25):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("train_digits: this example needs scikit-learn (pip install scikit-learn)")
    digits = load_digits()
    X = (digits.images / 16.0).astype(np.float64)  # pixel values 0..16 -> 0..1
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return X[train], y[train], X[test], y[test]


def mlp(dtype, rng):
    return nn.Sequential(nn.Flatten(),
                         nn.Linear(64, 128, dtype=dtype, rng=rng), nn.ReLU(),
                         nn.Linear(128, 64, dtype=dtype, rng=rng), nn.ReLU(),
                         nn.Linear(64, 10, dtype=dtype, rng=rng))


def cnn(dtype, rng):
    # (N, 1, 8, 8) -> conv 3x3 -> (N, 16, 8, 8) -> pool -> (N, 16, 4, 4) -> conv 3x3
    # -> (N, 32, 4, 4) -> pool -> (N, 32, 2, 2) -> 128 features -> 10 classes.
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, dtype=dtype, rng=rng), nn.ReLU(),
                         nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1, dtype=dtype, rng=rng), nn.ReLU(),
                         nn.MaxPool2d(2),
                         nn.Flatten(),
                         nn.Linear(128, 10, dtype=dtype, rng=rng))


def train(name, model, Xtr, ytr, Xte, yte, epochs, batch_size, seed):
    opt = nn.Adam(model.parameters(), lr=2e-3)
    t0 = time.perf_counter()
    hist = nn.fit(model, nn.CrossEntropyLoss(), opt, Xtr, ytr, epochs=epochs,
                  batch_size=batch_size, rng=seed, validation=(Xte, yte))
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    pred = nn.predict(model, Xte).argmax(axis=1)
    infer = time.perf_counter() - t1
    acc = float(np.mean(pred == yte))
    n_params = sum(p.size for p in model.parameters())
    print(f"{name}: {n_params} parameters, {epochs} epochs in {seconds:.2f} s "
          f"({epochs * len(ytr) / seconds:,.0f} training samples/s, "
          f"{len(yte) / infer:,.0f} inference samples/s)")
    print(f"{name}: final training loss {hist['loss'][-1]:.4f}, "
          f"training accuracy {hist['accuracy'][-1]:.4f}, test accuracy {acc:.4f}")
    return acc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        microtile.set_num_threads(args.threads)
    Xtr, ytr, Xte, yte = load_digits_split(args.seed)
    print(f"digits: {len(ytr)} training and {len(yte)} test images of 8x8 pixels; "
          f"{microtile.get_num_threads()} threads, {args.dtype}")
    rng = np.random.default_rng(args.seed)
    dtype = np.dtype(args.dtype)
    train("MLP 64-128-64-10", mlp(dtype, rng), Xtr, ytr, Xte, yte, args.epochs,
          args.batch_size, args.seed)
    train("CNN conv16-pool-conv32-pool-fc", cnn(dtype, rng), Xtr[:, None], ytr,
          Xte[:, None], yte, args.epochs, args.batch_size, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
