"""Fault matrix: ordinary accidents (deleted or damaged checkpoints, bad settings, full disks,
read-only folders, odd files) against the real command-line tools.

Every case runs a real subprocess on real files and asserts the exit code, that the error is one
``error:`` line (never a traceback, never glued onto a progress bar), and that no file the user
gave or already had changed (hashes before and after), unless the case is a recovery that is
meant to continue the run.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT),
       "HF_HUB_OFFLINE": "1"}

# The tiny preset on 0.17 s crops, 2 clips per step: a step takes well under a second on one core.
FAST = ["--preset", "tiny", "--batch_size", "2", "--set", "data.segment_seconds=0.17",
        "--set", "data.val_segment_seconds=0.17", "--set", "data.val_items=2", "--set", "data.num_workers=0",
        "--set", "train.eval_batches=1", "--set", "train.log_every=1", "--set", "train.checkpoint_every=2",
        "--set", "train.eval_every=2"]


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _run(argv, timeout=300):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=timeout)


def train(data: Path, run_dir: Path, *args: str, timeout=300):
    return _run([str(ROOT / "train_snac.py"), *FAST, "--dataset_path", str(data), "--run_dir", str(run_dir), *args],
                timeout=timeout)


def infer(*args: str):
    return _run([str(ROOT / "inference.py"), *args])


def tokenize(*args: str, timeout=300):
    return _run(["-m", "training.tokenize", "--no_progress", *args], timeout=timeout)


def hashes(*paths: Path) -> dict:
    """sha256 of every file under ``paths`` (files or folders), by path."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def assert_one_line_error(r, code: int, *needles: str) -> str:
    """Exit ``code`` and exactly one non-empty stderr line, an ``error:`` line containing ``needles``."""
    assert r.returncode == code, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_last_line_error(r, code: int, *needles: str) -> str:
    """For errors after training started: no traceback, and the error is a line of its own (the
    progress bar was closed first) and the last one."""
    assert r.returncode == code, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith("error: "), r.stderr[-3000:]
    for needle in needles:
        assert needle in last, last
    return last


def ckpt_info(path: Path) -> dict:
    c = torch.load(path, map_location="cpu", weights_only=True)
    return {"step": c["step"], "lineage": c.get("lineage"), "best_mel": c["best_mel"]}


def dead_pid() -> int:
    """The pid of a process that has exited (a writer killed mid-save)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@contextmanager
def small_filesystem(path: Path, size: int):
    """A tmpfs of ``size`` bytes at ``path`` (needs root; skips otherwise): a disk that fills up."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextmanager
def read_only(path: Path):
    """Make ``path`` (a folder) unwritable even for root: a read-only tmpfs holding a copy of it
    as root, chmod 0555 otherwise."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield path
        finally:
            os.chmod(path, 0o755)
        return
    staging = path.with_name(path.name + ".staging")
    shutil.copytree(path, staging)
    with small_filesystem(path, 256 << 20):
        shutil.copytree(staging, path, dirs_exist_ok=True)
        r = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("cannot remount the tmpfs read-only")
        yield path
    shutil.rmtree(staging)


# --------------------------------------------------------------------------------------
# Fixtures: one trained tiny run shared by every training case
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, ljspeech_dir) -> Path:
    """4 steps of the tiny preset: best.pt, latest.pt, step_2, step_4, export/, metrics.jsonl."""
    from conftest import built_once

    def build(run: Path) -> None:
        r = train(ljspeech_dir, run, "--max_steps", "4")
        assert r.returncode == 0, r.stderr[-3000:]

    run = built_once(tmp_path_factory, "faults_trained_run", build)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best.pt", "latest.pt", "step_00000002.pt", "step_00000004.pt"], names
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


def _rows(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------
# Resume never loses work
# --------------------------------------------------------------------------------------


def test_missing_latest_resumes_newest_numbered_checkpoint(run_copy, ljspeech_dir):
    ck = run_copy / "checkpoints"
    (ck / "latest.pt").unlink()
    kept = hashes(ck / "step_00000002.pt", ck / "step_00000004.pt")
    lineage = ckpt_info(ck / "step_00000004.pt")["lineage"]
    r = train(ljspeech_dir, run_copy, "--max_steps", "6")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ck / 'step_00000004.pt'} at step 4 (latest.pt is missing)" in r.stderr
    assert hashes(ck / "step_00000002.pt", ck / "step_00000004.pt") == kept  # never rewritten by a restart
    assert ckpt_info(ck / "latest.pt")["step"] == 6
    best = ckpt_info(ck / "best.pt")
    assert best["step"] != 0 and best["lineage"] == lineage  # no step-0 model of a new lineage
    steps = [row["step"] for row in _rows(run_copy) if "loss/mel" in row]
    assert steps == [1, 2, 3, 4, 5, 6]


def _corrupt(kind: str, path: Path, good: Path, marker: Path) -> None:
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "wrong_dict":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "malicious":
        class Payload:  # unpickling it would create the marker file
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        torch.save({"step": Payload()}, path)


KINDS = ["truncated", "garbage", "empty", "wrong_dict", "tensor", "malicious"]


@pytest.mark.parametrize("kind", KINDS)
def test_resume_point_skips_every_kind_of_damaged_latest(trained_run, tmp_path, kind):
    """In-process, all six kinds; the subprocess matrix below runs three of them end to end."""
    from training.checkpoint import find_resume_checkpoint

    ck = tmp_path / "checkpoints"
    ck.mkdir()
    for name in ("step_00000002.pt", "step_00000004.pt"):
        shutil.copy(trained_run / "checkpoints" / name, ck / name)
    marker = tmp_path / "pwned"
    _corrupt(kind, ck / "latest.pt", ck / "step_00000004.pt", marker)
    point = find_resume_checkpoint(ck)
    assert point.path == ck / "step_00000004.pt" and point.ckpt["step"] == 4
    assert point.skipped and point.skipped[0].startswith("latest.pt ")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["truncated", "malicious"])
def test_corrupt_latest_falls_back_to_newest_readable(run_copy, ljspeech_dir, kind, tmp_path):
    ck = run_copy / "checkpoints"
    marker = tmp_path / "pwned"
    (ck / "latest.pt").unlink()  # break the hard link: only latest.pt is damaged
    _corrupt(kind, ck / "latest.pt", ck / "step_00000004.pt", marker)
    kept = hashes(ck / "best.pt", ck / "step_00000002.pt", ck / "step_00000004.pt")
    r = train(ljspeech_dir, run_copy, "--max_steps", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    line = next(line for line in r.stderr.splitlines() if line.startswith("resumed from"))
    assert f"{ck / 'step_00000004.pt'} at step 4 (latest.pt " in line
    assert not marker.exists()
    assert hashes(ck / "best.pt", ck / "step_00000002.pt", ck / "step_00000004.pt") == kept


@pytest.mark.parametrize("with_best", [True, False])
def test_damaged_newest_numbered_checkpoint_falls_back_to_an_older_one(trained_run, tmp_path, with_best):
    """latest.pt missing and the newest step_*.pt damaged: the search goes on to the older numbered
    checkpoint (not best.pt, not a refusal)."""
    from training.checkpoint import find_resume_checkpoint

    ck = tmp_path / "checkpoints"
    ck.mkdir()
    for name in ("step_00000002.pt", "step_00000004.pt") + (("best.pt",) if with_best else ()):
        shutil.copy(trained_run / "checkpoints" / name, ck / name)
    _corrupt("truncated", ck / "step_00000004.pt", trained_run / "checkpoints" / "step_00000004.pt", tmp_path / "x")
    point = find_resume_checkpoint(ck)
    assert point.path == ck / "step_00000002.pt" and point.ckpt["step"] == 2
    assert point.skipped[0] == "latest.pt is missing"
    assert point.skipped[1].startswith("step_00000004.pt is unreadable")


def test_resume_skips_a_damaged_newest_numbered_checkpoint_end_to_end(run_copy, ljspeech_dir):
    ck = run_copy / "checkpoints"
    for name in ("latest.pt", "best.pt"):
        (ck / name).unlink()
    data = (ck / "step_00000004.pt").read_bytes()
    (ck / "step_00000004.pt").write_bytes(data[: len(data) // 2])
    r = train(ljspeech_dir, run_copy, "--max_steps", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (f"resumed from {ck / 'step_00000002.pt'} at step 2 (latest.pt is missing; step_00000004.pt is "
            "unreadable") in r.stderr
    assert ckpt_info(ck / "step_00000004.pt")["step"] == 4  # rewritten by the resumed run
    assert [row["step"] for row in _rows(run_copy) if "loss/mel" in row] == [1, 2, 3, 4]


def test_no_readable_checkpoint_refuses_to_start_fresh(run_copy, ljspeech_dir):
    ck = run_copy / "checkpoints"
    for p in ck.glob("*.pt"):
        p.unlink()
        p.write_bytes(b"PK\x03\x04 not a zip")
    before = hashes(run_copy)
    r = train(ljspeech_dir, run_copy, "--max_steps", "6")
    assert_one_line_error(r, 2, "no readable checkpoint", "--no-resume")
    assert hashes(run_copy) == before


def test_dead_writers_temp_files_removed_at_start(run_copy, ljspeech_dir):
    ck = run_copy / "checkpoints"
    pid = dead_pid()
    temps = [ck / f".step_00000006.pt.tmp{pid}", ck / f".best.pt.tmp{pid}", run_copy / f".config.yaml.tmp{pid}"]
    for t in temps:
        t.write_bytes(b"\0" * 4096)
    r = train(ljspeech_dir, run_copy, "--max_steps", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "removed 3 temporary file(s) left by interrupted writes" in r.stderr
    assert not any(t.exists() for t in temps)


@pytest.mark.slow  # ~11 s: training subprocesses
def test_no_resume_sets_the_whole_previous_run_aside(run_copy, ljspeech_dir):
    before = {k.replace(str(run_copy), ""): v for k, v in hashes(run_copy).items()}
    r = train(ljspeech_dir, run_copy, "--max_steps", "2", "--no-resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoints.prev1" in r.stderr
    renamed = {"/checkpoints/": "/checkpoints.prev1/", "/export/": "/export.prev1/", "/logs/": "/logs.prev1/",
               "/metrics.jsonl": "/metrics.prev1.jsonl", "/config.yaml": "/config.prev1.yaml",
               "/config_history.jsonl": "/config_history.prev1.jsonl"}
    after = hashes(run_copy)
    for rel, digest in before.items():
        new = next((rel.replace(a, b, 1) for a, b in renamed.items() if rel.startswith(a)), rel)
        assert after.get(str(run_copy) + new) == digest, new
    assert [row["step"] for row in _rows(run_copy) if "loss/mel" in row] == [1, 2]


def test_resume_from_older_checkpoint_rewrites_metrics_without_repeats(run_copy, ljspeech_dir):
    ck = run_copy / "checkpoints"
    (ck / "latest.pt").unlink()
    (ck / "step_00000004.pt").unlink()
    r = train(ljspeech_dir, run_copy, "--max_steps", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(run_copy)
    assert [row["step"] for row in rows if "loss/mel" in row] == [1, 2, 3, 4]
    assert [row["step"] for row in rows if "val/mel" in row] == [0, 2, 4]


def test_full_disk_checkpoint_write_fails_with_one_line(trained_run, ljspeech_dir, tmp_path):
    used = sum(p.stat().st_size for p in trained_run.rglob("*") if p.is_file())
    with small_filesystem(tmp_path / "disk", used + (4 << 20)) as disk:
        run = disk / "run"
        shutil.copytree(trained_run, run)
        before = hashes(run / "checkpoints")
        r = train(ljspeech_dir, run, "--max_steps", "6")
        assert_last_line_error(r, 2, "not enough free space", "rerun the same command")
        assert "\nerror: " in r.stderr  # on a line of its own, after the progress bar
        assert hashes(run / "checkpoints") == before
        assert not [p for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]


def test_dead_writers_temp_files_freed_on_a_full_disk(trained_run, ljspeech_dir, tmp_path):
    used = sum(p.stat().st_size for p in trained_run.rglob("*") if p.is_file())
    with small_filesystem(tmp_path / "disk", used + (2 << 20)) as disk:
        run = disk / "run"
        shutil.copytree(trained_run, run)
        leftover = run / "checkpoints" / f".step_00000006.pt.tmp{dead_pid()}"
        with open(leftover, "wb") as f:  # what a writer killed by ENOSPC leaves behind: a full disk
            try:
                while True:
                    f.write(b"\0" * (64 << 10))
                    f.flush()
            except OSError:
                pass
        r = train(ljspeech_dir, run, "--max_steps", "4")
        assert r.returncode == 0, r.stderr[-3000:]
        assert not leftover.exists()


# --------------------------------------------------------------------------------------
# Configuration and environment
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("override,key", [  # every key and range: tests/test_config.py, in-process
    ("optim.grad_clip_generator=-1", "optim.grad_clip_generator"),  # trained backwards before
    ("data.segment_seconds=1e6", "data.segment_seconds"),  # tried to allocate ~100 GB before
])
def test_bad_config_value_is_one_line_before_anything_is_written(override, key, tmp_path, ljspeech_dir):
    run = tmp_path / "run"
    r = train(ljspeech_dir, run, "--max_steps", "1", "--set", override)
    assert_one_line_error(r, 2, f"'{key}'", "must be")
    assert not run.exists()


def test_binary_config_file_is_one_line(tmp_path, ljspeech_dir):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(bytes(range(256)) * 4)
    r = train(ljspeech_dir, tmp_path / "run", "--config", str(cfg))
    assert_one_line_error(r, 2, "not UTF-8")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("layout", ["file", "under_file"])
def test_run_dir_that_is_not_a_folder(layout, tmp_path, ljspeech_dir):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    run = blocker if layout == "file" else blocker / "run"
    r = train(ljspeech_dir, run, "--max_steps", "1")
    assert_one_line_error(r, 2, str(run))
    assert blocker.read_text() == "mine"


def test_read_only_run_dir(tmp_path, ljspeech_dir):
    run = tmp_path / "ro"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with read_only(run):
        r = train(ljspeech_dir, run, "--max_steps", "1")
        assert_one_line_error(r, 2, "cannot write to --run_dir")
        assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_resume_with_other_discriminator_says_what_differs(run_copy, ljspeech_dir):
    before = hashes(run_copy)
    r = train(ljspeech_dir, run_copy, "--max_steps", "5", "--set", "discriminator.stft_channels=16")
    assert_one_line_error(r, 2, "discriminator.stft_channels: 8 -> 16", "--allow_config_change")
    assert hashes(run_copy) == before
    r = train(ljspeech_dir, run_copy, "--max_steps", "5", "--set", "discriminator.stft_channels=16",
              "--allow_config_change")
    assert r.returncode == 0, r.stderr[-3000:]  # was a size-mismatch traceback
    assert ("resuming the checkpoint's architecture, not the requested one "
            "(discriminator.stft_channels: checkpoint 8, now 16)") in r.stderr
    saved = torch.load(run_copy / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    assert saved["step"] == 5 and saved["config"]["discriminator"]["stft_channels"] == 8


def test_resume_with_other_preset_says_which_model_runs(run_copy, ljspeech_dir):
    args = [a for a in FAST if a != "tiny"]
    args[args.index("--preset")] = "--preset=24khz"
    r = _run([str(ROOT / "train_snac.py"), *args, "--dataset_path", str(ljspeech_dir), "--run_dir", str(run_copy),
              "--max_steps", "4", "--allow_config_change"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("resuming the checkpoint's architecture, not the requested one (model.encoder_dim: checkpoint 8, "
            "now 48") in r.stderr


def test_dataset_and_dataset_path_together_is_an_error(tmp_path, ljspeech_dir):
    r = train(ljspeech_dir, tmp_path / "run", "--dataset", "ljspeech", "--max_steps", "1")
    assert_one_line_error(r, 2, "--dataset ljspeech and --dataset_path", "give only one")
    assert not (tmp_path / "run").exists()


def test_all_corrupt_data_says_unreadable(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        (data / f"clip{i}.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * (i + 1))
    r = train(data, tmp_path / "run", "--max_steps", "1")
    assert_one_line_error(r, 2, "no validation audio", "unreadable", "clip")


# --------------------------------------------------------------------------------------
# Clusters: preemption, one writer per run directory, config changes, DDP timeouts
# --------------------------------------------------------------------------------------


def launch(data: Path, run_dir: Path, log: Path, *args: str) -> subprocess.Popen:
    """A training run in the background; its stderr goes to ``log``."""
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, str(ROOT / "train_snac.py"), *FAST, "--dataset_path", str(data),
                                 "--run_dir", str(run_dir), *args], cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=err)


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until metrics.jsonl holds a training row of ``step`` or later (the run is training)."""
    deadline = time.time() + timeout
    while True:
        try:
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        except (OSError, ValueError):
            rows = []
        if any(row["step"] >= step and "loss/mel" in row for row in rows):
            return
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {step}"
        assert time.time() < deadline, f"no step {step} after {timeout} s"
        time.sleep(0.1)


def _stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# checkpoint_every 1000: the only checkpoint before the end is the one the signal writes.
STOP_ARGS = ["--max_steps", "40", "--seed", "3", "--set", "train.checkpoint_every=1000",
             "--set", "train.eval_every=1000"]


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_and_the_rerun_matches_an_uninterrupted_run(tmp_path, ljspeech_dir):
    ref = train(ljspeech_dir, tmp_path / "ref", *STOP_ARGS)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run, log = tmp_path / "run", tmp_path / "stderr.txt"
    proc = launch(ljspeech_dir, run, log, *STOP_ARGS)
    try:
        wait_for_step(run, 20, proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        _stop_process(proc)
    err = log.read_text()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    stops = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(stops) == 1, err[-3000:]
    step = int(stops[0].split(" at step ")[1].split(";")[0])
    assert stops[0] == f"stopped by SIGTERM at step {step}; checkpoint saved, rerun the same command to resume"
    assert 20 <= step < 40
    assert ckpt_info(run / "checkpoints" / "latest.pt")["step"] == step
    assert not (run / ".lock").exists()  # released on the way out

    r = train(ljspeech_dir, run, *STOP_ARGS)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = [line for line in r.stderr.splitlines() if line.startswith("resumed from")]
    assert resumed == [f"resumed from {run / 'checkpoints' / 'latest.pt'} at step {step}"], r.stderr[-3000:]
    assert "config changes" not in r.stderr
    assert [row["step"] for row in _rows(run) if "loss/mel" in row] == list(range(1, 41))
    a = torch.load(tmp_path / "ref" / "checkpoints" / "latest.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert a["step"] == b["step"] == 40
    for part in ("generator", "discriminator"):  # bit for bit, as the kill -9 test in test_train.py
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), f"{part}.{name}"
    assert torch.equal(a["opt_g"]["state"][0]["exp_avg"], b["opt_g"]["state"][0]["exp_avg"])


@pytest.mark.slow
def test_second_trainer_on_a_live_run_dir_exits_2_naming_the_holder(tmp_path, ljspeech_dir):
    run, log = tmp_path / "run", tmp_path / "stderr.txt"
    args = ["--max_steps", "60", "--set", "train.checkpoint_every=1000", "--set", "train.eval_every=1000"]
    proc = launch(ljspeech_dir, run, log, *args)
    try:
        wait_for_step(run, 1, proc)
        # --no-resume would rename the live run's files aside: the lock check comes first.
        second = train(ljspeech_dir, run, *args, "--no-resume")
        assert proc.poll() is None, "the first run ended before the second one was checked"
        line = assert_one_line_error(second, 2)
        holder = json.loads((run / ".lock").read_text())
        proc.wait(timeout=300)
    finally:
        _stop_process(proc)
    assert holder["pid"] == proc.pid and holder["host"] == socket.gethostname()
    assert line == (f"error: run directory {run} is in use by pid {proc.pid} on host {holder['host']} since "
                    f"{holder['start_time']}; stop it first or use another --run_dir")
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert not list(run.glob("*prev*"))
    assert [row["step"] for row in _rows(run) if "loss/mel" in row] == list(range(1, 61))  # each step once
    assert not (run / ".lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over_with_one_line(run_copy, ljspeech_dir):
    pid, host = dead_pid(), socket.gethostname()
    (run_copy / ".lock").write_text(json.dumps({"pid": pid, "host": host, "start_time": "2026-01-02 03:04:05"}))
    r = train(ljspeech_dir, run_copy, "--max_steps", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if "lock " in line.replace(str(run_copy), "")]
    assert lines == [f"taking over the stale lock of run directory {run_copy}: pid {pid} on host {host} since "
                     "2026-01-02 03:04:05 no longer holds it"], r.stderr[-3000:]
    assert not (run_copy / ".lock").exists()


def test_lock_without_flock_falls_back_to_pid_and_host(tmp_path, monkeypatch):
    """Filesystems without file locks: a holder on this host is checked by its pid; one on another
    host cannot be checked and is taken as live (the message says how to clear it)."""
    from training import run_dir as rd
    from training.state import TrainingError

    monkeypatch.setattr(rd, "_flock", lambda fd: "unsupported")
    host = socket.gethostname()
    for holder, live in [({"pid": dead_pid(), "host": host}, False), ({"pid": os.getppid(), "host": host}, True),
                         ({"pid": dead_pid(), "host": "elsewhere"}, True)]:
        (tmp_path / ".lock").write_text(json.dumps({**holder, "start_time": "2026-01-02 03:04:05"}))
        if live:
            with pytest.raises(TrainingError, match=f"in use by pid {holder['pid']} on host {holder['host']}"):
                rd.take_run_lock(tmp_path)
            assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder["pid"]  # untouched
        else:
            lock, note = rd.take_run_lock(tmp_path)
            assert note.startswith("taking over the stale lock") and lock.holder["pid"] == os.getpid()
            lock.release()
            assert not (tmp_path / ".lock").exists()


@pytest.mark.slow  # ~8 s: training subprocesses
def test_resume_with_a_new_lr_applies_it_and_keeps_the_config_history(run_copy, ljspeech_dir):
    history = run_copy / "config_history.jsonl"
    original = history.read_text().splitlines()
    assert len(original) == 1
    r = train(ljspeech_dir, run_copy, "--max_steps", "6", "--set", "optim.lr=1e-5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "config changes applied at step 4: optim.lr 0.0006 -> 1e-05, train.max_steps 4 -> 6" in r.stderr
    lr = {row["step"]: row["lr/generator"] for row in _rows(run_copy) if "lr/generator" in row}
    assert lr[4] == pytest.approx(6e-4 * 0.999994 ** 4, rel=1e-9)
    for step in (5, 6):  # the new base, on the same schedule, from the next step on
        assert lr[step] == pytest.approx(1e-5 * 0.999994 ** step, rel=1e-9)
    lines = history.read_text().splitlines()
    assert len(lines) == 2 and lines[0] == original[0]  # the original is never rewritten
    first, second = (json.loads(line) for line in lines)
    assert first["step"] == 0 and first["changes"] == {} and first["config"]["optim"]["lr"] == 6e-4
    assert second["step"] == 4 and second["changes"] == {"optim.lr": [6e-4, 1e-5], "train.max_steps": [4, 6]}
    assert second["config"]["optim"]["lr"] == 1e-5
    from training.config import load_config

    assert load_config(run_copy / "config.yaml").optim.lr == 1e-5  # config.yaml: the current config


@pytest.mark.parametrize("change,listed", [
    (["--seed", "5"], ["train.seed: 0 -> 5"]),
    (["--preset", "24khz"], ["model.encoder_dim: 8 -> 48", "model.decoder_dim: 64 -> 1024",
                             "discriminator.stft_channels: 8 -> 32"]),
    (["--dataset_path", "DATA/wavs"], ["data.dataset_path: DATA -> DATA/wavs"]),
], ids=["seed", "preset", "dataset_path"])
def test_resume_with_a_fixed_key_changed_is_refused_listing_each_difference(run_copy, ljspeech_dir, change, listed):
    change = [a.replace("DATA", str(ljspeech_dir)) for a in change]
    before = hashes(run_copy)
    r = train(ljspeech_dir, run_copy, "--max_steps", "5", *change)
    assert_one_line_error(r, 2, f"cannot resume {run_copy / 'checkpoints' / 'latest.pt'} with a different config",
                          *[s.replace("DATA", str(ljspeech_dir)) for s in listed], "--allow_config_change")
    assert hashes(run_copy) == before  # nothing written, nothing moved


def test_allow_config_change_resumes_with_the_new_seed(run_copy, ljspeech_dir):
    r = train(ljspeech_dir, run_copy, "--max_steps", "5", "--seed", "5", "--allow_config_change")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "config changes applied at step 4: train.max_steps 4 -> 5, train.seed 0 -> 5" in r.stderr
    assert torch.load(run_copy / "checkpoints" / "latest.pt", weights_only=True)["config"]["train"]["seed"] == 5


def _children(pid: int) -> list:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _rank_pids(torchrun: subprocess.Popen, world: int, timeout: float = 120) -> dict:
    """{rank: pid} of torchrun's worker processes (their RANK environment variable)."""
    deadline = time.time() + timeout
    while True:
        ranks = {}
        for kid in _children(torchrun.pid):
            try:
                env = dict(e.split("=", 1) for e in Path(f"/proc/{kid}/environ").read_text().split("\0") if "=" in e)
            except OSError:
                continue
            if "RANK" in env:
                ranks[int(env["RANK"])] = kid
        if len(ranks) == world:
            return ranks
        assert torchrun.poll() is None and time.time() < deadline, "torchrun did not start its workers"
        time.sleep(0.1)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _start_two_rank_run(run: Path, log: Path, data: Path, port: int, setting: str) -> subprocess.Popen:
    """A long two-process gloo training run under torchrun (stderr to ``log``), with one extra
    ``--set`` ``setting``; the caller stops it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "train_snac.py"), *FAST, "--dataset_path", str(data), "--run_dir", str(run),
           "--device", "cpu", "--max_steps", "500", "--set", setting, "--set", "train.eval_every=1000"]
    with open(log, "w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, ljspeech_dir):
    """SIGUSR1 to rank 1 alone (two gloo ranks): the ranks agree on the stop step through their
    per-step all-reduce, rank 0 writes the checkpoint (with both ranks' RNG states) and says so
    once, and both exit 138."""
    run, log = tmp_path / "ddp", tmp_path / "stderr.txt"
    proc = _start_two_rank_run(run, log, ljspeech_dir, 29544, "train.checkpoint_every=1000")
    try:
        ranks = _rank_pids(proc, 2)
        wait_for_step(run, 3, proc)
        os.kill(ranks[1], signal.SIGUSR1)
        proc.wait(timeout=120)
    finally:
        _stop_process(proc)
    text = log.read_text()
    stops = [line for line in text.splitlines() if line.startswith("stopped by")]
    assert len(stops) == 1, text[-3000:]
    step = int(stops[0].split(" at step ")[1].split(";")[0])
    assert stops[0] == f"stopped by SIGUSR1 at step {step}; checkpoint saved, rerun the same command to resume"
    # Each rank exits 138, unless torchrun, seeing the other exit first, terminated it on its way
    # out (-15: after the barrier that follows the checkpoint, its handlers already restored).
    codes = [re.search(rf"exitcode\s*:\s*(-?\d+) \(pid: {pid}\)", text) for pid in ranks.values()]
    assert all(codes), text[-3000:]
    codes = sorted(int(m.group(1)) for m in codes)
    assert codes in ([-15, 138], [138, 138]), codes
    assert "train_snac.py\", line" not in text  # no worker traceback
    ckpt = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["step"] == step and len(ckpt["rng_ranks"]) == 2 and ckpt["world_size"] == 2
    assert [row["step"] for row in _rows(run) if "loss/mel" in row] == list(range(1, step + 1))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_stopped_rank_makes_the_other_exit_after_ddp_timeout_with_one_line(tmp_path, ljspeech_dir):
    """SIGSTOP rank 1 of a two-process gloo run: rank 0's next collective times out after
    train.ddp_timeout_s and it exits 1 with one line naming the step; its checkpoint stays valid."""
    from training.checkpoint import read_checkpoint

    run, log = tmp_path / "ddp", tmp_path / "stderr.txt"
    proc = _start_two_rank_run(run, log, ljspeech_dir, 29543, "train.ddp_timeout_s=20")
    ranks = {}
    try:
        ranks = _rank_pids(proc, 2)
        wait_for_step(run, 3, proc)
        os.kill(ranks[1], signal.SIGSTOP)
        stopped_at = time.monotonic()
        while not _gone(ranks[0]):
            assert time.monotonic() - stopped_at < 20 + 60, "rank 0 still waits for the stopped rank"
            time.sleep(0.2)
        waited = time.monotonic() - stopped_at
        os.kill(ranks[1], signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        for pid in ranks.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _stop_process(proc)
    text = log.read_text()
    assert waited > 15, text[-3000:]  # the timeout, not some other failure
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, text[-3000:]
    assert re.fullmatch(r"error: rank 0: a collective timed out after 20 s at step \d+ \(another rank stopped or "
                        rf"hung\); the last checkpoint is {re.escape(str(run))}/checkpoints/latest\.pt; rerun to "
                        "resume", lines[0]), lines[0]
    assert re.search(rf"exitcode\s*:\s*1 \(pid: {ranks[0]}\)", text), text[-3000:]  # torchrun's report of rank 0
    assert "train_snac.py\", line" not in text  # no worker traceback
    assert read_checkpoint(run / "checkpoints" / "latest.pt")["step"] >= 2
    assert not (run / ".lock").exists()


# --------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------


@pytest.fixture
def clips(tmp_path) -> Path:
    """A folder with an 800-sample clip (shorter than the metrics' STFTs) and a 0.5 s clip."""
    folder = tmp_path / "clips"
    folder.mkdir()
    t = np.arange(12000, dtype=np.float32) / 24000
    sf.write(folder / "a_short.wav", 0.3 * np.sin(2 * np.pi * 220 * t[:800]), 24000)
    sf.write(folder / "b_long.wav", 0.3 * np.sin(2 * np.pi * 220 * t), 24000)
    return folder


def test_metrics_of_short_clips_are_na_and_the_folder_completes(trained_run, clips, tmp_path):
    out, metrics = tmp_path / "out", tmp_path / "m.json"
    r = infer("roundtrip", "-c", str(trained_run / "export"), "-i", str(clips), "-o", str(out),
              "--metrics", str(metrics), "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["a_short.wav", "b_long.wav"]
    files = {Path(f["file"]).name: f for f in json.loads(metrics.read_text())["files"]}
    assert files["a_short.wav"]["mel_distance"] is None and files["a_short.wav"]["stft_distance"] is None
    assert files["a_short.wav"]["si_sdr_db"] is not None
    assert isinstance(files["b_long.wav"]["mel_distance"], float)


@pytest.mark.parametrize("command,name,needle", [
    ("encode", "codes.wav", "encode writes codes files (.npz)"),
    ("roundtrip", "out.mp3", "roundtrip writes WAV audio (.wav)"),
])
def test_output_name_must_match_what_is_written(trained_run, clips, tmp_path, command, name, needle):
    r = infer(command, "-c", str(trained_run / "export"), "-i", str(clips / "b_long.wav"), "-o", str(tmp_path / name))
    assert_one_line_error(r, 2, needle)
    assert not (tmp_path / name).exists()


def test_unwritable_metrics_path_fails_before_any_work(trained_run, clips, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    before = hashes(clips, blocker)
    r = infer("roundtrip", "-c", str(trained_run / "export"), "-i", str(clips), "-o", str(tmp_path / "out"),
              "--metrics", str(blocker / "m.json"))
    assert_one_line_error(r, 2, "--metrics", "is a file, not a folder")
    assert not (tmp_path / "out").exists() and hashes(clips, blocker) == before


def test_output_under_a_file_and_in_a_read_only_folder(trained_run, clips, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    r = infer("roundtrip", "-c", str(trained_run / "export"), "-i", str(clips / "b_long.wav"),
              "-o", str(blocker / "x.wav"))
    assert_one_line_error(r, 2, "is a file, not a folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        r = infer("roundtrip", "-c", str(trained_run / "export"), "-i", str(clips / "b_long.wav"),
                  "-o", str(ro / "x.wav"))
        assert r.returncode == 2, r.stderr
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(ro) in lines[0], r.stderr
        assert list(ro.iterdir()) == []


def test_outputs_and_exports_follow_the_umask(trained_run, clips, tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    want = 0o666 & ~mask
    r = infer("roundtrip", "-c", str(trained_run / "export"), "-i", str(clips / "b_long.wav"),
              "-o", str(tmp_path / "x.wav"), "--no-metrics", "-q")
    assert r.returncode == 0, r.stderr
    r = infer("export", "-c", str(trained_run / "checkpoints" / "best.pt"), "-o", str(tmp_path / "exp"))
    assert r.returncode == 0, r.stderr
    for f in (tmp_path / "x.wav", tmp_path / "exp" / "config.json", tmp_path / "exp" / "pytorch_model.bin"):
        assert f.stat().st_mode & 0o777 == want, (f, oct(f.stat().st_mode))


# --------------------------------------------------------------------------------------
# Tokenizer and prepare
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,value", [("--num_readers", "-1"), ("--num_readers", "0"), ("--batch_size", "-2"),
                                        ("--lines_per_file", "0"), ("--qsize", "-5"), ("--buffer_size", "0")])
def test_tokenizer_ranges_in_process(ljspeech_dir, tmp_path, flag, value):
    from training.tokenize import TokenizeError, build_parser, settings_from_args

    args = build_parser().parse_args(["--audio_codec", "any-model", "--out_dir", str(tmp_path),
                                      "--dataset", str(ljspeech_dir), flag, value])
    with pytest.raises(TokenizeError, match=f"{flag[2:]} must be >= "):
        settings_from_args(args)


@pytest.mark.parametrize("flag,value", [("--num_readers", "0"), ("--batch_size", "-2"), ("--qsize", "-5")])
def test_tokenizer_ranges_checked_before_processes_start(trained_run, ljspeech_dir, tmp_path, flag, value):
    out = tmp_path / "tok"
    r = tokenize("--audio_codec", str(trained_run / "export"), "--out_dir", str(out),
                 "--dataset", str(ljspeech_dir), flag, value, timeout=120)  # a hang fails by timeout
    assert_one_line_error(r, 2, f"{flag[2:]} must be >= ")
    assert not out.exists()


def _spawned_children(pid: int) -> list:
    """Pids of the multiprocessing children (readers, then workers) of ``pid``."""
    try:
        kids = [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    out = []
    for kid in kids:
        try:
            if b"--multiprocessing-fork" in Path(f"/proc/{kid}/cmdline").read_bytes():
                out.append(kid)
        except OSError:
            pass
    return out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the children through /proc")
def test_dead_worker_ends_the_run_with_one_line(trained_run, ljspeech_dir, tmp_path):
    """An encoder worker killed (e.g. by the OOM killer) ends the run with one line, not a hang."""
    proc = subprocess.Popen([sys.executable, "-m", "training.tokenize", "--no_progress", "--audio_codec",
                             str(trained_run / "export"), "--out_dir", str(tmp_path / "tok"), "--dataset",
                             str(ljspeech_dir), "--num_readers", "1", "--qsize", "1"],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while len(_spawned_children(proc.pid)) < 2:
            assert proc.poll() is None and time.time() < deadline, "the tokenizer never started its processes"
            time.sleep(0.05)
        os.kill(_spawned_children(proc.pid)[-1], signal.SIGKILL)  # the worker: started after the reader
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["error: worker 0 stopped unexpectedly (exit code -9); rerun the same command to resume"], err


@pytest.fixture
def few_clips(ljspeech_dir, tmp_path) -> Path:
    """Six clips of ljspeech-mini cut to 0.2 s (FLAC, MP3 and WAV sources)."""
    folder = tmp_path / "few"
    folder.mkdir()
    for f in sorted((ljspeech_dir / "wavs").iterdir())[::6]:
        data, sr = sf.read(f, dtype="float32")
        sf.write(folder / f"{f.stem}.wav", data[: sr // 5], sr)
    return folder


def _shard_rows(out: Path) -> list:
    rows = []
    for shard in sorted(out.glob("tokens-*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            rows += [json.loads(line)["id"] for line in f]
    return rows


@pytest.mark.slow
def test_truncated_shard_is_detected_and_re_encoded(trained_run, few_clips, tmp_path):
    out = tmp_path / "tok"
    args = ["--audio_codec", str(trained_run / "export"), "--out_dir", str(out), "--dataset", str(few_clips),
            "--lines_per_file", "2", "--num_readers", "1"]
    r = tokenize(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    complete = sorted(_shard_rows(out))
    assert len(complete) == 6
    shards = sorted(out.glob("tokens-*.jsonl.gz"))
    damaged = shards[1]
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    r = tokenize(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{damaged.name} is damaged" in r.stderr
    assert (out / f"{damaged.name}.damaged").read_bytes() == data[: len(data) // 2]  # kept, not deleted
    assert sorted(_shard_rows(out)) == complete  # every clip exactly once again


def test_prepare_gives_files_differing_by_extension_distinct_ids(ljspeech_dir, tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    shutil.copy(ljspeech_dir / "wavs" / "LJ001-0001.flac", src / "take.flac")
    shutil.copy(ljspeech_dir / "wavs" / "LJ001-0025.mp3", src / "take.mp3")
    shutil.copy(ljspeech_dir / "wavs" / "LJ001-0029.wav", src / "other.wav")
    env_registry = tmp_path / "registry.json"
    r = subprocess.run([sys.executable, "-m", "training.dataset", "prepare", str(src), "--name", "dup",
                        "--out", str(tmp_path / "manifests")], capture_output=True, text=True, cwd=ROOT,
                       env={**ENV, "SNAC_DATA_REGISTRY": str(env_registry)}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ids = [json.loads(line)["id"] for m in sorted((tmp_path / "manifests").glob("*.jsonl"))
           for line in m.read_text().splitlines()]
    assert sorted(ids) == ["other", "take.flac", "take.mp3"]


# --------------------------------------------------------------------------------------
# Checkpoint bookkeeping, in-process (the subprocess cases above run them end to end)
# --------------------------------------------------------------------------------------


def test_pruning_is_by_step_and_spares_later_files(tmp_path):
    """Resumed at step 6 from an older checkpoint: the newest numbered files up to step 6 are
    kept; files of later steps (a damaged step_8 skipped at resume) are not pruned in their stead."""
    from training.checkpoint import prune_checkpoints

    for s in (2, 4, 6, 8, 10):
        (tmp_path / f"step_{s:08d}.pt").write_bytes(b"x")
    prune_checkpoints(tmp_path, keep_last=2, step=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004.pt", "step_00000006.pt",
                                                          "step_00000008.pt", "step_00000010.pt"]
    prune_checkpoints(tmp_path, keep_last=1, step=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010.pt"]


def test_best_is_only_replaced_within_its_lineage(trained_run, tmp_path):
    from types import SimpleNamespace

    from training.config import create_training_config
    from training.checkpoint import adopt_best

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    best = ckpt_info(run / "checkpoints" / "best.pt")
    cfg = create_training_config(preset="tiny", run_dir=str(run))
    # Resumed from an older checkpoint of the same run: its best_mel is lowered to best.pt's.
    state = SimpleNamespace(cfg=cfg, best_mel=float("inf"), extra={"lineage": best["lineage"]})
    assert adopt_best(state) is None and state.best_mel == best["best_mel"]
    # A fresh lineage never overwrites another run's best.pt: it is kept under another name.
    state = SimpleNamespace(cfg=cfg, best_mel=float("inf"), extra={"lineage": "0" * 32})
    note = adopt_best(state)
    kept = run / "checkpoints" / f"best.other-{best['lineage'][:8]}.pt"
    assert note and str(kept) in note and kept.is_file() and not (run / "checkpoints" / "best.pt").exists()
    assert state.best_mel == float("inf")


def test_checkpoint_write_on_a_full_disk_is_one_error_and_leaves_no_temp(tmp_path):
    """The free-space check can be overtaken by other writers: the write itself fails cleanly too."""
    from training.checkpoint import _atomic_save
    from training.state import TrainingError

    with small_filesystem(tmp_path / "disk", 1 << 20) as disk:
        (disk / "latest.pt").write_bytes(b"previous")
        with pytest.raises(TrainingError, match=r"cannot write checkpoint .*latest.pt.*rerun the same command"):
            _atomic_save({"w": torch.zeros(1 << 20)}, disk / "latest.pt")
        assert sorted(p.name for p in disk.iterdir()) == ["latest.pt"]
        assert (disk / "latest.pt").read_bytes() == b"previous"
