#!/usr/bin/env python3
"""Training-step speed: fp32 eager vs faster modes, side by side, from one run.

    python benchmarks/bench_train.py                       # CPU: 24 kHz preset, batch 2 x 0.8 s
    python benchmarks/bench_train.py --device cuda         # GPU: batch 16 x 0.8 s (paper setting)
    python benchmarks/bench_train.py --modes eager,compile --steps 10

Each mode builds a fresh TrainState (same seed) and runs warm-up steps, then timed steps of
discriminator + generator updates on batches drawn from the real data loader (ljspeech-mini, or
--data PATH). Reported per mode: ms per step (mean over the timed steps), audio seconds trained per wall second,
peak memory (CUDA: max allocated; CPU: peak RSS of the mode's own process), data-wait ms per
step (time blocked in ``next(loader)``), the speed ratio against the first mode, and an MFU-style
figure: the step's matmul/conv FLOPs (counted with ``torch.utils.flop_counter.FlopCounterMode`` on
one eager step, forward + backward of both networks) per second, over the card's dense bf16 peak
(``--peak_tflops``, or a small table of known cards; none on CPU unless given).

Also printed: the activation memory the generator pass keeps for its backward in the
discriminator, with the real half run on the concatenated batch with autograd (the old way)
and without autograd (what train_step does), counted exactly with saved-tensor hooks.
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
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import create_training_config  # noqa: E402
from training.dataset import build_dataloaders  # noqa: E402
from training.state import build_state
from training.train import _split, train_step

MODES = {
    # name: (config overrides, description)
    "eager": ({"train.precision": "fp32", "train.compile": False}, "fp32 eager"),
    "bf16": ({"train.precision": "bf16", "train.compile": False}, "bf16 autocast, eager"),
    "compile": ({"train.precision": "fp32", "train.compile": True}, "fp32, torch.compile"),
    "bf16+compile": ({"train.precision": "bf16", "train.compile": True}, "bf16 autocast, torch.compile"),
}


# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, in TFLOP/s; matched against
# torch.cuda.get_device_name() in this order (more specific names first).
BF16_PEAK_TFLOPS = (
    ("H200", 989.0),       # H200 SXM
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),       # H100 SXM
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def bf16_peak_tflops(args) -> Optional[float]:
    if args.peak_tflops:
        return args.peak_tflops
    if not args.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((tflops for key, tflops in BF16_PEAK_TFLOPS if key in name), None)


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
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        train_step(state, next(loader))
    # train_step does not wait for the device, so the timed steps run as the training loop runs
    # them (queued back to back) and are timed as one block between two synchronizations.
    sync()
    wait_ms = []
    start = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch = next(loader)
        wait_ms.append(1000 * (time.perf_counter() - t0))
        train_step(state, batch)
    sync()
    ms = 1000 * (time.perf_counter() - start) / args.steps
    seconds_per_batch = cfg.data.batch_size * cfg.segment_length() / cfg.model.sampling_rate
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb()
    return {"mode": name, "ms_per_step": ms, "audio_s_per_s": seconds_per_batch / (ms / 1000),
            "peak_mb": peak, "data_wait_ms": statistics.mean(wait_ms)}


def _eager_state(args, batch_size: int):
    cfg = create_training_config(preset=args.preset, dataset_path=str(args.data), batch_size=batch_size,
                                 overrides={"train.precision": "fp32", "train.compile": False,
                                            "train.device": args.device, "data.num_workers": 0,
                                            "train.dead_code_steps": 0})
    torch.manual_seed(0)
    return cfg, build_state(cfg, torch.device(args.device))


def step_flops(args) -> float:
    """Matmul/conv FLOPs of one training step at ``args.batch_size`` (counted at ``--flops_batch``
    items and scaled: every counted op is linear in the batch)."""
    cfg, state = _eager_state(args, args.flops_batch)
    batch = {"audio": 0.1 * torch.randn(args.flops_batch, 1, cfg.segment_length())}
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(state, batch)
    return counter.get_total_flops() * args.batch_size / args.flops_batch


def saved_activation_mb(fn) -> float:
    """MB of distinct tensors autograd keeps for the backward while ``fn()`` runs its forward."""
    seen = {}

    def keep(t):
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = fn()
    del out
    return sum(seen.values()) / 2**20


def generator_pass_memory(args) -> dict:
    """Discriminator activations kept by the generator pass: [real; fake] with autograd vs a
    no-grad real half (``train_step``'s way), same batch and weights."""
    cfg, state = _eager_state(args, args.batch_size)
    n = args.batch_size
    real = 0.1 * torch.randn(n, 1, cfg.segment_length(), device=state.device)
    fake = (0.1 * torch.randn(n, 1, cfg.segment_length(), device=state.device)).requires_grad_()
    disc = state.discriminator

    def both_with_grad():
        return _split(disc(torch.cat([real, fake])), n)

    def real_without_grad():
        with torch.no_grad():
            g_real = disc(real)
        return g_real, disc(fake)

    return {"cat": saved_activation_mb(both_with_grad), "no_grad_real": saved_activation_mb(real_without_grad)}


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
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads in each mode's process (default: torch's; 1 is steadier on a "
                        "CPU shared with other jobs)")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="dense bf16 peak of the device in TFLOP/s for the MFU column (default: from a table "
                        "of known NVIDIA cards; none on CPU)")
    p.add_argument("--flops_batch", type=int, default=None,
                   help="batch items of the FLOP-counting step (default: the batch on GPU, 1 on CPU)")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)  # internal: one mode, JSON out
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.data = args.data or default_data()
    gpu = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (16 if gpu else 2)
    args.flops_batch = args.flops_batch or (args.batch_size if gpu else 1)
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
        cmd += ["--threads", str(args.threads)] if args.threads else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"  measured {m}: {r['ms_per_step']:.0f} ms/step", flush=True)
    flops = step_flops(args)
    peak = bf16_peak_tflops(args)
    base = rows[0]["ms_per_step"]
    print(f"\nstep FLOPs (matmul/conv, forward + backward, FlopCounterMode): {flops / 1e12:.3f} TFLOP at batch "
          f"{args.batch_size}; MFU = FLOPs per second / {f'{peak:.0f} TFLOP/s bf16 peak' if peak else 'no known peak'}")
    print(f"\n| mode | ms/step | audio s/s | peak GB | data wait ms/step | data wait % | TFLOP/s | MFU | "
          f"speed vs {modes[0]} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        achieved = flops / (r["ms_per_step"] / 1000) / 1e12
        mfu = f"{100 * achieved / peak:.1f} %" if peak else "n/a"
        print(f"| {MODES[r['mode']][1]} | {r['ms_per_step']:.0f} | {r['audio_s_per_s']:.2f} | {r['peak_mb'] / 1024:.2f} | "
              f"{r['data_wait_ms']:.1f} | {100 * r['data_wait_ms'] / r['ms_per_step']:.1f} | {achieved:.2f} | {mfu} | "
              f"{base / r['ms_per_step']:.2f}x |")
    mem = generator_pass_memory(args)
    print(f"\ngenerator pass, discriminator activations kept for backward (fp32, batch {args.batch_size}): "
          f"[real; fake] with autograd {mem['cat']:.0f} MB, real half without autograd {mem['no_grad_real']:.0f} MB "
          f"(saves {mem['cat'] - mem['no_grad_real']:.0f} MB, {100 * (1 - mem['no_grad_real'] / mem['cat']):.0f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
