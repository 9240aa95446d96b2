"""The OpenAI wire format of the server engine: a PromptRow as a completions or chat request
body, and a response as ResultRows, so nothing past the engine sees the wire format."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline import structured
from pipeline.records import PromptRow, ResultRow
from pipeline.sampling import engine_params

# vLLM's sampling extensions left out of a request at their neutral value, so that a server
# without them is not sent options it may refuse.
NEUTRAL_EXTENSIONS = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def request(row: PromptRow, form: str, model: str, is_vllm: bool) -> tuple[str, dict[str, Any]]:
    """(endpoint, JSON body) for one row sent as `form`, from its sampling record, seed and
    budget; a form the row cannot be sent in falls back to text, then chat."""
    if form == "token_ids" and row.token_ids is None:
        form = "text" if row.prompt_text is not None else "chat"
    if form == "text" and row.prompt_text is None:
        form = "chat"
    body: dict[str, Any] = {"model": model}
    for key, value in engine_params(row.sampling).items():
        if NEUTRAL_EXTENSIONS.get(key, object()) == value or value == []:
            continue
        body[key] = value
    if row.max_tokens is not None:
        body["max_tokens"] = row.max_tokens
    if row.seed is not None:
        body["seed"] = row.seed
    constraint = structured.constraint(row.sampling)
    if constraint is not None:
        body["structured_outputs"] = {structured.ENGINE_NAMES[constraint[0]]: constraint[1]}
    if form == "chat":
        body["messages"] = row.messages
        return "chat/completions", body
    body["prompt"] = row.token_ids if form == "token_ids" else row.prompt_text
    if is_vllm:
        body["return_token_ids"] = True  # per-sample token counts and exact token ids
        if "logprobs" in body:
            body["return_tokens_as_token_ids"] = True  # logprob entries keyed by token id
    return "completions", body


def results(
    row: PromptRow, data: dict[str, Any], token_text: Callable[[int], str | None]
) -> list[ResultRow]:
    """A completions or chat response as the row's ResultRows; a token's text in logprob
    entries comes from `token_text` (the tokenizer's decoding)."""
    choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
    usage = data.get("usage") or {}
    if len(choices) != row.n:
        raise ValueError(f"{len(choices)} choices for n={row.n}")
    results = []
    for choice in choices:
        prompt_ids = choice.get("prompt_token_ids") or row.token_ids
        token_ids = choice.get("token_ids")
        if "message" in choice:
            text = (choice.get("message") or {}).get("content")
        else:
            text = choice.get("text")
        completion_tokens = len(token_ids) if token_ids is not None else None
        if completion_tokens is None and row.n == 1:
            completion_tokens = usage.get("completion_tokens")
        logprobs = cumulative = None
        if choice.get("logprobs") and "message" not in choice:
            logprobs = _logprob_entries(
                choice["logprobs"], row.sampling.get("logprobs"), token_text
            )
            cumulative = sum(e[2] for e in logprobs if e[2] is not None)
        prompt_logprobs = None
        if choice.get("prompt_logprobs") is not None and prompt_ids is not None:
            prompt_logprobs = _prompt_logprob_entries(
                prompt_ids, choice["prompt_logprobs"], row.sampling.get("prompt_logprobs") or 0
            )
        results.append(
            ResultRow.of(
                row,
                int(choice.get("index", 0)),
                text=text,
                finish_reason=choice.get("finish_reason"),
                prompt_tokens=len(prompt_ids) if prompt_ids else usage.get("prompt_tokens"),
                completion_tokens=completion_tokens,
                logprobs=logprobs,
                cumulative_logprob=cumulative,
                prompt_logprobs=prompt_logprobs,
            )
        )
    return results


def _logprob_entries(
    logprobs: dict[str, Any], k: int | None, token_text: Callable[[int], str | None]
) -> list:
    """The legacy completions logprobs (tokens as "token_id:N", as requested) as batchgen's
    (id, text, logprob, top-k) tuples; a token's text is the tokenizer's decoding of it."""
    entries = []
    tops = logprobs.get("top_logprobs") or []
    for i, (token, logprob) in enumerate(
        zip(logprobs.get("tokens") or [], logprobs.get("token_logprobs") or [], strict=True)
    ):
        token_id = _token_id(token)
        top = sorted(
            ((_token_id(t), lp) for t, lp in (tops[i] or {}).items()),
            key=lambda item: -item[1],
        )[: k or 0]
        entries.append(
            (
                token_id,
                token_text(token_id),
                logprob,
                [(t, token_text(t), lp) for t, lp in top],
            )
        )
    return entries


def _token_id(token: str) -> int:
    """A token of a response asked with return_tokens_as_token_ids: "token_id:123" -> 123."""
    return int(token.rsplit(":", 1)[1])


def _prompt_logprob_entries(token_ids: list[int], positions: list, k: int) -> list:
    """vLLM's prompt_logprobs ([null, {"<id>": {logprob, rank, decoded_token}}, ...]) as
    batchgen's tuples: exact ids, ranks and texts, as in the in-process engine."""
    entries = []
    for token_id, position in zip(token_ids, positions, strict=True):
        if not position:
            entries.append((token_id, None, None, []))
            continue
        chosen = position.get(str(token_id))
        top = sorted(
            (
                (int(t), lp)
                for t, lp in position.items()
                if lp.get("rank") is not None and lp["rank"] <= k
            ),
            key=lambda item: item[1]["rank"],
        )
        entries.append(
            (
                token_id,
                chosen.get("decoded_token") if chosen else None,
                chosen.get("logprob") if chosen else None,
                [(t, lp.get("decoded_token"), lp["logprob"]) for t, lp in top],
            )
        )
    return entries
