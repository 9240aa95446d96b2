"""`batchgen bench --scale`: a synthetic job of many ranks made with the fake engine through
the code that commits real shards, then the operator commands timed over it.

Steps (each with its time and peak RSS):
  inputs      F Parquet files holding R x N rows
  real ranks  a few ranks as `batchgen run --engine fake` processes (rank start: until the
              first commit record; peak RSS of the whole process)
  kill        one more rank, SIGKILLed from outside after half its shards, then resumed
              (resume start: until its first new commit record); its ids checked exactly once
  in-process  every other rank through `pipeline.runner.run`, in this process
  commits     one rank's commit path (shard write + commit record) 2,000 times: the first
              and the last commits' rates
  commands    `batchgen status --json`, `show --limit 5`, `report --html` and
              `plan --all-ranks` (pipeline.plan.make_plan), each as a process
The output folder is left behind for the operator commands to be tried by hand.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.bench.machine import machine_info
from pipeline.bench.workload import make_io_input
from pipeline.errors import BatchgenError

log = logging.getLogger("batchgen")

REAL_RANKS = 3  # ranks run as `batchgen run` processes (plus the killed one)
COMMIT_PROBE = 2_000  # commits timed on one rank's commit path
MAX_TOKENS = 8


def run_scale(
    ranks: int, rows_per_rank: int, rows_per_shard: int, input_files: int, output: str
) -> dict[str, Any]:
    """Build the job in `output` and time each step; the report as a dict."""
    if ranks < REAL_RANKS + 2:
        raise BatchgenError(f"--ranks {ranks}: the scale bench needs at least {REAL_RANKS + 2}")
    work = Path(output)
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    if out.exists() and any(out.iterdir()):
        raise BatchgenError(f"{out} is not empty; give the scale bench a fresh --output")
    steps: dict[str, Any] = {}
    load_before = os.getloadavg()  # the machine may be shared: say how busy it was
    started = time.monotonic()
    inputs = _make_inputs(work / "input", ranks * rows_per_rank, input_files)
    steps["inputs"] = {"seconds": _since(started), "files": input_files}
    argv = _run_argv(inputs, out, ranks, rows_per_shard)
    steps["real_ranks"] = [_real_rank(argv, out, rank) for rank in range(REAL_RANKS)]
    steps["kill_and_resume"] = _kill_and_resume(argv, out, REAL_RANKS, rows_per_rank)
    steps["in_process_ranks"] = _in_process_ranks(inputs, out, ranks, rows_per_shard)
    steps["commit_path"] = commit_probe(work / "commit-probe", rows_per_shard, COMMIT_PROBE)
    steps["status_json"] = _command(["status", str(out), "--json"], expect=(0,))
    steps["show_limit_5"] = _command(["show", str(out), "--limit", "5"])
    steps["report_html"] = _command(["report", str(out), "--html", str(work / "report.html")])
    steps["plan_all_ranks"] = _plan_all_ranks(argv)
    return {
        "ranks": ranks,
        "rows_per_rank": rows_per_rank,
        "rows_per_shard": rows_per_shard,
        "input_files": input_files,
        "rows": ranks * rows_per_rank,
        "output": str(out),
        "steps": steps,
        "seconds": _since(started),
        "load_average": {"start": load_before, "end": os.getloadavg()},
        "machine": machine_info(),
    }


def run_one_rank(rows: int, rows_per_shard: int, output: str) -> dict[str, Any]:
    """One rank of `rows` rows with --id-column, SIGKILLed after half its shards and resumed,
    against a 100k-row run of the same shape: peak RSS of each, the resume's time to its
    first new shard, every id exactly once. (`--ranks 1`; the prompts are distinct, so the
    prompt column serves as the id column.)"""
    work = Path(output)
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.monotonic()
    base_rows = min(rows, 100_000)
    base_in = make_io_input(work / "base.parquet", base_rows)
    big_in = make_io_input(work / "big.parquet", rows) if rows != base_rows else base_in
    inputs_seconds = _since(started)
    flags = ["--id-column", "prompt"]
    base_argv = [*_run_argv(base_in, work / "base-out", 1, rows_per_shard), *flags]
    baseline = _command([*base_argv, "--rank", "0"], expect=(0,))
    argv = [*_run_argv(big_in, work / "out", 1, rows_per_shard), *flags]
    killed = _kill_and_resume(argv, work / "out", 0, rows)
    return {
        "ranks": 1,
        "rows": rows,
        "rows_per_shard": rows_per_shard,
        "id_column": True,
        "output": str(work / "out"),
        "inputs_seconds": inputs_seconds,
        "baseline": {"rows": base_rows, **baseline},
        "kill_and_resume": killed,
        "resume_minus_baseline_rss_mb": round(
            killed["resume"]["peak_rss_mb"] - baseline["peak_rss_mb"], 1
        ),
        "seconds": _since(started),
        "load_average": {"start": load_before, "end": os.getloadavg()},
        "machine": machine_info(),
    }


def format_one_rank(report: dict[str, Any]) -> str:
    """The one-rank kill-and-resume bench's report."""
    k, b = report["kill_and_resume"], report["baseline"]
    return "\n".join(
        [
            f"one rank of {report['rows']:,} rows with --id-column, a shard every "
            f"{report['rows_per_shard']:,} rows, in {report['output']}",
            f"{b['rows']:,}-row run: {b['seconds']:.1f} s, peak RSS {b['peak_rss_mb']} MB",
            f"SIGKILL after {k['killed_after_commits']:,} commits; resume: first new shard after "
            f"{k['resume']['first_new_shard_seconds']} s, done in {k['resume']['seconds']:.1f} s, "
            f"peak RSS {k['resume']['peak_rss_mb']} MB "
            f"({report['resume_minus_baseline_rss_mb']:+.1f} MB vs the {b['rows']:,}-row run)",
            f"ids {k['ids']:,}, unique {k['unique_ids']:,}: "
            + ("exactly once" if k["exactly_once"] else "NOT exactly once"),
        ]
    )


def _since(t: float) -> float:
    return round(time.monotonic() - t, 3)


def _make_inputs(folder: Path, rows: int, files: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    for i in range(files):
        n = min(per, rows - i * per)
        if n > 0:
            make_io_input(folder / f"in-{i:05d}.parquet", n, seed=i)
    return folder


def _run_argv(inputs: Path, out: Path, ranks: int, rows_per_shard: int) -> list[str]:
    """`batchgen run` of one rank of the job (the rank appended by the caller)."""
    return [
        "run",
        "--engine",
        "fake",
        "--parquet",
        str(inputs),
        "--prompt-column",
        "prompt",
        "--max-tokens",
        str(MAX_TOKENS),
        "--rows-per-shard",
        str(rows_per_shard),
        "--output",
        str(out),
        "--num-ranks",
        str(ranks),
    ]


def _env() -> dict[str, str]:
    package_root = str(Path(__file__).resolve().parent.parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def _spawn(args: list[str], pause_after: int = 0) -> subprocess.Popen:
    """`batchgen ARGS` as a child that prints its own peak RSS (VmHWM) last on stderr: the
    rusage a parent gets counts the parent's own size from before the exec."""
    # A file, not a pipe: a pipe nobody reads could fill and block the child.
    err = tempfile.TemporaryFile()  # noqa: SIM115 - closed by `_reap`
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.bench.scale", "child", str(pause_after), *args],
        stdout=subprocess.DEVNULL,
        stderr=err,
        env=_env(),
    )
    proc.stderr = err  # read back by `_reap`
    return proc


def _reap(proc: subprocess.Popen, started: float) -> dict[str, Any]:
    """Wait for a child: its seconds, exit code and peak RSS (None if it was killed)."""
    _pid, status, usage = os.wait4(proc.pid, 0)  # its CPU time: wall time varies with load
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = _since(started)
    proc.stderr.seek(0)
    err = proc.stderr.read()
    proc.stderr.close()
    tail = err.decode(errors="replace").rstrip().rsplit("\n", 1)[-1]
    peak = float(tail.split()[1]) if tail.startswith("VmHWM-MB ") else None
    return {
        "seconds": seconds,
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
        "rc": proc.returncode,
        "peak_rss_mb": peak,
        "stderr_tail": err.decode(errors="replace")[-400:] if proc.returncode else "",
    }


def _first_commit(out: Path, rank: int, before: set[str], proc: subprocess.Popen) -> float | None:
    """Poll until a commit record not in `before` appears (or the process ends): the time."""
    from pipeline.rankstate import manifest_path

    folder = manifest_path(out, rank)
    started = time.monotonic()
    while True:
        with contextlib.suppress(FileNotFoundError):
            if any(n.startswith("commit-") and n not in before for n in os.listdir(folder)):
                return _since(started)
        if _exited(proc):
            return None
        time.sleep(0.005)


def _exited(proc: subprocess.Popen) -> bool:
    return proc.poll() is not None


def _real_rank(argv: list[str], out: Path, rank: int) -> dict[str, Any]:
    started = time.monotonic()
    proc = _spawn([*argv, "--rank", str(rank)])
    first = _first_commit(out, rank, set(), proc)
    result = _reap(proc, started)
    result.update(rank=rank, first_shard_seconds=first)
    if result["rc"] != 0:
        raise BatchgenError(f"rank {rank} of the scale bench failed: {result['stderr_tail']}")
    return result


def _kill_and_resume(argv: list[str], out: Path, rank: int, rows_per_rank: int) -> dict[str, Any]:
    """One rank paused after half its shards, SIGKILLed from outside, then resumed."""
    from pipeline.rankstate import manifest_path

    shards = max(-(-rows_per_rank // int(argv[argv.index("--rows-per-shard") + 1])), 2)
    half = shards // 2
    started = time.monotonic()
    proc = _spawn([*argv, "--rank", str(rank)], pause_after=half)
    folder = manifest_path(out, rank)
    while not _exited(proc):
        with contextlib.suppress(FileNotFoundError):
            if sum(n.startswith("commit-") for n in os.listdir(folder)) >= half:
                break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    killed = _reap(proc, started)
    before = set(os.listdir(folder))
    started = time.monotonic()
    proc = _spawn([*argv, "--rank", str(rank)])
    first = _first_commit(out, rank, before, proc)
    resumed = _reap(proc, started)
    if resumed["rc"] != 0:
        raise BatchgenError(f"the resumed rank {rank} failed: {resumed['stderr_tail']}")
    ids, unique = _ids(out, rank)
    return {
        "rank": rank,
        "killed_after_commits": half,
        "killed_rc": killed["rc"],
        "killed_peak_rss_mb": killed["peak_rss_mb"],
        "resume": {**resumed, "first_new_shard_seconds": first},
        "ids": ids,
        "unique_ids": unique,
        "exactly_once": ids == unique == rows_per_rank,
    }


IDS_PER_BUCKET = 250_000  # ids counted at once by `_ids` (~50 MB of the bench's prompt ids)
MAX_BUCKETS = 512  # stream files `_ids` holds open at once: under the usual 1,024 open files


def _ids(out: Path, rank: int) -> tuple[int, int]:
    """(ids, distinct ids) over a rank's shards, counted by Arrow (no Python set of ids), in
    memory that does not grow with the rank: each shard's ids go to one of several Arrow
    stream files by a hash of the id, then each file's ids are counted alone. (All 20M ids at
    once, ~200-byte prompts, took 19.9 GB.)"""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.sinks import shard_files

    paths = shard_files(out, rank)
    rows = sum(pq.ParquetFile(path).metadata.num_rows for path in paths)
    # (past 128M ids in one rank the buckets grow instead: ~2M ids, ~400 MB, at 1B)
    buckets = min(max(1, -(-rows // IDS_PER_BUCKET)), MAX_BUCKETS)
    schema = pa.schema([("id", pa.large_string())])
    with tempfile.TemporaryDirectory(prefix="batchgen-scale-ids-") as tmp:
        writers = [pa.ipc.new_stream(Path(tmp) / f"{b}.arrow", schema) for b in range(buckets)]
        for path in paths:
            ids = pq.read_table(path, columns=["id"]).column("id").cast(pa.large_string())
            bucket = pd.util.hash_array(ids.to_numpy(zero_copy_only=False)) % buckets
            for b in set(bucket.tolist()):
                writers[b].write_table(pa.table({"id": ids.filter(pa.array(bucket == b))}))
        for w in writers:
            w.close()
        distinct = 0
        for b in range(buckets):
            with pa.memory_map(str(Path(tmp) / f"{b}.arrow")) as f:
                ids = pa.ipc.open_stream(f).read_all().column("id")
                distinct += pc.count_distinct(ids).as_py() if len(ids) else 0
    return rows, distinct


def _in_process_ranks(inputs: Path, out: Path, ranks: int, rows_per_shard: int) -> dict[str, Any]:
    """Every rank not run as a process, through `pipeline.runner.run` in this process."""
    from pipeline.config import EngineConfig, OutputConfig, PromptConfig, RunConfig, SourceConfig
    from pipeline.models import resolve_model
    from pipeline.runner import run
    from pipeline.sampling import SamplingConfig

    model = resolve_model(None)
    times = []
    started = time.monotonic()
    quiet = logging.getLogger("batchgen")
    level, quiet.level = quiet.level, logging.WARNING
    try:
        for rank in range(REAL_RANKS + 1, ranks):
            cfg = RunConfig(
                source=SourceConfig(parquet=str(inputs)),
                prompt=PromptConfig(prompt_column="prompt", chat=False),
                engine=EngineConfig(model=model, backend="fake"),
                sampling=SamplingConfig.of(max_tokens=MAX_TOKENS),
                output=OutputConfig(path=str(out), rows_per_shard=rows_per_shard),
                progress_seconds=3600.0,
                num_ranks=ranks,
                rank=rank,
            )
            t = time.monotonic()
            result = run(cfg)
            times.append(time.monotonic() - t)
            if result.status != "finished":
                raise BatchgenError(f"rank {rank} ended {result.status}")
    finally:
        quiet.level = level
    times.sort()
    return {
        "ranks": len(times),
        "seconds": _since(started),
        "median_rank_seconds": round(times[len(times) // 2], 4),
        "max_rank_seconds": round(times[-1], 4),
    }


def commit_probe(folder: Path, rows_per_shard: int, commits: int) -> dict[str, Any]:
    """One rank's commit path (`ParquetShardWriter.write` then `Checkpoint.commit`, what the
    committer thread does per shard) `commits` times: the median seconds of the first ten and
    of the last ten commits."""
    from pipeline.checkpoint import Checkpoint, Manifest
    from pipeline.records import ResultRow
    from pipeline.sinks import ParquetShardWriter, output_schema

    checkpoint = Checkpoint(folder, 0, 1)
    checkpoint.manifest = Manifest(rank=0, num_ranks=1, fingerprint={}, started_at=time.time())
    checkpoint.set_status("running")
    writer = ParquetShardWriter(folder, 0, output_schema(False, []), {"bench": "scale"})
    seconds = []
    for seq in range(commits):
        rows = [
            ResultRow(
                f"r{seq * rows_per_shard + i}", seq * rows_per_shard + i, 0, "fake", "length", 8, 8
            )
            for i in range(rows_per_shard)
        ]
        t = time.perf_counter()
        info = writer.write(rows, seq)
        checkpoint.commit(info)
        seconds.append(time.perf_counter() - t)
    first, last = sorted(seconds[:10]), sorted(seconds[-10:])
    return {
        "commits": commits,
        "first_10_median_ms": round(first[5] * 1000, 2),
        "last_10_median_ms": round(last[5] * 1000, 2),
        "first_commits_per_s": round(1 / first[5], 1),
        "last_commits_per_s": round(1 / last[5], 1),
    }


def _command(args: list[str], expect: tuple[int, ...] = (0, 3)) -> dict[str, Any]:
    """A `batchgen` command as a process: its seconds (Python's start included) and peak RSS."""
    started = time.monotonic()
    result = _reap(_spawn(args), started)
    if result["rc"] not in expect:
        raise BatchgenError(f"batchgen {' '.join(args)} failed: {result['stderr_tail']}")
    return result


def _plan_all_ranks(argv: list[str]) -> dict[str, Any]:
    """`batchgen plan --all-ranks` with the run's flags (pipeline.plan.make_plan), a process."""
    return _command(["plan", *argv[1:], "--rank", "0", "--all-ranks", "--json"])


def _child(pause_after: int, argv: list[str]) -> None:
    """`batchgen ARGV` in this process; with `pause_after`, it stops moving after that many
    commit records, until the bench kills it. Prints its peak RSS last on stderr at exit."""
    import atexit

    from pipeline.checkpoint import Checkpoint
    from pipeline.cli import main

    atexit.register(lambda: print(f"VmHWM-MB {_vm_hwm_mb()}", file=sys.stderr, flush=True))
    if pause_after:
        commit = Checkpoint.commit
        done = [0]

        def pausing(self: Checkpoint, info: Any) -> None:
            commit(self, info)
            done[0] += 1
            if done[0] >= pause_after:
                time.sleep(3600)  # the bench kills this process here

        Checkpoint.commit = pausing  # type: ignore[method-assign]
    main.main(argv, prog_name="batchgen")


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def format_scale(report: dict[str, Any]) -> str:
    """The scale bench's report, one line a step."""
    s = report["steps"]
    lines = [
        f"{report['ranks']:,} ranks x {report['rows_per_rank']:,} rows, a shard every "
        f"{report['rows_per_shard']:,} rows, {report['input_files']:,} input files, in "
        f"{report['output']}",
        f"inputs made in {s['inputs']['seconds']:.1f} s",
    ]
    for r in s["real_ranks"]:
        lines.append(
            f"rank {r['rank']} (a process): first shard after {r['first_shard_seconds']} s, "
            f"done in {r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']} MB"
        )
    k = s["kill_and_resume"]
    lines.append(
        f"rank {k['rank']}: SIGKILL after {k['killed_after_commits']} commits, resumed: first "
        f"new shard after {k['resume']['first_new_shard_seconds']} s, done in "
        f"{k['resume']['seconds']:.2f} s, peak RSS {k['resume']['peak_rss_mb']} MB; ids "
        f"{k['ids']:,}, unique {k['unique_ids']:,}: "
        + ("exactly once" if k["exactly_once"] else "NOT exactly once")
    )
    p = s["in_process_ranks"]
    lines.append(
        f"{p['ranks']:,} ranks in-process in {p['seconds']:.1f} s (median "
        f"{p['median_rank_seconds']:.3f} s a rank)"
    )
    c = s["commit_path"]
    lines.append(
        f"commit path: commits 1-10 median {c['first_10_median_ms']} ms, commits "
        f"{c['commits'] - 9:,}-{c['commits']:,} median {c['last_10_median_ms']} ms"
    )
    for key, name in (
        ("status_json", "batchgen status --json"),
        ("show_limit_5", "batchgen show --limit 5"),
        ("report_html", "batchgen report --html"),
        ("plan_all_ranks", "plan --all-ranks (make_plan)"),
    ):
        lines.append(
            f"{name}: {s[key]['seconds']:.2f} s ({s[key]['cpu_seconds']:.2f} s CPU), peak RSS "
            f"{s[key]['peak_rss_mb']} MB"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # the bench's child processes
    if len(sys.argv) > 2 and sys.argv[1] == "child":
        _child(int(sys.argv[2]), sys.argv[3:])
    else:
        sys.exit(
            "usage: python -m pipeline.bench.scale child PAUSE_AFTER ARGS (used by batchgen bench --scale)"
        )
