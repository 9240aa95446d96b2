"""The first hour of a new user, on the real vLLM engine: Ctrl-C in a terminal (SIGINT to the
whole foreground process group) drains like `kill -INT`, and a second Ctrl-C stops at once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from conftest import (
    BATCHGEN,
    REAL_ENGINE,
    SAMPLE,
    greedy_sample_args,
    manifest_state,
    read_output,
    run_cli,
    run_cli_signalled,
    run_subprocess,
    shard_files,
)

pytestmark = pytest.mark.engine


def manifest(out: Path) -> dict:
    return manifest_state(out)


def ctrl_c(args: list[str], out: Path) -> tuple[int, str]:
    """Run batchgen as a terminal's foreground job (a process group of its own here) and, once
    its first shard is committed, press Ctrl-C: SIGINT to the whole group."""
    before = len(shard_files(out))
    proc = subprocess.Popen(
        [str(BATCHGEN), *args], stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 600
        while len(shard_files(out)) <= before:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no shard in 600 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


def test_ctrl_c_in_a_terminal_drains_and_a_second_one_stops_now(tmp_path):
    """One Ctrl-C in a terminal (SIGINT to the whole foreground group, vLLM's engine core
    included) drains on the real engine in a fresh process, as a user's run; a second one aborts
    the running requests, on the engine the other tests share (no second engine start: whether
    the engine core sees the group's SIGINT was the first run's question); then the rest."""
    out = tmp_path / "out"
    args = greedy_sample_args(out)
    args[args.index("--max-tokens") + 1] = "64"  # requests still running when Ctrl-C comes

    code, err = ctrl_c(args, out)
    assert code == 75, err
    assert "SIGINT received: finishing running requests (up to 30s)" in err
    assert "engine died" not in err and "Traceback" not in err, err
    first = manifest(out)
    assert first["status"] == "interrupted"
    assert first["report"]["signal"] == "SIGINT"
    assert first["report"]["engine_failures"] == []
    done_once = read_output(out).num_rows
    assert 0 < done_once < 48

    result = run_cli_signalled(args, out, [signal.SIGINT, signal.SIGINT])
    output = result.output
    assert result.exit_code == 75, output
    assert "SIGINT received again: aborting running requests" in output, output
    assert "aborted" in output and "engine died" not in output, output
    second = manifest(out)
    assert second["report"]["signal"] == "SIGINT"
    assert second["report"]["engine_failures"] == []
    assert done_once < read_output(out).num_rows < 48

    # The rest: --max-inflight 4 only kept the interrupted runs slow enough to interrupt; a
    # run setting, so the resume drops it and sends the remaining 64-token requests at once.
    i = args.index("--max-inflight")
    run_cli(*args[:i], *args[i + 2 :])
    ids = read_output(out).column("id").to_pylist()
    assert sorted(ids) == sorted(f"{SAMPLE.name}:{i}" for i in range(48))  # exactly once


def write_jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


PROMPTS = ["What is the capital of France?", "Name three primary colors."] + [
    f"Say the number {i} in words." for i in range(6)
]


def parquet_shards(out: Path) -> pa.Table:
    """The Parquet shards of a folder that holds JSONL files too (read by their extension)."""
    files = sorted(str(p) for p in out.glob("rank-*/part-*.parquet"))
    return pads.dataset(files, format="parquet").to_table()


def test_try_input_by_extension_and_limit_then_the_rest(tmp_path, hf_offline):
    """`batchgen try` prints the completion a run gives the same prompt; --input reads a JSONL
    file by its extension; --limit 3 does the first 3 rows and a run without it the other 5,
    exactly once, with the texts of a run that never had a limit; with --output-format jsonl,
    the JSONL files hold those rows too, once each (all on the engine the other tests share)."""
    greedy = ["--chat", "--temperature", "0", "--max-tokens", "16", *REAL_ENGINE]
    tried = run_cli("try", PROMPTS[0], *greedy).stdout

    src = write_jsonl(tmp_path / "questions.jsonl", PROMPTS)
    out = tmp_path / "out"
    args = ["run", "--input", src, "--prompt-column", "prompt", *greedy, "--output", out]
    args += ["--output-format", "jsonl"]
    result = run_cli(*args, "--limit", "3")
    assert "--limit 3: done; rerun without --limit (or with a larger one) to do the rest" in (
        result.output
    )
    # `datasets` reads a JSONL file as split "train": ids are train:<row>.
    assert sorted(parquet_shards(out).column("id").to_pylist()) == ["train:0", "train:1", "train:2"]
    run_cli("status", out, expect=3)  # incomplete: the rest is still to do
    result = run_cli(*args)
    assert "resuming rank 0: 3 prompts already committed" in result.output
    whole = tmp_path / "whole"
    run_cli("run", "--input", src, "--prompt-column", "prompt", *greedy, "--output", whole)
    table = parquet_shards(out)
    texts = dict(zip(*table.select(["id", "text"]).to_pydict().values(), strict=True))
    assert len(texts) == table.num_rows == 8
    assert texts == dict(
        zip(*read_output(whole).select(["id", "text"]).to_pydict().values(), strict=True)
    )
    # `try` printed what a job makes of the same prompt (test_engine_e2e checks those texts
    # against Transformers' own greedy generate).
    assert tried == texts["train:0"] + "\n" and texts["train:0"]
    files = sorted(out.glob("rank-*/*.jsonl"))
    lines = [json.loads(x) for p in files for x in p.read_text().splitlines()]
    assert {x["id"]: x["text"] for x in lines} == texts and len(lines) == 8


BATCHGEN_LINE = re.compile(r"^\d\d:\d\d:\d\d batchgen: ")
PLAN_LINE = re.compile(r"^(plan: |  |can run: |cannot run: )")


def test_plan_calibrate_prints_only_batchgen_lines_and_counts_the_engine_start(tmp_path):
    """A fresh process, as a user's: vLLM's start-up warnings and progress go to a temporary
    engine log, the `datasets` build of the JSONL input (a cold cache) shows no bar, and the
    ETA adds the measured engine start to the generation."""
    src = write_jsonl(tmp_path / "questions.jsonl", PROMPTS[:3])
    args = ["plan", "--input", src, "--prompt-column", "prompt", "--chat", "--max-tokens", "8"]
    env = {
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"),
        "TMPDIR": str(tmp_path),  # where the engine log goes, and is removed from
    }
    proc = run_subprocess(*args, *REAL_ENGINE, "--calibrate", "1", env=env)
    assert proc.returncode == 0, proc.stderr
    assert [x for x in proc.stderr.splitlines() if not BATCHGEN_LINE.match(x)] == []
    assert [x for x in proc.stdout.splitlines() if not PLAN_LINE.match(x)] == []
    eta = next(x for x in proc.stdout.splitlines() if x.startswith("  ETA: "))
    start = re.search(r"output tok/s; engine start (\S+)$", proc.stdout, re.M).group(1)
    assert f"of generation and an engine start of {start}, from --calibrate" in eta
    assert start not in ("0.0s", "0.1s", "0.2s")  # measured: vLLM on CPU takes 15 s or more
    assert not list(tmp_path.glob("batchgen-plan-engine-*"))
