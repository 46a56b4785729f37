"""The GEMM layer's pre-packed B entry (gemm_pack_b_full + gemm_prepacked, what the recurrent
layers' steps build on) against a float64 NumPy reference: odd sizes around the micro-tile,
edge tiles, strided operands, alpha/beta, both dtypes, both kernel sets, 1 and 2 threads."""
import numpy as np
import pytest

import microtile
from microtile import config_context
from microtile.linalg._gemm import _prepacked_gemm

from _helpers import FLOATS, assert_gemm, rand

ISAS = microtile.available_isas()
SIZES = (1, 7, 63, 65)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("threads", [1, 2])
def test_prepacked_matches_numpy(isa, dt, threads, rng):
    with config_context(isa=isa, threads=threads, thread_mnk=0):
        for m in SIZES:
            for n in SIZES:
                for k in SIZES:
                    a, b = rand(rng, (m, k), dt), rand(rng, (k, n), dt)
                    c = np.full((m, n), np.nan, dt)
                    _prepacked_gemm(a, b, c, 1.0, 0.0)    # beta 0: NaN in c not read
                    assert_gemm(c, a, b, what=f"{isa} {m}x{n}x{k} t{threads}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dt", FLOATS)
def test_prepacked_edge_tiles(isa, dt, rng):
    """Every m, n up to a few micro-tiles (each partial tile of 6x16/6x8/4x8/4x4)."""
    with config_context(isa=isa, threads=1):
        for k in (1, 5):
            for m in range(1, 14):
                for n in range(1, 34):
                    a, b = rand(rng, (m, k), dt), rand(rng, (k, n), dt)
                    c = np.empty((m, n), dt)
                    _prepacked_gemm(a, b, c, 1.0, 0.0)
                    assert_gemm(c, a, b, what=f"{isa} {m}x{n}x{k}")


@pytest.mark.parametrize("dt", FLOATS)
@pytest.mark.parametrize("threads", [1, 2])
def test_prepacked_strides_alpha_beta(dt, threads, rng):
    """A and B transposed or strided views (packing reads any strides), C a strided view
    updated with beta; alpha 0 reads neither operand."""
    with config_context(threads=threads, thread_mnk=0):
        m, n, k = 65, 63, 70
        a = rand(rng, (k, m), dt).T
        b = rand(rng, (2 * k, n), dt)[::2]
        big = rand(rng, (m, 2 * n), dt)
        c0 = big[:, ::2].copy()
        _prepacked_gemm(a, b, big[:, ::2], -0.5, 0.25)
        assert_gemm(big[:, ::2], a, b, -0.5, 0.25, c0, what="strided")
        a_nan = np.full((m, k), np.nan, dt)
        c = rand(rng, (m, n), dt)
        want = 2.0 * c
        _prepacked_gemm(a_nan, b, c, 0.0, 2.0)
        np.testing.assert_array_equal(c, want)


def test_prepacked_empty(rng):
    a, b = rand(rng, (3, 0), np.float32), rand(rng, (0, 4), np.float32)
    c = np.full((3, 4), 7.0, np.float32)
    _prepacked_gemm(a, b, c, 1.0, 0.0)
    np.testing.assert_array_equal(c, 0)
    _prepacked_gemm(rand(rng, (0, 5), np.float32), rand(rng, (5, 4), np.float32),
                    np.empty((0, 4), np.float32), 1.0, 0.0)
