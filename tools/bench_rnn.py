"""Recurrent layers beside torch.nn.LSTM / GRU on CPU (a benchmark, not a test).

float32, both libraries held to the same threads, torch's weights loaded into microtile's
layer (the same numbers), calls interleaved in rounds, medians; outputs and gradients are
checked against torch's.  Forward is inference (eval, no grad); forward+backward is the
layer's output gradient given (ones), with the input gradient.  Ratio = torch / microtile.

    PYTHONPATH=src python tools/bench_rnn.py [--threads 2] [--rounds 7] [--cases "T50 b32"]
"""
import argparse
import statistics
import time

import numpy as np

import microtile as mt
from microtile import nn

# (label, kind, input, hidden, layers, T, batch)
CASES = [
    ("LSTM 128->256 T50 b32", "LSTM", 128, 256, 1, 50, 32),
    ("LSTM 128->256 T50 b1", "LSTM", 128, 256, 1, 50, 1),
    ("GRU 128->256 T50 b32", "GRU", 128, 256, 1, 50, 32),
    ("GRU 128->256 T50 b1", "GRU", 128, 256, 1, 50, 1),
    ("LSTM 2x512 T50 b64", "LSTM", 512, 512, 2, 50, 64),
]


def _per_call(fn, min_time=0.1):
    fn()
    t = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t, 1e-6)
    reps = max(1, int(min_time / once))
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cases", default="",
                    help="comma-separated substrings: run only the cases whose label holds one")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    mt.set_num_threads(args.threads)
    print(f"float32, {args.threads} threads, torch {torch.__version__}, medians of "
          f"{args.rounds} interleaved rounds; ratio = torch time / microtile time")
    print(f"{'case':>24} {'fwd mt ms':>10} {'torch':>8} {'ratio':>6} {'fwd+bwd mt ms':>14} "
          f"{'torch':>8} {'ratio':>6}")
    rng = np.random.default_rng(0)
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    for label, kind, f_in, hid, layers, T, batch in CASES:
        if wanted and not any(w in label for w in wanted):
            continue
        tl = getattr(torch.nn, kind)(f_in, hid, num_layers=layers)
        ml = getattr(nn, kind)(f_in, hid, num_layers=layers)
        ml.load_state_dict({k: v.detach().numpy() for k, v in tl.state_dict().items()})
        x = rng.standard_normal((T, batch, f_in)).astype(np.float32)
        tx = torch.from_numpy(x)
        dy = np.ones((T, batch, hid), np.float32)
        tdy = torch.from_numpy(dy)
        txg = tx.clone().requires_grad_(True)

        def f_mt():
            ml.eval()
            return ml.forward(x)

        def f_t():
            with torch.no_grad():
                return tl(tx)[0]

        def b_mt():
            ml.train()
            ml.zero_grad()
            ml.forward(x)
            return ml.backward(dy)

        def b_t():
            tl.zero_grad()
            txg.grad = None
            tl(txg)[0].backward(tdy)
            return txg.grad
        np.testing.assert_allclose(f_mt(), f_t().numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(b_mt(), b_t().numpy(), rtol=1e-3, atol=1e-3)
        times = {k: [] for k in ("f_mt", "f_t", "b_mt", "b_t")}
        fns = {"f_mt": f_mt, "f_t": f_t, "b_mt": b_mt, "b_t": b_t}
        for r in range(args.rounds):
            for k in (("f_t", "f_mt", "b_t", "b_mt") if r % 2 else
                      ("f_mt", "f_t", "b_mt", "b_t")):
                times[k].append(_per_call(fns[k]))
        m = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{label:>24} {m['f_mt']:10.3f} {m['f_t']:8.3f} {m['f_t'] / m['f_mt']:6.2f} "
              f"{m['b_mt']:14.3f} {m['b_t']:8.3f} {m['b_t'] / m['b_mt']:6.2f}", flush=True)


if __name__ == "__main__":
    main()
