"""Several engine replicas on one GPU (`--replicas-per-gpu N`): the settings each needs.

A small model leaves the GPU mostly idle while each engine step's host-side work (scheduling,
sampling, detokenizing) runs; two or more engines on one GPU fill those gaps. Each replica is an
ordinary rank of `--data-parallel` (pipeline/launch.py starts them); this module computes what a
person would otherwise sum by hand:

  * CUDA_VISIBLE_DEVICES: the same GPU (or tensor-parallel group) for N ranks in a row;
  * gpu_memory_utilization: the run's share (its --gpu-memory-utilization, else vLLM's 0.9)
    divided by N, since vLLM checks at start that this share of the GPU is free;
  * kv_cache_memory_bytes: that share less the weights and a headroom for activations and CUDA
    graphs, fixed, because vLLM sizes its KV cache from the memory free while it profiles, and
    replicas starting together would count each other's allocations.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.options import option

GIB = 1 << 30
DEFAULT_SHARE = 0.9  # vLLM's gpu_memory_utilization
# Beside the weights and the KV cache, per engine: the CUDA context, activations of the largest
# step, the sampler's buffers and the captured CUDA graphs (~2-3 GiB seen for SmolLM2 on an H200).
HEADROOM_BYTES = 4 * GIB
MIN_KV_BYTES = 1 * GIB


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    """How many engines share each GPU; the rest is computed (see the module's docstring)."""

    replicas_per_gpu: int = option(
        1,
        "Engine replicas (ranks) on each GPU, for small models whose GPU idles while each "
        "engine's host-side step runs; memory shares are computed. Implies --data-parallel auto.",
        group="ranks",
    )

    def __post_init__(self) -> None:
        if self.replicas_per_gpu < 1:
            raise ConfigError(f"--replicas-per-gpu {self.replicas_per_gpu}: must be at least 1")


@dataclass(frozen=True, slots=True)
class ReplicaMemory:
    """One replica's share of its GPU."""

    utilization: float  # gpu_memory_utilization
    kv_cache_bytes: int | None  # kv_cache_memory_bytes; None where the GPU's size is unknown

    def flags(self, user_engine_args: Mapping[str, object] = {}) -> list[str]:
        """The `batchgen run` flags that give a rank this share (a KV cache size the user set
        with --engine-arg stays theirs)."""
        out = [f"--gpu-memory-utilization={self.utilization}"]
        if self.kv_cache_bytes is not None and "kv_cache_memory_bytes" not in user_engine_args:
            out.append(f"--engine-arg=kv_cache_memory_bytes={self.kv_cache_bytes}")
        return out

    def describe(self) -> str:
        kv = (
            f", {self.kv_cache_bytes / GIB:.1f} GiB KV cache"
            if self.kv_cache_bytes is not None
            else ""
        )
        return f"{self.utilization} of its memory{kv}"


def replica_memory(
    engines_per_gpu: int,
    gpu_bytes: int | None,
    weights_bytes: int = 0,
    total_share: float | None = None,
) -> ReplicaMemory:
    """The share each of `engines_per_gpu` engines on one GPU of `gpu_bytes` gets."""
    share = DEFAULT_SHARE if total_share is None else total_share
    utilization = int(share / engines_per_gpu * 100) / 100  # down to the percent
    if utilization < 0.01:
        raise ConfigError(
            f"--replicas-per-gpu {engines_per_gpu}: a share of {share} of the GPU's memory "
            "leaves each replica less than 1%; use fewer replicas"
        )
    if gpu_bytes is None:
        return ReplicaMemory(utilization, None)
    kv = int(utilization * gpu_bytes) - weights_bytes - HEADROOM_BYTES
    kv = kv // GIB * GIB  # whole GiB, so the flag reads plainly in logs
    if kv < MIN_KV_BYTES:
        need = (weights_bytes + HEADROOM_BYTES + MIN_KV_BYTES) / gpu_bytes
        raise ConfigError(
            f"--replicas-per-gpu {engines_per_gpu}: each replica's share ({utilization} of "
            f"{gpu_bytes / GIB:.0f} GiB) does not hold the model ({weights_bytes / GIB:.1f} GiB), "
            f"{HEADROOM_BYTES // GIB} GiB of activations and a KV cache; each needs at least "
            f"{need:.2f} of the GPU: use fewer replicas"
        )
    return ReplicaMemory(utilization, kv)


def gpu_memory_bytes(gpu: str) -> int | None:
    """Total memory of one GPU (an index or UUID as CUDA_VISIBLE_DEVICES names it), from
    nvidia-smi; None where it cannot say."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        proc = subprocess.run(
            [smi, "-i", gpu, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return int(proc.stdout.split()[0]) * (1 << 20) if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def weights_bytes(model: str | None, dtype_bytes: int = 2) -> int:
    """The model's weights in bytes: its weight files' size, or (a shape-only folder loaded with
    random weights) an estimate from config.json; 0 where neither is found."""
    if not model or not Path(model).is_dir():
        return 0
    folder = Path(model)
    files = [*folder.glob("*.safetensors"), *folder.glob("*.bin")]
    if files:
        return sum(f.stat().st_size for f in files)
    try:
        cfg = json.loads((folder / "config.json").read_text())
        h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
        inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads", heads)
    except (OSError, ValueError, KeyError):
        return 0
    attention = h * h * 2 + 2 * h * (h // heads) * kv_heads
    params = layers * (attention + 3 * h * inter) + 2 * vocab * h
    return params * dtype_bytes


def replica_placements(
    gpus: list[str], tensor_parallel_size: int, replicas: int, slots: int | None
) -> list[tuple[str, int]]:
    """(CUDA_VISIBLE_DEVICES, replica number) of each slot: every GPU group's first replica,
    then every group's second, ...; as many slots as asked (None: all of them)."""
    tp = tensor_parallel_size
    groups = [",".join(gpus[i * tp : (i + 1) * tp]) for i in range(len(gpus) // tp)]
    places = [(g, r) for r in range(replicas) for g in groups]
    if not places:
        raise ConfigError(
            f"--replicas-per-gpu {replicas}: no GPU is visible (or fewer than "
            f"--tensor-parallel-size {tp}); replicas share GPUs, on CPU use --data-parallel N"
        )
    if slots is None:
        return places
    if slots > len(places):
        raise ConfigError(
            f"--data-parallel {slots} with --replicas-per-gpu {replicas}: {len(gpus)} visible "
            f"GPU(s) hold {len(places)} replicas; pass --data-parallel {len(places)} or auto"
        )
    return places[:slots]


def replica_slots(
    env: Mapping[str, str],
    gpus: list[str],
    data_parallel: int | str,
    tensor_parallel_size: int,
    replicas: int,
    run_flags: Mapping[str, object],
) -> list[tuple[dict[str, str], list[str], str]]:
    """Each replica slot's environment, extra `batchgen run` flags and description.

    `run_flags`: the run's `gpu_memory_utilization` (the share all replicas of a GPU divide),
    `model` and `engine_args` (a kv_cache_memory_bytes there stays the user's)."""
    del env  # the GPUs are already read from it
    slots = None if data_parallel == "auto" else int(data_parallel)
    places = replica_placements(gpus, tensor_parallel_size, replicas, slots)
    first = places[0][0].split(",")[0]
    share = run_flags.get("gpu_memory_utilization")
    memory = replica_memory(
        replicas,
        gpu_memory_bytes(first),
        weights_bytes(str(run_flags.get("model") or "")),
        float(share) if share is not None else None,
    )
    user_args = dict(run_flags.get("engine_args") or ())  # type: ignore[arg-type]
    return [
        (
            {"CUDA_VISIBLE_DEVICES": gpu},
            memory.flags(user_args),
            f"GPU {gpu} (replica {r + 1} of {replicas}: {memory.describe()})",
        )
        for gpu, r in places
    ]
