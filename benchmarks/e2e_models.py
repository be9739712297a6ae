"""The models of the end-to-end training rows (benchmarks/e2e_cases.py), with their inputs and loss.

* linear8:  8 x nn.Linear(4096, 4096) fp32 (134M parameters, 16 tensors; --quick: 4 layers, the same
            ratio of optimizer to forward/backward work at half the time) at batch 4: forward and
            backward are matrix-vector work (each weight read about three times per micro-batch), so
            the optimizer's passes over parameters, gradients and momentum are a large share of a step.
* gpt2blk:  GPT-2-small-shaped transformer blocks (d=768, 12 heads, MLP 3072, pre-LayerNorm, causal
            attention; 12 tensors and 7.1M parameters per block): 4 blocks on 64 tokens (--quick: 2 on 16).
* tiny2000: 1000 residual nn.Linear(16, 16) + tanh layers (scaled by 1/sqrt(1000)): 2000 tensors of 256 and 16 elements,
            where per-tensor costs (autograd's and the optimizer's) dominate.

Every loss is a plain sum of squares; the torch loop divides it by K, gradfuse does not (it averages).
"""
import torch
import torch.nn.functional as F
from torch import nn


class GPT2Block(nn.Module):
    """One GPT-2 small block (nn.Linear in place of HF's Conv1D: same shapes, transposed)."""

    def __init__(self, d=768, heads=12):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.c_attn(self.ln_1(x)).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class TinyStack(nn.Module):
    """Residual stack of tiny Linear layers: two small parameter tensors per layer."""

    def __init__(self, layers=1000, width=16):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.step = layers ** -0.5  # keeps the residual stream, and so the gradient norm, O(1) at any depth

    def forward(self, x):
        for layer in self.layers:
            x = x + self.step * torch.tanh(layer(x))
        return x


def _linear8(quick):
    return nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(4 if quick else 8)])


# name -> (builder(quick), input shape(quick), what the row says)
MODELS = {
    "linear8": (_linear8, lambda quick: (4, 4096), "8 x Linear(4096, 4096) (quick: 4), batch 4"),
    "gpt2blk": (lambda quick: nn.Sequential(*[GPT2Block() for _ in range(2 if quick else 4)]),
                lambda quick: (1, 16 if quick else 64, 768),
                "GPT-2 small blocks (4; quick: 2), batch 1 x 64 tokens (quick: 16)"),
    "tiny2000": (lambda quick: TinyStack(), lambda quick: (4, 16), "1000 x residual Linear(16, 16), batch 4"),
}


def build(name, quick, device, seed=0):
    """The model (seeded, so every mode starts from the same weights) and its description."""
    builder, _, what = MODELS[name]
    if str(device) == "meta":  # shapes only: no initialiser runs
        with torch.device("meta"):
            return builder(quick), what
    torch.manual_seed(seed)
    return builder(quick).to(device), what


def inputs(name, quick, device, K, seed=1):
    """K micro-batch inputs, the same for every mode."""
    shape = MODELS[name][1](quick)
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(device) for _ in range(K)]


def loss_of(model, x):
    return model(x).square().sum()  # a sum, not a mean: the gradient norm then exceeds max_norm, so clipping acts
