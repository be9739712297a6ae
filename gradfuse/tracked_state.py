"""opt.state as torch.optim keeps it (a defaultdict of per-parameter dicts) that also counts its
writes: every write the torch way (state[p] = ..., state[p][key] = ..., clear, pop, update, del)
bumps one shared counter, so the update can reuse the state lists it read last time when the
counter has not moved, instead of reading every parameter's entry at every step. Reads are plain
dict reads."""
from collections import defaultdict


class _Counter:
    __slots__ = ("writes",)

    def __init__(self):
        self.writes = 0


def _counting(name):
    base = getattr(dict, name)

    def method(self, *args, **kwargs):
        self._counter.writes += 1
        return base(self, *args, **kwargs)
    method.__name__ = name
    return method


_WRITES = ("__setitem__", "__delitem__", "clear", "pop", "popitem", "setdefault", "update", "__ior__")


class TrackedEntry(dict):
    """One parameter's state dict."""
    __slots__ = ("_counter",)

    def __init__(self, counter, *args):
        super().__init__(*args)
        self._counter = counter

    def __reduce__(self):  # pickles and deep-copies as a plain dict; the optimizer tracks it again
        return dict, (dict(self),)


for _name in _WRITES:
    setattr(TrackedEntry, _name, _counting(_name))


class _NewEntry:
    """The default factory: a fresh tracked entry (a class, so the defaultdict still pickles)."""
    __slots__ = ("counter",)

    def __init__(self, counter):
        self.counter = counter

    def __call__(self):
        return TrackedEntry(self.counter)


class TrackedState(defaultdict):
    """opt.state: parameter -> TrackedEntry; plain dict values written into it are tracked too."""

    def __init__(self, items=()):
        counter = _Counter()
        super().__init__(_NewEntry(counter))
        self._counter = counter
        for key, value in dict(items).items():
            dict.__setitem__(self, key, self._entry(value))

    def _entry(self, value):
        return TrackedEntry(self._counter, value) if type(value) is dict else value

    def __setitem__(self, key, value):
        self._counter.writes += 1
        super().__setitem__(key, self._entry(value))

    def update(self, *args, **kwargs):
        self._counter.writes += 1
        for key, value in dict(*args, **kwargs).items():
            super().__setitem__(key, self._entry(value))

    def setdefault(self, key, default=None):
        self._counter.writes += 1
        return super().setdefault(key, self._entry(default))

    def __reduce__(self):  # pickles and deep-copies as torch's plain defaultdict(dict)
        return _plain_state, (dict(self),)

    @property
    def writes(self):
        return self._counter.writes


for _name in ("__delitem__", "clear", "pop", "popitem"):
    setattr(TrackedState, _name, _counting(_name))


def _plain_state(items):
    return defaultdict(dict, items)


def tracked(state):
    """state itself when it is already tracked; else a tracked copy holding the same entries'
    contents (torch's load_state_dict, or a user, put a plain defaultdict there)."""
    return state if type(state) is TrackedState else TrackedState(state)
