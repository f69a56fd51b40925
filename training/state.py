"""Everything a training run holds (TrainState) and how it is built: device, precision, DDP, seeds,
models, optimizers, data."""

from __future__ import annotations

import datetime
import math
import os
import random
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
from ._snac import snac
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .config import Config, ConfigError
from .discriminators import Discriminator
from .hub import load_generator
from .losses import GeneratorLoss
from .codebooks import build_replacer
from .model import DeadCodeRestarter, TrainOutput, build_generator, train_forward


class TrainingError(RuntimeError):
    """Training cannot continue (repeated non-finite losses, incompatible run directory, ...)."""


class CollectiveError(TrainingError):
    """A collective timed out or lost its peers: another rank stopped, hung or died. Not a user
    mistake, so the command-line tools exit 1 (not 2) with the one line."""

    exit_code = 1


class TrainingGenerator(nn.Module):
    """``snac.SNAC`` whose ``forward`` is :func:`train_forward`, so DDP can wrap it."""

    def __init__(self, generator: snac.SNAC, rotation_trick: bool = False):
        super().__init__()
        self.generator = generator
        self.rotation_trick = rotation_trick

    def forward(self, audio: Tensor) -> TrainOutput:
        return train_forward(self.generator, audio, rotation_trick=self.rotation_trick)


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


def setup_distributed(timeout_s: Optional[float] = None) -> Tuple[int, int]:
    """Join the process group when launched by torchrun (NCCL on GPU, gloo on CPU).

    ``timeout_s`` (``train.ddp_timeout_s``) bounds how long any collective waits for the other
    ranks: gloo then raises in the waiting rank, NCCL's watchdog aborts it. Without it a rank
    whose peer was stopped or hung would wait for the backend's default (30 min for gloo).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        dist.init_process_group(backend=backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_models(cfg: Config, device: torch.device) -> Tuple[snac.SNAC, Discriminator]:
    """Generator (fresh, or ``train.init_from`` for fine-tuning) and discriminator, on ``device``."""
    if cfg.train.init_from:
        generator, loaded = load_generator(cfg.train.init_from)
        if loaded.sampling_rate != cfg.model.sampling_rate:
            # The data is resampled to the configured rate: a model of another rate would be
            # fine-tuned on audio pitched and timed wrongly for it (or silently re-rated).
            raise ConfigError(f"train.init_from {cfg.train.init_from} is a {loaded.sampling_rate} Hz model but this run "
                              f"reads its data at {cfg.model.sampling_rate} Hz (model.sampling_rate); pass the "
                              "matching --preset or model config")
        if loaded != cfg.model:
            # The pretrained architecture wins; keep the config truthful for checkpoints/exports.
            print(f"init_from: using the model config of {cfg.train.init_from}", file=sys.stderr)
            cfg.model = loaded
        generator.train()
    else:
        generator = build_generator(cfg.model, init=cfg.train.generator_init)
    # Frozen parts: requires_grad False, so autograd records nothing through them (no backward),
    # and setup_optimizers leaves them out (no optimizer state).
    for module in frozen_modules(generator, cfg):
        module.requires_grad_(False)
    discriminator = Discriminator(cfg.discriminator, cfg.model.sampling_rate)
    return generator.to(device), discriminator.to(device)


def frozen_modules(generator: snac.SNAC, cfg: Config) -> List[nn.Module]:
    """The parts of ``generator`` that ``train.freeze_encoder`` / ``freeze_quantizer`` keep fixed
    (a ``train.finetune`` mode sets those flags)."""
    frozen: List[nn.Module] = []
    if cfg.train.freeze_encoder:
        frozen.append(generator.encoder)
    if cfg.train.freeze_quantizer:
        frozen.append(generator.quantizer)
    return frozen


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
    sched_g, sched_d = (_schedule(opt, cfg.optim.warmup_steps, cfg.optim.lr_decay) for opt in (opt_g, opt_d))
    return opt_g, opt_d, sched_g, sched_d


def _schedule(opt: torch.optim.Optimizer, warmup: int, decay: float) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step exponential decay (the paper's), after a linear warm-up of ``warmup`` steps when set."""
    if warmup <= 0:
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=decay)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup) * decay ** step)


def apply_optim_config(state: "TrainState") -> None:
    """Make both optimizers and schedules follow ``cfg.optim`` at the current step, after a resume
    that changed ``lr``, ``lr_decay``, ``warmup_steps``, ``betas``, ``eps`` or ``weight_decay``.

    Loading a checkpoint restores the saved hyperparameters (param groups, ``base_lrs``, the
    exponential schedule's ``gamma``), so a changed config would otherwise be silently ignored.
    The schedule becomes the one the new config defines, evaluated at the current step:
    ``lr x warm-up(step) x lr_decay**step``, as if the run had started with the new values (a
    changed ``lr_decay`` therefore moves the learning rate at once too).
    """
    o = state.cfg.optim
    for opt, sched in ((state.opt_g, state.sched_g), (state.opt_d, state.sched_d)):
        if isinstance(sched, torch.optim.lr_scheduler.ExponentialLR):
            sched.gamma = o.lr_decay  # ExponentialLR keeps gamma in its state dict
        factor = _schedule_factor(sched)
        sched.base_lrs = [o.lr] * len(opt.param_groups)
        for group in opt.param_groups:
            group["initial_lr"], group["lr"] = o.lr, o.lr * factor
            group["betas"], group["eps"], group["weight_decay"] = tuple(o.betas), o.eps, o.weight_decay
        sched._last_lr = [group["lr"] for group in opt.param_groups]  # what get_last_lr() reports


def _schedule_factor(sched: torch.optim.lr_scheduler.LRScheduler) -> float:
    """The schedule's multiplier of the base learning rate at its current step (``last_epoch``):
    the warm-up lambda (built from the current config; lambdas are not saved) or ``gamma**step``."""
    # (isinstance, not hasattr: a warm-up schedule's saved state loaded into ExponentialLR, or the
    # reverse, leaves the other class's attributes behind)
    if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
        return float(sched.lr_lambdas[0](sched.last_epoch))
    return float(sched.gamma) ** sched.last_epoch


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
    gen_step: nn.Module = TrainingGenerator(generator, cfg.train.rotation_trick)
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
    t = cfg.train
    restarter = None if t.freeze_quantizer else build_replacer(
        generator, t.code_replacement, dead_code_steps=t.dead_code_steps, every=t.dead_code_every,
        threshold=t.usage_threshold, decay=t.usage_ema_decay, seed=t.seed, max_fraction=t.replace_max_fraction)
    return TrainState(cfg=cfg, device=device, generator=generator, discriminator=discriminator,
                      gen_step=gen_step, disc_step=disc_step, opt_g=opt_g, opt_d=opt_d, sched_g=sched_g,
                      sched_d=sched_d, loss_fn=GeneratorLoss(cfg.loss, cfg.model.sampling_rate).to(device),
                      restarter=restarter, disc_gen=disc_gen, rank=rank, world_size=world_size)
