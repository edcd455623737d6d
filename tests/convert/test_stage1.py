"""Stage 1: attention transfer lowers every converted layer's error on held-out inputs, touching only
the parameters it is given."""

from __future__ import annotations

import pytest
import torch

from linmix.convert import attention_transfer, build_mixers, get_adapter, layer_targets, stage1_parameters
from linmix.convert.data import lm_batch
from linmix.train import TrainConfig
from tests.convert.conftest import tiny_gpt2, tiny_llama

TARGETS = ["lolcats", "hedgehog", "gla", "gated_deltanet", "mamba2"]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("target", TARGETS)
def test_attention_transfer_lowers_the_layer_error(make, target):
    teacher = make(initializer_range=0.1)
    targets = layer_targets(2, target, keep=[0])
    mixers = build_mixers(teacher, targets, window_size=8)
    params = stage1_parameters(target, mixers[1])
    frozen = {name: p.detach().clone() for name, p in mixers[1].named_parameters()
              if all(p is not q for q in params)}
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    train = lm_batch(torch.randint(0, 300, (240, 48)))  # 30 steps of fresh sequences
    heldout = torch.randint(0, 300, (8, 48))
    lr = 3e-2 if target in ("lolcats", "hedgehog") else 1e-2  # feature maps alone / whole mixers
    config = TrainConfig(lr=lr, weight_decay=0.0, max_steps=30, batch_size=8, progress=False, seed=0)
    result = attention_transfer(teacher, mixers, train, config, params=params, eval_data=heldout)
    assert set(result["after"]) == {1}
    assert result["after"][1] < 0.8 * result["before"][1], result
    for name, value in frozen.items():  # e.g. the copied q/k/v/o of lolcats
        assert torch.equal(dict(mixers[1].named_parameters())[name], value), name
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    assert all(p.requires_grad for p in mixers[1].parameters())


def test_stage1_parameter_choice():
    teacher = tiny_llama()

    def chosen(target: str, which: str = "default") -> set[str]:
        mixer = build_mixers(teacher, layer_targets(2, target, keep=[1]))[0]
        ids = {id(p) for p in stage1_parameters(target, mixer, which)}
        return {name for name, p in mixer.named_parameters() if id(p) in ids}

    assert chosen("lolcats") == {"q_map.weight", "k_map.weight", "mix_logit"}      # LoLCATs: new parameters
    assert "q_proj.weight" in chosen("lolcats", "all")
    assert {"q_proj.weight", "gk_proj.0.weight"} <= chosen("gla")                    # RADLADS: whole mixer
    assert "q_proj.weight" not in chosen("gla", "new") and "gk_proj.0.weight" in chosen("gla", "new")
    assert chosen("mamba2", "new") >= {"A_log", "dt_bias", "D", "conv1d.weight"}
    assert stage1_parameters("keep", get_adapter(teacher).attention_module(0)) == []
    with pytest.raises(ValueError, match="which must be"):
        stage1_parameters("gla", teacher, "some")
