"""LSTM/GRU step items for the baseline ISA (see ``_rnn_cells.pxd``)."""
include "_rnn_cells.pxi"
