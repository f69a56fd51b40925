"""Codebooks from data and kept in use: k-means initialisation, usage-EMA replacement, VQ health.

snac's quantizer searches codes by cosine similarity (``VectorQuantize.decode_latents``
normalises both sides). A codebook drawn at random (``nn.Embedding``'s N(0, 1)) points in
directions the encoder's latents may never take, so most codes are never chosen and get no
gradient. :func:`init_codebooks_from_data` instead clusters the directions of real latents,
level by level on each level's actual residual, before the first update. It writes only
``codebook.weight``: checkpoints and SNAC exports are unchanged in form.

:class:`UsageReplacer` is the alternative to :class:`training.model.DeadCodeRestarter`: instead
of "unused for N steps", a code is replaced when its smoothed share of the assignments falls
below a fraction of the uniform share ``1 / codebook_size``.

:class:`VQHealth` accumulates, over a whole validation set, what tells a healthy quantizer from a
collapsed one: distinct codes, normalised perplexity, and the latents' mean fraction
(``||mean_t z_t||^2 / mean_t ||z_t||^2``: 1.0 when every frame is the same vector).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

from ._snac import snac
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .model import DeadCodeRestarter, _distributed, _gather_rows, _quantize_level, pad_to_unit

# A level collapsed when, after warm-up, its validation perplexity is below this ...
COLLAPSE_PERPLEXITY = 2.0
# ... or its latents are this close to one repeated vector (mean fraction above it).
COLLAPSE_MEAN_FRACTION = 0.9


# --------------------------------------------------------------------------------------
# k-means initialisation
# --------------------------------------------------------------------------------------


def kmeans_codebook(rows: Tensor, k: int, iters: int, generator: torch.Generator, noise: float = 0.01) -> Tensor:
    """``k`` code vectors for the cosine search from latents ``rows`` (N, D), float32.

    Spherical k-means: clusters are formed on the L2-normalised rows (the search compares
    directions only), and each code is stored as its cluster's *raw* mean, so codes start at the
    latents' own scale (the codebook loss compares raw vectors). A cluster that ends empty, or
    any code beyond N when there are fewer rows than codes, is a random row plus ``noise`` x the
    rows' RMS, so no two codes tie. Random draws come from ``generator`` (CPU): same rows and
    seed, same codebook. Returns (k, D) on ``rows``' device.
    """
    n, dim = rows.shape
    if n == 0:
        raise ValueError("k-means needs at least one latent vector")
    rows = rows.float()
    dirs = F.normalize(rows, dim=1)
    if n >= k:
        centers = dirs[_kmeans_plus_plus(dirs.cpu(), k, generator).to(rows.device)]
    else:  # every row is a centre; the rest start as noisy copies
        centers = torch.cat([dirs, F.normalize(_random_rows(dirs, k - n, generator, noise), dim=1)])
    for _ in range(iters):
        assign = (dirs @ centers.T).argmax(1)
        sums = torch.zeros(k, dim, device=rows.device).index_add_(0, assign, dirs)
        counts = torch.zeros(k, device=rows.device).index_add_(0, assign, torch.ones(n, device=rows.device))
        empty = counts == 0
        centers = torch.where(empty[:, None], _random_rows(dirs, k, generator, noise), F.normalize(sums, dim=1))
    assign = (dirs @ centers.T).argmax(1)
    sums = torch.zeros(k, dim, device=rows.device).index_add_(0, assign, rows)
    counts = torch.zeros(k, device=rows.device).index_add_(0, assign, torch.ones(n, device=rows.device))
    means = sums / counts.clamp_min(1)[:, None]
    return torch.where((counts == 0)[:, None], _random_rows(rows, k, generator, noise), means)


def _kmeans_plus_plus(dirs: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding on unit vectors (CPU): each next centre is drawn with probability
    proportional to its cosine distance from the nearest centre so far, so centres spread over
    the clusters instead of several starting in one. Returns ``k`` row indices."""
    n = len(dirs)
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    distance = torch.full((n,), float("inf"))
    for _ in range(k - 1):
        distance = torch.minimum(distance, (1 - dirs @ dirs[chosen[-1]]).clamp_min(0))
        total = float(distance.sum())
        weights = distance / total if total > 0 else torch.full((n,), 1.0 / n)
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
    return torch.tensor(chosen)


def _random_rows(rows: Tensor, k: int, generator: torch.Generator, noise: float) -> Tensor:
    """``k`` rows drawn with replacement, each moved by ``noise`` x the rows' RMS."""
    pick = torch.randint(len(rows), (k,), generator=generator).to(rows.device)
    jitter = torch.randn(k, rows.shape[1], generator=generator).to(rows.device)
    return rows[pick] + noise * rows.pow(2).mean().sqrt() * jitter


@torch.no_grad()
def init_codebooks_from_data(model: snac.SNAC, batches: List[Tensor], iters: int = 20, seed: int = 0,
                             standardise: bool = False) -> List[int]:
    """Set every level's codebook by :func:`kmeans_codebook` on that level's latents ``z_e``.

    batches: audio tensors (B, 1, T) at the model's rate, on the model's device. Level by level,
    coarsest first: the latents of level ``i`` come from the residual left by levels ``< i``
    quantized with their *new* codebooks, exactly as training will see them. Under DDP every
    rank passes its own batches; the latents of all ranks are gathered, and rank 0's codebook is
    broadcast, so every rank writes the same one. With ``standardise``, each level's input
    projection is first made to give zero-mean, unit-variance latents (see
    :func:`init_encoder_from_data` for why) and its output projection absorbs the change, so the
    decoder's input is what it was. Returns the number of latents per level.
    """
    generator = torch.Generator().manual_seed(seed)
    residuals = [model.encoder(pad_to_unit(model, audio.float())) for audio in batches]
    counts = []
    for vq in model.quantizer.quantizers:
        pooled = [F.avg_pool1d(r, vq.stride, vq.stride) if vq.stride > 1 else r for r in residuals]
        latents = [vq.in_proj(z) for z in pooled]
        if standardise:
            mean, std = _channel_moments(latents)
            _standardise_conv(vq.in_proj, mean, std)
            _absorb_input_shift(vq.out_proj, mean, std)
            latents = [vq.in_proj(z) for z in pooled]
        rows = _gather_rows(torch.cat([z.transpose(1, 2).reshape(-1, z.shape[1]) for z in latents]).float())
        weight = vq.codebook.weight
        weight.data.copy_(kmeans_codebook(rows, weight.shape[0], iters, generator).to(weight.dtype))
        if _distributed():
            dist.broadcast(weight.data, src=0)
        counts.append(len(rows))
        residuals = [r - _quantize_level(vq, r)[0] for r in residuals]
    return counts


# --------------------------------------------------------------------------------------
# Data-dependent scale (weight normalisation's initialisation)
# --------------------------------------------------------------------------------------


def _channel_moments(outputs: List[Tensor]) -> "tuple[Tensor, Tensor]":
    """Per-channel mean and standard deviation of ``outputs`` (each (B, C, T)) over every batch,
    frame and rank (sums all-reduced under DDP, so every rank computes the same numbers)."""
    c = outputs[0].shape[1]
    sums = torch.zeros(3, c, dtype=torch.float64, device=outputs[0].device)
    for y in outputs:
        y = y.double().transpose(0, 1).reshape(c, -1)
        sums[0] += y.shape[1]
        sums[1] += y.sum(1)
        sums[2] += y.pow(2).sum(1)
    if _distributed():
        dist.all_reduce(sums)
    mean = sums[1] / sums[0]
    var = (sums[2] / sums[0] - mean.pow(2)).clamp_min(0)
    return mean.float(), var.sqrt().float()


def _standardise_conv(conv: torch.nn.Conv1d, mean: Tensor, std: Tensor) -> None:
    """Rescale ``conv`` (weight-normalised or plain) so the output channel whose data moments are
    ``mean``/``std`` becomes zero-mean, unit-variance: w <- w / std, b <- (b - mean) / std."""
    scale = 1.0 / std.clamp_min(1e-8)
    _set_weight(conv, conv.weight.detach() * scale[:, None, None])  # the effective weight g * v / |v|
    if conv.bias is not None:
        conv.bias.data.copy_((conv.bias - mean) * scale)


def _set_weight(conv: torch.nn.Conv1d, weight: Tensor) -> None:
    """Give ``conv`` the effective ``weight``, writing into its existing parameter tensors.

    Under weight norm the parametrisation's own ``right_inverse`` splits ``weight`` into its
    stored parts (g = |w|, v = w), copied in place. Assigning ``conv.weight`` instead would swap
    the parameters' storage (``set_``), and a DistributedDataParallel wrapper built before this
    initialisation would then wait forever for those parameters' gradients."""
    parametrizations = getattr(conv, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        chain = parametrizations["weight"]
        parts = chain[0].right_inverse(weight)
        parts = parts if isinstance(parts, (tuple, list)) else (parts,)
        for i, part in enumerate(parts):
            getattr(chain, f"original{i}").data.copy_(part)
    else:
        conv.weight.data.copy_(weight)


def _absorb_input_shift(conv: torch.nn.Conv1d, mean: Tensor, std: Tensor) -> None:
    """Make ``conv`` (a 1x1 projection) give the same output for inputs standardised with
    ``mean``/``std`` as it gave for the raw ones: w <- w * std (per input channel), b <- b + w @ mean."""
    weight = conv.weight.detach()
    if conv.bias is not None:
        conv.bias.data.add_(weight[..., 0] @ mean)
    _set_weight(conv, weight * std[None, :, None])


def _encoder_convs(model: snac.SNAC) -> List[torch.nn.Conv1d]:
    """The encoder's convolutions in forward order (snac registers them in the order it runs them)."""
    return [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv1d)]


@torch.no_grad()
def init_encoder_from_data(model: snac.SNAC, batches: List[Tensor]) -> int:
    """Weight normalisation's data-dependent initialisation (Salimans & Kingma 2016) of the encoder.

    Convolution by convolution in forward order, each output channel is made zero-mean and
    unit-variance on ``batches`` (audio (B_i, 1, T) at the model's rate, one T for all), the
    earlier ones already rescaled. Why: at PyTorch's initialisation the encoder's activations
    shrink layer after layer (the tiny preset's output RMS is ~0.004), while Adam moves every bias
    by about the learning rate each step. Within ten warm-up steps at lr 1e-3 those biases put a
    common offset on every frame far larger than the frames' spread, every latent points the same
    way (mean fraction 0.97), and the cosine code search sends every frame to one or two codes. At
    unit scale the same steps are a small relative change. Under DDP the moments are summed over
    ranks, so every rank writes the same weights. Returns the number of convolutions set.
    """
    convs = _encoder_convs(model)
    sizes = [len(audio) for audio in batches]

    def standardise(conv: torch.nn.Conv1d, inputs, output: Tensor) -> Tensor:
        # Runs as the forward pass reaches ``conv``: everything before it is already rescaled,
        # so its output here is exactly what a pass over the rescaled encoder would give it.
        _standardise_conv(conv, *_channel_moments(list(output.split(sizes))))
        return conv._conv_forward(inputs[0], conv.weight, conv.bias)  # what the layers after it now see

    # One pass over all batches at once, each convolution standardised as the pass reaches it:
    # the same weights as one pass per batch and convolution (30 convolutions in the tiny
    # preset), up to float rounding (a convolution over the batches together may round its last
    # bit differently; measured: at most 6e-8 on 16 batches of 4). It holds one no-grad forward
    # of all the batches together, less than a training step needs: 24 kHz preset on CPU, 16
    # batches of 2 x 0.8 s: 0.8 GB peak, against 2.2 GB for the generator's forward and backward
    # on one such batch.
    handles = [conv.register_forward_hook(standardise) for conv in convs]
    try:
        model.encoder(torch.cat([pad_to_unit(model, audio.float()) for audio in batches]))
    finally:
        for handle in handles:
            handle.remove()
    return len(convs)


# --------------------------------------------------------------------------------------
# Usage-EMA replacement
# --------------------------------------------------------------------------------------


class UsageReplacer(DeadCodeRestarter):
    """Replace codes whose smoothed usage share is below ``threshold / codebook_size``.

    Every step, on the device (no host sync), each level's share of assignments per code is
    folded into an exponential moving average (``decay`` per step, bias-corrected as Adam does,
    so the first checks already see a proper average). At every ``every``-th step the shares are
    averaged over ranks, and the codes under the threshold get new vectors from the latents seen
    since the last check, exactly as :class:`DeadCodeRestarter` re-seeds them (distinct
    candidates, a little noise, the same draws on every rank). A replaced code restarts at the
    uniform share, so it has a fair chance to be chosen before it is judged again.
    """

    def __init__(self, model: snac.SNAC, threshold: float = 0.1, decay: float = 0.99, every: int = 25,
                 seed: int = 0, noise: float = 0.01, max_fraction: float = 1.0):
        if not 0 < decay < 1 or threshold <= 0:
            raise ValueError(f"decay must be in (0, 1) and threshold > 0, got {decay} and {threshold}")
        super().__init__(model, threshold=1, every=every, seed=seed, noise=noise, max_fraction=max_fraction)
        self.share_threshold, self.decay = float(threshold), float(decay)
        size = model.codebook_size
        self.usage = [torch.zeros(size, device=t.device) for t in self.last_used]
        self.observed = 0  # steps folded into the averages (host int: bias correction)

    def step(self, step: int, codes: List[Tensor], latents: List[Tensor]) -> List[int]:
        self.observed += 1
        for level, c in enumerate(codes):
            flat = c.reshape(-1).to(self.usage[level].device)
            counts = torch.zeros_like(self.usage[level]).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
            share = counts / counts.sum().clamp_min(1.0)
            self.usage[level].mul_(self.decay).add_(share, alpha=1 - self.decay)
        return super().step(step, codes, latents)

    def _dead_codes(self, level: int, step: int) -> Tensor:
        usage = self.usage[level]
        if _distributed():
            dist.all_reduce(usage)
            usage.div_(dist.get_world_size())
        corrected = usage / (1 - self.decay ** self.observed)
        return (corrected < self.share_threshold / len(usage)).nonzero().squeeze(1)

    def _mark_replaced(self, level: int, codes: Tensor, step: int) -> None:
        super()._mark_replaced(level, codes, step)
        self.usage[level][codes] = (1 - self.decay ** self.observed) / len(self.usage[level])

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "usage": [t.detach().cpu().clone() for t in self.usage],
                "observed": self.observed}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        device = self.usage[0].device
        self.usage = [t.to(device=device, dtype=torch.float32).clone() for t in state["usage"]]
        self.observed = int(state["observed"])


def build_replacer(model: snac.SNAC, rule: Optional[str], *, dead_code_steps: int, every: int, threshold: float,
                   decay: float, seed: int, max_fraction: float = 1.0) -> Optional[DeadCodeRestarter]:
    """The code-replacement rule ``rule`` (``restart``, ``usage``, or None for none) for ``model``."""
    if rule == "usage":
        return UsageReplacer(model, threshold=threshold, decay=decay, every=every, seed=seed, max_fraction=max_fraction)
    if rule == "restart" and dead_code_steps > 0:
        return DeadCodeRestarter(model, dead_code_steps, every, seed=seed, max_fraction=max_fraction)
    return None


# --------------------------------------------------------------------------------------
# VQ health
# --------------------------------------------------------------------------------------


class VQHealth:
    """Per-level statistics over a whole evaluation: feed every batch's codes and latents."""

    def __init__(self, codebook_size: int):
        self.size = codebook_size
        self.counts: List[Tensor] = []
        self.sum_z: List[Tensor] = []
        self.sum_sq: List[Tensor] = []
        self.frames: List[int] = []

    def add(self, codes: Iterable[Tensor], latents: Iterable[Tensor]) -> None:
        """codes: per level (B, T_i) int64; latents: per level (B, D, T_i) projected z_e."""
        for level, (c, z) in enumerate(zip(codes, latents)):
            flat = c.reshape(-1).cpu()
            rows = z.detach().float().transpose(1, 2).reshape(-1, z.shape[1]).cpu()
            counts = torch.zeros(self.size).scatter_add_(0, flat, torch.ones(len(flat)))
            if level == len(self.counts):
                self.counts.append(counts)
                self.sum_z.append(rows.sum(0))
                self.sum_sq.append(rows.pow(2).sum())
                self.frames.append(len(rows))
            else:
                self.counts[level] += counts
                self.sum_z[level] += rows.sum(0)
                self.sum_sq[level] += rows.pow(2).sum()
                self.frames[level] += len(rows)

    def summary(self, prefix: str = "val/") -> Dict[str, float]:
        """``{prefix}codebook_distinct_levelN`` (codes used at least once), ``..._entropy_levelN``
        (perplexity / codebook size, 1.0 = uniform use) and ``latent_mean_fraction_levelN``."""
        out: Dict[str, float] = {}
        for level, counts in enumerate(self.counts):
            probs = counts / counts.sum().clamp_min(1.0)
            perplexity = float(torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum()))
            n = max(self.frames[level], 1)
            mean_sq = float(self.sum_sq[level]) / n
            out[f"{prefix}codebook_distinct_level{level}"] = float((counts > 0).sum())
            out[f"{prefix}codebook_entropy_level{level}"] = perplexity / self.size
            out[f"{prefix}latent_mean_fraction_level{level}"] = \
                float((self.sum_z[level] / n).pow(2).sum()) / mean_sq if mean_sq > 0 else 1.0
        return out


def mean_fraction(z: Tensor) -> float:
    """``||mean_t z_t||^2 / mean_t ||z_t||^2`` of latents ``z`` (B, D, T), over all B x T frames."""
    rows = z.detach().float().transpose(1, 2).reshape(-1, z.shape[1])
    mean_sq = float(rows.pow(2).sum(1).mean())
    return float(rows.mean(0).pow(2).sum()) / mean_sq if mean_sq > 0 else 1.0


def collapse_warnings(result: Dict[str, float], perplexity_key: str = "val/codebook_perplexity_level{}",
                      fraction_key: str = "val/latent_mean_fraction_level{}") -> List[str]:
    """One line per collapsed level of an evaluation ``result`` (empty when every level is healthy)."""
    lines, level = [], 0
    while perplexity_key.format(level) in result:
        perplexity = result[perplexity_key.format(level)]
        fraction = result.get(fraction_key.format(level), 0.0)
        if perplexity < COLLAPSE_PERPLEXITY or fraction > COLLAPSE_MEAN_FRACTION:
            lines.append(f"level {level} has collapsed: validation perplexity {perplexity:.2f}, latent mean "
                         f"fraction {fraction:.2f} (healthy: perplexity >= {COLLAPSE_PERPLEXITY:g}, fraction <= "
                         f"{COLLAPSE_MEAN_FRACTION:g}); see TRAINING_GUIDE.md#collapse")
        level += 1
    return lines
