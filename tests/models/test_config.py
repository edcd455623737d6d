"""LinmixConfig: cyclic layer patterns, per-mixer kwargs, validation, serialisation."""

from __future__ import annotations

import pytest
from transformers import AutoConfig
from transformers.configuration_utils import ALLOWED_LAYER_TYPES

from linmix.layers import MIXERS
from linmix.models import LinmixConfig, LinmixForCausalLM
from tests.models.helpers import HIDDEN, VOCAB, tiny_config


def test_layers_repeat_cyclically():
    config = tiny_config(["gla", "gla", "gla", "_test_kv"], num_layers=10)
    assert config.mixer_types == (["gla"] * 3 + ["_test_kv"]) * 2 + ["gla"] * 2
    assert config.num_hidden_layers == 10
    model = LinmixForCausalLM(config)
    built = [type(block.mixer) for block in model.model.layers]
    assert built == [MIXERS[name] for name in config.mixer_types]
    assert [block.mixer.layer_idx for block in model.model.layers] == list(range(10))


def test_single_name_and_num_hidden_layers_alias():
    config = LinmixConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, layers="_test_cummean")
    assert config.num_layers == 3 and config.layers == ["_test_cummean"]
    assert config.mixer_types == ["_test_cummean"] * 3
    config.num_hidden_layers = 5
    assert config.num_layers == 5


def test_layer_types_use_transformers_vocabulary():
    config = tiny_config(["gla", "_test_kv"] + [n for n in ("attention", "swa") if n in MIXERS], num_layers=4)
    assert set(config.layer_types) <= set(ALLOWED_LAYER_TYPES)
    assert len(config.layer_types) == config.num_layers
    if "attention" in MIXERS:
        assert config.layer_types[config.mixer_types.index("attention")] == "full_attention"
    assert config.layer_types[0] == "linear_attention"


def test_mixer_kwargs_and_num_heads_are_applied():
    config = tiny_config(["gla", "gla", "_test_kv"], num_layers=3, num_heads=2,
                         mixer_kwargs={"gla": {"expand_k": 1.0}})
    model = LinmixForCausalLM(config)
    gla = model.model.layers[0].mixer
    assert gla.num_heads == 2 and gla.key_dim == HIDDEN  # global num_heads and the per-mixer kwarg
    # a per-mixer num_heads wins over the global one
    config = tiny_config(["gla"], num_heads=2, mixer_kwargs={"gla": {"num_heads": 8}})
    assert LinmixForCausalLM(config).model.layers[1].mixer.num_heads == 8
    # num_heads is not passed to mixers that do not take it (the test mixers' constructors do not)
    LinmixForCausalLM(tiny_config(["_test_cummean"], num_heads=3))


def test_mlp_none_gives_mixer_only_blocks():
    model = LinmixForCausalLM(tiny_config(["_test_cummean"], mlp=None))
    assert all(block.mlp is None and block.mlp_norm is None for block in model.model.layers)
    assert not any("mlp" in name for name, _ in model.named_parameters())
    gelu = LinmixForCausalLM(tiny_config(["_test_cummean"], mlp="gelu", intermediate_size=48))
    assert gelu.model.layers[0].mlp.fc1.out_features == 48


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(layers=["no_such_mixer"]), ValueError, r"unknown mixer 'no_such_mixer'.*registered mixers: \[.*'gla'"),
    (dict(layers=[]), ValueError, "non-empty list"),
    (dict(layers=[3]), TypeError, r"layers\[0\] must be a mixer name"),
    (dict(layers=["gla"] * 3, num_layers=2), ValueError, "must not be longer"),
    (dict(num_layers="4"), ValueError, "num_layers must be a positive int"),
    (dict(hidden_size=0), ValueError, "hidden_size must be a positive int"),
    (dict(num_heads=2.0), ValueError, "num_heads"),
    (dict(mlp="mystery"), ValueError, "mlp must be None or one of"),
    (dict(mixer_kwargs={"no_such_mixer": {}}), ValueError, "unknown mixer 'no_such_mixer'"),
    (dict(mixer_kwargs={"gla": 4}), TypeError, "must be a dict"),
    (dict(mixer_kwargs={"gla": {"hidden_size": 8}}), ValueError, "must not set"),
    (dict(mixer_kwargs={"gla": {"no_such_arg": 1}}), ValueError, r"unknown arguments \['no_such_arg'\]"),
    # the mixer's own constructor check, reported with the layer that triggered it
    (dict(layers=["_test_kv", "gla"], num_heads=5), ValueError, r"layer 1 \(mixer 'gla'\).*num_heads"),
])
def test_bad_configs_raise(kwargs, error, match):
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=2, layers=["gla"])
    with pytest.raises(error, match=match):
        LinmixConfig(**{**base, **kwargs})


def test_model_rechecks_a_config_edited_after_creation():
    config = tiny_config(["gla"])
    config.layers = ["no_such_mixer"]
    with pytest.raises(ValueError, match="unknown mixer"):
        LinmixForCausalLM(config)


def test_config_round_trip(tmp_path):
    kwargs = {"gla": {"expand_k": 1.0}}
    if "gated_deltanet" in MIXERS:  # a tuple argument comes back from JSON as a list
        kwargs["gated_deltanet"] = {"A_init_range": (1.0, 8.0)}
    config = tiny_config(["gla", "_test_kv"], num_layers=3, num_heads=2, mixer_kwargs=kwargs,
                         pad_token_id=0, eos_token_id=1, max_position_embeddings=128)
    config.save_pretrained(tmp_path)
    for loaded in (LinmixConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path),
                   LinmixConfig.from_dict(config.to_dict())):
        assert isinstance(loaded, LinmixConfig)
        assert loaded.mixer_types == config.mixer_types and loaded.num_heads == 2
        assert loaded.mixer_kwargs["gla"] == {"expand_k": 1.0}
        assert (loaded.pad_token_id, loaded.eos_token_id, loaded.max_position_embeddings) == (0, 1, 128)
    if "gated_deltanet" in MIXERS:
        loaded = AutoConfig.from_pretrained(tmp_path)
        loaded.layers = ["gated_deltanet"]
        model = LinmixForCausalLM(loaded)  # the list form of the tuple is accepted by the mixer
        assert isinstance(model.model.layers[0].mixer, MIXERS["gated_deltanet"])


def test_default_config_builds():
    config = LinmixConfig()  # transformers instantiates the defaults when saving (to_diff_dict)
    assert config.mixer_types == [config.layers[0]] * config.num_layers



def test_num_layers_is_passed_to_depth_dependent_mixers():
    # "_test_depth" takes num_layers and requires layer_idx < num_layers, as Lightning's decay schedule does
    model = LinmixForCausalLM(tiny_config(["_test_depth"], num_layers=3))
    assert [block.mixer.num_layers for block in model.model.layers] == [3, 3, 3]
    with pytest.raises(ValueError, match=r"layer 0 \(mixer '_test_depth'\).*outside"):
        tiny_config(["_test_depth"], num_layers=3, mixer_kwargs={"_test_depth": {"num_layers": 0}})
