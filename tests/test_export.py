"""ONNX and torch.export graphs of the codec: parity with the PyTorch model on real speech, dynamic
batch and time axes, folded weight norm, and the ``inference.py export`` command's errors.

The tiny preset trained for a few steps (``trained_tiny``) is exported once per module. Every
export takes tens of seconds on one core (the 24 kHz preset minutes), so the parity tests are all
marked slow (they run in CI, ``make test-all``); the command's input errors are fast.
"""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import inference
from training.codec import Codec
from training.codec.export import (
    GraphRunner, check_parity, export_graphs, keyed_noise_inputs, noise_inputs,
)
from training.config import model_preset
from training.model import build_generator

from test_streaming import TINY_ATTENTION

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_onnx(trained_tiny, tmp_path_factory):
    model, cfg = trained_tiny
    out = tmp_path_factory.mktemp("onnx")
    export_graphs(model, cfg, out, "onnx", "input")
    return out


def ort_session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.slow  # uses tiny_onnx: the export takes ~30 s on one core
def test_onnx_encoder_codes_equal_snac_encode_on_real_speech(tiny_onnx, trained_tiny, speech_24k):
    model, _ = trained_tiny
    with torch.inference_mode():
        expected = model.encode(speech_24k)  # snac.SNAC.encode itself
    got = ort_session(tiny_onnx / "encoder.onnx").run(None, {"audio": speech_24k.numpy()})
    assert [g.shape for g in got] == [tuple(e.shape) for e in expected]
    assert all(np.array_equal(g, e.numpy()) for g, e in zip(got, expected))
    assert min(len(np.unique(g)) for g in got) >= 4  # real speech on a trained model: identity means something


@pytest.mark.slow  # uses tiny_onnx: the export takes ~30 s on one core
def test_onnx_decoder_equals_codec_decode_on_real_speech(tiny_onnx, trained_tiny, speech_24k):
    model, cfg = trained_tiny
    codec = Codec(model, cfg, device="cpu", noise_seed=7)
    codes = codec.encode(speech_24k)
    expected = codec.decode(codes)
    feeds = {f"codes_{i}": c.numpy() for i, c in enumerate(codes)}
    feeds.update({f"noise_{k}": n.numpy() for k, n in enumerate(keyed_noise_inputs(model, codes[0].shape[-1], 7))})
    got = torch.from_numpy(ort_session(tiny_onnx / "decoder.onnx").run(None, feeds)[0])
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < TOL
    assert expected.abs().max() > 0.05


@pytest.mark.slow  # uses tiny_onnx: the export takes ~30 s on one core
def test_parity_report(tiny_onnx, trained_tiny, speech_24k):
    model, cfg = trained_tiny
    r = check_parity(model, cfg, tiny_onnx, speech_24k[0, 0], "onnx", "input")
    assert r["codes_identical"] and r["codes_differing"] == 0 and r["codes_total"] == 7 * 24
    assert 0 <= r["decoder_max_abs_error"] < TOL
    meta = json.loads((tiny_onnx / "export_onnx.json").read_text())
    assert meta["decoder_inputs"] == ["codes_0", "codes_1", "codes_2", "noise_0", "noise_1", "noise_2", "noise_3"]
    assert meta["noise_upsampling"] == noise_inputs(model) == [8, 64, 256, 512]


@pytest.mark.slow  # uses tiny_onnx: the export takes ~30 s on one core
def test_onnx_graphs_take_any_batch_and_length(tiny_onnx, trained_tiny, speech_24k):
    model, cfg = trained_tiny
    codec = Codec(model, cfg, device="cpu")
    audio = torch.cat([speech_24k[..., :30000], speech_24k[..., 10000:40000], speech_24k[..., 5:30005]])
    codes = ort_session(tiny_onnx / "encoder.onnx").run(None, {"audio": audio.numpy()})  # 30000: not a pad multiple
    expected = codec.encode(audio)
    assert all(np.array_equal(g, e.numpy()) for g, e in zip(codes, expected))
    frames = codes[0].shape[-1]
    feeds = {f"codes_{i}": c for i, c in enumerate(codes)}
    feeds.update({f"noise_{k}": n.numpy() for k, n in enumerate(keyed_noise_inputs(model, frames, 0, batch=3))})
    got = torch.from_numpy(ort_session(tiny_onnx / "decoder.onnx").run(None, feeds)[0])
    assert got.shape == (3, 1, frames * 2048)
    assert (got - codec.decode(expected)).abs().max() < TOL


@pytest.mark.slow  # uses tiny_onnx: the export takes ~30 s on one core
def test_onnx_weight_norm_is_folded(tiny_onnx, trained_tiny):
    model, _ = trained_tiny
    names = [i.name for i in onnx.load(str(tiny_onnx / "decoder.onnx")).graph.initializer]
    assert not [n for n in names if "original" in n or "parametrizations" in n]
    n_convs = sum(isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)) for m in model.decoder.modules())
    assert sum(n.endswith("weight") for n in names) >= n_convs  # one plain tensor per convolution


@pytest.mark.slow  # two .pt2 programs (~12 s) per noise mode
@pytest.mark.parametrize("noise", ["input", "off"])
def test_pt2_parity_on_real_speech(trained_tiny, speech_24k, tmp_path, noise):
    model, cfg = trained_tiny
    export_graphs(model, cfg, tmp_path, "pt2", noise)
    r = check_parity(model, cfg, tmp_path, speech_24k[0, 0], "pt2", noise)
    assert r["codes_identical"] and r["decoder_max_abs_error"] < TOL
    if noise == "off":  # noise off is a different decoder: check it against PyTorch independently
        codes = [c for c in GraphRunner(tmp_path / "encoder.pt2", "pt2")(speech_24k)]
        audio = GraphRunner(tmp_path / "decoder.pt2", "pt2")(*codes)[0]
        with_noise = Codec(model, cfg, device="cpu").decode(codes)
        assert (audio - with_noise).abs().max() > 10 * TOL  # the noise term is really gone


@pytest.mark.slow  # the 19.8M-parameter preset: ONNX and .pt2 exports, ~2 min
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_24khz_preset_parity_on_real_speech(speech_24k, tmp_path, fmt):
    cfg = model_preset("24khz")
    torch.manual_seed(0)
    model = build_generator(cfg).eval()
    export_graphs(model, cfg, tmp_path, fmt, "input")
    r = check_parity(model, cfg, tmp_path, speech_24k[0, 0], fmt, "input")
    assert r["codes_identical"] and r["decoder_max_abs_error"] < TOL


@pytest.mark.slow  # local attention (the 32 / 44 kHz layout at tiny width), ~45 s per format
@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_attention_layout_parity(ljspeech_dir, tmp_path, fmt):
    from training.audio import list_audio_files, load_audio

    torch.manual_seed(0)
    model = build_generator(TINY_ATTENTION).eval()
    export_graphs(model, TINY_ATTENTION, tmp_path, fmt, "input")
    speech = load_audio(list_audio_files(ljspeech_dir)[1], 32000)[0, :64000]
    r = check_parity(model, TINY_ATTENTION, tmp_path, speech, fmt, "input")
    assert r["codes_identical"] and r["decoder_max_abs_error"] < TOL


# ---- the command ----


def run_cli(capsys, *argv):
    code = inference.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def snac_dir(trained_tiny, tmp_path_factory):
    from training.hub import export_snac

    model, cfg = trained_tiny
    return export_snac(model, cfg, tmp_path_factory.mktemp("snac") / "tiny")


def test_export_refuses_existing_outputs_and_bad_input_with_one_line(snac_dir, tmp_path, capsys):
    out = tmp_path / "graphs"
    out.mkdir()
    (out / "decoder.onnx").write_bytes(b"keep me")
    code, _, err = run_cli(capsys, "export", "-c", str(snac_dir), "-o", str(out), "--format", "onnx")
    assert code == 2 and err.count("\n") == 1 and "already exists" in err and "--overwrite" in err
    assert (out / "decoder.onnx").read_bytes() == b"keep me"
    code, _, err = run_cli(capsys, "export", "-c", str(snac_dir), "-o", str(tmp_path / "g2"), "--format", "pt2",
                           "--check", str(tmp_path / "missing.wav"))
    assert code == 2 and err.count("\n") == 1 and "missing.wav" in err
    assert not (tmp_path / "g2" / "encoder.pt2").exists()
    code, _, err = run_cli(capsys, "export", "-c", str(snac_dir), "-o", str(tmp_path / "g3"), "--noise", "off")
    assert code == 2 and err.count("\n") == 1 and "--format onnx or pt2" in err
    code, _, err = run_cli(capsys, "export", "-c", str(snac_dir), "-o", str(tmp_path / "g4"), "--format", "tflite")
    assert code == 2 and err.count("\n") == 1
    code, _, err = run_cli(capsys, "export", "-c", str(tmp_path / "no_model"), "-o", str(tmp_path / "g5"),
                           "--format", "onnx")
    assert code == 2 and err.count("\n") == 1 and "not found" in err


@pytest.mark.slow  # a full ONNX export through the command, ~30 s
def test_export_command_writes_graphs_and_reports_parity(snac_dir, ljspeech_dir, tmp_path, capsys):
    from training.audio import list_audio_files

    clip = str(list_audio_files(ljspeech_dir)[0])
    code, out, err = run_cli(capsys, "export", "-c", str(snac_dir), "-o", str(tmp_path), "--format", "onnx",
                             "--check", clip)
    assert code == 0, err
    assert (tmp_path / "encoder.onnx").is_file() and (tmp_path / "decoder.onnx").is_file()
    assert "codes identical (0 of" in out and ": ok" in out
    code, _, err = run_cli(capsys, "export", "-c", str(snac_dir), "-o", str(tmp_path), "--format", "onnx",
                           "--overwrite", "--noise", "off", "-q")
    assert code == 0 and err == ""
    assert json.loads((tmp_path / "export_onnx.json").read_text())["noise"] == "off"


def test_missing_exporter_package_is_a_one_line_install_hint():
    from training.codec.export import ExportError, _require

    with pytest.raises(ExportError, match=r"needs no_such_package_xyz: pip install 'snac-training\[export\]'"):
        _require("no_such_package_xyz")
