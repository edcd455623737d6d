"""Target mixers: what each teacher attention layer becomes, with the teacher's weights reused.

A target turns one layer's :class:`~linmix.convert.adapters.AttentionWeights` into a registered
linmix mixer (name + constructor kwargs) and loads the teacher's q/k/v/o into it:

=================  ===================================================================================
``keep``           softmax attention as it was (``attention``, or ``swa`` for a sliding-window layer):
                   the layers a hybrid keeps; exact copy.
``lolcats``        sliding-window softmax (window 64) + Hedgehog linear attention over older tokens
                   (LoLCATs eq. 7); q/k/v/o copied, feature maps start at the identity.
``hedgehog``       pure Hedgehog linear attention on the rotated q/k (LoLCATs without the window).
``gla``            GLA (RADLADS-style): q <- W_q, k <- W_k, v <- W_v (KV heads repeated), o <- W_o;
                   decay gates, output gate and norm new.
``gated_deltanet`` Gated DeltaNet, the same mapping; short convolutions start as the identity.
``mamba2``         Mamba-2 as in "The Mamba in the Llama" (Wang et al., 2024): C <- W_q / sqrt(d),
                   B <- W_k, x <- W_v, out_proj <- W_o, one group (B, C) per query head,
                   d_state = headdim = d; conv starts as the identity, D = 0; z, dt, A new.
=================  ===================================================================================

Stage 1 trains, by default, only the parameters a target adds (feature maps and mixing weights)
for ``lolcats`` / ``hedgehog`` -- as LoLCATs does -- and the whole mixer for the gated recurrent
targets, whose new gates and norms change what the copied projections must compute (RADLADS).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from linmix.convert.adapters import AttentionWeights, TeacherAdapter, get_adapter
from linmix.layers import TokenMixer, get_mixer_class

logger = logging.getLogger(__name__)

#: The targets by name, in the order of the table above.
TARGET_NAMES = ("keep", "lolcats", "hedgehog", "gla", "gated_deltanet", "mamba2")
#: LoLCATs' sliding window.
LOLCATS_WINDOW = 64


def _copy(dst: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None, what: str) -> None:
    if list(dst.weight.shape) != list(weight.shape):
        raise ValueError(f"{what}: teacher weight {list(weight.shape)} does not fit {list(dst.weight.shape)}")
    dst.weight.copy_(weight)
    if dst.bias is not None:
        dst.bias.copy_(bias) if bias is not None else dst.bias.zero_()
    elif bias is not None and bool(bias.ne(0).any()):
        logger.warning("%s: the target has no bias; the teacher's bias is dropped (stage 1 learns around it)", what)


def _identity_conv(conv: nn.Conv1d) -> None:
    """A causal depthwise conv that passes its input through: the last tap 1, the others 0."""
    conv.weight.zero_()
    conv.weight[:, 0, -1] = 1.0
    if conv.bias is not None:
        conv.bias.zero_()


def _width_ratio(att: AttentionWeights, target: str) -> float:
    """(H d) / D, the inner width of a recurrent target as a multiple of the model width."""
    inner, D = att.num_heads * att.head_dim, att.hidden_size
    ratio = inner / D
    if int(D * ratio) != inner:
        raise ValueError(f"target {target!r}: inner width num_heads * head_dim = {inner} is not representable as "
                         f"int(hidden_size * ratio) with hidden_size = {D}")
    return ratio


def _attention_kwargs(att: AttentionWeights) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_heads": att.num_heads, "num_kv_heads": att.num_kv_heads,
                              "head_dim": att.head_dim, "qkv_bias": att.qkv_bias,
                              "use_rope": att.rope_theta is not None}
    if att.rope_theta is not None:
        kwargs["rope_theta"] = att.rope_theta
        if att.rotary_dim is not None:
            kwargs["rotary_dim"] = att.rotary_dim
    return kwargs


def mixer_spec(target: str, att: AttentionWeights, *, window_size: int = LOLCATS_WINDOW,
               feature_dim: int | None = None) -> tuple[str, dict[str, Any]]:
    """(registered mixer name, constructor kwargs) of ``target`` for a teacher layer.

    Args:
        target: one of :data:`TARGET_NAMES`.
        att: the teacher layer's attention.
        window_size: the softmax window of ``lolcats``.
        feature_dim: features per half of the Hedgehog maps (``lolcats`` / ``hedgehog``; default d).

    Example:
        >>> import torch
        >>> att = AttentionWeights(0, 4, 2, 16, torch.zeros(64, 64), torch.zeros(32, 64), torch.zeros(32, 64),
        ...                        torch.zeros(64, 64))
        >>> mixer_spec("lolcats", att)[1]["window_size"], mixer_spec("gla", att)[1]["expand_k"]
        (64, 1.0)
    """
    if target == "keep":
        kwargs = _attention_kwargs(att)
        if att.window_size is not None:
            return "swa", {**kwargs, "window_size": att.window_size}
        return "attention", kwargs
    if target in ("lolcats", "hedgehog"):
        kwargs = {**_attention_kwargs(att), "feature_dim": feature_dim}
        if target == "lolcats":
            kwargs["window_size"] = window_size
        return target, kwargs
    if target == "gla":
        ratio = _width_ratio(att, target)
        return "gla", {"num_heads": att.num_heads, "expand_k": ratio, "expand_v": ratio}
    if target == "gated_deltanet":
        return "gated_deltanet", {"num_heads": att.num_heads, "head_dim": att.head_dim, "expand_v": 1.0}
    if target == "mamba2":
        ratio = _width_ratio(att, target)
        if ratio != int(ratio):
            raise ValueError(f"target 'mamba2': num_heads * head_dim = {att.num_heads * att.head_dim} must be a "
                             f"multiple of hidden_size = {att.hidden_size} (Mamba-2's expand is an int)")
        return "mamba2", {"d_state": att.head_dim, "expand": int(ratio), "headdim": att.head_dim,
                          "ngroups": att.num_heads}
    raise ValueError(f"unknown target {target!r}; available: {list(TARGET_NAMES)}")


@torch.no_grad()
def load_attention(target: str, mixer: TokenMixer, att: AttentionWeights) -> None:
    """Initialise ``mixer`` (built from :func:`mixer_spec`) from the teacher layer's attention."""
    what = f"layer {att.layer_idx} ({target})"
    if target in ("keep", "lolcats", "hedgehog"):
        for name, weight, bias in (("q_proj", att.q_weight, att.q_bias), ("k_proj", att.k_weight, att.k_bias),
                                   ("v_proj", att.v_weight, att.v_bias), ("o_proj", att.o_weight, None)):
            _copy(getattr(mixer, name), weight, bias, f"{what} {name}")
        return
    rep = att.repeat_kv
    k_bias = None if att.k_bias is None else rep(att.k_bias)
    v_bias = None if att.v_bias is None else rep(att.v_bias)
    if target in ("gla", "gated_deltanet"):
        _copy(mixer.q_proj, att.q_weight, att.q_bias, f"{what} q_proj")
        _copy(mixer.k_proj, rep(att.k_weight), k_bias, f"{what} k_proj")
        _copy(mixer.v_proj, rep(att.v_weight), v_bias, f"{what} v_proj")
        _copy(mixer.o_proj, att.o_weight, None, f"{what} o_proj")
        for conv in mixer._convs().values():
            _identity_conv(conv)
        return
    if target == "mamba2":
        inner = mixer.d_inner
        z_rows = mixer.in_proj.weight[:inner]           # the gate z keeps its fresh init
        scale = att.head_dim ** -0.5                     # Mamba-2's scan has no 1/sqrt(d)
        weight = torch.cat([z_rows, rep(att.v_weight), rep(att.k_weight), att.q_weight * scale,
                            mixer.in_proj.weight[-mixer.nheads:]])
        if any(b is not None and bool(b.ne(0).any()) for b in (att.q_bias, att.k_bias, att.v_bias)):
            logger.warning("%s in_proj: Mamba-2 has no input bias; the teacher's q/k/v biases are dropped", what)
        mixer.in_proj.weight.copy_(weight)
        _copy(mixer.out_proj, att.o_weight, None, f"{what} out_proj")
        _identity_conv(mixer.conv1d)
        mixer.D.zero_()
        return
    raise ValueError(f"unknown target {target!r}; available: {list(TARGET_NAMES)}")


def teacher_parameter_names(target: str) -> tuple[str, ...]:
    """Names (in the mixer) of the parameters copied from the teacher's attention."""
    if target == "mamba2":
        return ("in_proj.weight", "out_proj.weight")
    return tuple(f"{p}.{kind}" for p in ("q_proj", "k_proj", "v_proj", "o_proj") for kind in ("weight", "bias"))


def stage1_parameters(target: str, mixer: TokenMixer, which: str = "default") -> list[nn.Parameter]:
    """The parameters stage 1 trains in a converted mixer.

    Args:
        which: ``"new"`` -- only what the target adds to the teacher's attention (feature maps,
            mixing weights, gates, norms, convolutions); ``"all"`` -- every parameter of the mixer;
            ``"default"`` -- ``"new"`` for lolcats / hedgehog (LoLCATs), ``"all"`` for the gated
            recurrent targets (RADLADS), nothing for ``keep``.
    """
    if which not in ("default", "new", "all"):
        raise ValueError(f"stage1_parameters: which must be 'default', 'new' or 'all', got {which!r}")
    if target == "keep":
        return []
    if which == "default":
        which = "new" if target in ("lolcats", "hedgehog") else "all"
    if which == "all":
        return list(mixer.parameters())
    copied = set(teacher_parameter_names(target))
    return [p for name, p in mixer.named_parameters() if name not in copied]


def layer_targets(num_layers: int, target: str, keep: list[int] | tuple[int, ...] = ()) -> list[str]:
    """The target of every layer: ``keep`` for the layers listed in ``keep``, ``target`` elsewhere.

    Example:
        >>> layer_targets(4, "lolcats", keep=[0, 3])
        ['keep', 'lolcats', 'lolcats', 'keep']
    """
    if target not in TARGET_NAMES:
        raise ValueError(f"unknown target {target!r}; available: {list(TARGET_NAMES)}")
    for i in keep:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers:
            raise ValueError(f"keep: layer indices must be ints in [0, {num_layers}), got {i!r}")
    return ["keep" if i in set(keep) else target for i in range(num_layers)]


def build_mixer(target: str, att: AttentionWeights, **options: Any) -> TokenMixer:
    """The mixer of ``target`` for one teacher layer, with the teacher's weights loaded (on their
    device and dtype). ``options``: as :func:`mixer_spec`.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> teacher = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                                        num_hidden_layers=1, num_attention_heads=2))
        >>> mixer = build_mixer("hedgehog", get_adapter(teacher).attention_weights(0))
        >>> mixer(torch.randn(1, 5, 16))[0].shape
        torch.Size([1, 5, 16])
    """
    name, kwargs = mixer_spec(target, att, **options)
    mixer = get_mixer_class(name)(hidden_size=att.hidden_size, layer_idx=att.layer_idx, **kwargs)
    mixer.to(device=att.q_weight.device, dtype=att.q_weight.dtype)
    load_attention(target, mixer, att)
    return mixer


def build_mixers(teacher: nn.Module, targets: list[str], **options: Any) -> dict[int, TokenMixer]:
    """Converted mixers of every layer whose target is not ``keep`` (for stage 1 without a student
    model, e.g. GPT-2): ``{layer index: mixer}``."""
    adapter = get_adapter(teacher)
    return {i: build_mixer(t, adapter.attention_weights(i), **options) for i, t in enumerate(targets) if t != "keep"}


def build_student(teacher: nn.Module, targets: list[str], *, adapter: TeacherAdapter | None = None,
                  **options: Any):
    """The student :class:`~linmix.models.LinmixForCausalLM`: the teacher's embeddings, norms, MLPs
    and LM head, and layer i's attention replaced by ``targets[i]`` (teacher weights reused).

    Args:
        teacher: a supported Hugging Face causal LM (:func:`~linmix.convert.adapters.get_adapter`).
        targets: one target name per layer (:func:`layer_targets`).
        adapter: the teacher's adapter (default: looked up).
        **options: as :func:`mixer_spec` (``window_size``, ``feature_dim``).

    Returns:
        The student in eval mode, on the teacher's device and dtype. With every layer ``keep`` it
        computes the teacher's logits.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> teacher = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                                        num_hidden_layers=2, num_attention_heads=2)).eval()
        >>> student = build_student(teacher, ["keep", "keep"])
        >>> ids = torch.randint(0, 32, (1, 6))
        >>> torch.allclose(student(ids).logits, teacher(ids).logits, atol=1e-5)
        True
    """
    from linmix.models import LinmixForCausalLM

    adapter = adapter or get_adapter(teacher)
    if len(targets) != adapter.num_layers:
        raise ValueError(f"build_student: targets must name one target per teacher layer ({adapter.num_layers}), "
                         f"got {len(targets)}")
    attentions = [adapter.attention_weights(i) for i in range(adapter.num_layers)]
    specs = [mixer_spec(t, att, **options) for t, att in zip(targets, attentions)]
    mixer_kwargs: dict[str, dict[str, Any]] = {}
    for i, (name, kwargs) in enumerate(specs):
        if mixer_kwargs.setdefault(name, kwargs) != kwargs:
            raise ValueError(f"build_student: layer {i} needs {name!r} with {kwargs}, another layer "
                             f"{mixer_kwargs[name]} (LinmixConfig holds one set of kwargs per mixer)")
    config = adapter.student_config([name for name, _ in specs], mixer_kwargs)
    reference = attentions[0].q_weight
    student = LinmixForCausalLM(config).to(device=reference.device, dtype=reference.dtype)
    adapter.copy_shared_weights(student)
    for i, (target, att) in enumerate(zip(targets, attentions)):
        load_attention(target, student.model.layers[i].mixer, att)
    return student.eval()


def student_mixers(student: nn.Module, targets: list[str]) -> dict[int, TokenMixer]:
    """``{layer index: mixer}`` of the converted (non-``keep``) layers of a student model."""
    return {i: student.model.layers[i].mixer for i, t in enumerate(targets) if t != "keep"}
