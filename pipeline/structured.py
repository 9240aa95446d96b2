"""Structured output: the shape a row's text must take (a JSON schema, one of a list of choices,
a regex or a grammar), checked before any engine time and checked again on the text that came
back (`parsed_ok`). The engine enforces the constraint while decoding (vLLM's structured
outputs); this module never imports vLLM.
"""

from __future__ import annotations

import json
import re
from typing import Any

# The structured-output options of pipeline.sampling, and vLLM's name for each.
ENGINE_NAMES = {"json_schema": "json", "choice": "choice", "regex": "regex", "grammar": "grammar"}


def schema_problem(schema: Any) -> str | None:
    """Why `schema` is not a usable JSON Schema, or None."""
    if not isinstance(schema, dict):
        return f"a JSON Schema must be a JSON object, not {type(schema).__name__}"
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "the top level"
        return f"not a valid JSON Schema at {where}: {exc.message}"
    return None


def parse_schema(value: Any) -> dict[str, Any]:
    """A schema given as an object or as JSON text; ValueError naming the problem."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the schema is not JSON ({exc})") from exc
    problem = schema_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def choice_problem(choices: list[str]) -> str | None:
    if len(choices) < 2:
        return "give at least two choices (with one, the answer is known in advance)"
    if any(c == "" for c in choices):
        return "a choice cannot be empty"
    if len(set(choices)) != len(choices):
        return "the choices repeat a value"
    return None


def regex_problem(pattern: str) -> str | None:
    if not pattern:
        return "the regex is empty"
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"the regex does not compile ({exc})"
    return None


def grammar_problem(grammar: str) -> str | None:
    return None if grammar.strip() else "the grammar is empty"


def constraint(sampling: dict[str, Any]) -> tuple[str, Any] | None:
    """(option name, value) of the structured-output constraint in a sampling record, if any."""
    for name in ENGINE_NAMES:
        if name in sampling:
            return name, sampling[name]
    return None


def parsed_ok(kind: str, value: Any, text: str | None, finish_reason: str | None) -> bool | None:
    """Whether a constrained text is complete and valid: it parses and validates against its
    JSON schema, or is one of the choices, or matches the regex in full. None where batchgen
    cannot tell (a grammar, which only the engine's grammar compiler reads)."""
    if text is None:
        return None
    if finish_reason == "length":
        return False  # cut off by max_tokens: incomplete, whatever it looks like
    if kind == "choice":
        return text in value
    if kind == "regex":
        try:
            return re.fullmatch(value, text) is not None
        except re.error:
            return None
    if kind == "json_schema":
        import jsonschema

        try:
            jsonschema.validate(json.loads(text), value)
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False
        return True
    return None
