"""LR schedulers that follow updates, not micro-batches. Frameworks step a scheduler after every
optimizer.step() call (Lightning's interval="step", Accelerate's prepared scheduler), and with
gradfuse that is every micro-batch: K scheduler steps per update. PerCycle advances the wrapped
scheduler once per completed accumulation cycle, whenever and however often its step() is called."""
import warnings

from torch.optim.lr_scheduler import LRScheduler


class PerCycle(LRScheduler):
    """PerCycle(scheduler): scheduler.step() once per update of its gradfuse optimizer.

    It is an LRScheduler (frameworks check that), but it neither changes the learning rate when it
    is built nor keeps a schedule of its own: everything else (get_last_lr, last_epoch, ...) is the
    wrapped scheduler's. Call its step() after every optimizer.step(), or let the framework do it."""

    def __init__(self, scheduler):
        # No super().__init__(): it would step the wrapped schedule once more.
        optimizer = getattr(scheduler, "optimizer", None)
        if not hasattr(optimizer, "cycles_completed"):
            raise TypeError(f"PerCycle wraps a scheduler of a gradfuse optimizer, got one of "
                            f"{type(optimizer).__name__}")
        self.scheduler, self.optimizer = scheduler, optimizer
        self._cycles_seen = optimizer.cycles_completed

    def step(self, *args, **kwargs):
        """Advances the wrapped scheduler once for each cycle completed since the last call."""
        completed = self.optimizer.cycles_completed
        for _ in range(completed - self._cycles_seen):
            self.scheduler.step(*args, **kwargs)
        self._cycles_seen = completed

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict):
        self.scheduler.load_state_dict(state_dict)
        self._cycles_seen = self.optimizer.cycles_completed  # counts from the resumed optimizer on

    def get_last_lr(self):
        return self.scheduler.get_last_lr()

    def __getattr__(self, name):  # anything else: the wrapped scheduler's
        scheduler = self.__dict__.get("scheduler")
        if scheduler is None:
            raise AttributeError(name)
        return getattr(scheduler, name)


class HyperparameterWatch:
    """Called by step() at every micro-step: records each group's plain-number hyperparameters
    (lr, momentum, weight_decay, betas, ...) when a cycle starts and warns once if one changed before
    the cycle's update (a scheduler stepped per micro-batch). Tensor values are not compared (reading
    them would cost a host sync)."""
    __slots__ = ("seen", "warned")

    def __init__(self):
        self.seen, self.warned = [], False

    def note(self, opt, name):
        if opt.accumulation_steps == 1:
            return  # every step() ends its cycle: nothing can change inside one
        groups = opt.param_groups
        if opt.micro_step == 0 or len(groups) != len(self.seen):
            self.seen = [_plain_values(g) for g in groups]
            return
        if self.warned:
            return
        for index, (group, seen) in enumerate(zip(groups, self.seen)):
            for key, value in seen.items():
                if group.get(key) == value:
                    continue
                self.warned = True
                warnings.warn(f"{name}: param_groups[{index}][{key!r}] changed from {value} to {group.get(key)} "
                              f"inside an accumulation cycle (micro-step {opt.micro_step + 1} of "
                              f"{opt.accumulation_steps}); the update uses the value at the cycle's end. A scheduler "
                              f"stepped after every step() call advances accumulation_steps times per update: wrap "
                              f"it, gradfuse.PerCycle(scheduler), or step it only when opt.micro_step == 0",
                              stacklevel=4)
                return


def _plain_values(group):
    # The group's hyperparameters that are plain numbers (or tuples of them), compared without a sync.
    def plain(value):
        return isinstance(value, (int, float)) or (isinstance(value, tuple) and all(isinstance(v, (int, float))
                                                                                     for v in value))
    return {key: value for key, value in group.items() if key != "params" and plain(value)}
