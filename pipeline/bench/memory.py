"""Memory and the I/O path: the fake engine over generated Parquet inputs of several sizes, each
in a fresh subprocess, reporting peak RSS and rows per second through read -> prompt building
and tokenization -> engine -> Parquet shards."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.bench.machine import bench_folder, machine_info
from pipeline.bench.workload import make_io_input
from pipeline.config import EngineConfig, OutputConfig, PromptConfig, RunConfig, SourceConfig
from pipeline.errors import BatchgenError
from pipeline.sampling import SamplingConfig

log = logging.getLogger("batchgen")


def run_memory(
    sizes: tuple[int, ...],
    model: str | None = None,
    chat: bool = True,
    rows_per_shard: int = 2000,
    work_dir: str | None = None,
    logprobs: int | None = None,
) -> dict[str, Any]:
    """The fake engine over inputs of each size, each in a fresh subprocess: peak RSS, rows/s."""
    from pipeline.models import resolve_model

    model_path = resolve_model(model)
    results = []
    with bench_folder(work_dir) as work:
        for rows in sorted(sizes):
            src = make_io_input(work / f"io-{rows}.parquet", rows)
            out = work / f"io-out-{rows}"
            log.info("bench --memory: %s rows through the fake engine...", f"{rows:,}")
            job = {
                "input": str(src),
                "output": str(out),
                "model": model_path,
                "chat": chat,
                "rows_per_shard": rows_per_shard,
                "logprobs": logprobs,
            }
            results.append(_io_subprocess(job))
            shutil.rmtree(out, ignore_errors=True)
            src.unlink()
    peaks = [r["peak_rss_mb"] for r in results]
    return {
        "engine": "fake",
        "chat_template": chat,
        "rows_per_shard": rows_per_shard,
        "logprobs": logprobs,
        "sizes": results,
        "peak_rss_mb_max": max(peaks),
        "peak_rss_growth_mb": round(peaks[-1] - peaks[0], 1),
        "io_rows_per_s": results[-1]["rows_per_s"],
        "machine": machine_info(),
    }


def _io_subprocess(job: dict[str, Any]) -> dict[str, Any]:
    return fresh_process("pipeline.bench.memory", "io-child", json.dumps(job), what="I/O bench")


def fresh_process(module: str, *args: str, what: str) -> dict[str, Any]:
    """`python -m module ARGS` in a fresh process (so its peak RSS is its own), this checkout's
    package first on its path; the JSON object its last line of stdout prints."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise BatchgenError(f"the {what} subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def io_child(job: dict[str, Any]) -> dict[str, Any]:
    """One I/O-path run with the fake engine in this (fresh) process; peak RSS included."""
    import pyarrow.parquet as pq

    from pipeline.runner import run

    rows = pq.ParquetFile(job["input"]).metadata.num_rows
    cfg = RunConfig(
        source=SourceConfig(parquet=job["input"]),
        prompt=PromptConfig(prompt_column="prompt", chat=job["chat"]),
        engine=EngineConfig(model=job["model"], backend="fake"),
        sampling=SamplingConfig.of(max_tokens=8, temperature=0.0, logprobs=job["logprobs"]),
        output=OutputConfig(path=job["output"], rows_per_shard=job["rows_per_shard"]),
        progress_seconds=3600.0,
    )
    before = status_mb("VmRSS")
    started = time.monotonic()
    result = run(cfg)
    seconds = time.monotonic() - started
    committed = result.report["committed"]
    if result.status != "finished" or committed["prompts"] != rows:
        raise BatchgenError(f"the fake run ended {result.status} with {committed} of {rows}")
    return {
        "rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds),
        "shards": committed["shards"],
        "rss_before_run_mb": before,
        "peak_rss_mb": peak_rss_mb(),
        "vm_hwm_mb": status_mb("VmHWM"),
    }


def status_mb(key: str) -> float | None:
    """A figure of /proc/self/status (VmRSS, VmHWM) in MB; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def format_memory(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"machine: {m['cpu']} ({m['cpus_usable']} usable cores), {m['memory_gb']} GB",
        f"fake engine, chat template {'on' if report['chat_template'] else 'off'}, a shard every "
        f"{report['rows_per_shard']:,} rows"
        + (f", logprobs {report['logprobs']} (8 tokens a row)" if report.get("logprobs") else "")
        + "; each size in a fresh process",
        "",
        f"{'rows':>12}{'peak RSS MB':>14}{'RSS before run':>16}{'seconds':>10}{'rows/s':>10}",
    ]
    for r in report["sizes"]:
        lines.append(
            f"{r['rows']:>12,}{r['peak_rss_mb']:>14,.1f}{r['rss_before_run_mb']:>16,.1f}"
            f"{r['seconds']:>10,.1f}{r['rows_per_s']:>10,}"
        )
    lines += [
        "",
        f"peak RSS growth from the smallest to the largest input: "
        f"{report['peak_rss_growth_mb']:+.1f} MB",
        f"I/O path (read -> prompt build/tokenize -> fake engine -> Parquet): "
        f"{report['io_rows_per_s']:,} rows/s",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # the fresh process of one memory measurement
    if len(sys.argv) == 3 and sys.argv[1] == "io-child":
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("batchgen").setLevel(logging.WARNING)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        print(json.dumps(io_child(json.loads(sys.argv[2]))))
    else:
        sys.exit(
            "usage: python -m pipeline.bench.memory io-child JOB_JSON (used by batchgen bench)"
        )
