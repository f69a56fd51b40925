"""Shared fixtures: the real test corpus, deterministic seeds, small helpers."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def find_test_audio() -> Path:
    """ljspeech-mini: $SNAC_TEST_AUDIO_DIR, else ../shared/audio next to the repository."""
    candidates = []
    if os.environ.get("SNAC_TEST_AUDIO_DIR"):
        candidates.append(Path(os.environ["SNAC_TEST_AUDIO_DIR"]))
    candidates += [ROOT.parent / "shared" / "audio", ROOT.parent.parent / "shared" / "audio"]
    for c in candidates:
        if (c / "ljspeech-mini" / "metadata.csv").is_file():
            return c
    pytest.skip("test audio not found: set SNAC_TEST_AUDIO_DIR to the folder holding ljspeech-mini/")


@pytest.fixture(scope="session")
def ljspeech_dir() -> Path:
    return find_test_audio() / "ljspeech-mini"


# One intra-op thread: in-process tests then run at the same speed whether or not other processes
# (subprocess tests, a second pytest) share the machine's two cores, and results are reproducible.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
