"""Checkpoint files of a run: their contents and per-rank RNG, atomic writes with a free-space check,
reading with reasons, where to resume, pruning and the best model."""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .config import Config, to_config
from .errors import first_line
from .state import TrainState, TrainingError, seed_everything


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.train.run_dir) / "checkpoints"


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_payload(state: TrainState, loader=None) -> Dict[str, Any]:
    """Everything needed to continue exactly: weights, optimizers, schedulers, step, RNG, data."""
    payload = {
        "format": 1,
        "step": state.step,
        "config": state.cfg.to_dict(),
        "generator": state.generator.state_dict(),
        "discriminator": state.discriminator.state_dict(),
        "opt_g": state.opt_g.state_dict(),
        "opt_d": state.opt_d.state_dict(),
        "sched_g": state.sched_g.state_dict(),
        "sched_d": state.sched_d.state_dict(),
        "scaler": None,  # bf16 autocast needs no loss scaling; kept for a stable format
        "best_mel": state.best_mel,
        "nonfinite_total": state.nonfinite_total,
        "rng": _rng_state(),
        # Every rank's RNG state, gathered at the checkpoint step (see gather_rng_states).
        "rng_ranks": state.extra["rng_ranks"] if state.extra.get("rng_ranks_step") == state.step else None,
        "restarter": state.restarter.state_dict() if state.restarter else None,
        "data": loader.state_dict() if loader is not None and hasattr(loader, "state_dict") else None,
        "lineage": state.extra.get("lineage"),
        "world_size": state.world_size,  # a resume with another number of processes is a config change
    }
    return payload


def saved_world_size(ckpt: Dict[str, Any]) -> Optional[int]:
    """The number of processes that trained ``ckpt`` (older checkpoints: from their data position
    or per-rank RNG states), or None when it cannot be told."""
    if ckpt.get("world_size") is not None:
        return int(ckpt["world_size"])
    data = ckpt.get("data")
    if isinstance(data, dict) and data.get("world_size") is not None:
        return int(data["world_size"])
    return len(ckpt["rng_ranks"]) if ckpt.get("rng_ranks") else None


class CheckpointError(TrainingError):
    """A checkpoint file cannot be used (unreadable, refused by weights_only, not a checkpoint)."""


# What a file must hold to be resumed from (older keys only: newer ones are optional on load).
REQUIRED_KEYS = ("step", "config", "generator", "discriminator", "opt_g", "opt_d", "sched_g", "sched_d", "rng")


_STEP_NAME = re.compile(r"^step_(\d+)\.pt$")


_TEMP_NAME = re.compile(r"^\..+\.tmp(\d+)$")


# ours: head room on top of a checkpoint's tensor bytes (zip headers, pickled config, other writers).
FREE_SPACE_MARGIN = 16 << 20


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a training checkpoint, or CheckpointError saying
    why the file cannot be used (empty, truncated, refused pickle, not a checkpoint)."""
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path.name} is empty")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError:
        # weights_only refuses arbitrary Python objects; garbage bytes fail the same way.
        raise CheckpointError(f"{path.name} was refused by the safe loader (not a checkpoint, or it holds "
                              "Python objects other than tensors and plain containers)") from None
    except Exception as e:  # noqa: BLE001 - zip, EOF and storage errors all mean "unreadable"
        first = first_line(e)
        raise CheckpointError(f"{path.name} is unreadable (truncated or damaged: {first[:120]})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path.name} is not a training checkpoint (holds a {type(ckpt).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path.name} is not a training checkpoint (missing {', '.join(missing)})")
    return ckpt


def numbered_checkpoints(ckdir: Path) -> List[Tuple[int, Path]]:
    """``(step, path)`` of every ``step_*.pt``, ordered by step (not by name)."""
    found = []
    for p in ckdir.glob("step_*.pt"):
        m = _STEP_NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def checkpoint_files(ckdir: Path) -> List[Path]:
    """The checkpoint files a run directory holds (not temporaries)."""
    return sorted(p for p in ckdir.glob("*.pt") if not p.name.startswith(".")) if ckdir.is_dir() else []


@dataclass
class ResumePoint:
    """The checkpoint a run continues from, and why that one."""

    path: Path
    ckpt: Dict[str, Any]
    skipped: List[str]

    def describe(self) -> str:
        why = f" ({'; '.join(self.skipped)})" if self.skipped else ""
        return f"resumed from {self.path} at step {int(self.ckpt['step'])}{why}"


def find_resume_checkpoint(ckdir: Path) -> Optional[ResumePoint]:
    """The newest readable checkpoint: ``latest.pt``, unless a numbered checkpoint is newer or
    ``latest.pt`` cannot be read; then the newest readable ``step_*.pt``; ``best.pt`` last.

    Returns None when the directory holds no checkpoint files; raises CheckpointError when it
    holds some but none is readable (never a silent fresh start over someone's run).
    """
    files = checkpoint_files(ckdir)
    if not files:
        return None
    skipped: List[str] = []
    found: Optional[Tuple[Path, Dict[str, Any]]] = None
    latest = ckdir / "latest.pt"
    if latest.is_file():
        try:
            found = (latest, read_checkpoint(latest))
        except CheckpointError as e:
            skipped.append(str(e))
    else:
        skipped.append("latest.pt is missing")
    floor = int(found[1]["step"]) if found else -1
    for step, path in reversed(numbered_checkpoints(ckdir)):
        if step <= floor:
            break
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        if found:
            skipped.append(f"{path.name} is newer than latest.pt (step {floor})")
        found = (path, ckpt)
        break
    best = ckdir / "best.pt"
    if found is None and best.is_file():
        try:
            found = (best, read_checkpoint(best))
            skipped.append("no readable latest.pt or step_*.pt")
        except CheckpointError as e:
            skipped.append(str(e))
    if found is None:
        raise CheckpointError(f"no readable checkpoint in {ckdir} ({'; '.join(skipped) or 'no checkpoint files'}); "
                              "use --no-resume to set them aside and start fresh")
    return ResumePoint(found[0], found[1], skipped)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_dead_temp_files(*dirs: Path) -> List[Tuple[Path, int]]:
    """Delete ``.<name>.tmp<PID>`` files whose writer process is gone (kill -9, power loss, a full
    disk): they are never renamed into place and would only hold disk space. Returns
    ``(path, bytes)`` of each removed file."""
    removed = []
    for d in dirs:
        if not d.is_dir():
            continue
        for p in d.iterdir():
            m = _TEMP_NAME.match(p.name)
            if m and p.is_file() and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                size = p.stat().st_size
                p.unlink()
                removed.append((p, size))
    return removed


def _tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors in a nested payload (what torch.save writes, give or take headers)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def ensure_free_space(directory: Path, need: int) -> None:
    """TrainingError (one line) unless ``directory``'s filesystem has ``need`` bytes plus a margin."""
    free = shutil.disk_usage(directory).free
    if free < need + FREE_SPACE_MARGIN:
        raise TrainingError(f"not enough free space in {directory} for a checkpoint: about "
                            f"{(need + FREE_SPACE_MARGIN) / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free; "
                            "free some space and rerun the same command to resume from the last checkpoint")


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError (iostream error)
        tmp.unlink(missing_ok=True)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:160]
        raise TrainingError(f"cannot write checkpoint {path}: {why} (disk full?); the previous checkpoints are "
                            "kept - fix the cause and rerun the same command to resume") from None


def _link_or_copy(src: Path, dst: Path) -> None:
    """Point ``dst`` at ``src``'s bytes atomically (hard link when possible: no second write)."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TrainingError(f"cannot write checkpoint {dst}: {e.strerror or e}; rerun the same command to "
                            "resume") from None


def prune_checkpoints(ckdir: Path, keep_last: int, step: int) -> List[Path]:
    """Delete all but the ``keep_last`` newest numbered checkpoints up to ``step``, by step number.
    Files of later steps (unreadable ones skipped at resume) are left for the run to overwrite."""
    older = [p for s, p in numbered_checkpoints(ckdir) if s <= step]
    doomed = older[:-keep_last] if keep_last > 0 else []
    for p in doomed:
        p.unlink()
    return doomed


def save_checkpoint(state: TrainState, loader=None, tags: Iterable[str] = ("latest",), numbered: bool = True) -> Path:
    """Write ``step_XXXXXXXX.pt`` (when ``numbered``) and the given tags (``latest``, ``best``).

    Each file is written to a temporary name and renamed, so a crash leaves the previous file;
    free space is checked first. Only the newest ``train.keep_last`` numbered checkpoints are kept.
    """
    out = checkpoint_dir(state.cfg)
    out.mkdir(parents=True, exist_ok=True)
    payload = checkpoint_payload(state, loader)
    ensure_free_space(out, _tensor_bytes(payload))
    tags = list(tags)
    first = out / (f"step_{state.step:08d}.pt" if numbered else f"{tags.pop(0)}.pt")
    _atomic_save(payload, first)
    for tag in tags:
        _link_or_copy(first, out / f"{tag}.pt")
    if numbered:
        prune_checkpoints(out, state.cfg.train.keep_last, state.step)
    return first


def config_differences(saved: Dict[str, Any], cfg: Config, section: str) -> List[str]:
    """``section.key: saved X, now Y`` for each key of ``section`` that differs."""
    now = cfg.to_dict()[section]
    old = saved.get(section, {}) if isinstance(saved, dict) else {}
    return [f"{section}.{k}: checkpoint {old.get(k)!r}, now {now[k]!r}" for k in now if old.get(k, now[k]) != now[k]]


def load_checkpoint(state: TrainState, path, loader=None, source=None) -> None:
    """Restore ``state`` (and the data position of ``loader``) from a checkpoint file, or from a
    checkpoint dict already read from ``source``."""
    ckpt = path if isinstance(path, dict) else read_checkpoint(Path(path))
    path = source if isinstance(path, dict) else path
    saved_model = ckpt["config"]["model"]
    if to_config({"model": saved_model}).model != state.cfg.model:
        raise TrainingError(f"{path} was trained with a different model config; "
                            "use --no-resume or another --run_dir")
    diffs = config_differences(ckpt["config"], state.cfg, "discriminator")
    if diffs:
        raise TrainingError(f"{path} was trained with a different discriminator config ({'; '.join(diffs)}); "
                            "resume with the checkpoint's values, or use --no-resume or another --run_dir")
    try:
        state.generator.load_state_dict(ckpt["generator"])
        state.discriminator.load_state_dict(ckpt["discriminator"])
        state.opt_g.load_state_dict(ckpt["opt_g"])
        state.opt_d.load_state_dict(ckpt["opt_d"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = first_line(e)
        raise TrainingError(f"{path} does not fit this run ({first[:160]}); train.freeze_encoder / "
                            "freeze_quantizer must match the checkpoint, or use --no-resume") from None
    _load_schedule(state.sched_g, ckpt["sched_g"])
    _load_schedule(state.sched_d, ckpt["sched_d"])
    state.step = int(ckpt["step"])
    state.best_mel = float(ckpt["best_mel"])
    state.nonfinite_total = int(ckpt["nonfinite_total"])
    state.extra["lineage"] = ckpt.get("lineage")
    if state.restarter is not None and ckpt.get("restarter"):
        state.restarter.load_state_dict(ckpt["restarter"])
    if loader is not None and ckpt.get("data") is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(ckpt["data"])
    _set_rng_state(_own_rng_state(ckpt, state))


def _load_schedule(sched: torch.optim.lr_scheduler.LRScheduler, saved: Dict[str, Any]) -> None:
    """Restore a learning-rate schedule's position, also from the other schedule class.

    A resume that turns ``optim.warmup_steps`` on or off builds the other class (LambdaLR with a
    warm-up, ExponentialLR without) than the one that saved the checkpoint. LambdaLR refuses a
    state without its ``lr_lambdas`` entry; there is nothing of it to restore (its lambda comes
    from the config), so the entry is given empty. The step counter carries over either way, and
    the resume then sets the rates the new config defines (``state.apply_optim_config``)."""
    if isinstance(sched, torch.optim.lr_scheduler.LambdaLR) and "lr_lambdas" not in saved:
        saved = {**saved, "lr_lambdas": [None] * len(sched.lr_lambdas)}
    sched.load_state_dict(saved)


def gather_rng_states(state: TrainState) -> None:
    """Collect every rank's RNG state into ``state.extra`` for the checkpoint of this step.

    Collective: every rank calls it at the same step. Ranks draw different noise (the seed is
    offset by the rank), so a resume must give each rank its own state back.
    """
    own = _rng_state()
    ranks = [own]
    if state.world_size > 1:
        ranks = [None] * state.world_size
        dist.all_gather_object(ranks, own)
    state.extra["rng_ranks"], state.extra["rng_ranks_step"] = ranks, state.step


def _own_rng_state(ckpt: Dict[str, Any], state: TrainState) -> Dict[str, Any]:
    """This rank's saved RNG state; a rank the checkpoint did not have (the run grew) gets a fresh
    state derived from seed, rank and step, never another rank's."""
    ranks = ckpt.get("rng_ranks")
    if ranks and state.rank < len(ranks):
        return ranks[state.rank]
    if state.rank == 0:
        return ckpt["rng"]
    seed_everything(int(np.random.SeedSequence([state.cfg.train.seed, state.rank, state.step]).generate_state(1)[0]))
    return _rng_state()


def adopt_best(state: TrainState) -> Optional[str]:
    """Make ``best.pt`` only replaceable by a better evaluation of this run's lineage.

    A resumed state may predate ``best.pt`` (resumed from an older numbered checkpoint): its
    ``best_mel`` is lowered to best.pt's. A ``best.pt`` of another lineage (copied in, or left
    by an older run) is renamed aside. Returns a note for the user, or None.
    """
    best = checkpoint_dir(state.cfg) / "best.pt"
    if not best.is_file():
        return None
    try:
        info = torch.load(best, map_location="cpu", weights_only=True, mmap=True)
        lineage, mel = info.get("lineage"), float(info["best_mel"])
    except Exception:  # noqa: BLE001 - an unreadable best.pt is simply replaced by the next best
        return f"{best} is unreadable; the next best evaluation replaces it"
    if lineage != state.extra.get("lineage"):
        target = _free_name(best.with_name(f"best.other{'' if lineage is None else '-' + str(lineage)[:8]}.pt"))
        best.rename(target)
        return f"{best} came from another run; kept as {target}"
    state.best_mel = min(state.best_mel, mel)
    return None


def _free_name(path: Path) -> Path:
    n, candidate = 1, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
    return candidate
