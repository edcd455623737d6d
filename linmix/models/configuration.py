"""LinmixConfig: which token mixer sits at which layer, and the usual decoder hyperparameters."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from transformers import PreTrainedConfig

from linmix.layers import MIXERS, TokenMixer, get_mixer_class
from linmix.modules import MLPS

logger = logging.getLogger(__name__)

# The attention kind transformers expects in `config.layer_types` (see LinmixConfig.layer_types).
_HF_LAYER_TYPES = {"attention": "full_attention", "swa": "sliding_attention"}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class LinmixConfig(PreTrainedConfig):
    r"""Configuration of a linmix decoder (:class:`~linmix.models.LinmixForCausalLM`).

    A pre-norm decoder whose only varying part is the token mixer of each layer::

        embedding -> num_layers x [x += mixer(norm(x)); x += mlp(norm(x))] -> norm -> LM head

    Args:
        vocab_size: number of tokens.
        hidden_size: model width D.
        num_layers: number of decoder blocks (also readable as ``num_hidden_layers``).
        layers: mixer names (keys of :data:`linmix.layers.MIXERS`), repeated cyclically up to
            ``num_layers``: ``["gated_deltanet"] * 3 + ["attention"]`` is a 3:1 hybrid. A single
            string means that mixer at every layer.
        mixer_kwargs: per mixer name, extra constructor arguments, e.g.
            ``{"gla": {"expand_k": 1.0}, "swa": {"window_size": 512}}``.
        num_heads: passed to every mixer whose constructor takes ``num_heads``, unless its
            ``mixer_kwargs`` sets it; ``None`` leaves each mixer's default. (Likewise every mixer
            that takes ``num_layers``, e.g. Lightning's depth-dependent decays, gets the model's.)
        mlp: the channel mixer of each block (a key of :data:`linmix.modules.MLPS`: "swiglu",
            "geglu", "gelu", "relu", "relu2"), or ``None`` for mixer-only blocks (recall probes).
        intermediate_size: inner width of the MLP; ``None`` = the MLP's default (8/3 D for SwiGLU).
        norm_eps: epsilon of the RMSNorms.
        initializer_range: std of the normal init of embeddings and linear weights.
        use_cache: return the decoding cache by default (in eval mode; see the model's forward).
        tie_word_embeddings: share the embedding matrix with the LM head.
        pad_token_id, bos_token_id, eos_token_id: special tokens (for ``generate()``).
        max_position_embeddings: informational (no mixer needs it; recurrent ones have no limit).

    Example:
        >>> config = LinmixConfig(vocab_size=97, hidden_size=64, num_layers=4,
        ...                       layers=["gated_deltanet"] * 3 + ["gla"], num_heads=4)
        >>> config.mixer_types
        ['gated_deltanet', 'gated_deltanet', 'gated_deltanet', 'gla']
        >>> config.num_hidden_layers
        4
    """

    model_type = "linmix"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {"num_hidden_layers": "num_layers"}

    vocab_size: int = 32000
    hidden_size: int = 512
    num_layers: int = 8
    layers: list[str] | tuple[str, ...] | str = ("gated_deltanet",)
    mixer_kwargs: dict[str, dict[str, Any]] | None = None
    num_heads: int | None = None
    mlp: str | None = "swiglu"
    intermediate_size: int | None = None
    norm_eps: float = 1e-6
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    max_position_embeddings: int | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.layers, str):
            self.layers = [self.layers]
        elif isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        if self.mixer_kwargs is None:
            self.mixer_kwargs = {}
        super().__post_init__(**kwargs)
        self.check()

    # -- derived views ------------------------------------------------------------------------

    @property
    def mixer_types(self) -> list[str]:
        """The mixer name of each of the ``num_layers`` layers (``layers`` repeated cyclically)."""
        if not isinstance(self.layers, list) or not self.layers or not _is_int(self.num_layers):
            return []  # not a valid config (yet): check() says why
        return [self.layers[i % len(self.layers)] for i in range(self.num_layers)]

    @property
    def layer_types(self) -> list[str]:
        """Each layer's attention kind in transformers' vocabulary ("full_attention",
        "sliding_attention" or "linear_attention"); the mixer names are :attr:`mixer_types`."""
        return [_HF_LAYER_TYPES.get(name, "linear_attention") for name in self.mixer_types]

    def mixer_init(self, layer_idx: int) -> tuple[type[TokenMixer], dict[str, Any]]:
        """(mixer class, constructor kwargs besides ``hidden_size`` and ``layer_idx``) of a layer."""
        name = self.mixer_types[layer_idx]
        cls = get_mixer_class(name)
        kwargs = dict(self.mixer_kwargs.get(name, {}))
        params = inspect.signature(cls.__init__).parameters
        if self.num_heads is not None and "num_heads" in params:
            kwargs.setdefault("num_heads", self.num_heads)
        if "num_layers" in params:  # depth-dependent mixers (Lightning's per-layer decay schedule)
            kwargs.setdefault("num_layers", self.num_layers)
        return cls, kwargs

    # -- validation ---------------------------------------------------------------------------

    def check(self) -> None:
        """Raise ``ValueError`` / ``TypeError`` on an inconsistent config (run on creation and by the model).

        Besides types and ranges, every distinct mixer is built once on the meta device (no
        memory), so that constructor errors (e.g. a width not divisible by ``num_heads``) surface
        here with the layer that triggered them.
        """
        for field in ("vocab_size", "hidden_size", "num_layers"):
            value = getattr(self, field)
            if not _is_int(value) or value < 1:
                raise ValueError(f"LinmixConfig: {field} must be a positive int, got {value!r}")
        for field in ("num_heads", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, field)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"LinmixConfig: {field} must be a positive int or None, got {value!r}")
        for field in ("norm_eps", "initializer_range"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"LinmixConfig: {field} must be a non-negative number, got {value!r}")
        if self.mlp is not None and self.mlp not in MLPS:
            raise ValueError(f"LinmixConfig: mlp must be None or one of {sorted(MLPS)}, got {self.mlp!r}")

        if not isinstance(self.layers, list) or not self.layers:
            raise ValueError(f"LinmixConfig: layers must be a non-empty list of mixer names, got {self.layers!r}")
        for i, name in enumerate(self.layers):
            if not isinstance(name, str):
                raise TypeError(f"LinmixConfig: layers[{i}] must be a mixer name (str), got {name!r}")
            if name not in MIXERS:
                raise ValueError(f"LinmixConfig: unknown mixer {name!r} in layers[{i}]; "
                                 f"registered mixers: {sorted(MIXERS)}")
        if len(self.layers) > self.num_layers:
            raise ValueError(f"LinmixConfig: layers lists {len(self.layers)} mixers but num_layers is "
                             f"{self.num_layers}; the pattern repeats cyclically, so it must not be longer")

        if not isinstance(self.mixer_kwargs, dict):
            raise TypeError(f"LinmixConfig: mixer_kwargs must be a dict {{mixer name: {{arg: value}}}}, "
                            f"got {type(self.mixer_kwargs).__name__}")
        for name, kwargs in self.mixer_kwargs.items():
            if name not in MIXERS:
                raise ValueError(f"LinmixConfig: mixer_kwargs names an unknown mixer {name!r}; "
                                 f"registered mixers: {sorted(MIXERS)}")
            if not isinstance(kwargs, dict):
                raise TypeError(f"LinmixConfig: mixer_kwargs[{name!r}] must be a dict of constructor arguments, "
                                f"got {type(kwargs).__name__}")
            reserved = {"hidden_size", "layer_idx"} & set(kwargs)
            if reserved:
                raise ValueError(f"LinmixConfig: mixer_kwargs[{name!r}] must not set {sorted(reserved)}; "
                                 "the model passes them")
            params = inspect.signature(MIXERS[name].__init__).parameters
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                unknown = sorted(set(kwargs) - set(params))
                if unknown:
                    valid = sorted(set(params) - {"self", "hidden_size", "layer_idx"})
                    raise ValueError(f"LinmixConfig: mixer_kwargs[{name!r}] has unknown arguments {unknown}; "
                                     f"{MIXERS[name].__name__} takes {valid}")

        mixer_types = self.mixer_types
        for name in dict.fromkeys(mixer_types):
            layer_idx = mixer_types.index(name)
            cls, kwargs = self.mixer_init(layer_idx)
            try:
                with torch.device("meta"):
                    cls(hidden_size=self.hidden_size, layer_idx=layer_idx, **kwargs)
            except (ValueError, TypeError) as err:
                raise ValueError(f"LinmixConfig: layer {layer_idx} (mixer {name!r}) cannot be built with "
                                 f"hidden_size={self.hidden_size} and {kwargs}: {err}") from err
            except Exception as err:  # noqa: BLE001 - an init the meta device cannot run: the model build will tell
                logger.debug("LinmixConfig: skipped the meta-device check of %r: %s", name, err)
