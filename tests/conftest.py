"""Fixtures and session settings: the Hypothesis profiles and the ``rng`` fixture.  The
helpers the tests import (references, error bounds, layouts, subprocesses) are in
``_helpers.py``; the tuner's tests also import ``autotune/autotune_env.py``.

Layout: the folders mirror the library (``linalg/``, ``conv/``, ``nn/``, ``runtime/`` for
configuration, threads and memory, ``distributed/`` for MPI, ``autotune/`` for the tuner).
They are not packages (no ``__init__.py``), so every test file's name must be unique across
them.  pytest's default
import mode puts this folder on ``sys.path`` when it loads this file, and each test file's
folder before it imports that file: hence ``from _helpers import ...`` works from any folder
and ``from autotune_env import ...`` from ``autotune/``, whether microtile is built in place
or installed (the installed microtile and autotune are then the ones tested: the repository
root is not put on ``sys.path``).
"""
import os
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# The helpers' asserts get pytest's introspection, as they did when they lived in this file.
pytest.register_assert_rewrite("_helpers")

# Hypothesis: no deadline (timings on a shared 2-core machine are noisy), few examples per
# test so the whole suite stays well under three minutes.  MICROTILE_HYPOTHESIS=thorough
# runs many more for a soak test; "ci" is reproducible run to run.
_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("default", max_examples=50, **_COMMON)
settings.register_profile("ci", max_examples=50, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=400, **_COMMON)
settings.load_profile(os.environ.get("MICROTILE_HYPOTHESIS", "default"))


@pytest.fixture
def rng(request):
    """A generator seeded from the test's file name and test id, so failures reproduce.

    The folder is left out: the seed is that of the id the test had before the tests were
    grouped into folders ("tests/test_gemm.py::test_...[...]"), so moving a file between
    folders, or running pytest from elsewhere, does not change the data it draws."""
    path, sep, rest = request.node.nodeid.partition("::")
    seed = zlib.crc32(f"tests/{path.rsplit('/', 1)[-1]}{sep}{rest}".encode())
    return np.random.default_rng(seed)
