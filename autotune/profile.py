"""The profile document the tuner writes: where it goes, what it holds, and how two runs at
once are kept apart.

Reading, checking and the atomic write are ``microtile._config._profile``'s (the same code that
``import microtile`` uses), so the tuner can never write what the library would refuse.
"""
import contextlib
import datetime
import os

from microtile._config import _profile


def resolve_path(cli_path=None):
    """``--profile``, else ``MICROTILE_PROFILE``, else the user cache directory."""
    if cli_path:
        return os.path.abspath(os.path.expanduser(cli_path))
    return _profile.profile_path()


def build(*, isa, probed, chosen, measured, tuner):
    """The JSON document, in the schema ``microtile._config._profile`` reads."""
    doc = {
        "schema_version": _profile.SCHEMA_VERSION,
        "library_version": _profile.library_version(),
        "fingerprint": _profile.fingerprint(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "isa": isa,
        "tuner": tuner,
        "probed": probed,
        "chosen": chosen,
        "measured": measured,
    }
    # What import would make of it: refuse to write a profile the library would reject.
    _profile.check_chosen(chosen)
    return doc


def previous_chosen(path, isa):
    """The chosen sections of a usable existing profile for this ISA ({} otherwise), so a
    ``--dtype`` run keeps the other dtype's values."""
    status, data = _profile.read(path)
    if status != "loaded" or data.get("isa") != isa:
        return {}
    return data.get("chosen", {})


def write(path, doc):
    """Write ``doc`` atomically.  Should it be larger than ``import microtile`` reads (1 MiB;
    a --quick run writes ~35 KiB), the search evidence, the only part that grows with the
    run, is left out: the choices and the reference table are what the profile is for."""
    try:
        _profile.write_atomic(path, doc)
    except _profile.ProfileTooLarge:
        measured = {**doc.get("measured", {}),
                    "search": "left out: the profile would be larger than import reads"}
        _profile.write_atomic(path, {**doc, "measured": measured})


def show(path):
    """(status, reason or None, document or None) of the profile at ``path``.

    The raw document is read with the library's bounded reader, so ``--show`` on a FIFO or
    a device returns at once, as ``import microtile`` does."""
    status, data = _profile.read(path)
    if status == "missing":
        return status, None, None
    try:
        raw = _profile.read_json(path)
    except (OSError, ValueError):
        raw = None
    # read() normalises the chosen values; the raw document is what the file says.
    return status, (None if status == "loaded" else data), raw


def reset(path):
    """Delete the profile; True when there was one."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def run_lock(path, say=None):
    """Hold an exclusive lock beside the profile for a whole run, so two tuners started at
    once measure one after the other instead of spoiling each other's timings.  (Writes are
    atomic anyway; this is about the measurements.)  No-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if say:
                say(f"another autotune run is using {path}; waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
