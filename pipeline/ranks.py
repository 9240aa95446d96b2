"""Which rank of a multi-process run this process is: from --num-ranks/--rank, else from
the launcher that started it.

The flags always win. Without them, the launchers' variables are read innermost first: an
`mpirun` or `torchrun` inside a Slurm job inherits the job's SLURM_* variables, so the launcher
that started this process most directly is the one to believe.

  torchrun / accelerate    RANK of WORLD_SIZE
  MPI                      OMPI_COMM_WORLD_RANK of OMPI_COMM_WORLD_SIZE (Open MPI), else
                           PMI_RANK of PMI_SIZE (MPICH, Intel MPI, srun --mpi=pmi2)
  Slurm                    array task (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / STEP of
                           SLURM_ARRAY_TASK_COUNT, else srun task SLURM_PROCID of SLURM_NTASKS
  Kubernetes Indexed Job   JOB_COMPLETION_INDEX of --num-ranks, else of BATCHGEN_NUM_RANKS
                           (the Job's `completions`, which Kubernetes does not pass to the pod)

A launcher whose count is 1 gives no rank, and the next one is read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.errors import ConfigError

# Every variable read here (conftest clears them, so tests run alike inside any launcher).
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "PMI_RANK",
    "PMI_SIZE",
    "MPI_LOCALRANKID",
    "MPI_LOCALNRANKS",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_STEP",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "JOB_COMPLETION_INDEX",
    "BATCHGEN_NUM_RANKS",
    "BATCHGEN_NUM_SHARDS",
)
# The rank count of a Kubernetes Indexed Job's pods; BATCHGEN_NUM_SHARDS is its old name.
COUNT_VARIABLES = ("BATCHGEN_NUM_RANKS", "BATCHGEN_NUM_SHARDS")
FLAGS = "--num-ranks/--rank"
SINGLE = "one process"


@dataclass(frozen=True, slots=True)
class Rank:
    """This process's rank of `num_ranks`, where that came from, and its place on its node (from
    launchers that say it: torchrun, MPI), which picks its GPUs."""

    rank: int
    num_ranks: int
    origin: str  # for messages: "torchrun (RANK=3, WORLD_SIZE=8)"
    local_rank: int | None = None
    local_num_ranks: int | None = None

    @property
    def from_launcher(self) -> bool:
        return self.origin not in (FLAGS, SINGLE)


def resolve_rank(
    num_ranks: int | None, rank: int | None, env: Mapping[str, str] | None = None
) -> Rank:
    """The rank from the flags, else from a launcher, else rank 0 of 1."""
    env = os.environ if env is None else env
    if num_ranks is not None and rank is not None:
        return Rank(rank, num_ranks, FLAGS)
    if rank is not None:
        raise ConfigError("--num-ranks and --rank go together.")
    found = launcher_rank(num_ranks, env)
    if num_ranks is None:
        return found or Rank(0, 1, SINGLE)
    if found is None:
        raise ConfigError(
            f"--num-ranks {num_ranks} without --rank: pass --rank too, or run "
            "under a launcher that gives each process its rank (Slurm, torchrun, MPI, a "
            "Kubernetes Indexed Job)"
        )
    if found.num_ranks != num_ranks:
        raise ConfigError(
            f"--num-ranks {num_ranks} disagrees with {found.origin}: drop --num-ranks to "
            "take the launcher's count, or pass --rank too to override the launcher"
        )
    return found


def launcher_rank(num_ranks: int | None, env: Mapping[str, str]) -> Rank | None:
    """The rank a launcher gave this process, innermost launcher first; None outside any."""
    for read in (_torchrun, _mpi, _slurm, _kubernetes):
        rank = read(env, num_ranks)
        if rank is not None and rank.num_ranks > 1:
            if not 0 <= rank.rank < rank.num_ranks:
                raise ConfigError(
                    f"{rank.origin}: rank {rank.rank} is not in 0..{rank.num_ranks - 1}; pass "
                    "--num-ranks N --rank I yourself"
                )
            return rank
    return None


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"{name}={value!r}: expected a whole number (a launcher's rank variable); unset it "
            "or pass --num-ranks N --rank I yourself"
        ) from None


def _local(env: Mapping[str, str], index: str, count: str) -> tuple[int | None, int | None]:
    if index in env and count in env:
        return _int(env, index), _int(env, count)
    return None, None


def _torchrun(env: Mapping[str, str], _num_ranks: int | None) -> Rank | None:
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    rank, size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local = _local(env, "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    return Rank(rank, size, f"torchrun (RANK={rank}, WORLD_SIZE={size})", *local)


def _mpi(env: Mapping[str, str], _num_ranks: int | None) -> Rank | None:
    if "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        rank, size = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local = _local(env, "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")
        origin = f"Open MPI (OMPI_COMM_WORLD_RANK={rank}, OMPI_COMM_WORLD_SIZE={size})"
        return Rank(rank, size, origin, *local)
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        rank, size = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local = _local(env, "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
        return Rank(rank, size, f"MPI (PMI_RANK={rank}, PMI_SIZE={size})", *local)
    return None


def _slurm(env: Mapping[str, str], _num_ranks: int | None) -> Rank | None:
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        task_id, count = _int(env, "SLURM_ARRAY_TASK_ID"), _int(env, "SLURM_ARRAY_TASK_COUNT")
        offset = task_id - (
            _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        )
        step = (_int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1) or 1
        if offset < 0 or offset % step or offset // step >= count:
            raise ConfigError(
                f"Slurm array task {task_id} is not task number (id - min) / step of a plain "
                f"range of {count} tasks (e.g. --array=0-{count - 1} or a range with a step); "
                "for other arrays pass --num-ranks N --rank I yourself"
            )
        origin = f"a Slurm array (SLURM_ARRAY_TASK_ID={task_id}, SLURM_ARRAY_TASK_COUNT={count})"
        return Rank(offset // step, count, origin)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, size = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        return Rank(rank, size, f"srun (SLURM_PROCID={rank}, SLURM_NTASKS={size})")
    return None


def _kubernetes(env: Mapping[str, str], num_ranks: int | None) -> Rank | None:
    if "JOB_COMPLETION_INDEX" not in env:
        return None
    index = _int(env, "JOB_COMPLETION_INDEX")
    if num_ranks is not None:
        count, via = num_ranks, f"--num-ranks {num_ranks}"
    elif variable := next((v for v in COUNT_VARIABLES if v in env), None):
        count = _int(env, variable)
        via = f"{variable}={count}"
    else:
        raise ConfigError(
            f"this is a Kubernetes Indexed Job (JOB_COMPLETION_INDEX={index}), but the rank "
            "count is unknown: pass --num-ranks N (the Job's completions) or set "
            "BATCHGEN_NUM_RANKS in the pod's environment, as jobs/k8s/indexed-job.yaml does"
        )
    return Rank(index, count, f"a Kubernetes Indexed Job (JOB_COMPLETION_INDEX={index}, {via})")
