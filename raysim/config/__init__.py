"""Experiment configuration: a typed schema, loaded from YAML and overrides, validated with one clear error.

:mod:`~raysim.config.schema` holds one dataclass per section (``ExperimentConfig`` at the top);
:mod:`~raysim.config.load` merges defaults, a YAML file, ``key=value`` overrides and a study's layers, and names
the file or override and the key of any error; :mod:`~raysim.config.validate` checks ranges and names, one
function per section. This package re-exports what callers outside it use (``from raysim.config import
load_experiment``); its own modules import each other directly.
"""

from raysim.config.load import (
    NOT_RESULTS,
    QUICKSTART,
    first_difference,
    frozen,
    load_experiment,
    load_mapping,
    parse_override,
    result_config,
    result_keys,
    to_yaml,
    with_defaults,
)
from raysim.config.schema import (
    AdaptiveClippingConfig,
    AggregationConfig,
    CheckpointConfig,
    CohortConfig,
    CostsConfig,
    DataConfig,
    EmulatorConfig,
    EvalConfig,
    ExperimentConfig,
    LocalPrivacyConfig,
    MethodOptions,
    MethodsConfig,
    ModelConfig,
    PretrainConfig,
    PrivacyConfig,
    RayConfig,
    SpeedupsConfig,
    TokenizerConfig,
    TrackingConfig,
    TrainConfig,
    split_seed,
)
from raysim.config.synth import GeneratorConfig, SourceConfig, SynthConfig
from raysim.config.validate import non_finite, validate

__all__ = [
    "NOT_RESULTS", "QUICKSTART", "AdaptiveClippingConfig", "AggregationConfig", "CheckpointConfig",
    "CohortConfig", "CostsConfig", "DataConfig", "EmulatorConfig", "EvalConfig", "ExperimentConfig",
    "LocalPrivacyConfig", "MethodOptions", "MethodsConfig", "ModelConfig", "PretrainConfig", "PrivacyConfig",
    "RayConfig", "GeneratorConfig", "SourceConfig", "SynthConfig",
    "SpeedupsConfig", "TokenizerConfig", "TrackingConfig", "TrainConfig", "first_difference", "frozen",
    "load_experiment", "load_mapping", "non_finite", "parse_override", "result_config", "result_keys",
    "split_seed", "to_yaml", "validate", "with_defaults",
]
