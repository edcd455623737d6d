"""linmix: linear attention and hybrid models in PyTorch + Triton."""

from linmix import ops
from linmix.debug import is_debug, set_debug

__version__ = "0.1.0"
__all__ = ["ops", "set_debug", "is_debug", "__version__"]
