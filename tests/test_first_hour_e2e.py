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
from conftest import BATCHGEN, SAMPLE, greedy_sample_args, read_output
from test_kill_harness import shard_files

pytestmark = pytest.mark.engine


def manifest(out: Path) -> dict:
    return json.loads((out / ".batchgen" / "rank-00000.json").read_text())


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
