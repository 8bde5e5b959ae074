"""Replay evaluation transcripts in the real engine: every episode's actions, from a fresh game, must give the same
observations and the same outcome (won or not) as the JSONL says. A check that a success rate is the engine's.

    python bench/replay.py bench/sweep-gpu-h200/nall-warm-s0/eval/final/valid_unseen.jsonl [--env alfworld] [-j 2]
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # envs

import envs  # noqa: E402


def replay(args: tuple[str, dict]) -> dict:
    """One episode: play its actions in a fresh engine; the first turn whose observation differs, and the outcome."""
    env_name, rec = args
    env = envs.make_env(env_name, rec["game"], max_steps=rec.get("max_steps"))
    env.reset()
    won, differs = False, None
    for t, turn in enumerate(rec["transcript"]):
        obs, _, _, info = env.step(turn["action"])
        won = won or info["won"]
        if differs is None and obs != turn["observation"]:
            differs = t
    env.close()
    return {"game": rec["game"], "won": won, "logged_won": bool(rec["won"]), "differs_at": differs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("jsonl", type=Path, nargs="+", help="evaluation JSONL files (RUN/eval/<tag>/<split>.jsonl)")
    p.add_argument("--env", default="alfworld")
    p.add_argument("-j", "--jobs", type=int, default=2, help="engine processes")
    args = p.parse_args(argv)
    recs = [json.loads(ln) for f in args.jsonl for ln in f.read_text().splitlines() if ln.strip()]
    if missing := [r.get("game", "?") for r in recs if "transcript" not in r]:
        raise SystemExit(f"error: {missing[0]}: no 'transcript' field: expected stepagent evaluation JSONL")
    with ProcessPoolExecutor(args.jobs) as pool:
        res = list(pool.map(replay, [(args.env, r) for r in recs], chunksize=4))
    differ = [r for r in res if r["won"] != r["logged_won"] or r["differs_at"] is not None]
    print(f"{len(res)} episodes replayed: won {sum(r['won'] for r in res)} in the engine (logged "
          f"{sum(r['logged_won'] for r in res)}); {len(res) - len(differ)} reproduce every observation and the outcome")
    for r in differ:
        print(f"  differs: {r['game']}: won {r['won']} (logged {r['logged_won']}), first other observation at "
              f"turn {r['differs_at']}")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
