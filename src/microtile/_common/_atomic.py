"""Writing a file so that readers see the old contents or the new, never a torn file."""
import contextlib
import os


@contextlib.contextmanager
def atomic_open(path, mode="wb", prefix=".microtile-"):
    """Open a temporary file beside ``path``; on a clean exit it is flushed, synced and
    renamed over ``path``; on an error (or KeyboardInterrupt) it is removed and ``path`` is
    left as it was."""
    import tempfile  # only here: keeps it out of ``import microtile``

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
