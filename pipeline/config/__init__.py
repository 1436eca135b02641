"""Configuration: typed sections (``schema``) loaded from YAML with dotted overrides (``load``)."""

from pipeline.config.load import config_from_dict, config_to_dict, load_config, override_config, save_config
from pipeline.config.schema import (
    AugmentConfig,
    ChannelNormConfig,
    ChannelRule,
    Config,
    DataConfig,
    InferenceConfig,
    InputConfig,
    IntensityConfig,
    LossConfig,
    ModelConfig,
    PostprocessConfig,
    PreprocessConfig,
    SamplingConfig,
    SynthConfig,
    TrainConfig,
)

__all__ = [
    "AugmentConfig",
    "ChannelNormConfig",
    "ChannelRule",
    "Config",
    "DataConfig",
    "InferenceConfig",
    "InputConfig",
    "IntensityConfig",
    "LossConfig",
    "ModelConfig",
    "PostprocessConfig",
    "PreprocessConfig",
    "SamplingConfig",
    "SynthConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "override_config",
    "save_config",
]
