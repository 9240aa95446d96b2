"""Engines: where prompts become completions. `open_engine` gives the one for a config.

base.py         the Engine interface, stop flags and the continuous-admission loop
vllm.py         the vLLM adapter: vLLM in this process
reasoning.py    its reasoning parser: the thinking split from the answer
supervise.py    its processes: exit causes, killing the tree, the reaper, leftover shared memory
logs.py         its output: diverted to the engine log, read back for why a start failed
detach.py       its processes in a session of their own (no Ctrl-C from the terminal)
server.py       an OpenAI-compatible server (`vllm serve`) as the engine
http.py         the server engine's HTTP client: retry rules, the request loop, /tokenize
openai_wire.py  rows as OpenAI request bodies, responses as result rows
fake.py         an instant stand-in for I/O, crash and scale tests
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import EngineConfig
from pipeline.engines.base import (
    Engine,
    EngineGaveUp,
    FaultPolicy,
    RejectedPrompt,
    StopFlags,
)
from pipeline.errors import ConfigError

# Keyed by (backend, settings as JSON, model): an engine arg may hold a dict
# (--engine-arg 'speculative_config={...}'), so EngineConfig itself does not hash.
_ENGINES: dict[tuple[str, str, str], Engine] = {}


def preflight(cfg: EngineConfig, model: str) -> None:
    """Refuse, before an engine starts, engine settings this model cannot run (ConfigError)."""
    if cfg.backend == "vllm" and cfg.batch_invariant:
        from pipeline.engines.vllm import batch_invariant_problem

        problem = batch_invariant_problem()
        if problem:
            raise ConfigError(problem)
    if cfg.backend == "vllm" and cfg.reasoning_parser is not None:
        from pipeline.engines.reasoning import reasoning_problem

        problem = reasoning_problem(cfg.reasoning_parser, model)
        if problem:
            raise ConfigError(problem)


@contextlib.contextmanager
def open_engine(
    cfg: EngineConfig, model: str | None, log_path: Path | None = None
) -> Iterator[Engine]:
    """The engine for these settings, for the length of a `with` block.

    A server (`cfg.server`) is asked who it is on entry (`model` is then the served model id;
    None: the server's only one) and its client closed on leaving. An in-process engine is
    `in_process_engine`'s: started once per process and kept for later blocks, since reuse is
    what lets a test session, or a script calling `pipeline.run` per dataset, pay its start
    (tens of seconds) once.
    """
    if cfg.server is None:
        assert model is not None
        yield in_process_engine(cfg, model, log_path)
        return
    from pipeline.engines.server import ServerEngine

    server = ServerEngine(cfg, model)
    try:
        yield server
    finally:
        server.close()


def in_process_engine(cfg: EngineConfig, model: str, log_path: Path | None = None) -> Engine:
    """The in-process engine (vLLM, or the fake) for these settings, started once per process
    and reused while it lives; only one vLLM engine is kept (one fits in memory). With
    `log_path`, a new engine's own output goes to that file instead of the terminal."""
    assert cfg.server is None
    settings = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    key = (cfg.backend, settings, model)
    engine = _ENGINES.get(key)
    if engine is not None and not getattr(engine, "dead", False):
        return engine
    if cfg.backend == "fake":
        from pipeline.engines.fake import FakeEngine

        engine = FakeEngine(cfg, model)
    else:
        from pipeline.engines.vllm import VllmEngine

        for other in [k for k in _ENGINES if k[0] == "vllm"]:
            _ENGINES.pop(other).close()
        engine = VllmEngine(cfg, model, log_path)
        atexit.register(engine.close)
    _ENGINES[key] = engine
    return engine


def close_engines() -> None:
    """Stop every engine this process started, e.g. before other processes need the GPU."""
    for key in list(_ENGINES):
        _ENGINES.pop(key).close()


__all__ = [
    "close_engines",
    "Engine",
    "EngineGaveUp",
    "FaultPolicy",
    "RejectedPrompt",
    "StopFlags",
    "in_process_engine",
    "open_engine",
    "preflight",
]
