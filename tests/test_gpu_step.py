"""On a CUDA device: non-logging training steps never synchronize with the host, and bf16
training codes equal fp32 ``SNAC.encode`` codes. Skipped without CUDA."""

import math

import pytest
import snac
import torch

from training.config import create_training_config, model_preset
from training.model import build_generator, train_forward
from training.state import build_state
from training.train import Averager, train_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cfg(tmp_path, **overrides):
    base = {"data.segment_seconds": 0.17, "data.num_workers": 0, "train.run_dir": str(tmp_path / "run"),
            "train.dead_code_steps": 0, "train.device": "cuda"}
    return create_training_config(preset="tiny", batch_size=2, overrides={**base, **overrides})


@pytest.mark.parametrize("precision,compiled", [("fp32", False), ("bf16", False), ("bf16", True)])
def test_non_logging_steps_do_not_synchronize(tmp_path, precision, compiled):
    cfg = _cfg(tmp_path, **{"train.precision": precision, "train.compile": compiled})
    state = build_state(cfg, torch.device("cuda"))
    batches = [{"audio": 0.1 * torch.randn(2, 1, cfg.segment_length(), device="cuda")} for _ in range(5)]
    averager = Averager()
    for batch in batches[:2]:  # warm-up: optimizer state, cuDNN autotuning, compilation
        averager.add(train_step(state, batch))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[2:]:
            averager.add(train_step(state, batch))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    means = averager.pop()  # the log step: one read-back
    state.settle_skips()
    assert math.isfinite(means["loss/mel"]) and state.nonfinite_total == 0


def test_bf16_codes_equal_fp32_encode_on_cuda(ljspeech_dir):
    from training.audio import load_audio

    torch.backends.cudnn.benchmark = False  # same convolution algorithms for both passes
    cfg = model_preset("24khz")
    torch.manual_seed(1)
    model = build_generator(cfg).cuda()
    reference = snac.SNAC(**cfg.snac_kwargs()).cuda()
    reference.load_state_dict(model.state_dict())
    x = load_audio(ljspeech_dir / "wavs" / "LJ001-0001.flac", 24000)[:, :48000].unsqueeze(0).cuda()
    with torch.no_grad():
        expected = reference.encode(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = train_forward(model, x)
    assert out.audio.dtype == torch.float32
    for ours, ref in zip(out.codes, expected):
        assert torch.equal(ours, ref)
