"""save / load: a model's state dict to and from a NumPy ``.npz`` file."""
import os

import numpy as np

from microtile._common._files import NotRegularFile, atomic_open, open_regular


def save(model, path):
    """Write ``model.state_dict()`` to ``path`` as an uncompressed ``.npz`` (exact values).

    The file is written next to its destination and renamed into place, so an interrupted
    save never leaves a truncated file behind.  ``path`` is used as given (no suffix added).

    A ``microtile.distributed.DistributedDataParallel`` model is written by rank 0 alone,
    with the wrapped module's keys; ``save`` returns on every rank once the file is
    complete (and raises on every rank when rank 0 could not write it).

    Parameters
    ----------
    model : Module
    path : str or os.PathLike
    """
    on_root = getattr(model, "_on_root", None)
    if on_root is not None:
        on_root(lambda: _write(model, path), "save")
    else:
        _write(model, path)


def _write(model, path):
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
    try:
        f = open_regular(name)
    except NotRegularFile:
        raise ValueError(f"load: {name!r} is not a regular file") from None
    with f:     # np.load leaves a file object it was handed open
        try:
            archive = np.load(f, allow_pickle=False)
        except OSError as exc:
            if exc.errno is not None:       # the OS refused (permissions, ...): not the content
                raise
            raise _unreadable(name, exc) from exc
        except Exception as exc:  # noqa: BLE001 - see the docstring
            raise _unreadable(name, exc) from exc
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError(f"load: {name!r} holds a single array, not a state dict written "
                             f"by microtile.nn.save")
        try:
            with archive:
                return {key: np.asarray(archive[key]) for key in archive.files}
        except Exception as exc:  # noqa: BLE001 - see the docstring
            raise _unreadable(name, exc) from exc


def _unreadable(name, exc):
    return ValueError(f"load: {name!r} is not a readable state dict written by "
                      f"microtile.nn.save ({type(exc).__name__}: {exc})")
