#!/usr/bin/env python3
"""Does training the codebooks matter? VQ losses on vs off, on real speech, from one run.

    python benchmarks/ablation_vq.py [--data tests/data/ljspeech-mini] [--steps 400] [--preset tiny]

Trains the same preset twice on the same data with the same seed, in parallel processes (one
thread each), through the real CLI (train_snac.py):

* ``vq``      : the default losses (commitment 0.25, codebook 1.0; DAC weights)
* ``frozen``  : ``loss.commitment=0 loss.codebook=0 train.dead_code_steps=0`` -- what a trainer
                built on snac's own ``forward`` does: the straight-through estimator leaves the
                codebooks untouched, and nothing re-seeds them either. ``--dead_code_steps``
                applies to the ``vq`` arm only: a restart writes the codebooks directly, so an arm
                with restarts would not be frozen.

Then prints validation mel distance and codebook usage per level (fraction of the codebook used
over the held-out set) at every evaluation, side by side, as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"vq": [], "frozen": ["--set", "loss.commitment=0", "--set", "loss.codebook=0"]}
# Dead-code restart re-seeds codebook rows from encoder outputs: the frozen arm must never run it.
FROZEN_DEAD_CODE_STEPS = 0


def dead_code_steps(arm: str, args) -> int:
    return FROZEN_DEAD_CODE_STEPS if arm == "frozen" else args.dead_code_steps


def launch(arm: str, args) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "train_snac.py"), "--preset", args.preset, "--dataset_path", str(args.data),
           "--batch_size", str(args.batch_size), "--max_steps", str(args.steps), "--run_dir", str(args.out / arm),
           "--no-resume", "--device", "cpu", "--seed", "0",
           "--set", f"data.segment_seconds={args.segment}", "--set", "data.val_segment_seconds=2.0",
           "--set", f"data.val_items={args.val_items}", "--set", "data.num_workers=0",
           "--set", f"train.eval_every={args.eval_every}", "--set", "train.eval_batches=100",
           "--set", f"train.checkpoint_every={args.steps}", "--set", "train.log_every=25",
           "--set", f"train.dead_code_steps={dead_code_steps(arm, args)}", *ARMS[arm]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    log = open(args.out / f"{arm}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def evaluations(run_dir: Path):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "val/mel" in r}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "tests" / "data" / "ljspeech-mini")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--segment", type=float, default=0.34, help="training crop, seconds")
    p.add_argument("--val_items", type=int, default=4, help="clips held out for validation")
    p.add_argument("--dead_code_steps", type=int, default=1000,
                   help="train.dead_code_steps of the vq arm (1000 = the default; 0 disables restarts); "
                   "the frozen arm never restarts codes")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "ablation_vq")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    procs = {arm: launch(arm, args) for arm in ARMS}
    for arm, proc in procs.items():
        if proc.wait() != 0:
            print(f"{arm} run failed; see {args.out / (arm + '.log')}", file=sys.stderr)
            return 1
    minutes = (time.time() - start) / 60
    evals = {arm: evaluations(args.out / arm) for arm in ARMS}
    levels = sum(1 for k in next(iter(evals["vq"].values())) if k.startswith("val/codebook_usage_level"))
    print(f"preset {args.preset}, {args.data.name}, batch {args.batch_size} x {args.segment} s, {args.steps} steps, "
          f"{args.val_items} held-out clips (2 s first segments), dead_code_steps={args.dead_code_steps} (vq arm; "
          f"frozen arm: {FROZEN_DEAD_CODE_STEPS}); both arms took {minutes:.1f} min wall in parallel\n")
    usage_cols = " | ".join(f"usage L{i} (vq / frozen)" for i in range(levels))
    print(f"| step | val mel (vq) | val mel (frozen) | {usage_cols} |")
    print("|---:|---:|---:|" + "---:|" * levels)
    for step in sorted(evals["vq"]):
        a, b = evals["vq"][step], evals["frozen"].get(step)
        if b is None:
            continue
        usage = " | ".join(f"{a[f'val/codebook_usage_level{i}']:.3f} / {b[f'val/codebook_usage_level{i}']:.3f}"
                           for i in range(levels))
        print(f"| {step} | {a['val/mel']:.3f} | {b['val/mel']:.3f} | {usage} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
