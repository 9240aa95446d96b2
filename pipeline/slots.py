"""Where the ranks of one node run: the slots `--data-parallel` starts ranks in (a share of the
visible GPUs each, or of the CPU cores and KV cache), and the GPUs of a rank that torchrun or MPI
started (`pin_local_gpus`). Decides only; pipeline/launch.py starts and watches the ranks."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from pipeline.engines.vllm import CPU_KVCACHE_GIB
from pipeline.errors import ConfigError
from pipeline.ranks import Rank


@dataclass(frozen=True, slots=True)
class Slot:
    """Where one rank runs: its environment (GPUs, or the CPU engine's settings) and CPU cores."""

    env: dict[str, str]
    cpus: tuple[int, ...] | None  # process affinity; None: leave it
    where: str  # for the log: "GPU 0,1", "CPU core 1, 1 GiB KV cache"
    flags: tuple[str, ...] = ()  # `batchgen run` flags of this slot alone (--replicas-per-gpu)


@dataclass(frozen=True, slots=True)
class NodePlan:
    """The ranks of the run and the slots they run in (one rank per slot at a time)."""

    num_ranks: int
    slots: tuple[Slot, ...]


def visible_gpus(env: Mapping[str, str]) -> list[str]:
    """The NVIDIA GPUs this process may use: CUDA_VISIBLE_DEVICES where it is set (its entries,
    indices or UUIDs, up to the first invalid one, as CUDA reads it), else nvidia-smi's list;
    none on a machine without either."""
    if "CUDA_VISIBLE_DEVICES" in env:
        ids = []
        for item in env["CUDA_VISIBLE_DEVICES"].split(","):
            item = item.strip()
            if not item or item.startswith("-"):
                break
            ids.append(item)
        return ids
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        proc = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    if proc.returncode != 0:
        return []
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def plan_node(
    data_parallel: int | str,
    num_ranks: int | None,
    tensor_parallel_size: int,
    env: Mapping[str, str] | None = None,
    cpus: list[int] | None = None,
    replicas_per_gpu: int = 1,
    run_flags: Mapping[str, object] | None = None,
) -> NodePlan:
    """The slots for `--data-parallel N` (or `auto`: every visible GPU divided by the tensor
    parallel size; 1 without GPUs), and the run's rank count: `--num-ranks` where given (then
    ranks wait for a free slot), else one rank per slot. `replicas_per_gpu` > 1: that many
    slots share each GPU (pipeline/replicas.py computes their memory shares from `run_flags`)."""
    env = os.environ if env is None else env
    gpus = visible_gpus(env)
    tp = tensor_parallel_size
    if replicas_per_gpu > 1:
        from pipeline.replicas import replica_slots

        made = replica_slots(env, gpus, data_parallel, tp, replicas_per_gpu, run_flags or {})
        slots = tuple(Slot(e, None, where, tuple(f)) for e, f, where in made)
        if num_ranks is not None and len(slots) > num_ranks:
            slots = slots[:num_ranks]
        return NodePlan(num_ranks or len(slots), slots)
    if data_parallel == "auto":
        slots = max(len(gpus) // tp, 1)
        if num_ranks is not None:
            slots = min(slots, num_ranks)
    else:
        slots = int(data_parallel)
        if num_ranks is not None and slots > num_ranks:
            raise ConfigError(
                f"--data-parallel {slots} with --num-ranks {num_ranks}: a run of {num_ranks} "
                f"ranks runs at most {num_ranks} at once; pass --data-parallel {num_ranks} or less"
            )
        if gpus and slots * tp > len(gpus):
            shown = ",".join(gpus)
            raise ConfigError(
                f"--data-parallel {slots} x --tensor-parallel-size {tp} needs {slots * tp} GPUs, "
                f"but {len(gpus)} are visible ({shown}); pass --data-parallel "
                f"{max(len(gpus) // tp, 1)} or auto"
            )
    if gpus:
        chosen = [gpus[i * tp : (i + 1) * tp] for i in range(slots)]
        plan = tuple(
            Slot({"CUDA_VISIBLE_DEVICES": ",".join(g)}, None, f"GPU {','.join(g)}") for g in chosen
        )
    else:
        plan = _cpu_slots(slots, env, _usable_cpus() if cpus is None else cpus)
    return NodePlan(num_ranks or slots, plan)


def _usable_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _cpu_slots(slots: int, env: Mapping[str, str], cpus: list[int]) -> tuple[Slot, ...]:
    """CPU ranks: each its own cores (shared round-robin when there are more ranks than cores)
    and an equal share, at least 1 GiB, of the KV cache one process would get."""
    raw = env.get("VLLM_CPU_KVCACHE_SPACE") or str(CPU_KVCACHE_GIB)
    try:
        total_kv = int(raw)
    except ValueError:
        raise ConfigError(
            f"VLLM_CPU_KVCACHE_SPACE={raw!r}: expected whole GiB, e.g. 4 (--data-parallel "
            "gives each rank an equal share)"
        ) from None
    kv = max(total_kv // slots, 1)
    if slots == 1:  # one rank: as a plain run, all cores
        return (
            Slot({"VLLM_CPU_KVCACHE_SPACE": str(kv)}, None, f"all CPU cores, {kv} GiB KV cache"),
        )
    per = max(len(cpus) // slots, 1)
    result = []
    for i in range(slots):
        mine = cpus[i * per : (i + 1) * per] if len(cpus) >= slots else [cpus[i % len(cpus)]]
        listed = ",".join(map(str, mine))
        result.append(
            Slot(
                {"VLLM_CPU_KVCACHE_SPACE": str(kv), "VLLM_CPU_OMP_THREADS_BIND": listed},
                tuple(mine),
                f"CPU core{'s' if len(mine) > 1 else ''} {listed}, {kv} GiB KV cache",
            )
        )
    return tuple(result)


def pin_local_gpus(
    rank: Rank, tensor_parallel_size: int, env: MutableMapping[str, str] | None = None
) -> str | None:
    """Under torchrun or MPI every process of a node sees all of its GPUs: give this one its own
    share, as --data-parallel does (CUDA_VISIBLE_DEVICES, set before any CUDA library loads).
    Nothing when the launcher or the user has pinned them already (fewer are visible than the
    node's processes need). What was set, for the log."""
    env = os.environ if env is None else env
    if rank.local_rank is None or rank.local_num_ranks is None or rank.local_num_ranks < 2:
        return None
    gpus = visible_gpus(env)
    tp = tensor_parallel_size
    if len(gpus) < rank.local_num_ranks * tp:
        return None
    mine = ",".join(gpus[rank.local_rank * tp : (rank.local_rank + 1) * tp])
    env["CUDA_VISIBLE_DEVICES"] = mine
    return (
        f"{rank.origin}: local rank {rank.local_rank} of {rank.local_num_ranks} on this node, "
        f"CUDA_VISIBLE_DEVICES={mine}"
    )
