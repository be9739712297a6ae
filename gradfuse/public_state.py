"""torch.optim's public state is the truth: the update's state tensors are read from opt.state at
every cycle's end, and an edit of opt.param_groups is noticed at the next step. Anything derived
from them is checked cheaply (native identity passes) and rebuilt when they change."""
import sys

import torch

from ._native import gather_param_state, same_objects
from .distributed_norm import local_tensor
from .kernel_views import is_dense
from .tracked_state import TrackedState, tracked


def current_state(opt):
    """opt.state, made a TrackedState again if torch's load_state_dict or a user replaced it."""
    if type(opt.state) is not TrackedState:
        opt.state = tracked(opt.state)
    return opt.state


def unchanged_since(opt, seen):
    """Whether opt.state is the object, at the write count, recorded in seen ((state, writes) or None)."""
    return seen is not None and seen[0] is opt.state and seen[1] == opt.state.writes


class RuleStateReader:
    """Reads the rule's per-parameter state lists of each bucket from opt.state, remembering what it
    checked last; forget() when the layout changes."""

    def __init__(self):
        self.checked = {}  # bucket -> (keys, state lists, (state, writes)) last validated

    def forget(self):
        self.checked = {}

    def lists(self, opt, bucket_index, params, group, keys):
        """[[opt.state[p][key] for p in params] for key in keys], creating what is missing with the
        rule's _new_param_state (as torch.optim creates state lazily) and checking, for tensors not
        seen at the last check, that each fits its parameter; raises before anything changes. Read
        anew only when opt.state was written since the last call (its write counter moved)."""
        state = current_state(opt)
        checked = self.checked.get(bucket_index)
        if checked is not None and checked[0] == keys and unchanged_since(opt, checked[2]):
            return checked[1]
        lists, incomplete = gather_param_state(state, params, list(keys))
        if incomplete:
            for i in incomplete:
                p = params[i]
                entry = state[p]
                entry.update(opt._new_param_state(p, group, entry))
            lists, incomplete = gather_param_state(opt.state, params, list(keys))
        if checked is None or checked[0] != keys or not all(same_objects(a, b) for a, b in zip(lists, checked[1])):
            for key, values in zip(keys, lists):
                for i, (p, value) in enumerate(zip(params, values)):
                    fixed = _checked_value(opt, p, key, value, opt._ELEMENT_KEYS)
                    if fixed is not value:
                        state[p][key] = values[i] = fixed
        self.checked[bucket_index] = (keys, lists, (state, state.writes))
        return lists


def _checked_value(opt, p, key, value, element_keys):
    """value if it can serve as parameter p's state[key]; a converted copy of a step count kept the
    way torch keeps it (a Python number or a CPU tensor); else a ValueError naming the fix."""
    own = local_tensor(p)

    def where():  # called only for a refusal: finding p's index is a search over every parameter
        layout = opt._layout
        index = next(i for i, q in enumerate(layout.params) if q is p)
        return f"{opt._name}: opt.state[p][{key!r}] of {layout.describe(index)}"

    if key in element_keys:
        if not isinstance(value, torch.Tensor) or local_tensor(value).shape != own.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{where()} is {shape}, but the parameter has shape {tuple(own.shape)}; set a tensor "
                             f"like the parameter, or reset the state with opt.state[p] = {{}}")
        local = local_tensor(value)
        if local.dtype != own.dtype or local.device != own.device:
            if value is not local or local.is_complex() != own.is_complex():
                raise ValueError(f"{where()} is {local.dtype} on {local.device}, but the parameter is {own.dtype} on "
                                 f"{own.device}; set a tensor like the parameter, or reset the state with "
                                 f"opt.state[p] = {{}}")
            return torch.empty_like(own).copy_(value)  # the parameter was cast or moved: its state follows, as loading does
        if value is local and local.numel() > 1 and local.stride() != _state_strides(own):
            return torch.empty_like(own).copy_(value)  # a copy the kernels sweep alongside the parameter
        return value
    if key == "step":
        if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype == torch.float32 \
                and value.device == own.device:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)) or \
                (isinstance(value, torch.Tensor) and value.numel() != 1):
            raise ValueError(f"{where()} must be a number or a 1-element tensor, got {value!r}")
        return torch.tensor(float(value), dtype=torch.float32, device=own.device)  # where the update counts
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or value.device != own.device:
        raise ValueError(f"{where()} is {value!r}; reset the state with opt.state[p] = {{}}")
    return value


def _state_strides(param):
    """The layout the kernels need for a state tensor of param: its own, or (a non-dense param) the
    dense layout empty_like gives it."""
    return param.stride() if is_dense(param) else torch.empty_like(param).stride()


def param_groups_changed(opt):
    """Whether opt.param_groups no longer lists the parameters the layout was built from (a group
    added or removed by hand, params appended, removed or replaced)."""
    groups, snapshot = opt.param_groups, opt._layout.group_lists
    if len(groups) != len(snapshot):
        return True
    for group, seen in zip(groups, snapshot):
        params = group["params"]
        if type(params) is not list or not same_objects(params, seen):
            return True
    return False


def called_by_dcp_init():
    """Whether step() was called by torch.distributed.checkpoint's optimizer-state initialisation
    (a zero-gradient, lr=0 step that only creates state), found on the call stack."""
    module = sys.modules.get("torch.distributed.checkpoint.state_dict")
    init = getattr(module, "_init_optim_state", None)
    if init is None:
        return False
    code, frame = init.__code__, sys._getframe(1)
    for _ in range(12):  # step's decorators and torch's step hooks sit in between
        if frame is None:
            return False
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False
