"""stepagent benchmarks: speed as ratios measured within one run, so the machine's own speed and load cancel.

    python bench/bench.py            # full: tiny model + embedded SmolLM2-135M (~6-10 min on a 2-core CPU)
    python bench/bench.py --quick    # tiny sizes, tiny model only (< 2 min)
    python bench/bench.py --gpu      # adds row 4 (MFU, bf16 vs fp16+GradScaler) when CUDA is available
    python bench/bench.py --rows 4   # row 4 alone (135M and 1B shapes, old vs new path; ~5 min on one H100)

1. reflection step: one-pass tree packing vs the pairwise layout (and TRL's DPOTrainer concatenated forward);
2. inspection: batched generation vs one prefix at a time; 3. evaluation: this checkout vs f9b7db4, on the same games;
4. (--gpu) MFU, tokens/s and peak memory of SFT and reflection steps, old vs new path.
Table to stdout, JSON to bench/results-<device>.json (or --out).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads are 5x slower when shared

import argparse
import copy
import json
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
OLD = "f9b7db4"  # row 3's old path: the evaluation code of this commit (KV cache, per-episode prefill, blocking starts)
sys.path.insert(0, os.environ.get("STEPAGENT_BENCH_CODE") or str(ROOT))  # a row-3 child may run OLD's files
import data  # noqa: E402
import envs  # noqa: E402
import stepagent  # noqa: E402

BETA = 0.1
RESULT = "BENCH-RESULT "  # prefix of the one stdout line a child process answers with


@dataclass
class Sizes:
    """How much work each row does: these defaults are the full run, QUICK the --quick one."""
    models: tuple[str, ...] = ("tiny", "135m")
    trajectories: dict = field(default_factory=lambda: {"tiny": 1, "135m": 1})  # expert trajectories per step
    quantile: dict = field(default_factory=lambda: {"tiny": 0.5, "135m": 0.1})  # by step count: 0.5 = median
    repeats: dict = field(default_factory=lambda: {"tiny": 3, "135m": 2})  # timed steps after a warm-up step
    trl_repeats: int = 1  # TRL's step is the slowest on CPU (see RESULTS.md): one timed step
    pair_batch: int = 2  # pairs (2 rows each) per forward in the pairwise layouts: their memory grows with it
    prefixes: dict = field(default_factory=lambda: {"tiny": 32, "135m": 16})  # inspection prefixes generated
    new_tokens: int = 16  # max new tokens per action (generation and evaluation)
    gen_batch: int = 8
    repeats_b: int = 1  # row 2: 1 = B=1 then B=k; 2 = ABBA order (drift cancels, twice the time)
    games: int = 16  # valid_seen games per evaluation: more than a batch, so finished slots are refilled
    eval_batch: int = 8  # row 3: the old default --eval-batch (and the new one on a 2-core CPU)
    max_steps: int = 8  # turns per game: the KV cache gains more the longer the histories grow
    gpu_trajectories: int = 8  # row 4: median trajectories per SFT / reflection step
    gpu_models: tuple[str, ...] = ("135m", "1b")  # row 4: random-init Llama shapes from GPU_MODELS
    gpu_tokens_per_batch: int = 16384  # row 4, new path: --tokens-per-batch (real tokens per packed row)
    gpu_repeats: int = 3  # row 4: timed steps per setting, after one warm-up step
    gpu_paths: tuple[str, ...] = ("old", "new", "compiled")  # row 4: compiled = the new path with --compile
    gpu_profile: bool = False  # row 4: also one step of each setting under torch.profiler (top ops into the JSON)


QUICK = Sizes(models=("tiny",), trajectories={"tiny": 1}, quantile={"tiny": 0.0}, repeats={"tiny": 1},
              prefixes={"tiny": 8}, new_tokens=8, gen_batch=4, games=3, eval_batch=2, max_steps=2, gpu_trajectories=4,
              gpu_models=("135m",), gpu_repeats=2)


# ---------------------------------------------------------------------------- models, data, timing


def runtime() -> stepagent.Runtime:
    """stepagent's own device/precision choice: CPU fp32, CUDA bf16 autocast."""
    return stepagent.setup_runtime(stepagent.Config())


GPU_MODELS = {  # Llama shapes (layers, hidden, MLP, heads, KV heads) for random-init models
    "tiny": (4, 256, 1024, 4, 4),
    "135m": (30, 576, 1536, 9, 3),  # SmolLM2-135M's config.json
    "1b": (16, 2048, 8192, 32, 8),  # Llama-3.2-1B's shape over SmolLM2's 49k vocabulary: 1.07B parameters
}


def load_model(name: str, rt: stepagent.Runtime, random_init: bool = False):
    """'135m': the embedded checkpoint (random_init: its shape, random weights); 'tiny' and the other GPU_MODELS: a
    seeded random Llama over SmolLM2's vocabulary. Every process builds the same random weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if name == "135m" and not random_init:
        return stepagent.load_policy(stepagent.EMBEDDED_ID, rt)
    tok = AutoTokenizer.from_pretrained(str(stepagent.embedded_checkpoint()))
    layers, d, ff, heads, kv = GPU_MODELS[name]
    config = LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=ff, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(rt.device), tok


def expert_set(tok, data_dir: str, n: int, quantile: float) -> list[data.Encoded]:
    """n real expert trajectories taken at a quantile of the step count (0 = shortest, 0.5 = median), untruncated."""
    trajs = data.load_trajectories(Path(data_dir) / "expert" / "train_planner.json")
    trajs = sorted(trajs, key=lambda t: (len(t.steps), t.id))
    start = round(quantile * (len(trajs) - n))
    return [data.encode_trajectory(tok, t, 10**9) for t in trajs[start:start + n]]


def agent_items(tok, encs: list[data.Encoded]) -> list[tuple[int, list[stepagent.Inspected]]]:
    """Every step t gets one agent action: the expert's action of step t+1 (a cheap deterministic stand-in)."""
    groups = []
    for row, enc in enumerate(encs):
        steps = enc.traj.steps
        alts = [steps[(t + 1) % len(steps)].action for t in range(len(steps))]
        groups.append((row, [stepagent.Inspected(row, t, "", a, data.encode_action(tok, enc.traj, t, a), False)
                             for t, a in enumerate(alts)]))
    return groups


def now(rt: stepagent.Runtime) -> float:
    """A timestamp taken after the GPU has finished its queued work."""
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def profile(fn, rt: stepagent.Runtime, top: int = 25) -> dict[str, str]:
    """One call of fn(rt) under torch.profiler: the top ops by self time on the GPU (if any) and on the host, as the
    profiler's own tables, and the host's wall time for the call beside its summed op time (the rest is Python)."""
    from torch.profiler import ProfilerActivity

    cuda = rt.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        t0 = now(rt)
        fn(rt)
        wall = now(rt) - t0
    ops = prof.key_averages()
    out = {"wall_s": wall, "host_ops_s": sum(e.self_cpu_time_total for e in ops) / 1e6,
           "host": ops.table(sort_by="self_cpu_time_total", row_limit=top)}
    if cuda:  # torch >= 2.4 names it self_device_time_total (self_cuda_time_total before)
        key = "self_device_time_total" if hasattr(ops[0], "self_device_time_total") else "self_cuda_time_total"
        out["device_ops_s"] = sum(getattr(e, key) for e in ops) / 1e6
        out["device"] = ops.table(sort_by=key, row_limit=top)
    return out


def peak_mb(rt: stepagent.Runtime) -> float:
    """Peak memory so far: allocated CUDA memory, or the process's max RSS (ru_maxrss is in KiB on Linux)."""
    if rt.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def interleaved(fns: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict]:
    """Wall and CPU seconds of each fn, run `repeats` times in A B .. B A order so a drift in load hits all alike.
    This process's CPU time (all its threads) barely moves when other jobs share the machine; wall time does."""
    wall, cpu, results = {k: [] for k in fns}, {k: [] for k in fns}, {}
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            results[k] = fns[k]()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return wall, cpu, results


# ---------------------------------------------------------------------------- 1. reflection step (child processes)


def stepagent_loss(packing: str, model, ref, rt: stepagent.Runtime):
    """L_imp of one micro-batch through stepagent.pair_logps (tree or pairs layout), as reflect_implicit does."""
    def loss_fn(encs, mb):
        with torch.no_grad():
            lr = stepagent.pair_logps(ref, encs, [mb], packing, rt)
        lp = stepagent.pair_logps(model, encs, [mb], packing, rt)
        loss, _ = stepagent.implicit_reward_loss(lp["logp_e"], lp["logp_a"], lr["logp_e"], lr["logp_a"], BETA)
        return loss, lp["tokens"] + lr["tokens"]
    return loss_fn


def trl_loss(model, ref, tok, rt: stepagent.Runtime):
    """TRL's DPOTrainer loss: its collator's prompt+chosen / prompt+rejected rows, its (fused-head) forward."""
    import warnings

    import datasets
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, inside TRL
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), report_to="none", beta=BETA, max_length=None,
                     use_cpu=rt.device.type == "cpu", bf16=False, fp16=False, logging_strategy="no",
                     save_strategy="no", disable_tqdm=True)  # precision: our rt.autocast() below, as for stepagent
    dummy = datasets.Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})  # it insists on one
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=dummy, processing_class=tok)
    collate = DataCollatorForPreference(pad_token_id=tok.pad_token_id)

    def loss_fn(encs, mb):
        enc = encs[mb[0]]
        batch = collate([dict(prompt_ids=enc.input_ids[:enc.action_spans[it.t][0]],
                              chosen_ids=enc.input_ids[slice(*enc.action_spans[it.t])], rejected_ids=it.agent_ids)
                         for it in mb[1]])
        batch = {k: v.to(rt.device) for k, v in batch.items()}
        with rt.autocast():
            loss = trainer.compute_loss(model, batch)
        return loss, 2 * int(batch["attention_mask"].sum())  # policy + reference rows, padding not counted
    return loss_fn


def reflection_step(loss_fn, encs, groups, layout: str, pair_batch: int, opt, params, rt) -> tuple[int, float]:
    """One optimizer step over every step of every trajectory: micro-batches accumulate, then one update."""
    micro = [(row, chunk) for row, items in groups  # tree: a whole trajectory per forward; pairs: pair_batch pairs
             for chunk in stepagent.batched(items, len(items) if layout == "tree" else pair_batch)]
    total, tokens, loss_sum = sum(len(items) for _, items in micro), 0, 0.0
    for m, mb in enumerate(micro):
        loss, n_tok = loss_fn(encs, mb)
        weight = len(mb[1]) / total  # the step's loss is the mean over all pairs, whatever the micro-batching
        stepagent.optimizer_step(loss * weight, opt, rt, params, 1.0, accumulate=m < len(micro) - 1)
        tokens, loss_sum = tokens + n_tok, loss_sum + loss.item() * weight
    return tokens, loss_sum


def reflection_child(spec: dict) -> dict:
    """One (model, layout) in a fresh process, so its peak memory is its own: a warm-up step, then timed steps."""
    rt = runtime()
    model, tok = load_model(spec["model"], rt)
    encs = expert_set(tok, spec["data"], spec["n"], spec["quantile"])
    warm = expert_set(tok, spec["data"], 1, 0.0)  # the shortest trajectory: allocator, kernels, AdamW state
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    if spec["layout"] == "trl":
        try:
            loss_fn = trl_loss(model, ref, tok, rt)
        except Exception as e:  # not installed, or an API this script does not know: say which, measure the rest
            return {"error": f"TRL unusable here ({type(e).__name__}: {e}); `pip install trl` to measure it"}
    else:
        loss_fn = stepagent_loss(spec["layout"], model, ref, rt)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)  # large enough that the timed steps' losses differ from log 2
    model.train()
    reflection_step(loss_fn, warm, agent_items(tok, warm), spec["layout"], spec["pair_batch"], opt, params, rt)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / 2**20 if rt.device.type == "cuda" else peak_mb(rt)
    groups, times, cpu, losses = agent_items(tok, encs), [], [], []
    for _ in tqdm(range(spec["repeats"]), desc=f"reflect {spec['model']} {spec['layout']}", leave=False):
        t0, c0 = now(rt), time.process_time()
        tokens, loss = reflection_step(loss_fn, encs, groups, spec["layout"], spec["pair_batch"], opt, params, rt)
        times.append(now(rt) - t0)
        cpu.append(time.process_time() - c0)
        losses.append(loss)
    peak = peak_mb(rt)
    note = "without Triton TRL's fused LM head scores every position, not only completions" \
        if spec["layout"] == "trl" and rt.device.type != "cuda" else ""
    return {"tokens": tokens, "seconds": statistics.median(times), "times": times, "cpu": statistics.median(cpu),
            "cpu_times": cpu, "peak_mb": peak,
            "step_mb": max(0.0, peak - base), "first_loss": losses[0], "steps": sum(len(i) for _, i in groups),
            "trajectory_tokens": [len(e.input_ids) for e in encs], "note": note}


def run_child(spec: dict, env: dict | None = None) -> dict:
    """Run reflection_child (evaluation_child for row 3) in a fresh interpreter; its stderr passes through."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE, text=True,
                          env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode or not lines:
        why = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        return {"error": f"child exited with code {proc.returncode}{why}"}
    return json.loads(lines[-1][len(RESULT):])


def reflection_rows(sizes: Sizes, data_dir: str) -> dict:
    """Tree, pairs and TRL for each model, one fresh process each (tree first: the baseline of the ratios)."""
    rows = {}
    for name in sizes.models:
        for layout in ("tree", "pairs", "trl"):
            rows[f"{name}/{layout}"] = run_child(dict(
                model=name, layout=layout, data=data_dir, n=sizes.trajectories[name], quantile=sizes.quantile[name],
                pair_batch=sizes.pair_batch, repeats=sizes.trl_repeats if layout == "trl" else sizes.repeats[name]))
    return rows


# ---------------------------------------------------------------------------- 2. inspection, 3. evaluation (in-process)


def generation_row(name: str, model, tok, rt, sizes: Sizes, data_dir: str) -> dict:
    """Actions per second of greedy generation at expert prefixes: gen batch B vs one prefix at a time."""
    encs = expert_set(tok, data_dir, 64, 0.5)[::-1]
    slots = [(e, t) for t in range(40) for e in encs if t < len(e.action_spans)][:sizes.prefixes[name]]
    prompts = [e.input_ids[:e.action_spans[t][0]] for e, t in slots]
    stepagent.generate(model, tok, rt, prompts[:2], 0.0, 4, 2, 0)  # warm-up
    B = sizes.gen_batch
    fns = {f"B={b}": (lambda b=b: stepagent.generate(model, tok, rt, prompts, 0.0, sizes.new_tokens, b, 0,
                                                      desc=f"generate {name} B={b}")) for b in (1, B)}
    times, cpu, outs = interleaved(fns, sizes.repeats_b)
    rate = {k: len(prompts) / statistics.median(v) for k, v in times.items()}
    return {"prefixes": len(prompts), "mean_prefix_tokens": sum(map(len, prompts)) / len(prompts), "times": times,
            "cpu_times": cpu, "rate": rate, "speedup": rate[f"B={B}"] / rate["B=1"],
            "cpu_speedup": statistics.median(cpu["B=1"]) / statistics.median(cpu[f"B={B}"]),
            "same_outputs": sum(a == b for a, b in zip(outs["B=1"], outs[f"B={B}"])) / len(prompts)}


def evaluation_child(spec: dict) -> dict:
    """One row-3 setting in a fresh process, on the code it was started with: this checkout, or OLD's files."""
    rt = runtime()
    act = lambda hs: ["look"] * len(hs)  # noqa: E731  (the no-op policy: what the harness alone costs)
    if spec["model"] != "no-op":
        model, tok = load_model(spec["model"], rt)
        act = stepagent.make_act_fn(stepagent.Config(max_new_tokens=spec["new_tokens"]), rt, model.eval(), tok)
    out = Path(tempfile.mkdtemp(prefix="bench-eval-")) / "e.jsonl"
    t0, c0 = time.perf_counter(), time.process_time()
    summary = envs.evaluate("alfworld", "valid_seen", act, out, spec["games"], spec["batch"], spec["max_steps"],
                            data_dir=spec["data"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    recs = sorted((json.loads(ln) for ln in out.read_text().splitlines()), key=lambda r: r["game"])
    return {"seconds": wall, "cpu": cpu, "turns": sum(r["steps"] for r in recs), "errors": summary["errors"],
            "actions": [[s["action"] for s in r["transcript"]] for r in recs]}


def old_code(commit: str = OLD) -> str:
    """The commit's (default OLD's) stepagent.py, envs.py and data.py in a temporary folder (from this checkout's git
    history)."""
    folder = Path(tempfile.mkdtemp(prefix=f"stepagent-{commit}-"))
    for name in ("stepagent.py", "envs.py", "data.py"):
        show = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{name}"], capture_output=True, text=True)
        if show.returncode:
            raise SystemExit(f"error: this bench needs commit {commit} in this checkout's git history: "
                             f"{show.stderr.strip()}")
        (folder / name).write_text(show.stdout)
    return str(folder)


def evaluation_rows(sizes: Sizes, data_dir: str) -> dict:
    """Games per minute on the same real ALFWorld games: OLD's evaluation code vs this checkout's, at the same
    --eval-batch and at twice it, each in a fresh process, for the no-op policy (the harness alone) and each model."""
    old, B = old_code(), sizes.eval_batch
    settings = {f"old, B={B}": (old, B), f"new, B={B}": ("", B), f"new, B={2 * B}": ("", 2 * B)}
    rows = {}
    for name in ("no-op", *sizes.models):
        r = rows[name] = {"games": sizes.games, "max_steps": sizes.max_steps, "settings": {}}
        for setting, (code, b) in settings.items():
            spec = dict(row=3, model=name, data=data_dir, games=sizes.games, batch=b, max_steps=sizes.max_steps,
                        new_tokens=sizes.new_tokens)
            r["settings"][setting] = run_child(spec, env={**os.environ, "STEPAGENT_BENCH_CODE": code} if code else None)
        base = r["settings"][f"old, B={B}"]
        for setting, m in r["settings"].items():
            if "error" not in m and "error" not in base:
                m["games_per_min"] = 60 * sizes.games / m["seconds"]
                m["speedup"], m["cpu_speedup"] = base["seconds"] / m["seconds"], base["cpu"] / m["cpu"]
                m["same_actions"] = sum(a == b for a, b in zip(base["actions"], m["actions"])) / len(base["actions"])
    return rows


# ---------------------------------------------------------------------------- 4. GPU: MFU, old vs new path, bf16/fp16

PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
               "A10G": 125.0, "L4": 121.0}  # dense bf16 TFLOP/s from the vendors' data sheets


def step_flops(model, packed: dict, train: bool) -> float:
    """Useful FLOPs (PaLM, appendix B): 2·N per token (N without embedding), 2·H·V per logit read, 4·layers·H per
    attended (query, key) pair; x3 with the backward. Masked-out and padding pairs are not counted."""
    c = model.config
    n_body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    if "attention_mask" in packed:
        attended = sum(n * (n + 1) // 2 for n in packed["attention_mask"].sum(1).tolist())
    else:  # the dense boolean form of the tree/document mask (the sdpa form; these Llamas have no window)
        dense = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="sdpa", sliding_window=None))
        attended = int(stepagent.tree_mask(dense, packed).sum())
    fwd = 2 * n_body * packed["tokens"] + 2 * c.hidden_size * c.vocab_size * len(packed["preds"])
    return (fwd + 4 * c.num_hidden_layers * c.hidden_size * attended) * (3 if train else 1)


def tree_packs(encs: list, groups: list, micro: list[list], one_row: bool, dev) -> list[dict]:
    """The packed forwards pair_logps builds for each micro-batch of (row, items) groups (for FLOP counts)."""
    return [stepagent.run_pack([encs[r] for r, _ in mb], [sorted({i.t for i in its}) for _, its in mb],
                               [[stepagent.Branch(encs[r].action_spans[i.t][0], i.agent_ids) for i in its]
                                for r, its in mb], "tree", dev, one_row) for mb in micro]


def gpu_rows(sizes: Sizes, data_dir: str, peak_tflops: float, device: str = "cuda") -> dict:
    """Row 4: SFT and implicit-reflection steps over gpu_trajectories median trajectories, on the old path (sdpa with
    dense masks, one row per trajectory padded to the longest, AdamW), the new one (--tokens-per-batch rows, the
    FlexAttention BlockMask, fused AdamW) and the new one torch.compile'd as --compile does (sizes.gpu_paths), in bf16
    and fp16 + GradScaler: MFU, tokens/s and peak memory."""
    dev, out = torch.device(device), {"peak_tflops": peak_tflops}
    cuda = dev.type == "cuda"
    for name in sizes.gpu_models:
        model, tok = load_model(name, stepagent.Runtime(dev, torch.float32), random_init=True)
        encs = expert_set(tok, data_dir, sizes.gpu_trajectories, 0.5)
        groups = agent_items(tok, encs)
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        params = list(model.parameters())
        n_tok = sum(e - s for enc in encs for s, e in enc.action_spans)
        tree_sizes = [max(enc.action_spans[i.t][1] for i in its) + sum(len(i.agent_ids) for i in its)
                      for enc, (_, its) in zip(encs, groups)]
        out[name] = {"params_M": sum(p.numel() for p in params) / 1e6}
        for path in sizes.gpu_paths:
            budget = sizes.gpu_tokens_per_batch if path != "old" else 0
            one_row = budget > 0
            attn = "flex_attention" if path != "old" and cuda else "sdpa"  # FlexAttention has no CPU backward
            model.set_attn_implementation(attn)
            ref.set_attn_implementation(attn)
            opt = torch.optim.AdamW(params, lr=1e-5, fused=path != "old" and cuda)
            # --compile: the forwards through torch.compile (dynamic: packed lengths vary), as stepagent.wrap_ddp
            pi, pi_ref = (torch.compile(m, dynamic=True) for m in (model, ref)) if path == "compiled" else (model, ref)
            sft_micro = stepagent.token_batches(encs, [e.action_spans[-1][1] for e in encs], budget, len(encs))
            sft_packs = [stepagent.pack_tree(mb, [list(range(len(e.action_spans))) for e in mb], [[] for _ in mb],
                                             dev, one_row) for mb in sft_micro]
            ref_micro = stepagent.token_batches(groups, tree_sizes, budget, len(groups))
            packs = tree_packs(encs, groups, ref_micro, one_row, dev)
            flops = {"sft": sum(step_flops(model, p, True) for p in sft_packs),
                     "reflect": sum(step_flops(model, p, True) + step_flops(model, p, False) for p in packs)}
            tokens = {"sft": sum(p["tokens"] for p in sft_packs), "reflect": 2 * sum(p["tokens"] for p in packs)}

            def sft(rt):
                for m, packed in enumerate(sft_packs):
                    with rt.autocast():
                        loss = stepagent.nll_loss(stepagent.action_logps(pi, packed)["tok_logp"], n_tok)
                    stepagent.optimizer_step(loss, opt, rt, params, 1.0, accumulate=m < len(sft_packs) - 1)

            def reflect(rt):  # as reflect_implicit: π_ref's log-probs first, then π_θ and L_imp per micro-batch
                n_pairs = sum(len(its) for _, its in groups)
                with torch.no_grad():
                    refs = [stepagent.pair_logps(pi_ref, encs, mb, "tree", rt, one_row=one_row) for mb in ref_micro]
                for m, (mb, lr) in enumerate(zip(ref_micro, refs)):
                    lp = stepagent.pair_logps(pi, encs, mb, "tree", rt, one_row=one_row)
                    loss, _ = stepagent.implicit_reward_loss(lp["logp_e"], lp["logp_a"], lr["logp_e"], lr["logp_a"],
                                                             BETA)
                    weight = sum(len(its) for _, its in mb) / n_pairs
                    stepagent.optimizer_step(loss * weight, opt, rt, params, 1.0, accumulate=m < len(ref_micro) - 1)

            precisions = {"bf16": torch.bfloat16, "fp16": torch.float16} if cuda else {"fp32": torch.float32}
            for prec, dtype in precisions.items():  # fp32 only when called on a CPU to check the code path
                rt = stepagent.Runtime(dev, dtype, scaler=torch.amp.GradScaler("cuda") if prec == "fp16" else None)
                for kind, fn in (("sft", sft), ("reflect", reflect)):
                    t_warm = now(rt)
                    try:
                        fn(rt)  # warm-up: kernels, FlexAttention compilation for these shapes, AdamW state, compile
                    except Exception as e:  # e.g. torch.compile failing on this machine: the other paths still run
                        out[name][f"{path}/{kind}/{prec}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                        print(f"row 4 {name} {path}/{kind}/{prec}: {out[name][f'{path}/{kind}/{prec}']}", flush=True)
                        continue
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    t0 = now(rt)
                    for _ in tqdm(range(sizes.gpu_repeats), desc=f"row 4 {name} {path} {kind} {prec}", leave=False):
                        fn(rt)
                    sec = (now(rt) - t0) / sizes.gpu_repeats
                    out[name][f"{path}/{kind}/{prec}"] = {
                        "seconds": sec, "tflops": flops[kind] / sec / 1e12, "tokens_per_s": tokens[kind] / sec,
                        "mfu": flops[kind] / sec / peak_tflops / 1e12 if peak_tflops else None,
                        "peak_mb": peak_mb(rt),
                        "rows": sum(p["input_ids"].shape[0] for p in (sft_packs if kind == "sft" else packs)),
                        "warmup_seconds": t0 - t_warm,
                        "tokens": tokens[kind], "attn": attn}
                    if sizes.gpu_profile:  # where the step's time goes: the ops by self time on the device and host
                        out[name][f"{path}/{kind}/{prec}"]["profile"] = profile(fn, rt)
                    r = out[name][f"{path}/{kind}/{prec}"]
                    print(f"row 4 {name} {path}/{kind}/{prec}: " + json.dumps({k: v for k, v in r.items()
                                                                               if k != "profile"}), flush=True)
                    for table in (r.get("profile", {}).get(k) for k in ("device", "host")):  # into the log too
                        print(table or "", flush=True)
        del model, ref, opt, pi, pi_ref
        if cuda:
            torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------- table, JSON, main


def table(res: dict, sizes: Sizes) -> str:
    """One markdown line per measured setting; the ratio column compares with the row's baseline (tree, B=1)."""
    lines = ["| row | model | setting | work | speed | peak memory | ratio |", "|---|---|---|---|---|---|---|"]
    for key, r in res.get("reflection", {}).items():
        name, layout = key.split("/")
        tree = res["reflection"][f"{name}/tree"]
        setting = layout if layout == "tree" else f"{layout} ({sizes.pair_batch} pairs/forward)"
        if "error" in r or "error" in tree:
            lines.append(f"| 1 reflection | {name} | {setting} | n/a: {r.get('error') or 'tree failed'} | | | |")
            continue
        ratio = "baseline" if layout == "tree" else (
            f"{r['tokens'] / tree['tokens']:.1f}x tokens, {r['seconds'] / tree['seconds']:.1f}x wall / "
            f"{r['cpu'] / tree['cpu']:.1f}x CPU time, {r['step_mb'] / max(tree['step_mb'], 1):.1f}x step memory")
        traj = f"{r['steps']} steps, L={'+'.join(map(str, r['trajectory_tokens']))}"
        note = f"; {r['note']}" if r["note"] else ""
        lines.append(f"| 1 reflection | {name} | {setting} | {r['tokens']:,} tok/step ({traj}) | "
                     f"{r['seconds']:.2f} s/step ({r['cpu']:.2f} CPU s) | {r['peak_mb']:,.0f} MB (step "
                     f"+{r['step_mb']:,.0f}) | {ratio}; loss {r['first_loss']:.4f}{note} |")
    for name, r in res.get("generation", {}).items():
        for k, v in r["rate"].items():
            work = f"{r['prefixes']} prefixes (mean {r['mean_prefix_tokens']:.0f} tok) x <= {sizes.new_tokens}"
            check = f" ({r['cpu_speedup']:.2f}x by CPU time); same outputs as B=1: {r['same_outputs']:.0%}"
            ratio = "baseline" if k == "B=1" else f"{r['speedup']:.2f}x the B=1 rate{check}"
            lines.append(f"| 2 inspection | {name} | {k} | {work} | {v:.2f} actions/s | | {ratio} |")
    for name, r in res.get("evaluation", {}).items():
        for k, m in r["settings"].items():
            if "games_per_min" not in m:
                lines.append(f"| 3 evaluation | {name} | {k} | n/a: {m.get('error', 'the old setting failed')} | | | |")
                continue
            work = f"{r['games']} games x <= {r['max_steps']} turns ({m['turns']} played)"
            ratio = "baseline" if k.startswith("old") else (
                f"{m['speedup']:.2f}x the old rate ({m['cpu_speedup']:.2f}x by the policy process's CPU time); same "
                f"actions as old: {m['same_actions']:.0%}; engine errors {m['errors']}")
            lines.append(f"| 3 evaluation | {name} | {k} | {work} | {m['games_per_min']:.2f} games/min | | {ratio} |")
    for name, m in res.get("gpu", {}).items():
        for key, r in (m.items() if isinstance(m, dict) else []):
            if not isinstance(r, dict):
                continue
            path, kind, prec = key.split("/")
            if "error" in r:
                lines.append(f"| 4 GPU | {name} | {kind} {prec}, {path} path | n/a: {r['error'][:120]} | | | |")
                continue
            mfu = f"MFU {r['mfu']:.1%}" if r["mfu"] is not None else "MFU n/a (pass --peak-tflops)"
            if path != "old" and "seconds" in m.get(f"old/{kind}/{prec}", {}):
                mfu += f"; {m[f'old/{kind}/{prec}']['seconds'] / r['seconds']:.2f}x the old path's speed"
            if path == "compiled" and "seconds" in m.get(f"new/{kind}/{prec}", {}):
                mfu += f", {m[f'new/{kind}/{prec}']['seconds'] / r['seconds']:.2f}x the new path's"
            lines.append(f"| 4 GPU | {name} ({m['params_M']:.0f}M) | {kind} {prec}, {path} path ({r['attn']}, "
                         f"{r['rows']} rows) | {r['tokens']:,} tok/step, {r['tflops']:.3g} TFLOP/s | "
                         f"{r['seconds']:.3f} s/step, {r['tokens_per_s']:,.0f} tok/s | {r['peak_mb']:,.0f} MB | "
                         f"{mfu} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    """Run the chosen rows, print the table, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and the tiny model only (< 2 min)")
    p.add_argument("--gpu", action="store_true", help="also row 4: MFU, bf16 vs fp16+GradScaler (needs CUDA)")
    p.add_argument("--rows", default="1,2,3", help="comma-separated rows to run (4 also runs with --gpu)")
    p.add_argument("--data", default=os.environ.get("ALFWORLD_DATA") or str(ROOT.parent / "shared" / "alfworld"),
                   help="ALFWorld folder with expert/train_planner.json and json_2.1.1/ (default $ALFWORLD_DATA)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="GPU dense bf16 peak, TFLOP/s (0: by GPU name)")
    p.add_argument("--size", action="append", default=[], metavar="FIELD=JSON",
                   help='override a size, e.g. --size pair_batch=4 --size \'quantile={"tiny": 0.5, "135m": 0.25}\'')
    p.add_argument("--out", default="", help="JSON results file (default bench/results-<device>.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one row-1 measurement in a fresh process
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(RESULT + json.dumps((evaluation_child if spec.get("row") == 3 else reflection_child)(spec)), flush=True)
        return None
    sizes, rows = QUICK if args.quick else Sizes(), {int(r) for r in args.rows.split(",") if r}
    games = [Path(args.data) / "json_2.1.1"] if 3 in rows else []  # row 4 reads only the expert trajectories
    for need in [Path(args.data) / "expert" / "train_planner.json", *games]:
        if not need.exists():
            raise SystemExit(f"error: {need} not found: pass --data DIR or export ALFWORLD_DATA (alfworld-download)")
    for kv in args.size:
        k, _, v = kv.partition("=")
        if k not in Sizes.__dataclass_fields__:
            p.error(f"--size {kv}: unknown field {k!r}; expected one of {', '.join(Sizes.__dataclass_fields__)}")
        sizes = replace(sizes, **{k: tuple(json.loads(v)) if k == "models" else json.loads(v)})
    if set(sizes.models) - {"tiny", "135m"}:
        p.error(f"--size models={list(sizes.models)}: expected a list of 'tiny' and/or '135m'")
    device = torch.cuda.get_device_name().lower().replace(" ", "-") if torch.cuda.is_available() else "cpu"
    res: dict = {"device": device, "command": shlex.join(["python", "bench/bench.py", *(argv or sys.argv[1:])]),
                 "sizes": asdict(sizes), "cpus": os.cpu_count(), "torch": torch.__version__,
                 "platform": platform.platform(), "load_before": os.getloadavg()}
    t0 = time.time()
    if 1 in rows:
        res["reflection"] = reflection_rows(sizes, args.data)
    if 3 in rows:
        res["evaluation"] = evaluation_rows(sizes, args.data)
    if 2 in rows:
        rt = runtime()
        for name in sizes.models:
            model, tok = load_model(name, rt)
            model.eval()
            res.setdefault("generation", {})[name] = generation_row(name, model, tok, rt, sizes, args.data)
            del model
    if args.gpu or 4 in rows:
        if not torch.cuda.is_available():
            res["gpu"] = {"skipped": "CUDA is not available: row 4 not measured"}
        else:
            peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), 0)
            res["gpu"] = gpu_rows(sizes, args.data, peak)
    res["load_after"], res["seconds"] = os.getloadavg(), time.time() - t0
    res["table"] = table(res, sizes)
    skipped = res.get("gpu", {}).get("skipped")
    print(f"\n{res['table']}\n\n{device}, {res['cpus']} CPUs, {res['seconds']:.0f} s; 1-min load average before/after"
          f": {res['load_before'][0]:.1f}/{res['load_after'][0]:.1f}" + (f"; row 4: {skipped}" if skipped else ""))
    out = Path(args.out or ROOT / "bench" / f"results-{device}.json")
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"results: {out}")
    return res


if __name__ == "__main__":
    main()
