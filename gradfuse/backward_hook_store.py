"""accumulate_in_backward=True: each parameter's gradient is added to its running sum the moment
autograd has produced it (a post-accumulate-grad hook) and .grad is freed at once, so an open
cycle holds the sums plus about one layer's gradient instead of the sums plus every parameter's
.grad. step() still marks each micro-batch (and reads any .grad left, e.g. of a parameter unfrozen
after the hooks were registered). Fused while hot (where takes_norm_hot says it pays): during a
cycle's last micro-batch the hook's add also takes the norm partial of the final sum, on the gradient
still in cache, so the cycle's end is the update pass plus a norm pass over the other sums only."""
import torch

from . import direct_ops, gradient_codes, param_hooks
from . import hyperparameters as hp
from .adopting_store import AdoptingStore, scattered_partials, write_back_partials
from .distributed_norm import is_dtensor


HOT_NORM_MIN_ELEMENTS = 1 << 16  # below: one norm call for the bucket at the end beats a call per tensor


def takes_norm_hot(device, numel):
    """Whether a hook takes the norm of a tensor's final sum while its gradient is hot. Measured with
    real autograd (benchmarks/hot_norm.py, docs/benchmarks.md): on CPU never faster than the norm pass
    at the cycle's end (equal for 1M-16M-element layers, 7% slower for 64K-element ones), so only on
    CUDA, whose L2 holds whole layers' gradients, and only for tensors of at least 64K elements."""
    return device.type == "cuda" and numel >= HOT_NORM_MIN_ELEMENTS


class BackwardHookStore(AdoptingStore):
    """Hooks on every parameter of the layout that requires grad; they hold the store weakly and are
    removed when it is collected (with its optimizer, or replaced by a new layout's store) or by
    detach() (FusedAccumOptimizer.remove_backward_hooks())."""
    mode = "accumulate_in_backward"

    def __init__(self, name, layout, previous=None, hot_norm=None):
        for k, p in enumerate(layout.sorted):
            if is_dtensor(p):
                raise ValueError(f"{name}: accumulate_in_backward=True does not support DTensor (FSDP2) "
                                 f"{layout.describe_slot(k)}: FSDP2 produces its gradients itself; use the default "
                                 f"mode")
        super().__init__(name, layout, previous)
        self.pending = previous.pending if isinstance(previous, BackwardHookStore) else False
        # hot_norm() -> (NormPartials, norm_type) while the coming micro-batch ends a cycle that needs
        # the norm, else None (a weak method of the optimizer).
        self.hot_norm = hot_norm if hot_norm is not None else getattr(previous, "hot_norm", None)
        self.normed = set()  # slots whose final sum a hook already took the norm partial of
        # A normed sum changed again (or the layout changed after hot adds): the end takes the whole norm.
        self.norm_spoiled = isinstance(previous, BackwardHookStore) and (previous.norm_spoiled
                                                                         or bool(previous.normed))
        # torch accepts frozen parameters; autograd gives them no gradient, so they get no hook
        self.handles = param_hooks.register(self, [(layout.sorted[k], (k, bi)) for bi, b in enumerate(layout.buckets)
                                                   for k in b.slots if layout.sorted[k].requires_grad], "add_from_hook")

    def relayout(self, layout):
        self.detach()  # hooks know their slot: new layout, new hooks
        return BackwardHookStore(self.name, layout, self)

    def detach(self):
        param_hooks.remove_all(self.handles)

    @torch.no_grad()
    def add_from_hook(self, k, bucket_index, param):
        """sum[k] += param.grad (adopted when it is the first and already the sum's kind)."""
        grad = param.grad
        if grad is None:
            return
        if grad.layout != torch.strided or grad.dtype != param.dtype or grad.shape != param.shape:
            raise RuntimeError(f"{self.name}: {self.layout.describe_slot(k)} got a {grad.layout} {grad.dtype} "
                               f"gradient of shape {tuple(grad.shape)}; accumulate_in_backward=True needs dense "
                               f"gradients shaped and typed like their parameters")
        param.grad = None  # freed now: the point of this mode
        self.pending = True
        view = self.layout.views.get(k)
        code = gradient_codes.code_for(grad, param) if view is None else gradient_codes.COPY
        if view is not None:
            grad = view.grad(grad)
        elif code == gradient_codes.RELAYOUT:
            grad = torch.empty_like(param).copy_(grad)  # the kernels sweep both as flat memory
            code = gradient_codes.ADOPT
        b, acc = self.layout.buckets[bucket_index], self.sums[k]
        norm_state, norm_type, per_slot = self._hot_norm_of(k, b)
        acc_dtype = _sum_dtype(b.acc_dtype, grad.dtype)
        if acc is not None and acc.dtype != acc_dtype:  # the parameter was cast (model.double()) mid-cycle
            acc = self.sums[k] = acc.to(acc_dtype)
        if acc is None:
            if code == gradient_codes.ADOPT and grad.dtype == acc_dtype:
                self.sums[k] = grad  # nobody else holds it any more
                if norm_state is not None:
                    direct_ops.accumulate_norm_(norm_state, [grad], norm_type, per_slot)
            else:
                own = self._owned_buffer(k, b)
                self.sums[k] = own if own.dtype == acc_dtype else torch.empty_like(grad, dtype=acc_dtype)
                direct_ops.accumulate_([self.sums[k]], [grad], 1.0, True, norm_state, norm_type, None, per_slot)
            self.live[bucket_index] += 1
        else:
            direct_ops.accumulate_([acc], [grad], 1.0, False, norm_state, norm_type, None, per_slot)
        self.had_gradient = True

    def _hot_norm_of(self, k, bucket):
        """(norm partial, norm type, per-slot partial view) for slot k's add in a cycle's last
        micro-batch, else Nones; a second add to a normed sum spoils the hooks' partials."""
        target = self.hot_norm() if self.hot_norm is not None else None
        target = target() if target is not None else None
        if target is None or not takes_norm_hot(bucket.device, self.layout.sorted[k].numel()):
            return None, 2.0, None
        if k in self.normed:
            self.norm_spoiled = True
            return None, 2.0, None
        norms, norm_type = target
        self.normed.add(k)
        slots = norms.slots(bucket.device, bucket.domain)
        return norms.partial(bucket.device, bucket.domain), norm_type, None if slots is None else slots[k:k + 1]

    def refuse(self, amp_scale, found_inf, boundary, micro_step):
        if amp_scale is not None:
            raise RuntimeError(f"{self.name}: accumulate_in_backward=True cannot be used with GradScaler: the "
                               f"gradients are accumulated during backward, before scaler.step() gives the scale")

    def add(self, gathered, with_norm, norms, norm_type, amp_scale):
        hooks_took_norm = with_norm and (self.normed or self.norm_spoiled)
        nothing_gathered = gathered.codes.count(gradient_codes.NONE) == len(gathered.codes)
        if hooks_took_norm and not self.norm_spoiled and nothing_gathered:
            self._norm_untouched_sums(norms, norm_type)
        else:
            if hooks_took_norm:  # the whole norm again, from the sums: the hooks' partials are dropped
                norms.reset()
            super().add(gathered, with_norm, norms, norm_type, amp_scale)
        self.pending = False  # this micro-batch is taken: zero_grad() may follow

    def _norm_untouched_sums(self, norms, norm_type):
        """The cycle's end after hot adds: the norm partials of the sums no hook normed."""
        for b in self.layout.buckets:
            rest = [k for k in b.slots if self.sums[k] is not None and k not in self.normed]
            if rest:
                slots = norms.slots(b.device, b.domain)
                per_slot = scattered_partials(slots, rest)
                direct_ops.accumulate_norm_(norms.partial(b.device, b.domain), [self.sums[k] for k in rest],
                                            norm_type, per_slot)
                write_back_partials(slots, rest, per_slot)

    def end_cycle(self):
        super().end_cycle()
        self.normed.clear()
        self.norm_spoiled = False

    def zero_grad(self, set_to_none, micro_step):
        if self.pending:
            raise RuntimeError(f"{self.name}: a backward pass since the last step() already added its gradients "
                               f"to the running sums (accumulate_in_backward=True frees .grad as it goes), so "
                               f"zero_grad() cannot discard them. Call step() after every backward you keep; to "
                               f"drop a batch, skip its backward, or use accumulate_in_backward=False")
        super().zero_grad(set_to_none, micro_step)

    def check_finish_early(self):
        if self.pending:
            raise RuntimeError(f"{self.name}: a backward since the last step() is in the running sums but not yet "
                               f"counted: call step() for it first, then finish_cycle()")

    def check_copyable(self):
        raise RuntimeError(f"{self.name}: an optimizer with accumulate_in_backward=True cannot be copied or pickled "
                           f"(its backward hooks belong to the original parameters); save opt.state_dict() and "
                           f"load it into a new optimizer instead")


def _sum_dtype(layout_dtype, grad_dtype):
    """The layout's accumulator dtype where it can take the gradient, else the gradient's own (float32
    for float16/bfloat16): a parameter cast after the layout was built (it is rebuilt at step())."""
    try:
        return hp.accumulator_dtype(grad_dtype, layout_dtype)
    except ValueError:
        return hp.accumulator_dtype(grad_dtype, None)
