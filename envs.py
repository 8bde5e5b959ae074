"""Text environments for stepagent: ALFWorld (TextWorld's PDDL engine), ScienceWorld, a WebShop HTTP client and an
offline multi-hop QA world (HotpotQA, distractor setting), with batched evaluation and expert-trajectory builders.

Every environment speaks one small protocol (`TextEnv`): `load(game)`, `reset() -> (observation, info)`,
`step(action) -> (observation, reward, done, info)` with `info["won"]`, `close()`. Observations follow the training
data's conventions (data.strip_banner, data.clean_observation), so the policy sees the same text in both.

Games are named by strings: ALFWorld, a game file relative to the data folder
("json_2.1.1/valid_seen/<task>/<trial>/game.tw-pddl"); ScienceWorld, "<task name>:<variation>" ("boil:12");
WebShop, a goal index ("2853"); HotpotQA, "<type>:<_id>" ("bridge:5a8b57f25542995d1e6f1371"). `evaluate` and
`build_expert` run each environment in a child process (HotpotQA's pure-Python expert excepted), so an engine that
crashes or hangs costs one episode, never the run.
"""
from __future__ import annotations

import copy
import difflib
import functools
import gc
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
import string
import tarfile
import threading
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, deque
from dataclasses import replace
from multiprocessing.connection import wait as wait_conns
from pathlib import Path
from typing import Callable, Protocol

from tqdm import tqdm

from data import (ACTION, THOUGHT, Step, Trajectory, cache_dir, clean_observation, parse_action, strip_banner,
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
# HotpotQA: 7, ReAct's cap for HotpotQA (the expert needs 3-6).
DEFAULT_MAX_STEPS = {"alfworld": 40, "sciworld": None, "webshop": 15, "hotpotqa": 7}
RECORD_INFO = ("em", "gold_answer")  # info keys evaluate() copies into an episode's record where an env gives them


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
    if not _TEXTWORLD_ORIGINAL:  # the first import turns it on; fast_textworld(False) afterwards stays off
        fast_textworld(True)
    return textworld, alfred_tw_env


# ---------------------------------------------------------------------------- speed: TextWorld's engine
# Three pieces of work that TextWorld repeats without need (bench/engine_speed.py measures them and checks every
# observation, reward, admissible command and expert plan of real games against TextWorld as released):
# - after every step it phrases each admissible command and the feedback through its grammar, parsing the same
#   template strings again with TatSu and deep-copying every derivation context's variables: 85-95% of a step;
# - starting a game translates its PDDL problem (fast_downward.pddl2sas) four times, twice in load() and the same
#   two again in reset(): half of a game start; and it parses the game's grammar file, the same in every game.
# The grammar's {expressions} only read attributes and the translated task is only read, so fast_textworld keeps
# each parse and the last game's translations, and copies only the context dicts.
_TEXTWORLD_ORIGINAL: dict = {}


def fast_textworld(on: bool) -> None:
    """Install (on) or remove the memos above; idempotent, process-wide (forked engines inherit it)."""
    import fast_downward
    import textworld.logic as logic
    from textworld.envs.pddl import logic as pddl_logic, textgen

    if not _TEXTWORLD_ORIGINAL:
        _TEXTWORLD_ORIGINAL.update(textgen=textgen._parse_and_convert, logic=logic._parse_and_convert,
                                   pddl_logic=pddl_logic._parse_and_convert, copy_context=textgen.copy_context,
                                   pddl2sas=fast_downward.pddl2sas)
    orig = _TEXTWORLD_ORIGINAL
    for module, name in ((textgen, "textgen"), (logic, "logic"), (pddl_logic, "pddl_logic")):
        module._parse_and_convert = _parse_memo(orig[name]) if on else orig[name]
    textgen.copy_context = _copy_context if on else orig["copy_context"]
    fast_downward.pddl2sas = _last_game_memo(orig["pddl2sas"]) if on else orig["pddl2sas"]


def _parse_memo(parse):
    """parse(text, rule_name=...) kept per argument; each call gets its own deep copy (derive() sets the symbols'
    contexts), still far cheaper than TatSu's parse. Bounded: a game's grammar has a few hundred templates."""
    memo: dict = {}

    def parse_once(*args, **kw):
        key = (args, tuple(sorted(kw.items())))
        try:
            hash(key)
        except TypeError:  # not a text (no caller of TextWorld's passes one today): parse as released
            return parse(*args, **kw)
        if key not in memo:
            if len(memo) >= 20_000:
                memo.clear()
            memo[key] = parse(*args, **kw)
        return copy.deepcopy(memo[key])
    return parse_once


def _copy_context(context: dict) -> dict:
    """textgen.copy_context with fresh dicts instead of deep copies: queries add to them, nothing changes a value."""
    return {"state": context["state"], "facts": context["facts"], "variables": dict(context["variables"]),
            "mapping": dict(context["mapping"]), "entity_infos": context["entity_infos"]}


def _last_game_memo(pddl2sas):
    """pddl2sas(domain, problem, ...) kept for the last problem seen: load() and reset() translate the same one."""
    memo: dict = {}

    def pddl2sas_once(domain: str, problem: str, *args, **kw):
        key = (domain, problem, args, tuple(sorted(kw.items())))
        if key not in memo:
            if any(k[1] != problem for k in memo):
                memo.clear()
            memo[key] = pddl2sas(domain, problem, *args, **kw)
        return memo[key]
    return pddl2sas_once


def alfworld_data_dir(path: str | Path | None = None) -> Path:
    """--env-data flag, else $ALFWORLD_DATA, else ../shared/alfworld beside the repo."""
    env_dir = os.environ.get("ALFWORLD_DATA")
    if env_dir and Path(env_dir).expanduser() == Path.home() / ".cache" / "alfworld" and \
            not (Path(env_dir).expanduser() / "json_2.1.1").is_dir():
        env_dir = None  # `import alfworld` sets this default itself when the user set nothing
    root = Path(path or env_dir or REPO.parent / "shared" / "alfworld").expanduser()
    if not (root / "json_2.1.1").is_dir() and not (root / "train_games.tar.xz").is_file():
        raise EnvError(f"ALFWorld data not found in {root} (no json_2.1.1/): export ALFWORLD_DATA=/path/to/alfworld "
                       "or pass --env-data DIR (pip install alfworld && alfworld-download fetches it)")
    return root


def alfworld_cache_dir() -> Path:
    """Where train games are unpacked once: $STEPAGENT_CACHE/alfworld, default ~/.cache/stepagent/alfworld."""
    return cache_dir() / "alfworld"


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


# ============================================================================ HotpotQA (offline, distractor setting)

HOTPOTQA_SPLITS = ("train", "dev", "test")
HOTPOTQA_FILE = "hotpot_distractor.json"
# search[...] shows this many opening sentences. ReAct shows 5 of a whole Wikipedia page; a HotpotQA paragraph is only
# a page's intro (4 sentences on average), so 5 would show nearly all of it and lookup would never be needed.
SEARCH_SENTENCES = 3
QA_ACTION = re.compile(r"(search|lookup|finish)\[(.*)\]", re.IGNORECASE)
QA_INVALID = "Invalid action: reply with exactly one of search[entity], lookup[keyword], finish[answer]."
# Question words too common to look a sentence up by: the expert's lookup keywords skip them.
QA_STOPWORDS = frozenset("what which where when whom whose with from that this these those than then there their they "
                         "were have does also into about after before both same other many much more most".split())


def hotpotqa_data_path(path: str | Path | None = None) -> Path:
    """--env-data (the file or its folder), else $HOTPOTQA_DATA, else ../shared/qa beside the repo."""
    p = Path(path or os.environ.get("HOTPOTQA_DATA") or REPO.parent / "shared" / "qa").expanduser()
    p = p / HOTPOTQA_FILE if p.is_dir() else p
    if not p.is_file():
        raise EnvError(f"HotpotQA data not found at {p}: pass --env-data FILE_OR_DIR or export HOTPOTQA_DATA=... "
                       f"(a HotpotQA distractor-setting JSON list such as ../shared/qa/{HOTPOTQA_FILE})")
    return p


@functools.lru_cache(maxsize=4)
def _hotpotqa_records(path: str) -> dict[str, dict]:
    """Questions by _id, checked once at load, so a malformed record fails here naming the file, record and field."""
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EnvError(f"{path}: line {e.lineno}, column {e.colno}: not JSON ({e.msg})") from None
    if not isinstance(records, list):
        raise EnvError(f"{path}: expected a JSON list of HotpotQA records, got {type(records).__name__}")
    out = {}
    for i, r in enumerate(records):
        for name, typ in (("_id", str), ("question", str), ("answer", str), ("type", str), ("context", list),
                          ("supporting_facts", list)):
            if not isinstance(r, dict) or not isinstance(r.get(name), typ):
                raise EnvError(f"{path}: record {i}: field '{name}': expected a {typ.__name__} (HotpotQA's schema)")
        if not all(isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and isinstance(c[1], list)
                   for c in r["context"]):
            raise EnvError(f"{path}: record {i}: field 'context': expected [[title, [sentence, ...]], ...]")
        out[r["_id"]] = r
    return out


def hotpotqa_split(qid: str) -> str:
    """../shared/qa/README.md's split: sha256(_id) mod 100 < 80 train, < 90 dev, else test (stable as data grows)."""
    b = int(hashlib.sha256(qid.encode("utf-8")).hexdigest(), 16) % 100
    return "train" if b < 80 else ("dev" if b < 90 else "test")


def _hotpotqa_games(split: str, data_dir: str | Path | None = None) -> list[str]:
    """Questions of a split as "type:_id" (the type names the task type, as ScienceWorld's "task:variation"), in
    file order."""
    if split not in HOTPOTQA_SPLITS:
        raise EnvError(f"unknown HotpotQA split '{split}': expected one of {', '.join(HOTPOTQA_SPLITS)}")
    records = _hotpotqa_records(str(hotpotqa_data_path(data_dir)))
    return [f"{r['type']}:{qid}" for qid, r in records.items() if hotpotqa_split(qid) == split]


def normalize_answer(text: str) -> str:
    """SQuAD/HotpotQA answer normalisation: lower case, no punctuation, no articles, single spaces
    (hotpot_evaluate_v1.py's normalize_answer)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def answer_scores(prediction: str, gold: str) -> tuple[float, float]:
    """(EM, token F1) as hotpot_evaluate_v1.py: a yes/no/noanswer on either side scores F1 only if both agree."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    em = float(pred == ref)
    if (pred in ("yes", "no", "noanswer") or ref in ("yes", "no", "noanswer")) and pred != ref:
        return em, 0.0
    common = Counter(pred.split()) & Counter(ref.split())
    same = sum(common.values())
    if same == 0:
        return em, 0.0
    precision, recall = same / len(pred.split()), same / len(ref.split())
    return em, 2 * precision * recall / (precision + recall)


def _title_key(text: str) -> str:
    """A title for loose matching: accents, case, punctuation and spacing dropped ("Édgar Ramírez": "edgar ramirez")."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return " ".join(re.sub(r"[\W_]+", " ", text.casefold()).split())


class HotpotQAEnv:
    """One HotpotQA question in the closed world of its own ~10 paragraphs, with ReAct's grammar: search[entity]
    opens the best-matching paragraph (exact title, then normalised, then fuzzy), lookup[keyword] shows its next
    sentence containing the keyword, finish[answer] ends with reward = answer F1 and info em; won = EM 1."""

    def __init__(self, max_steps: int | None = None, data_dir: str | Path | None = None):
        self.path = hotpotqa_data_path(data_dir)
        self.records = _hotpotqa_records(str(self.path))
        self.max_steps = max_steps or DEFAULT_MAX_STEPS["hotpotqa"]
        self.game, self.rec, self.steps = "", None, 0

    def load(self, game: str) -> None:
        qid = game.rpartition(":")[2]
        if qid not in self.records:
            raise EnvError(f"HotpotQA question '{game}' is not in {self.path}: names come from "
                           "envs.list_games('hotpotqa', split), e.g. 'bridge:<_id>'")
        self.game, self.rec = game, self.records[qid]
        self.task_type, self.paragraphs = self.rec["type"], {title: sents for title, sents in self.rec["context"]}

    def _info(self, raw: str, em: float = 0.0, f1: float = 0.0) -> dict:
        return {"won": em == 1.0, "game": self.game, "task_type": self.task_type, "raw_observation": raw, "em": em,
                "f1": f1, "gold_answer": self.rec["answer"]}

    def reset(self) -> tuple[str, dict]:
        if self.rec is None:
            raise EnvError("HotpotQAEnv.reset() before load(game)")
        self.steps, self.page, self.found = 0, None, None  # found: [keyword, matching sentences, next one to show]
        # The titles are listed, as ALFWorld lists the receptacles: this closed world's search cannot be guessed
        # blindly (README, "Multi-hop QA").
        obs = f"Question: {self.rec['question']}\nParagraphs: {' | '.join(self.paragraphs)}"
        return obs, self._info(obs)

    def match(self, entity: str) -> str | None:
        """The paragraph a search opens: the exact title, else one equal after _title_key, else the closest by
        difflib's ratio (>= 0.6, its default cutoff), else None."""
        if entity in self.paragraphs:
            return entity
        keys = {}
        for title in self.paragraphs:
            keys.setdefault(_title_key(title), title)
        close = difflib.get_close_matches(_title_key(entity), list(keys), n=1, cutoff=0.6)
        return keys.get(_title_key(entity)) or (keys[close[0]] if close else None)

    def _search(self, entity: str) -> str:
        title = self.match(entity)
        if title is None:
            key = _title_key(entity)
            similar = sorted(self.paragraphs, key=lambda t: -difflib.SequenceMatcher(None, key, _title_key(t)).ratio())
            return f"Could not find {entity}. Similar: {similar[:5]}."
        self.page, self.found = title, None
        return f"{title}: {''.join(self.paragraphs[title][:SEARCH_SENTENCES]).strip()}"

    def _lookup(self, keyword: str) -> str:
        if self.page is None:
            return "No paragraph is open: search[entity] first."
        if self.found is None or self.found[0] != keyword.casefold():  # a new keyword starts from the top (ReAct)
            hits = [s.strip() for s in self.paragraphs[self.page] if keyword.casefold() in s.casefold()]
            self.found = [keyword.casefold(), hits, 0]
        _, hits, i = self.found
        if i >= len(hits):
            return f"No more results for {keyword} in {self.page}."
        self.found[2] += 1
        return f"(Result {i + 1} / {len(hits)}) {hits[i]}"

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        self.steps += 1
        m = QA_ACTION.fullmatch(action.strip())
        verb, arg = (m.group(1).lower(), m.group(2).strip()) if m else ("", "")
        if verb == "finish":
            em, f1 = answer_scores(arg, self.rec["answer"])
            obs = f"Episode finished: F1 {f1:.2f}, EM {em:.0f}."
            return obs, f1, True, self._info(obs, em, f1)
        obs = self._search(arg) if verb == "search" and arg else self._lookup(arg) if verb == "lookup" and arg \
            else QA_INVALID
        return obs, 0.0, self.steps >= self.max_steps, self._info(obs)

    def close(self) -> None:
        pass


def _strip_parenthetical(title: str) -> str:
    return re.sub(r"\s*\([^)]*\)$", "", title)


def _lookup_actions(sentences: list[str], targets: list[int], keywords: list[str]) -> list[str] | None:
    """lookup[...] actions that show every target sentence past the opening ones: per target, the first keyword that
    reaches it in the fewest lookups (a repeated keyword continues where it stopped); None if one is unreachable."""
    actions, last, shown = [], "", 0
    for t in sorted(i for i in set(targets) if i >= SEARCH_SENTENCES):
        best = None
        for kw in keywords:
            hits = [i for i, s in enumerate(sentences) if kw.casefold() in s.casefold()]
            start = shown if kw.casefold() == last else 0
            if t in hits[start:] and (best is None or hits.index(t) + 1 - start < best[1]):
                best = (kw, hits.index(t) + 1 - start)
        if best is None:
            return None
        actions += [f"lookup[{best[0]}]"] * best[1]
        shown = (shown if best[0].casefold() == last else 0) + best[1]
        last = best[0].casefold()
    return actions


def hotpotqa_expert_actions(rec: dict) -> tuple[list[str], str]:
    """The annotation-built expert's actions, or ([], why not). Bridge: search the first-hop paragraph (the gold one
    without the answer; if both or neither hold it, the one that names the other), lookups for supporting sentences
    past the opening, search the second hop, its lookups, finish. Comparison: search both, lookups, finish."""
    paragraphs = {title: sents for title, sents in rec["context"]}
    gold = list(dict.fromkeys(title for title, _ in rec["supporting_facts"]))
    if len(gold) != 2 or any(t not in paragraphs for t in gold):
        return [], f"{len(gold)} supporting paragraphs (the expert plays exactly 2)"
    if rec["type"] == "bridge":  # each test says "gold[k] is the first hop"; the first that tells them apart decides
        answer, question = normalize_answer(rec["answer"]), _title_key(rec["question"])
        tests = [[answer not in normalize_answer("".join(paragraphs[t])) for t in gold],
                 [_title_key(_strip_parenthetical(t)) != _title_key(rec["answer"]) for t in gold],
                 [_title_key(_strip_parenthetical(gold[1 - k])) in _title_key("".join(paragraphs[gold[k]]))
                  for k in range(2)],
                 [_title_key(_strip_parenthetical(t)) in question for t in gold]]
        first = next((k for test in tests if test[0] != test[1] for k in range(2) if test[k]), None)
        if first is None:
            return [], "bridge hop order unclear (answer, title, mentions and question do not tell the hops apart)"
        gold = [gold[first], gold[1 - first]]
    words = sorted({w for w in re.findall(r"[^\W\d_][\w'-]{3,}", rec["question"]) if w.lower() not in QA_STOPWORDS},
                   key=lambda w: (-len(w), w))
    actions = []
    for k, title in enumerate(gold):
        bridge = [gold[1], _strip_parenthetical(gold[1])] if k == 0 and rec["type"] == "bridge" else []
        targets = [i for t, i in rec["supporting_facts"] if t == title]
        lookups = _lookup_actions(paragraphs[title], targets, list(dict.fromkeys(bridge + words)))
        if lookups is None:
            return [], "a supporting sentence past the opening has no bridge or question word to look it up by"
        actions += [f"search[{title}]", *lookups]
    return actions + [f"finish[{rec['answer']}]"], ""


def build_hotpotqa_expert(split: str, out: str | Path, data_dir: str | Path | None = None,
                          max_games: int | None = None, max_steps: int | None = None) -> dict:
    """Expert trajectories from HotpotQA's supporting facts, no LLM: each plan (hotpotqa_expert_actions) is replayed
    in HotpotQAEnv and kept only at EM = 1 with the answer shown on the way (yes/no excepted), so the policy is never
    taught an answer it could not read. Writes structured JSONL (data.py reads it); returns kept/dropped counts."""
    env = HotpotQAEnv(max_steps=max_steps, data_dir=data_dir)
    games = _hotpotqa_games(split, data_dir)[:max_games]
    kept, dropped = [], Counter()
    for game in tqdm(games, desc=f"expert hotpotqa/{split}"):
        env.load(game)
        actions, why = hotpotqa_expert_actions(env.rec)
        if len(actions) > env.max_steps:
            why = f"plan longer than the step cap ({env.max_steps})"
        if why:
            dropped[why] += 1
            continue
        first, info = env.reset()
        steps, done = [], False
        for action in actions:
            obs, _, done, info = env.step(action)
            steps.append({"action": action, "observation": obs})
        read = normalize_answer(" ".join(s["observation"] for s in steps[:-1]))
        answer = normalize_answer(env.rec["answer"])
        if not (done and info["em"] == 1.0):
            dropped["EM < 1 on replay"] += 1
        elif answer not in ("yes", "no") and f" {answer} " not in f" {read} ":
            dropped["answer not in any observation the expert read"] += 1
        else:
            kept.append({"id": env.rec["_id"], "game_file": game, "task_type": env.task_type,
                         "initial_observation": first,
                         "steps": steps, "won": True, "em": info["em"], "f1": info["f1"]})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic = out.with_name(out.name + ".tmp")
    atomic.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(atomic, out)
    print(f"{out}: kept {len(kept)} of {len(games)} {split} questions (EM 1 on replay); dropped {sum(dropped.values())}"
          + "".join(f"\n  {n:4d}  {why}" for why, n in dropped.most_common()))
    lookups = sum(any(s["action"].startswith("lookup[") for s in r["steps"]) for r in kept)
    print(f"  kept: {dict(Counter(r['task_type'] for r in kept))}, {lookups} with a lookup")
    return {"done": len(games), "won": len(kept), "errors": 0, "kept": len(kept), "dropped": dict(dropped)}


# ============================================================================ registry

ENV_CLASSES: dict[str, type] = {"alfworld": AlfWorldEnv, "sciworld": SciWorldEnv, "webshop": WebShopEnv,
                                 "hotpotqa": HotpotQAEnv}


def task_type(env: str, game: str) -> str:
    """The per-type key of results: ALFWorld's 6 task types, ScienceWorld's task names, "webshop", HotpotQA's
    bridge / comparison."""
    if env == "alfworld":
        return alfworld_task_type(game)
    if env == "hotpotqa":
        return game.rpartition(":")[0] or "hotpotqa"
    return _parse_sciworld_game(game)[0] if env == "sciworld" else "webshop"


def _check_env(env: str) -> None:
    if env not in ENV_CLASSES:
        raise EnvError(f"unknown env '{env}': expected one of {', '.join(ENV_CLASSES)}")


def list_games(env: str, split: str, data_dir: str | Path | None = None) -> list[str]:
    """The games of a split, in a fixed order: ALFWorld's solvable games sorted; HotpotQA's questions by the _id hash
    in file order; ETO's lists for the others."""
    _check_env(env)
    if env == "alfworld":
        return _alfworld_games(split, data_dir)
    if env == "hotpotqa":
        return _hotpotqa_games(split, data_dir)
    return _sciworld_games(split) if env == "sciworld" else _webshop_games(split)


def _env_kwargs(env: str, max_steps: int | None, data_dir: str | Path | None, **kw) -> dict:
    kw = {"max_steps": max_steps, **kw}
    if env == "alfworld":
        kw["data_dir"] = str(alfworld_data_dir(data_dir))  # resolved here: children inherit no surprises
    elif env == "hotpotqa":
        kw["data_dir"] = str(hotpotqa_data_path(data_dir))
    elif env == "webshop" and data_dir:
        kw["url"] = str(data_dir)
    return kw


def make_env(env: str, game: str, max_steps: int | None = None, **kw) -> TextEnv:
    """An environment with `game` loaded, in this process (call reset() to start). kw: data_dir (ALFWorld, HotpotQA),
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


def _die_with_parent(parent: int) -> None:
    """End this engine process when the evaluating process dies, whatever the signal (SIGKILL included).

    A pipe alone does not tell us: every later-forked sibling holds a copy of our parent's end, so recv() never sees
    EOF. Linux: the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG); elsewhere a thread polls.
    """
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: watch the parent id instead
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)
        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _serve(conn, env: str, kw: dict, parent: int) -> None:
    """Child-process loop: one env object; commands in, ("ok", result) or ("error", message) out."""
    _die_with_parent(parent)
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


def _release_freed_memory() -> None:
    """Hand the memory a trainer freed back to the OS before engines fork. A forked child maps every page its parent
    holds, so a page glibc keeps after free() stays in use while any engine lives, even once the parent lets it go.
    Measured in the sweep: the evaluating process held 7.3 GB after training, 2.9 GB after malloc_trim(0).
    glibc only; a no-op elsewhere."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


RECYCLE_AFTER = 100  # games per engine process: loading a TextWorld game leaks ~3 MB that no close() gives back


class _Worker:
    """A TextEnv in a child process: a crash or a hang there costs one episode (the child is killed), not the run.
    Forked where possible (cheap, and tests' monkeypatches reach the child); the child never touches torch."""

    def __init__(self, env: str, kw: dict):
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        if env == "alfworld" and ctx.get_start_method() == "fork":  # forked engines inherit textworld imported once
            _import_alfworld()  # here, instead of ~1 s of CPU each (24 at once: 10 s of a 2-core evaluation)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, env, kw, os.getpid()), daemon=True)
        self.proc.start()
        child.close()
        self.deadline, self.crashed, self.games = 0.0, "", 0

    def send(self, cmd: str, arg: object, timeout: float) -> None:
        self.deadline, self.timeout = time.monotonic() + timeout, timeout
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


def _gather(workers: list[_Worker], first: bool = False, block: bool = True) -> dict[int, tuple[bool, object]]:
    """Answers of workers that were sent a command: {index: (ok, result or error message)}. An answer missing at
    the worker's deadline reads as a timeout error (one already in the pipe never does). first=True returns as soon
    as any answer (or timeout) is in; block=False only takes what is there now."""
    out = {i: (False, w.crashed) for i, w in enumerate(workers) if w.crashed}
    waiting = {i: w for i, w in enumerate(workers) if not w.crashed}
    while waiting and not (first and out):
        wait_s = max(0.0, min(w.deadline for w in waiting.values()) - time.monotonic()) if block else 0.0
        ready = wait_conns([w.conn for w in waiting.values()], wait_s)
        for i, w in list(waiting.items()):
            if w.conn in ready:
                try:
                    ok, result = w.conn.recv()
                    out[i] = (ok == "ok", result)
                except (EOFError, OSError):
                    out[i] = (False, f"EnvCrash: the engine process died (exit code {w.proc.exitcode})")
                del waiting[i]
            elif w.deadline <= time.monotonic():
                out[i] = (False, f"TimeoutError: no answer from the engine in {w.timeout:g} s")
                del waiting[i]
        if not block:
            break
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


def _open_appending(path: Path):
    """Open a JSONL log to append to; a torn last line (killed mid-write) is cut first, or the next record would
    be glued onto it and never read back."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
    return open(path, "a")


def summarize(records: list[dict], env: str = "", split: str = "", max_steps: int | None = None) -> dict:
    """Success rate (engine's won) overall and per task type, mean reward (HotpotQA: F1), mean EM where the records
    have it (HotpotQA), and how many episodes hit an error."""
    def rate(recs):
        return sum(r["won"] for r in recs) / len(recs) if recs else 0.0
    types = sorted({r["task_type"] for r in records})
    em = {"em": sum(r.get("em", 0.0) for r in records) / len(records)} if any("em" in r for r in records) else {}
    return {"env": env, "split": split, "max_steps": max_steps, "n": len(records), "success": rate(records),
            "reward": sum(r["reward"] for r in records) / len(records) if records else 0.0, **em,
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
             data_dir: str | Path | None = None, step_timeout: float = 60.0, games: list[str] | None = None,
             max_loading: int | None = None) -> dict:
    """Play the first n_games of a split (or the given games), up to batch_size live episodes, ONE act_fn call per turn.

    act_fn(histories) -> replies: each history is a data.Trajectory of the episode so far (task = first observation),
    rendered by the policy exactly as in training; the env gets data.parse_action(reply). Each finished episode is
    one flushed JSONL line (game, task_type, steps, won, reward, error, max_steps, seconds, task, transcript);
    rerunning with the same out_jsonl skips games already there. An engine error, crash, or a step slower than
    step_timeout fails that episode only. At most max_loading games load at once (None: every free slot's game).
    max_steps=None: the env's default (ALFWorld 40; ScienceWorld ETO's per-task caps). data_dir: the ALFWorld data
    folder, or WebShop's server URL. Returns summarize() over the requested games found in out_jsonl (reward:
    ALFWorld 0/1, ScienceWorld the score 0-100, WebShop 0-1).
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
    if todo:
        _release_freed_memory()
    workers: list[_Worker | None] = [None] * n_slots
    episodes: list[dict | None] = [None] * n_slots
    won = [sum(r["won"] for r in done.values())]

    with _open_appending(out_jsonl) as f, tqdm(total=len(games), initial=len(done), desc=f"eval {env}/{split}") as bar:
        def finish(i: int, error: str | None = None) -> None:
            ep = episodes[i]
            rec = {"game": ep["game"], "task_type": ep["task_type"], "steps": len(ep["transcript"]),
                   "won": bool(ep["won"]) and error is None, "reward": ep["reward"], "error": error,
                   "max_steps": max_steps, "seconds": round(time.monotonic() - ep["t0"], 2), "task": ep["task"],
                   "transcript": ep["transcript"], **ep.get("extra", {})}
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
                # 1. start a game in every free slot; the engines load in parallel, and while the policy plays the
                #    live episodes: a loading game (1-2 s) joins the turn after it is ready, and holds up no one. All
                #    at once by default: one load per core at a time spared the engines CPU time, but a policy on the
                #    same cores then played 25% slower (bench/RESULTS.md, "Game starts one per core")
                starting = [i for i in range(n_slots) if episodes[i] is not None and episodes[i]["history"] is None]
                for i in range(n_slots):
                    if episodes[i] is None and todo and len(starting) < (max_loading or n_slots):
                        starting.append(i)
                        game = todo.popleft()
                        workers[i] = workers[i] or _Worker(env, kw)
                        episodes[i] = {"game": game, "task_type": task_type(env, game), "task": "", "transcript": [],
                                       "won": False, "reward": 0.0, "history": None, "t0": time.monotonic()}
                        workers[i].send("start", game, start_timeout)
                starting.sort()
                playing = len(starting) < sum(ep is not None for ep in episodes)
                for j, (ok, out) in _gather([workers[i] for i in starting], block=not playing).items():
                    i, ep = starting[j], episodes[starting[j]]
                    if not ok:
                        finish(i, error=out)
                        continue
                    ep["task"], ep["task_type"] = out[0], out[1]["task_type"]
                    ep["history"] = Trajectory(id=ep["game"], task=out[0], steps=[], env=env,
                                               task_type=ep["task_type"], game_file=ep["game"])
                live = [i for i in range(n_slots) if episodes[i] is not None and episodes[i]["history"] is not None]
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
                for j, (ok, out) in _gather([workers[i] for i in live]).items():
                    i, ep = live[j], episodes[live[j]]
                    if not ok:
                        finish(i, error=out)
                        continue
                    obs, reward, ep_done, info = out
                    ep["transcript"].append({"reply": ep["reply"], "action": ep["action"], "observation": obs})
                    ep["history"].steps.append(Step(ep["action"], obs, _thought(ep["reply"])))
                    ep["won"], ep["reward"] = info["won"], reward
                    ep["extra"] = {k: info[k] for k in RECORD_INFO if k in info}
                    if ep_done:
                        finish(i)
        finally:
            for w in workers:
                if w is not None:
                    w.close()
    done = _read_jsonl(out_jsonl, "game")  # the summary counts what the file holds
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
    if env == "hotpotqa":  # pure Python and fast: no child processes, no resume
        return build_hotpotqa_expert(split, out, data_dir, max_games, max_steps)
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
    with _open_appending(out) as f, tqdm(total=len(games), initial=counts["done"], desc=f"expert {env}/{split}") as bar:
        try:
            while todo or busy:
                for i in range(len(pool)):
                    if i not in busy and todo:
                        busy[i] = todo.popleft()
                        pool[i].send("expert", busy[i], game_timeout)
                ids = sorted(busy)
                for j, (ok, rec) in _gather([pool[i] for i in ids], first=True).items():
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
    build = sub.add_parser("build-expert", help="replay the expert (ALFWorld: hand-coded; ScienceWorld: gold path; "
                           "HotpotQA: built from the supporting facts)")
    build.add_argument("--env", default="alfworld")
    build.add_argument("--split", default="train")
    build.add_argument("--out", required=True)
    build.add_argument("--env-data", help="ALFWorld data folder (default: $ALFWORLD_DATA); HotpotQA: the JSON file "
                       "or its folder (default: $HOTPOTQA_DATA, else ../shared/qa)")
    build.add_argument("--max-games", type=int)
    build.add_argument("--workers", type=int, default=1, help="engine processes in parallel")
    build.add_argument("--fix-expert-grammar", action="store_true", help="translate alfworld 0.4.2's 'move X to Y' "
                       "to the games' 'put X in/on Y' (off: as train.jsonl)")
    args = parser.parse_args(argv)
    try:
        build_expert(args.env, args.split, Path(args.out), data_dir=args.env_data, max_games=args.max_games,
                     workers=args.workers, fix_expert_grammar=args.fix_expert_grammar)
    except EnvError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
