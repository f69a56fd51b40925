"""Tokenizer throughput: the pipeline (``python -m training.tokenize``) vs a naive loop.

Both encode the same clips with the same model on the same device and report audio seconds
encoded per wall second:

- naive loop: for each clip, decode + resample it (``training.audio.decode_audio``), then
  ``snac.SNAC.encode`` it alone, in one process (what a first script usually does);
- naive loop, JIT profiling off: the same, with TorchScript's profiling executor disabled (the
  pipeline does this; shown so the gain from batching + parallel decoding is visible on its own);
- pipeline: the tokenizer CLI end to end (process start, model load, reading, encoding, writing
  gzip shards), timed from outside.

Data: ljspeech-mini (real speech, FLAC/MP3/WAV at 22.05 kHz), listed ``--repeat`` times in a
manifest. Model: a randomly initialised ``--preset`` architecture (speed does not depend on the
weights). On CUDA the pipeline also runs in bf16 and the fraction of tokens identical to the
fp32 run is reported.

    python benchmarks/bench_tokenize.py                     # CPU, 24 kHz preset
    python benchmarks/bench_tokenize.py --device cuda --repeat 50
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from training.audio import decode_audio, list_audio_files  # noqa: E402
from training.config import model_preset  # noqa: E402
from training.model import build_generator  # noqa: E402
from training.hub import export_snac, load_generator  # noqa: E402


def find_clips() -> List[Path]:
    """The ljspeech-mini clips shipped with the repository (tests/data)."""
    folder = ROOT / "tests" / "data" / "ljspeech-mini" / "wavs"
    if not folder.is_dir():
        sys.exit(f"error: {folder} not found (the repository's test audio is missing)")
    return list_audio_files(folder)


def naive_loop(model_dir: Path, clips: Sequence[Path], device: str, jit_profiling: bool) -> Dict[str, float]:
    """Decode one clip, encode one clip, repeat. Returns audio seconds and wall seconds."""
    start = time.perf_counter()
    model, cfg = load_generator(model_dir, device)
    audio_seconds = 0.0
    ctx = torch.jit.optimized_execution(jit_profiling)
    with torch.inference_mode(), ctx:
        for path in clips:
            audio, rate = decode_audio(path, cfg.sampling_rate)
            model.encode(audio[None].to(device))
            audio_seconds += audio.shape[-1] / rate
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return {"audio_s": audio_seconds, "wall_s": time.perf_counter() - start, "load": os.getloadavg()[0]}


def pipeline(model_dir: Path, manifest: Path, out: Path, device: str, precision: str, extra: Sequence[str]) -> Dict[str, float]:
    """The tokenizer CLI, end to end, in a fresh process."""
    cmd = [sys.executable, "-m", "training.tokenize", "--audio_codec", str(model_dir), "--dataset", str(manifest),
           "--out_dir", str(out), "--device", device, "--precision", precision, "--no_progress", *extra]
    start = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"pipeline failed:\n{r.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"audio_s": summary["audio_seconds"], "wall_s": wall, "inner_wall_s": summary["wall_seconds"],
            "load": os.getloadavg()[0]}


def read_tokens(out: Path) -> Dict[str, List[List[int]]]:
    rows = {}
    for shard in sorted(out.glob("tokens-*.jsonl.gz")):
        with gzip.open(shard, "rt") as f:
            for line in f:
                r = json.loads(line)
                rows[r["id"]] = [r[f"snac_layer_{i + 1}"] for i in range(r["num_layers"])]
    return rows


def identical_fraction(a: Dict[str, List[List[int]]], b: Dict[str, List[List[int]]]) -> float:
    same = total = 0
    for key, levels in a.items():
        for x, y in zip(levels, b[key]):
            same += sum(int(p == q) for p, q in zip(x, y))
            total += len(x)
    return same / max(1, total)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="24khz", help="model architecture (random weights)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeat", type=int, default=1, help="list the 32 clips this many times")
    p.add_argument("--clips", type=int, default=0, help="use only the first N clips (0: all)")
    p.add_argument("--pipeline_args", default="", help="extra tokenizer flags, e.g. '--batch_size 16'")
    p.add_argument("--skip_naive_jit", action="store_true", help="skip the JIT-profiling-off naive variant")
    args = p.parse_args()

    clips = find_clips()
    clips = (clips[: args.clips] if args.clips else clips) * args.repeat
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        cfg = model_preset(args.preset)
        model_dir = export_snac(build_generator(cfg), cfg, tmp / "model")
        manifest = tmp / "clips.jsonl"
        manifest.write_text("".join(json.dumps({"path": str(c)}) + "\n" for c in clips))

        results = {"naive loop": naive_loop(model_dir, clips, args.device, jit_profiling=True)}
        if not args.skip_naive_jit:
            results["naive loop, JIT profiling off"] = naive_loop(model_dir, clips, args.device, jit_profiling=False)
        extra = args.pipeline_args.split()
        results["pipeline"] = pipeline(model_dir, manifest, tmp / "fp32", args.device, "fp32", extra)
        agreement = None
        if args.device.startswith("cuda"):
            results["pipeline bf16"] = pipeline(model_dir, manifest, tmp / "bf16", args.device, "bf16", extra)
            agreement = identical_fraction(read_tokens(tmp / "fp32"), read_tokens(tmp / "bf16"))

    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    base = results["naive loop"]["audio_s"] / results["naive loop"]["wall_s"]
    print(f"device: {device}; model: {args.preset} (random init); clips: {len(clips)}, "
          f"{results['naive loop']['audio_s'] / 60:.1f} min of audio")
    # The 1-minute load average after each method shows whether other work shared the machine.
    print("| method | wall s | audio s / wall s (x real time) | vs naive loop | load avg after |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        speed = r["audio_s"] / r["wall_s"]
        print(f"| {name} | {r['wall_s']:.1f} | {speed:.2f} | {speed / base:.2f}x | {r['load']:.1f} |")
    if agreement is not None:
        print(f"bf16 vs fp32 pipeline: {agreement * 100:.2f} % identical tokens")


if __name__ == "__main__":
    main()
