"""Clean start-up: every entry point's --help (and a few cheap real commands) print nothing on
stderr under Python's default warning filters, and unreadable audio is reported in plain words
(no decoder source paths), as a user sees it in a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.audio import AudioReadError, decode_audio

ROOT = Path(__file__).resolve().parents[1]

ENTRY_POINTS = [
    ["train_snac.py"], ["inference.py"], ["example_training.py"], ["dataset_examples.py"],
    ["-m", "training.dataset"], ["-m", "training.tokenize"], ["-m", "training.demo"],
    ["benchmarks/ablation_vq.py"], ["benchmarks/bench_data.py"], ["benchmarks/bench_inference.py"],
    ["benchmarks/bench_tokenize.py"], ["benchmarks/bench_train.py"],
]
# What leaks out of libraries when start-up is not clean.
NOISE = ("Warning", "warn(", "Traceback", "SingleStreamDecoder", ".cpp:")


def _env(tmp_path: Path) -> dict:
    """The user's environment minus anything that changes warning output or points at hub caches."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", SNAC_DATA_REGISTRY=str(tmp_path / "registry.json"))
    return env


def _run(args, tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda e: e[-1])
def test_help_has_empty_stderr(entry, tmp_path):
    r = _run([*entry, "--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr
    assert "usage" in r.stdout.lower()


# (tool, argv, exit status): answered before torch is imported
WITHOUT_TORCH = [
    ("train_snac", ["--help"], 0), ("train_snac", ["--no_such_flag"], 2),
    ("train_snac", ["--set", "optim.lr=-1"], 2), ("train_snac", ["--dataset", "x", "--dataset_path", "y"], 2),
    ("inference", ["--help"], 0), ("inference", ["encode", "--help"], 0), ("inference", ["encode", "-c", "x"], 2),
    ("training.tokenize.command", ["--help"], 0),
    ("training.tokenize.command", ["--audio_codec", "x", "--out_dir", "{tmp}/o", "--dataset", "d", "--num_readers", "0"], 2),
]


@pytest.mark.parametrize("module,argv,code", WITHOUT_TORCH, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_help_and_bad_flags_are_answered_without_importing_torch(module, argv, code, tmp_path):
    """``--help``, a bad flag and a bad config value need no torch (about 1.5 s to import): the
    tools answer them first. Each runs the tool's real ``main`` in a fresh interpreter."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    probe = ("import importlib, sys\n"
             f"main = importlib.import_module({module!r}).main\n"
             "try:\n"
             f"    status = main({argv!r})\n"
             "except SystemExit as e:\n"
             "    status = e.code\n"
             "print(status, 'torch' in sys.modules, file=sys.stderr)\n")
    r = _run(["-c", probe], tmp_path)
    assert r.stderr.splitlines()[-1] == f"{code} False", r.stderr
    if code == 2:
        assert r.stderr.splitlines()[0].startswith("error: "), r.stderr


def test_package_import_and_dataset_listing_are_quiet(tmp_path):
    r = _run(["-c", "import training; training.AudioDataset; training.tokenize_dataset; print('ok')"], tmp_path)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, "ok", "")
    r = _run(["-m", "training.dataset", "list"], tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr


@pytest.mark.slow
def test_example_scripts_run_quietly(tmp_path):
    """Real example runs (a manual GAN step, configs, two dataset sources): nothing on stderr."""
    for args in (["example_training.py", "losses", "configs", "--work-dir", tmp_path / "ex"],
                 ["dataset_examples.py", "folder", "manifest"]):
        r = _run(args, tmp_path)
        assert r.returncode == 0, r.stderr
        assert r.stderr == "", r.stderr


@pytest.mark.slow
def test_tokenizer_run_is_quiet(ljspeech_dir, tmp_path):
    """A real (tiny) tokenizer run: reader and encoder processes import snac too."""
    from training.config import model_preset
    from training.model import build_generator
    from training.hub import export_snac

    cfg = model_preset("tiny")
    model = export_snac(build_generator(cfg), cfg, tmp_path / "snac_tiny")
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "a.wav").write_bytes((ljspeech_dir / "wavs" / "LJ001-0029.wav").read_bytes())
    r = _run(["-m", "training.tokenize", "--audio_codec", model, "--dataset", clips, "--out_dir", tmp_path / "out",
              "--no_progress", "--num_readers", "1"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert not any(n in r.stderr for n in NOISE), r.stderr


# --------------------------------------------------------------------------------------
# Unreadable audio in plain words
# --------------------------------------------------------------------------------------


@pytest.fixture
def broken_files(ljspeech_dir, tmp_path) -> dict:
    """Real files damaged the ways users meet them: an MP3 whose data after the first frame header
    was zero-filled (an interrupted copy), a WAV whose header was overwritten, random bytes named
    .wav and a text file named .flac."""
    mp3 = (ljspeech_dir / "wavs" / "LJ001-0025.mp3").read_bytes()
    wav = (ljspeech_dir / "wavs" / "LJ001-0029.wav").read_bytes()
    files = {"damaged.mp3": mp3[:200] + bytes(len(mp3) - 200), "bad_header.wav": os.urandom(44) + wav[44:],
             "noise.wav": os.urandom(6000), "notes.flac": b"shopping list: milk\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


def test_decoder_errors_are_plain_words(broken_files):
    for name, path in broken_files.items():
        for value in (path, path.read_bytes()):
            with pytest.raises(AudioReadError) as e:
                decode_audio(value, 24000)
            message = str(e.value)
            assert not any(n in message for n in NOISE), message
            assert "damaged" in message or "no audio stream" in message, message
            if isinstance(value, Path):
                assert message.startswith(str(path)), message


def test_inference_reports_an_unreadable_file_in_one_plain_line(broken_files, tmp_path):
    from training.config import Config, model_preset
    from training.model import build_generator

    cfg = Config(model=model_preset("tiny"))
    ckpt = tmp_path / "step_000001.pt"
    torch.save({"generator": build_generator(cfg.model).state_dict(), "config": cfg.to_dict(), "step": 1}, ckpt)
    r = _run(["inference.py", "-c", ckpt, "-i", broken_files["damaged.mp3"], "-o", tmp_path / "out.wav"], tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "damaged.mp3" in lines[0] and "damaged, or not in an audio format" in lines[0], lines
    assert not any(n in r.stderr for n in NOISE), r.stderr


def test_dataset_skip_reports_are_plain_words(broken_files, ljspeech_dir, tmp_path):
    from training.dataset import AudioDataset

    good = [ljspeech_dir / "wavs" / f"LJ001-000{i}.flac" for i in (1, 2)]
    ds = AudioDataset([*broken_files.values(), *good], 24000, 4096, random_crop=False, max_failure_fraction=1.0)
    with pytest.warns(UserWarning) as caught:
        reports = [r for i in range(len(ds)) for r in ds[i]["skipped"]]
    assert {r.split(":")[0] for r in reports} == {Path(name).stem for name in broken_files}  # "id: reason"
    for text in [*reports, *(str(w.message) for w in caught)]:
        assert not any(n in text for n in (".cpp:", "SingleStreamDecoder")), text
    json.dumps(reports)  # reports stay plain strings (they travel from DataLoader workers)


def test_test_requirements_are_installed():
    """Every test requirement imports, so no test that needs one (PESQ, STOI, librosa's reference mel
    filterbank, plots) can skip silently: a missing one fails here, naming the fix."""
    import importlib

    names = [line.split("#")[0].strip() for line in (ROOT / "requirements_test.txt").read_text().splitlines()]
    modules = {"pytest-xdist": "xdist"}  # distributions whose import name differs
    missing = []
    for name in filter(None, names):
        dist = name.split("[")[0].split("=")[0].split(">")[0].strip()
        try:
            importlib.import_module(modules.get(dist, dist))
        except ImportError:
            missing.append(name)
    assert not missing, f"test requirements missing: {missing}; run `make test` or `pip install -r requirements_test.txt`"
