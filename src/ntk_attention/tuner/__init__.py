"""The NTK-Attention adapter for transformers models, in PEFT's conventions: a config
(config.py), what is attached to one attention module (layer.py), the attention function
transformers calls (attention.py), the model wrapper (model.py), the file format
(save_load.py), the Hub (hub.py), what PEFT's loaders say of an NTK folder
(peft_interop.py), and reading/writing a layer's state from outside (state_access.py)."""

from . import peft_interop
from .attention import FAMILIES
from .config import NTKConfig
from .discovery import SUPPORTED_ARCHITECTURES, UnsupportedModelError
from .layer import ModulesToSaveWrapper, NTKState
from .model import NTKModel, get_ntk_model
from .routing import BASE_ADAPTER
from .save_load import AdapterLoadError
from .state_access import (
    adapter_feature_map,
    kappa_parameters,
    layer_state,
    read_state,
    write_state,
)

peft_interop.install()

__all__ = [
    "BASE_ADAPTER",
    "FAMILIES",
    "SUPPORTED_ARCHITECTURES",
    "AdapterLoadError",
    "ModulesToSaveWrapper",
    "NTKConfig",
    "NTKModel",
    "NTKState",
    "UnsupportedModelError",
    "adapter_feature_map",
    "get_ntk_model",
    "kappa_parameters",
    "layer_state",
    "read_state",
    "write_state",
]
