"""A run directory: setting a previous run aside, trimming its metrics on resume, the config it was
started with, and the metric/sample logger."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .checkpoint import (
    ResumePoint, checkpoint_dir, config_differences, find_resume_checkpoint, remove_dead_temp_files,
)
from .config import Config, save_config, to_config
from .state import TrainingError


def leftovers(cfg: Config) -> List[Path]:
    """What a previous run left in the run directory that a fresh start would mix with its own."""
    run_dir = Path(cfg.train.run_dir)
    names = [checkpoint_dir(cfg), run_dir / "metrics.jsonl", run_dir / "export", run_dir / "config.yaml"]
    if not cfg.train.log_dir:
        names.append(run_dir / "logs")
    return [p for p in names if p.exists() and not (p.is_dir() and not any(p.iterdir()))]


def set_aside_previous_run(cfg: Config) -> List[Path]:
    """A fresh start in a used run directory: rename the previous run's checkpoints, metrics,
    export, config and logs to ``<name>.prevN`` (one N for all), never delete them."""
    old = leftovers(cfg)
    if not old:
        return []
    n = 1
    while any(_prev_name(p, n).exists() for p in old):
        n += 1
    moved = []
    for p in old:
        p.rename(_prev_name(p, n))
        moved.append(_prev_name(p, n))
    return moved


def _prev_name(path: Path, n: int) -> Path:
    """checkpoints -> checkpoints.prev1, metrics.jsonl -> metrics.prev1.jsonl."""
    return path.with_name(f"{path.stem}.prev{n}{path.suffix}")


def trim_metrics(path: Path, step: int) -> int:
    """Drop ``metrics.jsonl`` rows logged after ``step`` (they belong to steps the resumed run
    repeats) and a half-written last line; returns how many rows were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row_step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            dropped += 1
            continue
        if row_step <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


class RunLogger:
    """TensorBoard scalars/audio/images plus the same scalars as JSON lines (rank 0 only)."""

    def __init__(self, cfg: Config, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        run_dir = Path(cfg.train.run_dir)
        log_dir = Path(cfg.train.log_dir) if cfg.train.log_dir else run_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def samples(self, step: int, real: Tensor, fake: Tensor, sample_rate: int, n: int) -> None:
        if not self.enabled:
            return
        for i in range(min(n, real.shape[0])):
            self.writer.add_audio(f"audio/real_{i}", real[i, 0].clamp(-1, 1), step, sample_rate)
            self.writer.add_audio(f"audio/reconstruction_{i}", fake[i, 0].clamp(-1, 1), step, sample_rate)
            image = torch.cat([log_spectrogram_image(real[i, 0]), log_spectrogram_image(fake[i, 0])], dim=1)
            self.writer.add_image(f"spectrogram/real_over_reconstruction_{i}", image, step)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def log_spectrogram_image(audio: Tensor, n_fft: int = 1024) -> Tensor:
    """(T,) audio -> (1, n_fft//2+1, frames) log-magnitude image in [0, 1], low frequencies at the bottom."""
    spec = torch.stft(audio.float(), n_fft, n_fft // 4, window=torch.hann_window(n_fft), return_complex=True).abs()
    db = 20 * torch.log10(spec.clamp_min(1e-5))
    db = (db - db.max() + 80).clamp_min(0) / 80
    return db.flip(0).unsqueeze(0)


def make_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` and prove it is writable now, not after the first hour of training."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"--run_dir {run_dir} exists and is not a directory")
    probe = run_dir / f".write-test.tmp{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"cannot write to --run_dir {run_dir}: {e.strerror or e}") from None


def prepare_run_dir(cfg: Config) -> Tuple[Optional[ResumePoint], List[str]]:
    """Rank 0's start-up: create the run directory, remove dead writers' temporaries, and either
    pick the checkpoint to resume from or set the previous run aside. Returns (point, notes)."""
    run_dir, ckdir = Path(cfg.train.run_dir), checkpoint_dir(cfg)
    make_run_dir(run_dir)
    notes = []
    removed = remove_dead_temp_files(run_dir, ckdir, run_dir / "export")
    if removed:
        mib = sum(size for _, size in removed) / 2**20
        notes.append(f"removed {len(removed)} temporary file(s) left by interrupted writes ({mib:.1f} MiB)")
    point = find_resume_checkpoint(ckdir) if cfg.train.resume else None
    if point is None:
        moved = set_aside_previous_run(cfg)
        if moved:
            why = "--no-resume" if not cfg.train.resume else "no checkpoint to resume from"
            notes.append(f"{why}: the previous run's files are kept as {', '.join(p.name for p in moved)}")
    return point, notes


def adopt_architecture(cfg: Config, saved: Dict[str, Any]) -> Optional[str]:
    """Resume as what the checkpoint actually trained: its model and discriminator configs replace
    the requested ones (a run started with --init_from or another preset). Returns a note listing
    what differs from the request, or None."""
    diffs = [] if cfg.train.init_from else config_differences(saved, cfg, "model")
    diffs += config_differences(saved, cfg, "discriminator")
    cfg.model = to_config({"model": saved["model"]}).model
    if "discriminator" in saved:
        cfg.discriminator = to_config({"discriminator": saved["discriminator"]}).discriminator
    cfg.train.init_from = None  # the weights come from the checkpoint, not the pretrained model
    if not diffs:
        return None
    return (f"resuming the checkpoint's architecture, not the requested one ({'; '.join(diffs[:4])}"
            f"{'; ...' if len(diffs) > 4 else ''}); use --no-resume or another --run_dir to train the requested one")


def _save_config_checked(cfg: Config, path: Path) -> None:
    try:
        save_config(cfg, path)
    except OSError as e:
        raise TrainingError(f"cannot write {path}: {e.strerror or e}") from None
