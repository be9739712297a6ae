"""gradfuse.clip_grad_norm_ / get_total_norm / clip_grads_with_norm_ as drop-ins for torch.nn.utils:
the same accepted forms, return dtype/device, errors and warnings as torch, values checked against
the float64 reference (tests/reference.py) and against torch itself, on fresh random gradients."""
import math
import warnings

import pytest
import torch

import gradfuse
import reference
from data import DTYPES, EDGE_SHAPES, HALF_DTYPES, inject, many_shapes, randn, requires_cuda
from tolerances import ONCE, Tolerance, assert_bitwise, assert_close, assert_scalar_close, loosest

NORM_TYPES = [2.0, math.inf]
MIXED = [[torch.float16, torch.bfloat16], [torch.float32, torch.float16], [torch.float64, torch.float32],
         [torch.bfloat16, torch.float64, torch.float32, torch.float16]]
# Against torch's own results (not the reference): torch forms a half-precision norm and clip factor in
# the storage type (two more roundings), so a clipped value may sit one ulp further off than ONCE allows.
VS_TORCH = {**ONCE, **{dt: Tolerance(2, ONCE[dt].floor) for dt in HALF_DTYPES}}
# torch's returned norm vs gradfuse's: torch sums the squares of 65K-element tensors in the storage type
# (float32/float64, measured up to 9 ulps off the float64 reference here); half norms as VS_TORCH.
TORCH_NORM = {**VS_TORCH, torch.float32: Tolerance(32, 0), torch.float64: Tolerance(32, 0)}


def make_params(shapes, dtypes, device, gen, scale=3.0):
    """Parameters with fresh random gradients; dtypes cycles over the shapes."""
    params = []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        p = torch.nn.Parameter(randn(shape, dtype, device, gen))
        p.grad = randn(shape, dtype, device, gen, scale)
        params.append(p)
    return params


def twins(params):
    """Independent copies (parameter and gradient) for running torch on the same data."""
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def torch_clip_factor(norm, max_norm):
    # torch's min(1, max_norm / (norm + 1e-6)) for any max_norm (0 and negative included), NaN kept.
    return math.nan if math.isnan(norm) else min(1.0, max_norm / (norm + reference.CLIP_EPS))


def expected_after_clip(grads64, max_norm, norm_type):
    norm = reference.total_norm(grads64, norm_type)
    factor = torch_clip_factor(norm, max_norm)
    return norm, [g * factor for g in grads64]


def check_clip(params, max_norm, norm_type, **kwargs):
    """gradfuse.clip_grad_norm_ vs the float64 reference and vs torch.nn.utils.clip_grad_norm_."""
    theirs = twins(params)
    grads64 = [reference.as64(p.grad) for p in params if p.grad is not None]
    norm, expected = expected_after_clip(grads64, max_norm, norm_type)
    got = gradfuse.clip_grad_norm_(params, max_norm, norm_type, **kwargs)
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, **kwargs)
    assert (got.dtype, got.device, got.shape) == (want.dtype, want.device, want.shape)
    # CUDA sums fp16/bf16 squares in float packs (within 2.5e-7 of float64, norm_reduce.cuh): a float64
    # norm over a mix that holds half gradients, and the float64 gradients it clipped, are judged at float32.
    half_on_cuda = any(p.grad is not None and p.grad.is_cuda and p.grad.dtype in HALF_DTYPES for p in params)

    def judged(dtype):
        return torch.float32 if half_on_cuda and dtype == torch.float64 else dtype

    assert_close(got, norm, judged(got.dtype), "returned norm vs float64 reference")
    # torch rounds each gradient's norm, and its clip factor, to a storage type: judged at the loosest one.
    torch_dtype = loosest([p.grad.dtype for p in params if p.grad is not None])
    assert_close(got, want.double(), torch_dtype, "returned norm vs torch", table=TORCH_NORM)
    with_grad = [(p, q) for p, q in zip(params, theirs) if p.grad is not None]
    for i, ((p, q), e) in enumerate(zip(with_grad, expected)):
        assert_close(p.grad, e, judged(p.grad.dtype), f"clipped grad {i} vs reference")
        assert_close(p.grad, q.grad.double(), loosest([p.grad.dtype, torch_dtype]), f"clipped grad {i} vs torch",
                     table=VS_TORCH)
    return got


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "no_clip"])
def test_clip_grad_norm_matches_torch_and_reference(device, gen, dtype, norm_type, max_norm):
    # (torch's inf-norm raises on an empty tensor; gradfuse's does not: test_inf_norm_of_an_empty_tensor)
    shapes = [s for s in EDGE_SHAPES if not (math.isinf(norm_type) and s == (0,))]
    params = make_params(shapes + many_shapes(gen, 40), [dtype], device, gen)
    check_clip(params, max_norm, norm_type)


def test_inf_norm_of_an_empty_tensor_is_the_max_of_the_others(device, gen):
    """torch's foreach inf-norm raises on a 0-element gradient (a max without identity); an empty
    gradient has no element, so gradfuse leaves it out of the max instead."""
    params = make_params([(0,), (13,), (2, 0)], [torch.float32], device, gen)
    expected = reference.total_norm([p.grad for p in params], math.inf)
    assert_close(gradfuse.get_total_norm([p.grad for p in params], math.inf), expected, torch.float32, "inf norm")
    with pytest.raises(RuntimeError, match="empty tensor"):
        torch.nn.utils.get_total_norm([p.grad for p in params], math.inf)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtypes", MIXED, ids=lambda ds: "+".join(str(d).split(".")[1] for d in ds))
def test_mixed_dtypes_return_torchs_promoted_dtype(device, gen, dtypes, norm_type):
    params = make_params([(5, 3), (17,), (1,), (4, 4, 2), (33,)], dtypes, device, gen)
    got = check_clip(params, 1.0, norm_type)
    assert got.dtype == loosest(dtypes) or got.dtype == torch.float32 or got.dtype == torch.float64
    grads = [p.grad for p in make_params([(3,), (2, 2)], dtypes, device, gen)]
    assert gradfuse.get_total_norm(grads, norm_type).dtype == torch.nn.utils.get_total_norm(grads, norm_type).dtype


def test_no_clip_leaves_gradients_bitwise_unchanged(device, gen):
    params = make_params([(129,), (3, 7)], [torch.float32, torch.bfloat16], device, gen)
    before = [p.grad.clone() for p in params]
    gradfuse.clip_grad_norm_(params, 1e9)
    for p, b in zip(params, before):
        assert_bitwise(p.grad, b, "factor 1")


def test_two_thousand_tiny_tensors(device, gen):
    params = make_params([(int(n),) for n in torch.randint(1, 300, (2000,), generator=gen)], [torch.float32],
                         device, gen)
    check_clip(params, 1.0, 2.0)


@pytest.mark.parametrize("norm_type", NORM_TYPES)  # the strided branch for every norm type
@pytest.mark.parametrize("layout", ["gappy_view", "transposed", "channels_last"])
def test_non_contiguous_gradients(device, gen, layout, norm_type):
    params = make_params([(6, 10), (4, 3, 5, 5)], [torch.float32], device, gen)
    for p in params:
        g = randn((2,) + tuple(p.shape), torch.float32, device, gen)
        if layout == "gappy_view":
            p.grad = g[1]  # a view at an offset: storage the kernels must not sweep past
            if p.dim() == 2:
                p.grad = randn((6, 20), torch.float32, device, gen)[:, ::2]
        elif layout == "transposed":  # dense but not contiguous: swept flat by the kernels
            p.grad = randn(tuple(reversed(p.shape)), torch.float32, device, gen).permute(*reversed(range(p.dim())))
        else:
            p.grad = g[0].contiguous(memory_format=torch.channels_last) if p.dim() == 4 else g[0]
    check_clip(params, 0.3, norm_type)


def test_parameter_without_grad_is_skipped_and_kept_none(device, gen):
    params = make_params([(7,), (3,), (5,)], [torch.float32], device, gen)
    params[1].grad = None
    check_clip(params, 0.1, 2.0)
    assert params[1].grad is None


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "get_total_norm"])
def test_accepted_forms(device, gen, fn):
    """One tensor, a list, a tuple, a generator: the same result as torch for each."""
    p = make_params([(11,)], [torch.float32], device, gen)[0]
    forms = [lambda ps: ps[0], lambda ps: list(ps), lambda ps: tuple(ps), lambda ps: (x for x in ps)]
    for form in forms:
        ours, theirs = [p], twins([p])
        if fn == "get_total_norm":
            ours, theirs = [t.grad for t in ours], [t.grad for t in theirs]
        got = getattr(gradfuse, fn)(form(ours), 0.5) if fn == "clip_grad_norm_" else gradfuse.get_total_norm(form(ours))
        want = getattr(torch.nn.utils, fn)(form(theirs), 0.5) if fn == "clip_grad_norm_" else \
            torch.nn.utils.get_total_norm(form(theirs))
        assert_close(got, want.double(), torch.float32, f"{fn} form")
        if fn == "clip_grad_norm_":
            assert_close(ours[0].grad, theirs[0].grad.double(), torch.float32, "clipped")
        p.grad = randn((11,), torch.float32, device, gen, 3.0)


def test_nothing_to_clip_returns_cpu_float_zero(device, gen):
    bare = torch.nn.Parameter(randn((3,), torch.float32, device, gen))
    for args in ([],), ([bare],), (bare,):
        got, want = gradfuse.clip_grad_norm_(*args, 1.0), torch.nn.utils.clip_grad_norm_(*args, 1.0)
        assert (got.dtype, got.device, float(got)) == (want.dtype, want.device, float(want)) == (
            torch.float32, torch.device("cpu"), 0.0)
    got = gradfuse.get_total_norm([])
    assert (got.dtype, got.device, float(got)) == (torch.float32, torch.device("cpu"), 0.0)
    assert gradfuse.clip_grads_with_norm_([bare], 1.0, 2.0) is None  # no gradient: total_norm is never read


def test_empty_generator_warns_like_torch():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gradfuse.clip_grad_norm_((p for p in []), 1.0)
    assert [str(w.message) for w in caught] == ["`parameters` is an empty generator, no gradient clipping will occur."]
    assert caught[0].filename == __file__  # points at the caller


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_error_if_nonfinite_raises_torchs_error_before_any_change(device, gen, value, norm_type):
    params = make_params([(33,), (7,)], [torch.float32], device, gen)
    inject(params[1].grad, value, gen)
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError) as ours:
        gradfuse.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_(twins(params), 1.0, norm_type, error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)
    for p, b in zip(params, before):
        assert_bitwise(p.grad, b, "unchanged after the error")
    with pytest.raises(RuntimeError, match="non-finite"):
        gradfuse.get_total_norm([p.grad for p in params], norm_type, error_if_nonfinite=True)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_norm_without_error_scales_like_torch(device, gen, value, norm_type):
    params = make_params([(33,), (7,)], [torch.float32], device, gen)
    inject(params[0].grad, value, gen)
    theirs = twins(params)
    got = gradfuse.clip_grad_norm_(params, 1.0, norm_type)
    want = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    assert torch.equal(got, want) or (got.isnan() and want.isnan())
    for p, q in zip(params, theirs):
        assert torch.equal(p.grad.isnan(), q.grad.isnan())
        assert torch.equal(torch.nan_to_num(p.grad), torch.nan_to_num(q.grad))


def test_float16_norm_past_65504_still_clips_by_the_float64_norm(device, gen):
    """torch's float16 norm overflows to inf and zeroes the gradients; gradfuse returns the same inf
    (torch's dtype) but scales by the float64 norm, so the clipped gradients keep their direction."""
    p = torch.nn.Parameter(torch.zeros(64, dtype=torch.float16, device=device))
    p.grad = randn((64,), torch.float16, device, gen).sign() * 30000
    grads64 = [reference.as64(p.grad)]
    norm, expected = expected_after_clip(grads64, 1.0, 2.0)
    got = gradfuse.clip_grad_norm_([p], 1.0)
    assert got.dtype == torch.float16 and got.isinf()
    assert_close(p.grad, expected[0], torch.float16, "clipped by the float64 norm")
    assert_scalar_close(reference.total_norm([p.grad], 2.0), 1.0, torch.float16, "clipped to max_norm")


@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_grads_with_norm_matches_reference(device, gen, dtype, norm_dtype):
    params = make_params([(19,), (4, 5), (1,)], [dtype], device, gen)
    theirs = twins(params)
    total = torch.tensor(7.3, dtype=norm_dtype, device=device)
    factor = min(1.0, 2.0 / (float(total) + reference.CLIP_EPS))
    expected = [reference.as64(p.grad) * factor for p in params]
    assert gradfuse.clip_grads_with_norm_(params, 2.0, total) is None
    torch.nn.utils.clip_grads_with_norm_(theirs, 2.0, total)
    for i, (p, q, e) in enumerate(zip(params, theirs, expected)):
        assert_close(p.grad, e, dtype, f"grad {i} vs reference")
        # torch forms the factor in the norm's dtype: judged at the looser of the two.
        assert_close(p.grad, q.grad.double(), loosest([dtype, norm_dtype]), f"grad {i} vs torch", table=VS_TORCH)


def test_clip_grads_with_norm_wants_a_tensor_like_torch(device, gen):
    params = make_params([(3,)], [torch.float32], device, gen)
    with pytest.raises(TypeError, match="total_norm must be a tensor"):
        gradfuse.clip_grads_with_norm_(params, 1.0, 2.0)
    with pytest.raises(TypeError):
        torch.nn.utils.clip_grads_with_norm_(params, 1.0, 2.0)


@pytest.mark.parametrize("max_norm", [0.0, -1.0])
def test_zero_and_negative_max_norm_follow_torchs_formula(device, gen, max_norm):
    params = make_params([(9,), (2, 3)], [torch.float32], device, gen)
    check_clip(params, max_norm, 2.0)


@pytest.mark.parametrize("foreach", [None, True, False])
def test_foreach_is_accepted(device, gen, foreach):
    params = make_params([(9,), (2, 3)], [torch.float32, torch.float64], device, gen)
    check_clip(params, 0.5, 2.0, foreach=foreach)
    grads = [p.grad for p in params]
    assert_close(gradfuse.get_total_norm(grads, foreach=foreach), reference.total_norm(grads, 2.0), torch.float64)


@pytest.mark.parametrize("norm_type", [1.0, 3.0, 0.5, 0.0, -math.inf, "inf"])
def test_other_norm_types_are_torchs_own_results(device, gen, norm_type):
    params = make_params([(9,), (2, 3), (17,)], [torch.float32], device, gen)
    theirs = twins(params)
    got = gradfuse.clip_grad_norm_(params, 0.5, norm_type)
    want = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type)
    assert_bitwise(got, want, f"norm_type {norm_type}")
    for p, q in zip(params, theirs):
        assert_bitwise(p.grad, q.grad, f"norm_type {norm_type}")


def test_tensors_the_kernels_cannot_read_go_to_torch(device, gen):
    """Complex and sparse gradients: torch's implementation, torch's results; integers: torch's error."""
    complex_grads = [torch.randn(5, dtype=torch.complex64, generator=gen).to(device), randn((3,), torch.float32,
                                                                                           device, gen)]
    assert_bitwise(gradfuse.get_total_norm(complex_grads), torch.nn.utils.get_total_norm(complex_grads), "complex")
    sparse = randn((6,), torch.float32, "cpu", gen).to_sparse()
    try:  # some torch releases have no sparse CPU vector norm: then gradfuse raises torch's own error
        want = torch.nn.utils.get_total_norm([sparse])
    except NotImplementedError:
        with pytest.raises(NotImplementedError):
            gradfuse.get_total_norm([sparse])
    else:
        assert_bitwise(gradfuse.get_total_norm([sparse]), want, "sparse")
    with pytest.raises(RuntimeError, match="floating point or complex"):
        gradfuse.get_total_norm([torch.ones(3, dtype=torch.long, device=device)])


def test_meta_tensors_follow_torch_including_foreach_error():
    grads = [torch.empty(3, device="meta")]
    assert gradfuse.get_total_norm(grads).device.type == "meta"
    with pytest.raises(RuntimeError, match="foreach=True was passed"):
        gradfuse.get_total_norm(grads, foreach=True)


def test_shared_gradient_counts_and_scales_twice_like_torch(device, gen):
    params = make_params([(40000,), (5,)], [torch.float32], device, gen)
    extra = torch.nn.Parameter(torch.zeros(40000, device=device))
    extra.grad = params[0].grad  # one tensor listed twice, in chunks that two threads may take
    params.insert(1, extra)
    theirs = twins(params)
    theirs[1].grad = theirs[0].grad
    got = gradfuse.clip_grad_norm_(params, 0.5)
    # torch's foreach path scales a tensor listed twice in one CUDA launch, whose two reads race
    # (seen on an H200: most elements scaled once); its per-tensor path scales twice, in order.
    want = torch.nn.utils.clip_grad_norm_(theirs, 0.5, foreach=False)
    assert_close(got, want.double(), torch.float32, "norm")
    for p, q in zip(params, theirs):
        assert_close(p.grad, q.grad.double(), torch.float32, "scaled twice")


def test_get_total_norm_leaves_tensors_alone_and_needs_no_grad_mode(device, gen):
    grads = [randn((12,), torch.float32, device, gen).requires_grad_() for _ in range(3)]
    before = [g.detach().clone() for g in grads]
    norm = gradfuse.get_total_norm(grads)
    assert not norm.requires_grad
    for g, b in zip(grads, before):
        assert_bitwise(g.detach(), b, "unchanged")


@requires_cuda
def test_no_host_sync_on_cuda(gen):
    params = make_params([(1000,), (33,)], [torch.float32, torch.bfloat16], "cuda", gen)
    gradfuse.clip_grad_norm_(params, 0.5)  # warm-up: allocator and first-use setup
    given_norm = torch.tensor(3.0, device="cuda")  # made before the block: a host-to-device copy syncs
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gradfuse.clip_grad_norm_(params, 0.5)
        gradfuse.get_total_norm([p.grad for p in params], math.inf)
        gradfuse.clip_grads_with_norm_(params, 0.5, given_norm)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@requires_cuda
@pytest.mark.parametrize("first", ["cpu", "cuda"])
def test_cpu_and_cuda_gradients_mixed_are_scaled_by_the_finished_factor(gen, first):
    # The clip factor lives on the first gradient's device; a CPU bucket must read it after the copy ends.
    second = "cuda" if first == "cpu" else "cpu"
    params = (make_params([(4097,), (33,), (1,)], [torch.float32, torch.bfloat16], first, gen)
              + make_params([(65537,), (7,), (3, 11)], [torch.float32, torch.float16], second, gen))
    for _ in range(3):  # fresh gradients each round: a stale factor from the round before would show
        for p in params:
            p.grad = randn(p.shape, p.dtype, p.device, gen, 3.0)
        check_clip(params, 0.5, 2.0)
