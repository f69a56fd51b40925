"""Shared fixtures: the real test corpus, deterministic seeds, small helpers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


# The real test corpus ships with the repository (32 public-domain LJ Speech clips, see data/README.md).
LJSPEECH_DIR = ROOT / "tests" / "data" / "ljspeech-mini"


@pytest.fixture(scope="session")
def ljspeech_dir() -> Path:
    # A missing corpus is a broken checkout: fail loudly rather than skip the real-audio tests.
    if not (LJSPEECH_DIR / "metadata.csv").is_file():
        raise FileNotFoundError(f"test audio missing: {LJSPEECH_DIR} (it is part of the repository)")
    return LJSPEECH_DIR


# One intra-op thread: in-process tests then run at the same speed whether or not other processes
# (subprocess tests, a second pytest) share the machine's two cores, and results are reproducible.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def reconstruction_steps(gen, cfg, batches, lr: float, warmup_steps: int = 0) -> None:
    """AdamW steps of the generator's non-adversarial loss (reconstruction + VQ terms, weighted as in
    training) on ``batches``, one step per (B, 1, T) batch; ``warmup_steps`` ramps the rate linearly
    as ``optim.warmup_steps`` does."""
    from training.losses import GeneratorLoss
    from training.model import train_forward

    loss_fn = GeneratorLoss(cfg.loss, cfg.model.sampling_rate)
    opt = torch.optim.AdamW(gen.parameters(), lr=lr, betas=tuple(cfg.optim.betas))
    ramp = (lambda s: min(1.0, (s + 1) / warmup_steps)) if warmup_steps else (lambda s: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ramp)
    for clip in batches:
        out = train_forward(gen, clip)
        total, _ = loss_fn(clip, out.audio, out.commitment_loss, out.codebook_loss)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sched.step()


def kill_at_checkpoint(cmd, run: Path, env, step: int = 2, timeout: float = 300) -> None:
    """Start training command ``cmd`` (writing to ``run``) and SIGKILL it as soon as its numbered
    checkpoint of ``step`` exists: a crash with no chance to clean up."""
    import signal
    import time

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (run / "checkpoints" / f"step_{step:08d}.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``<session temp>/<name>``, made by ``build(path)`` once per test session.

    Under pytest-xdist each worker has its own session fixtures, so a costly one (a training run
    in a subprocess) would be built once per worker. This builds it in the folder all workers of
    the session share, in whichever worker asks first; the others wait on a file lock and reuse
    it. Users of the result must treat it as read-only (copy it to change it)."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-<N>/, above each worker's popen-gw<K>/
    target, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            if target.exists():
                import shutil

                shutil.rmtree(target)  # a build that failed part-way in another worker
            build(target)
            done.touch()
    return target


def run_two_ranks(worker: str, out: Path, *args: str, port: int):
    """Run ``tests/<worker>`` under a real two-process ``torchrun`` (gloo, one thread per rank),
    require a clean exit, and return what each rank saved to ``<out>/rank<R>.pt``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "tests" / worker), str(out), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(out / f"rank{i}.pt", weights_only=True) for i in (0, 1)]


@pytest.fixture(scope="session")
def speech_24k(ljspeech_dir) -> torch.Tensor:
    """(1, 1, 48000): two seconds of real speech resampled to 24 kHz."""
    from training.audio import list_audio_files, load_audio

    return load_audio(list_audio_files(ljspeech_dir)[0], 24000)[..., 6000:54000][None]


@pytest.fixture(scope="session")
def trained_tiny(speech_24k):
    """``(model, cfg)``: the tiny preset trained for a few steps on real speech (k-means codebooks,
    then reconstruction + VQ losses), so every weight, noise gain and Snake alpha has moved off its
    initial value, then made code-diverse on that speech (``diverse_model``: a few steps leave some
    levels on one or two codes, and "the codes are identical" would then prove little). Eval mode, CPU."""
    from diverse_model import whiten_quantizer_inputs
    from training.codebooks import init_codebooks_from_data
    from training.config import create_training_config
    from training.model import build_generator

    cfg = create_training_config(preset="tiny")
    torch.manual_seed(0)
    gen = build_generator(cfg.model, init=cfg.train.generator_init)
    init_codebooks_from_data(gen, [speech_24k], iters=cfg.train.codebook_init_iters, seed=0)
    reconstruction_steps(gen, cfg, [speech_24k[..., :24576]] * 12, lr=1e-3)
    gen.eval()
    whiten_quantizer_inputs(gen, speech_24k)
    return gen, cfg.model
