"""Parameter shape lists for the benchmarked workloads.

* sweep:    one big tensor of n elements (CPU 1M..64M, --quick 1M..16M; GPU 1M..512M).
* gpt2:     GPT-2 small (HF naming): wte 50257x768, wpe 1024x768, 12 blocks of
            ln_1 w/b, attn.c_attn 768x2304 + 2304, attn.c_proj 768x768 + 768, ln_2 w/b,
            mlp.c_fc 768x3072 + 3072, mlp.c_proj 3072x768 + 768, then ln_f w/b:
            148 tensors, 124,439,808 parameters (asserted below).
* resnet50: torchvision's resnet50 generated programmatically without torchvision:
            conv1 7x7 + bn1, four stages of [3, 4, 6, 3] bottlenecks (1x1, 3x3, 1x1 convs
            with widths 64/128/256/512, expansion 4, each conv followed by a BN weight + bias;
            the first block of each stage has a 1x1 downsample conv + BN), fc 1000x2048 + 1000:
            161 tensors, 25,557,032 parameters (asserted below).
* tiny2000: 2000 tensors of 64..512 elements (seeded), launch / per-tensor-overhead bound.
* small6:   a 3-layer MLP's 6 tensors (128 -> 256 -> 128 -> 10), host-overhead bound.
"""
import random

GPT2_PARAMS, GPT2_TENSORS = 124_439_808, 148
RESNET50_PARAMS, RESNET50_TENSORS = 25_557_032, 161


def gpt2_small_shapes():
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,),                 # ln_1
                   (d, 3 * d), (3 * d,),       # attn.c_attn (Conv1D: in x out)
                   (d, d), (d,),               # attn.c_proj
                   (d,), (d,),                 # ln_2
                   (d, 4 * d), (4 * d,),       # mlp.c_fc
                   (4 * d, d), (d,)]           # mlp.c_proj
    shapes += [(d,), (d,)]                     # ln_f
    return shapes


def resnet50_shapes():
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        out_ch = width * 4
        for b in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (out_ch, width, 1, 1), (out_ch,), (out_ch,)]
            if b == 0:
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    shapes += [(1000, 2048), (1000,)]
    return shapes


def tiny_shapes(count=2000, low=64, high=512, seed=0):
    rng = random.Random(seed)
    return [(rng.randint(low, high),) for _ in range(count)]


def small6_shapes():
    return [(256, 128), (256,), (128, 256), (128,), (10, 128), (10,)]


def numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def total_params(shapes):
    return sum(numel(s) for s in shapes)


def _check():
    g, r = gpt2_small_shapes(), resnet50_shapes()
    assert (len(g), total_params(g)) == (GPT2_TENSORS, GPT2_PARAMS), (len(g), total_params(g))
    assert (len(r), total_params(r)) == (RESNET50_TENSORS, RESNET50_PARAMS), (len(r), total_params(r))


_check()

def tiny64_shapes():
    """2000 tensors of 64 elements: the shape of the tiny-tensor goal as the issue states it."""
    return [(64,)] * 2000


NAMED = {"gpt2": gpt2_small_shapes, "resnet50": resnet50_shapes, "tiny2000": tiny_shapes, "tiny64": tiny64_shapes,
         "small6": small6_shapes}


def sweep_sizes(device, quick):
    if device == "cuda":
        return [1 << p for p in range(20, 30)] if not quick else [1 << 20, 1 << 24, 1 << 26, 1 << 28]
    return [1 << p for p in range(20, 27)] if not quick else [1 << 20, 1 << 22, 1 << 24]
