"""jobs/cron/nightly.sh on the fake engine: a dated folder per night, the newest unfinished
earlier night resumed first, no overlapping runs, everything in the log, exit codes for alerts."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import HOOKED_BATCHGEN, read_output, run_cli

NIGHTLY = Path(__file__).resolve().parent.parent / "jobs" / "cron" / "nightly.sh"
ROWS = 40


@pytest.fixture
def config(tmp_path: Path) -> Path:
    src = tmp_path / "in.parquet"
    ids = [f"q{i:02d}" for i in range(ROWS)]
    pq.write_table(pa.table({"id": ids, "prompt": [f"Question {i}?" for i in ids]}), src)
    path = tmp_path / "nightly.toml"
    path.write_text(
        f'parquet = "{src}"\nprompt-column = "prompt"\nid-column = "id"\nmax-tokens = 8\n'
        'engine = "fake"\nrows-per-shard = 4\nmax-num-seqs = 1\n'
    )
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    clean.pop("BATCHGEN_FAKE_STEP_SECONDS", None)
    return {
        **clean,
        "BATCHGEN": str(HOOKED_BATCHGEN),
        "NIGHTLY_ROOT": str(tmp_path / "nightly"),
        "CUDA_VISIBLE_DEVICES": "",  # --data-parallel auto: one process, on any machine
    }


def nightly(config: Path, env: dict[str, str], date: str, *flags: str, **extra: str):
    return subprocess.run(
        [NIGHTLY, config, *flags],
        env={**env, "NIGHTLY_DATE": date, **extra},
        capture_output=True,
        text=True,
        timeout=180,
    )


def assert_complete(out: Path) -> None:
    ids = read_output(out).column("id").to_pylist()
    assert sorted(ids) == [f"q{i:02d}" for i in range(ROWS)]


def log_lines(env: dict[str, str]) -> list[str]:
    return (Path(env["NIGHTLY_ROOT"]) / "nightly.log").read_text().splitlines()


def test_interrupted_night_is_resumed_before_the_next_and_then_nights_run_alone(config, env):
    root = Path(env["NIGHTLY_ROOT"])
    first = root / "2026-01-01"
    proc = subprocess.Popen(
        [NIGHTLY, config],
        env={**env, "NIGHTLY_DATE": "2026-01-01", "BATCHGEN_FAKE_STEP_SECONDS": "0.2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(first.glob("rank-*/part-*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # a shutdown: the script passes it on to batchgen
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75
    assert err == (
        f"nightly.sh {config} for 2026-01-01: exit 75 (interrupted by SIGTERM; the next run "
        f"resumes it); log: {root}/nightly.log\n"
    )
    partial = read_output(first).num_rows
    assert 0 < partial < ROWS

    proc = nightly(config, env, "2026-01-02")
    assert proc.returncode == 0, proc.stderr
    assert_complete(first)
    assert_complete(root / "2026-01-02")
    log = log_lines(env)
    tonight = log[next(i for i, x in enumerate(log) if "nightly run for 2026-01-02" in x) :]
    resumed = [i for i, x in enumerate(tonight) if "resuming the unfinished earlier run" in x]
    started = [i for i, x in enumerate(tonight) if f"--output {root}/2026-01-02" in x]
    assert len(resumed) == 1 and tonight[resumed[0]].endswith(f"run {first} first")
    assert any(f"resuming rank 0: {partial} prompts already committed" in x for x in tonight)
    assert started and resumed[0] < started[0]

    # A third night finds nothing unfinished and runs its own folder alone.
    proc = nightly(config, env, "2026-01-03")
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout, proc.stderr) == ("", "")  # all in the log: cron mails nothing
    assert_complete(root / "2026-01-03")
    log = log_lines(env)
    tonight = log[next(i for i, x in enumerate(log) if "nightly run for 2026-01-03" in x) :]
    assert tonight[0].endswith(f"for 2026-01-03, config {config}, into {root}/2026-01-03")
    # The newest complete earlier night is reused (NIGHTLY_REUSE=0 turns that off).
    assert tonight[1].endswith(f"] reusing the outputs of {root}/2026-01-02")
    assert tonight[2].endswith(
        f"] {HOOKED_BATCHGEN} run --config {config} --output {root}/2026-01-03 --data-parallel auto"
        f" --reuse {root}/2026-01-02"
    )
    assert tonight[-1].endswith("] exit 0")
    assert not any("resuming" in x for x in tonight)


def test_unresumable_earlier_run_is_reported_and_tonight_still_runs(config, env, tmp_path):
    """The newest unfinished earlier folder holds rank 0 of a 2-rank run, which this config
    cannot resume (the rank count differs): that attempt fails, tonight's run goes ahead, and the
    exit code says something failed. This batchgen lacks `status`, so the script reads the rank
    manifests itself: a finished newer folder is skipped, a rank missing means unfinished."""
    root = Path(env["NIGHTLY_ROOT"])
    earlier = root / "2025-12-31"
    run_cli(
        "run", "--config", config, "--output", earlier, "--num-shards", "2", "--shard-index", "0"
    )
    run_cli("run", "--config", config, "--output", root / "2026-01-01")  # newer, finished
    (root / "2025-12-30").mkdir()  # unfinished too, but older

    old_batchgen = tmp_path / "batchgen-without-status"
    old_batchgen.write_text(
        "#!/usr/bin/env bash\n"
        "if [[ $1 == status ]]; then echo \"Error: No such command 'status'.\" >&2; exit 2; fi\n"
        f'exec {HOOKED_BATCHGEN} "$@"\n'
    )
    old_batchgen.chmod(0o755)
    proc = nightly(config, env, "2026-01-02", BATCHGEN=str(old_batchgen))
    assert proc.returncode == 1
    assert proc.stderr == (
        f"nightly.sh {config} for 2026-01-02: exit 1 (resuming {earlier} failed with exit 1); "
        f"log: {root}/nightly.log\n"
    )
    log = "\n".join(log_lines(env))
    assert f"resuming the unfinished earlier run {earlier} first" in log
    assert "num_shards: 2 -> 1" in log
    assert f"resuming {earlier} failed (exit 1); going on with 2026-01-02" in log
    assert_complete(root / "2026-01-02")
    assert "2025-12-30" not in log
    assert f"--output {root}/2026-01-01" not in log


def test_a_night_still_running_makes_the_next_skip_with_exit_3(config, env):
    root = Path(env["NIGHTLY_ROOT"])
    root.mkdir()
    with open(root / ".nightly.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as the earlier night's script holds it
        proc = nightly(config, env, "2026-01-02")
    assert proc.returncode == 3
    assert proc.stderr == (
        f"nightly.sh {config} for 2026-01-02: exit 3 (skipped: another nightly run is still "
        f"going); log: {root}/nightly.log\n"
    )
    assert "another nightly run holds" in log_lines(env)[0]
    assert not (root / "2026-01-02").exists()


@pytest.mark.parametrize(
    "args, extra, code, message",
    [
        ([], {}, 2, "usage: "),
        (["missing.toml"], {}, 2, "config missing.toml: no such readable file"),
        (
            ["CONFIG"],
            {"NIGHTLY_DATE": "yesterday"},
            2,
            "NIGHTLY_DATE=yesterday: expected YYYY-MM-DD",
        ),
        (["CONFIG", "--temperature", "-1"], {}, 2, "exit 2 (batchgen rejected the command line"),
    ],
)
def test_bad_calls_exit_2(config, env, tmp_path, args, extra, code, message):
    args = [str(config) if a == "CONFIG" else a for a in args]
    proc = subprocess.run(
        [NIGHTLY, *args],
        env={**env, "NIGHTLY_DATE": "2026-01-02", **extra},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == code
    assert message in proc.stderr
