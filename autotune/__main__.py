"""``python -m autotune``: tune microtile for this machine and write its profile.

Exit status: 0 on success, 2 on bad arguments, 1 on failure (the reason on stderr).  A
failed or interrupted run leaves the previous profile as it was.
"""
import argparse
import json
import os
import signal
import sys

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _positive_int(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if not 1 <= n <= 4096:
        raise argparse.ArgumentTypeError(f"expected 1..4096, got {n}")
    return n


def parser():
    from microtile._config._schema import DTYPES
    p = argparse.ArgumentParser(
        prog="python -m autotune",
        description="Measure this machine and choose microtile's blocking and threading "
                    "parameters; writes the per-machine profile that `import microtile` "
                    "loads.")
    p.add_argument("--quick", action="store_true",
                   help="a shorter search (under a minute on 2 cores)")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="thread count to tune for (default: the usable CPUs)")
    p.add_argument("--dtype", choices=DTYPES + ("all",), default="all",
                   help="tune one dtype only; the other keeps its profile values")
    p.add_argument("--profile", metavar="PATH",
                   help="profile file to write or show (default: $MICROTILE_PROFILE, else "
                        "the user cache directory)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--show", action="store_true", help="print the profile in use and exit")
    what.add_argument("--reset", action="store_true", help="delete the profile and exit")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _fail(msg, code=EXIT_FAIL):
    print(f"autotune: error: {msg}", file=sys.stderr)
    return code


def _show(path, as_json):
    from autotune import profile, report
    status, reason, doc = profile.show(path)
    if as_json:
        print(json.dumps({"path": path, "status": status, "reason": reason, "profile": doc},
                         indent=2, sort_keys=True))
        return EXIT_OK
    print(f"profile: {path} ({status}{': ' + str(reason) if reason else ''})")
    if status == "missing":
        print("no profile yet: run `python -m autotune` to tune this machine")
    elif doc is not None and isinstance(doc, dict):
        try:
            print()
            print(report.summary(doc, path))
        except (TypeError, KeyError, ValueError, AttributeError):
            print(json.dumps(doc, indent=2, sort_keys=True))
    return EXIT_OK


def _reset(path, as_json):
    from autotune import profile
    removed = profile.reset(path)
    if as_json:
        print(json.dumps({"path": path, "removed": removed}))
    else:
        print(f"removed {path}" if removed else f"no profile at {path}")
    return EXIT_OK


class _Interrupts:
    """SIGINT and SIGTERM stop the run with KeyboardInterrupt, until the profile is written.

    Both handlers are installed whatever the process inherited: a shell that starts a job in
    the background without job control (``sh -c 'python -m autotune &'``, many CI runners)
    sets SIGINT to "ignore", and Python then never raises KeyboardInterrupt, so a Ctrl-C or
    ``kill -INT`` let the run finish and write its profile (exit 0).  From the moment the
    write starts the run cannot be called interrupted any more (the new profile may already
    be in place), so a signal then is only noted, and reported when the run ends.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM")
                    if hasattr(signal, name))

    def __init__(self):
        self.committing = False
        self.pending = None
        self.saved = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self.saved[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):   # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self.saved.items():
            signal.signal(sig, old)
        return False

    def _handle(self, signum, frame):
        if self.committing:
            self.pending = signal.Signals(signum).name
            return
        raise KeyboardInterrupt

    def commit(self):
        """From now on a signal no longer interrupts the run (the write has begun)."""
        self.committing = True


def main(argv=None):
    p = parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:       # argparse: 2 for bad arguments, 0 for --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.show or args.reset:
        extra = [flag for flag, on in (("--quick", args.quick),
                                       ("--threads", args.threads is not None),
                                       ("--dtype", args.dtype != "all")) if on]
        if extra:
            p.print_usage(sys.stderr)
            return _fail(f"{', '.join(extra)} cannot be combined with "
                         f"{'--show' if args.show else '--reset'}", EXIT_USAGE)
    from autotune import profile
    path = profile.resolve_path(args.profile)
    if os.path.isdir(path):
        return _fail(f"profile path {path} is a directory", EXIT_USAGE)
    if args.show:
        return _show(path, args.json)
    if args.reset:
        return _reset(path, args.json)

    from autotune import progress, report, tuner
    say = progress.Progress()
    dtypes = tuner.DTYPES if args.dtype == "all" else (args.dtype,)
    with _Interrupts() as interrupts:
        try:
            with profile.run_lock(path, say):
                say(f"tuning ({'quick' if args.quick else 'full'} run) for {path}")
                doc = tuner.run(quick=args.quick, threads=args.threads, dtypes=dtypes,
                                say=say, path=path)
                interrupts.commit()
                profile.write(path, doc)
        except KeyboardInterrupt:
            return _fail("interrupted; the previous profile is unchanged")
        except Exception as exc:  # any failure (the write is atomic): the old profile stays
            return _fail(f"{type(exc).__name__}: {exc}; the previous profile is unchanged")
        say(f"done in {say.elapsed():.1f} s")
        if args.json:
            print(json.dumps({"path": path, "status": "written", "profile": doc}, indent=2,
                             sort_keys=True))
        else:
            print(report.summary(doc, path))
            from microtile._config import _profile
            if path != _profile.profile_path():
                print(f"(`import microtile` reads {_profile.profile_path()}; set "
                      f"MICROTILE_PROFILE={path} to use this one)")
        if interrupts.pending:
            print(f"autotune: {interrupts.pending} arrived while the profile was being "
                  f"written; the run had finished and the new profile is in place",
                  file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
