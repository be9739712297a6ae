"""Drop-ins for torch.nn.utils.clip_grad_norm_, get_total_norm and clip_grads_with_norm_ on
gradfuse's kernels, for any optimizer: the norm is summed in float64 in one fused pass per
(device, dtype) group, the clip factor stays on the device, and the scaling is one fused pass.

Differences from torch, on purpose:
- the norm is computed in float64 (returned in torch's dtype: the gradients' promoted dtype, on
  the first gradient's device), and the scaling uses the float64 norm, so a float16 norm past
  65504 still clips correctly; error_if_nonfinite judges that float64 norm;
- DTensor (FSDP2, tensor parallel) gradients give the true global norm as a plain tensor:
  each rank's partial is all-reduced over the mesh dimensions that shard it;
- norm types other than 2 and inf, and tensors the kernels cannot read (complex, sparse,
  integer, devices other than CPU/CUDA), go to torch's own implementation unchanged.
"""
import math
import types
import warnings

import torch

from . import direct_ops, distributed_norm
from .norm_partials import NormPartials
from ._native import cuda_compiled, inspect_parameters

FUSED_NORM_TYPES = (2.0, math.inf)
CLIP_EPSILON = 1e-6  # the constant torch adds to the norm before dividing
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_KERNEL_DEVICES = ("cpu", "cuda") if cuda_compiled else ("cpu",)
_PLAIN_TYPES = {torch.Tensor, torch.nn.Parameter}
_NONFINITE_MESSAGE = ("The total norm of order {} for gradients from `parameters` is non-finite, so it cannot be "
                      "clipped. To disable this error and scale the gradients by the non-finite norm anyway, "
                      "set `error_if_nonfinite=False`")


class _Bucket:
    """Gradients that share a device, a dtype and the process groups their norm is reduced over."""
    __slots__ = ("groups", "device", "dtype", "dense", "strided")

    def __init__(self, groups, device, dtype):
        self.groups, self.device, self.dtype = groups, device, dtype
        self.dense = []  # what the kernels sweep as flat memory
        self.strided = []  # views with gaps: a contiguous copy for the norm, a plain mul_ for the scaling


def _kernel_ready(t):
    return t.layout == torch.strided and t.dtype in _KERNEL_DTYPES and t.device.type in _KERNEL_DEVICES


def _fast_buckets(tensors):
    """Buckets of a list of plain dense kernel-ready tensors from two native calls, or None."""
    if not set(map(type, tensors)) <= _PLAIN_TYPES or inspect_parameters(tensors)[0] != -1:
        return None
    grouped = torch._C._group_tensors_by_device_and_dtype([tensors], True)
    buckets = []
    for (device, dtype), ([members], indices) in sorted(grouped.items(), key=lambda item: item[1][1][0]):
        if device.type not in _KERNEL_DEVICES:
            return None
        bucket = _Bucket((), device, dtype)
        bucket.dense = members
        buckets.append(bucket)
    return buckets


def _buckets(tensors, what):
    """The tensors (DTensors by their local shards) grouped in order of first appearance; None when
    some tensor needs torch's own implementation (never for DTensors: their norm must be global)."""
    fast = _fast_buckets(tensors)
    if fast is not None:
        return fast
    by_key = {}
    unsupported = None
    for i, tensor in enumerate(tensors):
        groups = distributed_norm.shard_groups(tensor, f"{what}[{i}]")
        local = distributed_norm.local_tensor(tensor)
        if not _kernel_ready(local):
            unsupported = unsupported or (i, local)
            continue
        key = (groups, local.device, local.dtype)
        bucket = by_key.get(key)
        if bucket is None:
            bucket = by_key[key] = _Bucket(*key)
        (bucket.dense if _is_dense(local) else bucket.strided).append(local)
    if unsupported is not None:
        if any(bucket.groups for bucket in by_key.values()) or any(map(distributed_norm.is_dtensor, tensors)):
            i, local = unsupported
            raise ValueError(f"gradfuse: {what}[{i}] ({local.dtype}, {local.layout}, on {local.device}) cannot be "
                             f"read by gradfuse's kernels, and torch's fallback would not give the global norm of "
                             f"the DTensors next to it; use float16/bfloat16/float32/float64 dense tensors on "
                             f"{' or '.join(_KERNEL_DEVICES)}")
        return None
    return list(by_key.values())


def _is_dense(t):
    # Dense: a permutation of a contiguous tensor (no gaps, no overlaps), which the kernels sweep flat.
    return inspect_parameters([t])[0] == -1


def _norm64(buckets, norm_type, first_device):
    """0-dim float64 norm of all buckets on first_device: one partial per (device, process groups),
    all-reduced over its groups, then merged (sum of squares, or max) and finalized on the device."""
    domains = {}  # process groups -> a key named by first appearance (the same on every rank)
    for bucket in buckets:
        domains.setdefault(bucket.groups, f"d{len(domains)}")
    partials = NormPartials({key: groups for groups, key in domains.items()} | {"": ()})
    for bucket in buckets:
        state = partials.partial(bucket.device, domains[bucket.groups])
        if bucket.dense:
            direct_ops.accumulate_norm_(state, bucket.dense, norm_type)
        if bucket.strided:
            direct_ops.accumulate_norm_(state, [t.contiguous() for t in bucket.strided], norm_type)
    unused_counter = torch.zeros((), dtype=torch.long, device=first_device)
    return partials.total(first_device, unused_counter, norm_type)


def _result_dtype(buckets):
    # torch stacks the per-tensor norms, so its result takes the promoted dtype of all gradients.
    dtype = buckets[0].dtype
    for bucket in buckets[1:]:
        dtype = torch.promote_types(dtype, bucket.dtype)
    return dtype


def _check_finite(norm64, norm_type):
    if not bool(torch.isfinite(norm64)):  # the one host sync, asked for by error_if_nonfinite
        raise RuntimeError(_NONFINITE_MESSAGE.format(norm_type))


def _as_list(tensors):
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


def _gradients(parameters):
    return [g for p in parameters if (g := p.grad) is not None]


def _clip_coefficient(total_norm, max_norm):
    # torch's min(1, max_norm / (norm + 1e-6)) in float64, on the norm's device (no `if`, no sync).
    return torch.clamp(max_norm / (total_norm.to(torch.float64) + CLIP_EPSILON), max=1.0)


def _scale_(buckets, coefficient):
    """grads *= coefficient (0-dim float64, on some device) in one fused pass per bucket."""
    per_device = {}
    for bucket in buckets:
        device_coefficient, inverse = per_device.get(bucket.device, (None, None))
        if device_coefficient is None:
            # non_blocking only towards CUDA: a copy to the host must finish before the CPU reads it.
            device_coefficient = coefficient.to(bucket.device, non_blocking=bucket.device.type == "cuda")
            # accumulate_ with first=True and an amp_scale of 1/c stores grad * float32(1/(1/c)) in place:
            # the fused scaling pass, reading the factor on the device like GradScaler's unscale.
            inverse = torch.reciprocal(device_coefficient).to(torch.float32)
            per_device[bucket.device] = (device_coefficient, inverse)
        for tensors in _occurrences(bucket.dense):
            if bucket.dtype == torch.float64:  # a float32 factor would cost float64 gradients precision
                torch._foreach_mul_(tensors, device_coefficient)
            else:
                direct_ops.accumulate_(tensors, tensors, 1.0, True, None, 2.0, inverse)
        for t in bucket.strided:
            t.mul_(device_coefficient)


def _occurrences(tensors):
    """The list split into passes without repeats: a gradient listed twice (p2.grad = p1.grad) is
    scaled twice, as torch does, but never by two threads at once."""
    if len(set(map(id, tensors))) == len(tensors):
        return [tensors] if tensors else []
    passes, seen = [], {}
    for t in tensors:
        k = seen[id(t)] = seen.get(id(t), -1) + 1
        if k == len(passes):
            passes.append([])
        passes[k].append(t)
    return passes


def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """torch.nn.utils.get_total_norm, summed in float64 by gradfuse's kernels (see the module doc).
    foreach is accepted for compatibility; the kernels are fused whatever its value."""
    with torch.no_grad():
        tensors = _as_list(tensors)
        norm_type = float(norm_type)
        if not tensors:
            return torch.tensor(0.0)
        buckets = _buckets(tensors, "tensors") if norm_type in FUSED_NORM_TYPES else _torch_only(tensors, norm_type)
        if buckets is None:
            return torch.nn.utils.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
        norm64 = _norm64(buckets, norm_type, tensors[0].device)
        if error_if_nonfinite:
            _check_finite(norm64, norm_type)
        return norm64.to(_result_dtype(buckets))


def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None):
    """torch.nn.utils.clip_grads_with_norm_: grads *= min(1, max_norm / (total_norm + 1e-6)), the
    factor formed in float64 on the device, the scaling fused. total_norm must be a tensor (as
    torch requires); a DTensor norm (torch's get_total_norm of sharded gradients) is made whole."""
    with torch.no_grad():
        parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        grads = _gradients(parameters)
        max_norm = float(max_norm)
        if not grads:
            return None
        if not isinstance(total_norm, torch.Tensor):
            raise TypeError(f"clip_grads_with_norm_: total_norm must be a tensor (as get_total_norm returns), "
                            f"got {type(total_norm).__name__}")
        if distributed_norm.is_dtensor(total_norm):
            total_norm = total_norm.full_tensor()
        buckets = _buckets(grads, "gradients")
        if buckets is None:
            return torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
        _scale_(buckets, _clip_coefficient(total_norm, max_norm))
        return None


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """torch.nn.utils.clip_grad_norm_ on gradfuse's kernels: one float64 norm pass, the clip factor
    on the device (no host sync unless error_if_nonfinite), one fused scaling pass. Returns the
    total norm in torch's dtype and device (a plain tensor, the global norm, for DTensor gradients)."""
    with torch.no_grad():
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        else:
            is_generator = isinstance(parameters, types.GeneratorType)
            parameters = list(parameters)  # a generator is read once
            if is_generator and not parameters:
                warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
        grads = _gradients(parameters)
        norm_type = float(norm_type)
        if not grads:
            return torch.tensor(0.0)
        buckets = _buckets(grads, "gradients") if norm_type in FUSED_NORM_TYPES else _torch_only(grads, norm_type)
        if buckets is None:
            return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)
        norm64 = _norm64(buckets, norm_type, grads[0].device)
        if error_if_nonfinite:
            _check_finite(norm64, norm_type)  # before any gradient changes, as in torch
        _scale_(buckets, _clip_coefficient(norm64, float(max_norm)))
        return norm64.to(_result_dtype(buckets))


def clip_with_policy_(parameters, coefficient_of):
    """Scales the parameters' gradients by coefficient_of(norm), norm being their float64 global
    2-norm (a device tensor; DTensor gradients give the global norm): a clip policy's standalone use."""
    with torch.no_grad():
        parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        grads = _gradients(parameters)
        if not grads:  # as zclip: a norm of 0 still counts for the policy
            norm = torch.zeros((), dtype=torch.float64)
            coefficient_of(norm)
            return norm
        buckets = _buckets(grads, "gradients")
        if buckets is None:
            raise ValueError("gradfuse: a clip policy needs gradients the kernels read (float16/bfloat16/float32/"
                             "float64, dense, on CPU or CUDA)")
        norm64 = _norm64(buckets, 2.0, grads[0].device)
        _scale_(buckets, coefficient_of(norm64))
        return norm64


def _torch_only(tensors, norm_type):
    """None (torch's implementation handles it) for a norm type the kernels do not compute; an
    error for DTensors, whose norm torch would leave local."""
    for i, tensor in enumerate(tensors):
        if distributed_norm.is_dtensor(tensor):
            raise ValueError(f"gradfuse: the global norm of DTensor gradients is computed for norm_type 2.0 and inf "
                             f"only, got {norm_type} (tensor {i} is a DTensor)")
    return None

