#!/usr/bin/env bash
# Nightly batchgen run into a dated folder, after finishing the last unfinished earlier one.
#
#   jobs/cron/nightly.sh CONFIG [batchgen run flags...]
#
# Each night:
#   1. takes a lock, so a run still going from the night before makes this one skip (exit 3)
#      instead of running beside it;
#   2. finds the newest earlier dated folder under NIGHTLY_ROOT that is not complete (a run
#      interrupted by a reboot, a failure since fixed) and resumes it with the same command;
#   3. runs today's job into NIGHTLY_ROOT/YYYY-MM-DD (`--output` here overrides the config's
#      `output` key; everything else comes from CONFIG and the extra flags), with
#      `--reuse` of the newest complete earlier folder: rows whose identical request was
#      answered there are copied instead of generated, so a grown dataset costs only its new
#      and changed rows (docs/reuse.md).
# Every run uses all GPUs of this machine: `--data-parallel auto` (one rank per GPU, or per
# --tensor-parallel-size GPUs; one process on a machine without GPUs). A folder begun on
# another GPU count is refused (exit 1, naming the rank layout): finish it by hand as the
# docs/ranks.md says, or set NIGHTLY_DATA_PARALLEL.
# Everything goes to the log file; on a nonzero exit one line also goes to stderr, so cron mails
# it to MAILTO. Relative paths (CONFIG, NIGHTLY_ROOT, paths inside CONFIG) start at the folder
# the script is run from: cd to the repository first, as crontab.example does.
#
# Exit codes, for alerting:
#   0   today's run finished (and the earlier one it resumed, if any)
#   1   a run failed (bad input, engine crash, full disk, changed settings): see the log;
#       rerunning resumes it once the cause is fixed, and the next night retries it anyway
#   2   bad usage or a bad config (batchgen's usage errors too)
#   3   skipped: another nightly run still holds the lock
#   75  interrupted by a signal (shutdown, kill); committed work is kept and the next run
#       resumes it
#
# Environment:
#   NIGHTLY_ROOT  parent of the dated folders [default: out/nightly]
#   NIGHTLY_LOG   log file, appended to [default: NIGHTLY_ROOT/nightly.log]
#   NIGHTLY_LOCK  lock file [default: NIGHTLY_ROOT/.nightly.lock]
#   NIGHTLY_DATE  today's folder name [default: today as YYYY-MM-DD]; for backfills
#   NIGHTLY_REUSE  1: pass the newest complete earlier folder as --reuse [default: 1]; 0: do not
#   NIGHTLY_DATA_PARALLEL  batchgen's --data-parallel [default: auto]; empty: leave it out
#                 (for extra flags that set the ranks themselves, --num-ranks/--rank)
#   BATCHGEN      the batchgen executable [default: .venv/bin/batchgen of this repository, else
#                 `batchgen` on PATH]
set -uo pipefail

EXIT_OK=0
EXIT_FAILED=1
EXIT_USAGE=2
EXIT_LOCKED=3
EXIT_INTERRUPTED=75

if (($# < 1)) || [[ $1 == -* ]]; then
  echo "usage: $0 CONFIG [batchgen run flags...]" >&2
  exit "$EXIT_USAGE"
fi
config=$1
shift
if [[ ! -r $config ]]; then
  echo "nightly.sh: config $config: no such readable file (relative paths start at $PWD)" >&2
  exit "$EXIT_USAGE"
fi

root=${NIGHTLY_ROOT:-out/nightly}
today=${NIGHTLY_DATE:-$(date +%F)}
if [[ ! $today =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]]; then
  echo "nightly.sh: NIGHTLY_DATE=$today: expected YYYY-MM-DD" >&2
  exit "$EXIT_USAGE"
fi
log_file=${NIGHTLY_LOG:-$root/nightly.log}
data_parallel=()
if [[ -n ${NIGHTLY_DATA_PARALLEL-auto} ]]; then
  data_parallel=(--data-parallel "${NIGHTLY_DATA_PARALLEL-auto}")
fi
lock_file=${NIGHTLY_LOCK:-$root/.nightly.lock}

# shellcheck source=jobs/lib/batchgen-path.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/../lib/batchgen-path.sh"
batchgen=$(batchgen_path)
if ! command -v "$batchgen" >/dev/null; then
  echo "nightly.sh: batchgen executable $batchgen not found; set BATCHGEN or run 'make install'" >&2
  exit "$EXIT_USAGE"
fi

if ! mkdir -p "$root" "$(dirname "$log_file")" "$(dirname "$lock_file")"; then
  echo "nightly.sh: cannot create $root or the log/lock folders" >&2
  exit "$EXIT_FAILED"
fi
exec 3>&2 # cron's stderr, for the one-line alert
exec >>"$log_file" 2>&1

note() { echo "[nightly $(date '+%F %T')] $*"; }

finish() {
  local rc=$1
  note "exit $rc"
  if ((rc != EXIT_OK)); then
    echo "nightly.sh $config for $today: exit $rc ($2); log: $log_file" >&3
  fi
  exit "$rc"
}

# The lock is inherited by batchgen, so it stays held until batchgen is gone even if this
# script is killed first.
exec 9>>"$lock_file"
if ! flock -n 9; then
  note "another nightly run holds $lock_file; skipping $today"
  finish "$EXIT_LOCKED" "skipped: another nightly run is still going"
fi

child=""
stop_signal=""
# shellcheck disable=SC2317  # called by the traps below
forward() {
  stop_signal=${stop_signal:-$1}
  note "SIG$1 received; passing it on to batchgen (pid ${child:-none})"
  [[ -z $child ]] || kill -s "$1" "$child" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward HUP' HUP

# Runs batchgen into one dated folder in the background (so the traps can run) and returns its
# exit code.
run_into() {
  local out=$1 rc
  shift
  note "$batchgen run --config $config --output $out${data_parallel[*]:+ ${data_parallel[*]}}${*:+ $*}"
  "$batchgen" run --config "$config" --output "$out" "${data_parallel[@]}" "$@" &
  child=$!
  # `wait` returns early when a trapped signal arrives; the shell keeps the real status.
  while kill -0 "$child" 2>/dev/null; do wait "$child"; done
  wait "$child"
  rc=$?
  child=""
  return "$rc"
}

# An older batchgen has no --data-parallel: it runs one process, as it always did.
if ((${#data_parallel[@]})) && [[ $("$batchgen" run --help 2>/dev/null) != *--data-parallel* ]]; then
  data_parallel=()
fi

# Whether every rank of an output folder has finished: `batchgen status` where this batchgen
# has it (exit 0 = all finished), else the rank manifests themselves.
has_status=""
if "$batchgen" status --help >/dev/null 2>&1; then
  has_status=1
fi
is_complete() {
  local out=$1 python
  if [[ -n $has_status ]]; then
    "$batchgen" status "$out" >/dev/null 2>&1
    return
  fi
  python=$(dirname "$(command -v "$batchgen")")/python
  [[ -x $python ]] || python=python3
  "$python" - "$out" <<'PY'
import json, sys
from pathlib import Path

state = Path(sys.argv[1], ".batchgen")
# rank-*.json: an earlier batchgen's flat manifests; rank-*/manifest-*.json: each rank's newest
# manifest generation (a rank's shards committed since are in its commit records; a finished
# rank's last generation lists them all).
paths = [*state.glob("rank-*.json")]
paths += [max(d.glob("manifest-*.json")) for d in state.glob("rank-*/") if any(d.glob("manifest-*.json"))]
manifests = [json.loads(p.read_text()) for p in paths]
finished = {m["rank"] for m in manifests if m.get("status") == "finished"}
num_ranks = {m.get("num_ranks", m.get("num_shards")) for m in manifests}
sys.exit(0 if len(num_ranks) == 1 and finished == set(range(num_ranks.pop())) else 1)
PY
}

stop_if_signalled() {
  [[ -z $stop_signal ]] || finish "$EXIT_INTERRUPTED" "stopped by SIG$stop_signal before $1"
}

note "nightly run for $today, config $config, into $root/$today"

failed=""
earlier=""
mapfile -t dated < <(find "$root" -mindepth 1 -maxdepth 1 -type d \
  -name '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]' | sort -r)
for dir in "${dated[@]}"; do
  if [[ $(basename "$dir") < $today ]] && ! is_complete "$dir"; then
    earlier=$dir
    break
  fi
done
if [[ -n $earlier ]]; then
  stop_if_signalled "resuming $earlier"
  note "resuming the unfinished earlier run $earlier first"
  run_into "$earlier" "$@"
  rc=$?
  if ((rc == EXIT_INTERRUPTED)); then
    finish "$rc" "interrupted${stop_signal:+ by SIG$stop_signal} while resuming $earlier; the next run resumes it"
  elif ((rc != EXIT_OK)); then
    note "resuming $earlier failed (exit $rc); going on with $today"
    failed="resuming $earlier failed with exit $rc"
  fi
fi

# The newest earlier folder that is complete (after the resume above), for --reuse; an older
# batchgen without --reuse generates everything, as it always did.
reuse=()
case ${NIGHTLY_REUSE:-1} in
  1)
    if [[ $("$batchgen" run --help 2>/dev/null) == *--reuse* ]]; then
      for dir in "${dated[@]}"; do
        if [[ $(basename "$dir") < $today ]] && is_complete "$dir"; then
          reuse=(--reuse "$dir")
          break
        fi
      done
      note "reusing the outputs of ${reuse[1]:-no earlier folder (none is complete)}"
    fi
    ;;
  0) note "NIGHTLY_REUSE=0: generating every row" ;;
  *) note "NIGHTLY_REUSE=$NIGHTLY_REUSE: expected 1 or 0; generating every row" ;;
esac

stop_if_signalled "today's run"
run_into "$root/$today" "${reuse[@]}" "$@"
rc=$?
case $rc in
  "$EXIT_OK") ;;
  "$EXIT_INTERRUPTED") finish "$rc" "interrupted${stop_signal:+ by SIG$stop_signal}; the next run resumes it" ;;
  "$EXIT_USAGE") finish "$rc" "batchgen rejected the command line or the config" ;;
  *) finish "$EXIT_FAILED" "batchgen failed with exit $rc" ;;
esac
if [[ -n $failed ]]; then
  finish "$EXIT_FAILED" "$failed"
fi
if [[ -n $has_status ]]; then
  "$batchgen" status "$root/$today" || true
fi
finish "$EXIT_OK" "finished"
