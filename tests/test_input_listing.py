"""The input listing: made once per job, read by every rank, and a rank opens only its own
input files (counted with strace)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import FAKE_ENGINE, manifest_state, run_args, run_cli

from pipeline.fingerprint import current_form
from pipeline.rankstate import job_path, manifest_path
from pipeline.sources import listing as listing_module
from pipeline.sources.listing import (
    CLAIM_NAME,
    Listing,
    ListingStore,
    job_listing,
    listing_name,
    save_listing,
)
from pipeline.sources.synthetic import write_parquet_inputs

FILES, ROWS, RANKS = 40, 5, 4
REPO = Path(__file__).resolve().parent.parent


def rank_args(src: Path, out: Path, rank: int) -> list[str]:
    return run_args(
        src, out, *FAKE_ENGINE, "--num-ranks", str(RANKS), "--rank", str(rank), max_tokens=4
    )


@pytest.fixture(scope="module")
def many_files(tmp_path_factory) -> Path:
    return write_parquet_inputs(tmp_path_factory.mktemp("listing") / "in", FILES, ROWS)


def owned_files(rank: int) -> set[str]:
    per = FILES // RANKS  # equal rows per file: each rank owns whole files
    return {f"input-{i:05d}.parquet" for i in range(rank * per, (rank + 1) * per)}


def strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "-f", "-o", os.devnull, "true"], capture_output=True)
    return probe.returncode == 0  # ptrace may be forbidden in a container


@pytest.mark.skipif(not strace_works(), reason="strace is missing or not allowed (make test-tools)")
def test_a_rank_opens_only_its_own_input_files(many_files, tmp_path):
    out = tmp_path / "out"
    run_cli(*rank_args(many_files, out, 0))  # the first rank lists the input for the job
    log = tmp_path / "openat.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipeline", *rank_args(many_files, out, 2)]
    proc = subprocess.run(
        ["strace", "-f", "-e", "trace=openat", "-o", str(log), *cmd],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    opened = re.findall(rf'openat\([^"]*"{re.escape(str(many_files))}/([^"]+)"', log.read_text())
    assert set(opened) == owned_files(2)
    # Its footer to check it against the listing, then its rows: twice each, no more.
    assert len(opened) == 2 * len(owned_files(2))
    assert manifest_state(out, 2)["status"] == "finished"


def test_the_listing_is_one_job_level_file_and_the_fingerprint_holds_its_digest(
    many_files, tmp_path
):
    out = tmp_path / "out"
    for rank in range(RANKS):
        run_cli(*rank_args(many_files, out, rank))
    job = json.loads(job_path(out).read_text())
    ident = job["fingerprint"]["input"]
    assert (ident["kind"], ident["files"], ident["rows"]) == ("parquet", FILES, FILES * ROWS)
    listings = sorted((out / ".batchgen").glob("inputs-*.json.gz"))
    assert [p.name for p in listings] == [listing_name(ident["listing_sha256"])]
    manifest = manifest_state(out, 3)
    assert manifest["fingerprint"]["input"] == ident
    assert len(json.dumps(manifest["fingerprint"])) < 2000  # not the file list
    result = run_cli(
        "plan",
        *rank_args(many_files, out, 0)[1:],
        "--all-ranks",
        "--json",
    )
    plan = json.loads(result.output)
    assert plan["all"]["committed_prompts"] == FILES * ROWS
    assert [r["input_prompts"] for r in plan["ranks"]] == [FILES * ROWS // RANKS] * RANKS


def test_an_output_of_the_file_list_fingerprint_resumes(many_files, tmp_path):
    """A folder whose job record and manifests hold the whole file list (batchgen before the
    input listing) compares equal: a rerun finds it finished."""
    out = tmp_path / "out"
    run_cli(*rank_args(many_files, out, 1))
    listing_file = next((out / ".batchgen").glob("inputs-*.json.gz"))
    from pipeline.sources.listing import read_listing

    files = read_listing(listing_file).files
    old_input = {"kind": "parquet", "spec": str(many_files), "files": files}
    record = json.loads(job_path(out).read_text())
    record["fingerprint"]["input"] = old_input
    job_path(out).write_text(json.dumps(record))
    folder = manifest_path(out, 1)
    for gen in folder.glob("manifest-*.json"):
        data = json.loads(gen.read_text())
        data["fingerprint"]["input"] = old_input
        gen.write_text(json.dumps(data))
    digest = read_listing(listing_file).digest
    listing_file.unlink()
    assert current_form(record["fingerprint"])["input"]["listing_sha256"] == digest
    result = run_cli(*rank_args(many_files, out, 1))
    assert "already complete: 50 rows" in result.output


def test_a_shard_of_the_file_list_fingerprint_left_unlisted_is_adopted(many_files, tmp_path):
    """A crash of that batchgen between a shard's rename and its commit record: the shard
    carries the digest of the fingerprint in its earlier form, and is adopted all the same."""
    import pyarrow.parquet as pq

    from pipeline.fingerprint import fingerprint_digest
    from pipeline.sinks import METADATA_KEY
    from pipeline.sources.listing import read_listing

    out = tmp_path / "out"
    run_cli(*rank_args(many_files, out, 1), "--rows-per-shard", "10")
    files = read_listing(next((out / ".batchgen").glob("inputs-*.json.gz"))).files
    old_input = {"kind": "parquet", "spec": str(many_files), "files": files}
    folder = manifest_path(out, 1)
    (gen,) = folder.glob("manifest-*.json")
    data = json.loads(gen.read_text())
    data["fingerprint"]["input"] = old_input
    dropped = data["shards"].pop()  # its commit record never written
    data["status"] = "interrupted"
    gen.write_text(json.dumps(data))
    shard = out / "rank-00001" / dropped["file"]
    table = pq.read_table(shard)
    meta = dict(table.schema.metadata)
    made = json.loads(meta[METADATA_KEY])
    made["fingerprint_sha256"] = fingerprint_digest(data["fingerprint"])
    meta[METADATA_KEY] = json.dumps(made).encode()
    pq.write_table(table.replace_schema_metadata(meta), shard)
    result = run_cli(*rank_args(many_files, out, 1), "--rows-per-shard", "10")
    assert f"adopted {dropped['file']} (10 rows)" in result.output
    assert manifest_state(out, 1)["status"] == "finished"
    assert sum(s["rows"] for s in manifest_state(out, 1)["shards"]) == 50


def _listing(spec: str) -> Listing:
    return Listing("parquet", spec, [["a.parquet", 10, 2, "d1"]], schema="00")


def test_ranks_wait_for_the_rank_that_claimed_the_listing(tmp_path):
    store = ListingStore(tmp_path, save=True)
    (tmp_path / CLAIM_NAME).write_text("pid 1 on elsewhere\n")  # another rank is listing
    made: list[str] = []

    def compute() -> Listing:
        made.append("here")
        return _listing("x")

    got: list[Listing] = []
    waiter = threading.Thread(
        target=lambda: got.append(job_listing(store, "parquet", "x", [("a.parquet", 10)], compute))
    )
    waiter.start()
    time.sleep(0.5)
    assert got == [] and waiter.is_alive()
    save_listing(tmp_path, _listing("x"))  # the other rank is done
    (tmp_path / CLAIM_NAME).unlink()
    waiter.join(10)
    assert made == [] and got[0].files == _listing("x").files


def test_a_wait_for_another_ranks_listing_is_told_only_once_it_lasts(
    tmp_path, monkeypatch, batchgen_log
):
    """Ranks starting together meet at the claim in the normal course: a wait shorter than
    TELL_AFTER_SECONDS says nothing; a longer one says once whom it waits for."""
    monkeypatch.setattr(listing_module, "TELL_AFTER_SECONDS", 1.0)
    store = ListingStore(tmp_path, save=True)
    line = "waiting for the input listing that pid 1 on elsewhere is making"

    def wait_for(seconds: float) -> None:
        (tmp_path / CLAIM_NAME).write_text("pid 1 on elsewhere\n")  # another rank is listing
        for name in tmp_path.glob("inputs-*.json.gz"):
            name.unlink()
        waiter = threading.Thread(
            target=job_listing, args=(store, "parquet", "x", [("a.parquet", 10)], _listing)
        )
        waiter.start()
        time.sleep(seconds)
        save_listing(tmp_path, _listing("x"))  # the other rank is done
        (tmp_path / CLAIM_NAME).unlink()
        waiter.join(10)
        assert not waiter.is_alive()

    wait_for(0.3)
    assert line not in batchgen_log
    wait_for(2.0)
    assert batchgen_log.count(line) == 1


def test_a_claim_left_by_a_dead_rank_is_taken_over(tmp_path):
    claim = tmp_path / CLAIM_NAME
    claim.write_text("pid 1 on elsewhere\n")
    os.utime(claim, (time.time() - 3600, time.time() - 3600))
    got = job_listing(
        ListingStore(tmp_path, save=True),
        "parquet",
        "x",
        [("a.parquet", 10)],
        lambda: _listing("x"),
    )
    assert got.digest == _listing("x").digest
    assert (tmp_path / listing_name(got.digest)).is_file() and not claim.exists()


def test_a_claim_of_a_killed_process_on_this_machine_is_taken_over_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / CLAIM_NAME).write_text(f"pid {dead.pid} on {socket.gethostname()}\n")
    started = time.monotonic()
    got = job_listing(
        ListingStore(tmp_path, save=True),
        "parquet",
        "x",
        [("a.parquet", 10)],
        lambda: _listing("x"),
    )
    assert got.digest == _listing("x").digest and time.monotonic() - started < 5


def test_batch_request_ranks_share_the_listing_and_check_their_own_files(tmp_path, batchgen_log):
    from pipeline.sources.openai_batch import OpenAIBatchSource

    folder = tmp_path / "in"
    folder.mkdir()
    for f in range(4):
        lines = [
            json.dumps({"custom_id": f"f{f}-r{i}", "url": "/v1/completions", "body": {}})
            for i in range(3)
        ]
        (folder / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n")
    store = ListingStore(tmp_path / "state", save=True)
    first = OpenAIBatchSource(str(folder), 2, 0, store)
    assert len(list((tmp_path / "state").glob("inputs-*.json.gz"))) == 1
    second = OpenAIBatchSource(str(folder), 2, 1, store)
    assert second.identity() == first.identity()
    assert [name for name, _, _ in second.owned] == ["part-2.jsonl", "part-3.jsonl"]
    ids = [i for s in (first, second) for b, _ in s.iter_batches(["position"], 4) for i in b]
    assert ids == [f"f{f}-r{i}" for f in range(4) for i in range(3)]
    # Rewritten at the same size: the rank that reads it notices, and names it.
    text = (folder / "part-3.jsonl").read_text()
    (folder / "part-3.jsonl").write_text(text.replace("f3-r0", "f3-rX"))
    again = OpenAIBatchSource(str(folder), 2, 1, store)
    assert again.identity()["listing_sha256"] != first.identity()["listing_sha256"]
    assert any("part-3.jsonl changed (" in line for line in batchgen_log), batchgen_log
