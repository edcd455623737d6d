"""The linmix language model: a pre-norm decoder whose token mixer is chosen per layer.

    tokens -> embed_tokens -> N x Block -> norm -> lm_head -> logits

    Block(x):  x = x + mixer(mixer_norm(x))     # any registered TokenMixer: GLA, Mamba-2, attention, ...
               x = x + mlp(mlp_norm(x))          # SwiGLU by default; absent with config.mlp = None

Which mixer sits at which layer is data (``LinmixConfig.layers``). Everything a sequence carries
from one step to the next lives in the mixers' state dicts, which the model threads through a
:class:`~linmix.models.cache.LinmixCache`. Padded batches (``attention_mask``) and packed
sequences (``cu_seqlens``) are handed to the mixers, which make them exact; the model itself is
position-free (positions, where needed, are the attention mixers' business).

The transformers-specific glue (cache naming, generate() hooks) is in :mod:`.hf_compat`.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from transformers import GenerationMixin, PreTrainedModel

from linmix.models import hf_compat
from linmix.models.cache import LayerState, LinmixCache
from linmix.models.configuration import LinmixConfig
from linmix.modules import RMSNorm, get_mlp
from linmix.parallel.context import SequenceParallel, ShardLayout, current_sequence_parallel, resolve_shard
from linmix.parallel.loss import causal_lm_loss

logger = logging.getLogger(__name__)

# Extra forward keywords that transformers may send and that carry nothing for this model.
_IGNORED_KWARGS = ("position_ids", "cache_position", "output_attentions")


class LinmixBlock(nn.Module):
    """One pre-norm decoder block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: LinmixConfig, layer_idx: int):
        super().__init__()
        mixer_cls, mixer_kwargs = config.mixer_init(layer_idx)
        self.layer_idx = layer_idx
        self.mixer_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        try:
            self.mixer = mixer_cls(hidden_size=config.hidden_size, layer_idx=layer_idx, **mixer_kwargs)
        except (ValueError, TypeError) as err:
            raise ValueError(f"layer {layer_idx} ({config.mixer_types[layer_idx]!r}): {err}") from err
        # mark the mixer's modules for _init_weights; a mixer class with `_keep_init = True` keeps
        # its constructor's init entirely
        mark = "keep" if getattr(self.mixer, "_keep_init", False) else "linear"
        for module in self.mixer.modules():
            module._linmix_mixer_part = mark
        if config.mlp is None:
            self.mlp_norm, self.mlp = None, None
        else:
            self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
            self.mlp = get_mlp(config.mlp, config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states: torch.Tensor, state: LayerState | None = None, use_cache: bool = False,
                cu_seqlens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerState | None]:
        # (positional arguments only: reentrant activation checkpointing cannot pass keywords)
        mixed, new_state = self.mixer(self.mixer_norm(hidden_states), state=state, use_cache=use_cache,
                                      cu_seqlens=cu_seqlens, attention_mask=attention_mask)
        hidden_states = hidden_states + mixed
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.mlp_norm(hidden_states))
        return hidden_states, new_state


class LinmixPreTrainedModel(PreTrainedModel):
    config_class = LinmixConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LinmixBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]  # accelerate: the cache is no tensor
    _is_stateful = True  # generate(): no assisted decoding (a recurrent state cannot be rolled back)

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) embeddings and linear weights, zero biases, unit norms.

        Inside a mixer only the ``nn.Linear`` *weights* are redrawn (so the whole model shares one
        scale); mixer biases, convolutions, decay parameters (A_log, dt_bias, ...), feature maps and
        norms keep the paper-specific init of the mixer's constructor, and a mixer class that sets
        ``_keep_init = True`` keeps all of it.
        """
        std = self.config.initializer_range
        mixer_part = getattr(module, "_linmix_mixer_part", None)
        if mixer_part is not None:
            if mixer_part == "linear" and isinstance(module, nn.Linear):
                hf_compat.normal_(module.weight, mean=0.0, std=std)
            return
        if isinstance(module, (nn.Linear, nn.Embedding)):
            hf_compat.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                hf_compat.zeros_(module.bias)
        elif isinstance(module, RMSNorm) and module.weight is not None:
            hf_compat.ones_(module.weight)


class LinmixModel(LinmixPreTrainedModel):
    """The decoder without its LM head: token ids -> final hidden states [B, T, D]."""

    def __init__(self, config: LinmixConfig):
        super().__init__(config)
        config.check()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LinmixBlock(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.gradient_checkpointing = False  # switched by gradient_checkpointing_enable()
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None, *,
                cache: LinmixCache | None = None, past_key_values: LinmixCache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                cu_seqlens: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, sequence_parallel: SequenceParallel | ShardLayout | None = None,
                **kwargs):
        """Run the decoder.

        Args:
            input_ids: [B, T] token ids (or pass ``inputs_embeds`` [B, T, D]).
            attention_mask: [B, T] 1 for real tokens, 0 for padding (left or right); during
                generation it may cover the cached positions too ([B, past + T]), and only its
                last T columns are used. A mask without zeros is dropped (the fast path).
            cache / past_key_values: a :class:`LinmixCache` from a previous call (either name).
            use_cache: update and return the cache; default ``config.use_cache`` in eval mode
                and False in training mode.
            cu_seqlens: int [N+1] offsets of N sequences packed along T (B must be 1); the
                returned cache then holds N rows.
            output_hidden_states: also return the embeddings and every block's output (the last
                one after the final norm).
            return_dict: return a ``BaseModelOutputWithPast`` (default) or a tuple.
            sequence_parallel: run sequence-parallel (:mod:`linmix.parallel`): ``input_ids`` is this
                rank's shard [B, T_local] of the sequence and ``cu_seqlens`` (if any) the global
                offsets; default: the innermost ``with sp:`` block, if any. No cache, no padding.

        Returns:
            ``BaseModelOutputWithPast`` with ``last_hidden_state`` [B, T, D] and the cache.
        """
        self._reject_kwargs(kwargs)
        cache = hf_compat.pop_cache_kwarg({"cache": cache, "past_key_values": past_key_values})
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LinmixModel: pass exactly one of input_ids [B, T] and inputs_embeds [B, T, D]")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if hidden_states.dim() != 3:
            raise ValueError(f"LinmixModel: input_ids must be [B, T] (inputs_embeds [B, T, D]), "
                             f"got {list(hidden_states.shape[:-1])}")
        B, T = hidden_states.shape[:2]
        num_layers = len(self.layers)
        shard = _resolve_shard(sequence_parallel, B, T, cu_seqlens)
        if shard is not None:
            if use_cache or cache is not None:
                raise ValueError("LinmixModel: sequence parallelism runs whole sharded sequences without a cache; "
                                 "pass use_cache=False and no cache")
            use_cache = False
            cu_seqlens = shard.cu_seqlens(hidden_states.device)  # the local pieces of the packed sequences

        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and self.gradient_checkpointing and self.training:
            logger.warning("LinmixModel: use_cache=True is incompatible with gradient checkpointing; turning it off")
            use_cache = False
        cache = hf_compat.coerce_cache(cache, LinmixCache, num_layers)
        if cache is not None and len(cache) != num_layers:
            raise ValueError(f"LinmixModel: the cache has {len(cache)} layers, the model {num_layers}")
        if cache is None and use_cache:
            cache = LinmixCache(num_layers)
        seen = 0 if cache is None else cache.get_seq_length()
        attention_mask = _current_padding_mask(attention_mask, B, T, seen, cu_seqlens)
        if shard is not None and attention_mask is not None:
            raise ValueError("LinmixModel: sequence parallelism takes packed sequences (cu_seqlens), not padding")
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"LinmixModel: with cu_seqlens the batch must be one packed row, got B={B}")
            num_rows = cu_seqlens.numel() - 1
        else:
            num_rows = B
        if cache is not None and cache.batch_size not in (None, num_rows):
            raise ValueError(f"LinmixModel: the cache holds {cache.batch_size} sequences but the input has "
                             f"{num_rows}")

        checkpoint = None
        if self.gradient_checkpointing and self.training:
            checkpoint = getattr(self, "_gradient_checkpointing_func", None) or functools.partial(
                torch.utils.checkpoint.checkpoint, use_reentrant=False)
        all_hidden_states = () if output_hidden_states else None
        for i, block in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            state = None if cache is None else cache[i]
            args = (hidden_states, state, use_cache, cu_seqlens, attention_mask)
            run = block.__call__ if shard is None else shard.bind(block.__call__)  # (re-entered on recompute)
            hidden_states, new_state = checkpoint(run, *args) if checkpoint else run(*args)
            if use_cache:
                cache.update(i, new_state)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        if use_cache:
            cache.seen_tokens += T if cu_seqlens is None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        else:
            cache = None
        out = hf_compat.base_model_output(hidden_states, cache, all_hidden_states)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return out if return_dict else out.to_tuple()

    @staticmethod
    def _reject_kwargs(kwargs: dict) -> None:
        if kwargs.get("output_attentions"):
            raise ValueError("LinmixModel: output_attentions is not supported (most mixers have no attention matrix)")
        unknown = sorted(set(kwargs) - set(_IGNORED_KWARGS))
        if unknown:
            raise TypeError(f"LinmixModel.forward got unexpected keyword arguments {unknown}")


def _resolve_shard(sequence_parallel: SequenceParallel | ShardLayout | None, B: int, T: int,
                   cu_seqlens: torch.Tensor | None) -> ShardLayout | None:
    """The shard layout of a sequence-parallel forward (explicit or from ``with sp:``), else None."""
    if sequence_parallel is None and current_sequence_parallel() is None:
        return None
    return resolve_shard(sequence_parallel, B, T, cu_seqlens)


def _current_padding_mask(attention_mask: torch.Tensor | None, B: int, T: int, seen: int,
                          cu_seqlens: torch.Tensor | None) -> torch.Tensor | None:
    """The [B, T] padding mask of the current tokens, or None when nothing is padded."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or attention_mask.shape[0] != B \
            or attention_mask.shape[1] not in (T, seen + T):
        got = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        want = f"[B, T] = [{B}, {T}]" + (f" or [B, past + T] = [{B}, {seen + T}]" if seen else "")
        raise ValueError(f"LinmixModel: attention_mask must be a 2-D padding mask of shape {want}, got {got}")
    attention_mask = attention_mask[:, attention_mask.shape[1] - T:]
    if bool(attention_mask.all()):  # no padding: let the mixers take their unmasked fast path
        return None
    if cu_seqlens is not None:
        raise ValueError("LinmixModel: pass either attention_mask with padding or cu_seqlens (packed), not both")
    return attention_mask


class LinmixForCausalLM(LinmixPreTrainedModel, GenerationMixin):
    """:class:`LinmixModel` plus a language-modelling head (tied to the embeddings by default).

    Example:
        >>> import torch
        >>> from linmix.models import LinmixConfig, LinmixForCausalLM
        >>> config = LinmixConfig(vocab_size=97, hidden_size=64, num_layers=2, layers=["gla"])
        >>> model = LinmixForCausalLM(config).eval()
        >>> ids = torch.randint(0, 97, (2, 10))
        >>> model(ids, labels=ids).logits.shape
        torch.Size([2, 10, 97])
        >>> model.generate(ids, max_new_tokens=5, do_sample=False).shape
        torch.Size([2, 15])
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LinmixConfig):
        super().__init__(config)
        self.model = LinmixModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None, *,
                cache: LinmixCache | None = None, past_key_values: LinmixCache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, cu_seqlens: torch.Tensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, sequence_parallel: SequenceParallel | ShardLayout | None = None,
                **kwargs):
        """Logits (and the next-token loss with ``labels``).

        Args: as :meth:`LinmixModel.forward`, plus
            labels: [B, T] targets; the loss is the cross-entropy of logits[:, t] against
                labels[:, t + 1] (the shift happens here), ignoring -100. With ``cu_seqlens`` the
                first token of each packed sequence is not predicted from the previous sequence.
            logits_to_keep: int n > 0 computes logits for the last n positions only (generate()
                passes 1); a 1-D tensor selects positions; 0 = all. ``num_logits_to_keep`` is
                accepted as an alias.
            num_items_in_batch (keyword): if given (the transformers Trainer does), the loss is the
                sum over target tokens divided by it, instead of their mean.
            sequence_parallel: as in :meth:`LinmixModel.forward`; ``labels`` is then this rank's shard
                too, and the loss (:func:`linmix.parallel.causal_lm_loss`) has the value of the
                global loss and this rank's share as its gradient.

        Returns:
            ``CausalLMOutputWithPast`` with ``loss``, ``logits`` [B, T', V] and the cache.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if "num_logits_to_keep" in kwargs:
            logits_to_keep = kwargs.pop("num_logits_to_keep")
        inputs = input_ids if input_ids is not None else inputs_embeds
        shard = None if inputs is None else _resolve_shard(sequence_parallel, *inputs.shape[:2], cu_seqlens)
        outputs = self.model(input_ids, attention_mask, cache=cache, past_key_values=past_key_values,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, cu_seqlens=cu_seqlens,
                             output_hidden_states=output_hidden_states, return_dict=True, sequence_parallel=shard,
                             **kwargs)
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool):
            if logits_to_keep < 0:
                raise ValueError(f"LinmixForCausalLM: logits_to_keep must be >= 0, got {logits_to_keep}")
            keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        else:
            keep = logits_to_keep
        if labels is not None and keep != slice(None):
            raise ValueError("LinmixForCausalLM: labels need the logits of every position; do not pass "
                             "logits_to_keep with labels")
        logits = self.lm_head(hidden_states[:, keep])
        if labels is None:
            loss = None
        elif shard is not None:
            loss = causal_lm_loss(logits, labels, shard, num_items_in_batch)
        else:
            loss = self.loss(logits, labels, cu_seqlens, num_items_in_batch)
        out = hf_compat.causal_lm_output(loss, logits, hf_compat.output_cache(outputs), outputs.hidden_states)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return out if return_dict else out.to_tuple()

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
             num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        """Next-token cross-entropy (at least float32) of logits [B, T, V] against labels [B, T] (shifted here)."""
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"LinmixForCausalLM: labels must have shape [B, T] = {list(logits.shape[:2])}, "
                             f"got {list(labels.shape)}")
        targets = labels[:, 1:].to(logits.device)
        if cu_seqlens is not None and cu_seqlens.numel() > 2:
            # the token at a sequence start is not the continuation of the previous sequence
            targets = targets.clone()
            targets[:, cu_seqlens[1:-1].to(device=targets.device, dtype=torch.long) - 1] = -100
        reduction = "mean" if num_items_in_batch is None else "sum"
        logits = logits[:, :-1].flatten(0, 1)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits: float32 loss
        loss = F.cross_entropy(logits, targets.flatten(), ignore_index=-100, reduction=reduction)
        return loss if num_items_in_batch is None else loss / num_items_in_batch

    # -- generate() hooks (transformers-version notes in hf_compat) ---------------------------

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a KV DynamicCache: our forward creates a LinmixCache

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, next_sequence_length: int | None = None,
                                      attention_mask: torch.Tensor | None = None,
                                      inputs_embeds: torch.Tensor | None = None,
                                      is_first_iteration: bool | None = False, **kwargs) -> dict:
        """The forward inputs of one generate() step: only the tokens the cache has not seen."""
        cache = hf_compat.pop_cache_kwarg(kwargs)
        seen = 0 if cache is None else cache.get_seq_length()
        inputs: dict = {}
        if inputs_embeds is not None and seen == 0:  # prompt given as embeddings: used for the prefill only
            inputs["inputs_embeds"] = inputs_embeds
        elif next_sequence_length is not None:
            inputs["input_ids"] = input_ids[:, input_ids.shape[1] - next_sequence_length:]
        elif seen and input_ids.shape[1] > seen:
            inputs["input_ids"] = input_ids[:, seen:]
        else:
            inputs["input_ids"] = input_ids
        if cache is not None:
            inputs[hf_compat.CACHE_NAME] = cache
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask  # full length: forward keeps the last T columns
        for key in ("labels", "position_ids", "cache_position", "token_type_ids"):
            kwargs.pop(key, None)
        inputs.update(kwargs)  # use_cache, logits_to_keep, output_hidden_states, ...
        return inputs
