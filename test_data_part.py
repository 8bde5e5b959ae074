"""Tests for data.py (merged into test_stepagent.py later). Run: pytest -q test_data_part.py"""
from __future__ import annotations

import json
import random
import types
from pathlib import Path

import pytest

from data import (DataError, Step, Trajectory, agent_turn, clean_observation, default_expert_path, encode_action,
                  encode_dataset, encode_prompt, encode_trajectory, load_trajectories, main, normalize_action,
                  parse_action, render_messages, split_trajectories, strip_banner, system_prompt)
from test_stepagent import tiny_tokenizer

EXPERT = Path(__file__).resolve().parent.parent / "shared" / "alfworld" / "expert"
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
    planner = {t.id: t for t in load_trajectories(EXPERT / "train_planner.json")}
    structured = load_trajectories(EXPERT / "train.jsonl")
    assert len(planner) == 3554 and len(structured) == 283  # only won records, the one "error" record skipped
    assert len(load_trajectories(EXPERT / "train.jsonl", only_won=False)) == 432
    a, b = planner[GAME], next(t for t in structured if t.id == GAME)
    assert a.task == b.task and a.task.startswith("You are in the middle") and a.task.endswith("under the desklamp.")
    assert a.task_type == b.task_type == "look_at_obj_in_light" and a.game_file == b.game_file
    assert all(t.id in planner and planner[t.id].task == t.task for t in structured)
    assert not any(s.observation.startswith("You arrive") for t in structured for s in t.steps)


def test_max_trajectories_is_a_stable_subset(tmp_path):
    """Subsampling picks the same ids whatever the file order."""
    five = load_trajectories(EXPERT / "train_planner.json", max_trajectories=5)
    assert len(five) == 5 and five == load_trajectories(EXPERT / "train_planner.json", max_trajectories=5)
    records = json.loads((EXPERT / "train_planner.json").read_text())[:50]
    a = load_trajectories(write(tmp_path / "a.json", records, False), max_trajectories=7)
    b = load_trajectories(write(tmp_path / "b.json", records[::-1], False), max_trajectories=7)
    assert [t.id for t in a] == [t.id for t in b]


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
    ("bad.jsonl", json.dumps(GOOD) + "\n{not json\n", "bad.jsonl: line 2: not JSON: Expecting property name"),
    ("bad.json", '[{"id": "g",\n "x": }]', "bad.json: not JSON: Expecting value at line 2, column 7"),
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
    monkeypatch.setenv("ALFWORLD_DATA", str(EXPERT.parent))
    assert default_expert_path("alfworld") == EXPERT / "train_planner.json"


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
    trajs = load_trajectories(EXPERT / "train.jsonl", max_trajectories=2) + [thought_traj()]
    for traj in load_trajectories(EXPERT / "train_planner.json", max_trajectories=3) + trajs:
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
    trajs = load_trajectories(EXPERT / "train_planner.json", max_trajectories=6)
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
    main(["stats", str(EXPERT / "train.jsonl")])
    assert "283 trajectories" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: .*nope.json: no such file"):
        main(["stats", str(tmp_path / "nope.json")])
