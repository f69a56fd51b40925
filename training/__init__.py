"""SNAC training toolkit: train, run and deploy SNAC multi-scale neural audio codecs.

Public API (everything importable from ``training``); see README.md for the command-line tools.
"""

from .audio import (
    AUDIO_EXTENSIONS,
    AudioInfo,
    AudioReadError,
    audio_info,
    decode_audio,
    list_audio_files,
    load_audio,
    resample,
    save_audio,
)
from .codec import (
    Codec,
    CodecError,
    EncodedAudio,
    compute_metrics,
    load_codec,
    load_codes,
    receptive_field,
    save_codes,
    select_device,
)
from .config import (
    DATASET_CONFIGS,
    MODEL_PRESETS,
    Config,
    ConfigError,
    DataConfig,
    DiscriminatorConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    create_snac_24khz_config,
    create_snac_32khz_config,
    create_snac_44khz_config,
    create_training_config,
    load_config,
    save_config,
    to_config,
)
from .dataset import (
    AudioDataset,
    CombinedAudioDataset,
    DatasetError,
    InfiniteLoader,
    StreamingAudioDataset,
    build_dataloaders,
    collate_audio,
    prepare_dataset,
)
from .discriminators import (
    Discriminator,
    MultiPeriodDiscriminator,
    MultiScaleSTFTDiscriminator,
    PeriodDiscriminator,
    STFTDiscriminator,
)
from .losses import (
    GeneratorLoss,
    MelSpectrogramLoss,
    MultiResolutionSTFTLoss,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
    mel_filterbank,
)
from .metrics import (
    bitrate_kbps,
    codebook_stats,
    compression_ratio,
    mel_distance,
    pesq_score,
    si_sdr,
    stft_distance,
    stoi_score,
    token_rates,
)
from .model import (
    DeadCodeRestarter,
    ModelLoadError,
    TrainOutput,
    build_generator,
    export_snac,
    load_generator,
    train_forward,
)
from .tokenize import Settings as TokenizeSettings
from .tokenize import TokenizeError, flatten_order, load_settings_file
from .tokenize import run as tokenize_dataset
from .train import (
    TrainingError,
    TrainState,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    setup_dataset,
    setup_models,
    setup_optimizers,
    train_main,
    train_step,
)
