"""save / load: a model's state dict to and from a NumPy ``.npz`` file."""
import os

import numpy as np


def save(model, path):
    """Write ``model.state_dict()`` to ``path`` as an uncompressed ``.npz`` (exact values).

    The file is written next to its destination and renamed into place, so an interrupted
    save never leaves a truncated file behind.  ``path`` is used as given (no suffix added).

    Parameters
    ----------
    model : Module
    path : str or os.PathLike
    """
    import tempfile  # only here: keeps it out of ``import microtile``

    state = model.state_dict()
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".microtile-", suffix=".npz.tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **state)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


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
