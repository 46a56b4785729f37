"""Callbacks for fit: objects told about each finished epoch, which may stop training.

The protocol (every method optional):

- ``set_model(model)``: called by ``fit`` before the first epoch (a callback that keeps
  weights, such as EarlyStopping, learns the model here and starts afresh);
- ``on_epoch_end(epoch, logs)``: called after each epoch (``epoch`` counts from 0; ``logs``
  holds the epoch's figures, the keys of fit's history: ``loss``, ``accuracy``,
  ``val_loss``, ``val_accuracy``).  A true return value stops training after this epoch.
"""
import math
from numbers import Real

import numpy as np

from microtile.nn._module import check_int


def _weights(model):
    """A copy of the model's state (parameters and buffers) and how to put it back."""
    if callable(getattr(model, "state_dict", None)) and callable(
            getattr(model, "load_state_dict", None)):
        return model.state_dict(), model.load_state_dict
    params = model.parameters()
    saved = [p.data.copy() for p in params]

    def restore(values):
        for p, v in zip(params, values):
            np.copyto(p.data, v)
    return saved, restore


class EarlyStopping:
    """Stop training when a figure has stopped improving.

    An epoch improves when its ``monitor`` figure is below the best so far minus
    ``min_delta`` (the first finite figure always improves; NaN never does).  Training stops
    after ``patience`` epochs in a row without improvement; with ``restore_best`` the model
    then gets back the weights (``state_dict``: parameters and buffers) it had at the end
    of the best epoch.  (When the epochs run out first, the model keeps its last weights,
    as Keras' callback does.)

    Parameters
    ----------
    monitor : str
        A key of fit's history: ``"val_loss"`` (needs ``validation=``), ``"loss"``, ...
    patience : int, >= 0
    min_delta : float, >= 0
    restore_best : bool

    Attributes
    ----------
    best : float
        The best figure so far (inf before the first epoch).
    best_epoch : int or None
    wait : int
        Epochs since the last improvement.
    stopped_epoch : int or None
        The epoch after which this callback stopped training.
    """

    def __init__(self, monitor="val_loss", patience=5, min_delta=0.0, restore_best=True):
        if not isinstance(monitor, str):
            raise TypeError(f"EarlyStopping: monitor must be a str, got {monitor!r}")
        self.monitor = monitor
        self.patience = check_int(patience, "patience", "EarlyStopping", 0)
        if isinstance(min_delta, bool) or not isinstance(min_delta, Real):
            raise TypeError(f"EarlyStopping: min_delta must be a number, got {min_delta!r}")
        self.min_delta = float(min_delta)
        if not (math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise ValueError(f"EarlyStopping: invalid min_delta {min_delta!r} (must be finite "
                             f"and >= 0)")
        self.restore_best = bool(restore_best)
        self._model = None
        self._reset()

    def _reset(self):
        self.best = math.inf
        self.best_epoch = None
        self.wait = 0
        self.stopped_epoch = None
        self._best_weights = None

    def set_model(self, model):
        """Watch ``model`` (called by ``fit`` before training); forgets any earlier run."""
        self._model = model
        self._reset()

    def on_epoch_end(self, epoch, logs):
        """Record the epoch's figure; True (stop) after ``patience`` epochs without
        improvement."""
        if self.monitor not in logs:
            raise ValueError(f"EarlyStopping: monitor {self.monitor!r} is not among the epoch's "
                             f"figures {sorted(logs)}" + (
                                 " (pass validation= to fit, or monitor 'loss')"
                                 if self.monitor.startswith("val_") else ""))
        value = float(logs[self.monitor])
        if value < self.best - self.min_delta:
            self.best = value
            self.best_epoch = epoch
            self.wait = 0
            if self.restore_best and self._model is not None:
                self._best_weights = _weights(self._model)
            return False
        self.wait += 1
        if self.wait < self.patience:
            return False
        self.stopped_epoch = epoch
        if self._best_weights is not None:
            saved, restore = self._best_weights
            restore(saved)
        return True
