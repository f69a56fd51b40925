"""Training forward: codebooks get gradients, codes equal SNAC.encode, export round-trips."""

import json

import pytest
import snac
import torch

from training.config import model_preset
from training.model import DeadCodeRestarter, build_generator, train_forward
from training.hub import ModelLoadError, export_snac, load_generator


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return build_generator(model_preset("tiny"))


def audio(b=2, t=6000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(b, 1, t, generator=g)


def codebook_grads(model):
    return [vq.codebook.weight.grad for vq in model.quantizer.quantizers]


def test_train_forward_trains_codebooks_and_snac_forward_does_not(tiny):
    x = audio()
    out = train_forward(tiny, x)
    (out.audio.abs().mean() + out.commitment_loss + out.codebook_loss).backward()
    grads = codebook_grads(tiny)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)

    tiny.zero_grad(set_to_none=True)
    recon, _ = tiny(x)  # snac's own forward: straight-through only, no VQ losses
    recon.abs().mean().backward()
    assert all(g is None or g.abs().sum() == 0 for g in codebook_grads(tiny))
    # ...while the encoder does get gradient there, so the difference is the codebook alone.
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny.encoder.parameters())


def test_train_forward_outputs(tiny):
    x = audio(t=5000)
    out = train_forward(tiny, x)
    assert out.audio.shape == x.shape
    # 5000 samples -> padded to 6144 = 12 frames of 512 -> strides 4, 2, 1
    assert [tuple(c.shape) for c in out.codes] == [(2, 3), (2, 6), (2, 12)]
    assert [z.shape[1] for z in out.latents] == [8, 8, 8]
    assert out.commitment_loss > 0 and torch.allclose(out.commitment_loss, out.codebook_loss)
    assert out.codebook_usage.shape == (3,) and (out.codebook_usage > 0).all()
    assert (out.codebook_perplexity >= 1).all()


@pytest.mark.parametrize("preset", ["tiny", "24khz"])
def test_codes_equal_snac_encode(preset):
    torch.manual_seed(1)
    model = build_generator(model_preset(preset)).eval()
    x = audio(b=2, t=9000, seed=3)
    with torch.no_grad():
        ours = train_forward(model, x).codes
        ref = model.encode(x)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_export_roundtrip_identical(tiny, tmp_path):
    tiny.eval()
    out_dir = export_snac(tiny, model_preset("tiny"), tmp_path / "exported")
    assert json.loads((out_dir / "config.json").read_text())["encoder_dim"] == 8
    loaded = snac.SNAC.from_pretrained(str(out_dir))
    x = audio(t=4096)
    with torch.no_grad():  # the decoder's noise blocks draw from the global RNG: same seed for both
        torch.manual_seed(5)
        a, ca = tiny(x)
        torch.manual_seed(5)
        b, cb = loaded(x)
    assert torch.equal(a, b) and all(torch.equal(p, q) for p, q in zip(ca, cb))
    with pytest.raises(ModelLoadError, match="already holds"):
        export_snac(tiny, model_preset("tiny"), out_dir)


def test_load_generator_sources(tiny, tmp_path):
    cfg = model_preset("tiny")
    d = export_snac(tiny, cfg, tmp_path / "m")
    model, loaded_cfg = load_generator(d)
    assert loaded_cfg == cfg and not model.training
    ckpt = tmp_path / "step.pt"
    torch.save({"generator": tiny.state_dict(), "config": {"model": cfg.snac_kwargs()}}, ckpt)
    model2, _ = load_generator(ckpt)
    for (k, v), (_, w) in zip(tiny.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(v, w), k


def test_load_generator_errors(tmp_path, monkeypatch):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="missing pytorch_model.bin"):
        load_generator(tmp_path / "half")
    with pytest.raises(ModelLoadError, match="not found"):
        load_generator(tmp_path / "nope" / "x.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_generator(bad)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_generator("someone/not_cached_snac")


@pytest.mark.parametrize("shape,match", [((2, 100), r"\(B, 1, T\)"), ((2, 2, 100), "mono"), ((1, 1, 0), "T = 0")])
def test_bad_shapes(tiny, shape, match):
    with pytest.raises(ValueError, match=match):
        train_forward(tiny, torch.zeros(shape))


def test_wrong_sample_rate(tiny):
    with pytest.raises(ValueError, match="16000 Hz does not match the model's 24000 Hz"):
        train_forward(tiny, audio(), sample_rate=16000)


def _rows(z_e):
    return z_e.transpose(1, 2).reshape(-1, z_e.shape[1])


def test_dead_code_restart_reseeds_only_unused_codes_with_distinct_candidates(tiny):
    restarter = DeadCodeRestarter(tiny, threshold=2, every=2, seed=0, noise=0.0)
    out = train_forward(tiny, audio(b=2, t=20480))
    before = [vq.codebook.weight.detach().clone() for vq in tiny.quantizer.quantizers]
    assert restarter.step(1, out.codes, out.latents) == [0, 0, 0]  # not a check step
    assert all(torch.equal(vq.codebook.weight, b) for vq, b in zip(tiny.quantizer.quantizers, before))
    counts = restarter.step(2, out.codes, out.latents)  # first check: every code unused so far is dead
    for level, vq in enumerate(tiny.quantizer.quantizers):
        used = torch.unique(out.codes[level])
        unused = torch.ones(vq.codebook_size, dtype=torch.bool)
        unused[used] = False
        cands = _rows(out.latents[level])
        # the buffer holds both steps' latents (the same batch twice): 2x candidates, half distinct
        assert counts[level] == min(int(unused.sum()), 2 * len(cands))
        w = vq.codebook.weight.detach()
        assert torch.equal(w[used], before[level][used])  # codes in use untouched
        changed = (w != before[level]).any(1)
        assert int(changed.sum()) == counts[level] and not changed[used].any()
        # every re-seeded entry is an encoder output of this level...
        match = (w[changed][:, None, :] == cands[None]).all(-1)
        assert match.any(-1).all()
    # ...and drawn without replacement: with a buffer of distinct rows no two restarts share one
    fresh = DeadCodeRestarter(tiny, threshold=1, every=1, seed=3, noise=0.0)
    latents = [torch.randn(1, z.shape[1], 300) for z in out.latents]
    codes = [torch.zeros(1, 300, dtype=torch.long) for _ in out.codes]
    counts = fresh.step(1, codes, latents)
    for level, vq in enumerate(tiny.quantizer.quantizers):
        assert counts[level] == 255  # all but code 0 (used)
        new = vq.codebook.weight.detach()[1:]
        assert len(torch.unique(new, dim=0)) == 255
    state = restarter.state_dict()
    other = DeadCodeRestarter(tiny, threshold=2, every=2)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.last_used, restarter.last_used))
    assert all(torch.equal(a, b) for a, b in zip(other.buffers, restarter.buffers))


# --------------------------------------------------------------------------------------
# GPU-readiness on CPU: compile without graph breaks, bf16 that keeps the codes, Snake dtype
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tiny", "tiny_with_attention"])
def test_train_forward_compiles_to_one_graph(arch):
    import torch._dynamo

    from training.config import ModelConfig

    # The 32/44 kHz layout (local attention, 4 levels) at tiny widths.
    cfg = model_preset("tiny") if arch == "tiny" else ModelConfig(
        sampling_rate=44100, encoder_dim=8, encoder_rates=(2, 3, 8, 8), decoder_dim=64, decoder_rates=(8, 8, 3, 2),
        attn_window_size=4, codebook_size=256, vq_strides=(8, 4, 2, 1))
    torch.manual_seed(0)
    model = build_generator(cfg)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(train_forward)(model, audio(b=1, t=12288))
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


def _speech(ljspeech_dir, seconds=1.5):
    from training.audio import load_audio

    clip = load_audio(ljspeech_dir / "wavs" / "LJ001-0001.flac", 24000)  # (1, T) at 24 kHz
    return clip[:, 6000:6000 + int(seconds * 24000)].unsqueeze(0)


def test_bf16_autocast_codes_equal_fp32_snac_encode_on_real_speech(ljspeech_dir):
    """Encoder + code search run in fp32 inside autocast; the waveform comes out fp32."""
    cfg = model_preset("24khz")
    torch.manual_seed(1)
    model = build_generator(cfg)
    reference = snac.SNAC(**cfg.snac_kwargs())  # snac's own modules (its Snake1d), same weights
    reference.load_state_dict(model.state_dict())
    x = _speech(ljspeech_dir)
    with torch.no_grad():
        expected = reference.encode(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = train_forward(model, x)
    assert out.audio.dtype == torch.float32 and out.audio.shape == x.shape
    for level, (ours, ref) in enumerate(zip(out.codes, expected)):
        assert torch.equal(ours, ref), f"level {level}: {(ours != ref).float().mean():.1%} of codes differ"


def test_decoder_body_follows_autocast_and_output_conv_is_fp32(tiny):
    """bf16 where the FLOPs are, fp32 for the last conv + tanh."""
    seen = {}
    layers = tiny.decoder.model
    hooks = [layers[i].register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o.dtype))
             for k, i in (("body", 1), ("out_conv", -2))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train_forward(tiny, audio())
    for h in hooks:
        h.remove()
    assert seen == {"body": torch.bfloat16, "out_conv": torch.float32}


def test_snake_keeps_snac_math_keys_and_the_activation_dtype():
    from training.model import Snake

    torch.manual_seed(0)
    theirs = snac.layers.Snake1d(16)
    with torch.no_grad():
        theirs.alpha.uniform_(0.5, 2.0)
    ours = Snake(theirs.alpha)
    x = torch.randn(2, 16, 300)
    assert torch.equal(ours(x), theirs(x))  # fp32: bit-identical to snac's
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["alpha"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert theirs(x.bfloat16()).dtype == torch.float32  # snac's promotes to fp32 ...
        y = ours(x.bfloat16())
    assert y.dtype == torch.bfloat16  # ... ours stays in the activation's dtype
    assert torch.allclose(y.float(), theirs(x), atol=0.05, rtol=0.02)


def test_generator_uses_dtype_following_snake_and_loads_in_snac(tiny, tmp_path):
    from training.model import Snake

    assert not any(isinstance(m, snac.layers.Snake1d) for m in tiny.modules())
    assert any(isinstance(m, Snake) for m in tiny.modules())
    plain = snac.SNAC(**model_preset("tiny").snac_kwargs())
    assert list(tiny.state_dict()) == list(plain.state_dict())


def test_codebook_stats_equal_bincount_reference():
    from training.model import codebook_stats

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 40, (3, 50), generator=g)  # 40 of 64 entries at most
    usage, perplexity = codebook_stats(codes, 64)
    counts = torch.bincount(codes.reshape(-1), minlength=64).double()
    p = counts[counts > 0] / counts.sum()
    assert usage.item() == pytest.approx((counts > 0).double().mean().item())
    assert perplexity.item() == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-5)



def test_dead_code_restart_adds_a_little_noise(tiny):
    restarter = DeadCodeRestarter(tiny, threshold=1, every=1, seed=0, noise=0.01)
    latents = [torch.randn(1, 8, 300) for _ in range(3)]
    codes = [torch.zeros(1, 300, dtype=torch.long) for _ in range(3)]
    restarter.step(1, codes, latents)
    for level, vq in enumerate(tiny.quantizer.quantizers):
        new, cands = vq.codebook.weight.detach()[1:], _rows(latents[level])
        nearest = torch.cdist(new, cands).min(1).values
        rms = cands.pow(2).mean().sqrt()
        assert (nearest > 0).all() and (nearest < 0.1 * rms).all()  # near a candidate, never on it


def test_dead_code_bookkeeping_never_syncs_the_host_off_check_steps(tiny, monkeypatch):
    """Off check steps the restarter must not read a tensor on the host nor call a collective;
    check steps run the collectives (here a fake two-rank world: every rank holds the same data)."""
    import training.model as model_mod

    calls = []
    monkeypatch.setattr(model_mod, "_distributed", lambda: True)
    monkeypatch.setattr(model_mod.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(model_mod.dist, "all_reduce", lambda t, op=None: calls.append("all_reduce"))

    def fake_all_gather(outs, t):
        calls.append("all_gather")
        for o in outs:
            o.copy_(t)
    monkeypatch.setattr(model_mod.dist, "all_gather", fake_all_gather)
    restarter = DeadCodeRestarter(tiny, threshold=2, every=3, seed=0)
    out = train_forward(tiny, audio(b=2, t=20480))

    def forbidden(*_a, **_k):
        raise AssertionError("host sync off a check step")
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "cpu", "nonzero", "__bool__", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, name, forbidden)
        assert restarter.step(1, out.codes, out.latents) == [0, 0, 0]
        assert restarter.step(2, out.codes, out.latents) == [0, 0, 0]
    assert calls == []
    counts = restarter.step(3, out.codes, out.latents)
    assert calls == ["all_reduce", "all_gather", "all_gather"] * 3
    # the fake world doubled the candidates: level 0 has 20 per step x 3 steps x 2 ranks
    assert counts[0] == min(120, 256 - len(torch.unique(out.codes[0])))


def test_dead_code_restart_draws_from_every_rank_and_ranks_stay_identical(tmp_path):
    """Real two-process gloo run: candidates of both ranks are gathered, every rank writes the
    same (bit-identical) codebooks, and no candidate is used twice."""
    from conftest import run_two_ranks

    r0, r1 = run_two_ranks("ddp_restart_worker.py", tmp_path, port=29531)
    assert r0["counts"] == r1["counts"] == [70, 70, 70]  # 40 + 30 candidates for 255 dead codes
    for level in range(3):
        w0, w1 = r0["weights"][level], r1["weights"][level]
        assert torch.equal(w0, w1)
        new = w0[(w0 != r0["initial"][level]).any(1)]
        assert len(new) == 70
        from_rank0, from_rank1 = (new[:, 0] > 2.5).sum(), (new[:, 0] < -2.5).sum()
        assert (int(from_rank0), int(from_rank1)) == (40, 30)  # every candidate of both ranks, once
        cands = torch.cat([_rows(r0["latents"][level]), _rows(r1["latents"][level])])
        nearest = torch.cdist(new, cands).argmin(1)
        assert len(torch.unique(nearest)) == 70


def test_code_used_on_one_rank_only_is_restarted_on_no_rank(tmp_path):
    """Real two-process gloo run: code 1 is used by rank 0 only. Usage is MAX-reduced over ranks,
    so it is alive everywhere: neither rank restarts it, and both write bit-identical codebooks
    (without the reduction rank 1 would restart it alone, and the ranks would diverge)."""
    from conftest import run_two_ranks

    r0, r1 = run_two_ranks("ddp_restart_worker.py", tmp_path, "one_rank_code", port=29532)
    assert r0["counts"] == r1["counts"] == [254, 254, 254]  # every code but 0 and 1
    for level in range(3):
        w0, w1, initial = r0["weights"][level], r1["weights"][level], r0["initial"][level]
        assert torch.equal(w0, w1)
        assert torch.equal(w0[:2], initial[:2]) and torch.equal(w1[:2], initial[:2])
        assert (w0[2:] != initial[2:]).any(1).all()

