"""Discriminators: output structure and shapes at each model sample rate, bad input, gradients."""

import pytest
import torch

from training.config import DiscriminatorConfig, model_preset
from training.discriminators import (
    Discriminator,
    MultiPeriodDiscriminator,
    MultiScaleSTFTDiscriminator,
    PeriodDiscriminator,
    STFTDiscriminator,
)


def _mpd_frames(samples: int, period: int) -> int:
    frames = -(-samples // period)
    for _ in range(4):  # four stride-3 layers, kernel 5, padding 2
        frames = (frames + 2 * 2 - 5) // 3 + 1
    return frames


def _band_width_after_stack(width: int) -> int:
    for _ in range(3):  # three stride-2 layers along frequency, kernel 9, padding 4
        width = (width + 2 * 4 - 9) // 2 + 1
    return width


def _expected_shapes(cfg: DiscriminatorConfig, batch: int, samples: int):
    shapes = [(batch, 1, _mpd_frames(samples, p), p) for p in cfg.periods]
    for n_fft in cfg.stft_fft_sizes:
        hop = int(n_fft * cfg.stft_hop_factor)
        bins = n_fft // 2 + 1
        edges = [int(b * bins) for b in cfg.stft_bands]
        width = sum(_band_width_after_stack(hi - lo) for lo, hi in zip(edges[:-1], edges[1:]))
        shapes.append((batch, 1, 1 + samples // hop, width))
    return shapes


@pytest.mark.parametrize("preset", ["24khz", "32khz", "44khz"])
def test_combined_output_shapes_at_model_rates(preset):
    sample_rate = model_preset(preset).sampling_rate
    cfg = DiscriminatorConfig()
    disc = Discriminator(cfg, sample_rate)
    samples = sample_rate // 10  # 0.1 s at the model's rate
    x = 0.1 * torch.randn(1, 1, samples)
    with torch.no_grad():
        outputs = disc(x)
    assert len(outputs) == disc.num_discriminators == len(cfg.periods) + len(cfg.stft_fft_sizes)
    assert [tuple(logits.shape) for logits, _ in outputs] == _expected_shapes(cfg, 1, samples)
    n_bands = len(cfg.stft_bands) - 1
    assert [len(fmaps) for _, fmaps in outputs] == [5] * len(cfg.periods) + [5 * n_bands] * len(cfg.stft_fft_sizes)
    for logits, fmaps in outputs:
        assert all(torch.isfinite(f).all() for f in fmaps) and torch.isfinite(logits).all()
        assert all(f is not logits for f in fmaps)


def test_stft_band_edges_follow_sample_rate():
    for sample_rate in (24000, 44100):
        d = STFTDiscriminator(1024, 256, sample_rate=sample_rate)
        low, high = d.band_edges_hz[-1]
        assert high == pytest.approx(sample_rate / 2, rel=2e-3)  # last band ends at Nyquist
        assert low == pytest.approx(0.75 * sample_rate / 2, rel=2e-3)
    with pytest.raises(ValueError, match="sample_rate"):
        STFTDiscriminator(1024, 256).band_edges_hz


def test_mpd_channels_and_weight_norm():
    d = PeriodDiscriminator(3, channels=(4, 8, 16, 16, 16))
    assert [c.out_channels for c in d.convs] == [4, 8, 16, 16, 16]
    assert [c.stride for c in d.convs] == [(3, 1)] * 4 + [(1, 1)]
    # Weight norm splits every conv weight into a magnitude and a direction.
    assert all(hasattr(c, "parametrizations") and hasattr(c.parametrizations, "weight") for c in d.convs)
    logits, fmaps = d(torch.randn(2, 1, 1000))[0]
    assert logits.shape[-1] == 3 and len(fmaps) == 5
    # Hidden activations are leaky ReLU outputs: negative values are scaled by 0.1, so exist.
    assert any((f < 0).any() for f in fmaps)


def test_period_fold_pads_only_when_needed():
    d = PeriodDiscriminator(5, channels=(2, 2, 2, 2, 2))
    assert d.fold(torch.randn(1, 1, 100)).shape == (1, 1, 20, 5)
    assert d.fold(torch.randn(1, 1, 101)).shape == (1, 1, 21, 5)


def test_stft_discriminator_window_is_a_buffer():
    d = STFTDiscriminator(512, 128, sample_rate=16000)
    assert "window" in dict(d.named_buffers())
    assert "window" not in d.state_dict()
    assert d.window.shape == (512,)


@pytest.mark.parametrize("make", [
    lambda: MultiPeriodDiscriminator(periods=(2,), channels=(2, 2, 2, 2, 2)),
    lambda: MultiScaleSTFTDiscriminator(fft_sizes=(256,), sample_rate=24000, channels=2),
    lambda: Discriminator(DiscriminatorConfig(periods=(2,), mpd_channels=(2, 2, 2, 2, 2),
                                              stft_fft_sizes=(256,), stft_channels=2), 24000),
])
def test_bad_input_shapes_are_rejected(make):
    d = make()
    for bad in (torch.randn(2, 1000), torch.randn(2, 2, 1000), torch.randint(0, 5, (2, 1, 1000))):
        with pytest.raises(ValueError, match=r"\(batch, 1, samples\)"):
            d(bad)


def test_too_short_for_stft_is_a_clear_error():
    d = STFTDiscriminator(2048, 512, sample_rate=24000, channels=2)
    with pytest.raises(ValueError, match="too short"):
        d(torch.randn(1, 1, 800))


def test_invalid_bands_are_rejected():
    with pytest.raises(ValueError, match="bands"):
        STFTDiscriminator(512, 128, bands=(0.0, 0.5, 0.4, 1.0))
    with pytest.raises(ValueError, match="no bins"):
        STFTDiscriminator(8, 2, bands=(0.0, 0.1, 0.2, 1.0))


def test_gradient_reaches_input_and_parameters_of_every_subdiscriminator():
    cfg = DiscriminatorConfig(periods=(2, 3), mpd_channels=(4, 4, 4, 4, 4), stft_fft_sizes=(256, 128),
                              stft_channels=4)
    disc = Discriminator(cfg, 32000)
    x = (0.1 * torch.randn(2, 1, 2048)).requires_grad_()
    outputs = disc(x)
    sum(logits.square().mean() for logits, _ in outputs).backward()
    assert x.grad.abs().sum() > 0
    for sub in list(disc.mpd.discriminators) + list(disc.mstft.discriminators):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sub.parameters())


def test_parameter_count_at_reference_config():
    disc = Discriminator(DiscriminatorConfig(), 24000)
    n_mpd = sum(p.numel() for p in disc.mpd.parameters())
    n_stft = sum(p.numel() for p in disc.mstft.parameters())
    # Counted by hand (weights + biases + weight-norm gains): per period discriminator
    # 224 + 20,736 + 328,704 + 2,623,488 + 5,244,928 + 3,074 (post) = 8,221,154;
    # per STFT discriminator 5 bands x 94,208 + 290 (post) = 471,330, three of them.
    assert n_mpd == 5 * 8_221_154
    assert n_stft == 1_413_990


def test_runs_under_bf16_autocast():
    """The STFT runs in fp32 (no bf16 kernels); the convs follow autocast."""
    cfg = DiscriminatorConfig(periods=(2,), mpd_channels=(4, 4, 4, 4, 4), stft_fft_sizes=(256,), stft_channels=4)
    disc = Discriminator(cfg, 24000)
    x = 0.1 * torch.randn(1, 1, 2048)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = disc(x.bfloat16())
    assert all(logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all() for logits, _ in outputs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moves_to_cuda_with_its_windows():
    disc = Discriminator(DiscriminatorConfig(), 44100).to("cuda")
    assert all(b.device.type == "cuda" for b in disc.buffers())
    outputs = disc(0.1 * torch.randn(2, 1, 8192, device="cuda"))
    assert len(outputs) == disc.num_discriminators


@pytest.mark.parametrize("part", ["all", "mpd", "mstft"])
def test_each_discriminator_compiles_to_one_graph(part):
    import torch._dynamo

    from training.config import create_training_config

    disc = Discriminator(create_training_config(preset="tiny").discriminator, 24000)
    module = {"all": disc, "mpd": disc.mpd, "mstft": disc.mstft}[part]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(module)(0.1 * torch.randn(2, 1, 4096))
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_input_is_checked_once_at_the_top(monkeypatch):
    import training.discriminators as D

    calls = []
    real_check = D.check_audio
    monkeypatch.setattr(D, "check_audio", lambda x: (calls.append(tuple(x.shape)), real_check(x)))
    cfg = DiscriminatorConfig(periods=(2, 3), mpd_channels=(2, 2, 2, 2, 2), stft_fft_sizes=(256, 128), stft_channels=2)
    Discriminator(cfg, 24000)(torch.randn(1, 1, 2048))
    assert calls == [(1, 1, 2048)]
