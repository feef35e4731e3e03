"""NTK-Attention ops: exact prefix attention, NTK-Attention (lse merge, fused, naive), feature
maps and the state's helpers. Nothing here knows about models."""

from .attention import (
    IMPLEMENTATIONS,
    ntk_attention,
    ntk_attention_fused,
    ntk_attention_lse,
    ntk_attention_naive,
    ntk_attention_unchecked,
)
from .feature_maps import (
    FEATURE_MAPS,
    CallableFeatureMap,
    EluExpFeatureMap,
    EluFeatureMap,
    ExpFeatureMap,
    ExpFeatureView,
    FavorFeatureMap,
    FeatureMap,
    TaylorFeatureMap,
    get_feature_map,
)
from .masks import causal_mask
from .prefix import prefix_attention
from .state import nonnegative, prefix_to_state

__all__ = [
    "FEATURE_MAPS",
    "IMPLEMENTATIONS",
    "CallableFeatureMap",
    "EluExpFeatureMap",
    "EluFeatureMap",
    "ExpFeatureMap",
    "ExpFeatureView",
    "FavorFeatureMap",
    "FeatureMap",
    "TaylorFeatureMap",
    "causal_mask",
    "get_feature_map",
    "nonnegative",
    "ntk_attention",
    "ntk_attention_fused",
    "ntk_attention_lse",
    "ntk_attention_naive",
    "ntk_attention_unchecked",
    "prefix_attention",
    "prefix_to_state",
]
