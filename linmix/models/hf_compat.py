"""Everything in linmix.models that depends on the details of the transformers API (>= 5.17, < 6).

transformers changes its generation internals between minor releases; this module is the one
place that knows about it, so a new release means reading this file, not the whole model.

What ``generate()`` needs from a custom recurrent model, and what changed (checked against
transformers 5.17.0 and 5.24.0, ``generation/utils.py`` and ``cache_utils.py``):

* **The cache's name.** 5.17 calls the cache ``past_key_values`` everywhere: the model's forward
  argument, the ``CausalLMOutputWithPast`` field that ``_update_model_kwargs_for_generation``
  reads back, and ``generate(past_key_values=...)``. By 5.24 it is ``cache`` (the forward argument,
  the output field and the ``generate`` argument; ``past_key_values`` still works as an argument
  until 5.40 through ``@deprecate_kwarg``). :data:`CACHE_NAME` is whichever the installed
  ``CausalLMOutputWithPast`` has; the model accepts both spellings and writes outputs under
  :data:`CACHE_NAME`.
* **Who creates the cache.** ``generate`` builds a ``DynamicCache`` (a KV cache) unless the model
  class's ``_supports_default_dynamic_cache()`` returns False (true of both versions); then it
  passes no cache to the first forward, our forward creates a :class:`~linmix.models.LinmixCache`
  and returns it, and ``generate`` feeds it back on every later step. Should a future release
  hand us an empty transformers ``Cache`` anyway, :func:`coerce_cache` swaps it for ours.
* **Slicing the inputs.** ``generate`` always holds the full ``input_ids``; since 5.x it tells
  ``prepare_inputs_for_generation`` how many trailing tokens are new (``next_sequence_length``: 1
  per decoding step, ``None`` at prefill unless a filled cache was passed in). Our override uses it
  when given and otherwise slices off ``cache.get_seq_length()`` tokens itself.
* **Attributes generate() reads on a cache it did not create** (ours is duck-typed, not a
  subclass of ``transformers.Cache``, whose constructor and per-layer machinery differ between
  5.17 and 5.24): ``get_seq_length()``; ``is_compileable`` (auto-compile check; False);
  ``is_croppable`` (deferred stop check, 5.24 on mps; False); ``is_linear`` (5.24 ``_prefill``,
  when restarting from a passed-in cache: we report every layer as "not linear", so generate
  computes the new-token count from ``get_seq_length()`` exactly as our own slicing does);
  ``reorder_cache(beam_idx)`` for beam search; ``_is_user_defined`` is set on a cache passed in.
* **Things we switch off.** ``_is_stateful = True`` makes generate refuse assisted decoding (a
  recurrent state cannot be rolled back to a prefix); prefill chunking needs a cache before the
  first forward and is refused by generate for us.
* **Weight init.** Since 5.0, ``from_pretrained`` builds the model on the meta device and calls
  ``_init_weights`` only for weights missing from the checkpoint; the ``transformers.initialization``
  functions skip tensors already flagged ``_is_hf_initialized``, so ``_init_weights`` must use them.
* **Activation checkpointing** is switched by ``gradient_checkpointing_enable()`` in 5.17; 5.24
  renames it ``activation_checkpointing_enable()`` (the old name warns until v6). Both set
  ``gradient_checkpointing`` and ``_gradient_checkpointing_func`` on our LinmixModel; use
  :func:`set_activation_checkpointing` to avoid the warning on either version.
* **Configs** are dataclasses since 5.0 (fields with defaults, ``__post_init__``, ``validate_*``
  methods run by ``huggingface_hub``'s ``@strict``). ``config.layer_types`` is reserved by
  transformers for the attention kind of each layer ("full_attention", "sliding_attention",
  "linear_attention", validated against a fixed list), so the mixer names live elsewhere.
"""

from __future__ import annotations

import logging

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers import initialization as hf_init  # transformers >= 5.0
from transformers.cache_utils import Cache as HFCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

logger = logging.getLogger(__name__)

#: The name of the cache in model inputs and outputs: "past_key_values" (5.17) or "cache" (5.24+).
CACHE_NAME: str = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_CACHE_NAMES = ("cache", "past_key_values")

# Weight-init functions that respect transformers' ``_is_hf_initialized`` flags (see module docstring).
normal_ = hf_init.normal_
zeros_ = hf_init.zeros_
ones_ = hf_init.ones_


def pop_cache_kwarg(kwargs: dict) -> object:
    """Take the cache out of ``kwargs`` under either of its names (see :data:`CACHE_NAME`)."""
    found = {name: kwargs.pop(name) for name in _CACHE_NAMES if kwargs.get(name) is not None}
    for name in _CACHE_NAMES:
        kwargs.pop(name, None)
    if len(found) > 1:
        raise ValueError(f"pass the cache once, as `cache` or `past_key_values`, got both {sorted(found)}")
    return next(iter(found.values()), None)


def coerce_cache(cache: object, cache_cls: type, num_layers: int) -> object:
    """Return ``cache`` if it is a ``cache_cls``; an empty transformers ``Cache`` becomes a fresh one.

    ``generate()`` creates a KV ``DynamicCache`` for models that do not opt out; we opt out, but a
    future release might not ask. An empty one carries no information, so it is safe to replace.
    """
    if cache is None or isinstance(cache, cache_cls):
        return cache
    if isinstance(cache, HFCache) and cache.get_seq_length() == 0:
        logger.debug("replacing an empty %s with a %s", type(cache).__name__, cache_cls.__name__)
        return cache_cls(num_layers)
    raise TypeError(f"the cache must be a {cache_cls.__name__} (one state per layer), got {type(cache).__name__}; "
                    f"generate() creates one for you, or start from {cache_cls.__name__}(config.num_layers)")


def base_model_output(last_hidden_state: torch.Tensor, cache: object,
                      hidden_states: tuple[torch.Tensor, ...] | None) -> BaseModelOutputWithPast:
    return BaseModelOutputWithPast(last_hidden_state=last_hidden_state, hidden_states=hidden_states,
                                   **{CACHE_NAME: cache})


def causal_lm_output(loss: torch.Tensor | None, logits: torch.Tensor, cache: object,
                     hidden_states: tuple[torch.Tensor, ...] | None) -> CausalLMOutputWithPast:
    return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden_states, **{CACHE_NAME: cache})


def output_cache(outputs: BaseModelOutputWithPast | CausalLMOutputWithPast) -> object:
    """The cache field of a model output, whatever this transformers version calls it."""
    return getattr(outputs, CACHE_NAME)


def set_activation_checkpointing(model: torch.nn.Module, enable: bool = True) -> None:
    """Turn activation (gradient) checkpointing of a PreTrainedModel on or off, on any 5.x."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    getattr(model, f"{prefix}_checkpointing_{'enable' if enable else 'disable'}")()


def register_auto_classes(config_cls: type, model_cls: type, causal_lm_cls: type) -> None:
    """Make ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` know model_type "linmix"."""
    # exist_ok: registering twice (a reloaded module) replaces the entry instead of raising
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModel.register(config_cls, model_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, causal_lm_cls, exist_ok=True)
