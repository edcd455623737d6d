"""LinmixModel / LinmixForCausalLM: shapes, loss, save/load, padding, packing, gradients, init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache

from linmix.models import LinmixCache, LinmixForCausalLM, LinmixModel, hf_compat
from tests.models.helpers import HIDDEN, HYBRIDS, VOCAB, tiny_config, tiny_model
from tests.ops.utils import rel_err

TOL = 1e-9  # float64 models

HYBRID_NAMES = sorted(HYBRIDS)


def ids(B, T):
    return torch.randint(0, VOCAB, (B, T))


def test_forward_shapes_and_outputs():
    model = tiny_model(HYBRIDS["test_hybrid"], num_layers=3)
    x = ids(2, 7)
    out = model(x, output_hidden_states=True, use_cache=True)
    assert out.logits.shape == (2, 7, VOCAB) and out.logits.dtype == torch.float64
    assert len(out.hidden_states) == 4 and all(h.shape == (2, 7, HIDDEN) for h in out.hidden_states)
    cache = hf_compat.output_cache(out)
    assert isinstance(cache, LinmixCache) and len(cache) == 3 and cache.get_seq_length() == 7
    assert model(x, use_cache=False).logits.shape == (2, 7, VOCAB)
    assert hf_compat.output_cache(model(x, use_cache=False)) is None
    # eval mode returns a cache by default (config.use_cache), training mode does not
    assert hf_compat.output_cache(model(x)) is not None
    assert hf_compat.output_cache(model.train()(x)) is None
    # tuple output
    logits, cache = model.eval()(x, return_dict=False)
    assert torch.equal(logits, out.logits) and isinstance(cache, LinmixCache)
    # the base model
    base = model.model(x)
    assert base.last_hidden_state.shape == (2, 7, HIDDEN)
    assert torch.allclose(model.lm_head(base.last_hidden_state), out.logits)


def test_inputs_embeds_equal_input_ids():
    model = tiny_model(HYBRIDS["test_hybrid"])
    x = ids(2, 6)
    ref = model(x).logits
    assert rel_err(model(inputs_embeds=model.get_input_embeddings()(x)).logits, ref) < TOL


def test_logits_to_keep():
    model = tiny_model(HYBRIDS["test_hybrid"])
    x = ids(2, 9)
    full = model(x).logits
    assert torch.allclose(model(x, logits_to_keep=3).logits, full[:, -3:])
    assert torch.allclose(model(x, num_logits_to_keep=1).logits, full[:, -1:])
    assert torch.allclose(model(x, logits_to_keep=torch.tensor([0, 4])).logits, full[:, [0, 4]])


def test_loss_is_shifted_cross_entropy_with_ignore_index():
    model = tiny_model(HYBRIDS["test_hybrid"])
    x = ids(3, 10)
    labels = x.clone()
    labels[0, 3:6] = -100
    labels[2, :] = -100
    labels[2, 5] = x[2, 5]
    out = model(x, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, VOCAB)
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    manual = F.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(out.loss, manual)
    # the ignored positions really are ignored: changing their labels changes nothing
    other = labels.clone()
    other[labels == -100] = 5
    assert not torch.allclose(model(x, labels=other).loss, out.loss)
    labels_shuffled = labels.clone()
    labels_shuffled[0, 3:6] = -100
    assert torch.allclose(model(x, labels=labels_shuffled).loss, out.loss)
    # Trainer-style normalisation by the number of target tokens in the (accumulated) batch
    n = int(keep.sum())
    assert torch.allclose(model(x, labels=labels, num_items_in_batch=2 * n).loss, manual / 2)


def test_packed_loss_does_not_cross_sequence_boundaries():
    model = tiny_model(HYBRIDS["test_hybrid"])
    a, b = ids(1, 6), ids(1, 4)
    packed = torch.cat([a, b], 1)
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    loss = model(packed, labels=packed, cu_seqlens=cu).loss
    la = model(a, labels=a).loss
    lb = model(b, labels=b).loss
    assert torch.allclose(loss, (5 * la + 3 * lb) / 8)


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_round_trip(tmp_path, tie):
    model = tiny_model(HYBRIDS["test_hybrid"], num_layers=3, dtype=torch.float32, tie_word_embeddings=tie)
    x = ids(2, 8)
    ref = model(x).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    for cls in (LinmixForCausalLM, AutoModelForCausalLM):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert type(loaded) is LinmixForCausalLM
        assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
        assert torch.equal(loaded(x).logits, ref)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is LinmixModel
    assert torch.equal(base(x).last_hidden_state, model.model(x).last_hidden_state)


@pytest.mark.parametrize("hybrid", HYBRID_NAMES)
def test_round_trip_of_real_mixers(tmp_path, hybrid):
    model = tiny_model(HYBRIDS[hybrid], dtype=torch.float32)
    x = ids(1, 8)
    model.save_pretrained(tmp_path)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path).eval()(x).logits, model(x).logits)


@pytest.mark.parametrize("hybrid", HYBRID_NAMES)
def test_padded_batch_equals_sequences_alone(hybrid):
    model = tiny_model(HYBRIDS[hybrid])
    lengths, T = [9, 4, 1], 9
    x = ids(3, T)
    for side in ("left", "right"):
        mask = torch.zeros(3, T, dtype=torch.long)
        for b, n in enumerate(lengths):
            mask[b, slice(T - n, T) if side == "left" else slice(0, n)] = 1
        logits = model(x, attention_mask=mask).logits
        for b, n in enumerate(lengths):
            real = slice(T - n, T) if side == "left" else slice(0, n)
            alone = model(x[b:b + 1, real]).logits
            assert rel_err(logits[b:b + 1, real], alone) < TOL, f"{side} padding, row {b}"


@pytest.mark.parametrize("hybrid", HYBRID_NAMES)
def test_packed_sequences_equal_sequences_alone(hybrid):
    model = tiny_model(HYBRIDS[hybrid])
    cu = torch.tensor([0, 5, 6, 14], dtype=torch.int32)  # lengths 5, 1, 8
    x = ids(1, 14)
    out = model(x, cu_seqlens=cu, use_cache=True)
    cache = hf_compat.output_cache(out)
    assert cache.batch_size == 3
    nxt = ids(3, 1)
    step = model(nxt, cache=cache).logits  # decode the 3 sequences as a batch
    for n, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone = model(x[:, a:b], use_cache=True)
        assert rel_err(out.logits[:, a:b], alone.logits) < TOL, f"sequence {n}"
        step_alone = model(nxt[n:n + 1], cache=hf_compat.output_cache(alone)).logits
        assert rel_err(step[n:n + 1], step_alone) < TOL, f"sequence {n}: decode after packing"


def _grads(model, x, labels):
    model.zero_grad()
    model(x, labels=labels).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("hybrid", HYBRID_NAMES)
def test_gradients_reach_every_parameter_and_checkpointing_matches(hybrid):
    model = tiny_model(HYBRIDS[hybrid], dtype=torch.float32).train()
    x = ids(2, 12)
    grads = _grads(model, x, x)
    missing = [n for n, p in model.named_parameters() if n not in grads or grads[n].abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"
    hf_compat.set_activation_checkpointing(model, True)
    assert model.model.gradient_checkpointing
    grads_ckpt = _grads(model, x, x)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert rel_err(grads_ckpt[name], grads[name]) < 1e-5, name
    hf_compat.set_activation_checkpointing(model, False)
    assert not model.model.gradient_checkpointing


def test_weight_init():
    config = tiny_config(["gla", "_test_cummean"], initializer_range=0.01, hidden_size=128, vocab_size=4000)
    torch.manual_seed(0)
    model = LinmixForCausalLM(config)
    std = config.initializer_range
    assert abs(model.model.embed_tokens.weight.std().item() - std) < 0.1 * std
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert abs(model.model.layers[0].mlp.gate_proj.weight.std().item() - std) < 0.1 * std
    gla = model.model.layers[0].mixer
    assert abs(gla.q_proj.weight.std().item() - std) < 0.1 * std  # mixer linear weights share the scale
    bias = model.model.layers[1].mixer.v_proj.bias  # mixer biases keep the mixer's own init (nonzero here)
    assert bias.abs().sum() > 0
    assert all(torch.equal(block.mixer_norm.weight, torch.ones(128)) for block in model.model.layers)


def test_a_mixer_can_keep_its_own_init(monkeypatch):
    from tests.models.helpers import CumulativeMeanMixer

    monkeypatch.setattr(CumulativeMeanMixer, "_keep_init", True, raising=False)
    config = tiny_config(["_test_cummean"], initializer_range=0.001, hidden_size=128)
    model = LinmixForCausalLM(config)
    mixer = model.model.layers[0].mixer
    assert mixer.v_proj.weight.std().item() > 0.03  # PyTorch's default: uniform(+-1/sqrt(128)), std 0.051
    assert model.model.layers[0].mlp.up_proj.weight.std().item() < 0.002


def test_bad_inputs_raise():
    model = tiny_model(HYBRIDS["test_hybrid"])
    x = ids(2, 5)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model(x, inputs_embeds=model.get_input_embeddings()(x))
    with pytest.raises(ValueError, match="attention_mask must be a 2-D padding mask"):
        model(x, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(x, labels=x, logits_to_keep=1)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['bogus'\\]"):
        model(x, bogus=1)
    with pytest.raises(ValueError, match="output_attentions"):
        model(x, output_attentions=True)
    with pytest.raises(TypeError, match="must be a LinmixCache"):
        model(x, cache={"not": "a cache"})
    cache = hf_compat.output_cache(model(x, use_cache=True))
    with pytest.raises(ValueError, match="cache holds 2 sequences but the input has 3"):
        model(ids(3, 1), cache=cache)
    with pytest.raises(ValueError, match="pass the cache once"):
        model(x, cache=cache, past_key_values=cache)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(ids(1, 6), cu_seqlens=torch.tensor([0, 2, 6]), attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]))


def test_empty_transformers_cache_is_replaced():
    # generate() of a future transformers might hand us an empty DynamicCache: it carries nothing
    model = tiny_model(HYBRIDS["test_hybrid"])
    x = ids(2, 5)
    out = model(x, cache=DynamicCache(), use_cache=True)
    assert isinstance(hf_compat.output_cache(out), LinmixCache)
    assert torch.allclose(out.logits, model(x).logits)
