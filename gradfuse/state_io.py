"""Checkpoints of every gradfuse optimizer: the matching torch optimizer's state-dict format
(the rule's hooks shape it) plus a 'gradfuse' entry (accumulators, micro-step position,
counters). Loading validates everything before any state changes."""
import copy

import torch

from .distributed_norm import DTensor, is_dtensor, local_tensor

FORMAT_VERSION = 1


def export_state(opt, state_dict):
    """Rewrites Optimizer.state_dict()'s output into the torch rule's layout and adds the cycle state."""
    # Parameter entries (int keys) take the rule's layout; others (a hook's own keys) pass through, as in torch.
    entries = state_dict["state"]
    states = {index: dict(state) for index, state in entries.items() if _is_param_entry(index, state)}
    opt._pack_param_states(states, _read_flags)
    others = {key: value for key, value in entries.items() if not _is_param_entry(key, value)}
    state_dict["state"] = {**{index: state for index, state in states.items() if state}, **others}
    state_dict["gradfuse"] = {
        "format_version": FORMAT_VERSION,
        "accumulation_steps": opt.accumulation_steps,
        "micro_step": opt.micro_step,
        "accumulators": opt._saved_sums(),
        "handback_scale": None if opt._store.handback_scale is None else opt._store.handback_scale.clone(),
        "sums_in_grad": opt._store.sums_in_grad(),
        "skipped_steps": opt.skipped_steps.clone(),
        "last_grad_norm": None if opt.last_grad_norm is None else opt.last_grad_norm.clone(),
        "policies": opt._policy_states(),
        "loss_sum": None if opt._loss_sum is None else opt._loss_sum.clone(),
        "loss_count": opt._loss_count,
    }
    _spread_cycle(opt, state_dict)
    return state_dict


# Mid-cycle, the open cycle also lives where torch.distributed.checkpoint keeps it (DCP keeps only
# 'state' and 'param_groups'): each running sum in its parameter's state entry, the position in
# every group. Loading strips them again; the top-level 'gradfuse' entry wins where both exist.
ACCUMULATOR_KEY, MICRO_STEP_KEY, CYCLE_LENGTH_KEY = "gradfuse_accumulator", "gradfuse_micro_step", \
    "gradfuse_accumulation_steps"
# The cycle policies' state (always) and the open cycle's loss sum live in the first group too.
POLICIES_KEY, LOSS_KEY = "gradfuse_policies", "gradfuse_loss"


def _spread_cycle(opt, state_dict):
    extra = state_dict["gradfuse"]
    if extra["policies"] and state_dict["param_groups"]:
        state_dict["param_groups"][0][POLICIES_KEY] = extra["policies"]
    if extra["micro_step"] == 0:
        return
    if extra["loss_sum"] is not None:
        state_dict["param_groups"][0][LOSS_KEY] = {"sum": extra["loss_sum"], "count": extra["loss_count"]}
    for index, acc in extra["accumulators"].items():
        state_dict["state"].setdefault(index, {})[ACCUMULATOR_KEY] = _like_sharding(acc, opt._layout.params[index])
    for group in state_dict["param_groups"]:
        group[MICRO_STEP_KEY], group[CYCLE_LENGTH_KEY] = extra["micro_step"], extra["accumulation_steps"]


def _like_sharding(acc, param):
    """A DTensor parameter's running sum as a DTensor sharded like it (what DCP saves per shard)."""
    if not is_dtensor(param):
        return acc
    return DTensor.from_local(acc, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def _gather_cycle(opt, state_dict):
    """state_dict with the spread cycle entries taken out; a top-level 'gradfuse' entry built from
    them when it is missing (a DCP round trip)."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), (list, tuple)):
        return state_dict
    groups = [dict(g) if isinstance(g, dict) else g for g in state_dict["param_groups"]]
    positions = {(g.pop(MICRO_STEP_KEY, None), g.pop(CYCLE_LENGTH_KEY, None)) for g in groups if isinstance(g, dict)}
    first = groups[0] if groups and isinstance(groups[0], dict) else {}
    policies, loss = first.pop(POLICIES_KEY, None), first.pop(LOSS_KEY, None)
    entries = state_dict.get("state")
    if not isinstance(entries, dict):
        return state_dict
    accumulators, state = {}, {}
    for index, entry in entries.items():
        if _is_param_entry(index, entry) and ACCUMULATOR_KEY in entry:
            entry = dict(entry)
            accumulators[index] = local_tensor(entry.pop(ACCUMULATOR_KEY))
            if not entry:
                continue  # the entry held only the running sum
        state[index] = entry
    result = dict(state_dict, param_groups=groups, state=state)
    positions.discard((None, None))
    if "gradfuse" not in state_dict and (positions or policies):
        if len(positions) > 1:
            _fail(f"the parameter groups disagree on the cycle's position {sorted(positions, key=str)}")
        micro_step, cycle_length = positions.pop() if positions else (0, opt.accumulation_steps)
        result["gradfuse"] = {"format_version": FORMAT_VERSION, "accumulation_steps": cycle_length,
                              "micro_step": micro_step, "accumulators": accumulators,
                              "skipped_steps": opt.skipped_steps.clone(), "last_grad_norm": opt.last_grad_norm,
                              "policies": _local_policies(policies or {}),
                              "loss_sum": None if loss is None else local_tensor(loss["sum"]),
                              "loss_count": 0 if loss is None else loss["count"]}
    return result


def _local_policies(policies):
    """Policy states as plain tensors (DCP may hand them back as replicated DTensors)."""
    return {role: {key: local_tensor(value) for key, value in state.items()} if isinstance(state, dict) else state
            for role, state in policies.items()}


def _is_param_entry(key, value):
    return isinstance(key, int) and not isinstance(key, bool) and isinstance(value, dict)


def _read_flags(flags):
    """{index: bool} from 0-dim device flags, with one host transfer per device (not one each)."""
    by_device = {}
    for index, flag in flags.items():
        by_device.setdefault(flag.device, []).append(index)
    values = {}
    for indices in by_device.values():
        for index, value in zip(indices, torch.stack([flags[i] for i in indices]).tolist()):
            values[index] = bool(value)
    return values


class _Invalid(ValueError):
    """A reason the state dict cannot be loaded (raised as ValueError naming the optimizer)."""


def _fail(message):
    raise _Invalid(message)


def _check_tensor_for(name, value, param):
    if not isinstance(value, torch.Tensor):
        _fail(f"{name} is {type(value).__name__}, expected a tensor")
    if value.shape != param.shape:
        _fail(f"{name} has shape {tuple(value.shape)} but its parameter has shape {tuple(param.shape)}")
    if not (value.is_floating_point() or (value.is_complex() and param.is_complex())):
        _fail(f"{name} has dtype {value.dtype}, expected a floating-point tensor")


def _validate(opt, state_dict):
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        _fail("not an optimizer state dict (expected a dict with 'state' and 'param_groups')")
    groups, saved_groups = opt.param_groups, state_dict["param_groups"]
    if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(groups):
        _fail(f"it has {len(saved_groups) if isinstance(saved_groups, (list, tuple)) else 'no'} parameter groups, "
              f"this optimizer has {len(groups)}")
    params = opt._layout.params
    for g, (group, saved) in enumerate(zip(groups, saved_groups)):
        if not isinstance(saved, dict) or len(saved.get("params", ())) != len(group["params"]):
            _fail(f"parameter group {g} has a different number of parameters than this optimizer's")
        missing = [k for k in opt._GROUP_KEYS if k not in saved and k not in opt._LEGACY_GROUP_DEFAULTS]
        if missing:
            _fail(f"parameter group {g} lacks {missing}: this is not a torch.optim.{opt._RULE} / {opt._name} "
                  f"state dict")
        candidate = {**opt.defaults, **opt._LEGACY_GROUP_DEFAULTS,
                     **{k: v for k, v in saved.items() if k in opt.defaults}}
        try:
            opt._check_group(candidate)
        except (TypeError, ValueError) as error:
            _fail(f"parameter group {g}: {error}")
    state = state_dict["state"]
    if not isinstance(state, dict):
        _fail("'state' is not a dict")
    for index, entry in state.items():
        if not isinstance(index, int) or isinstance(index, bool):
            continue  # not a parameter's entry (a state-dict hook's own key): passed through as torch does
        if not 0 <= index < len(params):
            _fail(f"state has an entry for parameter {index!r}, but there are {len(params)} parameters")
        if not isinstance(entry, dict):
            _fail(f"state of parameter {index} is not a dict")
        unknown = set(entry) - opt._STATE_KEYS
        if unknown:
            _fail(f"state of parameter {index} has keys {sorted(unknown)} that {opt._RULE} does not use "
                  f"(a state dict of another optimizer?)")
        opt._check_loaded_state(index, entry, params[index], _check_tensor_for)
    opt._store.check_loaded(state, opt._STATE_KEYS)
    extra = state_dict.get("gradfuse")
    if extra is None:
        return
    required = ("format_version", "accumulation_steps", "micro_step", "accumulators", "skipped_steps")
    if not isinstance(extra, dict) or any(k not in extra for k in required):
        _fail(f"the 'gradfuse' entry is truncated or corrupted (expected keys {list(required)})")
    if extra["format_version"] != FORMAT_VERSION:
        _fail(f"unknown gradfuse format_version {extra['format_version']!r}")
    micro_step = extra["micro_step"]
    if isinstance(micro_step, bool) or not isinstance(micro_step, int) or not 0 <= micro_step < opt.accumulation_steps:
        _fail(f"micro_step {micro_step!r} is outside this optimizer's cycle of {opt.accumulation_steps} micro-steps")
    if micro_step > 0 and extra["accumulation_steps"] != opt.accumulation_steps:
        _fail(f"it was saved mid-cycle with accumulation_steps={extra['accumulation_steps']}, this optimizer has "
              f"{opt.accumulation_steps}")
    accumulators = extra["accumulators"]
    if not isinstance(accumulators, dict) or (micro_step == 0 and accumulators):
        _fail("the saved accumulators do not match the saved micro_step")
    for index, acc in accumulators.items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            _fail(f"an accumulator names parameter {index!r}, but there are {len(params)} parameters")
        _check_tensor_for(f"the accumulator of parameter {index}", acc, local_tensor(params[index]))  # per rank
    skipped = extra["skipped_steps"]
    if not isinstance(skipped, torch.Tensor) or skipped.numel() != 1 or skipped.is_floating_point():
        _fail("skipped_steps must be a 1-element integer tensor")
    last = extra.get("last_grad_norm")
    if last is not None and (not isinstance(last, torch.Tensor) or last.numel() != 1 or not last.is_floating_point()):
        _fail("last_grad_norm must be None or a 1-element floating-point tensor")
    scale = extra.get("handback_scale")
    if scale is not None and (not isinstance(scale, torch.Tensor) or scale.numel() != 1 or not scale.is_floating_point()):
        _fail("handback_scale must be None or GradScaler's 1-element floating-point scale")
    if not isinstance(extra.get("sums_in_grad", False), bool):
        _fail("sums_in_grad must be a bool")
    _validate_policies(opt, extra.get("policies") or {})


def _validate_policies(opt, saved):
    """A policy's saved state loads only into an optimizer with the same policy."""
    if not isinstance(saved, dict):
        _fail("the saved policy states are not a dict")
    for role, state in saved.items():
        policy = getattr(opt, role, None) if role in ("clip", "skip") else None
        if policy is None:
            _fail(f"it was saved with a {role}= policy ({role!r} state {sorted(state)}) that this optimizer does "
                  f"not have; pass the same {role}=... to resume it (or drop state_dict['gradfuse']"
                  f"['policies'][{role!r}] to start without it)")
        try:
            copy.copy(policy).load_state(state, torch.device("cpu"))  # a trial load: the policy itself is untouched
        except ValueError as error:
            _fail(str(error))


def _like_param(value, param):
    """A copy of value with param's dtype, device and memory layout (the ops sweep flat memory)."""
    return torch.empty_like(param).copy_(value)


def _by_position(state_dict):
    """state_dict with its parameters named by position (0, 1, ... over the groups), as torch's
    load_state_dict maps them: saved ids may be any keys (torch.distributed.checkpoint uses
    fully qualified names); state entries under other keys pass through."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("param_groups"), (list, tuple)) \
            or not isinstance(state_dict.get("state"), dict):
        return state_dict
    groups = state_dict["param_groups"]
    saved = [key for g in groups if isinstance(g, dict) for key in g.get("params", ())]
    if all(isinstance(k, int) and not isinstance(k, bool) for k in saved):
        return state_dict
    position = {key: i for i, key in enumerate(saved)}
    renamed, start = [], 0
    for g in groups:
        if isinstance(g, dict):
            count = len(g.get("params", ()))
            g = dict(g, params=list(range(start, start + count)))
            start += count
        renamed.append(g)
    state = {position.get(key, key): entry for key, entry in state_dict["state"].items()}
    return dict(state_dict, param_groups=renamed, state=state)


def import_state(opt, state_dict, base_load):
    try:
        state_dict = _gather_cycle(opt, _by_position(state_dict))
        _validate(opt, state_dict)
    except ValueError as invalid:  # _fail's, or a rule hook's
        raise ValueError(f"{opt._name}.load_state_dict: {invalid}") from None
    base = {"state": copy.copy(state_dict["state"]), "param_groups": state_dict["param_groups"]}
    base["state"] = {i: ({k: v for k, v in s.items() if v is not None} if _is_param_entry(i, s) else s)
                     for i, s in base["state"].items()}
    base_load(base)  # Optimizer.load_state_dict: casts buffers to each parameter's dtype and device
    for group in opt.param_groups:  # keys torch added later (maximize, ...), filled as torch's __setstate__ does
        for key, value in opt._LEGACY_GROUP_DEFAULTS.items():
            group.setdefault(key, value)
    for p in opt._layout.params:
        state = opt.state.get(p)
        if state:
            opt._unpack_loaded_state(p, state, _like_param)
    opt._store.forget_state()
    opt._load_cycle(state_dict.get("gradfuse") or {})
    opt._load_policy_states((state_dict.get("gradfuse") or {}).get("policies") or {})
