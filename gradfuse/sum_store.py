"""The interface of the place where a cycle's running sums live: one implementation per mode
(adopting_store.py: default; hand_back_store.py: under torch.distributed; backward_hook_store.py:
accumulate_in_backward=True; flat_store.py: flat_buffers=True). The optimizer's micro-step calls,
in this order: refuse, gather (validates; changes nothing), the rule's state is read for
`updating(...)`, add, then after_micro_step or, at the cycle's end, update_calls and end_cycle."""
from typing import Dict, List, Optional, Sequence, Tuple

import torch


class SumStore:
    """Running sums of one optimizer's current layout (each slot's sum is the raw sum of its
    micro-batches' gradients; 1/K is folded into the update)."""
    mode = ""  # what repr() and copies call the mode
    handback_scale: Optional[torch.Tensor] = None  # GradScaler's scale baked into handed-back sums

    def __init__(self, name, layout):
        self.name = name
        self.layout = layout
        self.had_gradient = False  # some micro-batch of the open cycle brought a gradient

    def relayout(self, layout):
        """A new layout (param_groups changed): sums of parameters still present carry over."""
        raise NotImplementedError

    def refuse(self, amp_scale, found_inf, boundary, micro_step):
        """Raises, before anything changes, for a step this mode cannot take."""

    def gather(self, boundary, amp_scale):
        """The micro-batch's gradients, validated; nothing changes yet."""
        raise NotImplementedError

    def nothing(self):
        """A gathered micro-batch with no gradients (finish_cycle: only the norm of the sums so far)."""
        raise NotImplementedError

    def updating(self, gathered) -> List[int]:
        """Buckets whose rule state the cycle's update will read (sums so far or gradients now)."""
        raise NotImplementedError

    def add(self, gathered, with_norm, norms, norm_type, amp_scale):
        """Adds the micro-batch into the sums; with_norm (the cycle's last micro-batch): the same
        pass adds the norm partials of the sums into norms (a NormPartials)."""
        raise NotImplementedError

    def after_micro_step(self, next_is_last, amp_scale):
        """After a micro-step that did not end the cycle."""

    def update_calls(self, bucket_index) -> Sequence[Tuple[Sequence[int], List, List]]:
        """(slots, params, sums) per fused update call of the bucket; empty when it has no sums."""
        raise NotImplementedError

    def rule_state(self, opt, reader, bucket_index, keys, group) -> List[List[torch.Tensor]]:
        """The rule's state tensors of the bucket, one list per key, as the update takes them."""
        b = self.layout.buckets[bucket_index]
        return reader.lists(opt, bucket_index, self.layout.sorted[b.start:b.stop], group, keys)

    def end_cycle(self):
        """After the update: the sums are spent."""
        raise NotImplementedError

    def zero_grad(self, set_to_none, micro_step):
        raise NotImplementedError

    def saved_sums(self, micro_step) -> Dict[int, torch.Tensor]:
        """Raw (unscaled) running sums by slot, as copies, as a checkpoint stores them."""
        raise NotImplementedError

    def restore(self, sums, micro_step, resumes_at_last, handback_scale=None, in_grad=False) -> bool:
        """Reinstalls saved sums (by slot); returns whether the cycle is open (some slot exists).
        in_grad: the saving store kept its sums as .grad (sums_in_grad), which a store that can does again."""
        raise NotImplementedError

    def sums_in_grad(self) -> bool:
        """Whether the open cycle's running sums are kept as the parameters' .grad (checkpoints record it)."""
        return False

    def check_finish_early(self):
        """finish_cycle(): raises where this mode cannot end a cycle early."""

    def check_copyable(self):
        """deepcopy / pickle: raises where this mode's sums cannot be copied."""

    def check_new_params(self, params):
        """add_param_group or an edit of param_groups: raises for parameters this mode cannot hold."""

    def check_loaded(self, state_by_index, state_keys):
        """load_state_dict: raises, before anything changes, for state this mode cannot hold."""

    def exported(self, states, element_keys):
        """state_dict(): the entries it returns (by index) are made independent where the store
        shares one tensor between parameters."""

    def forget_state(self):
        """After load_state_dict: any rule state bound by the store is read from opt.state again."""
