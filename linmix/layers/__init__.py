"""Token-mixer layers: one file per mixer, each registered by name for configs.

See :mod:`linmix.layers.base` for the contract every mixer follows.
"""

import importlib
import pkgutil

from linmix.layers.base import MIXERS, LayerState, TokenMixer, get_mixer_class, register_mixer

# Import every mixer module so that each registers itself (a new file needs no edit here).
for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["MIXERS", "LayerState", "TokenMixer", "get_mixer_class", "register_mixer"]
