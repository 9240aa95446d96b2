"""Resume on the fake engine: interrupted runs continue, finished ones are no-ops, changed
settings are refused. (Crash-at-any-instant proof with SIGKILL lives in test_kill_harness.py.)"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    FAKE_ENGINE,
    HOOKED_BATCHGEN,
    manifest_state,
    read_output,
    run_args,
    run_cli,
    save_manifest_state,
    write_prompts,
)

ROWS = 1000


@pytest.fixture
def big_input(tmp_path: Path) -> Path:
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(ROWS)]
    return write_prompts(tmp_path / "rows.parquet", prompts, 100)


def base_args(src: Path, out: Path) -> list[str]:
    return run_args(src, out, "--rows-per-shard", "50", *FAKE_ENGINE, "--max-num-seqs", "16")


def start(args: list[str], step_seconds: float) -> subprocess.Popen:
    env = {**os.environ, "BATCHGEN_FAKE_STEP_SECONDS": str(step_seconds)}
    return subprocess.Popen(
        [str(HOOKED_BATCHGEN), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_shards(out: Path, count: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(out.glob("rank-*/part-*.parquet"))) >= count:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no {count} shards in {timeout}s")


def assert_exactly_once(out: Path, expected_ids: set[str]) -> pa.Table:
    table = read_output(out)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "a row was written twice"
    assert set(ids) == expected_ids
    return table


def all_ids(src: Path) -> set[str]:
    return {f"{src.name}:{i}" for i in range(pq.ParquetFile(src).metadata.num_rows)}


@pytest.mark.parametrize(
    "sig, code", [(signal.SIGTERM, 75), (signal.SIGINT, 75), (signal.SIGUSR1, 75)]
)
def test_signal_commits_and_exits_75_then_rerun_finishes(big_input, tmp_path, sig, code):
    out = tmp_path / "out"
    reference = tmp_path / "ref"
    run_cli(*base_args(big_input, reference))

    proc = start(base_args(big_input, out), step_seconds=0.05)
    wait_for_shards(out, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert f"{sig.name} received" in err
    manifest = manifest_state(out)
    assert manifest["status"] == "interrupted"
    assert manifest["report"]["signal"] == sig.name
    partial = read_output(out).num_rows
    assert 0 < partial < ROWS

    result = run_cli(*base_args(big_input, out))
    assert f"resuming rank 0: {partial:,} prompts already committed" in result.output
    table = assert_exactly_once(out, all_ids(big_input))
    expected = dict(
        zip(*read_output(reference).select(["id", "text"]).to_pydict().values(), strict=True)
    )
    assert dict(zip(*table.select(["id", "text"]).to_pydict().values(), strict=True)) == expected


def test_sigkill_then_rerun_exactly_once(big_input, tmp_path):
    out = tmp_path / "out"
    proc = start(base_args(big_input, out), step_seconds=0.05)
    wait_for_shards(out, 3, proc)
    proc.kill()
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    run_cli(*base_args(big_input, out))
    assert_exactly_once(out, all_ids(big_input))


def test_sigkill_then_rerun_with_id_column_exactly_once(tmp_path):
    """The resume reads the rows it has not committed, then the committed rows' ids."""
    keys = [f"key-{i:04d}" for i in range(ROWS)]
    src = write_prompts(tmp_path / "rows.parquet", [f"Q {i}" for i in range(ROWS)], 100, key=keys)
    out = tmp_path / "out"
    args = [*base_args(src, out), "--id-column", "key"]
    proc = start(args, step_seconds=0.05)
    wait_for_shards(out, 3, proc)
    proc.kill()
    proc.communicate(timeout=30)
    committed = read_output(out).num_rows
    assert 0 < committed < ROWS
    result = run_cli(*args)
    assert f"resuming rank 0: {committed:,} prompts already committed" in result.output
    assert_exactly_once(out, set(keys))


def test_an_id_repeated_across_committed_and_new_rows_is_refused(tmp_path):
    """Rows 0-499 are committed by a --limit run (their ids unique); the full run's row 700
    repeats row 100's id. The committed ids are checked after the new rows, so the refusal
    comes at the input's end, naming both rows; every row committed is there once (by its
    prompt: row 700 may be committed too, under its repeated id)."""
    keys = [f"key-{i:04d}" for i in range(ROWS)]
    keys[700] = keys[100]
    src = write_prompts(tmp_path / "rows.parquet", [f"Q {i}" for i in range(ROWS)], 100, key=keys)
    out = tmp_path / "out"
    args = [*base_args(src, out), "--id-column", "key", "--keep-prompt"]
    run_cli(*args, "--limit", "500")
    result = run_cli(*args, expect=1)
    assert result.output.splitlines()[-1] == (
        "Error: --id-column 'key' repeats the id 'key-0100' (rows 100 and 700); resume needs "
        "unique ids: pick a unique column or omit --id-column"
    )
    table = read_output(out)
    prompts = table.column("prompt").to_pylist()
    assert len(prompts) == len(set(prompts))
    assert {f"Q {i}" for i in range(500)} <= set(prompts)
    ids = table.column("id").to_pylist()
    assert len(ids) - len(set(ids)) == ("Q 700" in prompts)


def test_finished_run_rerun_is_a_noop(big_input, tmp_path):
    out = tmp_path / "out"
    run_cli(*base_args(big_input, out))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("rank-*/part-*.parquet")}
    assert len(before) == ROWS // 50
    result = run_cli(*base_args(big_input, out))
    assert (
        f"already complete: {ROWS:,} rows ({ROWS:,} prompts, 0 errors) in 20 shard(s)"
        in result.output
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("rank-*/part-*.parquet")} == before


@pytest.mark.parametrize(
    "change, expected",
    [
        (["--max-tokens", "9"], "sampling.max_tokens: 8 -> 9"),
        (["--temperature", "0"], "sampling.temperature: 1.0 -> 0"),
        (["--seed", "3"], "seed: 0 -> 3"),
        (["--chat"], "prompt.chat: false -> true"),
        (["--max-model-len", "1024"], "max_model_len: (not set) -> 1024"),
        (["--keep-prompt"], "columns.keep_prompt: false -> true"),
    ],
)
def test_changed_settings_are_refused_naming_the_field(big_input, tmp_path, change, expected):
    out = tmp_path / "out"
    run_cli(*base_args(big_input, out))
    result = run_cli(*base_args(big_input, out), *change, expect=1)
    assert "holds an earlier run with different settings" in result.output
    assert expected in result.output
    assert "--overwrite" in result.output


def test_changed_input_is_refused_and_overwrite_starts_afresh(big_input, tmp_path):
    out = tmp_path / "out"
    run_cli(*base_args(big_input, out))
    pq.write_table(pa.table({"prompt": ["one more row"] * 10}), big_input)
    result = run_cli(*base_args(big_input, out), expect=1)
    assert "input.rows: 1000 -> 10" in result.output
    assert "input.listing_sha256: " in result.output
    result = run_cli(*base_args(big_input, out), "--overwrite")
    assert "--overwrite removed 20 shard(s) and 1 manifest(s) of rank(s) 0" in result.output
    assert_exactly_once(out, all_ids(big_input))


def test_input_rewritten_at_the_same_size_and_row_count_is_refused(tmp_path):
    """Sizes and row counts alone would miss this rewrite; the footer digest does not."""

    def write(prompts: list[str]) -> None:  # fixed-width rows: only the letters differ
        pq.write_table(pa.table({"prompt": prompts}), src, compression="none", use_dictionary=False)

    src, out = tmp_path / "rows.parquet", tmp_path / "out"
    write([f"Question {i:03d}: what is A?" for i in range(200)])
    size = src.stat().st_size
    run_cli(*base_args(src, out))
    write([f"Question {i:03d}: what is B?" for i in range(200)])
    assert src.stat().st_size == size and pq.ParquetFile(src).metadata.num_rows == 200
    result = run_cli(*base_args(src, out), expect=1)
    assert "holds an earlier run with different settings" in result.output
    assert "input.listing_sha256: " in result.output
    # The rank that owns the file notices it against the job's listing, and names it.
    assert f"rows.parquet changed ({size:,} bytes, 200 rows, digest " in result.output


def test_shard_committed_before_manifest_update_is_adopted(big_input, tmp_path):
    """A crash between a shard's rename and the manifest write leaves a complete, unlisted shard."""
    out = tmp_path / "out"
    run_cli(*base_args(big_input, out))
    manifest = manifest_state(out)
    dropped = manifest["shards"].pop()
    manifest["status"] = "running"
    save_manifest_state(out, manifest)
    (out / "rank-00000" / ".tmp-part-00000-000099.parquet.123").write_bytes(b"half a shard")

    result = run_cli(*base_args(big_input, out))
    assert f"adopted {dropped['file']} (50 rows), committed just before a crash" in result.output
    assert "removed an unfinished temporary file from a crash" in result.output
    assert "0 prompts this run" in result.output
    assert not list(out.glob("*/.tmp-*"))
    assert_exactly_once(out, all_ids(big_input))


def test_deleted_shard_is_regenerated(big_input, tmp_path):
    out = tmp_path / "out"
    run_cli(*base_args(big_input, out))
    (out / "rank-00000" / "part-00000-000003.parquet").unlink()
    result = run_cli(*base_args(big_input, out))
    assert "1 shard(s) listed in the manifest are gone" in result.output
    assert "50 prompts this run" in result.output
    assert_exactly_once(out, all_ids(big_input))


@contextlib.contextmanager
def rank_lock_in_another_process(out: Path, rank: int):
    """Hold a rank's lock from a child process (lockf locks belong to a process, so a lock
    taken in the test's own process would not stand for a live run elsewhere)."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from pipeline.checkpoint import RankLock; "
            f"lock = RankLock(Path({str(out)!r}), {rank}).acquire(); print('held', flush=True); "
            "time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.communicate()


def test_second_process_on_same_rank_is_refused(big_input, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with rank_lock_in_another_process(out, 0) as holder:
        result = run_cli(*base_args(big_input, out), expect=1)
        assert f"rank 0 of {out} is being written by pid {holder.pid}" in result.output
    run_cli(*base_args(big_input, out))  # a killed holder's lock is gone at once


def test_overwrite_does_not_remove_a_live_rank_of_another_run(big_input, tmp_path):
    """--overwrite on rank 0 with new settings removes other ranks' files of the old run, but
    never under a live writer: it refuses, touching nothing, while rank 1's lock is held."""
    out = tmp_path / "out"
    ranks = ["--num-shards", "2", "--shard-index"]
    run_cli(*base_args(big_input, out), *ranks, "1")

    def files() -> dict[str, int]:  # shards and manifests; lock files change with holders
        return {
            p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "lock"
        }

    before = files()
    with rank_lock_in_another_process(out, 1) as holder:
        result = run_cli(
            *base_args(big_input, out), *ranks, "0", "--max-tokens", "9", "--overwrite", expect=1
        )
        assert f"--overwrite would remove rank 1 of {out}" in result.output
        assert f"pid {holder.pid}" in result.output
        assert files() == before
    result = run_cli(*base_args(big_input, out), *ranks, "0", "--max-tokens", "9", "--overwrite")
    assert "--overwrite removed 10 shard(s) and 1 manifest(s) of rank(s) 0, 1" in result.output
    assert not list(out.glob("rank-*/part-00001-*"))
    assert read_output(out).num_rows == ROWS // 2


def test_unwritable_output_is_a_clear_error(big_input, tmp_path):
    if os.geteuid() == 0:
        target = Path("/proc/batchgen-out")  # root ignores permission bits; /proc refuses mkdir
    else:
        target = tmp_path / "ro" / "out"
        (tmp_path / "ro").mkdir(mode=0o500)
    result = run_cli(*base_args(big_input, target), expect=1)
    assert f"--output {target}: cannot write there" in result.output


def test_python_entry_point_matches_console_script(tmp_path, big_input):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", *base_args(big_input, out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert read_output(out).num_rows == ROWS


def test_a_run_missing_rows_is_never_called_finished(big_input, tmp_path, monkeypatch):
    """The last line of defence for exactly-once: if rows went missing inside batchgen (as once
    in a feeder bug), the run fails loudly instead of marking itself complete."""
    from pipeline.prompts import PromptBuilder

    real_build = PromptBuilder.build
    calls = []

    def lossy_build(self, ids, columns, seqs):
        calls.append(len(ids))
        rows = real_build(self, ids, columns, seqs)
        return [] if len(calls) == 1 else rows  # lose the first chunk the feeder builds

    monkeypatch.setattr(PromptBuilder, "build", lossy_build)
    out = tmp_path / "out"
    result = run_cli(*base_args(big_input, out), expect=1)
    assert 0 < calls[0] < ROWS
    assert (
        f"the input has 1,000 rows for rank 0 but {ROWS - calls[0]:,} are committed in {out}; "
        "this is a batchgen bug" in result.output
    )
    monkeypatch.setattr(PromptBuilder, "build", real_build)
    result = run_cli(*base_args(big_input, out))  # the rerun completes the missing rows
    assert_exactly_once(out, all_ids(big_input))
