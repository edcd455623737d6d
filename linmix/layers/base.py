"""What every token mixer shares: the forward contract, its state, padding, the mixer registry.

A token mixer maps x [B, T, D] to y [B, T, D]::

    y, new_state = mixer(x, state=None, use_cache=False, cu_seqlens=None, attention_mask=None)

* ``state`` is the mixer's decoding state from a previous call, a ``dict[str, Tensor]`` whose
  tensors have a leading dimension N (B, or the number of packed sequences with ``cu_seqlens``):
  recurrent states ([N, H, K, V], float32), short-convolution tails ([N, W-1, D]), a KV cache
  ([N, L, H_kv, D]) with its key mask ([N, L]) and a position counter. ``None`` = start of sequence.
* ``use_cache=True`` returns the state after the last token (else ``None`` is returned).
* ``cu_seqlens`` packs N sequences along T (B == 1); nothing crosses a sequence boundary.
* ``attention_mask`` [B, T] marks real tokens (1) and padding (0), left or right. Recurrent mixers
  neutralise padded steps (zero key/value, no decay, zero beta, zeroed conv input) so a padded row
  gives the same outputs on its real tokens and the same state as the sequence alone; attention
  mixers mask padded keys (and remember the mask in their cache).

Prefill/training and decoding share one code path: the ops pick their chunked or recurrent form
from T (``backend="auto"``), so decoding token by token equals one full forward.

Helpers the mixers share live here too: argument checks (:func:`check_positive_int`,
:func:`check_positive_float`, :func:`resolve_head_dim`), the state check (:func:`check_state`),
positions that count real tokens (:func:`token_positions`) and the short convolutions' tails
(:func:`apply_short_conv`, :func:`conv_state_shapes`, :func:`conv_state_bytes`).

Sequence parallelism (:mod:`linmix.parallel`) runs a mixer on one shard of a longer sequence
without the mixer knowing: while a :class:`SequenceShard` is active (:func:`use_sequence_shard`),
:func:`token_positions` and the attention layers count positions from the shard's global offsets,
:func:`apply_short_conv` continues from the previous shard's boundary tokens, and the ops turn
into their shard-aware forms (through :mod:`linmix.ops.dispatch`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from linmix.modules import ShortConvolution

LayerState = dict[str, torch.Tensor]

MIXERS: dict[str, type["TokenMixer"]] = {}


def register_mixer(name: str) -> Callable[[type["TokenMixer"]], type["TokenMixer"]]:
    """Class decorator: make a mixer available to configs under ``name``."""

    def wrap(cls: type[TokenMixer]) -> type[TokenMixer]:
        if name in MIXERS and MIXERS[name] is not cls:
            raise ValueError(f"mixer name {name!r} is already registered by {MIXERS[name].__name__}")
        MIXERS[name] = cls
        cls.mixer_name = name
        return cls

    return wrap


def get_mixer_class(name: str) -> type["TokenMixer"]:
    """The mixer class registered under ``name``, with a clear error listing the valid names."""
    try:
        return MIXERS[name]
    except KeyError:
        raise ValueError(f"unknown mixer {name!r}; available: {sorted(MIXERS)}") from None


class TokenMixer(nn.Module):
    """Base class of the token mixers in :mod:`linmix.layers` (see the module docstring)."""

    mixer_name: str = ""

    def __init__(self, hidden_size: int, layer_idx: int | None = None):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"{type(self).__name__}: hidden_size must be a positive int, got {hidden_size!r}")
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx

    def state_bytes(self, context_len: int, batch_size: int = 1) -> int:
        """Bytes of decoding state after ``context_len`` tokens (fixed for recurrent mixers)."""
        raise NotImplementedError

    def check_input(self, x: torch.Tensor, attention_mask: torch.Tensor | None,
                    cu_seqlens: torch.Tensor | None) -> None:
        """Shape checks shared by every mixer's forward."""
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name}: x must be a floating tensor of shape [B, T, {self.hidden_size}]")
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"{name}: x must have shape [B, T, hidden_size={self.hidden_size}], "
                             f"got {list(x.shape)}")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or list(attention_mask.shape) != list(x.shape[:2]):
                got = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
                raise ValueError(f"{name}: attention_mask must have shape [B, T] = {list(x.shape[:2])}, got {got}")
            if cu_seqlens is not None:
                raise ValueError(f"{name}: pass either attention_mask (padded batch) or cu_seqlens (packed), "
                                 "not both")


def mask_steps(attention_mask: torch.Tensor | None, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Zero every [B, T, ...] tensor at padded steps (attention_mask == 0); identity without a mask.

    Zero keys/values write nothing into a recurrent state, a zero log-gate does not decay it and a
    zero beta makes the delta-rule step the identity, so padded steps leave the state untouched.
    """
    if attention_mask is None:
        return list(tensors)
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        m = attention_mask.to(device=t.device, dtype=t.dtype)
        out.append(t * m.reshape(*m.shape, *([1] * (t.dim() - 2))))
    return out


def num_sequences(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    """N: the leading dimension of state tensors for this input."""
    return x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1


# -- sequence parallelism: what a mixer asks of the shard it runs on -------------------------------

class SequenceShard(Protocol):
    """The part of a longer sequence that a mixer's input is (implemented by ``linmix.parallel.ShardLayout``)."""

    def position_offsets(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Global position [N] (int64) of each local sequence's first token."""

    def short_conv_cache(self, x: torch.Tensor, cache_len: int) -> torch.Tensor | None:
        """The ``cache_len`` inputs [N, cache_len, C] before each local sequence (zeros at a sequence start)."""


_SEQUENCE_SHARD: ContextVar[SequenceShard | None] = ContextVar("linmix_sequence_shard", default=None)


def sequence_shard() -> SequenceShard | None:
    """The shard the mixers run on under sequence parallelism, or None."""
    return _SEQUENCE_SHARD.get()


@contextlib.contextmanager
def use_sequence_shard(shard: SequenceShard | None) -> Iterator[None]:
    """Within the block, mixers run on ``shard`` (None: on whole sequences)."""
    token = _SEQUENCE_SHARD.set(shard)
    try:
        yield
    finally:
        _SEQUENCE_SHARD.reset(token)


def reject_padding_on_shard(attention_mask: torch.Tensor | None) -> None:
    """Raise if a padding mask comes with a sharded input (shards hold packed sequences instead)."""
    if attention_mask is not None:
        raise ValueError("sequence parallelism takes packed sequences (cu_seqlens), not a padding attention_mask")


# -- helpers shared by the mixers ------------------------------------------------------------------

def check_positive_int(cls: str, name: str, value: object) -> int:
    """Raise a ValueError naming ``name`` (of mixer ``cls``) unless ``value`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{cls}: {name} must be a positive int, got {value!r}")
    return value


def check_positive_float(cls: str, name: str, value: object) -> float:
    """Raise a ValueError naming ``name`` (of mixer ``cls``) unless ``value`` is a positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{cls}: {name} must be a positive number, got {value!r}")
    return float(value)


def resolve_head_dim(cls: str, hidden_size: int, num_heads: int, head_dim: int | None) -> int:
    """``head_dim``, or ``hidden_size // num_heads`` when it is None (then num_heads must divide hidden_size)."""
    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError(f"{cls}: num_heads ({num_heads}) must divide hidden_size ({hidden_size}) when "
                             "head_dim is not given")
        head_dim = hidden_size // num_heads
    return check_positive_int(cls, "head_dim", head_dim)


def resolve_attention_heads(cls: str, hidden_size: int, num_heads: int, num_kv_heads: int | None,
                            head_dim: int | None) -> tuple[int, int]:
    """(num_kv_heads, head_dim) of an attention-shaped mixer with grouped KV heads, checked.

    ``num_kv_heads`` None means one per query head; it must divide ``num_heads``; ``head_dim`` as in
    :func:`resolve_head_dim`.
    """
    check_positive_int(cls, "num_heads", num_heads)
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    check_positive_int(cls, "num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(f"{cls}: num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
    return num_kv_heads, resolve_head_dim(cls, hidden_size, num_heads, head_dim)


def resolve_rotary_dim(cls: str, rotary_dim: int | None, head_dim: int, use_rope: bool) -> int:
    """``rotary_dim`` (None: ``head_dim``), checked to be an even int in [2, head_dim] when rotary is used."""
    rotary_dim = head_dim if rotary_dim is None else rotary_dim
    if use_rope and (isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim < 2
                     or rotary_dim % 2 or rotary_dim > head_dim):
        raise ValueError(f"{cls}: rotary_dim must be an even int in [2, head_dim={head_dim}], got {rotary_dim!r}")
    return rotary_dim


def check_state(cls: str, state: object, shapes: Mapping[str, list[int | str | None]]) -> LayerState | None:
    """Check a decoding state passed back in: a dict holding exactly the keys of ``shapes``, each a
    tensor of that shape. Returns ``state`` (``None`` passes: the start of a sequence).

    In a shape an int must match, ``None`` matches any size, and a name (str) matches any size that
    is the same wherever that name appears (e.g. the length L shared by a KV cache and its mask).

    Example:
        >>> check_state("Mixer", {"k": torch.zeros(2, 5, 4), "mask": torch.ones(2, 5)},
        ...             {"k": [2, "L", 4], "mask": [2, "L"]})["k"].shape
        torch.Size([2, 5, 4])
    """
    if state is None:
        return None
    if not isinstance(state, dict):
        raise TypeError(f"{cls}: state must be None or the dict returned by a previous call with use_cache=True, "
                        f"got {type(state).__name__}")
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise ValueError(f"{cls}: state is missing {missing} (expected keys {sorted(shapes)}), "
                         f"got keys {sorted(state)}")
    extra = sorted(set(state) - set(shapes))
    if extra:
        raise ValueError(f"{cls}: state has unexpected keys {extra} (expected keys {sorted(shapes)})")
    named: dict[str, tuple[int, str]] = {}  # dim name -> (size, first key with it)
    for key, want in shapes.items():
        t = state[key]
        ok = isinstance(t, torch.Tensor) and t.dim() == len(want)
        for w, size in zip(want, t.shape if ok else ()):
            if isinstance(w, str):
                ok = ok and named.setdefault(w, (size, key))[0] == size
            elif w is not None:
                ok = ok and w == size
        if not ok:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            shown = "[" + ", ".join("*" if w is None else str(w) for w in want) + "]"
            same = "".join(f"; {w} = {named[w][0]} as in state[{named[w][1]!r}]"
                           for w in dict.fromkeys(want) if isinstance(w, str) and w in named and named[w][1] != key)
            raise ValueError(f"{cls}: state[{key!r}] must have shape {shown} (leading dim = number of sequences"
                             f"{same}), got {got}")
    return state


def token_positions(B: int, T: int, *, offset: torch.Tensor | None, attention_mask: torch.Tensor | None,
                    cu_seqlens: torch.Tensor | None,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, T] (int64) that count real tokens only, and the position counter after them.

    * packed (``cu_seqlens``, B == 1): position = index inside its sequence + ``offset[sequence]``;
    * padded (``attention_mask``): position = ``offset[b]`` + number of real tokens before it in
      the row (a padded step repeats the position of the real token before it, clamped at 0);
    * otherwise ``offset[b] + t``.

    So a padded row or a packed sequence gets the positions it would have alone.

    Args:
        offset: int64 [N], tokens already seen per sequence (the position counter of a state);
            ``None`` = 0 (the start of every sequence).

    Returns:
        (positions [B, T] int64, next offset [N] int64 = offset + real tokens in this call).

    Example:
        >>> pos, nxt = token_positions(2, 3, offset=None, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
        ...                            cu_seqlens=None, device=torch.device("cpu"))
        >>> pos.tolist(), nxt.tolist()
        ([[0, 0, 1], [0, 1, 2]], [2, 3])
    """
    shard = sequence_shard()
    if offset is None and shard is not None:  # a shard of a longer sequence: global positions
        reject_padding_on_shard(attention_mask)
        offset = shard.position_offsets(device)

    def start(n: int) -> torch.Tensor:
        if offset is None:
            return torch.zeros(n, dtype=torch.long, device=device)
        return offset.to(device=device, dtype=torch.long)

    t = torch.arange(T, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        lengths = cu[1:] - cu[:-1]
        first = start(lengths.numel())
        seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=T)
        return (t - cu[seq] + first[seq])[None], first + lengths
    first = start(B)
    if attention_mask is not None:
        counts = (attention_mask != 0).to(device=device, dtype=torch.long).cumsum(1)
        return (first[:, None] + counts - 1).clamp_min(0), first + counts[:, -1]
    return first[:, None] + t[None], first + T


def apply_short_conv(conv: ShortConvolution, key: str, x: torch.Tensor, *, past: LayerState | None,
                     new_state: LayerState, use_cache: bool, cu_seqlens: torch.Tensor | None,
                     attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Run a mixer's short convolution on x [B, T, C], continuing from its tail ``past[key]``.

    Padded steps are zeroed before the convolution (``attention_mask``); with ``use_cache`` the
    new tail [N, W-1, C] is stored in ``new_state[key]``. Under sequence parallelism the
    convolution continues from the previous shard's last W-1 inputs. Returns the convolved x.
    """
    cache = None if past is None else past.get(key)
    shard = sequence_shard()
    if shard is not None and cache is None:
        reject_padding_on_shard(attention_mask)
        cache = shard.short_conv_cache(x, conv.cache_len)
    y, tail = conv(x, cache=cache, output_cache=use_cache, cu_seqlens=cu_seqlens, mask=attention_mask)
    if use_cache:
        new_state[key] = tail
    return y


def conv_state_shapes(n: int, convs: Mapping[str, ShortConvolution]) -> dict[str, list[int]]:
    """Shapes of the conv tails in a state: ``{key: [n, W-1, C]}`` for each short convolution."""
    return {key: [n, conv.cache_len, conv.hidden_size] for key, conv in convs.items()}


def conv_state_bytes(convs: Mapping[str, ShortConvolution]) -> int:
    """Bytes of the conv tails of one sequence: (W-1) * C values each, in the convolution's dtype."""
    return sum(conv.cache_len * conv.hidden_size * conv.weight.element_size() for conv in convs.values())
