"""Environment for child interpreters in the tuner's tests: they must import the same
microtile and autotune as the test process (installed, or built in place), and must not run
from the repository root, where ``python -m autotune`` would pick up the source tree's
``autotune/`` (uncompiled when microtile was installed with pip)."""
import os

import autotune
import microtile


def import_roots():
    roots = []
    for pkg in (microtile, autotune):
        root = os.path.dirname(os.path.dirname(os.path.abspath(pkg.__file__)))
        if root not in roots:
            roots.append(root)
    return roots


def child_env(**extra):
    """os.environ without MICROTILE_* variables but MICROTILE_ISA (as ``_helpers.child_env``:
    a run on the portable kernels starts its children on them), with PYTHONPATH naming the
    import roots; ``extra`` values are set (None removes a variable)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MICROTILE_") or k == "MICROTILE_ISA"}
    env.pop("PYTHONWARNINGS", None)
    env["PYTHONPATH"] = os.pathsep.join(
        import_roots() + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env
