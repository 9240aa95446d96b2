#!/usr/bin/env bash
# batchgen under torchrun: every process torchrun starts is one rank (RANK of WORLD_SIZE), and
# keeps GPU LOCAL_RANK of its node (LOCAL_RANK's --tensor-parallel-size consecutive GPUs).
#
#   jobs/torchrun/node.sh CONFIG [batchgen run flags...]
#
# One node, every GPU: as is (torchrun's --nproc-per-node=gpu). On one node,
# `batchgen run --data-parallel auto` does the same without torchrun; this file is for sites
# that launch everything with torchrun, and for several nodes: run it on each node with NNODES,
# NODE_RANK and MASTER_ADDR set, and the ranks are NODE_RANK * NPROC_PER_NODE + LOCAL_RANK of
# NNODES * NPROC_PER_NODE. batchgen uses no torch.distributed; torchrun only numbers the
# processes and passes signals on (a SIGTERM to torchrun reaches every rank, which commits and
# exits 75; torchrun itself then exits non-zero: rerun the same command to resume).
#
# torchrun sets OMP_NUM_THREADS=1 in each process unless it is set (it matters on CPU only).
#
# Environment: NPROC_PER_NODE [default: gpu, i.e. one per visible GPU], NNODES [1],
# NODE_RANK [0], MASTER_ADDR [127.0.0.1], MASTER_PORT [29500], BATCHGEN (the executable)
# [default: .venv/bin/batchgen of this repository, else `batchgen` on PATH], TORCHRUN (the
# torchrun executable) [default: the one beside BATCHGEN, else this repository's
# .venv/bin/torchrun, else `torchrun` on PATH].
set -uo pipefail

if (($# < 1)) || [[ $1 == -* ]]; then
  echo "usage: $0 CONFIG [batchgen run flags...]" >&2
  exit 2
fi
config=$1
shift

# shellcheck source=jobs/lib/batchgen-path.sh disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/../lib/batchgen-path.sh"
batchgen=$(batchgen_path)
torchrun=${TORCHRUN:-$(dirname "$(command -v "$batchgen" || echo .)")/torchrun}
[[ -x $torchrun ]] || torchrun=$(batchgen_repo)/.venv/bin/torchrun
[[ -x $torchrun ]] || torchrun=torchrun

exec "$torchrun" --nnodes="${NNODES:-1}" --node-rank="${NODE_RANK:-0}" \
  --master-addr="${MASTER_ADDR:-127.0.0.1}" --master-port="${MASTER_PORT:-29500}" \
  --nproc-per-node="${NPROC_PER_NODE:-gpu}" --no-python \
  "$batchgen" run --config "$config" "$@"
