"""The default store (sum_in_grad=True; under torch.distributed hand_back_store.py extends it): between
micro-batches each running sum stays as its parameter's .grad, so autograd adds the next micro-batch into it in place and an open
cycle holds what torch's own accumulation loop holds (the sums, no second gradient beside them).

What stays as documented: a change of .grad between backward and step() (a framework's clip, an
assignment, a discard) acts on that micro-batch's gradient alone. Post-accumulate-grad hooks record
what autograd left in .grad; where the cycle's first micro-batch shows such a change, the sums stay
apart from .grad from then on (the adopting store's way). A change that only comes later, to a sum
already in .grad, cannot be taken apart from the sum: step() raises before anything changes.
Tensors under RESIDENT_MIN_ELEMENTS, half-precision parameters (float32 sums), complex or strided
parameters and GradScaler's cycles keep their sums apart too."""
import weakref
from typing import List, Optional

import torch

from . import gradient_codes, param_hooks
from .adopting_store import AdoptingStore

NONE = gradient_codes.NONE

# Below: little memory to save, and the hook costs more than the in-place add saves (benchmarks/
# resident_threshold.py, AMD EPYC, 2 threads, per tensor per micro-batch: +3.3 to +3.7 us with 256-element
# tensors, -1.2 to -1.8 us with 64K-element weights, -111 to -204 us with 1M-element ones).
RESIDENT_MIN_ELEMENTS = 1 << 16

KEEP_APART = "pass sum_in_grad=False to keep every micro-batch's gradient apart from the running sum"


class ResidentSumStore(AdoptingStore):
    mode = "default"

    def __init__(self, name, layout, previous=None, keep_apart=False):
        n = len(layout.sorted)
        self.resident: List[Optional[int]] = [None] * n  # the sum's version when it was left as .grad
        self.adds = [0] * n  # autograd's in-place additions into the resident sum since then
        self.left: List[Optional[tuple]] = [None] * n  # (weakref, version) of what autograd left in .grad
        self.out_of_place = set()  # slots whose .grad a create_graph backward rebuilt
        # A change of .grad was seen (or sum_in_grad=False): the sums stay apart from .grad.
        self.apart = keep_apart or (isinstance(previous, ResidentSumStore) and previous.apart)
        self.orphans = {}  # slot -> a resident sum that a cast left behind in .grad
        self.zeroed = set()  # resident slots zero_grad() kept in .grad with no backward into them since
        self.watched = [k for b in layout.buckets if b.adopts and not b.sharded for k in b.slots
                        if k not in layout.views and layout.sorted[k].requires_grad
                        and layout.sorted[k].numel() >= RESIDENT_MIN_ELEMENTS]
        super().__init__(name, layout, previous)
        self.handles = param_hooks.register(self, [(layout.sorted[k], (k,)) for k in self.watched], "autograd_left")

    def _carry(self, previous):
        super()._carry(previous)
        if not isinstance(previous, ResidentSumStore):
            return
        by_id = {id(p): k for k, p in enumerate(previous.layout.sorted)}
        watched = set(self.watched)
        for k, p in enumerate(self.layout.sorted):
            j = by_id.get(id(p))
            if j is None or previous.resident[j] is None:
                continue
            if self.sums[k] is not previous.sums[j]:  # converted here, not by the module's cast (same .grad object)
                self.orphans[k] = previous.sums[j]
            elif k in watched:
                self.resident[k], self.adds[k] = previous.resident[j], previous.adds[j]
                if j in previous.zeroed:
                    self.zeroed.add(k)
            elif p.grad is self.sums[k]:  # no longer watched (frozen, regrouped): its sum leaves .grad, kept apart
                p.grad = None

    def relayout(self, layout):
        param_hooks.remove_all(self.handles)  # hooks know their slot: new layout, new hooks
        return type(self)(self.name, layout, self)

    def autograd_left(self, k, param):
        """The hook: autograd has just accumulated slot k's gradient into param.grad."""
        grad = param.grad
        if torch.is_grad_enabled():  # backward(create_graph=True) adds out of place: a new .grad
            self.out_of_place.add(k)
        if self.resident[k] is not None and grad is self.sums[k]:
            self.adds[k] += 1
            self.zeroed.discard(k)
        else:
            self.left[k] = (weakref.ref(grad), grad._version)

    # ------------------------------------------------------------------ a micro-step
    def gather(self, boundary, amp_scale):
        gathered = super().gather(boundary, amp_scale)
        if self.sums_in_grad() or self.orphans:
            self._take_resident(gathered, amp_scale)
        elif not self.apart:
            self._observe(gathered.grads)
        return gathered

    def _observe(self, grads):
        """A micro-batch while no sum is in .grad (a cycle's first, or the first after a resume): was
        autograd's gradient changed, replaced or removed before step(), or built by create_graph?"""
        for k in self.watched:
            left = self.left[k]
            if k in self.out_of_place or (left is not None and _changed(left, grads[k])):
                self.apart = True
                return

    def _take_resident(self, gathered, amp_scale):
        """Where .grad is still the resident sum, autograd has added this micro-batch into it: the
        slot needs no add. Checked before anything changes."""
        grads, codes = gathered.grads, bytearray(gathered.codes)
        for k, orphan in self.orphans.items():
            if grads[k] is orphan:
                raise RuntimeError(f"{self.name}: {self.layout.describe_slot(k)} was cast or moved while its .grad "
                                   f"held the running sum, but the .grad was not converted with it")
        for k in self.watched:
            version = self.resident[k]
            if version is None:
                continue
            acc, g = self.sums[k], grads[k]
            if amp_scale is not None:
                raise RuntimeError(f"{self.name}: GradScaler joined an open cycle whose running sums are kept "
                                   f"unscaled in .grad; start using it at a cycle's first micro-batch")
            if k in self.out_of_place:
                raise RuntimeError(f"{self.name}: backward(create_graph=True) rebuilt the .grad of "
                                   f"{self.layout.describe_slot(k)}, which held the cycle's running sum; {KEEP_APART}")
            untouched = acc._version == version + self.adds[k]
            if g is acc and untouched:
                grads[k], codes[k] = None, NONE[0]  # autograd added this micro-batch into the sum itself
            elif g is acc:
                raise RuntimeError(
                    f"{self.name}: the .grad of {self.layout.describe_slot(k)} holds the cycle's running sum and was "
                    f"modified in place by something other than autograd's accumulation (a clip of a later "
                    f"micro-batch than the cycle's first, module.zero_grad(set_to_none=False)?); the micro-batches "
                    f"cannot be taken apart again. Change .grad at every micro-batch or at none, zero it with "
                    f"optimizer.zero_grad(), or {KEEP_APART}")
            elif not untouched or self.adds[k]:
                raise RuntimeError(
                    f"{self.name}: the .grad of {self.layout.describe_slot(k)} held the cycle's running sum, which "
                    f"this micro-batch's backward had already added into, and was then replaced or removed before "
                    f"step(); the micro-batch cannot be taken out of the sum again. Change .grad at every "
                    f"micro-batch or at none, or {KEEP_APART}")
            # else: .grad was replaced before the backward (module.zero_grad()): added as usual
        gathered.codes = bytes(codes)

    def after_micro_step(self, next_is_last, amp_scale):
        """Every sum that may stays (or becomes again) its parameter's .grad for the next micro-batch."""
        self.left = [None] * len(self.left)
        self.zeroed.clear()
        if amp_scale is not None:  # GradScaler's gradients are scaled, the sums are not
            self.apart = True
        if self.apart:
            return
        grads, params = [None] * len(self.sums), self.layout.sorted
        for k in self.watched:
            acc = self.sums[k]
            if acc is None or acc.dtype != params[k].dtype:
                continue
            self.versions[k] = None  # autograd adds into it now: not watched as an untouched adopted gradient
            self.resident[k], self.adds[k] = acc._version, 0
            if params[k].grad is not acc:
                grads[k] = acc
        self.layout.inspector.set_grads(grads)

    def end_cycle(self):
        """Sums zero_grad() kept in .grad leave it, as zero_grad() would have had them (finish_cycle(),
        a loaded checkpoint): the next backward must not add into a spent sum."""
        for k in self.zeroed:
            if self.layout.sorted[k].grad is self.sums[k]:
                self.layout.sorted[k].grad = None
        super().end_cycle()
        self._release()
        self.out_of_place.clear()
        self.orphans.clear()

    def _release(self):
        """No sum is kept in .grad by this store from here (the cycle's end; DDP's hand-back)."""
        n = len(self.sums)
        self.resident, self.adds, self.left = [None] * n, [0] * n, [None] * n
        self.zeroed.clear()

    # ------------------------------------------------------------------ zero_grad, checkpoints
    def zero_grad(self, set_to_none, micro_step):
        self._check_nothing_pending("zero_grad() cannot discard it")
        if any(self.left[k] is not None for k in self.watched):
            self.apart = True  # a backward's gradient discarded before step(): keep micro-batches apart
        super().zero_grad(set_to_none, micro_step)
        if set_to_none and self.sums_in_grad():
            kept = [acc if v is not None else None for acc, v in zip(self.sums, self.resident)]
            self.layout.inspector.set_grads(kept)
        self.zeroed.update(k for k in self.watched if self.resident[k] is not None)

    def sums_in_grad(self):
        return any(self.resident[k] is not None for k in self.watched)

    def restore(self, sums, micro_step, resumes_at_last, handback_scale=None, in_grad=False):
        is_open = super().restore(sums, micro_step, resumes_at_last, handback_scale, in_grad)
        if is_open and in_grad:  # as the saving run: the sums are .grad, the next backward adds into them
            self.after_micro_step(False, None)
        return is_open

    def _keeps_as_grad(self, k, grad):
        return self.resident[k] is not None and grad is self.sums[k]

    def _check_nothing_pending(self, what):
        """A backward since the last step() has added into a resident sum that step() did not count yet."""
        for k in self.watched:
            if self.resident[k] is not None and self.adds[k]:
                raise RuntimeError(f"{self.name}: a backward since the last step() already added its gradient into "
                                   f"the cycle's running sum, which {self.layout.describe_slot(k)} keeps as its "
                                   f".grad, so {what}. Call step() after every backward you keep, or {KEEP_APART}")

    def check_finish_early(self):
        super().check_finish_early()
        self._check_nothing_pending("finish_cycle() would count it without its step()")

    def check_copyable(self):
        self._check_nothing_pending("a copy would count it without its step()")

    def saved_sums(self, micro_step):
        self._check_nothing_pending("a checkpoint would count it without its step()")
        return super().saved_sums(micro_step)


def _changed(left, grad):
    """Whether .grad is no longer what autograd left (weakref, version): replaced, removed or edited."""
    seen = left[0]()
    return seen is None or seen is not grad or grad._version != left[1]
