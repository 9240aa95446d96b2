"""Storage faults: an output folder that is not writable, a disk that fills mid-shard, temporary
files left by a crash, a committed shard gone bad. Each gives a message naming the problem and
the fix (exit 1), loses no committed row, and the next run continues to exactly once."""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FAKE_ENGINE, manifest_state, read_output, run_args, run_cli, write_prompts
from hooks import PAUSE_ENV as TEST_PAUSE_ENV
from test_kill_harness import Victim, read_as_users_do, rows_by_key

from pipeline import checkpoint, rankstate, sinks

ROWS = 1000
FIX = "and rerun the same command to resume"


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(ROWS)]
    return write_prompts(tmp_path_factory.mktemp("input") / "rows.parquet", prompts, 100)


@pytest.fixture(scope="module")
def reference(src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("reference") / "out"
    run_cli(*args(src, out))
    return rows_by_key(read_output(out))


def args(src: Path, out: Path) -> list[str]:
    return run_args(src, out, "--rows-per-shard", "50", "--max-num-seqs", "16", *FAKE_ENGINE)


def crashed_run(src: Path, out: Path, point: str = "after_rename:3") -> str:
    """A run SIGKILLed at a commit: 2 shards listed, a third renamed but not listed."""
    victim = Victim(args(src, out), {"BATCHGEN_FAKE_STEP_SECONDS": "0.05", TEST_PAUSE_ENV: point})
    assert victim.paused.wait(240), victim.stderr
    victim.kill()
    return victim.paused_at


def files(out: Path) -> dict[str, tuple[int, int]]:
    """Every file under the folder, hidden state included, with its size and mtime."""
    return {
        str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def manifest(out: Path) -> dict:
    return manifest_state(out)


def error_line(output: str) -> str:
    return output.rstrip("\n").splitlines()[-1]


@contextmanager
def read_only(folder: Path) -> Iterator[str]:
    """Make `folder` unwritable; yields the reason the kernel then gives for a write."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in (folder, folder / ".batchgen")}
        for p in modes:
            p.chmod(0o500)
        try:
            yield "permission denied"
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    # root ignores permission bits; a read-only bind mount stops it.
    bind = subprocess.run(["mount", "--bind", folder, folder], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"root, and cannot bind-mount to make a folder read-only: {bind.stderr}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", folder], check=True)
        yield "read-only file system"
    finally:
        subprocess.run(["umount", folder], check=True)


def test_unwritable_output_folder_is_refused_untouched_then_resumes(src, reference, tmp_path):
    out = tmp_path / "out"
    orphan = crashed_run(src, out)
    before = files(out)
    with read_only(out) as reason:
        result = run_cli(*args(src, out), expect=1)
        assert error_line(result.output) == (
            f"Error: --output {out}: cannot write there ({reason}); nothing in it was changed; "
            f"make {out} writable and rerun, or choose another --output"
        )
        assert files(out) == before
    result = run_cli(*args(src, out))
    assert f"adopted {orphan} (50 rows), committed just before a crash" in result.output
    assert "resuming rank 0: 150 prompts already committed in 3 shard(s)" in result.output
    assert rows_by_key(read_output(out)) == reference


class FullDiskOnNthShard:
    """pq.write_table as seen by the shard writer: the Nth shard gets half its bytes written,
    then the disk is full."""

    def __init__(self, nth: int) -> None:
        self.nth, self.calls = nth, 0
        self.partial: Path | None = None

    def write_table(self, table: pa.Table, where, **kwargs) -> None:
        self.calls += 1
        if self.calls != self.nth:
            return pq.write_table(table, where, **kwargs)
        buf = io.BytesIO()
        pq.write_table(table, buf, **kwargs)
        where.write(buf.getvalue()[: buf.tell() // 2])
        where.flush()
        self.partial = Path(where.name)
        assert self.partial.stat().st_size > 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_mid_shard_fails_clearly_and_the_next_run_continues(
    src, reference, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    full = FullDiskOnNthShard(3)
    monkeypatch.setattr(sinks, "pq", SimpleNamespace(write_table=full.write_table))
    result = run_cli(*args(src, out), expect=1)
    message = (
        f"writing shard part-00000-000002.parquet in {out} failed: no space left on device; "
        f"100 prompts committed in {out} are safe; free space on the disk holding {out} {FIX}"
    )
    assert error_line(result.output) == f"Error: {message}"
    assert full.partial is not None and not full.partial.exists()  # the half shard is gone
    assert not list(out.glob("*/.tmp-*")) and not list(out.glob(".batchgen/*/.tmp-*"))
    assert len(read_as_users_do(out, tmp_path / "hf")) == 100
    state = manifest(out)
    assert (state["status"], state["report"]["error"]) == ("failed", message)

    status = run_cli("status", out, expect=4)
    assert status.output.splitlines()[0].startswith(
        "rank 0: failed (fix the error below, then rerun to resume) | 100/1,000 prompts (10.0%), "
        "100 rows in 2 shards | 0 errors | updated "
    )
    assert f"  error: {message}" in status.output.splitlines()

    monkeypatch.undo()
    result = run_cli(*args(src, out))
    assert "resuming rank 0: 100 prompts already committed in 2 shard(s)" in result.output
    assert rows_by_key(read_output(out)) == reference


def test_disk_full_when_recording_a_shard_keeps_it_for_the_next_run(
    src, reference, tmp_path, monkeypatch
):
    """The shard is renamed, then its commit record cannot be written (nor later the failure)."""
    out = tmp_path / "out"
    real_write, writes = rankstate.write_new, []

    def write_new(path: Path, data: dict) -> None:
        writes.append(path.name)
        # 1-2: manifest (running) and its head, 3-4: shards 0-1, then the disk is full
        if len(writes) >= 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, data)

    monkeypatch.setattr(rankstate, "write_new", write_new)
    result = run_cli(*args(src, out), expect=1)
    assert writes[4:] == ["commit-000002.json", "manifest-00000001.json"]
    path = out / ".batchgen" / "rank-00000"
    assert (
        f"recording the failed state in {path} failed too (No space left on device); "
        "`batchgen status` will show rank 0 as crashed" in result.output
    )
    assert error_line(result.output) == (
        f"Error: recording shard part-00000-000002.parquet in {path} failed: no space left on "
        f"device; 150 prompts committed in {out} are safe; free space on the disk holding {out} "
        f"{FIX}"
    )
    monkeypatch.undo()
    assert manifest(out)["status"] == "running"
    assert len(read_as_users_do(out, tmp_path / "hf")) == 150

    status = run_cli("status", out, expect=3)
    lines = status.output.splitlines()
    assert lines[0].startswith("rank 0: crashed (rerun to resume) | 100/1,000 prompts (10.0%)")
    assert lines[2] == (
        "  1 shard on disk not yet in the manifest (part-00000-000002.parquet): committed just "
        "before a crash; the next run adopts it"
    )

    result = run_cli(*args(src, out))
    assert "adopted part-00000-000002.parquet (50 rows), committed just before a crash" in (
        result.output
    )
    assert "resuming rank 0: 150 prompts already committed in 3 shard(s)" in result.output
    assert rows_by_key(read_output(out)) == reference


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (needs root and mount; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", disk], capture_output=True, text=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mount.stderr.strip()}")
    try:
        yield disk
    finally:
        umount = subprocess.run(["umount", disk], capture_output=True, text=True)
        assert umount.returncode == 0, f"{umount.stderr.strip()}; held by: {holders(disk)}"


def holders(disk: Path) -> list[str]:
    """What keeps a mount busy: every process's open files and memory maps under it."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        fds: list[Path] = []
        with suppress(OSError):  # the process is gone, or not ours to read
            fds = list((proc / "fd").iterdir())
            found += [f"{proc.name} map {line.split()[-1]}"
                      for line in (proc / "maps").read_text().splitlines()
                      if str(disk) in line]  # fmt: skip
        for fd in fds:
            with suppress(OSError):  # closed since the listing: one fd, not the whole process
                target = os.readlink(fd)
                if target.startswith(str(disk)):
                    found.append(f"{proc.name} fd {target}")
    return found


def fill(disk: Path, name: str, leave: int = 0) -> None:
    """Write a file that leaves `leave` bytes free on `disk` (0: fills it)."""
    size = max(shutil.disk_usage(disk).free - leave, 0)
    try:
        with open(disk / name, "wb") as f:
            f.write(b"\0" * size)
            while not leave:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC


def test_disk_full_on_a_real_filesystem(src, reference, tmp_path, tiny_disk):
    out = tiny_disk / "out"
    fill(tiny_disk, "filler", leave=96 * 1024)  # room for a few 50-row shards
    result = run_cli(*args(src, out), expect=1)
    pattern = (
        rf"Error: (writing shard part-00000-\d{{6}}\.parquet in {out}|recording shard "
        rf"part-00000-\d{{6}}\.parquet in {out}/\.batchgen/rank-00000) failed: no space "
        rf"left on device; (\d+) prompts committed in {out} are safe; free space on the disk "
        rf"holding {out} {FIX}"
    )
    match = re.fullmatch(pattern, error_line(result.output))
    assert match, result.output
    committed = int(match.group(2))
    assert 0 < committed < ROWS
    assert len(read_as_users_do(out, tmp_path / "hf")) == committed  # all readable, none lost
    assert not list(out.glob("*/.tmp-*")) and not list(out.glob(".batchgen/*/.tmp-*"))

    fill(tiny_disk, "filler2")  # still full: the rerun stops at its first write
    result = run_cli(*args(src, out), expect=1)
    assert error_line(result.output) == (
        f"Error: updating {out}/.batchgen/rank-00000 failed: no space left on device; "
        f"{committed} prompts committed in {out} are safe; free space on the disk holding "
        f"{out} {FIX}"
    )
    assert len(read_as_users_do(out, tmp_path / "hf2")) == committed

    (tiny_disk / "filler").unlink()
    (tiny_disk / "filler2").unlink(missing_ok=True)
    result = run_cli(*args(src, out))
    assert f"{committed} prompts already committed" in result.output
    assert rows_by_key(read_output(out)) == reference


def test_stray_temporary_files_are_removed_for_this_rank_only(src, reference, tmp_path):
    out = tmp_path / "out"
    orphan = crashed_run(src, out, point="in_write:3")
    assert orphan == "part-00000-000002.parquet"
    debris = sorted(p.name for p in out.glob("rank-00000/.tmp-*"))
    assert len(debris) == 1 and debris[0].startswith(f".tmp-{orphan}.")
    stale_manifest = out / ".batchgen" / "rank-00000" / ".tmp-manifest-00000009.json.4242"
    stale_manifest.write_text('{"half": ')
    other_rank = out / "rank-00001" / ".tmp-part-00001-000000.parquet.4343"  # a live writer's?
    other_rank.parent.mkdir()
    other_rank.write_bytes(b"PAR1")
    assert len(read_as_users_do(out, tmp_path / "hf")) == 100  # readers skip all of them

    result = run_cli(*args(src, out))
    for name in [*debris, stale_manifest.name]:
        assert f"removed an unfinished temporary file from a crash: {name}" in result.output
    assert other_rank.name not in result.output and other_rank.exists()
    assert not stale_manifest.exists() and not (out / "rank-00000" / debris[0]).exists()
    assert rows_by_key(read_output(out)) == reference


def test_unreadable_committed_shard_is_named_and_regenerated_once_deleted(src, reference, tmp_path):
    out = tmp_path / "out"
    run_cli(*args(src, out))
    bad = out / "rank-00000" / "part-00000-000004.parquet"
    bad.write_bytes(bad.read_bytes()[:100])  # bit rot, or a copy cut short
    result = run_cli(*args(src, out), expect=1)
    line = error_line(result.output)
    assert line.startswith(f"Error: {bad} is committed but unreadable (")
    assert line.endswith("); delete it and rerun to generate its rows again")
    bad.unlink()
    result = run_cli(*args(src, out))
    assert "1 shard(s) listed in the manifest are gone (part-00000-000004.parquet)" in (
        result.output
    )
    assert "50 prompts this run" in result.output
    assert rows_by_key(read_output(out)) == reference


def test_second_run_in_the_same_process_is_refused(src, tmp_path):
    """lockf does not stop a second lock in one process; the rank lock must."""
    out = tmp_path / "out"
    out.mkdir()
    lock = checkpoint.RankLock(out, 0).acquire()
    try:
        result = run_cli(*args(src, out), expect=1)
        assert error_line(result.output) == (
            f"Error: rank 0 of {out} is being written by this process (pid {os.getpid()}); wait "
            "for it to finish or stop it (a killed process releases the lock at once), or "
            "write to another --output"
        )
    finally:
        lock.release()
    run_cli(*args(src, out))
