#!/usr/bin/env python3
"""Training-step speed: fp32 eager vs faster modes, side by side, from one run.

    python benchmarks/bench_train.py                       # CPU: 24 kHz preset, batch 2 x 0.8 s
    python benchmarks/bench_train.py --device cuda         # GPU: batch 16 x 0.8 s (paper setting)
    python benchmarks/bench_train.py --modes eager,compile --steps 10

Each mode builds a fresh TrainState (same seed) and runs warm-up steps, then timed steps of
discriminator + generator updates on batches drawn from the real data loader (ljspeech-mini, or
--data PATH). Reported per mode: ms per step (median), audio seconds trained per wall second,
peak memory (CUDA: max allocated; CPU: peak RSS of the mode's own process), and data-wait ms per
step (time blocked in ``next(loader)``), plus the speed ratio against fp32 eager.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import create_training_config  # noqa: E402
from training.dataset import build_dataloaders  # noqa: E402
from training.train import build_state, train_step  # noqa: E402

MODES = {
    # name: (config overrides, description)
    "eager": ({"train.precision": "fp32", "train.compile": False}, "fp32 eager"),
    "bf16": ({"train.precision": "bf16", "train.compile": False}, "bf16 autocast, eager"),
    "compile": ({"train.precision": "fp32", "train.compile": True}, "fp32, torch.compile"),
    "bf16+compile": ({"train.precision": "bf16", "train.compile": True}, "bf16 autocast, torch.compile"),
}


def default_data() -> Path:
    for c in (ROOT / "tests" / "data" / "ljspeech-mini", ROOT / "demo_run" / "corpus"):
        if c.is_dir():
            return c
    raise SystemExit("no benchmark audio: pass --data PATH (a folder of audio files)")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_mode(name: str, args) -> dict:
    overrides, _ = MODES[name]
    cfg = create_training_config(preset=args.preset, dataset_path=str(args.data), batch_size=args.batch_size,
                                 overrides={**overrides, "train.device": args.device,
                                            "data.num_workers": args.workers, "train.dead_code_steps": 0})
    device = torch.device(args.device)
    torch.manual_seed(0)
    state = build_state(cfg, device)
    loader, _ = build_dataloaders(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_ms, wait_ms = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        train_step(state, batch)  # train_step reads losses back, so the device is synchronized
        t2 = time.perf_counter()
        if i >= args.warmup:
            wait_ms.append(1000 * (t1 - t0))
            step_ms.append(1000 * (t2 - t0))
    seconds_per_batch = cfg.data.batch_size * cfg.segment_length() / cfg.model.sampling_rate
    ms = statistics.median(step_ms)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb()
    return {"mode": name, "ms_per_step": ms, "audio_s_per_s": seconds_per_batch / (ms / 1000),
            "peak_mb": peak, "data_wait_ms": statistics.median(wait_ms)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="24khz")
    p.add_argument("--batch_size", type=int, default=None, help="default: 2 on CPU, 16 on GPU")
    p.add_argument("--modes", default=None, help=f"comma-separated from {list(MODES)}; default: eager,bf16 on "
                   "CPU, all on GPU")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)  # internal: one mode, JSON out
    args = p.parse_args()
    args.data = args.data or default_data()
    gpu = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (16 if gpu else 2)
    modes = (args.modes or ("eager,bf16,compile,bf16+compile" if gpu else "eager,bf16")).split(",")
    device_name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"preset {args.preset}, batch {args.batch_size} x 0.8 s (rounded up to the pad unit), device {device_name}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, torch {torch.__version__}")
    if args.single:
        print(json.dumps(run_mode(args.single, args)))
        return 0
    rows = []
    for m in modes:
        # One process per mode: peak memory (CPU: max RSS) is then that mode's own high-water mark.
        cmd = [sys.executable, __file__, "--single", m, "--device", args.device, "--preset", args.preset,
               "--batch_size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--workers", str(args.workers), "--data", str(args.data)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"  measured {m}: {r['ms_per_step']:.0f} ms/step", flush=True)
    base = rows[0]["ms_per_step"]
    print(f"\n| mode | ms/step | audio s/s | peak MB | data wait ms/step | speed vs {modes[0]} |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {MODES[r['mode']][1]} | {r['ms_per_step']:.0f} | {r['audio_s_per_s']:.2f} | {r['peak_mb']:.0f} | "
              f"{r['data_wait_ms']:.1f} | {base / r['ms_per_step']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
