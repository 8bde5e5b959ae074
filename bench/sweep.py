"""The replication sweep (issue 16): success vs the number N of expert trajectories for SFT, StepAgent-Implicit and
StepAgent-Inverse over seeds, many cells in one process; then the table, the plot and the per-cell diagnostics.

    python bench/sweep.py run --out runs/sweep --n 25,50,100 --methods sft,implicit,inverse --seeds 0,1,2 \\
        --splits valid_unseen,valid_seen [any stepagent flag: --preset small --lr 1e-4 --cycles 2 ...]
    python bench/sweep.py report runs/sweep [more OUT dirs: cells from other machines]

Cells. A cell is (N, method, seed) in OUT/n{N}-{method}-s{seed}/ (N "all": every trajectory): a stepagent run
directory (config.json, metrics.jsonl, eval/final/<split>.jsonl) and cell.json, its summary (success per split,
training tokens, wall time, device, config, per-cycle diagnostics, behaviour counts), written atomically as soon as
the cell is evaluated. A cell with cell.json is skipped; one without resumes (stepagent --resume; the evaluation keeps
the games already played). A finished cell asked for a split it has not played plays it with its kept checkpoint.
`report` globs OUT/*/cell.json: cells from different machines merge by copying their directories into one OUT, or by
naming several OUTs. Checkpoints are deleted once a cell is done (--keep-checkpoints).

Data. The seed draws the N trajectories (--trajectory-seed = --seed: an order hashed from the ids, so N=50 holds the
N=25 of the same seed). SFT runs once per (N, seed), into OUT/n{N}-s{seed}-warmstart/, and every method of that (N,
seed) starts from its checkpoint, trains on exactly its N trajectories and inspects only those. The expert
trajectories of --train-val V held-out train games (fixed: the first V train games round-robin over task types in a
hash order) are in no N; they are the held-out convergence steps (--heldout-data) and, with --splits train-val, the
games played to choose hyper-parameters (--eval-games K plays the first K, spread over task types). Never tune on
valid_seen / valid_unseen.

Fair budget. The warm start is --epochs E of SFT on the N trajectories. With C = --cycles, the SFT cell then trains C
more SFT epochs on the same N from the warm start (fresh warm-up + cosine at --lr); the Implicit and Inverse cells run
C StepAgent cycles from it. Every cell gets one more round of training per cycle; its tokens are reported beside it.
--methods warm adds the warm start itself as a cell (no more training): what each method adds to its starting point.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # stepagent, data, envs
sys.path.insert(0, str(Path(__file__).resolve().parent))  # replication

import data  # noqa: E402
import envs  # noqa: E402
import replication  # noqa: E402
import stepagent  # noqa: E402

METHODS = ("warm", "sft", "implicit", "inverse")
SPLITS = ("valid_unseen", "valid_seen", "train-val")  # train-val: the held-out train games, for choosing settings
LABELS = {"warm": "SFT warm start", "sft": "SFT", "implicit": "StepAgent-Implicit", "inverse": "StepAgent-Inverse"}
OWNED = ("out", "seed", "trajectory_seed", "max_trajectories", "method", "resume", "heldout_data", "eval_games",
         "eval_splits")  # stepagent flags the sweep sets per cell
SPEED_ONLY = ("data", "env_data", "model", "eval_batch", "gen_batch_size", "tokens_per_batch", "compile", "attn",
              "dtype", "eval_cache", "save_every")  # settings that may differ between merged cells (machines, speed)
CYCLE_ONLY = ("inspect_trajectories", "steps_per_trajectory", "samples_per_step", "temperature", "reflect_lr",
              "reflect_warmup", "reflect_epochs", "reflect_batch", "beta", "sft_weight", "disc_model", "disc_steps",
              "disc_lr", "disc_batch", "disc_hidden", "baseline", "clip", "kl_coef", "ppo_epochs")  # read by cycles


# ----------------------------------------------------------------------------- run


def parse_list(text: str, flag: str, kind=str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: --{flag} {text!r}: expected comma-separated values, e.g. 25,50,all") from None


def cell_name(n: int, method: str, seed: int) -> str:
    return f"n{n or 'all'}-{method}-s{seed}"


def heldout_train_games(env: str, v: int, env_data: str = "") -> list[str]:
    """The fixed validation set of train games: hash order (no run of one scene), then round-robin over task types."""
    games = sorted(envs.list_games(env, "train", env_data or None), key=lambda g: hashlib.sha256(g.encode()).digest())
    return envs.spread_games(env, games, v)


def heldout_file(out: Path, base: stepagent.Config, games: list[str]) -> Path:
    """The expert records of the held-out train games, copied once to OUT/_data/ (stepagent --heldout-data)."""
    path = out / "_data" / f"train-val-{len(games)}.jsonl"
    if path.exists():
        return path
    src, wanted = Path(base.data or data.default_expert_path(base.env)), set(games)
    records = [rec for _, rec in data._read_records(src) if isinstance(rec, dict) and rec.get("game_file") in wanted]
    if not records:
        raise SystemExit(f"error: {src}: no record's 'game_file' names a held-out train game: use expert data with "
                         "game_file (train_planner.json, build-expert output) or pass --train-val 0")
    path.parent.mkdir(parents=True, exist_ok=True)
    stepagent.atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def stage_config(flags: list[str], out: Path, n: int, seed: int, heldout: Path | None, extra: list[str]):
    """One stepagent config: the user's flags, then the sweep's (data draw, run dir, no in-run evaluation)."""
    own = ["--out", str(out), "--seed", str(seed), "--trajectory-seed", str(seed), "--max-trajectories", str(n),
           "--resume", "--eval-games", "0", *(["--heldout-data", str(heldout)] if heldout else [])]
    return stepagent.parse_config(flags + own + extra)


def training_tokens(run: Path) -> tuple[int, float]:
    """Tokens through the model in training steps (SFT + reflection forwards/backwards) and inspection seconds."""
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    tokens = sum(m.get("sft/tokens", 0) for m in lines) + sum(m.get("reflect/tokens", 0) or 0 for m in lines)
    return tokens, sum(m.get("inspect/seconds", 0) or 0 for m in lines)


def ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def warm_start(flags: list[str], out: Path, n: int, seed: int, heldout: Path | None) -> tuple[Path, dict]:
    """SFT once per (N, seed); a finished one is reused, a cut one resumed, a deleted checkpoint retrained."""
    run, done = out / f"n{n or 'all'}-s{seed}-warmstart", out / f"n{n or 'all'}-s{seed}-warmstart" / "warmstart.json"
    if done.exists() and stepagent._checkpoints(run):
        return stepagent._checkpoints(run)[-1], json.loads(done.read_text())
    if done.exists():  # an earlier sweep deleted its checkpoint: same data and seed, trained again
        shutil.rmtree(run)
    t0 = time.time()
    res = stepagent.train(stage_config(flags, run, n, seed, heldout, ["--cycles", "0"]))
    tokens, _ = training_tokens(run)
    summary = {"seconds": time.time() - t0, "tokens": tokens, "trajectories": len(res["train_ids"]),
               "train_ids_sha256": ids_digest(res["train_ids"]), "cycles": res["table"]}
    stepagent.atomic_write(done, json.dumps(clean(summary), indent=2))
    return stepagent._checkpoints(run)[-1], summary


def clean(obj):
    """Strict JSON: NaN becomes null (as in metrics.jsonl)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    return [clean(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


def evaluate_cell(cfg, run: Path, splits: list[str], eval_games: int, train_val: list[str]) -> tuple[dict, dict, str]:
    """Play the cell's final checkpoint on each split: valid splits (--eval-games), or the held-out train games.
    Returns per split the success summary (envs.evaluate's, without env and split), the behaviour counts, the device."""
    rt = stepagent.setup_runtime(cfg)
    model, tok = stepagent.load_policy(str(stepagent._checkpoints(run)[-1]), rt, cfg.attn)
    act, batch = stepagent.make_act_fn(cfg, rt, model, tok), cfg.eval_batch or stepagent.auto_eval_batch(rt)
    summaries, behaviour = {}, {}
    for split in splits:
        pool = train_val if split == "train-val" else envs.list_games(cfg.env, split, cfg.env_data or None)
        games = envs.spread_games(cfg.env, pool, None if eval_games < 0 else eval_games)  # train-val: its first K
        out = run / "eval" / "final" / f"{split}.jsonl"
        m = envs.evaluate(cfg.env, "train" if split == "train-val" else split, act, out, None, batch,
                          cfg.max_steps or None, data_dir=cfg.env_data or None, games=games)
        summaries[split] = {k: v for k, v in m.items() if k not in ("env", "split")}
        recs = [json.loads(ln) for ln in out.read_text().splitlines() if ln.strip()]
        b = replication.behaviour([r for r in recs if r["game"] in set(games)])
        behaviour[split] = {**b, "verbs": dict(b["verbs"])}
    device = torch_device_name(rt)
    del model, act
    return summaries, behaviour, device


def torch_device_name(rt) -> str:
    import torch

    if rt.device.type == "cuda":
        return torch.cuda.get_device_name(rt.device)
    return f"cpu ({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores)"


def code_version(root: Path = Path(__file__).resolve().parent.parent) -> str:
    """The commit a cell ran, "-dirty" added when tracked files differ from it; "unknown" outside a git checkout
    (a GPU machine gets the working tree without .git)."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True, check=True).stdout.strip()
    try:
        return git("rev-parse", "--short=12", "HEAD") + ("-dirty" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_cell(args, flags: list[str], base, n: int, method: str, seed: int, warm: tuple[Path, dict],
             heldout: Path | None, train_val: list[str]) -> dict:
    """One cell: from the warm start, C more SFT epochs (sft) or C cycles (implicit, inverse), or nothing (warm: the
    point every method starts from); evaluate; cell.json."""
    run, (ckpt, warm_summary), c = args.out / cell_name(n, method, seed), warm, base.cycles
    more = {"warm": ["--epochs", "0", "--cycles", "0"], "sft": ["--epochs", str(c), "--cycles", "0"]}
    extra = ["--model", str(ckpt), *more.get(method, ["--epochs", "0", "--cycles", str(c), "--method", method])]
    cfg = stage_config(flags, run, n, seed, heldout, extra)
    t0 = time.time()
    res = stepagent.train(cfg)
    t1, train_s = time.time(), time.time() - t0
    if ids_digest(res["train_ids"]) != warm_summary["train_ids_sha256"]:
        raise SystemExit(f"error: {run}: trained on other trajectories than its warm start: remove {run} and rerun")
    summaries, behaviour, device = evaluate_cell(cfg, run, args.splits, args.eval_games, train_val)
    eval_s = time.time() - t1
    tokens, inspect_s = training_tokens(run)
    summary = {
        "cell": run.name, "n": n, "method": method, "seed": seed, "trajectories": len(res["train_ids"]),
        "train_ids_sha256": ids_digest(res["train_ids"]),
        "success": summaries,
        "behaviour": behaviour,
        "compute": {"device": device, "train_tokens": tokens, "warmstart_tokens": warm_summary["tokens"],
                    "train_seconds": train_s, "inspect_seconds": inspect_s, "eval_seconds": eval_s,
                    "warmstart_seconds": warm_summary["seconds"]},
        "cycles": res["table"], "config": dataclasses.asdict(cfg),
        "sweep": {"epochs": base.epochs, "cycles": c, "train_val": len(train_val), "eval_games": args.eval_games,
                  "fair_budget": f"warm start {base.epochs} SFT epoch(s), then SFT +{c} epoch(s) or {c} cycle(s)"},
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "code": args.code,
    }
    stepagent.atomic_write(run / "cell.json", json.dumps(clean(summary), indent=2))
    if not args.keep_checkpoints:
        for p in stepagent._checkpoints(run):
            shutil.rmtree(p, ignore_errors=True)
    return summary


def add_splits(args, run: Path, train_val: list[str]) -> dict | None:
    """A finished cell asked for splits it has not played (tuned on train-val, now the valid splits once): its kept
    checkpoint plays them, and cell.json gains them. None if it has every split."""
    cell = json.loads((run / "cell.json").read_text())
    if not (missing := [s for s in args.splits if s not in cell["success"]]):
        return None
    if not stepagent._checkpoints(run):
        raise SystemExit(f"error: {run}/cell.json has no {', '.join(missing)} and its checkpoint was deleted (keep it "
                         f"with --keep-checkpoints): move {run} away to train the cell again")
    names = {f.name for f in dataclasses.fields(stepagent.Config)}
    cfg = stepagent.Config(**{k: v for k, v in cell["config"].items() if k in names})
    t0 = time.time()
    summaries, behaviour, _ = evaluate_cell(cfg, run, missing, args.eval_games, train_val)
    cell["success"].update(summaries)
    cell["behaviour"].update(behaviour)
    cell["compute"]["eval_seconds"] += time.time() - t0
    stepagent.atomic_write(run / "cell.json", json.dumps(clean(cell), indent=2))
    return cell


def run_sweep(argv: list[str]) -> list[dict]:
    p = argparse.ArgumentParser(prog="sweep.py run", description="Run the cells (N x method x seed) of the sweep.",
                                allow_abbrev=False)
    p.add_argument("--out", type=Path, required=True, help="the sweep's folder: one directory per cell")
    p.add_argument("--n", default="25,50,100", help="numbers of expert trajectories (comma-separated; all = every one)")
    p.add_argument("--methods", default="sft,implicit,inverse", help=f"subset of {','.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2", help="each seed draws its own N trajectories")
    p.add_argument("--splits", default="valid_unseen", help="valid_unseen, valid_seen, train-val (held-out train)")
    p.add_argument("--eval-games", type=int, default=-1, help="games per split (-1 = all; train-val: all V)")
    p.add_argument("--train-val", type=int, default=120, help="V held-out train games: in no N (0 = none; the "
                   "convergence steps are then --val-fraction of the N, as in a plain stepagent run)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each cell's final checkpoint (~0.5 GB each)")
    args, flags = p.parse_known_args(argv)
    args.code = code_version()  # now, with this process's stepagent loaded: a commit made while it runs is not its code
    ns = parse_list(args.n.replace("all", "0"), "n", int)
    args.methods, seeds = parse_list(args.methods, "methods"), parse_list(args.seeds, "seeds", int)
    args.splits = parse_list(args.splits, "splits")
    for flag, bad, expected in [("methods", set(args.methods) - set(METHODS), ", ".join(METHODS)),
                                ("splits", set(args.splits) - set(SPLITS), ", ".join(SPLITS)),
                                ("n", {x for x in ns if x < 0}, ">= 0")]:
        if bad:
            raise SystemExit(f"error: --{flag} {','.join(map(str, bad))}: expected {expected}")
    if "train-val" in args.splits and args.train_val <= 0:
        raise SystemExit("error: --splits train-val needs held-out train games: --train-val V with V > 0")
    given = {a.split("=")[0][2:].replace("-", "_") for a in flags if a.startswith("--")}
    if owned := sorted(given & set(OWNED)):
        raise SystemExit(f"error: --{owned[0].replace('_', '-')} is set by the sweep per cell: use --n, --methods, "
                         "--seeds, --splits, --eval-games, --out")
    if "preset" not in given:  # a cell is the flags given, not whatever stepagent's auto preset picks on this machine
        flags = ["--preset", "none", *flags]
    base = stepagent.parse_config(flags)  # a typo'd stepagent flag fails here, before anything runs
    train_val = heldout_train_games(base.env, args.train_val, base.env_data) if args.train_val > 0 else []
    heldout = heldout_file(args.out, base, train_val) if train_val else None
    cells = []
    for n in ns:
        for seed in seeds:
            done = [m for m in args.methods if (args.out / cell_name(n, m, seed) / "cell.json").exists()]
            cells += [c for m in done if (c := add_splits(args, args.out / cell_name(n, m, seed), train_val))]
            todo = [m for m in args.methods if m not in done]
            print(f"sweep: N={n or 'all'} seed {seed}: " + (f"running {', '.join(todo)}" if todo else "all done"))
            if not todo:
                continue
            warm = warm_start(flags, args.out, n, seed, heldout)
            for method in todo:
                cells.append(run_cell(args, flags, base, n, method, seed, warm, heldout, train_val))
                gc.collect()
            if not args.keep_checkpoints:
                for ckpt in stepagent._checkpoints(warm[0].parent):
                    shutil.rmtree(ckpt, ignore_errors=True)
    print(report_markdown(load_cells([args.out])))
    return cells


# ----------------------------------------------------------------------------- report


def load_cells(outs: list[Path]) -> list[dict]:
    """Every finished cell under the OUT folders (or cell folders themselves)."""
    paths = [p for out in outs for p in sorted(Path(out).glob("*/cell.json")) + sorted(Path(out).glob("cell.json"))]
    return [json.loads(p.read_text()) for p in paths]


def aggregate(cells: list[dict]) -> dict[tuple[int, str], dict]:
    """(N, method) -> seeds, per split (mean, sample std or None for one seed, seeds), mean trajectories, compute."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for c in cells:
        groups.setdefault((c["n"], c["method"]), []).append(c)
    out = {}
    for key, cs in sorted(groups.items(), key=lambda kv: (kv[0][0] or math.inf, METHODS.index(kv[0][1]))):
        per_split = {}
        for split in sorted({s for c in cs for s in c["success"]}):
            xs = [c["success"][split]["success"] for c in cs if split in c["success"]]
            per_split[split] = (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))
        out[key] = {"seeds": sorted(c["seed"] for c in cs), "success": per_split,
                    "trajectories": statistics.mean(c["trajectories"] for c in cs),
                    "tokens": statistics.mean(c["compute"]["train_tokens"] for c in cs),
                    "warm_tokens": statistics.mean(c["compute"]["warmstart_tokens"] for c in cs),
                    "minutes": statistics.mean((c["compute"]["train_seconds"] + c["compute"]["eval_seconds"]) / 60
                                               for c in cs),
                    "devices": sorted({c["compute"]["device"] for c in cs}), "cells": cs}
    return out


def pct(mean: float, std: float | None, k: int) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}% ({k})" if std is not None else f"{100 * mean:.1f}% (1)"


def tokens(x: float) -> str:
    return f"{x / 1e6:.2f} M" if x >= 1e6 else f"{x / 1e3:.1f} k"


def differing_settings(cells: list[dict]) -> list[str]:
    """Settings that differ between cells although they should not (merged cells of different sweeps). The cycle
    settings are compared within a method only: each StepAgent variant is tuned on its own, SFT cells ignore them."""
    per_cell = set(OWNED) | set(SPEED_ONLY) | set(CYCLE_ONLY) | {"trajectory_seed", "epochs", "cycles", "method"}
    keys = {k for c in cells for k in c["config"]} - per_cell
    default = dataclasses.asdict(stepagent.Config())  # a setting newer than a cell ran as its default then
    value = lambda c, k: json.dumps(c["config"].get(k, default.get(k)))  # noqa: E731
    diff = [k for k in sorted(keys) if len({value(c, k) for c in cells}) > 1]
    for method in ("implicit", "inverse"):
        same = [c for c in cells if c["method"] == method]
        diff += [f"{k} ({LABELS[method]})" for k in CYCLE_ONLY if len({value(c, k) for c in same}) > 1]
    diff += [f"sweep.{k}" for k in ("epochs", "cycles", "train_val") if len({c["sweep"].get(k) for c in cells}) > 1]
    draws: dict[tuple, set] = {}  # every method of an (N, seed) must have trained on the same trajectories
    for c in cells:
        draws.setdefault((c["n"], c["seed"]), set()).add(c["train_ids_sha256"])
    return diff + [f"the trajectories of N={n or 'all'} seed {s}" for (n, s), d in draws.items() if len(d) > 1]


def report_markdown(cells: list[dict]) -> str:
    if not cells:
        return "no finished cells (OUT/*/cell.json) found"
    agg = aggregate(cells)
    splits = [s for s in SPLITS if any(s in a["success"] for a in agg.values())]
    lines = ["| N (trained) | method | seeds | " + " | ".join(splits) + " | training tokens: cell (+ warm start) "
             "| wall min per cell (train + eval) | device |", "|" + "---|" * (6 + len(splits))]
    for (n, method), a in agg.items():
        cols = [pct(*a["success"][s]) if s in a["success"] else "" for s in splits]
        seeds = ",".join(map(str, a["seeds"]))
        lines.append(f"| {n or 'all'} ({a['trajectories']:.0f}) | {LABELS[method]} | {seeds} | " + " | ".join(cols)
                     + f" | {tokens(a['tokens'])} (+ {tokens(a['warm_tokens'])}) | {a['minutes']:.1f} | "
                     f"{', '.join(a['devices'])} |")
    c0 = cells[0]["sweep"]
    lines += ["", f"Success: mean ± sample std over seeds (number of seeds). Fair budget: {c0['fair_budget']}. "
              f"Held-out train games: {c0['train_val']}. Turns per game: {cells[0]['config']['max_steps'] or 'env'}."]
    if diff := differing_settings(cells):
        lines.append(f"**Warning: the cells differ in {', '.join(diff)}; they are not one sweep.**")
    lines += ["", "Per-cycle diagnostics (held-out expert steps; mean over seeds; 'init' = the warm start):", "",
              diagnostics_table(agg)]
    rows = []
    for (n, method), a in agg.items():
        b = merge_behaviour([c["behaviour"][s] for c in a["cells"] for s in c["behaviour"] if s != "train-val"])
        if b["turns"]:
            rows.append(f"| {n or 'all'} " + replication.behaviour_row(LABELS[method], b))
    if rows:  # tuning cells play only train-val: no valid-split behaviour to show
        header = ("| N | method | turns | actions (top 5 verbs) | \"Nothing happens.\" | same action as the turn "
                  "before | episodes that picked anything up | ... an object the task names |")
        lines += ["", "What the agents did (all seeds, valid splits):", "", header, "|" + "---|" * 8, *rows]
    return "\n".join(lines)


def merge_behaviour(bs: list[dict]) -> dict:
    total = {k: sum(b[k] for b in bs) for k in ("turns", "nothing", "repeats", "picked", "episodes", "picked_goal")}
    return {**total, "verbs": sum((Counter(b["verbs"]) for b in bs), Counter())}


def diagnostics_table(agg: dict) -> str:
    cols = [c for c in replication.CYCLE_COLS if c != "cycle"
            and any(c in r for a in agg.values() for cell in a["cells"] for r in cell["cycles"])]
    lines = ["| N | method | cycle | " + " | ".join(replication.CYCLE_COLS[c] for c in cols) + " |",
             "|" + "---|" * (3 + len(cols))]
    for (n, method), a in agg.items():
        order = list(dict.fromkeys(r["cycle"] for cell in a["cells"] for r in cell["cycles"]))
        for cyc in order:
            rows = [r for cell in a["cells"] for r in cell["cycles"] if r["cycle"] == cyc]
            vals = [[r[c] for r in rows if r.get(c) is not None] for c in cols]
            fmt = [f"{statistics.mean(v):.3f}" if v else "" for v in vals]
            lines.append(f"| {n or 'all'} | {LABELS[method]} | {cyc} | " + " | ".join(fmt) + " |")
    return "\n".join(lines)


def plot(agg: dict, path: Path) -> Path | None:
    """Success vs N (log axis), one line per method, error bars = sample std over seeds; one panel per split."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib); the table above has every number")
        return None
    splits = [s for s in SPLITS if any(s in a["success"] for a in agg.values())]  # report() passes played cells
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for method in METHODS:
            pts = sorted((a["trajectories"], *a["success"][split][:2]) for (n, m), a in agg.items()
                         if m == method and split in a["success"])
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * (e or 0) for e in es], marker="o", capsize=3,
                            label=LABELS[method])
        ax.set(xscale="log", title=split, xlabel="expert trajectories trained on (N)", ylabel="success (%)",
               ylim=(0, 100))
        ticks = sorted({a["trajectories"] for a in agg.values()})  # the Ns themselves, not 4×10¹
        ax.set_xticks(ticks, [f"{x:.0f}" for x in ticks])
        ax.minorticks_off()
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")
    return path


def report(argv: list[str]) -> str:
    p = argparse.ArgumentParser(prog="sweep.py report", description="Table, plot and diagnostics of finished cells.")
    p.add_argument("outs", nargs="+", type=Path, help="sweep folders (or cell folders) holding */cell.json")
    p.add_argument("--md", type=Path, help="write the markdown here (default: FIRST_OUT/sweep.md)")
    p.add_argument("--plot", type=Path, help="write the plot here (default: FIRST_OUT/sweep.png)")
    p.add_argument("--splits", help="only these splits' columns (e.g. valid_unseen,valid_seen: not the tuning games)")
    args = p.parse_args(argv)
    cells = load_cells(args.outs)
    if args.splits:
        if bad := set(keep := parse_list(args.splits, "splits")) - set(SPLITS):
            raise SystemExit(f"error: --splits {','.join(sorted(bad))}: expected {', '.join(SPLITS)}")
        cells = [{**c, "success": {s: v for s, v in c["success"].items() if s in keep},
                  "behaviour": {s: v for s, v in c["behaviour"].items() if s in keep}} for c in cells]
        cells = [c for c in cells if c["success"]]  # a cell that played none of them has no row
    text = report_markdown(cells) if cells or not args.splits else f"no finished cell has played {args.splits}"
    print(text)
    md = args.md or args.outs[0] / "sweep.md"
    stepagent.atomic_write(md, text + "\n")
    print(f"wrote {md}")
    if cells:
        plot(aggregate(cells), args.plot or args.outs[0] / "sweep.png")
    return text


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        return run_sweep(argv[1:])
    if argv[:1] == ["report"]:
        return report(argv[1:])
    raise SystemExit("usage: python bench/sweep.py run --out OUT [--n ...] [stepagent flags] | report OUT [OUT ...]")


if __name__ == "__main__":
    main()
