"""Tests of envs.py on the real engines (merged into test_stepagent.py later). Run: pytest -q test_envs_part.py"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

import data
import envs

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
    with pytest.raises(envs.EnvError, match="ALFWORLD_DATA"):
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


def test_evaluate_resumes_where_it_stopped(tmp_path):
    """Rerunning with the same out_jsonl plays only the games not yet recorded; the summary covers all of them."""
    out = tmp_path / "e.jsonl"
    envs.evaluate("alfworld", "valid_seen", replay(PLANS), out, n_games=2, batch_size=2, max_steps=10)
    with open(out, "a") as f:
        f.write('{"game": "torn li')  # a run killed mid-write leaves a partial last line
    played = []

    def act(histories):
        played.extend(h.game_file for h in histories)
        return replay(PLANS)(histories)

    summary = envs.evaluate("alfworld", "valid_seen", act, out, n_games=3, batch_size=2, max_steps=10)
    assert set(played) == {FIRST_SEEN[2]} and summary["n"] == 3 and summary["success"] == 1.0
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
