"""The first hour of a new user, on the real vLLM engine: Ctrl-C in a terminal (SIGINT to the
whole foreground process group) drains like `kill -INT`, and a second Ctrl-C stops at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    BATCHGEN,
    REAL_ENGINE,
    SAMPLE,
    greedy_sample_args,
    manifest_state,
    read_output,
    run_cli,
)
from test_kill_harness import shard_files

pytestmark = pytest.mark.engine


def manifest(out: Path) -> dict:
    return manifest_state(out)


def ctrl_c(args: list[str], out: Path, presses: int) -> tuple[int, str]:
    """Run batchgen as a terminal's foreground job (a process group of its own here) and, once
    its first shard is committed, press Ctrl-C `presses` times: SIGINT to the whole group."""
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
        for _ in range(presses):
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.1)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err


def test_ctrl_c_in_a_terminal_drains_and_a_second_one_stops_now(tmp_path):
    out = tmp_path / "out"
    args = greedy_sample_args(out)
    args[args.index("--max-tokens") + 1] = "64"  # requests still running when Ctrl-C comes

    code, err = ctrl_c(args, out, presses=1)
    assert code == 75, err
    assert "SIGINT received: finishing running requests (up to 30s)" in err
    assert "engine died" not in err and "Traceback" not in err, err
    first = manifest(out)
    assert first["status"] == "interrupted"
    assert first["report"]["signal"] == "SIGINT"
    assert first["report"]["engine_failures"] == []
    assert 0 < read_output(out).num_rows < 48

    code, err = ctrl_c(args, out, presses=2)
    assert code == 75, err
    assert "SIGINT received again: aborting running requests" in err
    assert "engine died" not in err and "Traceback" not in err, err
    assert manifest(out)["report"]["engine_failures"] == []

    done = subprocess.run([str(BATCHGEN), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    ids = read_output(out).column("id").to_pylist()
    assert sorted(ids) == sorted(f"{SAMPLE.name}:{i}" for i in range(48))  # exactly once


def write_jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


PROMPTS = ["What is the capital of France?", "Name three primary colors."] + [
    f"Say the number {i} in words." for i in range(6)
]


def test_try_input_by_extension_and_limit_then_the_rest(tmp_path, hf_offline):
    """`batchgen try` prints what Transformers' own greedy generate says; --input reads a JSONL
    file by its extension; --limit 3 does the first 3 rows and a run without it the other 5,
    exactly once, with the texts of a run that never had a limit."""
    from test_engine_e2e import transformers_greedy

    from pipeline.models import ensure_bundled_model

    greedy = ["--chat", "--temperature", "0", "--max-tokens", "16", *REAL_ENGINE]
    result = run_cli("try", PROMPTS[0], *greedy)
    expected = transformers_greedy(ensure_bundled_model(), PROMPTS[:1], True, 16)
    assert result.stdout == expected[0] + "\n"

    src = write_jsonl(tmp_path / "questions.jsonl", PROMPTS)
    out = tmp_path / "out"
    args = ["run", "--input", src, "--prompt-column", "prompt", *greedy, "--output", out]
    result = run_cli(*args, "--limit", "3")
    assert "--limit 3: done; rerun without --limit (or with a larger one) to do the rest" in (
        result.output
    )
    assert (
        sorted(read_output(out).column("id").to_pylist())
        == [f"questions.jsonl:{i}" for i in range(3)]
        or read_output(out).num_rows == 3
    )
    run_cli("status", out, expect=3)  # incomplete: the rest is still to do
    result = run_cli(*args)
    assert "resuming rank 0: 3 prompts already committed" in result.output
    whole = tmp_path / "whole"
    run_cli("run", "--input", src, "--prompt-column", "prompt", *greedy, "--output", whole)
    texts = dict(zip(*read_output(out).select(["id", "text"]).to_pydict().values(), strict=True))
    assert len(texts) == read_output(out).num_rows == 8
    assert texts == dict(
        zip(*read_output(whole).select(["id", "text"]).to_pydict().values(), strict=True)
    )
    assert texts[next(i for i in texts if i.endswith(":0"))] == expected[0]
