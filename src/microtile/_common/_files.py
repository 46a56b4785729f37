"""Files the library writes and reads: writes that readers see whole or not at all, and
reads that a FIFO or device named by a user cannot block or make endless."""
import contextlib
import os
import stat


class NotRegularFile(ValueError):
    """A path names a FIFO, socket, device or directory where a file was expected."""


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


def open_regular(path):
    """``path`` opened for binary reading, only if it is a regular file.

    A FIFO, socket or device is refused on its ``stat`` without being opened (a FIFO would
    block the open, a device never end), and the open itself is non-blocking, so a path
    swapped for a FIFO in between cannot block either: ``NotRegularFile`` in both cases.
    A missing file is ``FileNotFoundError``; other ``OSError``s as the OS reports them.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise NotRegularFile(f"{os.fspath(path)!r} is not a regular file")
    flags = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
             | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{os.fspath(path)!r} is not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
