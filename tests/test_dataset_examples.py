"""dataset_examples.py: every offline example runs and returns a well-formed batch."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dataset_examples  # noqa: E402


@pytest.mark.parametrize("name", sorted(dataset_examples.OFFLINE))
def test_offline_example(name, ljspeech_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SNAC_DATA_REGISTRY", str(tmp_path / "registry"))
    batch = dataset_examples.OFFLINE[name](ljspeech_dir, tmp_path)
    audio = batch["audio"]
    assert audio.dim() == 3 and audio.shape[1] == 1 and audio.dtype == torch.float32
    assert audio.shape[2] == 20480  # 0.8 s at 24 kHz rounded up to the 2048-sample pad unit
    assert len(batch["id"]) == audio.shape[0] and all(i.startswith("LJ001-") for i in batch["id"])
    assert torch.all(batch["length"] > 0) and float(audio.abs().max()) > 0.01
    if "text" in batch:
        assert all(batch["text"])


def test_cli_lists_and_rejects_unknown(capsys):
    assert dataset_examples.main(["--list"]) == 0
    assert "ljspeech_folder" in capsys.readouterr().out
    assert dataset_examples.main(["no_such_example"]) == 2
    assert dataset_examples.main(["folder", "--audio-dir", "/nonexistent"]) == 2
