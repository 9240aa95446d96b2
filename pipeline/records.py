"""The two record types every stage speaks: a prompt row in, a result row out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline import structured


@dataclass(slots=True)
class PromptRow:
    """One input row on its way to the engine: the request, built once per row.

    `seq` is the row's position in this rank's slice of the input; it orders rows in a shard.
    The prompt builder fills `prompt_text` and `token_ids`, or `error` when the row cannot be
    sent (null or malformed value, empty or over-long prompt): such a row becomes an error
    result instead of failing its batch. `sampling` is the resolved sampling record that applies
    to the row (one shared dict for every row without overrides) and `seed` its own sampling
    seed (None when decoding is greedy); engines send exactly these.
    """

    id: str
    seq: int
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    passthrough: dict[str, Any] = field(default_factory=dict)
    prompt_text: str | None = None
    token_ids: list[int] | None = None
    error: str | None = None
    max_tokens: int | None = None  # this row's own budget (--max-tokens-column), else the run's
    sampling: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    # The row's own settings as JSON, written to the `sampling` column (--sampling-column runs).
    sampling_note: str | None = None
    adapter: str | None = None  # the LoRA adapter this row runs with (None: the base model)
    # A digest of the whole request (pipeline.reuse.keys), set once the request is final.
    request_key: bytes | None = None
    # --reuse: the row's outputs found in an earlier run; it is not sent to the engine.
    reused: list[ResultRow] | None = None

    @property
    def n(self) -> int:
        return self.sampling.get("n", 1)


@dataclass(slots=True)
class ResultRow:
    """One output row: one sample of one prompt, or the error that kept the prompt from the engine."""

    id: str
    seq: int
    sample_index: int
    text: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    error: str | None = None
    prompt: str | None = None
    passthrough: dict[str, Any] = field(default_factory=dict)
    # Structured output: the (option, value) constraint the text was generated under.
    constraint: tuple[str, Any] | None = None
    # Per output token: (token id, token text, logprob, top alternatives as (id, text, logprob)).
    logprobs: list[tuple[int, str | None, float, list[tuple[int, str | None, float]]]] | None = None
    cumulative_logprob: float | None = None
    # Per prompt token, the same; the first prompt token has no logprob (None).
    prompt_logprobs: list[tuple[int, str | None, float | None, list]] | None = None
    sampling: str | None = None  # the row's own settings (--sampling-column), as JSON
    adapter: str | None = None
    # --reasoning-parser: the thinking, apart from the answer in `text`; whether it ended.
    reasoning: str | None = None
    reasoning_tokens: int | None = None
    reasoning_ended: bool | None = None
    request_key: bytes | None = None
    reused_from: str | None = None  # --reuse: the earlier shard this row's outputs came from
    # Prompt tokens the engine's prefix cache served instead of computing (vLLM's
    # num_cached_tokens; None where the engine does not say). Counted, never written.
    cached_tokens: int | None = None

    @classmethod
    def of(cls, row: PromptRow, sample_index: int, **fields: Any) -> ResultRow:
        """A result of `row`: the row's id, order, prompt, passthrough columns and request
        settings, plus the engine's `fields`."""
        return cls(
            id=row.id,
            seq=row.seq,
            sample_index=sample_index,
            prompt=row.prompt_text if row.prompt_text is not None else row.prompt,
            passthrough=row.passthrough,
            constraint=structured.constraint(row.sampling),
            sampling=row.sampling_note,
            adapter=row.adapter,
            request_key=row.request_key,
            **fields,
        )

    @property
    def weight(self) -> int:
        """What the row costs to hold before its shard is written: 1, plus its logprob entries."""
        weight = 1
        for entries in (self.logprobs, self.prompt_logprobs):
            if entries:
                weight += sum(1 + len(e[3]) for e in entries)
        return weight


def error_results(row: PromptRow, error: str) -> list[ResultRow]:
    """The output rows of a prompt that never reached the engine (one per requested sample)."""
    tokens = len(row.token_ids) if row.token_ids is not None else None
    return [
        ResultRow.of(
            row,
            i,
            text=None,
            finish_reason=None,
            prompt_tokens=tokens,
            completion_tokens=None,
            error=error,
        )
        for i in range(row.n)
    ]
