"""Tiny randomly initialised teachers (Llama family, GPT-2) and a tiny byte-level BPE tokenizer."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 300


def tiny_llama(kind: str = "llama", *, dtype: torch.dtype = torch.float32, vocab_size: int = VOCAB,
               **overrides) -> torch.nn.Module:
    """A 2-layer Llama-family causal LM (hidden 64, 4 query / 2 KV heads), weights drawn with std 0.2
    so that attention is far from uniform."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = classes[kind]
    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, tie_word_embeddings=False,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    kwargs.update(overrides)
    model = model_cls(config_cls(**kwargs)).to(dtype).eval()
    with torch.no_grad():  # norms away from 1, biases away from 0
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_gpt2(*, dtype: torch.dtype = torch.float32, vocab_size: int = VOCAB, initializer_range: float = 0.2) -> torch.nn.Module:
    """A 2-layer GPT-2 (hidden 64, 4 heads), weights with std 0.2, biases drawn."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                        initializer_range=initializer_range, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer with 300 tokens, "<eos>" as EOS and padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
              "The pass key is 12345. Remember it. What is the pass key? The special magic number for Paris is",
              "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"] * 20
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
