"""linmix.models: the language model over the token mixers, as a transformers model.

- :class:`LinmixConfig`: hidden size, number of layers, and which mixer sits at which layer.
- :class:`LinmixModel` / :class:`LinmixForCausalLM`: the pre-norm decoder and its LM head.
- :class:`LinmixCache`: the generation cache (one mixer state per layer).

Importing this package registers model type "linmix" with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(path)`` loads saved models.
Needs ``transformers`` (``pip install linmix[models]``); the rest of linmix does not.

Example:
    >>> import torch
    >>> from linmix.models import LinmixConfig, LinmixForCausalLM
    >>> config = LinmixConfig(vocab_size=97, hidden_size=64, num_layers=4,
    ...                       layers=["gated_deltanet"] * 3 + ["attention"])
    >>> model = LinmixForCausalLM(config).eval()
    >>> logits, cache = model(torch.randint(0, 97, (2, 16)), use_cache=True, return_dict=False)
    >>> logits.shape, len(cache), cache.get_seq_length()  # a cache: one mixer state per layer
    (torch.Size([2, 16, 97]), 4, 16)
    >>> model.generate(torch.randint(0, 97, (2, 16)), max_new_tokens=4, do_sample=False).shape
    torch.Size([2, 20])
"""

try:
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without transformers
    raise ImportError("linmix.models needs the transformers package: pip install linmix[models]") from err

from linmix.models import hf_compat
from linmix.models.cache import LinmixCache
from linmix.models.configuration import LinmixConfig
from linmix.models.modeling import LinmixBlock, LinmixForCausalLM, LinmixModel, LinmixPreTrainedModel

hf_compat.register_auto_classes(LinmixConfig, LinmixModel, LinmixForCausalLM)

__all__ = [
    "LinmixConfig",
    "LinmixModel",
    "LinmixForCausalLM",
    "LinmixPreTrainedModel",
    "LinmixBlock",
    "LinmixCache",
]
