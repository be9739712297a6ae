"""Hugging Face transformers.Trainer drives gradfuse (optimizers=(optimizer, scheduler)), a tiny
float64 GPT-2 built from a config (no download), two epochs, a cosine schedule with warmup, in both
arrangements, against Trainer + torch.optim.AdamW + Trainer's own max_grad_norm:
- Trainer accumulates (gradient_accumulation_steps=K), gradfuse at K=1 clips (Trainer's clip off);
- Trainer at 1, gradfuse accumulates K and clips, the scheduler wrapped in gradfuse.PerCycle.
transformers computes the causal-LM loss in float32 even for a float64 model, so where the loss is
scaled differently (the second arrangement divides after backward, Trainer before) the parameters
agree to float32 precision; the first arrangement matches to float64 rounding."""
import tempfile
import warnings

import pytest
import torch
from torch.utils.data import Dataset

transformers = pytest.importorskip("transformers")

import gradfuse  # noqa: E402

K, EPOCHS, ROWS, BATCH, SEQ, VOCAB = 3, 2, 12, 2, 8, 50
HYPER = dict(lr=1e-2, weight_decay=0.01)
MAX_NORM = 1.0


class Tokens(Dataset):
    """Random token rows; the first label is ignored (-100), so Trainer's token count for its
    accumulated loss equals the count of shifted labels the loss uses."""

    def __init__(self):
        self.ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return ROWS

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[0] = -100
        return {"input_ids": self.ids[i], "labels": labels}


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).double()


def train(arrangement):
    model = tiny_gpt2()
    updates = ROWS // BATCH // K * EPOCHS
    if arrangement == "torch":
        opt, accumulate, clip = torch.optim.AdamW(model.parameters(), **HYPER), K, MAX_NORM
    elif arrangement == "trainer_accumulates":
        opt, accumulate, clip = gradfuse.FusedAccumAdamW(model.parameters(), max_grad_norm=MAX_NORM, **HYPER), K, 0.0
    else:
        opt = gradfuse.FusedAccumAdamW(model.parameters(), accumulation_steps=K, max_grad_norm=MAX_NORM, **HYPER)
        accumulate, clip = 1, 0.0
    scheduler = transformers.get_cosine_schedule_with_warmup(opt, 2, updates)
    if arrangement == "gradfuse_accumulates":
        scheduler = gradfuse.PerCycle(scheduler)  # Trainer steps it after every step() call
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=accumulate,
            max_grad_norm=clip, num_train_epochs=EPOCHS, logging_strategy="no", save_strategy="no", report_to=[],
            use_cpu=True, seed=0, disable_tqdm=True)
        transformers.Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, scheduler)).train()
    return model, opt


def test_trainer_accumulates_gradfuse_clips_matches_torch_adamw():
    expected, _ = train("torch")
    model, opt = train("trainer_accumulates")
    assert opt.cycles_completed == ROWS // BATCH // K * EPOCHS
    for p, q in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("every_tensor_in_grad", [False, True])
def test_gradfuse_accumulates_with_per_cycle_scheduler_matches_torch_adamw(monkeypatch, every_tensor_in_grad):
    if every_tensor_in_grad:  # the tiny GPT-2's tensors all keep their running sums in .grad
        monkeypatch.setattr(gradfuse.resident_store, "RESIDENT_MIN_ELEMENTS", 0)
    expected, _ = train("torch")
    model, opt = train("gradfuse_accumulates")
    assert opt.cycles_completed == ROWS // BATCH // K * EPOCHS and opt.micro_step == 0
    moved = max((p - q).abs().max().item() for p, q in zip(expected.parameters(), tiny_gpt2().parameters()))
    assert moved > 1e-3, "training did not move the weights"
    for p, q in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # the float32 loss inside transformers
