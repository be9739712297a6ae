"""The core every gradfuse optimizer shares: parameter buckets, gradient gathering, fused
accumulation, the global norm (also across ranks), skipping, GradScaler, the hand-back for DDP
and checkpoints. An update rule (sgd.py, adamw.py) adds its hyperparameters, its per-parameter
state and one fused update call."""
import warnings
from collections import OrderedDict, defaultdict
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from . import copying, direct_ops, gradient_codes, ops, public_state, skip_watch
from . import hyperparameters as hp
from ._native import GradientInspector, first_modified, inspect_parameters
from .backward_accumulation import BackwardAccumulation
from .distributed_norm import all_reduce_norm_state_, is_dtensor, local_tensor, shard_groups
from .flat_storage import FlatStorage, check_flat_params
from .per_cycle import note_hyperparameters
from .state_io import export_state, import_state
from .tracked_state import TrackedState


class _Bucket:
    """Slots [start, stop) of the sorted parameter list sharing group, device, dtype and norm
    domain (the process groups its norm partial is reduced over)."""
    __slots__ = ("start", "stop", "group_index", "device", "acc_dtype", "adopts", "domain", "sharded")

    def __init__(self, start, group_index, device, acc_dtype, adopts, domain, sharded):
        self.start, self.stop = start, start + 1
        self.group_index, self.device, self.acc_dtype, self.adopts = group_index, device, acc_dtype, adopts
        self.domain, self.sharded = domain, sharded  # domain: a key of FusedAccumOptimizer._domains


_NONE, _ADOPT, _RELAYOUT = gradient_codes.NONE, gradient_codes.ADOPT, gradient_codes.RELAYOUT

_NO_GRADIENT = ("a whole accumulation cycle passed without any gradient, so nothing was updated (as "
                "torch.optim.SGD.step() does without gradients); call backward() before step()")


def _distributed():
    """More than one process in the default group: the ranks' gradients are communicated."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class FusedAccumOptimizer(Optimizer):
    """Base of FusedAccumSGD / FusedAccumAdamW. Call step() once per micro-batch: micro-steps
    1..K-1 only accumulate A = sum(grad)/K; micro-step K computes the norm_type norm of A over
    all parameters, skips the update when it is not finite (skip_nonfinite), scales A by
    min(1, max_grad_norm / (norm + 1e-6)) and applies the rule's update in one pass.

    torch.amp.GradScaler: scaler.step(opt) hands over its scale and found_inf tensors; the
    gradients are unscaled inside the accumulation kernels and a cycle with an inf/nan
    gradient is skipped, with no separate unscale pass and no host sync.

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
                 accumulate_in_backward=False, flat_buffers=False):
        self._init_private()
        self.accumulation_steps = hp.check_accumulation_steps(accumulation_steps)
        self.max_grad_norm = hp.check_max_grad_norm(max_grad_norm)
        self.norm_type = hp.check_norm_type(norm_type)
        self.skip_nonfinite = hp.check_flag("skip_nonfinite", skip_nonfinite)
        self.error_if_nonfinite = hp.check_flag("error_if_nonfinite", error_if_nonfinite)
        self.accum_dtype = hp.check_accum_dtype(accum_dtype)
        self.process_group = hp.check_process_group(process_group)
        self._check_group(defaults)
        super().__init__(params, defaults)
        self.state = TrackedState(self.state)  # torch's defaultdict(dict), counting its writes
        if hp.check_flag("accumulate_in_backward", accumulate_in_backward):
            if _distributed():
                raise ValueError(f"{self._name}: accumulate_in_backward=True cannot run under torch.distributed: "
                                 f"DDP and FSDP read .grad after the hook would have freed it")
            self._backward = BackwardAccumulation(self)
            self._backward.attach()
        if hp.check_flag("flat_buffers", flat_buffers):
            if self._backward is not None:
                raise ValueError(f"{self._name}: flat_buffers=True and accumulate_in_backward=True exclude each "
                                 f"other (autograd already accumulates in place into the flat buffer)")
            self._flat = FlatStorage(self)

    def _init_private(self):
        """The private structures a new optimizer (or a copy) starts from; the layout follows."""
        self._name = type(self).__name__
        self._backward = None
        self._flat: Optional[FlatStorage] = None
        self._reset_cycle_state()
        self._norm_states: Dict[tuple, torch.Tensor] = {}  # by (device, norm domain)
        self._unused_norm: Dict[torch.device, torch.Tensor] = {}  # stands in when no norm is needed
        self.last_grad_norm: Optional[torch.Tensor] = None
        self._skipped_steps: Optional[torch.Tensor] = None
        self.cycles_completed = 0  # updates (cycle ends, skipped or not) since construction: PerCycle counts them
        self._update_post_hooks: Dict[int, Callable] = OrderedDict()  # once per cycle, not per step() call
        self._skip_watch = skip_watch.SkipWatch()
        self.skip_warning_interval = skip_watch.DEFAULT_INTERVAL  # cycles; 0: no "not progressing" warning
        self._cycle_hyperparameters, self._warned_hyperparameter_change = [], False

    def __getstate__(self):
        # torch.optim pickles defaults, state and param_groups; a copy also needs K, the clip and the cycle.
        return dict(super().__getstate__(), gradfuse=copying.extra_state(self))

    def __setstate__(self, state):
        # Also called by Optimizer.load_state_dict with state and param_groups only: nothing to rebuild then.
        extra = state.pop("gradfuse", None) if copying.is_copy_state(state) else None
        super().__setstate__(state)
        if extra is not None:
            copying.restore(self, extra)

    def _check_group(self, group, check_tensor_lr=True):
        raise NotImplementedError

    def __repr__(self):
        # torch.optim's listing of the groups, after the optimizer-wide settings that shape every update.
        text = super().__repr__()
        head, _, groups = text.partition("\n")
        wide = [f"    {name}: {getattr(self, name)}" for name in copying.SETTINGS if name != "process_group"]
        wide += [f"    flat_buffers: {self._flat is not None}",
                 f"    accumulate_in_backward: {self._backward is not None}"]
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
        if taken > 0 and _distributed() and value != self._accumulation_steps:
            raise ValueError(f"{self._name}: under torch.distributed the cycle's running sums are communicated at its "
                             f"last micro-batch, which a mid-cycle change would move; change accumulation_steps "
                             f"between cycles (micro_step == 0)")
        self._accumulation_steps = value

    @property
    def skipped_steps(self) -> torch.Tensor:
        """0-dim int64 tensor (on the first parameter's device): cycles skipped for a non-finite norm."""
        if self._skipped_steps is None:
            self._skipped_steps = torch.zeros((), dtype=torch.int64, device=self._primary_device())
        return self._skipped_steps

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
        bad, reason = inspect_parameters(params)
        if bad >= 0:
            raise ValueError(f"{self._name}: parameter {bad} of {what} {reason}")
        known = {id(p) for p in others}
        if any(id(p) in known for p in params):
            raise ValueError("some parameters appear in more than one parameter group")
        for p in params:
            hp.accumulator_dtype(p.dtype, self.accum_dtype)
        if getattr(self, "_flat", None) is not None:
            check_flat_params(params, self._name, self.accum_dtype)
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
        """Orders parameters by (group, device, dtype) so that each bucket the ops take in one
        call is a contiguous slice: a step then costs a few list slices, not per-tensor Python."""
        entries = [(gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"]]
        self._params: List[torch.Tensor] = [p for _, p in entries]  # state_dict order
        self._group_of = [gi for gi, _ in entries]
        # Norm domains: the same key on every rank (placements, not object ids), so every rank
        # runs the same collectives in the same order and merges the partials identically.
        self._domains = {"": (self.process_group,) if self.process_group is not None else ()}
        domain_of = []
        for i, p in enumerate(self._params):
            key = ""
            if is_dtensor(p):
                key = f"mesh{p.device_mesh.mesh_dim_names or p.device_mesh.ndim}:{p.placements}"
                self._domains[key] = shard_groups(p, f"{self._name}: parameter {i}")
            domain_of.append(key)
        keys = [(gi, str(p.device), str(p.dtype), domain_of[i]) for i, (gi, p) in enumerate(entries)]
        self._order = sorted(range(len(entries)), key=lambda i: keys[i])  # sorted slot -> param index
        self._sorted = [self._params[i] for i in self._order]
        self._inspector = GradientInspector(self._sorted)
        self._buckets: List[_Bucket] = []
        for k, i in enumerate(self._order):
            if not self._buckets or keys[self._order[k - 1]] != keys[i]:
                p = self._params[i]
                acc_dtype = hp.accumulator_dtype(p.dtype, self.accum_dtype)
                self._buckets.append(_Bucket(k, keys[i][0], p.device, acc_dtype, acc_dtype == p.dtype, keys[i][3],
                                             is_dtensor(p)))
            self._buckets[-1].stop = k + 1
        self._has_sharded = any(b.sharded for b in self._buckets)
        self._remap_slot_state()
        if self._backward is not None:
            self._backward.attach()  # hooks know their slot: new layout, new hooks
        if getattr(self, "_flat", None) is not None:
            self._flat = FlatStorage(self, self._flat)  # new buckets, new buffers (values, sums, state carried)

    def _remap_slot_state(self):
        """Re-aligns the per-slot state lists with a (possibly new) slot order."""
        old = getattr(self, "_slot_params", [])
        by_id = {id(p): k for k, p in enumerate(old)}

        def carry(values):
            return [values[by_id[id(p)]] if id(p) in by_id else None for p in self._sorted]
        self._accs = carry(getattr(self, "_accs", []))
        self._versions = carry(getattr(self, "_versions", []))
        self._owned = carry(getattr(self, "_owned", []))
        self._handed = carry(getattr(self, "_handed", []))
        self._live = [sum(a is not None for a in self._accs[b.start:b.stop]) for b in self._buckets]
        self._checked_state = {}  # bucket -> state lists last validated (public_state.state_lists)
        self._slot_params = self._sorted
        self._group_snapshot = [list(g["params"]) for g in self.param_groups]  # to notice edits of param_groups

    def _primary_device(self):
        return self._params[0].device if self._params else torch.device("cpu")

    def _describe(self, index):
        group = self._group_of[index]
        position = index - sum(len(g["params"]) for g in self.param_groups[:group])
        return f"parameter {index} (param_groups[{group}]['params'][{position}])"

    # ------------------------------------------------------------------ gradients
    @torch.compiler.disable  # native loops over .grad: eager, like step()
    def zero_grad(self, set_to_none: bool = True):
        """As Optimizer.zero_grad; a gradient adopted as this cycle's accumulator is replaced
        by a fresh zero tensor instead of being zeroed in place (set_to_none=False). With
        flat_buffers=True the flat gradient buffers are zeroed in place when a cycle starts
        (micro_step == 0) and kept mid-cycle (.grad holds the running sum); either way every .grad
        is bound to its view again (after a module.zero_grad())."""
        if self._backward is not None and self._backward.pending:
            raise RuntimeError(f"{self._name}: a backward pass since the last step() already added its gradients "
                               f"to the running sums (accumulate_in_backward=True frees .grad as it goes), so "
                               f"zero_grad() cannot discard them. Call step() after every backward you keep; to "
                               f"drop a batch, skip its backward, or use accumulate_in_backward=False")
        if self._flat is not None:
            if self._micro_step == 0:
                self._flat.zero_grads()
            else:
                self._flat.binding.bind_grads(False)  # mid-cycle the views keep the running sum
            return
        if set_to_none:
            self._inspector.clear_grads()  # one native loop: cheap for thousands of tensors
            if self._handed_back:  # the last micro-batch of the cycle must add into the accumulators
                self._inspector.set_grads(self._handed_grads())
            return
        for k, p in enumerate(self._sorted):
            grad = p.grad
            if grad is None or (self._handed[k] is not None and grad is self._accs[k]):
                continue
            if self._versions[k] is not None and grad is self._accs[k]:
                p.grad = torch.zeros_like(grad)
            else:
                if grad.grad_fn is not None:
                    grad.detach_()
                else:
                    grad.requires_grad_(False)
                grad.zero_()

    def _reset_cycle_state(self):
        n = len(getattr(self, "_sorted", []))
        self._micro_step = 0
        self._amp_cycle = False  # a GradScaler step took part in this cycle
        self._accs: List[Optional[torch.Tensor]] = [None] * n  # this cycle's raw gradient sums
        self._versions: List[Optional[int]] = [None] * n  # version of an adopted p.grad, None if owned
        self._handed: List[Optional[int]] = [None] * n  # version of an accumulator handed back as .grad
        self._handed_back = False
        self._handback_scale = None  # GradScaler's scale the handed-back sums were multiplied by
        self._had_gradient = False  # some micro-batch of this cycle had a gradient
        self._live = [0] * len(getattr(self, "_buckets", []))  # accumulators alive per bucket

    def _check_adopted_untouched(self):
        """Before the update: no adopted gradient was changed in place by anyone but us (checked
        once per cycle, at its last micro-batch, which is before any parameter changes)."""
        if self._micro_step == 0 or self._micro_step + 1 != self.accumulation_steps:
            return
        k = first_modified(self._accs, self._versions)
        if k >= 0:
            raise RuntimeError(
                f"{self._name}: the gradient of {self._describe(self._order[k])} was modified in place after "
                f"step() (for example by module.zero_grad(set_to_none=False)); {self._name} keeps it as the "
                f"cycle's accumulator. Use optimizer.zero_grad() or set_to_none=True between micro-batches.")

    def _gather_gradients(self):
        """Gradients in slot order and their GradientCode bytes, validated before any change."""
        bad, reason, codes, grads = self._inspector.gather()
        if bad >= 0:
            raise RuntimeError(f"{self._name}: {self._describe(self._order[bad])} {reason}")
        if self._has_sharded:
            codes = self._local_shards_of(grads, codes)
        if _RELAYOUT in codes:  # rare: a dense gradient laid out unlike its parameter
            codes = bytearray(codes)
            for k, code in enumerate(codes):
                if code == _RELAYOUT[0]:
                    grads[k] = torch.empty_like(local_tensor(self._sorted[k])).copy_(grads[k])
                    codes[k] = _ADOPT[0]
            codes = bytes(codes)
        return grads, codes

    def _local_shards_of(self, grads, codes):
        """DTensor gradients -> their local shards (what the kernels update), checked against
        the parameter's placements; codes recomputed for the shard (FSDP2's are views)."""
        codes = bytearray(codes)
        for b in self._buckets:
            if not b.sharded:
                continue
            for k in range(b.start, b.stop):
                g, p = grads[k], self._sorted[k]
                if g is None:
                    continue
                if not is_dtensor(g) or g.device_mesh != p.device_mesh or g.placements != p.placements:
                    where = f"placements {g.placements}" if is_dtensor(g) else "a plain tensor"
                    raise RuntimeError(f"{self._name}: {self._describe(self._order[k])} is a DTensor with "
                                       f"placements {p.placements} but its gradient is {where}; gradfuse needs "
                                       f"gradients sharded like their parameters")
                shard, own = g._local_tensor, local_tensor(p)
                if shard.shape != own.shape or shard.dtype != own.dtype:
                    raise RuntimeError(f"{self._name}: {self._describe(self._order[k])}: local gradient shard "
                                       f"{shard.dtype}{tuple(shard.shape)} does not match the parameter's local "
                                       f"shard {own.dtype}{tuple(own.shape)}")
                grads[k] = shard
                codes[k] = gradient_codes.code_for(shard, own)[0]  # FSDP2's shards are views: copied
        return bytes(codes)

    def _kernel_params(self, slots):
        """The tensors the kernels update for these slots: DTensor parameters by their local
        shard, read anew (FSDP2 may rebind it after the optimizer was built)."""
        if isinstance(slots, range):
            params = self._sorted[slots.start:slots.stop]
        else:
            params = [self._sorted[k] for k in slots]
        return [local_tensor(p) for p in params] if self._has_sharded else params

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
        if self._flat is not None or _distributed():
            raise RuntimeError(f"{self._name}: finish_cycle() works alone and without flat_buffers=True; under "
                               f"torch.distributed the open cycle's micro-batches were not communicated yet")
        if self._backward is not None and self._backward.pending:
            raise RuntimeError(f"{self._name}: a backward since the last step() is in the running sums but not yet "
                               f"counted: call step() for it first, then finish_cycle()")
        none = _NONE * len(self._sorted)
        self._gather_cycle_state(none)
        self._accumulate([None] * len(self._sorted), none, True, None)  # the norm of the sums so far
        self._finish_cycle(micro_batches=self._micro_step)
        return True

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
        if self._backward is not None:
            self._backward.detach()
            self._backward = None

    @torch.compiler.disable  # always eager: one documented graph break, the state lives in Python
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if public_state.called_by_dcp_init():
            # torch.distributed.checkpoint's get_state_dict/set_state_dict step once with zero gradients
            # to create the state layout: create it, but the step is no micro-batch of a cycle.
            self._gather_cycle_state(None)
            return loss
        if public_state.param_groups_changed(self):
            self._adopt_edited_param_groups()
        for group in self.param_groups:
            self._check_group(group, check_tensor_lr=False)
        note_hyperparameters(self)
        if self._flat is not None:
            self._step_flat()
            return loss
        grads, codes = self._gather_gradients()
        self._check_adopted_untouched()
        amp_scale = getattr(self, "grad_scale", None)
        if amp_scale is not None and (not isinstance(amp_scale, torch.Tensor) or amp_scale.numel() != 1):
            raise TypeError(f"{self._name}: grad_scale must be GradScaler's 1-element scale tensor, got {amp_scale!r}")
        if amp_scale is not None and self._backward is not None:
            raise RuntimeError(f"{self._name}: accumulate_in_backward=True cannot be used with GradScaler: the "
                               f"gradients are accumulated during backward, before scaler.step() gives the scale")
        # An AMP micro-batch with inf/nan gradients makes A non-finite: such cycles are always skipped.
        found_inf = getattr(self, "found_inf", None)
        self._amp_cycle = self._amp_cycle or amp_scale is not None or found_inf is not None
        boundary = self._micro_step + 1 == self.accumulation_steps
        if boundary:
            self._gather_cycle_state(codes)
        if self._handed_back:
            codes = self._take_back(grads, codes, amp_scale)
        self._had_gradient = self._had_gradient or codes.count(_NONE) != len(codes)
        if found_inf is not None:  # GradScaler's verdict, honoured like torch's fused optimizers: skip the cycle
            primary = self.skipped_steps.device
            self._norm_state(primary)[1:].add_(found_inf.reshape(1).to(device=primary, dtype=torch.float64))
        self._accumulate(grads, codes, boundary, amp_scale)
        if self._backward is not None:
            self._backward.pending = False  # this micro-batch is taken: zero_grad() may follow
        if boundary:
            self._finish_cycle()
        else:
            self._micro_step += 1
            if self._micro_step + 1 == self.accumulation_steps:
                self._hand_back(amp_scale)
        return loss

    def _step_flat(self):
        """flat_buffers=True: autograd has added the micro-batch into the flat gradient buffers; a
        micro-step is one native check of the bindings, and the cycle's last one adds one norm and
        one update call per bucket."""
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            raise RuntimeError(f"{self._name}: flat_buffers=True cannot be used with GradScaler: autograd sums the "
                               f"micro-batches' scaled gradients in place, so a scale change mid-cycle could not be "
                               f"undone; use flat_buffers=False, or bfloat16 autocast (which needs no scaler)")
        if self._micro_step == 0 and self._flat.dirty:
            raise RuntimeError(f"{self._name}: the gradient buffers still hold the last cycle's sum; with "
                               f"flat_buffers=True call optimizer.zero_grad() after the step that ends a cycle "
                               f"(module.zero_grad() does not reset the optimizer's flat buffers)")
        boundary = self._micro_step + 1 == self.accumulation_steps
        self._flat.check_micro_step(boundary, 2 if _distributed() else 1)
        if not boundary:
            self._micro_step += 1
            return
        self._gather_cycle_state(None)
        if self._needs_norm():
            for bi, b in enumerate(self._buckets):
                direct_ops.accumulate_norm_(self._norm_state(b.device, b.domain), [self._flat.grads[bi]],
                                            self.norm_type)
        self._had_gradient = True
        self._live = [b.stop - b.start for b in self._buckets]
        self._flat.dirty = True  # from here on the buffers hold a finished sum until zero_grad()
        self._finish_cycle()

    # ------------------------------------------------------------------ the last micro-batch
    def _hand_back(self, amp_scale):
        """Where ranks communicate, each accumulator becomes .grad again before the cycle's last
        backward: autograd adds the last micro-batch into it in place, so DistributedDataParallel,
        leaving no_sync() for that backward, all-reduces the whole cycle's sum once (overlapped
        with the backward). Alone, the last micro-batch is added by the fused accumulate + norm
        pass instead (4 B/param less than autograd's add followed by a norm pass). DTensor (FSDP2)
        shards are not handed back: FSDP2 reduces every gradient it produces. Under GradScaler the
        sum goes back scaled by this micro-batch's scale, like the gradient added to it."""
        if not _distributed():
            return
        grads = [None] * len(self._sorted)
        for b in self._buckets:
            if b.sharded:
                continue
            for k in range(b.start, b.stop):
                acc, p = self._accs[k], self._sorted[k]
                if acc is None:
                    continue
                if acc.dtype != p.dtype:  # DDP communicates in the parameter dtype anyway: rounded once here
                    acc = self._accs[k] = acc.to(p.dtype)
                grads[k] = acc
                self._versions[k] = None  # autograd will add into it: no longer watched as untouched
                self._handed[k] = acc._version
        handed = [g for g in grads if g is not None]
        if handed:
            self._handed_back = True
            self._handback_scale = amp_scale
            if amp_scale is not None:
                _foreach_mul_by_device(handed, amp_scale)
            self._inspector.set_grads(grads)

    def _handed_grads(self):
        return [acc if v is not None else None for acc, v in zip(self._accs, self._handed)]

    def _take_back(self, grads, codes, amp_scale):
        """At the last micro-batch: where .grad is the handed-back accumulator (or DDP's bucket
        view of it, reduced), it is the whole cycle's sum; where it was replaced before the
        backward (module.zero_grad()), the new gradient is added as usual."""
        codes = bytearray(codes)
        complete = []
        allowed = 2 + (amp_scale is not None)  # autograd's add, DDP's copy back, GradScaler's inf check
        for k, version in enumerate(self._handed):
            if version is None:
                continue
            acc, g = self._accs[k], grads[k]
            # g is acc: autograd added into it (and DDP without bucket views copied the reduced sum back).
            if g is acc and acc._version > version + allowed:
                raise RuntimeError(_changed_sum_message(self._name, self._describe(self._order[k])))
            if g is not acc:
                if acc._version == version:
                    continue  # .grad was replaced before the last backward: add the new gradient
                if g is None:
                    raise RuntimeError(
                        f"{self._name}: the gradient of {self._describe(self._order[k])} held the cycle's running "
                        f"sum and was changed, then removed, before step(); the earlier micro-batches are lost")
                acc.copy_(g)  # DDP (gradient_as_bucket_view) rebound .grad to its bucket: the reduced sum
            grads[k] = None
            codes[k] = _NONE[0]
            complete.append(acc)
        if self._handback_scale is not None or amp_scale is not None:
            self._unscale_complete(complete, amp_scale)
        return bytes(codes)

    def _unscale_complete(self, complete, amp_scale):
        """GradScaler: the taken-back sums are scaled; unscaled as GradScaler would (float32 of the
        double reciprocal; exact for its power-of-two scales). Had the scale changed between the
        last two micro-batches (scaler.update() grew it), the two parts of the sum carry different
        scales and cannot be separated: the cycle is then skipped, on the device, like an overflow."""
        previous = self._handback_scale
        primary = self.skipped_steps.device
        if amp_scale is None or previous is None:
            mismatch = torch.ones(1, dtype=torch.float64, device=primary)
        else:
            mismatch = (amp_scale.reshape(1) != previous.reshape(1)).to(device=primary, dtype=torch.float64)
        self._norm_state(primary)[1:].add_(mismatch)
        if amp_scale is not None and complete:
            _foreach_mul_by_device(complete, amp_scale.double().reciprocal().float())

    def _norm_state(self, device, domain=""):
        """The running norm partial of one device and norm domain (reduced over the domain's
        process groups at the end of the cycle)."""
        state = self._norm_states.get((device, domain))
        if state is None:
            state = self._norm_states[(device, domain)] = ops.new_norm_state(device)
        return state

    def _accumulate(self, grads, codes, boundary, amp_scale):
        """Adds this micro-batch into the accumulators, one op call per bucket in the common
        cases; on the last micro-batch the same pass feeds the global norm."""
        accs, keep_versions = self._accs, not boundary
        with_norm = boundary and self._needs_norm()
        scales = {}
        for bi, b in enumerate(self._buckets):
            s, e = b.start, b.stop
            norm_state = self._norm_state(b.device, b.domain) if with_norm else None
            present = codes[s:e]
            scale = None
            if amp_scale is not None:  # scaled gradients must pass through a kernel: no adoption
                if b.device not in scales:
                    scales[b.device] = amp_scale.to(device=b.device, dtype=torch.float32)
                scale = scales[b.device]
            # A gradient becomes the accumulator itself (no copy; 1/K is folded into the update)
            # when no addition follows in its dtype: always at fp32/fp64, at the boundary for fp16/bf16.
            adopts = scale is None and (b.adopts or boundary)
            if self._live[bi] == e - s and present == _NONE * (e - s):  # complete (handed back) or absent
                if norm_state is not None:
                    direct_ops.accumulate_norm_(norm_state, accs[s:e], self.norm_type)
            elif adopts and self._live[bi] == 0 and present == _ADOPT * (e - s):
                accs[s:e] = grads[s:e]
                if keep_versions:
                    self._versions[s:e] = [g._version for g in grads[s:e]]
                self._live[bi] = e - s
                if norm_state is not None:
                    direct_ops.accumulate_norm_(norm_state, grads[s:e], self.norm_type)
            elif self._live[bi] == e - s and _NONE not in present:
                direct_ops.accumulate_(accs[s:e], grads[s:e], 1.0, False, norm_state, self.norm_type, scale)
            else:
                self._accumulate_mixed(bi, grads, codes, norm_state, scale, adopts)

    def _accumulate_mixed(self, bi, grads, codes, norm_state, amp_scale, adopts):
        """The general case of one bucket: some gradients missing, some accumulators new."""
        b, accs = self._buckets[bi], self._accs
        fresh, adding, norm_only = [], [], defaultdict(list)  # norm_only by dtype: one op call each
        for k in range(b.start, b.stop):
            g, acc = grads[k], accs[k]
            if g is None:
                if acc is not None:
                    norm_only[acc.dtype].append(acc)
            elif acc is not None:
                adding.append(k)
            elif adopts and codes[k] == _ADOPT[0]:
                accs[k] = g
                self._versions[k] = g._version
                norm_only[g.dtype].append(g)
            else:
                if self._owned[k] is None:  # kept across cycles: first=True overwrites it
                    self._owned[k] = torch.empty_like(local_tensor(self._sorted[k]), dtype=b.acc_dtype)
                accs[k] = self._owned[k]
                fresh.append(k)
            self._live[bi] += acc is None and g is not None
        for first, slots in ((True, fresh), (False, adding)):
            if slots:
                direct_ops.accumulate_([accs[k] for k in slots], [grads[k] for k in slots], 1.0, first, norm_state,
                                self.norm_type, amp_scale)
        if norm_state is not None:
            for tensors in norm_only.values():
                direct_ops.accumulate_norm_(norm_state, tensors, self.norm_type)

    def _total_norm(self, scale):
        """0-dim float64 norm of A (the sums times scale) over all devices, counted as skipped when
        non-finite."""
        count = self._skips_nonfinite() or self.error_if_nonfinite
        primary = self.skipped_steps.device
        for b in self._buckets:  # every rank runs every domain's collective, gradients or not
            self._norm_state(b.device, b.domain)
        state = self._norm_state(primary)
        keys = sorted(self._norm_states, key=lambda key: (str(key[0]), key[1]))  # one order on every rank
        for key in keys:
            all_reduce_norm_state_(self._norm_states[key], self._domains[key[1]], self.norm_type)
        for key in keys:
            other = self._norm_states[key]
            if key != (primary, ""):  # merge the raw states (a copy that syncs on CPU+CUDA)
                ops.merge_norm_state_(state, other.to(primary), self.norm_type)
                other.zero_()
        return ops.finalize_norm_(state, self.skipped_steps, self.norm_type, scale, count)

    def _needs_norm(self):
        """The norm pass runs only when something uses it: clipping, skipping or raising."""
        return self.max_grad_norm is not None or self._skips_nonfinite() or self.error_if_nonfinite

    def _finish_cycle(self, micro_batches=None):
        """The cycle's end: norm, skip decision, update of A = the sums / micro_batches (K, or fewer
        when finish_cycle() ends a cycle early)."""
        scale = 1.0 / (micro_batches or self.accumulation_steps)
        self.cycles_completed += 1
        if not self._had_gradient and not getattr(self, "_warned_empty_cycle", False):
            self._warned_empty_cycle = True
            warnings.warn(f"{self._name}: {_NO_GRADIENT}", stacklevel=3)
        if self._needs_norm():
            total = self.last_grad_norm = self._total_norm(scale)
        else:  # plain accumulation + SGD: no norm pass; the update reads a constant 0 norm
            self.last_grad_norm = None
            device = self._primary_device()
            if device not in self._unused_norm:
                self._unused_norm[device] = torch.zeros((), dtype=torch.float64, device=device)
            total = self._unused_norm[device]
        if self.error_if_nonfinite and not bool(torch.isfinite(total)):  # documented host sync
            self._reset_cycle_state()
            raise RuntimeError(f"{self._name}: the total gradient norm of this cycle is {total.item()}; the "
                               f"update was skipped (error_if_nonfinite=True)")
        norm_on = {total.device: total}
        for bi in range(len(self._buckets)):
            if self._live[bi] == 0:
                continue
            for slots in self._update_slots(bi):
                self._update(bi, slots, total, norm_on, scale)
        self._reset_cycle_state()
        skip_watch.after_cycle(self)
        for hook in list(self._update_post_hooks.values()):
            hook(self)

    def _update_slots(self, bi):
        """The bucket's slots to update, split so each op call sees one gradient dtype (a
        fp16/bf16 bucket may mix float32 accumulators with gradients adopted at the boundary)."""
        b, accs = self._buckets[bi], self._accs
        if self._flat is not None or (self._live[bi] == b.stop - b.start and b.adopts):
            return [range(b.start, b.stop)]
        split = defaultdict(list)
        for k in range(b.start, b.stop):
            if accs[k] is not None:
                split[accs[k].dtype].append(k)
        if len(split) == 1 and len(next(iter(split.values()))) == b.stop - b.start:
            return [range(b.start, b.stop)]
        return list(split.values())

    def _update(self, bi, slots, total, norm_on, scale):
        """One fused update call of the rule over the given slots of bucket bi, of the sums times scale."""
        b = self._buckets[bi]
        if self._flat is not None:  # the whole bucket as one tensor
            params, accs = [self._flat.params[bi]], [self._flat.grads[bi]]
        else:
            params = self._kernel_params(slots)
            accs = self._accs[slots.start:slots.stop] if isinstance(slots, range) else [self._accs[k] for k in slots]
        group = self.param_groups[b.group_index]
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.device != b.device:
            # A CPU lr is read on the host (no device sync); a lr on another GPU is copied over.
            lr = lr.item() if lr.device.type == "cpu" else lr.to(b.device)
        if b.device not in norm_on:
            norm_on[b.device] = total.to(b.device)
        self._update_bucket(bi, slots, params, accs, group, lr, norm_on[b.device], scale)

    def _update_bucket(self, bi, slots, params, accs, group, lr, total_norm, grad_scale):
        raise NotImplementedError

    def _skips_nonfinite(self):
        """Whether this cycle skips on a non-finite norm: as configured, and always under AMP."""
        return self.skip_nonfinite or self._amp_cycle

    def _gather_cycle_state(self, codes):
        """The rule's state of every bucket this cycle updates (a running sum or a gradient now;
        codes None: every bucket), read from self.state (created where missing, checked where it
        changed): all of it before the cycle's last micro-step changes anything."""
        self._cycle_state = {}
        for bi, b in enumerate(self._buckets):
            if codes is not None and self._live[bi] == 0 and codes[b.start:b.stop] == _NONE * (b.stop - b.start):
                continue
            group = self.param_groups[b.group_index]
            keys = tuple(self._required_slot_keys(group))
            if not keys:
                continue
            if self._flat is not None:
                self._flat.state_tensors(bi, keys)  # re-flattens state that was replaced the torch way
                continue
            members = self._sorted[b.start:b.stop]
            self._cycle_state[bi] = dict(zip(keys, public_state.state_lists(self, bi, members, group, keys)))

    def _slot_tensors(self, bucket_index, slots, keys):
        """The rule's per-parameter state tensors for the slots, one list per key (local shards
        of DTensor state), as _gather_cycle_state read them from self.state."""
        if self._flat is not None:
            return self._flat.state_tensors(bucket_index, keys)
        bucket = self._buckets[bucket_index]
        lists = []
        for key in keys:
            values = self._cycle_state[bucket_index][key]
            whole = isinstance(slots, range) and slots.start == bucket.start and slots.stop == bucket.stop
            chosen = values if whole else [values[k - bucket.start] for k in slots]
            lists.append([local_tensor(t) for t in chosen] if bucket.sharded else chosen)
        return lists

    def _new_param_state(self, p, group, state):
        raise NotImplementedError

    def _required_slot_keys(self, group):
        return self._SLOT_KEYS

    def _saved_accumulators(self):
        """Raw running sums by slot, as a checkpoint stores them (flat_buffers: the .grad views)."""
        if self._flat is not None:
            views = self._flat.grad_views if self._micro_step > 0 else []
            return {k: view.clone() for k, view in enumerate(views)}
        return {k: self._saved_accumulator(k) for k, acc in enumerate(self._accs) if acc is not None}

    def _saved_accumulator(self, k):
        """Slot k's raw (unscaled) running sum, as a checkpoint stores it."""
        acc = self._accs[k]
        if self._handed[k] is not None and self._handback_scale is not None:
            return acc * self._handback_scale.double().reciprocal().float().to(acc.device)
        return acc.clone()

    def _restore_cycle(self, micro_step, accumulators, handback_scale=None):
        """Reinstalls a saved cycle: raw accumulator sums by parameter index (as owned copies)."""
        self._reset_cycle_state()
        slot_of = {i: k for k, i in enumerate(self._order)}
        if self._flat is not None:
            self._flat.restore({slot_of[i]: saved for i, saved in accumulators.items()})
            self._micro_step = micro_step if slot_of else 0
            return
        for bi, b in enumerate(self._buckets):
            for k in range(b.start, b.stop):
                saved = accumulators.get(self._order[k])
                if saved is not None:
                    restored = torch.empty_like(local_tensor(self._sorted[k]), dtype=b.acc_dtype).copy_(saved)
                    self._owned[k] = self._accs[k] = restored
                    self._live[bi] += 1
        self._micro_step = micro_step if slot_of else 0
        self._had_gradient = any(a is not None for a in self._accs)
        if self._micro_step > 0 and self._micro_step + 1 == self.accumulation_steps:
            self._hand_back(handback_scale)  # as the saving run did after this micro-step

    def _forget_flat_state(self):
        """After load_state_dict: flat_buffers=True flattens the loaded per-parameter state again."""
        if self._flat is not None:
            self._flat.forget_state()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        """The torch optimizer's format plus a 'gradfuse' entry with the accumulators and
        micro-step position, so a mid-cycle save resumes exactly."""
        state_dict = export_state(self, super().state_dict())
        if self._flat is not None:  # flat mode shares one step/flag tensor per bucket: a copy for each
            for state in state_dict["state"].values():
                for key, value in state.items():
                    if key not in self._ELEMENT_KEYS and isinstance(value, torch.Tensor):
                        state[key] = value.clone()
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


def _changed_sum_message(name, what):
    return (f"{name}: the gradient of {what} was changed in place after the cycle's running sum was handed back "
            f"as its .grad for the last micro-batch (by a framework's gradient clipping or accumulation, or "
            f"module.zero_grad(set_to_none=False)?). With accumulation_steps > 1 under torch.distributed, clip "
            f"with max_grad_norm= and accumulate with accumulation_steps= instead of the framework's options "
            f"(Lightning's gradient_clip_val / accumulate_grad_batches, Accelerate's clip_grad_norm_ / "
            f"gradient_accumulation_steps), and zero gradients with optimizer.zero_grad().")


def _foreach_mul_by_device(tensors, factor):
    """tensors *= factor (a 1-element device tensor), one foreach call per device, no host sync."""
    by_device = defaultdict(list)
    for t in tensors:
        by_device[t.device].append(t)
    for device, group in by_device.items():
        torch._foreach_mul_(group, factor.to(device).reshape(()))


def _check_no_shared_memory(params, name):
    """Parameters must not share memory: one update pass would write the same bytes twice. A
    DTensor is checked by its local shard (its own data_ptr() is not the memory it updates)."""
    locals_ = [(local_tensor(p), i) for i, p in enumerate(params)]
    spans = sorted((str(t.device), t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), i)
                   for t, i in locals_ if t.numel() > 0)
    for (dev_a, _, end_a, i), (dev_b, start_b, _, j) in zip(spans, spans[1:]):
        if dev_a == dev_b and start_b < end_a:
            raise ValueError(f"parameters {min(i, j)} and {max(i, j)} share memory (views of one tensor?); "
                             f"{name} needs every parameter in its own memory")
