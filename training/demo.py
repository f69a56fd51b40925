"""`make demo`: train the tiny preset on a corpus this module synthesizes, with no network.

    python -m training.demo [--out demo_run] [--steps 300] [--clips 64]

1. Writes ``--clips`` speech-like clips (voiced syllables with gliding pitch and two formants,
   noise bursts like fricatives, pauses) as 24 kHz WAV files under ``<out>/corpus``.
2. Trains the ``tiny`` preset with the real training loop (``train_main``), holding out 12 clips
   for validation, and evaluates before the first step and every 100 steps (mel distance, codebook
   usage, perplexity, VQ health).
3. Writes a held-out clip and its reconstruction (WAV) and both spectrograms (PNG), and prints the
   validation mel distance at the start and at the end, the final codebook usage per level, and
   how closely each held-out reconstruction's loudness envelope follows its input (the frame-energy
   correlation: ~0 for stationary noise, 1.0 when every syllable and pause is there).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 24000


def _syllable(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """A voiced syllable: harmonics of a gliding f0 shaped by two formant resonances."""
    t = np.arange(n) / sr
    f0_start = rng.uniform(90, 260)
    f0 = f0_start * (1 + rng.uniform(-0.3, 0.3) * t / t[-1])
    phase = 2 * np.pi * np.cumsum(f0) / sr
    formants = (rng.uniform(300, 900), rng.uniform(900, 2500))
    out = np.zeros(n)
    for k in range(1, int(5000 / f0_start)):
        freq = k * f0_start
        gain = sum(np.exp(-0.5 * ((freq - f) / 150.0) ** 2) for f in formants) + 0.05
        out += gain / k * np.sin(k * phase)
    return out * np.hanning(n)


def _fricative(rng: np.random.Generator, n: int) -> np.ndarray:
    """High-passed noise burst (first difference of white noise) with a smooth envelope."""
    return 0.3 * np.diff(rng.standard_normal(n + 1)) * np.hanning(n)


def synth_clip(rng: np.random.Generator, seconds: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """(T,) float32 speech-like signal peaking at 0.5."""
    out = np.zeros(int(seconds * sr))
    pos = int(rng.uniform(0.02, 0.1) * sr)
    while pos < len(out) - sr // 10:
        n = min(int(rng.uniform(0.12, 0.35) * sr), len(out) - pos)
        out[pos:pos + n] += _fricative(rng, n) if rng.random() < 0.25 else _syllable(rng, n, sr)
        pos += n + int(rng.uniform(0.0, 0.12) * sr)
    out += 0.002 * rng.standard_normal(len(out))  # room noise: no digital silence
    return (0.5 * out / np.abs(out).max()).astype(np.float32)


def write_corpus(folder: Path, clips: int, seed: int = 0) -> Path:
    from .audio import save_audio

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(clips):
        audio = synth_clip(rng, rng.uniform(2.0, 3.5))
        save_audio(folder / f"clip_{i:03d}.wav", torch.from_numpy(audio)[None], SAMPLE_RATE)
    return folder


def demo_config(out: Path, steps: int, seed: int = 0, overrides=None):
    from .config import create_training_config

    cfg = create_training_config(
        preset="tiny", dataset_path=str(out / "corpus"), batch_size=4,
        overrides={
            # 12 held-out clips x 2 s: enough level-0 frames (12 x 24) that codebook usage can be measured
            "data.segment_seconds": 0.34, "data.val_segment_seconds": 2.0, "data.val_items": 12,
            "data.num_workers": 0, "train.run_dir": str(out / "run"), "train.max_steps": steps,
            "train.eval_every": 100, "train.eval_batches": 3, "train.checkpoint_every": 100,
            "train.log_every": 10, "train.device": "cpu",
            # ours, for a short CPU run (measured: TRAINING_GUIDE.md, "Short runs"). A high learning
            # rate for fast early progress, reached by a 50-step warm-up and decayed to ~5 % by step
            # 300. Gradient spikes at the peak rate (norms 10-100x the usual ~250) knocked the encoder
            # into a state whose latents are one repeated vector; clipping at 100 bounds them.
            "optim.lr": 3e-3, "optim.lr_decay": 0.99, "optim.warmup_steps": 50, "optim.grad_clip_generator": 100.0,
            # reconstruction + VQ losses only: 300 steps are too few for the adversarial terms to
            # help (they added clicks at every onset); the discriminator still trains alongside.
            "train.adversarial_start_step": steps,
            # k-means codebooks at step 0, then every 10 steps replace codes whose smoothed use fell
            # below a tenth of the uniform share, at most 5 % of a codebook per check: replacing
            # most of a codebook at once (what "unused for 10 steps" does at level 0, which sees 16
            # latents a step) shocks the decoder and set off the same collapse.
            "train.code_replacement": "usage", "train.dead_code_every": 10, "train.replace_max_fraction": 0.05,
            "train.seed": seed, "data.seed": seed,
            # a 300-step run is all warm-up: warn about collapsed levels from the middle on
            "train.collapse_check_after": steps // 2,
        })
    if overrides:
        from .config import apply_overrides

        apply_overrides(cfg, overrides)
    return cfg


def frame_energy_db(audio: torch.Tensor, sample_rate: int = SAMPLE_RATE, frame_ms: float = 10.0) -> torch.Tensor:
    """(T,) audio -> (frames,) energy in dB of non-overlapping ``frame_ms`` frames."""
    n = int(sample_rate * frame_ms / 1000)
    frames = audio[: len(audio) // n * n].reshape(-1, n)
    return 10 * torch.log10(frames.pow(2).mean(1) + 1e-10)


def envelope_correlation(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Pearson correlation of the 10 ms frame energies (dB) of two (T,) signals: 1.0 when the
    reconstruction rises and falls with the input (syllables, pauses), ~0 for stationary noise."""
    a, b = frame_energy_db(real.double()), frame_energy_db(fake.double())
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def save_spectrograms(real: torch.Tensor, fake: torch.Tensor, path: Path, title: str) -> bool:
    """Original over reconstruction, as a PNG. Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the spectrogram image (pip install matplotlib)")
        return False
    from .run_dir import log_spectrogram_image

    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for ax, audio, name in zip(axes, (real, fake), ("original", "reconstruction")):
        ax.imshow(log_spectrogram_image(audio)[0].numpy(), aspect="auto", cmap="magma",
                  extent=(0, audio.shape[-1] / SAMPLE_RATE, 0, SAMPLE_RATE / 2000))
        ax.set_ylabel(f"{name}\nkHz")
    axes[-1].set_xlabel("seconds")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def val_rows(run_dir: Path):
    """The validation rows of ``metrics.jsonl``, in step order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val/mel" in r]


def val_curve(run_dir: Path):
    return [(r["step"], r["val/mel"]) for r in val_rows(run_dir)]


def usage_line(row) -> str:
    """``level 0: 41% (perplexity 80.1), ...`` from one validation row."""
    levels = sorted(int(k[len("val/codebook_usage_level"):]) for k in row if k.startswith("val/codebook_usage_level"))
    return ", ".join(f"level {i}: {100 * row[f'val/codebook_usage_level{i}']:.0f}% "
                     f"(perplexity {row[f'val/codebook_perplexity_level{i}']:.1f})" for i in levels)


def health_line(row) -> str:
    """``level 0: 120 distinct codes, entropy 0.47, mean fraction 0.05; ...`` from one validation row."""
    levels = sorted(int(k[len("val/codebook_distinct_level"):]) for k in row if k.startswith("val/codebook_distinct_level"))
    return "; ".join(f"level {i}: {row[f'val/codebook_distinct_level{i}']:.0f} distinct codes, normalised perplexity "
                     f"{row[f'val/codebook_entropy_level{i}']:.2f}, latent mean fraction "
                     f"{row[f'val/latent_mean_fraction_level{i}']:.2f}" for i in levels)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_run", help="output folder (recreated on every run)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--clips", type=int, default=64, help="generated clips, 12 of them held out (default 64)")
    p.add_argument("--seed", type=int, default=0, help="training and data-order seed (default 0); the corpus is fixed")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for training (default: PyTorch's choice, OMP_NUM_THREADS)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of the demo recipe (repeatable), e.g. --set optim.lr=1e-3")
    args = p.parse_args(argv)
    if args.clips < 12 or args.steps < 1:
        p.error("--clips must be >= 12 and --steps >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.seed < 0:
        p.error("--seed must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    from .config import ConfigError

    try:
        cfg = demo_config(Path(args.out), args.steps, args.seed, args.set)
    except ConfigError as e:
        p.error(str(e))
    out = Path(args.out)
    if (out / "run").exists():
        shutil.rmtree(out / "run")  # the demo's own previous output, never user data
    print(f"writing {args.clips} synthetic speech-like clips to {out / 'corpus'}")
    write_corpus(out / "corpus", args.clips)

    from .audio import save_audio
    from .model import train_forward
    from .hub import load_generator
    from .train import train_main

    summary = train_main(cfg)
    curve = val_curve(out / "run")
    (start_step, start), (end_step, end) = curve[0], curve[-1]

    # Listen/look: the first held-out clip through the exported model.
    from .dataset import build_dataloaders

    _, val = build_dataloaders(cfg)
    model, _ = load_generator(summary["export_dir"])
    torch.manual_seed(cfg.train.seed)  # the decoder's noise: same seed, same reconstruction
    correlations = []
    for batch in val:
        with torch.no_grad():
            fakes = train_forward(model, batch["audio"]).audio
        correlations += [envelope_correlation(r[0], f[0]) for r, f in zip(batch["audio"], fakes)]
        if len(correlations) == len(batch["audio"]):
            real, fake = batch["audio"][:1], fakes[:1]
    save_audio(out / "heldout_original.wav", real[0], SAMPLE_RATE)
    save_audio(out / "heldout_reconstruction.wav", fake[0].clamp(-1, 1), SAMPLE_RATE)
    title = f"held-out clip, step {end_step}: validation mel distance {start:.3f} -> {end:.3f}"
    save_spectrograms(real[0, 0], fake[0, 0], out / "spectrogram.png", title)

    print("\nvalidation mel distance by step: " + ", ".join(f"{s}: {m:.3f}" for s, m in curve))
    print(f"validation mel distance: start (step {start_step}) {start:.3f} -> end (step {end_step}) {end:.3f} "
          f"({100 * (1 - end / start):.0f}% lower)")
    last = val_rows(out / "run")[-1]
    print(f"held-out codebook usage at step {end_step}: {usage_line(last)}; SI-SDR {last['val/si_sdr']:.1f} dB")
    print(f"held-out VQ health at step {end_step}: {health_line(last)}")
    print(f"frame-energy envelope correlation, reconstruction vs input, {len(correlations)} held-out clips: "
          f"min {min(correlations):.3f}, mean {sum(correlations) / len(correlations):.3f} "
          f"(1.0: the reconstruction follows every syllable and pause; ~0: stationary noise)")
    (out / "summary.json").write_text(json.dumps({
        "seed": args.seed, "threads": torch.get_num_threads(), "steps": end_step, "val_mel_start": start,
        "val_mel_end": end, "envelope_correlation": correlations,
        "val": {k: v for k, v in last.items() if k.startswith("val/")}}, indent=2))
    print(f"wrote {out / 'heldout_reconstruction.wav'}, {out / 'spectrogram.png'}, exported model "
          f"{summary['export_dir']}, TensorBoard logs in {out / 'run' / 'logs'}")
    return 0 if end < start else 1


if __name__ == "__main__":
    sys.exit(main())
