"""microtile.distributed under ``mpirun -n 2`` (and 3), alone as a world of one, and without
MPI at all.

The scenarios run in ``mpi_scenarios.py``, on every rank of one ``mpirun`` launch per
configuration (a module-scoped fixture: launching and importing cost about a second each
time); the tests here read what each rank reported.  Every launch runs under a timeout, so
a hang (a rank waiting for a collective the others never start) fails the test.

Missing MPI: without ``mpirun`` on PATH or without mpi4py these tests skip, except when
``MICROTILE_REQUIRE_MPI=1`` or ``CI`` (set to anything but ``0``/``false``/empty) is in the
environment: then they fail, so a CI run whose MPI install broke cannot pass by skipping.
``.ci/run`` installs Open MPI and mpi4py and sets ``MICROTILE_REQUIRE_MPI=1``.
"""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from _helpers import child_env

HERE = os.path.dirname(os.path.abspath(__file__))
SCENARIOS = os.path.join(HERE, "mpi_scenarios.py")
TIMEOUT = 150

ALL_TWO = ["broadcast_at_wrap", "identical_steps", "match_single", "match_batchnorm",
           "fit_uneven", "save_once", "bucket_sizes", "no_gradient", "mismatch", "threads",
           "wrapped_twice", "transport", "slow_rank", "ahead"]
ALL_THREE = ["identical_steps", "no_gradient", "threads", "transport", "slow_rank"]


def _flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


MPI_REQUIRED = _flag("MICROTILE_REQUIRE_MPI") or _flag("CI")


def need(what_is_missing):
    """Skip, or fail where MPI is required (CI), naming what is missing."""
    message = (f"{what_is_missing}: install an MPI (Debian: apt-get install openmpi-bin "
               f"libopenmpi-dev) and pip install mpi4py")
    if MPI_REQUIRED:
        pytest.fail(f"{message} (required here: MICROTILE_REQUIRE_MPI or CI is set)")
    pytest.skip(message)


def require_mpi4py():
    if importlib.util.find_spec("mpi4py") is None:
        need("mpi4py is not installed")


def require_mpirun():
    require_mpi4py()
    if shutil.which("mpirun") is None:
        need("mpirun is not on PATH")


def mpi_env(extra=None):
    env = child_env(extra)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Open MPI refuses to start as root without these (containers and CI run as root).
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def run_ranks(tmp_path, names, n=None, mpirun_args=(), env=None):
    """Run the scenarios ``names`` on ``n`` ranks under mpirun (None: one process, no
    mpirun); returns each rank's results, rank 0 first."""
    out = str(tmp_path)
    cmd = [sys.executable, SCENARIOS, out, *names]
    if n is not None:
        cmd = ["mpirun", "-n", str(n), "--oversubscribe", *mpirun_args, *cmd]
    proc = subprocess.Popen(cmd, env=mpi_env(env), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)     # mpirun and every rank it started
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish within {TIMEOUT} s (a hang?)\n"
                    f"--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-3000:]}")
    assert proc.returncode == 0, (f"{' '.join(cmd)} failed ({proc.returncode})\n--- stdout\n"
                                  f"{stdout[-3000:]}\n--- stderr\n{stderr[-3000:]}")
    results = []
    for r in range(n or 1):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            results.append(json.load(f))
    return results


def _python(tmp_path, code, env):
    """Run ``python -c code`` in ``tmp_path``; its standard output (failing on an error)."""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120, cwd=str(tmp_path), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def scenario(results, name):
    """``[rank 0's result, rank 1's, ...]`` of one scenario; fails on a scenario error."""
    out = []
    for r, res in enumerate(results):
        value = res[name]
        if isinstance(value, dict) and "error" in value and len(value) == 1:
            pytest.fail(f"scenario {name} raised on rank {r}:\n{value['error']}")
        out.append(value)
    return out


TRANSPORTS = {"shared memory": {}, "mpi": {"MICROTILE_TEST_TRANSPORT": "mpi"}}


@pytest.fixture(scope="module", params=list(TRANSPORTS))
def two(request, tmp_path_factory):
    """Every two-rank test runs twice: the ranks (on this one machine) summing through
    shared memory, as they do by default, and through MPI's allreduce, as ranks on
    different machines do."""
    require_mpirun()
    # --bind-to none: both ranks may run on both CPUs, so dividing the CPUs between them
    # is the wrapper's work (Open MPI would otherwise bind each rank to one core).
    results = run_ranks(tmp_path_factory.mktemp("mpi2"), ALL_TWO, n=2,
                        mpirun_args=("--bind-to", "none", "-x", "MICROTILE_TEST_TRANSPORT"),
                        env=TRANSPORTS[request.param])
    for res in scenario(results, "transport"):
        assert res["asked"] == request.param and res["apart"] == "mpi"
    return results


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    require_mpirun()
    return run_ranks(tmp_path_factory.mktemp("mpi3"), ALL_THREE, n=3,
                     mpirun_args=("--bind-to", "none", "-x", "MICROTILE_NUM_THREADS"),
                     env={"MICROTILE_NUM_THREADS": 2})


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    require_mpi4py()
    return run_ranks(tmp_path_factory.mktemp("mpi1"), ["world_one", "threads"])


# --- two ranks -----------------------------------------------------------------------------

def test_wrapping_gives_every_rank_rank0s_weights_and_buffers(two):
    r0, r1 = scenario(two, "broadcast_at_wrap")
    assert r0["before"] != r1["before"]             # they did start apart
    assert r0["after"] == r1["after"] == r0["before"]
    assert r0["stepped"] == r1["stepped"] != r0["after"]
    assert r0["same_arrays"] and r1["same_arrays"]  # in place: the optimizer still works


CASES = ["mlp_sgd", "mlp_adam", "cnn_bn_adam", "cnn_sgd", "wide_adam"]


@pytest.mark.parametrize("case", CASES)
def test_parameters_bitwise_identical_after_every_step(two, case):
    r0, r1 = (res[case] for res in scenario(two, "identical_steps"))
    assert r0["losses"] != r1["losses"]             # each rank had its own data
    assert r0["digests"] == r1["digests"]
    assert len(set(r0["digests"])) == len(r0["digests"])       # and they did train


def test_buckets_start_during_backward(two):
    res = scenario(two, "identical_steps")[0]
    for case in ("mlp_sgd", "cnn_bn_adam"):
        assert res[case]["buckets"] >= 2
        # At least one bucket (the last layers') went out before backward returned.
        assert min(res[case]["early"]) >= 1, res[case]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_two_ranks_match_one_process_with_twice_the_batch(two, kind):
    for res in scenario(two, "match_single"):
        assert res[kind] < 1e-13


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_batchnorm_statistics_follow_rank0(two, kind):
    for res in scenario(two, "match_batchnorm"):
        assert res[kind]["params"] < 1e-13
        assert res[kind]["buffers"] < 1e-13


@pytest.mark.parametrize("case", ["n37", "n33_own_rng"])
def test_fit_matches_one_process(two, case):
    r0, r1 = (res[case] for res in scenario(two, "fit_uneven"))
    assert r0["same_keys"]
    assert r0["history"] == r1["history"]           # the same figures on every rank
    assert r0["digest"] == r1["digest"]
    assert r0["history_diff"] < 1e-12
    assert r0["params"] < 1e-12
    assert r0["progress_calls"] > 0 and r1["progress_calls"] == 0


def test_fit_stops_every_rank_when_one_callback_asks(two):
    r0, r1 = (res["stop"] for res in scenario(two, "fit_uneven"))
    assert r0["epochs"] == r1["epochs"] == 1
    assert r0["state"] == r1["state"]               # buffers synchronised at epoch end


def test_save_writes_once_and_load_reads_everywhere(two):
    r0, r1 = scenario(two, "save_once")
    assert (r0["writes"], r1["writes"]) == (1, 0)
    assert r0["same"] and r1["same"] and r0["loaded"] and r1["loaded"]
    assert "0.weight" in r0["keys"] and not any(k.startswith("module.") for k in r0["keys"])
    assert r0["failure"].startswith("IsADirectoryError")
    assert r1["failure"].startswith("RuntimeError: save failed on rank 0: IsADirectoryError")


def test_bucket_cap_of_a_few_kb_and_100_mb_agree(two):
    for res in scenario(two, "bucket_sizes"):
        small, large = res["0.004"], res["100"]
        assert small["buckets"] >= 3 and large["buckets"] == 1
        assert small["digest"] == large["digest"]


def test_a_model_wrapped_twice_trains_as_one_process(two):
    """Whichever wrapper holds the gradients in its buckets, both average them right."""
    for res in scenario(two, "wrapped_twice"):
        assert max(res["diffs"]) < 1e-12, res["diffs"]


def test_parameter_without_gradient_on_a_rank_counts_as_zero(two):
    r0, r1 = scenario(two, "no_gradient")
    assert r0["gated_diff"] == 0.0 and r1["gated_diff"] == 0.0
    assert r0["all_grads"] == r1["all_grads"]
    # A backward that failed on every rank raised on every rank, and training went on.
    assert r0["error"] == r1["error"] and "before forward" in r0["error"]
    assert r0["after_error"] == r1["after_error"]


def test_a_late_rank_changes_nothing(two):
    # One rank 50 ms late at each point of the shared-memory protocol (see slow_rank):
    # the others must wait for it there, and the average stays that of one process.
    results = scenario(two, "slow_rank")
    for case, res in results[0].items():
        assert res["diff"] < 1e-13, (case, res)
        assert results[1][case]["digest"] == res["digest"], case
    assert results[0]["_start/0.0005"]["buckets"] >= 3
    assert results[0]["_sum/25"]["buckets"] == 1


def test_a_rank_a_step_ahead_makes_the_others_raise(two):
    r0, r1 = scenario(two, "ahead")
    assert not r1["no_window"]
    assert r0["error"] is None
    assert "no longer match" in r1["error"] and "rank 0" in r1["error"]


def test_ranks_that_disagree_all_get_a_value_error(two):
    r0, r1 = scenario(two, "mismatch")
    assert r0["model"] == r1["model"]
    assert "rank 1's model differs from rank 0's" in r0["model"] and "'0.weight'" in r0["model"]
    assert r0["fit"] == r1["fit"]
    assert "rank 1 has samples 11 but rank 0 has 10" in r0["fit"]
    assert r0["cap"] == r1["cap"] and "every rank must pass the same bucket_cap_mb" in r0["cap"]


def test_ranks_share_the_cpus(two):
    # Two unbound ranks on this machine split its usable CPUs (at least one thread each).
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for res in scenario(two, "threads"):
        assert res["threads"] == max(1, cpus // 2)


# --- three ranks (not a power of two) ------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_three_ranks_stay_bitwise_identical(three, case):
    results = [res[case] for res in scenario(three, "identical_steps")]
    assert len({json.dumps(r["losses"]) for r in results}) == 3
    assert all(r["digests"] == results[0]["digests"] for r in results)


def test_three_ranks_sum_through_shared_memory_and_wait_for_a_late_one(three):
    assert {res["asked"] for res in scenario(three, "transport")} == {"shared memory"}
    results = scenario(three, "slow_rank")
    for case, res in results[0].items():
        assert res["diff"] < 1e-13, (case, res)
        assert all(other[case]["digest"] == res["digest"] for other in results[1:]), case


def test_three_ranks_parameter_without_gradient(three):
    results = scenario(three, "no_gradient")
    assert all(r["gated_diff"] < 1e-15 for r in results)
    assert len({r["all_grads"] for r in results}) == 1


def test_thread_count_from_the_environment_is_kept(three):
    for res in scenario(three, "threads"):
        assert res["env"] == "2"
        assert res["threads"] == min(2, len(os.sched_getaffinity(0))
                                     if hasattr(os, "sched_getaffinity") else 2)


# --- a world of one, without mpirun --------------------------------------------------------

def test_world_of_one_trains_as_the_module_alone(one):
    res = scenario(one, "world_one")[0]
    assert res["rank"] == 0 and res["world_size"] == 1
    for key in ("mlp_steps_equal", "cnn_steps_equal", "mlp_fit_equal", "cnn_fit_equal",
                "tied_equal", "state_keys", "param_names", "saved_keys", "eval", "train",
                "repr"):
        assert res[key] is True, key


def test_world_of_one_keeps_its_threads(one):
    res = scenario(one, "threads")[0]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert res["threads"] == cpus


def test_bad_arguments(one):
    errors = scenario(one, "world_one")[0]["errors"]
    assert errors == {"not_module": "TypeError", "twice": "TypeError", "comm_type": "TypeError",
                      "cap_zero": "ValueError", "cap_negative": "ValueError",
                      "cap_nan": "ValueError", "cap_inf": "ValueError",
                      "cap_str": "TypeError", "rank_comm": "TypeError",
                      "comm_null": "ValueError"}


def test_fair_share_of_cpus(one):
    shares = scenario(one, "world_one")[0]["fair_share"]
    assert shares["unbound_2_on_2"] == [1, 1]
    assert shares["bound"] == [1, 1]            # each has a core of its own
    assert shares["3_on_8"] == [3, 3, 2]
    assert shares["5_on_2"] == [1, 1, 1, 1, 1]  # never zero threads


def test_ctrl_c_waits_until_a_slice_sum_is_recorded(tmp_path):
    # A KeyboardInterrupt between adding the other ranks' slices in place and recording it
    # would make the step's completion add them again: the sum holds it back until done.
    require_mpi4py()
    code = ("import os, signal\n"
            "from microtile.distributed._node import _interrupts_held\n"
            "seen = []\n"
            "try:\n"
            "    with _interrupts_held():\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "        seen.append('inside')\n"
            "except KeyboardInterrupt:\n"
            "    seen.append('after')\n"
            "seen.append(signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
            "print(seen)\n")
    out = _python(tmp_path, code, mpi_env())
    assert out.strip() == "['inside', 'after', True]"    # and the handler put back


# --- the example -------------------------------------------------------------------------

def test_example_prints_the_one_process_accuracy(tmp_path):
    require_mpirun()
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("the example's data set ships with scikit-learn")
    example = os.path.join(HERE, "..", "..", "examples", "train_digits_distributed.py")
    if not os.path.exists(example):
        pytest.skip("the examples are not beside these tests")
    cmd = ["mpirun", "-n", "2", "--oversubscribe", sys.executable, example, "--epochs", "2",
           "--check"]
    proc = subprocess.run(cmd, env=mpi_env(), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    ranks = [ln for ln in lines if ln.startswith("2 rank(s):")]
    alone = [ln for ln in lines if ln.startswith("1 process")]
    assert len(ranks) == 1 and len(alone) == 1, proc.stdout   # printed by rank 0 only

    def accuracy(line):
        return line.split("test accuracy ")[1].split(";")[0]

    assert accuracy(ranks[0]) == accuracy(alone[0])
    assert float(alone[0].rsplit("difference ", 1)[1]) < 1e-12


# --- without MPI -------------------------------------------------------------------------

def _import_error(tmp_path, prelude):
    code = (f"{prelude}\n"
            "try:\n"
            "    import microtile.distributed\n"
            "except ImportError as exc:\n"
            "    print('ImportError:', exc)\n"
            "else:\n"
            "    print('imported')\n"
            "import microtile\n"
            "from microtile import nn\n"
            "print('microtile without MPI:', nn.Linear(2, 2, rng=0).weight.shape)\n")
    return _python(tmp_path, code, child_env())


def test_import_without_mpi4py_names_the_extra(tmp_path):
    out = _import_error(tmp_path, "import sys; sys.modules['mpi4py'] = None")
    assert 'ImportError: microtile.distributed needs mpi4py and an MPI library' in out
    assert 'pip install "microtile[mpi]"' in out and "openmpi" in out.lower()
    assert "microtile without MPI: (2, 2)" in out       # the rest of microtile still works


def test_import_without_an_mpi_library_names_it(tmp_path):
    # An mpi4py whose MPI module cannot load libmpi, as mpi4py's wheels do without one.
    fake = tmp_path / "fake" / "mpi4py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "MPI.py").write_text("raise RuntimeError('cannot load MPI library')\n")
    out = _import_error(tmp_path, f"import sys; sys.path.insert(0, {str(fake.parent)!r})")
    assert "ImportError: microtile.distributed needs mpi4py and an MPI library" in out
    assert "could not load an MPI library" in out and "cannot load MPI library" in out
