#!/usr/bin/env bash
# The GPU measurements of the evaluation-speed and training-speed issues, ready to run on a lent GPU machine after
# ../shared/gpu/README.md's setup (each mode fits one 10-minute call; results and logs go to OUT). The next session's
# three calls, in order: bench/RESULTS.md, "The next GPU session". Calls used so far:
#   call 1: bash .gpu1/setup.sh                                         (carry .gpu1)
#           (row 4 needs only the tokenizer, so it can run in this call: here, `mkdir -p .gputok && tar cJf
#           .gputok/tok.tar.xz -C ~/.cache/stepagent SmolLM2-135M-Instruct/{config.json,generation_config.json,
#           tokenizer.json,tokenizer_config.json,chat_template.jinja}` (0.5 MB, .gputok in .git/info/exclude), carry
#           .gputok too, there unpack it to /root/w/tok and run bench.py with STEPAGENT_CACHE=/root/w/tok)
#   call 2: bash .gpu2/join.sh && . /root/w/env.sh && bash bench/gpu_check.sh eval $OUT     (carry .gpu2)
#   call 3: . /root/w/env.sh && bash bench/gpu_check.sh train $OUT
#   call 4: . /root/w/env.sh && bash bench/gpu_check.sh fsdp $OUT                   (after call 2: the tokenizer)
#   call 5: . /root/w/env.sh && bash bench/gpu_check.sh auto $OUT          (issue 15's GPU branch; repeat to resume)
#   call 6: . /root/w/env.sh && SWEEP_N=100 SWEEP_SEEDS=0,1 bash bench/gpu_check.sh sweep $OUT   (issue 16; repeat)
#   or, for issues 16 and 10 after call 1 (carry .gpu2 and .gputrain, see README; on 2026-11-27, without
#   .gputrain, SWEEP_FLAGS added --train-val 0 to the default flags):
#     bash .gpu2/join.sh && . /root/w/env.sh && SWEEP_N=all SWEEP_SEEDS=0 SWEEP_METHODS=warm SWEEP_TIMEOUT=400 \
#       bash bench/gpu_check.sh sweep $OUT
#     . /root/w/env.sh && timeout 300 bash bench/gpu_check.sh inspect $OUT
# eval:  SFT of the embedded 135M on all expert data (the 94.8% recipe), then inspection of every expert prefix of
#        400 trajectories (timed), then the 134 valid_unseen games at 40 turns (timed; the target is <= 60 s).
# train: bench row 4 for the 135M at 32 trajectories a step (MFU, tokens/s, peak memory; old vs new path; bf16 and
#        fp16 + GradScaler), then the SFT on all expert data with its 32 trajectories a step in one forward, on the
#        old path and on the new one (--tokens-per-batch, FlexAttention block masks; the target is <= 40 s). ROW4=0:
#        the SFT runs only (row 4 ran in the setup call with .gputok). Row 4 also times the new path torch.compile'd
#        (--compile); SFT_PATHS="new compiled" runs the real SFT that way instead of old and new.
# fsdp:  issue 14: a random-init 1.2B Llama trains (SFT, then one implicit cycle) at world size 1 with --dist ddp,
#        --dist fsdp and --dist fsdp --grad-checkpoint, peak memory of each (bench/fsdp_memory.py; ~5 min).
# inspect: the eval mode's inspection timing (default groups, then 64 at a time), with CKPT=dir, the sweep's N = all
#        warm start, or else a 1-epoch SFT on 400 trajectories trained first.
# speed: issues 10 and 11 in one call after a setup call that left row 4's JSON or log in /root/w (bench/RESULTS.md,
#        "The next GPU session"): the SFT of all expert data on row 4's fastest path, the 134 valid_unseen games with
#        and without CUDA graphs, inspection of 400 trajectories, within SPEED_BUDGET seconds
# graphs: --cuda-graphs (the cached policy's decode steps replayed as CUDA graphs): one decode step of 64 rows after
#        1,000 columns (DynamicCache, slot cache, graph), the 134 valid_unseen games with and without it (wall seconds,
#        same actions per game), then inspection of 400 trajectories (tree-decoded: no graphs); CKPT or a checkpoint
#        as inspect's; ~8 minutes at most
# breakdown: bench/eval_breakdown.py on the GPU with that checkpoint (render, prefill, decode, cache bookkeeping,
#        harness; 64 games at once, 40 turns), and one engine alone. In one call after the setup calls:
#        . /root/w/env.sh && bash bench/gpu_check.sh inspect $OUT; bash bench/gpu_check.sh breakdown $OUT
# sweep: issue 16: cells (SWEEP_N x SWEEP_METHODS x SWEEP_SEEDS) of the replication sweep with the README's
#        GPU settings (SWEEP_FLAGS replaces them), stopped at 9 min (SWEEP_TIMEOUT s); every finished cell
#        (cell.json, config, metrics, eval JSONL), each warm start's metrics and the report come back. Cells in
#        /root/w/sweep resume on the next call while the machine is held, and a cell asked for a new split
#        (SWEEP_SPLITS) plays it with its kept checkpoint.
# Every mode's OUT also comes back whole as OUT/all.tar.gz (the link returns 8 files, 2 folders down).
set -uo pipefail
mode=${1:?usage: bench/gpu_check.sh eval|train|speed|fsdp|auto|sweep|inspect|breakdown|graphs OUT}
out=${2:?usage: bench/gpu_check.sh MODE OUT}
mkdir -p "$out"
quiet() { tr '\r' '\n' | grep -v 'it/s\]'; }
sft=(--preset none --epochs 2 --lr 1e-4 --batch-size 8 --grad-accum 4 --cycles 0)
inspect_400() {  # inspection of every expert prefix of 400 trajectories with checkpoint $1, timed (target <= 30 s):
  # the default groups (inspect_group: what GPU memory holds), then 64 trajectories at a time (--gen-batch-size 64)
  timeout "${INSPECT_TIMEOUT:-600}" python - "$1" >> "$out/inspect.json" 2>> "$out/inspect.log" <<'PY'
import contextlib, json, os, sys, time
import data, stepagent as sa
with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON lines
    rt = sa.setup_runtime(sa.Config())
    model, tok = sa.load_policy(sys.argv[1], rt)
encs, _ = data.encode_dataset(tok, data.load_trajectories(data.default_expert_path("alfworld"))[:400], 2048)
groups, branches = [], sa.PrefixCachedPolicy.branches  # the rows of each group inspect_tree decodes
sa.PrefixCachedPolicy.branches = lambda self, trunks, *a: groups.append(len(trunks)) or branches(self, trunks, *a)
for gen_batch_size in map(int, os.environ.get("INSPECT_GEN", "0 64").split()):  # 0: inspect_group's groups
    cfg, groups[:] = sa.Config(temperature=1.0, gen_batch_size=gen_batch_size), []
    t0 = time.time()
    items = sa.inspect(cfg, rt, model, tok, encs, cycle=1)
    print(json.dumps({"trajectories": len(encs), "prefixes": len(items), "seconds": time.time() - t0,
                      "gen_batch_size": gen_batch_size, "groups": groups,
                      "agreement": sum(i.agree for i in items) / len(items)}), flush=True)
PY
}
checkpoint() {  # CKPT=dir, or the sweep's N = all warm start, or the train mode's SFT of all expert data, or else a
  # 1-epoch SFT on 400 trajectories (~30 s)
  local ckpt=${CKPT:-} d
  for d in /root/w/sweep/nall-s0-warmstart /root/w/runs/sft-{new,compiled,old}; do  # each run's last checkpoint
    [ -n "$ckpt" ] || ckpt=$(ls -d $d/ckpt-* 2>/dev/null | tail -1)
  done
  if [ -z "$ckpt" ]; then
    ls -d /root/w/runs/sft400/ckpt-* > /dev/null 2>&1 || python stepagent.py "${sft[@]}" --epochs 1 \
      --max-trajectories 400 --out /root/w/runs/sft400 --eval-games 0 2>&1 | quiet > "$out/sft400.log"
    ckpt=$(ls -d /root/w/runs/sft400/ckpt-* | tail -1)
  fi
  echo "$ckpt"
}
same_actions() {  # the games played with and without --cuda-graphs: how many played the same actions, and wins
  python - "$out" <<'PY'
import json, sys
runs = [{json.loads(x)["game"]: json.loads(x) for x in open(f"{sys.argv[1]}/eval-{g}.jsonl")}
        for g in ("no-cuda-graphs", "cuda-graphs")]
same = [g for g in runs[0] if g in runs[1] and [s["action"] for s in runs[0][g]["transcript"]]
        == [s["action"] for s in runs[1][g]["transcript"]]]
won = [sum(r["won"] for r in x.values()) for x in runs]
print(json.dumps({"games": len(runs[0]), "same_actions": len(same), "won": won}))
PY
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/device.txt"
if [ "$mode" = eval ]; then
  run=/root/w/runs/sft
  /usr/bin/time -v python stepagent.py "${sft[@]}" --out $run --eval-games -1 --eval-splits valid_unseen \
    --max-steps 40 2>&1 | quiet > "$out/sft-eval.log"
  cp $run/metrics.jsonl $run/eval/final/valid_unseen.jsonl $run/eval/final/summary.json "$out/"
  inspect_400 "$(ls -d $run/ckpt-* | tail -1)"
elif [ "$mode" = train ]; then  # what the 2026-11-27 row 4 left open (bench/RESULTS.md): more tokens per forward
  [ "${ROW4:-1}" = 0 ] || python bench/bench.py --rows 4 --size 'gpu_models=["135m"]' --size gpu_trajectories=32 \
    --size gpu_tokens_per_batch=65536 --out "$out/results-gpu-row4-135m-32traj.json" 2>&1 | quiet > "$out/row4.log"
  one=(--batch-size 32 --grad-accum 1)  # the same 32 trajectories per optimizer step, in one forward instead of 4
  for path in ${SFT_PATHS:-old new}; do  # SFT_PATHS="new compiled": the new path, then with --compile
    more=(); [ $path != old ] && more=(--tokens-per-batch 32768 --attn flex_attention)
    [ $path = compiled ] && more+=(--compile)
    timeout 200 /usr/bin/time -v python stepagent.py "${sft[@]}" "${one[@]}" "${more[@]}" --out /root/w/runs/sft-$path \
      --eval-games 0 2>&1 | quiet > "$out/sft-$path.log"
    cp /root/w/runs/sft-$path/metrics.jsonl "$out/sft-$path-metrics.jsonl"
  done
elif [ "$mode" = speed ]; then  # issues 10 and 11 in one call after the setup call, which ran row 4 for the 135M at 32
  # trajectories into /root/w/row4.json (or its log, /root/w/row4.log): the SFT of all expert data (32 trajectories
  # per forward) on the path row 4 found fastest, then the 134 valid_unseen games with --cuda-graphs, inspection of
  # 400 trajectories, the games
  # without --cuda-graphs (same actions expected); each part under its own timeout, the most wanted first, and all
  # of them within SPEED_BUDGET seconds (default 500), so that the packing at the end runs before the call's limit
  cap() { local left=$(( ${SPEED_BUDGET:-500} - SECONDS )); echo $(( left < $1 ? left : $1 )); }
  path=$(python - <<'PY'
import json, os, re
r = json.load(open("/root/w/row4.json"))["gpu"]["135m"] if os.path.exists("/root/w/row4.json") else {}
if not r and os.path.exists("/root/w/row4.log"):  # row 4 stopped by its timeout: the settings it printed
    r = {m[1]: json.loads(m[2]) for m in re.finditer(r"^row 4 135m (\S+): (\{.*\})$", open("/root/w/row4.log").read(),
                                                    re.M)}
t = {p: r[f"{p}/sft/bf16"]["seconds"] for p in ("old", "new", "compiled") if "seconds" in r.get(f"{p}/sft/bf16", {})}
print(min(t, key=t.get) if t else "new")
PY
)
  for p in $path old; do  # the old path again only if the chosen one left no checkpoint
    ls -d /root/w/runs/sft-*/ckpt-* > /dev/null 2>&1 && break
    [ "$(cap 180)" -gt 60 ] || break
    more=(); [ "$p" != old ] && more=(--tokens-per-batch 32768 --attn flex_attention)
    [ "$p" = compiled ] && more+=(--compile)
    start=$SECONDS
    timeout "$(cap 180)" python stepagent.py "${sft[@]}" --batch-size 32 --grad-accum 1 "${more[@]}" \
      --heldout-steps 0 --eval-games 0 --out /root/w/runs/sft-$p 2>&1 | quiet > "$out/sft-$p.log"
    echo "{\"part\": \"sft\", \"path\": \"$p\", \"seconds\": $((SECONDS - start))}" >> "$out/speed.json"
    cp /root/w/runs/sft-$p/metrics.jsonl "$out/sft-$p-metrics.jsonl"
  done
  ck=$(checkpoint)
  for g in cuda-graphs inspect no-cuda-graphs; do
    start=$SECONDS; [ "$(cap 100)" -gt 20 ] || break
    if [ $g = inspect ]; then
      INSPECT_GEN=0 INSPECT_TIMEOUT=$(cap 80) inspect_400 "$ck"; continue
    fi
    timeout "$(cap 120)" python stepagent.py --preset none --model "$ck" --epochs 0 --cycles 0 \
      --heldout-steps 0 --eval-games -1 --eval-splits valid_unseen --max-steps 40 --$g --out /root/w/runs/eval-$g 2>&1 |
      quiet > "$out/eval-$g.log"
    echo "{\"part\": \"$g\", \"seconds\": $((SECONDS - start))}" >> "$out/speed.json"
    cp /root/w/runs/eval-$g/eval/final/valid_unseen.jsonl "$out/eval-$g.jsonl"
  done
  [ -e "$out/eval-no-cuda-graphs.jsonl" ] && same_actions >> "$out/speed.json"
elif [ "$mode" = fsdp ]; then  # the 4.8 GB model and the checkpoints stay in /root/w; results and logs come back
  python bench/fsdp_memory.py --out /root/w/fsdp 2>&1 | quiet > "$out/fsdp.log"
  cp /root/w/fsdp/fsdp.json /root/w/fsdp/*.log "$out/"
  for m in ddp fsdp fsdp+ckpt; do cp /root/w/fsdp/run-$m/metrics.jsonl "$out/metrics-$m.jsonl"; done
elif [ "$mode" = inspect ]; then
  inspect_400 "$(checkpoint)"
elif [ "$mode" = breakdown ]; then  # where a GPU evaluation turn goes: 64 valid_seen games at once, 40 turns
  for g in "" --cuda-graphs; do  # shellcheck disable=SC2086  (an empty flag is no word)
    python bench/eval_breakdown.py --checkpoint "$(checkpoint)" --dtype bf16 --games 64 --batch 64 --max-steps 40 \
      --new-tokens 48 $g 2>&1 | quiet >> "$out/breakdown.log"
  done
  python bench/eval_breakdown.py --engine >> "$out/breakdown.log" 2>&1
elif [ "$mode" = graphs ]; then  # --cuda-graphs: a decode step alone, then the 134 valid_unseen games at 40 turns
  # with and without it (same checkpoint, greedy: the same actions expected), then inspection of 400 trajectories
  python bench/eval_breakdown.py --model 135m --dtype bf16 --decode 64 1000 > "$out/decode.log" 2>&1
  ck=$(checkpoint)
  for g in cuda-graphs no-cuda-graphs; do  # the new path first: a failed capture shows at once
    rm -rf /root/w/runs/eval-$g; start=$SECONDS  # a second call times all games again, not the rest
    timeout 150 python stepagent.py --preset none --model "$ck" --epochs 0 --cycles 0 --heldout-steps 0 --eval-games -1 \
      --eval-splits valid_unseen --max-steps 40 --$g --out /root/w/runs/eval-$g 2>&1 | quiet > "$out/eval-$g.log"
    echo "{\"mode\": \"$g\", \"seconds\": $((SECONDS - start))}" >> "$out/graphs.json"
    cp /root/w/runs/eval-$g/eval/final/valid_unseen.jsonl "$out/eval-$g.jsonl"
  done
  same_actions >> "$out/graphs.json"
  INSPECT_TIMEOUT=100 inspect_400 "$ck"
elif [ "$mode" = auto ]; then  # issue 15: the README's main command on a GPU (--preset auto = gpu), end to end
  run=/root/w/runs/auto; again=$([ -e $run/metrics.jsonl ] && echo --resume)  # past one call: run the mode again
  timeout 570 /usr/bin/time -v python stepagent.py --env alfworld --out $run $again 2>&1 | quiet > "$out/auto.log"
  cp $run/metrics.jsonl "$out/auto-metrics.jsonl"; cp -r $run/eval "$out/auto-eval"
elif [ "$mode" = sweep ]; then
  sw=/root/w/sweep
  # --train-val (default 120 held-out train games) needs ALFWorld's train games: carried as .gputrain/ (README)
  [ -e .gputrain/train_games.tar.xz ] && cp -n .gputrain/train_games.tar.xz "${ALFWORLD_DATA:?. /root/w/env.sh first}/"
  # the cycle settings chosen on held-out train games on CPU (README, "How the cycle settings were chosen");
  # SWEEP_SPLITS=train-val plays those games to check them at GPU scale before the valid splits
  flags=${SWEEP_FLAGS:---preset none --epochs 2 --lr 1e-4 --batch-size 8 --grad-accum 4 --cycles 2 --heldout-steps 64 \
    --max-steps 40 --reflect-lr 1e-5 --reflect-epochs 2 --samples-per-step 2 --steps-per-trajectory 2 --sft-weight 1}
  # shellcheck disable=SC2086  (the flags are words)
  timeout "${SWEEP_TIMEOUT:-540}" python bench/sweep.py run --out $sw --n "${SWEEP_N:-100}" \
    --seeds "${SWEEP_SEEDS:-0,1}" --methods "${SWEEP_METHODS:-warm,sft,implicit,inverse}" \
    --splits "${SWEEP_SPLITS:-valid_unseen}" --keep-checkpoints $flags 2>&1 | quiet > "$out/sweep.log"
  for cell in "$sw"/*/; do
    [ -e "$cell/cell.json" ] || continue
    dest="$out/sweep/$(basename "$cell")"; mkdir -p "$dest"
    cp "$cell"/cell.json "$cell"/config.json "$cell"/metrics.jsonl "$dest/"; cp -r "$cell/eval" "$dest/"
  done
  for ws in "$sw"/*-warmstart/; do  # the SFT each (N, seed) starts from: its steps, tokens and seconds
    [ -e "$ws/warmstart.json" ] || continue
    dest="$out/sweep/$(basename "$ws")"; mkdir -p "$dest"; cp "$ws"/warmstart.json "$ws"/metrics.jsonl "$dest/"
  done
  python bench/sweep.py report "$sw" --md "$out/sweep.md" --plot "$out/sweep.png" > "$out/report.log" 2>&1
else
  echo "error: mode $mode: expected eval, train, speed, fsdp, auto, sweep, inspect, breakdown or graphs"; exit 2
fi
# the device link returns at most 8 files, at most 2 folders down (../.library/device/README.md): everything also goes
# into one archive, folders leave OUT, and past 8 files only the archive, device.txt and the reports stay
tar czf /tmp/all.tar.gz -C "$out" . && mv /tmp/all.tar.gz "$out/all.tar.gz"
find "$out" -mindepth 1 -type d -prune -exec rm -rf {} +
if [ "$(find "$out" -maxdepth 1 -type f | wc -l)" -gt 8 ]; then
  find "$out" -maxdepth 1 -type f ! -name all.tar.gz ! -name device.txt ! -name '*.md' ! -name '*.json' -delete
fi
tail -n 3 "$out"/*.log 2>/dev/null; ls "$out"
