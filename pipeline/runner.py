"""The one place that knows the order: source -> prompt builder -> engine -> committer.

Three threads keep the engine fed and off every I/O path (pipeline/stages.py):
  * the feeder reads the input, skips rows already committed and builds requests ahead;
  * the main thread admits requests into the engine and collects finished ones;
  * the committer writes, fsyncs and renames shards and updates the manifest.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.checkpoint import (
    Checkpoint,
    RankLock,
    ResumeState,
    engine_log_path,
    manifest_path,
)
from pipeline.config import EngineConfig, RunConfig
from pipeline.engines import (
    Engine,
    EngineGaveUp,
    FaultPolicy,
    StopFlags,
    in_process_engine,
    open_engine,
)
from pipeline.errors import BatchgenError, ConfigError, committed_note, storage_failure
from pipeline.fingerprint import fingerprint_digest
from pipeline.job import Job, read_job
from pipeline.jsonl import shard_writer
from pipeline.progress import Progress, fmt_duration
from pipeline.refusal import RankFootprint, check_output_path
from pipeline.report import log_summary, run_report
from pipeline.reuse.dedup import RequestDedup
from pipeline.reuse.run import engine_requests, open_reuse, requests_since, reuse_report
from pipeline.sinks import ParquetShardWriter, output_schema, prepare_output_dir
from pipeline.stages import Committer, Feeder
from pipeline.storage.outpath import is_store
from pipeline.storage.retry import StoreDown
from pipeline.version import __version__

if TYPE_CHECKING:
    from pipeline.engines.server import ServerEngine

log = logging.getLogger("batchgen")

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
# A run stops early once this many prompts are done and more than HOPELESS_RATE of them failed:
# the rest of the input would most likely fail the same way.
HOPELESS_AFTER = 1000
HOPELESS_RATE = 0.9


@dataclass(slots=True)
class RunResult:
    """How a run ended, for the CLI's exit code and for callers of `run()`."""

    status: str  # finished | interrupted | limited (--limit's rows done) | noop
    out_dir: Path
    report: dict[str, Any] = field(default_factory=dict)


def run(cfg: RunConfig) -> RunResult:
    """Run (or resume) one rank of a batch job; see the module docstring for the threads."""
    wall_start = time.monotonic()
    out_dir = cfg.output_dir
    if is_store(out_dir):
        if cfg.reuse:
            raise ConfigError(
                f"--reuse with --output {out_dir}: reusing earlier folders needs a local --output "
                "(the merged key index is built beside it); write locally, or drop --reuse"
            )
        # Endpoint, credentials, bucket and write permission, each refused in one line within
        # seconds, before any store call that retries for minutes (the footprint's, the lease's).
        # A rank that --data-parallel started (it reports on a progress fd) leaves the warning
        # to its launcher, which gave it once for all ranks.
        prepare_output_dir(out_dir, warn=cfg.progress_fd is None)
    check_output_path(out_dir)
    # A server is asked who it is before the output is touched: an unreachable one, or one
    # serving another model, is refused with nothing written; its answers enter the fingerprint.
    asked = cfg.engine.server is not None
    with open_engine(cfg.engine, cfg.engine.model) if asked else contextlib.nullcontext() as server:
        footprint = RankFootprint(out_dir, cfg.rank)  # removed again if the run is refused
        refused = False
        if not is_store(out_dir):
            prepare_output_dir(out_dir)
        try:
            lock = RankLock(out_dir, cfg.rank).acquire()
        except OSError as exc:
            raise BatchgenError(
                storage_failure(f"locking rank {cfg.rank} of {out_dir}", exc, out_dir)
            ) from exc
        flags = StopFlags()
        try:
            with _stop_on_signals(flags, cfg.drain_seconds) as phase:
                try:
                    result = _run_locked(cfg, wall_start, flags, phase, server)
                except ConfigError:
                    refused = phase.starting  # a usage error before any generation
                    raise
            if cfg.output.card and result.status in ("finished", "noop"):
                from pipeline.card import refresh_card  # OUT/README.md: a HF dataset folder

                refresh_card(cfg.output_dir)
            return result
        finally:
            lock.release()
            if refused:
                footprint.remove()


def _run_locked(
    cfg: RunConfig,
    wall_start: float,
    flags: StopFlags,
    phase: _SignalPhase,
    server: ServerEngine | None,
) -> RunResult:
    checkpoint = Checkpoint(cfg.output_dir, cfg.rank, cfg.num_ranks)
    started = _start_rank(cfg, checkpoint, flags, server)
    if isinstance(started, RunResult):
        return started
    job, state, engine = started
    phase.starting = False
    writer = _open_writer(cfg, job, state, engine)
    progress = _progress(cfg, job, state, engine)
    reuse = open_reuse(job.fingerprint, cfg.reuse, cfg.output_dir, cfg.rank, writer.schema.names)
    feeder = Feeder(
        job.source,
        job.builder,
        state.done,
        cfg.source.id_column,
        flags,
        reuse.annotate,
        group_window=cfg.group_prefixes,
    )
    committer = Committer(
        writer, checkpoint, state.next_seq, cfg.output.rows_per_shard, cfg.output.checkpoint_seconds
    )
    gen_start = time.monotonic()
    failures_before = len(engine.failures)
    requests_before = engine_requests(engine)
    try:
        engine_error, dedup, stopped_early = _generate(
            cfg, engine, feeder, committer, progress, flags
        )
    finally:
        reuse.close()
    gen_seconds = time.monotonic() - gen_start

    # The feeder may have read the whole input into its queue before an early stop: only a run
    # that was not stopped early has sent (and so committed) every row it read.
    limited = getattr(job.source, "cuts", False)  # --limit left rows out: not the whole input
    read_all = feeder.exhausted and not stopped_early and not limited
    failure = _failure(cfg, checkpoint, feeder, committer, engine_error, flags, read_all)
    status = _end_status(failure, flags, read_all)
    report = run_report(
        status, progress, engine, gen_seconds, time.monotonic() - wall_start, checkpoint, flags
    )
    report["engine_failures"] = engine.failures[failures_before:]
    requests = requests_since(requests_before, engine_requests(engine))
    report["this_run"]["reuse"] = reuse_report(reuse, dedup, progress.prompts, requests)
    if failure is not None:
        report["error"] = str(failure)  # for `batchgen status`
    at_limit = not (failure or flags.interrupted or stopped_early) and limited and feeder.exhausted
    log_summary(
        report, cfg.output_dir, f"stopped at --limit {cfg.source.limit:,}" if at_limit else None
    )
    _record_status(cfg, checkpoint, status, report, failure)
    if failure is not None:
        raise failure
    if at_limit:
        log.info(
            "--limit %s: done; rerun without --limit (or with a larger one) to do the rest",
            f"{cfg.source.limit:,}",
        )
        status = "limited"
    return RunResult(status, cfg.output_dir, report)


def _open_writer(
    cfg: RunConfig, job: Job, state: ResumeState, engine: Engine
) -> ParquetShardWriter:
    """The rank's shard writer (Parquet, with its JSONL copy under --output-format jsonl)."""
    kept = [s["file"] for s in state.manifest.shards]
    return shard_writer(
        cfg.output.format,
        cfg.output_dir,
        cfg.rank,
        _schema(cfg, job),
        _metadata(cfg, job, engine),
        kept,
    )


def _start_rank(
    cfg: RunConfig, checkpoint: Checkpoint, flags: StopFlags, server: ServerEngine | None
) -> tuple[Job, ResumeState, Engine] | RunResult:
    """The job, where to resume it and its started engine; or the result of a rank that ends
    before generating (nothing left to do, or a stop signal during the start)."""
    try:
        job = read_job(cfg, server, save_listing=True)
        state = _resume_state(cfg, job, checkpoint)
        if state is None:
            return RunResult("noop", cfg.output_dir, checkpoint.manifest.report)
        log_path = engine_log_path(cfg.output_dir, cfg.rank) if cfg.engine_log else None
        if log_path is not None and cfg.engine.backend == "vllm" and server is None:
            log.info("vLLM's own log: %s", log_path)
        return job, state, start_engine(cfg.engine, job, log_path, server)
    except BaseException:
        if flags.signal_name is None:
            raise
        # Whatever the start raised, the stop signal's exception was at its origin.
        return _stopped_before_generation(cfg, checkpoint, flags.signal_name)


def _progress(cfg: RunConfig, job: Job, state: ResumeState, engine: Engine) -> Progress:
    todo = None if job.source.total_rows is None else job.source.total_rows - state.done.count()
    metrics = None
    if cfg.metrics_textfile is not None:
        from pipeline.metrics import MetricsFile

        metrics = MetricsFile(cfg.metrics_textfile, cfg.rank, str(cfg.output_dir))
    return Progress(
        todo,
        state.manifest.prompts_committed,
        interval=cfg.progress_seconds,
        report_fd=cfg.progress_fd,
        metrics=metrics,
        restarts=lambda: sum(1 for f in engine.failures if f.get("restarted")),
    )


def _end_status(failure: BatchgenError | None, flags: StopFlags, read_all: bool) -> str:
    if failure is not None:
        return "failed"
    if flags.interrupted or not read_all:
        return "interrupted"
    return "finished"


def _stopped_before_generation(
    cfg: RunConfig, checkpoint: Checkpoint, signal_name: str
) -> RunResult:
    """A stop signal while reading the input or starting the engine: nothing ran, so nothing
    is lost; the start was unwound (vLLM stops the engine processes it had started)."""
    log.warning(
        "%s received before generation began: stopped; nothing was generating, exiting with "
        "code 75; rerun the same command to resume",
        signal_name,
    )
    report: dict[str, Any] = {}
    if checkpoint.manifest is not None:  # its status says "running" by now
        report = {**checkpoint.manifest.report, "status": "interrupted", "signal": signal_name}
        _record_status(cfg, checkpoint, "interrupted", report, None)
    return RunResult("interrupted", cfg.output_dir, report)


def start_engine(
    engine_cfg: EngineConfig,
    job: Job,
    log_path: Path | None = None,
    server: ServerEngine | None = None,
) -> Engine:
    """The job's engine (started, or the one this process already runs with these settings;
    with `server`, that server), checked against the job's sampling; sizes the prompt builder's
    length check to it. With `log_path`, a new engine's own output goes to that file."""
    engine = server if server is not None else in_process_engine(engine_cfg, job.model, log_path)
    problem = engine.check_sampling(job.sampling)
    if problem:
        raise ConfigError(problem)
    job.builder.max_model_len = engine.max_model_len
    return engine


def _resume_state(cfg: RunConfig, job: Job, checkpoint: Checkpoint) -> ResumeState | None:
    """What earlier runs committed; None when the rank is already finished."""
    out_dir, rank = cfg.output_dir, cfg.rank
    try:
        state = checkpoint.open(job.fingerprint, job.source.total_rows, cfg.output.overwrite)
    except OSError as exc:
        action = f"reading the resume state of rank {rank} in {out_dir}"
        raise BatchgenError(storage_failure(action, exc, out_dir)) from exc
    for note in state.notes:
        log.warning("%s", note)
    manifest = state.manifest
    if manifest.status == "finished":
        log.info(
            "already complete: %s rows (%s prompts, %s errors) in %d shard(s) of rank %d in %s; "
            "nothing to do (--overwrite redoes it)",
            f"{manifest.rows_committed:,}",
            f"{manifest.prompts_committed:,}",
            f"{manifest.errors:,}",
            len(manifest.shards),
            rank,
            out_dir,
        )
        return None
    if state.resumed:
        log.info(
            "resuming rank %d: %s prompts already committed in %d shard(s)",
            rank,
            f"{manifest.prompts_committed:,}",
            len(manifest.shards),
        )
    try:
        checkpoint.set_status("running")
    except OSError as exc:
        committed = committed_note(manifest.prompts_committed, out_dir)
        action = f"updating {manifest_path(out_dir, rank)}"
        raise BatchgenError(storage_failure(action, exc, out_dir, committed)) from exc
    return state


def _schema(cfg: RunConfig, job: Job):
    keep = [job.source.field(c) for c in cfg.output.keep_columns]
    asks = set(job.sampling)
    if cfg.engine.loras:
        asks.add("lora")
    if cfg.engine.reasoning_parser:
        asks.add("reasoning_parser")
    return output_schema(cfg.output.keep_prompt, keep, asks)


def _metadata(cfg: RunConfig, job: Job, engine: Engine) -> dict[str, Any]:
    """What every shard records about how it was made."""
    described = engine.describe()
    return {
        "batchgen": __version__,
        "vllm": described.get("vllm"),
        "transformers": described.get("transformers"),
        "model": job.model,
        "model_impl": described.get("model_impl"),
        "dtype": described.get("dtype"),
        "sampling": job.sampling,
        "seed": cfg.engine.seed,
        "rank": cfg.rank,
        "num_shards": cfg.num_ranks,
        # A fixed-size reference: the whole fingerprint lives once, in the rank's manifest.
        "fingerprint_sha256": fingerprint_digest(job.fingerprint),
    }


def _generate(
    cfg: RunConfig,
    engine: Engine,
    feeder: Feeder,
    committer: Committer,
    progress: Progress,
    flags: StopFlags,
) -> tuple[BaseException | None, RequestDedup, bool]:
    """Feed the engine and commit its results until the input ends or a stop; the engine's
    exception, if it raised one, what the deduplication did, and whether the run stopped early
    (hopeless)."""
    engine_error: BaseException | None = None
    stopped_early = False

    def deliver(results: list) -> None:  # results that needed no engine (reused, duplicates)
        committer.put(results)
        progress.add(results)
        if committer.error or feeder.error:
            flags.stop.set()

    dedup = RequestDedup(deliver)
    try:
        feeder.start()
        committer.start()
        faults = FaultPolicy(cfg.engine_restarts, cfg.stall_seconds)
        feed = progress.count_sent(dedup.feed(feeder.feed()))
        for results in engine.generate(feed, flags, cfg.max_inflight, faults):
            progress.count_returned(results)
            results = dedup.expand(results)
            committer.put(results)
            progress.add(results)
            if committer.error or feeder.error:
                flags.stop.set()
                flags.abort.set()
            elif _hopeless(progress, cfg.max_error_rate) and not flags.stop.is_set():
                log.warning(
                    "%s of the first %s prompts are error rows: stopping early, since the "
                    "rest would most likely fail the same way",
                    f"{progress.errors:,}",
                    f"{progress.rows:,}",
                )
                flags.stop.set()
                stopped_early = True
    except Exception as exc:  # the engine died (or was killed by the same signal)
        engine_error = exc
        if not flags.stop.is_set():
            time.sleep(0.2)  # let a signal that also reached us be handled first
    finally:
        flags.stop.set()
        try:
            feeder.wait_ended()
        finally:
            committer.close()
    progress.close()
    return engine_error, dedup, stopped_early


def _hopeless(progress: Progress, max_error_rate: float) -> bool:
    """Enough prompts done, nearly all failed: the rest would fail the same way. (Past the
    --max-error-rate too, so a stop here always ends as that failure.)"""
    rate = progress.errors / max(progress.rows, 1)
    return progress.prompts >= HOPELESS_AFTER and rate > max(HOPELESS_RATE, max_error_rate)


def _failure(
    cfg: RunConfig,
    checkpoint: Checkpoint,
    feeder: Feeder,
    committer: Committer,
    engine_error: BaseException | None,
    flags: StopFlags,
    read_all: bool,
) -> BatchgenError | None:
    """The error that ended the run, worded for the user; None if nothing failed."""
    out_dir = cfg.output_dir
    manifest = checkpoint.manifest
    committed = committed_note(manifest.prompts_committed, out_dir)
    failure: BatchgenError | None = None
    cause: BaseException | None = None
    if isinstance(committer.error, StoreDown):  # the output's store: exit 75, rerun later
        return _input_failure(committer.error, flags, committed)
    if committer.error is not None:
        cause = committer.error
        if isinstance(cause, OSError):
            failure = BatchgenError(storage_failure(committer.step, cause, out_dir, committed))
        else:
            failure = BatchgenError(
                f"{committer.step} failed: {type(cause).__name__}: {cause}; {committed}; fix "
                "the cause and rerun the same command to resume"
            )
    elif feeder.error is not None:
        return _input_failure(feeder.error, flags, committed)
    elif isinstance(engine_error, EngineGaveUp):
        cause = engine_error
        failure = BatchgenError(f"{engine_error}; {committed}; rerun the same command to resume")
    elif engine_error is not None and not flags.interrupted:
        cause = engine_error
        failure = BatchgenError(
            f"the engine failed: {type(cause).__name__}: {cause}; {committed}; "
            "rerun the same command to resume"
        )
    elif (
        not flags.interrupted
        and read_all
        and manifest.total_prompts is not None
        and manifest.prompts_committed != manifest.total_prompts
    ):
        # The promise is every input row exactly once; never call a run finished without it.
        failure = BatchgenError(
            f"the input has {manifest.total_prompts:,} rows for rank {cfg.rank} but "
            f"{manifest.prompts_committed:,} are committed in {out_dir}; this is a batchgen bug, "
            "please report it; rerun the same command to complete the missing rows"
        )
    elif not flags.interrupted and manifest.rows_committed:
        failure = _error_rate_failure(
            cfg, manifest.errors, manifest.rows_committed, stopped_early=not read_all
        )
    if failure is not None:
        failure.__cause__ = cause
    return failure


def _input_failure(cause: BaseException, flags: StopFlags, committed: str) -> BatchgenError | None:
    """A failed input read, worded; None when the input's (or the output's) store stayed down
    past its retries: the run then ends as interrupted (exit 75), to be rerun once it answers."""
    if isinstance(cause, StoreDown):
        log.warning("%s", cause)
        flags.reason = str(cause)
        return None
    if isinstance(cause, BatchgenError):
        return cause
    failure = BatchgenError(f"reading the input failed: {cause}; {committed}")
    failure.__cause__ = cause
    return failure


def _error_rate_failure(
    cfg: RunConfig, errors: int, rows: int, stopped_early: bool
) -> BatchgenError | None:
    """The run's end when error rows are over --max-error-rate (or hopeless: stopped early)."""
    rate = errors / rows
    if rate <= cfg.max_error_rate:
        return None
    out = cfg.output_dir
    early = "stopped early: " if stopped_early else ""
    return BatchgenError(
        f"{early}{errors:,} of {rows:,} rows of rank {cfg.rank} ({rate:.1%}) are error rows, above "
        f"--max-error-rate {cfg.max_error_rate:g}; every row is committed in {out}: see why in "
        f"their `error` column (e.g. duckdb -c \"select error, count(*) from '{out}/*/*.parquet' "
        'group by error"), fix the input or flags and rerun with --overwrite, or rerun with a '
        "higher --max-error-rate to accept them"
    )


def _record_status(
    cfg: RunConfig,
    checkpoint: Checkpoint,
    status: str,
    report: dict[str, Any],
    failure: BatchgenError | None,
) -> None:
    try:
        checkpoint.set_status(status, report)
    except StoreDown as exc:
        # The commit records already name every committed shard; the run ends as it was going
        # to (exit 75 when interrupted), and `batchgen status` shows the rank as crashed.
        log.warning("recording the %s state failed too: %s", status, exc)
    except OSError as exc:
        out_dir = cfg.output_dir
        action = f"recording the {status} state in {manifest_path(out_dir, cfg.rank)}"
        if failure is None:
            committed = committed_note(checkpoint.manifest.prompts_committed, out_dir)
            raise BatchgenError(storage_failure(action, exc, out_dir, committed)) from exc
        # The first failure is the one to report; this is most likely the same full disk.
        log.warning(
            "%s failed too (%s); `batchgen status` will show rank %d as crashed",
            action,
            exc.strerror or exc,
            cfg.rank,
        )


class _SignalPhase:
    """Whether the run is still starting (reading its input, starting the engine)."""

    starting = True


class _StopBeforeGeneration(BaseException):
    """Raised by a stop signal before generation began, to unwind the start at once. A
    BaseException, so no `except Exception` on the way (in vLLM's start, say) swallows it."""


@contextmanager
def _stop_on_signals(flags: StopFlags, drain_seconds: float):
    """SIGTERM, SIGINT, SIGUSR1 (Slurm's warning before a time limit): stop admitting, let running
    requests finish for up to `drain_seconds`, commit, exit 75. A second signal aborts at once.

    For the whole run, not only while generating: a signal while the engine starts unwinds the
    start (the default action would kill this process and orphan vLLM's engine processes)."""
    phase = _SignalPhase()
    if threading.current_thread() is not threading.main_thread():
        yield phase
        return
    previous = {}

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if phase.starting:
            if flags.signal_name is None:
                flags.signal_name = name
                flags.stop.set()
                raise _StopBeforeGeneration(name)
            return  # already unwinding
        if flags.signal_name is None:
            flags.signal_name = name
            flags.stop.set()
            log.warning(
                "%s received: finishing running requests (up to %s), committing, then exiting "
                "with code 75; rerun the same command to resume",
                name,
                fmt_duration(drain_seconds),
            )
            timer = threading.Timer(drain_seconds, flags.abort.set)
            timer.daemon = True
            timer.start()
        else:
            log.warning("%s received again: aborting running requests", name)
            flags.abort.set()

    for name in STOP_SIGNALS:
        signum = getattr(signal, name)
        previous[signum] = signal.signal(signum, handler)
    try:
        yield phase
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
