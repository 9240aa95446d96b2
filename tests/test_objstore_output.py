"""`--output s3://...` and `--output gs://...` on real servers on loopback (SeaweedFS, and
fake-gcs-server for GCS's JSON API; the `store` fixture runs a test on each): shards uploaded
once under unique names, commit records and manifest generations as objects, the rank's lease
instead of lockf; every reader on the URL; SIGKILLs, a store that dies, a second writer and a
dead holder's lease; each checked by reading the bucket: every id exactly once. Cases that prove
nothing new for gs:// (a storm of kills, the real engine) run on S3 only."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import time

import objstores
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FAKE_ENGINE, HOOKED_BATCHGEN, run_args, run_cli
from hooks import PAUSE_ENV, STEP_ENV, STORE_DEADLINE_ENV
from seaweedfs import fresh_prefix

from pipeline.storage.lease import Lease, LeaseHeld, LeaseLost, LeaseRecord, lease_name
from pipeline.storage.outpath import StorePath
from pipeline.storage.resolve import storage_options
from pipeline.storage.store import ObjectStore

# The servers' fixtures; `store` runs a test on each of S3 and GCS.
seaweed, s3, fake_gcs, gcs = objstores.seaweed, objstores.s3, objstores.fake_gcs, objstores.gcs
store = objstores.store


def _input(tmp_path, n: int) -> str:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"prompt {i}" for i in range(n)]}), path)
    return str(path)


def _objects(url: str) -> list[str]:
    """Every object under `url`, by name relative to it."""
    return [o.name for o in ObjectStore(url).iter_objects()]


def _bucket_ids(url: str) -> list[str]:
    """The ids of every shard object in the bucket (committed or not): a reader of the bucket."""
    store = ObjectStore(url)
    ids: list[str] = []
    for name in _objects(url):
        if name.startswith("rank-") and name.endswith(".parquet"):
            ids += pq.read_table(store.open_input(name), columns=["id"]).column(0).to_pylist()
    return ids


def _exactly_once(url: str, n: int) -> None:
    ids = _bucket_ids(url)
    assert sorted(ids) == sorted(f"in.parquet:{i}" for i in range(n))
    assert len(ids) == len(set(ids))


def finished_45_read_on_the_url(url: str, tmp_path) -> None:
    """status, show and report on the URL of a finished 45-prompt run of rank 0."""
    status = json.loads(run_cli("status", url, "--json").output)
    assert status["ranks"][0]["state"] == "finished" and status["all"]["prompts"] == 45
    assert "in.parquet:44" in run_cli("show", url, "--limit", "50").output
    run_cli("report", url, "--html", tmp_path / "r.html")
    assert (tmp_path / "r.html").stat().st_size > 1000


def test_a_run_to_the_bucket_and_every_reader_on_the_url(store, tmp_path, monkeypatch):
    url = store.fresh_prefix()
    src = _input(tmp_path, 45)
    args = run_args(src, url, *FAKE_ENGINE, "--rows-per-shard", "10", "--card")
    result = run_cli(*args)
    assert f"45 prompts committed of 45 in 5 shard(s) under {url}" in result.output
    names = _objects(url)
    shards = [n for n in names if n.startswith("rank-00000/part-")]
    # Unique names (attempt suffix), commit records folded into one manifest generation.
    unique = re.compile(r"rank-00000/part-00000-00000\d-[0-9a-f]{8}\.parquet")
    assert len(shards) == 5 and all(unique.fullmatch(n) for n in shards), names
    assert ".batchgen/job.json" in names and "README.md" in names
    assert [n for n in names if n.startswith(".batchgen/rank-00000/")] == [
        ".batchgen/rank-00000/head-00000001.json",
        ".batchgen/rank-00000/manifest-00000001.json",
    ]
    assert not [n for n in names if "lease" in n]  # released at the end
    assert not (tmp_path / f"{store.scheme}:").exists() and not os.path.exists(f"{store.scheme}:")
    _exactly_once(url, 45)

    finished_45_read_on_the_url(url, tmp_path)
    card = StorePath.of(url) / "README.md"
    assert "data_files:" in card.read_text() and "45 rows from 45 prompts" in card.read_text()
    card.unlink()
    assert run_cli("card", url).output.strip() == f"{url}/README.md"
    assert "45 rows from 45 prompts" in card.read_text()
    # export reads a run made from an OpenAI batch file: one of 5 requests, to the bucket too
    requests = tmp_path / "requests.jsonl"
    chat = {"method": "POST", "url": "/v1/chat/completions"}
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    requests.write_text(
        "".join(json.dumps({"custom_id": f"r{i}", **chat, "body": body}) + "\n" for i in range(5))
    )
    batch = f"{url}-batch"
    run_cli("run", "--openai-batch", requests, "--output", batch, *FAKE_ENGINE, "--max-tokens", "4")
    results = tmp_path / "results.jsonl"
    exported = run_cli("export", batch, "--openai-batch", results).output
    assert exported.startswith(f"5 requests written to {results}: 5 succeeded, 0 failed")
    assert [json.loads(x)["custom_id"] for x in results.read_text().splitlines()] == [
        f"r{i}" for i in range(5)
    ]
    plan = run_cli("plan", *args[1:])
    assert "every prompt is already committed" in plan.output
    again = run_cli(*args)  # resume of a finished rank: nothing to do
    assert "already complete: 45 rows" in again.output
    _exactly_once(url, 45)


def test_datasets_load_dataset_reads_the_bucket_with_storage_options(s3, tmp_path, monkeypatch):
    pytest.importorskip("s3fs", reason="fsspec's s3:// needs s3fs (pip install s3fs)")
    import datasets
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    url = fresh_prefix()
    run_cli(*run_args(_input(tmp_path, 23), url, *FAKE_ENGINE, "--rows-per-shard", "10"))
    ds = datasets.load_dataset(
        "parquet",
        data_files=f"{url}/rank-*/part-*.parquet",
        split="train",
        storage_options=storage_options(url),
    )
    assert sorted(ds["id"]) == sorted(f"in.parquet:{i}" for i in range(23))


def test_other_url_schemes_are_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli(*run_args(_input(tmp_path, 3), "hf://b/o", *FAKE_ENGINE), expect=2)
    assert result.output.splitlines()[-1] == (
        "Error: --output hf://b/o: hf:// output is not supported: the Hub has no conditional "
        "writes and makes every write and delete a commit, so batchgen cannot hold a rank's lease "
        "or write its state there; write locally and publish the finished folder with `hf upload` "
        "(docs/object-stores.md)"
    )
    assert sorted(os.listdir(tmp_path)) == ["in.parquet"]


def _hooked(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(HOOKED_BATCHGEN), *args],
        env={**os.environ, **env},
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the child's session (its engine too), reap it and close its pipe."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    if proc.stderr is not None:
        proc.stderr.close()


def _wait_for(proc: subprocess.Popen, marker: str, timeout: float = 120) -> str:
    """Read the child's stderr until a line holds `marker`; that line."""
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if marker in line:
            return line
        if not line and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {marker!r}")
    raise AssertionError(f"no {marker!r} in {timeout} s")


@pytest.mark.parametrize("point", ["in_write", "after_rename"])
def test_sigkill_mid_commit_then_resume_every_id_once(store, tmp_path, point):
    """Killed before its 3rd upload (in_write) or after it, before its commit record
    (after_rename: an object no record names): the resume takes the dead writer's lease at once
    (its process is gone from this host), removes the unnamed upload, and completes the rank."""
    url = store.fresh_prefix()
    args = run_args(_input(tmp_path, 60), url, *FAKE_ENGINE, "--rows-per-shard", "10")
    proc = _hooked(args, **{PAUSE_ENV: f"{point}:3"})
    shard = _wait_for(proc, PAUSE_ENV).split()[-1]
    _kill(proc)
    uploaded = [n for n in _objects(url) if n.endswith(".parquet")]
    assert (f"rank-00000/{shard}" in uploaded) == (point == "after_rename")
    assert any("lease" in n for n in _objects(url))  # the dead writer's, left behind
    status = json.loads(run_cli("status", url, "--json", expect=3).output)
    assert status["ranks"][0]["state"] == "crashed" and status["all"]["prompts"] == 20
    result = run_cli(*args)
    if point == "after_rename":
        assert f"removed {shard}, an upload no commit record names" in result.output
    _exactly_once(url, 60)


def test_a_storm_of_sigkills_then_every_id_once(s3, tmp_path):
    """Kills at random moments of a slow run, each followed by a resume that is killed in turn;
    the last resume completes; the bucket holds every id exactly once."""
    url = fresh_prefix()
    args = run_args(_input(tmp_path, 400), url, *FAKE_ENGINE, "--rows-per-shard", "7")
    rng = random.Random(23)
    for _ in range(5):
        proc = _hooked(args, **{STEP_ENV: "0.02"})
        time.sleep(rng.uniform(3.0, 6.0))
        _kill(proc)
    run_cli(*args)
    _exactly_once(url, 400)
    status = json.loads(run_cli("status", url, "--json").output)
    assert status["all"]["prompts"] == 400 and status["all"]["rows"] == 400


@contextlib.contextmanager
def first_writer(args: list[str]):
    """A run of `args` paused after its first shard's commit, holding the lease of its rank 0
    (its heartbeat thread runs on), then killed; and the last line of a second writer's run,
    refused meanwhile. (A slowed run instead once finished its 300 rows before a second writer
    on a loaded machine got to the lease.)"""
    first = _hooked(args, **{PAUSE_ENV: "after_rename:1"})
    try:
        _wait_for(first, f"{PAUSE_ENV} after_rename")
        line = run_cli(*args, expect=1).output.splitlines()[-1]
        url = args[args.index("--output") + 1]
        assert line.startswith(f"Error: {url}/.batchgen/leases/rank-00000.json is held by pid ")
        assert f"pid {first.pid} on " in line
        yield line
    finally:
        _kill(first)


def test_a_second_writer_is_refused_while_the_lease_is_alive(store, tmp_path):
    url = store.fresh_prefix()
    args = run_args(_input(tmp_path, 300), url, *FAKE_ENGINE, "--rows-per-shard", "10")
    with first_writer(args) as line:
        assert line.endswith(
            "only one writer per rank may run: stop it (the lease is free as soon as its "
            "process is gone)"
        )
        status = json.loads(run_cli("status", url, "--json", expect=3).output)
        assert status["ranks"][0]["state"] == "running"
    run_cli(*args)  # its process gone, the lease is free on this host at once
    _exactly_once(url, 300)


def _plant_lease(url: str, expires_in: float) -> None:
    """A lease left by a writer on another node (its liveness unknown here)."""
    now = time.time()
    record = LeaseRecord("pid 77 on node9 (cafe0001)", now - 5, now + expires_in, "node9", 77)
    ObjectStore(url).write(lease_name(0), record.to_bytes())


def test_a_dead_nodes_lease_refuses_until_it_expires_then_is_taken_over(store, tmp_path):
    url = store.fresh_prefix()
    args = run_args(_input(tmp_path, 12), url, *FAKE_ENGINE)
    _plant_lease(url, expires_in=240)
    refused = run_cli(*args, expect=1).output.splitlines()[-1]
    # The ages count from the planting: 5 s, and up to ~10 s more when a loaded test run is slow
    # to start batchgen (an exact "5 s ago" flaked at 10 s).
    held = re.search(
        r"is held by pid 77 on node9 \(cafe0001\) \(last heartbeat (\d+) s ago\)", refused
    )
    assert held and 5 <= int(held[1]) <= 60, refused
    left = re.search(r"rerun after its lease expires in (\d+) s$", refused)
    assert left and 185 <= int(left[1]) <= 240, refused
    _plant_lease(url, expires_in=-1)
    run_cli(*args)
    _exactly_once(url, 12)


def test_the_lease_on_the_store_one_holder_renewal_and_takeover(store):
    """Two writers on two 'nodes' (other holders), a short time to live: the second is refused
    while the first renews; once it stops renewing, the second takes over and the first's next
    renewal finds its lease lost."""
    store = ObjectStore(store.fresh_prefix())
    # 4 s to live (1.5 s flaked under a loaded test run): each refusal comes 2 s or more
    # before the lease it meets would end, and the second refusal comes after the first
    # acquisition's expiry, so only the renewal can have kept the lease.
    first = Lease(store, lease_name(3), ttl_s=4.0)
    second = Lease(store, lease_name(3), ttl_s=4.0)
    second.holder = "pid 1 on elsewhere (x)"
    first.acquire()
    with pytest.raises(LeaseHeld, match="is held by pid .* only one writer per rank"):
        second.acquire()
    time.sleep(2.5)
    first.renew()
    time.sleep(2.0)
    with pytest.raises(LeaseHeld):
        second.acquire()
    time.sleep(2.5)
    second.acquire()
    with pytest.raises(LeaseLost, match="now held by pid 1 on elsewhere"):
        first.renew()
    second.release()
    assert store.read(lease_name(3)) is None


def test_a_store_that_dies_mid_run_exits_75_and_the_resume_completes_exactly_once(store, tmp_path):
    url = store.fresh_prefix()
    args = run_args(_input(tmp_path, 3000), url, *FAKE_ENGINE, "--rows-per-shard", "50")
    proc = _hooked(args, **{STEP_ENV: "0.02", STORE_DEADLINE_ENV: "3"})
    try:
        deadline = time.monotonic() + 120
        while not any(n.endswith(".parquet") for n in _objects(url)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        store.kill()
        _, stderr = proc.communicate(timeout=120)
    finally:
        _kill(proc)
        store.start()
    assert proc.returncode == 75, stderr
    assert "the store kept failing for" in stderr and "rerun the same command" in stderr
    done = json.loads(run_cli("status", url, "--json", expect=3).output)["all"]["prompts"]
    assert 0 < done < 3000
    run_cli(*args)
    _exactly_once(url, 3000)


def test_store_paths_list_read_and_write_like_local_ones(store):
    root = StorePath.of(store.fresh_prefix())
    (root / ".batchgen" / "rank-00001" / "a.json").write_text("{}")
    (root / "rank-00001" / "part-00001-000000.parquet").write_bytes(b"x" * 10)
    assert [p.name for p in root.iterdir()] == [".batchgen", "rank-00001"]
    assert [p.name for p in root.glob("rank-*")] == ["rank-00001"]
    shard = next((root / "rank-00001").iterdir())
    assert shard.stat().st_size == 10 and shard.parent == root / "rank-00001"
    assert str(shard) == f"{root}/rank-00001/part-00001-000000.parquet"
    assert (root / ".batchgen").is_dir() and not (root / "nothing").exists()
    assert (root / ".batchgen" / "rank-00001" / "a.json").read_text() == "{}"
    shard.unlink()
    assert not shard.exists() and list((root / "rank-00001").iterdir()) == []
    assert store.bucket in str(root)


@pytest.mark.engine
def test_the_real_engine_killed_on_the_bucket_resumes_and_reads_back(s3, tmp_path, monkeypatch):
    """8 prompts, greedy, float32 on the bundled model. A `batchgen run` process writing to the
    bucket is SIGKILLed (engine and all) after its 2nd shard's upload, before its commit record;
    the in-process resume removes that upload and completes the rank, and a local folder is
    written by the same engine: `datasets.load_dataset` on the bucket (the card's features, the
    store's storage_options) returns the local folder's rows, every id once."""
    import datasets
    import datasets.config
    import yaml
    from conftest import REAL_ENGINE, SAMPLE

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    url, local, src = fresh_prefix(), tmp_path / "local", tmp_path / "eight.parquet"
    pq.write_table(pq.read_table(SAMPLE).slice(0, 8), src)
    flags = ["--chat", "--temperature", "0", "--rows-per-shard", "3", "--card"]
    args = run_args(src, url, *flags, *REAL_ENGINE, max_tokens=12)
    proc = _hooked(args, **{PAUSE_ENV: "after_rename:2"})
    shard = _wait_for(proc, PAUSE_ENV, timeout=600).split()[-1]
    _kill(proc)
    assert f"rank-00000/{shard}" in _objects(url)  # uploaded, named by no commit record
    result = run_cli(*args)
    assert f"removed {shard}, an upload no commit record names" in result.output
    assert "resuming rank 0: 3 prompts already committed" in result.output
    run_cli(*run_args(src, local, *flags, *REAL_ENGINE, max_tokens=12))
    card = (StorePath.of(url) / "README.md").read_text()
    features = yaml.safe_load(card.split("---\n", 2)[1])["dataset_info"]["features"]
    ds = datasets.load_dataset(
        "parquet",
        data_files=f"{url}/rank-*/part-*.parquet",
        split="train",
        storage_options=storage_options(url),
        features=datasets.Features._from_yaml_list(features),
    )
    ours = sorted(zip(ds["id"], ds["text"], strict=True))
    expected = pq.read_table(sorted(local.glob("rank-*/part-*.parquet")))
    ids, texts = expected["id"].to_pylist(), expected["text"].to_pylist()
    assert ours == sorted(zip(ids, texts, strict=True))
    assert len(ours) == 8 and len({i for i, _ in ours}) == 8 and all(t for _, t in ours)
    assert "8 rows from 8 prompts" in card


def test_data_parallel_ranks_write_one_prefix(store, tmp_path, monkeypatch):
    """Two ranks (`--data-parallel 2`: a process each) write one prefix: each its own shards
    under its own folder, one job record between them, every id once."""
    monkeypatch.chdir(tmp_path)
    url = store.fresh_prefix()
    args = run_args(_input(tmp_path, 50), url, *FAKE_ENGINE, "--rows-per-shard", "20")
    run_cli(*args, "--data-parallel", "2")
    status = json.loads(run_cli("status", url, "--json").output)
    assert [r["state"] for r in status["ranks"]] == ["finished", "finished"]
    assert sorted(os.listdir(tmp_path)) == ["in.parquet"]  # no local folder named 's3:'/'gs:'
    names = _objects(url)
    assert sorted({n.split("/")[0] for n in names if n.endswith(".parquet")}) == [
        "rank-00000",
        "rank-00001",
    ]
    assert ".batchgen/job.json" in names
    _exactly_once(url, 50)


def test_changed_settings_refused_then_overwrite_starts_afresh(store, tmp_path):
    url = store.fresh_prefix()
    src = _input(tmp_path, 30)
    run_cli(*run_args(src, url, *FAKE_ENGINE, "--rows-per-shard", "10"))
    before = _objects(url)
    changed = run_args(src, url, *FAKE_ENGINE, "--rows-per-shard", "10", max_tokens=4)
    refused = run_cli(*changed, expect=1).output
    assert f"{url} holds an earlier run with different settings:" in refused
    assert "sampling.max_tokens: 8 -> 4" in refused
    assert _objects(url) == before  # nothing changed by the refusal
    result = run_cli(*changed, "--overwrite")
    assert "--overwrite removed 3 shard(s) and 1 manifest(s) of rank(s) 0" in result.output
    assert not set(before) & {n for n in _objects(url) if n.endswith(".parquet")}
    _exactly_once(url, 30)


@pytest.mark.parametrize(
    ("variable", "scheme"), [("AWS_ENDPOINT_URL", "s3"), ("STORAGE_EMULATOR_HOST", "gs")]
)
def test_a_wrong_endpoint_is_refused_within_seconds_by_run_plan_and_readers(
    tmp_path, monkeypatch, variable, scheme
):
    """Before any store call that retries for minutes (the run's footprint and lease, the
    readers' listings): one line within 10 s, and nothing created."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    url = f"{scheme}://bucket/run"
    args = run_args(_input(tmp_path, 3), url, *FAKE_ENGINE)
    for command, expect, flag in [
        (args, 2, "--output"),
        (["plan", *args[1:]], 2, "--output"),
        (["status", url], 1, "OUTPUT"),
        (["show", url], 1, "OUTPUT"),
    ]:
        t0 = time.monotonic()
        result = run_cli(*command, expect=expect)
        assert time.monotonic() - t0 < 10, command[0]
        line = result.output.splitlines()[-1]
        assert line.startswith(f"Error: {flag} {url}: cannot reach the store at http://127.0.0.1:9")
    assert sorted(os.listdir(tmp_path)) == ["in.parquet"]
