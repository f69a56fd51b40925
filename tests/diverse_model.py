"""A code-diverse tiny SNAC model for tests whose claim is "the codes are exactly snac's".

A randomly initialised encoder puts all latents of a signal in a narrow cone, so the cosine
nearest-code search picks a handful of codes and a small latent error rarely changes a code: a
windowing or batching bug would go unseen. :func:`whiten_quantizer_inputs` folds a whitening
transform into each quantizer's input projection (level by level, on the actual residuals of a
given signal), which spreads the latents over the sphere: most codes are used and a code changes
when its latent is wrong.
"""

import snac
import torch


@torch.no_grad()
def whiten_quantizer_inputs(model: snac.SNAC, x: torch.Tensor) -> None:
    """Re-parametrize ``model``'s quantizer input projections in place; ``x``: (1, 1, T) audio."""
    residual = model.encoder(model.preprocess(x))
    for vq in model.quantizer.quantizers:
        pooled = torch.nn.functional.avg_pool1d(residual, vq.stride, vq.stride)
        z_e = vq.in_proj(pooled)[0]  # (codebook_dim, frames)
        mean = z_e.mean(1)
        evals, evecs = torch.linalg.eigh(torch.cov(z_e.double()))
        w = (evecs @ torch.diag(evals.rsqrt()) @ evecs.T).float()
        weight = vq.in_proj.weight.detach()  # (codebook_dim, channels, 1), weight norm applied
        vq.in_proj.weight = (w @ weight[:, :, 0])[:, :, None]  # weight norm's right inverse re-splits it
        vq.in_proj.bias.copy_(w @ (vq.in_proj.bias - mean))
        z_q, _ = vq(residual)
        residual = residual - z_q


def distinct_codes(codes) -> list:
    """Number of different codes per level."""
    return [len(torch.unique(c)) for c in codes]
