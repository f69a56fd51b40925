"""The training loop: one GAN step, evaluation, and the main loop with resume, logging and DDP.
(The run's state and its setup live in :mod:`training.state`, checkpoint files in
:mod:`training.checkpoint`, the run directory and its logger in :mod:`training.run_dir`.)

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
import re
import signal
import sys
import threading
import time
import uuid
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .agreement import AGREEMENT_KEY, REFERENCE_NAME, AgreementCounter, ReferenceCodes
from .checkpoint import (
    ResumePoint, adopt_best, checkpoint_dir, checkpoint_files, gather_rng_states, load_checkpoint, read_checkpoint,
    save_checkpoint,
)
from .codebooks import VQHealth, collapse_warnings, init_codebooks_from_data, init_encoder_from_data
from .config import Config, ConfigError, to_config
from .errors import TrainingStopped, first_line
from .hub import export_snac
from .losses import discriminator_loss
from .metrics import codebook_stats, si_sdr
from .model import TrainOutput, train_forward
from .run_dir import (
    OPTIMIZER_KEYS, RunLogger, adopt_architecture, check_resume_changes, describe_applied, make_run_dir,
    prepare_run_dir, record_config, resume_changes, take_run_lock, trim_metrics,
)
from .state import (
    CollectiveError, TrainState, TrainingError, apply_optim_config, build_state, resolve_device, seed_everything,
    setup_dataset, setup_distributed,
)


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
    if state.step < cfg.train.disc_warmup_steps:
        return _disc_warmup_step(state, real)
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


def _disc_warmup_step(state: TrainState, real: Tensor) -> Dict[str, Any]:
    """A step of ``train.disc_warmup_steps``: :func:`train_step`'s discriminator update alone.

    The generator makes the fakes without autograd (no graph, so no generator backward) and is
    not touched: no optimizer step, no learning-rate step (its schedule starts with its first
    update) and no code replacement (which would rewrite codebook rows).
    """
    n = real.shape[0]
    with torch.no_grad(), state.autocast:
        out: TrainOutput = state.gen_step(real)
    fake = out.audio.float()
    with state.autocast:
        d_real, d_fake = _split(state.disc_step(torch.cat([real, fake])), n)
    d_loss = discriminator_loss(d_real, d_fake)
    d_bad, d_norm = _update(state, d_loss, state.opt_d, state.sched_d, list(state.discriminator.parameters()),
                            state.cfg.optim.grad_clip_discriminator)
    state.step += 1
    state.count_skip(d_bad)
    metrics: Dict[str, Any] = {"loss/discriminator": d_loss.detach(), "grad_norm/discriminator": d_norm.detach(),
                               "lr/discriminator": state.sched_d.get_last_lr()[0], "train/disc_warmup": 1.0}
    for level in range(out.codebook_usage.shape[0]):
        metrics[f"codebook/usage_level{level}"] = out.codebook_usage[level]
        metrics[f"codebook/perplexity_level{level}"] = out.codebook_perplexity[level]
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
    for level, z in enumerate(out.latents):
        # The collapse this watches for (every frame one vector) and its usual companion (the
        # latents' scale running away) show here before the validation numbers move.
        frac, rms = _latent_shape(z)
        metrics[f"codebook/latent_mean_fraction_level{level}"] = frac
        metrics[f"codebook/latent_rms_level{level}"] = rms
    return metrics


def _latent_shape(z: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean fraction ``||mean_t z_t||^2 / mean_t ||z_t||^2`` and RMS of latents ``z`` (B, D, T), as
    device tensors (no host sync; :func:`training.codebooks.mean_fraction` is the host version)."""
    rows = z.detach().float().transpose(1, 2).reshape(-1, z.shape[1])
    mean_sq = rows.pow(2).sum(1).mean()
    frac = rows.mean(0).pow(2).sum() / mean_sq.clamp_min(1e-30)
    return frac, (mean_sq / z.shape[1]).sqrt()


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


def _evaluate(state: TrainState, val_batches: Iterable[Dict[str, Tensor]], max_batches: Optional[int]) -> Dict[str, Any]:
    gen = state.generator
    was_training = gen.training
    gen.eval()
    sums = {"mel": 0.0, "stft": 0.0, "si_sdr": 0.0}
    count, codes_per_level, samples = 0, None, None
    health = VQHealth(state.cfg.model.codebook_size)
    reference: Optional[ReferenceCodes] = state.extra.get("reference_codes")
    agreement, unmatched = AgreementCounter(), 0
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
        health.add(out.codes, out.latents)
        if reference is not None and not reference.compare(i, batch["audio"], out.codes, agreement):
            unmatched += 1
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
    result.update(health.summary("val/"))
    if agreement.levels:
        result.update(agreement.summary(AGREEMENT_KEY))
    if unmatched:
        warnings.warn(f"code agreement: {unmatched} validation batch(es) differ from the audio the starting model "
                      f"encoded ({REFERENCE_NAME}; was data.val_segment_seconds changed?); they are left out")
    result["samples"] = samples
    return result


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
    state.extra["last_eval"] = result
    logger.scalars(state.step, result)
    logger.samples(state.step, real, fake, state.cfg.model.sampling_rate, state.cfg.train.num_audio_samples)
    mel = result["val/mel"]
    if state.step >= state.cfg.train.collapse_check_after:
        for line in collapse_warnings(result):
            print(f"warning: step {state.step}: {line}", file=sys.stderr)
    if mel < state.best_mel:
        state.best_mel = mel
        with _saving(state):
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


def _reference_codes(state: TrainState, val_batches, fresh: bool, notes: List[str]) -> Optional[ReferenceCodes]:
    """The codes the starting model gives the validation set, for ``val/code_agreement_levelN``.

    A fresh run from ``train.init_from`` encodes them now, before any step, and keeps them in
    ``<run_dir>/reference_codes.pt``; a resumed run reads that file (the starting weights are
    gone by then). Other runs have none."""
    path = Path(state.cfg.train.run_dir) / REFERENCE_NAME
    if not fresh:
        reference = ReferenceCodes.load(path)
        if reference is None and path.exists():
            notes.append(f"warning: {path} is unreadable; code agreement is not measured in this run")
        return reference
    if not state.cfg.train.init_from:
        return None
    reference = ReferenceCodes.encode(state.generator, val_batches, state.device, source=state.cfg.train.init_from)
    try:
        reference.save(path)
    except OSError as e:
        raise TrainingError(f"cannot write {path}: {e.strerror or e}") from None
    return reference


def _wants_data_init(cfg: Config) -> bool:
    """Data-dependent initialisation (encoder scale, k-means codebooks) for a fresh from-scratch
    run only: a resumed run has its weights in the checkpoint, and a fine-tune keeps the
    pretrained ones (and so its tokens)."""
    t = cfg.train
    fresh = not t.init_from and not t.freeze_quantizer
    return fresh and (t.codebook_init == "kmeans" or (t.data_dependent_init and not t.freeze_encoder))


def _init_from_data(state: TrainState, loader) -> str:
    """Initialise from the first ``codebook_init_batches`` training batches (every rank its own):
    the encoder's and the input projections' scale (:func:`init_encoder_from_data`), then the
    codebooks (:func:`init_codebooks_from_data`). The batches are consumed: training goes on with
    the next ones, and the loader's position is in every checkpoint, so resume is exact."""
    t = state.cfg.train
    batches = [next(loader)["audio"].to(state.device) for _ in range(t.codebook_init_batches)]
    notes = []
    standardise = t.data_dependent_init and not t.freeze_encoder
    if standardise:
        n = init_encoder_from_data(state.generator, batches)
        notes.append(f"encoder scaled to unit variance ({n} convolutions)")
    if t.codebook_init == "kmeans":
        counts = init_codebooks_from_data(state.generator, batches, iters=t.codebook_init_iters, seed=t.seed,
                                          standardise=standardise)
        notes.append(f"codebooks initialised by k-means on {', '.join(map(str, counts))} latents per level")
    return f"{'; '.join(notes)} ({t.codebook_init_batches} batches per rank)"


def train_main(config) -> Dict[str, Any]:
    """Train until ``train.max_steps``; resume from the newest readable checkpoint in
    ``<run_dir>/checkpoints`` (``latest.pt`` normally) when there is one.

    ``config`` is a Config, a plain dict or a config file path. Returns a summary dict
    (final step, last validation metrics, paths). SIGTERM, SIGINT or SIGUSR1 stop the run at the
    next step boundary with a checkpoint and raise :class:`TrainingStopped`; a collective that
    times out raises :class:`CollectiveError`.
    """
    cfg = to_config(config)
    _check_finetune_source(cfg)
    with StopSignals() as signals:
        rank, world = setup_distributed(cfg.train.ddp_timeout_s)
        device = resolve_device(cfg.train.device)
        seed_everything(cfg.train.seed + rank)
        progress = _Progress()
        with _collective_failures(cfg, rank, world, progress):
            lock, point, notes = _start_in_run_dir(cfg, rank, world)
            try:
                return _train(cfg, rank, world, device, signals, progress, point, notes)
            finally:
                if lock is not None:
                    lock.release()


def _check_finetune_source(cfg: Config) -> None:
    """A fine-tuning mode needs the model it fine-tunes: ``train.init_from``, or a checkpoint of
    this run to resume (whose weights came from it). Checked before the run directory is touched."""
    t = cfg.train
    if t.finetune and not t.init_from and not (t.resume and checkpoint_files(checkpoint_dir(cfg))):
        raise ConfigError(f"train.finetune={t.finetune} (--finetune) needs train.init_from (--init_from): the "
                          "pretrained model to fine-tune (a SNAC directory, hub id or checkpoint)")


def _start_in_run_dir(cfg: Config, rank: int, world: int):
    """Rank 0 takes the run directory's lock, then (only then) prepares it: a second trainer, even
    with --no-resume, never moves or reads a live run's files. Under DDP every rank learns whether
    rank 0 got that far, so none waits for a collective rank 0 will never join."""
    lock, point, notes, failure = None, None, [], None
    if rank == 0:
        try:
            make_run_dir(Path(cfg.train.run_dir))
            lock, note = take_run_lock(Path(cfg.train.run_dir))
            notes += [note] if note else []
            point, more = prepare_run_dir(cfg)
            notes += more
            lock.record_holder()  # again: on a full disk, removing dead temporaries made room for it
        except BaseException as e:  # re-raised below, after telling the other ranks
            if lock is not None:
                lock.release()
            if not isinstance(e, Exception):
                raise
            failure = e
    if world > 1:
        box = [first_line(failure) if failure is not None else None]
        dist.broadcast_object_list(box, src=0)
        if rank != 0 and box[0] is not None:
            raise TrainingError(f"rank 0 could not start: {box[0]}")
    if failure is not None:
        raise failure
    return lock, point, notes


def _train(cfg: Config, rank: int, world: int, device: torch.device, signals: "StopSignals",
           progress: "_Progress", point: Optional[ResumePoint], notes: List[str]) -> Dict[str, Any]:
    run_dir = Path(cfg.train.run_dir)
    chosen = _agree_on_resume(point.path if point else None, world)
    if chosen is not None and point is None:
        point = ResumePoint(chosen, read_checkpoint(chosen), [])
    changes = []
    if point is not None:
        # Before anything is written: a refused resume leaves the run directory as it was.
        changes = check_resume_changes(cfg, point, resume_changes(cfg, point, world))
        note = adopt_architecture(cfg, point.ckpt["config"])
        if note and rank == 0:
            notes.append(note)
    state = build_state(cfg, device, rank, world)
    state.extra["lineage"] = uuid.uuid4().hex  # replaced by the checkpoint's when resuming
    state.extra["signals"] = signals
    progress.state = state
    loader, val_batches = _setup_dataset_checked(cfg, rank, world)
    if rank == 0:
        state.extra["reference_codes"] = _reference_codes(state, val_batches, fresh=point is None, notes=notes)
    if point is not None:
        load_checkpoint(state, point.ckpt, loader, source=point.path)
        if any(c.key in OPTIMIZER_KEYS for c in changes):
            apply_optim_config(state)  # loading restored the checkpoint's lr, decay and betas
        notes.append(point.describe())
        notes += [describe_applied(changes, state.step)] if changes else []
        point = None  # drop the loaded tensors
    elif _wants_data_init(cfg):
        notes.append(_init_from_data(state, loader))
    if rank == 0:
        best_note = adopt_best(state)
        notes += [best_note] if best_note else []
        trim_metrics(run_dir / "metrics.jsonl", state.step)
        for note in notes:
            print(note, file=sys.stderr)
        record_config(cfg, run_dir, state.step, world, changes)
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


# --------------------------------------------------------------------------------------
# Stopping on a signal, failing on a dead peer
# --------------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

# ours: a second Ctrl-C this long after the first aborts at once. Shorter gaps are one keypress
# delivered twice (the terminal signals torchrun and its workers, and torchrun forwards it again).
ABORT_AFTER_S = 2.0


class StopSignals:
    """While active, SIGTERM, SIGINT and SIGUSR1 only record a stop request; the loop stops at the
    next step boundary and writes a checkpoint (:func:`_stop_with_checkpoint`).

    The handler never raises while a checkpoint is being written, so a second signal cannot leave
    a half-written file (the writes are temp file + ``os.replace`` anyway). Outside a write, a
    second Ctrl-C at least ``ABORT_AFTER_S`` after the first aborts at once (KeyboardInterrupt,
    exit 130, the previous checkpoint stays). The previous handlers are restored on exit.
    """

    def __init__(self):
        self.signum: Optional[int] = None
        self.first_at = 0.0
        self._saving = 0
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        # Python installs handlers from the main thread only; a run started on another thread
        # (a notebook's worker) keeps the process's handlers and is stopped the old way.
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum, self.first_at = signum, time.monotonic()
        elif signum == signal.SIGINT and not self._saving and time.monotonic() - self.first_at > ABORT_AFTER_S:
            raise KeyboardInterrupt

    @contextmanager
    def saving(self):
        """A checkpoint write: no signal interrupts it."""
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1


def _saving(state: TrainState):
    signals = state.extra.get("signals")
    return signals.saving() if signals is not None else nullcontext()


class _StopAgreement:
    """Before each step: stop now? The same answer on every rank, or the ranks that go on would
    wait forever in the next collective for those that stopped.

    One process: the handler's Python int is read, nothing on the device. Under DDP: one tiny
    all-reduce (MAX of the signal numbers, 0 = none) per step, launched asynchronously and read at
    the next step boundary with one ``.item()``. The read waits only for the reduction launched a
    step earlier, so the host still runs a step ahead of the device; the stop comes one step later.
    """

    def __init__(self, state: TrainState):
        self.state = state
        signals = state.extra.get("signals")
        self.local = (lambda: signals.signum or 0) if signals is not None else (lambda: 0)
        self.pending = None
        self.signum = 0

    def __call__(self) -> bool:
        if self.state.world_size == 1:
            self.signum = self.local()
            return bool(self.signum)
        self.signum = self.finish()
        if not self.signum:  # (every rank takes the same branch: the value was reduced)
            flag = torch.full((), self.local(), dtype=torch.int32, device=self.state.device)  # no host sync
            self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True), flag)
        return bool(self.signum)

    def finish(self) -> int:
        """Wait for the reduction in flight (if any) and return its signal number."""
        if self.pending is None:
            return 0
        work, flag = self.pending
        self.pending = None
        work.wait()
        return int(flag.item())


def _stop_with_checkpoint(state: TrainState, loader, logger: RunLogger, averager: "Averager", clock: "_Clock",
                          signum: int) -> None:
    """Log the means since the last log row, write a full checkpoint (unless this step already has
    one) and raise TrainingStopped on every rank, after rank 0's file is complete."""
    state.settle_skips()
    if averager.sums:
        logger.scalars(state.step, {**averager.pop(), **clock.pop()})
    if state.extra.get("checkpoint_step") != state.step:
        gather_rng_states(state)  # collective: every rank, same step
        if state.is_main:
            with _saving(state):
                save_checkpoint(state, loader)
    if state.world_size > 1:
        dist.barrier()  # no rank leaves (and makes torchrun stop the others) before the file is complete
    name = signal.Signals(signum).name
    raise TrainingStopped(f"stopped by {name} at step {state.step}; checkpoint saved, rerun the same command "
                          "to resume", signum, state.step, announce=state.is_main)


class _Progress:
    """Where the run is, for error messages raised outside the loop."""

    state: Optional[TrainState] = None

    @property
    def where(self) -> str:
        return f"at step {self.state.step}" if self.state is not None else "at start-up"


_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)


@contextmanager
def _collective_failures(cfg: Config, rank: int, world: int, progress: _Progress):
    """Turn a collective that timed out (``train.ddp_timeout_s``) or lost its peer into one line
    naming the rank and the step (CollectiveError, exit 1), instead of a backend traceback."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        # NCCL raises DistBackendError; gloo a plain RuntimeError whose message starts with the
        # gloo source file ("[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting
        # 20000ms for recv operation", "[.../gloo/transport/tcp/pair.cc] Connection closed by peer").
        backend = isinstance(e, getattr(dist, "DistBackendError", ())) or "gloo" in text
        if world <= 1 or isinstance(e, TrainingError) or not backend:
            raise
        latest = checkpoint_dir(cfg) / "latest.pt"
        last = str(latest) if latest.is_file() else "none yet"
        if _TIMEOUT.search(text):
            what = (f"a collective timed out after {cfg.train.ddp_timeout_s:g} s {progress.where} "
                    "(another rank stopped or hung)")
        else:
            what = f"a collective failed {progress.where} (another rank stopped: {first_line(e)[:120]})"
        raise CollectiveError(f"rank {rank}: {what}; the last checkpoint is {last}; rerun to resume") from None


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
    stop = _StopAgreement(state)
    while state.step < t.max_steps:
        if stop():
            _stop_with_checkpoint(state, loader, logger, averager, clock, stop.signum)
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
                    with _saving(state):
                        save_checkpoint(state, loader)
                state.extra["checkpoint_step"] = state.step
    stop.finish()  # a signal during the last step: the run is complete anyway
    summary: Dict[str, Any] = {"step": state.step, "val/mel": last_val, "best_mel": state.best_mel,
                               "skipped_steps": state.nonfinite_total}
    last_eval = state.extra.get("last_eval") or {}
    agreement = [last_eval[AGREEMENT_KEY.format(i)] for i in range(cfg.model.n_levels)
                 if AGREEMENT_KEY.format(i) in last_eval]
    if agreement:
        summary["code_agreement"] = agreement  # per level, at the last evaluation (the final step)
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
