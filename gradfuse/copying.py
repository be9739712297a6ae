"""copy.deepcopy, pickle and torch.save of a gradfuse optimizer: torch.optim's pickled fields
(defaults, state, param_groups) plus the optimizer-wide settings and the open cycle, from which
the copy rebuilds every private structure (layout, native inspectors, flat buffers)."""
SETTINGS = ("accumulation_steps", "max_grad_norm", "norm_type", "skip_nonfinite", "error_if_nonfinite",
            "accum_dtype", "process_group")


def extra_state(opt):
    """What a copy needs beyond torch.optim's fields."""
    if opt._backward is not None:
        raise RuntimeError(f"{opt._name}: an optimizer with accumulate_in_backward=True cannot be copied or pickled "
                           f"(its backward hooks belong to the original parameters); save opt.state_dict() and "
                           f"load it into a new optimizer instead")
    settings = {name: getattr(opt, name) for name in SETTINGS}
    settings["flat_buffers"] = opt._flat is not None
    return {
        "settings": settings,
        "micro_step": opt._micro_step,
        "accumulators": {opt._order[k]: acc for k, acc in opt._saved_accumulators().items()},
        "handback_scale": opt._handback_scale,
        "skipped_steps": opt._skipped_steps,
        "last_grad_norm": opt.last_grad_norm,
    }


def restore(opt, extra):
    """Rebuilds a copy's private structures from its torch.optim fields and extra_state's output."""
    from .flat_storage import FlatStorage  # noqa: PLC0415 (flat_storage imports the core's helpers)
    settings = extra["settings"]
    opt._init_private()
    for name in SETTINGS:
        setattr(opt, name, settings[name])
    opt._rebuild_layout()
    if settings["flat_buffers"]:
        opt._flat = FlatStorage(opt)
    scale = extra["handback_scale"]
    opt._restore_cycle(extra["micro_step"], extra["accumulators"], None if scale is None else scale.clone())
    opt._skipped_steps = extra["skipped_steps"]
    opt.last_grad_norm = extra["last_grad_norm"]


def is_copy_state(state):
    return isinstance(state, dict) and isinstance(state.get("gradfuse"), dict) and "settings" in state["gradfuse"]
