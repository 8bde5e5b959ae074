"""Expert trajectories for stepagent: loading, text conventions shared with the live environments, and tokenisation.

Two input formats load into the same `Trajectory`: ETO conversation JSON (`train_planner.json`) and structured JSONL
records (`train.jsonl`, written by `python envs.py build-expert`). Usage: `python data.py stats FILE [--model M]`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm


class DataError(ValueError):
    """One-line, user-actionable error: names file, record (1-based line or index) and field."""


@dataclass
class Step:
    action: str  # the environment command, e.g. "go to shelf 1"
    observation: str  # the environment's answer, cleaned with clean_observation()
    thought: str = ""  # optional "Thought:" text of ETO-style data, kept so rendering reproduces the agent turn


@dataclass
class Trajectory:
    id: str
    task: str  # first user turn: the first observation without the engine banner (room + "Your task is to: ...")
    steps: list[Step]
    env: str = "alfworld"
    task_type: str = ""  # e.g. "pick_and_place_simple" (ALFWorld's 6 types)
    game_file: str = ""


# ----------------------------------------------------------------------------- text conventions (data and live envs)

BANNER = re.compile(r"\A\s*-= Welcome to TextWorld.*?=-\s*")
ARRIVE = re.compile(r"\AYou arrive at loc \d+\.\s*")
ACTION = re.compile(r"Action:\s*(\S.*)")
THOUGHT = re.compile(r"\A\s*Thought:\s*", re.IGNORECASE)
FINAL_ACTION = re.compile(r"Action:\s*\S.*\n")  # ACTION's first match, followed by the end of its line

SYSTEM_PROMPTS = {
    "alfworld": "Interact with a household to solve a task. Commands: go to X, open X, close X, take X from Y, "
    "put X in/on Y, toggle X, clean X with Y, heat X with Y, cool X with Y, use X, examine X, inventory, look. "
    "Reply with one action.",
    "sciworld": "Do a science experiment in a text world. Commands: look around, open X, close X, go to LOCATION, "
    "pick up X, put X in Y, focus on X, use X on Y, wait, activate X, deactivate X, mix X, pour X in Y, read X, "
    "inventory, task. Reply with one action.",
    "webshop": "Shop online for the product the instruction asks for. Commands: search[query], click[button]. "
    "Reply with one action.",
    "hotpotqa": "Answer a question that needs two Wikipedia paragraphs. Commands: search[title] shows the opening of "
    "the paragraph with that title, lookup[keyword] shows the next sentence of that paragraph containing the keyword, "
    "finish[answer] gives a short answer and ends. Reply with one action.",
}


def strip_banner(text: str) -> str:
    """The TextWorld welcome banner is engine decoration, not part of the task the agent must read."""
    return BANNER.sub("", text).strip()


def clean_observation(text: str) -> str:
    """ETO/ReAct drop the engine's "You arrive at loc N. " (an internal id); do the same for data and live play."""
    return ARRIVE.sub("", text.strip()).strip()


def parse_action(reply: str) -> str:
    """The command to send: the first "Action:" line, else a bare command's first line, else the reply as-is."""
    if m := ACTION.search(reply):
        return m.group(1).strip()
    first = next((line.strip() for line in reply.splitlines() if line.strip()), "")
    return reply.strip() if THOUGHT.match(first) else first


def action_is_final(reply: str) -> bool:
    """True once more text cannot change parse_action(reply) or the thought before it: the first "Action:" line has
    ended. (A bare command's first line can still be overridden by a later "Action:" line, so it never is.)"""
    return bool(FINAL_ACTION.search(reply))


def normalize_action(text: str) -> str:
    """Canonical form for comparing agent and expert actions: case, spacing and a final '.' don't matter."""
    return " ".join(parse_action(text).lower().split()).rstrip(".").strip()


def agent_turn(step: Step) -> str:
    """The assistant's words for a step; rendering and tokenisation both use exactly this text."""
    return f"Thought: {step.thought}\nAction: {step.action}" if step.thought else step.action


def system_prompt(env: str) -> str:
    """A short instruction with the env's action grammar, always given (some templates add a default otherwise)."""
    if env not in SYSTEM_PROMPTS:
        raise DataError(f"unknown env '{env}': expected one of {', '.join(SYSTEM_PROMPTS)}")
    return SYSTEM_PROMPTS[env]


def render_messages(traj: Trajectory, upto: int | None = None) -> list[dict]:
    """Chat messages for h_upto (all steps if None): what the policy sees, in training and in live play alike."""
    messages = [{"role": "system", "content": system_prompt(traj.env)}, {"role": "user", "content": traj.task}]
    for step in traj.steps[:upto]:
        messages += [{"role": "assistant", "content": agent_turn(step)}, {"role": "user", "content": step.observation}]
    return messages


# ----------------------------------------------------------------------------- loading


def _hash(text: str) -> str:
    """A stable hash (Python's hash() is salted per process), so subsets and splits are the same on every run."""
    return hashlib.sha256(text.encode()).hexdigest()


def _field(rec: dict, name: str, typ: type, where: str, default: object = None) -> object:
    """A typed field of a record; a wrong or missing one is a one-line error naming file, record and field."""
    value = rec.get(name, default)
    if not isinstance(value, typ) or (typ is list and not value):
        expected = {str: "a string", list: "a non-empty list", bool: "true or false"}[typ]
        got = "it is missing" if name not in rec else f"got {json.dumps(value)[:40]}"
        raise DataError(f"{where}: field '{name}': expected {expected}, {got}")
    return value


def _record_id(rec: dict, where: str) -> str:
    """The record's "id", else the game's folder ("<task>-<objects>-<scene>/trial_..."), the same in both formats."""
    if "id" in rec or "game_file" not in rec:
        return _field(rec, "id", str, where)
    return "/".join(Path(_field(rec, "game_file", str, where)).parent.parts[-2:])


def _from_structured(rec: dict, where: str) -> tuple[str, list[Step]]:
    """Task and steps of a structured record: initial_observation, steps[{action, observation, thought?}]."""
    steps = []
    for j, step in enumerate(_field(rec, "steps", list, where)):
        w = f"{where}: steps[{j}]"
        if not isinstance(step, dict):
            raise DataError(f"{w}: expected an object with 'action' and 'observation'")
        action, thought = _field(step, "action", str, w).strip(), _field(step, "thought", str, w, "").strip()
        steps.append(Step(action, clean_observation(_field(step, "observation", str, w)), thought))
    return strip_banner(_field(rec, "initial_observation", str, where)), steps


def _from_conversation(rec: dict, where: str) -> tuple[str, list[Step]]:
    """Task and steps of an ETO record: a human task turn, then gpt replies and human observations alternating."""
    values = []
    for j, turn in enumerate(_field(rec, "conversations", list, where)):
        w, expected = f"{where}: conversations[{j}]", ("human", "gpt")[j % 2]
        if not isinstance(turn, dict):
            raise DataError(f"{w}: expected an object with 'from' and 'value'")
        role = _field(turn, "from", str, w)
        if role != expected:
            why = f"got '{role}'" if j == 0 or role not in ("human", "gpt") else f"two '{role}' turns in a row"
            raise DataError(f"{w}: field 'from': expected '{expected}' ({why}; turns alternate human, gpt, human, ...)")
        values.append(_field(turn, "value", str, w))
    if len(values) < 2:
        raise DataError(f"{where}: field 'conversations': expected a 'gpt' turn after the task")
    steps = []
    for j in range(1, len(values), 2):
        m = ACTION.search(values[j])
        thought = THOUGHT.sub("", values[j][: m.start()]).strip() if m else ""
        observation = values[j + 1] if j + 1 < len(values) else ""  # a final reply may have no observation
        steps.append(Step(parse_action(values[j]), clean_observation(observation), thought))
    return strip_banner(values[0]), steps


def _read_records(path: Path) -> list[tuple[str, object]]:
    """(where, record) pairs of a JSON list (where = "record i", its index) or of JSONL (where = "line n", 1-based)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}, column {e.colno}: not JSON ({e.msg})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of trajectories, got {type(records).__name__}")
        return [(f"{path}: record {i}", rec) for i, rec in enumerate(records)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{path}: line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}, column {e.colno}: not JSON ({e.msg})") from None
    return out


def load_trajectories(path: str | Path, env: str = "alfworld", max_trajectories: int | None = None,
                      only_won: bool = True) -> list[Trajectory]:
    """Expert trajectories from ETO conversation JSON or structured JSONL; bad data fails here, not mid-training."""
    path, _ = Path(path), system_prompt(env)
    if not path.is_file():
        hint = " or export ALFWORLD_DATA=/path/to/alfworld (pip install alfworld && alfworld-download)"
        raise DataError(f"{path}: no such file: pass --data FILE{hint if env == 'alfworld' else ''}")
    trajs = []
    for where, rec in _read_records(path):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object (one trajectory), got {json.dumps(rec)[:40]}")
        # A record with "error" names a game the expert could not play: it has no steps in any mode.
        if "error" in rec or (only_won and not _field(rec, "won", bool, where, True)):
            continue
        task, steps = (_from_conversation if "conversations" in rec else _from_structured)(rec, where)
        tid = _record_id(rec, where)
        trajs.append(Trajectory(tid, task, steps, env, _field(rec, "task_type", str, where, tid.split("-")[0]),
                                _field(rec, "game_file", str, where, "")))
    if not trajs:
        raise DataError(f"{path}: no usable trajectories: expected at least one record{' that won' * only_won}")
    return subsample(trajs, max_trajectories)


def subsample(trajs: list[Trajectory], n: int | None, seed: int = 0) -> list[Trajectory]:
    """The first n in an order hashed from each id (seed 0: the draw every run before sweeps used; seed k: another
    draw), so a subset does not depend on file order and a larger n of the same seed contains every smaller one."""
    if not n:
        return trajs
    return sorted(trajs, key=lambda t: _hash(t.id if not seed else f"{seed}:{t.id}"))[:n]


def split_trajectories(trajs: list[Trajectory], val_fraction: float,
                       seed: int = 0) -> tuple[list[Trajectory], list[Trajectory]]:
    """Train/val by a seeded hash of each id: the same split whatever order the file lists trajectories in."""
    order = sorted(range(len(trajs)), key=lambda i: _hash(f"{seed}:{trajs[i].id}"))
    val = set(order[: round(len(trajs) * val_fraction)])
    return [t for i, t in enumerate(trajs) if i not in val], [t for i, t in enumerate(trajs) if i in val]


def cache_dir() -> Path:
    """What stepagent makes once and keeps (model conversion, unpacked games, built data): $STEPAGENT_CACHE, default
    ~/.cache/stepagent."""
    return Path(os.environ.get("STEPAGENT_CACHE") or Path.home() / ".cache" / "stepagent").expanduser()


def default_expert_path(env: str) -> Path:
    """$ALFWORLD_DATA/expert/train_planner.json, else the shared copy beside the repo; HotpotQA: the build-expert output
    in the cache, made by an explicit command so a run never trains on data it built silently; others need --data."""
    if env == "hotpotqa":
        path = cache_dir() / "hotpotqa" / "train_expert.jsonl"
        if not path.is_file():
            raise DataError(f"{path}: no such file: build it once with `python envs.py build-expert --env hotpotqa "
                            f"--split train --out {path}` (a second, pure-Python), or pass --data FILE")
        return path
    if env != "alfworld":
        raise DataError(f"no default expert data for env '{env}': pass --data FILE (ETO-format JSON, or build one: "
                        f"python envs.py build-expert --env {env} --split train --out FILE)")
    root = os.environ.get("ALFWORLD_DATA") or Path(__file__).resolve().parent.parent / "shared" / "alfworld"
    path = Path(root) / "expert" / "train_planner.json"
    if not path.is_file():
        raise DataError(f"{path}: no such file: export ALFWORLD_DATA=/path/to/alfworld (the folder holding expert/"
                        "train_planner.json), or pass --data FILE (ETO's alfworld_sft.json, or one made by "
                        "`python envs.py build-expert --env alfworld --split train --out FILE --fix-expert-grammar`)")
    return path


# ----------------------------------------------------------------------------- tokenisation


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[bool]  # True exactly on assistant action tokens (content + the template's end-of-turn token)
    action_spans: list[tuple[int, int]]  # [start, end) token span of step t's action (the tokens loss_mask covers)
    traj: Trajectory
    truncated: bool = False


def _chat_text(tok, messages: list[dict], generation_prompt: bool) -> str:
    """The template's text; tokenised later with add_special_tokens=False since the template holds BOS etc. itself."""
    if not getattr(tok, "is_fast", False):
        raise DataError(f"{tok.name_or_path}: not a fast tokenizer; stepagent needs its offsets (use_fast=True)")
    if not tok.chat_template:
        raise DataError(f"{tok.name_or_path}: tokenizer has no chat template: use an instruct/chat model")
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _turn_end(tok) -> str:
    """What the template writes after an assistant reply up to its end-of-turn token (e.g. "<|im_end|>"), read off a
    probe conversation, so the policy learns to stop; "" if no special token follows the reply."""
    probe = "PROBE-REPLY-81d3"
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": probe}, {"role": "user", "content": "o"}]
    text = _chat_text(tok, messages, False)
    after = text[text.index(probe) + len(probe):]
    gap = len(after) - len(after.lstrip())
    ends = [t for t in tok.get_added_vocab() if after.startswith(t, gap)]
    return after[: gap + max(map(len, ends))] if ends else ""


def _ids(tok, text: str) -> list[int]:
    """Plain ids of template text: no extra BOS, the template already wrote what the model needs."""
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_trajectory(tok, traj: Trajectory, max_length: int, on_too_long: str = "skip") -> Encoded | None:
    """Token ids of the whole conversation with a loss mask and a token span per action, for one-pass log-probs."""
    if on_too_long not in ("skip", "truncate", "error"):
        raise ValueError(f"on_too_long: expected skip, truncate or error, got {on_too_long!r}")
    messages, end = render_messages(traj), _turn_end(tok)
    text = _chat_text(tok, messages, False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    token_at, token_before = {}, {}
    for i, (a, b) in enumerate(offsets):
        token_at.setdefault(a, i)
        token_before[b] = i + 1
    spans, pos = [], 0
    for m in messages:  # the template writes each content verbatim and in order: find them left to right
        start = text.find(m["content"], pos)
        if start < 0:
            raise DataError(f"{tok.name_or_path}: the chat template rewrites message content; it must keep it verbatim")
        pos = start + len(m["content"])
        if m["role"] == "assistant":
            stop = pos + len(end)
            if text[pos:stop] != end or start not in token_at or stop not in token_before:
                raise DataError(f"{tok.name_or_path}: a token straddles the edge of an assistant reply in {traj.id}")
            spans.append((token_at[start], token_before[stop]))
            pos = stop
    if len(ids) > max_length:
        if on_too_long == "error":
            raise DataError(f"trajectory {traj.id}: {len(ids)} tokens > max_length {max_length}: raise max_length "
                            "or use on_too_long='skip' or 'truncate'")
        for k in range(sum(e <= max_length for _, e in spans) if on_too_long == "truncate" else 0, 0, -1):
            if short := encode_trajectory(tok, replace(traj, steps=traj.steps[:k]), max_length):
                return replace(short, truncated=True)
        return None
    mask = [False] * len(ids)
    for s, e in spans:
        mask[s:e] = [True] * (e - s)
    return Encoded(ids, mask, spans, traj)


def encode_prompt(tok, traj: Trajectory, t: int) -> list[int]:
    """Ids of h_t plus the generation prompt: what the policy sees before a_t (= input_ids[:action_spans[t][0]])."""
    return _ids(tok, _chat_text(tok, render_messages(traj, t), True))


def encode_action(tok, traj: Trajectory, t: int, reply: str) -> list[int]:
    """Ids an alternative reply would have at action_spans[t] (with the end-of-turn token), tokenised in context."""
    prompt = _chat_text(tok, render_messages(traj, t), True)
    prompt_ids, ids = _ids(tok, prompt), _ids(tok, prompt + reply + _turn_end(tok))
    if ids[: len(prompt_ids)] != prompt_ids:
        raise DataError(f"{tok.name_or_path}: reply {reply[:30]!r} merges with the prompt's last token at step {t}")
    return ids[len(prompt_ids):]


def encode_dataset(tok, trajs: list[Trajectory], max_length: int,
                   on_too_long: str = "skip") -> tuple[list[Encoded], dict]:
    """Encode all trajectories, counting those skipped or truncated for being longer than max_length."""
    encoded, counts = [], {"kept": 0, "skipped_too_long": 0, "truncated": 0}
    for traj in tqdm(trajs, desc="tokenise", leave=False):
        enc = encode_trajectory(tok, traj, max_length, on_too_long)
        if enc is None:
            counts["skipped_too_long"] += 1
            continue
        counts["truncated"] += enc.truncated
        encoded.append(enc)
    counts["kept"] = len(encoded)
    return encoded, counts


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    """`stats FILE [--model M]` summarises expert data (`python envs.py build-expert` makes it from the engines)."""
    parser = argparse.ArgumentParser(description="stepagent expert data")
    sub = parser.add_subparsers(dest="command", required=True)
    stats = sub.add_parser("stats", help="trajectories, steps and (with --model) tokens of an expert file")
    stats.add_argument("file")
    stats.add_argument("--env", default="alfworld")
    stats.add_argument("--model", help="count tokens with this model's tokenizer")
    args = parser.parse_args(argv)
    try:
        trajs = load_trajectories(args.file, args.env)
        n_steps = [len(t.steps) for t in trajs]
        print(f"{len(trajs)} trajectories, {sum(n_steps) / len(trajs):.1f} steps on average (max {max(n_steps)})")
        print(dict(sorted(Counter(t.task_type for t in trajs).items())))
        if args.model:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(args.model)
            n_tokens = [len(encode_trajectory(tok, t, sys.maxsize).input_ids) for t in tqdm(trajs, desc="tokenise")]
            print(f"tokens: {sum(n_tokens) / len(n_tokens):.0f} on average, max {max(n_tokens)}")
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
