"""`--output ftp://...`: an fsspec filesystem with no conditional writes (fsspec's built-in
FTPFileSystem against a real pyftpdlib server on loopback, tests/ftpserver.py). The run warns
once that the lease and the job record are check-then-write; every reader works on the URL; a
SIGKILL mid-run then a resume, and a second writer, behave as on s3://; each run ends by
reading every shard file back from the server: every id exactly once."""

from __future__ import annotations

import json
import threading
import time

from conftest import FAKE_ENGINE, run_args, run_cli
from ftpserver import FtpServer, ftp
from hooks import PAUSE_ENV
from test_objstore_output import (
    _exactly_once,
    _hooked,
    _input,
    _kill,
    _objects,
    _wait_for,
    finished_45_read_on_the_url,
    first_writer,
)

from pipeline.storage import resolve
from pipeline.storage.store import ObjectStore

__all__ = ["ftp"]


def _warning(url: str) -> str:
    return (
        f"batchgen: --output {url}: ftp:// has no conditional writes, so the rank's lease and the "
        "job record are check-then-write (two writers starting on one rank at the same instant "
        "could both pass); each shard is still written once under a unique name and counted "
        "only through its rank's state, so committed rows stay exactly once with one writer per "
        "rank"
    )


def test_a_run_to_ftp_warns_once_and_every_reader_reads_the_url(ftp, tmp_path):
    url = ftp.fresh_prefix()
    args = run_args(_input(tmp_path, 45), url, *FAKE_ENGINE, "--rows-per-shard", "10", "--card")
    result = run_cli(*args)
    warnings = [line for line in result.output.splitlines() if "check-then-write" in line]
    assert len(warnings) == 1 and warnings[0].endswith(_warning(url)), result.output
    assert f"45 prompts committed of 45 in 5 shard(s) under {url}" in result.output
    names = _objects(url)
    assert len([n for n in names if n.startswith("rank-00000/part-00000-")]) == 5, names
    assert ".batchgen/job.json" in names and "README.md" in names
    assert not [n for n in names if "lease" in n]  # released at the end
    _exactly_once(url, 45)

    finished_45_read_on_the_url(url, tmp_path)
    ObjectStore(url).delete("README.md")
    assert run_cli("card", url).output.strip() == f"{url}/README.md"
    assert "45 rows from 45 prompts" in ObjectStore(url).read("README.md").decode()
    assert "every prompt is already committed" in run_cli("plan", *args[1:]).output
    again = run_cli(*args)  # resume of a finished rank: nothing to do
    assert "already complete: 45 rows" in again.output
    _exactly_once(url, 45)

    requests, results = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    line = {"method": "POST", "url": "/v1/chat/completions"}
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    requests.write_text(
        "".join(json.dumps({"custom_id": f"r{i}", **line, "body": body}) + "\n" for i in range(3))
    )
    batch = f"{url}-batch"
    run_cli("run", "--openai-batch", requests, "--output", batch, *FAKE_ENGINE, "--max-tokens", "4")
    exported = run_cli("export", batch, "--openai-batch", results).output
    assert exported.startswith(f"3 requests written to {results}: 3 succeeded, 0 failed")


def test_sigkill_after_an_upload_then_resume_every_id_once(ftp, tmp_path):
    """Killed after its 3rd shard's upload, before its commit record: the resume takes the dead
    writer's lease at once, removes the upload no record names and completes the rank."""
    url = ftp.fresh_prefix()
    args = run_args(_input(tmp_path, 40), url, *FAKE_ENGINE, "--rows-per-shard", "10")
    proc = _hooked(args, **{PAUSE_ENV: "after_rename:3"})
    shard = _wait_for(proc, PAUSE_ENV).split()[-1]
    _kill(proc)
    assert f"rank-00000/{shard}" in _objects(url)
    assert any("lease" in n for n in _objects(url))  # the dead writer's, left behind
    result = run_cli(*args)
    assert f"removed {shard}, an upload no commit record names" in result.output
    _exactly_once(url, 40)


def test_a_second_writer_is_refused_while_the_first_is_alive(ftp, tmp_path):
    url = ftp.fresh_prefix()
    args = run_args(_input(tmp_path, 1000), url, *FAKE_ENGINE, "--rows-per-shard", "50")
    with first_writer(args):
        pass  # the second writer was refused, naming the first
    run_cli(*args)
    _exactly_once(url, 1000)


def test_threads_share_a_store_without_sharing_a_connection(ftp):
    """The heartbeat, the committer and the writer use one store at once; FTP's client is one
    control connection, so each thread gets its own (a shared one garbles the replies)."""
    store = ObjectStore(ftp.fresh_prefix())
    errors: list[BaseException] = []

    def hammer(n: int) -> None:
        try:
            for i in range(15):
                store.write(f"t{n}/o{i}", f"{n}-{i}".encode())
                assert store.read(f"t{n}/o{i}") == f"{n}-{i}".encode()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(list(store.iter_objects())) == 60


def test_a_server_that_is_down_is_one_line_before_the_engine(tmp_path):
    url = "ftp://user:secret@127.0.0.1:1/out"
    result = run_cli(*run_args(_input(tmp_path, 3), url, *FAKE_ENGINE), expect=2)
    assert result.output.splitlines()[-1] == (
        f"Error: --output {url}: cannot reach the store at ftp://127.0.0.1:1; check the network "
        "and that the store is up"
    )


def test_data_parallel_ranks_write_one_prefix_and_the_launcher_warns_once(ftp, tmp_path):
    url = ftp.fresh_prefix()
    args = run_args(_input(tmp_path, 30), url, *FAKE_ENGINE, "--rows-per-shard", "10")
    result = run_cli(*args, "--data-parallel", "2")
    assert [x for x in result.output.splitlines() if "check-then-write" in x] == [
        next(x for x in result.output.splitlines() if x.endswith(_warning(url)))
    ], result.output
    assert "rank-00001/" in " ".join(_objects(url))
    _exactly_once(url, 30)


def test_a_dropped_connection_is_made_anew_not_read_as_an_empty_prefix(tmp_path, monkeypatch):
    """fsspec's FTP client answers a listing on a connection the server closed ('421 Control
    connection timed out') as 'no such folder': a thread's filesystem idle past FSSPEC_IDLE_S
    (here 0.5 s, the server's idle timeout 1 s) is made anew before its next call."""
    monkeypatch.setattr(resolve, "FSSPEC_IDLE_S", 0.5)
    server = FtpServer(tmp_path, idle_timeout_s=1.0)
    server.start()
    try:
        store = ObjectStore(server.fresh_prefix())
        store.write(".batchgen/leases/rank-00000.json", b"held")
        time.sleep(1.5)  # the server has closed the connection by now
        assert [o.name for o in store.iter_objects()] == [".batchgen/leases/rank-00000.json"]
        assert store.read(".batchgen/leases/rank-00000.json") == b"held"
    finally:
        server.stop()
