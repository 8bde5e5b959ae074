"""Where an evaluation turn's time goes: prompt rendering + tokenisation, prefill, decoding, the KV-cache policy's own
bookkeeping, and the harness (engine steps, game starts, pipes), for one policy on real ALFWorld games.

    python bench/eval_breakdown.py --model 135m --games 16 --batch 8 --max-steps 8 --new-tokens 16
    python bench/eval_breakdown.py --dtype bf16 --checkpoint RUN/ckpt-N --games 24 --batch 24 --new-tokens 24
    python bench/eval_breakdown.py --engine     # one engine alone: game load + reset, and a step, in this process
    python bench/eval_breakdown.py --inspect 4  # inspection of 4 trajectories: generate() vs the KV-cached path
    python bench/eval_breakdown.py --inspect 32 --inspect-steps 2 --samples 2 --new-tokens 48 --checkpoint CK \
        --no-generate   # a sweep cell's inspection settings, the cached path alone
    python bench/eval_breakdown.py --decode 24 1000 --dtype bf16   # a decode step: DynamicCache vs the slot cache
    python bench/eval_breakdown.py --heldout 24 32 --new-tokens 48 --checkpoint CK   # held-out metrics: generate vs tree
    STEPAGENT_BENCH_CODE=DIR python bench/eval_breakdown.py ...   # the same for the code in DIR (e.g. bench.OLD's)

Times are wall seconds in the policy's process (on CUDA each timed call synchronizes, so a kernel's time counts where
it was launched); "harness" is the evaluation's wall time minus the policy's.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (puts the checkout on sys.path)
import data  # noqa: E402
import envs  # noqa: E402
import stepagent  # noqa: E402


def timed(totals: dict, key: str, fn):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # CUDA returns before it computes

    def wrapper(*args, **kw):
        sync()
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            sync()
            totals[key] += time.perf_counter() - t0
    return wrapper


def policy_breakdown(model_name: str, games: int, batch: int, max_steps: int, new_tokens: int, dtype: str = "fp32",
                     checkpoint: str = "", cuda_graphs: bool = False, keep: str = "", max_loading: int = 0) -> None:
    totals: dict[str, float] = collections.defaultdict(float)
    rt = stepagent.setup_runtime(stepagent.Config(dtype=dtype))
    model, tok = stepagent.load_policy(checkpoint, rt) if checkpoint else bench.load_model(model_name, rt)
    graphs = {"cuda_graphs": cuda_graphs} if "cuda_graphs" in stepagent.Config.__dataclass_fields__ else {}  # old code
    cfg = stepagent.Config(max_new_tokens=new_tokens, **graphs)
    act = stepagent.make_act_fn(cfg, rt, model.eval(), tok)
    data.encode_prompt = timed(totals, "render + tokenise", data.encode_prompt)
    forward = act._forward  # a decode step passes a mask and no columns to read (here and in bench.OLD's code)
    if hasattr(act, "_decode"):  # a decode step, CUDA graph or not (--cuda-graphs replays one without _forward)
        act._decode = timed(totals, "decode", act._decode)

    def split(ids, cache, *a, **kw):
        if a or "attention_mask" not in kw:
            return timed(totals, "prefill", forward)(ids, cache, *a, **kw)
        return forward(ids, cache, *a, **kw) if hasattr(act, "_decode") else \
            timed(totals, "decode", forward)(ids, cache, *a, **kw)
    act._forward = split
    out = Path(keep) if keep else Path(tempfile.mkdtemp()) / "e.jsonl"  # keep: the episodes, to compare actions
    out.unlink(missing_ok=True)  # evaluate() resumes from a file it finds
    t0 = time.perf_counter()
    more = {"max_loading": max_loading} if max_loading else {}  # (older envs.evaluate has no such argument)
    envs.evaluate("alfworld", "valid_seen", timed(totals, "policy", act), out, games, batch, max_steps, **more)
    wall = time.perf_counter() - t0
    turns = sum(json.loads(line)["steps"] for line in out.read_text().splitlines())
    totals["cache bookkeeping"] = totals["policy"] - sum(totals[k] for k in ("render + tokenise", "prefill", "decode"))
    harness = "harness: engines, starts, pipes"
    totals[harness] = wall - totals["policy"]
    print(f"{checkpoint or model_name} ({dtype}): {games} games, batch {batch}, {turns} turns, {wall:.1f} s, {60 * games / wall:.2f} games/min")
    for k in ("render + tokenise", "prefill", "decode", "cache bookkeeping", "policy", harness):
        print(f"  {k:32s} {totals[k]:7.2f} s  {1000 * totals[k] / turns:7.1f} ms per episode-turn")


def inspection_speed(model_name: str, n: int, new_tokens: int, checkpoint: str = "", steps: int = 0, samples: int = 1,
                     reference: bool = True) -> None:
    """inspect() over every expert prefix (or `steps` random ones, `samples` times) of n median-length trajectories:
    generate() re-encoding each prefix vs the KV-cached path (greedy, so both give the same replies), one after the
    other in this process. The cached path is inspect_tree here (each trajectory prefilled once, its prefixes decoded
    together as branches); with 2d6907d's files or older ones (STEPAGENT_BENCH_CODE) it is their policy acting step by
    step on kept caches. reference=False: the cached path alone."""
    rt = bench.runtime()
    model, tok = stepagent.load_policy(checkpoint, rt) if checkpoint else bench.load_model(model_name, rt)
    encs = bench.expert_set(tok, os.environ.get("ALFWORLD_DATA") or str(bench.ROOT.parent / "shared" / "alfworld"),
                            n, 0.5)
    times, replies = {}, {}
    for cache in (False, True) if reference else (True,):
        cfg = stepagent.Config(temperature=0.0, max_new_tokens=new_tokens, eval_cache=cache,
                               steps_per_trajectory=steps, samples_per_step=samples)
        t0 = time.perf_counter()
        replies[cache] = [i.agent for i in stepagent.inspect(cfg, rt, model.eval(), tok, encs, cycle=1)]
        times[cache] = time.perf_counter() - t0
    line = f"{checkpoint or model_name}: {len(replies[True])} prefixes of {len(encs)} trajectories: "
    if reference:
        line += (f"generate {times[False]:.1f} s, KV-cached {times[True]:.1f} s ({times[False] / times[True]:.2f}x); "
                 f"same replies: {sum(a == b for a, b in zip(replies[False], replies[True]))}/{len(replies[True])}")
    else:
        line += f"KV-cached {times[True]:.1f} s, {sum(map(len, replies[True])) / len(replies[True]):.1f} chars a reply"
    print(line)


def heldout_speed(model_name: str, n: int, steps: int, new_tokens: int, checkpoint: str = "") -> None:
    """heldout_metrics on `steps` random expert steps of n median-length trajectories: generate() re-encoding each
    prefix (--no-eval-cache) vs inspect_tree (each trajectory prefilled once), one after the other; same metrics?"""
    import random

    rt = bench.runtime()
    model, tok = stepagent.load_policy(checkpoint, rt) if checkpoint else bench.load_model(model_name, rt)
    encs = bench.expert_set(tok, os.environ.get("ALFWORLD_DATA") or str(bench.ROOT.parent / "shared" / "alfworld"),
                            n, 0.5)
    heldout = random.Random(0).sample([(e, t) for e in encs for t in range(len(e.action_spans))], steps)
    times, metrics = {}, {}
    for cache in (False, True):
        cfg = stepagent.Config(max_new_tokens=new_tokens, eval_cache=cache)
        t0 = time.perf_counter()
        metrics[cache] = stepagent.heldout_metrics(cfg, rt, model.eval(), tok, heldout, 1)
        times[cache] = time.perf_counter() - t0
    print(f"{checkpoint or model_name}: held-out metrics on {steps} steps of {len(encs)} trajectories: generate "
          f"{times[False]:.1f} s, tree {times[True]:.1f} s ({times[False] / times[True]:.2f}x); same metrics: "
          f"{metrics[False] == metrics[True]} ({metrics[True]})")


def decode_step(model_name: str, rows: int, columns: int, dtype: str, steps: int = 12) -> None:
    """One decode step of `rows` episodes after `columns` cached tokens: transformers' DynamicCache (a torch.cat of the
    whole cache per layer per token) vs the cached policy's slot cache (each row written in place at its own column),
    and on CUDA the slot cache's step replayed as a CUDA graph (--cuda-graphs); same prefill, same fed tokens."""
    rt = stepagent.setup_runtime(stepagent.Config(dtype=dtype))
    model, tok = bench.load_model(model_name, rt)
    dev = rt.device
    ids = torch.randint(100, 40_000, (rows, columns), generator=torch.Generator().manual_seed(0)).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    result = {}
    for name in ("DynamicCache", "slot cache") + (("slot cache, CUDA graph",) if dev.type == "cuda" else ()):
        policy = stepagent.PrefixCachedPolicy(model.eval(), tok, rt, steps, graphs=name.endswith("graph"))
        logits = []
        with torch.no_grad(), rt.autocast():
            if name == "DynamicCache":
                cache = getattr(model(input_ids=ids, use_cache=True), policy.cache_kw)
                step = lambda s: model(input_ids=torch.full((rows, 1), 5 + s, device=dev),  # noqa: E731
                                       attention_mask=torch.ones(rows, columns + s + 1, dtype=torch.long, device=dev),
                                       position_ids=torch.full((rows, 1), columns + s, device=dev),
                                       **{policy.cache_kw: cache}).logits[:, -1].float()
            else:  # the policy's own prefill of `rows` prompts, then its decode step
                policy._prefill(ids.tolist(), [0] * rows, list(range(rows)))
                step = lambda s: policy._decode(torch.tensor([[5 + s, columns + s]] * rows, device=dev),  # noqa: E731
                                                columns + s + 1)
            step(0)  # warm-up (a graph's capture)
            sync()
            t0 = time.perf_counter()
            for s in range(1, steps):
                logits.append(step(s).clone())
            sync()
        result[name] = (1000 * (time.perf_counter() - t0) / (steps - 1), torch.stack(logits))
    base, l0 = result["DynamicCache"]
    print(f"{model_name} ({dtype}, {dev.type}), {rows} rows after {columns} columns, ms per decode step: " +
          ", ".join(f"{k} {t:.1f} ({base / t:.2f}x)" for k, (t, _) in result.items()) +
          "; greatest logit difference to DynamicCache: " +
          ", ".join(f"{k} {(l - l0).abs().max().item():.2g}" for k, (_, l) in list(result.items())[1:]))


def engine_breakdown(n_steps: int = 18) -> None:
    game = envs.list_games("alfworld", "valid_seen")[5]
    env = envs.AlfWorldEnv()
    t0 = time.perf_counter()
    env.load(game)
    env.reset()
    t1 = time.perf_counter()
    for action in ["go to shelf 1", "look", "go to drawer 1", "open drawer 1", "inventory", "go to countertop 1"] * 3:
        env.step(action)
    print(f"engine: load + reset {t1 - t0:.2f} s, step {1000 * (time.perf_counter() - t1) / n_steps:.1f} ms")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="135m", choices=["tiny", "135m"])
    p.add_argument("--games", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--dtype", default="fp32", help="fp32, or bf16 (CPU autocast; fast where the CPU has AMX)")
    p.add_argument("--checkpoint", default="", help="a trained checkpoint dir instead of --model's weights")
    p.add_argument("--engine", action="store_true", help="time one engine alone instead")
    p.add_argument("--cuda-graphs", action="store_true", help="decode steps as CUDA graphs (CUDA; stepagent's default)")
    p.add_argument("--keep", default="", metavar="FILE", help="write the played episodes (JSONL) to FILE")
    p.add_argument("--max-loading", type=int, default=0, metavar="K", help="at most K games loading at once")
    p.add_argument("--inspect", type=int, default=0, metavar="N", help="time inspection of N trajectories instead")
    p.add_argument("--inspect-steps", type=int, default=0, metavar="S", help="--inspect: S random steps per trajectory")
    p.add_argument("--samples", type=int, default=1, metavar="K", help="--inspect: K replies per step")
    p.add_argument("--no-generate", action="store_true", help="--inspect: time the KV-cached path alone")
    p.add_argument("--heldout", nargs=2, type=int, metavar=("N", "STEPS"),
                   help="time heldout_metrics on STEPS random steps of N trajectories instead (generate vs tree)")
    p.add_argument("--decode", nargs=2, type=int, metavar=("ROWS", "COLUMNS"),
                   help="time one decode step with transformers' DynamicCache vs the slot cache instead")
    a = p.parse_args()
    if a.decode:
        decode_step(a.model, *a.decode, a.dtype)
    elif a.heldout:
        heldout_speed(a.model, *a.heldout, a.new_tokens, a.checkpoint)
    elif a.inspect:
        inspection_speed(a.model, a.inspect, a.new_tokens, a.checkpoint, a.inspect_steps, a.samples, not a.no_generate)
    else:
        engine_breakdown() if a.engine else policy_breakdown(a.model, a.games, a.batch, a.max_steps, a.new_tokens,
                                                                     a.dtype, a.checkpoint, a.cuda_graphs, a.keep,
                                                                     a.max_loading)
