"""torch's default initialisation of Linear and Conv2d, drawn from a NumPy Generator.

torch initialises a weight with ``kaiming_uniform_(w, a=sqrt(5))``: gain sqrt(2 / (1 + a^2)),
bound sqrt(3) * gain / sqrt(fan_in) (which is 1 / sqrt(fan_in)), and the bias uniformly in
+-1 / sqrt(fan_in).  fan_in is in_features for Linear and (C / groups) * R * S for Conv2d.
"""
import math

import numpy as np


def as_generator(rng):
    """A numpy Generator from None (fresh entropy), a seed, or a Generator (used as is)."""
    if isinstance(rng, np.random.Generator):
        return rng
    try:
        return np.random.default_rng(rng)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"rng must be None, a seed or a numpy.random.Generator: {exc}") from None


def kaiming_uniform(rng, shape, fan_in, dtype, a=math.sqrt(5.0)):
    gain = math.sqrt(2.0 / (1.0 + a * a))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def bias_uniform(rng, shape, fan_in, dtype):
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return rng.uniform(-bound, bound, size=shape).astype(dtype)
