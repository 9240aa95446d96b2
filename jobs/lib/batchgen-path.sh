# shellcheck shell=bash
# Sourced by the job scripts.

# The repository this file is in.
batchgen_repo() {
  (cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
}

# The batchgen executable to run: $BATCHGEN when set, else the repository's .venv, else
# `batchgen` on PATH.
batchgen_path() {
  local repo
  repo=$(batchgen_repo)
  if [[ -n ${BATCHGEN:-} ]]; then
    printf '%s\n' "$BATCHGEN"
  elif [[ -x $repo/.venv/bin/batchgen ]]; then
    printf '%s\n' "$repo/.venv/bin/batchgen"
  else
    printf 'batchgen\n'
  fi
}
