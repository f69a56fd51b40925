"""Initialisation, data-driven codebooks, usage-EMA replacement, the rotation trick and VQ health.

The step-0 tests measure on real speech (ljspeech-mini crops at -16 dB, what training sees) and
take their codes from ``snac.SNAC.encode``, not from the training forward under test.
"""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from training.audio import list_audio_files, load_audio, normalize_loudness
from training.codebooks import (
    UsageReplacer, VQHealth, collapse_warnings, init_codebooks_from_data, init_encoder_from_data, kmeans_codebook,
    mean_fraction,
)
from training.config import ConfigError, create_training_config, model_preset
from training.model import build_generator, init_generator, rotate_onto, train_forward

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def speech(ljspeech_dir):
    """(12, 1, 16384) real speech crops, loudness-normalised as the training data loader does."""
    files = list_audio_files(ljspeech_dir)[:12]
    return torch.stack([normalize_loudness(load_audio(f, 24000)[..., :16384], -16.0) for f in files])


def _step0(init: str, speech):
    torch.manual_seed(0)
    model = build_generator(model_preset("tiny"), init=init).eval()
    with torch.no_grad():
        codes = model.encode(speech)  # snac's own encode: the reference codes
        z = model.encoder(speech)
    return model, codes, z


def test_snac_default_init_collapses_and_dac_init_does_not(speech):
    """At step 0, PyTorch's default conv biases make the encoder output almost one vector; with
    DAC's zero biases the latents vary and the code search spreads over many codes."""
    _, codes_snac, z_snac = _step0("snac", speech)
    _, codes_dac, z_dac = _step0("dac", speech)
    assert mean_fraction(z_snac) > 0.9  # measured 0.95
    assert mean_fraction(z_dac) < 0.1  # measured 0.014
    distinct_snac = [len(torch.unique(c)) for c in codes_snac]
    distinct_dac = [len(torch.unique(c)) for c in codes_dac]
    assert max(distinct_snac) <= 12  # measured 4 / 4 / 9 of 96 / 192 / 384 frames
    assert min(distinct_dac) >= 40  # measured 76 / 54 / 54
    for level in range(3):
        assert distinct_dac[level] >= 5 * distinct_snac[level]


def test_init_zeroes_conv_biases_only_and_loaded_weights_are_untouched(tmp_path):
    torch.manual_seed(1)
    default = build_generator(model_preset("tiny"), init="snac")
    torch.manual_seed(1)
    dac = build_generator(model_preset("tiny"), init="dac")
    torch.manual_seed(1)
    both = build_generator(model_preset("tiny"), init="dac+transposed")
    convs = {n for n, m in dac.named_modules() if isinstance(m, torch.nn.Conv1d) and m.bias is not None}
    transposed = {n for n, m in dac.named_modules() if isinstance(m, torch.nn.ConvTranspose1d)}
    assert convs and transposed
    d_default, d_dac, d_both = default.state_dict(), dac.state_dict(), both.state_dict()
    for name, value in d_default.items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".bias") and module in convs:
            assert not torch.equal(value, torch.zeros_like(value)), name
            assert torch.equal(d_dac[name], torch.zeros_like(value)) and torch.equal(d_both[name], d_dac[name]), name
        elif name.endswith(".bias") and module in transposed:
            assert torch.equal(d_dac[name], value), name  # DAC leaves transposed convolutions alone
            assert torch.equal(d_both[name], torch.zeros_like(value)), name
        else:
            assert torch.equal(d_dac[name], value) and torch.equal(d_both[name], value), name
    # A model loaded from disk keeps its biases exactly (nonzero ones included).
    from training.hub import export_snac, load_generator

    export_snac(default, model_preset("tiny"), tmp_path / "m")
    loaded, _ = load_generator(tmp_path / "m")
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, d_default[name]), name
    with pytest.raises(ValueError, match="generator init"):
        init_generator(dac, "xavier")


def test_kmeans_codebook_clusters_directions_and_stores_raw_means():
    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    scales = torch.rand(400, 1, generator=g) * 3 + 0.5
    labels = torch.arange(400) % 4
    rows = directions[labels] * scales + 0.01 * torch.randn(400, 8, generator=g)
    codes = kmeans_codebook(rows, 4, iters=10, generator=torch.Generator().manual_seed(0))
    # each code is one cluster's raw mean (direction times the cluster's mean scale)
    for k in range(4):
        expected = rows[labels == k].mean(0)
        assert torch.cdist(expected[None], codes).min() < 0.05
    # fewer rows than codes: every code is distinct and near a row
    few = kmeans_codebook(rows[:10], 32, iters=5, generator=torch.Generator().manual_seed(0))
    assert few.shape == (32, 8) and len(torch.unique(few, dim=0)) == 32
    cosine = torch.nn.functional.normalize(few, dim=1) @ torch.nn.functional.normalize(rows[:10], dim=1).T
    assert cosine.max(1).values.min() > 0.98  # each points where some latent points
    same = kmeans_codebook(rows, 4, iters=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same, codes)  # same rows and seed: same codebook


def test_data_driven_codebooks_use_most_codes_at_step0(speech):
    model, codes_before, _ = _step0("dac", speech)
    counts = init_codebooks_from_data(model, [speech[:6], speech[6:]], iters=10, seed=0)
    assert counts == [96, 192, 384]
    with torch.no_grad():
        codes_after = model.encode(speech)
        ours = train_forward(model, speech).codes
    for level in range(3):
        assert torch.equal(ours[level], codes_after[level])  # training forward == snac.encode
        distinct = len(torch.unique(codes_after[level]))
        assert distinct > len(torch.unique(codes_before[level]))
        assert distinct >= 0.9 * min(codes_after[level].numel(), 256)  # measured 96 / 192 / 256


def test_data_dependent_init_standardises_every_encoder_conv(speech):
    """After init_encoder_from_data, every encoder convolution's output channels are zero-mean and
    unit-variance on the init audio (measured here with independent hooks), and standardising a
    level's input projection leaves the decoder's input exactly as it was."""
    model, _, _ = _step0("dac", speech)
    speech = speech[:6, :, :8192]  # the init data and the check data alike
    convs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv1d)]
    stats = {}

    def grab(conv):
        def hook(_m, _i, out):
            y = out.double().transpose(0, 1).reshape(out.shape[1], -1)
            stats[conv] = (y.mean(1), y.std(1, unbiased=False))
        return hook

    handles = [c.register_forward_hook(grab(c)) for c in convs]
    with torch.no_grad():
        model.encoder(speech)
    before = {c: s for c, s in stats.items()}
    assert max(float(s[1].mean()) for s in before.values()) < 0.1  # PyTorch's init: small activations
    assert init_encoder_from_data(model, [speech[:3], speech[3:]]) == len(convs)
    with torch.no_grad():
        z = model.encoder(speech)
    for h in handles:
        h.remove()
    for conv in convs:
        mean, std = stats[conv]
        assert mean.abs().max() < 1e-3 and (std - 1).abs().max() < 1e-3
    with torch.no_grad():
        vq = model.quantizer.quantizers[0]
        pooled = torch.nn.functional.avg_pool1d(z, vq.stride, vq.stride)
        decoder_input = vq.out_proj(vq.in_proj(pooled))
        init_codebooks_from_data(model, [speech], iters=2, seed=0, standardise=True)
        z_e = vq.in_proj(pooled)
        torch.testing.assert_close(vq.out_proj(z_e), decoder_input, rtol=1e-4, atol=1e-4)
    rows = z_e.transpose(1, 2).reshape(-1, z_e.shape[1])
    assert rows.mean(0).abs().max() < 1e-4 and (rows.std(0, unbiased=False) - 1).abs().max() < 1e-4


def test_data_dependent_init_in_one_pass_equals_one_pass_per_convolution(speech):
    """init_encoder_from_data standardises every convolution during a single forward pass; the
    reference here does it the slow, plain way (a whole encoder pass over each batch per
    convolution, moments over all batches, then rescale) and every tensor must come out the same,
    up to float rounding (one convolution over the batches together may round differently from
    one per batch: measured at most 6e-8 here)."""
    from training.codebooks import _channel_moments, _standardise_conv
    from training.model import pad_to_unit

    cfg = create_training_config(preset="tiny")
    torch.manual_seed(0)
    model = build_generator(cfg.model, init="dac")
    reference = copy.deepcopy(model)
    batches = [speech[:4, :, :8192], speech[4:6, :, :8192], speech[6:12, :, :8192], speech[:4, :, 8192:]]
    with torch.no_grad():
        inputs = [pad_to_unit(reference, b) for b in batches]
        for conv in [m for m in reference.encoder.modules() if isinstance(m, torch.nn.Conv1d)]:
            seen = []
            handle = conv.register_forward_hook(lambda _m, _i, out: seen.append(out))
            for x in inputs:
                reference.encoder(x)
            handle.remove()
            _standardise_conv(conv, *_channel_moments(seen))
    untouched = {k: v.clone() for k, v in model.state_dict().items()}
    init_encoder_from_data(model, batches)
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6, msg=key)
    rescaled = [k for k in want if k.startswith("encoder.") and not torch.equal(want[k], untouched[k])]
    assert len(rescaled) >= 60  # 30 convolutions' bias and weight-norm gain (and more): not a no-op


def _mean_fraction_after_steps(speech, data_init: bool, steps: int = 12):
    """Encoder-output mean fraction after ``steps`` AdamW steps at the demo's warm-up rates."""
    from conftest import reconstruction_steps

    cfg = create_training_config(preset="tiny")
    torch.manual_seed(0)
    model = build_generator(cfg.model, init="dac")
    batch = speech[:4, :, :8192]
    if data_init:
        init_encoder_from_data(model, [batch])
    init_codebooks_from_data(model, [batch], iters=5, seed=0, standardise=data_init)
    crops = [speech[4 * (step % 3):4 * (step % 3) + 4, :, :8192] for step in range(steps)]
    reconstruction_steps(model, cfg, crops, lr=3e-3, warmup_steps=50)  # the demo's rate and warm-up
    with torch.no_grad():
        return mean_fraction(model.encoder(speech))


def test_data_dependent_init_keeps_the_latents_apart_in_the_first_steps(speech):
    """The collapse it prevents: from PyTorch's small activations, a dozen warm-up steps put one
    common offset on every frame (the encoder output becomes nearly one vector); from unit scale
    the same steps leave the frames spread."""
    assert _mean_fraction_after_steps(speech, data_init=False) > 0.8  # measured 0.94 (torch 2.14 CPU)
    assert _mean_fraction_after_steps(speech, data_init=True) < 0.3  # measured 0.035


def test_usage_replacer_replaces_rarely_used_codes_only():
    torch.manual_seed(0)
    model = build_generator(model_preset("tiny"))
    replacer = UsageReplacer(model, threshold=0.5, decay=0.9, every=5, seed=0)
    before = [vq.codebook.weight.detach().clone() for vq in model.quantizer.quantizers]
    g = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        codes = [torch.arange(128).reshape(2, 64) for _ in range(3)]  # codes 0..127 once a step, 128.. never
        latents = [torch.randn(2, 8, 64, generator=g) for _ in range(3)]
        counts = replacer.step(step, codes, latents)
        assert counts == ([128] * 3 if step == 5 else [0] * 3)  # only check steps replace
    for level, vq in enumerate(model.quantizer.quantizers):
        changed = (vq.codebook.weight != before[level]).any(1)
        assert not changed[:128].any()  # every used code kept
        assert bool(changed[128:].all())  # every unused one replaced
    state = replacer.state_dict()
    other = UsageReplacer(model, threshold=0.5, decay=0.9, every=5, seed=0)
    other.load_state_dict(state)
    assert other.observed == 5 and all(torch.equal(a, b) for a, b in zip(other.usage, replacer.usage))


def test_usage_replacer_never_syncs_the_host_off_check_steps(monkeypatch):
    torch.manual_seed(0)
    model = build_generator(model_preset("tiny"))
    replacer = UsageReplacer(model, every=3)
    codes = [torch.randint(0, 256, (2, 10)) for _ in range(3)]
    latents = [torch.randn(2, 8, 10) for _ in range(3)]

    def forbidden(*a, **k):
        raise AssertionError("host sync off a check step")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
            m.setattr(torch.Tensor, name, forbidden)
        replacer.step(1, codes, latents)
        replacer.step(2, codes, latents)
    replacer.step(3, codes, latents)  # a check step may sync


def test_rotation_trick_keeps_the_forward_and_rotates_the_gradient():
    g = torch.Generator().manual_seed(0)
    z_e = torch.randn(2, 8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z_q = torch.randn(2, 8, 5, generator=g, dtype=torch.float64)
    out = rotate_onto(z_e, z_q)
    assert torch.allclose(out, z_q, atol=1e-12)
    grad = torch.randn(2, 8, 5, generator=g, dtype=torch.float64)
    out.backward(grad)
    # Reference, written independently: a rotation matrix R with R e_hat = q_hat built by
    # Gram-Schmidt in the plane of e and q, scaled by |q|/|e|; the gradient is scale * R^T g.
    for b in range(2):
        for t in range(5):
            e, q, gv = z_e.detach()[b, :, t].numpy(), z_q[b, :, t].numpy(), grad[b, :, t].numpy()
            u = e / np.linalg.norm(e)
            w = q / np.linalg.norm(q)
            v = w - u * (u @ w)
            v /= np.linalg.norm(v)
            cos, sin = u @ w, v @ w
            rot = np.eye(8) + (cos - 1) * (np.outer(u, u) + np.outer(v, v)) + sin * (np.outer(v, u) - np.outer(u, v))
            assert np.allclose(rot @ u, w)
            expected = np.linalg.norm(q) / np.linalg.norm(e) * rot.T @ gv
            assert np.allclose(z_e.grad[b, :, t].numpy(), expected, atol=1e-9)


def test_rotation_trick_changes_only_the_backward(speech):
    torch.manual_seed(0)
    model = build_generator(model_preset("tiny"))
    grads = []
    for rotation in (False, True):
        model.zero_grad()
        torch.manual_seed(5)
        out = train_forward(model, speech[:2], rotation_trick=rotation)
        out.audio.pow(2).mean().backward()
        grads.append((out, model.encoder.block[0].weight_v.grad.clone() if hasattr(model.encoder.block[0], "weight_v")
                      else next(model.encoder.parameters()).grad.clone()))
    (plain, g_plain), (rotated, g_rot) = grads
    for a, b in zip(plain.codes, rotated.codes):
        assert torch.equal(a, b)
    assert torch.allclose(plain.audio, rotated.audio, atol=1e-5)
    assert not torch.allclose(g_plain, g_rot)


def test_vq_health_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    codes = [[torch.randint(0, 16, (2, 6), generator=g)] for _ in range(2)]  # two batches, one level
    latents = [[torch.randn(2, 4, 6, generator=g) + 3.0] for _ in range(2)]
    health = VQHealth(16)
    for c, z in zip(codes, latents):
        health.add(c, z)
    s = health.summary()
    all_codes = np.concatenate([c[0].numpy().ravel() for c in codes])
    p = np.bincount(all_codes, minlength=16) / len(all_codes)
    nz = p[p > 0]
    assert s["val/codebook_distinct_level0"] == len(np.unique(all_codes))
    assert s["val/codebook_entropy_level0"] == pytest.approx(np.exp(-(nz * np.log(nz)).sum()) / 16, rel=1e-5)
    rows = np.concatenate([z[0].numpy().transpose(0, 2, 1).reshape(-1, 4) for z in latents])
    expected = (rows.mean(0) ** 2).sum() / (rows ** 2).sum(1).mean()
    assert s["val/latent_mean_fraction_level0"] == pytest.approx(expected, rel=1e-5)
    assert mean_fraction(torch.ones(1, 4, 10)) == pytest.approx(1.0)


def test_collapse_warning_names_the_level():
    result = {"val/codebook_perplexity_level0": 1.2, "val/latent_mean_fraction_level0": 0.2,
              "val/codebook_perplexity_level1": 40.0, "val/latent_mean_fraction_level1": 0.95,
              "val/codebook_perplexity_level2": 40.0, "val/latent_mean_fraction_level2": 0.1}
    lines = collapse_warnings(result)
    assert len(lines) == 2
    assert lines[0].startswith("level 0 has collapsed: validation perplexity 1.20")
    assert lines[1].startswith("level 1 has collapsed") and "TRAINING_GUIDE.md#collapse" in lines[1]


@pytest.mark.parametrize("key, value", [("train.generator_init", "xavier"), ("train.codebook_init", "uniform"),
                                        ("train.code_replacement", "ema"), ("train.usage_ema_decay", 1.0),
                                        ("train.usage_threshold", 0.0), ("train.codebook_init_batches", 0),
                                        ("optim.warmup_steps", -1)])
def test_new_config_keys_are_validated(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        create_training_config(preset="tiny", overrides={key: value})


def test_ddp_ranks_write_identical_codebooks_after_kmeans_and_usage_replacement(tmp_path):
    """Two real gloo ranks with different audio: k-means sees both ranks' latents and every rank
    ends with the same codebooks; then a usage-EMA replacement keeps them bit-identical."""
    from conftest import run_two_ranks

    r0, r1 = run_two_ranks("ddp_codebook_worker.py", tmp_path, port=29541)
    assert r0["counts"] == r1["counts"] == [2 * 48, 2 * 96, 2 * 192]  # both ranks' latents
    for a, b in zip(r0["after_init"], r1["after_init"]):
        assert torch.equal(a, b)
    # the data-dependent scale also used both ranks' audio: every generator tensor is identical
    assert r0["generator_after_init"].keys() == r1["generator_after_init"].keys()
    for key, a in r0["generator_after_init"].items():
        assert torch.equal(a, r1["generator_after_init"][key]), key
    for a, b, initial in zip(r0["after_replace"], r1["after_replace"], r0["after_init"]):
        assert torch.equal(a, b)
        assert not torch.equal(a, initial)  # a replacement happened
    assert r0["replaced"] == r1["replaced"] and min(r0["replaced"]) > 0


@pytest.mark.parametrize("rule", ["restart", "usage"])
def test_replacement_is_capped_per_check(rule):
    """replace_max_fraction bounds how many codes change at one check; the rest wait."""
    from training.codebooks import build_replacer

    torch.manual_seed(0)
    model = build_generator(model_preset("tiny"))
    replacer = build_replacer(model, rule, dead_code_steps=1, every=1, threshold=0.5, decay=0.9, seed=0,
                              max_fraction=0.05)
    codes = [torch.zeros(2, 64, dtype=torch.long) for _ in range(3)]  # only code 0 is used
    latents = [torch.randn(2, 8, 64) for _ in range(3)]
    assert replacer.step(1, codes, latents) == [12, 12, 12]  # int(0.05 * 256), not the 128 candidates
    assert replacer.step(2, codes, latents) == [12, 12, 12]
