"""Minimum bytes each benchmarked piece of work must move (each input read once, each
output written once) -> achieved GB/s = model bytes / time.

Notation per parameter element: P = parameter (and momentum) element size, G = gradient
element size (gradients arrive in the parameter dtype), A = accumulator element size
(float32 for bf16/fp16 parameters, the parameter dtype otherwise). Momentum is on.

* K = 1 (no accumulation): a norm pass over the gradient (G), then the update, which reads
  the gradient, param and momentum and writes param and momentum (G + 4P).
  fp32: 4 + 20 = 24 B/param.  (No accumulator has to exist for K = 1.)
* K > 1: micro-batch 1 costs nothing when the gradient can be adopted as the accumulator
  (A == G), else a conversion G + A; micro-batches 2..K each add: read acc + grad, write
  acc (2A + G), the last one also producing the norm in the same pass; the update reads
  acc, param, momentum and writes param, momentum (A + 4P).
  fp32 K=4: 0 + 3 * 12 + 20 = 56 B/param.
* Boundary step alone = the last micro-batch: K = 1 as above; K > 1: (2A + G) + (A + 4P).
* track_param_norms=True adds no bytes: each tensor's norm partial is taken from the values the
  norm pass reads anyway (the step rows time it as gradfuse_param_norms against these bytes).

The same model bytes are used for gradfuse and for the torch baselines (it is the work,
not the implementation); `impl_bytes_*` give what each implementation really moves, for
reference (e.g. the torch baseline with clipping at K=1: norm 4 + scale 8 + SGD 20 = 32).
"""
import torch


def elem(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def accum_dtype(param_dtype):
    return torch.float32 if param_dtype in (torch.float16, torch.bfloat16) else param_dtype


def cycle_bytes_per_param(param_dtype, K: int) -> float:
    P = G = elem(param_dtype)
    A = elem(accum_dtype(param_dtype))
    if K == 1:
        return G + (G + 4 * P)
    first = 0 if A == G else G + A
    return first + (K - 1) * (2 * A + G) + (A + 4 * P)


def boundary_bytes_per_param(param_dtype, K: int) -> float:
    P = G = elem(param_dtype)
    A = elem(accum_dtype(param_dtype))
    if K == 1:
        return G + (G + 4 * P)
    return (2 * A + G) + (A + 4 * P)


def torch_cycle_bytes_per_param(param_dtype, K: int, clip: bool = True) -> float:
    """What the torch baseline moves: _foreach_add_ into .grad (param dtype) for micro
    2..K, clip_grad_norm_ (norm read G + in-place scale 2G), SGD step (G + 4P)."""
    P = G = elem(param_dtype)
    return (K - 1) * 3 * G + (3 * G if clip else 0) + (G + 4 * P)


def op_bytes_per_param(op: str, dtype) -> float:
    """Per-op minimum for the op benchmarks: gradients, parameters and momentum in `dtype`, the
    accumulator in accum_dtype(dtype) (float32 for fp16/bf16)."""
    s, a = elem(dtype), elem(accum_dtype(dtype))
    return {"accumulate": 2 * a + s, "accumulate_norm": 2 * a + s, "global_norm": s, "sgd_step": 5 * s}[op]


def gbps(bytes_moved: float, seconds: float) -> float:
    return bytes_moved / seconds / 1e9 if seconds > 0 else float("nan")
