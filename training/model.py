"""The SNAC generator for training: a forward pass that trains the codebooks, and dead-code restart.
(Loading generators and exporting them to the SNAC format live in :mod:`training.hub`.)

``snac.SNAC.forward`` returns ``(audio, codes)`` only: its quantizer's straight-through estimator
passes gradients to the encoder but none to the codebook, and it computes no commitment loss. So a
trainer that calls ``model(audio)`` never updates the codebooks. :func:`train_forward` runs the same
modules step by step and adds, per quantizer level (after the stride average-pool and ``in_proj``)::

    commitment = mse(z_e, z_q.detach())   # pulls the encoder towards its code
    codebook   = mse(z_q, z_e.detach())   # pulls the code towards the encoder output

(means over batch, channel and time; summed over levels). The nearest-code search is snac's own
(``VectorQuantize.decode_latents``, on L2-normalized vectors), so codes equal ``SNAC.encode``'s.

Under bf16 autocast the encoder, the code search and the decoder's output conv + tanh run in fp32:
the codes stay those of fp32 ``SNAC.encode`` (a bf16 encoder moves a few percent of the codes to a
neighbour) and the waveform keeps more than bf16's 8 mantissa bits (bf16 rounding of a speech
waveform alone costs ~0.13 of the mel loss, 8x what 16-bit PCM costs). The decoder body, most
of the generator's FLOPs, follows autocast.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from ._snac import snac
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig


class TrainOutput(NamedTuple):
    """Result of :func:`train_forward`.

    audio:            (B, 1, T) reconstruction, trimmed to the input length T.
    codes:            per level, (B, T_i) int64 code indices (coarsest level first).
    commitment_loss:  scalar, summed over levels.
    codebook_loss:    scalar, summed over levels.
    codebook_usage:   (n_levels,) fraction of each codebook used in this batch.
    codebook_perplexity: (n_levels,) exp(entropy) of each level's code histogram in this batch.
    latents:          per level, (B, codebook_dim, T_i) detached projected encoder outputs z_e
                      (what dead-code restart re-seeds codes from).
    """

    audio: Tensor
    codes: List[Tensor]
    commitment_loss: Tensor
    codebook_loss: Tensor
    codebook_usage: Tensor
    codebook_perplexity: Tensor
    latents: List[Tensor]


GENERATOR_INITS = ("dac", "dac+transposed", "snac")


def build_generator(cfg: ModelConfig, init: Optional[str] = "dac") -> snac.SNAC:
    """A freshly initialised ``snac.SNAC`` for ``cfg`` (its Snake activations swapped for
    :class:`Snake`, same math and state_dict keys), initialised by :func:`init_generator`.

    ``init=None`` skips the initialisation: for callers that load every weight right after.
    """
    model = use_dtype_following_snake(snac.SNAC(**cfg.snac_kwargs()))
    if init is not None:
        init_generator(model, init)
    return model


def init_generator(model: torch.nn.Module, init: str = "dac") -> torch.nn.Module:
    """Initialise a from-scratch generator in place; returns ``model``.

    * ``dac`` (the default): every ``Conv1d`` bias is zero, as DAC's ``init_weights`` leaves it.
    * ``dac+transposed``: the ``ConvTranspose1d`` biases too (DAC's ``isinstance(m, nn.Conv1d)``
      misses those). Measured: a lower mel distance when overfitting one clip, but ~30x larger
      generator gradients at a high learning rate, and a collapsed demo run (TRAINING_GUIDE.md).
    * ``snac``: PyTorch's default initialisation, which ``snac.SNAC()`` keeps.

    Why: PyTorch draws conv biases uniformly in +-1/sqrt(fan_in). Through snac's encoder those
    offsets add up to a per-channel constant that dominates the signal (the tiny and 24 kHz
    encoders' output is ~97 % its mean over time at step 0), so the cosine code search sees one
    direction and sends every frame to one or two codes before training starts, and the codebook
    loss then locks that collapse in. Zero biases leave only the input-dependent part.

    DAC also draws the conv weights from a truncated normal (std 0.02), but under weight norm that
    draw does not survive: the weight is recomputed from its magnitude ``g`` and direction ``v``
    (set from PyTorch's default weights when weight norm was applied), so writing ``weight``
    afterwards changes nothing. The biases are the only part of DAC's init that reaches training;
    the weights here stay weight-normed default draws, as in DAC in practice.

    Never call this on loaded weights (a checkpoint, ``init_from`` or a hub model).
    """
    if init not in GENERATOR_INITS:
        raise ValueError(f"generator init must be one of {', '.join(GENERATOR_INITS)}, got {init!r}")
    if init == "snac":
        return model
    kinds = (torch.nn.Conv1d, torch.nn.ConvTranspose1d) if init == "dac+transposed" else (torch.nn.Conv1d,)
    with torch.no_grad():
        for module in model.modules():
            # ConvTranspose1d is not a Conv1d subclass: DAC's isinstance(m, nn.Conv1d) skips it.
            # (Weight norm's parametrisation subclasses each conv's class, so test isinstance.)
            if isinstance(module, kinds) and module.bias is not None:
                module.bias.zero_()
    return model


class Snake(torch.nn.Module):
    """snac's ``Snake1d`` (``x + sin(alpha x)^2 / (alpha + 1e-9)``) computed in ``x``'s dtype.

    snac's version multiplies a bf16 activation by its fp32 ``alpha``, which promotes the whole
    activation to fp32 under autocast: twice the memory traffic in a memory-bound network and a
    cast back before every conv. Here ``alpha`` is cast to the activation's dtype instead; in fp32
    the operations and their order are snac's, so the outputs are identical. The parameter keeps
    the name ``alpha`` and shape (1, C, 1), so state dicts load in ``snac.SNAC`` unchanged.
    """

    def __init__(self, alpha: torch.nn.Parameter):
        super().__init__()
        self.alpha = alpha

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, T) -> (B, C, T), same dtype."""
        alpha = self.alpha.to(x.dtype)
        return x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)


def use_dtype_following_snake(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``snac.layers.Snake1d`` in ``model`` by :class:`Snake` sharing its ``alpha``."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, snac.layers.Snake1d):
                setattr(parent, name, Snake(child.alpha))
    return model


def check_audio(audio: Tensor, model: Optional[snac.SNAC] = None, sample_rate: Optional[int] = None) -> None:
    """Raise ValueError unless ``audio`` is a float (B, 1, T) tensor at the model's rate."""
    if not isinstance(audio, Tensor):
        raise ValueError(f"expected audio as a torch.Tensor of shape (B, 1, T), got {type(audio).__name__}")
    if audio.dim() != 3 or audio.shape[1] != 1:
        hint = " (mono: mix channels down first)" if audio.dim() == 3 else " (add the channel axis: audio.unsqueeze(1))"
        raise ValueError(f"expected audio of shape (B, 1, T), got {tuple(audio.shape)}{hint}")
    if not audio.is_floating_point():
        raise ValueError(f"expected floating-point audio in [-1, 1], got dtype {audio.dtype}")
    if audio.shape[-1] == 0:
        raise ValueError("expected at least one audio sample, got T = 0")
    if model is not None and sample_rate is not None and sample_rate != model.sampling_rate:
        raise ValueError(f"audio sample rate {sample_rate} Hz does not match the model's "
                         f"{model.sampling_rate} Hz; resample it first")


def codebook_stats(codes: Tensor, codebook_size: int) -> Tuple[Tensor, Tensor]:
    """Fraction of the codebook used by ``codes`` (int64, any shape) and the perplexity of their
    histogram, as 0-dim float32 tensors on ``codes``' device.

    The histogram is a fixed-size scatter-add: unlike ``torch.bincount`` (whose output size
    depends on the data) it neither synchronises with the host nor breaks a compiled graph.
    """
    flat = codes.reshape(-1)
    counts = torch.zeros(codebook_size, dtype=torch.float32, device=codes.device)
    counts = counts.scatter_add(0, flat, torch.ones_like(flat, dtype=torch.float32))
    probs = counts / counts.sum().clamp_min(1.0)
    usage = (counts > 0).float().mean()
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return usage, entropy.exp()


def rotate_onto(z_e: Tensor, z_q: Tensor, eps: float = 1e-6) -> Tensor:
    """The rotation trick (Fifty et al. 2024, "Restructuring Vector Quantization with the Rotation
    Trick"): a gradient path from ``z_q`` back to ``z_e``, both (B, D, T), vectors along dim 1.

    The forward value is ``z_q`` (up to rounding): ``z_e`` is rotated onto ``z_q``'s direction and
    rescaled to its norm, with the rotation and the scale treated as constants. The backward pass
    then carries the decoder's gradient through that rotation instead of copying it unchanged (the
    straight-through estimator), so it keeps the angle between the gradient and the code vector.
    Only the backward pass differs: codes, outputs and exports are unchanged.
    """
    q = z_q.detach()
    e_norm = z_e.detach().norm(dim=1, keepdim=True).clamp_min(eps)
    q_norm = q.norm(dim=1, keepdim=True).clamp_min(eps)
    e_hat, q_hat = z_e.detach() / e_norm, q / q_norm
    r = F.normalize(e_hat + q_hat, dim=1, eps=eps)
    # R e = e - 2 r (r . e) + 2 q_hat (e_hat . e): the Householder form of the rotation e_hat -> q_hat
    rotated = z_e - 2 * r * (r * z_e).sum(1, keepdim=True) + 2 * q_hat * (e_hat * z_e).sum(1, keepdim=True)
    return rotated * (q_norm / e_norm)


def _quantize_level(vq: torch.nn.Module, residual: Tensor, rotation_trick: bool = False
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One snac ``VectorQuantize`` level with its VQ losses.

    residual: (B, latent_dim, T). Returns ``(z_q_out (B, latent_dim, T), codes (B, T/stride),
    z_e (B, codebook_dim, T/stride), commitment, codebook)``. ``rotation_trick`` replaces the
    straight-through gradient by :func:`rotate_onto`'s.
    """
    z = F.avg_pool1d(residual, vq.stride, vq.stride) if vq.stride > 1 else residual
    z_e = vq.in_proj(z)
    # snac's own nearest-code search on L2-normalized vectors: identical codes to SNAC.encode.
    # Callers run this in fp32 (see train_forward): a bf16 search picks other codes.
    z_q, codes = vq.decode_latents(z_e)
    commitment = F.mse_loss(z_e, z_q.detach())
    codebook = F.mse_loss(z_q, z_e.detach())
    # Straight-through: the decoder sees z_q, the encoder receives the decoder's gradient.
    z_q = rotate_onto(z_e, z_q) if rotation_trick else z_e + (z_q - z_e).detach()
    z_q = vq.out_proj(z_q)
    if vq.stride > 1:
        z_q = z_q.repeat_interleave(vq.stride, dim=-1)
    return z_q, codes, z_e, commitment, codebook


def pad_to_unit(model: snac.SNAC, audio: Tensor) -> Tensor:
    """Right-pad ``audio`` (B, 1, T) with zeros to a multiple of ``hop * lcm(vq_strides[0], attn_window)``.

    The padding of ``snac.SNAC.preprocess`` computed with Python ints: snac's ``hop_length`` is a
    numpy scalar, which makes the arithmetic opaque to ``torch.compile`` (a graph break).
    """
    hop = math.prod([int(r) for r in model.encoder_rates])
    unit = hop * math.lcm(int(model.vq_strides[0]), int(model.attn_window_size or 1))
    length = audio.shape[-1]
    return F.pad(audio, (0, -(-length // unit) * unit - length))


def _fp32(x: Tensor):
    """Disable autocast on ``x``'s device (fp32 islands inside a bf16 step)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _decode(model: snac.SNAC, z_q: Tensor) -> Tensor:
    """snac's decoder with its output conv and tanh in fp32: (B, latent, T') -> fp32 (B, 1, T)."""
    layers = model.decoder.model
    h = layers[:-2](z_q)  # follows the ambient autocast
    with _fp32(h):
        return layers[-1](layers[-2](h.float()))


def train_forward(model: snac.SNAC, audio: Tensor, sample_rate: Optional[int] = None,
                  rotation_trick: bool = False) -> TrainOutput:
    """Encode, quantize (with VQ losses) and decode ``audio`` (B, 1, T) at the model's rate.

    Encoder and quantizer run in fp32 even under autocast, so the codes are fp32
    ``SNAC.encode``'s; the reconstruction is float32 (see the module docstring).
    ``rotation_trick`` changes only the gradient into the encoder (:func:`rotate_onto`).
    """
    check_audio(audio, model, sample_rate)
    length = audio.shape[-1]
    with _fp32(audio):
        z = model.encoder(pad_to_unit(model, audio.float()))
        z_q_sum, codes, latents, commit, cbook = _quantize(model, z, rotation_trick)
    usage, perplexity = zip(*(codebook_stats(c, model.codebook_size) for c in codes))
    recon = _decode(model, z_q_sum)[..., :length]
    return TrainOutput(
        audio=recon,
        codes=codes,
        commitment_loss=torch.stack(commit).sum(),
        codebook_loss=torch.stack(cbook).sum(),
        codebook_usage=torch.stack(usage),
        codebook_perplexity=torch.stack(perplexity),
        latents=latents,
    )


def _quantize(model: snac.SNAC, z: Tensor, rotation_trick: bool = False):
    """Residual VQ over every level of ``model`` on encoder output ``z`` (B, latent, T').

    Returns ``(z_q sum (B, latent, T'), codes, detached z_e latents, commitment losses, codebook
    losses)``, the last four as per-level lists.
    """
    z_q_sum: Any = 0.0
    residual = z
    codes, latents, commit, cbook = [], [], [], []
    for vq in model.quantizer.quantizers:
        z_q, c, z_e, lc, lb = _quantize_level(vq, residual, rotation_trick)
        z_q_sum = z_q_sum + z_q
        residual = residual - z_q
        codes.append(c)
        latents.append(z_e.detach())
        commit.append(lc)
        cbook.append(lb)
    return z_q_sum, codes, latents, commit, cbook


class DeadCodeRestarter:
    """Re-seed codebook entries that no rank has used for ``threshold`` steps.

    Every step, on the codebook's device and without any host synchronisation, it records when
    each code was last used (this rank's batch) and keeps the encoder outputs ``z_e`` of each
    level seen since the last check (the newest ``codebook_size`` rows). Every ``every`` steps it
    checks:

    1. ``last_used`` is MAX-reduced over ranks, so a code is dead only if no rank used it;
    2. the candidate buffers of all ranks are gathered (``all_gather`` on the device);
    3. dead codes get distinct candidates (sampled without replacement) plus a little noise, so
       two restarted codes never tie and die together. With fewer candidates than dead codes, a
       random subset of the dead codes is restarted and the rest wait for the next check.

    The random draws come from a CPU generator seeded identically on every rank, and every rank
    sees the same gathered candidates, so all ranks write bit-identical codebooks without a
    broadcast (DDP itself never syncs a direct ``.data`` write).

    Codes start as "last used at step ``-threshold``": the first check (step ``every``) already
    re-seeds every code that has not been used yet, instead of waiting ``threshold`` steps.
    """

    def __init__(self, model: snac.SNAC, threshold: int, every: int = 1, seed: int = 0, noise: float = 0.01,
                 max_fraction: float = 1.0):
        if threshold < 1 or every < 1:
            raise ValueError(f"threshold and every must be >= 1, got {threshold} and {every}")
        if not 0 < max_fraction <= 1:
            raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
        self.model = model
        self.threshold, self.every, self.noise = int(threshold), int(every), float(noise)
        # At most this many codes per level change at one check: each replaced code moves the
        # frames that pick it, and moving many at once is a shock to the decoder.
        self.max_per_check = max(1, int(max_fraction * model.codebook_size))
        quantizers = list(model.quantizer.quantizers)
        device = quantizers[0].codebook.weight.device
        size = model.codebook_size
        self.last_used = [torch.full((size,), -self.threshold, dtype=torch.long, device=device) for _ in quantizers]
        self.buffers = [torch.zeros(size, vq.codebook.weight.shape[1], device=device) for vq in quantizers]
        self.filled = [0] * len(quantizers)  # rows of each buffer holding real latents (host ints)
        self.write_pos = [0] * len(quantizers)
        self.generator = torch.Generator().manual_seed(seed)
        self.total_restarted = [0] * len(quantizers)

    @torch.no_grad()
    def step(self, step: int, codes: List[Tensor], latents: List[Tensor]) -> List[int]:
        """Record ``codes`` (per level, (B, T_i)) and ``latents`` (per level, (B, D, T_i)) at ``step``;
        at a check step restart dead codes. Returns the number restarted per level (0 off checks)."""
        for level in range(len(self.last_used)):
            self._observe(level, step, codes[level], latents[level])
        if step % self.every:
            return [0] * len(self.last_used)
        counts = [self._restart_level(level, step) for level in range(len(self.last_used))]
        # Candidates are only the latents seen since this check: the encoder drifts, and a code
        # seeded from a stale latent lands where no current latent is and dies again.
        self.filled = [0] * len(self.filled)
        self.write_pos = [0] * len(self.write_pos)
        return counts

    def _observe(self, level: int, step: int, codes: Tensor, z_e: Tensor) -> None:
        """Device-only bookkeeping: no ``.item()``, no collective."""
        self.last_used[level].index_fill_(0, codes.reshape(-1).to(self.last_used[level].device), step)
        rows = z_e.detach().transpose(1, 2).reshape(-1, z_e.shape[1]).float()
        buf = self.buffers[level]
        rows = rows[-len(buf):]  # a batch larger than the buffer: keep its newest rows
        pos, n = self.write_pos[level], len(rows)
        first = min(n, len(buf) - pos)
        buf[pos:pos + first] = rows[:first]
        buf[:n - first] = rows[first:]
        self.write_pos[level] = (pos + n) % len(buf)
        self.filled[level] = min(len(buf), self.filled[level] + n)

    def _dead_codes(self, level: int, step: int) -> Tensor:
        """Indices of the codes to replace at this check (the same on every rank)."""
        last_used = self.last_used[level]
        if _distributed():
            dist.all_reduce(last_used, op=dist.ReduceOp.MAX)  # dead = unused on every rank
        return ((step - last_used) >= self.threshold).nonzero().squeeze(1)

    def _mark_replaced(self, level: int, codes: Tensor, step: int) -> None:
        """Give the replaced ``codes`` a fresh start in the usage record."""
        self.last_used[level][codes] = step

    def _restart_level(self, level: int, step: int) -> int:
        dead = self._dead_codes(level, step)
        candidates = _gather_rows(self.buffers[level][:self.filled[level]])
        n = min(len(dead), len(candidates), self.max_per_check)  # host sync: only here, at a check step
        if n == 0:
            return 0
        if n < len(dead):
            dead = dead[torch.randperm(len(dead), generator=self.generator)[:n].to(dead.device)]
        pick = torch.randperm(len(candidates), generator=self.generator)[:n].to(candidates.device)
        new = candidates[pick]
        scale = new.pow(2).mean().sqrt()  # noise relative to the latents' RMS
        noise = torch.randn(new.shape, generator=self.generator).to(new.device)
        weight = self.model.quantizer.quantizers[level].codebook.weight
        weight.data[dead] = (new + self.noise * scale * noise).to(weight.dtype)
        self._mark_replaced(level, dead, step)
        self.total_restarted[level] += n
        return n

    def state_dict(self) -> Dict[str, Any]:
        return {"last_used": [t.detach().cpu().clone() for t in self.last_used],
                "buffers": [t.detach().cpu().clone() for t in self.buffers],
                "filled": list(self.filled), "write_pos": list(self.write_pos),
                "generator": self.generator.get_state(), "total_restarted": list(self.total_restarted)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        device = self.last_used[0].device
        self.last_used = [t.to(device=device, dtype=torch.long).clone() for t in state["last_used"]]
        if "buffers" in state:  # checkpoints written before the candidate buffers start empty
            self.buffers = [t.to(device=device, dtype=torch.float32).clone() for t in state["buffers"]]
            self.filled, self.write_pos = list(state["filled"]), list(state["write_pos"])
        self.generator.set_state(state["generator"])
        self.total_restarted = list(state["total_restarted"])


def _gather_rows(rows: Tensor) -> Tensor:
    """Concatenate every rank's ``(N_r, D)`` rows in rank order (ranks may hold different N_r).

    Uses the rows' own device (NCCL needs CUDA tensors, gloo CPU ones). Single process: ``rows``.
    """
    if not _distributed():
        return rows
    world = dist.get_world_size()
    count = torch.tensor([len(rows)], dtype=torch.long, device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = torch.zeros(max(sizes), rows.shape[1], dtype=rows.dtype, device=rows.device)
    padded[:len(rows)] = rows
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
