"""The store under torch.distributed: each running sum becomes .grad again before the cycle's last
backward, so autograd adds the last micro-batch into it in place and DistributedDataParallel,
leaving no_sync() for that backward, all-reduces the whole cycle's sum once (overlapped with the
backward). Before that (micro-batches under no_sync()), the sums stay in .grad as they do alone
(resident_store.py; a DDP that communicates every micro-batch changes .grad after autograd, which
keeps them apart). DTensor (FSDP2) shards are not handed back: FSDP2 reduces every gradient it
produces. Under GradScaler the sum goes back scaled by this micro-batch's scale, like the gradient
added to it."""
from collections import defaultdict
from typing import List, Optional

import torch

from . import gradient_codes
from .adopting_store import AdoptingStore
from .resident_store import ResidentSumStore

NONE = gradient_codes.NONE


def changed_sum_message(name, what):
    return (f"{name}: the gradient of {what} was changed in place after the cycle's running sum was handed back "
            f"as its .grad for the last micro-batch (by a framework's gradient clipping or accumulation, or "
            f"module.zero_grad(set_to_none=False)?). With accumulation_steps > 1 under torch.distributed, clip "
            f"with max_grad_norm= and accumulate with accumulation_steps= instead of the framework's options "
            f"(Lightning's gradient_clip_val / accumulate_grad_batches, Accelerate's clip_grad_norm_ / "
            f"gradient_accumulation_steps), and zero gradients with optimizer.zero_grad().")


class HandBackStore(ResidentSumStore):
    mode = "default"  # the user's mode is unchanged: this is the default store where ranks communicate

    def __init__(self, name, layout, previous=None, keep_apart=False):
        if layout.views:
            k = next(iter(layout.views))
            raise ValueError(f"{name}: {layout.describe_slot(k)} is complex or not dense in memory; under "
                             f"torch.distributed gradfuse hands running sums back as .grad, which needs real, "
                             f"dense parameters (make it contiguous, or view a complex one with view_as_real)")
        self.handed: List[Optional[int]] = [None] * len(layout.sorted)  # version of a sum handed back as .grad
        self.handed_back = False
        self.handback_scale = None  # GradScaler's scale the handed-back sums were multiplied by
        super().__init__(name, layout, previous, keep_apart)

    def _carry(self, previous):
        super()._carry(previous)
        if isinstance(previous, HandBackStore) and previous.handed_back:
            by_id = {id(p): k for k, p in enumerate(previous.layout.sorted)}
            self.handed = [previous.handed[by_id[id(p)]] if id(p) in by_id else None for p in self.layout.sorted]
            self.handed_back, self.handback_scale = previous.handed_back, previous.handback_scale

    def after_micro_step(self, next_is_last, amp_scale):
        if next_is_last:
            self._hand_back(amp_scale)
        else:
            super().after_micro_step(next_is_last, amp_scale)

    def _hand_back(self, amp_scale):
        self._release()  # from here the last micro-batch's take-back (DDP's copy-back allowed) checks the sums
        grads = [None] * len(self.layout.sorted)
        for b in self.layout.buckets:
            if b.sharded:
                continue
            for k in b.slots:
                acc, p = self.sums[k], self.layout.sorted[k]
                if acc is None:
                    continue
                if acc.dtype != p.dtype:  # DDP communicates in the parameter dtype anyway: rounded once here
                    acc = self.sums[k] = acc.to(p.dtype)
                grads[k] = acc
                self.versions[k] = None  # autograd will add into it: no longer watched as untouched
                self.handed[k] = acc._version
        handed = [g for g in grads if g is not None]
        if handed:
            self.handed_back = True
            self.handback_scale = amp_scale
            if amp_scale is not None:
                _foreach_mul_by_device(handed, amp_scale)
            self.layout.inspector.set_grads(grads)

    def gather(self, boundary, amp_scale):
        if not self.handed_back:
            return super().gather(boundary, amp_scale)
        gathered = AdoptingStore.gather(self, boundary, amp_scale)  # DDP changes .grad now: nothing to observe
        self._plan_take_back(gathered, amp_scale)
        return gathered

    def _plan_take_back(self, gathered, amp_scale):
        """At the last micro-batch: where .grad is the handed-back sum (or DDP's bucket view of it,
        reduced), it is the whole cycle's sum; where it was replaced before the backward
        (module.zero_grad()), the new gradient is added as usual. Checked before anything changes."""
        grads, codes = gathered.grads, bytearray(gathered.codes)
        taken = []  # (slot, the reduced sum to copy in, or None when .grad is the sum itself)
        allowed = 2 + (amp_scale is not None)  # autograd's add, DDP's copy back, GradScaler's inf check
        for k, version in enumerate(self.handed):
            if version is None:
                continue
            acc, g = self.sums[k], grads[k]
            if g is acc and acc._version > version + allowed:
                raise RuntimeError(changed_sum_message(self.name, self.layout.describe_slot(k)))
            if g is not acc:
                if acc._version == version:
                    continue  # .grad was replaced before the last backward: add the new gradient
                if g is None:
                    raise RuntimeError(
                        f"{self.name}: the gradient of {self.layout.describe_slot(k)} held the cycle's running sum "
                        f"and was changed, then removed, before step(); the earlier micro-batches are lost")
            taken.append((k, None if g is acc else g))
            grads[k] = None
            codes[k] = NONE[0]
        gathered.codes = bytes(codes)
        gathered.taken_back = taken

    def add(self, gathered, with_norm, norms, norm_type, amp_scale):
        if gathered.taken_back is not None:
            for k, reduced in gathered.taken_back:
                if reduced is not None:  # DDP (gradient_as_bucket_view) rebound .grad to its bucket: the
                    self.sums[k] = reduced  # reduced sum is read there, and the old sum freed (torch's peak)
            if self.handback_scale is not None or amp_scale is not None:
                self._unscale_taken([self.sums[k] for k, _ in gathered.taken_back], norms, amp_scale)
        super().add(gathered, with_norm, norms, norm_type, amp_scale)

    def _unscale_taken(self, sums, norms, amp_scale):
        """GradScaler: the taken-back sums are scaled; unscaled as GradScaler would (float32 of the
        double reciprocal; exact for its power-of-two scales). Had the scale changed between the
        last two micro-batches (scaler.update() grew it), the two parts of the sum carry different
        scales and cannot be separated: the cycle is then skipped, on the device, like an overflow."""
        previous, primary = self.handback_scale, self.layout.primary_device
        if amp_scale is None or previous is None:
            mismatch = torch.ones(1, dtype=torch.float64, device=primary)
        else:
            mismatch = amp_scale.reshape(1) != previous.reshape(1)
        norms.flag(primary, mismatch)
        if amp_scale is not None and sums:
            _foreach_mul_by_device(sums, amp_scale.double().reciprocal().float())

    def end_cycle(self):
        super().end_cycle()
        self.handed = [None] * len(self.layout.sorted)
        self.handed_back, self.handback_scale = False, None

    def zero_grad(self, set_to_none, micro_step):
        super().zero_grad(set_to_none, micro_step)
        if set_to_none and self.handed_back:  # the last micro-batch of the cycle must add into the sums
            self.layout.inspector.set_grads([acc if v is not None else None for acc, v in zip(self.sums, self.handed)])

    def _keeps_as_grad(self, k, grad):
        return super()._keeps_as_grad(k, grad) or (self.handed[k] is not None and grad is self.sums[k])

    def saved_sums(self, micro_step):
        saved = super().saved_sums(micro_step)
        if self.handback_scale is not None:
            inverse = self.handback_scale.double().reciprocal().float()
            for k in saved:
                if self.handed[k] is not None:
                    saved[k] = self.sums[k] * inverse.to(self.sums[k].device)
        return saved

    def restore(self, sums, micro_step, resumes_at_last, handback_scale=None, in_grad=False):
        is_open = super().restore(sums, micro_step, resumes_at_last, None, in_grad)
        if is_open and micro_step > 0 and resumes_at_last:
            self._hand_back(handback_scale)  # as the saving run did after this micro-step
        return is_open


def _foreach_mul_by_device(tensors, factor):
    """tensors *= factor (a 1-element device tensor), one foreach call per device, no host sync."""
    by_device = defaultdict(list)
    for t in tensors:
        by_device[t.device].append(t)
    for device, group in by_device.items():
        torch._foreach_mul_(group, factor.to(device).reshape(()))
