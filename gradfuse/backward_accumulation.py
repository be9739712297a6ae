"""accumulate_in_backward=True: each parameter's gradient is added to its accumulator the moment
autograd has produced it (a post-accumulate-grad hook) and .grad is freed at once, so an open
cycle holds the accumulators plus about one layer's gradient instead of the accumulators plus
every parameter's .grad. step() still marks each micro-batch (it finds no .grad left to take)."""
import weakref

import torch

from . import direct_ops, gradient_codes
from .distributed_norm import is_dtensor


class BackwardAccumulation:
    """The hooks of one optimizer, registered on every parameter of its current layout that
    requires grad (a frozen one, once unfrozen, is read from .grad at step() as usual). The hooks
    hold the optimizer weakly and are removed when it is collected, or by
    FusedAccumOptimizer.remove_backward_hooks()."""

    def __init__(self, opt):
        self._opt = weakref.ref(opt)
        self.handles = []
        self.pending = False  # a gradient went into the sums since the last step(): zero_grad cannot undo it
        weakref.finalize(opt, _remove_all, self.handles)

    @property
    def opt(self):
        return self._opt()

    def attach(self):
        """(Re)registers a hook per parameter slot; called whenever the layout changes."""
        self.detach()
        opt = self.opt
        for k, p in enumerate(opt._sorted):
            if is_dtensor(p):
                raise ValueError(f"{opt._name}: accumulate_in_backward=True does not support DTensor (FSDP2) "
                                 f"parameters: FSDP2 produces their gradients itself; use the default mode")
            if p.requires_grad:  # torch accepts frozen parameters; autograd gives them no gradient
                self.handles.append(p.register_post_accumulate_grad_hook(self._hook_for(k)))

    def detach(self):
        _remove_all(self.handles)

    def _hook_for(self, k):
        bucket = next(bi for bi, b in enumerate(self.opt._buckets) if b.start <= k < b.stop)
        owner = weakref.ref(self)

        def hook(param):
            accumulation = owner()
            if accumulation is not None and accumulation.opt is not None:
                accumulation.add(k, bucket, param)
        return hook

    @torch.no_grad()
    def add(self, k, bucket_index, param):
        """acc[k] += param.grad (adopted when it is the first and already the accumulator's kind)."""
        opt, grad = self.opt, param.grad
        if grad is None:
            return
        if grad.layout != torch.strided or grad.dtype != param.dtype or grad.shape != param.shape:
            raise RuntimeError(f"{opt._name}: {opt._describe(opt._order[k])} got a {grad.layout} {grad.dtype} "
                               f"gradient of shape {tuple(grad.shape)}; accumulate_in_backward=True needs dense "
                               f"gradients shaped and typed like their parameters")
        param.grad = None  # freed now: the point of this mode
        self.pending = True
        code = gradient_codes.code_for(grad, param)
        if code == gradient_codes.RELAYOUT:
            grad = torch.empty_like(param).copy_(grad)  # the kernels sweep both as flat memory
            code = gradient_codes.ADOPT
        b, acc = opt._buckets[bucket_index], opt._accs[k]
        if acc is None:
            if code == gradient_codes.ADOPT and grad.dtype == b.acc_dtype:
                opt._accs[k] = grad  # nobody else holds it any more
            else:
                if opt._owned[k] is None:
                    opt._owned[k] = torch.empty_like(param, dtype=b.acc_dtype)
                opt._accs[k] = opt._owned[k]
                direct_ops.accumulate_([opt._accs[k]], [grad], 1.0, True, None, opt.norm_type)
            opt._live[bucket_index] += 1
        else:
            direct_ops.accumulate_([acc], [grad], 1.0, False, None, opt.norm_type)
        opt._had_gradient = True


def _remove_all(handles):
    for handle in handles:
        handle.remove()
    handles.clear()
