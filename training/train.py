"""The training loop: setup, one GAN step, evaluation, checkpoints, resume, logging, DDP.

One code path serves one CPU, one GPU and many GPUs: under ``torchrun`` the same functions run on
every rank, DDP averages gradients, and rank 0 alone logs, evaluates and writes files.

Per step (the order of DAC's trainer, which SNAC follows)::

    out    = generator(real)                       # train_forward: reconstruction + VQ losses
    D step = LSGAN(D(real), D(out.audio.detach()))  # discriminator first, on detached fakes
    G step = GeneratorLoss(real, out.audio, VQ, D(real), D(out.audio))   # with the updated D
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
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
from .losses import GeneratorLoss, discriminator_loss
from .metrics import codebook_stats, si_sdr
from .model import DeadCodeRestarter, TrainOutput, build_generator, export_snac, load_generator, train_forward


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
    rank: int = 0
    world_size: int = 1
    step: int = 0
    best_mel: float = math.inf
    nonfinite_total: int = 0
    nonfinite_consecutive: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def autocast(self):
        """bf16 autocast on CUDA when enabled; spectral losses cast themselves back to fp32."""
        if self.device.type == "cuda" and resolve_precision(self.cfg, self.device) == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()


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
    fused = o.fused if o.fused is not None else device.type == "cuda"
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
    gen_step: nn.Module = TrainingGenerator(generator)
    disc_step: nn.Module = discriminator
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        gen_step = DDP(gen_step, device_ids=ids)
        disc_step = DDP(disc_step, device_ids=ids)
    if cfg.train.compile:
        gen_step, disc_step = torch.compile(gen_step), torch.compile(disc_step)
    restarter = DeadCodeRestarter(generator, cfg.train.dead_code_steps, cfg.train.dead_code_every, seed=cfg.train.seed) \
        if cfg.train.dead_code_steps > 0 and not cfg.train.freeze_quantizer else None
    return TrainState(cfg=cfg, device=device, generator=generator, discriminator=discriminator,
                      gen_step=gen_step, disc_step=disc_step, opt_g=opt_g, opt_d=opt_d, sched_g=sched_g,
                      sched_d=sched_d, loss_fn=GeneratorLoss(cfg.loss, cfg.model.sampling_rate).to(device),
                      restarter=restarter, rank=rank, world_size=world_size)


# --------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------


@contextmanager
def frozen(module: nn.Module):
    """Temporarily stop gradients into ``module``'s parameters (inputs still get gradients)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def _split(outputs, n: int):
    """Split discriminator outputs on a concatenated [real; fake] batch into (real, fake)."""
    real = [(logits[:n], [f[:n] for f in fmaps]) for logits, fmaps in outputs]
    fake = [(logits[n:], [f[n:] for f in fmaps]) for logits, fmaps in outputs]
    return real, fake


def _all_finite(state: TrainState, *values: Tensor) -> bool:
    """True when every value is finite on every rank (one collective, so ranks decide alike)."""
    ok = torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all().float()
    if state.world_size > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _update(state: TrainState, loss: Tensor, opt: torch.optim.Optimizer, sched, params: List[Tensor],
            clip: Optional[float]) -> Tuple[bool, Tensor]:
    """Backward + (clip to ``clip`` when set) + step, unless the loss or the gradient norm is non-finite."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip else torch.nn.utils.get_total_norm(grads)
    if not _all_finite(state, loss, norm):
        opt.zero_grad(set_to_none=True)
        return False, norm
    opt.step()
    sched.step()
    return True, norm


def train_step(state: TrainState, batch: Dict[str, Tensor]) -> Dict[str, float]:
    """One discriminator update then one generator update on ``batch["audio"]`` (B, 1, T).

    Returns the step's scalars (unweighted loss terms under their weight names, gradient norms,
    learning rates, codebook statistics). A non-finite loss or gradient skips both updates.
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
    d_ok, d_norm = _update(state, d_loss, state.opt_d, state.sched_d, list(state.discriminator.parameters()),
                           cfg.optim.grad_clip_discriminator)

    # Generator step against the just-updated discriminator; before adversarial_start_step only
    # reconstruction + VQ losses drive the generator (the discriminator keeps learning above).
    adversarial = state.step >= cfg.train.adversarial_start_step
    with frozen(state.discriminator):
        if adversarial:
            with state.autocast:
                g_real, g_fake = _split(state.discriminator(torch.cat([real, fake])), n)
        else:
            g_real = g_fake = None
        total, terms = state.loss_fn(real, fake, out.commitment_loss, out.codebook_loss, g_real, g_fake)
    # Always run the backward (DDP expects one per forward); each network skips its own update
    # when its loss or gradient norm is non-finite on any rank.
    gen_params = [p for p in state.generator.parameters() if p.requires_grad]
    g_ok, g_norm = _update(state, total, state.opt_g, state.sched_g, gen_params, cfg.optim.grad_clip_generator)
    state.step += 1

    metrics = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
    metrics.update({"loss/discriminator": float(d_loss.detach()), "loss/generator_total": float(total.detach()),
                    "grad_norm/generator": float(g_norm), "grad_norm/discriminator": float(d_norm),
                    "lr/generator": state.sched_g.get_last_lr()[0],
                    "lr/discriminator": state.sched_d.get_last_lr()[0]})
    for level, (u, p) in enumerate(zip(out.codebook_usage.tolist(), out.codebook_perplexity.tolist())):
        metrics[f"codebook/usage_level{level}"] = u
        metrics[f"codebook/perplexity_level{level}"] = p
    if g_ok and d_ok:
        state.nonfinite_consecutive = 0
        if state.restarter is not None:
            for level, count in enumerate(state.restarter.step(state.step, out.codes, out.latents)):
                metrics[f"codebook/restarted_level{level}"] = float(count)
    else:
        state.nonfinite_total += 1
        state.nonfinite_consecutive += 1
    metrics["train/skipped_steps"] = float(state.nonfinite_total)
    return metrics


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(state: TrainState, val_batches: Iterable[Dict[str, Tensor]], max_batches: Optional[int] = None) -> Dict[str, Any]:
    """Validation mel distance, multi-resolution STFT distance, SI-SDR and codebook usage.

    Returns scalars under ``val/...`` plus ``samples``: the first batch's (real, fake) audio.
    """
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
        "restarter": state.restarter.state_dict() if state.restarter else None,
        "data": loader.state_dict() if loader is not None and hasattr(loader, "state_dict") else None,
    }
    return payload


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Point ``dst`` at ``src``'s bytes atomically (hard link when possible: no second write)."""
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save_checkpoint(state: TrainState, loader=None, tags: Iterable[str] = ("latest",), numbered: bool = True) -> Path:
    """Write ``step_XXXXXXXX.pt`` (when ``numbered``) and the given tags (``latest``, ``best``).

    Each file is written to a temporary name and renamed, so a crash leaves the previous file.
    Only the newest ``train.keep_last`` numbered checkpoints are kept.
    """
    out = checkpoint_dir(state.cfg)
    out.mkdir(parents=True, exist_ok=True)
    payload = checkpoint_payload(state, loader)
    tags = list(tags)
    first = out / (f"step_{state.step:08d}.pt" if numbered else f"{tags.pop(0)}.pt")
    _atomic_save(payload, first)
    for tag in tags:
        _link_or_copy(first, out / f"{tag}.pt")
    if numbered:
        for old in sorted(out.glob("step_*.pt"))[:-state.cfg.train.keep_last or None]:
            old.unlink()
    return first


def load_checkpoint(state: TrainState, path, loader=None, source=None) -> None:
    """Restore ``state`` (and the data position of ``loader``) from a checkpoint file, or from a
    checkpoint dict already read from ``source``."""
    ckpt = path if isinstance(path, dict) else torch.load(path, map_location="cpu", weights_only=True)
    path = source if isinstance(path, dict) else path
    saved_model = ckpt["config"]["model"]
    if to_config({"model": saved_model}).model != state.cfg.model:
        raise TrainingError(f"{path} was trained with a different model config; "
                            "use --no-resume or another --run_dir")
    state.generator.load_state_dict(ckpt["generator"])
    state.discriminator.load_state_dict(ckpt["discriminator"])
    state.opt_g.load_state_dict(ckpt["opt_g"])
    state.opt_d.load_state_dict(ckpt["opt_d"])
    state.sched_g.load_state_dict(ckpt["sched_g"])
    state.sched_d.load_state_dict(ckpt["sched_d"])
    state.step = int(ckpt["step"])
    state.best_mel = float(ckpt["best_mel"])
    state.nonfinite_total = int(ckpt["nonfinite_total"])
    if state.restarter is not None and ckpt.get("restarter"):
        state.restarter.load_state_dict(ckpt["restarter"])
    if loader is not None and ckpt.get("data") is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(ckpt["data"])
    _set_rng_state(ckpt["rng"])


def set_aside_previous_run(cfg: Config) -> Optional[Path]:
    """--no-resume in a used run directory: keep the old checkpoints under a new name, never delete."""
    ckdir = checkpoint_dir(cfg)
    if not ckdir.is_dir() or not any(ckdir.iterdir()):
        return None
    n = 1
    while ckdir.with_name(f"checkpoints.prev{n}").exists():
        n += 1
    target = ckdir.with_name(f"checkpoints.prev{n}")
    ckdir.rename(target)
    return target


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
    """Running means of step scalars between log points."""

    def __init__(self):
        self.sums: Dict[str, float] = {}
        self.counts: Dict[str, int] = {}

    def add(self, values: Dict[str, float]) -> None:
        for k, v in values.items():
            if math.isfinite(v):
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> Dict[str, float]:
        means = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return means


# --------------------------------------------------------------------------------------
# Main loop
# --------------------------------------------------------------------------------------


def _broadcast_max_abs_diff(module: nn.Module) -> float:
    """Largest parameter difference between this rank and rank 0 (0.0 when in sync)."""
    diff = torch.zeros(())
    for p in module.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, src=0)
        diff = torch.maximum(diff, (ref - p.detach()).abs().max().cpu())
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


def _agree_on_resume(local: bool, latest: Path, world: int, device: torch.device) -> bool:
    """Rank 0 decides whether to resume; a rank that cannot see its checkpoint is an error, not a
    silent fresh start (that would desynchronize the ranks' step counts and hang)."""
    if world <= 1:
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=device)  # NCCL needs a device tensor
    dist.broadcast(flag, src=0)
    if flag.item() and not local:
        raise TrainingError(f"rank {dist.get_rank()} cannot see {latest}: --run_dir must be on a filesystem "
                            "shared by all nodes")
    return bool(flag.item())


def train_main(config) -> Dict[str, Any]:
    """Train until ``train.max_steps``; resume from ``<run_dir>/checkpoints/latest.pt`` when present.

    ``config`` is a Config, a plain dict or a config file path. Returns a summary dict
    (final step, last validation metrics, paths).
    """
    cfg = to_config(config)
    rank, world = setup_distributed()
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed + rank)
    run_dir = Path(cfg.train.run_dir)
    latest = checkpoint_dir(cfg) / "latest.pt"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.train.resume:
            moved = set_aside_previous_run(cfg)
            if moved:
                print(f"--no-resume: previous checkpoints kept in {moved}", file=sys.stderr)
    if world > 1:
        dist.barrier()
    resuming = _agree_on_resume(cfg.train.resume and latest.is_file(), latest, world, device)
    if resuming:
        # The checkpoint holds the architecture and the (possibly fine-tuned) weights: a run started
        # with --init_from or another preset resumes as what it actually trained.
        ckpt = torch.load(latest, map_location="cpu", weights_only=True)
        cfg.model = to_config({"model": ckpt["config"]["model"]}).model
        cfg.train.init_from = None
    state = build_state(cfg, device, rank, world)
    loader, val_batches = setup_dataset(cfg, rank, world)
    if resuming:
        load_checkpoint(state, ckpt, loader, source=latest)
        del ckpt
        if rank == 0:
            print(f"resumed from {latest} at step {state.step}", file=sys.stderr)
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
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
    cfg = state.cfg
    t = cfg.train
    segment_seconds = cfg.segment_length() / cfg.model.sampling_rate
    progress = _progress_bar(state)
    averager = Averager()
    last_val: Optional[float] = None
    if state.step == 0 and state.is_main:
        last_val = _run_eval(state, val_batches, logger, loader)  # the starting point of the curve
    tick = time.perf_counter()
    while state.step < t.max_steps:
        wait_start = time.perf_counter()
        batch = next(loader)
        data_wait = time.perf_counter() - wait_start
        metrics = train_step(state, batch)
        now = time.perf_counter()
        step_time, tick = now - tick, now
        metrics["perf/data_wait_ms"] = 1000 * data_wait
        metrics["perf/step_ms"] = 1000 * step_time
        metrics["perf/audio_seconds_per_second"] = batch["audio"].shape[0] * state.world_size * segment_seconds / step_time
        averager.add(metrics)
        if state.nonfinite_consecutive >= t.max_nonfinite_steps:
            raise TrainingError(f"stopping: {state.nonfinite_consecutive} consecutive steps had non-finite "
                                f"losses (step {state.step}); the last good checkpoint is {checkpoint_dir(cfg) / 'latest.pt'}")
        if state.is_main:
            progress.update(1)
            progress.set_postfix(mel=f"{metrics.get('loss/mel', float('nan')):.3f}",
                                 d=f"{metrics['loss/discriminator']:.3f}", refresh=False)
        if state.step % t.log_every == 0 or state.step == t.max_steps:
            logger.scalars(state.step, averager.pop())
        if state.step % t.eval_every == 0 or state.step == t.max_steps:
            last_val = _run_eval(state, val_batches, logger, loader)
        # No checkpoint while steps are being skipped: latest.pt stays the last good state.
        if (state.step % t.checkpoint_every == 0 or state.step == t.max_steps) and not state.nonfinite_consecutive:
            if state.is_main:
                save_checkpoint(state, loader)
        tick = time.perf_counter()  # step time excludes evaluation and checkpoint writing
    if state.is_main:
        progress.close()
    summary: Dict[str, Any] = {"step": state.step, "val/mel": last_val, "best_mel": state.best_mel,
                               "skipped_steps": state.nonfinite_total}
    if state.is_main and t.export_on_end:
        summary["export_dir"] = str(export_snac(state.generator, cfg.model, Path(t.run_dir) / "export", overwrite=True))
    return summary


def _progress_bar(state: TrainState):
    from tqdm.auto import tqdm

    return tqdm(total=state.cfg.train.max_steps, initial=state.step, desc="train", unit="step",
                disable=not state.is_main, dynamic_ncols=True, mininterval=1.0)
