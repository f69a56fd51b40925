"""Configuration: dataclass sections, model and dataset presets, file I/O and overrides.

A training run is described by one :class:`Config` with six sections::

    model          ModelConfig          == keyword arguments of ``snac.SNAC.__init__``
    data           DataConfig           where the audio comes from and how it is cut
    loss           LossConfig           every loss weight (applied in exactly one place) + spectral settings
    discriminator  DiscriminatorConfig  MPD periods, STFT discriminator resolutions
    optim          OptimConfig          AdamW + exponential LR decay
    train          TrainConfig          run directory, steps, intervals, precision, devices

Defaults are the reference values; each names its source ("paper" = SNAC, arXiv 2410.14411;
"DAC" = descript-audio-codec ``conf/base.yml``; "ours" = chosen by this toolkit).

Configs come from presets, JSON/YAML files, plain dicts (including the legacy
``{"model", "training", "data", "paths"}`` layout) and dotted overrides such as
``optim.lr=3e-4``. Unknown keys and wrong types raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Union


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or a value is out of range."""


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Generator architecture; field names are exactly ``snac.SNAC.__init__``'s kwargs."""

    sampling_rate: int = 24000
    encoder_dim: int = 48
    encoder_rates: Tuple[int, ...] = (2, 4, 8, 8)
    latent_dim: Optional[int] = None  # None: encoder_dim * 2**len(encoder_rates), as snac does
    decoder_dim: int = 1024
    decoder_rates: Tuple[int, ...] = (8, 8, 4, 2)
    attn_window_size: Optional[int] = None
    codebook_size: int = 4096
    codebook_dim: int = 8
    vq_strides: Tuple[int, ...] = (4, 2, 1)
    noise: bool = True
    depthwise: bool = True

    @property
    def hop_length(self) -> int:
        """Samples per finest-level latent frame (prod(encoder_rates))."""
        return math.prod(self.encoder_rates)

    @property
    def pad_multiple(self) -> int:
        """``SNAC.preprocess`` right-pads inputs to a multiple of this many samples."""
        return self.hop_length * math.lcm(self.vq_strides[0], self.attn_window_size or 1)

    @property
    def n_levels(self) -> int:
        return len(self.vq_strides)

    def token_rates(self) -> Tuple[float, ...]:
        """Tokens per second of each quantizer level, coarsest first (Hz)."""
        return tuple(self.sampling_rate / (self.hop_length * s) for s in self.vq_strides)

    def bitrate_kbps(self) -> float:
        """sum(token rates) * log2(codebook_size), in kbit/s."""
        return sum(self.token_rates()) * math.log2(self.codebook_size) / 1000.0

    def snac_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for ``snac.SNAC(**kwargs)`` (lists, as in SNAC's config.json)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class DataConfig:
    """Where training audio comes from and how it is cut into training segments."""

    dataset: Optional[str] = None  # a DATASET_CONFIGS preset or a prepared-dataset registry name
    dataset_path: Optional[str] = None  # hub id, save_to_disk dir, audio folder, LJ Speech folder or manifest
    config_name: Optional[str] = None  # hub dataset configuration ("en", "clean", ...)
    revision: Optional[str] = None  # hub dataset revision (commit sha, branch, tag, refs/pr/N); None: default branch
    split: str = "train"
    val_split: Optional[str] = None  # None: hold out `val_items` items of `split`
    val_items: int = 64  # ours: held-out items when there is no validation split
    streaming: bool = False
    audio_column: str = "audio"
    text_column: Optional[str] = None
    speaker_column: Optional[str] = None
    segment_seconds: float = 0.8  # paper: ~0.8 s segments; rounded up to the model's pad multiple
    val_segment_seconds: float = 2.0  # ours: longer, deterministic (first-segment) validation crops
    batch_size: int = 16  # paper
    num_workers: int = 4  # ours: DataLoader worker processes per rank
    shuffle_buffer: int = 2000  # ours: streaming shuffle buffer (items)
    # DAC conf/base.yml VolumeNorm.db = -16 (DAC measures LUFS; here RMS dBFS, peak-limited);
    # None disables. Quiet clips otherwise barely reach the adversarial / feature-matching terms.
    loudness_db: Optional[float] = -16.0
    silence_db: float = -60.0  # ours: crops quieter than this RMS (dBFS) are re-drawn
    max_silence_retries: int = 5  # ours: bounded re-draws before accepting a quiet crop
    max_failure_fraction: float = 0.5  # ours: abort when more than this fraction of reads fail
    max_item_retries: int = 20  # ours: consecutive unreadable items replaced before giving up
    extra_datasets: Tuple[str, ...] = ()  # ours: more sources (paths, registry names, hub ids) mixed into training
    dataset_weights: Tuple[float, ...] = ()  # ours: sampling weights, main source first; () = by size
    seed: int = 0


@dataclass
class LossConfig:
    """Every loss weight (applied once, in ``losses.GeneratorLoss``) and the spectral-loss settings.

    Log keys equal the weight names: ``mel``, ``stft``, ``adversarial``, ``feature_matching``,
    ``commitment``, ``codebook``.
    """

    mel: float = 15.0  # DAC lambdas mel/loss
    stft: float = 1.0  # ours: multi-resolution STFT loss (DAC defines one but weights it 0)
    adversarial: float = 1.0  # DAC adv/gen_loss
    feature_matching: float = 2.0  # DAC adv/feat_loss
    commitment: float = 0.25  # DAC vq/commitment_loss
    codebook: float = 1.0  # DAC vq/codebook_loss
    mel_window_lengths: Tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)  # DAC MelSpectrogramLoss
    mel_n_mels: Tuple[int, ...] = (5, 10, 20, 40, 80, 160, 320)  # DAC MelSpectrogramLoss
    mel_clamp: float = 1e-5  # DAC clamp_eps
    mel_fmin: float = 0.0  # DAC
    mel_fmax: Optional[float] = None  # DAC: None = Nyquist
    stft_fft_sizes: Tuple[int, ...] = (1024, 2048, 512)  # Parallel WaveGAN multi-resolution STFT loss
    stft_hop_sizes: Tuple[int, ...] = (120, 240, 50)  # Parallel WaveGAN
    stft_win_lengths: Tuple[int, ...] = (600, 1200, 240)  # Parallel WaveGAN


@dataclass
class DiscriminatorConfig:
    periods: Tuple[int, ...] = (2, 3, 5, 7, 11)  # DAC / HiFi-GAN MPD
    stft_fft_sizes: Tuple[int, ...] = (2048, 1024, 512)  # DAC MRD window lengths
    stft_hop_factor: float = 0.25  # DAC: hop = fft / 4
    stft_bands: Tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)  # DAC band edges (fraction of Nyquist)
    stft_channels: int = 32  # DAC MRD channels
    mpd_channels: Tuple[int, ...] = (32, 128, 512, 1024, 1024)  # HiFi-GAN / DAC period discriminator
    # DAC Discriminator.preprocess: remove the DC offset and peak-normalise to 0.8 before every
    # sub-discriminator, so loudness and offset are no cue for real vs fake.
    preprocess: bool = True
    preprocess_peak: float = 0.8  # DAC


@dataclass
class OptimConfig:
    lr: float = 6e-4  # paper
    betas: Tuple[float, ...] = (0.8, 0.99)  # DAC
    eps: float = 1e-8  # torch default
    weight_decay: float = 0.01  # torch AdamW default (DAC does not change it)
    lr_decay: float = 0.999994  # paper: ExponentialLR gamma, per step, both networks
    # ours: linear warm-up from lr / warmup_steps to lr over the first steps (the paper has none;
    # 0 = none). Short high-lr runs spike without it (TRAINING_GUIDE.md, "Short runs").
    warmup_steps: int = 0
    # DAC scripts/train.py clip_grad_norm_(generator, 1e3) / (discriminator, 10.0); None = no clip
    # (the SNAC paper's "no clipping").
    grad_clip_generator: Optional[float] = 1e3
    grad_clip_discriminator: Optional[float] = 10.0
    fused: Optional[bool] = None  # ours: None = fused AdamW on CUDA and CPU (skips non-finite updates without a host sync), foreach elsewhere


@dataclass
class TrainConfig:
    run_dir: str = "runs/snac"
    log_dir: Optional[str] = None  # None: <run_dir>/logs
    max_steps: int = 800_000  # paper
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16
    compile: bool = False  # torch.compile the generator and discriminators
    log_every: int = 50
    eval_every: int = 1000
    eval_batches: int = 8
    checkpoint_every: int = 5000
    keep_last: int = 3  # numbered checkpoints kept besides latest/best
    adversarial_start_step: int = 0  # ours: before this the generator ignores the discriminator
    dead_code_steps: int = 200  # ours: codes unused for this many steps are dead; 0 disables restarts
    # ours: restart check every this many steps (the only steps that synchronise the codebook
    # bookkeeping); the first check already re-seeds every code not used yet.
    dead_code_every: int = 25
    # ours: which codes to replace, checked every dead_code_every steps. "restart": unused by any
    # rank for dead_code_steps steps; "usage": smoothed share of assignments below
    # usage_threshold x the uniform share (decay usage_ema_decay per step); null: never.
    code_replacement: Optional[str] = "restart"
    usage_threshold: float = 0.1  # ours: fraction of the uniform share 1/codebook_size
    usage_ema_decay: float = 0.99  # ours: per-step EMA decay of the usage shares
    # ours: at most this fraction of each codebook is replaced at one check (either rule)
    replace_max_fraction: float = 1.0
    # DAC's init_weights zeroes the Conv1d biases ("dac"). "dac+transposed" zeroes the decoder's
    # transposed convolutions' too: lower mel when overfitting one clip at lr 1e-3, but at the
    # demo's lr the generator's gradient norm is ~30x larger (9,356 vs 291 at step 10) and the run
    # collapses, so DAC's choice stays the default. "snac" keeps PyTorch's default, which starts
    # collapsed (model.init_generator). From-scratch only: loaded weights are never re-initialised.
    generator_init: str = "dac"
    # ours: "kmeans" sets each level's codebook from the latents of the first codebook_init_batches
    # training batches before step 1 (codebooks.init_codebooks_from_data); "random" keeps
    # nn.Embedding's N(0, 1) draw. Skipped when fine-tuning (init_from) or resuming.
    codebook_init: str = "kmeans"
    # ours: before the codebooks, rescale the encoder's convolutions and each level's input
    # projection so their outputs are zero-mean, unit-variance on those same batches (weight
    # normalisation's data-dependent init; codebooks.init_encoder_from_data says why). Fresh
    # from-scratch runs only, like codebook_init.
    data_dependent_init: bool = True
    codebook_init_batches: int = 16
    codebook_init_iters: int = 20
    rotation_trick: bool = False  # Fifty et al. 2024: gradient through the code search by rotation
    # ours: from this step on, an evaluation warns about every level whose validation perplexity
    # is below 2 or whose latent mean fraction is above 0.9 (codebooks.collapse_warnings)
    collapse_check_after: int = 1000
    max_nonfinite_steps: int = 20  # ours: consecutive skipped (NaN/Inf) steps before stopping
    init_from: Optional[str] = None  # SNAC directory, hub id or our checkpoint to fine-tune from
    # ours: decoder | decoder+encoder | full (FINETUNE_MODES): sets the freeze flags and optim.lr
    # below where the mode is chosen (apply_finetune_mode); needs init_from. None: no mode.
    finetune: Optional[str] = None
    freeze_encoder: bool = False
    freeze_quantizer: bool = False
    # ours: the first this many steps update the discriminators only (the generator runs without
    # autograd and is not updated): a fresh discriminator's first gradients are noise to a
    # pretrained generator. Published SNAC releases ship no discriminator.
    disc_warmup_steps: int = 0
    resume: bool = True  # resume from <run_dir>/checkpoints/latest.pt when present
    # ours: resume even when keys that cannot change mid-run (model, data source, seeds, batch
    # size, discriminator, world size) differ from the checkpoint's (--allow_config_change)
    allow_config_change: bool = False
    # ours: seconds a collective may wait for the other ranks before the run stops with an error
    # naming the step (torch's NCCL default is also 10 min); must exceed rank 0's longest solo
    # pause (an evaluation, a checkpoint write)
    ddp_timeout_s: float = 600.0
    export_on_end: bool = True
    num_audio_samples: int = 2  # eval reconstructions written to TensorBoard


SECTIONS: Dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "loss": LossConfig,
    "discriminator": DiscriminatorConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> Dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        return config_from_dict(d)

    def segment_length(self) -> int:
        """Training segment in samples, rounded up to the model's pad multiple."""
        return seconds_to_segment(self.data.segment_seconds, self.model)

    def val_segment_length(self) -> int:
        return seconds_to_segment(self.data.val_segment_seconds, self.model)


def seconds_to_segment(seconds: float, model: ModelConfig) -> int:
    """Round ``seconds`` up to a whole number of ``model.pad_multiple`` samples (at least one)."""
    unit = model.pad_multiple
    return max(1, math.ceil(seconds * model.sampling_rate / unit)) * unit


# --------------------------------------------------------------------------------------
# Model presets (hubertsiuzdak/snac_*/config.json)
# --------------------------------------------------------------------------------------

MODEL_PRESETS: Dict[str, ModelConfig] = {
    # hubertsiuzdak/snac_24khz: 19.8M params, 3 levels at 12/23/47 Hz, 0.98 kbps
    "24khz": ModelConfig(),
    # hubertsiuzdak/snac_32khz: 54.5M params, 4 levels, 1.9 kbps
    "32khz": ModelConfig(
        sampling_rate=32000, encoder_dim=64, encoder_rates=(2, 3, 8, 8), decoder_dim=1536,
        decoder_rates=(8, 8, 3, 2), attn_window_size=32, vq_strides=(8, 4, 2, 1),
    ),
    # hubertsiuzdak/snac_44khz: 54.5M params, 4 levels, 2.6 kbps
    "44khz": ModelConfig(
        sampling_rate=44100, encoder_dim=64, encoder_rates=(2, 3, 8, 8), decoder_dim=1536,
        decoder_rates=(8, 8, 3, 2), attn_window_size=32, vq_strides=(8, 4, 2, 1),
    ),
    # ours: the 24 kHz layout (same hop, strides and token rates) at a fraction of the width,
    # small enough to train for a few hundred steps on a laptop CPU (tests and `make demo`).
    "tiny": ModelConfig(encoder_dim=8, decoder_dim=64, codebook_size=256),
}


# ours: the tiny preset's discriminators are narrowed to match its generator, so a CPU step is
# dominated by neither network (the reference widths are ~20x the tiny generator's cost).
TINY_DISCRIMINATOR = DiscriminatorConfig(mpd_channels=(8, 16, 32, 64, 64), stft_channels=8)


def model_preset(name: str) -> ModelConfig:
    """Look up a model preset by name: ``24khz``/``snac_24khz``, ``32khz``, ``44khz``, ``tiny``."""
    key = name[len("snac_"):] if name.startswith("snac_") else name
    if key not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; expected one of {sorted(MODEL_PRESETS)}")
    return copy.deepcopy(MODEL_PRESETS[key])


def create_snac_24khz_config() -> Dict[str, Any]:
    """``snac.SNAC(**create_snac_24khz_config())`` builds the published 24 kHz speech model."""
    return model_preset("24khz").snac_kwargs()


def create_snac_32khz_config() -> Dict[str, Any]:
    """``snac.SNAC(**create_snac_32khz_config())`` builds the published 32 kHz music model."""
    return model_preset("32khz").snac_kwargs()


def create_snac_44khz_config() -> Dict[str, Any]:
    """``snac.SNAC(**create_snac_44khz_config())`` builds the published 44.1 kHz music model."""
    return model_preset("44khz").snac_kwargs()


# --------------------------------------------------------------------------------------
# Dataset presets (Hugging Face hub)
# --------------------------------------------------------------------------------------

# Each entry holds DataConfig fields plus the model preset it is meant for. Ids, configuration
# names, splits and column names are taken from each dataset's card / viewer on huggingface.co.
# `datasets` >= 4 runs no loading scripts, so every preset is pinned to a revision whose tree holds
# parquet files declared in its README (`configs:` -> `data_files`); the default branches of
# keithito/lj_speech, CSTR-Edinburgh/vctk and openslr/librispeech_asr hold a loading script again
# (their parquet conversions were reverted), so an unpinned load fails there.
DATASET_CONFIGS: Dict[str, Dict[str, Any]] = {
    # https://huggingface.co/datasets/keithito/lj_speech : one "main" config (main/train-*.parquet),
    # one "train" split; columns id, audio, file, text, normalized_text. Single speaker.
    # Revision: the parquet tree (PR #3, "Convert dataset to Parquet") before commit aa96d9a reverted
    # `main` to lj_speech.py.
    "ljspeech": {
        "dataset_path": "keithito/lj_speech",
        "config_name": "main",
        "revision": "7611c363b2e66bbd7ab3d1dce7afa6d1883f834d",
        "split": "train",
        "val_split": None,
        "streaming": False,
        "audio_column": "audio",
        "text_column": "normalized_text",
        "speaker_column": None,
        "model_config": "24khz",
    },
    # Common Voice 17.0 (CC0-1.0). mozilla-foundation/common_voice_17_0 holds no data since Common
    # Voice moved to the Mozilla Data Collective (2025), so the preset reads the parquet copy
    # https://huggingface.co/datasets/fixie-ai/common_voice_17_0 : one config per language ("en", ...,
    # en/{train,validation,test}-*.parquet), columns client_id, path, audio, sentence, ...; speakers
    # are identified by client_id. The copy declares no license of its own; Common Voice's terms ask
    # users not to try to identify the speakers.
    "common_voice": {
        "dataset_path": "fixie-ai/common_voice_17_0",
        "config_name": "en",
        "revision": "97913806d567d9cc09d7a02d5b0dc7352f2b71b4",
        "split": "train",
        "val_split": "validation",
        "streaming": True,
        "audio_column": "audio",
        "text_column": "sentence",
        "speaker_column": "client_id",
        "model_config": "24khz",
    },
    # https://huggingface.co/datasets/openslr/librispeech_asr : configs clean/other/all; in
    # "clean" the splits are train.100, train.360, validation, test; columns file, audio, text,
    # speaker_id, chapter_id, id. Revision: the hub's PR #9 (parquet files for every config, loading
    # script deleted); its merge into `main` was reverted (commit 276333a).
    "librispeech": {
        "dataset_path": "openslr/librispeech_asr",
        "config_name": "clean",
        "revision": "refs/pr/9",
        "split": "train.100",
        "val_split": "validation",
        "streaming": True,
        "audio_column": "audio",
        "text_column": "text",
        "speaker_column": "speaker_id",
        "model_config": "24khz",
    },
    # https://huggingface.co/datasets/CSTR-Edinburgh/vctk : config "main" (main/train-*.parquet, 27
    # files), one "train" split; columns speaker_id, audio, file, text, text_id, age, gender, accent,
    # region, comment. Revision: the merge of the hub's PR #5 ("Convert dataset to Parquet"), which
    # commit e61ab46 (PR #8) reverted on `main`.
    "vctk": {
        "dataset_path": "CSTR-Edinburgh/vctk",
        "config_name": "main",
        "revision": "7525156719ec5f837353bfa2e489e2779c63a84f",
        "split": "train",
        "val_split": None,
        "streaming": False,
        "audio_column": "audio",
        "text_column": "text",
        "speaker_column": "speaker_id",
        "model_config": "24khz",
    },
}


def dataset_preset(name: str) -> Dict[str, Any]:
    """DataConfig fields of a dataset preset (without its ``model_config``)."""
    if name not in DATASET_CONFIGS:
        raise ConfigError(f"unknown dataset preset {name!r}; expected one of {sorted(DATASET_CONFIGS)}")
    return {k: v for k, v in DATASET_CONFIGS[name].items() if k != "model_config"}


# --------------------------------------------------------------------------------------
# Building configs
# --------------------------------------------------------------------------------------

# Flat keyword names accepted by create_training_config (and the legacy dict layout) and the
# dotted key each one sets.
ALIASES: Dict[str, str] = {
    "dataset_path": "data.dataset_path",
    "batch_size": "data.batch_size",
    "streaming": "data.streaming",
    "learning_rate": "optim.lr",
    "lr_decay": "optim.lr_decay",
    "num_iterations": "train.max_steps",
    "max_steps": "train.max_steps",
    "save_interval": "train.checkpoint_every",
    "log_interval": "train.log_every",
    "validation_interval": "train.eval_every",
    "run_dir": "train.run_dir",
    "checkpoint_dir": "train.run_dir",
    "log_dir": "train.log_dir",
    "seed": "train.seed",
    "device": "train.device",
    "segment_length": "data.segment_seconds",  # legacy: seconds
}


def create_training_config(
    dataset_path: Optional[str] = None,
    batch_size: Optional[int] = None,
    learning_rate: Optional[float] = None,
    streaming: Optional[bool] = None,
    *,
    preset: str = "24khz",
    dataset: Optional[str] = None,
    overrides: Union[Mapping[str, Any], Iterable[str], None] = None,
    **kwargs: Any,
) -> Config:
    """Build a validated :class:`Config`.

    Args:
        dataset_path, batch_size, learning_rate, streaming: the common settings by name.
        preset: model preset (``24khz``, ``32khz``, ``44khz``, ``tiny``).
        dataset: a DATASET_CONFIGS preset name; its fields fill ``data`` (explicit values win).
        overrides: dotted overrides, as a mapping (``{"optim.lr": 3e-4}``) or ``key=value`` strings.
        **kwargs: any name from :data:`ALIASES` (e.g. ``num_iterations``, ``run_dir``).
    """
    cfg = Config(model=model_preset(preset))
    if cfg.model == MODEL_PRESETS["tiny"]:
        cfg.discriminator = copy.deepcopy(TINY_DISCRIMINATOR)
    if dataset is not None:
        apply_dataset_preset(cfg, dataset)
    named = {"dataset_path": dataset_path, "batch_size": batch_size,
             "learning_rate": learning_rate, "streaming": streaming, **kwargs}
    for key, value in named.items():
        if value is None:
            continue
        if key not in ALIASES:
            raise ConfigError(f"unknown argument {key!r}; expected one of {sorted(ALIASES)} "
                              "or a dotted key in `overrides`")
        set_dotted(cfg, ALIASES[key], value)
    if overrides:
        apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


# Fine-tuning modes: what each trains, as the freeze flags it sets, and its learning rate (ours:
# below the from-scratch 6e-4; the more of the token-defining parts (encoder, quantizer) a mode
# trains, the smaller the step, so tokens drift less). `decoder` keeps the tokens identical by
# construction: the encoder and the whole quantizer (input projections and codebooks, which
# define the codes, and the output projections) are frozen. The keys a mode sets are defaults
# where the mode is chosen: a value given explicitly (`--set optim.lr=...`, a config file's key)
# wins, and a freeze flag that contradicts the mode is an error (validate).
FINETUNE_MODES: Dict[str, Dict[str, Any]] = {
    "decoder": {"train.freeze_encoder": True, "train.freeze_quantizer": True, "optim.lr": 1e-4},
    "decoder+encoder": {"train.freeze_encoder": False, "train.freeze_quantizer": True, "optim.lr": 5e-5},
    "full": {"train.freeze_encoder": False, "train.freeze_quantizer": False, "optim.lr": 5e-5},
}


def apply_finetune_mode(cfg: Config, mode: Optional[str]) -> Config:
    """Set ``train.finetune`` to ``mode`` and the keys the mode implies (:data:`FINETUNE_MODES`);
    ``None`` clears the mode and changes nothing else. Callers apply explicit values afterwards."""
    if mode is not None and mode not in FINETUNE_MODES:
        raise ConfigError(f"config key 'train.finetune' must be {', '.join(FINETUNE_MODES)} or null, got {mode!r}")
    cfg.train.finetune = mode
    for key, value in FINETUNE_MODES.get(mode or "", {}).items():
        set_dotted(cfg, key, value)
    return cfg


def apply_dataset_preset(cfg: Config, name: str) -> None:
    """Fill ``cfg.data`` from a dataset preset (and the model preset it names, if any)."""
    for key, value in dataset_preset(name).items():
        set_dotted(cfg, f"data.{key}", value)
    cfg.data.dataset = name


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Convert a plain dict into a validated Config.

    Accepts this package's layout (``model/data/loss/discriminator/optim/train``) and the legacy
    layout (``model``, ``training``, ``data`` with ``segment_length`` in seconds, ``paths``).
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"config must be a mapping of sections, got {type(d).__name__}")
    cfg = Config()
    legacy = {"training", "paths"}
    train = d.get("train")
    if isinstance(train, Mapping) and train.get("finetune") is not None:
        # the mode's keys first: the dict's own values for them are applied over them below
        apply_finetune_mode(cfg, _coerce(train["finetune"], Optional[str], "train.finetune"))
    for section, values in d.items():
        if not isinstance(values, Mapping):
            raise ConfigError(f"config section {section!r} must be a mapping, got {type(values).__name__}")
        if section in legacy:
            for key, value in values.items():
                if key not in ALIASES:
                    raise ConfigError(f"unknown key {section}.{key}; expected one of {sorted(ALIASES)}")
                set_dotted(cfg, ALIASES[key], value)
        elif section in SECTIONS:
            for key, value in values.items():
                dotted = ALIASES["segment_length"] if (section, key) == ("data", "segment_length") else f"{section}.{key}"
                set_dotted(cfg, dotted, value)
        else:
            raise ConfigError(f"unknown config section {section!r}; expected one of "
                              f"{sorted(list(SECTIONS) + sorted(legacy))}")
    validate(cfg)
    return cfg


def to_config(obj: Union[Config, Mapping[str, Any], str, os.PathLike]) -> Config:
    """Accept a Config, a plain dict or a JSON/YAML path wherever a config is expected."""
    if isinstance(obj, Config):
        validate(obj)
        return obj
    if isinstance(obj, Mapping):
        return config_from_dict(obj)
    if isinstance(obj, (str, os.PathLike)):
        return load_config(obj)
    raise ConfigError(f"expected a Config, a dict or a config file path, got {type(obj).__name__}")


# --------------------------------------------------------------------------------------
# Dotted keys and type checking
# --------------------------------------------------------------------------------------


def set_dotted(cfg: Config, key: str, value: Any) -> None:
    """Set ``section.field`` on ``cfg`` after checking the key exists and the type fits."""
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        raise ConfigError(f"unknown config key {key!r}; expected <section>.<field> with section in {sorted(SECTIONS)}")
    obj = getattr(cfg, section)
    hints = _hints(type(obj))
    if name not in hints:
        raise ConfigError(f"unknown config key {key!r}; {section} has {sorted(hints)}")
    setattr(obj, name, _coerce(value, hints[name], key))


def parse_override(text: str) -> Tuple[str, Any]:
    """Parse ``key=value``; the value is read as JSON when it parses (numbers, true, null, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    raw = raw.strip()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        lowered = raw.lower()
        value = {"none": None, "null": None, "true": True, "false": False}.get(lowered, raw)
    return key.strip(), value


def apply_overrides(cfg: Config, overrides: Union[Mapping[str, Any], Iterable[str]]) -> Config:
    items = list(overrides.items() if isinstance(overrides, Mapping) else (parse_override(o) for o in overrides))
    for key, value in items:
        if ALIASES.get(key, key) == "train.finetune":
            # the mode's keys first, so other overrides given with it (optim.lr=...) win
            apply_finetune_mode(cfg, _coerce(value, Optional[str], "train.finetune"))
    for key, value in items:
        set_dotted(cfg, ALIASES.get(key, key), value)
    validate(cfg)
    return cfg


def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``key`` and the type."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            elem = typing.get_args(tp)[0]
            return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        number = _float_text(value)
        if number is not None:
            # YAML 1.1 (PyYAML) reads `lr: 1e-3` as the string "1e-3": a number written that way is one.
            if not math.isfinite(number):
                raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key {key!r} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _float_text(value: Any) -> Optional[float]:
    """``value`` as a float when it is a string spelling a number (``1e-3``, ``nan``), else None."""
    if not isinstance(value, str):
        return None
    try:
        return float(value.strip())
    except ValueError:
        return None


def validate(cfg: Config) -> None:
    """Check every value against its allowed range; the first problem raises ConfigError with one
    line naming the key, the allowed range and the value given."""
    _check_finite(cfg)
    _validate_model(cfg.model)
    _validate_data(cfg)
    _validate_loss(cfg.loss, cfg.model.sampling_rate)
    _validate_discriminator(cfg.discriminator)
    _validate_optim(cfg.optim)
    _validate_train(cfg.train)
    _check_memory(cfg)


def _check_finite(cfg: Config) -> None:
    """NaN or infinity is never a meaningful setting (a NaN learning rate trains silently to NaN)."""
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            values = value if isinstance(value, tuple) else (value,)
            for v in values:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"config key '{section}.{f.name}' must be a finite number, got {value!r}")


def _each(values: Iterable[Any], ok, key: str, allowed: str) -> None:
    """Check every entry of a list-valued key."""
    for i, v in enumerate(values):
        if not ok(v):
            raise ConfigError(f"config key '{key}' must be {allowed}, got {list(values)!r} (entry {i} is {v!r})")


def _range(value: Any, ok: bool, key: str, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' must be {allowed}, got {value!r}")


def _validate_model(m: ModelConfig) -> None:
    _range(m.sampling_rate, m.sampling_rate > 0, "model.sampling_rate", "> 0 (Hz)")
    _range(m.encoder_dim, m.encoder_dim >= 1, "model.encoder_dim", ">= 1")
    _range(m.decoder_dim, m.decoder_dim >= 1, "model.decoder_dim", ">= 1")
    _each(m.encoder_rates, lambda r: r >= 1, "model.encoder_rates", "a non-empty list of integers >= 1")
    _each(m.decoder_rates, lambda r: r >= 1, "model.decoder_rates", "a non-empty list of integers >= 1")
    _range(m.encoder_rates, len(m.encoder_rates) >= 1, "model.encoder_rates", "a non-empty list of integers >= 1")
    _check(len(m.encoder_rates) == len(m.decoder_rates), "model.decoder_rates",
           "must have as many entries as model.encoder_rates")
    # snac halves the channel count after every decoder block; it must stay at least 1.
    _range(m.decoder_dim, m.decoder_dim >> len(m.decoder_rates) >= 1, "model.decoder_dim",
           f">= 2**len(model.decoder_rates) = {2 ** len(m.decoder_rates)}")
    _range(m.latent_dim, m.latent_dim is None or m.latent_dim >= 1, "model.latent_dim", "null or >= 1")
    _range(m.attn_window_size, m.attn_window_size is None or m.attn_window_size >= 1, "model.attn_window_size",
           "null or >= 1")
    _range(m.codebook_size, m.codebook_size >= 2, "model.codebook_size", ">= 2")
    _range(m.codebook_dim, m.codebook_dim >= 1, "model.codebook_dim", ">= 1")
    _range(m.vq_strides, len(m.vq_strides) >= 1, "model.vq_strides", "a non-empty list of integers >= 1")
    _each(m.vq_strides, lambda r: r >= 1, "model.vq_strides", "a non-empty list of integers >= 1")


# ours: the longest segment accepted. Training crops are ~1 s (paper 0.8 s); a file shorter than the
# segment is zero-padded, so a minute-long segment already trains mostly on padding for speech.
MAX_SEGMENT_SECONDS = 60.0


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    _range(d.batch_size, d.batch_size >= 1, "data.batch_size", ">= 1")
    for key in ("segment_seconds", "val_segment_seconds"):
        value = getattr(d, key)
        _range(value, 0 < value <= MAX_SEGMENT_SECONDS, f"data.{key}", f"in (0, {MAX_SEGMENT_SECONDS:g}] seconds")
    _range(d.num_workers, d.num_workers >= 0, "data.num_workers", ">= 0")
    _range(d.val_items, d.val_items >= 0, "data.val_items", ">= 0")
    _range(d.shuffle_buffer, d.shuffle_buffer >= 1, "data.shuffle_buffer", ">= 1")
    _range(d.loudness_db, d.loudness_db is None or d.loudness_db <= 0, "data.loudness_db", "null or <= 0 (dBFS)")
    _range(d.silence_db, d.silence_db <= 0, "data.silence_db", "<= 0 (dBFS)")
    _range(d.max_silence_retries, d.max_silence_retries >= 0, "data.max_silence_retries", ">= 0")
    _range(d.max_failure_fraction, 0.0 <= d.max_failure_fraction <= 1.0, "data.max_failure_fraction", "in [0, 1]")
    _range(d.max_item_retries, d.max_item_retries >= 0, "data.max_item_retries", ">= 0")
    if d.dataset_weights:
        n = 1 + len(d.extra_datasets)
        _range(d.dataset_weights, len(d.dataset_weights) == n, "data.dataset_weights",
               f"empty or {n} weights (the main dataset, then each of data.extra_datasets)")
        _each(d.dataset_weights, lambda w: w >= 0, "data.dataset_weights", "weights >= 0")
        _range(d.dataset_weights, any(w > 0 for w in d.dataset_weights), "data.dataset_weights",
               "weights with at least one > 0")


def _validate_loss(l: LossConfig, sampling_rate: int) -> None:
    for key in ("mel", "stft", "adversarial", "feature_matching", "commitment", "codebook"):
        _range(getattr(l, key), getattr(l, key) >= 0, f"loss.{key}", ">= 0 (0 turns the term off)")
    _check(len(l.mel_window_lengths) == len(l.mel_n_mels), "loss.mel_n_mels",
           "must have as many entries as loss.mel_window_lengths")
    _each(l.mel_window_lengths, lambda w: w >= 2, "loss.mel_window_lengths", "integers >= 2")
    _each(l.mel_n_mels, lambda n: n >= 1, "loss.mel_n_mels", "integers >= 1")
    _range(l.mel_clamp, l.mel_clamp > 0, "loss.mel_clamp", "> 0")
    nyquist = sampling_rate / 2
    _range(l.mel_fmin, 0 <= l.mel_fmin < nyquist, "loss.mel_fmin", f"in [0, {nyquist:g}) Hz")
    _range(l.mel_fmax, l.mel_fmax is None or l.mel_fmin < l.mel_fmax <= nyquist, "loss.mel_fmax",
           f"null or in (loss.mel_fmin, {nyquist:g}] Hz")
    _check(len(l.stft_fft_sizes) == len(l.stft_hop_sizes) == len(l.stft_win_lengths), "loss.stft_hop_sizes",
           "loss.stft_fft_sizes, stft_hop_sizes and stft_win_lengths must have equal lengths")
    for fft, hop, win in zip(l.stft_fft_sizes, l.stft_hop_sizes, l.stft_win_lengths):
        _range(list(l.stft_win_lengths), 1 <= win <= fft, "loss.stft_win_lengths", "in [1, the matching fft size]")
        _range(list(l.stft_hop_sizes), hop >= 1, "loss.stft_hop_sizes", "integers >= 1")


def _validate_discriminator(dc: DiscriminatorConfig) -> None:
    _each(dc.periods, lambda p: p >= 1, "discriminator.periods", "integers >= 1")
    _each(dc.stft_fft_sizes, lambda n: n >= 4, "discriminator.stft_fft_sizes", "integers >= 4")
    _range(dc.stft_hop_factor, 0 < dc.stft_hop_factor <= 1, "discriminator.stft_hop_factor", "in (0, 1]")
    b = dc.stft_bands
    _range(b, len(b) >= 2 and all(0 <= x <= 1 for x in b) and all(x < y for x, y in zip(b, b[1:])),
           "discriminator.stft_bands", "at least two increasing band edges in [0, 1]")
    _range(dc.stft_channels, dc.stft_channels >= 1, "discriminator.stft_channels", ">= 1")
    _each(dc.mpd_channels, lambda c: c >= 1, "discriminator.mpd_channels", "integers >= 1")
    _range(dc.preprocess_peak, dc.preprocess_peak > 0, "discriminator.preprocess_peak", "> 0")


def _validate_optim(o: OptimConfig) -> None:
    _range(o.lr, o.lr > 0, "optim.lr", "> 0")
    _check(len(o.betas) == 2, "optim.betas", "must have two entries")
    _each(o.betas, lambda b: 0 <= b < 1, "optim.betas", "two numbers in [0, 1)")
    _range(o.eps, o.eps > 0, "optim.eps", "> 0")
    _range(o.weight_decay, o.weight_decay >= 0, "optim.weight_decay", ">= 0")
    _range(o.warmup_steps, o.warmup_steps >= 0, "optim.warmup_steps", ">= 0")
    _range(o.lr_decay, 0 < o.lr_decay <= 1, "optim.lr_decay", "in (0, 1] (per-step factor; 1 = constant)")
    # clip_grad_norm_ with a negative limit flips every gradient: the model would train backwards.
    for name in ("grad_clip_generator", "grad_clip_discriminator"):
        clip = getattr(o, name)
        _range(clip, clip is None or clip > 0, f"optim.{name}", "> 0, or null for no clipping")


def _validate_train(t: TrainConfig) -> None:
    _range(t.precision, t.precision in ("auto", "fp32", "bf16"), "train.precision", "auto, fp32 or bf16")
    _range(t.max_steps, t.max_steps >= 0, "train.max_steps", ">= 0")
    for name in ("log_every", "eval_every", "checkpoint_every", "eval_batches", "keep_last", "max_nonfinite_steps",
                 "dead_code_every"):
        _range(getattr(t, name), getattr(t, name) >= 1, f"train.{name}", ">= 1")
    for name in ("adversarial_start_step", "dead_code_steps", "num_audio_samples", "seed", "collapse_check_after",
                 "codebook_init_iters"):
        _range(getattr(t, name), getattr(t, name) >= 0, f"train.{name}", ">= 0")
    _range(t.codebook_init_batches, t.codebook_init_batches >= 1, "train.codebook_init_batches", ">= 1")
    _range(t.code_replacement, t.code_replacement in ("restart", "usage", None), "train.code_replacement",
           "restart, usage or null (no replacement)")
    _range(t.usage_threshold, t.usage_threshold > 0, "train.usage_threshold", "> 0 (a fraction of the uniform share)")
    _range(t.usage_ema_decay, 0 < t.usage_ema_decay < 1, "train.usage_ema_decay", "in (0, 1)")
    _range(t.replace_max_fraction, 0 < t.replace_max_fraction <= 1, "train.replace_max_fraction", "in (0, 1]")
    _range(t.generator_init, t.generator_init in ("dac", "dac+transposed", "snac"), "train.generator_init",
           "dac, dac+transposed or snac")
    _range(t.codebook_init, t.codebook_init in ("kmeans", "random"), "train.codebook_init", "kmeans or random")
    _range(t.run_dir, bool(t.run_dir), "train.run_dir", "a directory path")
    _range(t.disc_warmup_steps, t.disc_warmup_steps >= 0, "train.disc_warmup_steps", ">= 0")
    _validate_finetune(t)


def _validate_finetune(t: TrainConfig) -> None:
    """A fine-tuning mode and the freeze flags must say the same thing (a contradiction would
    silently train what the mode promises to keep, or the reverse)."""
    _range(t.finetune, t.finetune is None or t.finetune in FINETUNE_MODES, "train.finetune",
           f"{', '.join(FINETUNE_MODES)} or null")
    for key, value in FINETUNE_MODES.get(t.finetune or "", {}).items():
        section, name = key.split(".")
        if section == "train" and getattr(t, name) != value:
            verb = "freezes" if value else "trains"
            part = name[len("freeze_"):]
            raise ConfigError(f"config key '{key}' is {str(not value).lower()}, but train.finetune={t.finetune} "
                              f"{verb} the {part}; drop one of the two")
    _range(t.ddp_timeout_s, t.ddp_timeout_s > 0, "train.ddp_timeout_s", "> 0 (seconds)")


# ours: refuse settings whose activations clearly cannot fit any machine (a typo such as
# segment_seconds=1e6 would otherwise try to allocate terabytes before failing).
MAX_ACTIVATION_BYTES = 1 << 40  # 1 TiB


def activation_bytes_estimate(cfg: Config) -> int:
    """Rough float32 bytes of the generator's saved activations for one training step.

    Every decoder block keeps ~20 tensors (convolutions and Snake activations of its residual
    units) at its own rate and width; the encoder mirrors it. Counted per output sample, times
    the batch's samples. Used only to refuse absurd settings, not to plan memory."""
    m = cfg.model
    per_sample, channels, rate = 0.0, m.decoder_dim, m.hop_length
    for r in m.decoder_rates:
        channels, rate = max(1, channels // 2), rate // r or 1
        per_sample += channels / rate
    tensors_per_block = 20
    floats = 2 * tensors_per_block * per_sample  # encoder + decoder
    return int(4 * floats * cfg.data.batch_size * cfg.segment_length())


def _check_memory(cfg: Config) -> None:
    need = activation_bytes_estimate(cfg)
    if need > MAX_ACTIVATION_BYTES:
        raise ConfigError(f"config keys 'data.segment_seconds' x 'data.batch_size' ({cfg.data.segment_seconds:g} s x "
                          f"{cfg.data.batch_size}) need an estimated {need / 2**30:,.0f} GiB of activations per step; "
                          "reduce them")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r} {message}")


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def load_config(path: Union[str, os.PathLike]) -> Config:
    """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``) config file (safe loader only)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text (a binary file?)") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - parser errors vary by format; report one line
        raise ConfigError(f"cannot parse config file {path}: {str(e).splitlines()[0]}") from None
    return config_from_dict(data or {})


def save_config(cfg: Config, path: Union[str, os.PathLike]) -> None:
    """Write ``cfg`` as JSON or YAML (by extension), atomically."""
    path = os.fspath(path)
    data = cfg.to_dict()
    if path.endswith((".yaml", ".yml")):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".{name}.tmp{os.getpid()}")  # hidden; removed at start if its writer died
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
