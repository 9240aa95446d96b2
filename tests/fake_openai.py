"""A tiny OpenAI-compatible server for the --server tests that need no vLLM: threaded
http.server on 127.0.0.1, answering /v1/models, /version, /v1/completions and
/v1/chat/completions, with faults scripted per prompt and every request logged.

A completion's text says what the request asked ("ok 7 tokens seed 12 #1"), so a test can check
what was sent from the output alone. Faults are consumed in order, one per attempt of a prompt:
  ("status", 503, {"Retry-After": "1"})   answer this status (an OpenAI-style error body)
  ("drop",)                               close the connection without a response
  ("delay", 3.0)                          answer normally, this many seconds late
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Fault = tuple


class FakeOpenAI:
    """One fake server; `url` is its base URL (…/v1). Use as a context manager."""

    def __init__(
        self,
        model: str = "fake-model",
        *,
        version: str | None = "0.32.0",
        api_key: str | None = None,
        faults: dict[str, list[Fault]] | None = None,
        decode: Any = None,
        max_model_len: int | None = 512,
        gone_after: int | None = None,
        port: int = 0,
    ) -> None:
        self.model = model
        self.version = version
        self.api_key = api_key
        self.faults = {k: list(v) for k, v in (faults or {}).items()}
        self.decode = decode  # token ids -> the prompt text the faults are keyed by
        self.max_model_len = max_model_len
        self.gone_after = gone_after  # stop listening after this many answered completions
        self.log: list[dict[str, Any]] = []
        self.answered = 0
        self.gone = False  # stopped: every request, on any connection, is dropped
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if not fake._dropped(self):
                    fake._get(self)

            def do_POST(self) -> None:
                if not fake._dropped(self):
                    fake._post(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def __enter__(self) -> FakeOpenAI:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self.gone = True
        with contextlib.suppress(OSError):
            self.httpd.shutdown()
            self.httpd.server_close()

    # -- handlers ----------------------------------------------------------------------------

    def _dropped(self, h: BaseHTTPRequestHandler) -> bool:
        """Once stopped, kept-alive connections are cut too, as a dead server's would be."""
        if self.gone:
            _drop(h)
        return self.gone

    def _authorized(self, h: BaseHTTPRequestHandler) -> bool:
        if self.api_key is None:
            return True
        if h.headers.get("Authorization") == f"Bearer {self.api_key}":
            return True
        _send(h, 401, {"error": {"message": "invalid API key", "code": 401}})
        return False

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        self.log.append({"path": h.path, "auth": h.headers.get("Authorization")})
        if h.path == "/version" and self.version is not None:
            _send(h, 200, {"version": self.version})
        elif h.path == "/v1/models":
            if self._authorized(h):
                card = {"id": self.model, "object": "model", "root": self.model}
                if self.max_model_len is not None:
                    card["max_model_len"] = self.max_model_len
                _send(h, 200, {"object": "list", "data": [card]})
        else:
            _send(h, 404, {"error": {"message": f"no route {h.path}"}})

    def _post(self, h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers.get("Content-Length", 0))) or b"{}")
        chat = h.path == "/v1/chat/completions"
        if h.path not in ("/v1/completions", "/v1/chat/completions"):
            _send(h, 404, {"error": {"message": f"no route {h.path}"}})
            return
        key = self._key(body, chat)
        with self._lock:
            queue = self.faults.get(key, [])
            fault = queue.pop(0) if queue else None
            entry = {
                "path": h.path,
                "key": key,
                "fault": fault[0] if fault else None,
                "status": fault[1] if fault and fault[0] == "status" else None,
                "auth": h.headers.get("Authorization"),
                "body": body,
                "at": time.monotonic(),
            }
            self.log.append(entry)
        if not self._authorized(h):
            return
        if fault and fault[0] == "status":
            headers = fault[2] if len(fault) > 2 else {}
            _send(h, fault[1], {"error": {"message": f"injected {fault[1]}"}}, headers)
            return
        if fault and fault[0] == "drop":
            _drop(h)
            return
        if fault and fault[0] == "delay":
            time.sleep(fault[1])
        n = body.get("n", 1)
        if body.get("prompt") is not None and isinstance(body["prompt"], list):
            prompt_tokens = len(body["prompt"])
        else:
            prompt_tokens = 5
        budget = body.get("max_tokens", 16)
        produced = min(budget, 3)
        choices = []
        for i in range(n):
            text = f"ok {prompt_tokens} tokens" + (
                f" seed {body['seed']}" if "seed" in body else ""
            )
            text += f" #{i}"
            choice: dict[str, Any] = {
                "index": i,
                "finish_reason": "length" if budget <= 3 else "stop",
            }
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
                if body.get("return_token_ids"):
                    choice["token_ids"] = list(range(produced))
                    choice["prompt_token_ids"] = body["prompt"]
                if body.get("logprobs") is not None:
                    choice["logprobs"] = _logprobs(produced)
                if body.get("prompt_logprobs") is not None:
                    choice["prompt_logprobs"] = [None] + [
                        {
                            str(t): {"logprob": -1.0, "rank": 2, "decoded_token": f"p{t}"},
                            "7": {"logprob": -0.1, "rank": 1, "decoded_token": "seven"},
                        }
                        for t in body["prompt"][1:]
                    ]
            choices.append(choice)
        with contextlib.suppress(OSError):
            _send(
                h,
                200,
                {
                    "object": "text_completion",
                    "choices": list(reversed(choices)),  # any order: batchgen sorts by index
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": produced * n},
                },
            )
        entry["delivered"] = True
        with self._lock:
            self.answered += 1
            if self.gone_after is not None and self.answered >= self.gone_after:
                self.gone = True
                threading.Thread(target=self.stop, daemon=True).start()

    def _key(self, body: dict[str, Any], chat: bool) -> str:
        if chat:
            return body["messages"][-1]["content"]
        prompt = body.get("prompt")
        if isinstance(prompt, list) and self.decode is not None:
            return self.decode(prompt)
        return str(prompt)

    def requests_for(self, key: str) -> list[dict[str, Any]]:
        return [e for e in self.log if e.get("key") == key]


def _logprobs(produced: int) -> dict[str, Any]:
    """Legacy completions logprobs as vLLM sends them with return_tokens_as_token_ids: token t
    (logprob -0.5) ranks second behind t+100 (-0.25); t+200 (-3.0) is third."""
    return {
        "tokens": [f"token_id:{t}" for t in range(produced)],
        "token_logprobs": [-0.5] * produced,
        "top_logprobs": [
            {f"token_id:{t}": -0.5, f"token_id:{t + 100}": -0.25, f"token_id:{t + 200}": -3.0}
            for t in range(produced)
        ],
        "text_offset": list(range(produced)),
    }


def _drop(h: BaseHTTPRequestHandler) -> None:
    with contextlib.suppress(OSError):
        h.connection.shutdown(socket.SHUT_RDWR)
    h.close_connection = True


def _send(
    h: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict[str, str] | None = None
) -> None:
    data = json.dumps(payload).encode()
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    for name, value in (headers or {}).items():
        h.send_header(name, value)
    h.end_headers()
    h.wfile.write(data)
