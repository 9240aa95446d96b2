"""The storage layer (pipeline/storage/) against real servers on loopback: S3 (SeaweedFS) and
GCS's JSON API (fake-gcs-server); the `store` fixture runs a test on each."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from pathlib import Path

import gcsemulator
import objstores
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import FAKE_ENGINE, run_args, run_cli
from seaweedfs import BUCKET, READER

from pipeline.errors import ConfigError
from pipeline.storage import gcshttp
from pipeline.storage.lease import Lease, LeaseHeld, LeaseLost, LeaseRecord, lease_name
from pipeline.storage.preflight import preflight
from pipeline.storage.resolve import resolve, s3_settings, storage_options
from pipeline.storage.retry import RetryPolicy, StoreDown, is_transient, with_retries
from pipeline.storage.store import ObjectExists, ObjectStore, unique_name

# The servers' fixtures; `store` runs a test on each of S3 and GCS.
seaweed, s3, fake_gcs, gcs = objstores.seaweed, objstores.s3, objstores.fake_gcs, objstores.gcs
store = objstores.store


# -- the resolver ---------------------------------------------------------------------------


def test_local_paths_resolve_to_the_local_filesystem(tmp_path):
    loc = resolve(str(tmp_path / "out"))
    assert isinstance(loc.fs, pafs.LocalFileSystem)
    assert (loc.scheme, loc.path) == ("file", str(tmp_path / "out"))
    assert resolve(f"file://{tmp_path}/x").path == str(tmp_path / "x")


def test_s3_settings_follow_the_aws_conventions(tmp_path):
    creds = tmp_path / "credentials"
    creds.write_text("[work]\naws_access_key_id = AKWORK\naws_secret_access_key = SKWORK\n")
    config = tmp_path / "config"
    config.write_text("[profile work]\nregion = eu-west-3\nendpoint_url = http://minio:9000\n")
    files = {"AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_CONFIG_FILE": str(config)}
    s = s3_settings({**files, "AWS_PROFILE": "work"})
    assert (s.access_key, s.secret_key, s.region, s.endpoint) == (
        "AKWORK",
        "SKWORK",
        "eu-west-3",
        "http://minio:9000",
    )
    assert s.source == "the AWS profile 'work'"
    env = {**files, "AWS_PROFILE": "work", "AWS_ACCESS_KEY_ID": "AKENV"}
    env.update(AWS_SECRET_ACCESS_KEY="SKENV", AWS_REGION="us-west-2")
    env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:1"
    s = s3_settings(env)
    assert (s.access_key, s.region, s.endpoint) == ("AKENV", "us-west-2", "http://127.0.0.1:1")
    none = s3_settings(files)
    assert (none.has_keys, none.region, none.endpoint) == (False, "us-east-1", None)


def test_credentials_stay_out_of_reprs_and_descriptions(s3):
    loc = resolve("s3://bucket/some/prefix")
    assert (loc.bucket, loc.key) == ("bucket", "some/prefix")
    text = repr(loc) + repr(loc.s3) + repr(loc.s3_endpoint()) + str(loc.describe())
    assert "batchgen-admin-secret" not in text and "batchgen-admin" not in text
    assert loc.describe() == {
        "url": "s3://bucket/some/prefix",
        "scheme": "s3",
        "endpoint": s3.endpoint,
        "region": "us-east-1",
    }
    assert storage_options("s3://bucket/x") == {
        "client_kwargs": {"region_name": "us-east-1", "endpoint_url": s3.endpoint},
        "key": "batchgen-admin",
        "secret": "batchgen-admin-secret",
    }


def test_unknown_scheme_is_one_line():
    with pytest.raises(ConfigError, match=r"^nosuch://b/x: no filesystem for nosuch://"):
        resolve("nosuch://b/x")
    with pytest.raises(ConfigError, match=r"names no bucket; give s3://BUCKET/PREFIX"):
        resolve("s3://")


# -- the primitives ---------------------------------------------------------------------------


def test_write_once_read_list_delete(store):
    store = ObjectStore(store.fresh_prefix() + "/run")
    assert store.conditional
    name = unique_name("part-00000-000001", ".parquet")
    assert name.startswith("part-00000-000001.") and name.endswith(".parquet")
    assert name != unique_name("part-00000-000001", ".parquet")
    store.put_new(name, b"rows")
    with pytest.raises(ObjectExists, match="already exists"):
        store.put_new(name, b"other rows")
    assert store.read(name) == b"rows"
    assert store.read("missing") is None
    store.write(".batchgen/rank-00000.json", b"{}")
    assert [(o.name, o.size) for o in store.iter_objects()] == [
        (".batchgen/rank-00000.json", 2),
        (name, 4),
    ]
    assert [o.name for o in store.iter_objects(".batchgen")] == [".batchgen/rank-00000.json"]
    store.delete(name)
    store.delete(name)  # twice: a retried delete must not fail
    assert [o.name for o in store.iter_objects()] == [".batchgen/rank-00000.json"]


def test_conditional_replace_needs_the_current_etag(store):
    """S3's ETag and GCS's generation alike: a replace conditional on a stale one is refused."""
    store = ObjectStore(store.fresh_prefix())
    etag = store.put_if_absent("x", b"1")
    assert etag and store.put_if_absent("x", b"2") is None
    new = store.put_if_match("x", b"4", etag)
    assert new and new != etag and store.read_with_etag("x") == (b"4", new)
    assert store.put_if_match("x", b"5", etag) is None  # stale
    assert store.read("x") == b"4"


def test_parquet_reads_are_ranged(store):
    """A row group read fetches a byte range of the object, not the whole object."""
    store = ObjectStore(store.fresh_prefix())
    table = pa.table({"x": list(range(200_000))})
    with store.open_output("big.parquet") as out:
        pq.write_table(table, out, row_group_size=20_000)
    f = store.open_input("big.parquet")
    pf = pq.ParquetFile(f)
    assert pf.read_row_group(3).column("x")[0].as_py() == 60_000
    assert f.size() > 400_000 and f.tell() < f.size()


# -- retries ----------------------------------------------------------------------------------


def test_transient_errors_are_retried_then_store_down():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error SLOW_DOWN during PutObject operation: SlowDown")
        return "ok"

    assert with_retries("writing", flaky, RetryPolicy(base_s=1, cap_s=4), sleeps.append) == "ok"
    assert len(calls) == 3 and all(0 <= s <= 2 for s in sleeps) and len(sleeps) == 2
    clock = iter(range(0, 1000, 7)).__next__

    def down():
        raise OSError("HTTP status 503: Service Unavailable")

    with pytest.raises(StoreDown, match=r"^writing: the store kept failing for \d+ s .*resume"):
        with_retries("writing", down, RetryPolicy(deadline_s=30), lambda s: None, clock)
    with pytest.raises(FileNotFoundError):  # not transient: at once, no retry
        with_retries(
            "reading", lambda: Path("/nonexistent/x").read_bytes(), RetryPolicy(), pytest.fail
        )
    assert is_transient(ConnectionResetError()) and not is_transient(PermissionError("denied"))
    # GCS's throttling and server errors, as gcshttp raises them; its refusals are not retried
    assert is_transient(gcshttp.GcsError("HTTP status 429: rateLimitExceeded", 429))
    assert is_transient(gcshttp.GcsError("HTTP status 503: backendError", 503))
    assert not is_transient(gcshttp.GcsError("writing x: the store answered 403 Forbidden", 403))


def test_a_read_survives_the_server_being_killed_and_restarted(store):
    server = store
    store = ObjectStore(server.fresh_prefix(), RetryPolicy(base_s=0.2, cap_s=1, deadline_s=90))
    store.write("a.txt", b"still here")
    server.kill()
    restarter = threading.Timer(2.0, server.start)
    restarter.start()
    t0 = time.monotonic()
    try:
        assert store.read("a.txt") == b"still here"
    finally:
        restarter.join()
    assert time.monotonic() - t0 >= 2.0  # it waited for the restart


def test_a_store_that_stays_down_raises_store_down_in_bounded_time(store):
    server = store
    store = ObjectStore(server.fresh_prefix(), RetryPolicy(base_s=0.1, cap_s=0.5, deadline_s=3))
    server.kill()
    t0 = time.monotonic()
    with pytest.raises(StoreDown, match="the store kept failing"):
        store.write("b.txt", b"x")
    assert time.monotonic() - t0 < 10
    server.start()


# -- leases -----------------------------------------------------------------------------------


def test_a_second_writer_is_refused_while_the_first_is_alive(store):
    store = ObjectStore(store.fresh_prefix() + "/out")
    first = Lease(store, lease_name(3), ttl_s=60).acquire()
    second = Lease(store, lease_name(3), ttl_s=60)
    # On this host the holder's process is alive: refused, and told it frees at its exit.
    held = r"/out/\.batchgen/leases/rank-00003\.json is held by pid \d+ on .*as soon as its"
    with pytest.raises(LeaseHeld, match=held):
        second.acquire()
    first.renew()
    first.release()
    second.acquire()  # free again
    record = LeaseRecord.parse(store.read(lease_name(3)))
    assert record.holder == second.holder and record.expires - record.heartbeat == 60


def test_a_dead_holders_lease_is_taken_over_after_expiry(store):
    store = ObjectStore(store.fresh_prefix() + "/out")
    # A time to live of 4 s: the refusal below must come before it ends, and under a loaded
    # test run a round trip to the store took over a second (1 s flaked).
    dead = Lease(store, lease_name(0), ttl_s=4.0).acquire()  # never renews again
    with pytest.raises(LeaseHeld):
        Lease(store, lease_name(0), ttl_s=4.0).acquire()
    time.sleep(4.2)
    heir = Lease(store, lease_name(0), ttl_s=30).acquire()
    assert LeaseRecord.parse(store.read(lease_name(0))).holder == heir.holder
    with pytest.raises(LeaseLost, match="presumed dead"):
        dead.renew()  # the old holder learns it lost the lease at its next heartbeat
    dead.release()  # not ours any more: leaves the heir's lease alone
    assert store.read(lease_name(0)) is not None


def test_of_two_racing_writers_exactly_one_wins(store):
    store = ObjectStore(store.fresh_prefix())
    won, refused = [], []

    def take(i):
        try:
            won.append(Lease(store, lease_name(1), ttl_s=60).acquire())
        except LeaseHeld:
            refused.append(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5


def test_leases_work_on_local_folders_too(tmp_path):
    store = ObjectStore(str(tmp_path))
    assert not store.conditional
    lease = Lease(store, lease_name(0), ttl_s=60).acquire()
    with pytest.raises(LeaseHeld):
        Lease(store, lease_name(0)).acquire()
    lease.release()
    assert store.read(lease_name(0)) is None


# -- preflight --------------------------------------------------------------------------------


def _timed_preflight(url, **kw):
    t0 = time.monotonic()
    try:
        with pytest.raises(ConfigError) as err:
            preflight(url, **kw)
    finally:
        assert time.monotonic() - t0 < 10
    assert "\n" not in str(err.value)
    return str(err.value)


def test_preflight_passes_and_leaves_nothing(store):
    root = store.fresh_prefix()
    assert preflight(f"{root}/out").bucket == store.bucket
    assert list(ObjectStore(root).iter_objects()) == []


@pytest.mark.parametrize(
    ("scheme", "where", "make"),
    [
        ("s3", "{endpoint}", "aws s3 mb s3://no-such-bucket-here"),
        (
            "gs",
            "{endpoint} (STORAGE_EMULATOR_HOST)",
            "gcloud storage buckets create gs://no-such-bucket-here",
        ),
    ],
)
def test_preflight_missing_bucket(request, scheme, where, make):
    server = request.getfixturevalue({"s3": "s3", "gs": "gcs"}[scheme])
    msg = _timed_preflight(f"{scheme}://no-such-bucket-here/out")
    assert msg == (
        f"--output {scheme}://no-such-bucket-here/out: the bucket 'no-such-bucket-here' does not "
        f"exist at {where.format(endpoint=server.endpoint)}; create it ({make}) or fix the URL"
    )


@pytest.mark.parametrize(
    ("variable", "url", "says"),
    [
        (
            "AWS_ENDPOINT_URL",
            "s3://b/out",
            "http://127.0.0.1:9; check AWS_ENDPOINT_URL (or the profile's endpoint_url) and "
            "that the store is up",
        ),
        (
            "STORAGE_EMULATOR_HOST",
            "gs://b/out",
            "http://127.0.0.1:9 (STORAGE_EMULATOR_HOST); check STORAGE_EMULATOR_HOST (unset it "
            "for Google Cloud Storage itself) and that the emulator is up",
        ),
    ],
)
def test_preflight_wrong_endpoint(monkeypatch, variable, url, says):
    monkeypatch.setenv(variable, "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    msg = _timed_preflight(url)
    assert msg == f"--output {url}: cannot reach the store at {says}"


def test_preflight_bad_credentials(s3, monkeypatch):
    bucket = BUCKET
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    msg = _timed_preflight(f"s3://{bucket}/out")
    assert msg == (
        f"--output s3://{bucket}/out: the store refused the credentials from AWS_ACCESS_KEY_ID "
        "and AWS_SECRET_ACCESS_KEY; fix AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the profile)"
    )


def test_preflight_no_credentials(s3, monkeypatch):
    bucket = BUCKET
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    msg = _timed_preflight(f"s3://{bucket}/out")
    assert msg == (
        f"--output s3://{bucket}/out: no credentials found (and the store refused anonymous "
        "access); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    )


def test_preflight_no_permission_to_write(s3, monkeypatch):
    bucket = BUCKET
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READER[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READER[1])
    assert preflight(f"s3://{bucket}/in", write=False, flag="--parquet").bucket == bucket
    msg = _timed_preflight(f"s3://{bucket}/out")
    assert msg.startswith(f"--output s3://{bucket}/out: permission denied (")
    assert msg.endswith(
        "the credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY may not write to it: "
        f"grant them read, write and delete on {bucket}"
    )


# -- gs:// ------------------------------------------------------------------------------------


def test_the_gcs_server_itself_refuses_a_second_create(gcs):
    """ifGenerationMatch=0 is enforced by the server, not by a check before the write: of six
    clients creating one name at once exactly one gets a generation, and a replace conditional
    on that generation succeeds once."""
    client = gcshttp.GcsClient(gcshttp.gcs_settings("gs://x", gcs.env()))
    name = f"race/{unique_name('x')}"
    got: list[str | None] = []
    threads = [
        threading.Thread(
            target=lambda i=i: got.append(
                client.upload(gcsemulator.BUCKET, name, f"{i}".encode(), "0")
            )
        )
        for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [g for g in got if g is not None]
    assert len(got) == 6 and len(won) == 1
    assert client.upload(gcsemulator.BUCKET, name, b"again", "0") is None
    new = client.upload(gcsemulator.BUCKET, name, b"replaced", won[0])
    assert new and client.upload(gcsemulator.BUCKET, name, b"stale", won[0]) is None
    assert client.read(gcsemulator.BUCKET, name) == (b"replaced", new)


def test_gcs_listing_pages_through_and_stays_one_level(gcs, monkeypatch):
    """A prefix longer than one page is listed whole; iterdir sees one level, folders once."""
    from pipeline.storage.outpath import StorePath

    monkeypatch.setattr(gcshttp, "LIST_PAGE", 3)
    url = gcsemulator.fresh_prefix()
    store = ObjectStore(url)
    names = [f"rank-00000/part-{i:05d}.parquet" for i in range(8)] + [".batchgen/job.json"]
    for name in names:
        store.write(name, b"x")
    assert [o.name for o in store.iter_objects()] == sorted(names)
    root = StorePath.of(url)
    assert [p.name for p in root.iterdir()] == [".batchgen", "rank-00000"]
    assert len(list((root / "rank-00000").iterdir())) == 8


def test_gcs_credentials_come_from_the_emulator_variable_or_google_auth(monkeypatch):
    """STORAGE_EMULATOR_HOST sends no credentials; without it, application default
    credentials need google-auth, and its absence (hidden here, as if not installed) is one
    line naming the extra."""
    settings = gcshttp.gcs_settings("gs://b/o", {"STORAGE_EMULATOR_HOST": "127.0.0.1:4443"})
    assert (settings.endpoint, settings.emulator) == ("http://127.0.0.1:4443", True)
    assert gcshttp.GcsClient(settings)._auth() == {}
    monkeypatch.setitem(sys.modules, "google.auth", None)  # `import google.auth` fails
    with pytest.raises(ConfigError) as err:
        resolve("gs://b/o", env={})
    assert str(err.value) == (
        "gs://b/o: gs:// needs google-auth for Google's application default credentials: "
        "pip install 'batchgen[gcs]' (or set STORAGE_EMULATOR_HOST for an emulator)"
    )


def _on_gce() -> bool:
    try:
        return Path("/sys/class/dmi/id/product_name").read_text().startswith("Google")
    except OSError:
        return False


NO_CREDENTIALS = (
    "Error: gs://b/p: no Google credentials found; run `gcloud auth "
    "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS to a service account's "
    "key file"
)


@pytest.mark.skipif(_on_gce(), reason="on GCE, google-auth finds the VM's own credentials")
@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("metadata port closed", NO_CREDENTIALS),
        ("metadata server never answers", NO_CREDENTIALS),
        (
            "key file missing",
            "Error: gs://b/p: GOOGLE_APPLICATION_CREDENTIALS={tmp}/key.json does not "
            "exist; set it to a service account's key file, or unset it to use `gcloud auth "
            "application-default login`",
        ),
        (
            "key file is a folder",
            "Error: gs://b/p: GOOGLE_APPLICATION_CREDENTIALS={tmp} is not a file; set it to a "
            "service account's key file, or unset it to use `gcloud auth application-default "
            "login`",
        ),
    ],
)
def test_gcs_without_credentials_run_is_refused_in_one_line_within_seconds(
    tmp_path, monkeypatch, case, says
):
    """google-auth installed, no emulator, no credentials anywhere: `batchgen run` refuses in
    one line within 10 s, before the engine starts. google-auth's search for the GCE metadata
    server is bounded (its own probe, 3 tries of 3 s with backoff, took 13 s at a server that
    accepts and never answers); the metadata address is a loopback port (no network)."""
    pytest.importorskip("google.auth")
    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "in.parquet")
    for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "NO_GCE_CHECK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/gcloud credentials
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    with contextlib.ExitStack() as stack:
        silent = stack.enter_context(socket.socket())
        silent.bind(("127.0.0.1", 0))
        if case == "metadata server never answers":
            silent.listen(8)  # the kernel completes the handshake; nobody ever answers
        host = f"127.0.0.1:{silent.getsockname()[1]}"  # unlistened: connection refused
        monkeypatch.setenv("GCE_METADATA_IP", host)
        monkeypatch.setenv("GCE_METADATA_HOST", host)
        if case.startswith("key file"):
            key = tmp_path / "key.json" if case == "key file missing" else tmp_path
            monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
        t0 = time.monotonic()
        result = run_cli(*run_args("in.parquet", "gs://b/p", *FAKE_ENGINE), expect=2)
        took = time.monotonic() - t0
    assert result.output.splitlines()[-1] == says.format(tmp=tmp_path)
    assert took < 10, took
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]


class _IamProxy:
    """A loopback HTTP server in front of the emulator that answers as GCS's IAM would: every
    request forwarded, except those `deny` matches (method, path prefix), answered with GCS's
    error body and `status`. fake-gcs-server checks no permission of its own."""

    def __init__(self, upstream: str, deny: tuple[str, str], status: int) -> None:
        import http.client
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        host = upstream.split("://", 1)[1]
        reason = {401: "Unauthorized", 403: "Forbidden"}[status]

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == deny[0] and self.path.startswith(deny[1]):
                    err = {
                        "code": status,
                        "message": reason,
                        "errors": [{"reason": reason.lower()}],
                    }
                    data, code, headers = json.dumps({"error": err}).encode(), status, {}
                else:
                    conn = http.client.HTTPConnection(host, timeout=5)
                    conn.request(self.command, self.path, body, dict(self.headers))
                    resp = conn.getresponse()
                    data, code, headers = resp.read(), resp.status, dict(resp.getheaders())
                    conn.close()
                self.send_response(code)
                for key, value in headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _any

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _IamProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_gcs_preflight_no_permission_to_write(gcs, monkeypatch):
    """Credentials that may read but not create objects: reading passes, writing is refused in
    one line naming the role to grant."""
    url = f"gs://{gcsemulator.BUCKET}/out"
    with _IamProxy(gcs.endpoint, ("POST", "/upload/"), 403) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        assert preflight(url, write=False, flag="--parquet").bucket == gcsemulator.BUCKET
        msg = _timed_preflight(url)
    assert msg.startswith(f"--output {url}: permission denied (writing gs://")
    assert msg.endswith(
        "Google's application default credentials may not write to it: grant them read, write "
        f"and delete on gs://{gcsemulator.BUCKET} (roles/storage.objectAdmin)"
    )


def test_gcs_preflight_refused_credentials(gcs, monkeypatch):
    url = f"gs://{gcsemulator.BUCKET}/out"
    with _IamProxy(gcs.endpoint, ("GET", "/storage/v1/b/"), 401) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        msg = _timed_preflight(url)
    assert msg.startswith(f"--output {url}: the store refused Google's application default ")
    assert msg.endswith(
        "run `gcloud auth application-default login` again, or fix GOOGLE_APPLICATION_CREDENTIALS"
    )


def test_gcs_large_objects_go_up_as_resumable_uploads_in_chunks(gcs, monkeypatch):
    """Above MULTIPART_MAX an object is uploaded in chunks of one session: read back whole and
    by range, byte for byte."""
    import os

    monkeypatch.setattr(gcshttp, "MULTIPART_MAX", 2**20)
    monkeypatch.setattr(gcshttp, "RESUMABLE_CHUNK", 256 * 2**10)
    store = ObjectStore(gcsemulator.fresh_prefix())
    data = os.urandom(2**20 + 300 * 2**10 + 7)  # four full chunks, a fifth part-filled
    store.write("big.bin", data)
    assert store.read("big.bin") == data
    f = store.open_input("big.bin")
    assert f.size() == len(data) and f.read_at(10, 2**20 + 5) == data[2**20 + 5 : 2**20 + 15]
