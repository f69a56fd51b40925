#!/usr/bin/env python3
"""Is the demo a recipe or a lucky run? `make demo` for several seeds and thread counts, one table.

    python benchmarks/demo_table.py [--seeds 0,1,2] [--threads 1,2] [--steps 300] [--out runs/demo_table] [--reuse]

Each (seed, threads) pair runs ``python -m training.demo --seed S --threads N`` in its own folder
``<out>/seed<S>_threads<N>`` (one-thread runs two at a time, others alone, so no run has fewer
cores than threads). The table (``<out>/demo_table.md``, also printed) gives per run: validation
mel distance at the start and end, held-out codebook usage and perplexity per level, and the
frame-energy envelope correlation of the reconstruction with the input (minimum and mean over the
held-out clips), and whether the run meets the demo's targets: every level's usage >= 25 % and
perplexity >= 8, validation mel < 4.0, envelope correlation >= 0.8 on every held-out clip.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Tuple

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"usage": 0.25, "perplexity": 8.0, "mel": 4.0, "correlation": 0.8}


def start(seed: int, threads: int, args) -> Tuple[subprocess.Popen, Path]:
    out = args.out / f"seed{seed}_threads{threads}"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "training.demo", "--out", str(out), "--seed", str(seed), "--threads", str(threads),
           "--steps", str(args.steps)]
    log = open(out / "demo.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), out


def run_all(args) -> Tuple[Dict[Tuple[int, int], Path], int]:
    """Run every pair; one-thread runs two at a time. Returns the output folder of each and how
    many of them were reused (``--reuse``) rather than run."""
    pending = [(s, t) for t in args.threads for s in args.seeds]
    running: Dict[Tuple[int, int], Tuple[subprocess.Popen, Path]] = {}
    done: Dict[Tuple[int, int], Path] = {}
    reused = 0
    if args.reuse:  # finished runs (their summary.json written) are kept, not rerun
        for key in list(pending):
            out = args.out / f"seed{key[0]}_threads{key[1]}"
            if (out / "summary.json").is_file():
                pending.remove(key)
                done[key] = out
                reused += 1
                print(f"seed {key[0]}, {key[1]} thread(s): reusing {out}", flush=True)
    while pending or running:
        while pending and sum(t for _, t in running) + pending[0][1] <= max(2, pending[0][1]):
            key = pending.pop(0)
            running[key] = start(*key, args)
            print(f"seed {key[0]}, {key[1]} thread(s): started", flush=True)
        for key, (proc, out) in list(running.items()):
            if proc.poll() is not None:
                del running[key]
                done[key] = out
                print(f"seed {key[0]}, {key[1]} thread(s): exit {proc.returncode}", flush=True)
        time.sleep(1.0)
    return done, reused


def row(key: Tuple[int, int], out: Path) -> Tuple[str, bool]:
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        return f"| {key[0]} | {key[1]} | failed: see {out / 'demo.log'} |", False
    s = json.loads(summary_path.read_text())
    val = s["val"]
    levels = sorted(int(k.rsplit("level", 1)[1]) for k in val if k.startswith("val/codebook_usage_level"))
    usage = [val[f"val/codebook_usage_level{i}"] for i in levels]
    perplexity = [val[f"val/codebook_perplexity_level{i}"] for i in levels]
    corr = s["envelope_correlation"]
    ok = (min(usage) >= TARGETS["usage"] and min(perplexity) >= TARGETS["perplexity"]
          and s["val_mel_end"] < TARGETS["mel"] and min(corr) >= TARGETS["correlation"])
    cells = [str(key[0]), str(key[1]), f"{s['val_mel_start']:.3f} -> {s['val_mel_end']:.3f}",
             " / ".join(f"{100 * u:.0f}" for u in usage), " / ".join(f"{p:.1f}" for p in perplexity),
             f"{min(corr):.3f} / {sum(corr) / len(corr):.3f}", "yes" if ok else "**no**"]
    return "| " + " | ".join(cells) + " |", ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--steps", type=int, default=300, help="demo steps (default 300, what make demo runs)")
    p.add_argument("--out", type=Path, default=Path("runs/demo_table"), help="output folder")
    p.add_argument("--reuse", action="store_true",
                   help="keep the runs already finished in --out (a summary.json) instead of rerunning them")
    args = p.parse_args(argv)
    try:
        args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        args.threads = [int(x) for x in args.threads.split(",") if x.strip()]
    except ValueError:
        p.error("--seeds and --threads take comma-separated integers")
    if not args.seeds or not args.threads or min(args.threads) < 1 or min(args.seeds) < 0 or args.steps < 1:
        p.error("--seeds must be >= 0, --threads >= 1, --steps >= 1")
    began = time.perf_counter()
    done, reused = run_all(args)
    head = ["seed", "threads", "val mel start -> end", "usage % L0 / L1 / L2", "perplexity L0 / L1 / L2",
            "envelope corr. min / mean", "meets targets"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    passed = 0
    for key in sorted(done):
        line, ok = row(key, done[key])
        lines.append(line)
        passed += ok
    minutes = (time.perf_counter() - began) / 60
    text = (f"{len(done)} demo runs ({args.steps} steps each), {passed} meet every target; wall time "
            f"{minutes:.1f} min for the {len(done) - reused} run now"
            + (f" ({reused} reused from earlier)" if reused else "") + "\n\n" + "\n".join(lines) + "\n")
    (args.out / "demo_table.md").write_text(text)
    print("\n" + text)
    return 0 if passed == len(done) else 1


if __name__ == "__main__":
    sys.exit(main())
