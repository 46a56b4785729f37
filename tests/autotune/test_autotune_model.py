"""The cache model adapts to the machine: fake OS trees for several machines, synthetic and
recorded latency curves, and the reconciliation of the two."""
import os

import numpy as np
import pytest

from microtile._config import _blocking, _hwinfo
from autotune import probes

K, M = 1024, 1024 * 1024

# (level, type, size, ways, line, shared cpus); size None: the OS leaves the file empty.
MACHINES = {
    "server": [(1, "Data", 48 * K, 12, 64, 2), (1, "Instruction", 32 * K, 8, 64, 2),
               (2, "Unified", 1 * M, 16, 64, 2), (3, "Unified", 36 * M, 12, 64, 64)],
    "laptop": [(1, "Data", 32 * K, 8, 64, 2), (1, "Instruction", 32 * K, 8, 64, 2),
               (2, "Unified", 256 * K, 4, 64, 2), (3, "Unified", 8 * M, 16, 64, 8)],
    "aarch64": [(1, "Data", 64 * K, 4, 64, 1), (1, "Instruction", 64 * K, 4, 64, 1),
                (2, "Unified", 1 * M, 8, 64, 1)],
    "vm": [(1, "Data", None, None, None, None), (2, "Unified", None, None, None, None)],
}


def make_sysfs(root, caches):
    for i, (level, ctype, size, ways, line, shared) in enumerate(caches):
        d = root / "cpu0" / "cache" / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{ctype}\n")
        (d / "size").write_text(f"{size // K}K\n" if size else "\n")
        (d / "ways_of_associativity").write_text(f"{ways or 0}\n")
        (d / "coherency_line_size").write_text(f"{line or 0}\n")
        sets = size // (ways * line) if size and ways and line else 0
        (d / "number_of_sets").write_text(f"{sets}\n")
        (d / "shared_cpu_list").write_text(f"0-{shared - 1}\n" if shared else "\n")
    return str(root)


def read_machine(tmp_path, name):
    return _hwinfo.read_caches(make_sysfs(tmp_path / name, MACHINES[name]))


def model(caches, mr, nr, itemsize, cores=2):
    return _blocking.analytical_blocking(caches, mr, nr, itemsize, cores)


def test_sysfs_reader_keeps_data_and_unified_caches(tmp_path):
    caches = read_machine(tmp_path, "server")
    assert [(c["level"], c["type"], c["size"]) for c in caches] == [
        (1, "Data", 48 * K), (2, "Unified", M), (3, "Unified", 36 * M)]
    assert caches[0]["ways"] == 12 and caches[0]["sets"] == 64
    assert caches[2]["shared_cpus"] == 64


def test_vm_without_sizes_reads_as_unknown(tmp_path):
    caches = read_machine(tmp_path, "vm")
    assert [c["size"] for c in caches] == [None, None]
    assert all(c["ways"] is None and c["line"] is None for c in caches)
    assert _hwinfo.read_caches(str(tmp_path / "nothing-here")) == []


def test_size_from_geometry_when_the_size_file_is_missing(tmp_path):
    root = make_sysfs(tmp_path / "m", [(1, "Data", 64 * K, 4, 64, 1)])
    os.unlink(os.path.join(root, "cpu0", "cache", "index0", "size"))
    assert _hwinfo.read_caches(root)[0]["size"] == 64 * K


@pytest.mark.parametrize("mr,nr,size", [(6, 16, 4), (6, 8, 8), (4, 8, 4), (4, 4, 8)])
def test_model_adapts_to_each_machine(tmp_path, mr, nr, size):
    got = {name: model(read_machine(tmp_path, name), mr, nr, size) for name in MACHINES}
    # A bigger, more associative L1 gives a deeper kc; a bigger L2 a taller mc.
    assert got["server"]["kc"] > got["laptop"]["kc"]
    assert got["aarch64"]["kc"] > got["laptop"]["kc"]
    assert got["server"]["mc"] > got["laptop"]["mc"]
    assert got["aarch64"]["mc"] > got["laptop"]["mc"]
    # A VM that says nothing gets the conservative fallback geometry.
    assert got["vm"] == model([], mr, nr, size)
    for b in got.values():
        assert b["mc"] % mr == 0 and b["nc"] % nr == 0 and b["kc"] % 8 == 0
        assert _blocking.KC_MIN <= b["kc"] <= _blocking.KC_MAX
        # A's micro-panel and B's micro-panel together fit the L1 that was modelled.
        assert mr * b["kc"] * size <= 64 * K


def test_model_exact_values_for_the_laptop(tmp_path):
    caches = read_machine(tmp_path, "laptop")
    # L1 32 KiB 8-way, 6x16 floats: 7 / (1 + 16/6) = 1.9 ways for A's panel ->
    # kc = 1.9 * 4096 / 24 = 325 -> 320 (multiples of 32);
    # L2 256 KiB 4-way: B's panel takes 1 way, half of the 2 left go to A ->
    # mc = 65536 / (320 * 4) = 51 -> 48.
    assert model(caches, 6, 16, 4)["kc"] == 320
    assert model(caches, 6, 16, 4)["mc"] == 48
    # float64 6x8: 7 / (1 + 8/6) = 3 ways -> kc = 3 * 4096 / 48 = 256; mc = 65536 / 2048 = 32 -> 30.
    assert model(caches, 6, 8, 8)["kc"] == 256
    assert model(caches, 6, 8, 8)["mc"] == 30


def test_l3_shared_by_more_cores_shrinks_nc(tmp_path):
    caches = read_machine(tmp_path, "laptop")
    one = model(caches, 6, 8, 8, cores=1)["nc"]
    many = model(caches, 6, 8, 8, cores=8)["nc"]
    assert many < one


def test_macos_sysctl_fallback():
    values = {"hw.cachelinesize": 128, "hw.perflevel0.l1dcachesize": 128 * K,
              "hw.perflevel0.l2cachesize": 16 * M, "hw.l1dcachesize": 64 * K}
    caches = _hwinfo.read_caches_sysctl(values.get)
    assert [(c["level"], c["size"], c["line"]) for c in caches] == [
        (1, 128 * K, 128), (2, 16 * M, 128)]
    assert model(caches, 4, 8, 4)["kc"] > model([], 4, 8, 4)["kc"]
    assert _hwinfo.read_caches_sysctl(lambda name: None) == []


def test_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _hwinfo.cgroup_cpu_limit(str(tmp_path)) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _hwinfo.cgroup_cpu_limit(str(tmp_path)) is None


# ---- latency curves -------------------------------------------------------------------

def synthetic_curve(levels, mem_ns=80.0, max_bytes=128 * M, seed=0, noise=0.05):
    """Latency per size for caches ``[(size, ns)]``: a level's latency while the buffer
    fits, half-way (geometrically) one step past it, plus one-sided noise."""
    rng = np.random.default_rng(seed)
    out = []
    for s in probes.curve_sizes(max_bytes):
        ns = mem_ns
        for i, (size, lat) in enumerate(levels):
            if s <= size:
                ns = lat
                break
            if s <= 1.5 * size:
                nxt = levels[i + 1][1] if i + 1 < len(levels) else mem_ns
                ns = float(np.sqrt(lat * nxt)) * 1.05
                break
        out.append((s, ns * (1 + noise * rng.random())))
    return out


SERVER_LEVELS = [(48 * K, 1.2), (1 * M, 4.0), (36 * M, 14.0)]


def test_steps_found_where_the_caches_end():
    steps = probes.find_steps(synthetic_curve(SERVER_LEVELS))
    assert len(steps) == 3
    for step, (size, _) in zip(steps, SERVER_LEVELS):
        assert step["fits"] <= size * 1.5 and step["exceeds"] >= size


def test_a_noise_spike_is_not_a_cache_level():
    curve = synthetic_curve(SERVER_LEVELS)
    i = [s for s, _ in curve].index(256 * K)
    curve[i] = (curve[i][0], curve[i][1] * 3)   # another process woke up for one point
    assert len(probes.find_steps(curve)) == 3


def test_os_and_curve_agree(tmp_path):
    caches = read_machine(tmp_path, "server")
    levels, notes, used = probes.reconcile(caches, probes.find_steps(
        synthetic_curve(SERVER_LEVELS)))
    assert [lv["agree"] for lv in levels] == [True, True, True]
    assert notes == []
    assert [c["size"] for c in used] == [48 * K, M, 36 * M]


def test_vm_sizes_come_from_the_curve(tmp_path):
    caches = read_machine(tmp_path, "vm")
    curve = synthetic_curve([(48 * K, 1.2), (2 * M, 5.0), (16 * M, 15.0)])
    levels, notes, used = probes.reconcile(caches, probes.find_steps(curve))
    assert [lv["source"] for lv in levels] == ["measured"] * 3
    assert [c["size"] for c in used] == [48 * K, 2 * M, 16 * M]
    assert len(notes) == 3 and "no size" in notes[0]
    # ... and the model follows the measured machine, not the fallback.
    assert model(used, 6, 16, 4) != model(caches, 6, 16, 4)
    assert model(used, 6, 16, 4)["kc"] > model(caches, 6, 16, 4)["kc"]


def test_disagreement_is_recorded_and_the_measurement_used(tmp_path):
    caches = read_machine(tmp_path, "laptop")          # OS: 8 MiB L3
    curve = synthetic_curve([(32 * K, 1.3), (256 * K, 3.5), (2 * M, 12.0)])
    levels, notes, used = probes.reconcile(caches, probes.find_steps(curve))
    assert [lv["agree"] for lv in levels] == [True, True, False]
    assert levels[2]["os_size"] == 8 * M and levels[2]["used"] == 2 * M
    assert any("L3" in n and "8 MiB" in n for n in notes)
    assert [c["size"] for c in used] == [32 * K, 256 * K, 2 * M]
    assert model(used, 6, 8, 8, cores=1)["nc"] < model(caches, 6, 8, 8, cores=1)["nc"]


# Recorded on the 2-core EPYC (Zen 3) VM while another process was running: the OS says
# L3 = 32 MiB, the curve shows what this guest gets of it.
RECORDED = [(4096, 1.479), (6144, 1.491), (8192, 1.646), (12288, 1.562), (16384, 1.462),
            (24576, 2.04), (32768, 2.995), (49152, 3.223), (65536, 3.088), (98304, 2.959),
            (131072, 3.094), (196608, 3.537), (262144, 3.68), (393216, 6.076),
            (524288, 6.173), (786432, 6.977), (1048576, 7.891), (1572864, 11.519),
            (2097152, 11.042), (3145728, 12.658), (4194304, 10.942), (6291456, 6.762),
            (8388608, 7.988), (12582912, 36.812), (16777216, 43.779), (25165824, 54.055),
            (33554432, 49.215), (50331648, 49.858), (67108864, 44.772)]


def test_recorded_zen3_vm_curve():
    os_caches = [{"level": 1, "size": 32 * K, "ways": 8, "line": 64},
                 {"level": 2, "size": 512 * K, "ways": 8, "line": 64},
                 {"level": 3, "size": 32 * M, "ways": 16, "line": 64}]
    levels, notes, used = probes.reconcile(os_caches, probes.find_steps(RECORDED))
    assert [lv["agree"] for lv in levels] == [True, True, False]
    assert 4 * M <= levels[2]["used"] <= 12 * M
    assert len(notes) == 1 and notes[0].startswith("L3")


def test_chase_order_is_one_cycle_over_every_line():
    order = probes.chase_order(64 * K, 64, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(1024))
    # Lines of one page are visited together (the TLB sees one page per 64 loads).
    assert len(set((order[:64] // 64).tolist())) == 1


def test_pointer_chase_runs_and_rejects_bad_orders():
    from microtile._probes import _latency
    ch = _latency.Chain(16 * K, probes.chase_order(16 * K, 64, np.random.default_rng(0)), 64)
    assert ch.slots == 256
    ch.chase(10_000)
    with pytest.raises(ValueError):
        _latency.Chain(4 * K, [0, 1, 64], 64)       # slot 64 is outside a 4 KiB buffer
    with pytest.raises(ValueError):
        _latency.Chain(4 * K, [], 64)


def test_cpuid_agrees_with_sysfs_where_both_exist():
    from microtile._probes import _cpuid
    ours = {c["level"]: c["size"] for c in _cpuid.caches()}
    os_view = {c["level"]: c["size"] for c in _hwinfo.read_caches() if c["size"]}
    if not ours or not os_view:
        pytest.skip("CPUID cache leaves or sysfs not available here")
    assert ours[1] == os_view[1]


def test_without_l3_nc_is_not_bounded_by_a_guess(tmp_path):
    caches = read_machine(tmp_path, "aarch64")
    assert model(caches, 4, 8, 4)["nc"] == _blocking.NC_MAX
    # A VM that reports nothing at all keeps the conservative fallback L3.
    assert model(read_machine(tmp_path, "vm"), 4, 8, 4)["nc"] < _blocking.NC_MAX


def test_nc_for_a_measured_kc(tmp_path):
    """A deeper kc leaves room for fewer columns of B in the same L3 ways; the model's own
    kc gives back the model's nc."""
    caches = read_machine(tmp_path, "vm")             # the fallback L3 bounds nc
    m = model(caches, 6, 16, 4, cores=2)
    assert m["nc"] < _blocking.NC_MAX
    assert _blocking.model_nc(caches, m["mc"], m["kc"], 16, 4, 2) == m["nc"]
    deep = _blocking.model_nc(caches, 12, 1024, 16, 4, 2)
    assert deep % 16 == 0 and 16 <= deep < m["nc"]
    # In bytes the block stays about the same size: kc * nc within a factor of 1.3.
    assert 0.75 < (1024 * deep) / (m["kc"] * m["nc"]) < 1.3
