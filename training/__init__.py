"""SNAC training toolkit: configs, training forward, discriminators, losses, data, training loop."""

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
