#!/usr/bin/env python
"""Streaming decode of the 24 kHz preset on CPU: exact streaming vs the sliding-window practice vs
one offline decode, in one run.

    python benchmarks/bench_streaming.py                  # ~10 s of speech, one thread
    python benchmarks/bench_streaming.py --threads 2 --seconds 20

Codes: the first ljspeech-mini clips, resampled to 24 kHz and encoded by the model, cut to whole
frames. Model: the 24 kHz architecture (19.8M parameters) with seeded random weights (speed does not
depend on the weight values; no download). Every method decodes the same codes once, after a
warm-up on two frames; frames are pushed back to back, as fast as the decoder takes them.

- RTF = decode seconds / audio seconds (< 1: faster than real time); ratio = RTF / offline RTF.
- First audio: the frames pushed before the first sample came out, and the compute time until then
  (the offline decode returns everything at the end).
- Max error: max |audio - offline decode| (same keyed noise), over the whole signal.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

from training.audio import decode_audio, list_audio_files  # noqa: E402
from training.codec import Codec  # noqa: E402
from training.codec.streaming import SlidingWindowDecoder, StreamingDecoder  # noqa: E402
from training.config import model_preset  # noqa: E402
from training.model import build_generator  # noqa: E402

DEFAULT_AUDIO = Path(__file__).resolve().parents[1] / "tests" / "data" / "ljspeech-mini" / "wavs"


def speech_codes(codec: Codec, folder: Path, seconds: float) -> List[torch.Tensor]:
    """Codes (per level (1, n)) of about ``seconds`` of real speech, whole frames."""
    clips, total = [], 0
    for f in list_audio_files(folder):
        clips.append(decode_audio(f, codec.sample_rate)[0][0])
        total += clips[-1].shape[-1]
        if total >= seconds * codec.sample_rate:
            break
    audio = torch.cat(clips)[:int(seconds * codec.sample_rate)]
    return codec.encode(audio[None, None])


def run_stream(make: Callable, codes: List[torch.Tensor], per_push: int) -> Dict[str, float]:
    """Push ``per_push`` frames at a time into a fresh ``make()`` decoder, then flush."""
    dec = make()
    per = dec.codes_per_frame
    frames = codes[0].shape[-1] // per[0]
    pieces, first, first_frames = [], None, None
    start = time.perf_counter()
    for i in range(0, frames, per_push):
        pieces.append(dec.push([c[:, i * r:(i + per_push) * r] for c, r in zip(codes, per)]))
        if first is None and pieces[-1].shape[-1]:
            first, first_frames = time.perf_counter() - start, min(frames, i + per_push)
    pieces.append(dec.flush())
    elapsed = time.perf_counter() - start
    if first is None:
        first, first_frames = elapsed, frames
    return {"audio": torch.cat(pieces, dim=-1), "seconds": elapsed, "first_s": first, "first_frames": first_frames}


def warm_up(make: Callable, codes: List[torch.Tensor]) -> None:
    dec = make()
    dec.push([c[:, :2 * r] for c, r in zip(codes, dec.codes_per_frame)])
    dec.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--audio", type=Path, default=Path(os.environ.get("SNAC_BENCH_AUDIO", DEFAULT_AUDIO)),
                   help="folder of speech files (default: tests/data/ljspeech-mini/wavs)")
    p.add_argument("--seconds", type=float, default=10.0, help="audio length (default: 10)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    p.add_argument("--window", type=int, default=4, help="sliding-window baseline: frames per window (default: 4)")
    p.add_argument("--keep", type=int, default=1,
                   help="sliding-window baseline: index of the kept frame in the window (default: 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = model_preset("24khz")
    codec = Codec(build_generator(cfg).eval(), cfg, device="cpu", precision="fp32")
    codes = speech_codes(codec, args.audio, args.seconds)
    frames = codes[0].shape[-1]
    audio_s = frames * codec.cfg.vq_strides[0] * codec.hop_length / codec.sample_rate

    codec.decode([c[:, :2 * (cfg.vq_strides[0] // s)] for c, s in zip(codes, cfg.vq_strides)])  # warm-up
    start = time.perf_counter()
    offline = codec.decode(codes)
    offline_s = time.perf_counter() - start

    exact = lambda: StreamingDecoder(codec)  # noqa: E731
    sliding = lambda: SlidingWindowDecoder(codec, window=args.window, keep=args.keep)  # noqa: E731
    warm_up(exact, codes)
    warm_up(sliding, codes)
    rows = [("offline decode (Codec.decode)", "all", {"audio": offline, "seconds": offline_s, "first_s": offline_s,
                                                      "first_frames": frames})]
    for name, make, n in (("exact streaming", exact, 1), ("exact streaming", exact, 8),
                          (f"sliding window ({args.window} frames, keep #{args.keep})", sliding, 1)):
        rows.append((name, str(n), run_stream(make, codes, n)))

    lookahead = StreamingDecoder(codec)
    print(f"SNAC 24 kHz preset (19.8M params, random weights), torch {torch.__version__}, "
          f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s); {audio_s:.2f} s of speech "
          f"({frames} frames of {1000 * audio_s / frames:.1f} ms); exact streaming lookahead "
          f"{lookahead.lookahead_frames} frames ({lookahead.lookahead_ms:.1f} ms)")
    print()
    print("| method | frames per push | first audio after (frames) | time to first audio (ms) | RTF "
          "| RTF / offline RTF | max abs error vs offline |")
    print("|---|---|---|---|---|---|---|")
    offline_rtf = offline_s / audio_s
    ratios = {}
    errors = {}
    for name, n, r in rows:
        rtf = r["seconds"] / audio_s
        err = float((r["audio"] - offline).abs().max()) if r["audio"].shape == offline.shape else float("nan")
        ratios[(name, n)], errors[(name, n)] = rtf / offline_rtf, err
        print(f"| {name} | {n} | {r['first_frames']} | {1000 * r['first_s']:.0f} | {rtf:.3f} | "
              f"{rtf / offline_rtf:.2f} | {err:.2e} |")
    print()
    one, eight = ratios[("exact streaming", "1")], ratios[("exact streaming", "8")]
    exact_err = max(errors[("exact streaming", "1")], errors[("exact streaming", "8")])
    sliding_err = errors[(rows[-1][0], "1")]
    print(f"targets: 1 frame/push RTF ratio {one:.2f} <= 1.5: {'yes' if one <= 1.5 else 'NO'}; "
          f"8 frames/push {eight:.2f} <= 1.1: {'yes' if eight <= 1.1 else 'NO'}; "
          f"faster than real time at 1 frame/push: {'yes' if rows[1][2]['seconds'] < audio_s else 'NO'}; "
          f"exact (max error {exact_err:.1e} <= 1e-5): {'yes' if exact_err <= 1e-5 else 'NO'}; "
          f"sliding window not exact (max error {sliding_err:.1e}): {'yes' if sliding_err > 1e-5 else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
