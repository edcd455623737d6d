"""Small reusable nn building blocks for the token-mixer layers.

- :class:`ShortConvolution`: causal depthwise conv over [B, T, D] with a decoding cache and varlen.
- :class:`RMSNorm`, :class:`GatedRMSNorm`: output norms (float32 compute).
- :class:`RotaryEmbedding`: RoPE for q, k [B, T, H, D] with offsets, varlen and partial rotary.
- :class:`SwiGLU`, :class:`MLP`, :func:`get_mlp`: channel mixers.
- feature maps for linear attention and :func:`get_feature_map` (names in ``FEATURE_MAPS``).
"""

from linmix.modules.conv import ShortConvolution
from linmix.modules.feature_maps import (
    FEATURE_MAPS,
    CosFormerFeatureMap,
    CosineFeatureMap,
    DiJiangFeatureMap,
    EluFeatureMap,
    FeatureMap,
    HedgehogFeatureMap,
    IdentityFeatureMap,
    PerformerFeatureMap,
    ReluFeatureMap,
    TaylorFeatureMap,
    dct_matrix,
    get_feature_map,
)
from linmix.modules.mlp import MLP, MLPS, SwiGLU, get_mlp, swiglu_intermediate_size
from linmix.modules.norm import GatedRMSNorm, RMSNorm
from linmix.modules.rotary import RotaryEmbedding

__all__ = [
    "ShortConvolution",
    "RMSNorm",
    "GatedRMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "MLP",
    "MLPS",
    "get_mlp",
    "swiglu_intermediate_size",
    "FeatureMap",
    "IdentityFeatureMap",
    "EluFeatureMap",
    "ReluFeatureMap",
    "TaylorFeatureMap",
    "HedgehogFeatureMap",
    "CosFormerFeatureMap",
    "PerformerFeatureMap",
    "CosineFeatureMap",
    "DiJiangFeatureMap",
    "FEATURE_MAPS",
    "get_feature_map",
    "dct_matrix",
]
