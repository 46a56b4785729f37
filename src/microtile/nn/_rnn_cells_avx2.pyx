"""LSTM/GRU step items compiled with AVX2 and FMA (see ``_rnn_cells.pxd``); imported only
when the kernel set ``avx2-fma`` is available."""
from microtile.nn._rnn_cells cimport *
include "_rnn_cells.pxi"
