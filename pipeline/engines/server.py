"""A running OpenAI-compatible server (`vllm serve MODEL --model-impl transformers`) as the engine.

`ServerEngine` sends each PromptRow as one HTTP request and turns each response into ResultRows
here, so nothing downstream sees the wire format. Requests run on an asyncio loop in a
background thread (httpx), at most `max_inflight` at once; results are yielded on the calling
thread as they complete, in any order. This module never imports vllm.

What is sent (the prompt form, recorded in the run's settings):
  token_ids  the completions endpoint with the token ids batchgen rendered and counted (vLLM
             accepts them): the prompt and its length check are exactly batchgen's
  text       the completions endpoint with the rendered prompt text, for servers that take no
             token ids; the server tokenizes it again
  chat       the chat endpoint with the row's messages, when no tokenizer is at hand to render
             them; the server applies its own chat template

Failures: a transient one (connection refused or reset, a timeout, HTTP 408, 429, 500, 502, 503,
504) is retried with exponential backoff and jitter, or after the server's Retry-After, up to
`max_retries` times per row; a row refused outright (HTTP 400, 413, 422: too long, bad input)
becomes an error row at once. A row out of retries becomes an error row only while the server
answers (other requests succeed, or its model list does); while nothing answers, rows wait, and
after `fail_seconds` of nothing but failures the run stops like a graceful stop (exit 75).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import random
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipeline import structured
from pipeline.config import EngineConfig, ServerConfig
from pipeline.engines.base import (
    EngineGaveUp,
    Faults,
    Results,
    Rows,
    StopFlags,
)
from pipeline.engines.http import (
    BACKOFF_CAP_SECONDS,
    FATAL_STATUSES,
    PROBE_TIMEOUT_SECONDS,
    RETRY_AFTER_CAP_SECONDS,
    RETRY_STATUSES,
    Fatal,
    LoopThread,
    Refused,
    ServerTokenizer,
    Transient,
    error_message,
    reason_key,
    retry_after,
    transport_reason,
)
from pipeline.engines.openai_wire import request as wire_request
from pipeline.engines.openai_wire import results as wire_results
from pipeline.errors import BatchgenError
from pipeline.records import PromptRow, ResultRow, error_results

log = logging.getLogger("batchgen")

DEFAULT_INFLIGHT = 64
_END: Any = object()  # the end of the rows


class ServerEngine:
    """An OpenAI-compatible server, asked who it is on construction: the model is checked
    against its /v1/models and its version read from /version, before any row is sent."""

    def __init__(self, cfg: EngineConfig, model: str | None) -> None:
        assert cfg.server is not None
        started = time.monotonic()
        self.cfg = cfg
        self.server: ServerConfig = cfg.server
        self.api_base = self.server.url.rstrip("/")
        parts = urlsplit(self.api_base)
        # Recorded and logged: never a query string, which some gateways use for keys.
        self.url = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        root_path = parts.path[: -len("/v1")] if parts.path.endswith("/v1") else parts.path
        self.root = urlunsplit((parts.scheme, parts.netloc, root_path, "", ""))
        self._key = os.environ.get(self.server.api_key_env) or None
        self._headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        self.failures: list[dict[str, Any]] = []  # engine deaths: a server has none of ours
        self.dead = False
        self.closed = False
        self.prefix_cache_resets = 0

        import httpx

        self._sync = httpx.Client(headers=self._headers, timeout=PROBE_TIMEOUT_SECONDS)
        try:
            card = self._served_model(model)
            self.model: str = card["id"]
            limit = card.get("max_model_len")
            self.max_model_len: int | None = int(limit) if isinstance(limit, int) else None
            self.version = self._server_version()
            self.is_vllm = self.version is not None
            self.tokenizer, self.tokenizer_source, self.model_dir = self._tokenizer(card)
        except BaseException:
            self._sync.close()
            raise
        self._stats: Counter[str] = Counter()
        self._retry_reasons: Counter[str] = Counter()
        self._warned: set[str] = set()
        self._last_success = 0.0
        self._failing_since: float | None = None
        self._last_failure = ""
        self.start_seconds = time.monotonic() - started
        log.info(
            "server %s serves %s (%s); tokenizer: %s",
            self.url,
            self.model,
            f"vLLM {self.version}" if self.is_vllm else "not vLLM, or no /version",
            self.tokenizer_source,
        )

    # -- asking the server who it is -------------------------------------------------------

    def _get(self, url: str, what: str) -> Any:
        """GET a JSON document; BatchgenError naming the server and the fix on any failure."""
        import httpx

        try:
            response = self._sync.get(url)
        except httpx.HTTPError as exc:
            raise BatchgenError(
                f"--server {self.url}: cannot reach the server ({transport_reason(exc)}); "
                "start it (vllm serve MODEL --model-impl transformers --host HOST --port PORT) "
                "or fix the URL; nothing was written"
            ) from None
        if response.status_code in (401, 403):
            raise BatchgenError(
                f"--server {self.url}: the server refused the API key (HTTP "
                f"{response.status_code} on {what}); set ${self.server.api_key_env} to the key "
                "the server was started with (vllm serve --api-key), or name another variable "
                "with --api-key-env; nothing was written"
            )
        if response.status_code != 200:
            hint = "" if self.api_base.endswith("/v1") else " (did you mean the URL ending in /v1?)"
            raise BatchgenError(
                f"--server {self.url}: {what} answered HTTP {response.status_code}{hint}; give "
                "the base URL of an OpenAI-compatible server, e.g. http://gpu7:8000/v1; nothing "
                "was written"
            )
        try:
            return response.json()
        except ValueError:
            raise BatchgenError(
                f"--server {self.url}: {what} did not answer JSON; is this an OpenAI-compatible "
                "server? nothing was written"
            ) from None

    def _served_model(self, model: str | None) -> dict[str, Any]:
        """The /v1/models entry of `model` (the only one when None); BatchgenError otherwise."""
        listing = self._get(f"{self.api_base}/models", "GET /models")
        cards = [c for c in listing.get("data", []) if isinstance(c, dict) and "id" in c]
        ids = [c["id"] for c in cards]
        if model is None:
            if len(cards) == 1:
                return cards[0]
            raise BatchgenError(
                f"--server {self.url} serves {len(cards)} models ({', '.join(ids) or 'none'}); "
                "name one with --model; nothing was written"
            )
        for card in cards:
            if card["id"] == model:
                return card
        raise BatchgenError(
            f"--model {model}: the server at {self.url} does not serve it; it serves "
            f"{', '.join(ids) or 'no model'}; pass --model with one of those (the name given to "
            "vllm serve, or its --served-model-name), or point --server at a server of that "
            "model; nothing was written"
        )

    def _server_version(self) -> str | None:
        """vLLM's version from GET /version; None for a server without it (not vLLM)."""
        import httpx

        try:
            response = self._sync.get(f"{self.root}/version")
            version = response.json().get("version") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return str(version) if version else None

    def _tokenizer(self, card: dict[str, Any]) -> tuple[Any, str, str | None]:
        """(tokenizer, where it came from, the local model folder if any): --tokenizer, else the
        model folder when it is on this machine (the served id, or the path vLLM reports as the
        model's root), else the server's /tokenize, else None (no length pre-check)."""
        from pipeline.prompts import load_tokenizer

        trust = self.cfg.trust_remote_code
        if self.server.tokenizer is not None:
            path = Path(self.server.tokenizer).expanduser()
            name = str(path.resolve()) if path.exists() else self.server.tokenizer
            folder = name if (Path(name) / "config.json").is_file() else None
            return load_tokenizer(name, trust), f"--tokenizer {name}", folder
        for candidate in (card["id"], card.get("root")):
            if isinstance(candidate, str) and (Path(candidate) / "config.json").is_file():
                folder = str(Path(candidate).resolve())
                return load_tokenizer(folder, trust), f"the model folder {folder}", folder
        if self.is_vllm and self._has_tokenize():
            return ServerTokenizer(self), "the server's /tokenize", None
        log.warning(
            "no local tokenizer for %s (pass --tokenizer PATH for one) and the server has no "
            "/tokenize: prompts go as text, and the token-exact length check before sending is "
            "skipped (the server refuses an over-long prompt; that row becomes an error row)",
            self.model,
        )
        return None, "none (length pre-check skipped)", None

    def _has_tokenize(self) -> bool:
        import httpx

        try:
            response = self._sync.post(
                f"{self.root}/tokenize", json={"model": self.model, "prompt": "a"}
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def generation_defaults(self) -> dict[str, Any]:
        """The model's generation_config.json defaults when its folder is here, else none (then
        unset sampling options take vLLM's neutral values, sent explicitly)."""
        from pipeline.models import generation_defaults

        return generation_defaults(self.model_dir) if self.model_dir else {}

    def prompt_form(self, uses_chat_template: bool) -> str:
        """How rows are sent: token_ids, text or chat (see the module docstring)."""
        form = self.server.prompt_form
        if form != "auto":
            return form
        if self.tokenizer is not None and self.is_vllm:
            return "token_ids"
        if self.tokenizer is None and uses_chat_template:
            return "chat"
        return "text"

    def settings(self, uses_chat_template: bool) -> dict[str, Any]:
        """What the run's fingerprint records of the server: a resume against another model,
        prompt form or tokenizer is refused. The URL is not in it (a server may move hosts),
        nor the version (an upgraded server may finish a run, as an upgraded vLLM may)."""
        from pipeline.models import model_signature

        self.form = self.prompt_form(uses_chat_template)
        tokenizer: Any = self.tokenizer_source
        if self.model_dir is not None:
            tokenizer = {"folder": model_signature(self.model_dir)}
        elif self.server.tokenizer is not None:
            tokenizer = {"name": self.server.tokenizer}
        return {
            "mode": "openai",
            "model": self.model,
            "prompt_form": self.form,
            "tokenizer": tokenizer,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "engine": "server",
            "model": self.model,
            "model_impl": None,  # the server's --model-impl; it does not report it
            "dtype": None,
            "max_model_len": self.max_model_len,
            "vllm": self.version,
            "transformers": None,
            "server": {
                "url": self.url,
                "version": self.version,
                "prompt_form": getattr(self, "form", None),
                "tokenizer": self.tokenizer_source,
                "api_key_env": self.server.api_key_env,
                "api_key_set": self._key is not None,
            },
        }

    def request_stats(self) -> dict[str, Any]:
        """Requests, retries by reason and rows the server failed, for the run report."""
        return {
            "requests": self._stats["requests"],
            "retries": self._stats["retries"],
            "retry_reasons": dict(sorted(self._retry_reasons.items())),
            "refused_rows": self._stats["refused_rows"],
            "failed_rows": self._stats["failed_rows"],
        }

    def check_sampling(self, sampling: dict[str, Any]) -> str | None:
        """Why this server would refuse every request of this sampling record, or None; a vLLM
        server is asked with one 1-token request when the record holds structured output or
        logprobs (what a server may refuse), so a bad setting is a usage error up front."""
        form = getattr(self, "form", None) or self.prompt_form(False)
        wants_logprobs = "logprobs" in sampling or "prompt_logprobs" in sampling
        constraint = structured.constraint(sampling)
        if wants_logprobs and (form == "chat" or not self.is_vllm):
            return (
                "--logprobs/--prompt-logprobs with --server need a vLLM server and the "
                "completions endpoint (token ids); this server is "
                f"{'not vLLM' if not self.is_vllm else 'sent chat messages'}; pass --tokenizer "
                "PATH, or drop the logprob flags"
            )
        if constraint is not None and not self.is_vllm:
            return (
                f"--{constraint[0].replace('_', '-')} with --server needs a vLLM server (its "
                "structured_outputs option); this server does not report a vLLM version"
            )
        if not (wants_logprobs or constraint is not None):
            return None
        probe = PromptRow(id="probe", seq=-1, prompt="Hi", prompt_text="Hi", sampling=sampling)
        endpoint, body = self._request(probe, form="text")
        body["max_tokens"] = 1
        import httpx

        try:
            response = self._sync.post(f"{self.api_base}/{endpoint}", json=body)
        except httpx.HTTPError:
            return None  # unreachable now: the run's own retry rules apply
        if response.status_code in (400, 422):
            return f"the server refuses the sampling settings: {error_message(response)}"
        return None

    # -- generating --------------------------------------------------------------------------

    def generate(
        self, rows: Rows, flags: StopFlags, max_inflight: int | None = None, faults: Faults = None
    ) -> Results:
        """Keep up to `max_inflight` requests in flight; yield each row's results as it ends.

        On `flags.stop` no row is admitted and requests in flight may finish (retries too); on
        `flags.abort` they are cancelled (their rows run again on resume). When nothing has
        succeeded for `fail_seconds`, this sets `flags.stop` with `flags.reason` itself.
        `faults` (engine restarts, stalls) does not apply: a server's failures follow the
        ServerConfig's retry rules.
        """
        limit = max_inflight or DEFAULT_INFLIGHT
        loop = LoopThread()
        done: queue.Queue[tuple[PromptRow, Future]] = queue.Queue()
        inflight: set[Future] = set()
        feed = iter(rows)
        exhausted = False
        client = None
        self._failing_since = None
        try:
            client = loop.submit(self._async_client(limit)).result()
            while True:
                while not exhausted and not flags.stop.is_set() and len(inflight) < limit:
                    row = next(feed, _END)
                    if row is _END:
                        exhausted = True
                        break
                    if row is None:
                        if inflight:
                            break  # nothing ready: collect results instead of waiting
                        continue
                    if row.error is not None:
                        yield error_results(row, row.error)
                        continue
                    future = loop.submit(self._row(client, row))
                    inflight.add(future)
                    future.add_done_callback(lambda f, r=row: done.put((r, f)))
                if not inflight:
                    if exhausted or flags.stop.is_set():
                        return
                    continue
                if flags.abort.is_set():
                    log.warning(
                        "aborted %d unfinished requests; they will run again on resume",
                        len(inflight),
                    )
                    return  # the finally cancels them
                self._check_gone(flags, len(inflight))
                finished = self._collect(done, inflight)
                if finished:
                    yield finished
        finally:
            for future in inflight:
                future.cancel()
            loop.close(client)

    def _collect(
        self, done: queue.Queue[tuple[PromptRow, Future]], inflight: set[Future]
    ) -> list[ResultRow]:
        """The results of the requests that ended (waiting a moment for the first)."""
        finished: list[ResultRow] = []
        with contextlib.suppress(queue.Empty):
            item = done.get(timeout=0.05)
            while True:
                row, future = item
                inflight.discard(future)
                if not future.cancelled():
                    finished.extend(self._outcome(row, future))
                item = done.get_nowait()
        return finished

    def _outcome(self, row: PromptRow, future: Future) -> list[ResultRow]:
        exc = future.exception()
        if exc is None:
            return future.result()
        if isinstance(exc, Fatal):
            raise EngineGaveUp(str(exc))
        raise exc

    def _check_gone(self, flags: StopFlags, inflight: int) -> None:
        """Stop the run when every request has failed for --server-fail-seconds."""
        since = self._failing_since
        if since is None or flags.stop.is_set():
            return
        failing = time.monotonic() - since
        if failing < self.server.fail_seconds:
            return
        flags.reason = (
            f"the server at {self.url} answered no request for {failing:.0f} s "
            f"(--server-fail-seconds {self.server.fail_seconds:g}; last failure: "
            f"{self._last_failure}); what finished is committed, rerun the same command to "
            "resume once the server is back"
        )
        log.warning("stopping: %s", flags.reason)
        flags.stop.set()
        flags.abort.set()  # the requests in flight are failing anyway: redone on resume
        log.info("%d request(s) in flight were dropped", inflight)

    async def _async_client(self, limit: int) -> Any:
        import httpx

        return httpx.AsyncClient(
            headers=self._headers,
            timeout=httpx.Timeout(
                self.server.request_timeout, connect=min(30.0, self.server.request_timeout)
            ),
            limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
        )

    async def _row(self, client: Any, row: PromptRow) -> list[ResultRow]:
        """One row's request, retried as the module docstring says; its result rows."""
        endpoint, body = self._request(row)
        url = f"{self.api_base}/{endpoint}"
        attempts = 0
        first_failure: float | None = None
        while True:
            attempts += 1
            try:
                data = await self._post(client, url, body)
            except Refused as exc:
                self._stats["refused_rows"] += 1
                return error_results(row, f"the server refused this row: {exc} (not retried)")
            except Transient as exc:
                now = time.monotonic()
                first_failure = first_failure or now
                self._failed(exc.reason, now)
                if attempts > self.server.max_retries:
                    alive = self._last_success > first_failure or await self._answers(client)
                    if alive:
                        self._stats["failed_rows"] += 1
                        return error_results(
                            row,
                            f"the server failed this row {attempts} times (--max-retries "
                            f"{self.server.max_retries}); last failure: {exc.reason}",
                        )
                    # Nothing answers: wait for the server rather than erroring the row; the
                    # run stops after --server-fail-seconds if it stays gone.
                self._stats["retries"] += 1
                self._retry_reasons[reason_key(exc.reason)] += 1
                self._warn_once(exc.reason)
                await asyncio.sleep(self._delay(attempts, exc.retry_after))
                continue
            self._last_success = time.monotonic()
            self._failing_since = None
            try:
                return self._results(row, data)
            except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
                self._stats["refused_rows"] += 1
                return error_results(
                    row, f"the server's answer could not be read ({type(exc).__name__}: {exc})"
                )

    async def _post(self, client: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        self._stats["requests"] += 1
        try:
            response = await client.post(url, json=body)
        except httpx.TimeoutException:
            raise Transient(f"no response within {self.server.request_timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise Transient(transport_reason(exc)) from None
        status = response.status_code
        if status == 200:
            try:
                return response.json()
            except ValueError:
                raise Transient("HTTP 200 with a body that is not JSON") from None
        message = self._scrub(error_message(response))
        reason = f"HTTP {status}: {message}" if message else f"HTTP {status}"
        if status in RETRY_STATUSES:
            raise Transient(reason, retry_after(response.headers.get("retry-after")))
        if status in FATAL_STATUSES:
            what = "the API key" if status in (401, 403) else f"model {self.model}"
            raise Fatal(
                f"the server at {self.url} refused {what} ({reason}); fix it (the key in "
                f"${self.server.api_key_env}, or --model) and rerun the same command to resume"
            )
        raise Refused(reason)

    async def _answers(self, client: Any) -> bool:
        """Whether the server answers at all: its model list, fetched now."""
        import httpx

        try:
            response = await client.get(f"{self.api_base}/models", timeout=PROBE_TIMEOUT_SECONDS)
        except httpx.HTTPError:
            return False
        if response.status_code == 200:
            self._last_success = time.monotonic()
            self._failing_since = None
            return True
        return False

    def _failed(self, reason: str, now: float) -> None:
        if self._failing_since is None:
            self._failing_since = now
        self._last_failure = reason

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """The wait before the next attempt: Retry-After when the server gave one, else the
        exponential backoff with full jitter in its upper half."""
        if retry_after is not None:
            return min(retry_after, RETRY_AFTER_CAP_SECONDS)
        base = min(BACKOFF_CAP_SECONDS, self.server.retry_backoff_seconds * 2 ** (attempt - 1))
        return base * random.uniform(0.5, 1.0)

    def _warn_once(self, reason: str) -> None:
        key = reason_key(reason)
        if key in self._warned:
            log.debug("retrying after %s", reason)
            return
        self._warned.add(key)
        log.warning(
            "server: %s; retrying (up to --max-retries %d per row; further retries of this kind "
            "are counted in the run report)",
            reason,
            self.server.max_retries,
        )

    def _scrub(self, text: str) -> str:
        """A server's message without the API key, should it ever echo the request."""
        return text.replace(self._key, "***") if self._key else text

    # -- requests and responses --------------------------------------------------------------

    def _request(self, row: PromptRow, form: str | None = None) -> tuple[str, dict[str, Any]]:
        """(endpoint, JSON body) for one row, in the run's prompt form unless `form` is given."""
        form = form or getattr(self, "form", None) or self.prompt_form(row.messages is not None)
        return wire_request(row, form, self.model, self.is_vllm)

    def _results(self, row: PromptRow, data: dict[str, Any]) -> list[ResultRow]:
        return wire_results(row, data, self._token_text)

    def _token_text(self, token_id: int) -> str | None:
        decode = getattr(self.tokenizer, "decode", None)
        return decode([token_id]) if decode is not None else None

    def reset_prefix_cache(self) -> bool:
        """Ask the server to forget cached prompt prefixes (for `batchgen bench`); whether it
        did. vLLM serves POST /reset_prefix_cache only when started with VLLM_SERVER_DEV_MODE=1."""
        import httpx

        try:
            response = self._sync.post(f"{self.root}/reset_prefix_cache")
        except httpx.HTTPError:
            return False
        if response.status_code == 200:
            self.prefix_cache_resets += 1
        return response.status_code == 200

    def close(self) -> None:
        """Close the probe client; a server is someone else's to stop."""
        if not self.closed:
            self._sync.close()
            self.closed = True
