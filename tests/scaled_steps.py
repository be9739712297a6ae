"""One micro-batch under torch.amp.GradScaler, on a gradfuse optimizer and on the torch reference
(torch's documented recipe: unscale_ per micro-batch, sum by hand), with the same gradients."""
import torch


def scaled_micro_step(fused, fused_params, fused_scaler, reference, reference_params, reference_scaler, grads, sums):
    """gradfuse: scaler.step/update take the scaled gradients; torch: unscale_, add into sums.
    Returns whether torch saw only finite gradients."""
    for p, g in zip(fused_params, grads):
        p.grad = fused_scaler.scale(g)
    fused_scaler.step(fused)
    fused_scaler.update()
    fused.zero_grad()
    for p, g in zip(reference_params, grads):
        p.grad = reference_scaler.scale(g)
    reference_scaler.unscale_(reference)
    finite = all(bool(torch.isfinite(p.grad).all()) for p in reference_params)
    for total, p in zip(sums, reference_params):
        total.add_(p.grad)
    reference_scaler.update()
    reference.zero_grad()
    return finite
