"""microtile.nn: small neural networks (MLPs, CNNs, recurrent networks) trained with backprop
on microtile's GEMM and convolution kernels.

Layers use torch's weight layouts and default initialisation, and the optimizers torch.optim's
update rules, so a model moves between the two with the same numbers::

    from microtile import nn
    model = nn.Sequential(nn.Linear(64, 128, rng=0), nn.ReLU(), nn.Linear(128, 10, rng=1))
    opt = nn.SGD(model.parameters(), lr=0.1, momentum=0.9)
    history = nn.fit(model, nn.CrossEntropyLoss(), opt, X, y, epochs=10, batch_size=64)
    labels = nn.predict(model, X_test).argmax(axis=1)

Modes: as in torch, ``model.train()`` and ``model.eval()`` set ``training`` on every layer
inside; BatchNorm (batch or running statistics) and Dropout (mask or identity) depend on it.
``fit`` trains in training mode; ``predict`` and ``fit``'s validation compute in eval mode
in their own thread without changing the flags.  ``state_dict`` holds parameters and
buffers (``running_mean``, ...) under torch's keys, so a torch state dict of the same
architecture loads as it is.

Arrays returned by a layer's ``forward``/``backward`` (and a loss's ``backward``) are that
layer's reusable buffers, overwritten by its next call with the same shapes in the same
thread: this is what keeps a training step free of allocations.  Copy what you want to keep;
``predict`` does.

Threads: a model (every layer, ``Sequential``, and the losses) may be called from several
threads at once.  Buffers and what ``forward`` saves for ``backward`` are kept per thread, so
each thread gets its own results and its ``backward`` follows its own last ``forward``;
``backward`` calls in several threads add their gradients into the shared ``.grad`` (under a
lock per parameter).  The weights are shared too: an optimizer step while another thread
runs the model changes the weights under it, so train in one thread at a time (serve
``predict`` from as many as you like).
"""
from microtile.nn._activation import (GELU, LeakyReLU, LogSoftmax, ReLU, Sigmoid, SiLU, Softmax,
                                      Tanh)
from microtile.nn._conv import Conv2d
from microtile.nn._dropout import Dropout
from microtile.nn._flatten import Flatten
from microtile.nn._gradcheck import gradcheck
from microtile.nn._linear import Linear
from microtile.nn._loss import CrossEntropyLoss, MSELoss
from microtile.nn._module import Module
from microtile.nn._norm import BatchNorm1d, BatchNorm2d
from microtile.nn._optimizers import SGD, AdaGrad, Adam, Optimizer, RMSprop
from microtile.nn._optimizers import AdamW
from microtile.nn._parameter import Parameter
from microtile.nn._persist import load, save
from microtile.nn._prune import prune
from microtile.nn._pool import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from microtile.nn._residual import Residual
from microtile.nn._rnn import GRU, LSTM, RNN, LastStep
from microtile.nn._sequential import Sequential
from microtile.nn._training import fit, predict
from microtile.nn._tune import tune
from microtile.nn._callbacks import EarlyStopping
from microtile.nn import lr_scheduler

__all__ = [
    "Module", "Parameter",
    "Linear", "Conv2d", "MaxPool2d", "AvgPool2d", "Flatten", "ReLU", "Sigmoid", "Tanh",
    "BatchNorm1d", "BatchNorm2d", "Dropout",
    "LeakyReLU", "GELU", "SiLU", "Softmax", "LogSoftmax", "AdaptiveAvgPool2d", "Residual",
    "Sequential",
    "RNN", "LSTM", "GRU", "LastStep",
    "CrossEntropyLoss", "MSELoss",
    "Optimizer", "SGD", "Adam", "AdaGrad", "RMSprop",
    "AdamW",
    "lr_scheduler",
    "EarlyStopping",
    "fit", "predict", "save", "load", "gradcheck", "prune", "tune",
]
