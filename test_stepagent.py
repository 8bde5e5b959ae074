"""Tests for stepagent: read top to bottom, they are the spec. Run: pytest -q test_stepagent.py"""
from __future__ import annotations

import functools
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

# ----------------------------------------------------------------------------- tiny offline model + tokenizer

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_CORPUS = [
    "go to shelf 1", "open drawer 2", "close drawer 2", "take apple 1 from countertop 2", "put apple 1 in/on fridge 1",
    "On the shelf 1, you see nothing.", "You pick up the apple 1 from the countertop 2.", "Nothing happens.",
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a fridge 1, and a shelf 1.",
    "Your task is to: put a clean apple in fridge. Thought: I need an apple. Action: look inventory examine",
    "Interact with a household to solve a task. heat cool clean use toggle with",
]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    """A byte-level BPE tokenizer (~330 tokens) with a ChatML template, built offline in about a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(TINY_CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


def tiny_model(attn_implementation: str = "eager", seed: int = 0):
    """A randomly initialised 2-layer, 64-wide Llama over the tiny tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                      tie_word_embeddings=True, attn_implementation=attn_implementation)
    return LlamaForCausalLM(cfg).eval()
