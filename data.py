"""Expert trajectories for stepagent: loading, text conventions shared with the live environments, and tokenisation.

Two input formats load into the same `Trajectory`: ETO conversation JSON (`train_planner.json`) and structured JSONL
records (`train.jsonl`, written by `python data.py build-expert`). Usage: `python data.py stats FILE`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


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

SYSTEM_PROMPTS = {
    "alfworld": "Interact with a household to solve a task. Commands: go to X, open X, close X, take X from Y, "
    "put X in/on Y, toggle X, clean X with Y, heat X with Y, cool X with Y, use X, examine X, inventory, look. "
    "Reply with one action.",
    "sciworld": "Do a science experiment in a text world. Commands: look around, open X, close X, go to LOCATION, "
    "pick up X, put X in Y, focus on X, use X on Y, wait, activate X, deactivate X, mix X, pour X in Y, read X, "
    "inventory, task. Reply with one action.",
    "webshop": "Shop online for the product the instruction asks for. Commands: search[query], click[button]. "
    "Reply with one action.",
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
