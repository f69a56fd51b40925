"""Discriminators of DAC's GAN setup, as used by SNAC: multi-period + multi-scale complex STFT.

Every discriminator here returns the same structure: a list with one entry per
sub-discriminator, each ``(logits, feature_maps)`` where ``feature_maps`` is the list of
intermediate activations (after each hidden layer's activation) and excludes ``logits``.
Inputs are ``(B, 1, T)`` float audio. Each module's ``forward`` checks its input once and calls
``_forward``, which composite modules call on their children directly, so a training step pays
for one check at the top and the compiled graph holds convolutions only.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from .config import DiscriminatorConfig

DiscriminatorOutput = Tuple[Tensor, List[Tensor]]

# HiFi-GAN / DAC slope for every hidden activation.
LEAKY_RELU_SLOPE = 0.1


def check_audio(x: Tensor) -> None:
    """Raise ValueError unless ``x`` is ``(B, 1, T)`` floating-point audio."""
    if x.dim() != 3 or x.shape[1] != 1 or not x.is_floating_point():
        raise ValueError(f"discriminator input must be float audio of shape (batch, 1, samples), "
                         f"got {tuple(x.shape)} {x.dtype}")


def _wn_conv2d(in_ch: int, out_ch: int, kernel: Tuple[int, int], stride: Tuple[int, int],
               padding: Tuple[int, int]) -> nn.Module:
    return weight_norm(nn.Conv2d(in_ch, out_ch, kernel, stride, padding))


# --------------------------------------------------------------------------------------
# Multi-period discriminator
# --------------------------------------------------------------------------------------


class PeriodDiscriminator(nn.Module):
    """HiFi-GAN period discriminator: the waveform folded into ``(T / period, period)`` and 2-D convs.

    Hidden layers: kernel (5, 1), stride 3 along time except the last (stride 1), weight norm,
    LeakyReLU 0.1; a (3, 1) conv to one logit channel closes the stack.

    Args:
        period: fold width in samples.
        channels: output channels of the hidden layers.
        kernel_size, stride: time-axis kernel and stride of the hidden layers.
    """

    def __init__(self, period: int, channels: Sequence[int] = DiscriminatorConfig.mpd_channels,
                 kernel_size: int = 5, stride: int = 3):
        super().__init__()
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        self.period = int(period)
        ins = (1,) + tuple(channels[:-1])
        strides = [stride] * (len(channels) - 1) + [1]
        self.convs = nn.ModuleList(
            _wn_conv2d(i, o, (kernel_size, 1), (s, 1), (kernel_size // 2, 0))
            for i, o, s in zip(ins, channels, strides))
        self.conv_post = _wn_conv2d(channels[-1], 1, (3, 1), (1, 1), (1, 0))

    def fold(self, x: Tensor) -> Tensor:
        """``(B, 1, T)`` -> ``(B, 1, ceil(T / period), period)``, reflect-padding the tail."""
        remainder = x.shape[-1] % self.period
        if remainder:
            pad = self.period - remainder
            mode = "reflect" if x.shape[-1] > pad else "replicate"  # reflect needs T > pad
            x = F.pad(x, (0, pad), mode=mode)
        return x.view(x.shape[0], 1, x.shape[-1] // self.period, self.period)

    def forward(self, x: Tensor) -> List[DiscriminatorOutput]:
        """``(B, 1, T)`` -> ``[(logits (B, 1, frames, period), feature_maps)]``."""
        check_audio(x)
        return self._forward(x)

    def _forward(self, x: Tensor) -> List[DiscriminatorOutput]:
        h = self.fold(x)
        fmaps = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), LEAKY_RELU_SLOPE)
            fmaps.append(h)
        return [(self.conv_post(h), fmaps)]


class MultiPeriodDiscriminator(nn.Module):
    """One :class:`PeriodDiscriminator` per period; outputs concatenated in period order."""

    def __init__(self, periods: Sequence[int] = DiscriminatorConfig.periods,
                 channels: Sequence[int] = DiscriminatorConfig.mpd_channels):
        super().__init__()
        self.discriminators = nn.ModuleList(PeriodDiscriminator(p, channels) for p in periods)

    def forward(self, x: Tensor) -> List[DiscriminatorOutput]:
        check_audio(x)
        return self._forward(x)

    def _forward(self, x: Tensor) -> List[DiscriminatorOutput]:
        return [out for d in self.discriminators for out in d._forward(x)]


# --------------------------------------------------------------------------------------
# Multi-scale complex STFT discriminator
# --------------------------------------------------------------------------------------


class STFTDiscriminator(nn.Module):
    """DAC's multi-resolution (MRD) sub-discriminator on one complex STFT.

    The STFT (Hann window, centered) is laid out as ``(B, 2, frames, bins)`` with real and
    imaginary parts as channels, split into frequency bands; each band runs its own conv stack
    (kernel 3x9 with frequency stride 2 on three layers, then 3x3; weight norm; LeakyReLU 0.1);
    the band outputs are joined along frequency and a 3x3 conv gives the logits.

    Args:
        n_fft: FFT / window size (samples).
        hop_length: hop between frames (samples).
        bands: band edges as fractions of the one-sided bins (0 = DC, 1 = Nyquist), increasing.
        channels: conv channels of every band stack.
        sample_rate: audio sample rate (Hz). The bands are fractions of Nyquist, so the layers do
            not depend on it; it is kept to report the band edges in Hz (:attr:`band_edges_hz`).
    """

    def __init__(self, n_fft: int, hop_length: int, bands: Sequence[float] = DiscriminatorConfig.stft_bands,
                 channels: int = DiscriminatorConfig.stft_channels, sample_rate: Optional[int] = None):
        super().__init__()
        increasing = all(lo < hi for lo, hi in zip(bands[:-1], bands[1:]))
        if len(bands) < 2 or not increasing or bands[0] < 0 or bands[-1] > 1:
            raise ValueError(f"bands must be >= 2 increasing fractions in [0, 1], got {tuple(bands)}")
        self.n_fft, self.hop_length, self.sample_rate = int(n_fft), int(hop_length), sample_rate
        n_bins = self.n_fft // 2 + 1
        edges = [int(b * n_bins) for b in bands]
        self.band_slices = [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]
        if any(hi <= lo for lo, hi in self.band_slices):
            raise ValueError(f"n_fft={n_fft} is too small for bands {tuple(bands)}: a band has no bins")
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
        self.band_convs = nn.ModuleList(self._band_stack(channels) for _ in self.band_slices)
        self.conv_post = _wn_conv2d(channels, 1, (3, 3), (1, 1), (1, 1))

    @staticmethod
    def _band_stack(ch: int) -> nn.ModuleList:
        # DAC MRD: stride 2 along frequency on the middle three layers shrinks each band 8x.
        return nn.ModuleList([
            _wn_conv2d(2, ch, (3, 9), (1, 1), (1, 4)),
            _wn_conv2d(ch, ch, (3, 9), (1, 2), (1, 4)),
            _wn_conv2d(ch, ch, (3, 9), (1, 2), (1, 4)),
            _wn_conv2d(ch, ch, (3, 9), (1, 2), (1, 4)),
            _wn_conv2d(ch, ch, (3, 3), (1, 1), (1, 1)),
        ])

    @property
    def band_edges_hz(self) -> List[Tuple[float, float]]:
        """``(low, high)`` frequency of each band in Hz (needs ``sample_rate``)."""
        if self.sample_rate is None:
            raise ValueError("band_edges_hz needs the sample_rate the discriminator was built with")
        hz_per_bin = self.sample_rate / self.n_fft
        return [(lo * hz_per_bin, hi * hz_per_bin) for lo, hi in self.band_slices]

    def spectrogram(self, x: Tensor) -> Tensor:
        """``(B, 1, T)`` -> float32 ``(B, 2, frames, n_fft // 2 + 1)`` (real, imag)."""
        if x.shape[-1] <= self.n_fft // 2:
            raise ValueError(f"audio of {x.shape[-1]} samples is too short for the STFT discriminator "
                             f"with n_fft={self.n_fft}; need more than {self.n_fft // 2} samples")
        # torch.stft has no bf16 kernels; the STFT runs in fp32 and the convs follow autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            spec = torch.stft(x.squeeze(1).float(), n_fft=self.n_fft, hop_length=self.hop_length,
                              window=self.window.float(), center=True, pad_mode="reflect", return_complex=True)
        return torch.view_as_real(spec).permute(0, 3, 2, 1)

    def forward(self, x: Tensor) -> List[DiscriminatorOutput]:
        """``(B, 1, T)`` -> ``[(logits (B, 1, frames, sum of band widths / 8), feature_maps)]``."""
        check_audio(x)
        return self._forward(x)

    def _forward(self, x: Tensor) -> List[DiscriminatorOutput]:
        spec = self.spectrogram(x)
        fmaps, band_outs = [], []
        for (lo, hi), stack in zip(self.band_slices, self.band_convs):
            h = spec[..., lo:hi]
            for conv in stack:
                h = F.leaky_relu(conv(h), LEAKY_RELU_SLOPE)
                fmaps.append(h)
            band_outs.append(h)
        return [(self.conv_post(torch.cat(band_outs, dim=-1)), fmaps)]


class MultiScaleSTFTDiscriminator(nn.Module):
    """One :class:`STFTDiscriminator` per FFT size, hop = ``int(fft_size * hop_factor)``."""

    def __init__(self, fft_sizes: Sequence[int] = DiscriminatorConfig.stft_fft_sizes,
                 sample_rate: Optional[int] = None,
                 bands: Sequence[float] = DiscriminatorConfig.stft_bands,
                 hop_factor: float = DiscriminatorConfig.stft_hop_factor,
                 channels: int = DiscriminatorConfig.stft_channels):
        super().__init__()
        self.discriminators = nn.ModuleList(
            STFTDiscriminator(n, max(1, int(n * hop_factor)), bands, channels, sample_rate) for n in fft_sizes)

    def forward(self, x: Tensor) -> List[DiscriminatorOutput]:
        check_audio(x)
        return self._forward(x)

    def _forward(self, x: Tensor) -> List[DiscriminatorOutput]:
        return [out for d in self.discriminators for out in d._forward(x)]


# --------------------------------------------------------------------------------------
# Combined
# --------------------------------------------------------------------------------------


class Discriminator(nn.Module):
    """The full discriminator: MPD outputs followed by multi-scale STFT outputs, as one list.

    Args:
        cfg: periods, MPD channels, STFT FFT sizes / hop factor / bands / channels.
        sample_rate: the generator's sample rate (Hz).
    """

    def __init__(self, cfg: DiscriminatorConfig, sample_rate: int):
        super().__init__()
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        self.sample_rate = int(sample_rate)
        self.mpd = MultiPeriodDiscriminator(cfg.periods, cfg.mpd_channels)
        self.mstft = MultiScaleSTFTDiscriminator(cfg.stft_fft_sizes, sample_rate, cfg.stft_bands,
                                                 cfg.stft_hop_factor, cfg.stft_channels)
        self.preprocess_peak = float(cfg.preprocess_peak) if cfg.preprocess else None

    @property
    def num_discriminators(self) -> int:
        return len(self.mpd.discriminators) + len(self.mstft.discriminators)

    def forward(self, x: Tensor) -> List[DiscriminatorOutput]:
        """``(B, 1, T)`` -> list of ``num_discriminators`` ``(logits, feature_maps)`` pairs."""
        check_audio(x)
        if self.preprocess_peak is not None:
            x = remove_dc_and_normalize_peak(x, self.preprocess_peak)
        return self.mpd._forward(x) + self.mstft._forward(x)


def remove_dc_and_normalize_peak(x: Tensor, peak: float = 0.8, eps: float = 1e-9) -> Tensor:
    """DAC's discriminator input: each ``(B, 1, T)`` clip minus its mean, scaled so its largest
    absolute sample is ``peak`` (``eps`` keeps silence finite). Differentiable; same shape."""
    x = x - x.mean(dim=-1, keepdim=True)
    return peak * x / (x.abs().amax(dim=-1, keepdim=True) + eps)
