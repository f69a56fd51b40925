"""Runnable training examples, one function each.

    python example_training.py --list              # names, with the ones that need the network marked
    python example_training.py                     # every offline example, in order
    python example_training.py train_tiny codec    # chosen examples
    python example_training.py --work-dir runs/examples finetune_pretrained   # needs network

Offline examples train the ``tiny`` preset for a few steps on CPU, on the LJ Speech-layout test
corpus (``--audio-dir``, default ``tests/data/ljspeech-mini``; a small synthetic corpus is
generated when it is missing). Runs and exports go under ``--work-dir`` (default: a temporary
folder). The numbers they print show that things run, not how good a codec is: a few steps of a
tiny model on a few clips reconstruct nothing well.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List

import torch

from training import (Config, Discriminator, GeneratorLoss, create_training_config, discriminator_loss,
                      load_config, save_config, to_config, train_forward, train_main)
from training.config import TINY_DISCRIMINATOR, model_preset

DEFAULT_AUDIO = Path(__file__).resolve().parent / "tests" / "data" / "ljspeech-mini"

# Small settings for a CPU: short crops, no DataLoader worker processes, little validation.
FAST = {
    "data.segment_seconds": 0.17,
    "data.val_segment_seconds": 0.5,
    "data.batch_size": 2,
    "data.num_workers": 0,
    "data.val_items": 2,
    "train.eval_batches": 1,
    "train.eval_every": 1000,
    "train.checkpoint_every": 1000,
    "train.log_every": 1,
    "train.device": "cpu",
}


def audio_source(audio_dir: Path, work: Path) -> str:
    """ljspeech-mini when present, else a generated folder of speech-like WAV clips."""
    if (audio_dir / "metadata.csv").is_file():
        return str(audio_dir)
    from training.demo import write_corpus

    corpus = work / "corpus"
    if not corpus.is_dir():
        print(f"  {audio_dir} not found: generating 16 clips in {corpus}")
        write_corpus(corpus, 16)
    return str(corpus)


def tiny_config(audio_dir: Path, work: Path, run: str, steps: int, **overrides) -> Config:
    return create_training_config(preset="tiny", dataset_path=audio_source(audio_dir, work),
                                  overrides={**FAST, "train.run_dir": str(work / run),
                                             "train.max_steps": steps, **overrides})


def _trained_export(audio_dir: Path, work: Path) -> Path:
    """The exported SNAC directory of the ``train_tiny`` run (trained first when missing)."""
    export = work / "tiny_run" / "export"
    if not (export / "config.json").is_file():
        train_tiny(audio_dir, work)
    return export


# ----------------------------------------------------------------------------- offline


def configs(audio_dir: Path, work: Path) -> Config:
    """Build configs from a preset, flat keywords, a plain dict, dotted overrides and a file."""
    # 1. A preset plus the common settings by name; any other key as a dotted override.
    cfg = create_training_config(dataset_path="/data/wavs", batch_size=8, learning_rate=3e-4,
                                 preset="24khz", overrides={"train.max_steps": 20000, "loss.stft": 0.0})
    print(f"  24khz: hop {cfg.model.hop_length}, token rates "
          f"{[round(r, 1) for r in cfg.model.token_rates()]} Hz, {cfg.model.bitrate_kbps():.2f} kbps")
    # 2. A dataset preset fills the data section (hub id, config, split, columns).
    hub = create_training_config(dataset="librispeech")
    print(f"  librispeech preset: {hub.data.dataset_path} / {hub.data.config_name} / {hub.data.split}, "
          f"streaming={hub.data.streaming}")
    # 3. A plain dict, in this package's layout or the legacy model/training/data/paths layout.
    legacy = to_config({"model": model_preset("tiny").snac_kwargs(),
                        "training": {"batch_size": 4, "learning_rate": 1e-3, "num_iterations": 100},
                        "data": {"dataset_path": "/data/wavs", "segment_length": 0.5},
                        "paths": {"checkpoint_dir": str(work / "legacy_run")}})
    print(f"  legacy dict: batch {legacy.data.batch_size}, lr {legacy.optim.lr}, "
          f"steps {legacy.train.max_steps}, segment {legacy.segment_length()} samples")
    # 4. Files: JSON or YAML by extension; load_config validates every key and type.
    path = work / "my_config.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    print(f"  wrote and re-read {path}")
    return again


def train_tiny(audio_dir: Path, work: Path) -> Dict:
    """Train the tiny preset for 2 steps: checkpoints, logs, metrics.jsonl and an exported model."""
    cfg = tiny_config(audio_dir, work, "tiny_run", steps=2)
    summary = train_main(cfg)
    print(f"  step {summary['step']}, validation mel distance {summary['val/mel']:.3f}, "
          f"exported to {summary['export_dir']}")
    return summary


def resume(audio_dir: Path, work: Path) -> Dict:
    """Stop after 2 steps, then ask for 3: the second call continues from checkpoints/latest.pt."""
    first = train_main(tiny_config(audio_dir, work, "resume_run", steps=2))
    second = train_main(tiny_config(audio_dir, work, "resume_run", steps=3))
    assert (first["step"], second["step"]) == (2, 3)
    print(f"  resumed at step {first['step']}, finished at step {second['step']}")
    return second


def finetune(audio_dir: Path, work: Path) -> Dict:
    """Fine-tune an exported SNAC directory with the encoder frozen (train.init_from)."""
    export = _trained_export(audio_dir, work)
    cfg = tiny_config(audio_dir, work, "finetune_run", steps=2,
                      **{"train.init_from": str(export), "train.freeze_encoder": True, "optim.lr": 1e-4})
    summary = train_main(cfg)
    print(f"  fine-tuned {export} for {summary['step']} steps -> {summary['export_dir']}")
    return summary


def codec(audio_dir: Path, work: Path) -> torch.Tensor:
    """Encode and decode with training.codec.load_codec (checkpoint, run dir, SNAC dir or hub id)."""
    from training.codec import load_codec, save_codes

    c = load_codec(_trained_export(audio_dir, work), device="cpu")
    audio = torch.randn(1, 1, c.sample_rate) * 0.1  # one second at the model rate, (B, 1, T)
    codes = c.encode(audio)
    decoded = c.decode(codes, length=audio.shape[-1])
    print(f"  {c.n_levels} levels, tokens per level {[x.shape[-1] for x in codes]}, "
          f"decoded {tuple(decoded.shape)}")
    files = sorted(Path(audio_source(audio_dir, work)).rglob("*.wav"))
    if files:
        enc = c.encode_file(files[0])  # any format; resampled to the model rate
        out = save_codes(work / "codes.npz", enc)
        print(f"  {files[0].name}: {enc.duration:.2f} s -> {out}")
    return decoded


def losses(audio_dir: Path, work: Path) -> Dict[str, float]:
    """The training forward, discriminators and losses used directly (one manual GAN step)."""
    cfg = create_training_config(preset="tiny")
    from training import build_generator

    gen = build_generator(cfg.model)
    disc = Discriminator(TINY_DISCRIMINATOR, cfg.model.sampling_rate)
    loss_fn = GeneratorLoss(cfg.loss, cfg.model.sampling_rate)
    real = torch.randn(2, 1, cfg.segment_length()) * 0.1  # (B, 1, T), T a multiple of the pad unit

    out = train_forward(gen, real)  # reconstruction, codes, commitment/codebook losses, codebook stats
    d_real, d_fake = disc(real), disc(out.audio.detach())  # list of (logits, feature_maps) per sub-disc
    d_loss = discriminator_loss(d_real, d_fake)
    total, terms = loss_fn(real, out.audio, out.commitment_loss, out.codebook_loss, disc(real), disc(out.audio))
    total.backward()
    grad = gen.quantizer.quantizers[0].codebook.weight.grad
    print(f"  {len(d_real)} sub-discriminators, D loss {float(d_loss.detach()):.3f}, G terms "
          + ", ".join(f"{k} {float(v.detach()):.3f}" for k, v in terms.items()))
    print(f"  codebook usage per level {[round(u, 3) for u in out.codebook_usage.tolist()]}, "
          f"level-0 codebook gradient norm {float(grad.norm()):.2e} (non-zero: the codebooks train)")
    return {k: float(v.detach()) for k, v in terms.items()}


# ----------------------------------------------------------------------------- network


def finetune_pretrained(audio_dir: Path, work: Path) -> Dict:
    """Fine-tune the published 24 kHz model (downloads hubertsiuzdak/snac_24khz) on local audio."""
    cfg = create_training_config(preset="24khz", dataset_path=audio_source(audio_dir, work),
                                 overrides={**FAST, "train.run_dir": str(work / "pretrained_run"),
                                            "train.max_steps": 2, "train.init_from": "hubertsiuzdak/snac_24khz",
                                            "train.freeze_encoder": True, "train.freeze_quantizer": True,
                                            "optim.lr": 1e-5})
    return train_main(cfg)


def hub_dataset(audio_dir: Path, work: Path) -> Dict:
    """Train the tiny preset for 2 steps on LibriSpeech streamed from the Hugging Face hub."""
    cfg = create_training_config(preset="tiny", dataset="librispeech",
                                 overrides={**FAST, "train.run_dir": str(work / "hub_run"), "train.max_steps": 2})
    return train_main(cfg)


OFFLINE: Dict[str, Callable] = {f.__name__: f for f in (configs, train_tiny, resume, finetune, codec, losses)}
NETWORK: Dict[str, Callable] = {f.__name__: f for f in (finetune_pretrained, hub_dataset)}


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="examples to run (default: every offline example)")
    p.add_argument("--list", action="store_true", help="list the examples and exit")
    p.add_argument("--audio-dir", type=Path, default=DEFAULT_AUDIO,
                   help="LJ Speech-layout folder (default: tests/data/ljspeech-mini, shipped with the repository)")
    p.add_argument("--work-dir", type=Path, help="runs and exports go here (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.list:
        for name, f in {**OFFLINE, **NETWORK}.items():
            tag = "  [network]" if name in NETWORK else ""
            print(f"{name:20s} {f.__doc__.splitlines()[0]}{tag}")
        return 0
    unknown = [n for n in args.names if n not in OFFLINE and n not in NETWORK]
    if unknown:
        print(f"error: unknown example(s) {unknown}; see --list", file=sys.stderr)
        return 2
    names = args.names or list(OFFLINE)
    with tempfile.TemporaryDirectory(prefix="snac_examples_") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            print(f"== {name}{' (needs network)' if name in NETWORK else ''}")
            {**OFFLINE, **NETWORK}[name](args.audio_dir, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
