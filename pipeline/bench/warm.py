"""Warm sides: each side of a comparison on engines of its own, in worker processes started
once and kept for every round, so rounds can alternate without restarting an engine.

A side is raw vLLM (one `LLM.generate` call over the job's rows, given as token ids) or
`batchgen run` (the whole runner, Parquet in and out), on one engine or on several replicas
sharing the GPU (each replica a rank of the rows, in a process of its own, as `batchgen run
--replicas-per-gpu` runs them). Every engine of every side stays up for the whole comparison;
one that is not running a pass waits idle (vLLM's engine core blocks on its input queue), so on
a GPU with memory to spare the sides do not disturb each other. Each engine's memory share is
computed as for replicas (pipeline/replicas.py): the raw side too gets a share instead of
vLLM's 0.9, which is stated in every report.

A pass is timed by this process, from the moment it tells a side's workers to go until the last
one answers, so replicas count as one side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.bench.probe import GpuBusy, tree_cpu_seconds
from pipeline.config import EngineConfig, RunConfig
from pipeline.errors import BatchgenError

log = logging.getLogger("batchgen")

READY_TIMEOUT = 1800.0  # an engine's first start on a fresh GPU host: ~200 s seen
PASS_TIMEOUT = 3600.0


@dataclass(frozen=True, slots=True)
class Side:
    """One side of a comparison."""

    name: str  # "raw", "batchgen", "batchgen x2"
    kind: str  # "raw": one LLM.generate call; "batchgen": the whole runner; "trial": see sample
    engine: EngineConfig
    replicas: int = 1  # processes, each a rank of the rows on an engine of its own
    env: dict[str, str] = field(default_factory=dict)  # every worker's, e.g. the KV cache share
    # kind "trial" (`batchgen tune`): `Engine.generate` over the first `sample` rows of the
    # input, each replica taking every replicas-th of them.
    sample: int | None = None


@dataclass(slots=True)
class Pass:
    """One timed pass of one side over every row."""

    side: str
    seconds: float
    rows: int
    prompt_tokens: int
    output_tokens: int
    gpu_busy: float | None = None  # mean share of time the GPU ran a kernel
    front_cpu: float | None = None  # CPU seconds per second of the workers themselves
    core_cpu: float | None = None  # ... of their children (vLLM's engine cores)
    # kind "trial": every row's text, (id, sample index) -> text (error rows: their error)
    texts: dict[tuple[str, int], str | None] | None = None

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["texts"]
        out["seconds"] = round(self.seconds, 2)
        out["output_tok_s"] = round(self.output_tok_s, 1)
        return out


class _Worker:
    """One worker process: one engine, one rank of the rows."""

    def __init__(self, side: Side, rank: int, run_cfg: RunConfig, work: Path) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.side, self.rank = side, rank
        self.conn, child = ctx.Pipe()
        cfg = dataclasses.replace(
            run_cfg, engine=side.engine, num_ranks=side.replicas, rank=rank, engine_log=True
        )
        out = work / f"{_slug(side.name)}-r{rank}"
        self.proc = ctx.Process(
            target=_worker_main,
            args=(child, side.kind, cfg, out, side.env, side.sample),
            name=f"bench-{_slug(side.name)}-{rank}",
        )  # not a daemon: vLLM starts its engine core as a child process
        self.proc.start()
        child.close()
        self.start_seconds: float | None = None
        self.tunables: dict[str, Any] = {}
        self.kv_cache_tokens: int | None = None
        self.busy = True  # starting its engine, or running a pass: not reading its pipe

    def ask(self, *message: Any) -> None:
        self.conn.send(message)
        self.busy = message[0] in ("pass", "trace")

    def answer(self, timeout: float) -> tuple:
        if not self.conn.poll(timeout):
            raise BatchgenError(
                f"bench worker {self.proc.name} gave no answer in {timeout:.0f} s; its engine "
                f"log is under the bench's work folder"
            )
        try:
            reply = self.conn.recv()
            self.busy = False
        except EOFError:
            raise BatchgenError(
                f"bench worker {self.proc.name} died (exit {self.proc.exitcode}); its engine "
                "log is under the bench's work folder"
            ) from None
        if reply[0] == "error":
            raise BatchgenError(f"bench worker {self.proc.name}: {reply[1]}")
        return reply


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


class WarmSides:
    """The workers of every side: started once (`start`), timed pass by pass (`run_pass`),
    closed at the end (`close`, also as a context manager)."""

    def __init__(
        self,
        sides: list[Side],
        run_cfg: RunConfig,
        work: Path,
        parallel: bool,
        first_alone: bool = True,
    ) -> None:
        self.sides = {s.name: s for s in sides}
        self.run_cfg, self.work = run_cfg, work
        self.parallel = parallel  # start the engines at once (a GPU host), else one by one
        # Start the first engine before the rest: a host's first start of a model compiles it
        # (~3 minutes on an H100), and the others then reuse its compile cache. False where an
        # engine of these settings already started on this host (a tune's trials after its
        # baseline, its --verify): waiting for the first would only add a whole engine start.
        self.first_alone = first_alone
        self.workers: dict[str, list[_Worker]] = {}
        self.starts: dict[str, list[float]] = {}

    def __enter__(self) -> WarmSides:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start every engine: where `parallel`, the first alone when `first_alone`, then the
        rest at once; else one by one."""
        order = [(s, r) for s in self.sides.values() for r in range(s.replicas)]
        pending: list[_Worker] = []
        for i, (side, rank) in enumerate(order):
            with _stops_held():  # a stop raised mid-spawn would orphan a half-started child
                worker = _Worker(side, rank, self.run_cfg, self.work)
                self.workers.setdefault(side.name, []).append(worker)
            pending.append(worker)
            if not self.parallel or (i == 0 and self.first_alone):
                self._ready(pending)
                pending = []
        self._ready(pending)

    def _ready(self, workers: list[_Worker]) -> None:
        for w in workers:
            _, seconds, w.tunables, w.kv_cache_tokens = w.answer(READY_TIMEOUT)
            w.start_seconds = seconds
            self.starts.setdefault(w.side.name, []).append(round(seconds, 1))
            log.info("bench: %s rank %d ready (engine start %.1f s)", w.side.name, w.rank, seconds)

    def tunables(self, name: str) -> dict[str, Any]:
        return self.workers[name][0].tunables

    def kv_cache_tokens(self, name: str) -> int | None:
        """One engine's KV cache, in tokens (a side's replicas are alike)."""
        return self.workers[name][0].kv_cache_tokens

    def run_pass(self, name: str, tag: str, trace: bool = False) -> Pass:
        """One timed pass of side `name` over every row; `tag` names its output folders. With
        `trace`, each engine's profiler (configured at its start) traces the pass."""
        workers = self.workers[name]
        before = [tree_cpu_seconds(w.proc.pid) for w in workers]
        busy = GpuBusy(_first_gpu()).start()
        started = time.monotonic()
        for w in workers:
            w.ask("trace" if trace else "pass", tag)
        replies = [w.answer(PASS_TIMEOUT) for w in workers]
        seconds = time.monotonic() - started
        gpu_busy = busy.stop()
        after = [tree_cpu_seconds(w.proc.pid) for w in workers]
        front = sum(a[0] - b[0] for a, b in zip(after, before, strict=True)) / seconds
        core = sum(a[1] - b[1] for a, b in zip(after, before, strict=True)) / seconds
        texts = None
        if all(len(r) > 4 for r in replies):
            texts = {k: v for r in replies for k, v in r[4].items()}
        return Pass(
            name,
            seconds,
            sum(r[1] for r in replies),
            sum(r[2] for r in replies),
            sum(r[3] for r in replies),
            gpu_busy,
            round(front, 3),
            round(core, 3),
            texts,
        )

    def close(self) -> None:
        """Every worker told to close; one still busy (this process was stopped mid-pass, or
        mid-start) gets SIGTERM, which its run takes as a stop: it finishes its running requests
        (up to --drain-seconds), or its start unwinds, and it exits."""
        for workers in self.workers.values():
            for w in workers:
                if not w.proc.is_alive():
                    continue
                if w.busy:
                    w.proc.terminate()
                with contextlib.suppress(BrokenPipeError, OSError):
                    w.ask("close")
        for workers in self.workers.values():
            for w in workers:
                w.proc.join(timeout=60)
                if w.proc.is_alive():
                    w.proc.kill()
                    w.proc.join(timeout=10)
        self.workers.clear()


@contextlib.contextmanager
def _stops_held() -> Iterator[None]:
    """Stop signals wait while a worker is spawned and registered, then go to whatever handles
    them: raised inside multiprocessing's spawn, a stop closes the new child's pipe before its
    start-up data is written (it dies with a traceback on the terminal), or leaves a worker
    `close` never sees. (A signal mask would not do: any of the process's threads, pyarrow's
    among them, may take the signal.)"""
    from pipeline.launch import STOP_SIGNALS

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda n, _f: pending.append(n)) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if pending:
            signal.raise_signal(pending[0])


def place_sides(sides: list[Side], model: str) -> tuple[list[Side], dict[str, Any]]:
    """The sides with each engine given its share of the GPU (as for `--replicas-per-gpu`,
    counting every engine of every side), or of the CPU engine's KV cache; and that share."""
    from pipeline.engines.vllm import CPU_KVCACHE_GIB
    from pipeline.replicas import gpu_memory_bytes, replica_memory, weights_bytes
    from pipeline.slots import visible_gpus

    engines = sum(s.replicas for s in sides)
    gpus = visible_gpus(os.environ)
    if not gpus:
        kv = max(int(os.environ.get("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)) // engines, 1)
        env = {"VLLM_CPU_KVCACHE_SPACE": str(kv)}
        share = {"engines_on_the_cpu": engines, "VLLM_CPU_KVCACHE_SPACE": kv}
        return [dataclasses.replace(s, env={**s.env, **env}) for s in sides], share
    memory = replica_memory(engines, gpu_memory_bytes(gpus[0]), weights_bytes(model))
    share = {
        "engines_on_the_gpu": engines,
        "gpu_memory_utilization": memory.utilization,
        "kv_cache_memory_bytes": memory.kv_cache_bytes,
    }
    placed = []
    for side in sides:
        args = dict(side.engine.engine_args)
        if memory.kv_cache_bytes is not None:
            args.setdefault("kv_cache_memory_bytes", memory.kv_cache_bytes)
        engine = dataclasses.replace(
            side.engine, gpu_memory_utilization=memory.utilization, engine_args=tuple(args.items())
        )
        placed.append(dataclasses.replace(side, engine=engine))
    return placed, share


def alternate(
    warm: WarmSides,
    names: list[str],
    rounds: int,
    budget_seconds: float,
    started: float,
    done: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The timed rounds: each side once per round, the order rotated so each goes first in
    turn; no round starts that would end past `budget_seconds` after `started` (0: no limit).
    Each round: {"order": [...], name: Pass}, appended to `done` as it ends (so a caller
    stopped mid-round keeps the rounds before). Ratios in the log are to the first side."""
    done = [] if done is None else done
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        passes = {n: warm.run_pass(n, f"round-{i}") for n in order}
        prompt_tokens = {p.prompt_tokens for p in passes.values()}
        if len(prompt_tokens) != 1:
            raise BatchgenError(
                "the sides sent different prompts: "
                + ", ".join(f"{n} {p.prompt_tokens} prompt tokens" for n, p in passes.items())
            )
        done.append({"order": order, **passes})
        first = passes[names[0]].output_tok_s
        log.info(
            "round %d/%d (%s): %s",
            i + 1,
            rounds,
            " -> ".join(order),
            "; ".join(
                f"{n} {p.output_tok_s:,.0f} out tok/s ({p.output_tok_s / first:.3f}x)"
                for n, p in passes.items()
            ),
        )
        one = sum(p.seconds for p in passes.values())
        late = time.monotonic() - started + 1.1 * one > budget_seconds
        if budget_seconds and i + 1 < rounds and late:
            log.info("stopping after %d round(s): the budget of %g s", i + 1, budget_seconds)
            break
    return done


def _first_gpu() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return visible or "0"


# --- inside a worker process --------------------------------------------------------------------


def _worker_main(
    conn: Any, kind: str, cfg: RunConfig, out: Path, env: dict[str, str], sample: int | None
) -> None:
    """A worker: start the engine, then answer ("pass", tag) or ("trace", tag) (the same
    pass, with the engine's profiler on) until ("close",)."""
    os.environ.update(env)  # before vLLM or torch loads: CUDA_VISIBLE_DEVICES, KV cache share
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    # A terminal's Ctrl-C reaches this process too (the parent's process group): the parent
    # decides, and stops a busy worker with SIGTERM (WarmSides.close). A pass's run sets its own
    # handlers while it runs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        started = time.monotonic()
        job, engine, rows = _start(kind, cfg, out.parent / f"engine-{out.name}.log", sample)
        ready = time.monotonic() - started
        conn.send(("ready", ready, engine.tunables(), engine.kv_cache_tokens()))
        while True:
            message = conn.recv()
            if message[0] == "close":
                break
            with engine.profiling() if message[0] == "trace" else contextlib.nullcontext():
                if kind == "raw":
                    done = _raw_pass(engine, rows)
                elif kind == "trial":
                    done = _trial_pass(engine, rows, cfg)
                else:
                    done = _batchgen_pass(engine, cfg, out / message[1])
            conn.send(("done", *done))
        engine.close()
    except Exception as exc:  # the parent names this worker and stops the comparison
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        sys.exit(1)


def _start(kind: str, cfg: RunConfig, log_path: Path, sample: int | None) -> tuple[Any, Any, list]:
    """The job, its started engine, and the rows a pass sends, as the run builds them (ids,
    chat template, token ids, per-row sampling): the raw side's every row of this rank; a
    trial's every num_ranks-th row of the input's first `sample` (dealt out among the
    replicas)."""
    from pipeline.job import read_job
    from pipeline.runner import start_engine
    from pipeline.tune.tuner import read_sample

    if kind == "trial":
        whole = dataclasses.replace(cfg, num_ranks=1, rank=0)
        job = read_job(whole)
    else:
        job = read_job(cfg)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    engine = start_engine(cfg.engine, job, log_path)
    rows: list = []
    if kind == "raw":
        if not hasattr(engine, "raw_generate"):
            raise BatchgenError("the raw side needs the vllm engine")
        rows, _ = read_sample(cfg, job, sys.maxsize)
    elif kind == "trial":
        rows, _ = read_sample(whole, job, sample or sys.maxsize)
        rows = rows[cfg.rank :: cfg.num_ranks]
    return job, engine, rows


def _raw_pass(engine: Any, rows: list) -> tuple[int, int, int]:
    engine.reset_prefix_cache()  # the other sides ran the same prompts
    prompts, output_tokens, _ = engine.raw_generate(rows)
    return prompts, sum(len(r.token_ids) for r in rows), output_tokens


def _trial_pass(engine: Any, rows: list, cfg: RunConfig) -> tuple:
    """`Engine.generate` over the rows, as a tune trial's pass: counts and every row's text."""
    from pipeline.engines import FaultPolicy, StopFlags

    engine.reset_prefix_cache()
    faults = FaultPolicy(restarts=0, stall_seconds=cfg.stall_seconds)
    texts: dict[tuple[str, int], str | None] = {}
    tokens = 0
    for results in engine.generate(iter(rows), StopFlags(), cfg.max_inflight, faults):
        for r in results:
            ok = r.error is None
            tokens += (r.completion_tokens or 0) if ok else 0
            texts[(r.id, r.sample_index)] = r.text if ok else f"error: {r.error}"
    return len(rows), sum(len(r.token_ids) for r in rows), tokens, texts


def _batchgen_pass(engine: Any, cfg: RunConfig, out: Path) -> tuple[int, int, int]:
    """The whole runner over this rank's rows; `engine` is the one it finds (same settings)."""
    import pyarrow.parquet as pq

    from pipeline.runner import run

    engine.reset_prefix_cache()
    run_cfg = dataclasses.replace(
        cfg, output=dataclasses.replace(cfg.output, path=str(out), overwrite=True)
    )
    result = run(run_cfg)
    if result.status != "finished":
        raise BatchgenError(f"the batchgen run ended {result.status}")
    table = pq.read_table(out, columns=["prompt_tokens", "completion_tokens", "error"])
    errors = table.num_rows - table.column("error").null_count
    if errors:
        raise BatchgenError(f"the batchgen run wrote {errors} error rows")
    counts = (
        table.num_rows,
        sum(table.column("prompt_tokens").to_pylist()),
        sum(table.column("completion_tokens").to_pylist()),
    )
    shutil.rmtree(out, ignore_errors=True)
    return counts
