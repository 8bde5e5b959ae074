"""Text environments for stepagent: ALFWorld (TextWorld's PDDL engine), ScienceWorld, and a WebShop HTTP client,
with batched evaluation and expert-trajectory builders.

Every environment speaks one small protocol (`TextEnv`): `load(game)`, `reset() -> (observation, info)`,
`step(action) -> (observation, reward, done, info)` with `info["won"]`, `close()`. Observations follow the training
data's conventions (data.strip_banner, data.clean_observation), so the policy sees the same text in both.

Games are named by strings: ALFWorld, a game file relative to the data folder
("json_2.1.1/valid_seen/<task>/<trial>/game.tw-pddl"); ScienceWorld, "<task name>:<variation>" ("boil:12");
WebShop, a goal index ("2853"). `evaluate` and `build_expert` run each environment in a child process, so an engine
that crashes or hangs costs one episode, never the run.
"""
from __future__ import annotations

import hashlib
import html
import html.parser
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from dataclasses import replace
from multiprocessing.connection import wait as wait_conns
from pathlib import Path
from typing import Callable, Protocol

from tqdm import tqdm

from data import (ACTION, THOUGHT, Step, Trajectory, clean_observation, parse_action, strip_banner,
                  system_prompt)

REPO = Path(__file__).resolve().parent
ALFWORLD_SPLITS = ("train", "valid_seen", "valid_unseen")
ALFWORLD_TASK_TYPES = ("pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
                       "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place")
SCIWORLD_SPLITS = ("train", "dev", "test")
WEBSHOP_SPLITS = {"train": "ETO_webshop_train_indices.json", "test": "ETO_webshop_test_indices.json",
                  "test_500": "ETO_webshop_test_indices_500.json"}
# Turn caps. ALFWorld: 40 = ETO's harness (IPR uses 20); the number changes results, so report it with them.
# ScienceWorld: ETO's per-task caps (ETO_sciworld_max_steps.json). WebShop: 15, ReAct's and ETO's choice.
DEFAULT_MAX_STEPS = {"alfworld": 40, "sciworld": None, "webshop": 15}


class EnvError(RuntimeError):
    """One line: what to install or set."""


class TextEnv(Protocol):
    def load(self, game: str) -> None: ...
    def reset(self) -> tuple[str, dict]: ...
    def step(self, action: str) -> tuple[str, float, bool, dict]: ...
    def close(self) -> None: ...


def _stable_int(text: str) -> int:
    """A per-game seed that is the same in every process (Python's hash() is salted)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def splits_dir() -> Path:
    """The peers' split files: $STEPAGENT_SPLITS, else ../shared/splits beside the repo."""
    path = Path(os.environ.get("STEPAGENT_SPLITS") or REPO.parent / "shared" / "splits")
    if not path.is_dir():
        raise EnvError(f"split files not found at {path}: export STEPAGENT_SPLITS=/path/to/splits "
                       "(the folder of ETO's *_indices.json)")
    return path


# ============================================================================ ALFWorld


def _import_alfworld():
    """textworld and alfworld's wrappers, imported only when an ALFWorld game is played (import takes ~0.5 s)."""
    before = os.environ.get("ALFWORLD_DATA")
    try:
        import textworld
        import textworld.gym
        from alfworld.agents.environment import alfred_tw_env
    except ImportError:
        raise EnvError("ALFWorld needs the alfworld package: pip install alfworld==0.4.2 (not the [full] extra)") \
            from None
    if before is None:  # importing alfworld sets ALFWORLD_DATA=~/.cache/alfworld: don't let it hide our default
        os.environ.pop("ALFWORLD_DATA", None)
    return textworld, alfred_tw_env


def alfworld_data_dir(path: str | Path | None = None) -> Path:
    """--data flag, else $ALFWORLD_DATA, else ../shared/alfworld beside the repo."""
    env_dir = os.environ.get("ALFWORLD_DATA")
    if env_dir and Path(env_dir).expanduser() == Path.home() / ".cache" / "alfworld" and \
            not (Path(env_dir).expanduser() / "json_2.1.1").is_dir():
        env_dir = None  # `import alfworld` sets this default itself when the user set nothing
    root = Path(path or env_dir or REPO.parent / "shared" / "alfworld").expanduser()
    if not (root / "json_2.1.1").is_dir() and not (root / "train_games.tar.xz").is_file():
        raise EnvError(f"ALFWorld data not found in {root} (no json_2.1.1/): export ALFWORLD_DATA=/path/to/alfworld "
                       "or pass --data DIR (pip install alfworld && alfworld-download fetches it)")
    return root


def alfworld_cache_dir() -> Path:
    """Where train games are unpacked once: $STEPAGENT_CACHE/alfworld, default ~/.cache/stepagent/alfworld."""
    return Path(os.environ.get("STEPAGENT_CACHE") or Path.home() / ".cache" / "stepagent").expanduser() / "alfworld"


def _alfworld_split_root(split: str, data_dir: str | Path | None = None) -> Path:
    """The folder holding json_2.1.1/<split>; the 4,652 train games ship as a tarball and are unpacked on first use."""
    if split not in ALFWORLD_SPLITS:
        raise EnvError(f"unknown ALFWorld split '{split}': expected one of {', '.join(ALFWORLD_SPLITS)}")
    root = alfworld_data_dir(data_dir)
    if (root / "json_2.1.1" / split).is_dir() or split != "train" or not (root / "train_games.tar.xz").is_file():
        return root
    cache = alfworld_cache_dir()
    if not (cache / "json_2.1.1" / "train").is_dir():
        print(f"unpacking {root / 'train_games.tar.xz'} once into {cache} (~430 MB)")
        tmp = cache / f".unpack-{os.getpid()}"
        with tarfile.open(root / "train_games.tar.xz") as tar:
            tar.extractall(tmp, filter="data")
        (cache / "json_2.1.1").mkdir(parents=True, exist_ok=True)
        os.replace(tmp / "json_2.1.1" / "train", cache / "json_2.1.1" / "train")
        shutil.rmtree(tmp)
    return cache


def _alfworld_games(split: str, data_dir: str | Path | None = None) -> list[str]:
    """Solvable games of a split, sorted, relative to their data folder (140 valid_seen, 134 valid_unseen)."""
    root = _alfworld_split_root(split, data_dir)
    games = []
    for path in sorted((root / "json_2.1.1" / split).glob("*/*/game.tw-pddl")):
        with open(path) as f:
            if json.load(f).get("solvable") is True:  # ALFWorld plays only these (a few files lack the key)
                games.append(path.relative_to(root).as_posix())
    if not games:
        raise EnvError(f"no solvable ALFWorld games in {root / 'json_2.1.1' / split}: check ALFWORLD_DATA / --data")
    return games


def alfworld_game_path(game: str, data_dir: str | Path | None = None) -> Path:
    """A game name (relative to the data folder or the train cache, or absolute) as an existing file."""
    path = Path(game)
    if not path.is_absolute():
        split = path.parts[1] if len(path.parts) > 1 and path.parts[0] == "json_2.1.1" else "valid_seen"
        path = _alfworld_split_root(split if split in ALFWORLD_SPLITS else "valid_seen", data_dir) / path
    if not path.is_file():
        raise EnvError(f"ALFWorld game not found: {path} (names come from envs.list_games('alfworld', split))")
    return path


def alfworld_task_type(game: str) -> str:
    """The task type is the prefix of the game's task folder, e.g. "pick_and_place_simple-Book-None-Sofa-229"."""
    return Path(game).parent.parent.name.split("-")[0]


def alfworld_grammar(game: str, data_dir: str | Path | None = None) -> dict[str, str]:
    """Command templates the game's engine accepts, e.g. {"PutObject": "put {o} in/on {r}"}: read from the game, since
    newer ALFWorld releases renamed "put X in/on Y" to "move X to Y" and a policy taught one grammar fails the other."""
    grammar = json.loads(alfworld_game_path(game, data_dir).read_text())["grammar"]
    return dict(re.findall(r'action\s+(\w+)\s*\{\s*template\s*::\s*"([^"]*)"', grammar))


def grammar_warning(prompt: str, game: str, data_dir: str | Path | None = None) -> str | None:
    """A one-line warning when the game's "put" command is not the one `prompt` (the system prompt) teaches."""
    put = alfworld_grammar(game, data_dir).get("PutObject")
    if put is None:
        return None
    pattern = r"\S+".join(map(re.escape, re.split(r"\{\w+\}", put)))
    if re.search(pattern, prompt):
        return None
    letters = iter("XYZW")
    shown = re.sub(r"\{\w+\}", lambda _: next(letters), put)
    return (f"the ALFWorld games here say '{shown}' but the system prompt does not teach it: the agent's put "
            "actions will fail (train and evaluate on game files of the same ALFWorld release)")


PUT_COMMAND, MOVE_COMMAND = re.compile(r"^put (.+) in/on (.+)$"), re.compile(r"^move (.+) to (.+)$")


def _grammar_fixed_expert(alfred):
    """alfworld 0.4.2's hand-coded expert speaks the newer "move X to Y", which json_2.1.1 games do not admit: its
    wrapper then says "look" instead, and the expert wanders until a random admissible command happens to be the put
    (why expert/train.jsonl loops on tasks that need a put). This expert sees and speaks the game's "put X in/on Y"."""
    class GrammarFixedExpert(alfred.AlfredExpert):
        def load(self, gamefile):
            super().load(gamefile)
            act = self._handcoded_expert.act

            def translated(game_state, reward, done, last_action=""):
                state = game_state.copy()
                state["admissible_commands"] = [PUT_COMMAND.sub(r"move \1 to \2", c)
                                                for c in game_state["admissible_commands"]]
                return MOVE_COMMAND.sub(r"put \1 in/on \2", act(state, reward, done, last_action))
            self._handcoded_expert.act = translated
    return GrammarFixedExpert


class AlfWorldEnv:
    """One ALFWorld game at a time in TextWorld's PDDL engine, with alfworld's wrappers (objects named "apple 1"
    as in the expert data). expert=True adds the hand-coded expert's next action as info["expert_plan"];
    fix_expert_grammar=True lets that expert use the game's "put X in/on Y" (see _grammar_fixed_expert)."""

    def __init__(self, max_steps: int | None = None, data_dir: str | Path | None = None, expert: bool = False,
                 fix_expert_grammar: bool = False):
        self.data_dir = alfworld_data_dir(data_dir)
        self.textworld, self.alfred = _import_alfworld()
        self.max_steps = max_steps or DEFAULT_MAX_STEPS["alfworld"]
        self.expert, self.fix_expert_grammar = expert, fix_expert_grammar
        self.game, self._env, self.steps = "", None, 0

    def load(self, game: str) -> None:
        self.close()
        path = alfworld_game_path(game, self.data_dir)
        self.game, self.task_type = game, alfworld_task_type(game)
        a = self.alfred
        infos = self.textworld.EnvInfos(won=True, admissible_commands=True,
                                        extras=["gamefile"] + ["expert_plan"] * self.expert)
        wrappers = [a.AlfredDemangler(), a.AlfredInfos]
        if self.expert:
            fix = self.fix_expert_grammar and alfworld_grammar(str(path)).get("PutObject") == "put {o} in/on {r}"
            wrappers.append((_grammar_fixed_expert(a) if fix else a.AlfredExpert)(a.AlfredExpertType.HANDCODED))
        env_id = self.textworld.gym.register_games([str(path)], infos, max_episode_steps=self.max_steps,
                                                   asynchronous=False, wrappers=wrappers)
        self._env = self.textworld.gym.make(env_id)
        self.textworld.gym.registry.pop(env_id)  # it holds our wrappers (and through them the game): don't keep it

    def _info(self, info: dict, raw: str) -> dict:
        out = {"won": bool(info["won"]), "game": self.game, "task_type": self.task_type, "raw_observation": raw,
               "admissible_commands": list(info["admissible_commands"])}
        if self.expert:
            out["expert_plan"] = list(info["extra.expert_plan"])
        return out

    def reset(self) -> tuple[str, dict]:
        if self._env is None:
            raise EnvError("AlfWorldEnv.reset() before load(game)")
        obs, info = self._env.reset()
        self.steps = 0
        return strip_banner(obs), self._info(info, obs)

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        obs, _, done, info = self._env.step(action)
        self.steps += 1
        info = self._info(info, obs)
        return clean_observation(obs), float(info["won"]), bool(done) or self.steps >= self.max_steps, info

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


# ============================================================================ ScienceWorld


def sciworld_task_name(name: str) -> str:
    """ETO's names ("task-10-measure-melting-point-(known-substance)") to ScienceWorld's, as its infer_task does."""
    return re.sub(r"task-(\d|a|b)+-|[()]", "", name).replace("mendellian", "mendelian")


def sciworld_max_steps(task: str) -> int:
    """ETO's per-task turn cap; 100 (ScienceWorld's own default) for the tasks ETO leaves out."""
    caps = json.loads((splits_dir() / "ETO_sciworld_max_steps.json").read_text())
    return {sciworld_task_name(k): v for k, v in caps.items()}.get(sciworld_task_name(task), 100)


def _sciworld_games(split: str) -> list[str]:
    """ETO's task-variation split as "task:variation", in ETO's file order (so the first N mix tasks)."""
    if split not in SCIWORLD_SPLITS:
        raise EnvError(f"unknown ScienceWorld split '{split}': expected one of {', '.join(SCIWORLD_SPLITS)}")
    pairs = json.loads((splits_dir() / f"ETO_sciworld_{split}_indices.json").read_text())
    return [f"{sciworld_task_name(task)}:{variation}" for task, variation in pairs]


def _parse_sciworld_game(game: str) -> tuple[str, int]:
    task, _, variation = game.rpartition(":")
    if not task or not variation.isdigit():
        raise EnvError(f"ScienceWorld game '{game}': expected 'task_name:variation', e.g. 'boil:12'")
    return sciworld_task_name(task), int(variation)


class SciWorldEnv:
    """A ScienceWorld task variation, ETO's protocol: simplification "easy", the task description as the first
    observation, reward = the best score so far in [0, 100], won = score 100. One JVM per object, reused by load()."""

    def __init__(self, max_steps: int | None = None, simplification: str = "easy", expert: bool = False):
        try:
            from scienceworld import ScienceWorldEnv
        except ImportError:
            raise EnvError("ScienceWorld needs Java and the scienceworld package: pip install scienceworld==1.2.3") \
                from None
        self._cls, self._env = ScienceWorldEnv, None
        self.max_steps, self.simplification, self.expert = max_steps, simplification, expert
        self.game, self.steps, self.best = "", 0, 0

    def load(self, game: str) -> None:
        task, variation = _parse_sciworld_game(game)
        if self._env is None:  # the JVM takes ~1-3 s to start: once per object
            try:
                self._env = self._cls("", envStepLimit=10**9)  # we cap turns ourselves
            except OSError as e:
                raise EnvError(f"ScienceWorld could not start Java ({e}): install a JRE, e.g. "
                               "apt-get install openjdk-17-jre-headless") from None
        self._env.load(task, variation, self.simplification, generateGoldPath=self.expert)
        self.game, self.task_type, self.cap = game, task, self.max_steps or sciworld_max_steps(task)
        self._gold = self._env.get_gold_action_sequence() if self.expert else []

    def _info(self, info: dict, raw: str) -> dict:
        out = {"won": self.best >= 100, "game": self.game, "task_type": self.task_type, "score": info["score"],
               "raw_observation": raw}
        if self.expert:
            out["expert_plan"] = self._gold[self.steps:]
        return out

    def reset(self) -> tuple[str, dict]:
        if self._env is None:
            raise EnvError("SciWorldEnv.reset() before load(game)")
        obs, info = self._env.reset()
        self.steps, self.best = 0, 0
        # ETO's first turn is the task description alone; the agent looks around itself.
        return info["taskDesc"].strip(), {**self._info(info, info["taskDesc"]), "look": obs}

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        obs, _, done, info = self._env.step(action)
        self.steps += 1
        # ETO keeps the episode's best score: a task failed after progress (engine score -100) keeps partial credit.
        self.best = max(self.best, info["score"])
        done = bool(done) or self.best >= 100 or self.steps >= self.cap
        return obs.strip(), float(self.best), done, self._info(info, obs)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


# ============================================================================ WebShop (client of a user-run server)


class _PageText(html.parser.HTMLParser):
    """Visible text of a WebShop page with its clickables in [brackets], as ReAct's WebShop client renders it."""

    SKIP = {"style", "script", "head", "title", "meta"}

    def __init__(self):
        super().__init__()
        self.stack, self.parts, self.asins, self.options, self.texts, self._option_type = [], [], [], {}, [], ""

    def handle_starttag(self, tag, attrs):
        if tag not in ("br", "img", "input", "meta", "link", "hr"):
            self.stack.append((tag, dict(attrs).get("class", "")))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, text):
        tag, cls = self.stack[-1] if self.stack else ("", "")
        if any(t in self.SKIP for t, _ in self.stack) or not text.strip():
            return
        text = text.strip()
        self.texts.append(text)
        if tag == "button":
            self.parts.append(f"\n[{text}] ")
        elif tag == "label":
            self.parts.append(f"[{text}]")
            self.options[text] = self._option_type
        elif "product-link" in cls.split():
            self.parts.append(f"\n[{text}] ")
            self.asins.append(text)
        else:
            self.parts.append(f"\n{text} ")
            self._option_type = text


class WebShopEnv:
    """WebShop through HTTP, ReAct's protocol: search[query] and click[button] against a WebShop server you run
    (github.com/princeton-nlp/WebShop, `./run_dev.sh`, default http://127.0.0.1:3000, or set WEBSHOP_URL)."""

    SUBPAGES = ("Description", "Features", "Reviews", "Attributes")

    def __init__(self, max_steps: int | None = None, url: str | None = None, timeout: float = 30.0):
        self.url = (url or os.environ.get("WEBSHOP_URL") or "http://127.0.0.1:3000").rstrip("/")
        self.max_steps, self.timeout = max_steps or DEFAULT_MAX_STEPS["webshop"], timeout
        self.game, self.steps, self.page = "", 0, {}

    def _fetch(self, path: str) -> _PageText:
        url = f"{self.url}/{path}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as r:
                page = r.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError) as e:
            raise EnvError(f"no WebShop server answers at {self.url} ({getattr(e, 'reason', e)}): start one "
                           "(github.com/princeton-nlp/WebShop: ./setup.sh -d all && ./run_dev.sh) and set "
                           "WEBSHOP_URL=http://host:port") from None
        parser = _PageText()
        parser.feed(page)
        return parser

    def _render(self) -> tuple[str, float]:
        p, q = self.page, urllib.parse.quote
        session, query, page_num = p["session"], q(p.get("query", "")), p.get("page_num", 1)
        options = q(repr(p.get("options", {})))
        kind = p["kind"]
        path = {"init": f"{session}",
                "search": f"search_results/{session}/{query}/{page_num}",
                "item": f"item_page/{session}/{p.get('asin')}/{query}/{page_num}/{options}",
                "item_sub": f"item_sub_page/{session}/{p.get('asin')}/{query}/{page_num}/{p.get('subpage')}/{options}",
                "end": f"done/{session}/{p.get('asin')}/{options}"}[kind]
        parsed = self._fetch(path)
        if parsed.asins:
            p["asins"] = parsed.asins
        if parsed.options:
            p["option_types"] = parsed.options
        if "Your score (min 0.0, max 1.0)" in parsed.texts:
            score = parsed.texts[parsed.texts.index("Your score (min 0.0, max 1.0)") + 1]
            return f"Your score (min 0.0, max 1.0): {score}", float(score)
        return html.unescape("".join(parsed.parts)).strip(), 0.0

    def load(self, game: str) -> None:
        if not str(game).isdigit():
            raise EnvError(f"WebShop game '{game}': expected a goal index such as '2853'")
        self.game = str(game)

    def reset(self) -> tuple[str, dict]:
        self.steps, self.page = 0, {"session": f"fixed_{self.game}", "kind": "init"}
        obs, _ = self._render()
        return obs, {"won": False, "game": self.game, "task_type": "webshop", "raw_observation": obs}

    def _move(self, action: str) -> str | None:
        """Apply an action to the page state; a message if it is not valid on this page (the page stays)."""
        p = self.page
        if m := re.fullmatch(r"search\[(.+)\]", action):
            if p["kind"] != "init":
                return "Invalid action: search is only possible on the search page."
            self.page = {"session": p["session"], "kind": "search", "query": m.group(1), "page_num": 1}
        elif m := re.fullmatch(r"click\[(.+)\]", action):
            button = m.group(1)
            if button == "Buy Now" and p["kind"] == "item":
                p["kind"] = "end"
            elif button == "Back to Search" and p["kind"] in ("search", "item", "item_sub"):
                self.page = {"session": p["session"], "kind": "init"}
            elif button == "Next >" and p["kind"] == "search":
                p["page_num"] += 1
            elif button == "< Prev" and p["kind"] in ("search", "item", "item_sub"):
                if p["kind"] == "search" and p["page_num"] > 1:
                    p["page_num"] -= 1
                elif p["kind"] != "search":
                    p["kind"] = {"item_sub": "item", "item": "search"}[p["kind"]]
            elif button in self.SUBPAGES and p["kind"] == "item":
                p["kind"], p["subpage"] = "item_sub", button
            elif p["kind"] == "search" and button in p.get("asins", []):
                p["kind"], p["asin"], p["options"] = "item", button, {}
            elif p["kind"] == "item" and button in p.get("option_types", {}):
                p["options"][p["option_types"][button]] = button
            else:
                return f"Invalid action: there is no [{button}] to click on this page."
        else:
            return "Invalid action: use search[query] or click[button]."
        return None

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        self.steps += 1
        invalid = self._move(action.strip())
        obs, reward = (invalid, 0.0) if invalid else self._render()
        done = self.page["kind"] == "end" or self.steps >= self.max_steps
        return obs, reward, done, {"won": reward >= 1.0, "game": self.game, "task_type": "webshop",
                                   "raw_observation": obs}

    def close(self) -> None:
        pass


def _webshop_games(split: str) -> list[str]:
    if split not in WEBSHOP_SPLITS:
        raise EnvError(f"unknown WebShop split '{split}': expected one of {', '.join(WEBSHOP_SPLITS)}")
    return [str(i) for i in json.loads((splits_dir() / WEBSHOP_SPLITS[split]).read_text())]


# ============================================================================ registry

ENV_CLASSES: dict[str, type] = {"alfworld": AlfWorldEnv, "sciworld": SciWorldEnv, "webshop": WebShopEnv}


def task_type(env: str, game: str) -> str:
    """The per-type key of results: ALFWorld's 6 task types, ScienceWorld's task names, "webshop"."""
    if env == "alfworld":
        return alfworld_task_type(game)
    return _parse_sciworld_game(game)[0] if env == "sciworld" else "webshop"


def _check_env(env: str) -> None:
    if env not in ENV_CLASSES:
        raise EnvError(f"unknown env '{env}': expected one of {', '.join(ENV_CLASSES)}")


def list_games(env: str, split: str, data_dir: str | Path | None = None) -> list[str]:
    """The games of a split, in a fixed order: ALFWorld's solvable games sorted; ETO's lists for the others."""
    _check_env(env)
    if env == "alfworld":
        return _alfworld_games(split, data_dir)
    return _sciworld_games(split) if env == "sciworld" else _webshop_games(split)


def _env_kwargs(env: str, max_steps: int | None, data_dir: str | Path | None, **kw) -> dict:
    kw = {"max_steps": max_steps, **kw}
    if env == "alfworld":
        kw["data_dir"] = str(alfworld_data_dir(data_dir))  # resolved here: children inherit no surprises
    elif env == "webshop" and data_dir:
        kw["url"] = str(data_dir)
    return kw


def make_env(env: str, game: str, max_steps: int | None = None, **kw) -> TextEnv:
    """An environment with `game` loaded, in this process (call reset() to start). kw: data_dir (ALFWorld),
    expert=True (info["expert_plan"]: hand-coded expert / ScienceWorld gold path), url (WebShop)."""
    _check_env(env)
    obj = ENV_CLASSES[env](max_steps=max_steps, **kw)
    obj.load(game)
    return obj


# ============================================================================ isolation: one env per child process


def _play_expert(obj, game: str) -> dict:
    """One expert episode as a structured record (raw engine text, as in expert/train.jsonl)."""
    random.seed(_stable_int(game))  # ALFWorld's hand-coded expert draws random.choice: make each game repeatable
    obj.load(game)
    _, info = obj.reset()
    rec = {"game_file": game, "task_type": info["task_type"], "initial_observation": info["raw_observation"],
           "steps": []}
    done = False
    while not done and info["expert_plan"]:
        action = info["expert_plan"][0]
        _, _, done, info = obj.step(action)
        rec["steps"].append({"action": action, "observation": info["raw_observation"]})
    rec["won"] = info["won"]
    return rec


def _serve(conn, env: str, kw: dict) -> None:
    """Child-process loop: one env object; commands in, ("ok", result) or ("error", message) out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it closes us in order
    obj = None
    try:
        while True:
            try:
                cmd, arg = conn.recv()
            except (EOFError, OSError):
                return
            if cmd == "close":
                return
            try:
                obj = obj or ENV_CLASSES[env](**kw)
                if cmd == "start":
                    obj.load(arg)
                    out = obj.reset()
                elif cmd == "step":
                    out = obj.step(arg)
                else:
                    out = _play_expert(obj, arg)
                conn.send(("ok", out))
            except Exception as e:  # reported to the parent, which records the episode as failed
                conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        if obj is not None:
            obj.close()


RECYCLE_AFTER = 100  # games per engine process: loading a TextWorld game leaks ~3 MB that no close() gives back


class _Worker:
    """A TextEnv in a child process: a crash or a hang there costs one episode (the child is killed), not the run.
    Forked where possible (cheap, and tests' monkeypatches reach the child); the child never touches torch."""

    def __init__(self, env: str, kw: dict):
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, env, kw), daemon=True)
        self.proc.start()
        child.close()
        self.deadline, self.crashed, self.games = 0.0, "", 0

    def send(self, cmd: str, arg: object, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        try:
            self.conn.send((cmd, arg))
            self.crashed = ""
        except OSError:  # the child is gone (killed from outside, out of memory): _gather reports it
            self.crashed = f"EnvCrash: the engine process died (exit code {self.proc.exitcode})"

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("close", None))
            except OSError:
                pass
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def _gather(workers: list[_Worker], timeout: float, first: bool = False) -> dict[int, tuple[bool, object]]:
    """Answers of workers that were sent a command: {index: (ok, result or error message)}. An answer missing at
    the worker's deadline reads as a timeout error. first=True returns as soon as any answer (or timeout) is in."""
    out = {i: (False, w.crashed) for i, w in enumerate(workers) if w.crashed}
    waiting = {i: w for i, w in enumerate(workers) if not w.crashed}
    while waiting and not (first and out):
        now = time.monotonic()
        for i, w in list(waiting.items()):
            if w.deadline <= now:
                out[i] = (False, f"TimeoutError: no answer from the engine in {timeout:g} s")
                del waiting[i]
        if not waiting or (first and out):
            break
        next_deadline = min(w.deadline for w in waiting.values())
        ready = wait_conns([w.conn for w in waiting.values()], max(0.0, next_deadline - now))
        for i, w in list(waiting.items()):
            if w.conn in ready:
                try:
                    ok, result = w.conn.recv()
                    out[i] = (ok == "ok", result)
                except (EOFError, OSError):
                    out[i] = (False, f"EnvCrash: the engine process died (exit code {w.proc.exitcode})")
                del waiting[i]
    return out


# ============================================================================ evaluation


def _thought(reply: str) -> str:
    """The "Thought:" part of an ETO-style reply, kept so the history renders the agent's turn as it was said."""
    m = ACTION.search(reply)
    return THOUGHT.sub("", reply[: m.start()]).strip() if m else ""


def _read_jsonl(path: Path, key: str) -> dict[str, dict]:
    """Finished records of an earlier run, by game; a torn last line (killed mid-write) is ignored."""
    records = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                records[rec[key]] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return records


def summarize(records: list[dict], env: str = "", split: str = "", max_steps: int | None = None) -> dict:
    """Success rate (engine's won) overall and per task type, mean reward, and how many episodes hit an error."""
    def rate(recs):
        return sum(r["won"] for r in recs) / len(recs) if recs else 0.0
    types = sorted({r["task_type"] for r in records})
    return {"env": env, "split": split, "max_steps": max_steps, "n": len(records), "success": rate(records),
            "reward": sum(r["reward"] for r in records) / len(records) if records else 0.0,
            "errors": sum(r["error"] is not None for r in records),
            "per_task_type": {t: {"n": sum(r["task_type"] == t for r in records),
                                  "success": rate([r for r in records if r["task_type"] == t])} for t in types}}


def format_summary(summaries: dict[str, dict] | list[dict]) -> str:
    """A table: task types down, splits across (e.g. valid_seen / valid_unseen), success rate with n in brackets."""
    if isinstance(summaries, dict):
        summaries = [{"split": k, **v} for k, v in summaries.items()]
    types = sorted({t for s in summaries for t in s["per_task_type"]})
    width = max([len(t) for t in types] + [9])
    rows = [f"{'task type':<{width}}" + "".join(f"  {s['split']:>16}" for s in summaries)]
    for t in types:
        cells = [s["per_task_type"].get(t) for s in summaries]
        rows.append(f"{t:<{width}}" + "".join(f"  {c['success']:>9.1%} ({c['n']:>3})" if c else f"  {'-':>16}"
                                               for c in cells))
    rows.append(f"{'all':<{width}}" + "".join(f"  {s['success']:>9.1%} ({s['n']:>3})" for s in summaries))
    return "\n".join(rows)


def spread_games(env: str, games: list[str], n: int | None) -> list[str]:
    """The first n games taken round-robin over task types (deterministic), so a handful covers every type."""
    if n is None or n >= len(games):
        return games
    by_type: dict[str, deque] = {}
    for g in games:
        by_type.setdefault(task_type(env, g), deque()).append(g)
    out: list[str] = []
    while len(out) < n:
        for queue in by_type.values():
            if queue and len(out) < n:
                out.append(queue.popleft())
    return out


def evaluate(env: str, split: str, act_fn: Callable[[list[Trajectory]], list[str]], out_jsonl: str | Path,
             n_games: int | None = None, batch_size: int = 8, max_steps: int | None = None,
             data_dir: str | Path | None = None, step_timeout: float = 60.0, games: list[str] | None = None) -> dict:
    """Play the first n_games of a split (or the given games), up to batch_size live episodes, ONE act_fn call per turn.

    act_fn(histories) -> replies: each history is a data.Trajectory of the episode so far (task = first observation),
    rendered by the policy exactly as in training; the env gets data.parse_action(reply). Each finished episode is
    one flushed JSONL line (game, task_type, steps, won, reward, error, max_steps, seconds, task, transcript);
    rerunning with the same out_jsonl skips games already there. An engine error, crash, or a step slower than
    step_timeout fails that episode only. max_steps=None: the env's default (ALFWorld 40; ScienceWorld ETO's per-task
    caps). data_dir: the ALFWorld data folder, or WebShop's server URL. Returns summarize() over the requested games
    found in out_jsonl (reward: ALFWorld 0/1, ScienceWorld the score 0-100, WebShop 0-1).
    """
    _check_env(env)
    max_steps = max_steps or DEFAULT_MAX_STEPS[env]
    games = games or list_games(env, split, data_dir)[:n_games]
    out_jsonl = Path(out_jsonl)
    out_jsonl.parent.mkdir(parents=True, exist_ok=True)
    wanted = set(games)
    done = {g: r for g, r in _read_jsonl(out_jsonl, "game").items() if g in wanted}
    if other := {r.get("max_steps") for r in done.values()} - {max_steps}:
        raise EnvError(f"{out_jsonl} holds episodes played with max_steps={other.pop()}, not {max_steps}: "
                       "pass a new output file (results with different caps do not mix)")
    todo = deque(g for g in games if g not in done)
    if env == "alfworld" and (warning := grammar_warning(system_prompt(env), games[0], data_dir)):
        print(f"warning: {warning}")
    kw = _env_kwargs(env, max_steps, data_dir)
    start_timeout = max(step_timeout, 60.0)  # loading a game (and a JVM) is slower than a step, more so under load
    n_slots = max(1, min(batch_size, len(todo)))
    workers: list[_Worker | None] = [None] * n_slots
    episodes: list[dict | None] = [None] * n_slots
    won = [sum(r["won"] for r in done.values())]

    with open(out_jsonl, "a") as f, tqdm(total=len(games), initial=len(done), desc=f"eval {env}/{split}") as bar:
        def finish(i: int, error: str | None = None) -> None:
            ep = episodes[i]
            rec = {"game": ep["game"], "task_type": ep["task_type"], "steps": len(ep["transcript"]),
                   "won": bool(ep["won"]) and error is None, "reward": ep["reward"], "error": error,
                   "max_steps": max_steps, "seconds": round(time.monotonic() - ep["t0"], 2), "task": ep["task"],
                   "transcript": ep["transcript"]}
            f.write(json.dumps(rec) + "\n")
            f.flush()
            done[ep["game"]], episodes[i] = rec, None
            won[0] += rec["won"]
            workers[i].games += 1
            # after an error the engine is in an unknown state; after many games TextWorld has leaked memory
            if error is not None or workers[i].games >= RECYCLE_AFTER:
                workers[i].close()
                workers[i] = None
            bar.update(1)
            errors = sum(r["error"] is not None for r in done.values())
            bar.set_postfix(success=f"{won[0] / len(done):.3f}", errors=errors)

        try:
            while todo or any(episodes):
                # 1. start a game in every free slot (the engines load in parallel)
                starting = []
                for i in range(n_slots):
                    if episodes[i] is None and todo:
                        game = todo.popleft()
                        workers[i] = workers[i] or _Worker(env, kw)
                        episodes[i] = {"game": game, "task_type": task_type(env, game), "task": "", "transcript": [],
                                       "won": False, "reward": 0.0, "history": None, "t0": time.monotonic()}
                        workers[i].send("start", game, start_timeout)
                        starting.append(i)
                for j, (ok, out) in _gather([workers[i] for i in starting], start_timeout).items():
                    i, ep = starting[j], episodes[starting[j]]
                    if not ok:
                        finish(i, error=out)
                        continue
                    ep["task"], ep["task_type"] = out[0], out[1]["task_type"]
                    ep["history"] = Trajectory(id=ep["game"], task=out[0], steps=[], env=env,
                                               task_type=ep["task_type"], game_file=ep["game"])
                live = [i for i in range(n_slots) if episodes[i] is not None]
                if not live:
                    continue
                # 2. one policy call for every live episode
                # a copy per call: the policy may keep what it was shown
                replies = act_fn([replace(episodes[i]["history"], steps=list(episodes[i]["history"].steps))
                                  for i in live])
                if len(replies) != len(live):
                    raise ValueError(f"act_fn returned {len(replies)} replies for {len(live)} histories")
                # 3. every engine takes its step (in parallel); finished episodes are written at once
                for i, reply in zip(live, replies):
                    episodes[i]["reply"], episodes[i]["action"] = reply, parse_action(reply)
                    workers[i].send("step", episodes[i]["action"], step_timeout)
                for j, (ok, out) in _gather([workers[i] for i in live], step_timeout).items():
                    i, ep = live[j], episodes[live[j]]
                    if not ok:
                        finish(i, error=out)
                        continue
                    obs, reward, ep_done, info = out
                    ep["transcript"].append({"reply": ep["reply"], "action": ep["action"], "observation": obs})
                    ep["history"].steps.append(Step(ep["action"], obs, _thought(ep["reply"])))
                    ep["won"], ep["reward"] = info["won"], reward
                    if ep_done:
                        finish(i)
        finally:
            for w in workers:
                if w is not None:
                    w.close()
    return summarize([done[g] for g in games if g in done], env, split, max_steps)


# ============================================================================ expert trajectories


def build_expert(env: str, split: str, out: str | Path, data_dir: str | Path | None = None,
                 max_games: int | None = None, max_steps: int | None = None, game_timeout: float = 90.0,
                 workers: int = 1, games: list[str] | None = None, fix_expert_grammar: bool = False) -> dict:
    """Replay the expert over a split into JSONL (the format of $ALFWORLD_DATA/expert/train.jsonl): ALFWorld's
    hand-coded expert (step cap 80, as that file), ScienceWorld's gold path. Resumable: games already in `out` are
    skipped. A game slower than game_timeout is written with "error". Returns counts {done, won, errors}.
    fix_expert_grammar=True: the ALFWorld expert puts with the game's grammar (wins far more often; not how
    train.jsonl was made)."""
    _check_env(env)
    if env == "webshop":
        raise EnvError("no WebShop expert here: WebShop's human demonstrations come with the WebShop repository")
    games = (games or list_games(env, split, data_dir))[:max_games]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    have = _read_jsonl(out, "game_file")
    todo = deque(g for g in games if g not in have)
    cap = max_steps or (80 if env == "alfworld" else 10**6)  # ScienceWorld: the gold path's own length
    kw = _env_kwargs(env, cap, data_dir, expert=True)
    if fix_expert_grammar and env == "alfworld":
        kw["fix_expert_grammar"] = True
    pool = [_Worker(env, kw) for _ in range(max(1, min(workers, len(todo))))]
    busy: dict[int, str] = {}
    counts = {"done": len(games) - len(todo), "won": sum(bool(r.get("won")) for g, r in have.items() if g in games),
              "errors": 0}
    with open(out, "a") as f, tqdm(total=len(games), initial=counts["done"], desc=f"expert {env}/{split}") as bar:
        try:
            while todo or busy:
                for i in range(len(pool)):
                    if i not in busy and todo:
                        busy[i] = todo.popleft()
                        pool[i].send("expert", busy[i], game_timeout)
                ids = sorted(busy)
                for j, (ok, rec) in _gather([pool[i] for i in ids], game_timeout, first=True).items():
                    i = ids[j]
                    game = busy.pop(i)
                    pool[i].games += 1
                    if not ok:
                        if rec.startswith("TimeoutError"):
                            rec = f"TimeoutError: game took over {game_timeout:g} s"
                        rec = {"game_file": game, "task_type": task_type(env, game), "error": rec}
                        counts["errors"] += 1
                    if not ok or pool[i].games >= RECYCLE_AFTER:
                        pool[i].close()
                        pool[i] = _Worker(env, kw)
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    counts["done"] += 1
                    counts["won"] += bool(rec.get("won"))
                    bar.update(1)
                    bar.set_postfix(won=counts["won"], errors=counts["errors"])
        finally:
            for w in pool:
                w.close()
    return counts


# ============================================================================ CLI


def main(argv: list[str] | None = None) -> None:
    """`python envs.py build-expert`: replay an environment's expert into a JSONL file of expert trajectories."""
    import argparse

    parser = argparse.ArgumentParser(description="stepagent environments")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-expert", help="replay the expert (ALFWorld: hand-coded; ScienceWorld: gold path)")
    build.add_argument("--env", default="alfworld")
    build.add_argument("--split", default="train")
    build.add_argument("--out", required=True)
    build.add_argument("--data", help="ALFWorld data folder (default: $ALFWORLD_DATA)")
    build.add_argument("--max-games", type=int)
    build.add_argument("--workers", type=int, default=1, help="engine processes in parallel")
    build.add_argument("--fix-expert-grammar", action="store_true", help="translate alfworld 0.4.2's 'move X to Y' "
                       "to the games' 'put X in/on Y' (off: as train.jsonl)")
    args = parser.parse_args(argv)
    try:
        build_expert(args.env, args.split, Path(args.out), data_dir=args.data, max_games=args.max_games,
                     workers=args.workers, fix_expert_grammar=args.fix_expert_grammar)
    except EnvError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
