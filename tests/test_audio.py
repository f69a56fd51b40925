"""training.audio: decoding every input form, seeking, resampling, bad-file detection, saving."""

import io
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from training.audio import (
    AUDIO_EXTENSIONS, AudioReadError, audio_info, crop_or_pad, decode_audio, list_audio_files,
    load_audio, normalize_loudness, resample, rms_db, save_audio,
)

# --------------------------------------------------------------------------------------
# A folder of synthetic files covering the WAV variants, plus broken files (shared with
# test_dataset.py). Each good file holds a sine whose frequency identifies it.
# --------------------------------------------------------------------------------------

GOOD_SPECS = [
    # name, rate, channels, subtype, seconds, frequency
    ("mono16_16k.wav", 16000, 1, "PCM_16", 1.0, 220.0),
    ("stereo16_44k.wav", 44100, 2, "PCM_16", 0.7, 330.0),
    ("mono8_48k.wav", 48000, 1, "PCM_U8", 0.5, 440.0),
    ("mono24_48k.wav", 48000, 1, "PCM_24", 1.2, 550.0),
    ("float_44k.wav", 44100, 2, "FLOAT", 0.9, 660.0),
    ("mono16_48k.flac", 48000, 1, "PCM_16", 0.6, 770.0),
]
BAD_NAMES = ["corrupt.wav", "empty.wav", "notes.wav", "truncated.flac", "nan.wav"]


def sine(rate: int, seconds: float, freq: float, channels: int = 1) -> np.ndarray:
    """(T, C) float32 sine at 0.5 amplitude; the second channel is inverted-free copy at 0.25."""
    t = np.arange(int(round(rate * seconds))) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    cols = [x] + [0.5 * x] * (channels - 1)
    return np.stack(cols, axis=1)


def write_mixed_folder(root: Path) -> Path:
    """Write GOOD_SPECS files and the broken ones into ``root``; return it."""
    root.mkdir(parents=True, exist_ok=True)
    for name, rate, ch, subtype, secs, freq in GOOD_SPECS:
        fmt = "FLAC" if name.endswith(".flac") else "WAV"
        sf.write(root / name, sine(rate, secs, freq, ch), rate, format=fmt, subtype=subtype)
    good = (root / "mono16_16k.wav").read_bytes()
    (root / "corrupt.wav").write_bytes(good[:12] + bytes(range(256)) * 8)  # RIFF tag, garbage after
    (root / "empty.wav").write_bytes(b"")
    (root / "notes.wav").write_text("this is a text file, not audio\n" * 20)
    buf = io.BytesIO()
    sf.write(buf, sine(22050, 2.0, 300.0), 22050, format="FLAC", subtype="PCM_16")
    (root / "truncated.flac").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bad = sine(16000, 0.5, 200.0)
    bad[100] = np.nan
    sf.write(root / "nan.wav", bad, 16000, subtype="FLOAT")
    return root


def expected_mono(name: str, target_rate: int) -> np.ndarray:
    """The reference result for a GOOD_SPECS file: mean over channels, soxr to target_rate."""
    rate, ch, subtype, secs, freq = next(s[1:] for s in GOOD_SPECS if s[0] == name)
    x = sf.read(io.BytesIO(_encode(name)), dtype="float32", always_2d=True)[0].mean(axis=1)
    return resample(x, rate, target_rate)


def _encode(name: str) -> bytes:
    rate, ch, subtype, secs, freq = next(s[1:] for s in GOOD_SPECS if s[0] == name)
    buf = io.BytesIO()
    sf.write(buf, sine(rate, secs, freq, ch), rate, format="FLAC" if name.endswith("flac") else "WAV", subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory) -> Path:
    return write_mixed_folder(tmp_path_factory.mktemp("mixed"))


# --------------------------------------------------------------------------------------


def test_list_audio_files_sorted_and_filtered(tmp_path):
    (tmp_path / "b").mkdir()
    for rel in ["b/z.FLAC", "a.wav", "b/c.mp3", "readme.txt", "b/d.opus"]:
        (tmp_path / rel).write_bytes(b"x")
    got = [p.relative_to(tmp_path).as_posix() for p in list_audio_files(tmp_path)]
    assert got == ["a.wav", "b/c.mp3", "b/d.opus", "b/z.FLAC"]
    assert [p.name for p in list_audio_files(tmp_path, recursive=False)] == ["a.wav"]
    assert {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a"} <= set(AUDIO_EXTENSIONS)
    with pytest.raises(FileNotFoundError):
        list_audio_files(tmp_path / "missing")


def test_ljspeech_formats_decode_to_24k(ljspeech_dir):
    wavs = ljspeech_dir / "wavs"
    for name in ["LJ001-0001.flac", "LJ001-0025.mp3", "LJ001-0029.wav"]:
        info = audio_info(wavs / name)
        assert info.sample_rate == 22050 and info.channels == 1
        audio, rate = decode_audio(wavs / name, 24000)
        assert rate == 24000 and audio.dtype == torch.float32 and audio.shape[0] == 1
        # The header length (MP3: from the bitrate, may be a few hundred samples long) matches.
        assert abs(audio.shape[1] - info.num_frames * 24000 / 22050) < 0.01 * audio.shape[1]
        assert 0.01 < audio.abs().max() <= 1.0


@pytest.mark.parametrize("name", ["LJ001-0001.flac", "LJ001-0025.mp3", "LJ001-0029.wav"])
def test_seek_equals_slice_of_full_decode(ljspeech_dir, name):
    path = ljspeech_dir / "wavs" / name
    full, _ = decode_audio(path)
    part, rate = decode_audio(path, start=30000, num_frames=17640)
    assert rate == 22050 and part.shape == (1, 17640)
    torch.testing.assert_close(part, full[:, 30000:47640], atol=1e-6, rtol=0)
    # A range running past the end is clipped, not padded.
    tail, _ = decode_audio(path, start=full.shape[1] - 100, num_frames=1000)
    assert 0 < tail.shape[1] <= 1000


def test_value_forms_give_identical_tensors(ljspeech_dir):
    path = ljspeech_dir / "wavs" / "LJ001-0002.flac"
    ref, _ = decode_audio(path, 24000)
    raw = path.read_bytes()
    arr, sr = sf.read(path, dtype="float32")
    from torchcodec.decoders import AudioDecoder

    forms = [str(path), raw, {"bytes": raw, "path": path.name}, {"bytes": None, "path": str(path)},
             {"array": arr, "sampling_rate": sr}]
    for v in forms:
        out, rate = decode_audio(v, 24000)
        assert rate == 24000
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    out, _ = decode_audio(arr, 24000, source_rate=sr)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    out, _ = decode_audio(arr.tolist(), 24000, source_rate=sr)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # torchcodec resamples with its own filter: same signal, not bit-identical.
    out, _ = decode_audio(AudioDecoder(str(path)), 24000)
    assert abs(out.shape[1] - ref.shape[1]) <= 2
    n = min(out.shape[1], ref.shape[1])
    assert float((out[:, :n] - ref[:, :n]).abs().max()) < 0.02


def test_mixed_wav_variants(mixed_dir):
    for name, rate, ch, subtype, secs, freq in GOOD_SPECS:
        info = audio_info(mixed_dir / name)
        assert (info.num_frames, info.sample_rate, info.channels) == (int(round(rate * secs)), rate, ch)
        audio, out_rate = decode_audio(mixed_dir / name, 24000)
        assert out_rate == 24000 and audio.shape == (1, int(round(secs * 24000)))
        # Stereo files: L = 0.5 sin, R = 0.25 sin -> mono mix 0.375 sin.
        amp = 0.375 if ch == 2 else 0.5
        tol = 0.02 if subtype == "PCM_U8" else 0.002
        assert abs(float(audio.abs().max()) - amp) < tol + 0.01, name
        np.testing.assert_allclose(audio[0].numpy(), expected_mono(name, 24000), atol=tol)


@pytest.mark.parametrize("name,reason", [
    ("corrupt.wav", "readable"), ("empty.wav", "empty"), ("notes.wav", "readable"),
    ("truncated.flac", ""), ("nan.wav", "NaN"),
])
def test_bad_files_raise_with_path_and_reason(mixed_dir, name, reason):
    with pytest.raises(AudioReadError) as e:
        decode_audio(mixed_dir / name, 24000)
    assert name in str(e.value) and reason in str(e.value)


def test_truncated_wav_and_missing_file(tmp_path):
    buf = io.BytesIO()
    sf.write(buf, sine(16000, 1.0, 200.0), 16000, format="WAV", subtype="PCM_16")
    (tmp_path / "cut.wav").write_bytes(buf.getvalue()[:20000])
    with pytest.raises(AudioReadError, match="truncated"):
        decode_audio(tmp_path / "cut.wav")
    with pytest.raises(AudioReadError, match="not found"):
        decode_audio(tmp_path / "nope.flac")
    with pytest.raises(AudioReadError, match="sampling rate"):
        decode_audio(np.zeros(10, dtype=np.float32))
    with pytest.raises(AudioReadError, match="empty"):
        decode_audio({"array": np.zeros(0), "sampling_rate": 16000})
    with pytest.raises(AudioReadError, match="unsupported"):
        decode_audio(3.5)


def test_resample_shapes_and_frequency():
    rate_in, rate_out = 22050, 24000
    x = sine(rate_in, 1.0, 1000.0)[:, 0]
    y = resample(x, rate_in, rate_out)
    assert isinstance(y, np.ndarray) and y.shape == (24000,)
    spec = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spec) * rate_out / len(y) - 1000.0) < 2.0
    t = torch.from_numpy(np.stack([x, x])).unsqueeze(0)  # (1, 2, T)
    yt = resample(t, rate_in, rate_out)
    assert isinstance(yt, torch.Tensor) and yt.shape == (1, 2, 24000) and yt.dtype == torch.float32
    torch.testing.assert_close(yt[0, 1], torch.from_numpy(y.astype(np.float32)))
    assert resample(t, 16000, 16000) is t


def test_levels_crop_pad():
    x = torch.full((1, 1000), 0.1)
    assert math.isclose(rms_db(x), 20 * math.log10(0.1), abs_tol=1e-3)
    y = normalize_loudness(x, -30.0)
    assert math.isclose(rms_db(y), -30.0, abs_tol=1e-3)
    loud = normalize_loudness(torch.tensor([[0.9, -0.01, 0.01]]), 0.0)
    assert float(loud.abs().max()) <= 0.999 + 1e-6  # peak-limited
    seg, valid = crop_or_pad(torch.arange(10.0).unsqueeze(0), 6, start=7)
    assert valid == 3 and seg.tolist() == [[7.0, 8.0, 9.0, 0.0, 0.0, 0.0]]


def test_save_and_load_roundtrip(tmp_path):
    x = torch.from_numpy(sine(24000, 0.5, 440.0)[:, 0]).unsqueeze(0)
    out = save_audio(tmp_path / "sub" / "a.wav", x, 24000)
    assert out.is_file() and not list(out.parent.glob("*.tmp"))
    y = load_audio(out, 24000)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x, atol=1.0 / 32768 + 1e-6, rtol=0)
    save_audio(tmp_path / "b.wav", x[0], 24000, subtype="FLOAT")
    torch.testing.assert_close(load_audio(tmp_path / "b.wav"), x)
    with pytest.raises(ValueError):
        save_audio(tmp_path / "c.wav", torch.zeros(1, 1, 5), 24000)
