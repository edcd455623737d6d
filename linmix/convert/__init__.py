"""linmix.convert: turn a pretrained transformer into a linear or hybrid linmix model.

LoLCATs / Hedgehog (feature-map linear attention with a softmax window), RADLADS-style gated
recurrent mixers (GLA, Gated DeltaNet) and "The Mamba in the Llama" (Mamba-2), from a Hugging Face
Llama-family teacher (Llama, SmolLM/SmolLM2, Mistral, Qwen2; GPT-2 for stage 1):

1. :mod:`~linmix.convert.adapters` reads the teacher (attention weights, RoPE, grouped KV heads);
2. :mod:`~linmix.convert.targets` builds the student, each layer's attention replaced by a target
   mixer that reuses the teacher's q/k/v/o (``keep`` layers stay softmax attention: hybrids);
3. :mod:`~linmix.convert.attention_transfer` (stage 1) trains each converted layer to reproduce its
   teacher layer's output;
4. :mod:`~linmix.convert.distill` (stage 2) distils the whole student (KL to the teacher's logits
   and/or next-token loss) through LoRA adapters;
5. :mod:`~linmix.convert.report` compares student and teacher (perplexity, agreement, KL, passkey /
   needle retrieval, decoding speed and state memory);
6. :mod:`~linmix.convert.cli` is ``linmix convert``; :mod:`~linmix.convert.data` the text sources;
   :mod:`~linmix.convert.budget` the wall-clock budgets and throughput accounting of the stages.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from linmix.convert import build_student, layer_targets
    >>> teacher = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                                        num_hidden_layers=2, num_attention_heads=4,
    ...                                        num_key_value_heads=2)).eval()
    >>> student = build_student(teacher, layer_targets(2, "lolcats", keep=[1]))
    >>> [type(block.mixer).__name__ for block in student.model.layers]
    ['LolcatsAttention', 'Attention']
"""

from linmix.convert.adapters import AttentionWeights, TeacherAdapter, get_adapter, load_teacher
from linmix.convert.attention_transfer import AttentionTransfer, attention_transfer, layer_errors, transfer_loss
from linmix.convert.budget import MeteredLoss, fit_within_budget
from linmix.convert.distill import DistillationLoss, add_lora, distill
from linmix.convert.targets import (TARGET_NAMES, build_mixer, build_mixers, build_student, layer_targets,
                                    stage1_parameters, student_mixers)

__all__ = [
    "AttentionWeights",
    "TeacherAdapter",
    "get_adapter",
    "load_teacher",
    "TARGET_NAMES",
    "layer_targets",
    "build_mixer",
    "build_mixers",
    "build_student",
    "student_mixers",
    "stage1_parameters",
    "AttentionTransfer",
    "attention_transfer",
    "transfer_loss",
    "layer_errors",
    "DistillationLoss",
    "MeteredLoss",
    "fit_within_budget",
    "add_lora",
    "distill",
]
