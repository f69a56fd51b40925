"""training.codec: exactness against snac, chunking, batching, noise, codes files, metrics."""

import copy
import json
import warnings

import numpy as np
import pytest
import snac
import torch

from training.codec import (
    Codec, CodecError, EncodedAudio, compute_metrics, format_table, keyed_noise, load_codec, load_codes,
    mean_metrics, plan_windows, plot_spectrograms, receptive_field, save_codes, select_device,
)
from training.config import Config, model_preset
from training.model import build_generator
from training.hub import export_snac

from diverse_model import distinct_codes, whiten_quantizer_inputs

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

SR = 24000


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1234)
    cfg = model_preset("tiny")
    return build_generator(cfg).eval(), cfg


@pytest.fixture(scope="module")
def codec(tiny):
    model, cfg = tiny
    return Codec(model, cfg, device="cpu")


def _speechlike(seconds: float, seed: int = 0) -> torch.Tensor:
    """(1, 1, T) band-limited noise bursts: non-trivial codes, deterministic."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * SR)
    x = torch.randn(n, generator=g)
    x = torch.nn.functional.avg_pool1d(x[None, None], 5, 1, 2)[0, 0]
    envelope = (torch.sin(torch.arange(n) / SR * 2 * np.pi * 1.7) > 0).float()
    return (0.3 * x * envelope)[None, None]


def test_codes_equal_snac_encode(codec, tiny):
    model, _ = tiny
    x = _speechlike(3.3)
    with torch.no_grad():
        ref = model.encode(x)
    ours = codec.encode(x)
    assert [c.shape for c in ours] == [c.shape for c in ref]
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_decode_trims_to_input_length_and_is_deterministic(codec):
    x = _speechlike(1.0)[..., :12345]
    y1 = codec.roundtrip(x)
    y2 = codec.roundtrip(x)
    assert y1.shape == (1, 1, 12345)
    assert torch.equal(y1, y2)  # keyed noise: same seed, same audio
    other = Codec(codec.model, codec.cfg, device="cpu", noise_seed=1)
    assert not torch.allclose(other.roundtrip(x), y1, atol=1e-4)  # the noise does matter


def test_keyed_noise_slices_are_position_consistent():
    whole = keyed_noise(3, 1, 0, 20000)
    assert torch.equal(keyed_noise(3, 1, 5000, 9000), whole[5000:14000])
    assert not torch.equal(keyed_noise(3, 2, 0, 20000), whole)
    assert abs(float(whole.mean())) < 0.05 and abs(float(whole.std()) - 1.0) < 0.05


def test_plan_windows_tiles_and_bounds_context():
    q = 2048
    total, chunk, ctx = 40 * q, 8 * q, 3 * q
    windows = plan_windows(total, chunk, ctx)
    kept = [(w.keep_start, w.keep_stop) for w in windows]
    assert kept[0][0] == 0 and kept[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(kept, kept[1:]))
    for w in windows:
        assert w.start == 0 or w.keep_start - w.start == ctx
        assert w.stop == total or w.stop - w.keep_stop == ctx
        assert all(v % q == 0 for v in w)
    assert plan_windows(10 * q, chunk, ctx) == [(0, 10 * q, 0, 10 * q)]


def test_receptive_field_bounds_measured_influence(codec):
    """Perturb one input sample / one code; nothing changes beyond the computed reach."""
    reach = receptive_field(codec.model)
    hop, strides = codec.hop_length, codec.cfg.vq_strides
    x = _speechlike(3.0)
    pos = x.shape[-1] // 2
    y = x.clone()
    y[..., pos] += 0.5
    changed = []
    for level, (a, b) in enumerate(zip(codec.encode(x), codec.encode(y))):
        idx = (a != b).nonzero()[:, 1]
        unit = hop * strides[level]
        changed += [int(i) * unit for i in idx] + [(int(i) + 1) * unit for i in idx]
    assert changed, "a 0.5 impulse should change at least one code"
    assert max(abs(c - pos) for c in changed) <= reach.encoder

    codes = codec.encode(x)
    mid = codes[-1].shape[-1] // 2  # one finest-level code, spanning hop samples
    altered = [c.clone() for c in codes]
    altered[-1][0, mid] = (altered[-1][0, mid] + 1) % codec.codebook_size
    diff = (codec.decode(codes) - codec.decode(altered)).abs()[0, 0] > 1e-6
    where = diff.nonzero()[:, 0]
    assert len(where) > 0
    assert int(where.min()) >= mid * hop - reach.decoder and int(where.max()) < (mid + 1) * hop + reach.decoder


def test_batched_items_equal_single_items(codec):
    a, b = _speechlike(2.2, seed=1)[0, 0], _speechlike(0.7, seed=2)[0, 0]
    together = codec.encode_many([a, b])
    alone = codec.encode_many([b])
    for x, y in zip(together[1], alone[0]):
        assert torch.equal(x, y)
    dec_together = codec.decode_many(together)
    dec_alone = codec.decode_many(alone)
    assert torch.allclose(dec_together[1], dec_alone[0], atol=1e-5)


@pytest.mark.slow
def test_chunked_matches_one_shot_on_60s():
    """Chunked encoding gives snac.SNAC.encode's one-shot codes on 60 s; chunked decoding agrees
    with one-shot decoding to float32 rounding (max |diff| < 1e-4).

    The model is code-diverse on this signal (checked below), so a window whose context is shorter
    than the encoder's reach changes codes near the window seams and fails the comparison.
    """
    torch.manual_seed(1234)
    cfg = model_preset("tiny")
    model = build_generator(cfg).eval()
    x = _speechlike(60.0, seed=3)
    whiten_quantizer_inputs(model, x)
    with torch.no_grad():
        reference = snac.SNAC.encode(copy.deepcopy(model), x)  # one shot, the snac package's own code
    distinct = distinct_codes(reference)
    assert min(distinct) >= cfg.codebook_size // 2, distinct

    chunked = Codec(model, cfg, device="cpu", chunk_seconds=1.0, batch_size=4)
    assert chunked.chunk * 50 < x.shape[-1]  # really chunked: 59 windows, 58 seams
    codes_chunked = chunked.encode(x)
    for level, (a, b) in enumerate(zip(reference, codes_chunked)):
        assert a.shape == b.shape
        assert torch.equal(a, b), f"level {level}: {int((a != b).sum())} of {a.numel()} codes differ"

    one_shot = Codec(model, cfg, device="cpu", chunk_seconds=120.0)
    audio_one = one_shot.decode(reference, x.shape[-1])
    audio_chunked = chunked.decode(reference, x.shape[-1])
    assert audio_chunked.shape == x.shape
    assert float((audio_one - audio_chunked).abs().max()) < 1e-4


def test_codes_file_roundtrip_and_validation(codec, tmp_path):
    x = _speechlike(1.5)
    codes = [c[0] for c in codec.encode(x)]
    enc = EncodedAudio(codes=codes, length=x.shape[-1], sample_rate=SR, input_sample_rate=22050,
                       input_length=33075, model=codec.identity())
    path = save_codes(tmp_path / "a.npz", enc)
    back = load_codes(path)
    assert all(torch.equal(a, b) for a, b in zip(back.codes, codes))
    assert (back.length, back.input_sample_rate, back.input_length) == (x.shape[-1], 22050, 33075)
    assert back.model["fingerprint"] == codec.identity()["fingerprint"]
    with np.load(path) as z:
        assert z["codes_0"].dtype == np.uint16 and len([k for k in z.files if k.startswith("codes_")]) == 3
    audio, rate, _ = codec.decode_encoded([back])[0]
    assert rate == SR and audio.shape == (x.shape[-1],)

    with pytest.raises(CodecError, match="levels"):
        codec.check_encoded(EncodedAudio(codes[:2], enc.length, SR, SR, enc.length))
    bad = [c.clone() for c in codes]
    bad[1][3] = codec.codebook_size
    with pytest.raises(CodecError, match="outside the codebook"):
        codec.check_encoded(EncodedAudio(bad, enc.length, SR, SR, enc.length))
    with pytest.raises(CodecError, match="codebook size 4096"):
        codec.check_encoded(EncodedAudio(codes, enc.length, SR, SR, enc.length, model={"config": {"codebook_size": 4096}}))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CodecError, match="not a codes file"):
        load_codes(tmp_path / "junk.npz")


def test_exported_directory_decodes_identically(codec, tiny, tmp_path):
    model, cfg = tiny
    out = export_snac(model, cfg, tmp_path / "exported")
    reloaded = snac.SNAC.from_pretrained(str(out))
    codes = codec.encode(_speechlike(1.2))
    torch.manual_seed(7)
    with torch.no_grad():
        a = model.decode(codes)
    torch.manual_seed(7)
    with torch.no_grad():
        b = reloaded.decode(codes)
    assert torch.equal(a, b)
    assert torch.equal(Codec(reloaded, cfg, device="cpu").decode(codes), codec.decode(codes))


def test_load_codec_from_checkpoint(tiny, tmp_path):
    model, cfg = tiny
    ckpt = tmp_path / "run" / "checkpoints" / "latest.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"generator": model.state_dict(), "config": Config(model=cfg).to_dict(), "step": 3}, ckpt)
    for source in (ckpt, tmp_path / "run"):
        c = load_codec(source, device="cpu")
        assert c.sample_rate == SR and c.device.type == "cpu" and c.autocast_dtype is None
        assert c.identity()["fingerprint"] == Codec(model, cfg, device="cpu").identity()["fingerprint"]


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert select_device("auto").type == expected
    with pytest.raises(CodecError, match="unknown device"):
        select_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(CodecError, match="CUDA is not available"):
            select_device("cuda")


def test_metrics_fields_and_24khz_bitrate(tmp_path):
    cfg = model_preset("24khz")
    ref = _speechlike(2.0)[0, 0]
    est = ref + 0.01 * torch.randn_like(ref)
    codes = [torch.zeros(n, dtype=torch.long) for n in (24, 48, 96)]
    m = compute_metrics(ref, est, SR, cfg, 22050, codes, encode_seconds=0.5, decode_seconds=1.0)
    assert round(m["bitrate_kbps"], 2) == 0.98
    assert [round(r, 1) for r in m["token_rates_hz"]] == [11.7, 23.4, 46.9]
    assert m["compression_ratio"] == pytest.approx(22050 * 16 / 1000 / m["bitrate_kbps"])
    assert m["encode_rtf"] == pytest.approx(0.25) and m["decode_rtf"] == pytest.approx(0.5)
    assert m["si_sdr_db"] > 20 and m["tokens_per_level"] == [24, 48, 96]
    assert {"pesq", "stoi", "mel_distance", "stft_distance", "duration_s"} <= set(m)
    mean = mean_metrics([m, {**m, "si_sdr_db": m["si_sdr_db"] + 2}])
    assert mean["si_sdr_db"] == pytest.approx(m["si_sdr_db"] + 1)
    table = format_table([("a.wav", m), ("mean", mean)])
    assert "SI-SDR" in table and "a.wav" in table and len(table.splitlines()) == 4
    json.dumps(m)  # JSON-serialisable
    pytest.importorskip("matplotlib")
    png = plot_spectrograms(ref, est, SR, tmp_path / "p.png", "title")
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_fp32(tiny):
    """bf16 autocast decoding on CUDA differs from CPU fp32 decoding of the same codes by rounding only.

    Bound, derived from the effect: bf16 keeps 8 significant bits, a relative rounding error of at
    most 2**-9 ~ 2e-3 per rounded value. The tiny decoder applies ~30 convolutions, each rounding
    its inputs and weights; independent rounding errors add in quadrature, so the output's relative
    RMS error is about sqrt(30) * 2 * 2e-3 ~ 2e-2. The bound 5e-2 leaves 2.5x headroom, while a
    real fault (different decoder noise, codes searched in bf16, wrong trim, fp16 overflow) moves
    the output by O(1) of its RMS. The output waveform itself must be float32.
    """
    model, cfg = tiny
    x = _speechlike(3.0)
    cpu = Codec(copy.deepcopy(model), cfg, device="cpu")
    codes = cpu.encode(x)
    fp32 = cpu.decode(codes, x.shape[-1])
    gpu = Codec(copy.deepcopy(model), cfg, device="cuda")
    assert gpu.autocast_dtype == torch.bfloat16
    y = gpu.decode(codes, x.shape[-1])
    assert y.shape == x.shape and y.dtype == torch.float32
    rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
    assert rms(y - fp32) < 5e-2 * rms(fp32), (rms(y - fp32), rms(fp32))
