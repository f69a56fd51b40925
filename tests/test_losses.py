"""Losses: mel filterbank vs librosa, zero for identical inputs, gradients, weighting, precision."""

import dataclasses

import numpy as np
import pytest
import torch

from training import losses
from training.config import DiscriminatorConfig, LossConfig
from training.discriminators import Discriminator
from training.losses import (
    GeneratorLoss,
    MelSpectrogramLoss,
    MultiResolutionSTFTLoss,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
    mel_filterbank,
)

SR = 24000
T = 4096


def _pair(batch=2, length=T, noise=0.05):
    g = torch.Generator().manual_seed(1)
    real = 0.3 * torch.randn(batch, 1, length, generator=g)
    fake = real + noise * torch.randn(batch, 1, length, generator=g)
    return real, fake


def _small_discriminator():
    cfg = DiscriminatorConfig(periods=(2, 3), mpd_channels=(4, 8, 8, 8, 8), stft_fft_sizes=(256, 128),
                              stft_channels=4)
    return Discriminator(cfg, SR)


# ---- mel filterbank ------------------------------------------------------------------


@pytest.mark.parametrize("sr,n_fft,n_mels,fmin,fmax", [
    (24000, 2048, 320, 0.0, None),
    (24000, 32, 5, 0.0, None),
    (44100, 1024, 80, 50.0, 16000.0),
    (32000, 512, 64, 20.0, None),
    (16000, 511, 40, 0.0, 8000.0),  # odd FFT size: bins at k * sr / n_fft, not up to Nyquist
])
def test_mel_filterbank_matches_librosa(sr, n_fft, n_mels, fmin, fmax):
    librosa = pytest.importorskip("librosa")
    ours = mel_filterbank(sr, n_fft, n_mels, fmin, fmax)
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == ref.shape
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-6, rtol=0)
    # The filters are small numbers; also require agreement relative to their scale.
    assert np.abs(ours.numpy() - ref).max() <= 1e-5 * np.abs(ref).max()


def test_mel_filterbank_rejects_bad_range():
    with pytest.raises(ValueError, match="fmax"):
        mel_filterbank(16000, 512, 40, fmin=0.0, fmax=9000.0)


# ---- spectral losses -------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", [lambda: MelSpectrogramLoss(SR), lambda: MultiResolutionSTFTLoss()])
def test_spectral_loss_zero_for_identical_positive_otherwise(loss_fn):
    loss = loss_fn()
    real, fake = _pair()
    assert loss(real, real.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert loss(real, fake).item() > 1e-3
    # A larger error gives a larger loss.
    assert loss(real, _pair(noise=0.3)[1]).item() > loss(real, fake).item()


def test_mel_loss_matches_direct_computation():
    """Sum over scales of L1 between log10(clamp(mel)) computed from scratch."""
    real, fake = _pair(batch=1)
    loss = MelSpectrogramLoss(SR, window_lengths=(64, 512), n_mels=(10, 80), clamp=1e-5)
    expected = 0.0
    for win, mels in ((64, 10), (512, 80)):
        fb = mel_filterbank(SR, win, mels)
        def logmel(x):
            spec = torch.stft(x[:, 0], win, win // 4, window=torch.hann_window(win), return_complex=True)
            return (fb @ spec.abs()).clamp(min=1e-5).log10()
        expected += (logmel(real) - logmel(fake)).abs().mean().item()
    assert loss(real, fake).item() == pytest.approx(expected, rel=1e-5)


def test_stft_loss_matches_direct_computation():
    real, fake = _pair(batch=1)
    loss = MultiResolutionSTFTLoss(fft_sizes=(512,), hop_sizes=(128,), win_lengths=(400,))
    def mag(x):
        spec = torch.stft(x[:, 0], 512, 128, win_length=400, window=torch.hann_window(400), return_complex=True)
        return spec.abs().square().clamp(min=1e-7).sqrt()
    mr, mf = mag(real), mag(fake)
    expected = (mr - mf).norm() / mr.norm() + (mr.log() - mf.log()).abs().mean()
    assert loss(real, fake).item() == pytest.approx(expected.item(), rel=1e-5)


def test_mel_loss_buffers_are_built_once_and_not_saved(monkeypatch):
    loss = MelSpectrogramLoss(SR)
    assert len(loss.state_dict()) == 0  # non-persistent: checkpoints do not carry them
    assert len(dict(loss.named_buffers())) == 2 * len(LossConfig.mel_window_lengths)
    def forbidden(*args, **kwargs):
        raise AssertionError("built during forward")
    monkeypatch.setattr(losses, "mel_filterbank", forbidden)
    monkeypatch.setattr(torch, "hann_window", forbidden)
    real, fake = _pair()
    assert loss(real, fake).item() > 0


@pytest.mark.parametrize("loss_fn", [lambda: MelSpectrogramLoss(SR), lambda: MultiResolutionSTFTLoss()])
def test_spectral_losses_reject_bad_shapes(loss_fn):
    loss = loss_fn()
    real, fake = _pair()
    with pytest.raises(ValueError, match=r"\(batch, 1, samples\)"):
        loss(real[:, 0], fake[:, 0])
    with pytest.raises(ValueError, match="same shape"):
        loss(real, fake[..., :-1])
    with pytest.raises(ValueError, match="too short"):
        loss(real[..., :500], fake[..., :500])


def _recording(method, dtypes):
    """Wrap a bound method so that each call appends its output's dtype to ``dtypes``."""
    def wrapper(*args, **kwargs):
        out = method(*args, **kwargs)
        dtypes.append(out.dtype)
        return out
    return wrapper


@pytest.mark.parametrize("make,inner", [(lambda: MelSpectrogramLoss(SR), "log_mel"),
                                        (lambda: MultiResolutionSTFTLoss(), "magnitude")])
def test_spectral_losses_are_fp32_under_bf16_autocast(make, inner):
    """Inside a bf16 autocast region the spectral losses compute exactly what they compute outside it.

    The guarded effect: CPU autocast runs the mel filterbank matmul (and on CUDA more ops) in bf16,
    which moves the mel loss by ~2e-5 relative on this pair while the final L1 (an fp32 op) still
    returns float32. So the value must be bit-identical to the fp32 computation on the same inputs
    (same fp32 ops on the same CPU tensors are deterministic), and the spectrograms themselves,
    observed through the per-scale method, must be float32.
    """
    real, fake = _pair()
    loss = make()
    reference = loss(real, fake)
    dtypes = []
    loss.__dict__[inner] = _recording(getattr(loss, inner), dtypes)  # instance attribute shadows the method
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(real, fake)
    assert dtypes and all(d == torch.float32 for d in dtypes), dtypes
    assert value.dtype == torch.float32
    assert torch.equal(value, reference), (value.item(), reference.item())


# ---- adversarial losses ------------------------------------------------------------------


def _outputs(logit_values, fmap_values=()):
    return [(torch.full((2, 1, 3), float(v)), [torch.full((2, 4, 5), float(f)) for f in fmap_values])
            for v in logit_values]


def test_discriminator_loss_values():
    # A perfect discriminator (real -> 1, fake -> 0) has zero loss.
    assert discriminator_loss(_outputs([1, 1]), _outputs([0, 0])).item() == 0.0
    # Logits 0 everywhere: (1 - 0)^2 per sub-discriminator from the real side.
    assert discriminator_loss(_outputs([0, 0, 0]), _outputs([0, 0, 0])).item() == pytest.approx(3.0)
    # Real 0.5, fake 0.5: 0.25 + 0.25 per sub-discriminator.
    assert discriminator_loss(_outputs([0.5, 0.5]), _outputs([0.5, 0.5])).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sub-discriminator"):
        discriminator_loss(_outputs([0, 0]), _outputs([0]))


def test_generator_loss_values():
    assert generator_loss(_outputs([1, 1])).item() == 0.0
    assert generator_loss(_outputs([0, 0])).item() == pytest.approx(2.0)
    assert generator_loss(_outputs([3])).item() == pytest.approx(4.0)


def test_feature_matching_sums_layers_and_discriminators():
    real = _outputs([0, 0], fmap_values=(1.0, 2.0, 3.0))
    assert feature_matching_loss(real, real).item() == 0.0
    fake = _outputs([0, 0], fmap_values=(1.5, 2.0, 2.0))
    # Per sub-discriminator: |1.5-1| + 0 + |2-3| = 1.5; two sub-discriminators.
    assert feature_matching_loss(real, fake).item() == pytest.approx(3.0)


def test_feature_matching_does_not_train_through_real_features():
    real = [(torch.zeros(1), [torch.ones(3, requires_grad=True)])]
    fake = [(torch.zeros(1), [torch.zeros(3, requires_grad=True)])]
    feature_matching_loss(real, fake).backward()
    assert real[0][1][0].grad is None
    assert fake[0][1][0].grad.abs().sum() > 0


# ---- GeneratorLoss ---------------------------------------------------------------------------


def test_generator_loss_applies_config_weights_once():
    cfg = dataclasses.replace(LossConfig(), mel=3.0, stft=0.5, adversarial=2.0, feature_matching=7.0,
                              commitment=0.1, codebook=4.0)
    gl = GeneratorLoss(cfg, SR)
    assert gl.weights == {"mel": 3.0, "stft": 0.5, "commitment": 0.1, "codebook": 4.0,
                          "adversarial": 2.0, "feature_matching": 7.0}
    disc = _small_discriminator()
    real, fake = _pair()
    commitment, codebook = torch.tensor(0.3), torch.tensor(0.7)
    total, terms = gl(real, fake, commitment, codebook, disc(real), disc(fake))
    assert set(terms) == set(gl.weights)
    assert terms["commitment"].item() == pytest.approx(0.3) and terms["codebook"].item() == pytest.approx(0.7)
    assert terms["mel"].item() == pytest.approx(MelSpectrogramLoss(SR)(real, fake).item())
    expected = sum(gl.weights[k] * terms[k].item() for k in terms)
    assert total.item() == pytest.approx(expected, rel=1e-6)

    total_no_disc, terms_no_disc = gl(real, fake, commitment, codebook)
    assert set(terms_no_disc) == {"mel", "stft", "commitment", "codebook"}
    assert total_no_disc.item() == pytest.approx(
        total.item() - 2.0 * terms["adversarial"].item() - 7.0 * terms["feature_matching"].item(), rel=1e-5)


def test_generator_loss_needs_both_discriminator_outputs():
    gl = GeneratorLoss(LossConfig(), SR)
    disc = _small_discriminator()
    real, fake = _pair()
    with pytest.raises(ValueError, match="both"):
        gl(real, fake, torch.tensor(0.0), torch.tensor(0.0), disc_fake=disc(fake))


def test_generator_loss_zero_reconstruction_terms_for_identical_audio():
    gl = GeneratorLoss(LossConfig(), SR)
    real, _ = _pair()
    disc = _small_discriminator()
    _, terms = gl(real, real.clone(), torch.tensor(0.0), torch.tensor(0.0), disc(real), disc(real.clone()))
    for key in ("mel", "stft", "feature_matching"):
        assert terms[key].item() == pytest.approx(0.0, abs=1e-6), key


@pytest.mark.parametrize("term", ["mel", "stft", "adversarial", "feature_matching"])
def test_gradient_reaches_generator_output_through_each_term(term):
    gl = GeneratorLoss(LossConfig(), SR)
    disc = _small_discriminator()
    real, fake = _pair()
    fake = fake.requires_grad_()
    _, terms = gl(real, fake, torch.tensor(0.0), torch.tensor(0.0), disc(real), disc(fake))
    (grad,) = torch.autograd.grad(terms[term], fake)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum().item() > 0


def test_vq_terms_pass_gradient_with_their_weights():
    gl = GeneratorLoss(LossConfig(), SR)
    real, fake = _pair()
    commitment = torch.tensor(0.5, requires_grad=True)
    codebook = torch.tensor(0.5, requires_grad=True)
    total, _ = gl(real, fake, commitment, codebook)
    total.backward()
    assert commitment.grad.item() == pytest.approx(LossConfig.commitment)
    assert codebook.grad.item() == pytest.approx(LossConfig.codebook)


def test_spectral_losses_keep_fp32_after_module_cast():
    real, fake = _pair()
    for loss in (MelSpectrogramLoss(SR), MultiResolutionSTFTLoss()):
        reference = loss(real, fake).item()
        value = loss.double()(real, fake)  # fp32 -> fp64 buffers is lossless
        assert value.dtype == torch.float32 and value.item() == pytest.approx(reference, rel=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generator_loss_on_cuda_matches_cpu():
    gl = GeneratorLoss(LossConfig(), SR)
    real, fake = _pair()
    args = (torch.tensor(0.1), torch.tensor(0.2))
    total_cpu, _ = gl(real, fake, *args)
    gl = gl.to("cuda")
    assert all(b.device.type == "cuda" for b in gl.buffers())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total_gpu, _ = gl(real.cuda(), fake.cuda(), *(a.cuda() for a in args))
    assert total_gpu.dtype == torch.float32
    assert total_gpu.item() == pytest.approx(total_cpu.item(), rel=1e-4)
