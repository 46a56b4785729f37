"""A one-line progress bar for fit, drawn only on a terminal."""
import sys
import time


class Progress:
    """Redraws ``epoch e/E [#####.....] done/total loss ... samples/s`` in place.

    Disabled (every method a no-op) unless ``enabled`` and the stream is a TTY, so logs and
    pipes never receive carriage returns.  Redraws at most every 0.1 s.
    """

    WIDTH = 24

    def __init__(self, total, epochs, enabled=True, stream=None):
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(enabled) and callable(isatty) and bool(isatty())
        self.total = total
        self.epochs = epochs
        self.epoch = 0
        self._t0 = self._last = 0.0

    def start_epoch(self, epoch):
        self.epoch = epoch
        self._t0 = self._last = time.perf_counter()

    def update(self, done, loss, accuracy=None, force=False):
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        frac = done / self.total if self.total else 1.0
        filled = int(round(self.WIDTH * frac))
        rate = done / (now - self._t0) if now > self._t0 else 0.0
        text = (f"\repoch {self.epoch + 1}/{self.epochs} [{'#' * filled}"
                f"{'.' * (self.WIDTH - filled)}] {done}/{self.total} loss {loss:.4f}")
        if accuracy is not None:
            text += f" acc {accuracy:.4f}"
        text += f" {rate:,.0f} samples/s"
        self.stream.write(text)
        self.stream.flush()

    def end_epoch(self, done, loss, accuracy=None, extra=""):
        if not self.enabled:
            return
        self.update(done, loss, accuracy, force=True)
        self.stream.write(extra + "\n")
        self.stream.flush()
