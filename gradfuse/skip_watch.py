"""A warning when training has stopped progressing: every cycle of a whole window skipped for a
non-finite norm (a NaN loss, a learning rate that diverged). The skip counter lives on the device;
it is copied to the host without waiting (a CUDA event marks when the copy is done) and read at a
later cycle, so step() never waits for the GPU for this."""
import warnings

import torch

DEFAULT_INTERVAL = 50  # cycles per window; opt.skip_warning_interval = 0 turns the watch off


class SkipWatch:
    __slots__ = ("pending", "last", "warned")

    def __init__(self):
        self.pending = None  # (host copy of skipped_steps, its CUDA event or None, cycles_completed then)
        self.last = None  # (skipped, cycles) at the last reading
        self.warned = False

    def after_cycle(self, opt, name):
        """Called once per completed cycle."""
        interval = opt.skip_warning_interval
        if not interval or self.warned or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return  # (inside CUDA graph capture this Python runs once, not at each replay: nothing to watch)
        if self.pending is not None:
            host, event, cycles = self.pending
            if event is not None and not event.query():
                return  # the copy is not done yet: read it at a later cycle
            self.pending = None
            skipped = int(host)
            if self.last is not None:
                window = cycles - self.last[1]
                if window >= interval and skipped - self.last[0] == window:
                    self.warned = True
                    warnings.warn(f"{name}: training is not progressing: all of the last {window} cycles were "
                                  f"skipped for a non-finite gradient norm (skipped_steps = {skipped}). Check the loss "
                                  f"for NaN/inf and the learning rate; skip_nonfinite=False or error_if_nonfinite=True "
                                  f"stops at the first such cycle", stacklevel=4)
            self.last = (skipped, cycles)
        if opt.cycles_completed % interval == 0:
            counter = opt.skipped_steps
            if counter.is_cuda:
                host = torch.empty((), dtype=counter.dtype, pin_memory=True)
                host.copy_(counter, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host, event = counter.clone(), None
            self.pending = (host, event, opt.cycles_completed)
