"""Cycle policies against their public references, float64, hundreds of updates with injected
spikes: clip=gradfuse.ZClip(...) against the zclip package's own loop (zclip.ZClip.step(model)
between accumulation and torch's optimizer step), standalone ZClip.clip_ against zclip, and
skip=gradfuse.SpikeSkip(...) against OLMo-core's SkipStepOptimizer.get_step_factor rule (written
here from its definition: ai2-olmo-core's module imports much of olmo_core)."""
import copy
import io

import pytest
import torch

import gradfuse
from gradfuse import FusedAccumAdamW, FusedAccumSGD, SpikeSkip, ZClip

zclip = pytest.importorskip("zclip")

F64 = torch.float64
SHAPES = [(5, 7), (13,), (1,), (0,)]
RULES = {"sgd": (FusedAccumSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
         "adamw": (FusedAccumAdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05))}
ZCLIP_CONFIGS = [dict(), dict(mode="percentile"), dict(clip_option="mean"),
                 dict(skip_update_on_spike=True, max_grad_norm=None), dict(warmup_steps=5, clip_factor=0.7),
                 dict(warmup_steps=0, z_thresh=1.5, alpha=0.9), dict(max_grad_norm=0.25)]


def initial_params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=F64) for s in SHAPES]


def gradient_stream(seed, k, cycles, spike_every=29):
    """Per cycle, k micro-batch gradient lists: norm ~0.3 with a slow drift, x40 spikes."""
    g = torch.Generator().manual_seed(seed)
    for t in range(cycles):
        spike = 40.0 if t % spike_every == spike_every - 1 else 1.0
        drift = 0.04 * (1.0 + 0.3 * torch.sin(torch.tensor(t / 15.0, dtype=F64)))
        yield [[torch.randn(s, generator=g, dtype=F64) * drift * spike for s in SHAPES] for _ in range(k)]


def fused_cycle(opt, params, micro, losses=None):
    for m, grads in enumerate(micro):
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step(loss=None if losses is None else losses[m])
        opt.zero_grad()


def mean_grads(params, micro):
    for i, p in enumerate(params):
        p.grad = sum(grads[i] for grads in micro) / len(micro)


def assert_close_rel(ours, theirs, rel, what):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        scale = b.detach().abs().clamp(min=1e-3)
        worst = float(((a.detach() - b.detach()).abs() / scale).max()) if b.numel() else 0.0
        assert worst <= rel, f"{what}: parameter {i} off by {worst:.2e} (relative)"


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("config", ZCLIP_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_zclip_equals_the_zclip_package_loop(rule, k, config):
    fused_cls, torch_cls, hyper = RULES[rule]
    ours = [p.clone().requires_grad_() for p in initial_params(1)]
    theirs = torch.nn.ParameterList([torch.nn.Parameter(p.clone()) for p in initial_params(1)])
    opt = fused_cls(ours, accumulation_steps=k, clip=ZClip(**config), **hyper)
    reference, reference_clip = torch_cls(theirs.parameters(), foreach=False, **hyper), zclip.ZClip(**config)
    spikes_clipped = 0
    for micro in gradient_stream(2, k, 240):
        fused_cycle(opt, ours, micro)
        mean_grads(theirs, micro)
        norm = reference_clip.step(theirs)
        spikes_clipped += reference_clip.initialized and reference_clip._compute_clip_val(norm) is not None
        reference.step()
        reference.zero_grad()
        assert float(opt.last_grad_norm) == pytest.approx(norm, rel=1e-13)
    assert_close_rel(ours, theirs, 1e-12, f"ZClip({config}) K={k}")
    if reference_clip.initialized:
        assert float(opt.clip.state["mean"]) == pytest.approx(reference_clip.mean, rel=1e-12)
        assert float(opt.clip.state["var"]) == pytest.approx(reference_clip.var, rel=1e-11)
    assert spikes_clipped > 0, "the stream must exercise the adaptive threshold"


def test_zclip_is_not_the_fixed_threshold():
    """The comparison above is discriminating: the fixed cap alone trains elsewhere."""
    results = []
    for clip in (dict(clip=ZClip()), dict(max_grad_norm=1.0)):
        params = [p.clone().requires_grad_() for p in initial_params(3)]
        opt = FusedAccumSGD(params, lr=0.05, momentum=0.9, **clip)
        for micro in gradient_stream(4, 1, 120):
            fused_cycle(opt, params, micro)
        results.append(params)
    assert max(float((a - b).abs().max()) for a, b in zip(*results) if a.numel()) > 1e-3


@pytest.mark.parametrize("config", ZCLIP_CONFIGS[:3], ids=["defaults", "percentile", "mean"])
def test_standalone_zclip_equals_the_package(config):
    ours = torch.nn.ParameterList([torch.nn.Parameter(p.clone()) for p in initial_params(5)])
    theirs = torch.nn.ParameterList([torch.nn.Parameter(p.clone()) for p in initial_params(5)])
    policy, reference = ZClip(**config), zclip.ZClip(**config)
    for (grads,) in gradient_stream(6, 1, 150):
        for p, q, grad in zip(ours, theirs, grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        norm = policy.clip_(ours.parameters())
        assert float(norm) == pytest.approx(reference.step(theirs), rel=1e-13)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-13, atol=0)


# ------------------------------------------------------------------ spike skipping
def olmo_step_factor(losses, norms, window, sigma):
    """ai2-olmo-core 3.0.0 SkipStepOptimizer.get_step_factor: the lists hold the last window + 1
    values, the current one last; 1 (step) or 0 (skip)."""
    series = [s for s in (losses, norms) if s]
    if len(series[0]) < max(2, window // 2):
        return 1
    step = True
    for values in series:
        std, mean = torch.std_mean(torch.tensor(values[:-1], dtype=F64))
        step = step and bool((values[-1] - mean) <= sigma * std)
    return int(step)


@pytest.mark.parametrize("with_loss", [False, True])
@pytest.mark.parametrize("window,sigma,k", [(8, 2.0, 1), (16, 3.0, 2), (5, 1.0, 1), (128, 6.0, 3)])
def test_spike_skip_decides_as_olmo_core(with_loss, window, sigma, k):
    params = [p.clone().requires_grad_() for p in initial_params(7)]
    opt = FusedAccumAdamW(params, lr=0.01, accumulation_steps=k, skip=SpikeSkip(window=window, sigma=sigma))
    g = torch.Generator().manual_seed(8)
    losses, norms, skipped = [], [], 0
    for t, micro in enumerate(gradient_stream(9, k, 300, spike_every=23)):
        micro_losses = [float(torch.rand((), generator=g, dtype=F64)) + (30.0 if t % 41 == 40 else 0.0)
                        for _ in range(k)] if with_loss else None
        before = [p.detach().clone() for p in params]
        moments = copy.deepcopy(opt.state_dict()["state"])
        fused_cycle(opt, params, micro, micro_losses)
        norms.append(float(opt.last_grad_norm))
        if with_loss:
            losses.append(sum(micro_losses) / k)
        expected_skip = not olmo_step_factor(losses[-window - 1:], norms[-window - 1:], window, sigma)
        assert bool(opt.last_step_skipped) == expected_skip, f"cycle {t}"
        if expected_skip:
            skipped += 1
            assert all(torch.equal(p, b) for p, b in zip(params, before)), "a skipped cycle changes no parameter"
            after = opt.state_dict()["state"]
            assert all(torch.equal(torch.as_tensor(after[i][key]), torch.as_tensor(value))
                       for i, entry in moments.items() for key, value in entry.items()), "nor any state"
    assert skipped > 0 and int(opt.skipped_steps) == skipped


# ------------------------------------------------------------------ checkpoints, refusals
@pytest.mark.parametrize("how", ["state_dict", "deepcopy", "torch_save"])
def test_policy_state_resumes_bitwise_mid_cycle(how):
    def make(params):
        return FusedAccumSGD(params, lr=0.05, momentum=0.9, accumulation_steps=3, clip=ZClip(warmup_steps=4),
                             skip=SpikeSkip(window=6, sigma=2.0))

    stream = list(gradient_stream(10, 3, 40, spike_every=7))
    reference = [p.clone().requires_grad_() for p in initial_params(11)]
    ref_opt = make(reference)
    for micro in stream:
        fused_cycle(ref_opt, reference, micro, [1.0, 2.0, 3.0])
    ours = [p.clone().requires_grad_() for p in initial_params(11)]
    opt = make(ours)
    for micro in stream[:20]:
        fused_cycle(opt, ours, micro, [1.0, 2.0, 3.0])
    fused_cycle(opt, ours, stream[20][:1], [1.0])  # one micro-batch into cycle 21
    if how == "deepcopy":
        opt, ours = copy.deepcopy((opt, ours))
    else:
        saved = opt.state_dict()
        if how == "torch_save":
            buffer = io.BytesIO()
            torch.save(saved, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
        ours = [p.detach().clone().requires_grad_() for p in ours]
        opt = make(ours)
        opt.load_state_dict(saved)
    fused_cycle(opt, ours, stream[20][1:], [2.0, 3.0])
    for micro in stream[21:]:
        fused_cycle(opt, ours, micro, [1.0, 2.0, 3.0])
    assert all(torch.equal(a, b) for a, b in zip(ours, reference))
    assert torch.equal(opt.skipped_steps, ref_opt.skipped_steps)


def test_loading_policy_state_into_an_optimizer_without_it_is_refused():
    params = [p.clone().requires_grad_() for p in initial_params(12)]
    opt = FusedAccumSGD(params, lr=0.1, clip=ZClip())
    for micro in gradient_stream(13, 1, 3):
        fused_cycle(opt, params, micro)
    plain = FusedAccumSGD([p.detach().clone().requires_grad_() for p in params], lr=0.1)
    before = copy.deepcopy(plain.state_dict())
    with pytest.raises(ValueError, match=r"saved with a clip= policy .* pass the same clip="):
        plain.load_state_dict(opt.state_dict())
    assert str(plain.state_dict()) == str(before)
    other = FusedAccumSGD([p.detach().clone().requires_grad_() for p in params], lr=0.1, clip=ZClip(warmup_steps=3))
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(clip=ZClip(), max_grad_norm=1.0), ValueError, "clip= and max_grad_norm= exclude each other"),
    (dict(clip=1.0), TypeError, "clip must be None or a clip policy"),
    (dict(skip="spikes"), TypeError, "skip must be None or gradfuse.SpikeSkip"),
])
def test_bad_policy_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        FusedAccumSGD([torch.zeros(3, requires_grad=True)], lr=0.1, **kwargs)


@pytest.mark.parametrize("make,match", [
    (lambda: ZClip(mode="median"), "mode must be either 'zscore' or 'percentile'"),
    (lambda: ZClip(clip_option="max"), "clip_option must be either 'mean' or 'adaptive_scaling'"),
    (lambda: ZClip(alpha=1.5), "alpha must be in"),
    (lambda: ZClip(warmup_steps=-1), "warmup_steps must be an int"),
    (lambda: ZClip(max_grad_norm=0.0), "invalid max_grad_norm"),
    (lambda: SpikeSkip(window=0), "window must be an int >= 1"),
    (lambda: SpikeSkip(sigma=float("nan")), "sigma must be a number"),
])
def test_bad_policy_configurations(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_step_loss_must_be_one_real_value():
    opt = FusedAccumSGD([torch.zeros(3, requires_grad=True)], lr=0.1, skip=SpikeSkip())
    with pytest.raises(ValueError, match="loss must be a 1-element real tensor"):
        opt.step(loss=torch.ones(2))
    with pytest.raises(TypeError, match="loss must be a number"):
        opt.step(loss="0.5")
    assert opt.micro_step == 0


def test_repr_and_exports():
    assert "ZClip(alpha=0.97" in repr(ZClip()) and "SpikeSkip(window=128, sigma=6.0)" == repr(SpikeSkip())
    assert {"ZClip", "SpikeSkip"} <= set(gradfuse.__all__)


@pytest.mark.skipif(not (torch.cuda.is_available() and gradfuse.cuda_compiled),
                    reason="needs a CUDA device and a CUDA build of gradfuse")
def test_policies_never_synchronize_with_the_host_on_cuda():
    params = [torch.randn(s, dtype=torch.float32, device="cuda") for s in [(257, 33), (5,), (4097,)]]
    opt = FusedAccumAdamW(params, lr=0.01, accumulation_steps=2, clip=ZClip(warmup_steps=2),
                          skip=SpikeSkip(window=4, sigma=2.0), track_param_norms=True)
    g = torch.Generator(device="cuda").manual_seed(0)

    def cycles(n):
        for t in range(2 * n):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, device="cuda") * (50.0 if t % 9 == 8 else 1.0)
            opt.step(loss=torch.rand((), generator=g, device="cuda"))
            opt.zero_grad()

    cycles(3)  # warm-up: state, counters and the policies' device state exist
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cycles(8)
        with pytest.raises(RuntimeError):  # the mode is really active
            torch.zeros((), device="cuda").item()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert int(opt.clip.state["count"]) == 11 and int(opt.skip.state["count"]) == 11
    assert opt.last_param_norms.device.type == "cuda" and bool((opt.last_param_norms > 0).all())
    assert all(bool(torch.isfinite(p).all()) for p in params)


@pytest.mark.skipif(not (torch.cuda.is_available() and gradfuse.cuda_compiled),
                    reason="needs a CUDA device and a CUDA build of gradfuse")
def test_policies_in_a_captured_cuda_graph_match_eager():
    """A whole cycle (K=2) with clip=ZClip, skip=SpikeSkip and step(loss=) captured once and
    replayed: the policies' state advances in place at every replay, as in the eager run."""
    k, warmup, replays = 2, 3, 12
    g = torch.Generator(device="cuda").manual_seed(5)
    shapes = [(257, 33), (5,), (4097,)]
    initial = [torch.randn(s, generator=g, device="cuda") for s in shapes]
    cycles = [[[torch.randn(s, generator=g, device="cuda") * (30.0 if c % 5 == 4 else 1.0) for s in shapes]
               for _ in range(k)] for c in range(warmup + replays)]
    losses = [[torch.rand((), generator=g, device="cuda") for _ in range(k)] for _ in range(warmup + replays)]

    def build():
        params = [t.clone() for t in initial]
        return params, FusedAccumAdamW(params, lr=0.01, accumulation_steps=k, clip=ZClip(warmup_steps=2),
                                       skip=SpikeSkip(window=4, sigma=1.0))

    def run(params, opt, grads, cycle_losses):
        for m in range(k):
            for p, grad in zip(params, grads[m]):
                p.grad = grad.clone()
            opt.step(loss=cycle_losses[m])
            opt.zero_grad()

    e_params, e_opt = build()
    expected = []
    for c in range(warmup + replays):
        run(e_params, e_opt, cycles[c], losses[c])
        expected.append(([p.clone() for p in e_params], e_opt.last_step_skipped.clone()))
    g_params, g_opt = build()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in range(warmup):
            run(g_params, g_opt, cycles[c], losses[c])
    torch.cuda.current_stream().wait_stream(side)
    static_grads = [[torch.zeros(s, device="cuda") for s in shapes] for _ in range(k)]
    static_losses = [torch.zeros((), device="cuda") for _ in range(k)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for m in range(k):
            for p, grad in zip(g_params, static_grads[m]):
                p.grad = grad
            g_opt.step(loss=static_losses[m])
            g_opt.zero_grad()
    skipped_any = False
    for c in range(warmup, warmup + replays):
        for m in range(k):
            for dst, src in zip(static_grads[m], cycles[c][m]):
                dst.copy_(src)
            static_losses[m].copy_(losses[c][m])
        graph.replay()
        torch.cuda.synchronize()
        params, skipped = expected[c]
        assert all(torch.equal(a, b) for a, b in zip(g_params, params)), f"replay of cycle {c}"
        assert torch.equal(g_opt.last_step_skipped, skipped), f"cycle {c}'s skip decision"
        skipped_any |= bool(skipped)
    assert skipped_any, "the stream must make the skip policy skip a replayed cycle"
