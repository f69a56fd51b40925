"""`make demo` end to end, shortened: the module trains, evaluates held-out clips and writes its outputs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "training.demo", "--out", str(out), "--steps", "2", "--clips", "16"],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"validation mel distance: start \(step 0\) [\d.]+ -> end \(step 2\) [\d.]+", r.stdout), r.stdout
    assert re.search(r"held-out codebook usage at step 2: level 0: \d+%", r.stdout), r.stdout
    audio, rate = sf.read(out / "heldout_reconstruction.wav")
    assert rate == 24000 and len(audio) > 0
    assert (out / "spectrogram.png").stat().st_size > 10_000
    assert (out / "run" / "export" / "config.json").is_file()
