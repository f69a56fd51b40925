"""Fine-tuning a pretrained SNAC: modes, code agreement with the starting model, discriminator
warm-up, and their one-line errors. Real exported models on disk, real LJ Speech clips."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import snac
import torch

from conftest import kill_at_checkpoint
from training.audio import decode_audio
from training.config import ModelConfig, create_training_config, model_preset
from training.hub import export_snac, load_generator
from training.model import build_generator
from training.state import build_state
from training.train import train_step

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import train_snac  # noqa: E402

# Small and fast: 0.17 s training crops, 2 per step; 4 held-out clips of 0.5 s, 2 batches per evaluation.
FAST = ["--preset", "tiny", "--batch_size", "2", "--set", "data.segment_seconds=0.17",
        "--set", "data.val_segment_seconds=0.5", "--set", "data.val_items=4", "--set", "data.num_workers=0",
        "--set", "train.eval_batches=2", "--set", "train.log_every=1", "--device", "cpu"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny SNAC directory standing in for a published model (DAC init). Its seed is not the
    trainer's (0): a generator built from scratch by a run must not equal it by accident."""
    torch.manual_seed(1234)
    out = tmp_path_factory.mktemp("pretrained") / "snac_tiny"
    export_snac(build_generator(model_preset("tiny")), model_preset("tiny"), out)
    return out


def _train(capsys, args):
    """train_snac.py in this process: (exit code, stdout, stderr)."""
    try:
        code = train_snac.main(args)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _val_rows(run: Path):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val/mel" in r]


def _agreement(row):
    return [row[f"val/code_agreement_level{i}"] for i in range(3)]


def _error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("init_from: using")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_decoder_mode_keeps_every_token_and_frozen_tensor_while_mel_improves(tmp_path, capsys, pretrained,
                                                                               ljspeech_dir):
    run = tmp_path / "ft"
    code, out, err = _train(capsys, [*FAST, "--dataset_path", str(ljspeech_dir), "--init_from", str(pretrained),
                                     "--finetune", "decoder", "--set", "optim.lr=1e-3", "--max_steps", "8",
                                     "--set", "train.eval_every=4", "--run_dir", str(run)])
    assert code == 0, err[-2000:]
    rows = _val_rows(run)
    assert [r["step"] for r in rows] == [0, 4, 8]
    for row in rows:
        assert _agreement(row) == [1.0, 1.0, 1.0], row  # exactly: not one validation code changed
    assert rows[-1]["val/mel"] < rows[0]["val/mel"] - 0.2, [r["val/mel"] for r in rows]  # the new domain improves
    assert "code agreement with the starting model on the validation set: level 0 100.000 %, level 1 100.000 %, " \
           "level 2 100.000 %" in out
    start = snac.SNAC.from_pretrained(str(pretrained)).state_dict()
    end = snac.SNAC.from_pretrained(str(run / "export")).state_dict()
    frozen = [k for k in start if k.startswith(("encoder.", "quantizer."))]
    assert len(frozen) > 50
    for k in frozen:
        assert torch.equal(start[k], end[k]), k  # bit for bit
    assert any(not torch.equal(start[k], end[k]) for k in start if k.startswith("decoder."))
    assert (run / "reference_codes.pt").is_file()


@pytest.mark.parametrize("mode,trained", [("decoder", ("decoder",)), ("decoder+encoder", ("decoder", "encoder")),
                                          ("full", ("decoder", "encoder", "quantizer"))])
def test_frozen_parts_get_no_optimizer_state_and_no_gradient(tmp_path, pretrained, mode, trained):
    cfg = create_training_config(preset="tiny", batch_size=2, overrides={
        "train.finetune": mode, "train.init_from": str(pretrained), "data.segment_seconds": 0.17,
        "train.run_dir": str(tmp_path / "run"), "train.device": "cpu"})
    state = build_state(cfg, torch.device("cpu"))
    g = state.generator
    parts = {name: list(getattr(g, name).parameters()) for name in ("encoder", "quantizer", "decoder")}
    in_optimizer = {id(p) for group in state.opt_g.param_groups for p in group["params"]}
    expected = {id(p) for name in trained for p in parts[name]}
    assert in_optimizer == expected
    assert state.opt_g.param_groups[0]["lr"] == {"decoder": 1e-4, "decoder+encoder": 5e-5, "full": 5e-5}[mode]
    train_step(state, {"audio": 0.1 * torch.randn(2, 1, cfg.segment_length())})
    for name, params in parts.items():
        if name in trained:
            assert any(p.grad is not None for p in params), name
        else:
            # no backward reached them: nothing was recorded for autograd through frozen weights
            assert all(not p.requires_grad and p.grad is None for p in params), name
    assert {id(p) for p in state.opt_g.state} == expected  # Adam moments for trained tensors only


def test_full_mode_logs_agreement_below_one_and_the_summary_reports_it(tmp_path, capsys, pretrained, ljspeech_dir):
    run = tmp_path / "ft"
    code, out, err = _train(capsys, [*FAST, "--dataset_path", str(ljspeech_dir), "--init_from", str(pretrained),
                                     "--finetune", "full", "--set", "optim.lr=1e-3", "--max_steps", "6",
                                     "--set", "train.eval_every=3", "--run_dir", str(run)])
    assert code == 0, err[-2000:]
    rows = _val_rows(run)
    assert _agreement(rows[0]) == [1.0, 1.0, 1.0]  # step 0: the starting model itself
    final = _agreement(rows[-1])
    assert rows[-1]["step"] == 6 and min(final) < 1.0, final
    levels = ", ".join(f"level {i} {100 * a:.3f} %" for i, a in enumerate(final))
    assert f"code agreement with the starting model on the validation set: {levels}" in out
    # TensorBoard holds the same scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs"))
    events.Reload()
    assert [e.value for e in events.Scalars("val/code_agreement_level0")] == \
        pytest.approx([r["val/code_agreement_level0"] for r in rows])


def test_agreement_after_a_resume_compares_with_the_starting_models_codes(tmp_path, capsys, pretrained, ljspeech_dir):
    from training.agreement import AgreementCounter, ReferenceCodes, encode_codes
    from training.config import load_config
    from training.dataset import build_dataloaders

    run = tmp_path / "ft"
    common = [*FAST, "--dataset_path", str(ljspeech_dir), "--init_from", str(pretrained), "--finetune", "full",
              "--set", "optim.lr=1e-3", "--set", "train.eval_every=100", "--run_dir", str(run)]
    assert _train(capsys, [*common, "--max_steps", "2"])[0] == 0
    code, _, err = _train(capsys, [*common, "--max_steps", "3"])
    assert code == 0 and "at step 2" in err, err[-2000:]
    # the kept codes are the pretrained model's, not those of the model the resume started from
    cfg = load_config(run / "config.yaml")
    _, val = build_dataloaders(cfg)
    val = val[:cfg.train.eval_batches]
    kept = ReferenceCodes.load(run / "reference_codes.pt")
    start = ReferenceCodes.encode(load_generator(pretrained)[0], val, torch.device("cpu"))
    assert kept.digests == start.digests[:len(kept.digests)] and len(kept.codes) >= len(val)
    assert all(torch.equal(a, b) for ka, sa in zip(kept.codes, start.codes) for a, b in zip(ka, sa))
    counter = AgreementCounter()
    final, _ = load_generator(run / "export")
    for batch, ref in zip(val, kept.codes):
        counter.add(ref, encode_codes(final, batch["audio"]))
    assert _agreement(_val_rows(run)[-1]) == counter.fractions() and min(counter.fractions()) < 1.0


def test_disc_warmup_updates_no_generator_parameter_and_runs_no_generator_backward(tmp_path):
    # usage-rule code replacement at every step: it would rewrite codebook rows if it ran
    cfg = create_training_config(preset="tiny", batch_size=2, overrides={
        "train.disc_warmup_steps": 3, "data.segment_seconds": 0.17, "train.run_dir": str(tmp_path / "run"),
        "train.code_replacement": "usage", "train.dead_code_every": 1, "train.device": "cpu"})
    state = build_state(cfg, torch.device("cpu"))
    grad_modes = []
    inner = state.gen_step.forward
    state.gen_step.forward = lambda audio: (grad_modes.append(torch.is_grad_enabled()), inner(audio))[1]
    gen0 = {k: v.clone() for k, v in state.generator.state_dict().items()}
    disc0 = {k: v.clone() for k, v in state.discriminator.state_dict().items()}
    batches = [{"audio": 0.1 * torch.randn(2, 1, cfg.segment_length())} for _ in range(4)]
    for batch in batches[:3]:
        metrics = train_step(state, batch)
        assert metrics["train/disc_warmup"] == 1.0 and "loss/mel" not in metrics
    assert grad_modes == [False, False, False]  # no autograd graph: no generator backward possible
    for k, v in state.generator.state_dict().items():
        assert torch.equal(v, gen0[k]), k  # bit for bit, codebooks included
    assert all(p.grad is None for p in state.generator.parameters())
    assert not state.opt_g.state and state.sched_g.last_epoch == 0  # no generator update, lr schedule waiting
    assert any(not torch.equal(v, disc0[k]) for k, v in state.discriminator.state_dict().items())
    assert state.step == 3
    metrics = train_step(state, batches[3])  # after the warm-up: a normal step
    assert "loss/mel" in metrics and grad_modes[-1] is True
    assert any(not torch.equal(v, gen0[k]) for k, v in state.generator.state_dict().items())
    assert state.sched_g.last_epoch == 1


@pytest.mark.parametrize("args,message", [
    (["--finetune", "decoder"], "train.finetune=decoder (--finetune) needs train.init_from"),
    (["--finetune", "full", "--set", "train.freeze_encoder=true", "--init_from", "X"],
     "'train.freeze_encoder' is true, but train.finetune=full trains the encoder"),
    (["--finetune", "everything"], "invalid choice: 'everything'"),
    (["--disc_warmup_steps", "-1"], "'train.disc_warmup_steps' must be >= 0"),
    (["--set", "train.finetune=encoder"], "'train.finetune' must be decoder, decoder+encoder, full or null"),
])
def test_bad_finetune_flags_are_one_line_exit_2(tmp_path, capsys, ljspeech_dir, args, message):
    run = tmp_path / "r"
    code, _, err = _train(capsys, [*FAST, "--dataset_path", str(ljspeech_dir), "--run_dir", str(run),
                                   "--max_steps", "1", *args])
    assert code == 2 and message in _error_line(err), err
    assert not run.exists()  # refused before the run directory is touched


def test_init_from_a_model_of_another_sample_rate_is_one_line_exit_2(tmp_path, capsys, ljspeech_dir):
    other = ModelConfig(sampling_rate=16000, encoder_dim=8, decoder_dim=64, codebook_size=256)
    export_snac(build_generator(other), other, tmp_path / "snac_16k")
    code, _, err = _train(capsys, [*FAST, "--dataset_path", str(ljspeech_dir), "--run_dir", str(tmp_path / "r"),
                                   "--init_from", str(tmp_path / "snac_16k"), "--finetune", "decoder", "--max_steps", "1"])
    assert code == 2
    assert "is a 16000 Hz model but this run reads its data at 24000 Hz" in _error_line(err)


def test_resuming_a_finetune_with_another_mode_is_one_line_exit_2(tmp_path, capsys, pretrained, ljspeech_dir):
    common = [*FAST, "--dataset_path", str(ljspeech_dir), "--run_dir", str(tmp_path / "ft"),
              "--init_from", str(pretrained), "--max_steps", "1"]
    code, _, err = _train(capsys, [*common, "--finetune", "decoder"])
    assert code == 0, err[-2000:]
    code, _, err = _train(capsys, [*common, "--max_steps", "2", "--finetune", "full"])
    assert code == 2
    line = _error_line(err)
    assert "train.finetune: decoder -> full" in line and "cannot resume" in line
    ckpt = torch.load(tmp_path / "ft" / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 1  # nothing trained under the other mode


# --------------------------------------------------------------------------------------
# The agreement command against snac itself
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, pretrained):
    """(A, B): the pretrained model, and a copy whose encoder output moved a little, so that some
    codes change and most do not."""
    torch.manual_seed(1)
    model, cfg = load_generator(pretrained)
    with torch.no_grad():
        for name, p in model.encoder.named_parameters():
            if name.endswith("original1") or name.endswith("alpha"):
                p.mul_(1 + 0.05 * torch.randn_like(p))
    b = tmp_path_factory.mktemp("moved") / "snac_b"
    export_snac(model, cfg, b)
    return pretrained, b


@pytest.fixture
def clips(tmp_path, ljspeech_dir) -> Path:
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("LJ001-0001.flac", "LJ001-0002.flac", "LJ001-0008.flac"):
        shutil.copy(ljspeech_dir / "wavs" / name, folder / name)
    return folder


def _snac_counts(a: Path, b: Path, folder: Path):
    """Per level (equal, total) from snac.SNAC.encode of each clip alone."""
    ma, mb = snac.SNAC.from_pretrained(str(a)).eval(), snac.SNAC.from_pretrained(str(b)).eval()
    equal, total = [0, 0, 0], [0, 0, 0]
    for path in sorted(folder.glob("*.flac")):
        audio, _ = decode_audio(path, 24000)
        with torch.no_grad():
            ca, cb = ma.encode(audio[None]), mb.encode(audio[None])
        for level in range(3):
            equal[level] += int((ca[level] == cb[level]).sum())
            total[level] += ca[level].numel()
    return equal, total


def _agree_cli(capsys, *args):
    from training.codec.__main__ import main

    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_agree_cli_matches_snac_encode(tmp_path, capsys, two_models, clips):
    a, b = two_models
    code, out, err = _agree_cli(capsys, "agree", str(a), str(b), "--input", str(clips), "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    equal, total = _snac_counts(a, b, clips)
    assert result["equal"] == equal and result["total"] == total and result["clips"] == 3
    assert any(0 < e < t for e, t in zip(equal, total)), (equal, total)  # some codes moved, not all
    assert f"{100 * equal[1] / total[1]:.3f} %" in out
    code, out, err = _agree_cli(capsys, "agree", str(a), str(a), "--input", str(clips))
    assert code == 0 and out.count("100.000 %") == 3


@pytest.mark.parametrize("args,message", [
    (["agree", "A_MISSING", "B", "--input", "."], "model not found: A_MISSING"),
    (["agree", "A", "B"], "required: --input"),
])
def test_agree_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    code, _, err = _agree_cli(capsys, *args)
    assert code == 2 and message in _error_line(err)


def test_agree_refuses_models_whose_codes_cannot_be_compared(tmp_path, capsys, pretrained, clips):
    other = ModelConfig(encoder_dim=8, decoder_dim=64, codebook_size=256, vq_strides=(2, 1))
    export_snac(build_generator(other), other, tmp_path / "two_levels")
    code, _, err = _agree_cli(capsys, "agree", str(pretrained), str(tmp_path / "two_levels"), "--input", str(clips))
    assert code == 2 and "vq_strides [4, 2, 1] (model A) vs [2, 1] (model B)" in _error_line(err)


@pytest.mark.slow
def test_agree_on_a_token_folder_equals_the_audio_folder(tmp_path, capsys, two_models, clips):
    """The tokens the tokenizer wrote with model A stand for A's codes: same counts as on the audio."""
    from training.tokenize import main as tokenize

    a, b = two_models
    tokens = tmp_path / "tokens"
    assert tokenize(["--audio_codec", str(a), "--dataset", str(clips), "--out_dir", str(tokens),
                     "--device", "cpu", "--num_readers", "1", "--text_column_name", "none"]) == 0
    capsys.readouterr()
    _, _, _ = _agree_cli(capsys, "agree", str(a), str(b), "--input", str(clips), "--json", str(tmp_path / "audio.json"))
    code, out, err = _agree_cli(capsys, "agree", str(a), str(b), "--input", str(tokens), "--json",
                                str(tmp_path / "tokens.json"))
    assert code == 0, err
    on_audio, on_tokens = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("audio", "tokens"))
    assert on_tokens["kind"] == "tokens" and on_tokens["clips"] == 3
    assert on_tokens["equal"] == on_audio["equal"] and on_tokens["total"] == on_audio["total"]
    code, _, err = _agree_cli(capsys, "agree", str(b), str(a), "--input", str(tokens))
    assert code == 2 and "tokenized by another model than model A" in _error_line(err)


# --------------------------------------------------------------------------------------
# kill -9 inside the discriminator warm-up
# --------------------------------------------------------------------------------------


def _ckpt(path):
    c = torch.load(path, weights_only=True)
    return c["step"], c["generator"], c["discriminator"], c["opt_d"], c["opt_g"]


@pytest.mark.slow
def test_kill9_inside_disc_warmup_resumes_exactly(tmp_path, pretrained, ljspeech_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    common = [sys.executable, str(ROOT / "train_snac.py"), *FAST, "--dataset_path", str(ljspeech_dir),
              "--init_from", str(pretrained), "--finetune", "full", "--disc_warmup_steps", "6", "--max_steps", "8",
              "--seed", "3", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=4",
              "--set", "optim.lr=1e-3"]
    ref = subprocess.run([*common, "--run_dir", str(tmp_path / "ref")], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]

    run = tmp_path / "killed"
    kill_at_checkpoint([*common, "--run_dir", str(run)], run, env)
    step_at_kill, gen_at_kill, *_ = _ckpt(run / "checkpoints" / "latest.pt")
    assert 2 <= step_at_kill < 6  # inside the warm-up
    start = snac.SNAC.from_pretrained(str(pretrained)).state_dict()
    assert all(torch.equal(gen_at_kill[k], start[k]) for k in start)  # the generator waited

    resumed = subprocess.run([*common, "--run_dir", str(run)], capture_output=True, text=True, env=env, cwd=ROOT,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {step_at_kill}" in resumed.stderr
    s1, g1, d1, od1, og1 = _ckpt(tmp_path / "ref" / "checkpoints" / "latest.pt")
    s2, g2, d2, od2, og2 = _ckpt(run / "checkpoints" / "latest.pt")
    assert s1 == s2 == 8
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k
    for k in d1:
        assert torch.equal(d1[k], d2[k]), k
    assert torch.equal(od1["state"][0]["exp_avg"], od2["state"][0]["exp_avg"])
    assert torch.equal(og1["state"][0]["exp_avg"], og2["state"][0]["exp_avg"])
    assert any(not torch.equal(g1[k], start[k]) for k in start)  # and it trained after the warm-up
    # the agreement after the resume compares with the codes saved before the kill
    assert _agreement(_val_rows(tmp_path / "ref")[-1]) == _agreement(_val_rows(run)[-1])
