"""Peak memory of FSDP2 against the replica every DDP rank holds, at world size 1 (issue 14).

    python bench/fsdp_memory.py --out OUT            # GPU: a random-init 1.2B Llama, bf16, --max-length 4096
    python bench/fsdp_memory.py --out OUT --tiny     # CPU smoke test: a 2-layer, 64-wide Llama (minutes)

Each mode runs stepagent.main in a fresh process: SFT on real ALFWorld expert trajectories (batch 1 x grad-accum 2,
5 steps, a checkpoint after step 4 with the optimizer state) and one implicit cycle (π_ref, inspection, reflection),
and records the peak memory (CUDA: max_memory_allocated; CPU: max RSS) and seconds per SFT step:
    ddp        --dist ddp: at world size 1 no wrapper, so the replica each DDP rank holds (DDP's gradient buckets,
               4 more bytes per parameter, come on top with several ranks)
    fsdp       --dist fsdp: FSDP2 at world size 1 (bf16 params for compute, fp32 master weights and AdamW state)
    fsdp+ckpt  the same with --grad-checkpoint
At world size W, FSDP divides the parameter, gradient and optimizer parts of its peak by W; DDP does not.
Finally the fsdp run's last checkpoint is loaded with plain AutoModelForCausalLM.from_pretrained. Needs the embedded
tokenizer (a first run of stepagent.py, or bench/gpu_check.sh's call 2) and $ALFWORLD_DATA. Results: OUT/fsdp.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODES = {"ddp": ["--dist", "ddp"], "fsdp": ["--dist", "fsdp"], "fsdp+ckpt": ["--dist", "fsdp", "--grad-checkpoint"]}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
BIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
           num_key_value_heads=4)  # TinyLlama-1.1B's shape, untied embeddings over SmolLM2's 49k vocabulary: 1.2B


def random_model(out: Path, tiny: bool) -> Path:
    """A random-init Llama saved as a local checkpoint (no download), with the embedded model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import stepagent as sa

    path = out / ("model-tiny" if tiny else "model-1b")
    if (path / "config.json").exists():
        return path
    tok = AutoTokenizer.from_pretrained(sa.embedded_checkpoint())
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=None,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **(TINY if tiny else BIG))
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def one_mode(mode: str, model: Path, out: Path, tiny: bool) -> dict:
    """In this (fresh) process: stepagent.main for one mode, then its peak memory and seconds per SFT step."""
    import torch

    import stepagent as sa

    run = out / f"run-{mode}"
    argv = ["--model", str(model), "--out", str(run), "--preset", "none", "--max-trajectories", "12", "--epochs", "1",
            "--batch-size", "1", "--grad-accum", "2", "--save-every", "4", "--max-length", "1024" if tiny else "4096",
            "--cycles", "1", "--inspect-trajectories", "4", "--steps-per-trajectory", "2", "--reflect-batch", "2",
            "--heldout-steps", "4", "--max-new-tokens", "16", "--eval-games", "0", *MODES[mode]]
    t0 = time.time()
    sa.main(argv)
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    sft = [ln for ln in lines if ln["stage"] == "sft"]
    cuda = torch.cuda.is_available()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "peak_GiB": round(peak / 2**30, 2), "peak_is": "max_memory_allocated" if cuda else "max RSS (process)",
            "sft_steps": len(sft),
            "s_per_sft_step": round((sft[-1]["time"] - sft[0]["time"]) / max(1, len(sft) - 1), 3),
            "sft_loss": [round(ln["sft/loss"], 4) for ln in sft], "seconds": round(time.time() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model (a CPU smoke test)")
    p.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)  # internal: one mode in this process
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = random_model(out, args.tiny)
    if args.mode:
        print("RESULT " + json.dumps(one_mode(args.mode, model, out, args.tiny)))
        return
    rows = []
    for mode in MODES:  # one process each: peak memory counters start at zero
        proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--mode", mode] + ["--tiny"] * args.tiny,
                              capture_output=True, text=True, cwd=ROOT)
        (out / f"{mode}.log").write_text(proc.stdout + proc.stderr)
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        rows.append(json.loads(found[-1][7:]) if found else {"mode": mode, "error": proc.stderr[-2000:]})
        print(json.dumps(rows[-1]), flush=True)
    from transformers import AutoModelForCausalLM

    ckpt = sorted((out / "run-fsdp").glob("ckpt-[0-9]*"))[-1]
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)  # rank 0's gathered state dict is a plain checkpoint
    summary = {"rows": rows, "fsdp_checkpoint": str(ckpt), "from_pretrained_params": loaded.num_parameters()}
    (out / "fsdp.json").write_text(json.dumps(summary, indent=2))
    print(f"loaded {ckpt} with from_pretrained: {loaded.num_parameters():,} parameters; wrote {out / 'fsdp.json'}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
