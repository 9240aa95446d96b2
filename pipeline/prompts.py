"""Rows to requests: token ids from the model's own tokenizer and chat template, plus the
sampling each row is sent with.

batchgen tokenizes here, off the engine's critical path, and sends vLLM token ids. So the length
check is token-exact (the same tokenizer and template vLLM would use), and a prompt the engine
would reject becomes an error row before it can fail a batch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline import structured
from pipeline.config import PromptConfig
from pipeline.errors import BatchgenError, ConfigError
from pipeline.records import PromptRow
from pipeline.sampling import engine_params, row_sampling, row_seed

_TOKENIZERS: dict[tuple[str, bool, str], Any] = {}


def load_tokenizer(model: str, trust_remote_code: bool = False):
    """The model's tokenizer, loaded once per process and reused by later runs, like the engine.

    Loading takes ~0.2 s even when cached on disk, all of it before the first prompt reaches the
    engine; a script or test session calling `run()` per dataset pays it once. The key includes
    the model folder's file signature, so a folder whose files changed is loaded afresh.
    """
    from pipeline.models import model_signature

    key = (model, trust_remote_code, json.dumps(model_signature(model), sort_keys=True))
    tokenizer = _TOKENIZERS.get(key)
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise BatchgenError(f"--model {model}: cannot load its tokenizer ({exc})") from exc
    _TOKENIZERS[key] = tokenizer
    return tokenizer


class PromptBuilder:
    """Turns column batches into PromptRows carrying token ids and sampling, or an error.

    `sampling` is the run's resolved sampling record, given to every row; when it samples
    (temperature above 0), each row gets its own seed from `seed` and its id.
    """

    def __init__(
        self,
        cfg: PromptConfig,
        tokenizer: Any,
        keep_columns: tuple[str, ...] = (),
        max_tokens_column: str | None = None,
        sampling: dict[str, Any] | None = None,
        seed: int = 0,
        adapters: tuple[str, ...] = (),
        lora_column: str | None = None,
        model_names: tuple[str, ...] = (),
    ):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.keep_columns = keep_columns
        self.max_tokens_column = max_tokens_column
        self.sampling = sampling if sampling is not None else {}
        self.seed = seed
        self.seeded = self.sampling.get("temperature", 0) > 0
        self.adapters = adapters
        self.lora_column = lora_column
        # --openai-batch: the names a line's model may give for the base model.
        self.model_names = model_names
        # One adapter and no column: every row runs with it.
        self.default_adapter = adapters[0] if len(adapters) == 1 and lora_column is None else None
        self.max_model_len: int | None = None  # set once the engine reports it
        self.chat_template: str | None = None
        # No tokenizer (a --server run with neither a local one nor the server's /tokenize):
        # rows keep their text or messages, unrendered and uncounted, for the server to handle.
        if cfg.uses_chat_template and tokenizer is not None:
            if cfg.chat_template is not None:
                path = Path(cfg.chat_template)
                if not path.is_file():
                    raise ConfigError(f"--chat-template {path}: no such file")
                self.chat_template = path.read_text()
            else:
                self.chat_template = getattr(tokenizer, "chat_template", None)
            if not self.chat_template and cfg.request_column is None:
                flag = "--chat" if cfg.chat else "--messages-column"
                raise ConfigError(
                    f"{flag} needs a chat template, and the model's tokenizer has none; pass "
                    "--chat-template FILE.jinja, or use --prompt-column/--template without --chat"
                )

    def columns(self) -> dict[str, str]:
        """Input columns this builder reads, with the flag that named each."""
        cfg = self.cfg
        wanted: dict[str, str] = {}
        if cfg.prompt_column is not None:
            wanted[cfg.prompt_column] = "--prompt-column"
        if cfg.messages_column is not None:
            wanted[cfg.messages_column] = "--messages-column"
        if cfg.request_column is not None:
            wanted[cfg.request_column] = "--openai-batch"
        if cfg.template is not None:
            for name in cfg.template_fields():
                wanted.setdefault(name, "--template field")
        for name in self.keep_columns:
            wanted.setdefault(name, "--keep-columns")
        if self.max_tokens_column is not None:
            wanted.setdefault(self.max_tokens_column, "--max-tokens-column")
        if self.lora_column is not None:
            wanted.setdefault(self.lora_column, "--lora-column")
        for key in ("json_schema_column", "sampling_column"):
            if key in self.sampling:
                wanted.setdefault(self.sampling[key], "--" + key.replace("_", "-"))
        return wanted

    def check_types(self, field: Callable[[str], pa.Field]) -> None:
        """Refuse, before any engine time, a column whose type can never give a prompt: an
        integer --prompt-column would otherwise make every row an error row."""
        cfg = self.cfg
        checks = [
            (cfg.prompt_column, "--prompt-column", _is_text, "text (string)"),
            (cfg.messages_column, "--messages-column", _is_messages, "a list of messages or text"),
            (self.max_tokens_column, "--max-tokens-column", _is_number, "whole numbers"),
            (self.lora_column, "--lora-column", _is_text, "adapter names (text)"),
            (
                self.sampling.get("json_schema_column"),
                "--json-schema-column",
                _is_object,
                "JSON Schemas as JSON text or structs",
            ),
            (
                self.sampling.get("sampling_column"),
                "--sampling-column",
                _is_object,
                "settings as structs or JSON text",
            ),
        ]
        for column, flag, ok, expected in checks:
            if column is None:
                continue
            kind = field(column).type
            if not ok(kind):
                fix = {
                    "--prompt-column": f"use --template '{{{column}}}' to format it into text",
                    "--messages-column": "store messages as [{role, content}, ...] or JSON text",
                    "--max-tokens-column": "cast it to integers",
                    "--lora-column": "store adapter names as text",
                    "--json-schema-column": "store each schema as JSON text",
                    "--sampling-column": 'store settings as JSON text, e.g. {"temperature": 0.7}',
                }[flag]
                raise ConfigError(
                    f"{flag} {column!r} has type {kind}, but it must hold {expected}; {fix}"
                )

    def build(
        self, ids: list[str], columns: dict[str, list[Any]], seqs: list[int] | range
    ) -> list[PromptRow]:
        """PromptRows for one batch; `seqs` are the rows' positions in the rank's input."""
        rows: list[PromptRow] = []
        for i, row_id in enumerate(ids):
            row = PromptRow(
                id=row_id,
                seq=seqs[i],
                passthrough={c: columns[c][i] for c in self.keep_columns},
                sampling=self.sampling,
                adapter=self.default_adapter,
                # Per-row seed: a row's samples do not depend on its batch, rank or resume.
                seed=row_seed(self.seed, row_id) if self.seeded else None,
            )
            values = {c: v[i] for c, v in columns.items()}
            try:
                if self.cfg.request_column is not None:
                    self._batch_request(row, values[self.cfg.request_column])
                self._request(row, values)
                self._render(row, values)
            except _RowError as exc:
                row.error = str(exc)
            rows.append(row)
        self._tokenize([r for r in rows if r.error is None])
        return rows

    def _batch_request(self, row: PromptRow, request: Any) -> None:
        """A batch file line (pipeline/batchfile.py): its error, else its model: the base
        model under one of its names, or an adapter."""
        if request.error is not None:
            raise _RowError(request.error)
        model = request.model
        if model is None or model in self.model_names:
            return
        if model in self.adapters:
            row.adapter = model
            return
        served = ", ".join(repr(n) for n in (*self.model_names, *self.adapters))
        raise _RowError(
            f"{request.place}: model {model!r} is not served by this run; it serves "
            f"{served}: set the line's model to one of them, or add the adapter with --lora"
        )

    def _request(self, row: PromptRow, values: dict[str, Any]) -> None:
        """The row's own request settings: its adapter (--lora-column), its schema
        (--json-schema-column) or its overrides (--sampling-column), and the seed that goes
        with them."""
        if self.lora_column is not None:
            name = values[self.lora_column]
            if name is not None and name not in self.adapters:
                known = ", ".join(self.adapters)
                raise _RowError(
                    f"--lora-column {self.lora_column!r} names adapter {name!r}, which no --lora "
                    f"gives; the adapters are: {known} (a null row runs the base model)"
                )
            row.adapter = name
        schema_column = self.sampling.get("json_schema_column")
        if schema_column is not None:
            value = values[schema_column]
            if value is None:
                raise _RowError(f"--json-schema-column {schema_column!r} is null for this row")
            try:
                schema = structured.parse_schema(value)
            except ValueError as exc:
                raise _RowError(f"--json-schema-column {schema_column!r}: {exc}") from exc
            row.sampling = {**self.sampling, "json_schema": schema}
        sampling_column = self.sampling.get("sampling_column")
        if sampling_column is not None and values[sampling_column] is not None:
            try:
                label = None
                if self.cfg.request_column is not None:
                    label = values[self.cfg.request_column].place
                row.sampling, seed = row_sampling(
                    row.sampling, values[sampling_column], sampling_column, label
                )
            except ValueError as exc:
                raise _RowError(str(exc)) from exc
            if seed is not None:
                row.seed = seed
            elif row.sampling["temperature"] > 0:
                row.seed = row_seed(self.seed, row.id)
            else:
                row.seed = None
        if sampling_column is not None:
            own = {k: v for k, v in engine_params(row.sampling).items()}
            if row.seed is not None:
                own["seed"] = row.seed
            constraint = structured.constraint(row.sampling)
            if constraint is not None:
                own[constraint[0]] = constraint[1]
            row.sampling_note = json.dumps(own, sort_keys=True)

    def _render(self, row: PromptRow, values: dict[str, Any]) -> None:
        cfg = self.cfg
        if self.max_tokens_column is not None:
            row.max_tokens = _max_tokens(values[self.max_tokens_column], self.max_tokens_column)
        if cfg.messages_column is not None:
            row.messages = _parse_messages(values[cfg.messages_column], cfg.messages_column)
        elif cfg.request_column is not None:
            request = values[cfg.request_column]
            row.messages, row.prompt = request.messages, request.prompt
            if row.messages is None and not row.prompt.strip():
                raise _RowError(f"{request.place}: the prompt is empty; give it text")
            if row.messages is not None and not self.chat_template and self.tokenizer is not None:
                raise _RowError(
                    f"{request.place}: a chat request, and the model has no chat template; "
                    "pass --chat-template FILE.jinja"
                )
        else:
            if cfg.prompt_column is not None:
                text = values[cfg.prompt_column]
                if text is None:
                    raise _RowError(f"column {cfg.prompt_column!r} is null")
                if not isinstance(text, str):
                    raise _RowError(
                        f"column {cfg.prompt_column!r} holds {type(text).__name__}, not text"
                    )
            else:
                assert cfg.template is not None
                nulls = [k for k in cfg.template_fields() if values[k] is None]
                if nulls:
                    raise _RowError(f"--template column(s) {', '.join(map(repr, nulls))} null")
                text = cfg.template.format_map(values)
            if not cfg.chat and not text.strip():
                # Checked on the text: a tokenizer that adds BOS would make '' one token long.
                # (A chat message renders the template around it, so it is still a prompt.)
                raise _RowError("the prompt is empty" if text == "" else "the prompt is blank")
            row.prompt = text
            if cfg.chat:
                row.messages = [{"role": "user", "content": text}]
        if row.messages is not None:
            messages = row.messages
            if cfg.system_prompt is not None and messages and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
            row.messages = messages  # as rendered: what a server's chat endpoint is sent
            if self.tokenizer is None:
                return
            try:
                row.prompt_text = self.tokenizer.apply_chat_template(
                    messages,
                    chat_template=self.chat_template,
                    tokenize=False,
                    add_generation_prompt=True,
                    **dict(cfg.chat_template_kwargs),
                )
            except Exception as exc:  # a template may raise anything on odd input
                raise _RowError(f"the chat template failed on this row: {exc}") from exc
        else:
            row.prompt_text = row.prompt

    def _tokenize(self, rows: list[PromptRow]) -> None:
        if self.tokenizer is None:
            return
        # A rendered chat prompt already holds the template's special tokens (BOS included);
        # adding them again would double the BOS. Plain prompts get them, as vLLM would add.
        for chat in (True, False):
            group = [r for r in rows if (r.messages is not None) == chat]
            if not group:
                continue
            encoded = self.tokenizer([r.prompt_text for r in group], add_special_tokens=not chat)[
                "input_ids"
            ]
            for row, ids in zip(group, encoded, strict=True):
                row.token_ids = ids
                row.error = self._length_error(len(ids))

    def _length_error(self, n: int) -> str | None:
        if n == 0:
            return "the prompt is empty (0 tokens)"
        limit = self.max_model_len
        if limit is not None and n >= limit:
            return (
                f"the prompt is {n} tokens; the model's context (--max-model-len) is {limit}, "
                "which must hold the prompt and at least one output token"
            )
        return None


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_messages(t: pa.DataType) -> bool:
    lists = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t)
    return lists or _is_text(t) or pa.types.is_null(t)


def _is_object(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) or _is_text(t) or pa.types.is_null(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)


class _RowError(Exception):
    """A problem confined to one row: it becomes that row's error, never a failed run."""


# An error row's kind, from its message, for `batchgen plan` and `batchgen report`: the first
# pattern that matches names it. The messages are made in this module (and the engines' refusals).
ERROR_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("over-long", r"^the prompt is \d+ tokens; "),
        ("empty", r"^the prompt is empty"),
        ("blank", r"^the prompt is blank"),
        ("null", r"^column .* is null$|^--template column\(s\) .* null$"),
        ("not text", r"^column .* holds \w+, not text$"),
        ("bad messages", r"^column .*(not JSON messages|non-empty list|message \d+ has no)"),
        ("chat template failed", r"^the chat template failed"),
        ("bad max tokens", r"^--max-tokens-column "),
        ("rejected by the engine", r"^vLLM rejected the prompt|^prompt of \d+ tokens is too long"),
    )
)


def error_kind(message: str) -> str:
    """The kind of an error row (a key of ERROR_KINDS), or "other"."""
    for kind, pattern in ERROR_KINDS:
        if pattern.search(message):
            return kind
    return "other"


def _max_tokens(value: Any, column: str) -> int | None:
    """A row's own max tokens; None (a null) means the run's --max-tokens."""
    if value is None:
        return None
    # pandas stores an integer column with nulls as floats: accept 64.0, refuse 64.5 and NaN.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _RowError(
            f"--max-tokens-column {column!r} holds {value!r}; expected a whole number >= 1"
        )
    return value


def _parse_messages(value: Any, column: str) -> list[dict[str, Any]]:
    if value is None:
        raise _RowError(f"column {column!r} is null")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise _RowError(f"column {column!r} is text but not JSON messages ({exc})") from exc
    if not isinstance(value, list) or not value:
        raise _RowError(f"column {column!r} must be a non-empty list of {{role, content}} messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _RowError(f"column {column!r}: message {i} has no 'role'")
        if not isinstance(m.get("content"), str):
            raise _RowError(f"column {column!r}: message {i} has no text 'content'")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages
