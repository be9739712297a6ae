"""Which store holds each mode's running sums (the interface: sum_store.py)."""
from .adopting_store import AdoptingStore
from .backward_hook_store import BackwardHookStore
from .distributed_norm import ranks_communicate
from .flat_store import FlatStore
from .hand_back_store import HandBackStore
from .resident_store import ResidentSumStore

MODES = ("default", "accumulate_in_backward", "flat_buffers")


def make(mode, name, layout, accum_dtype, previous=None, hot_norm=None, sum_in_grad=True):
    """The store of `mode` over layout, carrying previous's sums (and buffers) where it can.
    hot_norm: the optimizer's weak norm-target method, for the stores that take the norm while hot."""
    if mode == "flat_buffers":
        return FlatStore(name, layout, accum_dtype, previous)
    if mode == "accumulate_in_backward":
        return BackwardHookStore(name, layout, previous, hot_norm)
    if ranks_communicate():
        return HandBackStore(name, layout, previous, keep_apart=not sum_in_grad)
    return _default_store(sum_in_grad)(name, layout, previous)


def _default_store(sum_in_grad):
    """Where ranks communicate, the default mode hands its sums back for DDP's one all-reduce; alone,
    its sums stay in .grad between micro-batches (both unless sum_in_grad=False)."""
    if ranks_communicate():
        return HandBackStore
    return ResidentSumStore if sum_in_grad else AdoptingStore


def for_new_cycle(store, accum_dtype, sum_in_grad=True):
    """At a cycle's start: the default mode's store follows whether ranks communicate now (a
    process group may be set up, or torn down, after the optimizer was built)."""
    if store.mode == "default" and type(store) is not _default_store(sum_in_grad):
        return make("default", store.name, store.layout, accum_dtype, store, sum_in_grad=sum_in_grad)
    return store
