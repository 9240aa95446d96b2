"""The one place that knows the order: source -> prompt builder -> engine -> shard writer.

Three threads keep the engine fed and off every I/O path:
  * the feeder reads the input, skips rows already committed and tokenizes ahead;
  * the main thread admits requests into vLLM and collects finished ones (engine.generate);
  * the committer writes, fsyncs and renames shards and updates the manifest.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import queue
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.checkpoint import Checkpoint, RankLock, manifest_path
from pipeline.config import RunConfig
from pipeline.engine import StopFlags, get_engine
from pipeline.errors import BatchgenError, ConfigError
from pipeline.models import model_signature, resolve_model
from pipeline.progress import Progress, fmt_duration
from pipeline.prompts import PromptBuilder, load_tokenizer
from pipeline.records import PromptRow, ResultRow
from pipeline.sinks import ParquetShardWriter, ShardInfo, output_schema, shard_name
from pipeline.sources import Source, open_source, require_columns

log = logging.getLogger("batchgen")

READ_BATCH_ROWS = 1024
FIRST_CHUNK_ROWS = 64
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


@dataclass(slots=True)
class RunResult:
    """How a run ended, for the CLI's exit code and for callers of `run()`."""

    status: str  # finished | interrupted | noop
    out_dir: Path
    report: dict[str, Any] = field(default_factory=dict)


def run(cfg: RunConfig) -> RunResult:
    """Run (or resume) one rank of a batch job; see the module docstring for the threads."""
    wall_start = time.monotonic()
    out_dir = cfg.output_dir
    _prepare_output_dir(out_dir)
    rank = cfg.shard_index
    try:
        lock = RankLock(out_dir, rank).acquire()
    except OSError as exc:
        raise BatchgenError(
            storage_failure(f"locking rank {rank} of {out_dir}", exc, out_dir)
        ) from exc
    try:
        return _run_locked(cfg, out_dir, rank, wall_start)
    finally:
        lock.release()


def _run_locked(cfg: RunConfig, out_dir: Path, rank: int, wall_start: float) -> RunResult:
    model = resolve_model(cfg.engine.model)
    source = open_source(cfg.source, cfg.num_shards, rank)
    tokenizer = load_tokenizer(model, cfg.engine.trust_remote_code)
    builder = PromptBuilder(
        cfg.prompt, tokenizer, cfg.output.keep_columns, cfg.sampling.max_tokens_column
    )
    wanted = builder.columns()
    if cfg.source.id_column is not None:
        wanted[cfg.source.id_column] = "--id-column"
    require_columns(source, wanted)
    sampling = cfg.sampling.resolve(generation_defaults(model))
    fingerprint = make_fingerprint(cfg, model, source, builder, sampling)

    checkpoint = Checkpoint(out_dir, rank, cfg.num_shards)
    try:
        state = checkpoint.open(fingerprint, source.total_rows, cfg.output.overwrite)
    except OSError as exc:
        raise BatchgenError(
            storage_failure(f"reading the resume state of rank {rank} in {out_dir}", exc, out_dir)
        ) from exc
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
        return RunResult("noop", out_dir, manifest.report)
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
        action = f"updating {manifest_path(out_dir, rank)}"
        raise BatchgenError(
            storage_failure(action, exc, out_dir, _committed(manifest.prompts_committed, out_dir))
        ) from exc

    engine = get_engine(cfg.engine, model)
    builder.max_model_len = engine.max_model_len
    described = engine.describe()
    metadata = {
        "batchgen": __version__,
        "vllm": described.get("vllm"),
        "transformers": described.get("transformers"),
        "model": model,
        "model_impl": cfg.engine.model_impl,
        "dtype": described.get("dtype"),
        "sampling": sampling,
        "seed": cfg.engine.seed,
        "rank": rank,
        "num_shards": cfg.num_shards,
        "fingerprint": fingerprint,
    }
    schema = output_schema(
        cfg.output.keep_prompt, [source.field(c) for c in cfg.output.keep_columns]
    )
    writer = ParquetShardWriter(out_dir, rank, schema, metadata)
    todo = None if source.total_rows is None else source.total_rows - len(state.done_ids)
    progress = Progress(todo, manifest.prompts_committed, interval=cfg.progress_seconds)

    flags = StopFlags()
    feeder = Feeder(source, builder, state.done_ids, cfg.source.id_column, flags)
    committer = Committer(
        writer, checkpoint, state.next_seq, cfg.output.rows_per_shard, cfg.output.checkpoint_seconds
    )
    engine_error: BaseException | None = None
    gen_start = time.monotonic()
    with _stop_on_signals(flags, cfg.drain_seconds):
        feeder.start()
        committer.start()
        try:
            for results in engine.generate(
                feeder.feed(), sampling, cfg.engine.seed, flags, cfg.max_inflight
            ):
                committer.put(results)
                progress.add(results)
                if committer.error or feeder.error:
                    flags.stop.set()
                    flags.abort.set()
        except Exception as exc:  # the engine died (or was killed by the same signal)
            engine_error = exc
            if not flags.stop.is_set():
                time.sleep(0.2)  # let a signal that also reached us be handled first
        finally:
            flags.stop.set()
            feeder.join()
            committer.close()
    progress.close()
    gen_seconds = time.monotonic() - gen_start

    interrupted = flags.signal_name is not None
    committed = _committed(checkpoint.manifest.prompts_committed, out_dir)
    failure: BatchgenError | None = None
    if committer.error is not None:
        cause = committer.error
        if isinstance(cause, OSError):
            failure = BatchgenError(storage_failure(committer.step, cause, out_dir, committed))
        else:
            failure = BatchgenError(
                f"{committer.step} failed: {type(cause).__name__}: {cause}; {committed}; fix "
                "the cause and rerun the same command to resume"
            )
        failure.__cause__ = cause
    elif feeder.error is not None:
        if isinstance(feeder.error, BatchgenError):
            failure = feeder.error
        else:
            failure = BatchgenError(f"reading the input failed: {feeder.error}; {committed}")
            failure.__cause__ = feeder.error
    elif engine_error is not None and not interrupted:
        failure = BatchgenError(
            f"the engine failed: {type(engine_error).__name__}: {engine_error}; {committed}; "
            "rerun the same command to resume"
        )
        failure.__cause__ = engine_error
    expected = manifest.total_rows
    if (
        failure is None
        and not interrupted
        and feeder.exhausted
        and expected is not None
        and manifest.prompts_committed != expected
    ):
        # The promise is every input row exactly once; never call a run finished without it.
        failure = BatchgenError(
            f"the input has {expected:,} rows for rank {rank} but {manifest.prompts_committed:,} "
            f"are committed in {out_dir}; this is a batchgen bug, please report it; rerun the "
            "same command to complete the missing rows"
        )
    if failure is not None:
        status = "failed"
    elif interrupted or not feeder.exhausted:
        status = "interrupted"
    else:
        status = "finished"
    report = _report(
        status, progress, engine, gen_seconds, time.monotonic() - wall_start, checkpoint, flags
    )
    if failure is not None:
        report["error"] = str(failure)  # for `batchgen status`
    _log_summary(report, out_dir)
    try:
        checkpoint.set_status(status, report)
    except OSError as exc:
        action = f"recording the {status} state in {manifest_path(out_dir, rank)}"
        if failure is None:
            raise BatchgenError(storage_failure(action, exc, out_dir, committed)) from exc
        # The first failure is the one to report; this is most likely the same full disk.
        log.warning(
            "%s failed too (%s); `batchgen status` will show rank %d as crashed",
            action,
            exc.strerror or exc,
            rank,
        )
    if failure is not None:
        raise failure
    return RunResult(status, out_dir, report)


_STORAGE_FAULTS = {
    errno.ENOSPC: ("no space left on device", "free space on the disk holding {out}"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota for {out}"),
    errno.EROFS: ("read-only file system", "make {out} writable"),
    errno.EACCES: ("permission denied", "make {out} writable"),
    errno.EPERM: ("operation not permitted", "make {out} writable"),
}


def storage_failure(action: str, exc: OSError, out_dir: Path, committed: str = "") -> str:
    """What failed in the output folder, why, what is safe, and the fix, in one message."""
    reason, fix = _STORAGE_FAULTS.get(exc.errno, (exc.strerror or str(exc), "fix the cause"))
    safe = f"; {committed}" if committed else ""
    return (
        f"{action} failed: {reason}{safe}; {fix.format(out=out_dir)} and rerun the same "
        "command to resume"
    )


def _committed(prompts: int, out_dir: Path) -> str:
    return f"{prompts:,} prompts committed in {out_dir} are safe"


def _prepare_output_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".batchgen-write-test-{int(time.time() * 1e6)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason, fix = _STORAGE_FAULTS.get(exc.errno, (exc.strerror or str(exc), "fix the cause"))
        raise BatchgenError(
            f"--output {out_dir}: cannot write there ({reason}); nothing in it was changed; "
            f"{fix.format(out=out_dir)} and rerun, or choose another --output"
        ) from exc


def generation_defaults(model: str) -> dict[str, Any]:
    """The sampling defaults a model ships in generation_config.json (vLLM applies the same)."""
    path = Path(model) / "generation_config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("ignoring unreadable %s", path)
            return {}
    if Path(model).exists():
        return {}
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(model).to_diff_dict()
    except (OSError, ValueError):
        return {}


def make_fingerprint(
    cfg: RunConfig, model: str, source: Source, builder: PromptBuilder, sampling: dict[str, Any]
) -> dict[str, Any]:
    """Every setting that changes what a row's output is. A resume must match it exactly."""
    template = builder.chat_template
    return {
        "model": model,
        "model_files": model_signature(model),
        "model_impl": cfg.engine.model_impl,
        "dtype": cfg.engine.dtype,
        "max_model_len": cfg.engine.max_model_len,
        "engine": cfg.engine.backend,
        "prompt": {
            "prompt_column": cfg.prompt.prompt_column,
            "template": cfg.prompt.template,
            "messages_column": cfg.prompt.messages_column,
            "chat": cfg.prompt.chat,
            "system_prompt": cfg.prompt.system_prompt,
        },
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16]
        if template
        else None,
        "sampling": sampling,
        "seed": cfg.engine.seed,
        "input": source.identity(),
        "id_column": cfg.source.id_column,
        "columns": {
            "keep_prompt": cfg.output.keep_prompt,
            "keep_columns": list(cfg.output.keep_columns),
        },
        "num_shards": cfg.num_shards,
        "shard_index": cfg.shard_index,
    }


_END = object()


class Feeder(threading.Thread):
    """Reads the input ahead of the engine: skips committed rows, renders and tokenizes prompts."""

    def __init__(
        self,
        source: Source,
        builder: PromptBuilder,
        done_ids: set[str],
        id_column: str | None,
        flags: StopFlags,
        batch_rows: int = READ_BATCH_ROWS,
        depth: int = 16,
    ) -> None:
        super().__init__(name="batchgen-feeder", daemon=True)
        self.source, self.builder = source, builder
        self.done_ids, self.id_column = done_ids, id_column
        self.flags = flags
        self.batch_rows = batch_rows
        self.queue: queue.Queue = queue.Queue(maxsize=depth)  # of lists of PromptRow
        self.error: BaseException | None = None
        self.exhausted = False

    def run(self) -> None:
        try:
            self._read()
        except BaseException as exc:  # surfaced by the runner with its own message
            self.error = exc
        finally:
            self._put(_END, force=True)

    def _read(self) -> None:
        columns = list(self.builder.columns())
        if self.id_column is not None and self.id_column not in columns:
            columns.append(self.id_column)
        seen: set[str] = set()
        seq = 0
        # Rows go to the engine in chunks that start small and double up to a whole batch: the
        # engine starts on the first 64 rows (~10 ms to tokenize) instead of waiting for a
        # batch of 1,024 (~0.1 s), which is most of batchgen's start on a short run.
        chunk = min(FIRST_CHUNK_ROWS, self.batch_rows)
        for ids, cols in self.source.iter_batches(columns, self.batch_rows):
            if self.flags.stop.is_set():
                return
            if self.id_column is not None:
                ids = self._user_ids(cols[self.id_column], seq, seen)
            keep = [i for i, row_id in enumerate(ids) if row_id not in self.done_ids]
            start = 0
            while start < len(keep):
                part = keep[start : start + chunk]
                start += len(part)
                if len(part) == len(ids):  # the whole batch: no copies
                    rows = self.builder.build(ids, cols, range(seq, seq + len(ids)))
                else:  # a first small chunk, or a resume's rows not yet committed
                    rows = self.builder.build(
                        [ids[i] for i in part],
                        {c: [v[i] for i in part] for c, v in cols.items()},
                        [seq + i for i in part],
                    )
                if not self._put(rows):
                    return
                chunk = min(2 * chunk, self.batch_rows)
            seq += len(ids)
        self.exhausted = True

    def _user_ids(self, values: list[Any], seq: int, seen: set[str]) -> list[str]:
        ids = []
        for i, value in enumerate(values):
            if value is None:
                raise BatchgenError(
                    f"--id-column {self.id_column!r} is null in row {seq + i}; ids must be set "
                    "and unique (omit --id-column to use row positions)"
                )
            row_id = str(value)
            if row_id in seen:
                raise BatchgenError(
                    f"--id-column {self.id_column!r} repeats the id {row_id!r} (row {seq + i}); "
                    "resume needs unique ids: pick a unique column or omit --id-column"
                )
            seen.add(row_id)
            ids.append(row_id)
        return ids

    def _put(self, item: Any, force: bool = False) -> bool:
        while True:
            if self.flags.stop.is_set() and not force:
                return False
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                # The consumer is gone only once the run is stopping: then make room for the end
                # marker (dropped rows are not committed, so a resume redoes them). Before that
                # a full queue means a busy engine, and dropping a batch here would let the run
                # finish without those rows.
                if force and self.flags.stop.is_set():
                    with contextlib.suppress(queue.Empty):
                        self.queue.get_nowait()

    def feed(self) -> Iterator[PromptRow | None]:
        """Rows for the engine; None whenever nothing is ready yet, so the engine keeps stepping."""
        while True:
            try:
                item = self.queue.get(timeout=0.05)
            except queue.Empty:
                yield None
                continue
            if item is _END:
                return
            yield from item


class Committer(threading.Thread):
    """Groups results into shards and commits each: Parquet write, fsync, rename, manifest."""

    def __init__(
        self,
        writer: ParquetShardWriter,
        checkpoint: Checkpoint,
        next_seq: int,
        rows_per_shard: int,
        checkpoint_seconds: float,
    ) -> None:
        super().__init__(name="batchgen-committer", daemon=True)
        self.writer, self.checkpoint = writer, checkpoint
        self.seq = next_seq
        self.rows_per_shard = rows_per_shard
        self.checkpoint_seconds = checkpoint_seconds
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.step = "committing a shard"  # what it was doing, for the message if it fails
        self.committed: list[ShardInfo] = []

    def put(self, results: list[ResultRow]) -> None:
        self.queue.put(results)

    def close(self) -> None:
        self.queue.put(_END)
        self.join()

    def run(self) -> None:
        buffer: list[ResultRow] = []
        last_commit = time.monotonic()
        while True:
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:
                item = None
            if item is _END:
                break
            if self.error is not None:
                continue  # a failed disk: drop results (they are redone on resume), keep draining
            if item:
                buffer.extend(item)
            try:
                while len(buffer) >= self.rows_per_shard:
                    cut = _prompt_boundary(buffer, self.rows_per_shard)
                    self._commit(buffer[:cut])
                    del buffer[:cut]
                    last_commit = time.monotonic()
                if buffer and time.monotonic() - last_commit >= self.checkpoint_seconds:
                    self._commit(buffer)
                    buffer = []
                    last_commit = time.monotonic()
            except BaseException as exc:
                self.error = exc
        if buffer and self.error is None:
            try:
                self._commit(buffer)
            except BaseException as exc:
                self.error = exc

    def _commit(self, rows: list[ResultRow]) -> None:
        name = shard_name(self.writer.rank, self.seq)
        self.step = f"writing shard {name} in {self.writer.out_dir}"
        info = self.writer.write(rows, self.seq)
        # From here the shard is committed on disk: if recording it fails, the next run adopts it.
        self.step = (
            f"recording shard {name} in {manifest_path(self.writer.out_dir, self.writer.rank)}"
        )
        self.checkpoint.commit(info)
        self.committed.append(info)
        self.seq += 1


def _prompt_boundary(rows: list[ResultRow], at: int) -> int:
    """The first index >= `at` that does not split one prompt's samples across two shards."""
    while at < len(rows) and rows[at].id == rows[at - 1].id:
        at += 1
    return at


@contextmanager
def _stop_on_signals(flags: StopFlags, drain_seconds: float):
    """SIGTERM, SIGINT, SIGUSR1 (Slurm's warning before a time limit): stop admitting, let running
    requests finish for up to `drain_seconds`, commit, exit 75. A second signal aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
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
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _report(
    status: str,
    progress: Progress,
    engine: Any,
    gen_seconds: float,
    wall_seconds: float,
    checkpoint: Checkpoint,
    flags: StopFlags,
) -> dict[str, Any]:
    manifest = checkpoint.manifest
    return {
        "status": status,
        "signal": flags.signal_name,
        "this_run": {
            "prompts": progress.prompts,
            "rows": progress.rows,
            "errors": progress.errors,
            "prompt_tokens": progress.prompt_tokens,
            "completion_tokens": progress.completion_tokens,
            "finish_reasons": dict(sorted(progress.finish_reasons.items())),
            "engine_start_seconds": round(engine.start_seconds, 2),
            "generate_seconds": round(gen_seconds, 2),
            "wall_seconds": round(wall_seconds, 2),
            "output_tokens_per_second": round(progress.completion_tokens / gen_seconds, 1)
            if gen_seconds > 0
            else None,
        },
        "committed": {
            "prompts": manifest.prompts_committed,
            "rows": manifest.rows_committed,
            "errors": manifest.errors,
            "shards": len(manifest.shards),
            "total_rows": manifest.total_rows,
        },
        "engine": engine.describe(),
    }


def _log_summary(report: dict[str, Any], out_dir: Path) -> None:
    this, committed = report["this_run"], report["committed"]
    reasons = ", ".join(f"{k} {v:,}" for k, v in this["finish_reasons"].items()) or "none"
    log.info(
        "%s: %s prompts this run (%s rows, %s errors) | %s prompt + %s output tokens | "
        "generate %s, engine start %s, wall %s | %s output tok/s | finish reasons: %s",
        report["status"],
        f"{this['prompts']:,}",
        f"{this['rows']:,}",
        f"{this['errors']:,}",
        f"{this['prompt_tokens']:,}",
        f"{this['completion_tokens']:,}",
        fmt_duration(this["generate_seconds"]),
        fmt_duration(this["engine_start_seconds"]),
        fmt_duration(this["wall_seconds"]),
        f"{this['output_tokens_per_second'] or 0:,.1f}",
        reasons,
    )
    total = committed["total_rows"]
    log.info(
        "output: %s prompts committed%s in %d shard(s) under %s",
        f"{committed['prompts']:,}",
        f" of {total:,}" if total is not None else "",
        committed["shards"],
        out_dir,
    )


__all__ = ["RunResult", "run", "ConfigError"]
