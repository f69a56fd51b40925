"""A run directory: its one owner (the lock), setting a previous run aside, trimming its metrics on
resume, the config it runs with and the history of that config, and the metric/sample logger."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .checkpoint import (
    ResumePoint, checkpoint_dir, config_differences, find_resume_checkpoint, remove_dead_temp_files,
    saved_world_size, _pid_alive,
)
from .agreement import REFERENCE_NAME
from .config import Config, load_config, save_config, to_config
from .state import TrainingError


def leftovers(cfg: Config) -> List[Path]:
    """What a previous run left in the run directory that a fresh start would mix with its own."""
    run_dir = Path(cfg.train.run_dir)
    names = [checkpoint_dir(cfg), run_dir / "metrics.jsonl", run_dir / "export", run_dir / "config.yaml",
             run_dir / HISTORY_NAME, run_dir / REFERENCE_NAME]
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


# --------------------------------------------------------------------------------------
# One writer per run directory
# --------------------------------------------------------------------------------------

LOCK_NAME = ".lock"

# flock errors that mean "this filesystem does not do file locks" (NFS mounted with nolock, Lustre
# without -o flock), not "someone else holds it".
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


@dataclass
class RunLock:
    """The lock file ``<run_dir>/.lock`` this process created (or took over) and holds open with an
    exclusive ``flock`` for the run's life."""

    path: Path
    fd: int
    holder: Dict[str, Any]

    def record_holder(self) -> None:
        """(Re)write who holds the lock. On a full disk the record waits (the flock alone still
        keeps other trainers out): :func:`prepare_run_dir` may free space, then it is written."""
        try:
            _write_holder(self.fd, self.holder)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise

    def release(self) -> None:
        """Remove the lock file, if it is still ours, then close it (which drops the flock).
        Removing before closing: a newcomer that opened the old file sees it unlinked and starts over."""
        try:
            if os.path.samestat(os.stat(self.path), os.fstat(self.fd)):
                os.unlink(self.path)
        except OSError:
            pass  # already gone, or the directory became unwritable: the flock still goes with close
        os.close(self.fd)


def take_run_lock(run_dir: Path) -> Tuple[RunLock, Optional[str]]:
    """Make this process the one writer of ``run_dir``; returns the lock and a note when a stale
    lock was taken over. Raises TrainingError naming the holder when a live run owns it.

    Two mechanisms, because cluster filesystems differ:

    - ``os.open(O_CREAT | O_EXCL)`` creates ``.lock`` atomically (also on NFSv3 and later): of two
      starters exactly one creates it. The file holds ``{pid, host, start_time}`` for messages and
      for the fallback below.
    - an exclusive ``flock`` held on it for the run's life: the kernel (or the network filesystem's
      lock manager: NFSv4, Lustre mounted with ``-o flock``, GPFS) drops it when the holder dies, even
      by SIGKILL or a node crash, so a left-over file whose flock can be taken is stale.
    - where flock does not work (``ENOLCK``...), the pid/host check is the fallback: a holder on
      this host whose pid is gone is stale; a holder on another host cannot be checked and is
      taken as live.
    """
    path = run_dir / LOCK_NAME
    for _ in range(20):  # the file may vanish or appear between two calls: start over
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            taken = _take_over_if_stale(path, run_dir)
            if taken is not None:
                return taken
            continue
        return _own_new_lock(path, fd, run_dir), None
    raise TrainingError(f"cannot take the lock {path}: it keeps appearing and disappearing; "
                        "is another trainer starting in this --run_dir?")


def _holder_info() -> Dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start_time": time.strftime("%Y-%m-%d %H:%M:%S")}


def _write_holder(fd: int, holder: Dict[str, Any]) -> None:
    data = (json.dumps(holder) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _flock(fd: int) -> str:
    """``taken``, ``held`` (by another open file: a live holder) or ``unsupported``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "held"
    except OSError as e:
        if e.errno in _NO_LOCKING:
            return "unsupported"
        raise
    return "taken"


def _own_new_lock(path: Path, fd: int, run_dir: Path) -> RunLock:
    """A lock file we just created: flock it first, then write who we are (a newcomer that reads it
    in between waits for the content)."""
    for _ in range(40):
        if _flock(fd) != "held":
            break
        time.sleep(0.05)  # a newcomer is looking at our fresh, still empty file; it lets go
    else:
        holder = _read_holder(fd)
        os.close(fd)
        raise TrainingError(_in_use_message(run_dir, holder))
    lock = RunLock(path, fd, _holder_info())
    lock.record_holder()
    return lock


def _read_holder(fd: int, wait: float = 1.0) -> Optional[Dict[str, Any]]:
    """The holder recorded in the lock file; None when it stays unreadable for ``wait`` seconds
    (its creator writes it right after creating the file)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode())
            if isinstance(holder, dict) and "pid" in holder:
                return holder
        except (ValueError, UnicodeDecodeError):
            pass
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _take_over_if_stale(path: Path, run_dir: Path) -> Optional[Tuple[RunLock, Optional[str]]]:
    """Someone created ``.lock``: raise if its holder is alive, take it over if stale, None to
    start over (the file was removed or replaced meanwhile)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        lock = _flock(fd)
        if not _same_file(fd, path):  # released (unlinked) by its holder while we looked
            os.close(fd)
            return None
        holder = _read_holder(fd)
        if lock == "held" or (lock == "unsupported" and not _stale_without_flock(holder)):
            raise TrainingError(_in_use_message(run_dir, holder, checked=lock != "unsupported"))
    except BaseException:
        os.close(fd)
        raise
    lock = RunLock(path, fd, _holder_info())
    lock.record_holder()
    return lock, _takeover_note(run_dir, holder)


def _stale_without_flock(holder: Optional[Dict[str, Any]]) -> bool:
    """The fallback where flock does not work: stale when the holder ran on this host and its pid
    is gone (or the file holds no holder at all); a holder on another host is taken as live."""
    if holder is None:
        return True
    if holder.get("host") != socket.gethostname():
        return False
    return not _pid_alive(int(holder["pid"]))


def _describe(holder: Optional[Dict[str, Any]]) -> str:
    if holder is None:
        return "an unknown process (its lock file is unreadable)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('start_time')}"


def _in_use_message(run_dir: Path, holder: Optional[Dict[str, Any]], checked: bool = True) -> str:
    why = "" if checked else (f" (this filesystem has no file locks, so a run on another host cannot be checked: "
                              f"if it is gone, delete {run_dir / LOCK_NAME})")
    return f"run directory {run_dir} is in use by {_describe(holder)}; stop it first or use another --run_dir{why}"


def _takeover_note(run_dir: Path, holder: Optional[Dict[str, Any]]) -> str:
    return f"taking over the stale lock of run directory {run_dir}: {_describe(holder)} no longer holds it"


# --------------------------------------------------------------------------------------
# Config changes on resume, and the config history
# --------------------------------------------------------------------------------------

HISTORY_NAME = "config_history.jsonl"

# Keys that cannot change in the middle of a run: the checkpoint's weights, optimizer moments and
# data position belong to them, so a resume with other values would silently be another
# experiment (or would not load). Changing one needs --allow_config_change; model.* and
# discriminator.* then still keep the checkpoint's values (its weights have that shape).
FIXED_SECTIONS = ("model", "discriminator")
FIXED_KEYS = frozenset({
    # the data source: which audio the run trains on (and its data position indexes)
    "data.dataset", "data.dataset_path", "data.config_name", "data.revision", "data.split", "data.val_split",
    "data.extra_datasets", "data.dataset_weights", "data.audio_column", "data.streaming",
    "data.val_items",  # the held-out items are taken out of the training items
    # the random streams and the batch: the data order and every step's noise
    "train.seed", "data.seed", "data.batch_size",
    # the optimizer state and the code-replacement state in the checkpoint are shaped by these
    "train.freeze_encoder", "train.freeze_quantizer", "train.code_replacement",
    # what a fine-tune trains (and so which tokens it promises to keep)
    "train.finetune",
})
# Keys that describe this command or a fresh start only: never compared.
IGNORED_KEYS = frozenset({
    "train.run_dir", "train.resume", "train.allow_config_change",
    "train.init_from",  # the weights come from the checkpoint on resume
    "train.generator_init", "train.codebook_init", "train.codebook_init_batches", "train.codebook_init_iters",
})
# Optimizer keys restored from the checkpoint's state: a change must be written back (apply_optim_config).
OPTIMIZER_KEYS = frozenset({"optim.lr", "optim.lr_decay", "optim.warmup_steps", "optim.betas", "optim.eps",
                            "optim.weight_decay"})


@dataclass(frozen=True)
class ConfigChange:
    key: str  # dotted key, or "world_size"
    old: Any
    new: Any

    @property
    def fixed(self) -> bool:
        return (self.key == "world_size" or self.key in FIXED_KEYS
                or self.key.split(".", 1)[0] in FIXED_SECTIONS)

    @property
    def kept_from_checkpoint(self) -> bool:
        """A model/discriminator key: the checkpoint's value stays (adopt_architecture)."""
        return self.key.split(".", 1)[0] in FIXED_SECTIONS


def _fmt(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def resume_changes(cfg: Config, point: ResumePoint, world: int) -> List[ConfigChange]:
    """Every key whose value in ``cfg`` differs from the checkpoint's config, plus the world size.
    Keys a checkpoint does not know (written before the key existed) are not compared; nor are the
    model keys of a fine-tune command (``init_from``: its model is the pretrained one's)."""
    saved, now = point.ckpt["config"], cfg.to_dict()
    changes = []
    for section, values in now.items():
        if section == "model" and cfg.train.init_from:
            continue
        old_values = saved.get(section, {}) if isinstance(saved, dict) else {}
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if dotted not in IGNORED_KEYS and key in old_values and old_values[key] != value:
                changes.append(ConfigChange(dotted, old_values[key], value))
    old_world = saved_world_size(point.ckpt)
    if old_world is not None and old_world != world:
        changes.append(ConfigChange("world_size", old_world, world))
    return changes


def check_resume_changes(cfg: Config, point: ResumePoint, changes: List[ConfigChange]) -> List[ConfigChange]:
    """Refuse (TrainingError, one line listing ``key: old -> new``) changes of keys that cannot
    change mid-run unless ``train.allow_config_change``; return the changes the resumed run applies."""
    fixed = [c for c in changes if c.fixed]
    if fixed and not cfg.train.allow_config_change:
        listed = "; ".join(f"{c.key}: {_fmt(c.old)} -> {_fmt(c.new)}" for c in fixed)
        raise TrainingError(f"cannot resume {point.path} with a different config ({listed}): these keys cannot "
                            "change in the middle of a run; rerun with the checkpoint's values, add "
                            "--allow_config_change to resume anyway, or use --no-resume or another --run_dir")
    return [c for c in changes if not c.kept_from_checkpoint]


def describe_applied(changes: List[ConfigChange], step: int) -> Optional[str]:
    if not changes:
        return None
    return f"config changes applied at step {step}: " + ", ".join(f"{c.key} {_fmt(c.old)} -> {_fmt(c.new)}"
                                                                  for c in changes)


def record_config(cfg: Config, run_dir: Path, step: int, world: int, changes: List[ConfigChange]) -> None:
    """Write ``config.yaml`` (the config the run now trains with) and append one line
    ``{"step", "world_size", "time", "config", "changes"}`` to ``config_history.jsonl``: every start
    and resume, so the config the run started with is never lost when a resume changes it."""
    history = run_dir / HISTORY_NAME
    path = run_dir / "config.yaml"
    try:
        if not history.exists() and path.is_file() and step > 0:
            _seed_history(history, path)
        entry = {"step": step, "world_size": world, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "config": cfg.to_dict(), "changes": {c.key: [c.old, c.new] for c in changes}}
        with open(history, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        save_config(cfg, path)
    except OSError as e:
        raise TrainingError(f"cannot write {e.filename or path}: {e.strerror or e}") from None


def _seed_history(history: Path, config_yaml: Path) -> None:
    """A run started before config_history.jsonl existed: keep its config.yaml as the first entry."""
    try:
        old = load_config(config_yaml).to_dict()
    except Exception:  # noqa: BLE001 - an unreadable old config is simply not kept
        return
    with open(history, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": None, "config": old, "changes": {},
                            "note": "config.yaml written before config_history.jsonl existed"}) + "\n")
