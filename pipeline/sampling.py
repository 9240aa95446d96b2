"""Sampling options, declared once.

Each entry of `SAMPLING_OPTIONS` is one knob: its name is the `vllm.SamplingParams` argument,
the config field and the TOML key (`max_tokens` / `max-tokens`); its flag (`--max-tokens`), its
help, its check and where its default comes from all follow from the same entry. The CLI makes
its flags from this table, `SamplingConfig` validates and resolves through it, per-row overrides
(`--sampling-column`) are checked against it, and the engine passes the resolved values to vLLM
by name. A new option is one entry here plus its test.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError

DEFAULT_MAX_TOKENS = 256
_GREEDY_N = (
    "--n {n} with greedy sampling (temperature 0) would repeat one text; "
    "pass --temperature above 0 or --n 1"
)


@dataclass(frozen=True, slots=True)
class SamplingOption:
    """One sampling knob.

    `model_key` names the generation_config.json key that supplies a default when the flag is
    not given (vLLM reads the same keys); `neutral` is the value used when neither gives one.
    A knob whose resolved value is None (or False for a switch) is left out of the record, so
    the fingerprints of runs that never used it stay as they were before it existed.
    """

    name: str
    kind: type
    help: str
    valid: Callable[[Any], bool] | None = None
    expect: str = ""  # what `valid` wants, for the error message
    model_key: str | None = None
    neutral: Any = None
    multiple: bool = False  # repeatable flag, a list value
    switch: bool = False  # an on/off flag

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def problem(self, value: Any) -> str | None:
        """Why `value` is not acceptable for this option, or None if it is."""
        if self.multiple:
            ok = isinstance(value, list | tuple) and all(isinstance(v, self.kind) for v in value)
            return None if ok else f"expected a list of {self.kind.__name__}"
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool)):
            return f"expected {'true or false' if self.switch else 'a ' + self.kind.__name__}"
        if self.valid is not None and not self.valid(value):
            return self.expect
        return None


SAMPLING_OPTIONS: tuple[SamplingOption, ...] = (
    SamplingOption(
        "max_tokens",
        int,
        "Output tokens per sample [default: model's, else 256].",
        lambda v: v >= 1,
        "must be at least 1",
        model_key="max_new_tokens",
        neutral=DEFAULT_MAX_TOKENS,
    ),
    SamplingOption(
        "temperature",
        float,
        "0 is greedy [default: model's, else 1.0].",
        lambda v: v >= 0,
        "must be 0 (greedy) or more",
        model_key="temperature",
        neutral=1.0,
    ),
    SamplingOption(
        "top_p",
        float,
        "Nucleus sampling mass [default: model's, else 1.0].",
        lambda v: 0 < v <= 1,
        "must be in (0, 1]",
        model_key="top_p",
        neutral=1.0,
    ),
    SamplingOption(
        "top_k",
        int,
        "Sample from the k likeliest tokens; 0 is all [default: model's, else 0].",
        lambda v: v >= -1,
        "must be 0 (all tokens) or more",
        model_key="top_k",
        neutral=0,
    ),
    SamplingOption(
        "min_p",
        float,
        "Drop tokens below this share of the likeliest one's probability.",
        lambda v: 0 <= v <= 1,
        "must be in [0, 1]",
        model_key="min_p",
        neutral=0.0,
    ),
    SamplingOption(
        "repetition_penalty",
        float,
        "Above 1 discourages repeating prompt and output tokens.",
        lambda v: v > 0,
        "must be above 0",
        model_key="repetition_penalty",
        neutral=1.0,
    ),
    SamplingOption(
        "presence_penalty",
        float,
        "Penalize tokens already present in the output (OpenAI semantics).",
        lambda v: -2 <= v <= 2,
        "must be in [-2, 2]",
    ),
    SamplingOption(
        "frequency_penalty",
        float,
        "Penalize tokens by how often they appeared in the output (OpenAI semantics).",
        lambda v: -2 <= v <= 2,
        "must be in [-2, 2]",
    ),
    SamplingOption("stop", str, "Stop string; repeatable.", multiple=True, neutral=()),
    SamplingOption(
        "n",
        int,
        "Samples per prompt, one output row each.",
        lambda v: v >= 1,
        "must be at least 1",
        neutral=1,
    ),
    # Log probabilities are written as typed columns (see pipeline/sinks.py); each costs memory
    # and disk in proportion to tokens x K.
    SamplingOption(
        "logprobs",
        int,
        "Per output token: its log probability and the top K alternatives (column logprobs).",
        lambda v: v >= 0,
        "must be 0 (the chosen token only) or more",
    ),
    SamplingOption(
        "prompt_logprobs",
        int,
        "Per prompt token: its log probability and the top K alternatives (column "
        "prompt_logprobs).",
        lambda v: v >= 0,
        "must be 0 (the prompt token only) or more",
    ),
    # Generate past the end-of-sequence token up to the max tokens: every output's length is
    # then fixed in advance, which a benchmark needs so that two runs do the same work.
    SamplingOption(
        "ignore_eos",
        bool,
        "Generate past end-of-sequence up to the max tokens (fixed lengths, benchmarks).",
        switch=True,
    ),
)
OPTIONS_BY_NAME: dict[str, SamplingOption] = {o.name: o for o in SAMPLING_OPTIONS}


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """Sampling as given on the command line; an option not given is absent from `given`.

    `given` holds (name, value) pairs of SAMPLING_OPTIONS entries, checked on construction.
    """

    given: tuple[tuple[str, Any], ...] = ()
    # An integer input column with each row's own max tokens (a null falls back to
    # --max-tokens), so one run can mix short and long outputs.
    max_tokens_column: str | None = None

    @classmethod
    def of(cls, max_tokens_column: str | None = None, **values: Any) -> SamplingConfig:
        """From keyword values; None, False and empty lists mean "not given"."""
        given = tuple(
            (k, tuple(v) if isinstance(v, list) else v)
            for k, v in values.items()
            if v is not None and v is not False and v != () and v != []
        )
        return cls(given, max_tokens_column)

    def __post_init__(self) -> None:
        for name, value in self.given:
            option = OPTIONS_BY_NAME.get(name)
            if option is None:
                raise ConfigError(f"unknown sampling option {name!r}")
            problem = option.problem(list(value) if option.multiple else value)
            if problem:
                raise ConfigError(f"{option.flag} {value}: {problem}")
        values = dict(self.given)
        n, temperature = values.get("n", 1), values.get("temperature")
        if n > 1 and temperature == 0:
            raise ConfigError(_GREEDY_N.format(n=n))

    def get(self, name: str) -> Any:
        return dict(self.given).get(name)

    def resolve(self, model_defaults: Mapping[str, Any]) -> dict[str, Any]:
        """The sampling actually used: flags, else the model's defaults, else neutral values.

        The result is what goes to the engine, into the fingerprint and into every shard's
        metadata, so the recorded sampling is the applied one whatever its source.
        """
        given = dict(self.given)
        resolved: dict[str, Any] = {}
        for option in SAMPLING_OPTIONS:
            value = given.get(option.name)
            if value is None and option.model_key is not None:
                value = model_defaults.get(option.model_key)
            if value is None:
                value = option.neutral
            if value is None or (option.switch and not value):
                continue
            resolved[option.name] = list(value) if option.multiple else value
        if resolved["top_k"] is None or resolved["top_k"] < 0:
            resolved["top_k"] = 0  # vLLM's "no top-k" is 0 (older releases also took -1)
        resolved["max_tokens"] = int(resolved["max_tokens"])
        if self.max_tokens_column is not None:
            resolved["max_tokens_column"] = self.max_tokens_column
        if resolved["n"] > 1 and resolved["temperature"] == 0:
            raise ConfigError(_GREEDY_N.format(n=resolved["n"]))
        return resolved


def engine_params(sampling: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a resolved sampling record that are engine (SamplingParams) arguments."""
    return {k: v for k, v in sampling.items() if k in OPTIONS_BY_NAME}


def row_seed(run_seed: int, row_id: str) -> int:
    """The sampling seed of one row: fixed by the run seed and the row id alone, so a row's
    samples are the same whatever batch, rank or resume it lands in."""
    digest = hashlib.blake2b(f"{run_seed}\x00{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)
