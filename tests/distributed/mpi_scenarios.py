"""What ``test_distributed.py`` runs on every rank, under ``mpirun -n P`` or alone (a world
of one process):

    mpirun -n 2 python tests/distributed/mpi_scenarios.py OUT_DIR NAME [NAME ...]

With ``MICROTILE_TEST_TRANSPORT=mpi`` in the environment the gradient sums go through MPI's
allreduce even when the ranks share a machine (by default they go through shared memory).

Each rank writes ``OUT_DIR/rank<r>.json``: ``{NAME: result}``, or ``{NAME: {"error":
traceback}}`` when the scenario raised.  The scenarios only measure and report; the tests
decide.  Every scenario runs the same collectives on every rank, so one that fails on all
ranks alike does not hang the others.
"""
import hashlib
import json
import os
import sys
import time
import traceback

import numpy as np

import microtile
from microtile import nn
from microtile.distributed import DistributedDataParallel, barrier, rank, world_size
from microtile.distributed import _buckets, _node, _world
from microtile.nn._module import Module

F32, F64 = np.float32, np.float64


# --- models and data ---------------------------------------------------------------------

def mlp(dtype, seed, bn=False):
    rng = np.random.default_rng(seed)
    layers = [nn.Linear(10, 32, dtype=dtype, rng=rng)]
    if bn:
        layers.append(nn.BatchNorm1d(32, dtype=dtype))
    layers += [nn.ReLU(), nn.Linear(32, 16, dtype=dtype, rng=rng), nn.Tanh(),
               nn.Linear(16, 4, dtype=dtype, rng=rng)]
    return nn.Sequential(*layers)


def cnn(dtype, seed, bn=False):
    """(N, 2, 6, 6) -> 4 classes; with ``bn`` BatchNorm2d layers and a Residual block."""
    rng = np.random.default_rng(seed)
    layers = [nn.Conv2d(2, 4, 3, padding=1, dtype=dtype, rng=rng)]
    if bn:
        layers.append(nn.BatchNorm2d(4, dtype=dtype))
    layers += [nn.ReLU(), nn.MaxPool2d(2)]
    if bn:
        block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, dtype=dtype, rng=rng),
                              nn.BatchNorm2d(4, dtype=dtype), nn.ReLU(),
                              nn.Conv2d(4, 4, 3, padding=1, dtype=dtype, rng=rng))
        layers += [nn.Residual(block, nn.Conv2d(4, 4, 1, dtype=dtype, rng=rng)), nn.ReLU()]
    layers += [nn.Conv2d(4, 6, 3, padding=1, dtype=dtype, rng=rng), nn.ReLU(), nn.Flatten(),
               nn.Linear(6 * 3 * 3, 4, dtype=dtype, rng=rng)]
    return nn.Sequential(*layers)


def wide(dtype, seed, bn=False):
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.Linear(10, 512, dtype=dtype, rng=rng), nn.ReLU(),
                         nn.Linear(512, 512, dtype=dtype, rng=rng), nn.ReLU(),
                         nn.Linear(512, 4, dtype=dtype, rng=rng))


MODELS = {"mlp": (mlp, (10,)), "cnn": (cnn, (2, 6, 6)), "wide": (wide, (10,))}


def data(kind, n, seed, dtype=F64):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n,) + MODELS[kind][1]).astype(dtype)
    y = rng.integers(0, 4, n)
    return X, y


def digest(arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def state_digest(model):
    return digest(a for _, a in model._named_state())


def max_diff(model_a, model_b):
    """Largest |a - b| over the parameters, relative to the largest |b|."""
    worst = 0.0
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        scale = max(1.0, float(np.abs(pb.data).max(initial=0.0)))
        worst = max(worst, float(np.abs(pa.data - pb.data).max(initial=0.0)) / scale)
    return worst


def buffers_diff(model_a, model_b):
    return max((float(np.abs(a.astype(F64) - b.astype(F64)).max(initial=0.0))
                for (_, a), (_, b) in zip(model_a.named_buffers(), model_b.named_buffers())),
               default=0.0)


def step(model, opt, loss, x, y):
    opt.zero_grad()
    out = model(x)
    value = loss.forward(out, y)
    model.backward(loss.backward())
    opt.step()
    return value


# --- scenarios -----------------------------------------------------------------------------

def broadcast_at_wrap(r, p):
    """Ranks start from different weights and buffers; after wrapping, rank 0's."""
    model = cnn(F64, seed=100 + r, bn=True)
    for _, b in model.named_buffers():
        b[...] = r * 7 + 1
    before = state_digest(model)
    arrays = [id(q.data) for q in model.parameters()]
    opt = nn.SGD(model.parameters(), lr=0.1)
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.001)
    after = state_digest(model)
    # The optimizer built before wrapping still trains the same arrays.
    X, y = data("cnn", 4, seed=5)
    step(ddp, opt, nn.CrossEntropyLoss(), X, y)
    return {"before": before, "after": after, "stepped": state_digest(model),
            "same_arrays": [id(q.data) for q in model.parameters()] == arrays,
            "buckets": len(ddp._reducer.buckets)}


def identical_steps(r, p):
    """Each rank trains on its own data; after every step the replicas are the same bits."""
    out = {}
    cases = [("mlp_sgd", "mlp", False, lambda ps: nn.SGD(ps, lr=0.05, momentum=0.9)),
             ("mlp_adam", "mlp", False, lambda ps: nn.Adam(ps, lr=1e-2)),
             ("cnn_bn_adam", "cnn", True, lambda ps: nn.Adam(ps, lr=1e-2)),
             ("cnn_sgd", "cnn", False,
              lambda ps: nn.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3))]
    for name, kind, bn, make_opt in cases + [("wide_adam", "wide", False,
                                              lambda ps: nn.Adam(ps, lr=1e-3))]:
        build = MODELS[kind][0]
        # A 1.2 MB bucket (default cap) for "wide": MPI libraries change allreduce
        # algorithm with the message size, and every one must give every rank the same sum.
        ddp = DistributedDataParallel(build(F32, seed=r, bn=bn),
                                      bucket_cap_mb=25 if kind == "wide" else 0.002)
        opt = make_opt(ddp.parameters())
        loss = nn.CrossEntropyLoss()
        digests, local_losses, early = [], [], []
        for t in range(4):
            X, y = data(kind, 5, seed=1000 * t + r, dtype=F32)
            local_losses.append(step(ddp, opt, loss, X, y))
            digests.append(digest(q.data for q in ddp.parameters()))
            early.append(ddp._reducer.last_step["started_during_backward"])
        out[name] = {"digests": digests, "losses": local_losses, "early": early,
                     "buckets": len(ddp._reducer.buckets)}
    return out


def match_single(r, p, B=3, steps=4):
    """P ranks with B samples each against one process with P * B (float64)."""
    out = {}
    loss = nn.CrossEntropyLoss()
    for kind in ("mlp", "cnn"):
        build = MODELS[kind][0]
        ddp = DistributedDataParallel(build(F64, seed=7 + r), bucket_cap_mb=0.001)
        ref = build(F64, seed=7)
        opt = nn.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        ref_opt = nn.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        X, y = data(kind, steps * p * B, seed=42)
        for t in range(steps):
            g = slice(t * p * B, (t + 1) * p * B)
            mine = slice(t * p * B + r * B, t * p * B + (r + 1) * B)
            step(ddp, opt, loss, X[mine], y[mine])
            step(ref, ref_opt, loss, X[g], y[g])
        out[kind] = max_diff(ddp.module, ref)
    return out


def match_batchnorm(r, p, B=4, steps=3):
    """With BatchNorm each rank normalises its own batch (as torch's DDP): the reference is
    one process accumulating the P slices' gradients, each weighted 1/P, and keeping the
    running statistics as rank 0 broadcasts them before every forward."""
    out = {}
    loss = nn.CrossEntropyLoss()
    for kind in ("mlp", "cnn"):
        build = MODELS[kind][0]
        ddp = DistributedDataParallel(build(F64, seed=11 + r, bn=True), bucket_cap_mb=0.001)
        ref = build(F64, seed=11, bn=True)
        opt = nn.Adam(ddp.parameters(), lr=1e-2)
        ref_opt = nn.Adam(ref.parameters(), lr=1e-2)
        X, y = data(kind, steps * p * B, seed=43)
        buffers = [b for _, b in ref.named_buffers()]
        chain = [b.copy() for b in buffers]     # rank 0's, which every forward starts from
        for t in range(steps):
            mine = slice(t * p * B + r * B, t * p * B + (r + 1) * B)
            step(ddp, opt, loss, X[mine], y[mine])
            ref_opt.zero_grad()
            after = []
            for q in range(p):
                for b, c in zip(buffers, chain):
                    np.copyto(b, c)
                sl = slice(t * p * B + q * B, t * p * B + (q + 1) * B)
                loss.forward(ref(X[sl]), y[sl])
                ref.backward(loss.backward() / p)
                after.append([b.copy() for b in buffers])
            ref_opt.step()
            chain = after[0]
        # Until the next forward, each rank holds its own update.
        for b, a in zip(buffers, after[r]):
            np.copyto(b, a)
        out[kind] = {"params": max_diff(ddp.module, ref), "buffers": buffers_diff(ddp.module, ref)}
    return out


class _Record:
    """A progress callable that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, epoch, batch, n_batches, logs):
        self.calls += 1


class _StopOn:
    """A callback that asks to stop on one rank only."""

    def __init__(self, stop):
        self.stop = stop

    def on_epoch_end(self, epoch, logs):
        return self.stop


def fit_uneven(r, p, B=4):
    """nn.fit under DDP against one process with batch P * B: an uneven last step, one
    where a rank has no sample, validation, per-rank generators, progress, stopping."""
    out = {}
    loss = nn.CrossEntropyLoss()
    for name, n, rng in (("n37", 37, 0), ("n33_own_rng", 4 * p * B + 1, 0 if r == 0 else 99 + r)):
        X, y = data("mlp", n, seed=3)
        Xv, yv = data("mlp", 11, seed=4)
        ddp = DistributedDataParallel(mlp(F64, seed=21), bucket_cap_mb=0.001)
        ref = mlp(F64, seed=21)
        opt = nn.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        ref_opt = nn.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        record = _Record()
        hist = nn.fit(ddp, loss, opt, X, y, epochs=3, batch_size=B, rng=rng,
                      validation=(Xv, yv), progress=record)
        ref_hist = nn.fit(ref, loss, ref_opt, X, y, epochs=3, batch_size=p * B, rng=0,
                          validation=(Xv, yv), progress=False)
        out[name] = {
            "history": hist,
            "history_diff": max(abs(a - b) for k in ref_hist
                                for a, b in zip(hist[k], ref_hist[k])),
            "same_keys": sorted(hist) == sorted(ref_hist),
            "params": max_diff(ddp.module, ref),
            "digest": digest(q.data for q in ddp.parameters()),
            "progress_calls": record.calls,
        }
    # A callback that stops on one rank only stops every rank (none waits for the others).
    ddp = DistributedDataParallel(mlp(F64, seed=22, bn=True))
    X, y = data("mlp", 22, seed=6)     # the last step has 2 samples per rank (BatchNorm)
    hist = nn.fit(ddp, loss, nn.SGD(ddp.parameters(), lr=0.1), X, y, epochs=3,
                  batch_size=3, rng=1, progress=False, callbacks=[_StopOn(r == p - 1)])
    out["stop"] = {"epochs": len(hist["loss"]), "state": state_digest(ddp.module)}
    return out


def save_once(r, p, out_dir):
    """nn.save writes on rank 0 only, complete when it returns on any rank; load reads on
    every rank; a failure on rank 0 is raised everywhere."""
    from microtile.nn import _persist

    writes = []
    real = _persist.atomic_open

    def spy(path, *args, **kwargs):
        writes.append(os.fspath(path))
        return real(path, *args, **kwargs)

    _persist.atomic_open = spy
    try:
        ddp = DistributedDataParallel(cnn(F32, seed=r, bn=True))
        path = os.path.join(out_dir, "model.npz")
        nn.save(ddp, path)
        n_writes = len(writes)
        with np.load(path) as f:        # already complete here, on every rank
            saved = {k: f[k] for k in f.files}
        expected = ddp.module.state_dict()
        same = (sorted(saved) == sorted(expected)
                and all(np.array_equal(saved[k], expected[k]) for k in expected))
        for q in ddp.parameters():
            q.data = q.data + 1.0
        nn.load(ddp, path)
        loaded = all(np.array_equal(saved[k], v) for k, v in ddp.state_dict().items())
        try:
            nn.save(ddp, out_dir)           # a directory: rank 0 cannot write it
            failure = None
        except Exception as exc:  # noqa: BLE001 - reported
            failure = f"{type(exc).__name__}: {exc}"
    finally:
        _persist.atomic_open = real
    barrier()
    return {"writes": n_writes, "same": same, "loaded": loaded, "keys": sorted(saved),
            "failure": failure}


def bucket_sizes(r, p):
    """A few-KB cap and a 100 MB cap give the same bits."""
    out = {}
    loss = nn.CrossEntropyLoss()
    for cap in (0.004, 100):
        model = nn.Sequential(nn.Linear(10, 48, rng=1), nn.ReLU(), nn.Linear(48, 40, rng=2),
                              nn.ReLU(), nn.Linear(40, 4, rng=3))
        ddp = DistributedDataParallel(model, bucket_cap_mb=cap)
        opt = nn.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        for t in range(4):
            X, y = data("mlp", 6, seed=200 * t + r, dtype=F32)
            step(ddp, opt, loss, X, y)
        out[str(cap)] = {"digest": digest(q.data for q in ddp.parameters()),
                         "buckets": len(ddp._reducer.buckets)}
    return out


class Gated(Module):
    """x * w; its backward adds to w's gradient only when ``active``."""

    _param_names = ("w",)

    def __init__(self, n, active):
        self.w = nn.Parameter(np.linspace(0.5, 1.5, n))
        self.active = active

    def forward(self, x):
        self._x = np.array(x, copy=True)
        return x * self.w.data

    def backward(self, dy, *, need_input_grad=True):
        if self.active:
            self.w._add_to_grad((dy * self._x).sum(axis=0))
        return dy * self.w.data


def no_gradient(r, p):
    """A parameter that gets no gradient on the last rank is averaged as zero there."""
    loss = nn.CrossEntropyLoss()

    def build(active):
        rng = np.random.default_rng(5)
        return nn.Sequential(nn.Linear(10, 6, dtype=F64, rng=rng), Gated(6, active),
                             nn.Linear(6, 4, dtype=F64, rng=rng))

    ddp = DistributedDataParallel(build(r != p - 1), bucket_cap_mb=0.0001)
    X, y = data("mlp", 3, seed=300 + r)
    ddp.zero_grad()
    loss.forward(ddp(X), y)
    ddp.backward(loss.backward())
    gated = ddp.module[1].w.grad.copy()
    # The same sum computed here: every rank's local gradients, gathered.
    local = build(True)
    local.zero_grad()
    loss.forward(local(X), y)
    local.backward(loss.backward())
    everyone = ddp.comm.allgather(local[1].w.grad.copy())
    expected = sum(g for q, g in enumerate(everyone) if q != p - 1) / p
    # A backward that fails on every rank (no forward before it) raises everywhere and
    # leaves the wrapper working.
    fresh = DistributedDataParallel(build(True))
    try:
        fresh.backward(np.ones((3, 4)))
        error = None
    except RuntimeError as exc:
        error = str(exc)
    opt = nn.SGD(fresh.parameters(), lr=0.1)
    step(fresh, opt, loss, X, y)
    return {"gated_diff": float(np.abs(gated - expected).max()),
            "gated": digest([gated]),
            "all_grads": digest(q.grad for q in ddp.parameters()),
            "error": error,
            "after_error": digest(q.data for q in fresh.parameters())}


def transport(r, p):
    """How the gradients are summed: as this launch asked, and with the ranks made to look
    as if each were on a machine of its own (MPI's allreduce then, whatever was asked)."""
    model = mlp(F32, seed=0)
    asked = DistributedDataParallel(model)._reducer.transport
    real = _world.node_comm
    _world.node_comm = lambda comm: comm.Split(comm.Get_rank())
    try:
        apart = DistributedDataParallel(mlp(F32, seed=0))._reducer.transport
    finally:
        _world.node_comm = real
    return {"asked": asked, "apart": apart}


def slow_rank(r, p, B=3, steps=3):
    """The last rank is 50 ms late at one point of the shared-memory protocol in every
    step, while the others go straight on (into their next step, which writes their
    gradients again): the average must not change.  Each delay is at a point that only a
    wait in the protocol makes safe -- starting a bucket (the others must wait to sum),
    summing its slice (the others must wait to copy it), copying the others' slices (the
    others must not write their copies before) -- so removing that wait fails here.
    Through MPI's allreduce only the first delay (starting a bucket) applies: a rank late
    to start its allreduces."""
    out = {}
    loss = nn.CrossEntropyLoss()
    for owner, point in ((_buckets.GradientReducer, "_start"), (_node.NodeExchange, "_sum"),
                         (_node.NodeExchange, "_copy")):
        real = getattr(owner, point)
        if r == p - 1:
            def late(self, *args, _real=real):
                time.sleep(0.05)
                return _real(self, *args)
            setattr(owner, point, late)
        try:
            for cap in (0.0005, 25):
                ddp = DistributedDataParallel(mlp(F64, seed=11 + r), bucket_cap_mb=cap)
                ref = mlp(F64, seed=11)
                opt = nn.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
                ref_opt = nn.SGD(ref.parameters(), lr=0.1, momentum=0.9)
                X, y = data("mlp", steps * p * B, seed=43)
                for t in range(steps):
                    g = slice(t * p * B, (t + 1) * p * B)
                    mine = slice(t * p * B + r * B, t * p * B + (r + 1) * B)
                    step(ddp, opt, loss, X[mine], y[mine])
                    step(ref, ref_opt, loss, X[g], y[g])
                out[f"{point}/{cap}"] = {"diff": max_diff(ddp.module, ref),
                                         "digest": state_digest(ddp.module),
                                         "buckets": len(ddp._reducer.buckets)}
        finally:
            setattr(owner, point, real)
    return out


def ahead(r, p):
    """A rank a step ahead of the others in the shared-memory exchange (two begin() calls
    for the others' one) makes the others raise instead of summing the wrong step."""
    from microtile.distributed import MPI

    ex = _node.open_exchange(MPI.COMM_WORLD, [10], [F64])
    if ex is None:
        return {"error": None, "no_window": True}
    ex.buffers[0][:] = r + 1.0
    error = None
    if r == 0:
        ex.begin()
        ex.begin()
        ex.publish(0, 1.0)          # step 2's READY, while the others are in step 1
    else:
        ex.begin()
        try:
            ex.publish(0, 1.0)      # raises here if rank 0's READY is already there
            ex.complete()
        except RuntimeError as exc:
            error = str(exc)
    barrier()
    return {"error": error, "no_window": False}


def mismatch(r, p):
    """Ranks that disagree (model shapes, sample counts) get a ValueError on every rank,
    not a hang."""
    out = {}
    try:
        DistributedDataParallel(nn.Sequential(nn.Linear(4, 4 + r, rng=0)))
        out["model"] = None
    except ValueError as exc:
        out["model"] = str(exc)
    try:
        # Different caps cut different buckets: each rank would sum the others' bytes at
        # the wrong offsets.
        DistributedDataParallel(mlp(F64, seed=0), bucket_cap_mb=25 if r == 0 else 0.0005)
        out["cap"] = None
    except ValueError as exc:
        out["cap"] = str(exc)
    ddp = DistributedDataParallel(mlp(F64, seed=0))
    X, y = data("mlp", 10 + r, seed=0)
    try:
        nn.fit(ddp, nn.CrossEntropyLoss(), nn.SGD(ddp.parameters(), lr=0.1), X, y,
               batch_size=2, progress=False)
        out["fit"] = None
    except ValueError as exc:
        out["fit"] = str(exc)
    return out


def threads(r, p):
    return {"threads": microtile.get_num_threads(),
            "env": os.environ.get("MICROTILE_NUM_THREADS")}


def world_one(r, p, out_dir):
    """Without mpirun: a world of one trains exactly as the module alone."""
    from microtile.distributed import MPI
    from microtile.distributed._threads import fair_share

    res = {"rank": rank(), "world_size": world_size()}
    barrier()
    loss = nn.CrossEntropyLoss()
    for kind in ("mlp", "cnn"):
        build = MODELS[kind][0]
        plain, wrapped = build(F32, seed=3, bn=True), build(F32, seed=3, bn=True)
        ddp = DistributedDataParallel(wrapped, bucket_cap_mb=0.001)
        opts = [nn.Adam(m.parameters(), lr=1e-2) for m in (plain, ddp)]
        for t in range(3):
            X, y = data(kind, 6, seed=t, dtype=F32)
            step(plain, opts[0], loss, X, y)
            step(ddp, opts[1], loss, X, y)
        res[f"{kind}_steps_equal"] = state_digest(plain) == state_digest(wrapped)
        X, y = data(kind, 23, seed=9, dtype=F32)
        h1 = nn.fit(plain, loss, opts[0], X, y, epochs=2, batch_size=5, rng=2,
                    validation=(X[:7], y[:7]), progress=False)
        h2 = nn.fit(ddp, loss, opts[1], X, y, epochs=2, batch_size=5, rng=2,
                    validation=(X[:7], y[:7]), progress=False)
        res[f"{kind}_fit_equal"] = (h1 == h2 and state_digest(plain) == state_digest(wrapped))
    # A weight shared by two layers is complete only after the second one's backward.
    tied = []
    for _ in range(2):
        first = nn.Linear(6, 6, dtype=F64, rng=1)
        second = nn.Linear(6, 6, dtype=F64, rng=2)
        second.weight = first.weight
        tied.append(nn.Sequential(first, nn.Tanh(), second))
    tied_ddp = DistributedDataParallel(tied[1], bucket_cap_mb=0.0001)
    x = np.random.default_rng(0).standard_normal((4, 6))
    for m in (tied[0], tied_ddp):
        m.zero_grad()
        y = m(x)
        m.backward(np.ones_like(y))
    res["tied_equal"] = all(np.array_equal(a.grad, b.grad) for a, b in
                            zip(tied[0].parameters(), tied[1].parameters()))
    res["state_keys"] = sorted(ddp.state_dict()) == sorted(ddp.module.state_dict())
    res["param_names"] = ([n for n, _ in ddp.named_parameters()]
                          == [n for n, _ in ddp.module.named_parameters()])
    path = os.path.join(out_dir, "one.npz")
    nn.save(ddp, path)
    with np.load(path) as f:
        res["saved_keys"] = sorted(f.files) == sorted(ddp.module.state_dict())
    ddp.eval()
    res["eval"] = [m.training for m in ddp.module.modules()] == [False] * len(
        ddp.module.modules())
    ddp.train()
    res["train"] = ddp.training and all(m.training for m in ddp.module.modules())
    res["repr"] = repr(ddp).startswith("DistributedDataParallel(")
    errors = {}
    for label, call in [
            ("not_module", lambda: DistributedDataParallel(np.zeros(3))),
            ("twice", lambda: DistributedDataParallel(ddp)),
            ("comm_type", lambda: DistributedDataParallel(mlp(F32, 0), comm="world")),
            ("cap_zero", lambda: DistributedDataParallel(mlp(F32, 0), bucket_cap_mb=0)),
            ("cap_negative", lambda: DistributedDataParallel(mlp(F32, 0), bucket_cap_mb=-1)),
            ("cap_nan", lambda: DistributedDataParallel(mlp(F32, 0), bucket_cap_mb=float("nan"))),
            ("cap_inf", lambda: DistributedDataParallel(mlp(F32, 0), bucket_cap_mb=float("inf"))),
            ("cap_str", lambda: DistributedDataParallel(mlp(F32, 0), bucket_cap_mb="25")),
            ("rank_comm", lambda: rank(comm=3)),
            ("comm_null", lambda: DistributedDataParallel(mlp(F32, 0), comm=MPI.COMM_NULL))]:
        try:
            call()
            errors[label] = None
        except Exception as exc:  # noqa: BLE001 - reported
            errors[label] = type(exc).__name__
    res["errors"] = errors
    res["fair_share"] = {
        "unbound_2_on_2": [fair_share(2, frozenset({0, 1}), [frozenset({0, 1})] * 2, i)
                           for i in range(2)],
        "bound": [fair_share(1, frozenset({i}), [frozenset({0}), frozenset({1})], i)
                  for i in range(2)],
        "3_on_8": [fair_share(8, None, [None] * 3, i) for i in range(3)],
        "5_on_2": [fair_share(2, None, [None] * 5, i) for i in range(5)],
    }
    return res


def wrapped_twice(r, p, B=3):
    """The gradients live in the buckets of the last wrapper; an earlier wrapper of the same
    model copies them in and out instead.  Both train as one process with P * B (float64),
    with momentum (so a wrong gradient at any step shows) and with a step that
    accumulates two backward passes."""
    loss = nn.CrossEntropyLoss()
    model = mlp(F64, seed=11 + r)
    first = DistributedDataParallel(model, bucket_cap_mb=0.001)
    second = DistributedDataParallel(model, bucket_cap_mb=100)
    ref = mlp(F64, seed=11)
    opt = nn.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = nn.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    X, y = data("mlp", 6 * p * B, seed=5)
    diffs = []
    for t, ddp in enumerate((first, second, first, second)):
        g = slice(t * p * B, (t + 1) * p * B)
        mine = slice(t * p * B + r * B, t * p * B + (r + 1) * B)
        step(ddp, opt, loss, X[mine], y[mine])
        step(ref, ref_opt, loss, X[g], y[g])
        diffs.append(max_diff(model, ref))
    # Two backward passes into one step: the gradients add up (each pass averaged).
    opt.zero_grad()
    ref_opt.zero_grad()
    for t, ddp in ((4, second), (5, first)):
        g = slice(t * p * B, (t + 1) * p * B)
        mine = slice(t * p * B + r * B, t * p * B + (r + 1) * B)
        loss.forward(ddp(X[mine]), y[mine])
        ddp.backward(loss.backward())
        loss.forward(ref(X[g]), y[g])
        ref.backward(loss.backward())
    opt.step()
    ref_opt.step()
    diffs.append(max_diff(model, ref))
    return {"diffs": diffs}


SCENARIOS = {f.__name__: f for f in (broadcast_at_wrap, identical_steps, match_single,
                                     match_batchnorm, fit_uneven, save_once, bucket_sizes,
                                     no_gradient, mismatch, threads, world_one,
                                     wrapped_twice, transport, slow_rank, ahead)}
WITH_DIR = {"save_once", "world_one"}


def main(argv):
    out_dir, names = argv[0], argv[1:]
    if os.environ.get("MICROTILE_TEST_TRANSPORT") == "mpi":
        _buckets.NODE_EXCHANGE = False
    r, p = rank(), world_size()
    results = {}
    for name in names:
        fn = SCENARIOS[name]
        try:
            results[name] = fn(r, p, out_dir) if name in WITH_DIR else fn(r, p)
        except Exception:  # noqa: BLE001 - reported to the test
            results[name] = {"error": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{r}.json"), "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
