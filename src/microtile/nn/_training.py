"""fit and predict: mini-batch training and batched inference over NumPy arrays."""
import numpy as np

from microtile._common._checks import as_float_array
from microtile.nn._init import as_generator
from microtile.nn._loss import MSELoss
from microtile.nn._module import Module, check_int, eval_in_this_thread
from microtile.nn._progress import Progress
from microtile.nn.lr_scheduler import ReduceLROnPlateau
from microtile.sparse._format import is_sparse

_INTP = np.dtype(np.intp)


def _model_dtype(model, X):
    if isinstance(model, Module):
        dt = model.dtype      # a BatchNorm without affine parameters has one too
        return X.dtype if dt is None else dt
    params = model.parameters() if callable(getattr(model, "parameters", None)) else []
    return params[0].dtype if params else X.dtype


def _set_training(model, training):
    """``model.train(training)`` for anything that has modes (a duck-typed layer may not)."""
    if callable(getattr(model, "train", None)):
        model.train(training)


def _sparse_rows(model, X, what):
    """A scipy.sparse ``X`` as CSR in the model's dtype (converted once, never densified):
    row batches are then slices and fancy row indexing of it."""
    if X.ndim != 2:
        raise ValueError(f"{what}: a sparse X must be 2-D, got shape {X.shape}")
    if np.dtype(X.dtype).kind != "f" or np.dtype(X.dtype).itemsize not in (4, 8):
        raise TypeError(f"{what}: unsupported dtype {X.dtype}; microtile computes in float32 "
                        "and float64")
    return X.tocsr().astype(_model_dtype(model, X), copy=False)


def _prepare(model, X, y, what, loss=None):
    if is_sparse(X):
        X = _sparse_rows(model, X, f"{what} X")
    else:
        X = as_float_array(X, f"{what} X")
        if X.ndim == 0:
            raise ValueError(f"{what}: X must have a sample dimension, got a scalar")
        X = np.ascontiguousarray(X, dtype=_model_dtype(model, X))
    dt = X.dtype
    y = np.asarray(y)
    if y.ndim == 0 or y.shape[0] != X.shape[0]:
        raise ValueError(f"{what}: X has {X.shape[0]} samples but y has shape {y.shape}")
    if y.dtype.kind in "iu" and not isinstance(loss, MSELoss):
        y = np.ascontiguousarray(y, dtype=_INTP)
        labels = True
    else:
        if y.dtype.kind not in "iu":
            y = as_float_array(y, f"{what} y")
        y = np.ascontiguousarray(y, dtype=dt)
        labels = False
    return X, y, labels


def _backward(model, grad):
    if isinstance(model, Module):
        model.backward(grad, need_input_grad=False)
    else:
        model.backward(grad)


class _Accuracy:
    """Counts argmax hits into reused buffers (for (N, C) outputs and integer labels)."""

    def __init__(self):
        self._pred = {}

    def hits(self, out, labels):
        if out.ndim != 2 or out.shape[1] < 2:
            return None
        n = out.shape[0]
        pred = self._pred.get(n)
        if pred is None:
            pred = self._pred[n] = np.empty(n, _INTP)
        np.argmax(out, axis=1, out=pred)
        return int(np.count_nonzero(pred == labels))


def _evaluate(model, loss, X, y, labels, batch_size, acc):
    """``(loss summed over the samples, hits or None)`` over ``(X, y)``."""
    n = X.shape[0]
    total = 0.0
    hits = 0 if labels else None
    for start in range(0, n, batch_size):
        xb = X[start:start + batch_size]
        yb = y[start:start + batch_size]
        out = model.forward(xb)
        total += loss.forward(out, yb) * xb.shape[0]
        if hits is not None:
            h = acc.hits(out, yb)
            hits = None if h is None else hits + h
    return total, hits


def _data_parallel(model):
    """The model when it is a ``microtile.distributed.DistributedDataParallel`` of more
    than one rank (fit then coordinates with the other ranks), else None.  Duck-typed, so
    that nn never imports mpi4py."""
    size = getattr(model, "_dist_size", None)
    return model if isinstance(size, int) and size > 1 else None


def _batches(n, batch_size, rank=0, size=1):
    """``[(start, stop, step_samples, step_end), ...]``: this rank's batches as positions
    in the epoch's order, each with the number of samples of its whole step (all ranks)
    and the position where that step ends.

    Step t covers positions [t * P * B, (t + 1) * P * B) (P ranks, B = ``batch_size``) and
    rank r takes the r-th of P slices of it: B positions each or, in a last, shorter step
    of R positions, R // P and one more for the first R % P ranks (a rank gets none when
    R < P).  With P = 1 these are the batches of B.
    """
    out = []
    per_step = batch_size * size
    for first in range(0, n, per_step):
        r = min(per_step, n - first)
        base, extra = divmod(r, size)
        start = first + rank * base + min(rank, extra)
        out.append((start, start + base + (rank < extra), r, first + r))
    return out


def _over_ranks(dist, total, hits, count):
    """``(total, hits, count)`` summed over every rank; hits None when any rank's is."""
    s = dist._sum_over_ranks([total, 0 if hits is None else hits, count, hits is None])
    return float(s[0]), (None if s[3] else int(s[1])), int(s[2])


def _callback_list(callbacks):
    """``callbacks`` as a list (one callback object on its own is accepted too)."""
    if callbacks is None:
        return []
    if hasattr(callbacks, "on_epoch_end") or hasattr(callbacks, "set_model"):
        callbacks = [callbacks]
    try:
        callbacks = list(callbacks)
    except TypeError:
        raise TypeError(f"fit: callbacks must be an iterable of callback objects, got "
                        f"{type(callbacks).__name__}") from None
    for i, cb in enumerate(callbacks):
        for name in ("on_epoch_end", "set_model"):
            method = getattr(cb, name, None)
            if method is not None and not callable(method):
                raise TypeError(f"fit: callbacks[{i}].{name} is not callable")
    return callbacks


def _scheduler_step(scheduler, logs):
    """One epoch's scheduler step: a plateau schedule gets the validation loss when there
    is one, else the training loss."""
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step(logs["val_loss"] if "val_loss" in logs else logs["loss"])
    else:
        scheduler.step()


def fit(model, loss, optimizer, X, y, *, epochs=1, batch_size=32, shuffle=True, rng=None,
        progress=True, validation=None, scheduler=None, callbacks=()):
    """Train ``model`` with mini-batches of ``(X, y)``.

    Each step: ``optimizer.zero_grad()``, ``model.forward``, ``loss.forward``,
    ``model.backward(loss.backward())``, ``optimizer.step()``.  The steps run in training
    mode (``model.train()`` at the start of every epoch, so the model is left in training
    mode, as after a torch training loop) and the validation in eval mode (as ``predict``
    does it, without touching the flags).

    After each epoch (and its validation): ``scheduler.step()``, then every callback's
    ``on_epoch_end``.

    With a ``microtile.distributed.DistributedDataParallel`` model on P ranks (every rank
    calls ``fit`` with the same arguments), ``batch_size`` is per rank: each step covers
    P * ``batch_size`` samples of the epoch's order (rank 0's, the same on every rank) and
    each rank trains on its slice of them; a last, shorter step is split as evenly as
    possible (a rank may get none) and every rank's gradient is weighted by its share of
    the step's samples, so the step is the one a single process would take with batch
    P * ``batch_size``.  The history holds the figures over all ranks' samples (the
    validation set is split between the ranks), the same on every rank; progress is
    shown (or reported) on rank 0 only, with rank 0's own running figures; rank 0's
    buffers are copied into every rank at the end of each epoch; the ranks stop together
    when any rank's callback asks.

    Parameters
    ----------
    model : layer (usually a Sequential)
    loss : CrossEntropyLoss, MSELoss or an object with ``forward(pred, target)``/``backward()``
    optimizer : SGD, Adam, AdamW, AdaGrad, RMSprop (anything with ``zero_grad``/``step``)
    X : array_like, (N, ...), or scipy.sparse (N, F)
        Converted once to the model's dtype.  A sparse X is converted to CSR once and its
        row batches are sliced from it, never densified (the first layer must take sparse
        input: a ``Linear``).
    y : array_like, (N, ...)
        Integer class labels (then accuracy is reported) or float targets (integers too,
        with MSELoss).
    epochs : int
    batch_size : int
        The last batch of an epoch holds the remainder when N is not a multiple.  Per rank
        under data parallelism (above).
    shuffle : bool
        Visit the samples in a new random order each epoch.
    rng : numpy.random.Generator, int or None
        Source of the shuffling.
    progress : bool or callable
        True: show a progress bar on stderr when it is a terminal.  A callable is called as
        ``progress(epoch, batch, n_batches, logs)`` after each batch (``epoch`` and ``batch``
        count from 0; ``logs`` holds the epoch's running ``loss`` and ``accuracy`` so far),
        and once more at the end of each epoch with ``batch == n_batches`` and the epoch's
        figures (validation ones included).
    validation : (Xv, yv) or None
        Evaluated after each epoch.
    scheduler : learning-rate scheduler or None
        Stepped once per epoch: ``ReduceLROnPlateau`` with the epoch's ``val_loss`` when
        there is validation data, else its ``loss``; any other with ``step()``.
    callbacks : iterable of objects
        Each may have ``set_model(model)``, called before training, and
        ``on_epoch_end(epoch, logs)``, called after each epoch (after the scheduler) with
        the epoch's figures (``logs`` has the history's keys); a true return stops training
        after that epoch (every callback still sees it).  See ``EarlyStopping``.

    Returns
    -------
    dict
        Lists with one entry per epoch run: ``"loss"`` (mean training loss over the epoch's
        samples), ``"accuracy"`` for integer labels, ``"val_loss"`` and ``"val_accuracy"``
        with ``validation``.
    """
    epochs = check_int(epochs, "epochs", "fit", 0)
    batch_size = check_int(batch_size, "batch_size", "fit", 1)
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise TypeError(f"fit: scheduler must have a step method, got "
                        f"{type(scheduler).__name__}")
    callbacks = _callback_list(callbacks)
    report = progress if callable(progress) else None
    X, y, labels = _prepare(model, X, y, "fit", loss)
    n = X.shape[0]
    if n == 0:
        raise ValueError("fit: X has no samples")
    if validation is not None:
        try:
            Xv, yv = validation
        except (TypeError, ValueError):
            raise ValueError("fit: validation must be a pair (X, y)") from None
        Xv, yv, vlabels = _prepare(model, Xv, yv, "fit validation", loss)
        if Xv.shape[0] == 0:
            raise ValueError("fit: validation set has no samples")
    dist = _data_parallel(model)
    rank, size = (dist._dist_rank, dist._dist_size) if dist is not None else (0, 1)
    if dist is not None:
        # Every step is a collective: ranks that disagree on these would wait forever.
        dist._check_same("fit", {
            "samples": n, "batch_size": batch_size, "epochs": epochs,
            "shuffle": bool(shuffle), "integer labels": labels,
            "validation samples": None if validation is None else Xv.shape[0]})
        if validation is not None:
            # Each rank evaluates its own slice of the validation set.
            vstart, vstop, _, _ = _batches(Xv.shape[0], -(-Xv.shape[0] // size), rank,
                                           size)[0]
            Xv, yv = Xv[vstart:vstop], yv[vstart:vstop]
        if rank != 0:
            report = None           # only rank 0 shows progress
            progress = False
    gen = as_generator(rng)
    history = {"loss": []}
    if labels:
        history["accuracy"] = []
    if validation is not None:
        history["val_loss"] = []
        if vlabels:
            history["val_accuracy"] = []
    acc = _Accuracy()
    bar = Progress(n, epochs, enabled=bool(progress) if report is None else False)
    batches = _batches(n, batch_size, rank, size)
    n_batches = len(batches)
    for cb in callbacks:
        if getattr(cb, "set_model", None) is not None:
            cb.set_model(model)
    order = np.arange(n, dtype=_INTP)
    xbufs, ybufs = {}, {}
    for epoch in range(epochs):
        if shuffle:
            gen.shuffle(order)
            if dist is not None:
                # Rank 0's order on every rank: the shards stay disjoint even when the
                # ranks were given different generators (or none).
                dist._broadcast_array(order)
        bar.start_epoch(epoch)
        _set_training(model, True)
        total = 0.0
        hits = 0 if labels else None
        seen = 0
        for b, (start, stop, step_samples, step_end) in enumerate(batches):
            m = stop - start
            if m == 0:
                # No samples for this rank in this step: it still takes part in the step's
                # collectives (with a zero gradient) and steps with the others' average.
                optimizer.zero_grad()
                dist._empty_step()
                optimizer.step()
                continue
            if shuffle and is_sparse(X):
                idx = order[start:stop]
                xb = X[idx]             # a new CSR batch of those rows
                yb = np.take(y, idx, axis=0)
            elif shuffle:
                idx = order[start:stop]
                xb = xbufs.get(m)
                if xb is None:
                    xb = xbufs[m] = np.empty((m,) + X.shape[1:], X.dtype)
                    ybufs[m] = np.empty((m,) + y.shape[1:], y.dtype)
                yb = ybufs[m]
                np.take(X, idx, axis=0, out=xb)
                np.take(y, idx, axis=0, out=yb)
            else:
                xb = X[start:stop]
                yb = y[start:stop]
            optimizer.zero_grad()
            out = model.forward(xb)
            value = loss.forward(out, yb)
            if dist is None:
                _backward(model, loss.backward())
            else:
                # The loss is a mean over this rank's m samples: weighted by m over the
                # step's samples, the ranks' sum is the mean over the whole step.
                dist._weighted_backward(loss.backward(), m / step_samples)
            optimizer.step()
            total += value * m
            seen += m
            if hits is not None:
                h = acc.hits(out, yb)
                hits = None if h is None else hits + h
            # Under data parallelism (rank 0): all ranks' samples done, rank 0's figures.
            bar.update(step_end, total / seen, None if hits is None else hits / seen)
            if report is not None:
                running = {"loss": total / seen}
                if labels:
                    running["accuracy"] = hits / seen if hits is not None else float("nan")
                report(epoch, b, n_batches, running)
        if dist is not None:
            total, hits, _ = _over_ranks(dist, total, hits, seen)
            # Rank 0's running statistics on every rank: the validation below, the state
            # a callback saves and the model fit leaves are then the same everywhere.
            dist._sync_buffers()
        history["loss"].append(total / n)
        if labels:
            history["accuracy"].append(hits / n if hits is not None else float("nan"))
        extra = ""
        if validation is not None:
            with eval_in_this_thread():
                vl, va = _evaluate(model, loss, Xv, yv, vlabels, max(batch_size, 256), acc)
            nv = Xv.shape[0]
            if dist is not None:
                vl, va, nv = _over_ranks(dist, vl, va, nv)
            vl /= nv
            va = None if va is None else va / nv
            history["val_loss"].append(vl)
            extra = f" val_loss {vl:.4f}"
            if vlabels:
                history["val_accuracy"].append(va if va is not None else float("nan"))
                if va is not None:
                    extra += f" val_acc {va:.4f}"
        bar.end_epoch(n, total / n, None if hits is None else hits / n, extra)
        logs = {key: values[-1] for key, values in history.items()}
        if report is not None:
            report(epoch, n_batches, n_batches, dict(logs))
        if scheduler is not None:
            _scheduler_step(scheduler, logs)
        halt = False
        for cb in callbacks:
            on_epoch_end = getattr(cb, "on_epoch_end", None)
            # Every callback sees the epoch, even after one has asked to stop.
            if on_epoch_end is not None and on_epoch_end(epoch, dict(logs)):
                halt = True
        if dist is not None:
            halt = dist._any_over_ranks(halt)       # the ranks stop together
        if halt:
            break
    return history


def predict(model, X, batch_size=256):
    """The model's outputs for every sample of ``X``, computed ``batch_size`` at a time,
    in eval mode.

    Eval mode holds for this call in this thread only (``eval_in_this_thread``): the
    layers' ``training`` flags are never changed, so the model is left in the mode it was
    found in and other threads (another ``predict``, a ``fit``) are not affected.

    Parameters
    ----------
    model : layer
    X : array_like, (N, ...), or scipy.sparse (N, F)
        Converted to the model's dtype; a sparse X to CSR, sliced in row batches without
        densifying.
    batch_size : int

    Returns
    -------
    ndarray
        (N, ...) outputs (a new array, not a layer buffer).
    """
    batch_size = check_int(batch_size, "batch_size", "predict", 1)
    if is_sparse(X):
        X = _sparse_rows(model, X, "predict X")
    else:
        X = as_float_array(X, "X")
        if X.ndim == 0:
            raise ValueError("predict: X must have a sample dimension, got a scalar")
        X = X.astype(_model_dtype(model, X), copy=False)
    n = X.shape[0]
    with eval_in_this_thread():
        if n == 0:
            return np.array(model.forward(X), copy=True)
        result = None
        for start in range(0, n, batch_size):
            out = model.forward(X[start:start + batch_size])
            if result is None:
                result = np.empty((n,) + out.shape[1:], out.dtype)
            result[start:start + out.shape[0]] = out
    return result
