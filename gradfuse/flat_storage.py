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

from . import public_state
from ._native import FlatBinding, gather_param_state, same_objects
from .distributed_norm import is_dtensor

_ALIGN_BYTES = 64  # every view starts on a cache line: vector loads of one tensor stay aligned


def check_flat_params(params, name, accum_dtype):
    """Parameters flat_buffers=True cannot hold, refused before anything changes."""
    for i, p in enumerate(params):
        if is_dtensor(p):
            raise ValueError(f"{name}: flat_buffers=True does not support DTensor (FSDP2) parameter {i}: FSDP2 "
                             f"owns their storage; use the default mode")
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


class FlatStorage:
    """The flat buffers of one optimizer's current bucket layout."""

    def __init__(self, opt, previous=None):
        self.opt = opt
        self.params, self.grads = [], []  # one flat tensor per bucket
        self.states = []  # per bucket: state key -> flat tensor (per-element keys) or shared 0-dim tensor
        self.offsets = []
        # A cycle ended and its sum is still in the buffers: zero_grad() must come first.
        self.dirty = previous is not None and previous.dirty
        self._build()

    @torch.no_grad()
    def _build(self):
        opt = self.opt
        check_flat_params(opt._sorted, opt._name, opt.accum_dtype)
        param_views, grad_views, pending = [], [], []
        for b in opt._buckets:
            members = opt._sorted[b.start:b.stop]
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
        self.bound = [{} for _ in opt._buckets]  # per bucket: state key -> the per-parameter values bound
        self.seen = [None] * len(opt._buckets)  # per bucket: (opt.state, its write count) when last checked
        for p, view in zip(opt._sorted, param_views):  # nothing below can fail: rebind the user's tensors
            p.data = view
        self.grad_views = grad_views  # each slot's .grad: the running sum of the cycle
        self.binding = FlatBinding(opt._sorted, param_views, grad_views)
        self.binding.bind_grads(False)
        self.binding.mark_cycle_start(pending)

    # ------------------------------------------------------------------ gradients
    def check_micro_step(self, end_of_cycle, max_bumps):
        """Every micro-step, before anything changes: every parameter still lives in its flat
        buffer, each .grad view changed at most by max_bumps in-place writes (autograd's add, and
        DDP's copy of the reduced sum), and at the cycle's end every parameter got a gradient in it
        (a zero one would still be decayed and pushed by momentum, where torch.optim skips it). A
        .grad set to None (module.zero_grad()) with no backward since is bound to its view again."""
        bad, reason = self.binding.check_micro_step(max_bumps, end_of_cycle)
        if bad >= 0:
            opt = self.opt
            raise RuntimeError(f"{opt._name}: {opt._describe(opt._order[bad])} {reason}. With flat_buffers=True "
                               f"parameters stay views of the optimizer's flat buffers (build the optimizer after "
                               f"moving or casting the model), .grad holds the running sum (zero it with "
                               f"optimizer.zero_grad()), and every parameter gets a gradient each cycle (else use "
                               f"flat_buffers=False).")

    def zero_grads(self):
        """A new cycle: the gradient buffers zeroed in place (the views' versions do not move)."""
        for grad in self.grads:
            grad.zero_()
        self.binding.bind_grads(True)  # after a module.zero_grad(), the coming backward adds into the views
        self.dirty = False

    @torch.no_grad()
    def restore(self, sums):
        """A saved cycle back in the buffers: sums maps slot -> raw running sum."""
        self.zero_grads()
        for k, total in sums.items():
            self.grad_views[k].copy_(total)
        self.binding.mark_cycle_start(sorted(sums))

    # ------------------------------------------------------------------ optimizer state
    def state_tensors(self, bi, keys):
        """The rule's state for bucket bi as one-element lists (a flat buffer or a shared scalar).
        opt.state is the truth: a key whose per-parameter entries are no longer the views bound
        here (reset or replaced the torch way) is flattened again from what opt.state holds."""
        opt, b = self.opt, self.opt._buckets[bi]
        entry, bound = self.states[bi], self.bound[bi]
        state = public_state.current_state(opt)
        if not (all(key in entry for key in keys) and public_state.unchanged_since(opt, self.seen[bi])):
            current, _ = gather_param_state(state, opt._sorted[b.start:b.stop], list(keys))
            stale = [key for key, values in zip(keys, current)
                     if key not in entry or not same_objects(values, bound[key])]
            if stale:
                for key in stale:
                    entry.pop(key, None)
                self._create_state(bi, stale)
            self.seen[bi] = (state, state.writes)
        return [[entry[key]] for key in keys]

    def forget_state(self):
        """After load_state_dict: the loaded per-parameter state is flattened again on next use."""
        self.states = [{} for _ in self.states]
        self.seen = [None] * len(self.states)

    @torch.no_grad()
    def _create_state(self, bi, keys):
        """Flat state for bucket bi, starting from any per-parameter state already there (loaded,
        or from an earlier layout); a scalar (step count, written flag) is one tensor for all."""
        opt, b = self.opt, self.opt._buckets[bi]
        members = opt._sorted[b.start:b.stop]
        group = opt.param_groups[b.group_index]
        fresh = opt._new_param_state(members[0], group, {})
        entry = self.states[bi]
        for key in keys:
            existing = [opt.state[p].get(key) for p in members]
            _check_shared_scalar(opt, key, members, existing)
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

    def check_loaded(self, state_by_index):
        """Before load_state_dict changes anything: within a bucket, every parameter has the same
        state keys and the same step count (the bucket is updated as one)."""
        opt = self.opt
        for b in opt._buckets:
            indices = [opt._order[k] for k in range(b.start, b.stop)]
            entries = [state_by_index.get(i) or {} for i in indices]
            for key in sorted(opt._STATE_KEYS):
                present = [entry.get(key) is not None for entry in entries]
                if any(present) and not all(present):
                    missing = indices[present.index(False)]
                    raise ValueError(f"parameter {missing} has no {key} where others of its flat buffer do; "
                                     f"flat_buffers=True keeps the state of a buffer's parameters together")
            steps = {float(entry["step"]) for entry in entries if entry.get("step") is not None}
            if len(steps) > 1:
                raise ValueError(f"parameters {indices[0]}..{indices[-1]} share a flat buffer but have different "
                                 f"step counts {sorted(steps)}; flat_buffers=True steps a buffer as one")


def _check_shared_scalar(opt, key, members, existing):
    """A scalar state entry (step count, written flag) is one tensor for a whole flat buffer: the
    values found in opt.state must agree (read on the host: only when state is flattened again)."""
    if key in opt._ELEMENT_KEYS:
        return
    present = [value for value in existing if value is not None]
    if present and (len(present) != len(existing) or len({float(v) for v in present}) > 1):
        raise ValueError(f"{opt._name}: opt.state[p][{key!r}] differs between parameters of one flat buffer (or is "
                         f"missing for some); flat_buffers=True keeps one {key} per buffer: set it alike for all "
                         f"of them, or reset their state together")
