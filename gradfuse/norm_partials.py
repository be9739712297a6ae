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

    def use_domains(self, domain_groups):
        """A new layout's domains; partials of domains gone are dropped (a flag on "" stays)."""
        self.domain_groups = dict(domain_groups)
        self.states = {key: state for key, state in self.states.items() if key[1] in self.domain_groups}

    def partial(self, device, domain=""):
        """The running partial of one device and domain (created zeroed)."""
        state = self.states.get((device, domain))
        if state is None:
            state = self.states[(device, domain)] = ops.new_norm_state(device)
        return state

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
        keys = sorted(self.states, key=lambda key: (str(key[0]), key[1]))  # one order on every rank
        for key in keys:
            all_reduce_norm_state_(self.states[key], self.domain_groups[key[1]], norm_type)
        for key in keys:
            if key != (primary, ""):  # merge the raw states (a copy that syncs on CPU+CUDA)
                other = self.states[key]
                ops.merge_norm_state_(state, other.to(primary), norm_type)
                other.zero_()
        return ops.finalize_norm_(state, counter, norm_type, scale, count)
