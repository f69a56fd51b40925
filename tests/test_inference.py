"""inference.py as users run it: real subprocesses, real ljspeech-mini files, tiny checkpoints."""

import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import snac
import soundfile as sf
import torch

from training.audio import decode_audio, resample
from training.codec import EncodedAudio, load_codes, save_codes
from training.config import Config, model_preset
from training.model import build_generator

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
FILES = {"flac": "LJ001-0008.flac", "mp3": "LJ001-0028.mp3", "wav": "LJ001-0029.wav"}  # shortest of each
METRIC_KEYS = {"file", "output", "duration_s", "input_sample_rate", "model_sample_rate", "output_sample_rate",
               "tokens_per_level", "token_rates_hz", "bitrate_kbps", "compression_ratio", "si_sdr_db",
               "mel_distance", "stft_distance", "pesq", "stoi", "encode_rtf", "decode_rtf"}


def run(*args, check_rc=0):
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(99)
    cfg = Config(model=model_preset("tiny"))
    model = build_generator(cfg.model)
    path = tmp_path_factory.mktemp("ckpt") / "step_000005.pt"
    torch.save({"generator": model.state_dict(), "config": cfg.to_dict(), "step": 5}, path)
    return path, model.eval()


@pytest.fixture(scope="module")
def clips(ljspeech_dir, tmp_path_factory):
    """One short clip per format, copied so outputs can never touch the shared corpus."""
    d = tmp_path_factory.mktemp("clips")
    for name in FILES.values():
        shutil.copy(ljspeech_dir / "wavs" / name, d / name)
    return d


def _model_rate_length(path):
    audio, rate = decode_audio(path)
    return resample(audio, rate, 24000).shape[-1], audio.shape[-1]


@pytest.mark.slow  # ~8 s: one CLI run per format
def test_documented_form_round_trips_each_format(tiny_ckpt, clips, tmp_path):
    ckpt, _ = tiny_ckpt
    out = tmp_path / "out"
    proc = run("--checkpoint", ckpt, "--input", clips, "--output", out, "--metrics", tmp_path / "m.json",
               "--plot", tmp_path / "plots")
    assert "mean" in proc.stdout and "SI-SDR" in proc.stdout
    report = json.loads((tmp_path / "m.json").read_text())
    assert len(report["files"]) == 3 and report["model"]["config"]["codebook_size"] == 256
    for row in report["files"]:
        assert set(row) == METRIC_KEYS
        src = clips / row["file"].split("/")[-1]
        wav, rate = sf.read(row["output"])
        assert rate == 24000 and len(wav) == _model_rate_length(src)[0]
        assert row["input_sample_rate"] == 22050 and row["encode_rtf"] > 0
    assert report["mean"]["bitrate_kbps"] == pytest.approx(24000 / 512 * (1 / 4 + 1 / 2 + 1) * 8 / 1000)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(n.replace(n.split(".")[-1], "png")
                                                                             for n in FILES.values())


def test_single_file_keep_rate(tiny_ckpt, clips, tmp_path):
    ckpt, _ = tiny_ckpt
    src = clips / FILES["mp3"]
    run("--checkpoint", ckpt, "--input", src, "--output", tmp_path / "r.wav", "--keep-rate", "--no-metrics")
    wav, rate = sf.read(tmp_path / "r.wav")
    assert rate == 22050 and len(wav) == _model_rate_length(src)[1]


def test_encode_decode_equals_roundtrip_and_snac(tiny_ckpt, clips, tmp_path):
    ckpt, model = tiny_ckpt
    src = clips / FILES["flac"]
    run("encode", "-c", ckpt, "-i", src, "-o", tmp_path / "c.npz")
    run("decode", "-c", ckpt, "-i", tmp_path / "c.npz", "-o", tmp_path / "d.wav")
    run("roundtrip", "-c", ckpt, "-i", src, "-o", tmp_path / "r.wav", "--no-metrics")
    decoded, _ = sf.read(tmp_path / "d.wav", dtype="int16")
    round_tripped, _ = sf.read(tmp_path / "r.wav", dtype="int16")
    assert np.array_equal(decoded, round_tripped)

    enc = load_codes(tmp_path / "c.npz")
    audio, _ = decode_audio(src)
    x = resample(audio, 22050, 24000)[None]
    with torch.no_grad():
        reference = model.encode(x)  # snac pads to its multiple itself
    assert enc.length == x.shape[-1] and enc.input_length == audio.shape[-1]
    for ours, theirs in zip(enc.codes, reference):
        assert torch.equal(ours, theirs[0])


@pytest.mark.slow
def test_export_loads_in_snac_and_decodes_identically(tiny_ckpt, clips, tmp_path):
    ckpt, _ = tiny_ckpt
    (tmp_path / "codes").mkdir()
    run("encode", "-c", ckpt, "-i", clips / FILES["flac"], "-o", tmp_path / "codes")  # into an existing folder
    run("export", "-c", ckpt, "-o", tmp_path / "exported")
    # The snac package itself loads the export with exactly the checkpoint's weights and architecture.
    exported = snac.SNAC.from_pretrained(str(tmp_path / "exported")).state_dict()
    trained = torch.load(ckpt, weights_only=True)["generator"]
    assert sorted(exported) == sorted(trained)
    for name, value in trained.items():
        assert torch.equal(exported[name], value), name
    run("decode", "-c", ckpt, "-i", tmp_path / "codes", "-o", tmp_path / "a")
    run("decode", "-c", tmp_path / "exported", "-i", tmp_path / "codes", "-o", tmp_path / "b")
    outputs = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert outputs == ["LJ001-0008.wav"]
    for name in outputs:
        assert np.array_equal(sf.read(tmp_path / "a" / name)[0], sf.read(tmp_path / "b" / name)[0])
    proc = run("export", "-c", ckpt, "-o", tmp_path / "exported", check_rc=2)  # no silent overwrite
    assert "already holds" in proc.stderr


def _codes_for(tmp_path, n_levels, codebook_size, bad_value=None):
    cfg = model_preset("tiny")
    n0 = 10
    strides = (8, 4, 2, 1)[-n_levels:] if n_levels == 4 else cfg.vq_strides
    codes = [torch.randint(0, 256, (n0 * strides[0] // s,)) for s in strides]
    if bad_value is not None:
        codes[0][2] = bad_value
    model = {"config": {**cfg.snac_kwargs(), "codebook_size": codebook_size, "vq_strides": list(strides)}}
    enc = EncodedAudio(codes, length=n0 * strides[0] * 512, sample_rate=24000, input_sample_rate=24000,
                       input_length=n0 * strides[0] * 512, model=model)
    return save_codes(tmp_path / f"codes_{n_levels}_{codebook_size}_{bad_value}.npz", enc)


@pytest.mark.parametrize("case", ["missing_file", "unreadable_audio", "empty_dir", "wrong_levels",
                                  "wrong_codebook", "out_of_range", "missing_model", "bad_flag", "overwrite_input"])
def test_bad_input_one_line_exit_2(case, tiny_ckpt, clips, tmp_path):
    ckpt, _ = tiny_ckpt
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.wav").write_text("this is not audio")
    args, expect = {
        "missing_file": (["-c", ckpt, "-i", tmp_path / "nope.wav", "-o", tmp_path / "o.wav"], "not found"),
        "unreadable_audio": (["-c", ckpt, "-i", tmp_path / "broken.wav", "-o", tmp_path / "o.wav"], "broken.wav"),
        "empty_dir": (["-c", ckpt, "-i", tmp_path / "empty", "-o", tmp_path / "o"], "no audio files"),
        "wrong_levels": (["decode", "-c", ckpt, "-i", _codes_for(tmp_path, 4, 256), "-o", tmp_path / "o.wav"],
                         "4 code levels"),
        "wrong_codebook": (["decode", "-c", ckpt, "-i", _codes_for(tmp_path, 3, 4096), "-o", tmp_path / "o.wav"],
                           "codebook size 4096"),
        "out_of_range": (["decode", "-c", ckpt, "-i", _codes_for(tmp_path, 3, 256, bad_value=300),
                          "-o", tmp_path / "o.wav"], "outside the codebook"),
        "missing_model": (["-c", tmp_path / "none.pt", "-i", clips / FILES["wav"], "-o", tmp_path / "o.wav"],
                          "model not found"),
        "bad_flag": (["roundtrip", "-c", ckpt, "--chunk-seconds", "abc"], "invalid float"),
        "overwrite_input": (["-c", ckpt, "-i", clips / FILES["wav"], "-o", clips / FILES["wav"]], "overwrite"),
    }[case]
    before = (clips / FILES["wav"]).read_bytes()
    proc = run(*args, check_rc=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], proc.stderr
    assert (clips / FILES["wav"]).read_bytes() == before


def test_folder_skips_bad_file_and_processes_the_rest(tiny_ckpt, clips, tmp_path):
    ckpt, _ = tiny_ckpt
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(clips / FILES["wav"], folder / "sub" / "good.wav")
    (folder / "bad.flac").write_bytes(b"\x00" * 100)
    proc = run("encode", "-c", ckpt, "-i", folder, "-o", tmp_path / "codes", check_rc=2)
    assert (tmp_path / "codes" / "sub" / "good.npz").is_file()
    assert not (tmp_path / "codes" / "bad.npz").exists()
    assert "bad.flac" in proc.stderr and "1 of 2 inputs failed" in proc.stderr and "Traceback" not in proc.stderr


def test_help_documents_every_flag():
    import importlib.util

    spec = importlib.util.spec_from_file_location("inference_cli", ROOT / "inference.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    parser = cli.build_parser()
    top = run("--help").stdout
    for command in cli.COMMANDS:
        assert command in top
        sub = parser._subparsers._group_actions[0].choices[command]
        text = sub.format_help()
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, (command, flag)
            assert action.help, (command, action.option_strings)
    assert "compression ratio" in top and "16-bit PCM" in top


@pytest.mark.slow
def test_existing_output_is_refused_unless_overwrite(tiny_ckpt, clips, tmp_path):
    """An existing, unrelated file at --output is kept byte for byte: one line, exit 2; with
    --overwrite it is replaced."""
    wav = sorted(clips.glob("*.wav"))[0]
    for command, name in (("encode", "codes.npz"), ("roundtrip", "out.wav")):
        out = tmp_path / name
        out.write_bytes(b"someone else's file")
        r = run(command, "--checkpoint", tiny_ckpt[0], "--input", wav, "--output", out, "--no-metrics"
                if command == "roundtrip" else "--quiet", check_rc=2)
        assert r.stderr.count("\n") == 1 and "already exists" in r.stderr and "--overwrite" in r.stderr, r.stderr
        assert out.read_bytes() == b"someone else's file"
        run(command, "--checkpoint", tiny_ckpt[0], "--input", wav, "--output", out, "--overwrite",
            "--no-metrics" if command == "roundtrip" else "--quiet")
        assert out.read_bytes() != b"someone else's file"
