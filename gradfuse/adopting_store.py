"""The default store: the first gradient of a cycle is adopted as the running sum (no copy) when
no addition in its dtype follows, later ones are added by the fused accumulate pass, one native
call per bucket in the common cases."""
from collections import defaultdict
from typing import List, Optional

import torch

from . import direct_ops, gradient_codes
from ._native import first_modified
from .distributed_norm import is_dtensor, local_tensor, ranks_communicate
from .sum_store import SumStore

NONE, ADOPT, COPY, RELAYOUT = gradient_codes.NONE, gradient_codes.ADOPT, gradient_codes.COPY, gradient_codes.RELAYOUT


class Gathered:
    """A micro-batch's gradients in slot order and their GradientCode bytes."""
    __slots__ = ("grads", "codes", "boundary", "taken_back")

    def __init__(self, grads, codes, boundary):
        self.grads, self.codes, self.boundary = grads, codes, boundary
        self.taken_back = None  # hand_back_store.py: what the last micro-batch finds in handed-back sums


class AdoptingStore(SumStore):
    mode = "default"

    def __init__(self, name, layout, previous=None):
        super().__init__(name, layout)
        n = len(layout.sorted)
        self.sums: List[Optional[torch.Tensor]] = [None] * n  # this cycle's raw gradient sums
        self.versions: List[Optional[int]] = [None] * n  # version of an adopted p.grad, None if owned
        self.owned: List[Optional[torch.Tensor]] = [None] * n  # our own buffers, kept across cycles
        self.live = [0] * len(layout.buckets)  # sums alive per bucket
        if previous is not None:
            self._carry(previous)

    def _carry(self, previous):
        """The sums (and owned buffers) of parameters present in both layouts, in the new slot order."""
        by_id = {id(p): k for k, p in enumerate(previous.layout.sorted)}

        def carry(values):
            return [values[by_id[id(p)]] if id(p) in by_id else None for p in self.layout.sorted]
        self.sums, self.versions = carry(previous.sums), carry(previous.versions)
        self.owned = carry(previous.owned)
        for b in self.layout.buckets:  # parameters cast or moved (model.double(), .to()): sums follow them
            for k in b.slots:
                like = self.layout.sorted[k]
                if self.sums[k] is not None and (self.sums[k].dtype != b.acc_dtype or
                                                 self.sums[k].device != local_tensor(like).device):
                    self.sums[k] = self.sums[k].to(device=local_tensor(like).device, dtype=b.acc_dtype)
                    self.versions[k] = None  # now our own copy
                if self.owned[k] is not None and self.owned[k].dtype != b.acc_dtype:
                    self.owned[k] = None
        self.live = [sum(a is not None for a in self.sums[b.start:b.stop]) for b in self.layout.buckets]
        self.had_gradient = previous.had_gradient

    def relayout(self, layout):
        return type(self)(self.name, layout, self)

    # ------------------------------------------------------------------ a micro-step
    def gather(self, boundary, amp_scale):
        layout = self.layout
        bad, reason, codes, grads = layout.inspector.gather()
        if bad >= 0:
            raise RuntimeError(f"{self.name}: {layout.describe_slot(bad)} {reason}")
        if layout.views:
            codes = self._through_views(grads, codes)
        if layout.has_sharded:
            codes = self._local_shards_of(grads, codes)
        if RELAYOUT in codes:  # rare: a dense gradient laid out unlike its parameter
            codes = bytearray(codes)
            for k, code in enumerate(codes):
                if code == RELAYOUT[0]:
                    grads[k] = torch.empty_like(local_tensor(layout.sorted[k])).copy_(grads[k])
                    codes[k] = ADOPT[0]
            codes = bytes(codes)
        if boundary:
            self._check_adopted_untouched()
        return Gathered(grads, codes, boundary)

    def _through_views(self, grads, codes):
        """Gradients of parameters updated through a KernelView in the kernels' form, always copied."""
        codes = bytearray(codes)
        for k, view in self.layout.views.items():
            if grads[k] is not None:
                grads[k] = view.grad(grads[k])
                codes[k] = COPY[0]
        return bytes(codes)

    def nothing(self):
        n = len(self.layout.sorted)
        return Gathered([None] * n, NONE * n, True)

    def _local_shards_of(self, grads, codes):
        """DTensor gradients -> their local shards (what the kernels update), checked against
        the parameter's placements; codes recomputed for the shard (FSDP2's are views)."""
        layout, codes = self.layout, bytearray(codes)
        for b in layout.buckets:
            if not b.sharded:
                continue
            for k in b.slots:
                g, p = grads[k], layout.sorted[k]
                if g is None:
                    continue
                if not is_dtensor(g) or g.device_mesh != p.device_mesh or g.placements != p.placements:
                    where = f"placements {g.placements}" if is_dtensor(g) else "a plain tensor"
                    raise RuntimeError(f"{self.name}: {layout.describe_slot(k)} is a DTensor with placements "
                                       f"{p.placements} but its gradient is {where}; gradfuse needs gradients "
                                       f"sharded like their parameters")
                shard, own = g._local_tensor, local_tensor(p)
                if shard.shape != own.shape or shard.dtype != own.dtype:
                    raise RuntimeError(f"{self.name}: {layout.describe_slot(k)}: local gradient shard "
                                       f"{shard.dtype}{tuple(shard.shape)} does not match the parameter's local "
                                       f"shard {own.dtype}{tuple(own.shape)}")
                grads[k] = shard
                codes[k] = gradient_codes.code_for(shard, own)[0]  # FSDP2's shards are views: copied
        return bytes(codes)

    def _check_adopted_untouched(self):
        """Before the update: no adopted gradient was changed in place by anyone but us (checked
        at the cycle's last micro-batch, before any parameter changes)."""
        if not any(self.live):
            return
        k = first_modified(self.sums, self.versions)
        if k >= 0:
            raise RuntimeError(
                f"{self.name}: the gradient of {self.layout.describe_slot(k)} was modified in place after "
                f"step() (for example by module.zero_grad(set_to_none=False)); {self.name} keeps it as the "
                f"cycle's accumulator. Use optimizer.zero_grad() or set_to_none=True between micro-batches.")

    def updating(self, gathered):
        codes = gathered.codes
        return [bi for bi, b in enumerate(self.layout.buckets)
                if self.live[bi] or codes[b.start:b.stop] != NONE * (b.stop - b.start)]

    def add(self, gathered, with_norm, norms, norm_type, amp_scale):
        """One op call per bucket in the common cases; on the last micro-batch the same pass feeds
        the global norm."""
        grads, codes, sums = gathered.grads, gathered.codes, self.sums
        self.had_gradient = self.had_gradient or codes.count(NONE) != len(codes)
        keep_versions = not gathered.boundary
        scales = {}
        for bi, b in enumerate(self.layout.buckets):
            s, e = b.start, b.stop
            norm_state = norms.partial(b.device, b.domain) if with_norm else None
            slots = norms.slots(b.device, b.domain) if with_norm else None
            per_slot = None if slots is None else slots[s:e]  # per-parameter partials, from the same pass
            present = codes[s:e]
            scale = None
            if amp_scale is not None:  # scaled gradients must pass through a kernel: no adoption
                if b.device not in scales:
                    scales[b.device] = amp_scale.to(device=b.device, dtype=torch.float32)
                scale = scales[b.device]
            # A gradient becomes the sum itself (no copy; 1/K is folded into the update) when no
            # addition follows in its dtype: always at fp32/fp64, at the boundary for fp16/bf16.
            adopts = scale is None and (b.adopts or gathered.boundary)
            if self.live[bi] == e - s and present == NONE * (e - s):  # complete (handed back) or absent
                if norm_state is not None:
                    direct_ops.accumulate_norm_(norm_state, sums[s:e], norm_type, per_slot)
            elif adopts and self.live[bi] == 0 and present == ADOPT * (e - s):
                sums[s:e] = grads[s:e]
                if keep_versions:
                    self.versions[s:e] = [g._version for g in grads[s:e]]
                self.live[bi] = e - s
                if norm_state is not None:
                    direct_ops.accumulate_norm_(norm_state, grads[s:e], norm_type, per_slot)
            elif self.live[bi] == e - s and NONE not in present:
                direct_ops.accumulate_(sums[s:e], grads[s:e], 1.0, False, norm_state, norm_type, scale, per_slot)
            else:
                self._add_mixed(bi, grads, codes, norm_state, norm_type, scale, adopts, slots)

    def _add_mixed(self, bi, grads, codes, norm_state, norm_type, amp_scale, adopts, slot_partials):
        """The general case of one bucket: some gradients missing, some sums new."""
        b, sums = self.layout.buckets[bi], self.sums
        fresh, adding, norm_only = [], [], defaultdict(list)  # norm_only by dtype: one op call each
        for k in b.slots:
            g, acc = grads[k], sums[k]
            if g is None:
                if acc is not None:
                    norm_only[acc.dtype].append(k)
            elif acc is not None:
                adding.append(k)
            elif adopts and codes[k] == ADOPT[0]:
                sums[k] = g
                self.versions[k] = g._version
                norm_only[g.dtype].append(k)
            else:
                sums[k] = self._owned_buffer(k, b)
                fresh.append(k)
            self.live[bi] += acc is None and g is not None
        for first, slots in ((True, fresh), (False, adding)):
            if slots:
                per_slot = scattered_partials(slot_partials, slots)
                direct_ops.accumulate_([sums[k] for k in slots], [grads[k] for k in slots], 1.0, first, norm_state,
                                       norm_type, amp_scale, per_slot)
                write_back_partials(slot_partials, slots, per_slot)
        if norm_state is not None:
            for slots in norm_only.values():
                per_slot = scattered_partials(slot_partials, slots)
                direct_ops.accumulate_norm_(norm_state, [sums[k] for k in slots], norm_type, per_slot)
                write_back_partials(slot_partials, slots, per_slot)

    def _owned_buffer(self, k, bucket):
        """Slot k's own sum buffer (kept across cycles: first=True overwrites it)."""
        if self.owned[k] is None:
            view = self.layout.views.get(k)
            self.owned[k] = view.sum_buffer(bucket.acc_dtype) if view is not None else \
                torch.empty_like(local_tensor(self.layout.sorted[k]), dtype=bucket.acc_dtype)
        return self.owned[k]

    # ------------------------------------------------------------------ the cycle's end
    def update_calls(self, bucket_index):
        """Split so each call sees one sum dtype (a fp16/bf16 bucket may mix float32 sums with
        gradients adopted at the boundary)."""
        b, sums = self.layout.buckets[bucket_index], self.sums
        if self.live[bucket_index] == 0:
            return []
        if self.live[bucket_index] == b.stop - b.start and b.adopts:
            groups = [b.slots]
        else:
            split = defaultdict(list)
            for k in b.slots:
                if sums[k] is not None:
                    split[sums[k].dtype].append(k)
            groups = list(split.values())
            if len(groups) == 1 and len(groups[0]) == b.stop - b.start:
                groups = [b.slots]
        return [(slots, self._kernel_params(slots), self._sums_of(slots)) for slots in groups]

    def _sums_of(self, slots):
        return self.sums[slots.start:slots.stop] if isinstance(slots, range) else [self.sums[k] for k in slots]

    def _kernel_params(self, slots):
        """The tensors the kernels update: DTensor parameters by their local shard, read anew
        (FSDP2 may rebind it after the optimizer was built)."""
        layout = self.layout
        chosen = layout.sorted[slots.start:slots.stop] if isinstance(slots, range) else [layout.sorted[k] for k in slots]
        if layout.views:
            indices = slots if not isinstance(slots, range) else list(slots)
            chosen = [layout.views[k].param_for_update() if k in layout.views else p for k, p in zip(indices, chosen)]
        return [local_tensor(p) for p in chosen] if layout.has_sharded else chosen

    def end_cycle(self):
        n = len(self.sums)
        self.sums, self.versions = [None] * n, [None] * n
        self.live = [0] * len(self.layout.buckets)
        self.had_gradient = False

    # ------------------------------------------------------------------ zero_grad, checkpoints
    def zero_grad(self, set_to_none, micro_step):
        """A gradient adopted as a running sum is replaced by a fresh zero tensor instead of being
        zeroed in place (set_to_none=False)."""
        if set_to_none:
            self.layout.inspector.clear_grads()  # one native loop: cheap for thousands of tensors
            return
        for k, p in enumerate(self.layout.sorted):
            grad = p.grad
            if grad is None or self._keeps_as_grad(k, grad):
                continue
            if self.versions[k] is not None and grad is self.sums[k]:
                p.grad = torch.zeros_like(grad)
            else:
                if grad.grad_fn is not None:
                    grad.detach_()
                else:
                    grad.requires_grad_(False)
                grad.zero_()

    def _keeps_as_grad(self, k, grad):
        """Whether slot k's .grad is a running sum that must stay as it is (handed back)."""
        return False

    def check_finish_early(self):
        if ranks_communicate():
            raise RuntimeError(f"{self.name}: finish_cycle() works alone: under torch.distributed the open cycle's "
                               f"micro-batches were not communicated yet")

    def saved_sums(self, micro_step):
        views = self.layout.views
        return {k: views[k].saved(acc.clone()) if k in views else acc.clone()
                for k, acc in enumerate(self.sums) if acc is not None}

    def restore(self, sums, micro_step, resumes_at_last, handback_scale=None, in_grad=False):
        self.end_cycle()
        for bi, b in enumerate(self.layout.buckets):
            for k in b.slots:
                saved = sums.get(k)
                if saved is not None:
                    view = self.layout.views.get(k)
                    self.sums[k] = self._owned_buffer(k, b).copy_(saved if view is None else view.grad(saved))
                    self.live[bi] += 1
        self.had_gradient = any(a is not None for a in self.sums)
        return bool(self.layout.sorted)


def scattered_partials(slot_partials, slots):
    """A fresh per-tensor partials vector for an op call over some slots (None when not tracked)."""
    return None if slot_partials is None else torch.zeros(len(slots), dtype=torch.float64,
                                                          device=slot_partials.device)


def write_back_partials(slot_partials, slots, per_slot):
    """Writes an op call's per-tensor partials into their slots (each slot gets one call a cycle)."""
    if per_slot is not None:  # one fused copy, no index tensor to send to the device
        torch._foreach_copy_([slot_partials[k] for k in slots], list(per_slot.unbind(0)))
