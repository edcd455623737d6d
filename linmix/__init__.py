"""linmix: linear attention and hybrid models in PyTorch + Triton."""

import importlib.util

from linmix import layers, modules, ops, tasks
from linmix.debug import is_debug, set_debug

# With transformers installed (the `models` extra), importing linmix registers LinmixConfig and
# LinmixForCausalLM with the Auto classes, so AutoModelForCausalLM.from_pretrained(path) works.
if importlib.util.find_spec("transformers") is not None:
    from linmix import models  # noqa: F401

__version__ = "0.1.0"
__all__ = ["layers", "modules", "ops", "tasks", "set_debug", "is_debug", "__version__"]
