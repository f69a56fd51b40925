"""Evaluation metrics: SI-SDR, mel / STFT distances, bitrates, codebook usage, optional PESQ / STOI.

Audio arguments are ``(B, 1, T)`` float tensors at the stated sample rate. PESQ and STOI need the
optional packages ``pesq`` and ``pystoi``; without them their functions return ``None``.
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .config import LossConfig, ModelConfig
from .losses import MelSpectrogramLoss, MultiResolutionSTFTLoss, check_audio_pair
from .model import codebook_stats as _codebook_stats  # the tensor version used on the training path

# ITU-T P.862.2 wide-band PESQ is defined for 16 kHz audio only.
PESQ_SAMPLE_RATE = 16000

_MEL_LOSSES: Dict[Tuple[int, str], MelSpectrogramLoss] = {}
_STFT_LOSSES: Dict[str, MultiResolutionSTFTLoss] = {}


# --------------------------------------------------------------------------------------
# Signal fidelity
# --------------------------------------------------------------------------------------


def si_sdr(reference: Tensor, estimate: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale-invariant signal-to-distortion ratio per item, in dB.

    Both signals are made zero-mean; the reference is scaled by the least-squares gain onto the
    estimate, and the ratio of target to residual energy is returned. ``eps`` keeps identical or
    silent signals finite (identical inputs give a large value, not inf).

    Args:
        reference, estimate: ``(B, 1, T)`` audio.

    Returns:
        float32 tensor ``(B,)`` in dB.
    """
    check_audio_pair(reference, estimate)
    ref = reference.float().squeeze(1)
    est = estimate.float().squeeze(1)
    ref = ref - ref.mean(dim=-1, keepdim=True)
    est = est - est.mean(dim=-1, keepdim=True)
    gain = (ref * est).sum(-1, keepdim=True) / (ref.square().sum(-1, keepdim=True) + eps)
    target = gain * ref
    residual = est - target
    return 10.0 * torch.log10((target.square().sum(-1) + eps) / (residual.square().sum(-1) + eps))


def mel_min_samples() -> int:
    """Shortest signal the mel distance is defined for: centered frames of the largest window
    need more than half a window of audio (1025 samples with DAC's 2048-sample window)."""
    return max(LossConfig.mel_window_lengths) // 2 + 1


def stft_min_samples() -> int:
    """Shortest signal the multi-resolution STFT distance is defined for (1025 samples)."""
    return max(LossConfig.stft_fft_sizes) // 2 + 1


@torch.no_grad()
def mel_distance(reference: Tensor, estimate: Tensor, sample_rate: int) -> Optional[float]:
    """DAC multi-scale log-mel L1 (the unweighted training ``mel`` term) between ``(B, 1, T)`` signals;
    None (not defined) for signals shorter than :func:`mel_min_samples`."""
    check_audio_pair(reference, estimate)
    if reference.shape[-1] < mel_min_samples():
        return None
    key = (int(sample_rate), str(estimate.device))
    if key not in _MEL_LOSSES:
        _MEL_LOSSES[key] = MelSpectrogramLoss(sample_rate).to(estimate.device)
    return float(_MEL_LOSSES[key](reference, estimate))


@torch.no_grad()
def stft_distance(reference: Tensor, estimate: Tensor) -> Optional[float]:
    """Multi-resolution STFT loss (the unweighted training ``stft`` term) between ``(B, 1, T)`` signals;
    None (not defined) for signals shorter than :func:`stft_min_samples`."""
    check_audio_pair(reference, estimate)
    if reference.shape[-1] < stft_min_samples():
        return None
    key = str(estimate.device)
    if key not in _STFT_LOSSES:
        _STFT_LOSSES[key] = MultiResolutionSTFTLoss().to(estimate.device)
    return float(_STFT_LOSSES[key](reference, estimate))


# --------------------------------------------------------------------------------------
# Rates
# --------------------------------------------------------------------------------------


def token_rates(model_cfg: ModelConfig) -> Tuple[float, ...]:
    """Tokens per second of each quantizer level, coarsest first (Hz)."""
    return model_cfg.token_rates()


def bitrate_kbps(model_cfg: ModelConfig) -> float:
    """Codec bitrate: sum of token rates times log2(codebook size), in kbit/s."""
    return model_cfg.bitrate_kbps()


def compression_ratio(model_cfg: ModelConfig, input_sample_rate: int, bits_per_sample: int = 16) -> float:
    """Mono PCM bitrate at ``input_sample_rate`` / ``bits_per_sample`` divided by the codec bitrate."""
    pcm_kbps = input_sample_rate * bits_per_sample / 1000.0
    return pcm_kbps / bitrate_kbps(model_cfg)


# --------------------------------------------------------------------------------------
# Codebook usage
# --------------------------------------------------------------------------------------



def codebook_stats(codes: Tensor, codebook_size: int) -> Tuple[float, float]:
    """Usage and perplexity of one codebook from a batch of its codes.

    Args:
        codes: integer tensor of any shape, values in ``[0, codebook_size)``.
        codebook_size: number of entries in the codebook.

    Returns:
        ``(usage_fraction, perplexity)``: distinct codes / codebook_size, and exp of the
        (natural-log) entropy of the code histogram (1 = one code; codebook_size = uniform).
    """
    flat = codes.reshape(-1)
    if flat.numel() == 0:
        raise ValueError("codes is empty; need at least one code")
    if flat.is_floating_point() or flat.is_complex():
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if int(flat.min()) < 0 or int(flat.max()) >= codebook_size:
        raise ValueError(f"codes must lie in [0, {codebook_size}), got range "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    usage, perplexity = _codebook_stats(flat.long(), codebook_size)
    return float(usage), float(perplexity)


# --------------------------------------------------------------------------------------
# Optional perceptual metrics
# --------------------------------------------------------------------------------------


def _items(audio: Tensor) -> np.ndarray:
    """``(B, 1, T)`` tensor -> float64 numpy ``(B, T)``."""
    return audio.detach().float().squeeze(1).cpu().numpy().astype(np.float64)


def pesq_score(reference: Tensor, estimate: Tensor, sample_rate: int) -> Optional[float]:
    """Wide-band PESQ (MOS-LQO) averaged over the batch; ``None`` when ``pesq`` is not installed
    or the measure is not defined for the audio (shorter than 1/4 s, or no speech found).

    Both ``(B, 1, T)`` signals are resampled to 16 kHz with soxr first, as P.862.2 requires.
    """
    try:
        from pesq import PesqError, pesq
    except ImportError:
        return None
    import soxr

    check_audio_pair(reference, estimate)
    scores = []
    for ref, est in zip(_items(reference), _items(estimate)):
        if sample_rate != PESQ_SAMPLE_RATE:
            ref = soxr.resample(ref, sample_rate, PESQ_SAMPLE_RATE)
            est = soxr.resample(est, sample_rate, PESQ_SAMPLE_RATE)
        try:
            scores.append(pesq(PESQ_SAMPLE_RATE, ref, est, "wb"))
        except PesqError:  # too short, or no utterance detected: PESQ has no value here
            return None
    return float(np.mean(scores))


def stoi_score(reference: Tensor, estimate: Tensor, sample_rate: int, extended: bool = False) -> Optional[float]:
    """(E)STOI intelligibility in [0, 1] averaged over the batch; ``None`` when ``pystoi`` is missing
    or the audio is too short for it (pystoi then warns and returns a placeholder 1e-5).

    pystoi resamples to its internal 10 kHz rate itself.
    """
    try:
        from pystoi import stoi
    except ImportError:
        return None

    check_audio_pair(reference, estimate)
    scores = []
    for ref, est in zip(_items(reference), _items(estimate)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                score = stoi(ref, est, sample_rate, extended=extended)
            except (IndexError, ValueError):  # shorter than one of its frames: pystoi fails inside
                return None
        if any("Not enough STFT frames" in str(w.message) for w in caught):
            return None
        scores.append(score)
    return float(np.mean(scores))
