"""Generator and discriminator losses: LSGAN, feature matching, multi-scale mel, multi-resolution STFT.

All spectral losses run in float32 with autocast disabled, so they are safe inside a bf16
autocast region: inputs are cast to float32 first and the STFT / log never see reduced precision.

Weights from :class:`training.config.LossConfig` are applied in exactly one place,
:class:`GeneratorLoss`; every other function here returns an unweighted value.

Discriminator outputs follow the package-wide interface: a list (one entry per
sub-discriminator) of ``(logits, feature_maps)``, where ``feature_maps`` is a list of
intermediate activations that excludes the logits.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LossConfig

DiscriminatorOutputs = Sequence[Tuple[Tensor, Sequence[Tensor]]]

# Slaney's (Auditory Toolbox) mel scale: linear below 1 kHz with 3 mels per 200 Hz, logarithmic
# above with 27 mels per factor 6.4. These define the scale itself (librosa's ``htk=False``).
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_LOG_START_HZ = 1000.0
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


# --------------------------------------------------------------------------------------
# Input checks and precision helpers
# --------------------------------------------------------------------------------------


def check_audio_pair(real: Tensor, fake: Tensor) -> None:
    """Raise ValueError unless ``real`` and ``fake`` are both ``(B, 1, T)`` with equal shapes."""
    for name, x in (("real", real), ("fake", fake)):
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"{name} audio must have shape (batch, 1, samples), got {tuple(x.shape)}")
    if real.shape != fake.shape:
        raise ValueError(f"real and fake audio must have the same shape, got {tuple(real.shape)} "
                         f"and {tuple(fake.shape)}")


def _no_autocast(x: Tensor) -> torch.autocast:
    """A context that disables autocast on ``x``'s device type."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _magnitude_stft(x: Tensor, n_fft: int, hop_length: int, window: Tensor) -> Tensor:
    """|STFT| of ``(N, T)`` float32 audio -> ``(N, n_fft // 2 + 1, frames)``.

    Centered frames with reflect padding (as DAC / audiotools and Parallel WaveGAN do), so the
    signal must be longer than ``n_fft // 2`` samples.
    """
    if x.shape[-1] <= n_fft // 2:
        raise ValueError(f"audio of {x.shape[-1]} samples is too short for an STFT of size {n_fft}; "
                         f"need more than {n_fft // 2} samples")
    spec = torch.stft(x, n_fft=n_fft, hop_length=hop_length, win_length=window.shape[-1], window=window,
                      center=True, pad_mode="reflect", return_complex=True)
    return spec.abs()


# --------------------------------------------------------------------------------------
# Mel filterbank (Slaney scale, Slaney area normalization)
# --------------------------------------------------------------------------------------


def hz_to_mel(freq: Tensor) -> Tensor:
    """Hz -> mel on Slaney's scale (elementwise, any shape)."""
    linear = freq / _SLANEY_HZ_PER_MEL
    log_start_mel = _SLANEY_LOG_START_HZ / _SLANEY_HZ_PER_MEL
    logarithmic = log_start_mel + torch.log(freq.clamp(min=_SLANEY_LOG_START_HZ) / _SLANEY_LOG_START_HZ) \
        / _SLANEY_LOG_STEP
    return torch.where(freq >= _SLANEY_LOG_START_HZ, logarithmic, linear)


def mel_to_hz(mel: Tensor) -> Tensor:
    """Mel on Slaney's scale -> Hz (elementwise inverse of :func:`hz_to_mel`)."""
    log_start_mel = _SLANEY_LOG_START_HZ / _SLANEY_HZ_PER_MEL
    linear = mel * _SLANEY_HZ_PER_MEL
    logarithmic = _SLANEY_LOG_START_HZ * torch.exp(_SLANEY_LOG_STEP * (mel - log_start_mel))
    return torch.where(mel >= log_start_mel, logarithmic, linear)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: Optional[float] = None) -> Tensor:
    """Triangular mel filters, Slaney scale and area normalization (``librosa.filters.mel`` defaults).

    Args:
        sample_rate: audio sample rate (Hz).
        n_fft: FFT size; the filters cover its ``n_fft // 2 + 1`` one-sided bins.
        n_mels: number of mel bands.
        fmin, fmax: lowest / highest filter edge (Hz); ``fmax=None`` means Nyquist.

    Returns:
        float32 tensor ``(n_mels, n_fft // 2 + 1)``; multiply a magnitude spectrogram
        ``(..., n_fft // 2 + 1, frames)`` from the left to get ``(..., n_mels, frames)``.
    """
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    if not 0.0 <= fmin < fmax <= sample_rate / 2.0:
        raise ValueError(f"need 0 <= fmin < fmax <= sample_rate / 2, got fmin={fmin}, fmax={fmax}, "
                         f"sample_rate={sample_rate}")
    # float64 throughout, as librosa computes, so the float32 result agrees to rounding.
    f64 = torch.float64
    bin_hz = torch.arange(n_fft // 2 + 1, dtype=f64) * (sample_rate / n_fft)
    mel_edges = torch.linspace(float(hz_to_mel(torch.tensor(fmin, dtype=f64))),
                               float(hz_to_mel(torch.tensor(fmax, dtype=f64))), n_mels + 2, dtype=f64)
    edges_hz = mel_to_hz(mel_edges)  # (n_mels + 2,) left edge, centre, right edge of each filter
    widths = edges_hz.diff()  # (n_mels + 1,)
    offsets = edges_hz[:, None] - bin_hz[None, :]  # (n_mels + 2, bins)
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    weights = torch.minimum(rising, falling).clamp(min=0.0)
    # Slaney normalization: each triangle has unit area on the Hz axis.
    weights = weights * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return weights.to(torch.float32)


# --------------------------------------------------------------------------------------
# Spectral reconstruction losses
# --------------------------------------------------------------------------------------


class MelSpectrogramLoss(nn.Module):
    """DAC's multi-scale log-mel L1 distance.

    For every (window length, n_mels) pair: magnitude STFT with a Hann window and hop =
    window / 4, mel projection, ``log10(clamp(mel, clamp))``, mean absolute difference; the
    per-scale values are summed. Filterbanks and windows are non-persistent buffers built once,
    so ``.to(device)`` moves them and nothing is rebuilt per call.

    Args:
        sample_rate: audio sample rate (Hz); sets the mel filter positions.
        window_lengths: STFT window (= FFT) sizes in samples, one per scale.
        n_mels: mel bands per scale (same length as ``window_lengths``).
        clamp: floor applied to mel magnitudes before the log.
        fmin, fmax: mel filter range in Hz (``fmax=None``: Nyquist).
        hop_divisor: hop length = window length // hop_divisor.
    """

    def __init__(self, sample_rate: int, window_lengths: Sequence[int] = LossConfig.mel_window_lengths,
                 n_mels: Sequence[int] = LossConfig.mel_n_mels, clamp: float = LossConfig.mel_clamp,
                 fmin: float = LossConfig.mel_fmin, fmax: Optional[float] = LossConfig.mel_fmax,
                 hop_divisor: int = 4):
        super().__init__()
        if len(window_lengths) != len(n_mels):
            raise ValueError(f"window_lengths ({len(window_lengths)}) and n_mels ({len(n_mels)}) "
                             "must have the same length")
        self.sample_rate = sample_rate
        self.window_lengths = tuple(int(w) for w in window_lengths)
        self.hop_lengths = tuple(w // hop_divisor for w in self.window_lengths)
        self.clamp = float(clamp)
        for i, (win, mels) in enumerate(zip(self.window_lengths, n_mels)):
            self.register_buffer(f"window_{i}", torch.hann_window(win), persistent=False)
            self.register_buffer(f"filters_{i}", mel_filterbank(sample_rate, win, mels, fmin, fmax),
                                 persistent=False)

    def log_mel(self, audio: Tensor, scale: int) -> Tensor:
        """``(N, T)`` float32 audio -> ``(N, n_mels, frames)`` log10 mel magnitudes at one scale."""
        # .float(): a no-op normally; keeps fp32 math if the module was cast with .half()/.double().
        window = getattr(self, f"window_{scale}").float()
        filters = getattr(self, f"filters_{scale}").float()
        mag = _magnitude_stft(audio, self.window_lengths[scale], self.hop_lengths[scale], window)
        return torch.matmul(filters, mag).clamp(min=self.clamp).log10()

    def forward(self, real: Tensor, fake: Tensor) -> Tensor:
        """``real``, ``fake``: ``(B, 1, T)`` audio -> scalar loss (sum over scales of mean |Δ log10 mel|)."""
        check_audio_pair(real, fake)
        with _no_autocast(fake):
            # One STFT per scale over the stacked pair instead of two.
            both = torch.cat([real, fake]).squeeze(1).float()
            loss = both.new_zeros(())
            for scale in range(len(self.window_lengths)):
                mel_real, mel_fake = self.log_mel(both, scale).chunk(2)
                loss = loss + F.l1_loss(mel_fake, mel_real)
        return loss


class MultiResolutionSTFTLoss(nn.Module):
    """Parallel WaveGAN's multi-resolution STFT loss: spectral convergence + log-magnitude L1.

    Per resolution: ``||  |S_r| - |S_f|  ||_F / || |S_r| ||_F`` plus ``mean | log|S_r| - log|S_f| |``;
    the per-resolution sums are averaged over resolutions.

    Args:
        fft_sizes, hop_sizes, win_lengths: one entry per resolution (samples).
        eps: floor on squared magnitudes before the square root, which keeps the log finite and
            the square-root gradient bounded in silent bins (Parallel WaveGAN uses 1e-7).
    """

    def __init__(self, fft_sizes: Sequence[int] = LossConfig.stft_fft_sizes,
                 hop_sizes: Sequence[int] = LossConfig.stft_hop_sizes,
                 win_lengths: Sequence[int] = LossConfig.stft_win_lengths, eps: float = 1e-7):
        super().__init__()
        if not len(fft_sizes) == len(hop_sizes) == len(win_lengths):
            raise ValueError("fft_sizes, hop_sizes and win_lengths must have the same length, got "
                             f"{len(fft_sizes)}, {len(hop_sizes)}, {len(win_lengths)}")
        for fft, win in zip(fft_sizes, win_lengths):
            if win > fft:
                raise ValueError(f"win_length {win} exceeds fft_size {fft}")
        self.fft_sizes = tuple(int(n) for n in fft_sizes)
        self.hop_sizes = tuple(int(h) for h in hop_sizes)
        self.eps = float(eps)
        for i, win in enumerate(win_lengths):
            self.register_buffer(f"window_{i}", torch.hann_window(int(win)), persistent=False)

    def magnitude(self, audio: Tensor, resolution: int) -> Tensor:
        """``(N, T)`` float32 audio -> ``(N, fft_size // 2 + 1, frames)`` magnitudes, floored by ``eps``."""
        window = getattr(self, f"window_{resolution}").float()
        spec = torch.stft(audio, n_fft=self.fft_sizes[resolution], hop_length=self.hop_sizes[resolution],
                          win_length=window.shape[-1], window=window, center=True, pad_mode="reflect",
                          return_complex=True)
        power = spec.real.square() + spec.imag.square()
        return power.clamp(min=self.eps).sqrt()

    @staticmethod
    def spectral_convergence(mag_real: Tensor, mag_fake: Tensor) -> Tensor:
        """Frobenius-norm ratio of the magnitude error to the reference magnitude (scalar, batch-pooled)."""
        return torch.linalg.vector_norm(mag_real - mag_fake) / torch.linalg.vector_norm(mag_real)

    def forward(self, real: Tensor, fake: Tensor) -> Tensor:
        """``real``, ``fake``: ``(B, 1, T)`` audio -> scalar loss (mean over resolutions)."""
        check_audio_pair(real, fake)
        with _no_autocast(fake):
            both = torch.cat([real, fake]).squeeze(1).float()
            if both.shape[-1] <= max(self.fft_sizes) // 2:
                raise ValueError(f"audio of {both.shape[-1]} samples is too short for the STFT loss; "
                                 f"need more than {max(self.fft_sizes) // 2} samples")
            loss = both.new_zeros(())
            for res in range(len(self.fft_sizes)):
                mag_real, mag_fake = self.magnitude(both, res).chunk(2)
                log_mag = F.l1_loss(mag_fake.log(), mag_real.log())
                loss = loss + self.spectral_convergence(mag_real, mag_fake) + log_mag
        return loss / len(self.fft_sizes)


# --------------------------------------------------------------------------------------
# Adversarial losses (LSGAN) and feature matching
# --------------------------------------------------------------------------------------


def discriminator_loss(real_outputs: DiscriminatorOutputs, fake_outputs: DiscriminatorOutputs) -> Tensor:
    """LSGAN discriminator loss: sum over sub-discriminators of mean((1 - D(real))^2) + mean(D(fake)^2).

    Pass fake outputs computed from detached generator audio so this loss trains only the
    discriminator. Returns a float32 scalar.
    """
    _check_same_count(real_outputs, fake_outputs)
    loss = real_outputs[0][0].new_zeros((), dtype=torch.float32)
    for (logits_real, _), (logits_fake, _) in zip(real_outputs, fake_outputs):
        loss = loss + (1.0 - logits_real.float()).square().mean() + logits_fake.float().square().mean()
    return loss


def generator_loss(fake_outputs: DiscriminatorOutputs) -> Tensor:
    """LSGAN generator loss: sum over sub-discriminators of mean((1 - D(fake))^2) (float32 scalar)."""
    if len(fake_outputs) == 0:
        raise ValueError("fake_outputs is empty; expected one (logits, feature_maps) per sub-discriminator")
    loss = fake_outputs[0][0].new_zeros((), dtype=torch.float32)
    for logits_fake, _ in fake_outputs:
        loss = loss + (1.0 - logits_fake.float()).square().mean()
    return loss


def feature_matching_loss(real_outputs: DiscriminatorOutputs, fake_outputs: DiscriminatorOutputs) -> Tensor:
    """L1 between fake and detached real feature maps, **summed** over layers and sub-discriminators.

    Each layer contributes the mean absolute difference of its activations (DAC's convention:
    summed, not averaged, over layers). Returns a float32 scalar.
    """
    _check_same_count(real_outputs, fake_outputs)
    loss = fake_outputs[0][0].new_zeros((), dtype=torch.float32)
    for (_, maps_real), (_, maps_fake) in zip(real_outputs, fake_outputs):
        if len(maps_real) != len(maps_fake):
            raise ValueError(f"real and fake outputs have {len(maps_real)} and {len(maps_fake)} feature maps")
        for fmap_real, fmap_fake in zip(maps_real, maps_fake):
            loss = loss + F.l1_loss(fmap_fake.float(), fmap_real.detach().float())
    return loss


def _check_same_count(real_outputs: DiscriminatorOutputs, fake_outputs: DiscriminatorOutputs) -> None:
    if len(real_outputs) == 0 or len(real_outputs) != len(fake_outputs):
        raise ValueError(f"expected equal, non-zero numbers of sub-discriminator outputs, got "
                         f"{len(real_outputs)} real and {len(fake_outputs)} fake")


# --------------------------------------------------------------------------------------
# Weighted generator objective
# --------------------------------------------------------------------------------------


class GeneratorLoss(nn.Module):
    """The generator's training objective; the one place LossConfig weights are applied.

    Args:
        loss_cfg: weights (``mel``, ``stft``, ``adversarial``, ``feature_matching``,
            ``commitment``, ``codebook``) and spectral-loss settings.
        sample_rate: audio sample rate (Hz) of ``real`` / ``fake``.
    """

    WEIGHT_KEYS = ("mel", "stft", "commitment", "codebook", "adversarial", "feature_matching")

    def __init__(self, loss_cfg: LossConfig, sample_rate: int):
        super().__init__()
        self.loss_cfg = loss_cfg
        self.mel_loss = MelSpectrogramLoss(sample_rate, loss_cfg.mel_window_lengths, loss_cfg.mel_n_mels,
                                           loss_cfg.mel_clamp, loss_cfg.mel_fmin, loss_cfg.mel_fmax)
        self.stft_loss = MultiResolutionSTFTLoss(loss_cfg.stft_fft_sizes, loss_cfg.stft_hop_sizes,
                                                 loss_cfg.stft_win_lengths)

    @property
    def weights(self) -> Dict[str, float]:
        """Weight of every term, keyed like the ``terms`` dict of :meth:`forward`."""
        return {key: float(getattr(self.loss_cfg, key)) for key in self.WEIGHT_KEYS}

    def forward(self, real: Tensor, fake: Tensor, commitment: Tensor, codebook: Tensor,
                disc_real: Optional[DiscriminatorOutputs] = None,
                disc_fake: Optional[DiscriminatorOutputs] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Weighted sum of all generator-side terms.

        Args:
            real: ``(B, 1, T)`` target audio.
            fake: ``(B, 1, T)`` reconstruction (carries the generator's graph).
            commitment, codebook: scalar VQ losses from the training forward.
            disc_real, disc_fake: discriminator outputs on ``real`` and on (non-detached) ``fake``;
                give both or neither.

        Returns:
            ``(total, terms)``: ``total`` is a float32 scalar ``sum(weights[k] * terms[k])``;
            ``terms`` holds the unweighted scalars under the weight names (``adversarial`` and
            ``feature_matching`` only when discriminator outputs are given).
        """
        if (disc_real is None) != (disc_fake is None):
            raise ValueError("give both disc_real and disc_fake (or neither); feature matching needs both")
        terms: Dict[str, Tensor] = {
            "mel": self.mel_loss(real, fake),
            "stft": self.stft_loss(real, fake),
            "commitment": commitment.float(),
            "codebook": codebook.float(),
        }
        if disc_fake is not None:
            terms["adversarial"] = generator_loss(disc_fake)
            terms["feature_matching"] = feature_matching_loss(disc_real, disc_fake)
        weights = self.weights
        total = sum(weights[key] * value for key, value in terms.items())
        return total, terms
