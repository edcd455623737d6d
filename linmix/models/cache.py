"""The generation cache of a linmix model: one mixer state per layer.

Every mixer returns its decoding state as a ``dict[str, Tensor]`` whose tensors have a leading
dimension N (the batch, or the number of packed sequences): a fixed-size recurrent state and
conv tails for linear mixers, a growing (or window-bounded) KV cache for attention mixers. The
cache just holds these dicts, indexed by layer, and counts the positions seen so far.

This module does not import transformers: the few attributes ``generate()`` reads are plain
Python (see :mod:`linmix.models.hf_compat` for why each one exists).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

LayerState = dict[str, torch.Tensor]


class LinmixCache:
    """Per-layer mixer states for incremental decoding.

    ``cache[i]`` is layer i's state dict (``None`` before the layer has run). The model fills it
    (``update``) on every forward with ``use_cache=True`` and counts the positions it has consumed
    (``get_seq_length``; with a padded batch the padding counts, as in transformers; after a
    packed prefill it is the longest sequence).

    Args:
        num_layers: number of decoder layers (``config.num_layers``).

    Example:
        >>> import torch
        >>> cache = LinmixCache(2)
        >>> cache.update(0, {"recurrent_state": torch.zeros(3, 4, 8, 8)})
        >>> len(cache), cache.batch_size, cache[1]
        (2, 3, None)
        >>> cache.reorder_cache(torch.tensor([2, 2, 0]))  # beam search picks rows
        >>> cache[0]["recurrent_state"].shape
        torch.Size([3, 4, 8, 8])
    """

    # Read by transformers' generate() (see hf_compat): no torch.compile'd static cache, no rollback.
    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int):
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"LinmixCache: num_layers must be a positive int, got {num_layers!r}")
        self.states: list[LayerState | None] = [None] * num_layers
        self.seen_tokens = 0

    def __repr__(self) -> str:
        filled = sum(s is not None for s in self.states)
        return (f"{type(self).__name__}(num_layers={len(self)}, filled={filled}, seen_tokens={self.seen_tokens}, "
                f"batch_size={self.batch_size})")

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, layer_idx: int) -> LayerState | None:
        return self.states[layer_idx]

    def __iter__(self) -> Iterator[LayerState | None]:
        return iter(self.states)

    def update(self, layer_idx: int, state: LayerState | None) -> None:
        """Store layer ``layer_idx``'s new state (the mixer's returned dict)."""
        if state is not None and not isinstance(state, dict):
            raise TypeError(f"LinmixCache.update: the state of layer {layer_idx} must be a dict of tensors, "
                            f"got {type(state).__name__}")
        self.states[layer_idx] = state

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Positions consumed so far (the same for every layer)."""
        return self.seen_tokens

    @property
    def batch_size(self) -> int | None:
        """N, the leading dimension of the stored states (None while empty)."""
        for state in self.states:
            for t in (state or {}).values():
                if isinstance(t, torch.Tensor):
                    return t.shape[0]
        return None

    @property
    def is_linear(self) -> list[bool]:
        # transformers >= 5.2x asks whether layers are "linear attention" before restarting generation
        # from a passed-in cache; "no" makes it count new tokens from get_seq_length(), as we do.
        return [False] * len(self)

    def state_bytes(self) -> int:
        """Bytes held by the floating tensors of all states."""
        return sum(t.numel() * t.element_size() for state in self.states for t in (state or {}).values()
                   if isinstance(t, torch.Tensor) and t.is_floating_point())

    def _map_rows(self, fn) -> None:
        self.states = [None if state is None else {k: fn(t) if isinstance(t, torch.Tensor) else t
                                                   for k, t in state.items()}
                       for state in self.states]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep rows ``beam_idx`` of every state (beam search)."""
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only rows ``indices`` of every state."""
        self._map_rows(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times (row b becomes rows b*repeats .. b*repeats+repeats-1)."""
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, max_length: int) -> None:
        """Recurrent states cannot forget tokens: only a no-op crop is allowed."""
        if max_length == 0 or max_length >= self.seen_tokens:  # generate() only ever asks for crop(0) / crop(-0)
            return
        raise NotImplementedError("LinmixCache cannot be cropped: a recurrent state cannot drop tokens it has seen")

    def reset(self) -> None:
        """Forget everything (states and position count)."""
        self.states = [None] * len(self)
        self.seen_tokens = 0
