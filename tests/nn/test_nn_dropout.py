"""Dropout: rate and scaling within binomial bounds, mask reused by backward, modes, errors.

The statistical checks use seeded generators, so they are deterministic; their bounds are
still derived from the distribution (not tuned to the seed): the number of zeroed elements
among n is Binomial(n, p), and Z = 6 standard deviations leave a chance below 1e-8 that a
correct implementation with some other seed would fail.
"""
import math
import os

import numpy as np
import pytest

from microtile import config_context, nn

Z = 6.0
N = 200_003      # past the kernels' single-thread cutoff, and prime


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rate_and_scaling(p, dtype):
    x = np.random.default_rng(1).uniform(0.5, 2.0, N).astype(dtype)
    d = nn.Dropout(p, rng=123)
    y = d(x)
    assert y.dtype == dtype and y.shape == x.shape
    dropped = y == 0
    k = int(dropped.sum())
    assert abs(k - N * p) <= Z * math.sqrt(N * p * (1 - p)), (k, N * p)
    # Every kept element is scaled by exactly 1 / (1 - p) (as torch, a product).
    scale = dtype(1.0 / (1.0 - p))
    np.testing.assert_array_equal(y[~dropped], x[~dropped] * scale)
    # The mean is preserved: var(y_i / x_i) = p / (1 - p) for a kept-or-dropped element.
    ratio = (y.astype(np.float64) / x).mean()
    assert abs(ratio - 1.0) <= Z * math.sqrt(p / (1 - p) / N) + 1e-6


def test_backward_reuses_the_forward_mask():
    rng = np.random.default_rng(2)
    x = rng.uniform(1, 2, (63, 7, 5))
    d = nn.Dropout(0.4, rng=5)
    y = d(x).copy()
    dy = rng.standard_normal(x.shape)
    dx = d.backward(dy)
    np.testing.assert_array_equal(dx, np.where(y == 0, 0.0, dy / 0.6))
    np.testing.assert_array_equal(dx == 0, y == 0)
    # A second backward (e.g. another loss) uses the same mask again.
    np.testing.assert_array_equal(d.backward(dy), dx)
    # The next forward draws a new mask.
    assert not np.array_equal(d(x) == 0, y == 0)
    assert d.backward(dy, need_input_grad=False) is None


def test_seeded_masks_repeat_and_buffers_are_reused():
    x = np.ones((17, 13))
    a, b = nn.Dropout(0.5, rng=9), nn.Dropout(0.5, rng=np.random.default_rng(9))
    ya = a(x)
    np.testing.assert_array_equal(ya, b(x))
    ya2 = a(x)
    assert ya2 is ya            # the layer's buffer: no allocation per step
    dx = a.backward(x)
    assert a.backward(x) is dx


def test_identity_in_eval_mode_and_at_p_zero():
    x = np.random.default_rng(3).standard_normal((4, 5))
    d = nn.Dropout(0.5, rng=0).eval()
    assert d(x) is x
    dy = np.ones((4, 5))
    assert d.backward(dy) is dy
    np.testing.assert_array_equal(nn.predict(nn.Dropout(0.9, rng=0), x), x)
    z = nn.Dropout(0.0, rng=0)
    assert z(x) is x and z.backward(dy) is dy


def test_p_one_zeroes_everything_but_nan_propagates():
    x = np.array([[1.0, np.nan, -np.inf, 3.0]])
    d = nn.Dropout(1.0, rng=0)
    y = d(x)
    np.testing.assert_array_equal(y, [[0.0, np.nan, np.nan, 0.0]])
    np.testing.assert_array_equal(d.backward(np.ones_like(x)), np.zeros_like(x))


def test_non_contiguous_input_same_as_contiguous():
    base = np.random.default_rng(4).standard_normal((9, 8, 7))
    for x in (base[:, ::2, ::-1], base.T, np.asfortranarray(base)):
        a, b = nn.Dropout(0.3, rng=1), nn.Dropout(0.3, rng=1)
        np.testing.assert_array_equal(a(x), b(np.ascontiguousarray(x)))
        dy = np.ones(x.shape)[:, ::-1]
        np.testing.assert_array_equal(a.backward(dy), b.backward(np.ascontiguousarray(dy)))


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_does_not_change_the_result(threads):
    x = np.random.default_rng(6).standard_normal(N)
    with config_context(threads=1):
        ref = nn.Dropout(0.5, rng=7)(x).copy()
    with config_context(threads=threads):
        np.testing.assert_array_equal(nn.Dropout(0.5, rng=7)(x), ref)


def test_in_a_model_with_fit():
    rng = np.random.default_rng(8)
    m = nn.Sequential(nn.Linear(4, 16, rng=0), nn.ReLU(), nn.Dropout(0.5, rng=1),
                      nn.Linear(16, 2, rng=2))
    X = rng.standard_normal((64, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    h = nn.fit(m, nn.CrossEntropyLoss(), nn.SGD(m.parameters(), lr=0.1), X, y, epochs=3,
               progress=False, rng=0)
    assert np.all(np.isfinite(h["loss"]))
    # predict is deterministic (eval mode), whatever the layer's mode.
    np.testing.assert_array_equal(nn.predict(m, X), nn.predict(m, X))


def test_errors():
    for bad in (-0.1, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="p must be between 0"):
            nn.Dropout(bad)
    for bad in ("0.5", None, True):
        with pytest.raises(TypeError):
            nn.Dropout(bad)
    with pytest.raises(TypeError):
        nn.Dropout(0.5, rng="seed")
    with pytest.raises(RuntimeError, match="before forward"):
        nn.Dropout().backward(np.ones(3))
    d = nn.Dropout()
    d(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        d.backward(np.ones((3, 2)))
    with pytest.raises(TypeError, match="int64"):
        d(np.ones(3, np.int64))
    assert repr(nn.Dropout(0.25)) == "Dropout(p=0.25)"
    assert nn.gradcheck(nn.Dropout(0.5).eval(), np.ones((2, 3)))


# -- the generator behind the masks (nn/_dropout_mask.h) --------------------------------------
# A mask's draws follow from one 64-bit key per forward and the element's position: blocks
# of MT_DROP_BLOCK elements each seed their own xoshiro256++ lanes.  These checks would
# catch a lane or block that repeats another, a bit that is stuck or biased, or a
# threshold off by more than rounding; bounds are Z standard deviations as above.

BLOCK = 4096


def _bits(key, n):
    from microtile.nn._act_kernels import dropout_bits
    return dropout_bits(key, n)


def test_draws_are_uniform_bit_by_bit_and_in_16_bins():
    n = 1 << 20
    r = _bits(12345, n)
    bits = (r[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    ones = bits.sum(axis=0)
    assert np.all(np.abs(ones - n / 2) <= Z * math.sqrt(n / 4)), ones
    # Chi-square over the top 4 bits, 15 degrees of freedom: P(chi2 > 68.0) = 1e-8
    # (scipy.stats.chi2.isf(1e-8, 15); the distribution is skewed, so not mean + Z sd).
    counts = np.bincount(r >> 28, minlength=16)
    chi2 = float(((counts - n / 16) ** 2 / (n / 16)).sum())
    assert chi2 <= 68.0, chi2


def test_blocks_lanes_and_keys_do_not_repeat_each_other():
    n = 64 * BLOCK
    r = _bits(7, n).astype(np.float64) / 2.0 ** 32 - 0.5
    blocks = r.reshape(64, BLOCK)
    # Correlation of every block with the next, and of each draw with the one 16 later
    # (the same lane one generator step on): about N(0, 1/m) when independent.
    for a, b in ((blocks[:-1].ravel(), blocks[1:].ravel()), (r[:-16], r[16:]),
                 (r[:-1], r[1:])):
        c = float(np.corrcoef(a, b)[0, 1])
        assert abs(c) <= Z / math.sqrt(a.size), c
    # Lanes: one step of the eight generators gives 16 consecutive draws, two per lane;
    # every pair of lanes is uncorrelated (a lane seeded like another would repeat it).
    lanes = r.reshape(-1, 8, 2)[:, :, 0]
    c = np.corrcoef(lanes.T)
    off_diag = c[~np.eye(8, dtype=bool)]
    assert np.all(np.abs(off_diag) <= Z / math.sqrt(lanes.shape[0])), off_diag
    # No two blocks and no two keys give the same draws.
    assert len({bytes(b) for b in _bits(7, n).reshape(64, BLOCK)}) == 64
    other = _bits(8, n).astype(np.float64) / 2.0 ** 32 - 0.5
    c = float(np.corrcoef(r, other)[0, 1])
    assert abs(c) <= Z / math.sqrt(n), c


def test_mask_is_the_draws_against_the_threshold():
    from microtile.nn._act_kernels import dropout_forward, dropout_threshold
    assert dropout_threshold(0.0) == 0 and dropout_threshold(0.5) == 1 << 31
    assert dropout_threshold(1.0) == 2 ** 32 and dropout_threshold(1 - 2.0 ** -34) == 2 ** 32
    assert dropout_threshold(1 - 2.0 ** -32) == 2 ** 32 - 1
    n = 3 * BLOCK + 17
    x = np.random.default_rng(0).standard_normal(n)
    for p in (0.1, 0.5, 0.93):
        t = dropout_threshold(p)
        y, keep = np.empty(n), np.empty(n, np.uint8)
        dropout_forward(x, y, keep, 99, t, 2.0)
        np.testing.assert_array_equal(keep, _bits(99, n) >= t)
        np.testing.assert_array_equal(y, np.where(keep == 1, x * 2.0, 0.0))
    # Threshold 2^32 (p within 2^-33 of 1): no draw reaches it, nothing is kept.
    y, keep = np.empty(n), np.ones(n, np.uint8)
    dropout_forward(x, y, keep, 99, 2 ** 32, 2.0)
    assert not keep.any() and not y.any()


@pytest.mark.parametrize("p", [0.001, 0.999])
def test_rate_at_extreme_p(p):
    x = np.ones(N, np.float32)
    y = nn.Dropout(p, rng=3)(x)
    k = int((y == 0).sum())
    assert abs(k - N * p) <= Z * math.sqrt(N * p * (1 - p)), (k, N * p)


def test_p_within_2_to_minus_33_of_one_drops_everything():
    # No 32-bit threshold keeps so few; keeping 2^-32 scaled by 1 / (1 - p) would put
    # huge values in the output (232x the input's mean at p = 1 - 1e-12).
    x = np.ones(N)
    for p in (1 - 1e-12, 1 - 2.0 ** -34):
        np.testing.assert_array_equal(nn.Dropout(p, rng=3)(x), 0.0)
    # Just below, the threshold is round(p 2^32) and the scale torch's 1 / (1 - p).
    p = 1 - 2.0 ** -20
    y = nn.Dropout(p, rng=3)(x)
    assert set(np.unique(y)) <= {0.0, 1.0 / (1.0 - p)}


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_more_threads_same_mask(threads):
    x = np.random.default_rng(6).standard_normal(N).astype(np.float32)
    with config_context(threads=1):
        ref = nn.Dropout(0.5, rng=7)(x).copy()
    with config_context(threads=threads):
        np.testing.assert_array_equal(nn.Dropout(0.5, rng=7)(x), ref)


def test_portable_build_draws_the_same_masks():
    """The AVX2 and the baseline builds of the generator give the same bits."""
    from microtile._kernels._dispatch import available_isas
    if "avx2-fma" not in available_isas():
        pytest.skip("this CPU has only the baseline build")
    x = np.ones(200003, np.float32)
    with config_context(isa="generic"):
        generic = nn.Dropout(0.5, rng=11)(x).copy()
    with config_context(isa="avx2-fma"):
        np.testing.assert_array_equal(nn.Dropout(0.5, rng=11)(x), generic)


def test_scalar_fallback_draws_the_same_bits(tmp_path):
    """The header's plain-C generator (compilers without vector types) against the one
    built here, compiled with the C compiler that built the package."""
    import shutil
    import subprocess
    import sysconfig
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip("no C compiler")
    import microtile.nn as pkg
    inc = os.path.dirname(pkg.__file__)
    src = tmp_path / "t.c"
    src.write_text(
        '#define MT_DROP_SCALAR 1\n#include "_dropout_mask.h"\n#include <stdio.h>\n'
        "int main(void) { uint32_t r[10000]; int i;\n"
        "  mt_drop_bits(77, 0, 10000, r);\n"
        '  for (i = 0; i < 10000; i++) printf("%u\\n", r[i]); return 0; }\n')
    exe = tmp_path / "t"
    subprocess.run([cc, "-O1", "-I", inc, str(src), "-o", str(exe)], check=True, timeout=120)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=60)
    got = np.array(out.stdout.split(), dtype=np.uint64).astype(np.uint32)
    np.testing.assert_array_equal(got, _bits(77, 10000))
