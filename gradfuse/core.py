"""The core every gradfuse optimizer shares: torch.optim's face (param_groups, state, zero_grad,
state_dict) and the micro-step pipeline. Where the running sums live is the store of the mode
(sum_store.py); the layout is a pure function of param_groups (layout.py); the global norm's
partials are one NormPartials (norm_partials.py). An update rule (sgd.py, adamw.py) adds its
hyperparameters, its per-parameter state and one fused update call."""
import warnings
import weakref
from collections import OrderedDict
from typing import Callable, Dict, Optional

import torch
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from . import copying, cycle_verdict, hyperparameters as hp, kernel_views, public_state, stores
from ._native import inspect_parameters
from .distributed_norm import local_tensor, ranks_communicate
from .layout import Layout, build_layout
from .norm_partials import NormPartials
from .per_cycle import HyperparameterWatch
from .skip_watch import DEFAULT_INTERVAL, SkipWatch
from .state_io import export_state, import_state
from .sum_store import SumStore
from .tracked_state import TrackedState

_NO_GRADIENT = ("a whole accumulation cycle passed without any gradient, so nothing was updated (as "
                "torch.optim.SGD.step() does without gradients); call backward() before step()")


class FusedAccumOptimizer(Optimizer):
    """Base of FusedAccumSGD / FusedAccumAdamW. Call step() once per micro-batch: micro-steps
    1..K-1 only accumulate A = sum(grad)/K; micro-step K computes the norm_type norm of A over
    all parameters, skips the update when it is not finite (skip_nonfinite), scales A by
    min(1, max_grad_norm / (norm + 1e-6)) and applies the rule's update in one pass.

    torch.amp.GradScaler: scaler.step(opt) hands over its scale and found_inf tensors; the
    gradients are unscaled inside the accumulation kernels and a cycle with an inf/nan
    gradient (or found_inf) is skipped, with no separate unscale pass and no host sync.

    A rule subclass defines: _RULE (the torch optimizer's name), _GROUP_KEYS and _STATE_KEYS (its
    state-dict layout), _SLOT_KEYS (the per-parameter state the update reads), _check_group,
    _new_param_state, _update_bucket, and the checkpoint hooks _pack_param_states /
    _unpack_loaded_state / _check_loaded_state."""

    # GradScaler sets self.grad_scale / self.found_inf and calls step() directly.
    _step_supports_amp_scaling = True
    _RULE = ""
    _GROUP_KEYS: tuple = ()
    _STATE_KEYS: frozenset = frozenset()
    _SLOT_KEYS: tuple = ()
    _ELEMENT_KEYS: tuple = ()  # the slot keys shaped like the parameter (the rest are 0-dim)
    _LEGACY_GROUP_DEFAULTS = {"maximize": False}  # group keys older torch state dicts lack, as torch fills them

    def __init__(self, params, defaults, *, accumulation_steps=1, max_grad_norm=None, norm_type=2.0,
                 skip_nonfinite=True, error_if_nonfinite=False, accum_dtype=None, process_group=None,
                 accumulate_in_backward=False, flat_buffers=False, clip=None, skip=None, track_param_norms=False,
                 sum_in_grad=True):
        self._init_private()
        self.sum_in_grad = hp.check_flag("sum_in_grad", sum_in_grad)
        self.track_param_norms = hp.check_flag("track_param_norms", track_param_norms)
        self.accumulation_steps = hp.check_accumulation_steps(accumulation_steps)
        self.max_grad_norm = hp.check_max_grad_norm(max_grad_norm)
        self.clip, self.skip = hp.check_policies(clip, skip, max_grad_norm)
        self.norm_type = hp.check_norm_type(norm_type)
        self.skip_nonfinite = hp.check_flag("skip_nonfinite", skip_nonfinite)
        self.error_if_nonfinite = hp.check_flag("error_if_nonfinite", error_if_nonfinite)
        self.accum_dtype = hp.check_accum_dtype(accum_dtype)
        self.process_group = hp.check_process_group(process_group)
        mode = self._check_mode(hp.check_flag("accumulate_in_backward", accumulate_in_backward),
                                hp.check_flag("flat_buffers", flat_buffers))
        self._check_group(defaults)
        super().__init__(params, defaults)  # add_param_group builds the layout and a default store
        self.state = TrackedState(self.state)  # torch's defaultdict(dict), counting its writes
        if mode != "default":
            self._store = stores.make(mode, self._name, self._layout, self.accum_dtype, self._store,
                                      weakref.WeakMethod(self._hot_norm_target))

    def _hot_norm_target(self):
        """(norm partials, norm type) while the coming micro-batch ends a cycle that needs the norm (the
        backward-hook store then takes it while each gradient is hot), else None."""
        if self._micro_step + 1 == self.accumulation_steps and self._needs_norm():
            return self._norms, self.norm_type
        return None

    def _check_mode(self, in_backward, flat):
        if in_backward and flat:
            raise ValueError(f"{self._name}: flat_buffers=True and accumulate_in_backward=True exclude each "
                             f"other (autograd already accumulates in place into the flat buffer)")
        if in_backward and ranks_communicate():
            raise ValueError(f"{self._name}: accumulate_in_backward=True cannot run under torch.distributed: "
                             f"DDP and FSDP read .grad after the hook would have freed it")
        return "accumulate_in_backward" if in_backward else "flat_buffers" if flat else "default"

    def _init_private(self):
        """The private structures a new optimizer (or a copy) starts from; the layout follows."""
        self._name = type(self).__name__
        self._layout: Optional[Layout] = None
        self._store: Optional[SumStore] = None
        self._norms = NormPartials()
        self._state_reader = public_state.RuleStateReader()
        self._cycle_state: Dict[int, dict] = {}  # bucket -> the rule's state this cycle's update reads
        self.clip = self.skip = None  # the cycle policies (ZClip, SpikeSkip); max_grad_norm alone when None
        self._loss_sum, self._loss_count = None, 0  # step(loss=...) of the open cycle, for the skip policy
        self._last_verdict = None  # the last cycle's CycleVerdict (last_step_skipped reads it)
        self.last_param_norms: Optional[torch.Tensor] = None  # track_param_norms=True: per parameter, float64
        self.track_param_norms = False
        self.sum_in_grad = True  # the default mode keeps running sums in .grad between micro-batches (resident_store.py)
        self._micro_step = 0
        self._amp_cycle = False  # a GradScaler step took part in this cycle
        self._unused_norm: Dict[torch.device, torch.Tensor] = {}  # stands in when no norm is needed
        self._warned_empty_cycle = False
        self.last_grad_norm: Optional[torch.Tensor] = None
        self._skipped_steps: Optional[torch.Tensor] = None
        self.cycles_completed = 0  # updates (cycle ends, skipped or not) since construction: PerCycle counts them
        self._update_post_hooks: Dict[int, Callable] = OrderedDict()  # once per cycle, not per step() call
        self._skip_watch = SkipWatch()
        self.skip_warning_interval = DEFAULT_INTERVAL  # cycles; 0: no "not progressing" warning
        self._hyperparameters = HyperparameterWatch()

    def __getstate__(self):
        # torch.optim pickles defaults, state and param_groups; a copy also needs K, the clip and the cycle.
        return dict(super().__getstate__(), gradfuse=copying.extra_state(self))

    def __setstate__(self, state):
        # Also called by Optimizer.load_state_dict with state and param_groups only: nothing to rebuild then.
        extra = state.pop("gradfuse", None) if copying.is_copy_state(state) else None
        super().__setstate__(state)
        if extra is None:
            return
        settings, mode = copying.settings_of(extra)
        self._init_private()
        for name, value in settings.items():
            setattr(self, name, value)
        policies = extra.get("policies", {})
        self.clip, self.skip = policies.get("clip"), policies.get("skip")
        self._rebuild_layout()
        if mode != "default":
            self._store = stores.make(mode, self._name, self._layout, self.accum_dtype, self._store,
                                      weakref.WeakMethod(self._hot_norm_target))
        self._load_cycle(extra)

    def _check_group(self, group, check_tensor_lr=True):
        raise NotImplementedError

    def __repr__(self):
        # torch.optim's listing of the groups, after the optimizer-wide settings that shape every update.
        text = super().__repr__()
        head, _, groups = text.partition("\n")
        wide = [f"    {name}: {getattr(self, name)}" for name in copying.SETTINGS if name != "process_group"]
        wide += [f"    flat_buffers: {self._store.mode == 'flat_buffers'}",
                 f"    accumulate_in_backward: {self._store.mode == 'accumulate_in_backward'}"]
        return "\n".join([head, "Optimizer-wide", *wide, groups])

    # ------------------------------------------------------------------ public observability
    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per update (K). May be changed between cycles, or mid-cycle to a K that
        leaves room for the micro-batches already taken (and not after the hand-back under DDP)."""
        return self._accumulation_steps

    @accumulation_steps.setter
    def accumulation_steps(self, value):
        value = hp.check_accumulation_steps(value)
        taken = getattr(self, "_micro_step", 0)
        if taken > 0 and value <= taken:
            raise ValueError(f"{self._name}: accumulation_steps={value} but {taken} micro-batches of this cycle are "
                             f"already accumulated; change it between cycles (micro_step == 0) or to more than "
                             f"{taken}")
        if taken > 0 and ranks_communicate() and value != self._accumulation_steps:
            raise ValueError(f"{self._name}: under torch.distributed the cycle's running sums are communicated at its "
                             f"last micro-batch, which a mid-cycle change would move; change accumulation_steps "
                             f"between cycles (micro_step == 0)")
        self._accumulation_steps = value

    @property
    def skipped_steps(self) -> torch.Tensor:
        """0-dim int64 tensor (on the first parameter's device): cycles skipped for a non-finite norm."""
        if self._skipped_steps is None:
            self._skipped_steps = torch.zeros((), dtype=torch.int64, device=self._layout.primary_device)
        return self._skipped_steps

    @property
    def last_step_skipped(self) -> Optional[torch.Tensor]:
        """0-dim bool device tensor: whether the last completed cycle's update was skipped (a
        non-finite norm, GradScaler's found_inf, a spike the skip policy caught); None before one."""
        return None if self._last_verdict is None else self._last_verdict.skipped

    @property
    def micro_step(self) -> int:
        """Micro-batches already accumulated in the current cycle (0..accumulation_steps-1)."""
        return self._micro_step

    @property
    def sync_gradients(self) -> bool:
        """True when the coming backward/step is the last micro-batch of the cycle (use it to
        leave DistributedDataParallel.no_sync() for that micro-batch)."""
        return self._micro_step + 1 == self.accumulation_steps

    # ------------------------------------------------------------------ parameter groups
    def add_param_group(self, param_group):
        for key in hp.OPTIMIZER_WIDE:
            if key in param_group:
                raise ValueError(f"{key} is optimizer-wide (the global norm spans every group): pass it to "
                                 f"{self._name}(...), not in a parameter group")
        params, names = _split_named(param_group["params"])
        others = [p for g in self.param_groups for p in g["params"]]
        self._check_group_params(params, others, "the new group")
        group = dict(param_group, params=params)
        if names:  # torch 2.6+: named parameters ((name, tensor) pairs) record param_names
            group["param_names"] = names
        candidate = dict(self.defaults, **group)
        self._check_group(candidate)
        super().add_param_group(group)
        self._rebuild_layout()

    def _check_group_params(self, params, others, what):
        """The checks a group's parameters pass before they join (also when param_groups was edited)."""
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter group contains the same tensor more than once")
        bad, reason = inspect_parameters([kernel_views.probe(p) for p in params])
        if bad >= 0:
            raise ValueError(f"{self._name}: parameter {bad} of {what} {reason}")
        known = {id(p) for p in others}
        if any(id(p) in known for p in params):
            raise ValueError("some parameters appear in more than one parameter group")
        for p in params:
            hp.accumulator_dtype(kernel_views.kernel_dtype(p.dtype), self.accum_dtype)
        if self._store is not None:
            self._store.check_new_params(params)
        _check_no_shared_memory(others + params, self._name)

    def _adopt_edited_param_groups(self):
        """param_groups was edited by hand (params appended, removed or replaced, a group added or
        removed): the new groups are checked as add_param_group checks them, then the layout is
        rebuilt; running sums of parameters still present carry over."""
        lists = [_as_param_list(group["params"]) for group in self.param_groups]
        for g, (group, params) in enumerate(zip(self.param_groups, lists)):
            for key, value in self.defaults.items():
                group.setdefault(key, value)  # as add_param_group fills a group's defaults
            self._check_group_params(params, [p for earlier in lists[:g] for p in earlier], f"param_groups[{g}]")
            hp.check_not_optimizer_wide(group, self._name)
        for group, params in zip(self.param_groups, lists):
            group["params"] = params
        self._rebuild_layout()

    def _rebuild_layout(self):
        """The layout of param_groups as they are now, and the store moved onto it."""
        self._layout = build_layout(self.param_groups, self.process_group, self.accum_dtype, self._name)
        self._norms.use_domains(self._layout.domains)
        self._norms.track_slots(len(self._layout.sorted) if self.track_param_norms else None)
        self._state_reader.forget()
        if self._store is None:
            self._store = stores.make("default", self._name, self._layout, self.accum_dtype,
                                      sum_in_grad=self.sum_in_grad)
        else:
            self._store = self._store.relayout(self._layout)

    # ------------------------------------------------------------------ gradients
    @torch.compiler.disable  # native loops over .grad: eager, like step()
    def zero_grad(self, set_to_none: bool = True):
        """As Optimizer.zero_grad, but a running sum kept as .grad (sum_in_grad, mid-cycle) stays, and a
        gradient adopted as a running sum apart is replaced by a fresh zero tensor instead of being
        zeroed in place (set_to_none=False). With
        flat_buffers=True the flat gradient buffers are zeroed in place when a cycle starts
        (micro_step == 0) and kept mid-cycle (.grad holds the running sum); either way every .grad
        is bound to its view again (after a module.zero_grad())."""
        self._store.zero_grad(set_to_none, self._micro_step)

    # ------------------------------------------------------------------ step
    @torch.compiler.disable
    @torch.no_grad()
    def finish_cycle(self) -> bool:
        """Ends the open cycle now with the micro-batches step() has taken (their mean, clipped and
        skipped like a full cycle's), as a torch loop updates with an epoch's last, shorter
        accumulation. Returns whether there was an open cycle. Not under torch.distributed (the
        earlier micro-batches were not communicated yet) nor with flat_buffers=True."""
        if self._micro_step == 0:
            return False
        self._store.check_finish_early()
        gathered = self._store.nothing()
        self._gather_cycle_state(self._store.updating(gathered))
        self._store.add(gathered, self._needs_norm(), self._norms, self.norm_type, None)  # the norm so far
        self._finish_cycle(micro_batches=self._micro_step)
        return True

    def param_norms(self, model=None) -> Dict[str, float]:
        """{name: pre-clip norm of the parameter's last cycle gradient} from last_param_norms, for a
        logger (one host copy). Names: param_names of named parameter groups, else the model's
        named_parameters(), else 'param_groups[g][i]'."""
        if self.last_param_norms is None:
            raise RuntimeError(f"{self._name}: no per-parameter norms yet; construct with track_param_norms=True "
                               f"and complete a cycle")
        by_id = {id(p): name for name, p in model.named_parameters()} if model is not None else {}
        names = []
        for g, group in enumerate(self.param_groups):
            given = group.get("param_names")
            for i, p in enumerate(group["params"]):
                names.append(given[i] if given else by_id.get(id(p), f"param_groups[{g}][{i}]"))
        return dict(zip(names, self.last_param_norms.tolist()))

    def register_update_post_hook(self, hook: Callable) -> RemovableHandle:
        """hook(optimizer) after each completed cycle's update (once per update, where
        register_step_post_hook's hooks run at every step() call, that is every micro-batch). It
        does not wait for the device: a cycle skipped for a non-finite norm also calls it, and
        opt.skipped_steps tells which (an EMA of weights then averages in unchanged weights)."""
        handle = RemovableHandle(self._update_post_hooks)
        self._update_post_hooks[handle.id] = hook
        return handle

    def remove_backward_hooks(self):
        """accumulate_in_backward=True: removes the optimizer's hooks from the parameters (also done
        when the optimizer is collected); it then reads .grad at step() like the default mode."""
        if self._store.mode == "accumulate_in_backward":
            self._store.detach()
            self._store = stores.make("default", self._name, self._layout, self.accum_dtype, self._store,
                                      sum_in_grad=self.sum_in_grad)

    @torch.compiler.disable  # always eager: one documented graph break, the state lives in Python
    @torch.no_grad()
    def step(self, closure=None, *, loss=None):
        """One micro-batch. loss (optional, a tensor or number): this micro-batch's loss, which
        skip=SpikeSkip(...) judges with the norm (the cycle's mean; averaged over ranks)."""
        if loss is not None:
            loss = hp.check_loss(loss, self._name)
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        if public_state.called_by_dcp_init():
            # torch.distributed.checkpoint's get_state_dict/set_state_dict step once with zero gradients
            # to create the state layout: create it, but the step is no micro-batch of a cycle.
            self._gather_cycle_state(range(len(self._layout.buckets)))
            return closure_loss
        if public_state.param_groups_changed(self):
            self._adopt_edited_param_groups()
        elif self._layout.stale():  # parameters cast or moved after construction: their layout follows
            self._adopt_edited_param_groups()
        for group in self.param_groups:
            self._check_group(group, check_tensor_lr=False)
        self._hyperparameters.note(self, self._name)
        amp_scale, found_inf = self._amp_inputs()
        boundary = self._micro_step + 1 == self.accumulation_steps
        if self._micro_step == 0:
            self._store = stores.for_new_cycle(self._store, self.accum_dtype, self.sum_in_grad)
        store = self._store
        store.refuse(amp_scale, found_inf, boundary, self._micro_step)
        gathered = store.gather(boundary, amp_scale)  # validated: nothing has changed so far
        if boundary:
            self._gather_cycle_state(store.updating(gathered))  # read and checked before any change too
        # An AMP micro-batch with inf/nan gradients makes A non-finite: such cycles are always skipped.
        self._amp_cycle = self._amp_cycle or amp_scale is not None or found_inf is not None
        if found_inf is not None:  # GradScaler's verdict, honoured like torch's fused optimizers: skip the cycle
            self._norms.flag(self.skipped_steps.device, found_inf)
        if loss is not None:  # summed on the device: no sync
            loss = loss.to(device=self.skipped_steps.device, dtype=torch.float64)
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._loss_count += 1
        store.add(gathered, boundary and self._needs_norm(), self._norms, self.norm_type, amp_scale)
        if boundary:
            self._finish_cycle()
        else:
            self._micro_step += 1
            store.after_micro_step(self._micro_step + 1 == self.accumulation_steps, amp_scale)
        return closure_loss

    def _amp_inputs(self):
        """GradScaler's scale and found_inf, as scaler.step(opt) set them (None without a scaler)."""
        amp_scale = getattr(self, "grad_scale", None)
        if amp_scale is not None and (not isinstance(amp_scale, torch.Tensor) or amp_scale.numel() != 1):
            raise TypeError(f"{self._name}: grad_scale must be GradScaler's 1-element scale tensor, got {amp_scale!r}")
        return amp_scale, getattr(self, "found_inf", None)

    # ------------------------------------------------------------------ the cycle's end
    def _needs_norm(self):
        """The norm pass runs only when something uses it: clipping, skipping or raising."""
        return (self.max_grad_norm is not None or self._skips_nonfinite() or self.error_if_nonfinite
                or self.clip is not None or self.skip is not None or self.track_param_norms)

    def _skips_nonfinite(self):
        """Whether this cycle skips on a non-finite norm: as configured, and always under AMP."""
        return self.skip_nonfinite or self._amp_cycle

    def _end_cycle(self):
        self._store.end_cycle()
        self._micro_step = 0
        self._amp_cycle = False
        self._cycle_state = {}
        self._loss_sum, self._loss_count = None, 0

    def _finish_cycle(self, micro_batches=None):
        """The cycle's end: norm, skip decision, update of A = the sums / micro_batches (K, or fewer
        when finish_cycle() ends a cycle early)."""
        scale = 1.0 / (micro_batches or self.accumulation_steps)
        self.cycles_completed += 1
        if not self._store.had_gradient and not self._warned_empty_cycle:
            self._warned_empty_cycle = True
            warnings.warn(f"{self._name}: {_NO_GRADIENT}", stacklevel=3)
        if self._needs_norm():
            every = self._layout.norm_keys
            total = self.last_grad_norm = self._norms.total(
                self.skipped_steps.device, self.skipped_steps, self.norm_type, scale,
                self._skips_nonfinite() or self.error_if_nonfinite, every)
            if self.track_param_norms:
                self.last_param_norms = self._norms.slot_norms(
                    self.skipped_steps.device, self.norm_type, scale, self._layout.slot_of_param, every)
            verdict = cycle_verdict.decide(total, self.max_grad_norm, self.clip, self.skip,
                                           cycle_verdict.cycle_loss(self._loss_sum, self._loss_count),
                                           self._skips_nonfinite(), self.skipped_steps)
        else:  # plain accumulation + SGD: no norm pass; the update reads a constant 0 norm
            self.last_grad_norm = None
            device = self._layout.primary_device
            if device not in self._unused_norm:
                self._unused_norm[device] = torch.zeros((), dtype=torch.float64, device=device)
            total = self._unused_norm[device]
            verdict = cycle_verdict.CycleVerdict(total, None, False)
        self._last_verdict = verdict
        if self.error_if_nonfinite and not bool(torch.isfinite(total)):  # documented host sync
            self._end_cycle()
            raise RuntimeError(f"{self._name}: the total gradient norm of this cycle is {total.item()}; the "
                               f"update was skipped (error_if_nonfinite=True)")
        for bi, bucket in enumerate(self._layout.buckets):
            for slots, params, sums in self._store.update_calls(bi):
                group = self.param_groups[bucket.group_index]
                lr = group["lr"]
                if isinstance(lr, torch.Tensor) and lr.device != bucket.device:
                    # A CPU lr is read on the host (no device sync); a lr on another GPU is copied over.
                    lr = lr.item() if lr.device.type == "cpu" else lr.to(bucket.device)
                self._update_bucket(bi, slots, params, sums, group, lr, verdict, scale)
            self._layout.write_back(bi)
        self._end_cycle()
        self._skip_watch.after_cycle(self, self._name)
        for hook in list(self._update_post_hooks.values()):
            hook(self)

    def _update_bucket(self, bi, slots, params, accs, group, lr, verdict, grad_scale):
        """One fused update call of the rule; verdict (cycle_verdict.CycleVerdict) gives the norm on
        the bucket's device, max_norm and skip_nonfinite."""
        raise NotImplementedError

    def _gather_cycle_state(self, buckets):
        """The rule's state of the given buckets, read from self.state (created where missing,
        checked where it changed) through the store: all of it before anything changes."""
        self._cycle_state = {}
        for bi in buckets:
            group = self.param_groups[self._layout.buckets[bi].group_index]
            keys = tuple(self._required_slot_keys(group))
            if keys:
                lists = self._store.rule_state(self, self._state_reader, bi, keys, group)
                self._cycle_state[bi] = dict(zip(keys, lists))

    def _slot_tensors(self, bucket_index, slots, keys):
        """The rule's per-parameter state tensors for the slots, one list per key (local shards
        of DTensor state), as _gather_cycle_state read them."""
        bucket = self._layout.buckets[bucket_index]
        whole = isinstance(slots, range) and slots.start == bucket.start and slots.stop == bucket.stop
        lists = []
        for key in keys:
            values = self._cycle_state[bucket_index][key]
            chosen = values if whole else [values[k - bucket.start] for k in slots]
            if bucket.sharded:
                chosen = [local_tensor(t) for t in chosen]
            elif bucket.viewed:  # complex state on its real view, as the kernels update it
                chosen = [kernel_views.KernelView.state(t) for t in chosen]
            lists.append(chosen)
        return lists

    def _new_param_state(self, p, group, state):
        raise NotImplementedError

    def _required_slot_keys(self, group):
        return self._SLOT_KEYS

    # ------------------------------------------------------------------ checkpoints
    def _saved_sums(self):
        """Raw running sums by parameter index (state_dict order), as copies."""
        order = self._layout.order
        return {order[k]: total for k, total in self._store.saved_sums(self._micro_step).items()}

    def _load_cycle(self, extra):
        """Reinstalls a saved cycle (state_io's or copying's 'gradfuse' entry): raw sums by parameter
        index, micro-step, counters; every tensor copied onto the first parameter's device."""
        self._end_cycle()
        self._store = stores.for_new_cycle(self._store, self.accum_dtype, self.sum_in_grad)
        primary = self._layout.primary_device
        slot_of = {i: k for k, i in enumerate(self._layout.order)}
        micro_step = extra.get("micro_step", 0)
        scale = extra.get("handback_scale")
        resumes_at_last = micro_step > 0 and micro_step + 1 == self.accumulation_steps
        is_open = self._store.restore({slot_of[i]: saved for i, saved in extra.get("accumulators", {}).items()},
                                      micro_step, resumes_at_last, None if scale is None else scale.to(primary).clone(),
                                      extra.get("sums_in_grad", False))
        self._micro_step = micro_step if is_open else 0
        loss_sum = extra.get("loss_sum")
        self._loss_sum = None if loss_sum is None or not is_open else loss_sum.to(primary).clone()
        self._loss_count = extra.get("loss_count", 0) if is_open else 0
        skipped, last = extra.get("skipped_steps"), extra.get("last_grad_norm")
        if skipped is not None:  # copies, never views of the caller's dict: the counter is updated in place
            self._skipped_steps = skipped.to(device=primary, dtype=torch.int64).reshape(()).clone()
        if "last_grad_norm" in extra:
            self.last_grad_norm = None if last is None else last.to(primary).clone()

    def _policy_states(self):
        """The cycle policies' state tensors (copies) by role, as checkpoints keep them."""
        return {role: {key: value.clone() for key, value in policy.state.items()}
                for role, policy in (("clip", self.clip), ("skip", self.skip)) if policy is not None}

    def _load_policy_states(self, states):
        """Policy states saved by _policy_states (checked by state_io before anything changed)."""
        for role, policy in (("clip", self.clip), ("skip", self.skip)):
            if policy is not None:
                if role in states:
                    policy.load_state(states[role], self._layout.primary_device)
                else:
                    policy.state = {}  # a checkpoint without it: the policy starts afresh

    def state_dict(self):
        """The torch optimizer's format plus a 'gradfuse' entry with the running sums and the
        micro-step position, so a mid-cycle save resumes exactly."""
        state_dict = export_state(self, super().state_dict())
        self._store.exported(state_dict["state"], self._ELEMENT_KEYS)
        return state_dict

    def load_state_dict(self, state_dict):
        """Loads this optimizer's or the matching torch optimizer's state dict; everything is
        validated first."""
        import_state(self, state_dict, super().load_state_dict)


def _as_param_list(params):
    # A group's params as the list torch.optim keeps (the same list object when it already is one).
    if type(params) is list:
        return params
    return [params] if isinstance(params, torch.Tensor) else list(params)


def _split_named(params):
    """(tensors, names) of a group's params as torch.optim accepts them: a tensor, an ordered
    iterable of tensors, or of (name, tensor) pairs (names [] when unnamed)."""
    if isinstance(params, torch.Tensor):
        return [params], []
    if isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of "
                        "tensors in sets will change between runs. Please use a list instead.")
    params = list(params)
    named = [isinstance(p, tuple) for p in params]
    if not any(named):
        return params, []
    if not all(named):
        raise ValueError("all optimizer params should be with/without names. Some param names are missing")
    return [p for _, p in params], [name for name, _ in params]


def _check_no_shared_memory(params, name):
    """Parameters must not share memory: one update pass would write the same bytes twice. A
    DTensor is checked by its local shard (its own data_ptr() is not the memory it updates)."""
    tensors = [local_tensor(p) for p in params]
    spans = sorted((str(t.device), *kernel_views.memory_span(t), i) for i, t in enumerate(tensors) if t.numel() > 0)
    open_spans = []  # (end, index) of earlier spans on the device that may reach the next one
    device = None
    for dev, start, end, j in spans:
        if dev != device:
            device, open_spans = dev, []
        open_spans = [(e, i) for e, i in open_spans if e > start]
        for _, i in open_spans:
            if kernel_views.share_elements(tensors[i], tensors[j]):
                raise ValueError(f"parameters {min(i, j)} and {max(i, j)} share memory (views of one tensor?); "
                                 f"{name} needs every parameter in its own memory")
        open_spans.append((end, j))
