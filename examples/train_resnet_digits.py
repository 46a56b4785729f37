"""A small ResNet on scikit-learn's digits, upsampled to 16x16, beside the same model in PyTorch.

Conv-BN-ReLU stem, two residual stages (16 channels, then 32 at half the size with a 1x1
conv + BN shortcut), global average pool, Dropout, Linear.  AdamW with a cosine learning-rate
schedule and early stopping on the validation loss; halfway through, the model and the
optimizer (and the schedule) are checkpointed and training resumes from the files in a new
model, as it would after an interruption.  Prints accuracy and images per second for training
and inference, microtile beside torch (when installed) on the same threads.

    pip install scikit-learn            # torch optional: pip install torch==2.13.0
    python examples/train_resnet_digits.py [--epochs 30] [--threads 2]
"""
import argparse
import os
import pickle
import tempfile
import time

import numpy as np

import microtile
from microtile import nn
from microtile.nn import lr_scheduler


def load_digits_16(seed=0):
    """The 1,797 8x8 digits, upsampled 2x (each pixel a 2x2 block), standardised; a
    stratified-enough 80/20 split from one permutation."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = np.kron(d.images, np.ones((2, 2))).astype(np.float32)[:, None]     # (n, 1, 16, 16)
    x = (x - x.mean()) / x.std()
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def resnet(seed=0, in_channels=1, width=16, dropout=0.1, classes=10):
    """Stem (conv 3x3, BN, ReLU), a residual stage of ``width`` channels, one of twice that
    at half the size (1x1 conv + BN shortcut), global average pool, Dropout, Linear."""
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
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False, rng=seed),
        nn.BatchNorm2d(width), nn.ReLU(),
        block(width, width, 1, seed + 10), nn.ReLU(), block(width, w2, 2, seed + 20), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout, rng=seed + 30),
        nn.Linear(w2, classes, rng=seed + 40))


def torch_resnet(model, in_channels=1, width=16, dropout=0.1, classes=10):
    """The same architecture in torch, starting from ``model``'s weights (its state_dict)."""
    import torch
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
    t = tnn.Sequential(tnn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                       tnn.BatchNorm2d(width), tnn.ReLU(), block(width, width, 1), tnn.ReLU(),
                       block(width, w2, 2), tnn.ReLU(), tnn.AdaptiveAvgPool2d(1), tnn.Flatten(),
                       tnn.Dropout(dropout), tnn.Linear(w2, classes))
    t.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    return t


def checkpoint(path, model, opt, sched, stopper_state):
    """Model, optimizer, schedule and epoch in one file, written atomically."""
    blob = {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "extra": stopper_state}
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(blob, f)
    os.replace(tmp, path)


def accuracy(logits, y):
    return float((np.argmax(logits, 1) == y).mean())


def train_microtile(xt, yt, xv, yv, epochs, batch):
    model = resnet()
    start = {k: np.array(v, copy=True) for k, v in model.state_dict().items()}
    opt = nn.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    stop = nn.EarlyStopping(monitor="val_loss", patience=5)
    half = max(epochs // 2, 1)
    t0 = time.perf_counter()
    hist = nn.fit(model, nn.CrossEntropyLoss(), opt, xt, yt, epochs=half, batch_size=batch,
                  rng=0, progress=False, validation=(xv, yv), scheduler=sched, callbacks=[stop])
    # Interrupted here: save everything, then carry on in a fresh model and optimizer.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.pkl")
        checkpoint(path, model, opt, sched, {"epochs_done": len(hist["loss"])})
        with open(path, "rb") as f:
            blob = pickle.load(f)
    model2 = resnet(seed=123)                 # other initial weights: all come from the file
    model2.load_state_dict(blob["model"])
    opt2 = nn.AdamW(model2.parameters(), lr=3e-3, weight_decay=1e-4)
    opt2.load_state_dict(blob["optimizer"])
    sched2 = lr_scheduler.CosineAnnealingLR(opt2, T_max=epochs)
    sched2.load_state_dict(blob["scheduler"])
    rest = epochs - blob["extra"]["epochs_done"]
    hist2 = nn.fit(model2, nn.CrossEntropyLoss(), opt2, xt, yt, epochs=rest, batch_size=batch,
                   rng=1, progress=False, validation=(xv, yv), scheduler=sched2,
                   callbacks=[nn.EarlyStopping(monitor="val_loss", patience=5)]) if rest else \
        {"loss": []}
    seconds = time.perf_counter() - t0
    n_epochs = len(hist["loss"]) + len(hist2["loss"])
    return model2, start, n_epochs, n_epochs * len(xt) / seconds


def train_torch(start_model, xt, yt, xv, yv, epochs, batch):
    import torch
    t = torch_resnet(start_model)
    opt = torch.optim.AdamW(t.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    lossf = torch.nn.CrossEntropyLoss()
    X, Y = torch.from_numpy(xt), torch.from_numpy(yt)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(epochs):
        t.train()
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(X), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            lossf(t(X[idx]), Y[idx]).backward()
            opt.step()
        sched.step()
    rate = epochs * len(xt) / (time.perf_counter() - t0)
    t.eval()
    with torch.no_grad():
        acc = accuracy(t(torch.from_numpy(xv)).numpy(), yv)
    return t, acc, rate


def inference_rate(fn, x, batch, seconds=1.0):
    """Images per second of ``fn`` over batches of ``batch`` (median of timed rounds)."""
    xb = x[:batch]
    fn(xb)
    rates = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(rates) < 5:
        t0 = time.perf_counter()
        fn(xb)
        rates.append(batch / (time.perf_counter() - t0))
    return float(np.median(rates))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    microtile.set_num_threads(args.threads)
    xt, yt, xv, yv = load_digits_16()
    model, start, n_epochs, train_rate = train_microtile(xt, yt, xv, yv, args.epochs,
                                                         args.batch)
    model.eval()
    acc = accuracy(nn.predict(model, xv), yv)
    rows = [("microtile", acc, n_epochs, train_rate,
             inference_rate(lambda b: model(b), xv, 1),
             inference_rate(lambda b: model(b), xv, 32))]
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(args.threads)
        start_model = resnet()
        start_model.load_state_dict(start)
        t, tacc, trate = train_torch(start_model, xt, yt, xv, yv, n_epochs, args.batch)
        with torch.no_grad():
            run = lambda b: t(torch.from_numpy(b))   # noqa: E731
            rows.append(("torch", tacc, n_epochs, trate, inference_rate(run, xv, 1),
                         inference_rate(run, xv, 32)))
    print(f"digits 16x16: {len(xt)} training, {len(xv)} validation images, "
          f"{args.threads} threads, batch {args.batch}")
    print(f"{'library':<10} {'val acc':>8} {'epochs':>7} {'train img/s':>12} "
          f"{'infer b=1':>10} {'infer b=32':>11}")
    for name, a, e, tr, i1, i32 in rows:
        print(f"{name:<10} {a:>8.3f} {e:>7d} {tr:>12.0f} {i1:>10.0f} {i32:>11.0f}")


if __name__ == "__main__":
    main()
