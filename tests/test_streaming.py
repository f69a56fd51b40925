"""Exact streaming decode and the interleaved token layout.

The claim: :class:`StreamingDecoder` returns, for any split of a code stream into pushes, the audio
of ``Codec.decode`` on the whole sequence (same keyed noise), with state that does not grow with the
stream; the sliding-window practice it replaces does not. Models: the tiny preset with random and
with trained weights, a tiny model with the 32/44 kHz layout (local attention, 4 levels), and the
real 24 / 32 / 44 kHz presets (the last two slow).
"""

import random

import pytest
import torch

from training.codec import Codec, CodecError
from training.codec.streaming import SlidingWindowDecoder, StreamingDecoder
from training.codec.tokens import FrameLayout, TokenLayoutError, frame_order
from training.config import ModelConfig, model_preset
from training.model import build_generator

TOL = 1e-5

# The 32 / 44 kHz decoder layout (local attention over 32 latent frames, 4 levels, strides 8/4/2/1)
# at the tiny preset's widths: attention streaming at test speed.
TINY_ATTENTION = ModelConfig(sampling_rate=32000, encoder_dim=8, encoder_rates=(2, 3, 8, 8), decoder_dim=64,
                             decoder_rates=(8, 8, 3, 2), attn_window_size=32, vq_strides=(8, 4, 2, 1),
                             codebook_size=256)


def random_codes(cfg: ModelConfig, frames: int, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, cfg.codebook_size, (batch, frames * (cfg.vq_strides[0] // s)), generator=g)
            for s in cfg.vq_strides]


def stream(decoder: StreamingDecoder, codes, sizes):
    """Push ``codes`` in pieces of ``sizes`` frames (cycled), then flush -> (B, 1, T) and the pieces."""
    per = decoder.codes_per_frame
    frames, pieces, i, k = codes[0].shape[-1] // per[0], [], 0, 0
    while i < frames:
        n = sizes[k % len(sizes)]
        pieces.append(decoder.push([c[:, i * r:(i + n) * r] for c, r in zip(codes, per)]))
        i, k = i + n, k + 1
    pieces.append(decoder.flush())
    return torch.cat(pieces, dim=-1), pieces


def codec_of(cfg: ModelConfig, seed: int = 0, model=None) -> Codec:
    torch.manual_seed(seed)
    return Codec(model if model is not None else build_generator(cfg), cfg, device="cpu", noise_seed=3)


@pytest.fixture(scope="module")
def tiny_codec():
    return codec_of(model_preset("tiny"))


@pytest.fixture(scope="module")
def trained_codec(trained_tiny):
    model, cfg = trained_tiny
    return Codec(model, cfg, device="cpu")


def random_sizes(seed: int, count: int = 64):
    rng = random.Random(seed)
    return [rng.choice([0, 1, 1, 2, 3, 5, 7]) for _ in range(count)]


@pytest.mark.parametrize("sizes", [[1], [3], "random"], ids=["1-frame", "3-frame", "random"])
def test_tiny_random_weights_stream_equals_whole_decode(tiny_codec, sizes):
    cfg = tiny_codec.cfg
    codes = random_codes(cfg, 23, batch=2)
    whole = tiny_codec.decode(codes)
    out, _ = stream(StreamingDecoder(tiny_codec), codes, random_sizes(1) if sizes == "random" else sizes)
    assert out.shape == whole.shape
    assert (out - whole).abs().max() < TOL


@pytest.mark.parametrize("sizes", [[1], [3], "random"], ids=["1-frame", "3-frame", "random"])
def test_trained_tiny_stream_of_real_speech_codes_equals_whole_decode(trained_codec, speech_24k, sizes):
    codes = trained_codec.encode(speech_24k)
    whole = trained_codec.decode(codes)
    assert whole.abs().max() > 0.05  # a trained decoder makes audible output: the comparison means something
    out, _ = stream(StreamingDecoder(trained_codec), codes, random_sizes(2) if sizes == "random" else sizes)
    assert (out - whole).abs().max() < TOL


def test_batched_streams_are_independent(trained_codec):
    cfg = trained_codec.cfg
    a, b = random_codes(cfg, 9, seed=1), random_codes(cfg, 9, seed=2)
    both, _ = stream(StreamingDecoder(trained_codec), [torch.cat([x, y]) for x, y in zip(a, b)], [2])
    alone, _ = stream(StreamingDecoder(trained_codec), b, [1])
    assert (both[1:] - alone).abs().max() < TOL
    assert (both[:1] - trained_codec.decode(a)).abs().max() < TOL


def test_24khz_preset_stream_equals_whole_decode():
    codec = codec_of(model_preset("24khz"))
    codes = random_codes(codec.cfg, 7)
    whole = codec.decode(codes)
    for sizes in ([1], [3], [2, 5]):
        out, _ = stream(StreamingDecoder(codec), codes, sizes)
        assert (out - whole).abs().max() < TOL, sizes


def test_attention_layout_stream_equals_whole_decode():
    codec = codec_of(TINY_ATTENTION)
    codes = random_codes(codec.cfg, 12)
    whole = codec.decode(codes)
    for sizes in ([1], [3], random_sizes(3)):
        out, pieces = stream(StreamingDecoder(codec), codes, sizes)
        assert (out - whole).abs().max() < TOL, sizes
    # attention runs whole windows (4 frames of 8 latent frames): audio comes out in bursts
    assert sum(p.shape[-1] > 0 for p in pieces[:-1]) < len(pieces) - 1


def test_attention_stream_cut_inside_a_window_is_refused():
    dec = StreamingDecoder(codec_of(TINY_ATTENTION))
    dec.push(random_codes(TINY_ATTENTION, 3))  # the attention window is 4 frames
    with pytest.raises(CodecError, match="inside an attention window"):
        dec.flush()


@pytest.mark.slow  # the 54.5M-parameter presets: ~1 min
@pytest.mark.parametrize("preset", ["32khz", "44khz"])
def test_attention_presets_stream_equals_whole_decode(preset):
    codec = codec_of(model_preset(preset))
    codes = random_codes(codec.cfg, 8)
    whole = codec.decode(codes)
    for sizes in ([1], [3]):
        out, _ = stream(StreamingDecoder(codec), codes, sizes)
        assert (out - whole).abs().max() < TOL, sizes
    dec = StreamingDecoder(codec)
    assert (dec.lookahead_samples, dec.lookahead_frames) == (14735, 5)  # the figures README gives
    check_reported_lookahead(dec, emitted_per_push(dec, random_codes(codec.cfg, 16)))


def emitted_per_push(dec: StreamingDecoder, codes):
    """Push one frame at a time -> total samples out after each push."""
    totals, out = [], 0
    for i in range(codes[0].shape[-1] // dec.codes_per_frame[0]):
        out += dec.push([c[:, i * r:(i + 1) * r] for c, r in zip(codes, dec.codes_per_frame)]).shape[-1]
        totals.append(out)
    return totals


def check_reported_lookahead(dec: StreamingDecoder, totals):
    frame = dec.frame_samples
    pushed = [(n + 1) * frame for n in range(len(totals))]
    # the most audio ever pushed but not yet out is the reported lookahead (reached in steady state)
    assert max(p - t for p, t in zip(pushed, totals)) == dec.lookahead_samples
    # frame f is complete once lookahead_frames more frames are in, and not always one frame sooner
    done = [next(n for n, t in enumerate(totals) if t >= (f + 1) * frame) for f in range(len(totals) - dec.lookahead_frames - 1)]
    assert max(n - f for f, n in enumerate(done)) == dec.lookahead_frames


def test_lookahead_is_what_the_stream_shows(tiny_codec):
    dec = StreamingDecoder(tiny_codec)
    # 24 kHz layout: first conv 3 latent frames (3 x 512) + transposed-conv crops 4x64 + 4x8 + 2x2
    # + 1 + residual units 39 x (64 + 8 + 2 + 1) + last conv 3 = 4757 samples (198 ms, 3 frames).
    assert (dec.lookahead_samples, dec.lookahead_frames) == (4757, 3)
    assert dec.lookahead_ms == pytest.approx(4757 / 24000 * 1000)
    totals = emitted_per_push(dec, random_codes(tiny_codec.cfg, 12))
    assert totals == [max(0, (n + 1) * dec.frame_samples - 4757) for n in range(12)]
    check_reported_lookahead(dec, totals)


def test_attention_lookahead_is_what_the_stream_shows():
    dec = StreamingDecoder(codec_of(TINY_ATTENTION))
    totals = emitted_per_push(dec, random_codes(TINY_ATTENTION, 16))
    check_reported_lookahead(dec, totals)
    assert dec.lookahead_frames > StreamingDecoder(codec_of(model_preset("tiny"))).lookahead_frames


def test_state_does_not_grow_with_the_stream(tiny_codec):
    dec = StreamingDecoder(tiny_codec)
    codes = random_codes(tiny_codec.cfg, 400)
    sizes = []
    for i in range(400):
        dec.push([c[:, i * r:(i + 1) * r] for c, r in zip(codes, dec.codes_per_frame)])
        sizes.append(dec.state_bytes())
    # after the first frames every buffer is at its steady size: 34 s of audio later, nothing grew
    assert max(sizes[20:]) == max(sizes[10:20])
    assert max(sizes) < 256 * 1024  # the spans of the tiny decoder's layers, whatever the length


def test_flush_starts_a_new_stream(tiny_codec):
    dec = StreamingDecoder(tiny_codec)
    codes = random_codes(tiny_codec.cfg, 5)
    first, _ = stream(dec, codes, [2])
    second, _ = stream(dec, codes, [2])  # noise positions and every buffer start again from zero
    assert torch.equal(first, second)


def test_sliding_window_baseline_is_measurably_not_exact(trained_codec, speech_24k):
    codes = trained_codec.encode(speech_24k)
    whole = trained_codec.decode(codes)
    base, _ = stream(SlidingWindowDecoder(trained_codec, window=4, keep=1), codes, [1])
    exact, _ = stream(StreamingDecoder(trained_codec), codes, [1])
    assert base.shape == whole.shape
    base_error, exact_error = (base - whole).abs().max(), (exact - whole).abs().max()
    # seams where the windows' edges cut the receptive field (measured 6e-4 on this model)
    assert base_error > 10 * TOL and base_error > 100 * exact_error
    assert exact_error < TOL


def test_push_rejects_bad_codes_with_one_line(tiny_codec):
    dec = StreamingDecoder(tiny_codec)
    good = random_codes(tiny_codec.cfg, 2)
    bad = [good[:2], [good[0], good[1], good[2][:, :-1]], [good[0] + 300, good[1], good[2]],
           [good[0].float(), good[1], good[2]]]
    for codes in bad:
        with pytest.raises(CodecError) as e:
            dec.push(codes)
        assert "\n" not in str(e.value)
    dec.push(good)
    with pytest.raises(CodecError, match="streams"):
        dec.push([torch.cat([c, c]) for c in good])
    with pytest.raises(CodecError):
        StreamingDecoder("not a model")


# ---- the interleaved token layout ----


def test_frame_order_is_orpheus_and_matches_the_tokenizer():
    from training.tokenize import flatten_order

    assert frame_order((4, 2, 1)) == [(0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (2, 2), (2, 3)]
    for strides in ((4, 2, 1), (8, 4, 2, 1), (2, 1)):
        assert frame_order(strides) == flatten_order(strides)
    assert len(frame_order((8, 4, 2, 1))) == 15


def test_orpheus_layout_round_trip_and_offsets():
    layout = FrameLayout.orpheus()
    cfg = model_preset("24khz")
    codes = random_codes(cfg, 5, batch=2)
    tokens = layout.to_tokens(codes)
    assert tokens.shape == (2, 35)
    f = 3  # frame 3 of item 0: c0[3], c1[6], c2[12], c2[13], c1[7], c2[14], c2[15], each with its offset
    expected = [codes[0][0, f], codes[1][0, 2 * f], codes[2][0, 4 * f], codes[2][0, 4 * f + 1],
                codes[1][0, 2 * f + 1], codes[2][0, 4 * f + 2], codes[2][0, 4 * f + 3]]
    assert tokens[0, 7 * f:7 * f + 7].tolist() == [int(c) + 128266 + 4096 * p for p, c in enumerate(expected)]
    back = layout.to_codes(tokens[1])
    assert all(torch.equal(a, b[1:]) for a, b in zip(back, codes))


def test_parser_holds_incomplete_frames_for_any_chunking():
    layout = FrameLayout((4, 2, 1), 4096, [10 + 5000 * p for p in range(7)])
    codes = random_codes(model_preset("24khz"), 9)
    tokens = layout.to_tokens(codes)[0].tolist()
    rng = random.Random(0)
    parser, got, i = layout.parser(), [[] for _ in codes], 0
    while i < len(tokens):
        n = rng.randint(0, 10)
        out = parser.feed(tokens[i:i + n])
        assert parser.pending == (i + n if i + n < len(tokens) else len(tokens)) % 7
        for level, c in enumerate(out):
            got[level].append(c)
        i += n
    parser.close()
    assert all(torch.equal(torch.cat(g, dim=-1), c) for g, c in zip(got, codes))


def test_malformed_token_streams_get_one_line_naming_the_token():
    layout = FrameLayout.orpheus()
    tokens = layout.to_tokens(random_codes(model_preset("24khz"), 3))[0].tolist()
    shifted = tokens[:9] + tokens[10:]  # one token lost: the next one lands in the wrong position
    with pytest.raises(TokenLayoutError, match=r"^token 9 \(value \d+, frame 1 position 2: level 2 code 0\)"):
        layout.to_codes(shifted)
    parser = layout.parser()
    parser.feed(tokens[:5])
    with pytest.raises(TokenLayoutError, match=r"^token 9 "):
        parser.feed(shifted[5:])
    assert parser.pending == 5  # the rejected feed changed nothing
    with pytest.raises(TokenLayoutError, match=r"ends inside frame 2: tokens 14\.\.19 are 6 of its 7"):
        layout.to_codes(tokens[:-1])
    with pytest.raises(TokenLayoutError, match="ended inside frame 0"):
        parser.close()
    with pytest.raises(TokenLayoutError, match="position 0"):
        layout.to_codes([5] + tokens[1:7])  # below every offset
    for e in (TokenLayoutError("x"),):
        assert isinstance(e, CodecError)


def test_tokens_to_streamed_audio_equals_whole_decode(tiny_codec):
    """The serving path: a flat token stream, fed in arbitrary pieces, to audio."""
    cfg = tiny_codec.cfg
    layout = FrameLayout(cfg.vq_strides, cfg.codebook_size, [1000 + 256 * p for p in range(7)])
    codes = random_codes(cfg, 10)
    tokens = layout.to_tokens(codes)[0].tolist()
    parser, dec, pieces = layout.parser(), StreamingDecoder(tiny_codec), []
    for i in range(0, len(tokens), 5):
        pieces.append(dec.push(parser.feed(tokens[i:i + 5])))
    parser.close()
    pieces.append(dec.flush())
    assert (torch.cat(pieces, dim=-1) - tiny_codec.decode(codes)).abs().max() < TOL


@pytest.mark.slow  # a 10-minute stream and its whole decode on the tiny preset, ~40 s
def test_ten_minute_stream_is_exact_with_flat_state(tiny_codec):
    frames = int(600 * 24000 / 2048) + 1  # 10 minutes
    codes = random_codes(tiny_codec.cfg, frames, seed=5)
    dec, pieces, sizes = StreamingDecoder(tiny_codec), [], []
    for i in range(0, frames, 8):
        pieces.append(dec.push([c[:, i * r:(i + 8) * r] for c, r in zip(codes, dec.codes_per_frame)]))
        sizes.append(dec.state_bytes())
    pieces.append(dec.flush())
    assert max(sizes[10:]) == max(sizes[5:10])  # nothing grew over 10 minutes
    out = torch.cat(pieces, dim=-1)
    whole = tiny_codec.decode(codes)  # chunked into 10 s windows with exact seams
    assert out.shape == whole.shape and (out - whole).abs().max() < TOL
