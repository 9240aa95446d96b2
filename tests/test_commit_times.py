"""Each manifest shard entry records when it was committed and how long its run had been
generating then (what `batchgen report` draws progress and throughput from); manifests written
before these fields existed still load, resume and report."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import FAKE_ENGINE, manifest_state, run_args, run_cli, save_manifest_state


def args(src: Path, out: Path) -> list[str]:
    return run_args(src, out, "--rows-per-shard", "50", *FAKE_ENGINE)


def test_each_shard_records_its_commit_time_and_generation_seconds(prompts_file, tmp_path):
    out = tmp_path / "out"
    before = time.time()
    run_cli(*args(prompts_file, out))
    after = time.time()
    manifest = manifest_state(out)
    shards = manifest["shards"]
    assert [s["file"] for s in shards] == [f"part-00000-00000{i}.parquet" for i in range(4)]
    times = [s["committed_at"] for s in shards]
    assert before <= times[0] and times == sorted(times) and times[-1] <= after
    seconds = [s["generate_seconds"] for s in shards]
    assert seconds[0] >= 0 and seconds == sorted(seconds)
    assert seconds[-1] <= manifest["report"]["this_run"]["generate_seconds"] + 0.01
    # The two clocks agree: wall time between commits is generation time between them.
    assert abs((times[-1] - times[0]) - (seconds[-1] - seconds[0])) < 0.05


def test_an_adopted_shard_takes_its_file_time(prompts_file, tmp_path):
    out = tmp_path / "out"
    run_cli(*args(prompts_file, out))
    manifest = manifest_state(out)
    dropped = manifest["shards"].pop()
    manifest["status"] = "running"
    save_manifest_state(out, manifest)
    run_cli(*args(prompts_file, out))
    adopted = manifest_state(out)["shards"][-1]
    assert adopted["file"] == dropped["file"]
    assert adopted["committed_at"] == round(
        (out / "rank-00000" / dropped["file"]).stat().st_mtime, 3
    )
    assert adopted["generate_seconds"] is None


def test_a_manifest_without_commit_times_still_resumes_and_reports(prompts_file, tmp_path):
    out = tmp_path / "out"
    run_cli(*args(prompts_file, out))
    manifest = manifest_state(out)
    for shard in manifest["shards"]:
        del shard["committed_at"], shard["generate_seconds"]
    manifest["shards"].pop()  # one shard short: the rerun redoes it
    (out / "rank-00000" / "part-00000-000003.parquet").unlink()
    manifest["status"] = "running"
    save_manifest_state(out, manifest)
    result = run_cli(*args(prompts_file, out))
    assert "50 prompts this run" in result.output
    shards = manifest_state(out)["shards"]
    assert ["committed_at" in s for s in shards] == [False, False, False, True]
    assert run_cli("status", out).output.startswith("rank 0: finished | 200/200 prompts")
