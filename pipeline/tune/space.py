"""What `batchgen tune` searches: the engine settings that matter for throughput, in the order
tried, the values tried for each, and what each changes besides speed.

Settings are keyed by their vLLM argument name. Two of them are batchgen flags of their own
(`--max-num-seqs`, `--gpu-memory-utilization`: fields of EngineConfig), and `replicas_per_gpu`
is `batchgen run --replicas-per-gpu` (engines per GPU, no engine's setting); the rest travel as
`--engine-arg KEY=VALUE`. None of them is part of a run's fingerprint except
`speculative_config` and `quantization` (pipeline/fingerprint.py), so a run may resume with other
batch limits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config import EngineConfig
from pipeline.errors import ConfigError

# Settings that are EngineConfig fields (and batchgen flags), with their flag's name.
FIELD_FLAGS = {"max_num_seqs": "max-num-seqs", "gpu_memory_utilization": "gpu-memory-utilization"}
# Settings of `batchgen run` itself, no engine's: how many engines (pipeline/replicas.py).
RUN_FLAGS = {"replicas_per_gpu": "replicas-per-gpu"}
RUN_DEFAULTS = {"replicas_per_gpu": 1}

# ngram speculative decoding ("prompt lookup"): drafts copied from the prompt and the output so
# far, checked by the model in one step. Ordered from the smallest draft to the largest.
NGRAM_DRAFTS: tuple[dict[str, Any], ...] = (
    {
        "method": "ngram",
        "num_speculative_tokens": 2,
        "prompt_lookup_max": 3,
        "prompt_lookup_min": 2,
    },
    {
        "method": "ngram",
        "num_speculative_tokens": 4,
        "prompt_lookup_max": 4,
        "prompt_lookup_min": 2,
    },
    {
        "method": "ngram",
        "num_speculative_tokens": 6,
        "prompt_lookup_max": 5,
        "prompt_lookup_min": 3,
    },
)
# On a GPU, vLLM's GPU proposer (method "ngram_gpu") drafts the same way and keeps vLLM's async
# scheduling (the CPU step of one batch overlapping the forward pass of the last), which the CPU
# proposer ("ngram") turns off; a small model, whose steps are short, loses much of the drafts'
# gain without it (vLLM 0.26).
NGRAM_GPU_DRAFTS = tuple({**d, "method": "ngram_gpu"} for d in NGRAM_DRAFTS)
SPECULATIVE_OUTPUTS = (
    "greedy texts equal up to floating-point effects (the model checks drafts several tokens "
    "at a time); sampled texts are other draws from the same distribution, even with the same "
    "seeds; part of the run's fingerprint"
)
QUANTIZED_OUTPUTS = (
    "other texts: weights and activations rounded to 8 bits change every logit a little, so "
    "greedy texts part from the bf16 model's after some tokens; part of the run's fingerprint"
)
SPEED_ONLY = "speed only (greedy texts may still differ in bfloat16, as with any batch change)"


@dataclass(frozen=True, slots=True)
class Knob:
    """One setting the tuner searches."""

    key: str  # vLLM's argument name
    what: str  # what it does, for the README and the report
    outputs: str  # what it changes besides speed
    changes_outputs: bool = False
    gpu_only: bool = False


KNOBS: tuple[Knob, ...] = (
    Knob(
        "speculative_config",
        "ngram speculative decoding with drafts of 2, 4 or 6 tokens (on a GPU, vLLM's GPU "
        "proposer, which keeps async scheduling on)",
        SPECULATIVE_OUTPUTS,
        changes_outputs=True,
    ),
    Knob(
        "max_num_seqs",
        "sequences the engine runs at once (vLLM's default: 256 on CPU, 1024 on an H100/H200)",
        SPEED_ONLY,
    ),
    Knob(
        "max_num_batched_tokens",
        "tokens one engine step may process (prefill chunks plus decodes)",
        SPEED_ONLY,
    ),
    Knob(
        "enable_chunked_prefill",
        "split long prefills across steps, beside running decodes (vLLM's default: on)",
        SPEED_ONLY,
    ),
    Knob(
        "enable_prefix_caching",
        "reuse the KV cache of shared prompt prefixes (vLLM's default: on)",
        SPEED_ONLY,
    ),
    Knob(
        "gpu_memory_utilization",
        "share of GPU memory vLLM may take, most of it KV cache (GPU only)",
        SPEED_ONLY,
        gpu_only=True,
    ),
    Knob(
        "max_cudagraph_capture_size",
        "largest batch captured as a CUDA graph, raised to max_num_seqs (GPU only)",
        SPEED_ONLY,
        gpu_only=True,
    ),
    Knob(
        "replicas_per_gpu",
        "engine replicas sharing each GPU, each a rank of the rows (`batchgen run "
        "--replicas-per-gpu`; GPU only): for small models whose GPU idles during each engine's "
        "host-side step",
        SPEED_ONLY,
        gpu_only=True,
    ),
    Knob(
        "quantization",
        "FP8 weights and activations, quantized as the engine loads the model (vLLM's "
        '`quantization="fp8"`; GPU only, Hopper or Ada): half the weight memory and traffic',
        QUANTIZED_OUTPUTS,
        changes_outputs=True,
        gpu_only=True,
    ),
)
KNOB_KEYS = tuple(k.key for k in KNOBS)


@dataclass(frozen=True, slots=True)
class Ladder:
    """The values one knob is tried at, in order, with the baseline's value at `start`.

    `line`: a line search, stepping away from `start` (first upward, then downward) while each
    step beats the incumbent; otherwise (values given with --try) every value is tried.
    `skipped`: values left out, each with the reason.
    """

    values: tuple[Any, ...]
    start: int
    line: bool = True
    skipped: tuple[tuple[Any, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Space:
    """The search space for one job, from the baseline engine's effective settings
    (`Engine.tunables()`), the sample's size and the values the user asked to --try."""

    effective: Mapping[str, Any]
    sample: int
    tries: tuple[tuple[str, Any], ...] = ()

    @property
    def knobs(self) -> tuple[Knob, ...]:
        """The knobs searched, in order: those named by --try (in their order), else all."""
        if not self.tries:
            return KNOBS
        named = list(dict.fromkeys(key for key, _ in self.tries))
        return tuple(next(k for k in KNOBS if k.key == key) for key in named)

    def current(self, key: str, settings: Mapping[str, Any]) -> Any:
        """The value `key` runs with under `settings` (the baseline's when they leave it out)."""
        if key in settings:
            return settings[key]
        return self.effective.get(key, RUN_DEFAULTS.get(key))

    def ladder(self, knob: Knob, incumbent: Mapping[str, Any]) -> Ladder | str:
        """The values to try for `knob` from `incumbent`, or why it is not searched."""
        eff = self.effective
        if knob.gpu_only and eff.get("device") != "gpu":
            return "GPU only (this engine runs on the CPU)"
        base = self.current(knob.key, incumbent)
        if self.tries:
            given = [v for key, v in self.tries if key == knob.key and v != base]
            return Ladder((base, *given), 0, line=False)
        return _LADDERS[knob.key](self, base, incumbent)

    def candidate(self, knob: Knob, value: Any, incumbent: Mapping[str, Any]) -> dict[str, Any]:
        """The incumbent's settings with `knob` at `value` (and what that value needs)."""
        settings = dict(incumbent)
        if value == self.effective.get(knob.key, RUN_DEFAULTS.get(knob.key)):
            settings.pop(knob.key, None)  # the baseline's own value: leave it as the job has it
        else:
            settings[knob.key] = value
        if knob.key == "enable_chunked_prefill" and value is False:
            # Without chunking a step must hold a whole prompt: vLLM refuses a smaller budget.
            tokens = self.current("max_num_batched_tokens", settings)
            if tokens is not None and tokens < self.max_model_len:
                settings["max_num_batched_tokens"] = self.max_model_len
        return settings

    @property
    def max_model_len(self) -> int:
        return int(self.effective.get("max_model_len") or 0)

    def problem(self, settings: Mapping[str, Any]) -> str | None:
        """Why vLLM would refuse these settings at start, or None."""
        tokens = self.current("max_num_batched_tokens", settings)
        seqs = self.current("max_num_seqs", settings)
        if tokens is not None and seqs is not None and tokens < seqs:
            return f"max_num_batched_tokens {tokens} is below max_num_seqs {seqs}"
        chunked = self.current("enable_chunked_prefill", settings)
        if chunked is False and tokens is not None and tokens < self.max_model_len:
            return (
                f"without chunked prefill max_num_batched_tokens {tokens} must hold "
                f"max_model_len {self.max_model_len}"
            )
        return None


def _max_num_seqs(space: Space, base: int, incumbent: Mapping[str, Any]) -> Ladder | str:
    ladder = {max(1, base >> k) for k in range(1, 5)} | {base, 2 * base}
    # A value at or above the sample's size runs every sample row at once, like any larger one:
    # the sample cannot tell them apart.
    kept = sorted(v for v in ladder if v == base or v < space.sample)
    why = f"not measurable on a sample of {space.sample} rows (every row would run at once)"
    skipped = tuple((v, why) for v in sorted(ladder) if v not in kept)
    return Ladder(tuple(kept), kept.index(base), skipped=skipped)


def _batched_tokens(space: Space, base: int, incumbent: Mapping[str, Any]) -> Ladder | str:
    values = sorted({max(1, base // 4), max(1, base // 2), base, 2 * base, 4 * base})
    return Ladder(tuple(values), values.index(base))


def _switch(space: Space, base: bool, incumbent: Mapping[str, Any]) -> Ladder | str:
    return Ladder((base, not base), 0)


def _speculative(space: Space, base: Any, incumbent: Mapping[str, Any]) -> Ladder | str:
    if base is not None:
        return "the job sets its own speculative_config"
    drafts = NGRAM_GPU_DRAFTS if space.effective.get("device") == "gpu" else NGRAM_DRAFTS
    return Ladder((None, *drafts), 0)


def _memory(space: Space, base: float | None, incumbent: Mapping[str, Any]) -> Ladder | str:
    if base is None or base >= 0.95:
        return f"already {base}"
    return Ladder((base, 0.95), 0)


def _graphs(space: Space, base: int | None, incumbent: Mapping[str, Any]) -> Ladder | str:
    if base is None:
        return "CUDA graphs are off (--enforce-eager)"
    seqs = space.current("max_num_seqs", incumbent)
    if seqs is None or seqs <= base:
        return f"graphs already cover max_num_seqs {seqs} (capture size {base})"
    return Ladder((base, seqs), 0)


def _replicas(space: Space, base: int, incumbent: Mapping[str, Any]) -> Ladder | str:
    values = tuple(sorted({base, 2, 3, 4}))
    return Ladder(values, values.index(base))


def _quantization(space: Space, base: str | None, incumbent: Mapping[str, Any]) -> Ladder | str:
    if base is not None:
        return f"the job sets its own quantization ({base})"
    return Ladder((None, "fp8"), 0)


_LADDERS = {
    "replicas_per_gpu": _replicas,
    "max_num_seqs": _max_num_seqs,
    "max_num_batched_tokens": _batched_tokens,
    "enable_chunked_prefill": _switch,
    "enable_prefix_caching": _switch,
    "speculative_config": _speculative,
    "gpu_memory_utilization": _memory,
    "max_cudagraph_capture_size": _graphs,
    "quantization": _quantization,
}


def apply_settings(engine: EngineConfig, settings: Mapping[str, Any]) -> EngineConfig:
    """The engine config with `settings` applied: fields set, the rest as engine args (each
    replacing an engine arg of the same key)."""
    fields = {k: v for k, v in settings.items() if k in FIELD_FLAGS}
    args = tuple((k, v) for k, v in engine.engine_args if k not in settings)
    args += tuple(
        (k, v) for k, v in settings.items() if k not in FIELD_FLAGS and k not in RUN_FLAGS
    )
    return dataclasses.replace(engine, engine_args=args, **fields)


def baseline_engine(engine: EngineConfig) -> EngineConfig:
    """The engine config with every setting the tuner searches left to vLLM's defaults (for
    `batchgen bench --raw-defaults`). Raises ConfigError when it sets none of them."""
    args = tuple((k, v) for k, v in engine.engine_args if k not in KNOB_KEYS)
    stripped = dataclasses.replace(engine, engine_args=args, **dict.fromkeys(FIELD_FLAGS, None))
    if stripped == engine:
        raise ConfigError(
            "--raw-defaults: the engine flags set none of the settings batchgen tune searches "
            f"({', '.join(k for k in KNOB_KEYS if k not in RUN_FLAGS)}), so both sides would run vLLM's defaults; give the tuned "
            "settings, e.g. --max-num-seqs 64 --engine-arg max_num_batched_tokens=8192"
        )
    return stripped


def check_tries(tries: tuple[tuple[str, Any], ...]) -> None:
    """Refuse a --try of a setting the tuner does not know (ConfigError)."""
    for key, _ in tries:
        if key not in KNOB_KEYS:
            raise ConfigError(
                f"--try {key}=...: not a setting batchgen tune searches; those are: "
                f"{', '.join(KNOB_KEYS)}"
            )
