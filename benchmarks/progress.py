"""A minimal progress bar on stderr (no dependency); silent when stderr is not a terminal
unless forced, so logs stay readable."""
import sys
import time


class Progress:
    def __init__(self, total, width=30, stream=None, enabled=True):
        self.total = max(1, total)
        self.done = 0
        self.width = width
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.start = time.perf_counter()
        self._tty = getattr(self.stream, "isatty", lambda: False)()

    def step(self, label=""):
        """Marks one unit as started (label = what is running now)."""
        if not self.enabled:
            return
        filled = int(self.width * self.done / self.total)
        elapsed = time.perf_counter() - self.start
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{elapsed:6.0f}s  {label}")
        if self._tty:
            self.stream.write("\r\033[K" + line[:160])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.done += 1

    def close(self):
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        end = "\r\033[K" if self._tty else ""
        self.stream.write(f"{end}[{'#' * self.width}] {self.total}/{self.total} done in {elapsed:.0f}s\n")
        self.stream.flush()
