"""Adapters and weight transfer: a student of `keep` layers is the teacher; targets start from its weights."""

from __future__ import annotations

import pytest
import torch

from linmix.convert import AttentionTransfer, build_mixer, build_student, get_adapter, layer_targets
from linmix.convert.adapters import load_teacher, package_file
from linmix.convert.attention_transfer import layer_errors
from tests.convert.conftest import tiny_gpt2, tiny_llama
from tests.ops.utils import rel_err

# transformers computes RoPE angles in float32 (its inv_freq buffer), linmix in the input's dtype:
# in float64 the two agree to ~1e-7, not to float64 rounding. Without RoPE (GPT-2) it is exact.
ROPE_TOL = 1e-6
EXACT_TOL = 1e-12


@pytest.mark.parametrize("kind, overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True, "head_dim": 8}),          # tied head, head_dim != D / H
    ("qwen2", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}),  # qkv biases, SWA
    ("mistral", {"sliding_window": 6}),
])
def test_student_of_kept_layers_reproduces_the_teacher(kind, overrides):
    teacher = tiny_llama(kind, dtype=torch.float64, **overrides)
    student = build_student(teacher, layer_targets(2, "lolcats", keep=[0, 1]))
    adapter = get_adapter(teacher)
    windows = [adapter.attention_weights(i).window_size for i in range(2)]
    assert [b.mixer.mixer_name for b in student.model.layers] == ["attention" if w is None else "swa" for w in windows]
    ids = torch.randint(0, 300, (2, 24))  # longer than the sliding windows
    assert rel_err(student(ids).logits, teacher(ids).logits) < ROPE_TOL


@pytest.mark.parametrize("make, tol", [(tiny_llama, ROPE_TOL), (tiny_gpt2, EXACT_TOL)])
def test_kept_layer_reproduces_the_teacher_layer(make, tol):
    """Layer by layer, on the teacher's own inputs (GPT-2: fused c_attn, biases, no RoPE)."""
    teacher = make(dtype=torch.float64)
    adapter = get_adapter(teacher)
    mixers = {i: build_mixer("keep", adapter.attention_weights(i)) for i in range(2)}
    errors = layer_errors(AttentionTransfer(teacher, mixers), torch.randint(0, 300, (3, 40)))
    assert max(errors.values()) < tol ** 2  # errors are relative *squared* errors


@pytest.mark.parametrize("make, tol", [(tiny_llama, ROPE_TOL), (tiny_gpt2, EXACT_TOL)])
def test_lolcats_with_a_covering_window_starts_as_the_teacher(make, tol):
    """LoLCATs with a window longer than the context is softmax attention: the teacher's q/k/v/o,
    RoPE and grouped heads are mapped right."""
    teacher = make(dtype=torch.float64)
    adapter = get_adapter(teacher)
    mixers = {i: build_mixer("lolcats", adapter.attention_weights(i), window_size=64) for i in range(2)}
    errors = layer_errors(AttentionTransfer(teacher, mixers), torch.randint(0, 300, (2, 64)))
    assert max(errors.values()) < tol ** 2


def test_recurrent_targets_reuse_the_teacher_projections():
    teacher = tiny_llama(dtype=torch.float64)
    att = get_adapter(teacher).attention_weights(1)
    k_heads = att.k_weight.unflatten(0, (2, 16))
    v_heads = att.v_weight.unflatten(0, (2, 16))
    for target in ("gla", "gated_deltanet"):
        m = build_mixer(target, att)
        assert torch.equal(m.q_proj.weight, att.q_weight) and torch.equal(m.o_proj.weight, att.o_weight)
        for h in range(4):  # query head h reads KV head h // 2
            assert torch.equal(m.k_proj.weight[16 * h:16 * (h + 1)], k_heads[h // 2])
            assert torch.equal(m.v_proj.weight[16 * h:16 * (h + 1)], v_heads[h // 2])
    m = build_mixer("mamba2", att)
    z, x, B, C, dt = m.in_proj.weight.split([64, 64, 64, 64, m.nheads])
    assert torch.equal(x[16:32], v_heads[0]) and torch.equal(B[32:48], k_heads[1])
    assert torch.allclose(C, att.q_weight / 4) and torch.equal(m.out_proj.weight, att.o_weight)
    assert m.ngroups == m.nheads == 4 and m.d_state == m.headdim == 16


def test_unsupported_teachers_are_rejected_clearly():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match=r"unsupported teacher GPTNeoXForCausalLM.*'gpt2', 'llama'"):
        get_adapter(neox)
    scaled = {"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="rope type 'linear'"):
        get_adapter(tiny_llama(rope_parameters=scaled))
    with pytest.raises(ValueError, match="o_proj has a bias"):
        get_adapter(tiny_llama(attention_bias=True))
    with pytest.raises(ValueError, match="GPT-2 student cannot be built"):
        build_student(tiny_gpt2(), ["keep", "lolcats"])
    with pytest.raises(ValueError, match="unknown target 'mamba3'"):
        layer_targets(2, "mamba3")
    with pytest.raises(ValueError, match=r"keep: layer indices must be ints in \[0, 2\)"):
        layer_targets(2, "gla", keep=[2])


def test_teacher_loading_errors():
    with pytest.raises(FileNotFoundError, match="neither a known teacher"):
        load_teacher("/nonexistent/teacher")
    with pytest.raises(FileNotFoundError, match="not installed: pip install x"):
        package_file("linmix_no_such_package", "model.gguf", "pip install x")
