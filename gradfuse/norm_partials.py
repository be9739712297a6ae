"""The running partials of one global norm, shared by the optimizers and the standalone clip: one
float64 [value, non-finite flag] state per (device, norm domain), all-reduced over the domain's
process groups, merged on one device and finalized there (no host sync)."""
import torch

from . import ops
from .distributed_norm import all_reduce_norm_state_


class NormPartials:
    """domain_groups maps a domain key (a string, the same on every rank) to the process groups
    its partial is summed (or maxed) over; "" with no groups is the plain local norm."""

    def __init__(self, domain_groups=None):
        self.domain_groups = dict(domain_groups or {"": ()})
        self.states = {}  # (device, domain) -> norm state
        self._order = ()  # the states' keys in the one order every rank reduces them in
        self.slot_count = None  # track_param_norms: the layout's slot count, else None
        self._slot_index = {}  # device -> parameter index -> slot, as a tensor
        self.slot_states = {}  # (device, domain) -> float64 per-slot partials (zero outside its slots)

    def use_domains(self, domain_groups):
        """A new layout's domains; partials of domains gone are dropped (a flag on "" stays)."""
        self.domain_groups = dict(domain_groups)
        self.states = {key: state for key, state in self.states.items() if key[1] in self.domain_groups}
        self._order = ()
        self.slot_states = {}  # a new layout numbers its slots anew

    def partial(self, device, domain=""):
        """The running partial of one device and domain (created zeroed)."""
        state = self.states.get((device, domain))
        if state is None:
            state = self.states[(device, domain)] = ops.new_norm_state(device)
        return state

    def reset(self):
        """Drops every partial of the open cycle (recomputed whole by the caller)."""
        for state in self.states.values():
            state.zero_()
        for vector in self.slot_states.values():
            vector.zero_()

    def track_slots(self, count):
        """Per-slot partials from now on (count slots), or none (count None)."""
        self.slot_count, self.slot_states, self._slot_index = count, {}, {}

    def slots(self, device, domain=""):
        """The per-slot partials of one device and domain (created zeroed), or None when not tracked."""
        if self.slot_count is None:
            return None
        vector = self.slot_states.get((device, domain))
        if vector is None:
            vector = self.slot_states[(device, domain)] = torch.zeros(self.slot_count, dtype=torch.float64,
                                                                     device=device)
        return vector

    def slot_norms(self, primary, norm_type, scale, slot_of_param, every=()):
        """Per-parameter norms (float64 on primary, state_dict order) of the per-slot partials, reduced
        over each domain's process groups like total(); the partials are reset."""
        for device, domain in every:
            self.slots(device, domain)
        merged = torch.zeros(self.slot_count, dtype=torch.float64, device=primary)
        inf_norm = norm_type == float("inf")
        for key in sorted(self.slot_states, key=lambda key: (str(key[0]), key[1])):  # one order on every rank
            vector = self.slot_states[key]
            # Plain tensors are whole on their rank (process_group= splits parameters, not tensors):
            # only the pieces of sharded (DTensor) parameters are reduced.
            all_reduce_norm_state_(vector, self.domain_groups[key[1]] if key[1] else (), norm_type)
            merged = torch.maximum(merged, vector.to(primary)) if inf_norm else merged + vector.to(primary)
            vector.zero_()
        finished = (merged if inf_norm else merged.sqrt()) * scale
        index = self._slot_index.get(primary)
        if index is None:  # once per layout and device: a host-to-device copy is no per-cycle cost
            index = self._slot_index[primary] = torch.tensor(slot_of_param, dtype=torch.int64, device=primary)
        return finished.index_select(0, index)

    def flag(self, device, value):
        """Marks the norm non-finite where value (a 1-element tensor, any device) is non-zero: the
        cycle is then skipped like an overflow (GradScaler's found_inf, a scale mismatch)."""
        self.partial(device)[1:].add_(value.reshape(1).to(device=device, dtype=torch.float64))

    def total(self, primary, counter, norm_type, scale=1.0, count=False, every=()):
        """0-dim float64 norm on primary of all partials, times scale; the partials are reset. Every
        (device, domain) in `every` takes part even without a partial: each rank must run each
        domain's collective. count: a non-finite norm adds one to counter."""
        for device, domain in every:
            self.partial(device, domain)
        state = self.partial(primary)
        if len(self._order) != len(self.states):  # keys are only ever added (or dropped with a new layout)
            self._order = tuple(sorted(self.states, key=lambda key: (str(key[0]), key[1])))  # one order on every rank
        keys = self._order
        for key in keys:
            all_reduce_norm_state_(self.states[key], self.domain_groups[key[1]], norm_type)
        for key in keys:
            if key != (primary, ""):  # merge the raw states (a copy that syncs on CPU+CUDA)
                other = self.states[key]
                ops.merge_norm_state_(state, other.to(primary), norm_type)
                other.zero_()
        return ops.finalize_norm_(state, counter, norm_type, scale, count)
