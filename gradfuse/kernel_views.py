"""Parameters the kernels cannot sweep as they are, updated as torch updates them: a complex
parameter on its real view (torch.view_as_real: the norm then counts |z|^2, and SGD / AdamW act
elementwise on real and imaginary parts, as torch's own implementations do), a non-dense
(strided-view) parameter through a contiguous working copy written back after each update (a
slower path). Their gradients are always copied into the running sum, never adopted."""
import torch

from .distributed_norm import is_dtensor

_COMPLEX = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def is_dense(t) -> bool:
    """Non-overlapping and dense: a permutation of a contiguous tensor (what the kernels sweep flat)."""
    if t.numel() == 0:
        return True
    expected = 1
    for size, stride in sorted(((n, s) for n, s in zip(t.shape, t.stride()) if n != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def needs_view(p) -> bool:
    """Whether parameter p is updated through a KernelView (never a DTensor: FSDP2 owns its shards)."""
    return (p.layout == torch.strided and not is_dtensor(p)
            and (p.dtype in _COMPLEX or not is_dense(p)))


def kernel_dtype(dtype):
    """The dtype the kernels see for a parameter of this dtype (the real dtype of a complex one)."""
    return _COMPLEX.get(dtype, dtype)


def probe(p):
    """What the native parameter check should see for p: p itself, or a dense stand-in of its
    kernel dtype (so that only the dtype is judged for a parameter updated through a view)."""
    return torch.empty(0, dtype=kernel_dtype(p.dtype), device=p.device) if needs_view(p) else p


def memory_span(t):
    """[first, last + 1) byte addresses t's elements can touch (its whole extent for a strided view)."""
    reach = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + reach * t.element_size()


def share_elements(a, b) -> bool:
    """Whether two tensors whose extents overlap have a byte in common (exact for strided views of
    one storage: their element addresses are compared; dense tensors overlap wherever extents do)."""
    if is_dense(a) and is_dense(b):
        return True
    return bool(torch.isin(_byte_addresses(a), _byte_addresses(b)).any())


def _byte_addresses(t):
    """Every byte address t's elements occupy (host arithmetic on int64 indices; construction only)."""
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    starts = t.data_ptr() + offsets.reshape(-1) * t.element_size()
    return (starts.unsqueeze(-1) + torch.arange(t.element_size(), dtype=torch.int64)).reshape(-1)


def _as_real(t):
    return torch.view_as_real(t) if t.is_complex() else t


class KernelView:
    """The tensors the kernels update in place of one parameter."""
    __slots__ = ("param", "work", "dense")

    def __init__(self, param):
        self.param = param
        self.dense = is_dense(param)
        # Laid out as empty_like lays out its state (dense, in the parameter's dimension order).
        self.work = None if self.dense else torch.empty_like(param)

    def param_for_update(self):
        """The parameter as the kernels update it (a non-dense one refreshed into its working copy:
        it may have been changed since the last cycle)."""
        if self.dense:
            return _as_real(self.param)
        self.work.copy_(self.param)
        return _as_real(self.work)

    def write_back(self):
        if not self.dense:
            self.param.copy_(self.work)

    def grad(self, grad):
        """A gradient of the parameter as the kernels add it (real, laid out like the kernel's parameter)."""
        like = self.param if self.dense else self.work
        if grad.numel() > 1 and grad.stride() != like.stride():
            grad = torch.empty_like(like).copy_(grad)
        return _as_real(grad)

    @staticmethod
    def state(t):
        """A per-parameter state tensor (momentum, moments; created like the parameter but dense)."""
        return _as_real(t)

    def saved(self, total):
        """A running sum as checkpoints keep it: shaped and typed like the parameter's gradient."""
        return torch.view_as_complex(total.contiguous()) if self.param.is_complex() else total

    def sum_buffer(self, acc_dtype):
        """An empty running-sum buffer of the kernel form."""
        like = self.param if self.dense else self.work
        return torch.empty_like(_as_real(like), dtype=acc_dtype)
