"""Access to microtile's convolution and pooling functions, looked up when first used.

They live in the core package; looking them up lazily lets ``microtile.nn`` import (and its
dense layers work) in a build that does not have them, with a clear error if one is used.
"""
import sys

_cache = {}


def kernel(name):
    fn = _cache.get(name)
    if fn is None:
        # microtile itself is always imported by now: microtile.nn is its subpackage.
        fn = getattr(sys.modules["microtile"], name, None)
        if fn is None:
            raise NotImplementedError(f"microtile.{name} is not available in this build")
        _cache[name] = fn
    return fn
