#!/usr/bin/env python3
"""Does the recipe train a good codec? Several training arms, same data, same steps, scored on
held-out clips that no arm ever trained on.

    python benchmarks/quality_run.py [--data tests/data/ljspeech-mini] [--steps 300] [--preset tiny]
                                     [--arms a,b,c,d,e,f,g] [--heldout 6] [--parallel 2] [--out runs/quality]

The audio files of ``--data`` (searched recursively, sorted by name) are split once: the last
``--heldout`` files go to ``<out>/data/validation``, the rest to ``<out>/data/train`` (symbolic
links). Each arm trains through the real CLI (``train_snac.py``) with ``data.split=train`` and
``data.val_split=validation``, so its validation curve is on the held-out clips too.

Arms (each isolates one change of the recipe against (a)):

* ``a``  the defaults: DAC's initialisation (zero conv biases), then the data-dependent init (every
         encoder convolution and input projection standardised on the first batches), k-means
         codebooks from the same batches, trained codebooks with dead-code restart, DAC-faithful discriminator input,
         loudness -16 dB, clipping 1e3 / 10, mel + STFT losses
* ``b``  what a trainer built on ``snac``'s own forward gets: ``snac.SNAC()``'s default init,
         random frozen codebooks (commitment = codebook = 0, no replacement), mel 15, STFT 15 (5
         for the first 500 steps: trained as two legs, the second resuming the first),
         adversarial 1, feature matching 2, generator clipped at 1.0, discriminator unclipped,
         raw discriminator input, no loudness norm
* ``c``  the defaults with ``snac.SNAC()``'s default initialisation (PyTorch's conv biases) and
         no data-dependent init (which would re-set those biases from data)
* ``d``  the defaults without data-driven codebooks (``nn.Embedding``'s random N(0, 1) codes)
* ``e``  the defaults with the other replacement rule (usage EMA <-> dead-code restart)
* ``f``  the defaults with the rotation trick instead of the straight-through gradient
* ``g``  the defaults without the data-dependent init (DAC's zero biases only)

After training, every arm's final generator encodes and decodes each held-out clip whole; the
script writes ``<out>/quality.md`` (one table: multi-scale mel distance, STFT distance, SI-SDR,
PESQ, STOI, codebook usage and perplexity per level) and ``<out>/quality.png`` (validation mel
distance and level-0 usage against step, one line per arm), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")
STFT_WARMUP_STEPS = 500  # arm b: STFT weight 5 for these steps, then 15
from training.config import TrainConfig  # noqa: E402 - after the path insert

# arm e: the replacement rule that is not the default one
OTHER_RULE = "restart" if TrainConfig.code_replacement == "usage" else "usage"
ARM_NAMES = {"a": "defaults", "b": "snac-forward baseline", "c": "defaults, snac's default init",
             "d": "defaults, random codebooks", "e": f"defaults, {OTHER_RULE} replacement",
             "f": "defaults, rotation trick", "g": "defaults, no data-dependent init"}
ARMS: Dict[str, List[str]] = {
    "a": [],
    "b": ["train.generator_init=snac", "train.data_dependent_init=false", "train.codebook_init=random", "loss.commitment=0", "loss.codebook=0",
          "train.code_replacement=null", "train.dead_code_steps=0", "loss.mel=15", "loss.adversarial=1",
          "loss.feature_matching=2", "optim.grad_clip_generator=1.0", "optim.grad_clip_discriminator=null",
          "discriminator.preprocess=false", "data.loudness_db=null"],
    # snac's default init and none of ours: the data-dependent init would also re-set the biases
    "c": ["train.generator_init=snac", "train.data_dependent_init=false"],
    "d": ["train.codebook_init=random"],
    "e": [f"train.code_replacement={OTHER_RULE}"],
    "f": ["train.rotation_trick=true"],
    "g": ["train.data_dependent_init=false"],
}


def fail(message: str) -> None:
    """Bad input or a failed arm: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# --------------------------------------------------------------------------------------
# Data split
# --------------------------------------------------------------------------------------


def split_data(data: Path, out: Path, heldout: int) -> Dict[str, List[Path]]:
    """Link the files of ``data`` into ``out/train`` and ``out/validation`` (the last ``heldout``)."""
    files = sorted(p for p in data.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if len(files) < heldout + 2:
        fail(f"{data} has {len(files)} audio files; need at least {heldout + 2}")
    parts = {"train": files[:-heldout], "validation": files[-heldout:]}
    for split, chosen in parts.items():
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        for f in chosen:
            link = folder / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    return parts


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def arm_sets(arm: str, args, max_steps: int, stft: float = None) -> List[str]:
    sets = [f"data.segment_seconds={args.segment}", f"data.val_segment_seconds={args.val_seconds}",
            "data.split=train", "data.val_split=validation", "data.num_workers=0",
            f"train.eval_every={args.eval_every}", "train.eval_batches=1000",
            f"train.checkpoint_every={max_steps}", "train.log_every=25", f"train.max_steps={max_steps}",
            f"optim.lr={args.lr}", *ARMS[arm]]
    if stft is not None:
        sets.append(f"loss.stft={stft}")
    return sets


def train_command(arm: str, args, max_steps: int, stft: float = None, fresh: bool = True) -> List[str]:
    cmd = [sys.executable, str(ROOT / "train_snac.py"), "--preset", args.preset,
           "--dataset_path", str(args.out / "data"), "--batch_size", str(args.batch_size),
           "--run_dir", str(args.out / arm), "--device", args.device, "--seed", str(args.seed)]
    if fresh:
        cmd.append("--no-resume")
    for s in arm_sets(arm, args, max_steps, stft):
        cmd += ["--set", s]
    return cmd


SHORT_ARMS = ("d", "e", "f", "g")  # the single-change ablations: --short_steps when given


def arm_steps(arm: str, args) -> int:
    return args.short_steps if args.short_steps and arm in SHORT_ARMS else args.steps


def arm_legs(arm: str, args) -> List[List[str]]:
    """The commands that train one arm, run in order (arm b's STFT weight changes at step 500)."""
    if arm != "b":
        return [train_command(arm, args, arm_steps(arm, args))]
    first = min(args.steps, STFT_WARMUP_STEPS)
    legs = [train_command(arm, args, first, stft=5.0)]
    if args.steps > first:
        legs.append(train_command(arm, args, args.steps, stft=15.0, fresh=False))
    return legs


def run_arm(arm: str, args) -> subprocess.Popen:
    """Start one arm's legs as a single shell-free chain in a child process; output to ``<arm>.log``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    log = open(args.out / f"{arm}.log", "w")
    chain = [sys.executable, "-c", "import subprocess, sys, json\n"
             "for cmd in json.loads(sys.argv[1]):\n"
             "    if subprocess.call(cmd): sys.exit(1)\n", json.dumps(arm_legs(arm, args))]
    return subprocess.Popen(chain, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def train_arms(args) -> float:
    """Train every arm, at most ``--parallel`` at a time. Returns the wall time in minutes."""
    start = time.perf_counter()
    pending, running = list(args.arms), {}
    while pending or running:
        while pending and len(running) < args.parallel:
            arm = pending.pop(0)
            running[arm] = run_arm(arm, args)
            print(f"arm {arm} ({ARM_NAMES[arm]}): training, log {args.out / f'{arm}.log'}", flush=True)
        for arm, proc in list(running.items()):
            if proc.poll() is not None:
                del running[arm]
                if proc.returncode:
                    for other in running.values():
                        other.terminate()  # our own children: one failed arm ends the comparison
                    fail(f"arm {arm} failed (exit {proc.returncode}); see {args.out / f'{arm}.log'}")
                print(f"arm {arm}: done after {(time.perf_counter() - start) / 60:.1f} min", flush=True)
        time.sleep(1.0)
    return (time.perf_counter() - start) / 60


# --------------------------------------------------------------------------------------
# Held-out evaluation
# --------------------------------------------------------------------------------------


def evaluate_arm(run_dir: Path, clips: List[Path]) -> Dict[str, float]:
    """Score the arm's final generator on whole held-out clips (at the model's rate, mono)."""
    import torch

    from training.audio import load_audio
    from training.metrics import codebook_stats, mel_distance, pesq_score, si_sdr, stft_distance, stoi_score
    from training.model import train_forward
    from training.hub import load_generator

    model, cfg = load_generator(run_dir / "checkpoints" / "latest.pt")
    rate = cfg.sampling_rate
    sums: Dict[str, float] = {}
    codes: List[List[torch.Tensor]] = [[] for _ in cfg.vq_strides]
    for path in clips:
        real = load_audio(path, rate)[None]  # (1, 1, T)
        with torch.no_grad():
            out = train_forward(model, real)
        fake = out.audio.clamp(-1, 1)
        scores = {"mel": mel_distance(real, fake, rate), "stft": stft_distance(real, fake),
                  "si_sdr": float(si_sdr(real, fake).mean()), "pesq": pesq_score(real, fake, rate),
                  "stoi": stoi_score(real, fake, rate)}
        for k, v in scores.items():
            sums[k] = sums.get(k, 0.0) + (float("nan") if v is None else v)
        for level, c in enumerate(out.codes):
            codes[level].append(c.reshape(-1))
    result = {k: v / len(clips) for k, v in sums.items()}
    for level, cs in enumerate(codes):
        usage, perplexity = codebook_stats(torch.cat(cs), cfg.codebook_size)
        result[f"usage{level}"], result[f"perplexity{level}"] = usage, perplexity
    return result


def validation_curves(run_dir: Path) -> List[Dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val/mel" in r]


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def table(results: Dict[str, Dict[str, float]], levels: int, args) -> str:
    head = ["arm", "steps", "mel dist", "STFT dist", "SI-SDR dB", "PESQ", "STOI"]
    head += [f"usage L{i}" for i in range(levels)] + [f"perplexity L{i}" for i in range(levels)]
    if args.short_steps:
        head.append(f"val mel @ {args.short_steps}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, r in results.items():
        cells = [f"({arm}) {ARM_NAMES[arm]}", str(arm_steps(arm, args)), f"{r['mel']:.3f}", f"{r['stft']:.3f}",
                 f"{r['si_sdr']:.1f}", f"{r['pesq']:.2f}", f"{r['stoi']:.3f}"]
        cells += [f"{100 * r[f'usage{i}']:.0f}%" for i in range(levels)]
        cells += [f"{r[f'perplexity{i}']:.1f}" for i in range(levels)]
        if args.short_steps:
            cells.append(f"{r['val_mel_short']:.3f}" if r.get("val_mel_short") is not None else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: Dict[str, List[Dict[str, float]]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no quality.png (pip install matplotlib)", file=sys.stderr)
        return False
    fig, (ax_mel, ax_use) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, rows in curves.items():
        steps = [r["step"] for r in rows]
        ax_mel.plot(steps, [r["val/mel"] for r in rows], marker="o", label=f"({arm}) {ARM_NAMES[arm]}")
        ax_use.plot(steps, [100 * r["val/codebook_usage_level0"] for r in rows], marker="o", label=f"({arm})")
    ax_mel.set(xlabel="step", ylabel="held-out mel distance", title="validation mel distance (lower is better)")
    ax_use.set(xlabel="step", ylabel="% of codebook", title="held-out codebook usage, level 0")
    ax_mel.legend()
    ax_use.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "tests" / "data" / "ljspeech-mini",
                   help="folder of audio files (default: the repository's ljspeech-mini)")
    p.add_argument("--out", type=Path, default=Path("runs/quality"), help="output folder (default runs/quality)")
    p.add_argument("--preset", default="tiny", help="model preset (default tiny; 24khz for the real run)")
    p.add_argument("--arms", default="a,b,c,d,e,f,g", help="comma-separated arms out of a..g (default all)")
    p.add_argument("--steps", type=int, default=300, help="training steps per arm (default 300)")
    p.add_argument("--short_steps", type=int, default=None,
                   help="training steps of the single-change arms d, e, f (default: --steps); the table's "
                        "'val mel @ N' column compares every arm at this step")
    p.add_argument("--eval_every", type=int, default=100, help="validation interval in steps (default 100)")
    p.add_argument("--batch_size", type=int, default=4, help="clips per step (default 4)")
    p.add_argument("--segment", type=float, default=0.34, help="training crop in seconds (default 0.34)")
    p.add_argument("--val_seconds", type=float, default=2.0, help="validation crop in seconds (default 2.0)")
    p.add_argument("--lr", type=float, default=6e-4, help="learning rate for every arm (default 6e-4, the paper's)")
    p.add_argument("--heldout", type=int, default=6, help="files held out for evaluation (default 6)")
    p.add_argument("--parallel", type=int, default=2, help="arms trained at the same time (default 2)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per arm (default 1)")
    p.add_argument("--device", default="auto", help="train.device for every arm (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed for every arm (default 0)")
    p.add_argument("--eval_only", action="store_true",
                   help="skip training: score the arms already trained in --out (same split)")
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or not args.arms:
        p.error(f"--arms takes a comma-separated subset of {sorted(ARMS)}, got {unknown or 'nothing'}")
    if args.short_steps is not None and not 1 <= args.short_steps <= args.steps:
        p.error("--short_steps must be between 1 and --steps")
    if args.short_steps and args.short_steps % args.eval_every:
        p.error("--short_steps must be a multiple of --eval_every (the arms are compared at that step)")
    if args.steps < 1 or args.eval_every < 1 or args.heldout < 1 or args.parallel < 1:
        p.error("--steps, --eval_every, --heldout and --parallel must be at least 1")
    if not args.data.is_dir():
        p.error(f"--data {args.data} is not a folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = split_data(args.data, args.out / "data", args.heldout)
    print(f"{len(parts['train'])} training files, {len(parts['validation'])} held out: "
          + ", ".join(p.name for p in parts["validation"]), flush=True)
    if args.eval_only:
        missing = [a for a in args.arms if not (args.out / a / "checkpoints" / "latest.pt").is_file()]
        if missing:
            fail(f"--eval_only: arms {missing} have no checkpoint under {args.out}")
        minutes = float("nan")
    else:
        minutes = train_arms(args)
    results, curves = {}, {}
    for arm in args.arms:
        results[arm] = evaluate_arm(args.out / arm, parts["validation"])
        curves[arm] = validation_curves(args.out / arm)
        at = [r["val/mel"] for r in curves[arm] if r["step"] == args.short_steps]
        results[arm]["val_mel_short"] = at[-1] if at else None
    levels = sum(1 for k in results[args.arms[0]] if k.startswith("usage"))
    steps = f"{args.steps} steps per arm" + (f" ({args.short_steps} for arms {', '.join(SHORT_ARMS)})"
                                             if args.short_steps else "")
    text = (f"{args.preset} preset, {steps}, batch {args.batch_size} x {args.segment} s, "
            f"lr {args.lr}, device {args.device}; {len(parts['validation'])} held-out files scored whole; "
            + (f"training wall time {minutes:.1f} min ({args.parallel} arms at a time)" if minutes == minutes
               else "scored with --eval_only (training not timed by this command)") + "\n\n"
            + table(results, levels, args) + "\n")
    (args.out / "quality.md").write_text(text)
    (args.out / "quality.json").write_text(json.dumps({"results": results, "minutes": minutes,
                                                        "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    drew = plot(curves, args.out / "quality.png")
    print("\n" + text)
    print(f"wrote {args.out / 'quality.md'}" + (f", {args.out / 'quality.png'}" if drew else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
