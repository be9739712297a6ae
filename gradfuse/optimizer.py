"""FusedAccumSGD: gradient accumulation + global-norm clipping + torch.optim.SGD in fused
native passes, with the norm, clip factor and skip decision kept on the device."""
from collections import defaultdict
from typing import Dict, List, Optional

import torch
from torch.optim import Optimizer

from . import hyperparameters as hp
from . import ops
from ._native import inspect_gradients, inspect_parameters
from .state_io import export_state, import_state

_NO_GRADIENT = ("step() was called but no parameter has a gradient: call backward() before step() "
                "(FusedAccumSGD.step() is called once per micro-batch)")


class FusedAccumSGD(Optimizer):
    """torch.optim.SGD with built-in gradient accumulation and global-norm clipping.

    Call step() once per micro-batch: micro-steps 1..K-1 only accumulate A = sum(grad)/K;
    micro-step K computes the norm_type norm of A over all parameters, skips the update when
    it is not finite (skip_nonfinite), scales A by min(1, max_grad_norm / (norm + 1e-6)) and
    applies SGD (weight decay, momentum, dampening, nesterov, maximize) in one pass.
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, accumulation_steps=1, max_grad_norm=None, norm_type=2.0, skip_nonfinite=True,
                 error_if_nonfinite=False, accum_dtype=None):
        self.accumulation_steps = hp.check_accumulation_steps(accumulation_steps)
        self.max_grad_norm = hp.check_max_grad_norm(max_grad_norm)
        self.norm_type = hp.check_norm_type(norm_type)
        self.skip_nonfinite = hp._flag("skip_nonfinite", skip_nonfinite)
        self.error_if_nonfinite = hp._flag("error_if_nonfinite", error_if_nonfinite)
        self.accum_dtype = hp.check_accum_dtype(accum_dtype)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        hp.check_group(defaults)
        self._reset_cycle_state()
        self._owned_accumulators: Dict[torch.Tensor, torch.Tensor] = {}
        self._norm_states: Dict[torch.device, torch.Tensor] = {}
        self.last_grad_norm: Optional[torch.Tensor] = None
        self._skipped_steps: Optional[torch.Tensor] = None
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ public observability
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
                                 f"FusedAccumSGD(...), not in a parameter group")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter group contains the same tensor more than once")
        bad, reason = inspect_parameters(params)
        if bad >= 0:
            raise ValueError(f"FusedAccumSGD: parameter {bad} of the new group {reason}")
        for p in params:
            hp.accumulator_dtype(p.dtype, self.accum_dtype)
        _check_no_shared_memory([p for g in self.param_groups for p in g["params"]] + params)
        group = dict(param_group, params=params)
        candidate = dict(self.defaults, **group)
        hp.check_group(candidate)
        super().add_param_group(group)
        self._rebuild_layout()

    def _rebuild_layout(self):
        """Flat parameter list with each parameter's group and accumulator dtype (cached so a
        step costs a few list passes, not per-tensor Python logic)."""
        self._params: List[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        self._group_of = [i for i, g in enumerate(self.param_groups) for _ in g["params"]]
        self._acc_dtype = {p: hp.accumulator_dtype(p.dtype, self.accum_dtype) for p in self._params}

    def _primary_device(self):
        return self._params[0].device if self._params else torch.device("cpu")

    def _describe(self, index):
        group = self._group_of[index]
        position = index - sum(len(g["params"]) for g in self.param_groups[:group])
        return f"parameter {index} (param_groups[{group}]['params'][{position}])"

    # ------------------------------------------------------------------ gradients
    def zero_grad(self, set_to_none: bool = True):
        """As Optimizer.zero_grad; a gradient adopted as this cycle's accumulator is replaced
        by a fresh zero tensor instead of being zeroed in place (set_to_none=False)."""
        for p in self._params:
            grad = p.grad
            if grad is None:
                continue
            if set_to_none:
                p.grad = None
            elif p in self._adopted and grad is self._accumulators.get(p):
                p.grad = torch.zeros_like(grad)
            else:
                if grad.grad_fn is not None:
                    grad.detach_()
                else:
                    grad.requires_grad_(False)
                grad.zero_()

    def _reset_cycle_state(self):
        self._micro_step = 0
        self._accumulators: Dict[torch.Tensor, torch.Tensor] = {}
        self._adopted: Dict[torch.Tensor, int] = {}  # accumulator borrowed from p.grad -> its version

    def _check_adopted_untouched(self):
        for p, version in self._adopted.items():
            if self._accumulators[p]._version != version:
                index = next(i for i, q in enumerate(self._params) if q is p)
                raise RuntimeError(
                    f"FusedAccumSGD: the gradient of {self._describe(index)} was modified in place after step() "
                    f"(for example by module.zero_grad(set_to_none=False)); FusedAccumSGD keeps it as the cycle's "
                    f"accumulator. Use optimizer.zero_grad() or set_to_none=True between micro-batches.")

    def _gather_gradients(self):
        """Validated gradients of every parameter (None where absent), checked before any change."""
        grads = [p.grad for p in self._params]
        bad, reason, relayout = inspect_gradients(self._params, grads)
        if bad >= 0:
            raise RuntimeError(f"FusedAccumSGD: {self._describe(bad)} {reason}")
        if all(g is None for g in grads):
            raise RuntimeError(f"FusedAccumSGD: {_NO_GRADIENT}")
        for i in relayout:  # rare: a dense gradient laid out unlike its parameter
            grads[i] = torch.empty_like(self._params[i]).copy_(grads[i])
        return grads

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            hp.check_group(group, check_tensor_lr=False)
        grads = self._gather_gradients()
        self._check_adopted_untouched()
        boundary = self._micro_step + 1 == self.accumulation_steps
        self._accumulate(grads, boundary)
        if boundary:
            self._finish_cycle()
        else:
            self._micro_step += 1
        return loss

    def _norm_state(self, device):
        state = self._norm_states.get(device)
        if state is None:
            state = self._norm_states[device] = ops.new_norm_state(device)
        return state

    def _accumulate(self, grads, boundary):
        """Adds this micro-batch into the accumulators: one op call per (device, dtype) bucket;
        on the last micro-batch the same pass feeds the global norm."""
        fresh, adding, norm_only = defaultdict(list), defaultdict(list), defaultdict(list)
        accumulators, adopted = self._accumulators, self._adopted
        for p, g in zip(self._params, grads):
            acc = accumulators.get(p)
            if g is None:
                if acc is not None and boundary:
                    norm_only[(acc.device, acc.dtype)].append(acc)
                continue
            if acc is not None:
                adding[(acc.device, acc.dtype, g.dtype)].append((acc, g))
            elif g.dtype == self._acc_dtype[p] and g._base is None and not g.requires_grad:
                # Adopt the gradient itself: no copy; 1/K is folded into the update pass.
                accumulators[p] = g
                adopted[p] = g._version
                if boundary:
                    norm_only[(g.device, g.dtype)].append(g)
            else:
                acc = self._owned_accumulators.get(p)
                if acc is None:
                    acc = torch.empty_like(p, dtype=self._acc_dtype[p])
                    self._owned_accumulators[p] = acc
                accumulators[p] = acc
                fresh[(acc.device, acc.dtype, g.dtype)].append((acc, g))
        for first, buckets in ((True, fresh), (False, adding)):
            for key, pairs in buckets.items():
                norm_state = self._norm_state(key[0]) if boundary else None
                ops.accumulate_([a for a, _ in pairs], [g for _, g in pairs], 1.0, first, norm_state,
                                self.norm_type)
        if boundary:
            for (device, _), tensors in norm_only.items():
                ops.accumulate_norm_(self._norm_state(device), tensors, self.norm_type)
        for p in adopted:  # our own in-place adds are not user modifications
            adopted[p] = accumulators[p]._version

    def _total_norm(self):
        """0-dim float64 norm of A over all devices, counted as skipped when non-finite."""
        scale = 1.0 / self.accumulation_steps
        count = self.skip_nonfinite or self.error_if_nonfinite
        devices = list(self._norm_states)
        if len(devices) == 1:
            return ops.finalize_norm_(self._norm_states[devices[0]], self.skipped_steps, self.norm_type, scale,
                                      count)
        primary = self.skipped_steps.device
        norms = torch.stack([
            ops.finalize_norm_(self._norm_states[d], self.skipped_steps.to(d), self.norm_type, scale, False)
            .to(primary) for d in devices])
        total = norms.abs().max() if self.norm_type == float("inf") else norms.square().sum().sqrt()
        total = torch.where(torch.isnan(norms).any(), torch.full_like(total, float("nan")), total)
        if count:
            self.skipped_steps.add_((~torch.isfinite(total)).to(torch.int64))
        return total

    def _finish_cycle(self):
        total = self._total_norm()
        self.last_grad_norm = total
        if self.error_if_nonfinite and not bool(torch.isfinite(total)):  # documented host sync
            self._reset_cycle_state()
            raise RuntimeError(f"FusedAccumSGD: the total gradient norm of this cycle is {total.item()}; the "
                               f"update was skipped (error_if_nonfinite=True)")
        norm_on = {total.device: total}
        buckets = defaultdict(list)
        for p, group_index in zip(self._params, self._group_of):
            acc = self._accumulators.get(p)
            if acc is not None:
                buckets[(group_index, p.device, p.dtype, acc.dtype)].append((p, acc))
        for (group_index, device, _, _), pairs in buckets.items():
            group = self.param_groups[group_index]
            params = [p for p, _ in pairs]
            buffers, flags = self._momentum_state(params, group["momentum"] != 0)
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and lr.device != device:
                lr = lr.to(device)
            if device not in norm_on:
                norm_on[device] = total.to(device)
            ops.clipped_sgd_step_(params, [a for _, a in pairs], buffers, flags, norm_on[device], lr,
                                  group["weight_decay"], group["momentum"], group["dampening"], group["nesterov"],
                                  group["maximize"], 1.0 / self.accumulation_steps, self.max_grad_norm,
                                  self.skip_nonfinite)
        self._reset_cycle_state()

    def _momentum_state(self, params, use_momentum):
        if not use_momentum:
            return [], []
        buffers, flags = [], []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                # Zero-filled so a skipped first cycle leaves a harmless buffer behind.
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["momentum_initialized"] = torch.zeros((), dtype=torch.bool, device=p.device)
            buffers.append(state["momentum_buffer"])
            flags.append(state["momentum_initialized"])
        return buffers, flags

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        """torch.optim.SGD's format (momentum under 'momentum_buffer') plus a 'gradfuse' entry
        with the accumulators and micro-step position, so a mid-cycle save resumes exactly."""
        return export_state(self, super().state_dict())

    def load_state_dict(self, state_dict):
        """Loads a FusedAccumSGD or torch.optim.SGD state dict; everything is validated first."""
        import_state(self, state_dict, super().load_state_dict)
        self._rebuild_layout()


def _check_no_shared_memory(params):
    """Parameters must not share memory: one update pass would write the same bytes twice."""
    spans = sorted((str(p.device), p.data_ptr(), p.data_ptr() + p.numel() * p.element_size(), i)
                   for i, p in enumerate(params) if p.numel() > 0)
    for (dev_a, _, end_a, i), (dev_b, start_b, _, j) in zip(spans, spans[1:]):
        if dev_a == dev_b and start_b < end_a:
            raise ValueError(f"parameters {min(i, j)} and {max(i, j)} share memory (views of one tensor?); "
                             f"FusedAccumSGD needs every parameter in its own memory")
