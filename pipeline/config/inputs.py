"""Where a run's rows come from (SourceConfig) and how each becomes a prompt (PromptConfig)."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError
from pipeline.options import key_value_option, option


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """Where rows come from and how each gets its stable id."""

    parquet: str | None = option(None, "Parquet file, folder (recursive) or glob.", metavar="PATH")
    # A batch request file (OpenAI Batch API / vllm run-batch, or Anthropic Message Batches
    # JSONL): each line's custom_id is the row id, its body the prompt and its own settings.
    openai_batch: str | None = option(
        None,
        "Batch request JSONL (OpenAI / vllm run-batch / Anthropic): file, folder or glob; "
        "see docs/openai-batch.md.",
        metavar="PATH",
    )
    dataset: str | None = option(
        None,
        "HF hub id, local dataset folder (save_to_disk or data files), or builder name "
        "(json, csv, parquet, text) with --data-files.",
        metavar="NAME",
    )
    data_files: tuple[str, ...] = option(
        (), "Data files for --dataset; repeatable, globs ok.", metavar="PATH", multiple=True
    )
    config_name: str | None = option(
        None, "Dataset configuration (subset) for --dataset.", metavar="NAME"
    )
    split: str = option("train", "Split of --dataset.")
    revision: str | None = option(None, "Hub revision of --dataset.", metavar="REV")
    # Streaming reads a hub dataset without downloading it first; every rank then reads the
    # whole stream and keeps every num_ranks-th row, so prefer non-streaming for big arrays.
    streaming: bool = option(False, "Stream --dataset instead of preparing it first.")
    id_column: str | None = option(
        None,
        "Unique row ids from this column [default: file:row or split:row position].",
        metavar="COL",
    )
    # A plain file, folder-free glob or list of files whose format its extension names
    # (.parquet, .jsonl/.json, .csv); mapped onto --parquet or the `datasets` builder.
    input: str | None = option(
        None,
        "Input file or glob; its extension names the format (.parquet, .jsonl, .json, .csv).",
        metavar="PATH",
    )
    # Only the first N rows of this rank's slice (a quick try); not part of the run's settings,
    # so a later run without it resumes and does the rest.
    limit: int | None = option(
        None,
        "Only the first N rows of the input (of this rank): a quick try; a later run "
        "without --limit does the rest.",
        metavar="N",
    )

    def __post_init__(self) -> None:
        if self.input is not None:
            if any(v is not None for v in (self.parquet, self.dataset, self.openai_batch)):
                raise ConfigError(
                    "give one input: --input, --parquet, --dataset or --openai-batch, not two"
                )
            builder = input_builder(self.input)
            if builder == "parquet":
                object.__setattr__(self, "parquet", self.input)
            else:
                object.__setattr__(self, "dataset", builder)
                object.__setattr__(self, "data_files", (self.input,))
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit {self.limit}: give a number of rows, 1 or more")
        inputs = [v for v in (self.parquet, self.dataset, self.openai_batch) if v is not None]
        if len(inputs) != 1:
            raise ConfigError(
                "give exactly one input: --input PATH, --parquet PATH, --dataset NAME_OR_DIR or "
                "--openai-batch FILE.jsonl"
            )
        if self.openai_batch is not None and self.id_column is not None:
            raise ConfigError(
                "--id-column: with --openai-batch each line's custom_id is the row id; drop it"
            )
        if self.parquet is not None and (
            self.data_files or self.config_name or self.revision or self.streaming
        ):
            raise ConfigError(
                "--data-files, --config-name, --revision and --streaming apply to --dataset, "
                "not to --parquet"
            )

    @property
    def label(self) -> str:
        """The input as plan and report lines name it: the files, not a builder's name."""
        if self.parquet is not None:
            return self.parquet
        if self.dataset in INPUT_FORMATS.values() and self.data_files:
            return ", ".join(self.data_files)
        return str(self.dataset)


# File extensions --input reads, and the `datasets` builder (or Parquet reader) of each.
INPUT_FORMATS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".csv": "csv",
}


def input_builder(path: str) -> str:
    """The reader of an --input path, from its extension (a glob's pattern included)."""
    name = path.rstrip("/").lower()
    for extension in sorted(INPUT_FORMATS, key=len, reverse=True):
        if name.endswith(extension):
            return INPUT_FORMATS[extension]
    raise ConfigError(
        f"--input {path}: cannot tell its format from the extension; --input reads "
        f"{', '.join(INPUT_FORMATS)} files (globs ok); for other inputs use --dataset "
        "NAME_OR_DIR (a Hub id, a dataset folder, or a `datasets` builder with --data-files)"
    )


@dataclass(frozen=True, slots=True)
class PromptConfig:
    """How a row becomes a prompt."""

    prompt_column: str | None = option(None, "Column holding the prompt text.", metavar="COL")
    template: str | None = option(
        None, "Prompt built from columns, e.g. 'Summarize:\\n{text}'.", metavar="TEXT"
    )
    messages_column: str | None = option(
        None, "Column of chat messages [{role, content}, ...].", metavar="COL"
    )
    chat: bool = option(False, "Send the prompt as one user message through the chat template.")
    system_prompt: str | None = option(
        None, "System message for --chat / --messages-column.", metavar="TEXT"
    )
    chat_template: str | None = option(
        None, "Jinja chat template replacing the model's own.", metavar="FILE"
    )
    # Variables for the chat template (--chat-template-kwarg enable_thinking=false): they
    # change the prompt tokens, so they are part of the run's settings.
    chat_template_kwargs: tuple[tuple[str, Any], ...] = key_value_option(
        "A variable for the chat template, e.g. enable_thinking=false; JSON values.",
        "--chat-template-kwarg",
        "enable_thinking=false",
    )
    # A column of whole requests (set by --openai-batch, never a flag of its own): each row's
    # messages or prompt text, the model it names, or why it cannot be served.
    request_column: str | None = None

    def __post_init__(self) -> None:
        if self.request_column is not None:
            self._check_requests()
            return
        given = self._given("prompt_column", "template", "messages_column")
        if len(given) != 1:
            raise ConfigError(
                "give exactly one of --prompt-column, --template or --messages-column"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.messages_column is not None and self.chat:
            raise ConfigError(
                "--messages-column is always rendered with the chat template; drop --chat"
            )
        if self.system_prompt is not None and not self.uses_chat_template:
            raise ConfigError("--system-prompt needs --chat or --messages-column")
        if self.chat_template is not None and not self.uses_chat_template:
            raise ConfigError("--chat-template needs --chat or --messages-column")
        if self.chat_template_kwargs and not self.uses_chat_template:
            raise ConfigError("--chat-template-kwarg needs --chat or --messages-column")
        if self.template is not None:
            self.template_fields()  # raises on a malformed template

    def _check_requests(self) -> None:
        """With --openai-batch each line gives its prompt: refuse the flags that would too."""
        given = self._given("prompt_column", "template", "messages_column", "chat")
        if given:
            raise ConfigError(
                f"{', '.join(given)}: with --openai-batch each line's body gives the prompt "
                "(messages: chat template; prompt: as is); drop them"
            )

    def _given(self, *names: str) -> list[str]:
        """The flags of these fields that are set (a switch: when on), in this order."""
        return ["--" + n.replace("_", "-") for n in names if getattr(self, n) not in (None, False)]

    @property
    def uses_chat_template(self) -> bool:
        return self.chat or self.messages_column is not None or self.request_column is not None

    def template_fields(self) -> list[str]:
        """Column names a --template refers to, in order of first use."""
        assert self.template is not None
        fields: list[str] = []
        try:
            parsed = list(string.Formatter().parse(self.template))
        except ValueError as exc:
            raise ConfigError(
                f"--template {self.template!r} is not a valid format string ({exc}); "
                "write literal braces as {{ and }}"
            ) from exc
        for _, name, _, _ in parsed:
            if name is None:
                continue
            if name == "" or not name.isidentifier() and not name.replace("-", "_").isidentifier():
                raise ConfigError(
                    f"--template field {{{name}}} must name a column, e.g. {{text}}; "
                    "write literal braces as {{ and }}"
                )
            if name not in fields:
                fields.append(name)
        if not fields:
            raise ConfigError(
                "--template names no column; use e.g. --template 'Summarize:\\n{text}'"
            )
        return fields
