"""Shared fixtures: the real test corpus, deterministic seeds, small helpers."""

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
