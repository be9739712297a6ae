"""PyTorch Lightning drives FusedAccumSGD: configure_optimizers returns it, Lightning calls step()
on every batch and gradfuse accumulates K of them and clips. The parameters must equal a
hand-written loop's over the same batches, bit for bit (float64 model)."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")

from gradfuse import FusedAccumSGD, PerCycle, resident_store  # noqa: E402
from problems import BATCH, BATCHES, make_client_problem as make_problem  # noqa: E402
from problems import CLIENT_OPT as OPT  # noqa: E402
from tolerances import assert_bitwise  # noqa: E402



def batches(data):
    x, y = data
    return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)]


class Module(L.LightningModule):
    def __init__(self, net, opt_kwargs):
        super().__init__()
        self.net, self.opt_kwargs, self.opt = net, opt_kwargs, None

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        self.opt = FusedAccumSGD(self.net.parameters(), **self.opt_kwargs)
        return self.opt


def fit(net, data, opt_kwargs, epochs=1, **trainer_kwargs):
    """Trains a copy of net with Lightning; returns the module and the trainer."""
    return fit_module(Module(copy.deepcopy(net), opt_kwargs), data, epochs, **trainer_kwargs)


def fit_module(module, data, epochs=1, **trainer_kwargs):
    trainer_kwargs = dict(dict(accelerator="cpu", devices=1), **trainer_kwargs)
    trainer = L.Trainer(max_epochs=epochs, enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, **trainer_kwargs)
    loader = DataLoader(TensorDataset(*data), batch_size=BATCH, shuffle=False)
    with warnings.catch_warnings():
        # Tiny in-memory data needs no workers; LeafSpec: Lightning's own use of a newer torch's API.
        warnings.filterwarnings("ignore", message=".*(num_workers|bottleneck|LeafSpec).*")
        trainer.fit(module, loader)
    return module, trainer


def plain_loop(net, data, opt_kwargs, epochs=1, per_step=1, clip_val=None):
    """The hand-written loop: per_step backward passes of loss / per_step, an optional
    clip_grad_norm_, then opt.step(); opt.zero_grad() (Lightning's order of the same calls)."""
    net = copy.deepcopy(net)
    opt = FusedAccumSGD(net.parameters(), **opt_kwargs)
    for _ in range(epochs):
        for i, (x, y) in enumerate(batches(data)):
            (nn.functional.mse_loss(net(x), y) / per_step).backward()
            if (i + 1) % per_step == 0:
                if clip_val is not None:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), clip_val)
                opt.step()
                opt.zero_grad()
    return net, opt


def assert_same_params(a, b, msg):
    for i, (p, q) in enumerate(zip(a.parameters(), b.parameters())):
        assert_bitwise(p, q, f"{msg}: parameter {i}")


@pytest.mark.parametrize("k, epochs", [(1, 1), (3, 1), (5, 2)])
def test_lightning_matches_plain_loop(gen, k, epochs):
    # (5, 2): 24 batches, cycles run across the epoch boundary (gradfuse does not see epochs).
    net, data = make_problem(gen)
    kwargs = dict(OPT, accumulation_steps=k)
    module, trainer = fit(net, data, kwargs, epochs=epochs)
    ref, ref_opt = plain_loop(net, data, kwargs, epochs=epochs)
    assert_same_params(module.net, ref, f"Lightning K={k}")
    assert module.opt.micro_step == ref_opt.micro_step == (BATCHES * epochs) % k
    assert float(ref_opt.last_grad_norm) > OPT["max_grad_norm"], "clipping was meant to be active"
    assert not torch.equal(module.net[0].weight, net[0].weight), "training did not move the weights"
    # Lightning counts every step() call, so global_step (and max_steps) counts micro-batches.
    assert trainer.global_step == BATCHES * epochs


def test_lightning_flat_buffers_matches_plain_loop_and_default_mode(gen):
    net, data = make_problem(gen)
    kwargs = dict(OPT, accumulation_steps=3, flat_buffers=True)
    module, _ = fit(net, data, kwargs)
    ref, _ = plain_loop(net, data, kwargs)
    assert_same_params(module.net, ref, "Lightning, flat_buffers=True")
    default, _ = plain_loop(net, data, dict(OPT, accumulation_steps=3))
    for p, q in zip(module.net.parameters(), default.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert not torch.equal(module.net[0].weight, net[0].weight), "training did not move the weights"


def test_lightning_accumulate_grad_batches_with_k1(gen):
    # accumulate_grad_batches=N with accumulation_steps=1: one update per N batches whose
    # gradient is Lightning's mean of the N, clipped by gradfuse; bitwise the plain loop's.
    n = 3
    net, data = make_problem(gen)
    kwargs = dict(OPT, accumulation_steps=1)
    module, trainer = fit(net, data, kwargs, accumulate_grad_batches=n)
    ref, _ = plain_loop(net, data, kwargs, per_step=n)
    assert_same_params(module.net, ref, f"accumulate_grad_batches={n}")
    assert trainer.global_step == BATCHES // n
    # The same update as gradfuse alone with accumulation_steps=N (summed in another order).
    alone, _ = plain_loop(net, data, dict(OPT, accumulation_steps=n))
    for p, q in zip(module.net.parameters(), alone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_lightning_accumulate_grad_batches_with_k_above_1_multiplies(gen):
    # Lightning's N batches make one micro-batch for gradfuse: an update per N*K batches, the
    # clipped mean of all of them (gradfuse alone with accumulation_steps=N*K, summed in another order).
    n, k = 2, 3
    net, data = make_problem(gen)
    module, trainer = fit(net, data, dict(OPT, accumulation_steps=k), accumulate_grad_batches=n)
    alone, _ = plain_loop(net, data, dict(OPT, accumulation_steps=n * k))
    for p, q in zip(module.net.parameters(), alone.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    assert not torch.equal(module.net[0].weight, net[0].weight), "training did not move the weights"


def test_lightning_gradient_clip_val_with_k1(gen):
    # K=1: Lightning clips .grad to gradient_clip_val, then gradfuse clips that to max_grad_norm.
    clip_val = 0.3
    net, data = make_problem(gen)
    kwargs = dict(OPT, accumulation_steps=1)
    module, _ = fit(net, data, kwargs, gradient_clip_val=clip_val)
    ref, ref_opt = plain_loop(net, data, kwargs, clip_val=clip_val)
    assert_same_params(module.net, ref, "gradient_clip_val with K=1")
    assert float(module.opt.last_grad_norm) <= clip_val * (1 + 1e-9), "gradfuse saw the unclipped gradient"


def test_lightning_gradient_clip_val_with_k_above_1_clips_each_micro_batch(gen):
    # Alone, Lightning's clip acts on each micro-batch's gradient before step(); gradfuse then
    # clips the cycle's mean: bitwise the plain loop that calls clip_grad_norm_ before every step().
    net, data = make_problem(gen)
    kwargs = dict(OPT, accumulation_steps=3)
    module, _ = fit(net, data, kwargs, gradient_clip_val=0.3)
    ref, _ = plain_loop(net, data, kwargs, clip_val=0.3)
    assert_same_params(module.net, ref, "gradient_clip_val with K=3")


@pytest.mark.parametrize("clip_val", [None, 0.3])
def test_lightning_with_sums_in_grad(gen, monkeypatch, clip_val):
    # Every tensor keeps its running sum in .grad: Lightning's zero_grad (before each closure) leaves
    # it; its clip, seen at the first micro-batch, keeps the sums apart. Bitwise sum_in_grad=False.
    monkeypatch.setattr(resident_store, "RESIDENT_MIN_ELEMENTS", 0)
    net, data = make_problem(gen)
    kwargs = dict(OPT, accumulation_steps=3)
    clip = {} if clip_val is None else dict(gradient_clip_val=clip_val)
    module, _ = fit(net, data, kwargs, **clip)
    apart, _ = fit(net, data, dict(kwargs, sum_in_grad=False), **clip)
    assert_same_params(module.net, apart.net, f"sum_in_grad, gradient_clip_val={clip_val}")
    assert module.opt._store.apart == (clip_val is not None)


def test_lightning_ddp_gradient_clip_val_with_k_above_1_raises(gen):
    # Two CPU ranks (gloo); the child's error comes back as torch's ProcessRaisedException.
    net, data = make_problem(gen)
    # Under DDP the last micro-batch's .grad is the cycle's running sum: Lightning's clip would clip
    # the sum, so gradfuse refuses it, naming the fix.
    with pytest.raises(Exception, match="clip with max_grad_norm="):
        fit(net, data, dict(OPT, accumulation_steps=3), gradient_clip_val=0.3, devices=2, strategy="ddp_spawn")


class ScheduledModule(Module):
    """configure_optimizers with a StepLR stepped by Lightning after every step() ("interval":
    "step"), wrapped in gradfuse.PerCycle so that it advances once per update."""

    def configure_optimizers(self):
        self.opt = FusedAccumSGD(self.net.parameters(), **self.opt_kwargs)
        scheduler = PerCycle(torch.optim.lr_scheduler.StepLR(self.opt, step_size=1, gamma=0.5))
        return {"optimizer": self.opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_lightning_step_interval_scheduler_advances_once_per_update(gen):
    k = 3
    net, data = make_problem(gen)
    kwargs = dict(OPT, accumulation_steps=k)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*inside an accumulation cycle.*")
        module, _ = fit_module(ScheduledModule(copy.deepcopy(net), kwargs), data)
    ref = copy.deepcopy(net)  # the plain loop, the scheduler stepped once per update
    opt = FusedAccumSGD(ref.parameters(), **kwargs)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for x, y in batches(data):
        nn.functional.mse_loss(ref(x), y).backward()
        opt.step()
        opt.zero_grad()
        if opt.micro_step == 0:
            scheduler.step()
    assert_same_params(module.net, ref, "Lightning interval='step' scheduler through PerCycle")
    assert module.opt.param_groups[0]["lr"] == OPT["lr"] * 0.5 ** (BATCHES // k)
