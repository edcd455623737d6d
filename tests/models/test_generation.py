"""Incremental decoding with LinmixCache, and transformers' generate() on linmix models."""

from __future__ import annotations

import pytest
import torch

from linmix.models import LinmixCache, hf_compat
from tests.models.helpers import ALL_MIXERS, HYBRIDS, VOCAB, tiny_model
from tests.ops.utils import rel_err

TOL = 1e-9  # float64 models

# every registered mixer alone (2 layers of it), and the hybrids
STACKS = {name: [name] for name in ALL_MIXERS} | HYBRIDS


def ids(B, T):
    return torch.randint(0, VOCAB, (B, T))


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_decoding_with_the_cache_equals_a_full_forward(stack):
    model = tiny_model(STACKS[stack])
    x = ids(2, 11)
    full = model(x, use_cache=False).logits
    out = model(x[:, :4], use_cache=True)
    cache = hf_compat.output_cache(out)
    steps = [out.logits]
    for t in range(4, 11):
        out = model(x[:, t:t + 1], cache=cache, use_cache=True)
        assert hf_compat.output_cache(out) is cache and cache.get_seq_length() == t + 1
        steps.append(out.logits)
    assert rel_err(torch.cat(steps, 1), full) < TOL
    # prefill in two chunks, passing the cache under its other name
    first = model(x[:, :6], use_cache=True)
    second = model(x[:, 6:], past_key_values=hf_compat.output_cache(first), use_cache=True)
    assert rel_err(torch.cat([first.logits, second.logits], 1), full) < TOL


def greedy_by_hand(model, prompt, n):
    x = prompt
    for _ in range(n):
        nxt = model(x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        x = torch.cat([x, nxt], 1)
    return x


@pytest.mark.parametrize("hybrid", sorted(HYBRIDS))
def test_greedy_generate_equals_a_manual_greedy_loop(hybrid):
    model = tiny_model(HYBRIDS[hybrid], num_layers=4)
    prompt = ids(2, 6)
    out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 14)
    assert torch.equal(out, greedy_by_hand(model, prompt, 8))
    # and without a cache (generate feeds the whole sequence each step)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False), out)


def test_sampling_generate_is_seeded_and_valid():
    model = tiny_model(HYBRIDS["test_hybrid"], dtype=torch.float32)
    prompt = ids(3, 4)
    torch.manual_seed(1234)
    a = model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=20, temperature=1.5)
    torch.manual_seed(1234)
    b = model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=20, temperature=1.5)
    assert a.shape == (3, 14) and torch.equal(a, b)
    assert torch.equal(a[:, :4], prompt)
    assert int(a.min()) >= 0 and int(a.max()) < VOCAB
    # num_return_sequences expands the batch (and so the cache) before the prefill
    c = model.generate(prompt, max_new_tokens=5, do_sample=True, num_return_sequences=2)
    assert c.shape == (6, 9)


@pytest.mark.parametrize("hybrid", sorted(HYBRIDS))
def test_left_padded_batch_generate_equals_rows_alone(hybrid):
    model = tiny_model(HYBRIDS[hybrid], pad_token_id=0)
    lengths, T = [7, 3, 5], 7
    prompts = [ids(1, n).clamp_min(1) for n in lengths]
    batch = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, (p, n) in enumerate(zip(prompts, lengths)):
        batch[b, T - n:] = p[0]
        mask[b, T - n:] = 1
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for b, p in enumerate(prompts):
        alone = model.generate(p, max_new_tokens=6, do_sample=False)
        assert torch.equal(out[b, T:], alone[0, p.shape[1]:]), f"row {b}"


def test_beam_search_reorders_the_cache():
    model = tiny_model(HYBRIDS["test_hybrid"])
    prompt = ids(2, 5)
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, early_stopping=True)
    with_cache = model.generate(prompt, **kwargs)
    without_cache = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 11)
    assert torch.equal(with_cache, without_cache)


def test_generate_continues_from_a_returned_cache():
    model = tiny_model(HYBRIDS["test_hybrid"])
    prompt = ids(2, 5)
    ref = model.generate(prompt, max_new_tokens=10, do_sample=False)
    first = model.generate(prompt, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = getattr(first, hf_compat.CACHE_NAME)
    assert isinstance(cache, LinmixCache) and cache.get_seq_length() == 5 + 3  # the last token is not fed yet
    second = model.generate(first.sequences, max_new_tokens=6, do_sample=False, **{hf_compat.CACHE_NAME: cache})
    assert torch.equal(second, ref)


def test_generate_from_inputs_embeds():
    model = tiny_model(HYBRIDS["test_hybrid"])
    prompt = ids(2, 5)
    ref = model.generate(prompt, max_new_tokens=5, do_sample=False)
    out = model.generate(inputs_embeds=model.get_input_embeddings()(prompt), max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref[:, 5:])


def test_cache_unit():
    cache = LinmixCache(3)
    assert len(cache) == 3 and cache.batch_size is None and cache.get_seq_length() == 0
    rec = torch.randn(4, 2, 3, 3)
    kv = torch.randn(4, 7, 5)
    cache.update(0, {"recurrent_state": rec})
    cache.update(2, {"k": kv, "mask": torch.ones(4, 7, dtype=torch.bool)})
    cache.seen_tokens = 7
    assert cache.batch_size == 4 and cache[1] is None and cache.get_seq_length() == 7
    assert cache.state_bytes() == rec.numel() * 4 + kv.numel() * 4
    idx = torch.tensor([3, 3, 0, 1])
    cache.reorder_cache(idx)
    assert torch.equal(cache[0]["recurrent_state"], rec[idx]) and torch.equal(cache[2]["k"], kv[idx])
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert torch.equal(cache[0]["recurrent_state"], rec[[3, 0]])
    cache.batch_repeat_interleave(2)
    assert torch.equal(cache[2]["k"], kv[[3, 3, 0, 0]])
    cache.crop(0)  # what generate() may ask: nothing to drop
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(3)
    with pytest.raises(TypeError, match="dict of tensors"):
        cache.update(1, torch.zeros(1))
    assert not cache.is_compileable and not cache.is_croppable and cache.is_linear == [False] * 3
    cache.reset()
    assert cache.batch_size is None and cache.get_seq_length() == 0
    with pytest.raises(ValueError, match="num_layers"):
        LinmixCache(0)
