#!/usr/bin/env bash
# A device call's body that starts the GPU session: copy the parts this call carries (the last
# wheel part, .gpu/install.sh and .gpu/models) into the staging folder, copy the checkout to
# /root/w, and start session.sh there in a process session of its own (setsid), so it outlives
# this call; later calls poll it with poll.sh. Settings for session.sh pass through the
# environment; SKIP_A=1 skips its bench (a).
# usage (in the device call): [SKIP_A=1] [TUNE_ARGS=...] bash jobs/tools/h200/start.sh CARRIED...
# The 2026-12-07 tune (docs/benchmarks.md): PROMPTS=4096 MAXTOK=256 SKIP_A=1
#   TUNE_ARGS="--sample 2048 --try replicas_per_gpu=2 --try replicas_per_gpu=3
#   --allow-output-changes --verify 5 --budget-seconds 780" bash jobs/tools/h200/start.sh
#   .gpu/part06 .gpu/install.sh .gpu/models
# The 2026-12-07 third session's benches (raw, defaults and 3 replicas; then CUDA graphs to 1,024):
#   PROMPTS=4096 MAXTOK=256 REPLICAS=1,3 BUDGET_A=820 BUDGET_B=420
#   B_ARGS="--raw-defaults --engine-arg max_cudagraph_capture_size=1024" bash jobs/tools/h200/start.sh
#   .gpu/part06 .gpu/install.sh .gpu/models
# The 2026-12-08 llama-8b-shape session (one engine, whole GPU: (a) vLLM's defaults; (b) an FP8 KV
#   cache, lost when the host was taken back): MODEL=/root/models/llama-8b-shape EOS= PROMPTS=2048
#   MINTOK=256 MAXTOK=256 EXTRA="--engine-arg load_format=dummy --min-prompt-tokens 64
#   --max-prompt-tokens 512 --max-model-len 4096" A_ARGS=" " BUDGET_A=540
#   B_ARGS="--engine-arg kv_cache_dtype=fp8" BUDGET_B=480 bash jobs/tools/h200/start.sh
#   .gpu/part06 .gpu/install.sh .gpu/models
# Next, per-step traces (#27's profile; `--trace-steps`, docs/benchmarks.md): the small model's
#   chat job, one engine and three replicas, one round and the traced passes: PROMPTS=4096
#   MAXTOK=256 A_ARGS="--replicas-per-gpu 1,3 --rounds 1 --trace-steps 64" BUDGET_A=300 bash
#   jobs/tools/h200/start.sh .gpu/part06 .gpu/install.sh .gpu/models; the 8B shape: the
#   2026-12-08 settings above with A_ARGS="--rounds 1 --trace-steps 32" and no B_ARGS.
set -u
STAGE=${STAGE:-/root/gpu-stage}
RESULTS=${RESULTS:-/root/results}
mkdir -p "$STAGE" "$RESULTS"
cp -r "$@" "$STAGE/" || exit 1
ls -l "$STAGE"
rm -rf /root/w && mkdir -p /root/w && cp -r pipeline jobs data pyproject.toml /root/w/ || exit 1
[ -n "${SKIP_A:-}" ] && touch "$RESULTS/skip-a"
export INSTALL="$STAGE/install.sh" STAGE RESULTS
setsid nohup bash /root/w/jobs/tools/h200/session.sh /root/w > "$RESULTS/session.out" 2>&1 < /dev/null &
sleep 20
cat "$RESULTS/session.out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nproc
