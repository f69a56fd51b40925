"""Metrics: SI-SDR, spectral distances, rates, codebook statistics, optional PESQ / STOI."""

import math
import sys

import pytest
import torch

from training import metrics
from training.config import ModelConfig, model_preset
from training.losses import MelSpectrogramLoss, MultiResolutionSTFTLoss
from training.metrics import (
    bitrate_kbps,
    codebook_stats,
    compression_ratio,
    mel_distance,
    pesq_score,
    si_sdr,
    stft_distance,
    stoi_score,
    token_rates,
)


def _tone(batch=2, length=8000, sample_rate=16000):
    t = torch.arange(length) / sample_rate
    freqs = torch.tensor([220.0, 440.0])[:batch, None]
    return (0.5 * torch.sin(2 * math.pi * freqs * t)).unsqueeze(1)


# ---- SI-SDR ---------------------------------------------------------------------------------


def test_si_sdr_identical_is_large_and_noise_is_low():
    ref = _tone()
    assert si_sdr(ref, ref.clone()).shape == (2,)
    assert (si_sdr(ref, ref.clone()) > 80).all()
    noise = torch.randn_like(ref)
    assert (si_sdr(ref, noise) < -10).all()


def test_si_sdr_is_scale_and_offset_invariant():
    ref = _tone()
    est = ref + 0.1 * torch.randn_like(ref)
    base = si_sdr(ref, est)
    torch.testing.assert_close(si_sdr(ref, 3.0 * est + 0.2), base, rtol=0, atol=1e-3)


def test_si_sdr_known_value():
    """Estimate = reference + orthogonal error with 1/100 of its energy -> 20 dB."""
    ref = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 1, 4)
    err = torch.tensor([1.0, 1.0, -1.0, -1.0]).view(1, 1, 4) * 0.1  # zero-mean, orthogonal to ref
    assert si_sdr(ref, ref + err).item() == pytest.approx(20.0, abs=1e-4)


def test_si_sdr_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(batch, 1, samples\)"):
        si_sdr(torch.randn(2, 100), torch.randn(2, 100))


# ---- spectral distances -------------------------------------------------------------------------


def test_mel_distance_equals_training_loss_and_caches_module():
    ref = _tone(length=4096)
    est = ref + 0.05 * torch.randn_like(ref)
    value = mel_distance(ref, est, 24000)
    assert isinstance(value, float)
    assert value == pytest.approx(MelSpectrogramLoss(24000)(ref, est).item(), rel=1e-6)
    cached = metrics._MEL_LOSSES[(24000, "cpu")]
    mel_distance(ref, est, 24000)
    assert metrics._MEL_LOSSES[(24000, "cpu")] is cached
    assert mel_distance(ref, ref.clone(), 24000) == pytest.approx(0.0, abs=1e-7)


def test_stft_distance_equals_training_loss():
    ref = _tone(length=4096)
    est = ref + 0.05 * torch.randn_like(ref)
    assert stft_distance(ref, est) == pytest.approx(MultiResolutionSTFTLoss()(ref, est).item(), rel=1e-6)
    assert stft_distance(ref, ref.clone()) == pytest.approx(0.0, abs=1e-6)


# ---- rates ---------------------------------------------------------------------------------------


def test_rates_of_published_models():
    cfg24 = model_preset("24khz")
    assert token_rates(cfg24) == pytest.approx((24000 / 2048, 24000 / 1024, 24000 / 512))
    assert bitrate_kbps(cfg24) == pytest.approx(0.984375)
    assert bitrate_kbps(model_preset("32khz")) == pytest.approx(1.9, abs=0.05)
    assert bitrate_kbps(model_preset("44khz")) == pytest.approx(2.6, abs=0.05)


def test_compression_ratio():
    cfg = ModelConfig()
    # 24 kHz 16-bit mono PCM = 384 kbps over 0.984375 kbps.
    assert compression_ratio(cfg, 24000) == pytest.approx(384.0 / 0.984375)
    assert compression_ratio(cfg, 48000, bits_per_sample=24) == pytest.approx(1152.0 / 0.984375)


# ---- codebook statistics ---------------------------------------------------------------------------


def test_codebook_stats_exact_values():
    usage, ppl = codebook_stats(torch.tensor([[0, 0], [1, 1]]), 8)
    assert usage == 0.25 and ppl == pytest.approx(2.0)
    usage, ppl = codebook_stats(torch.full((3, 5), 7), 16)
    assert usage == 1 / 16 and ppl == pytest.approx(1.0)
    usage, ppl = codebook_stats(torch.arange(64).repeat(3), 64)
    assert usage == 1.0 and ppl == pytest.approx(64.0)
    # Probabilities (1/2, 1/4, 1/4): entropy 1.5 ln 2 -> perplexity 2^1.5.
    usage, ppl = codebook_stats(torch.tensor([3, 3, 5, 9]), 10)
    assert usage == pytest.approx(0.3) and ppl == pytest.approx(2 ** 1.5)


def test_codebook_stats_rejects_invalid_codes():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        codebook_stats(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="empty"):
        codebook_stats(torch.tensor([], dtype=torch.long), 4)
    with pytest.raises(ValueError, match="integer"):
        codebook_stats(torch.tensor([0.0, 1.0]), 4)


# ---- optional perceptual metrics -------------------------------------------------------------------


def test_pesq_and_stoi_return_none_without_their_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "pesq", None)  # makes `import pesq` raise ImportError
    monkeypatch.setitem(sys.modules, "pystoi", None)
    ref = _tone()
    assert pesq_score(ref, ref, 16000) is None
    assert stoi_score(ref, ref, 16000) is None


def test_pesq_when_installed():
    pytest.importorskip("pesq")
    g = torch.Generator().manual_seed(0)
    ref = 0.3 * torch.randn(1, 1, 48000, generator=g)
    clean = pesq_score(ref, ref.clone(), 24000)  # resampled to 16 kHz inside
    noisy = pesq_score(ref, ref + 0.3 * torch.randn(1, 1, 48000, generator=g), 24000)
    assert clean > 4.0 and noisy < clean


def test_stoi_when_installed():
    pytest.importorskip("pystoi")
    g = torch.Generator().manual_seed(0)
    ref = 0.3 * torch.randn(1, 1, 32000, generator=g)
    assert stoi_score(ref, ref.clone(), 16000) == pytest.approx(1.0, abs=1e-3)
    assert stoi_score(ref, torch.randn(1, 1, 32000, generator=g), 16000) < 0.5


def test_spectral_and_perceptual_metrics_are_undefined_for_short_clips():
    """Clips shorter than the largest STFT window give None (n/a), not an exception; one sample
    more and the value is a number."""
    from training.metrics import mel_distance, mel_min_samples, pesq_score, stft_distance, stft_min_samples, stoi_score

    assert mel_min_samples() == stft_min_samples() == 1025  # DAC's and Parallel WaveGAN's 2048 windows
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 1025, generator=g) * 0.1
    y = x + 0.01 * torch.randn(1, 1, 1025, generator=g)
    short_x, short_y = x[..., :1024], y[..., :1024]
    assert mel_distance(short_x, short_y, 24000) is None and stft_distance(short_x, short_y) is None
    assert isinstance(mel_distance(x, y, 24000), float) and isinstance(stft_distance(x, y), float)
    assert pesq_score(short_x, short_y, 24000) is None  # P.862 needs 1/4 s
    assert stoi_score(short_x, short_y, 24000) is None  # pystoi would return a placeholder 1e-5


@pytest.mark.parametrize("samples", [1, 500, 4000])
def test_every_metric_of_a_too_short_clip_is_na_never_an_error(samples):
    """pystoi raises inside (an axis error) below one of its frames; every metric is then n/a."""
    from training.metrics import mel_distance, pesq_score, stft_distance, stoi_score

    g = torch.Generator().manual_seed(samples)
    x = torch.randn(1, 1, samples, generator=g) * 0.1
    y = x + 0.01 * torch.randn(1, 1, samples, generator=g)
    values = {"stoi": stoi_score(x, y, 24000), "pesq": pesq_score(x, y, 24000),
              "mel": mel_distance(x, y, 24000), "stft": stft_distance(x, y)}
    expected_na = {"stoi", "pesq"} | ({"mel", "stft"} if samples < 1025 else set())
    assert {k for k, v in values.items() if v is None} == expected_na, values
