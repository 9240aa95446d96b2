"""Engines: where prompts become completions. `get_engine` picks and caches one.

base.py    the Engine interface, stop flags and the continuous-admission loop
vllm.py    vLLM in this process (the only module that imports vllm)
server.py  an OpenAI-compatible server (`vllm serve`) over HTTP
fake.py    an instant stand-in for I/O, crash and scale tests
"""

from __future__ import annotations

import atexit
import dataclasses
import json
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
        from pipeline.engines.vllm import reasoning_problem

        problem = reasoning_problem(cfg.reasoning_parser, model)
        if problem:
            raise ConfigError(problem)


def get_engine(cfg: EngineConfig, model: str | None, log_path: Path | None = None) -> Engine:
    """The engine for these settings, started once per process and reused by later runs.

    Reuse is what lets one test session, or a script calling `run()` per dataset, pay the
    engine's start (tens of seconds) once. With `log_path`, a new engine's own output (vLLM's
    log lines, its processes' warnings) goes to that file instead of the terminal.

    A server engine (`cfg.server`) is not cached: it costs one request to make, and each run
    must ask the server afresh who it is; `model` is then the served model id (None: the
    server's only one), and the caller closes it.
    """
    if cfg.server is not None:
        from pipeline.engines.server import ServerEngine

        return ServerEngine(cfg, model)
    assert model is not None
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

        # Only one vLLM engine fits in memory at a time: drop any other before starting.
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
    "get_engine",
    "preflight",
]
