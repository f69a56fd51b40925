"""example_training.py: every offline example runs (tiny preset, a few CPU steps) and does what it says."""

import json
import sys
from pathlib import Path

import pytest
import snac
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import example_training as ex  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("examples")


@pytest.fixture(scope="module")
def audio_dir(ljspeech_dir):
    return ljspeech_dir


def test_every_example_is_listed_and_documented(capsys):
    assert set(ex.OFFLINE) == {"configs", "train_tiny", "resume", "finetune", "codec", "losses"}
    assert set(ex.NETWORK) == {"finetune_pretrained", "hub_dataset"}
    assert ex.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in [*ex.OFFLINE, *ex.NETWORK]:
        assert name in out
    assert out.count("[network]") == len(ex.NETWORK)
    assert ex.main(["no_such_example"]) == 2


def test_configs(audio_dir, work):
    from training.config import load_config

    cfg = ex.configs(audio_dir, work)
    assert cfg.data.batch_size == 8 and cfg.optim.lr == 3e-4 and cfg.train.max_steps == 20000
    assert cfg.loss.stft == 0.0 and cfg.data.dataset_path == "/data/wavs" and cfg.model.hop_length == 512
    assert load_config(work / "my_config.yaml").to_dict() == cfg.to_dict()  # the file holds every setting


def test_train_tiny(audio_dir, work):
    summary = ex.train_tiny(audio_dir, work)
    run = work / "tiny_run"
    assert summary["step"] == 2
    for name in ("checkpoints/latest.pt", "checkpoints/best.pt", "metrics.jsonl", "config.yaml"):
        assert (run / name).is_file(), name
    model = snac.SNAC.from_pretrained(str(run / "export"))
    assert model.codebook_size == 256


@pytest.mark.slow  # ~17 s: two training subprocesses
def test_resume(audio_dir, work, tmp_path, capsys):
    """The resumed run ends where an uninterrupted 3-step run ends, and its second call trained one step."""
    assert ex.resume(audio_dir, work)["step"] == 3
    assert "at step 2" in capsys.readouterr().err  # the second call said where it resumed
    # Evaluation uses its own random stream, so the straight run need not evaluate where the resumed
    # one stopped (step 2).
    ex.train_main(ex.tiny_config(audio_dir, tmp_path, "straight", steps=3))
    resumed = torch.load(work / "resume_run" / "checkpoints" / "latest.pt", weights_only=True)
    straight = torch.load(tmp_path / "straight" / "checkpoints" / "latest.pt", weights_only=True)
    for part in ("generator", "discriminator"):
        for name, value in straight[part].items():
            assert torch.equal(resumed[part][name], value), f"{part}.{name}"
    # A run that ignored the checkpoint and started over would also end equal (training is
    # deterministic): the log tells them apart. A fresh start evaluates at step 0 again.
    rows = [json.loads(line) for line in (work / "resume_run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/mel" in r] == [1, 2, 3]
    assert [r["step"] for r in rows if "val/mel" in r] == [0, 2, 3]


def test_finetune(audio_dir, work):
    summary = ex.finetune(audio_dir, work)
    assert summary["step"] == 2
    # Started from the exported model, encoder frozen: encoder weights are the pretrained ones, the
    # decoder moved.
    pretrained = snac.SNAC.from_pretrained(str(work / "tiny_run" / "export")).state_dict()
    tuned = snac.SNAC.from_pretrained(summary["export_dir"]).state_dict()
    encoder = [k for k in pretrained if k.startswith("encoder.")]
    assert encoder and all(torch.equal(tuned[k], pretrained[k]) for k in encoder)
    assert any(not torch.equal(tuned[k], pretrained[k]) for k in pretrained if k.startswith("decoder."))


def test_codec(audio_dir, work):
    from training.audio import decode_audio
    from training.codec import load_codes

    decoded = ex.codec(audio_dir, work)
    assert decoded.shape == (1, 1, 24000) and torch.isfinite(decoded).all()
    # The saved codes are the snac package's own codes of the first clip, at the model rate.
    model = snac.SNAC.from_pretrained(str(work / "tiny_run" / "export")).eval()
    first = sorted(Path(ex.audio_source(audio_dir, work)).rglob("*.wav"))[0]
    audio, _ = decode_audio(first, 24000)
    with torch.inference_mode():
        reference = model.encode(audio[None])
    saved = load_codes(work / "codes.npz")
    assert saved.length == audio.shape[-1]
    for ours, theirs in zip(saved.codes, reference):
        assert torch.equal(ours, theirs[0])


def test_losses(audio_dir, work):
    terms = ex.losses(audio_dir, work)
    assert set(terms) == {"mel", "stft", "commitment", "codebook", "adversarial", "feature_matching"}
    assert all(v > 0 for v in terms.values())


def test_generated_corpus_when_audio_is_missing(tmp_path):
    """Without ljspeech-mini the examples train on a generated folder."""
    source = ex.audio_source(tmp_path / "missing", tmp_path)
    assert len(list(Path(source).glob("*.wav"))) == 16
