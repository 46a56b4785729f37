"""What the operating system says about this machine: caches and usable CPUs.

Read without timing anything, so ``import microtile`` stays fast; the tuner confirms these
figures by measurement (``autotune.probes``).
"""
import os
import platform
import subprocess
import sys

_SYSFS_CPU = "/sys/devices/system/cpu"


def _parse_size(text):
    """'32K' -> 32768, '512K', '32M', '1024' (bytes) -> int; None if unreadable."""
    text = text.strip().upper()
    if not text:
        return None
    mult = 1
    if text[-1] in "KMG":
        mult = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}[text[-1]]
        text = text[:-1]
    try:
        return int(text) * mult
    except ValueError:
        return None


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def read_caches(root=_SYSFS_CPU):
    """Data and unified caches of CPU 0 from Linux sysfs (``root`` may point at a fake tree).

    Returns a list of dicts ``{"level", "type", "size", "line", "ways", "sets", "shared_cpus"}``
    sorted by level; values the OS does not give are None.  Empty when nothing is readable.
    """
    caches = []
    base = os.path.join(root, "cpu0", "cache")
    try:
        entries = sorted(e for e in os.listdir(base) if e.startswith("index"))
    except OSError:
        entries = []
    for entry in entries:
        d = os.path.join(base, entry)
        ctype = _read(os.path.join(d, "type"))
        if ctype not in ("Data", "Unified"):
            continue
        level = _read(os.path.join(d, "level"))
        size = _parse_size(_read(os.path.join(d, "size")) or "")
        line = _read(os.path.join(d, "coherency_line_size"))
        ways = _read(os.path.join(d, "ways_of_associativity"))
        sets = _read(os.path.join(d, "number_of_sets"))
        shared = _read(os.path.join(d, "shared_cpu_list"))
        entry = {
            "level": _int(level),
            "type": ctype,
            "size": size or None,
            "line": _int(line),
            "ways": _int(ways),
            "sets": _int(sets),
            "shared_cpus": _count_cpu_list(shared) if shared else None,
        }
        # Some kernels (arm64 with ACPI PPTT) give the geometry but no size.
        if entry["size"] is None and entry["line"] and entry["ways"] and entry["sets"]:
            entry["size"] = entry["line"] * entry["ways"] * entry["sets"]
        caches.append(entry)
    caches = [c for c in caches if c["level"] is not None]
    caches.sort(key=lambda c: c["level"])
    if not caches and root == _SYSFS_CPU and sys.platform == "darwin":
        caches = read_caches_sysctl()
    return caches


def _int(text):
    """A positive int from sysfs text, else None (0 means 'unknown' there)."""
    if text and text.isdigit() and int(text) > 0:
        return int(text)
    return None


def _sysctl(name):
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True,
                             timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return int(text) if out.returncode == 0 and text.isdigit() and int(text) > 0 else None


def read_caches_sysctl(query=_sysctl):
    """Caches from macOS ``sysctl`` (``query(name) -> int or None`` may be a fake).

    Apple silicon describes its performance cores under ``hw.perflevel0``; Intel Macs under
    ``hw``.  macOS gives neither ways nor sets, so those stay None (the model falls back).
    """
    line = query("hw.cachelinesize")
    caches = []
    for level, key in ((1, "l1dcachesize"), (2, "l2cachesize"), (3, "l3cachesize")):
        size = query(f"hw.perflevel0.{key}") or query(f"hw.{key}")
        if size:
            caches.append({"level": level, "type": "Data" if level == 1 else "Unified",
                           "size": size, "line": line, "ways": None, "sets": None,
                           "shared_cpus": query(f"hw.perflevel0.cpusperl{level}")})
    return caches


def _count_cpu_list(text):
    """'0-3,8' -> 5."""
    n = 0
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            n += int(hi) - int(lo) + 1
        else:
            n += 1
    return n


def cgroup_cpu_limit(root="/sys/fs/cgroup"):
    """CPUs allowed by a cgroup quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), or None."""
    text = _read(os.path.join(root, "cpu.max"))
    if text:
        parts = text.split()
        if len(parts) == 2 and parts[0] != "max":
            try:
                return max(1, int(-(-int(parts[0]) // int(parts[1]))))
            except (ValueError, ZeroDivisionError):
                return None
        return None
    quota = _read(os.path.join(root, "cpu", "cpu.cfs_quota_us"))
    period = _read(os.path.join(root, "cpu", "cpu.cfs_period_us"))
    try:
        if quota and period and int(quota) > 0:
            return max(1, -(-int(quota) // int(period)))
    except (ValueError, ZeroDivisionError):
        pass
    return None


def usable_cpus():
    """CPUs this process may run on: affinity mask, capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, limit)
    return max(1, n)


def machine():
    """Architecture name as the platform reports it (x86_64, aarch64, arm64, ...)."""
    return platform.machine().lower()


def cpu_model():
    """The CPU's model name, or the platform's processor string."""
    text = _read("/proc/cpuinfo")
    if text:
        for line in text.splitlines():
            if line.lower().startswith(("model name", "cpu model", "processor\t: arm")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or machine()
