"""Rank detection (pipeline/ranks.py): the flags, then the launchers innermost first (torchrun,
MPI, Slurm, a Kubernetes Indexed Job), their conflicts, and the GPUs a torchrun or MPI rank keeps
for itself."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.ranks import Rank, resolve_rank
from pipeline.slots import pin_local_gpus

SLURM_ARRAY = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_COUNT": "3"}
SLURM_ARRAY_MIN = {**SLURM_ARRAY, "SLURM_ARRAY_TASK_MIN": "10"}
TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
OPEN_MPI = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4"}
K8S = {"JOB_COMPLETION_INDEX": "3"}

# (flags --num-ranks, --rank; environment; (index, count, origin)).
RANKS = [
    pytest.param(None, None, {}, (0, 1, "one process"), id="nothing"),
    pytest.param(4, 2, {}, (2, 4, "--num-ranks/--rank"), id="flags"),
    pytest.param(4, 2, TORCHRUN, (2, 4, "--num-ranks/--rank"), id="flags-beat-torchrun"),
    pytest.param(
        None,
        None,
        {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0"},
        (2, 4, "a Slurm array (SLURM_ARRAY_TASK_ID=2, SLURM_ARRAY_TASK_COUNT=4)"),
        id="slurm-array",
    ),
    pytest.param(
        None,
        None,
        SLURM_ARRAY_MIN,
        (2, 3, "a Slurm array (SLURM_ARRAY_TASK_ID=12, SLURM_ARRAY_TASK_COUNT=3)"),
        id="slurm-array-offset",
    ),
    pytest.param(
        None,
        None,
        {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_STEP": "2"},
        (3, 4, "a Slurm array (SLURM_ARRAY_TASK_ID=6, SLURM_ARRAY_TASK_COUNT=4)"),
        id="slurm-array-step",
    ),
    pytest.param(
        None,
        None,
        {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"},
        (1, 2, "srun (SLURM_PROCID=1, SLURM_NTASKS=2)"),
        id="srun",
    ),
    pytest.param(
        None, None, {"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (0, 1, "one process"), id="srun-1"
    ),
    pytest.param(None, None, TORCHRUN, (5, 8, "torchrun (RANK=5, WORLD_SIZE=8)"), id="torchrun"),
    pytest.param(
        None,
        None,
        {**TORCHRUN, **SLURM_ARRAY},
        (5, 8, "torchrun (RANK=5, WORLD_SIZE=8)"),
        id="torchrun-inside-slurm",
    ),
    pytest.param(
        None,
        None,
        {"RANK": "0", "WORLD_SIZE": "1", **OPEN_MPI},
        (2, 4, "Open MPI (OMPI_COMM_WORLD_RANK=2, OMPI_COMM_WORLD_SIZE=4)"),
        id="torchrun-of-1-inside-mpi",
    ),
    pytest.param(
        None,
        None,
        {**OPEN_MPI, "SLURM_PROCID": "0", "SLURM_NTASKS": "4"},
        (2, 4, "Open MPI (OMPI_COMM_WORLD_RANK=2, OMPI_COMM_WORLD_SIZE=4)"),
        id="mpirun-inside-sbatch",
    ),
    pytest.param(
        None,
        None,
        {"PMI_RANK": "1", "PMI_SIZE": "3"},
        (1, 3, "MPI (PMI_RANK=1, PMI_SIZE=3)"),
        id="mpich",
    ),
    pytest.param(
        None,
        None,
        {**K8S, "BATCHGEN_NUM_RANKS": "8"},
        (3, 8, "a Kubernetes Indexed Job (JOB_COMPLETION_INDEX=3, BATCHGEN_NUM_RANKS=8)"),
        id="k8s-env",
    ),
    pytest.param(
        None,
        None,
        {**K8S, "BATCHGEN_NUM_SHARDS": "8"},  # the old name, still read
        (3, 8, "a Kubernetes Indexed Job (JOB_COMPLETION_INDEX=3, BATCHGEN_NUM_SHARDS=8)"),
        id="k8s-env-old-name",
    ),
    pytest.param(
        8,
        None,
        K8S,
        (3, 8, "a Kubernetes Indexed Job (JOB_COMPLETION_INDEX=3, --num-ranks 8)"),
        id="k8s-flag",
    ),
    pytest.param(
        8,
        None,
        {**K8S, "BATCHGEN_NUM_RANKS": "6"},
        (3, 8, "a Kubernetes Indexed Job (JOB_COMPLETION_INDEX=3, --num-ranks 8)"),
        id="k8s-flag-beats-env",
    ),
    pytest.param(
        8,
        None,
        TORCHRUN,
        (5, 8, "torchrun (RANK=5, WORLD_SIZE=8)"),
        id="num-shards-agrees-with-torchrun",
    ),
]


@pytest.mark.parametrize("num_shards, shard_index, env, expected", RANKS)
def test_rank_comes_from_the_flags_else_the_innermost_launcher(
    num_shards, shard_index, env, expected
):
    rank = resolve_rank(num_shards, shard_index, env)
    assert (rank.rank, rank.num_ranks, rank.origin) == expected
    assert rank.from_launcher == (expected[2] not in ("one process", "--num-ranks/--rank"))


# (flags, environment, the exact refusal).
REFUSALS = [
    pytest.param(
        None,
        None,
        {"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"},
        "Slurm array task 9 is not task number (id - min) / step of a plain range of 3 tasks "
        "(e.g. --array=0-2 or a range with a step); for other arrays pass --num-ranks N "
        "--rank I yourself",
        id="slurm-array-not-a-range",
    ),
    pytest.param(
        None,
        None,
        K8S,
        "this is a Kubernetes Indexed Job (JOB_COMPLETION_INDEX=3), but the rank count is "
        "unknown: pass --num-ranks N (the Job's completions) or set BATCHGEN_NUM_RANKS in the "
        "pod's environment, as jobs/k8s/indexed-job.yaml does",
        id="k8s-without-count",
    ),
    pytest.param(
        None,
        None,
        {**K8S, "BATCHGEN_NUM_SHARDS": "3"},
        "a Kubernetes Indexed Job (JOB_COMPLETION_INDEX=3, BATCHGEN_NUM_SHARDS=3): rank 3 is "
        "not in 0..2; pass --num-ranks N --rank I yourself",
        id="k8s-index-out-of-range",
    ),
    pytest.param(
        4,
        None,
        TORCHRUN,
        "--num-ranks 4 disagrees with torchrun (RANK=5, WORLD_SIZE=8): drop --num-ranks to take "
        "the launcher's count, or pass --rank too to override the launcher",
        id="num-shards-disagrees-with-torchrun",
    ),
    pytest.param(
        None,
        None,
        {"RANK": "one", "WORLD_SIZE": "8"},
        "RANK='one': expected a whole number (a launcher's rank variable); unset it or pass "
        "--num-ranks N --rank I yourself",
        id="rank-not-a-number",
    ),
    pytest.param(None, 1, TORCHRUN, "--num-ranks and --rank go together.", id="shard-index-alone"),
    pytest.param(
        3,
        None,
        {},
        "--num-ranks 3 without --rank: pass --rank too, or run under a launcher "
        "that gives each process its rank (Slurm, torchrun, MPI, a Kubernetes Indexed Job)",
        id="num-shards-alone",
    ),
]


@pytest.mark.parametrize("num_shards, shard_index, env, message", REFUSALS)
def test_conflicting_or_incomplete_ranks_are_refused(num_shards, shard_index, env, message):
    with pytest.raises(ConfigError) as exc:
        resolve_rank(num_shards, shard_index, env)
    assert str(exc.value) == message


# (the launcher's local rank and count, tensor parallel size, CUDA_VISIBLE_DEVICES before,
# after, and whether a line is logged).
PINS = [
    pytest.param((1, 4), 1, "0,1,2,3", "1", id="one-gpu-each"),
    pytest.param((1, 2), 2, "4,5,6,7", "6,7", id="tensor-parallel-pairs"),
    pytest.param((3, 4), 1, "GPU-a,GPU-b,GPU-c,GPU-d", "GPU-d", id="uuids"),
    pytest.param((1, 4), 1, "3", "3", id="already-pinned"),
    pytest.param((0, 1), 1, "0,1", "0,1", id="one-process-per-node"),
    pytest.param((None, None), 1, "0,1", "0,1", id="no-local-rank"),
]


@pytest.mark.parametrize("local, tp, before, after", PINS)
def test_a_torchrun_rank_keeps_its_own_gpus(local, tp, before, after):
    env = {"CUDA_VISIBLE_DEVICES": before}
    rank = Rank(5, 8, "torchrun (RANK=5, WORLD_SIZE=8)", *local)
    note = pin_local_gpus(rank, tp, env)
    assert env["CUDA_VISIBLE_DEVICES"] == after
    if after == before:
        assert note is None
    else:
        assert note == (
            f"torchrun (RANK=5, WORLD_SIZE=8): local rank {local[0]} of {local[1]} on this node, "
            f"CUDA_VISIBLE_DEVICES={after}"
        )
