"""The search machinery: races, correctness gates, thresholds and candidate generation."""
import math

import numpy as np
import pytest

import microtile
from autotune import (blocking_search, conv_search, measure, plan, probes, sparse_search,
                      thresholds, tuning)

ISA = microtile.get_config()["isa"]


def test_problem_checks_against_float64():
    p = measure.Problem(37, 29, 301, "float32", seed=3)
    assert measure.check(p, {"threads": 1, "mc": 12, "kc": 64, "nc": 32}) <= 1.0
    p.out[5, 7] += 2 * p.bound[5, 7]                   # one element beyond the bound
    assert p.error() > 1.0
    p.out[0, 0] = np.nan
    assert p.error() == math.inf


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_odd_blockings_still_compute_correctly(dtype):
    p = measure.Problem(67, 131, 97, dtype, seed=1)
    for cand in ({"mc": 6, "kc": 16, "nc": 16}, {"mc": 4096, "kc": 2048, "nc": 4096},
                 {"mc": 18, "kc": 40, "nc": 48, "split": "jc", "threads": 2, "thread_mnk": 0},
                 {"nopack_mnk": 1 << 40}, {"nopack_a_panels": 1 << 10, "nopack_mnk": 0}):
        assert measure.check(p, cand) <= 1.0, cand


def fake_race(speeds, errors=None, **kw):
    """Race candidates whose samples are their speed times deterministic noise."""
    rng = np.random.default_rng(0)
    cands = [{"id": i} for i in range(len(speeds))]
    calls = {i: 0 for i in range(len(speeds))}

    def sample(c):
        calls[c["id"]] += 1
        return speeds[c["id"]] * (1 + 0.03 * rng.standard_normal())

    def check(c):
        return (errors or {}).get(c["id"], 0.5)

    res = measure.race(cands, sample, check, **kw)
    return res, calls


def test_race_picks_the_fastest_and_stops_timing_the_slow():
    res, calls = fake_race([50, 80, 100, 98, 20], rounds=6)
    assert res.winner == {"id": 2} or res.winner == {"id": 3}
    assert calls[4] == 2 and calls[0] == 2             # dropped after two rounds
    assert calls[2] > calls[4]
    assert measure.key({"id": 4}) in res.dropped and measure.key({"id": 0}) in res.dropped


def test_a_wrong_result_never_wins():
    res, calls = fake_race([50, 500, 60], errors={1: 3.0}, rounds=3)
    assert res.winner == {"id": 2}
    assert calls[1] == 0                              # never timed at all
    assert [s["error_ratio"] for s in res.summary()][1] == 3.0


def test_no_correct_candidate_means_no_winner():
    res, _ = fake_race([1, 2], errors={0: math.inf, 1: 2.0}, rounds=2)
    assert res.winner is None


def test_race_respects_the_deadline_after_two_rounds():
    res, calls = fake_race([10, 11, 12], rounds=50, deadline=0.0)
    assert max(calls.values()) <= 2 + 2                # two rounds, then only the extras


def spell_race(speeds, anchor, **kw):
    """A race whose samples are slowed by 35 % two thirds of the time, in spells of five
    consecutive calls, as another VM on the host slows this one; otherwise exact."""
    cands = [{"id": i} for i in range(len(speeds))]
    n = [0]

    def sample(c):
        n[0] += 1
        return speeds[c["id"]] * (0.65 if (n[0] // 5) % 3 else 1.0)

    return measure.race(cands, sample, lambda c: 0.5, prune=0.0, seed=3,
                        anchor=anchor and cands[anchor - 1], **kw)


def test_anchored_race_cancels_spells_of_load():
    speeds = [100, 103, 97, 90, 101.5]
    plain = spell_race(speeds, anchor=None, rounds=9, extra_rounds=0)
    assert plain.winner != {"id": 1}                   # the spells fool an unanchored race
    res = spell_race(speeds, anchor=1, rounds=9, extra_rounds=0)
    ranked = [c["id"] for c in res.ranking()]
    assert ranked == sorted(range(5), key=lambda i: -speeds[i])
    anchor_score = res.score({"id": 0})
    for i, v in enumerate(speeds[1:], 1):              # ratios to the anchor, within 1 %
        assert abs(res.score({"id": i}) / anchor_score - v / 100) < 0.01
    summary = res.summary()
    assert "ratio" not in summary[0] and abs(summary[1]["ratio"] - 1.03) < 0.01
    assert summary[0]["samples"] > summary[1]["samples"]   # timed beside every sample


def test_a_wrong_anchor_leaves_the_race_unanchored():
    cands = [{"id": 0}, {"id": 1}]
    res = measure.race(cands, lambda c: 10.0 + c["id"], lambda c: 5.0 - 5 * c["id"],
                       rounds=2, anchor=cands[0])
    assert res.anchor is None and res.winner == {"id": 1}


def test_best_cut():
    # Threads lose below the 4th size and win from there on.
    assert tuning.best_cut([0.5, 0.7, 0.9, 1.3, 1.6, 1.8], favour_low=False) == 3
    # One noisy point does not move the threshold.
    assert tuning.best_cut([0.5, 0.7, 1.05, 0.9, 1.3, 1.6, 1.8], favour_low=False) == 4
    assert tuning.best_cut([2.0, 1.5, 1.2, 0.9, 0.8], favour_low=True) == 3
    assert tuning.best_cut([0.8, 0.9], favour_low=True) == 0            # never
    assert tuning.best_cut([1.2, 1.3], favour_low=False) == 0           # always


def test_neighbours_are_legal_and_distinct():
    centre = {"mc": 96, "kc": 256}
    ns = blocking_search.neighbours(centre, 1.5, 6)
    assert len(ns) == 6
    for c in ns:
        assert c["mc"] % 6 == 0 and c["kc"] % blocking_search.KC_STEP == 0 and c != centre
    assert {"mc": 144, "kc": 256} in ns and {"mc": 96, "kc": 384} in ns
    assert {"mc": 144, "kc": 168} in ns                # same footprint, other shape
    tiny = blocking_search.neighbours({"mc": 6, "kc": 16}, 1.1, 6)
    assert all(c != {"mc": 6, "kc": 16} for c in tiny)


def test_blocking_search_moves_towards_a_better_point(monkeypatch):
    """With measurements replaced by a smooth landscape peaking at mc=144, kc=256, the
    local search walks there from the model's point."""
    def speed(c):
        return 100 * math.exp(-math.log(c["mc"] / 144) ** 2 - math.log(c["kc"] / 256) ** 2)

    monkeypatch.setattr(measure, "gflops", lambda prob, ov, min_seconds=0: speed(ov))
    monkeypatch.setattr(measure, "check", lambda prob, ov: 0.1)
    monkeypatch.setattr(measure, "Problem", lambda *a, **k: type(
        "P", (), {"m": 1, "n": 1, "k": 1})())
    t = tuning.Tuning("float32", 6, 16, 1, quick=False)
    best = blocking_search.search_blocking(t, [{"mc": 582, "kc": 168}], 4096)
    assert speed(best) > 0.97 * 100
    assert t.evidence["blocking"]["chosen"] == best


def test_thresholds_from_sweeps(monkeypatch):
    """thread_mnk from a speed-up curve that crosses 1 between 48^3 and 64^3."""
    def gflops(prob, ov, min_seconds=0):
        n = prob.m
        if ov.get("threads", 1) == 1:
            return 50.0
        return 50.0 * (0.6 if n <= 48 else 1.6)

    monkeypatch.setattr(measure, "gflops", gflops)
    t = tuning.Tuning("float64", 6, 8, 2, quick=True)
    value = thresholds.search_thread_mnk(t, {"mc": 72, "kc": 256, "nc": 1024}, "auto")
    assert 48 ** 3 < value < 64 ** 3


def test_sweep_refuses_wrong_results(monkeypatch):
    monkeypatch.setattr(measure, "check", lambda prob, ov: 5.0)
    t = tuning.Tuning("float32", 6, 16, 1, quick=True)
    with pytest.raises(RuntimeError, match="wrong result"):
        thresholds.search_nopack(t, {"mc": 96, "kc": 256, "nc": 1024}, 64 ** 3)


def test_fma_peak_and_parallel_efficiency_run():
    # Only that they run: on a shared machine the 2-thread figure can be anything.
    assert probes.fma_peak(ISA, "float32", 1, seconds=0.01, repeats=1) > 0
    assert probes.fma_peak(ISA, "float64", 2, seconds=0.01, repeats=1) > 0
    assert probes.parallel_efficiency(ISA, 1) == 1.0


def test_conv_reference_matches_a_direct_loop():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 5, 4))
    w = rng.standard_normal((3, 2, 3, 3))
    ref, bound = conv_search.conv_reference(x, w, 1)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    direct = np.zeros((1, 3, 5, 4))
    for k in range(3):
        for p in range(5):
            for q in range(4):
                direct[0, k, p, q] = np.sum(xp[0, :, p:p + 3, q:q + 3] * w[k])
    np.testing.assert_allclose(ref, direct, rtol=1e-12, atol=1e-12)
    assert (bound >= np.abs(ref) - 1e-12).all()


def test_conv_chunk_search_refuses_a_wrong_candidate(monkeypatch):
    """The step's plumbing, with a NumPy convolution standing in for microtile.conv2d so that
    one candidate can be made wrong: correct results race, a wrong one is refused."""
    from microtile._config import _context as _config

    def conv(x, w, padding=0):
        ws = _config.get_option("conv_chunk")
        y = conv_search.conv_reference(x, w, padding)[0].astype(np.float32)
        if ws == 1 << 20:
            y[0, 0, 0, 0] += 1.0                       # a broken chunking path
        return y

    t = tuning.Tuning("float32", 1, 1, 1, quick=True)
    value = conv_search.search_conv_chunk(t, conv, 2 << 20, shape=(1, 2, 6, 6, 3, 3))
    assert value != 1 << 20
    rows = {r["candidate"]["conv_chunk"]: r for r in t.evidence["conv_chunk"]["results"]}
    assert rows[1 << 20]["error_ratio"] > 1 and rows[2 << 20]["error_ratio"] <= 1


def test_conv_chunk_search_with_the_real_conv2d():
    import microtile
    t = tuning.Tuning("float32", 1, 1, 1, quick=True)
    value = conv_search.search_conv_chunk(t, microtile.conv2d, 2 << 20,
                                          shape=(2, 4, 9, 9, 5, 3))
    assert value in {r["candidate"]["conv_chunk"] for r in t.evidence["conv_chunk"]["results"]}
    assert all(r["error_ratio"] <= 1 for r in t.evidence["conv_chunk"]["results"])


def test_thread_sweep_under_load_keeps_the_default(monkeypatch):
    """Another process holding a core makes threads lose even at 256^3: the step measures
    again, then gives up and the default stays (recorded as such)."""
    def gflops(prob, ov, min_seconds=0):
        return 50.0 if ov.get("threads", 1) == 1 else 5.0

    monkeypatch.setattr(measure, "gflops", gflops)
    checks = []
    t = tuning.Tuning("float64", 6, 8, 2, quick=True,
                      quiet=lambda par: checks.append(par) or (1.0, 1.0))
    assert thresholds.search_thread_mnk(t, {"mc": 72, "kc": 256, "nc": 1024}, "auto") is None
    assert t.evidence["thread_mnk"]["contaminated"]
    assert checks                                      # it waited for the cores once


def test_busy_cores_skip_thread_decisions(monkeypatch):
    called = []
    def blocking(t, seeds, nc):
        t.evidence["blocking"] = {"finalists": [{"mc": 96, "kc": 256}]}
        return {"mc": 96, "kc": 256}

    monkeypatch.setattr(blocking_search, "search_blocking", blocking)
    ncs = []
    monkeypatch.setattr(blocking_search, "search_nc", lambda t, block, nc, n: ncs.append(n) or nc)
    monkeypatch.setattr(blocking_search, "search_joint", lambda *a: called.append(3))
    monkeypatch.setattr(thresholds, "search_nopack", lambda t, block, d: d)
    monkeypatch.setattr(thresholds, "search_nopack_a", lambda t, block, d: d)
    monkeypatch.setattr(thresholds, "search_split", lambda t, block: called.append(1) or "jc")
    monkeypatch.setattr(thresholds, "search_thread_mnk", lambda *a: called.append(2) or 1)
    t = tuning.Tuning("float32", 6, 16, 2, quick=True, quiet=lambda par: (0.95, 0.3))
    defaults = {"mc": 582, "kc": 168, "nc": 4096, "nopack_mnk": 64 ** 3,
                "thread_mnk": 96 ** 3, "nopack_a_panels": 4, "split": 0}
    chosen = plan.tune_dtype(t, dict(defaults), defaults)
    assert called == []
    assert chosen["split"] == "auto" and chosen["thread_mnk"] == 96 ** 3
    assert t.evidence["busy"] == ["joint", "split", "thread_mnk"]
    assert ncs == [1]                      # nc measured on one thread, not on busy cores


def test_noisy_sweep_keeps_the_default(monkeypatch):
    rng = np.random.default_rng(0)
    monkeypatch.setattr(measure, "gflops",
                        lambda prob, ov, min_seconds=0: 50.0 * rng.choice([0.3, 1.0, 3.0]))
    t = tuning.Tuning("float32", 6, 16, 1, quick=True)
    assert thresholds.search_nopack(t, {"mc": 96, "kc": 256, "nc": 1024}, 64 ** 3) is None
    assert t.evidence["nopack_mnk"]["noisy"]


def test_split_thread_counts():
    assert thresholds.split_thread_counts(1) == []
    assert thresholds.split_thread_counts(2) == [2]
    assert thresholds.split_thread_counts(6) == [2, 4, 6]
    assert thresholds.split_thread_counts(64) == [2, 4, 8, 16, 32, 64]


def test_joint_verdict_weighs_one_and_all_threads(monkeypatch):
    """A blocking 2 % faster alone but 30 % slower on two threads (its blocks crowd the
    shared L3) loses to one that is good on both."""
    def gflops(prob, ov, min_seconds=0):
        lone = {480: 90.0, 144: 88.0, 582: 80.0}[ov["mc"]]
        shared = {480: 120.0, 144: 170.0, 582: 150.0}[ov["mc"]]
        return lone if ov["threads"] == 1 else shared

    monkeypatch.setattr(measure, "gflops", gflops)
    monkeypatch.setattr(measure, "check", lambda prob, ov: 0.1)
    monkeypatch.setattr(measure, "Problem", lambda *a, **k: type(
        "P", (), {"m": 1, "n": 1, "k": 1})())
    t = tuning.Tuning("float32", 6, 16, 2, quick=True)
    pick = blocking_search.search_joint(t, [{"mc": 480, "kc": 1024, "nc": 4096},
                                            {"mc": 144, "kc": 512, "nc": 4096}],
                                        {"mc": 582, "kc": 168, "nc": 4096})
    assert pick == {"mc": 144, "kc": 512, "nc": 4096}


def test_joint_verdict_sees_nc_on_the_wide_gemm(monkeypatch):
    """Two blockings alike on the square GEMM (where any nc >= n is the same) differ on the
    wide one: the narrow nc repacks A for every block of columns."""
    def gflops(prob, ov, min_seconds=0):
        if prob.n == blocking_search.WIDE[1] and ov["nc"] < 512:
            return 60.0
        return 100.0 + (ov["nc"] < 512)        # a hair faster on the square GEMM

    monkeypatch.setattr(measure, "gflops", gflops)
    monkeypatch.setattr(measure, "check", lambda prob, ov: 0.1)
    monkeypatch.setattr(measure, "Problem", lambda m, n, k, *a, **kw: type(
        "P", (), {"m": m, "n": n, "k": k})())
    t = tuning.Tuning("float64", 6, 8, 2, quick=True)
    pick = blocking_search.search_joint(t, [{"mc": 12, "kc": 768, "nc": 448},
                                            {"mc": 12, "kc": 512, "nc": 1024}],
                                        {"mc": 96, "kc": 256, "nc": 1024})
    assert pick == {"mc": 12, "kc": 512, "nc": 1024}
    assert [p[0] for p in t.evidence["joint"]["parts"]] == [[1024] * 3, [1024] * 3,
                                                            list(blocking_search.WIDE)]


# ---- sparse_density ----------------------------------------------------------------------

LADDER = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02)


@pytest.mark.parametrize("speedups,chosen", [
    ((0.3, 0.5, 0.8, 1.6, 3.0, 6.0), 0.1),        # wins from 0.1 down
    ((0.3, 0.5, 1.05, 1.6, 3.0, 6.0), 0.1),       # 5 % at 0.2 is inside the margin
    ((0.3, 0.5, 1.2, 1.6, 3.0, 6.0), 0.2),        # 20 % is not
    ((1.2, 1.5, 2.0, 3.0, 4.0, 5.0), 0.5),        # wins on the whole ladder
    ((0.1, 0.2, 0.3, 0.5, 0.8, 1.05), 0.0),       # nowhere by the margin: stay dense
    ((0.3, 0.5, 1.4, 0.95, 3.0, 6.0), 0.2),       # one noisy density does not cut it short
])
def test_choose_density_on_given_timings(speedups, chosen):
    assert sparse_search.choose_density(LADDER, speedups) == chosen
    # The order the ladder was measured in does not matter.
    assert sparse_search.choose_density(LADDER[::-1], speedups[::-1]) == chosen


def test_choose_density_margin_and_errors():
    assert sparse_search.choose_density((0.2, 0.1), (1.3, 2.0), margin=1.5) == 0.1
    assert sparse_search.choose_density((0.2, 0.1), (1.3, 2.0), margin=1.0) == 0.2
    with pytest.raises(ValueError, match="speed-ups"):
        sparse_search.choose_density((0.2, 0.1), (1.3,))


def fake_linear_speed(crossover):
    """measure.gflops for PrunedLinear problems: the dense forward at 100 GFLOP/s whatever
    the density, the sparse one at 100 * crossover / density (equal at ``crossover``)."""
    seen = []

    def gflops(prob, ov, min_seconds=0):
        seen.append((prob.density, ov["sparse_density"], ov["threads"]))
        if ov["sparse_density"] == 0.0:
            return 100.0
        return 100.0 * crossover / prob.density
    return gflops, seen


def test_sparse_density_search_on_given_timings(monkeypatch):
    """The step's plumbing with the real nn.Linear (both paths run and are checked against
    float64) and the clock replaced: sparse and dense equal at 0.2, so 0.1 (2x) is the
    largest density won by the margin."""
    gflops, seen = fake_linear_speed(0.2)
    monkeypatch.setattr(measure, "gflops", gflops)
    t = tuning.Tuning("float32", 1, 1, 2, quick=True)
    value = sparse_search.search_sparse_density(t, base={"mc": 48}, shapes=[(40, 33),
                                                                           (16, 70)],
                                                densities=(0.3, 0.2, 0.1, 0.05), batch=35)
    assert value == 0.1
    ev = t.evidence["sparse_density"]
    assert ev["densities"] == [0.3, 0.2, 0.1, 0.05] and ev["complete"]
    assert ev["speedup"]["40x33"] == [pytest.approx(0.667, abs=1e-3), 1.0, 2.0, 4.0]
    assert ev["chosen"] == 0.1 and ev["threads"] == 2
    assert {(d, s) for d, s, _ in seen} == {(d, s) for d in (0.3, 0.2, 0.1, 0.05)
                                            for s in (0.0, 1.0)}
    assert {th for _, _, th in seen} == {2}


def test_pruned_linear_problem_is_pruned_and_checked():
    p = sparse_search.PrunedLinear(30, 50, 40, seed=1)
    p.prune_to(0.2)
    assert (p.layer.weight.data != 0).sum() == round(0.2 * 30 * 50)
    for density_option in (0.0, 1.0):              # the dense and the sparse path
        assert measure.check(p, {"sparse_density": density_option}) <= 1.0
    p.out[2 * sparse_search.CHECK_STRIDE, 3] += 1e-3           # a checked row
    assert p.error() > 1.0
    p.prune_to(0.1)                               # further: the earlier pruning stays
    assert (p.layer.weight.data != 0).sum() == round(0.1 * 30 * 50)
    assert measure.check(p, {"sparse_density": 1.0}) <= 1.0


def test_sparse_density_search_refuses_a_wrong_sparse_path(monkeypatch):
    import microtile.nn._linear as linear_module
    real = linear_module.csr_product

    def wrong(scatter, indptr, indices, data, ncols, X, Y, alpha, beta):
        real(scatter, indptr, indices, data, ncols, X, Y, alpha, beta)
        Y[0, 0] += 1.0

    monkeypatch.setattr(linear_module, "csr_product", wrong)
    t = tuning.Tuning("float32", 1, 1, 1, quick=True)
    with pytest.raises(RuntimeError, match="wrong result"):
        sparse_search.search_sparse_density(t, shapes=[(20, 30)], densities=(0.1,), batch=8)


def test_sparse_density_search_keeps_the_default_when_noisy_or_out_of_time(monkeypatch):
    rng = np.random.default_rng(0)
    monkeypatch.setattr(measure, "gflops",
                        lambda prob, ov, min_seconds=0: 50.0 * rng.choice([0.3, 1.0, 3.0]))
    t = tuning.Tuning("float32", 1, 1, 1, quick=True)
    assert sparse_search.search_sparse_density(t, shapes=[(20, 30)], batch=8) is None
    assert t.evidence["sparse_density"]["noisy"]
    # Out of time after the first density, where sparse lost: nothing can be said.
    gflops, seen = fake_linear_speed(0.01)
    monkeypatch.setattr(measure, "gflops", gflops)
    t = tuning.Tuning("float32", 1, 1, 1, quick=True, hard_deadline=0.0)
    assert sparse_search.search_sparse_density(t, shapes=[(20, 30)], batch=8) is None
    assert t.evidence["sparse_density"]["densities"] == [0.5]
    assert not t.evidence["sparse_density"]["complete"]
    # The whole ladder measured and sparse lost everywhere: 0.0, pruned layers stay dense.
    t = tuning.Tuning("float32", 1, 1, 1, quick=True)
    assert sparse_search.search_sparse_density(t, shapes=[(20, 30)], batch=8) == 0.0
