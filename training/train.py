"""The training loop: setup, one GAN step, evaluation, checkpoints, resume, logging, DDP.

One code path serves one CPU, one GPU and many GPUs: under ``torchrun`` the same functions run on
every rank, DDP averages gradients, and rank 0 alone logs, evaluates and writes files.

Per step (the order of DAC's trainer, which SNAC follows)::

    out    = generator(real)                       # train_forward: reconstruction + VQ losses
    D step = LSGAN(D(real), D(out.audio.detach()))  # discriminator first, on detached fakes
    G step = GeneratorLoss(real, out.audio, VQ, D(real), D(out.audio))   # with the updated D

A step does not wait for the GPU: losses, norms and codebook statistics stay on the device and
are read back (one transfer) only at ``log_every`` steps and when evaluating or checkpointing.
A non-finite loss or gradient norm skips that network's update on the device (fused AdamW's
``found_inf``, the mechanism of ``torch.amp.GradScaler``), so no step needs a host decision.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
import uuid
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import snac
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .config import Config, ConfigError, save_config, to_config
from .discriminators import Discriminator
from .hub import export_snac, load_generator
from .losses import GeneratorLoss, discriminator_loss
from .metrics import codebook_stats, si_sdr
from .model import DeadCodeRestarter, TrainOutput, build_generator, train_forward


class TrainingError(RuntimeError):
    """Training cannot continue (repeated non-finite losses, incompatible run directory, ...)."""


# --------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------


class TrainingGenerator(nn.Module):
    """``snac.SNAC`` whose ``forward`` is :func:`train_forward`, so DDP can wrap it."""

    def __init__(self, generator: snac.SNAC):
        super().__init__()
        self.generator = generator

    def forward(self, audio: Tensor) -> TrainOutput:
        return train_forward(self.generator, audio)


@dataclass
class TrainState:
    """Everything a training step touches. ``generator``/``discriminator`` are the plain modules;
    ``gen_step``/``disc_step`` are what the step calls (DDP- and/or compile-wrapped)."""

    cfg: Config
    device: torch.device
    generator: snac.SNAC
    discriminator: Discriminator
    gen_step: nn.Module
    disc_step: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_g: torch.optim.lr_scheduler.LRScheduler
    sched_d: torch.optim.lr_scheduler.LRScheduler
    loss_fn: GeneratorLoss
    restarter: Optional[DeadCodeRestarter] = None
    disc_gen: Optional[nn.Module] = None  # the discriminator of the generator pass (compiled, no DDP)
    rank: int = 0
    world_size: int = 1
    step: int = 0
    best_mel: float = math.inf
    nonfinite_total: int = 0
    nonfinite_consecutive: int = 0
    # Skips since the last settle_skips(), on the device: [skipped steps, trailing run of skipped
    # steps, 1 if any step succeeded]. Read on the host only by settle_skips().
    skip_window: Optional[Tensor] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def autocast(self):
        """bf16 autocast when enabled (CUDA by default, CPU when asked for); spectral losses,
        the code search and the output waveform run in fp32 inside it."""
        if self.device.type in ("cuda", "cpu") and resolve_precision(self.cfg, self.device) == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def count_skip(self, skipped: Tensor) -> None:
        """Record this step's skip flag (0-dim float32, 1.0 = skipped) without a host sync."""
        if self.skip_window is None:
            self.skip_window = torch.zeros(3, device=skipped.device)
        total, run, any_ok = self.skip_window.unbind()
        self.skip_window = torch.stack([total + skipped, (run + 1) * skipped, torch.maximum(any_ok, 1 - skipped)])

    def settle_skips(self) -> None:
        """Fold the device-side skip window into ``nonfinite_total``/``nonfinite_consecutive`` (one sync)."""
        if self.skip_window is None:
            return
        total, run, any_ok = (int(v) for v in self.skip_window.tolist())
        self.skip_window = None
        self.nonfinite_total += total
        self.nonfinite_consecutive = run if any_ok else self.nonfinite_consecutive + run

    def skipped_steps(self) -> Tensor:
        """``nonfinite_total`` including unsettled skips, as a device tensor (no sync)."""
        pending = self.skip_window[0] if self.skip_window is not None else torch.zeros((), device=self.device)
        return pending + self.nonfinite_total


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda > mps > cpu. Under torchrun each rank takes cuda:LOCAL_RANK."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"config key 'train.device' expects auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is available")
    return device


def resolve_precision(cfg: Config, device: torch.device) -> str:
    if cfg.train.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.train.precision


def setup_distributed() -> Tuple[int, int]:
    """Join the process group when launched by torchrun (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------


def setup_models(cfg: Config, device: torch.device) -> Tuple[snac.SNAC, Discriminator]:
    """Generator (fresh, or ``train.init_from`` for fine-tuning) and discriminator, on ``device``."""
    if cfg.train.init_from:
        generator, loaded = load_generator(cfg.train.init_from)
        if loaded != cfg.model:
            # The pretrained architecture wins; keep the config truthful for checkpoints/exports.
            print(f"init_from: using the model config of {cfg.train.init_from}", file=sys.stderr)
            cfg.model = loaded
        generator.train()
    else:
        generator = build_generator(cfg.model)
    frozen = []
    if cfg.train.freeze_encoder:
        frozen.append(generator.encoder)
    if cfg.train.freeze_quantizer:
        frozen.append(generator.quantizer)
    for module in frozen:
        module.requires_grad_(False)
    discriminator = Discriminator(cfg.discriminator, cfg.model.sampling_rate)
    return generator.to(device), discriminator.to(device)


def _adamw(params: Iterable[Tensor], cfg: Config, device: torch.device) -> torch.optim.AdamW:
    o = cfg.optim
    # Fused by default on CUDA and CPU: one kernel per step, and it can skip a non-finite update on
    # the device (found_inf), which keeps the step free of host syncs.
    fused = o.fused if o.fused is not None else device.type in ("cuda", "cpu")
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                             fused=fused or None, foreach=None if fused else True)


def setup_optimizers(cfg: Config, generator: nn.Module, discriminator: nn.Module, device: torch.device):
    """AdamW for both networks with per-step exponential LR decay (paper: gamma 0.999994)."""
    gen_params = [p for p in generator.parameters() if p.requires_grad]
    if not gen_params:
        raise ConfigError("every generator parameter is frozen: unset train.freeze_encoder/freeze_quantizer")
    opt_g = _adamw(gen_params, cfg, device)
    opt_d = _adamw(discriminator.parameters(), cfg, device)
    sched_g = torch.optim.lr_scheduler.ExponentialLR(opt_g, gamma=cfg.optim.lr_decay)
    sched_d = torch.optim.lr_scheduler.ExponentialLR(opt_d, gamma=cfg.optim.lr_decay)
    return opt_g, opt_d, sched_g, sched_d


def setup_dataset(cfg: Config, rank: int = 0, world_size: int = 1):
    """``(infinite train loader with state_dict(), list/iterable of validation batches)``."""
    from .dataset import build_dataloaders

    return build_dataloaders(cfg, rank=rank, world_size=world_size)


def build_state(cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1) -> TrainState:
    generator, discriminator = setup_models(cfg, device)
    opt_g, opt_d, sched_g, sched_d = setup_optimizers(cfg, generator, discriminator, device)
    if device.type == "cuda":
        # Fixed crop length and batch: the autotuned convolution algorithms are reused every step.
        torch.backends.cudnn.benchmark = True
    gen_step: nn.Module = TrainingGenerator(generator)
    disc_step: nn.Module = discriminator
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        gen_step = DDP(gen_step, device_ids=ids)
        disc_step = DDP(disc_step, device_ids=ids)
    # The generator pass needs no gradient all-reduce for the discriminator (it does not update
    # it), so it calls the plain module; under compile that is the same compiled module when no
    # DDP wrapper stands between.
    disc_gen: nn.Module = discriminator
    if cfg.train.compile:
        gen_step, disc_step = torch.compile(gen_step), torch.compile(disc_step)
        disc_gen = disc_step if world_size == 1 else torch.compile(discriminator)
    restarter = DeadCodeRestarter(generator, cfg.train.dead_code_steps, cfg.train.dead_code_every, seed=cfg.train.seed) \
        if cfg.train.dead_code_steps > 0 and not cfg.train.freeze_quantizer else None
    return TrainState(cfg=cfg, device=device, generator=generator, discriminator=discriminator,
                      gen_step=gen_step, disc_step=disc_step, opt_g=opt_g, opt_d=opt_d, sched_g=sched_g,
                      sched_d=sched_d, loss_fn=GeneratorLoss(cfg.loss, cfg.model.sampling_rate).to(device),
                      restarter=restarter, disc_gen=disc_gen, rank=rank, world_size=world_size)


# --------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------


def _split(outputs, n: int):
    """Split discriminator outputs on a concatenated [real; fake] batch into (real, fake)."""
    real = [(logits[:n], [f[:n] for f in fmaps]) for logits, fmaps in outputs]
    fake = [(logits[n:], [f[n:] for f in fmaps]) for logits, fmaps in outputs]
    return real, fake


def _nonfinite(state: TrainState, loss: Tensor, norm: Tensor) -> Tensor:
    """1.0 when the loss or the gradient norm is non-finite on any rank, else 0.0 (0-dim float32
    on the device; the all-reduce keeps ranks deciding alike without a host round trip)."""
    bad = (~(torch.isfinite(loss.detach().float()) & torch.isfinite(norm.float()))).float()
    if state.world_size > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad


def _step_unless(opt: torch.optim.Optimizer, bad: Tensor) -> None:
    """``opt.step()`` unless ``bad`` is 1.0.

    Fused AdamW takes the decision on the device through its ``found_inf`` attribute (as
    ``GradScaler`` uses it: parameters, moments and step count stay untouched). Other optimizers
    need the flag on the host: the one sync left for them (``optim.fused=false``).
    """
    if opt.defaults.get("fused"):
        opt.found_inf = bad
        try:
            opt.step()
        finally:
            del opt.found_inf
    elif not bool(bad):
        opt.step()


def _update(state: TrainState, loss: Tensor, opt: torch.optim.Optimizer, sched, params: List[Tensor],
            clip: Optional[float]) -> Tuple[Tensor, Tensor]:
    """Backward into ``params`` only + (clip to ``clip`` when set) + step, skipped when the loss or the
    gradient norm is non-finite. Returns ``(skipped flag, gradient norm)`` as device tensors.

    The learning-rate schedule advances on skipped steps too: it follows the step counter.
    """
    opt.zero_grad(set_to_none=True)
    loss.backward(inputs=params)
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip else torch.nn.utils.get_total_norm(grads)
    bad = _nonfinite(state, loss, norm)
    _step_unless(opt, bad)
    sched.step()
    return bad, norm


def _generator_pass_features(state: TrainState, real: Tensor, fake: Tensor):
    """Discriminator outputs for the generator loss: ``(D(real), D(fake))``.

    The real half only supplies feature-matching targets, so it runs without autograd: its
    activations are not kept for a backward pass (see ``benchmarks/bench_train.py``).
    """
    disc = state.disc_gen if state.disc_gen is not None else state.discriminator
    with torch.no_grad(), state.autocast:
        g_real = disc(real)
    with state.autocast:
        g_fake = disc(fake)
    return g_real, g_fake


def train_step(state: TrainState, batch: Dict[str, Tensor]) -> Dict[str, Any]:
    """One discriminator update then one generator update on ``batch["audio"]`` (B, 1, T).

    Returns the step's scalars (unweighted loss terms under their weight names, gradient norms,
    learning rates, codebook statistics) as 0-dim device tensors, learning rates as floats: the
    step never waits for the device. A non-finite loss or gradient norm skips that network's
    update (on every rank alike); :meth:`TrainState.settle_skips` reads the skip counts.
    """
    cfg = state.cfg
    real = batch["audio"].to(state.device, non_blocking=True)
    n = real.shape[0]
    with state.autocast:
        out: TrainOutput = state.gen_step(real)
    fake = out.audio.float()

    # Discriminator step on detached fakes (one forward over [real; fake] keeps DDP to one pass).
    with state.autocast:
        d_real, d_fake = _split(state.disc_step(torch.cat([real, fake.detach()])), n)
    d_loss = discriminator_loss(d_real, d_fake)
    d_bad, d_norm = _update(state, d_loss, state.opt_d, state.sched_d, list(state.discriminator.parameters()),
                            cfg.optim.grad_clip_discriminator)

    # Generator step against the just-updated discriminator; before adversarial_start_step only
    # reconstruction + VQ losses drive the generator (the discriminator keeps learning above).
    # The backward reaches the generator's parameters only (``inputs=``), never the discriminator's.
    g_real = g_fake = None
    if state.step >= cfg.train.adversarial_start_step:
        g_real, g_fake = _generator_pass_features(state, real, fake)
    total, terms = state.loss_fn(real, fake, out.commitment_loss, out.codebook_loss, g_real, g_fake)
    # Always run the backward (DDP expects one per forward).
    gen_params = [p for p in state.generator.parameters() if p.requires_grad]
    g_bad, g_norm = _update(state, total, state.opt_g, state.sched_g, gen_params, cfg.optim.grad_clip_generator)
    state.step += 1
    skipped = torch.maximum(d_bad, g_bad)
    state.count_skip(skipped)

    metrics = _step_metrics(state, terms, d_loss, total, d_norm, g_norm, out)
    if state.restarter is not None:
        # A skipped step's latents may hold NaN: offer zeros instead (a zero vector never wins
        # the normalized nearest-code search, so a code re-seeded from it is restarted again).
        latents = [torch.where(skipped > 0, torch.zeros_like(z), z) for z in out.latents]
        for level, count in enumerate(state.restarter.step(state.step, out.codes, latents)):
            metrics[f"codebook/restarted_level{level}"] = count
    metrics["train/skipped_steps"] = state.skipped_steps()
    return metrics


def _step_metrics(state: TrainState, terms: Dict[str, Tensor], d_loss: Tensor, total: Tensor,
                  d_norm: Tensor, g_norm: Tensor, out: TrainOutput) -> Dict[str, Any]:
    """The step's scalars, device tensors left on the device (indexing a stacked tensor is a view)."""
    metrics: Dict[str, Any] = {f"loss/{k}": v.detach() for k, v in terms.items()}
    metrics.update({"loss/discriminator": d_loss.detach(), "loss/generator_total": total.detach(),
                    "grad_norm/generator": g_norm.detach(), "grad_norm/discriminator": d_norm.detach(),
                    "lr/generator": state.sched_g.get_last_lr()[0],
                    "lr/discriminator": state.sched_d.get_last_lr()[0]})
    for level in range(out.codebook_usage.shape[0]):
        metrics[f"codebook/usage_level{level}"] = out.codebook_usage[level].detach()
        metrics[f"codebook/perplexity_level{level}"] = out.codebook_perplexity[level].detach()
    return metrics


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(state: TrainState, val_batches: Iterable[Dict[str, Tensor]], max_batches: Optional[int] = None) -> Dict[str, Any]:
    """Validation mel distance, multi-resolution STFT distance, SI-SDR and codebook usage.

    Returns scalars under ``val/...`` plus ``samples``: the first batch's (real, fake) audio.
    """
    # The decoder's noise blocks draw random numbers. Evaluating on a private, fixed-seed stream
    # keeps the training stream (and so a resumed run) independent of when and how often
    # evaluation runs, and makes successive evaluations comparable.
    devices = [state.device] if state.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(state.cfg.train.seed)
        return _evaluate(state, val_batches, max_batches)


@torch.no_grad()
def _evaluate(state: TrainState, val_batches: Iterable[Dict[str, Tensor]], max_batches: Optional[int]) -> Dict[str, Any]:
    gen = state.generator
    was_training = gen.training
    gen.eval()
    sums = {"mel": 0.0, "stft": 0.0, "si_sdr": 0.0}
    count, codes_per_level, samples = 0, None, None
    for i, batch in enumerate(val_batches):
        if max_batches is not None and i >= max_batches:
            break
        real = batch["audio"].to(state.device)
        out = train_forward(gen, real)
        fake = out.audio.float()
        b = real.shape[0]
        sums["mel"] += float(state.loss_fn.mel_loss(real, fake)) * b
        sums["stft"] += float(state.loss_fn.stft_loss(real, fake)) * b
        sums["si_sdr"] += float(si_sdr(real, fake).sum())
        count += b
        codes_per_level = [c.reshape(-1).cpu() for c in out.codes] if codes_per_level is None else \
            [torch.cat([a, c.reshape(-1).cpu()]) for a, c in zip(codes_per_level, out.codes)]
        if samples is None:
            samples = (real.cpu(), fake.cpu())
    gen.train(was_training)
    if count == 0:
        raise TrainingError("the validation set is empty: give data.val_split or a larger dataset")
    result: Dict[str, Any] = {f"val/{k}": v / count for k, v in sums.items()}
    for level, codes in enumerate(codes_per_level):
        usage, perplexity = codebook_stats(codes, state.cfg.model.codebook_size)
        result[f"val/codebook_usage_level{level}"] = float(usage)
        result[f"val/codebook_perplexity_level{level}"] = float(perplexity)
    result["samples"] = samples
    return result


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


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
    }
    return payload


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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingError(f"{path} does not fit this run ({first[:160]}); train.freeze_encoder / "
                            "freeze_quantizer must match the checkpoint, or use --no-resume") from None
    state.sched_g.load_state_dict(ckpt["sched_g"])
    state.sched_d.load_state_dict(ckpt["sched_d"])
    state.step = int(ckpt["step"])
    state.best_mel = float(ckpt["best_mel"])
    state.nonfinite_total = int(ckpt["nonfinite_total"])
    state.extra["lineage"] = ckpt.get("lineage")
    if state.restarter is not None and ckpt.get("restarter"):
        state.restarter.load_state_dict(ckpt["restarter"])
    if loader is not None and ckpt.get("data") is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(ckpt["data"])
    _set_rng_state(_own_rng_state(ckpt, state))


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


# --------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------


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


class Averager:
    """Running means of step scalars between log points, skipping non-finite values.

    Tensor values are summed on their device; :meth:`pop` reads them all back in one transfer,
    so adding never synchronizes with the device. Python numbers are summed on the host.
    """

    def __init__(self):
        self.sums: Dict[str, Any] = {}
        self.counts: Dict[str, Any] = {}

    def add(self, values: Dict[str, Any]) -> None:
        for k, v in values.items():
            if isinstance(v, Tensor):
                v = v.detach().float()
                finite = torch.isfinite(v)
                self.sums[k] = self.sums.get(k, 0.0) + torch.where(finite, v, 0.0)
                self.counts[k] = self.counts.get(k, 0) + finite.float()
            elif math.isfinite(v):
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> Dict[str, float]:
        """Means since the last pop (keys that never had a finite value are left out)."""
        on_device = [k for k in self.sums if isinstance(self.sums[k], Tensor)]
        pairs = {k: (self.sums[k], self.counts[k]) for k in self.sums if k not in on_device}
        if on_device:
            stacked = torch.stack([torch.stack([self.sums[k], torch.as_tensor(self.counts[k]).to(self.sums[k])])
                                   for k in on_device]).tolist()  # the one read-back per log step
            pairs.update(zip(on_device, stacked))
        self.sums, self.counts = {}, {}
        return {k: s / c for k, (s, c) in pairs.items() if c}


# --------------------------------------------------------------------------------------
# Main loop
# --------------------------------------------------------------------------------------


def _broadcast_max_abs_diff(module: nn.Module) -> float:
    """Largest parameter difference between this rank and rank 0 (0.0 when in sync)."""
    # Every tensor handed to a collective lives on the parameters' device: NCCL has no CPU tensors.
    device = next(module.parameters()).device
    diff = torch.zeros((), device=device)
    for p in module.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, src=0)
        diff = torch.maximum(diff, (ref - p.detach()).abs().max())
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def _run_eval(state: TrainState, val_batches, logger: RunLogger, loader) -> Optional[float]:
    """Evaluate on rank 0, log, and refresh ``best.pt`` when validation mel distance improves."""
    if not state.is_main:
        return None
    result = evaluate(state, val_batches, state.cfg.train.eval_batches)
    real, fake = result.pop("samples")
    logger.scalars(state.step, result)
    logger.samples(state.step, real, fake, state.cfg.model.sampling_rate, state.cfg.train.num_audio_samples)
    mel = result["val/mel"]
    if mel < state.best_mel:
        state.best_mel = mel
        save_checkpoint(state, loader, tags=("best",), numbered=False)
    return mel


def _agree_on_resume(path: Optional[Path], world: int) -> Optional[Path]:
    """Rank 0 picks the checkpoint; every rank loads that same file. A rank that cannot see it is
    an error, not a silent fresh start (that would desynchronize the ranks' step counts and hang)."""
    if world <= 1:
        return path
    box = [str(path) if path is not None else None]
    dist.broadcast_object_list(box, src=0)
    chosen = Path(box[0]) if box[0] is not None else None
    if chosen is not None and not chosen.is_file():
        raise TrainingError(f"rank {dist.get_rank()} cannot see {chosen}: --run_dir must be on a filesystem "
                            "shared by all nodes")
    return chosen


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


def _setup_dataset_checked(cfg: Config, rank: int, world: int):
    """:func:`setup_dataset`, plus a clear stop when rank 0 gets no validation audio at all: say
    whether the held-out items were unreadable or simply too few (not just "empty")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader, val_batches = setup_dataset(cfg, rank, world)
    for w in caught:  # still shown after the fact, under the user's warning filters
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if rank == 0 and isinstance(val_batches, list) and not val_batches:
        unreadable = [str(w.message).split("unreadable audio: ", 1)[-1] for w in caught
                      if "unreadable audio" in str(w.message)]
        if unreadable:
            raise TrainingError(f"no validation audio: all {len(unreadable)} held-out item(s) are unreadable "
                                f"(first: {unreadable[0].splitlines()[0][:200]}); check the dataset files")
        raise TrainingError("no validation audio: the dataset has too few items to hold out data.val_items; "
                            "give data.val_split or a larger dataset")
    return loader, val_batches


def train_main(config) -> Dict[str, Any]:
    """Train until ``train.max_steps``; resume from the newest readable checkpoint in
    ``<run_dir>/checkpoints`` (``latest.pt`` normally) when there is one.

    ``config`` is a Config, a plain dict or a config file path. Returns a summary dict
    (final step, last validation metrics, paths).
    """
    cfg = to_config(config)
    rank, world = setup_distributed()
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed + rank)
    run_dir = Path(cfg.train.run_dir)
    point, notes = prepare_run_dir(cfg) if rank == 0 else (None, [])
    if world > 1:
        dist.barrier()
    chosen = _agree_on_resume(point.path if point else None, world)
    if chosen is not None and point is None:
        point = ResumePoint(chosen, read_checkpoint(chosen), [])
    if point is not None:
        note = adopt_architecture(cfg, point.ckpt["config"])
        if note and rank == 0:
            notes.append(note)
    state = build_state(cfg, device, rank, world)
    state.extra["lineage"] = uuid.uuid4().hex  # replaced by the checkpoint's when resuming
    loader, val_batches = _setup_dataset_checked(cfg, rank, world)
    if point is not None:
        load_checkpoint(state, point.ckpt, loader, source=point.path)
        notes.append(point.describe())
        point = None  # drop the loaded tensors
    if rank == 0:
        best_note = adopt_best(state)
        notes += [best_note] if best_note else []
        trim_metrics(run_dir / "metrics.jsonl", state.step)
        for note in notes:
            print(note, file=sys.stderr)
        _save_config_checked(cfg, run_dir / "config.yaml")
    logger = RunLogger(cfg, enabled=rank == 0)
    try:
        summary = _loop(state, loader, val_batches, logger)
    finally:
        logger.close()
    if world > 1:
        summary["ddp/params_max_abs_diff"] = _broadcast_max_abs_diff(state.generator)
        summary["ddp/disc_params_max_abs_diff"] = _broadcast_max_abs_diff(state.discriminator)
        if rank == 0:
            print(json.dumps({k: v for k, v in summary.items() if k.startswith("ddp/")}), file=sys.stderr)
        dist.barrier()
    return summary


def _loop(state: TrainState, loader, val_batches, logger: RunLogger) -> Dict[str, Any]:
    progress = _progress_bar(state)
    try:
        return _steps(state, loader, val_batches, logger, progress)
    finally:
        progress.close()  # before any error line, so the message does not land on the bar's line


def _steps(state: TrainState, loader, val_batches, logger: RunLogger, progress) -> Dict[str, Any]:
    """Train to ``max_steps``. Host work between steps reads nothing from the device except at
    log, evaluation and checkpoint steps (``_is_sync_step``)."""
    cfg = state.cfg
    t = cfg.train
    averager = Averager()
    clock = _Clock(cfg.segment_length() / cfg.model.sampling_rate * state.world_size)
    last_val: Optional[float] = None
    if state.step == 0 and state.is_main:
        last_val = _run_eval(state, val_batches, logger, loader)  # the starting point of the curve
    clock.restart()
    while state.step < t.max_steps:
        wait_start = time.perf_counter()
        batch = next(loader)
        averager.add({"perf/data_wait_ms": 1000 * (time.perf_counter() - wait_start)})
        averager.add(train_step(state, batch))
        clock.count(batch["audio"].shape[0])
        if state.is_main:
            progress.update(1)
        if not _is_sync_step(state):
            continue
        state.settle_skips()
        if state.nonfinite_consecutive >= t.max_nonfinite_steps:
            raise TrainingError(f"stopping: {state.nonfinite_consecutive} consecutive steps had non-finite "
                                f"losses (step {state.step}); the last good checkpoint is {checkpoint_dir(cfg) / 'latest.pt'}")
        if state.step % t.log_every == 0 or state.step == t.max_steps:
            means = {**averager.pop(), **clock.pop()}
            logger.scalars(state.step, means)
            if state.is_main:
                progress.set_postfix(mel=f"{means.get('loss/mel', float('nan')):.3f}",
                                     d=f"{means.get('loss/discriminator', float('nan')):.3f}", refresh=False)
        with clock.paused():  # step time excludes evaluation and checkpoint writing
            if state.step % t.eval_every == 0 or state.step == t.max_steps:
                last_val = _run_eval(state, val_batches, logger, loader)
            # No checkpoint while steps are being skipped: latest.pt stays the last good state.
            if (state.step % t.checkpoint_every == 0 or state.step == t.max_steps) and not state.nonfinite_consecutive:
                gather_rng_states(state)  # collective: every rank, same step
                if state.is_main:
                    save_checkpoint(state, loader)
    summary: Dict[str, Any] = {"step": state.step, "val/mel": last_val, "best_mel": state.best_mel,
                               "skipped_steps": state.nonfinite_total}
    if state.is_main and t.export_on_end:
        summary["export_dir"] = str(export_snac(state.generator, cfg.model, Path(t.run_dir) / "export", overwrite=True))
    return summary


def _is_sync_step(state: TrainState) -> bool:
    """Steps at which the loop reads device values: logging, evaluation, checkpoints, the end."""
    t = state.cfg.train
    return any(state.step % every == 0 for every in (t.log_every, t.eval_every, t.checkpoint_every)) \
        or state.step == t.max_steps


class _Clock:
    """Wall time per step over a log window, measured between reads of the device (the read at a
    log step waits for the queued work, so the window's wall time is the device's)."""

    def __init__(self, seconds_per_item: float):
        self.seconds_per_item = seconds_per_item
        self.restart()

    def restart(self) -> None:
        self.start, self.excluded, self.steps, self.items = time.perf_counter(), 0.0, 0, 0

    def count(self, batch_items: int) -> None:
        self.steps += 1
        self.items += batch_items

    @contextmanager
    def paused(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start

    def pop(self) -> Dict[str, float]:
        """``perf/step_ms`` and ``perf/audio_seconds_per_second`` (all ranks) since the last pop."""
        elapsed = max(time.perf_counter() - self.start - self.excluded, 1e-9)
        out = {"perf/step_ms": 1000 * elapsed / max(self.steps, 1),
               "perf/audio_seconds_per_second": self.items * self.seconds_per_item / elapsed}
        self.restart()
        return out


def _progress_bar(state: TrainState):
    from tqdm.auto import tqdm

    return tqdm(total=state.cfg.train.max_steps, initial=state.step, desc="train", unit="step",
                disable=not state.is_main, dynamic_ncols=True, mininterval=1.0)
