"""A fresh clone runs the tests on its own: the repository's committed HEAD is cloned into a
temporary folder (nothing beside it, no ../shared) and a quick subset of the suite, the one that
reads the shipped test audio, runs there with this interpreter. A test that needs any file outside
the repository, or a file that is not committed, fails here instead of passing silently on a
developer machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Real-audio tests from several modules (the test corpus, decoding, hub-layout parquet repos);
# together well under a minute on two cores.
SUBSET = ["tests/test_audio.py", "tests/test_config.py", "tests/test_hub_presets.py"]


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.mark.slow
def test_fresh_clone_runs_the_tests_without_anything_outside_it(tmp_path):
    assert shutil.which("git"), "git is needed to check that a clone is self-contained"
    clone = tmp_path / "isolated" / "repo"
    clone.parent.mkdir()
    _git("clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone), cwd=tmp_path)
    assert _git("rev-parse", "HEAD", cwd=clone) == _git("rev-parse", "HEAD", cwd=ROOT)
    assert not (clone.parent / "shared").exists()

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SNAC_TEST_AUDIO_DIR", "PYTHONWARNINGS")}
    env.update(PYTHONPATH=str(clone), HF_HUB_OFFLINE="1")  # the clone's code, not this checkout's
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-rs", *SUBSET],
                       cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    tail = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "skipped" not in r.stdout, tail
    # The child really imported the clone's package.
    probe = subprocess.run([sys.executable, "-c", "import training; print(training.__file__)"], cwd=clone,
                           env=env, capture_output=True, text=True, timeout=120)
    assert Path(probe.stdout.strip()).resolve().is_relative_to(clone.resolve()), probe.stdout + probe.stderr
