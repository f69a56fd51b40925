"""Training loop: a real CLI run, kill -9 + resume equality, two-process DDP, NaN handling, learning."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import snac
import torch

from conftest import kill_at_checkpoint
from training.config import create_training_config
from training.checkpoint import load_checkpoint
from training.state import TrainingError, build_state
from training.train import evaluate, train_main, train_step

ROOT = Path(__file__).resolve().parents[1]

# Small, fast settings shared by the subprocess runs: 0.17 s crops, 2 clips per step.
FAST = ["--preset", "tiny", "--batch_size", "2", "--set", "data.segment_seconds=0.17",
        "--set", "data.val_segment_seconds=0.17", "--set", "data.val_items=2", "--set", "data.num_workers=0",
        "--set", "train.eval_batches=1", "--set", "train.log_every=1"]


def run_cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(ROOT / "train_snac.py"), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600, **kw)


@pytest.mark.slow
def test_three_step_run_writes_everything(tmp_path, ljspeech_dir):
    run = tmp_path / "run"
    r = run_cli([*FAST, "--dataset_path", str(ljspeech_dir), "--max_steps", "3", "--run_dir", str(run),
                 "--set", "train.checkpoint_every=2", "--set", "train.eval_every=2"])
    assert r.returncode == 0, r.stderr[-2000:]
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.glob("*.pt")) == ["best.pt", "latest.pt", "step_00000002.pt", "step_00000003.pt"]
    assert list((run / "logs").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss/mel" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in ("loss/mel", "loss/stft", "loss/adversarial", "loss/feature_matching", "loss/commitment",
                "loss/codebook", "loss/discriminator", "grad_norm/generator", "grad_norm/discriminator",
                "lr/generator", "codebook/usage_level0", "codebook/perplexity_level2",
                "perf/audio_seconds_per_second", "perf/data_wait_ms"):
        assert key in train_rows[-1], key
    assert train_rows[-1]["lr/generator"] == pytest.approx(6e-4 * 0.999994 ** 3)
    val_rows = [r for r in rows if "val/mel" in r]
    assert [r["step"] for r in val_rows] == [0, 2, 3]
    model = snac.SNAC.from_pretrained(str(run / "export"))
    ckpt = torch.load(ck / "latest.pt", weights_only=True)
    assert ckpt["step"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["generator"][k]), k
    assert (run / "config.yaml").is_file()


def _params(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt["step"], ckpt["generator"], ckpt["discriminator"], ckpt["opt_g"]


@pytest.mark.parametrize("replacement", [
    [],  # the defaults: k-means codebooks at step 0, dead-code restart
    ["--set", "train.code_replacement=usage", "--set", "train.dead_code_every=1"],  # usage EMA, a check every step
], ids=["defaults", "usage_replacement"])
@pytest.mark.slow
def test_kill9_and_resume_matches_uninterrupted_run(tmp_path, ljspeech_dir, replacement):
    common = [*FAST, "--dataset_path", str(ljspeech_dir), "--max_steps", "6", "--seed", "3",
              "--set", "train.checkpoint_every=2", "--set", "train.eval_every=3", *replacement]
    ref = run_cli([*common, "--run_dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert "codebooks initialised by k-means" in ref.stderr  # a fresh run sets its codebooks from data
    assert "encoder scaled to unit variance" in ref.stderr  # ... after the data-dependent init

    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    kill_at_checkpoint([sys.executable, str(ROOT / "train_snac.py"), *common, "--run_dir", str(run)], run, env)
    step_at_kill, *_ = _params(run / "checkpoints" / "latest.pt")
    assert 2 <= step_at_kill < 6

    resumed = run_cli([*common, "--run_dir", str(run)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and f"at step {step_at_kill}" in resumed.stderr
    assert "k-means" not in resumed.stderr and "unit variance" not in resumed.stderr  # a resumed one keeps its own
    s1, g1, d1, o1 = _params(tmp_path / "ref" / "checkpoints" / "latest.pt")
    s2, g2, d2, o2 = _params(run / "checkpoints" / "latest.pt")
    assert s1 == s2 == 6
    # Same seed, same data order, restored RNG and optimizer moments: bit-identical on CPU.
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k
    for k in d1:
        assert torch.equal(d1[k], d2[k]), k
    assert torch.equal(o1["state"][0]["exp_avg"], o2["state"][0]["exp_avg"])


@pytest.mark.slow
def test_no_resume_keeps_previous_checkpoints(tmp_path, ljspeech_dir):
    args = [*FAST, "--dataset_path", str(ljspeech_dir), "--max_steps", "1", "--run_dir", str(tmp_path / "r")]
    assert run_cli(args).returncode == 0
    r = run_cli([*args, "--no-resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "r" / "checkpoints.prev1" / "latest.pt").is_file()
    assert (tmp_path / "r" / "checkpoints" / "latest.pt").is_file()


@pytest.mark.slow
def test_two_process_gloo_ranks_stay_identical(tmp_path, ljspeech_dir):
    """Two real gloo ranks, dead codes restarted at every step (the hard case for codebook sync):
    each rank saves its own final state and the test compares them tensor by tensor."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    probe = tmp_path / "probe"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(ROOT / "tests" / "ddp_rank_probe.py"), str(probe),
           *FAST, "--dataset_path", str(ljspeech_dir), "--max_steps", "4",
           "--run_dir", str(tmp_path / "ddp"), "--device", "cpu",
           "--set", "train.dead_code_steps=1", "--set", "train.dead_code_every=1"]  # restart at every step: the hard case
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    violations = "".join(p.read_text() for p in probe.glob("device_violations_*.txt"))
    assert not violations, violations  # every collective got tensors on the training device
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(probe / f"rank{i}.pt", weights_only=True) for i in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 4
    for part in ("generator", "discriminator"):
        a, b = ranks[0][part], ranks[1][part]
        assert sorted(a) == sorted(b)
        for name in a:
            assert torch.equal(a[name], b[name]), f"{part}.{name} differs between ranks"
    assert any("codebook" in name for name in ranks[0]["generator"])  # codebooks are among the compared
    for calls in (snap["collective_calls"] for snap in ranks):
        assert calls.get("all_reduce", 0) > 0 and calls.get("broadcast", 0) > 0, calls  # the check saw traffic
    rows = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert sum(row.get("codebook/restarted_level0", 0) for row in rows) > 0  # restarts really happened
    # The run's own consistency report agrees with what the test measured.
    report = json.loads(next(l for l in r.stderr.splitlines() if l.startswith('{"ddp/')))
    assert report and all(v == 0.0 for v in report.values()), report


def test_rank_probe_flags_a_tensor_off_the_training_device(tmp_path):
    """The probe's device check itself can fail: a CPU tensor on a CUDA run, or a wrong barrier GPU."""
    sys.path.insert(0, str(ROOT / "tests"))
    from ddp_rank_probe import _check_call

    log = tmp_path / "violations.txt"
    _check_call("all_reduce", (torch.zeros(2),), {}, torch.device("cpu"), log)
    with pytest.raises(AssertionError, match="all_reduce: tensor"):
        _check_call("all_reduce", (torch.zeros(2),), {}, torch.device("cuda", 0), log)
    with pytest.raises(AssertionError, match="device_ids"):
        _check_call("barrier", (), {"device_ids": [1]}, torch.device("cuda", 0), log)
    assert len(log.read_text().splitlines()) == 2


def _tiny_cfg(tmp_path, **overrides):
    base = {"data.segment_seconds": 0.17, "data.num_workers": 0, "train.run_dir": str(tmp_path / "run"),
            "train.dead_code_steps": 0}
    return create_training_config(preset="tiny", batch_size=2, overrides={**base, **overrides})


@pytest.mark.parametrize("before,after", [(0, 8), (8, 0), (2, 8)])
def test_resume_that_changes_the_warmup_follows_the_new_schedule(tmp_path, before, after):
    """A resume may change ``optim.warmup_steps``, which can swap the schedule's class (ExponentialLR
    without a warm-up, LambdaLR with one) under a checkpoint saved by the other. The resumed run's
    rates must be those of a run that had the new value from the start (built and stepped here),
    which is also ``lr x min(1, (step + 1) / warmup) x lr_decay ** step``."""
    from training.checkpoint import save_checkpoint
    from training.state import apply_optim_config

    cpu = torch.device("cpu")
    n = _tiny_cfg(tmp_path).segment_length()
    batches = [{"audio": 0.1 * torch.randn(2, 1, n)} for _ in range(4)]
    old = build_state(_tiny_cfg(tmp_path, **{"optim.warmup_steps": before}), cpu)
    for b in batches[:3]:
        train_step(old, b)
    path = save_checkpoint(old)
    cfg = _tiny_cfg(tmp_path, **{"optim.warmup_steps": after})
    resumed, uninterrupted = build_state(cfg, cpu), build_state(cfg, cpu)
    load_checkpoint(resumed, path)
    apply_optim_config(resumed)
    for b in batches[:3]:
        train_step(uninterrupted, b)
    o = cfg.optim

    def rate(step):
        return o.lr * min(1.0, (step + 1) / after if after else 1.0) * o.lr_decay ** step

    for step in (3, 4):
        for state in (resumed, uninterrupted):
            for opt in (state.opt_g, state.opt_d):
                assert state.step == step
                assert opt.param_groups[0]["lr"] == pytest.approx(rate(step), rel=1e-12), (state is resumed, step)
        for state in (resumed, uninterrupted):
            train_step(state, batches[3])


@pytest.mark.parametrize("fused", [True, False])  # skip decided on the device / on the host
def test_nonfinite_batch_is_skipped_and_counted(tmp_path, fused):
    cfg = _tiny_cfg(tmp_path, **{"optim.fused": fused})
    state = build_state(cfg, torch.device("cpu"))
    before = {k: v.clone() for k, v in state.generator.state_dict().items()}
    bad = torch.zeros(2, 1, cfg.segment_length())
    bad[0, 0, 100] = float("nan")
    before_d = {k: v.clone() for k, v in state.discriminator.state_dict().items()}
    metrics = train_step(state, {"audio": bad})
    state.settle_skips()
    assert float(metrics["train/skipped_steps"]) == 1 and state.nonfinite_consecutive == 1
    for k, v in state.generator.state_dict().items():
        assert torch.equal(v, before[k]), k  # no update from the NaN batch
    for k, v in state.discriminator.state_dict().items():
        assert torch.equal(v, before_d[k]), k
    assert bool(state.opt_g.state) == fused  # fused: the step ran on the device and held back
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in state.opt_g.state.values())
    good = 0.1 * torch.randn(2, 1, cfg.segment_length())
    train_step(state, {"audio": good})
    state.settle_skips()
    assert state.nonfinite_consecutive == 0 and state.nonfinite_total == 1
    assert any(not torch.equal(v, before[k]) for k, v in state.generator.state_dict().items())


class _Loader:
    """Two good batches, then NaN forever."""

    def __init__(self, n):
        self.n, self.i = n, 0

    def __next__(self):
        self.i += 1
        x = 0.1 * torch.randn(2, 1, self.n)
        if self.i > 2:
            x[:, :, 5] = float("nan")
        return {"audio": x}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def test_repeated_nonfinite_steps_stop_cleanly(tmp_path, monkeypatch):
    # no data-dependent init: it would consume the loader's two good batches before step 1
    cfg = _tiny_cfg(tmp_path, **{"train.max_nonfinite_steps": 3, "train.checkpoint_every": 1,
                                 "train.max_steps": 50, "train.codebook_init": "random",
                                 "train.data_dependent_init": False})
    val = [{"audio": 0.1 * torch.randn(2, 1, cfg.segment_length())}]
    monkeypatch.setattr("training.train.setup_dataset", lambda c, r, w: (_Loader(cfg.segment_length()), val))
    with pytest.raises(TrainingError, match="3 consecutive steps had non-finite losses"):
        train_main(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 2  # the last good checkpoint, intact and loadable
    assert all(torch.isfinite(v).all() for v in ckpt["generator"].values())


def test_evaluation_leaves_the_training_random_stream_alone(tmp_path, ljspeech_dir):
    """Evaluating (which runs the decoder's noise blocks) neither consumes the training RNG nor
    depends on it: a run's steps are the same whenever evaluation happens."""
    from training.audio import load_audio

    cfg = _tiny_cfg(tmp_path)
    clip = load_audio(ljspeech_dir / "wavs" / "LJ001-0002.flac", 24000)[:, :8192]
    state = build_state(cfg, torch.device("cpu"))
    torch.manual_seed(123)
    first = evaluate(state, [{"audio": clip.unsqueeze(0)}])
    after = torch.rand(4)
    torch.manual_seed(123)
    expected = torch.rand(4)
    assert torch.equal(after, expected)  # the training stream did not move
    torch.manual_seed(999)
    second = evaluate(state, [{"audio": clip.unsqueeze(0)}])
    assert first["val/mel"] == second["val/mel"]  # and evaluation does not depend on it
    assert torch.equal(first["samples"][1], second["samples"][1])


@pytest.mark.slow
def test_overfitting_one_real_clip_lowers_mel_distance(tmp_path, ljspeech_dir):
    from training.audio import load_audio

    torch.manual_seed(0)
    cfg = _tiny_cfg(tmp_path, **{"train.adversarial_start_step": 10**9, "optim.lr": 3e-3})
    clip = load_audio(ljspeech_dir / "wavs" / "LJ001-0001.flac", 24000)[:, 24000:24000 + 8192]
    batch = {"audio": clip.unsqueeze(0)}
    state = build_state(cfg, torch.device("cpu"))
    start = evaluate(state, [batch])["val/mel"]
    for _ in range(150):
        train_step(state, batch)
    end = evaluate(state, [batch])["val/mel"]
    assert end < 0.6 * start, (start, end)


@pytest.mark.parametrize("args,message", [
    (["--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["--set", "optim.lr=fast"], "'optim.lr' expects float"),
    (["--preset", "99khz"], "invalid choice: '99khz'"),
    (["--batch_size", "two"], "invalid int value: 'two'"),
    (["--config", "/nonexistent/c.yaml"], "config file not found"),
    (["--dataset_path", "/nonexistent/folder", "--preset", "tiny"], "nonexistent"),
    (["--init_from", "/nonexistent/model", "--dataset_path", "."], "model not found"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, message):
    r = run_cli([*args, "--run_dir", str(tmp_path / "r"), "--max_steps", "1"])
    assert r.returncode == 2, r.stderr[-1500:]
    lines = [l for l in r.stderr.splitlines() if l.strip() and "Warning" not in l and "warnings.warn" not in l]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_finetune_from_exported_model_with_frozen_encoder(tmp_path):
    from training.config import model_preset
    from training.model import build_generator
    from training.hub import export_snac

    torch.manual_seed(0)
    pretrained = build_generator(model_preset("tiny"))
    export_snac(pretrained, model_preset("tiny"), tmp_path / "pretrained")
    cfg = _tiny_cfg(tmp_path, **{"train.init_from": str(tmp_path / "pretrained"), "train.freeze_encoder": True})
    state = build_state(cfg, torch.device("cpu"))
    start = {k: v.clone() for k, v in state.generator.state_dict().items()}
    assert all(torch.equal(v, pretrained.state_dict()[k]) for k, v in start.items())  # weights really loaded
    for _ in range(2):
        train_step(state, {"audio": 0.1 * torch.randn(2, 1, cfg.segment_length())})
    after = state.generator.state_dict()
    assert all(torch.equal(after[k], start[k]) for k in start if k.startswith("encoder."))
    assert any(not torch.equal(after[k], start[k]) for k in start if k.startswith("decoder."))
    assert any(not torch.equal(after[k], start[k]) for k in start if k.startswith("quantizer."))


@pytest.mark.slow
def test_finetune_run_resumes_with_the_pretrained_architecture(tmp_path, ljspeech_dir):
    from training.config import ModelConfig
    from training.model import build_generator
    from training.hub import export_snac

    # A pretrained model whose architecture differs from the --preset given on the command line.
    cfg = ModelConfig(encoder_dim=8, decoder_dim=32, codebook_size=128)
    export_snac(build_generator(cfg), cfg, tmp_path / "pretrained")
    args = [*FAST, "--dataset_path", str(ljspeech_dir), "--init_from", str(tmp_path / "pretrained"),
            "--run_dir", str(tmp_path / "ft")]
    assert run_cli([*args, "--max_steps", "1"]).returncode == 0
    r = run_cli([*args, "--max_steps", "2"])
    assert r.returncode == 0, r.stderr[-1500:]
    assert "at step 1" in r.stderr
    ckpt = torch.load(tmp_path / "ft" / "checkpoints" / "latest.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["model"]["decoder_dim"] == 32


# --------------------------------------------------------------------------------------
# GPU-readiness checked on CPU: no device reads between log steps, compile, per-rank RNG
# --------------------------------------------------------------------------------------

# Every Python-level way a tensor's value reaches the host (each one a sync on CUDA).
_DEVICE_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


class _DeviceReadGuard:
    """Makes the reads above raise while ``active`` (monkeypatched onto torch.Tensor)."""

    def __init__(self, monkeypatch):
        self.active, self.caught = False, []
        for name in _DEVICE_READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, original):
        def guarded(tensor, *args, **kwargs):
            if self.active:
                self.caught.append(name)
                raise AssertionError(f"Tensor.{name}() during a non-logging training step")
            return original(tensor, *args, **kwargs)
        return guarded


class _GuardingLoader(_Loader):
    """Random batches; arms the guard for the steps (batch fetch to next fetch) that log nothing."""

    def __init__(self, n, guard, quiet_steps):
        super().__init__(n)
        self.guard, self.quiet_steps = guard, quiet_steps

    def __next__(self):
        self.guard.active = False
        self.i += 1
        batch = {"audio": 0.1 * torch.randn(2, 1, self.n)}
        self.guard.active = self.i in self.quiet_steps
        return batch


@pytest.mark.slow  # ~9 s: a training run
def test_non_logging_steps_never_read_the_device(tmp_path, monkeypatch):
    cfg = _tiny_cfg(tmp_path, **{"train.max_steps": 6, "train.log_every": 3, "train.eval_every": 100,
                                 "train.checkpoint_every": 100, "train.export_on_end": False})
    guard = _DeviceReadGuard(monkeypatch)
    loader = _GuardingLoader(cfg.segment_length(), guard, quiet_steps={1, 2, 4, 5})
    val = [{"audio": 0.1 * torch.randn(2, 1, cfg.segment_length())}]
    monkeypatch.setattr("training.train.setup_dataset", lambda c, r, w: (loader, val))
    summary = train_main(cfg)
    guard.active = False
    assert guard.caught == [] and summary["step"] == 6
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss/mel" in r]
    assert [r["step"] for r in logged] == [3, 6]  # the means were still read back at the log steps
    assert all(math.isfinite(r["loss/mel"]) and r["perf/step_ms"] > 0 for r in logged)


def test_generator_pass_takes_real_features_without_autograd(tmp_path):
    state = build_state(_tiny_cfg(tmp_path), torch.device("cpu"))
    disc, calls = state.disc_gen, []

    def spy(x):
        calls.append((x.requires_grad, torch.is_grad_enabled()))
        return disc(x)

    state.disc_gen = spy
    train_step(state, {"audio": 0.1 * torch.randn(2, 1, state.cfg.segment_length())})
    # real half: no graph kept; fake half: gradients flow to the generator
    assert calls == [(False, False), (True, True)]


def test_generator_update_leaves_discriminator_gradients_alone(tmp_path):
    state = build_state(_tiny_cfg(tmp_path), torch.device("cpu"))
    batch = {"audio": 0.1 * torch.randn(2, 1, state.cfg.segment_length())}
    grads = {}
    for name, p in state.discriminator.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, grads.get(name, 0) + 1))
    train_step(state, batch)
    # exactly one accumulation per discriminator parameter: its own step, none from the G backward
    assert grads and set(grads.values()) == {1}


@pytest.mark.slow
def test_compiled_step_matches_eager_over_three_steps(tmp_path):
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    n = _tiny_cfg(tmp_path).segment_length()
    batches = [{"audio": 0.1 * torch.randn(2, 1, n, generator=g)} for _ in range(3)]
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        state = build_state(_tiny_cfg(tmp_path, **{"train.compile": compiled}), torch.device("cpu"))
        torch.manual_seed(1)  # the decoder's noise blocks draw the same noise in both runs
        with torch._inductor.config.patch(fallback_random=True):
            losses[compiled] = [{k: float(v) for k, v in train_step(state, b).items() if k.startswith("loss/")}
                                for b in batches]
        if compiled:
            assert state.disc_gen is state.disc_step  # one compiled discriminator for both passes
    for step, (eager, comp) in enumerate(zip(losses[False], losses[True])):
        for key in eager:
            assert comp[key] == pytest.approx(eager[key], rel=2e-3, abs=1e-5), (step, key)


RNG_PROBE = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch, torch.distributed as dist
from training.config import create_training_config
from training.train import train_main
cfg = create_training_config(preset="tiny", dataset_path=sys.argv[2], batch_size=2, overrides={
    "data.segment_seconds": 0.17, "data.val_segment_seconds": 0.17, "data.val_items": 2, "data.num_workers": 0,
    "train.eval_batches": 1, "train.max_steps": 2, "train.checkpoint_every": 2, "train.device": "cpu",
    "train.dead_code_steps": 0, "train.export_on_end": False, "train.run_dir": sys.argv[3]})
train_main(cfg)
# The next draws of this rank's generator: equal only if its RNG state is exactly restored.
draws = torch.rand(4).tolist()
with open(sys.argv[4] + "." + os.environ["RANK"], "w") as f:
    json.dump(draws, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_each_rank_gets_its_own_rng_state_back_on_resume(tmp_path, ljspeech_dir):
    """2 gloo ranks: after a resume, each rank continues its own random stream (not rank 0's)."""
    probe = tmp_path / "probe.py"
    probe.write_text(RNG_PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def launch(tag):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
               str(probe), str(ROOT), str(ljspeech_dir), str(tmp_path / "run"), str(tmp_path / tag)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return [json.loads((tmp_path / f"{tag}.{rank}").read_text()) for rank in (0, 1)]

    trained = launch("trained")   # 2 steps, checkpoint at step 2, then draw
    resumed = launch("resumed")   # resumes at step 2 = max_steps: restores the checkpoint, then draws
    assert trained[0] != trained[1]  # ranks have their own streams
    assert resumed == trained  # ... and each rank gets its own back
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert len(ckpt["rng_ranks"]) == 2
