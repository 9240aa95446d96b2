# shellcheck shell=bash
# Sourced by the job scripts: the batchgen executable to run. $BATCHGEN when set, else the
# .venv of the repository this file is in, else `batchgen` on PATH.
batchgen_path() {
  local repo
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  if [[ -n ${BATCHGEN:-} ]]; then
    printf '%s\n' "$BATCHGEN"
  elif [[ -x $repo/.venv/bin/batchgen ]]; then
    printf '%s\n' "$repo/.venv/bin/batchgen"
  else
    printf 'batchgen\n'
  fi
}
