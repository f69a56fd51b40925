"""SNAC training toolkit: train, run and deploy SNAC multi-scale neural audio codecs.

Public API (everything importable from ``training``); see README.md for the command-line tools.
"""

import importlib
from typing import Any, Dict, List, Tuple

# Public name -> (submodule, attribute). Submodules are imported on first use (PEP 562), so that
# `python -m training.dataset` / `python -m training.tokenize` run their module once, as
# __main__, instead of finding it already imported by this package (runpy's RuntimeWarning).
_EXPORTS: Dict[str, Tuple[str, str]] = {
    "AUDIO_EXTENSIONS": ("audio", "AUDIO_EXTENSIONS"),
    "AudioInfo": ("audio", "AudioInfo"),
    "AudioReadError": ("audio", "AudioReadError"),
    "audio_info": ("audio", "audio_info"),
    "decode_audio": ("audio", "decode_audio"),
    "list_audio_files": ("audio", "list_audio_files"),
    "load_audio": ("audio", "load_audio"),
    "resample": ("audio", "resample"),
    "save_audio": ("audio", "save_audio"),
    "AgreementCounter": ("agreement", "AgreementCounter"),
    "AgreementResult": ("codec.agree", "AgreementResult"),
    "code_agreement": ("codec.agree", "code_agreement"),
    "Codec": ("codec", "Codec"),
    "FrameLayout": ("codec", "FrameLayout"),
    "StreamingDecoder": ("codec", "StreamingDecoder"),
    "CodecError": ("codec", "CodecError"),
    "EncodedAudio": ("codec", "EncodedAudio"),
    "compute_metrics": ("codec", "compute_metrics"),
    "load_codec": ("codec", "load_codec"),
    "load_codes": ("codec", "load_codes"),
    "receptive_field": ("codec", "receptive_field"),
    "save_codes": ("codec", "save_codes"),
    "select_device": ("codec", "select_device"),
    "DATASET_CONFIGS": ("config", "DATASET_CONFIGS"),
    "FINETUNE_MODES": ("config", "FINETUNE_MODES"),
    "apply_finetune_mode": ("config", "apply_finetune_mode"),
    "MODEL_PRESETS": ("config", "MODEL_PRESETS"),
    "Config": ("config", "Config"),
    "ConfigError": ("config", "ConfigError"),
    "DataConfig": ("config", "DataConfig"),
    "DiscriminatorConfig": ("config", "DiscriminatorConfig"),
    "LossConfig": ("config", "LossConfig"),
    "ModelConfig": ("config", "ModelConfig"),
    "OptimConfig": ("config", "OptimConfig"),
    "TrainConfig": ("config", "TrainConfig"),
    "create_snac_24khz_config": ("config", "create_snac_24khz_config"),
    "create_snac_32khz_config": ("config", "create_snac_32khz_config"),
    "create_snac_44khz_config": ("config", "create_snac_44khz_config"),
    "create_training_config": ("config", "create_training_config"),
    "load_config": ("config", "load_config"),
    "save_config": ("config", "save_config"),
    "to_config": ("config", "to_config"),
    "AudioDataset": ("dataset", "AudioDataset"),
    "CombinedAudioDataset": ("dataset", "CombinedAudioDataset"),
    "DatasetError": ("dataset", "DatasetError"),
    "InfiniteLoader": ("dataset", "InfiniteLoader"),
    "StreamingAudioDataset": ("dataset", "StreamingAudioDataset"),
    "build_dataloaders": ("dataset", "build_dataloaders"),
    "collate_audio": ("dataset", "collate_audio"),
    "prepare_dataset": ("dataset", "prepare_dataset"),
    "Discriminator": ("discriminators", "Discriminator"),
    "MultiPeriodDiscriminator": ("discriminators", "MultiPeriodDiscriminator"),
    "MultiScaleSTFTDiscriminator": ("discriminators", "MultiScaleSTFTDiscriminator"),
    "PeriodDiscriminator": ("discriminators", "PeriodDiscriminator"),
    "STFTDiscriminator": ("discriminators", "STFTDiscriminator"),
    "GeneratorLoss": ("losses", "GeneratorLoss"),
    "MelSpectrogramLoss": ("losses", "MelSpectrogramLoss"),
    "MultiResolutionSTFTLoss": ("losses", "MultiResolutionSTFTLoss"),
    "discriminator_loss": ("losses", "discriminator_loss"),
    "feature_matching_loss": ("losses", "feature_matching_loss"),
    "generator_loss": ("losses", "generator_loss"),
    "mel_filterbank": ("losses", "mel_filterbank"),
    "bitrate_kbps": ("metrics", "bitrate_kbps"),
    "codebook_stats": ("metrics", "codebook_stats"),
    "compression_ratio": ("metrics", "compression_ratio"),
    "mel_distance": ("metrics", "mel_distance"),
    "pesq_score": ("metrics", "pesq_score"),
    "si_sdr": ("metrics", "si_sdr"),
    "stft_distance": ("metrics", "stft_distance"),
    "stoi_score": ("metrics", "stoi_score"),
    "token_rates": ("metrics", "token_rates"),
    "DeadCodeRestarter": ("model", "DeadCodeRestarter"),
    "ModelLoadError": ("hub", "ModelLoadError"),
    "TrainOutput": ("model", "TrainOutput"),
    "build_generator": ("model", "build_generator"),
    "export_snac": ("hub", "export_snac"),
    "load_generator": ("hub", "load_generator"),
    "train_forward": ("model", "train_forward"),
    "TrainingError": ("state", "TrainingError"),
    "TrainState": ("state", "TrainState"),
    "evaluate": ("train", "evaluate"),
    "load_checkpoint": ("checkpoint", "load_checkpoint"),
    "save_checkpoint": ("checkpoint", "save_checkpoint"),
    "setup_dataset": ("state", "setup_dataset"),
    "setup_models": ("state", "setup_models"),
    "setup_optimizers": ("state", "setup_optimizers"),
    "train_main": ("train", "train_main"),
    "train_step": ("train", "train_step"),
    "TokenizeSettings": ("tokenize", "Settings"),
    "tokenize_dataset": ("tokenize", "run"),
    "TokenizeError": ("tokenize", "TokenizeError"),
    "flatten_order": ("tokenize", "flatten_order"),
    "load_settings_file": ("tokenize", "load_settings_file"),
}

__all__: List[str] = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))
