"""save / load: a model's state dict to and from a NumPy ``.npz`` file."""
import os

import numpy as np

from microtile._common._atomic import atomic_open


def save(model, path):
    """Write ``model.state_dict()`` to ``path`` as an uncompressed ``.npz`` (exact values).

    The file is written next to its destination and renamed into place, so an interrupted
    save never leaves a truncated file behind.  ``path`` is used as given (no suffix added).

    Parameters
    ----------
    model : Module
    path : str or os.PathLike
    """
    state = model.state_dict()
    with atomic_open(path, "wb") as f:
        np.savez(f, **state)


def load(model, path):
    """Load parameters saved by ``save`` into ``model``.

    A missing or unexpected key or a wrong shape raises ``ValueError`` and leaves the model
    unchanged (see ``Module.load_state_dict``).

    Parameters
    ----------
    model : Module
    path : str or os.PathLike

    Returns
    -------
    model
    """
    with np.load(os.fspath(path), allow_pickle=False) as archive:
        state = {key: archive[key] for key in archive.files}
    model.load_state_dict(state)
    return model
