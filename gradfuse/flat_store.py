"""flat_buffers=True: each bucket's parameters, gradients and per-element optimizer state become
views of one flat buffer per bucket (group, device, dtype), so that autograd adds every
micro-batch into the flat gradient buffer in place, and the norm and the update are one flat
loop or launch per bucket however many tensors the model has (the design of DDP's
gradient_as_bucket_view and Megatron-LM's contiguous gradient buffer).

What changes for the user: p.data is rebound to a view of the flat buffer at construction; p.grad
is a view too, and holds the running sum of the cycle; optimizer.zero_grad() zeroes the buffer in
place at the start of a cycle and keeps it mid-cycle (set_to_none is ignored; either way it binds
the views again after a module.zero_grad()); every parameter is updated every cycle. Whatever breaks those rules is refused with an error naming the parameter."""
import torch

from . import direct_ops, public_state
from ._native import FlatBinding, gather_param_state, same_objects
from .distributed_norm import is_dtensor, ranks_communicate
from .kernel_views import needs_view
from .sum_store import SumStore

_ALIGN_BYTES = 64  # every view starts on a cache line: vector loads of one tensor stay aligned


def check_flat_params(params, name, accum_dtype):
    """Parameters flat_buffers=True cannot hold, refused before anything changes."""
    for i, p in enumerate(params):
        if is_dtensor(p):
            raise ValueError(f"{name}: flat_buffers=True does not support DTensor (FSDP2) parameter {i}: FSDP2 "
                             f"owns their storage; use the default mode")
        if needs_view(p):
            raise ValueError(f"{name}: parameter {i} is complex or not dense in memory; flat_buffers=True holds real, "
                             f"dense parameters (use the default mode, which updates such parameters as torch does)")
        if not p.requires_grad:
            raise ValueError(f"{name}: parameter {i} does not require grad; flat_buffers=True updates every "
                             f"parameter it holds each cycle, so pass only trainable ones "
                             f"([p for p in model.parameters() if p.requires_grad])")
        if accum_dtype is not None and accum_dtype != p.dtype:
            raise ValueError(f"{name}: flat_buffers=True accumulates in .grad, in the parameter's dtype "
                             f"({p.dtype} for parameter {i}); accum_dtype={accum_dtype} cannot be honoured")
        grad = p.grad
        if grad is not None and (grad.layout != torch.strided or grad.shape != p.shape or grad.dtype != p.dtype):
            raise ValueError(f"{name}: parameter {i} has a {grad.layout} {grad.dtype} gradient of shape "
                             f"{tuple(grad.shape)}; flat_buffers=True needs dense gradients like their parameters")


def _layout(members):
    """Start offsets (in elements, cache-line aligned) and the total length of one flat buffer."""
    offsets, total = [], 0
    for p in members:
        step = max(1, _ALIGN_BYTES // p.element_size())
        total = -(-total // step) * step
        offsets.append(total)
        total += p.numel()
    return offsets, total


def _view(flat, offset, like):
    """A tensor over flat's memory at offset, shaped and strided like `like`. Built with set_, not
    slicing: it then has its own version counter, which tells whether autograd wrote to it."""
    return torch.empty(0, dtype=flat.dtype, device=flat.device).set_(
        flat.untyped_storage(), offset, like.shape, like.stride())


class _Gathered:
    __slots__ = ("boundary",)

    def __init__(self, boundary):
        self.boundary = boundary


class FlatStore(SumStore):
    """The flat buffers of one optimizer's current bucket layout; .grad of every parameter is a
    view of its bucket's gradient buffer and holds the running sum."""
    mode = "flat_buffers"

    def __init__(self, name, layout, accum_dtype, previous=None):
        super().__init__(name, layout)
        self.accum_dtype = accum_dtype
        self.params, self.grads = [], []  # one flat tensor per bucket
        self.states = []  # per bucket: state key -> flat tensor (per-element keys) or shared 0-dim tensor
        self.offsets = []
        # A cycle ended and its sum is still in the buffers: zero_grad() must come first.
        self.dirty = getattr(previous, "dirty", False)
        self._build()

    def relayout(self, layout):
        return FlatStore(self.name, layout, self.accum_dtype, self)  # new buffers, values and sums carried

    def check_new_params(self, params):
        check_flat_params(params, self.name, self.accum_dtype)

    @torch.no_grad()
    def _build(self):
        layout = self.layout
        check_flat_params(layout.sorted, self.name, self.accum_dtype)
        param_views, grad_views, pending = [], [], []
        for b in layout.buckets:
            members = layout.sorted[b.start:b.stop]
            offsets, total = _layout(members)
            dtype = members[0].dtype
            flat_param = torch.zeros(total, dtype=dtype, device=b.device)
            flat_grad = torch.zeros(total, dtype=dtype, device=b.device)
            for p, offset in zip(members, offsets):
                view = _view(flat_param, offset, p).copy_(p)
                param_views.append(view)
                grad = _view(flat_grad, offset, p)
                if p.grad is not None:  # a pending gradient (or, rebuilt mid-cycle, running sum) counts
                    grad.copy_(p.grad)
                    pending.append(len(grad_views))
                grad_views.append(grad)
            self.params.append(flat_param)
            self.grads.append(flat_grad)
            self.states.append({})
            self.offsets.append(offsets)
        self.bound = [{} for _ in layout.buckets]  # per bucket: state key -> the per-parameter values bound
        self.seen = [None] * len(layout.buckets)  # per bucket: (opt.state, its write count) when last checked
        for p, view in zip(layout.sorted, param_views):  # nothing below can fail: rebind the user's tensors
            p.data = view
        self.grad_views = grad_views  # each slot's .grad: the running sum of the cycle
        self.binding = FlatBinding(layout.sorted, param_views, grad_views)
        self.binding.bind_grads(False)
        self.binding.mark_cycle_start(pending)

    # ------------------------------------------------------------------ a micro-step
    def refuse(self, amp_scale, found_inf, boundary, micro_step):
        if amp_scale is not None or found_inf is not None:
            raise RuntimeError(f"{self.name}: flat_buffers=True cannot be used with GradScaler: autograd sums the "
                               f"micro-batches' scaled gradients in place, so a scale change mid-cycle could not be "
                               f"undone; use flat_buffers=False, or bfloat16 autocast (which needs no scaler)")
        if micro_step == 0 and self.dirty:
            raise RuntimeError(f"{self.name}: the gradient buffers still hold the last cycle's sum; with "
                               f"flat_buffers=True call optimizer.zero_grad() after the step that ends a cycle "
                               f"(module.zero_grad() does not reset the optimizer's flat buffers)")

    def gather(self, boundary, amp_scale):
        """Every micro-step, before anything changes: every parameter still lives in its flat
        buffer, each .grad view changed at most by max_bumps in-place writes (autograd's add, and
        DDP's copy of the reduced sum), and at the cycle's end every parameter got a gradient in it
        (a zero one would still be decayed and pushed by momentum, where torch.optim skips it). A
        .grad set to None (module.zero_grad()) with no backward since is bound to its view again."""
        max_bumps = 2 if ranks_communicate() else 1
        bad, reason = self.binding.check_micro_step(max_bumps, boundary)
        if bad >= 0:
            raise RuntimeError(f"{self.name}: {self.layout.describe_slot(bad)} {reason}. With flat_buffers=True "
                               f"parameters stay views of the optimizer's flat buffers (build the optimizer after "
                               f"moving or casting the model), .grad holds the running sum (zero it with "
                               f"optimizer.zero_grad()), and every parameter gets a gradient each cycle (else use "
                               f"flat_buffers=False).")
        return _Gathered(boundary)

    def nothing(self):
        return _Gathered(True)

    def updating(self, gathered):
        return list(range(len(self.layout.buckets))) if gathered.boundary else []

    def add(self, gathered, with_norm, norms, norm_type, amp_scale):
        """autograd has added the micro-batch into the buffers already; the cycle's end adds one
        norm call per bucket."""
        if not gathered.boundary:
            return
        if with_norm:
            for bi, b in enumerate(self.layout.buckets):
                slots = norms.slots(b.device, b.domain)
                if slots is None:
                    direct_ops.accumulate_norm_(norms.partial(b.device, b.domain), [self.grads[bi]], norm_type)
                else:  # per-parameter norms: the bucket's views (its padding is zeros: the same total)
                    direct_ops.accumulate_norm_(norms.partial(b.device, b.domain), self.grad_views[b.start:b.stop],
                                                norm_type, slots[b.start:b.stop])
        self.had_gradient = True
        self.dirty = True  # from here on the buffers hold a finished sum until zero_grad()

    def update_calls(self, bucket_index):
        b = self.layout.buckets[bucket_index]
        return [(b.slots, [self.params[bucket_index]], [self.grads[bucket_index]])]  # the bucket as one tensor

    def end_cycle(self):
        self.had_gradient = False

    def zero_grad(self, set_to_none, micro_step):
        """A new cycle: the gradient buffers zeroed in place (the views' versions do not move);
        mid-cycle the views keep the running sum. Either way every .grad is bound to its view again."""
        if micro_step > 0:
            self.binding.bind_grads(False)
            return
        for grad in self.grads:
            grad.zero_()
        self.binding.bind_grads(True)  # after a module.zero_grad(), the coming backward adds into the views
        self.dirty = False

    def check_finish_early(self):
        raise RuntimeError(f"{self.name}: finish_cycle() works without flat_buffers=True only: autograd has already "
                           f"summed the open cycle's micro-batches into the flat buffers as one")

    # ------------------------------------------------------------------ checkpoints
    def saved_sums(self, micro_step):
        return {k: view.clone() for k, view in enumerate(self.grad_views)} if micro_step > 0 else {}

    @torch.no_grad()
    def restore(self, sums, micro_step, resumes_at_last, handback_scale=None, in_grad=False):
        self.zero_grad(True, 0)
        for k, total in sums.items():
            self.grad_views[k].copy_(total)
        self.binding.mark_cycle_start(sorted(sums))
        return bool(self.layout.sorted)

    # ------------------------------------------------------------------ optimizer state
    def rule_state(self, opt, reader, bucket_index, keys, group):
        """The rule's state for the bucket as one-element lists (a flat buffer or a shared scalar).
        opt.state is the truth: a key whose per-parameter entries are no longer the views bound
        here (reset or replaced the torch way) is flattened again from what opt.state holds."""
        b = self.layout.buckets[bucket_index]
        entry, bound = self.states[bucket_index], self.bound[bucket_index]
        state = public_state.current_state(opt)
        if not (all(key in entry for key in keys) and public_state.unchanged_since(opt, self.seen[bucket_index])):
            current, _ = gather_param_state(state, self.layout.sorted[b.start:b.stop], list(keys))
            stale = [key for key, values in zip(keys, current)
                     if key not in entry or not same_objects(values, bound[key])]
            if stale:
                for key in stale:
                    entry.pop(key, None)
                self._create_state(opt, bucket_index, stale, group)
            self.seen[bucket_index] = (state, state.writes)
        return [[entry[key]] for key in keys]

    def forget_state(self):
        self.states = [{} for _ in self.states]
        self.seen = [None] * len(self.states)

    @torch.no_grad()
    def _create_state(self, opt, bi, keys, group):
        """Flat state for bucket bi, starting from any per-parameter state already there (loaded,
        or from an earlier layout); a scalar (step count, written flag) is one tensor for all."""
        b = self.layout.buckets[bi]
        members = self.layout.sorted[b.start:b.stop]
        fresh = opt._new_param_state(members[0], group, {})
        entry = self.states[bi]
        for key in keys:
            existing = [opt.state[p].get(key) for p in members]
            _check_shared_scalar(self.name, key in opt._ELEMENT_KEYS, key, existing)
            if key in opt._ELEMENT_KEYS:
                flat = torch.zeros_like(self.params[bi], dtype=fresh[key].dtype)
                values = [_view(flat, offset, p) for p, offset in zip(members, self.offsets[bi])]
                for value, old in zip(values, existing):
                    if old is not None:
                        value.copy_(old)
                entry[key] = flat
            else:
                shared = fresh[key] if existing[0] is None else existing[0].clone()
                values = [shared] * len(members)
                entry[key] = shared
            for p, value in zip(members, values):
                opt.state[p][key] = value
            self.bound[bi][key] = values

    def exported(self, states, element_keys):
        for state in states.values():  # one step/flag tensor per bucket here: a copy for each parameter
            for key, value in state.items():
                if key not in element_keys and isinstance(value, torch.Tensor):
                    state[key] = value.clone()

    def check_loaded(self, state_by_index, state_keys):
        """Before load_state_dict changes anything: within a bucket, every parameter has the same
        state keys and the same step count (the bucket is updated as one)."""
        layout = self.layout
        for b in layout.buckets:
            indices = [layout.order[k] for k in b.slots]
            entries = [state_by_index.get(i) or {} for i in indices]
            for key in sorted(state_keys):
                present = [entry.get(key) is not None for entry in entries]
                if any(present) and not all(present):
                    missing = indices[present.index(False)]
                    raise ValueError(f"parameter {missing} has no {key} where others of its flat buffer do; "
                                     f"flat_buffers=True keeps the state of a buffer's parameters together")
            steps = {float(entry["step"]) for entry in entries if entry.get("step") is not None}
            if len(steps) > 1:
                raise ValueError(f"parameters {indices[0]}..{indices[-1]} share a flat buffer but have different "
                                 f"step counts {sorted(steps)}; flat_buffers=True steps a buffer as one")


def _check_shared_scalar(name, per_element, key, existing):
    """A scalar state entry (step count, written flag) is one tensor for a whole flat buffer: the
    values found in opt.state must agree (read on the host: only when state is flattened again)."""
    if per_element:
        return
    present = [value for value in existing if value is not None]
    if present and (len(present) != len(existing) or len({float(v) for v in present}) > 1):
        raise ValueError(f"{name}: opt.state[p][{key!r}] differs between parameters of one flat buffer (or is "
                         f"missing for some); flat_buffers=True keeps one {key} per buffer: set it alike for all "
                         f"of them, or reset their state together")
