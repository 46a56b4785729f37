"""Classify scikit-learn's 8x8 digits read row by row as sequences, with an LSTM or GRU from
microtile.nn and the same model in PyTorch.

    pip install scikit-learn        # the data set ships inside scikit-learn; torch optional
    python examples/sequence_digits.py [--cell lstm|gru] [--epochs 15] [--hidden 64]
                                       [--threads 2] [--dtype float32]

Each image is a sequence of 8 steps (its pixel rows) of 8 features, and the model is
``Sequential(LSTM(8, hidden, batch_first=True), LastStep(batch_first=True), Linear(hidden,
10))``: only the recurrent state carries the first rows to the classifier.  When torch is
installed the same model is trained beside it from the same initial weights on the same
batches in the same order, so the two loss columns agree to rounding; the end of the run
prints each library's test accuracy and training throughput (samples per second).
"""
import argparse
import sys
import time

import numpy as np

import microtile
from microtile import nn


def load_sequences(seed=0, test_fraction=0.25):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("sequence_digits: this example needs scikit-learn (pip install scikit-learn)")
    digits = load_digits()
    X = digits.images / 16.0                  # (n, 8 rows, 8 columns), pixels 0..1
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return X[train], y[train], X[test], y[test]


def microtile_model(cell, hidden, dtype, seed):
    rec = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
    return nn.Sequential(rec(8, hidden, batch_first=True, dtype=dtype, rng=seed),
                         nn.LastStep(batch_first=True),
                         nn.Linear(hidden, 10, dtype=dtype, rng=seed + 1))


def torch_model(torch, cell, hidden, dtype, state):
    """The same architecture in torch, with microtile's initial weights."""
    rec_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rec = rec_cls(8, hidden, batch_first=True, dtype=dtype)
            self.fc = torch.nn.Linear(hidden, 10, dtype=dtype)

        def forward(self, x):
            return self.fc(self.rec(x)[0][:, -1])
    model = Classifier()
    # microtile's keys are "0.weight_ih_l0", ..., "2.weight": torch's "rec.", "fc." names.
    names = {"0": "rec", "2": "fc"}
    model.load_state_dict({names[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]:
                           torch.from_numpy(v.copy()) for k, v in state.items()})
    return model


def batches(n, batch_size, epoch, seed):
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
    if args.threads:
        microtile.set_num_threads(args.threads)
        if torch is not None:
            torch.set_num_threads(args.threads)
    dtype = np.dtype(args.dtype)
    Xtr, ytr, Xte, yte = load_sequences(args.seed)
    Xtr, Xte = Xtr.astype(dtype), Xte.astype(dtype)
    print(f"digits as sequences: {len(ytr)} training and {len(yte)} test images, 8 steps of "
          f"8 features; {args.cell.upper()} hidden {args.hidden}, "
          f"{microtile.get_num_threads()} threads, {args.dtype}")

    model = microtile_model(args.cell, args.hidden, dtype, args.seed)
    loss = nn.CrossEntropyLoss()
    opt = nn.Adam(model.parameters(), lr=args.lr)
    ref = ref_opt = None
    if torch is not None:
        ref = torch_model(torch, args.cell, args.hidden, getattr(torch, args.dtype),
                          model.state_dict())
        ref_opt = torch.optim.Adam(ref.parameters(), lr=args.lr)
        ref_loss = torch.nn.CrossEntropyLoss()
        Xtr_t, ytr_t = torch.from_numpy(Xtr), torch.from_numpy(ytr)
    seconds = {"microtile": 0.0, "torch": 0.0}
    print("epoch  microtile loss" + ("  torch loss" if ref is not None else ""))
    for epoch in range(args.epochs):
        plan = batches(len(ytr), args.batch_size, epoch, args.seed)
        total = 0.0
        t0 = time.perf_counter()
        for idx in plan:
            opt.zero_grad()
            total += loss.forward(model.forward(Xtr[idx]), ytr[idx]) * len(idx)
            model.backward(loss.backward(), need_input_grad=False)
            opt.step()
        seconds["microtile"] += time.perf_counter() - t0
        line = f"{epoch + 1:5d}  {total / len(ytr):14.6f}"
        if ref is not None:
            total = 0.0
            t0 = time.perf_counter()
            for idx in plan:
                ref_opt.zero_grad()
                value = ref_loss(ref(Xtr_t[idx]), ytr_t[idx])
                value.backward()
                ref_opt.step()
                total += value.item() * len(idx)
            seconds["torch"] += time.perf_counter() - t0
            line += f"  {total / len(ytr):10.6f}"
        print(line)

    acc = float(np.mean(nn.predict(model, Xte).argmax(axis=1) == yte))
    rate = args.epochs * len(ytr) / seconds["microtile"]
    print(f"microtile: test accuracy {acc:.4f}, {rate:,.0f} training samples/s")
    if ref is not None:
        with torch.no_grad():
            ref_acc = float((ref(torch.from_numpy(Xte)).argmax(1).numpy() == yte).mean())
        ref_rate = args.epochs * len(ytr) / seconds["torch"]
        print(f"torch:     test accuracy {ref_acc:.4f}, {ref_rate:,.0f} training samples/s "
              f"(microtile / torch: {rate / ref_rate:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
