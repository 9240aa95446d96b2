#!/usr/bin/env bash
# A device call's body while session.sh runs on the host: wait up to SECONDS for the session to
# end, print where it is, and copy what it made to $OUT (the files the device call brings back).
# usage: bash jobs/tools/h200/poll.sh SECONDS
set -u
RESULTS=${RESULTS:-/root/results}
for _ in $(seq 1 "${1:-540}"); do
  grep -qE "all done|FAILED" "$RESULTS/progress.txt" 2>/dev/null && break
  sleep 1
done
cat "$RESULTS/progress.txt" 2>/dev/null
tail -n 6 "$RESULTS/tune.log" "$RESULTS/a.log" "$RESULTS/b.log" 2>/dev/null
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader 2>/dev/null
if [ -n "${OUT:-}" ]; then
  for f in h200-a.json a.log h200-b.json b.log h200-tune.json tune.log mps.txt progress.txt prepare.log nvidia-smi.txt; do
    [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/"
  done
  tar czf "$OUT/engine-logs.tgz" /tmp/bench-a/engine-*.log /tmp/bench-b/engine-*.log "$RESULTS/install.log" 2>/dev/null
fi
true
