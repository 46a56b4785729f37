# The cells of the LSTM and GRU time loops (``_rnn_kernels``), compiled twice from
# ``_rnn_cells.pxi``: here for the baseline ISA and in ``_rnn_cells_avx2`` with AVX2 and FMA.
# The float32 sigmoid and tanh that every gate element goes through vectorise 8 wide there:
# 1.2 against 4.5 ns an element (a loop over 32768, Zen3), most of an LSTM step's cell.
# ``_rnn_kernels`` takes the item function of the set its GEMM parameters name.
from microtile._common._typedefs cimport idx_t
from microtile._kernels._ukernel cimport kernel_set_t
from microtile._common._mt_pool cimport pool_item

# Gate blocks per cell at most (LSTM), and row groups per item at most: size the items'
# stack tiles (12 KiB of float32 with 6x16 tiles, 24 KiB of float64 with 6x8).
cdef enum:
    MAX_GATES = 4
    MAX_ITEM_GROUPS = 8

# Which cell an item applies.
cdef enum:
    LSTM_FWD = 0
    LSTM_BWD = 1
    GRU_FWD = 2
    GRU_BWD = 3
    DH0 = 4         # the last backward product: dh0 (+)= the tile

# The operands of one step's cell (row 0 of each block; rows are ``H`` or ``k*H`` long).
# Untyped so that one struct serves both dtypes; the functions cast to theirs.
ctypedef struct _step:
    void* g         # gate block (N, k*H): pre-activations in, activations out (forward)
    void* hn        # GRU: the n part of h W_hh^T + b_hh, kept for backward (N, H)
    void* hprev     # h_{t-1} (N, H)
    void* h         # h_t (N, H)
    void* cprev     # LSTM: c_{t-1}
    void* c         # LSTM: c_t
    void* dy        # output gradient of the step: row n at dy + n * dy_rs
    idx_t dy_rs
    void* dh        # carried dh (N, H)
    void* dc        # LSTM: carried dc (N, H)
    void* dgx       # gate gradients (N, k*H), and for the GRU those of the hidden side:
    void* dgh
    const void* b_hh  # GRU forward: b_hh (3H,) added to the product, or NULL
    idx_t H
    int act         # RNN: ACT_TANH or ACT_RELU


ctypedef struct _loop:
    const kernel_set_t* ks
    pool_item item      # the item function of ks's ISA
    int kind
    bint dbl
    int nq              # product tiles per block of units: the gates (forward) or 1 (backward)
    idx_t N, H
    idx_t k             # the product's depth: H (forward) or k*H (backward)
    idx_t kc            # depth of one pass of the micro-kernel (the GEMM params' kc)
    idx_t n_blocks      # blocks of nr units
    idx_t n_groups      # row groups of mr rows (the last may be partial)
    idx_t groups_per_item
    const void* bp      # the packed weight: block b's tile q at bp + (b * nq + q) * k * nr
    const void* e       # rows for the partial row group: output column q*H + j's weights
                        # at e + (q * H + j) * k
    const void* a       # the product's left operand (N, k), rows lda apart; NULL: no
    idx_t lda           # product this step (the tiles are zero)
    _step s


