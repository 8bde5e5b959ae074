"""The replication table, read back from run directories: success per split, what the agents did, and why.

    python bench/replication.py runs/eval-sft runs/eval-implicit runs/eval-inverse --expert runs/expert

Each EVAL_DIR is a stepagent run that played a checkpoint in the real environment (`--model RUN/ckpt-N --epochs 0
--cycles 0 --eval-games -1`); the checkpoint's training run (RUN, its parent directory) gives the method, the data
and the per-cycle convergence metrics. --expert DIR holds `envs.py build-expert` replays of the same splits
(`valid_seen.jsonl`, `valid_unseen.jsonl`), the upper bound. Prints three markdown tables; nothing is measured here.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path


SPLITS = ("valid_seen", "valid_unseen")
VERBS = ("go to", "open", "close", "take", "put", "clean", "heat", "cool", "use", "examine", "look", "inventory")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise SystemExit(f"error: {path} not found: run the evaluation command of the README's table first")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def training_run(eval_cfg: dict, eval_dir: Path) -> tuple[dict, Path]:
    """The config of the run whose checkpoint EVAL_DIR evaluated, and that run's directory."""
    ckpt = Path(eval_cfg["model"])
    if not (ckpt.parent / "config.json").exists():
        raise SystemExit(f"error: {eval_dir}/config.json: --model {ckpt} is not a checkpoint of a stepagent run dir")
    return json.loads((ckpt.parent / "config.json").read_text()), ckpt.parent


def rate(won: int, n: int) -> str:
    return f"{100 * won / max(n, 1):.1f}% ({won}/{n})"


def success(recs: list[dict]) -> str:
    """Games won out of those played (evaluation episodes and expert replays both carry "won")."""
    return rate(sum(bool(r.get("won")) for r in recs), len(recs))


def wall_minutes(run: Path, metrics: list[dict], stage: str | None = None) -> float:
    """Minutes from the run's start (config.json is written once the model has loaded) to its last metrics line;
    stage="eval": the evaluation alone, from the line before the eval line to it."""
    if stage:
        i = next(i for i, m in enumerate(metrics) if m.get("stage") == stage)
        return (metrics[i]["time"] - metrics[i - 1]["time"]) / 60
    return (metrics[-1]["time"] - (run / "config.json").stat().st_mtime) / 60


def behaviour(recs: list[dict]) -> dict:
    """What the agent did: its action verbs, how often the engine answered "Nothing happens.", repeats, pick-ups (of
    anything, and of an object the task names). Records are evaluation episodes or expert replays ("steps")."""
    recs = [{"transcript": r.get("transcript", r.get("steps", [])),
             "goal": (r.get("task") or r.get("initial_observation", "")).split("Your task is to:")[-1].lower()}
            for r in recs]
    acts = [s for r in recs for s in r["transcript"]]
    verbs = Counter(next((v for v in VERBS if s["action"].startswith(v)), "other") for s in acts)
    repeats = sum(a["action"] == b["action"] for r in recs for a, b in zip(r["transcript"], r["transcript"][1:]))
    picked = [[m.group(1) for s in r["transcript"] if (m := re.match(r"You pick up the (\w+)", s["observation"]))]
              for r in recs]
    return {"turns": len(acts), "verbs": verbs, "nothing": sum(s["observation"] == "Nothing happens." for s in acts),
            "repeats": repeats, "picked": sum(map(bool, picked)), "episodes": len(recs),
            "picked_goal": sum(any(o in r["goal"] for o in objs) for r, objs in zip(recs, picked))}


CYCLE_COLS = {"cycle": "cycle", "cycle/agreement": "agreement", "cycle/logp_expert": "log π(â\\|h)",
              "inspect/agreement": "inspect agreement", "imp/reward_margin": "reward margin",
              "imp/reward_acc": "margin > 0", "imp/reward_expert": "r(h,â)", "imp/reward_agent": "r(h,a)",
              "irl/D_acc_heldout": "D acc. (held-out)", "irl/D_acc_heldout_differ": "D acc. where a ≠ â",
              "irl/reward_expert": "f_φ expert", "irl/reward_agent": "f_φ agent", "ppo/clipfrac": "PPO clipfrac",
              "ppo/kl_ref": "KL to π_ref"}


def cycle_table(metrics: list[dict]) -> str:
    """The per-cycle convergence of a training run (held-out agreement and log π(â|h), reflection statistics)."""
    table = [m for m in metrics if m.get("stage") == "cycle"]
    cols = [c for c in CYCLE_COLS if any(c in m for m in table)]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else "before SFT" if v == "init" else str(v)  # noqa: E731
    lines = ["| " + " | ".join(CYCLE_COLS[c] for c in cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(fmt(m.get(c, "")) for c in cols) + " |" for m in table])


def behaviour_row(label: str, b: dict) -> str:
    top = ", ".join(f"{v} {100 * c / b['turns']:.0f}%" for v, c in b["verbs"].most_common(5))
    return (f"| {label} | {b['turns']:,} | {top} | {100 * b['nothing'] / b['turns']:.0f}% | "
            f"{100 * b['repeats'] / b['turns']:.0f}% | {b['picked']}/{b['episodes']} | "
            f"{b['picked_goal']}/{b['episodes']} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("eval_dirs", nargs="+", type=Path, help="evaluation run directories, one per table row")
    p.add_argument("--expert", type=Path, help="folder with build-expert replays valid_seen.jsonl, valid_unseen.jsonl")
    args = p.parse_args(argv)
    rows, behave, convergence = [], [], []
    for d in args.eval_dirs:
        eval_cfg = json.loads((d / "config.json").read_text())
        train_cfg, train_dir = training_run(eval_cfg, d)
        label = "SFT" if train_cfg["cycles"] == 0 else f"StepAgent-{train_cfg['method'].capitalize()}"
        recs = {s: read_jsonl(d / "eval" / "final" / f"{s}.jsonl") for s in SPLITS}
        train_m, eval_m = read_jsonl(train_dir / "metrics.jsonl"), read_jsonl(d / "metrics.jsonl")
        sft_steps = sum(m.get("stage") == "sft" for m in train_m)
        cycles = [m for m in train_m if m.get("stage") == "cycle" and m.get("cycle") not in ("init", 0)]
        inspected = sum(m.get("inspect/steps", 0) for m in cycles)
        setup = (f"{train_cfg['model'].split('/')[-1]}, --max-trajectories {train_cfg['max_trajectories']}, "
                 f"{sft_steps} SFT steps, {len(cycles)} cycles ({inspected} inspected steps), seed {train_cfg['seed']}")
        errors = sum(r["error"] is not None for s in SPLITS for r in recs[s])
        rows.append(f"| {label} | {success(recs['valid_seen'])} | {success(recs['valid_unseen'])} | {setup} | "
                    f"{wall_minutes(train_dir, train_m):.0f} min train, {wall_minutes(d, eval_m, 'eval'):.0f} min eval "
                    f"({eval_cfg['max_steps']} turns, {errors} engine errors) | `{train_dir}`, `{d}` |")
        behave.append(behaviour_row(label, behaviour(recs["valid_seen"] + recs["valid_unseen"])))
        convergence.append(f"{label} (`{train_dir}/metrics.jsonl`):\n\n" + cycle_table(train_m))
    if args.expert:
        ex = {s: read_jsonl(args.expert / f"{s}.jsonl") for s in SPLITS}
        in20 = {s: rate(sum(bool(r.get("won")) and len(r.get("steps", [])) <= 20 for r in ex[s]), len(ex[s]))
                for s in SPLITS}
        rows.append(f"| expert replay (upper bound) | {success(ex['valid_seen'])} | {success(ex['valid_unseen'])} | "
                    f"ALFWorld's hand-coded expert, grammar-fixed; won within 20 turns: {in20['valid_seen']} seen, "
                    f"{in20['valid_unseen']} unseen | cap 80 turns | `{args.expert}` |")
        behave.append(behaviour_row("expert replay", behaviour(ex["valid_seen"] + ex["valid_unseen"])))
    print("| method | seen | unseen | model, data, cycles, seed | wall time | raw logs |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| method | turns | actions (top 5 verbs) | \"Nothing happens.\" | same action as the turn before "
          "| episodes that picked anything up | ... an object the task names |\n|---|---|---|---|---|---|---|")
    print("\n".join(behave))
    print("\n" + "\n\n".join(convergence))


if __name__ == "__main__":
    main()
