"""Host time of building one packed row (stepagent.pack_tree, and its predictions as a tensor) for n median expert
trajectories: this checkout against an older commit's pack_tree, in one process, with a check that both build the
same tensors and predictions. On a GPU the host builds every micro-batch's row while the device waits, so these
milliseconds add to each training step.

    python bench/pack_speed.py                  # 32 trajectories (SFT: all expert actions; reflection: + a branch each)
    python bench/pack_speed.py --old 167988d --n 8
    python bench/pack_speed.py --mask           # and the reflection row's FlexAttention BlockMask, compiled vs eager
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (puts the checkout on sys.path)
import stepagent  # noqa: E402


def old_stepagent(commit: str):
    """The commit's stepagent.py as a module (bench.old_code's copy; its imports, data and envs, are this checkout's)."""
    path = Path(bench.old_code(commit)) / "stepagent.py"
    spec = importlib.util.spec_from_file_location("stepagent_old", path)
    mod = sys.modules["stepagent_old"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=32, help="median-length expert trajectories in the row")
    p.add_argument("--old", default="167988d", help="the commit to compare with")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--mask", action="store_true", help="also the reflection row's BlockMask, compiled vs eager")
    a = p.parse_args()
    rt = stepagent.Runtime(torch.device("cpu"), torch.float32)
    _, tok = bench.load_model("tiny", rt, random_init=True)  # the embedded tokenizer; the model is not used
    encs = bench.expert_set(tok, os.environ.get("ALFWORLD_DATA") or str(bench.ROOT.parent / "shared" / "alfworld"),
                            a.n, 0.5)
    groups = bench.agent_items(tok, encs)
    layouts = {"SFT": ([list(range(len(e.action_spans))) for e in encs], [[] for _ in encs]),
               "reflection": ([sorted({i.t for i in its}) for _, its in groups],
                              [[stepagent.Branch(e.action_spans[i.t][0], i.agent_ids) for i in its]
                               for e, (_, its) in zip(encs, groups)])}
    old = old_stepagent(a.old)
    for name, (steps, branches) in layouts.items():
        ms, packs = {}, {}
        for label, mod in ((a.old, old), ("this checkout", stepagent)):
            packs[label] = mod.pack_tree(encs, steps, branches, "cpu", True)
            t0 = time.perf_counter()
            for _ in range(a.repeats):  # and the (N, 5) predictions tensor action_logps makes of it
                preds = mod.pack_tree(encs, steps, branches, "cpu", True)["preds"]
                torch.tensor(preds) if isinstance(preds, list) else torch.from_numpy(preds)
            ms[label] = 1000 * (time.perf_counter() - t0) / a.repeats
        x, y = packs.values()
        same = np.array_equal(np.asarray(x["preds"]), y["preds"]) and all(  # 167988d: a list of 5-tuples
            torch.equal(x[k], y[k]) for k in x if isinstance(x[k], torch.Tensor))
        print(f"{name}, {a.n} trajectories, {y['tokens']:,} tokens in one row: {a.old} {ms[a.old]:.1f} ms, this "
              f"checkout {ms['this checkout']:.1f} ms ({ms[a.old] / ms['this checkout']:.1f}x); same tensors: {same}")
    if a.mask:  # the reflection row's FlexAttention BlockMask: create_block_mask compiled (now) vs eager (before)
        from torch.nn.attention.flex_attention import create_block_mask

        model, _ = bench.load_model("tiny", rt, random_init=True)
        model.set_attn_implementation("flex_attention")
        packed, res = y, {}
        for label in ("compiled", "eager"):  # compiled first: the peak RSS only grows
            if label == "eager":
                stepagent.block_mask_fn = lambda: create_block_mask  # noqa: E731
            rss0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
            mask = stepagent.tree_mask(model, packed)  # the first call compiles
            first, t0 = time.perf_counter() - t0, time.perf_counter()
            for _ in range(3):
                stepagent.tree_mask(model, packed)
            res[label] = ((time.perf_counter() - t0) / 3, first, mask.to_dense(),
                          (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20)
        (c, c1, cm, cr), (e, _, em, er) = res.values()
        print(f"block mask of that row: eager {e:.2f} s, +{er:.1f} GB peak RSS; compiled {c:.2f} s ({e / c:.1f}x; "
              f"first call {c1:.1f} s with the compilation), +{cr:.1f} GB; same mask: {torch.equal(cm, em)}")


if __name__ == "__main__":
    main()
