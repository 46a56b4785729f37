"""The per-machine profile the tuner writes and ``import microtile`` reads.

JSON, written atomically (temporary file in the same directory, then ``os.replace``).  At
import it is only read and checked, never measured: a profile for another machine or an
incompatible version is "stale", an unreadable or malformed one "invalid"; either warns once
and the analytical defaults stay in force.  Values out of range are rejected on load, so no
profile can make a kernel compute a wrong result.

Whatever ``MICROTILE_PROFILE`` names, import must neither hang nor fail: only a regular file
is read (a FIFO would block the open and the first read forever, ``/dev/zero`` never ends), at
most ``MAX_PROFILE_BYTES`` of it, and any problem reading, parsing or checking it (deep
nesting, numbers that do not fit, wrong types) makes the profile "invalid", never an error.
"""
import json
import os
import warnings

from microtile._config import _hwinfo
from microtile._config._schema import (DTYPES, ITEMSIZE, MAX_THREADS, OPTIONS, TUNABLE,
                                       check_int, validate)
from microtile._common._files import NotRegularFile, atomic_open, open_regular
from microtile._version import __version__

SCHEMA_VERSION = 1
FILENAME = "profile.json"
# A --quick profile measured ~35 KiB; a file past this is not a profile, and is not read
# further (the tuner never writes more: see write_atomic and autotune.profile.write).
MAX_PROFILE_BYTES = 1 << 20
# Reasons quoted in the warning are cut here (a rejected value may be thousands of digits).
_MAX_REASON = 300


class ProfileError(ValueError):
    """The file at a profile path cannot be a profile (not a regular file, too large, not
    UTF-8 JSON)."""


class ProfileTooLarge(ProfileError):
    """A document too large to be read back as a profile."""


def default_path():
    """``$XDG_CACHE_HOME/microtile/profile.json`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "microtile", FILENAME)


def profile_path():
    """The path in force: ``MICROTILE_PROFILE`` when set, else the default."""
    env = os.environ.get("MICROTILE_PROFILE", "").strip()
    return os.path.abspath(os.path.expanduser(env)) if env else default_path()


def library_version():
    """major.minor: profiles stay valid across patch releases only."""
    return ".".join(__version__.split(".")[:2])


def fingerprint(isa_flags=None):
    """What identifies this machine for a profile: CPU model, architecture, ISA flags, cache
    sizes and usable CPUs."""
    from microtile._kernels import _dispatch
    feats = _dispatch.cpu_features() if isa_flags is None else isa_flags
    return {
        "model": _hwinfo.cpu_model(),
        "machine": _hwinfo.machine(),
        "isa": sorted(k for k, v in feats.items() if v),
        "caches": [[c["level"], c["size"]] for c in _hwinfo.read_caches()],
        "usable_cpus": _hwinfo.usable_cpus(),
    }


def write_atomic(path, data):
    """Write ``data`` as JSON to ``path`` so that readers see the old file or the new one,
    never a torn one.  ProfileTooLarge (nothing written) for a document larger than
    ``MAX_PROFILE_BYTES``, which import would refuse to read."""
    size = len(json.dumps(data, indent=2, sort_keys=True).encode("utf-8")) + 1
    if size > MAX_PROFILE_BYTES:
        raise ProfileTooLarge(f"the profile would take {size} bytes; import reads at most "
                              f"{MAX_PROFILE_BYTES}")
    with atomic_open(path, "w", prefix=".profile-") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


# Packing buffers a profile may ask for, per thread: far above any sensible block (a few
# MiB), far below what would make a GEMM call fail for want of memory.
MAX_BLOCK_BYTES = 256 << 20


def check_chosen(chosen):
    """Validated per-dtype blocking (and options) from a profile's "chosen" section;
    ValueError if any value is unusable."""
    if not isinstance(chosen, dict):
        raise ValueError("'chosen' is not an object")
    out = {}
    for dtype in DTYPES:
        section = chosen.get(dtype, {})
        if not isinstance(section, dict):
            raise ValueError(f"'chosen.{dtype}' is not an object")
        unknown = sorted(set(section) - set(TUNABLE))
        if unknown:
            raise ValueError(f"'chosen.{dtype}' has unknown keys {unknown}")
        values = {name: validate(name, section[name]) for name in TUNABLE if name in section}
        size = ITEMSIZE[dtype]
        mc, kc, nc = values.get("mc", 1), values.get("kc", 1), values.get("nc", 1)
        if mc * kc * size > MAX_BLOCK_BYTES or kc * nc * size > MAX_BLOCK_BYTES:
            raise ValueError(f"'chosen.{dtype}' blocks need more than "
                             f"{MAX_BLOCK_BYTES >> 20} MiB of packing buffer")
        out[dtype] = values
    options = chosen.get("options", {})
    if not isinstance(options, dict):
        raise ValueError("'chosen.options' is not an object")
    out["options"] = {name: validate(name, value) for name, value in options.items()
                      if name in OPTIONS}
    if "threads" in chosen:
        out["threads"] = check_int("threads", chosen["threads"], 1, MAX_THREADS)
    return out


# Per-shape convolution choices (``microtile.nn.tune``): at most this many keys, each at most
# this long; a profile is one machine's and a model has tens of layer shapes.
MAX_CONV_CHOICES = 4096
MAX_CONV_KEY = 200


def check_conv_choices(choices):
    """The usable entries of a profile's "conv_algorithms" section: {shape key: algorithm}
    with a key of the form ``conv.shape_key`` writes and a named algorithm (not "auto").
    Entries that are not are dropped, not fatal: a stale or damaged choice only means the
    built-in rule decides for that shape (``conv.convolution`` also checks, per call, that the
    algorithm applies), so no entry can make a convolution compute a wrong result."""
    from microtile._config._schema import CONV_ALGORITHMS
    if not isinstance(choices, dict):
        return {}
    out = {}
    for key, name in list(choices.items())[:MAX_CONV_CHOICES]:
        if (isinstance(key, str) and len(key) <= MAX_CONV_KEY and isinstance(name, str)
                and name in CONV_ALGORITHMS and name != "auto"):
            out[key] = name
    return out


def read_bytes(path, limit=MAX_PROFILE_BYTES):
    """The contents of the regular file at ``path``, at most ``limit`` bytes.

    FileNotFoundError when nothing is there; ProfileError when it is not a regular file
    (refused without blocking: see ``_files.open_regular``) or is larger than ``limit``;
    other OSErrors as the OS reports them.
    """
    try:
        f = open_regular(path)
    except NotRegularFile:
        raise ProfileError("not a regular file") from None
    with f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ProfileError(f"larger than {limit >> 10} KiB")
    return data


def read_json(path):
    """The JSON document at ``path`` (any JSON value); FileNotFoundError when absent,
    ProfileError (a ValueError) for anything else that stops it being read."""
    try:
        text = read_bytes(path).decode("utf-8")
        return json.loads(text)
    except (FileNotFoundError, ProfileError):
        raise
    except OSError as exc:
        raise ProfileError(f"{type(exc).__name__}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        # UnicodeDecodeError and JSONDecodeError are ValueErrors; RecursionError is json's
        # answer to deep nesting.
        raise ProfileError(f"{type(exc).__name__}: {exc}") from None


def _short(text):
    text = str(text)
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON] + "..."


def read(path):
    """(status, data): status "loaded", "stale", "invalid" or "missing"; ``data`` is the
    checked document when loaded, else the reason (None when missing).  Never raises for
    anything in the file."""
    try:
        return _read(path)
    except RecursionError:
        return "invalid", "nested too deeply"
    except Exception as exc:  # noqa: BLE001 - any problem with the file makes it invalid
        return "invalid", _short(f"{type(exc).__name__}: {exc}")


def _read(path):
    try:
        data = read_json(path)
    except FileNotFoundError:
        return "missing", None
    except ProfileError as exc:
        return "invalid", _short(exc)
    version = data.get("schema_version") if isinstance(data, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        return "invalid", "no schema_version"
    if data["schema_version"] != SCHEMA_VERSION:
        return "stale", (f"schema_version {data['schema_version']} (this library reads "
                         f"{SCHEMA_VERSION})")
    if data.get("library_version") != library_version():
        return "stale", f"written by microtile {data.get('library_version')}"
    if data.get("fingerprint") != fingerprint():
        return "stale", "written on another machine (fingerprint differs)"
    try:
        data["chosen"] = check_chosen(data.get("chosen"))
    except (ValueError, TypeError) as exc:
        return "invalid", _short(f"chosen values rejected: {exc}")
    data["conv_algorithms"] = check_conv_choices(data.get("conv_algorithms", {}))
    return "loaded", data


_warned = set()


def load_for_import(isa):
    """(path or None, status, chosen) for the profile in force; warns once when unusable.

    A profile tuned for another kernel set (``MICROTILE_ISA=generic`` on a machine tuned
    for AVX2, say) is still this machine's, so it loads, but its per-dtype values and its
    per-shape convolution choices are left out: they were measured with other kernels.
    Options that do not depend on the kernels still apply.  The convolution choices come
    back as ``chosen["conv_algorithms"]``.
    """
    try:
        path = profile_path()
    except Exception as exc:  # noqa: BLE001 - e.g. a path the OS cannot represent
        path, status, data = os.environ.get("MICROTILE_PROFILE"), "invalid", _short(exc)
    else:
        status, data = read(path)
    if status == "missing":
        return None, "missing", {}
    if status != "loaded":
        if path not in _warned:
            _warned.add(path)
            warnings.warn(f"microtile: profile {path} is {status} ({data}); using built-in "
                          "defaults. Run `python -m autotune` to re-tune.", RuntimeWarning,
                          stacklevel=4)
        return path, status, {}
    chosen = dict(data["chosen"], conv_algorithms=data["conv_algorithms"])
    if not isinstance(data.get("isa"), str) or data["isa"] != isa:
        chosen = {"options": chosen.get("options", {})}
    return path, "loaded", chosen


def new_document(isa):
    """A profile with nothing tuned yet, for this machine and kernel set: what
    ``microtile.nn.tune`` starts from when no profile exists (import then loads it and keeps
    the built-in blocking)."""
    return {"schema_version": SCHEMA_VERSION, "library_version": library_version(),
            "fingerprint": fingerprint(), "isa": isa, "tuner": {"by": "microtile.nn.tune"},
            "probed": {}, "chosen": {}, "measured": {}}


def update(path, isa, edit):
    """Read the profile at ``path`` (a new one when there is none), apply ``edit(doc)`` and
    write it back atomically, under the same lock file the tuner holds for a whole run, so
    an edit never interleaves with ``python -m autotune`` or another edit.  RuntimeError,
    with nothing written, when the file there is stale or invalid (it may be another
    machine's, on a shared home directory) or was tuned for another kernel set."""
    import fcntl
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        status, data = read(path)
        if status == "missing":
            data = new_document(isa)
        elif status != "loaded":
            raise RuntimeError(f"the profile {path} is {status} ({data}); run `python -m "
                               f"autotune` first, or name another file")
        elif data.get("isa") != isa:
            raise RuntimeError(f"the profile {path} was tuned for the {data.get('isa')!r} "
                               f"kernels, not {isa!r}; run `python -m autotune` first")
        edit(data)
        write_atomic(path, data)
    finally:
        os.close(fd)
