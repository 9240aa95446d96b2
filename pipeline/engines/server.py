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
import email.utils
import json
import logging
import os
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipeline import structured
from pipeline.config import EngineConfig, ServerConfig
from pipeline.engines.base import EngineGaveUp, FaultPolicy, StopFlags
from pipeline.errors import BatchgenError
from pipeline.records import PromptRow, ResultRow, error_results
from pipeline.sampling import engine_params

log = logging.getLogger("batchgen")

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# The server will not serve this run at all (wrong key, model gone): stop, do not error every row.
FATAL_STATUSES = frozenset({401, 403, 404})
BACKOFF_CAP_SECONDS = 30.0  # the longest wait between two attempts of a row (Retry-After aside)
RETRY_AFTER_CAP_SECONDS = 300.0
PROBE_TIMEOUT_SECONDS = 30.0
DEFAULT_INFLIGHT = 64
# vLLM's sampling extensions left out of a request at their neutral value, so that a server
# without them is not sent options it may refuse.
_NEUTRAL_EXTENSIONS = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


class _Transient(Exception):
    """A failure worth retrying; `retry_after` is the server's Retry-After, in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Refused(Exception):
    """The server refused this row (HTTP 400 and kin): an error row, not retried."""


class _Fatal(Exception):
    """The server refuses the whole run (HTTP 401, 403, 404): stop."""


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
                f"--server {self.url}: cannot reach the server ({_transport_reason(exc)}); "
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
            return _ServerTokenizer(self), "the server's /tokenize", None
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
            return f"the server refuses the sampling settings: {_error_message(response)}"
        return None

    # -- generating --------------------------------------------------------------------------

    def generate(
        self,
        rows: Iterable[PromptRow | None],
        flags: StopFlags,
        max_inflight: int | None = None,
        faults: FaultPolicy | None = None,
    ) -> Iterator[list[ResultRow]]:
        """Keep up to `max_inflight` requests in flight; yield each row's results as it ends.

        On `flags.stop` no row is admitted and requests in flight may finish (retries too); on
        `flags.abort` they are cancelled (their rows run again on resume). When nothing has
        succeeded for `fail_seconds`, this sets `flags.stop` with `flags.reason` itself.
        `faults` (engine restarts, stalls) does not apply: a server's failures follow the
        ServerConfig's retry rules.
        """
        limit = max_inflight or DEFAULT_INFLIGHT
        loop = _LoopThread()
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
                    try:
                        row = next(feed)
                    except StopIteration:
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
                    for future in inflight:
                        future.cancel()
                    log.warning(
                        "aborted %d unfinished requests; they will run again on resume",
                        len(inflight),
                    )
                    return
                self._check_gone(flags, len(inflight))
                finished: list[ResultRow] = []
                with contextlib.suppress(queue.Empty):
                    item = done.get(timeout=0.05)
                    while True:
                        row, future = item
                        inflight.discard(future)
                        if not future.cancelled():
                            finished.extend(self._outcome(row, future))
                        item = done.get_nowait()
                if finished:
                    yield finished
        finally:
            for future in inflight:
                future.cancel()
            loop.close(client)

    def _outcome(self, row: PromptRow, future: Future) -> list[ResultRow]:
        exc = future.exception()
        if exc is None:
            return future.result()
        if isinstance(exc, _Fatal):
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
            except _Refused as exc:
                self._stats["refused_rows"] += 1
                return error_results(row, f"the server refused this row: {exc} (not retried)")
            except _Transient as exc:
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
                self._retry_reasons[_reason_key(exc.reason)] += 1
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
            raise _Transient(f"no response within {self.server.request_timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise _Transient(_transport_reason(exc)) from None
        status = response.status_code
        if status == 200:
            try:
                return response.json()
            except ValueError:
                raise _Transient("HTTP 200 with a body that is not JSON") from None
        message = self._scrub(_error_message(response))
        reason = f"HTTP {status}: {message}" if message else f"HTTP {status}"
        if status in RETRY_STATUSES:
            raise _Transient(reason, _retry_after(response.headers.get("retry-after")))
        if status in FATAL_STATUSES:
            what = "the API key" if status in (401, 403) else f"model {self.model}"
            raise _Fatal(
                f"the server at {self.url} refused {what} ({reason}); fix it (the key in "
                f"${self.server.api_key_env}, or --model) and rerun the same command to resume"
            )
        raise _Refused(reason)

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
        key = _reason_key(reason)
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
        """(endpoint, JSON body) for one row, from its sampling record, seed and budget."""
        form = form or getattr(self, "form", None) or self.prompt_form(row.messages is not None)
        if form == "token_ids" and row.token_ids is None:
            form = "text" if row.prompt_text is not None else "chat"
        if form == "text" and row.prompt_text is None:
            form = "chat"
        body: dict[str, Any] = {"model": self.model}
        for key, value in engine_params(row.sampling).items():
            if _NEUTRAL_EXTENSIONS.get(key, object()) == value or value == []:
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
        if self.is_vllm:
            body["return_token_ids"] = True  # per-sample token counts and exact token ids
            if "logprobs" in body:
                body["return_tokens_as_token_ids"] = True  # logprob entries keyed by token id
        return "completions", body

    def _results(self, row: PromptRow, data: dict[str, Any]) -> list[ResultRow]:
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
                logprobs = self._logprob_entries(choice["logprobs"], row.sampling.get("logprobs"))
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

    def _logprob_entries(self, logprobs: dict[str, Any], k: int | None) -> list:
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
                    self._token_text(token_id),
                    logprob,
                    [(t, self._token_text(t), lp) for t, lp in top],
                )
            )
        return entries

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


class _ServerTokenizer:
    """The server's /tokenize and /detokenize, standing in for a local tokenizer where there is
    none: the prompt builder renders and counts prompts through it, one request per row (slower
    than a local tokenizer; pass --tokenizer PATH where one can be had)."""

    def __init__(self, engine: ServerEngine) -> None:
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
                reason = _transport_reason(exc)
            else:
                if response.status_code == 200:
                    return response.json()
                reason = f"HTTP {response.status_code}: {_error_message(response)}"
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


class _LoopThread:
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


def _transport_reason(exc: BaseException) -> str:
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


def _reason_key(reason: str) -> str:
    """The kind of a failure, for counting: "HTTP 503", "connection refused", "timeout"..."""
    if reason.startswith("HTTP "):
        return reason.split(":")[0]
    if reason.startswith("no response within"):
        return "timeout"
    return reason.split(":")[0]


def _retry_after(value: str | None) -> float | None:
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


def _error_message(response: Any) -> str:
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
