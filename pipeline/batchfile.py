"""One line of a batch request file (OpenAI Batch API, `vllm run-batch`, Anthropic Message
Batches) as one batchgen request: the prompt (chat messages or completion text), the row's own
sampling settings in SAMPLING_OPTIONS' names, the model it asks for, or the reason it cannot be
served. Each problem is worded with the line, the field and the fix, and becomes that line's
error row; nothing here raises on a bad line. Never imports vLLM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.sampling import OPTIONS_BY_NAME

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
ANTHROPIC_URL = "/v1/messages"  # recorded for Anthropic lines, whose requests have no url
URLS = (CHAT_URL, COMPLETIONS_URL)

# Body fields that change nothing batchgen writes: accepted and ignored.
_INERT = {"user", "metadata", "store", "service_tier", "stream_options"}
# OpenAI (and vLLM) body fields -> SAMPLING_OPTIONS names, taken as given.
_DIRECT = {
    "temperature": "temperature",
    "top_p": "top_p",
    "n": "n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    # vLLM's extras that batchgen has too
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos",
    "prompt_logprobs": "prompt_logprobs",
}
# vLLM's structured_outputs keys -> batchgen's structured options.
_STRUCTURED = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
_CHAT_ONLY = {"messages", "max_completion_tokens", "top_logprobs"}
_COMPLETION_ONLY = {"prompt"}
_SHARED = {
    "model",
    "max_tokens",
    "stop",
    "seed",
    "logprobs",
    "response_format",
    "structured_outputs",
    "stream",
    *_DIRECT,
    *_INERT,
}
# Anthropic params -> handled here; anything else is refused like an unknown OpenAI field.
_ANTHROPIC = {
    "model",
    "max_tokens",
    "messages",
    "system",
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "metadata",
    "stream",
}


@dataclass(slots=True)
class BatchRequest:
    """One line, understood: its id, endpoint, model, prompt and settings, or its error."""

    line: int
    place: str = ""  # "line N of FILE", for messages
    custom_id: str | None = None
    url: str | None = None
    model: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class LineError(Exception):
    """What is wrong with one line: becomes its error row."""


def parse_line(text: str, line: int, where: str) -> BatchRequest:
    """The request on line `line` (1-based) of the file named `where`; `.error` says why it
    cannot be served, naming the line, the field and the fix."""
    request = BatchRequest(line, f"line {line} of {where}")
    try:
        _parse(text, request)
    except LineError as exc:
        request.error = f"{request.place}: {exc}"
    return request


def _parse(text: str, request: BatchRequest) -> None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineError(
            f"not JSON ({exc.msg} at column {exc.colno}); write one JSON object per line"
        ) from None
    if not isinstance(obj, dict):
        raise LineError(f"a {type(obj).__name__}, not a JSON object; write one object per line")
    custom_id = obj.get("custom_id")
    if custom_id is None:
        raise LineError('no custom_id; give every line a unique "custom_id": "..."')
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError(f"custom_id {custom_id!r} is not a non-empty string; quote it")
    request.custom_id = custom_id
    if "params" in obj and "body" not in obj:
        _anthropic(obj, request)
        return
    unknown = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise LineError(
            f"unknown key(s) {', '.join(unknown)}; a line holds custom_id, method, url and body"
        )
    if obj.get("method", "POST") != "POST":
        raise LineError(f'method {obj.get("method")!r}; batch requests are "POST"')
    url = obj.get("url")
    if url not in URLS:
        raise LineError(f"url {url!r} is not served here; use {CHAT_URL!r} or {COMPLETIONS_URL!r}")
    request.url = url
    body = obj.get("body")
    if not isinstance(body, dict):
        raise LineError('no "body" object; give the request\'s parameters in "body"')
    _openai_body(body, request)


def _openai_body(body: dict[str, Any], request: BatchRequest) -> None:
    chat = request.url == CHAT_URL
    allowed = _SHARED | (_CHAT_ONLY if chat else _COMPLETION_ONLY)
    for key in body:
        if key not in allowed:
            raise LineError(_unsupported(f"body.{key}", key))
    request.model = _model(body.get("model"), "body.model")
    if body.get("stream"):
        raise LineError("body.stream is true; batch results are whole responses: drop stream")
    if chat:
        request.messages = _messages(body.get("messages"), "body.messages")
    else:
        request.prompt = _completion_prompt(body.get("prompt"))
    sampling = request.sampling
    for key, name in _DIRECT.items():
        if body.get(key) is not None:
            sampling[name] = _checked(name, body[key], f"body.{key}")
    budget = body.get("max_completion_tokens") if chat else None
    budget = budget if budget is not None else body.get("max_tokens")
    if budget is not None:
        key = "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
        sampling["max_tokens"] = _checked("max_tokens", budget, f"body.{key}")
    if body.get("stop") is not None:
        sampling["stop"] = _stop(body["stop"], "body.stop")
    if body.get("seed") is not None:
        sampling["seed"] = _seed(body["seed"], "body.seed")
    _logprobs(body, chat, sampling)
    _structured(body, sampling)
    _n_greedy(sampling, "body.n")


def _anthropic(obj: dict[str, Any], request: BatchRequest) -> None:
    """An Anthropic Message Batches request: {"custom_id", "params": {...}}."""
    request.url = ANTHROPIC_URL
    params = obj["params"]
    if not isinstance(params, dict):
        raise LineError('"params" is not an object; give the Messages API parameters there')
    for key in params:
        if key not in _ANTHROPIC:
            raise LineError(_unsupported(f"params.{key}", key))
    if params.get("stream"):
        raise LineError("params.stream is true; batch results are whole responses: drop stream")
    request.model = _model(params.get("model"), "params.model")
    if params.get("max_tokens") is None:
        raise LineError("params.max_tokens is missing; the Messages API requires it")
    messages = _messages(params.get("messages"), "params.messages", anthropic=True)
    system = params.get("system")
    if system is not None:
        text = _text_parts(system, "params.system") if isinstance(system, list) else system
        if not isinstance(text, str):
            raise LineError("params.system is neither text nor a list of text blocks")
        messages = [{"role": "system", "content": text}, *messages]
    request.messages = messages
    sampling = request.sampling
    sampling["max_tokens"] = _checked("max_tokens", params["max_tokens"], "params.max_tokens")
    for key in ("temperature", "top_p", "top_k"):
        if params.get(key) is not None:
            sampling[key] = _checked(key, params[key], f"params.{key}")
    if params.get("stop_sequences") is not None:
        sampling["stop"] = _stop(params["stop_sequences"], "params.stop_sequences")


def _unsupported(where: str, key: str) -> str:
    what = {
        "tools": "tool calling",
        "tool_choice": "tool calling",
        "parallel_tool_calls": "tool calling",
        "functions": "function calling",
        "function_call": "function calling",
        "audio": "audio output",
        "modalities": "audio output",
        "logit_bias": "logit bias",
        "thinking": "extended thinking settings",
    }.get(key, "this field")
    return f"{where}: batchgen cannot honour {what}; remove {key!r} from the request"


def _model(value: Any, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise LineError(f"{where} is not a string; name the served model")
    return value


def _messages(value: Any, where: str, anthropic: bool = False) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise LineError(f"{where} is missing or empty; give a list of {{role, content}} messages")
    roles = ("user", "assistant") if anthropic else ("system", "developer", "user", "assistant")
    messages = []
    for i, m in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise LineError(f'{at} is not an object; write {{"role": ..., "content": ...}}')
        for key in m:
            if key not in ("role", "content"):
                raise LineError(_unsupported(f"{at}.{key}", key))
        role = m.get("role")
        if role not in roles:
            raise LineError(f"{at}.role {role!r} is not served here; use one of {', '.join(roles)}")
        content = m.get("content")
        if isinstance(content, list):
            content = _text_parts(content, f"{at}.content")
        if not isinstance(content, str):
            raise LineError(f"{at}.content is missing; give the message's text")
        messages.append({"role": "system" if role == "developer" else role, "content": content})
    return messages


def _text_parts(parts: list[Any], where: str) -> str:
    """Text content parts joined; any other part (image, audio, file, document) refused."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise LineError(
                f"{where}[{j}] is a {kind or type(part).__name__!s} part; batchgen serves text "
                "parts only: remove it or send the text alone"
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _completion_prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        raise LineError(
            "body.prompt is a list; batchgen takes one text prompt per line: split it into "
            "one line per prompt (token-id prompts are not supported)"
        )
    raise LineError("body.prompt is missing; give the prompt text")


def _checked(name: str, value: Any, where: str) -> Any:
    option = OPTIONS_BY_NAME[name]
    if option.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    problem = option.problem(value)
    if problem:
        raise LineError(f"{where}={json.dumps(value)}: {problem}; fix the value")
    return value


def _stop(value: Any, where: str) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise LineError(f"{where} must be a string or a list of non-empty strings")
    return stops


def _seed(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LineError(f"{where}={json.dumps(value)}: expected a whole number >= 0")
    return value


def _logprobs(body: dict[str, Any], chat: bool, sampling: dict[str, Any]) -> None:
    value = body.get("logprobs")
    if chat:
        top = body.get("top_logprobs")
        if top is not None and not value:
            raise LineError("body.top_logprobs needs body.logprobs true; set it")
        if value not in (None, False, True):
            raise LineError(f"body.logprobs={json.dumps(value)}: expected true or false")
        if value:
            sampling["logprobs"] = _checked("logprobs", top or 0, "body.top_logprobs")
    elif value is not None:
        sampling["logprobs"] = _checked("logprobs", value, "body.logprobs")


def _structured(body: dict[str, Any], sampling: dict[str, Any]) -> None:
    given = []
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if schema is None:
                raise LineError(
                    "body.response_format.json_schema.schema is missing; give the schema"
                )
            given.append(("json_schema", schema, "body.response_format.json_schema.schema"))
        elif kind == "json_object":
            given.append(("json_schema", {"type": "object"}, "body.response_format"))
        elif kind != "text":
            raise LineError(
                f"body.response_format.type {kind!r}: expected json_schema, json_object or text"
            )
    outputs = body.get("structured_outputs")
    if outputs is not None:
        if not isinstance(outputs, dict):
            raise LineError("body.structured_outputs is not an object")
        for key, value in outputs.items():
            if key not in _STRUCTURED:
                raise LineError(_unsupported(f"body.structured_outputs.{key}", key))
            if value is not None:
                given.append((_STRUCTURED[key], value, f"body.structured_outputs.{key}"))
    if len(given) > 1:
        raise LineError(
            f"{' and '.join(w for _, _, w in given)}: one structured-output constraint per "
            "request; keep one"
        )
    for name, value, where in given:
        if name == "json_schema" and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise LineError(f"{where} is text but not JSON; give the schema object") from None
        sampling[name] = _checked(name, value, where)


def _n_greedy(sampling: dict[str, Any], where: str) -> None:
    if sampling.get("n", 1) > 1 and sampling.get("temperature") == 0:
        raise LineError(
            f"{where}={sampling['n']} with temperature 0 would repeat one text; set a "
            "temperature above 0 or n 1"
        )
