"""DAC-faithful recipe defaults: pinned values with their source, the discriminator's input
preprocessing and the data pipeline's loudness normalisation checked against independent numpy
computations, and the gradient clip that train_step really applies."""

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from training.config import Config, DataConfig, DiscriminatorConfig, OptimConfig, create_training_config
from training.dataset import AudioDataset
from training.discriminators import Discriminator
from training.state import build_state
from training.train import train_step


def test_defaults_are_dacs():
    # descript-audio-codec conf/base.yml: VolumeNorm.db = -16
    assert DataConfig().loudness_db == -16.0
    # descript-audio-codec scripts/train.py: clip_grad_norm_(generator, 1e3), (discriminator, 10.0)
    assert OptimConfig().grad_clip_generator == 1e3
    assert OptimConfig().grad_clip_discriminator == 10.0
    # descript-audio-codec dac/model/discriminator.py Discriminator.preprocess: DC removal, peak 0.8
    assert DiscriminatorConfig().preprocess is True
    assert DiscriminatorConfig().preprocess_peak == 0.8


def _numpy_preprocess(x: np.ndarray, peak: float) -> np.ndarray:
    out = np.empty_like(x, dtype=np.float64)
    for i, clip in enumerate(x[:, 0].astype(np.float64)):
        centred = clip - clip.mean()
        out[i, 0] = peak * centred / (np.abs(centred).max() + 1e-9)
    return out


def _tiny_disc(preprocess: bool) -> Discriminator:
    cfg = DiscriminatorConfig(periods=(2,), mpd_channels=(2, 2, 2, 2, 2), stft_fft_sizes=(256,), stft_channels=2,
                              preprocess=preprocess)
    return Discriminator(cfg, 24000)


def test_discriminator_sees_dc_free_audio_peaking_at_0_8():
    torch.manual_seed(0)
    x = 0.05 * torch.randn(3, 1, 4000) + torch.tensor([0.3, -0.1, 0.0]).view(3, 1, 1)  # offsets, quiet
    x[2] *= 20  # a loud clip next to quiet ones: each clip is normalised on its own
    seen = []
    disc = _tiny_disc(True)
    inner = disc.mpd._forward  # what the combined discriminator hands its input to

    def spy(audio):
        seen.append(audio.detach().clone())
        return inner(audio)

    disc.mpd._forward = spy
    with torch.no_grad():
        disc(x)
    expected = _numpy_preprocess(x.numpy(), 0.8)
    np.testing.assert_allclose(seen[0].numpy(), expected, atol=1e-6)
    assert np.allclose(np.abs(expected).max(-1), 0.8) and np.allclose(expected.mean(-1), 0, atol=1e-7)


def test_discriminator_output_ignores_gain_and_offset_only_when_preprocessing():
    torch.manual_seed(0)
    x = 0.1 * torch.randn(1, 1, 4000)
    shifted = 3.0 * x + 0.2
    for preprocess in (True, False):
        torch.manual_seed(1)
        disc = _tiny_disc(preprocess)
        with torch.no_grad():
            a, b = disc(x), disc(shifted)
        same = all(torch.allclose(la, lb, atol=1e-4) for (la, _), (lb, _) in zip(a, b))
        assert same == preprocess


def test_loudness_normalisation_matches_numpy(tmp_path, ljspeech_dir):
    clip, rate = sf.read(sorted((ljspeech_dir / "wavs").glob("*.wav"))[0], dtype="float64")
    quiet = clip * 0.01 / np.abs(clip).max()  # -40 dBFS peak: far below the target
    sf.write(tmp_path / "quiet.wav", quiet.astype(np.float32), rate, subtype="FLOAT")
    seg_len = 8192
    cfg = create_training_config(preset="tiny", dataset_path=str(tmp_path))
    ds = AudioDataset([tmp_path / "quiet.wav"], rate, seg_len, random_crop=False, loudness_db=cfg.data.loudness_db)
    got = ds[(0, 0)]["audio"][0].double().numpy()
    raw = quiet[:seg_len]
    rms_db = 10 * math.log10(np.mean(raw ** 2))
    gain = min(10 ** ((-16.0 - rms_db) / 20), 0.999 / np.abs(raw).max())  # target RMS, peak-limited
    np.testing.assert_allclose(got, raw * gain, rtol=1e-4, atol=1e-6)
    assert gain > 10  # the quiet clip really was brought up


@pytest.mark.parametrize("which", ["generator", "discriminator"])
def test_train_step_clips_each_network_with_its_own_limit(tmp_path, which):
    """A tiny limit must bound the applied update; the other network's limit must not interfere."""
    limits = {"generator": 1e-4, "discriminator": 1e-4}
    other = "discriminator" if which == "generator" else "generator"
    cfg = create_training_config(preset="tiny", batch_size=2, overrides={
        "data.segment_seconds": 0.17, "train.run_dir": str(tmp_path), "train.dead_code_steps": 0,
        f"optim.grad_clip_{which}": limits[which], f"optim.grad_clip_{other}": None,
        "optim.lr": 1e-3, "optim.weight_decay": 0.0})
    torch.manual_seed(0)
    state = build_state(cfg, torch.device("cpu"))
    net = state.generator if which == "generator" else state.discriminator
    grads = {}
    hooks = [p.register_post_accumulate_grad_hook(lambda p: grads.__setitem__(id(p), p.grad.clone()))
             for p in net.parameters() if p.requires_grad]
    train_step(state, {"audio": 0.1 * torch.randn(2, 1, cfg.segment_length())})
    for h in hooks:
        h.remove()
    clipped = [p.grad for p in net.parameters() if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped]))
    assert total <= limits[which] * 1.01  # what the optimizer stepped with
    raw = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    assert raw > 10 * limits[which]  # and the raw gradient really was larger
