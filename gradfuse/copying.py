"""copy.deepcopy, pickle and torch.save of a gradfuse optimizer: torch.optim's pickled fields
(defaults, state, param_groups) plus the optimizer-wide settings, the mode and the open cycle, from
which the copy rebuilds every private structure (layout, native inspectors, its mode's store)."""
SETTINGS = ("accumulation_steps", "max_grad_norm", "norm_type", "skip_nonfinite", "error_if_nonfinite",
            "accum_dtype", "process_group", "track_param_norms", "sum_in_grad")


def extra_state(opt):
    """What a copy needs beyond torch.optim's fields."""
    opt._store.check_copyable()
    settings = {name: getattr(opt, name) for name in SETTINGS}
    settings["mode"] = opt._store.mode
    return {
        "settings": settings,
        "micro_step": opt.micro_step,
        "accumulators": opt._saved_sums(),
        "handback_scale": opt._store.handback_scale,
        "sums_in_grad": opt._store.sums_in_grad(),
        "skipped_steps": opt._skipped_steps,
        "last_grad_norm": opt.last_grad_norm,
        "policies": {"clip": opt.clip, "skip": opt.skip},  # copied with their state
        "loss_sum": opt._loss_sum, "loss_count": opt._loss_count,
    }


def settings_of(extra):
    """(the optimizer-wide settings, the mode) of extra_state's output (also of copies made before
    the mode was recorded by name)."""
    settings = {name: extra["settings"][name] for name in SETTINGS if name in extra["settings"]}
    mode = extra["settings"].get("mode") or ("flat_buffers" if extra["settings"].get("flat_buffers") else "default")
    return settings, mode


def is_copy_state(state):
    return isinstance(state, dict) and isinstance(state.get("gradfuse"), dict) and "settings" in state["gradfuse"]
