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
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import structured
from pipeline.errors import ConfigError
from pipeline.options import option as field_option

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
    check: Callable[[Any], str | None] | None = None  # for values `valid` cannot judge alone
    # A structured-output constraint (pipeline/structured.py) rather than a SamplingParams field.
    structured: bool = False
    # The flag names a file holding the value ("json": parsed as JSON, "text": read as is);
    # a per-row value is given inline.
    from_file: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def problem(self, value: Any) -> str | None:
        """Why `value` is not acceptable for this option, or None if it is."""
        if self.multiple:
            ok = isinstance(value, list | tuple) and all(isinstance(v, self.kind) for v in value)
            if not ok:
                return f"expected a list of {self.kind.__name__}"
            return self.check(list(value)) if self.check else None
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool)):
            return f"expected {'true or false' if self.switch else 'a ' + self.kind.__name__}"
        if self.valid is not None and not self.valid(value):
            return self.expect
        return self.check(value) if self.check else None

    def load(self, path: str) -> Any:
        """The value of a `from_file` flag: its file's content; ConfigError naming the file."""
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{self.flag} {path}: cannot read it ({exc.strerror})") from exc
        if self.from_file != "json":
            return text
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{self.flag} {path}: not JSON ({exc})") from exc


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
    # With --reasoning-parser: vLLM ends the thinking after this many tokens, then the answer
    # follows (a cap on reasoning cost for distillation jobs).
    SamplingOption(
        "thinking_token_budget",
        int,
        "With --reasoning-parser: end the thinking after this many tokens.",
        lambda v: v >= 0,
        "must be 0 or more",
    ),
    # Structured output: at most one of these per run (or per row); vLLM enforces it while
    # decoding, and the `parsed_ok` column says whether the text came out complete and valid.
    SamplingOption(
        "json_schema",
        dict,
        "JSON Schema file: every text is JSON valid against it.",
        check=structured.schema_problem,
        structured=True,
        from_file="json",
    ),
    SamplingOption(
        "choice",
        str,
        "The text is exactly one of these; repeat for each choice.",
        multiple=True,
        check=structured.choice_problem,
        structured=True,
    ),
    SamplingOption(
        "regex",
        str,
        "The text matches this regular expression in full.",
        check=structured.regex_problem,
        structured=True,
    ),
    SamplingOption(
        "grammar",
        str,
        "Grammar file (EBNF with a `root` rule, or Lark with `start`): the text follows it.",
        check=structured.grammar_problem,
        structured=True,
        from_file="text",
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


STRUCTURED_FLAGS = ", ".join(o.flag for o in SAMPLING_OPTIONS if o.structured)
# Per-row keys besides the options: a row's own sampling seed.
ROW_ONLY_KEYS = ("seed",)


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """Sampling as given on the command line; an option not given is absent from `given`.

    `given` holds (name, value) pairs of SAMPLING_OPTIONS entries, checked on construction; a
    value read from a file (`--json-schema FILE`) is held as read, and `files` records each such
    file's name and digest for the run's settings.
    """

    given: tuple[tuple[str, Any], ...] = ()
    files: tuple[tuple[str, str, str], ...] = ()  # (option name, file name, sha256 prefix)
    # An integer input column with each row's own max tokens (a null falls back to
    # --max-tokens), so one run can mix short and long outputs.
    max_tokens_column: str | None = field_option(
        None, "Integer column with each row's own max tokens (null: --max-tokens).", metavar="COL"
    )
    # A column whose JSON Schema (object or JSON text) constrains that row's text.
    json_schema_column: str | None = field_option(
        None, "Column with each row's own JSON Schema (JSON text or struct).", metavar="COL"
    )
    # A column of per-row overrides (struct or JSON text) with keys of SAMPLING_OPTIONS or seed.
    sampling_column: str | None = field_option(
        None,
        "Column of per-row settings overriding the flags (JSON text or struct), e.g. "
        '{"temperature": 0.7, "n": 2, "seed": 5}.',
        metavar="COL",
    )

    @classmethod
    def of(
        cls,
        max_tokens_column: str | None = None,
        json_schema_column: str | None = None,
        sampling_column: str | None = None,
        **values: Any,
    ) -> SamplingConfig:
        """From flag values (a file flag's value is its path); None, False and empty lists
        mean "not given"."""
        given, files = [], []
        for name, value in values.items():
            if value is None or value is False or value == () or value == []:
                continue
            option = OPTIONS_BY_NAME.get(name)
            if option is not None and option.from_file:
                path = str(value)
                value = option.load(path)
                problem = option.problem(value)
                if problem:
                    raise ConfigError(f"{option.flag} {path}: {problem}")
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
                files.append((name, Path(path).name, digest))
            given.append((name, tuple(value) if isinstance(value, list) else value))
        return cls(
            tuple(given), tuple(files), max_tokens_column, json_schema_column, sampling_column
        )

    def __post_init__(self) -> None:
        for name, value in self.given:
            option = OPTIONS_BY_NAME.get(name)
            if option is None:
                raise ConfigError(f"unknown sampling option {name!r}")
            problem = option.problem(list(value) if option.multiple else value)
            if problem:
                shown = " ".join(value) if option.multiple else value
                raise ConfigError(f"{option.flag} {shown}: {problem}")
        values = dict(self.given)
        kinds = [OPTIONS_BY_NAME[n].flag for n in values if OPTIONS_BY_NAME[n].structured]
        if self.json_schema_column is not None:
            kinds.append("--json-schema-column")
        if len(kinds) > 1:
            raise ConfigError(
                f"use just one kind of structured output per run, not {' and '.join(kinds)} "
                f"(one of {STRUCTURED_FLAGS}, --json-schema-column); per-row constraints go in "
                "--sampling-column"
            )
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
        for name, file, digest in self.files:
            resolved[f"{name}_file"] = {"name": file, "sha256": digest}
        for key in ("max_tokens_column", "json_schema_column", "sampling_column"):
            if getattr(self, key) is not None:
                resolved[key] = getattr(self, key)
        if resolved["n"] > 1 and resolved["temperature"] == 0:
            raise ConfigError(_GREEDY_N.format(n=resolved["n"]))
        return resolved


def engine_params(sampling: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a sampling record that are SamplingParams arguments (structured-output
    constraints are not: see pipeline.structured.constraint)."""
    return {
        k: v
        for k, v in sampling.items()
        if k in OPTIONS_BY_NAME and not OPTIONS_BY_NAME[k].structured
    }


def row_sampling(
    base: dict[str, Any], overrides: Any, column: str, label: str | None = None
) -> tuple[dict[str, Any], Any]:
    """A row's sampling record: `base` with the row's overrides (a dict, or JSON text), and the
    row's own seed (None if it gives none). ValueError naming the key on a bad override, after
    `label` (default: the --sampling-column flag and column)."""
    where = label or f"--sampling-column {column!r}"
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is text but not JSON ({exc})") from exc
    if not isinstance(overrides, dict):
        raise ValueError(f"{where} must hold an object of settings, not {type(overrides).__name__}")
    record = dict(base)
    seed = None
    given = {k: v for k, v in overrides.items() if v is not None}  # a struct's unset fields
    for key, value in given.items():
        if key == "seed":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}: seed={value!r}: expected an int >= 0")
            seed = value
            continue
        option = OPTIONS_BY_NAME.get(key)
        if option is None:
            valid = ", ".join(sorted([*OPTIONS_BY_NAME, *ROW_ONLY_KEYS]))
            raise ValueError(f"{where}: unknown key {key!r}; valid keys: {valid}")
        if option.name == "json_schema" and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: json_schema is text but not JSON ({exc})") from exc
        if option.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        problem = option.problem(value)
        if problem:
            raise ValueError(f"{where}: {key}={value!r}: {problem}")
        if option.structured:  # a row's constraint replaces the run's
            for other in structured.ENGINE_NAMES:
                record.pop(other, None)
        record[key] = list(value) if option.multiple else value
    kinds = [k for k in given if k in structured.ENGINE_NAMES]
    if len(kinds) > 1:
        raise ValueError(f"{where}: one structured-output key per row, not {', '.join(kinds)}")
    if record["n"] > 1 and record["temperature"] == 0:
        raise ValueError(
            f"{where}: n={record['n']} with temperature 0 would repeat one "
            "text; give the row a temperature above 0 or n 1"
        )
    return record, seed


def row_seed(run_seed: int, row_id: str) -> int:
    """The sampling seed of one row: fixed by the run seed and the row id alone, so a row's
    samples are the same whatever batch, rank or resume it lands in."""
    digest = hashlib.blake2b(f"{run_seed}\x00{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)
