"""One ALFWorld engine, TextWorld's own text generation vs envs.fast_textworld, on the same games and actions, in one
process: seconds per game load + reset and per step, and whether every observation, reward, done flag, admissible
command list and hand-coded expert plan came out the same.

    python bench/engine_speed.py --split valid_unseen --games 134          # every unseen game (2-core CPU: ~8 min)
    python bench/engine_speed.py --transcripts runs/x/eval/final/valid_unseen.jsonl   # the actions a policy played
    python bench/engine_speed.py --harness 64 64 20 --repeats 2   # evaluate() with a no-op policy: game starts all
                                                                   # at once (the default) vs one per core at a time

Actions: each eval record's transcript (--transcripts), or else the hand-coded expert's plan with a random
admissible command at every third step (seeded), up to --max-steps, so that the games also pass through states the
expert never visits. The first pass (TextWorld as released) picks them; the second pass replays them with
fast_textworld on, so both passes play the very same commands.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import envs  # noqa: E402


def play(game: str, actions: list[str] | None, max_steps: int, rng: random.Random, expert: bool
         ) -> tuple[list, list, float, float]:
    """(actions, outputs, load + reset seconds, step seconds) of one game; actions None: choose them as we go."""
    random.seed(game)  # the hand-coded expert explores at random (the global generator) where it knows no place
    env = envs.AlfWorldEnv(max_steps=max_steps, expert=expert, fix_expert_grammar=True)
    t0 = time.perf_counter()
    env.load(game)
    obs, info = env.reset()
    t1 = time.perf_counter()
    outputs, chosen = [(obs, info)], []
    for t in range(len(actions) if actions is not None else max_steps):
        if actions is not None:
            action = actions[t]
        elif t % 3 == 2 or not info["expert_plan"]:
            action = rng.choice(info["admissible_commands"])
        else:
            action = info["expert_plan"][0]
        obs, reward, done, info = env.step(action)
        outputs.append((obs, reward, done, info))
        chosen.append(action)
        if done and actions is None:
            break
    t2 = time.perf_counter()
    env.close()
    return chosen, outputs, t1 - t0, t2 - t1


def harness(games: int, batch: int, turns: int, repeats: int) -> dict:
    """envs.evaluate() with a policy that costs nothing (it cycles through four commands), on the first valid_seen
    games: wall seconds and the engines' CPU seconds, with every free slot's game loading at once (the default) and
    with at most one game loading per core, alternating."""
    import os
    import tempfile

    commands = ["look", "inventory", "go to shelf 1", "go to drawer 1"]
    play = lambda hs: [f"Action: {commands[len(h.steps) % 4]}" for h in hs]  # noqa: E731
    todo, res = envs.list_games("alfworld", "valid_seen")[:games], {"one per core": [], "all at once": []}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for _ in range(repeats):
        for name, max_loading in (("all at once", None), ("one per core", cores)):
            with tempfile.TemporaryDirectory() as d:
                t0, c0 = time.perf_counter(), os.times()
                envs.evaluate("alfworld", "valid_seen", play, Path(d) / "e.jsonl", games=todo, batch_size=batch,
                              max_steps=turns, max_loading=max_loading)
                c1 = os.times()
            cpu = c1.children_user + c1.children_system - c0.children_user - c0.children_system
            res[name].append({"wall_s": round(time.perf_counter() - t0, 1), "engines_cpu_s": round(cpu, 1)})
            print(f"{games} games, {batch} at once, {turns} turns, game starts {name}: {res[name][-1]}", flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", default="valid_unseen", choices=envs.ALFWORLD_SPLITS)
    p.add_argument("--games", type=int, default=20, help="the split's first N games (0: all)")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--transcripts", default="", help="an eval JSONL: replay its games' actions instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the result as JSON here")
    p.add_argument("--harness", nargs=3, type=int, metavar=("GAMES", "BATCH", "TURNS"),
                   help="instead: evaluate() with a no-op policy, game starts capped per core vs all at once")
    p.add_argument("--repeats", type=int, default=1, help="--harness: runs of each setting, alternating")
    args = p.parse_args()
    if args.harness:
        res = harness(*args.harness, args.repeats)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        return
    if args.transcripts:
        recs = [json.loads(x) for x in Path(args.transcripts).read_text().splitlines() if x.strip()]
        plan = {r["game"]: [s["action"] for s in r["transcript"]] for r in recs}
        games = list(plan)[: args.games or None]
    else:
        games = envs.list_games("alfworld", args.split)[: args.games or None]
        plan = {}
    envs._import_alfworld()
    # with the hand-coded expert (build-expert's engine), untimed: the first pass picks the actions; then as
    # evaluation plays (no expert), timed; each setting with TextWorld as released, then with fast_textworld
    passes, rng = {}, random.Random(args.seed)
    for name, expert, on in (("expert/textworld", True, False), ("expert/fast_textworld", True, True),
                             ("textworld", False, False), ("fast_textworld", False, True)):
        envs.fast_textworld(on)
        loads, steps, n_steps, played = 0.0, 0.0, 0, {}
        for g in games:
            chosen, played[g], load_s, step_s = play(g, plan.get(g), args.max_steps, rng, expert)
            plan.setdefault(g, chosen)
            loads, steps, n_steps = loads + load_s, steps + step_s, n_steps + len(chosen)
        passes[name] = {"load_s": loads / len(games), "step_ms": 1000 * steps / max(1, n_steps), "steps": n_steps,
                        "played": played}
        print(f"{name}: {len(games)} games, load + reset {passes[name]['load_s']:.2f} s, "
              f"{n_steps} steps at {passes[name]['step_ms']:.1f} ms", flush=True)
    played = {k: v.pop("played") for k, v in passes.items()}
    same = {k: sum(played[f"{k}fast_textworld"][g] == played[f"{k}textworld"][g] for g in games)
            for k in ("expert/", "")}
    res = {"split": args.split, "games": len(games), "same_with_expert": same["expert/"], "same": same[""],
           "step_ratio": passes["textworld"]["step_ms"] / passes["fast_textworld"]["step_ms"],
           "load_ratio": passes["textworld"]["load_s"] / passes["fast_textworld"]["load_s"], **passes}
    print(f"same observations, rewards, done flags and admissible commands in {same['']}/{len(games)} games (with the "
          f"expert's plans: {same['expert/']}/{len(games)}); as evaluation plays, a step {res['step_ratio']:.2f}x, "
          f"a load + reset {res['load_ratio']:.2f}x as fast")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
