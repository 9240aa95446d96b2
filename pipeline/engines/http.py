"""The HTTP side of the server engine: which answers are retried, refused or fatal, the asyncio
loop the requests run on, failure reasons in a few words, and the server's /tokenize standing in
for a local tokenizer. Knows nothing of rows or results (pipeline.engines.openai_wire does)."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import threading
import time
from concurrent.futures import Future
from typing import Any

from pipeline.errors import BatchgenError

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# The server will not serve this run at all (wrong key, model gone): stop, do not error every row.
FATAL_STATUSES = frozenset({401, 403, 404})
BACKOFF_CAP_SECONDS = 30.0  # the longest wait between two attempts of a row (Retry-After aside)
RETRY_AFTER_CAP_SECONDS = 300.0
PROBE_TIMEOUT_SECONDS = 30.0


class Transient(Exception):
    """A failure worth retrying; `retry_after` is the server's Retry-After, in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Refused(Exception):
    """The server refused this row (HTTP 400 and kin): an error row, not retried."""


class Fatal(Exception):
    """The server refuses the whole run (HTTP 401, 403, 404): stop."""


class LoopThread:
    """An asyncio loop on a daemon thread; coroutines are submitted from the calling thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="batchgen-server-requests", daemon=True
        )
        self.thread.start()

    def submit(self, coro: Any) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self, client: Any) -> None:
        """Cancel what still runs, close `client` (an httpx.AsyncClient), stop the loop."""

        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if client is not None:
                await client.aclose()

        with contextlib.suppress(Exception):
            self.submit(shutdown()).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


class ServerTokenizer:
    """The server's /tokenize and /detokenize, standing in for a local tokenizer where there is
    none: the prompt builder renders and counts prompts through it, one request per row (slower
    than a local tokenizer; pass --tokenizer PATH where one can be had)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        # The server's own template: the builder only needs to know there is one; its text is
        # not available, so the fingerprint records this name instead.
        self.chat_template = f"(the chat template of the server's {engine.model})"
        self._rendered: dict[str, list[int]] = {}

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        url = f"{self.engine.root}/{path}"
        for attempt in range(4):
            try:
                response = self.engine._sync.post(url, json={"model": self.engine.model, **body})
            except httpx.HTTPError as exc:
                reason = transport_reason(exc)
            else:
                if response.status_code == 200:
                    return response.json()
                reason = f"HTTP {response.status_code}: {error_message(response)}"
                if response.status_code not in RETRY_STATUSES:
                    raise ValueError(f"the server's /{path} refused it ({reason})")
            time.sleep(0.5 * 2**attempt)
        raise BatchgenError(f"the server's /{path} failed 4 times; last: {reason}")

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        chat_template: str | None = None,
        tokenize: bool = False,
        add_generation_prompt: bool = True,
    ) -> str:
        body: dict[str, Any] = {
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "add_special_tokens": False,
        }
        if chat_template and chat_template != self.chat_template:
            body["chat_template"] = chat_template  # --chat-template FILE
        ids = self._post("tokenize", body)["tokens"]
        text = self._post("detokenize", {"tokens": ids})["prompt"]
        self._rendered[text] = ids  # the ids the server rendered, used as they are
        return text

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        ids = []
        for text in texts:
            cached = self._rendered.pop(text, None)
            if cached is None:
                body = {"prompt": text, "add_special_tokens": add_special_tokens}
                cached = self._post("tokenize", body)["tokens"]
            ids.append(cached)
        return {"input_ids": ids}

    def decode(self, token_ids: list[int]) -> str:
        return self._post("detokenize", {"tokens": token_ids})["prompt"]


def transport_reason(exc: BaseException) -> str:
    """A connection failure in a few words, without the request (which holds no key, but may
    hold a long prompt)."""
    import httpx

    if isinstance(exc, httpx.ConnectError):
        return "connection refused" if "refused" in str(exc).lower() else f"cannot connect: {exc}"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "connection dropped by the server"
    if isinstance(exc, httpx.ReadError | httpx.WriteError):
        return "connection reset"
    return f"{type(exc).__name__}: {exc}"


def reason_key(reason: str) -> str:
    """The kind of a failure, for counting: "HTTP 503", "connection refused", "timeout"..."""
    if reason.startswith("HTTP "):
        return reason.split(":")[0]
    if reason.startswith("no response within"):
        return "timeout"
    return reason.split(":")[0]


def retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_message(response: Any) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}}), else its text."""
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:500]
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
        if isinstance(error, str):
            return error[:500]
        if data.get("detail"):
            return json.dumps(data["detail"])[:500]
    return json.dumps(data)[:500]
