"""Flax NNX models: modality encoders, projection heads, GRAM and CoMM models, DAM head.

Public API:
  EncoderConfig (shared trunk) and ImageConfig, AudioConfig, WaveformConfig, TextConfig,
  FeatureConfig, CNNConfig (one per encoder family), PRESETS, build_encoder
                                                   (config.py, factory.py; modality kinds
                                                   are registered in gram_jax.modalities)
  EncoderOutput, ImageEncoder, VideoEncoder, AudioEncoder, WaveformEncoder, TextEncoder,
  FeatureEncoder                                   (encoders.py)
  CNNEncoder                                       (cnn.py)
  ProjectionHead, LearnableTemperature, SigLIPScaleBias, l2_normalize   (heads.py)
  TowerModel (alias GramModel)                     (gram_model.py)
  masked_pairwise_volume                           (re-exported from gram_jax.volume)
  CoMMModel                                        (comm.py)
  MatchingHead                                     (matching.py)
  count_params, param_table                        (factory.py)
"""

from gram_jax.models.cnn import CNNEncoder
from gram_jax.models.comm import CoMMModel, CoMMProjector, InputAdapter
from gram_jax.models.config import (
    PRESETS,
    AudioConfig,
    CNNConfig,
    EncoderConfig,
    FeatureConfig,
    ImageConfig,
    TextConfig,
    WaveformConfig,
)
from gram_jax.models.encoders import (
    AudioEncoder,
    EncoderOutput,
    FeatureEncoder,
    ImageEncoder,
    TextEncoder,
    VideoEncoder,
    WaveformEncoder,
)
from gram_jax.models.factory import build_encoder, count_params, param_table
from gram_jax.models.gram_model import GramModel, TowerModel
from gram_jax.models.heads import (
    LearnableTemperature,
    ProjectionHead,
    SigLIPScaleBias,
    l2_normalize,
)
from gram_jax.models.layers import Attention, Transformer, TransformerBlock
from gram_jax.models.matching import MatchingHead
from gram_jax.volume import masked_pairwise_volume

__all__ = [
    "PRESETS",
    "Attention",
    "AudioConfig",
    "AudioEncoder",
    "CNNConfig",
    "CNNEncoder",
    "CoMMModel",
    "CoMMProjector",
    "EncoderConfig",
    "EncoderOutput",
    "FeatureConfig",
    "FeatureEncoder",
    "GramModel",
    "ImageConfig",
    "ImageEncoder",
    "InputAdapter",
    "LearnableTemperature",
    "MatchingHead",
    "ProjectionHead",
    "SigLIPScaleBias",
    "TextConfig",
    "TextEncoder",
    "TowerModel",
    "Transformer",
    "TransformerBlock",
    "VideoEncoder",
    "WaveformConfig",
    "WaveformEncoder",
    "build_encoder",
    "count_params",
    "l2_normalize",
    "masked_pairwise_volume",
    "param_table",
]
