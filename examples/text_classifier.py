"""A bag-of-words text classifier trained on sparse input, then pruned to 90 %.

    pip install scipy               # microtile's sparse kernels take scipy.sparse input
    python examples/text_classifier.py [--epochs 15] [--threads 2] [--prune 0.9]

The corpus ships with Python itself: the docstrings of the standard library's modules,
classes and functions, labelled with the package they come from (asyncio, email, unittest,
...).  Each document becomes a row of word counts, so a batch is a CSR matrix of a few
thousand columns with a few dozen nonzeros per row; the first Linear layer trains on it
without densifying (``nn.fit`` slices sparse row batches).  The model is then pruned with
``nn.prune`` (its smallest weights zeroed and kept at zero through fine-tuning) and
evaluated again.

Prints the test accuracy before and after pruning, and the time of one pass of inference
over the test set with the dense and the pruned weights (one run each: an illustration, not
a benchmark; ``tools/`` is the place for measurements).
"""
import argparse
import importlib
import inspect
import pkgutil
import re
import sys
import time
import warnings

import numpy as np

import microtile
from microtile import nn

PACKAGES = ("asyncio", "email", "unittest", "xml", "http", "multiprocessing", "logging",
            "importlib", "json", "concurrent")
WORD = re.compile(r"[a-z]{2,}")


def docstrings(package):
    """The docstrings of every module, class, function and method under ``package``."""
    texts = []
    pkg = importlib.import_module(package)
    # __main__ modules run a program when imported (unittest's test runner, asyncio's REPL).
    names = [package] + [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")
                         if not m.name.endswith("__main__")]
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules (asyncio.windows_*, ...)
            continue
        objs = [mod] + [o for _, o in inspect.getmembers(mod)
                        if (inspect.isclass(o) or inspect.isfunction(o))
                        and getattr(o, "__module__", None) == name]
        for o in list(objs):
            if inspect.isclass(o):
                objs += [f for _, f in inspect.getmembers(o, inspect.isfunction)
                         if f.__qualname__.startswith(o.__qualname__ + ".")]
        for o in objs:
            doc = inspect.getdoc(o)
            if doc and len(doc) > 40:
                texts.append(doc)
    return sorted(set(texts))


def bag_of_words(texts, vocab):
    """CSR word counts (rows: texts, columns: ``vocab`` order)."""
    import scipy.sparse as sp
    rows, cols = [], []
    for i, text in enumerate(texts):
        for w in WORD.findall(text.lower()):
            j = vocab.get(w)
            if j is not None:
                rows.append(i)
                cols.append(j)
    data = np.ones(len(rows), np.float32)
    X = sp.csr_matrix((data, (rows, cols)), shape=(len(texts), len(vocab)))
    X.sum_duplicates()
    X.data = np.log1p(X.data)       # damp frequent words
    return X


def load(seed, test_fraction=0.25):
    texts, labels = [], []
    for c, pkg in enumerate(PACKAGES):
        docs = docstrings(pkg)
        texts += docs
        labels += [c] * len(docs)
    y = np.array(labels, np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    counts = {}
    for i in train:
        for w in set(WORD.findall(texts[i].lower())):
            counts[w] = counts.get(w, 0) + 1
    vocab = {w: j for j, w in enumerate(sorted(w for w, n in counts.items() if n >= 2))}
    X = bag_of_words(texts, vocab)
    return X[train], y[train], X[test], y[test], vocab


def accuracy(model, X, y):
    return float(np.mean(nn.predict(model, X).argmax(axis=1) == y))


def timed_predict(model, X):
    t0 = time.perf_counter()
    nn.predict(model, X)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--finetune", type=int, default=5)
    ap.add_argument("--prune", type=float, default=0.9)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        import scipy.sparse  # noqa: F401
    except ImportError:
        sys.exit("text_classifier: this example needs scipy (pip install scipy)")
    if args.threads:
        microtile.set_num_threads(args.threads)
    Xtr, ytr, Xte, yte, vocab = load(args.seed)
    print(f"{Xtr.shape[0]} training and {Xte.shape[0]} test docstrings from "
          f"{len(PACKAGES)} packages; {len(vocab)} words; "
          f"{Xtr.nnz / max(Xtr.shape[0], 1):.1f} nonzeros per row")
    model = nn.Sequential(nn.Linear(len(vocab), args.hidden, rng=args.seed), nn.ReLU(),
                          nn.Linear(args.hidden, args.hidden, rng=args.seed + 1), nn.ReLU(),
                          nn.Linear(args.hidden, len(PACKAGES), rng=args.seed + 2))
    loss = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    nn.fit(model, loss, nn.Adam(model.parameters(), lr=1e-3), Xtr, ytr, epochs=args.epochs,
           batch_size=64, rng=args.seed, progress=False)
    train_s = time.perf_counter() - t0
    acc_dense = accuracy(model, Xte, yte)
    # The hidden layers see dense activations: their pruned forward is the one that moves
    # to the sparse kernel.  Time it on the activations of the first layer.
    H = np.maximum(nn.predict(model[0], Xte), 0)
    tail = nn.Sequential(*list(model)[2:])
    dense_s = timed_predict(tail, H)
    nn.prune(model, args.prune)
    nn.fit(model, loss, nn.Adam(model.parameters(), lr=5e-4), Xtr, ytr, epochs=args.finetune,
           batch_size=64, rng=args.seed + 1, progress=False)
    acc_pruned = accuracy(model, Xte, yte)
    H = np.maximum(nn.predict(model[0], Xte), 0)
    pruned_s = timed_predict(tail, H)
    zeros = np.mean([float(np.mean(model[i].weight.data == 0)) for i in (0, 2, 4)])
    print(f"trained {args.epochs} epochs on sparse input in {train_s:.2f} s")
    print(f"test accuracy: dense {acc_dense:.3f}, pruned to {zeros:.0%} zeros {acc_pruned:.3f}")
    print(f"hidden layers, inference over the test set: dense weights {dense_s * 1e3:.1f} ms, "
          f"pruned {pruned_s * 1e3:.1f} ms (sparse_density "
          f"{microtile.get_config()['sparse_density']})")


if __name__ == "__main__":
    main()
