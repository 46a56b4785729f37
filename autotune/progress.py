"""Progress lines on stderr, each stamped with the seconds since the run began, so stdout
carries only the result (the table, or the JSON with ``--json``)."""
import sys
import time


class Progress:
    def __init__(self, stream=None, quiet=False):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.t0

    def __call__(self, msg):
        if self.quiet:
            return
        try:
            self.stream.write(f"[{self.elapsed():6.1f}s] {msg}\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe must not fail the run
            pass
