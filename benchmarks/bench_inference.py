#!/usr/bin/env python
"""Encode / decode real-time factors of the 24 kHz SNAC preset: one file, and a batched folder.

    python benchmarks/bench_inference.py                 # CPU, plus CUDA when available
    python benchmarks/bench_inference.py --files 8 --device cpu
    python benchmarks/bench_inference.py --device cuda   # fp32 and bf16, and their code agreement

Real-time factor (RTF) = compute seconds per second of audio (< 1: faster than real time). The
model is the 24 kHz architecture (19.8M parameters) with seeded random weights: speed does not
depend on the weight values, and no download is needed. Audio is ljspeech-mini (22.05 kHz, read
and resampled once before timing; file I/O is not timed). Each measurement is the best of
``--repeats`` runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

from training.audio import decode_audio, list_audio_files  # noqa: E402
from training.codec import Codec  # noqa: E402
from training.config import model_preset  # noqa: E402
from training.model import build_generator  # noqa: E402

DEFAULT_AUDIO = Path(__file__).resolve().parents[1] / "tests" / "data" / "ljspeech-mini" / "wavs"


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def bench(codec: Codec, clips, repeats: int) -> dict:
    """RTFs of encode and decode for ``clips`` (list of (T,) tensors) processed together."""
    seconds = sum(c.shape[-1] for c in clips) / codec.sample_rate
    codes = codec.encode_many(clips)
    enc = _best(lambda: codec.encode_many(clips), repeats)
    dec = _best(lambda: codec.decode_many(codes), repeats)
    return {"files": len(clips), "audio_s": seconds, "encode_rtf": enc / seconds, "decode_rtf": dec / seconds}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--audio", type=Path, default=Path(os.environ.get("SNAC_BENCH_AUDIO", DEFAULT_AUDIO)),
                   help="folder of audio files (default: ../shared/audio/ljspeech-mini/wavs)")
    p.add_argument("--files", type=int, default=8, help="files in the batched-folder measurement (default: 8)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows per forward pass (default: the codec's, 8 on CUDA and 2 on CPU)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement; the best counts (default: 2)")
    p.add_argument("--device", action="append", help="cpu / cuda (repeatable); default: cpu, and cuda if available")
    args = p.parse_args()

    files = list_audio_files(args.audio)[:args.files]
    if not files:
        print(f"error: no audio files in {args.audio}", file=sys.stderr)
        return 2
    clips = [decode_audio(f, 24000)[0][0] for f in files]
    single = max(clips, key=lambda c: c.shape[-1])
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    torch.manual_seed(0)
    cfg = model_preset("24khz")
    model = build_generator(cfg).eval()

    print(f"SNAC 24 kHz preset ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), torch {torch.__version__}")
    print(f"{'device':<40} {'precision':<9} {'mode':<22} {'audio s':>8} {'enc RTF':>8} {'dec RTF':>8} {'enc x RT':>9} {'dec x RT':>9}")
    agreement = {}
    for name in devices:
        codes = {}
        for precision in (["fp32"] if name == "cpu" else ["fp32", "bf16"]):
            codec = Codec(model, cfg, device=name, precision=precision, batch_size=args.batch_size)
            for mode, items in (("single file", [single]), (f"folder, {len(clips)} files batched", clips)):
                r = bench(codec, items, args.repeats)
                print(f"{device_name(codec.device):<40} {precision:<9} {mode:<22} {r['audio_s']:>8.1f} "
                      f"{r['encode_rtf']:>8.4f} {r['decode_rtf']:>8.4f} {1 / r['encode_rtf']:>8.1f}x "
                      f"{1 / r['decode_rtf']:>8.1f}x", flush=True)
            codes[precision] = codec.encode_many(clips)
        if "bf16" in codes:
            agreement[device_name(torch.device(name))] = identical_fraction(codes["fp32"], codes["bf16"])
    for name, fraction in agreement.items():
        print(f"{name}: bf16 codes identical to fp32 codes: {100 * fraction:.2f} % ({len(clips)} files, all levels)")
    return 0


def identical_fraction(a, b) -> float:
    """Fraction of codes equal in two ``encode_many`` results (per item, per level (n,) tensors)."""
    same = total = 0
    for levels_a, levels_b in zip(a, b):
        for x, y in zip(levels_a, levels_b):
            same += int((x.cpu() == y.cpu()).sum())
            total += x.numel()
    return same / max(1, total)


if __name__ == "__main__":
    sys.exit(main())
