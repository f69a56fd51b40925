"""Configs: presets equal the published SNAC models; files, dicts and overrides are validated."""

import json

import pytest
import snac

from training.config import (
    DATASET_CONFIGS,
    Config,
    ConfigError,
    apply_overrides,
    create_snac_24khz_config,
    create_snac_32khz_config,
    create_snac_44khz_config,
    create_training_config,
    load_config,
    model_preset,
    save_config,
    to_config,
)

# (preset, params in millions, token rates in Hz, kbps) -- hubertsiuzdak/snac_* model cards.
PUBLISHED = [
    ("24khz", 19.8, (11.72, 23.44, 46.88), 0.98),
    ("32khz", 54.5, (10.42, 20.83, 41.67, 83.33), 1.9),
    ("44khz", 54.5, (14.36, 28.71, 57.42, 114.84), 2.6),
]


@pytest.mark.parametrize("name,params_m,rates,kbps", PUBLISHED)
def test_presets_match_published_models(name, params_m, rates, kbps):
    cfg = model_preset(name)
    model = snac.SNAC(**cfg.snac_kwargs())
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - params_m) < 0.1
    assert cfg.token_rates() == pytest.approx(rates, abs=0.01)
    assert round(cfg.bitrate_kbps(), 2 if kbps < 1 else 1) == kbps


def test_pad_multiple_and_hop():
    assert [model_preset(n).hop_length for n in ("24khz", "32khz", "44khz")] == [512, 384, 384]
    assert [model_preset(n).pad_multiple for n in ("24khz", "32khz", "44khz")] == [2048, 12288, 12288]


@pytest.mark.parametrize("fn,rate", [(create_snac_24khz_config, 24000), (create_snac_32khz_config, 32000),
                                     (create_snac_44khz_config, 44100)])
def test_legacy_model_config_functions_build_snac(fn, rate):
    kwargs = fn()
    assert isinstance(kwargs["encoder_rates"], list)
    assert snac.SNAC(**kwargs).sampling_rate == rate


def test_create_training_config_documented_form():
    cfg = create_training_config(dataset_path="/data/x", batch_size=8, learning_rate=3e-4, streaming=True)
    assert (cfg.data.dataset_path, cfg.data.batch_size, cfg.optim.lr, cfg.data.streaming) == ("/data/x", 8, 3e-4, True)
    assert cfg.optim.betas == (0.8, 0.99) and cfg.optim.lr_decay == 0.999994
    assert cfg.loss.mel == 15 and cfg.loss.feature_matching == 2 and cfg.loss.commitment == 0.25
    assert cfg.segment_length() == 20480  # 0.8 s at 24 kHz rounded up to a multiple of 2048


def test_create_training_config_presets_and_overrides():
    cfg = create_training_config(preset="tiny", dataset="librispeech", num_iterations=10,
                                 overrides=["optim.lr=1e-3", "train.precision=fp32"])
    assert cfg.data.dataset_path == "openslr/librispeech_asr" and cfg.data.split == "train.100"
    assert cfg.train.max_steps == 10 and cfg.optim.lr == 1e-3 and cfg.model.encoder_dim == 8
    with pytest.raises(ConfigError, match="bogus"):
        create_training_config(bogus=1)


def test_legacy_dict_layout_is_converted():
    legacy = {
        "model": create_snac_24khz_config(),
        "training": {"batch_size": 4, "learning_rate": 1e-4, "lr_decay": 0.9999, "num_iterations": 50,
                     "save_interval": 10, "log_interval": 5, "validation_interval": 20},
        "data": {"dataset_path": "some/ds", "audio_column": "speech", "split": "train",
                 "streaming": False, "segment_length": 1.0},
        "paths": {"checkpoint_dir": "./ck", "log_dir": "./lg"},
    }
    cfg = to_config(legacy)
    assert cfg.data.batch_size == 4 and cfg.train.max_steps == 50 and cfg.train.checkpoint_every == 10
    assert cfg.data.audio_column == "speech" and cfg.data.segment_seconds == 1.0
    assert cfg.train.run_dir == "./ck" and cfg.train.log_dir == "./lg"
    assert cfg.model.encoder_rates == (2, 4, 8, 8)


@pytest.mark.parametrize("bad,match", [
    ({"model": {"encoder_dims": 3}}, "model.encoder_dims"),
    ({"optim": {"lr": "fast"}}, "'optim.lr' expects float"),
    ({"train": {"max_steps": 1.5}}, "'train.max_steps' expects int"),
    ({"data": {"streaming": "yes"}}, "'data.streaming' expects bool"),
    ({"model": {"vq_strides": [4, "2"]}}, r"model.vq_strides\[1\]"),
    ({"optimizer": {}}, "unknown config section 'optimizer'"),
    ({"training": {"epochs": 3}}, "training.epochs"),
])
def test_bad_keys_and_types_name_the_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        to_config(bad)


@pytest.mark.parametrize("ext", ["json", "yaml"])
def test_file_roundtrip(tmp_path, ext):
    cfg = create_training_config(preset="32khz", batch_size=3, overrides={"loss.mel_fmax": 8000.0})
    path = tmp_path / f"c.{ext}"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert to_config(str(path)) == cfg


def test_bad_file_is_one_line_error(tmp_path):
    p = tmp_path / "c.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_parse_values():
    cfg = apply_overrides(Config(), ["optim.lr=3e-4", "optim.grad_clip_generator=null", "model.vq_strides=[8,4,2,1]",
                                     "train.run_dir=runs/x", "data.streaming=true"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.grad_clip_generator is None and cfg.model.vq_strides == (8, 4, 2, 1)
    assert cfg.train.run_dir == "runs/x" and cfg.data.streaming is True
    with pytest.raises(ConfigError, match="form section.key=value"):
        apply_overrides(Config(), ["optim.lr"])


def test_dataset_presets_have_required_fields():
    assert set(DATASET_CONFIGS) == {"ljspeech", "common_voice", "librispeech", "vctk"}
    for name in DATASET_CONFIGS:
        cfg = create_training_config(dataset=name)
        assert cfg.data.dataset == name and "/" in cfg.data.dataset_path
        assert cfg.data.audio_column == "audio" and cfg.data.text_column
    json.dumps(DATASET_CONFIGS)  # presets stay plain data


# Every out-of-range value is refused at load with the key and its allowed range (the values the
# fault probe found accepted, plus their neighbours).
OUT_OF_RANGE = [
    ("optim.grad_clip_generator", -1.0, "> 0, or null"), ("optim.grad_clip_discriminator", 0, "> 0, or null"),
    ("optim.lr_decay", -0.5, "in (0, 1]"), ("optim.lr_decay", 1.5, "in (0, 1]"),
    ("optim.lr", -1e-4, "> 0"), ("optim.lr", float("nan"), "finite"), ("optim.lr", float("inf"), "finite"),
    ("optim.betas", [0.8, 1.5], "[0, 1)"), ("optim.betas", [-0.1, 0.9], "[0, 1)"), ("optim.eps", 0, "> 0"),
    ("optim.weight_decay", -0.01, ">= 0"),
    ("loss.mel", -1, ">= 0"), ("loss.adversarial", -0.5, ">= 0"), ("loss.codebook", float("nan"), "finite"),
    ("loss.mel_clamp", 0, "> 0"), ("loss.mel_fmax", 20000.0, "null or in"),
    ("train.keep_last", -1, ">= 1"), ("train.keep_last", 0, ">= 1"), ("train.eval_batches", 0, ">= 1"),
    ("train.max_nonfinite_steps", 0, ">= 1"), ("train.adversarial_start_step", -3, ">= 0"),
    ("model.encoder_rates", [2, -4, 8, 8], "integers >= 1"), ("model.vq_strides", [4, 0, 1], "integers >= 1"),
    ("model.codebook_dim", 0, ">= 1"), ("model.decoder_dim", 8, ">= 2**len"),
    ("data.segment_seconds", 1e6, "in (0, 60]"), ("data.segment_seconds", 0, "in (0, 60]"),
    ("data.val_segment_seconds", -2, "in (0, 60]"), ("data.batch_size", 0, ">= 1"),
    ("data.loudness_db", 6.0, "null or <= 0"), ("data.dataset_weights", [1.0, -1.0], "!"),
    ("discriminator.stft_hop_factor", 0, "in (0, 1]"), ("discriminator.stft_bands", [0.0, 0.5, 0.25, 1.0], "increasing"),
    ("discriminator.periods", [2, 0], "integers >= 1"),
]


@pytest.mark.parametrize("key,value,allowed", OUT_OF_RANGE)
def test_out_of_range_values_name_key_and_allowed_range(key, value, allowed):
    overrides = {key: value}
    if key == "data.dataset_weights":
        overrides["data.extra_datasets"] = ["other"]
        allowed = "weights >= 0"
    with pytest.raises(ConfigError) as err:
        create_training_config(preset="tiny", overrides=overrides)
    message = str(err.value)
    assert f"'{key}'" in message and allowed in message and "\n" not in message


def test_defaults_and_presets_pass_validation():
    for preset in ("24khz", "32khz", "44khz", "tiny"):
        create_training_config(preset=preset, overrides={"optim.grad_clip_generator": 1.0, "optim.lr_decay": 1.0})


def test_absurd_batch_times_segment_is_refused_with_a_memory_estimate():
    cfg = create_training_config(preset="24khz", overrides={"data.batch_size": 16, "data.segment_seconds": 0.8})
    from training.config import activation_bytes_estimate

    assert 1 << 30 < activation_bytes_estimate(cfg) < 64 << 30  # the paper's setting: a few GiB
    with pytest.raises(ConfigError, match=r"'data.segment_seconds' x 'data.batch_size' .* GiB of activations"):
        create_training_config(preset="24khz", overrides={"data.batch_size": 20000, "data.segment_seconds": 60})


def test_unreadable_config_files_are_one_line(tmp_path):
    binary = tmp_path / "c.yaml"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="not found"):
        load_config(folder)


def test_yaml_numbers_in_exponent_form_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads `lr: 1e-3` as a string; the config reads it as the number it spells."""
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  lr_decay: 9.9e-1\nloss:\n  mel: 1.5e1\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 0.001 and cfg.optim.lr_decay == 0.99 and cfg.loss.mel == 15.0
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_non_finite_override_says_must_be_a_finite_number(text):
    with pytest.raises(ConfigError, match=r"config key 'optim\.lr' must be a finite number"):
        create_training_config(preset="tiny", overrides=[f"optim.lr={text}"])
