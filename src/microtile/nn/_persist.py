"""save / load: a model's state dict to and from a NumPy ``.npz`` file."""
import os
import stat

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
    unchanged (see ``Module.load_state_dict``).  So does a file that is not such an archive
    (corrupt, truncated, another format, a FIFO or device): the ``ValueError`` names the
    path and what was wrong, and nothing is loaded.

    Parameters
    ----------
    model : Module
    path : str or os.PathLike

    Returns
    -------
    model

    Raises
    ------
    ValueError
        The file is not a state dict ``save`` wrote, or does not fit ``model``.
    OSError
        The file cannot be opened (FileNotFoundError, PermissionError, ...).
    """
    name = os.fspath(path)
    state = _read_state(name)
    try:
        model.load_state_dict(state)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"load: {name!r} does not fit the model: {exc}") from exc
    return model


def _read_state(name):
    """Every array of the ``.npz`` at ``name``, read completely before the model is touched.

    Whatever a damaged file makes NumPy or zipfile raise (BadZipFile, EOFError, zlib.error,
    a pickled-object refusal, ...) becomes one ValueError naming the path."""
    # A FIFO would block the open, a device never end; neither can be an archive.
    if not stat.S_ISREG(os.stat(name).st_mode):
        raise ValueError(f"load: {name!r} is not a regular file")
    try:
        archive = np.load(name, allow_pickle=False)
    except OSError as exc:
        if exc.errno is not None:       # the OS refused (permissions, ...): not the content
            raise
        raise _unreadable(name, exc) from exc
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise _unreadable(name, exc) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"load: {name!r} holds a single array, not a state dict written by "
                         f"microtile.nn.save")
    try:
        with archive:
            return {key: np.asarray(archive[key]) for key in archive.files}
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise _unreadable(name, exc) from exc


def _unreadable(name, exc):
    return ValueError(f"load: {name!r} is not a readable state dict written by "
                      f"microtile.nn.save ({type(exc).__name__}: {exc})")
