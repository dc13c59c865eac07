"""jsae: sparse autoencoders in JAX, weight-compatible with SAELens.

`import jsae` never imports torch; the PyTorch side (TransformerLens models, DLPack
hand-off) lives in the separate `bridge` package.
"""

from jsae._errors import ConfigError, FormatError, InputError, JsaeError, MissingFileError
from jsae.backends import ExecutionPlan, enable_compilation_cache, resolve_plan, step_compiler_options
from jsae.config import Metadata, SAEConfig
from jsae.neuronpedia import neuronpedia_quick_list, neuronpedia_url
from jsae.sae import SAE
from jsae.saes import ARCHITECTURES, ForwardOutput, InputState, init_params
from jsae.saes.batchtopk import BatchTopKTrainingSAEConfig
from jsae.saes.gated import GatedSAEConfig, GatedTrainingSAEConfig
from jsae.saes.jumprelu import JumpReLUSAEConfig, JumpReLUTrainingSAEConfig
from jsae.saes.matryoshka import MatryoshkaBatchTopKTrainingSAEConfig
from jsae.saes.standard import StandardSAEConfig, StandardTrainingSAEConfig
from jsae.saes.topk import TopKSAEConfig, TopKTrainingSAEConfig
from jsae.saes.transcoder import (
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoderConfig,
    SkipTranscoderConfig,
    TopKSkipTranscoderConfig,
    TopKTranscoderConfig,
    TranscoderConfig,
)
from jsae.saes.transcoder_training import (
    JumpReLUSkipTranscoderTrainingConfig,
    JumpReLUTranscoderTrainingConfig,
    SkipTranscoderTrainingConfig,
    TopKSkipTranscoderTrainingConfig,
    TopKTranscoderTrainingConfig,
    TranscoderTrainingConfig,
)
from jsae.training.config import TrainConfig
from jsae.training.step import TrainState, init_train_state, make_train_step
from jsae.training.sweep import Sweep, make_sweep_step, sweep_configs
from jsae.training.trainer import SweepResult, Trainer, TrainingInterrupted, train

__version__ = "0.1.0"

__all__ = [
    "ExecutionPlan",
    "resolve_plan",
    "BatchTopKTrainingSAEConfig",
    "GatedTrainingSAEConfig",
    "JumpReLUTrainingSAEConfig",
    "MatryoshkaBatchTopKTrainingSAEConfig",
    "StandardTrainingSAEConfig",
    "TopKTrainingSAEConfig",
    "TranscoderTrainingConfig",
    "SkipTranscoderTrainingConfig",
    "JumpReLUTranscoderTrainingConfig",
    "JumpReLUSkipTranscoderTrainingConfig",
    "TopKTranscoderTrainingConfig",
    "TopKSkipTranscoderTrainingConfig",
    "TrainConfig",
    "Sweep",
    "TrainState",
    "SweepResult",
    "Trainer",
    "TrainingInterrupted",
    "enable_compilation_cache",
    "init_train_state",
    "make_sweep_step",
    "make_train_step",
    "step_compiler_options",
    "sweep_configs",
    "train",
    "ARCHITECTURES",
    "ConfigError",
    "ForwardOutput",
    "FormatError",
    "GatedSAEConfig",
    "InputError",
    "InputState",
    "JsaeError",
    "JumpReLUSAEConfig",
    "JumpReLUSkipTranscoderConfig",
    "JumpReLUTranscoderConfig",
    "Metadata",
    "MissingFileError",
    "SAE",
    "SAEConfig",
    "SkipTranscoderConfig",
    "StandardSAEConfig",
    "TopKSAEConfig",
    "TopKTranscoderConfig",
    "TopKSkipTranscoderConfig",
    "TranscoderConfig",
    "__version__",
    "init_params",
    "neuronpedia_quick_list",
    "neuronpedia_url",
]
