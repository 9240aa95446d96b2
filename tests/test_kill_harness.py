"""SIGKILL `batchgen run` at random instants, rerun, repeat; then every input row x --n is in the
output exactly once, with the texts of an uninterrupted run, and no reader ever saw a partial file.

Kill points come from a seeded RNG (BATCHGEN_KILL_SEED overrides the seed; a failure names the
seed and the kill). Most are timed: at start-up or a random moment after the run's first new
commit. To land kills inside the two short commit windows for certain, some runs set
BATCHGEN_TEST_PAUSE (tests/hooks.py, through the hooked launcher), which makes the Nth shard commit announce itself on
stderr and hang either with the shard written under its temporary name ("in_write") or renamed
but not yet in the manifest ("after_rename"); the harness kills it there. The whole process
group is killed, as Slurm or the OOM killer would, so vLLM's engine process dies with it.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import (
    FAKE_ENGINE,
    HOOKED_BATCHGEN,
    greedy_sample_args,
    manifest_state,
    read_output,
    run_args,
    run_cli,
    shard_files,
    write_prompts,
)
from hooks import PAUSE_ENV as TEST_PAUSE_ENV

from pipeline.checkpoint import Manifest, RankSummary
from pipeline.status import read_status

ROWS = 3000
KILLS_PER_SCENARIO = 10  # two scenarios: 20 kills in all
SEED = int(os.environ.get("BATCHGEN_KILL_SEED", "20261128"))
STEP_SECONDS = "0.05"  # the fake engine's step: ~320 prompts/s, so runs outlive their kill
# What each scenario adds to the common flags: greedy n=1, and sampled n=2 (two rows a prompt).
SCENARIOS = {
    "greedy": ["--temperature", "0", "--rows-per-shard", "40"],
    "sampled-n2": ["--temperature", "0.8", "--n", "2", "--seed", "7", "--rows-per-shard", "50"],
}
# The kinds of kill each scenario makes, in an order its RNG shuffles.
KILL_KINDS = ["startup"] * 2 + ["engine"] * 4 + ["in_write"] * 2 + ["after_rename"] * 2
Key = tuple[str, int]  # (id, sample_index)


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prompts = [f"Question {i}: what is {i} times {i % 13}?" for i in range(ROWS)]
    return write_prompts(tmp_path_factory.mktemp("input") / "rows.parquet", prompts, 500)


class Victim:
    """`batchgen run` (with the tests' hooks) in its own process group, its stderr collected line
    by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [str(HOOKED_BATCHGEN), *args],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.paused_at: str | None = None  # the shard named by a BATCHGEN_TEST_PAUSE line
        self.paused = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith(TEST_PAUSE_ENV):
                self.paused_at = line.split()[-1]
                self.paused.set()

    def kill(self) -> int:
        """SIGKILL the whole group (a no-op if it ended already); the exit status."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.finish()

    def finish(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        self.proc.stderr.close()
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


def wait_until(condition, victim: Victim, timeout: float, what: str) -> bool:
    """Poll `condition`; False if the victim ended first (it finished its rows)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if victim.proc.poll() is not None:
            return False
        if time.monotonic() >= deadline:
            victim.kill()  # no process outlives a failed test
            raise AssertionError(f"no {what} within {timeout}s:\n{victim.stderr}")
        time.sleep(0.01)
    return True


def rows_by_key(table: pa.Table) -> dict[Key, tuple]:
    cols = table.select(
        ["id", "sample_index", "text", "finish_reason", "prompt_tokens", "completion_tokens"]
    ).to_pydict()
    keys = list(zip(cols["id"], cols["sample_index"], strict=True))
    assert len(keys) == len(set(keys)), "a row is in the output twice"
    values = zip(
        cols["text"],
        cols["finish_reason"],
        cols["prompt_tokens"],
        cols["completion_tokens"],
        strict=True,
    )
    return dict(zip(keys, values, strict=True))


def read_as_users_do(out: Path, cache: Path) -> dict[Key, tuple]:
    """The folder through pyarrow.dataset and through `datasets`; both must read every file."""
    if not shard_files(out):
        return {}
    import datasets

    rows = rows_by_key(pads.dataset(str(out), format="parquet").to_table())
    hf = datasets.load_dataset("parquet", data_dir=str(out), split="train", cache_dir=str(cache))
    assert sorted(zip(hf["id"], hf["sample_index"], strict=True)) == sorted(rows)
    return rows


def manifest(out: Path) -> dict | None:
    return manifest_state(out) if any(out.glob(".batchgen/rank-00000/manifest-*")) else None


def crash_debris(out: Path) -> tuple[list[str], list[str]]:
    """(temporary files of an unfinished write, complete shards the manifest does not list)."""
    tmps = sorted(p.name for p in [*out.glob("*/.tmp-*"), *out.glob(".batchgen/*/.tmp-*")])
    listed = {s["file"] for s in (manifest(out) or {"shards": []})["shards"]}
    orphans = [p.name for p in shard_files(out) if p.name not in listed]
    return tmps, orphans


def expected_notes(out: Path, tmps: list[str], orphans: list[str]) -> set[str]:
    """What the next run must say about the debris a kill left."""
    notes = {f"removed an unfinished temporary file from a crash: {t}" for t in tmps}
    for name in orphans:
        rows = pq.ParquetFile(out / "rank-00000" / name).metadata.num_rows
        notes.add(f"adopted {name} ({rows} rows), committed just before a crash")
    return notes


def assert_consistent(
    out: Path, cache: Path, reference: dict[Key, tuple], n: int, before: dict, context: str
) -> dict[Key, tuple]:
    """What readers see right after a kill: readable, no row twice, every committed prompt whole
    and equal to the uninterrupted run, and nothing committed earlier gone."""
    seen = read_as_users_do(out, cache)
    wrong = [k for k, v in seen.items() if reference.get(k) != v]
    assert not wrong, f"{context}: rows differ from the uninterrupted run: {wrong[:5]}"
    per_id = Counter(k[0] for k in seen)
    split = [i for i, c in per_id.items() if c != n]
    assert not split, f"{context}: prompts with a partial set of samples: {split[:5]}"
    lost = set(before) - set(seen)
    assert not lost, f"{context}: committed rows disappeared: {sorted(lost)[:5]}"
    return seen


def assert_status_agrees(out: Path, orphans: list[str], context: str) -> None:
    """What `batchgen status` reads of the rank after a kill (its newest generation's head and
    newest commit record) says what its whole state says, and it names the orphan shards."""
    whole = Manifest.load(out, 0)
    if whole is None:
        return
    assert asdict(RankSummary.load(out, 0)) == asdict(whole.summary()), context
    assert read_status(out).ranks[0].unlisted == orphans, context


def fake_args(src: Path, out: Path, extra: list[str]) -> list[str]:
    return run_args(src, out, "--max-num-seqs", "16", *FAKE_ENGINE, *extra)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_sigkill_at_random_instants_then_rerun_is_exactly_once(tmp_path, rows_file, scenario):
    extra = SCENARIOS[scenario]
    n = int(extra[extra.index("--n") + 1]) if "--n" in extra else 1
    rng = random.Random(f"{SEED}-{scenario}")
    kinds = KILL_KINDS[:]
    rng.shuffle(kinds)
    out, cache = tmp_path / "out", tmp_path / "hf-cache"
    run_cli(*fake_args(rows_file, tmp_path / "reference", extra))
    reference = rows_by_key(read_output(tmp_path / "reference"))
    assert len(reference) == ROWS * n

    seen: dict[Key, tuple] = {}
    pending: set[str] = set()  # notes the next run that gets as far as resuming must log
    landed: Counter[str] = Counter()
    adopted = 0
    for i, kind in enumerate(kinds):
        context = f"kill {i} ({kind}) of scenario {scenario}, BATCHGEN_KILL_SEED={SEED}"
        env = {"BATCHGEN_FAKE_STEP_SECONDS": STEP_SECONDS}
        nth = rng.randint(1, 4)
        if kind in ("in_write", "after_rename"):
            env[TEST_PAUSE_ENV] = f"{kind}:{nth}"
        delay = rng.uniform(0.3, 3.5) if kind == "startup" else rng.uniform(0.0, 0.8)
        before = len(shard_files(out))
        victim = Victim(fake_args(rows_file, out, extra), env)
        if kind == "startup":
            time.sleep(delay)
            alive = victim.proc.poll() is None
        elif kind == "engine":
            alive = wait_until(
                lambda before=before: len(shard_files(out)) > before, victim, 240, "new shard"
            )
            time.sleep(delay)
        else:
            alive = wait_until(victim.paused.is_set, victim, 240, f"{kind} pause")
        code = victim.kill()
        assert alive and code == -signal.SIGKILL, f"{context}: ended by itself ({code}) first"

        if "resuming rank 0:" in victim.stderr:
            missing = [note for note in pending if note not in victim.stderr]
            assert not missing, f"{context}: the run after a crash did not say {missing}"
        adopted += victim.stderr.count(", committed just before a crash")
        seen = assert_consistent(out, cache, reference, n, seen, context)
        tmps, orphans = crash_debris(out)
        assert_status_agrees(out, orphans, context)
        if kind == "in_write":  # the hook hangs after the temporary file is complete
            assert any(t.startswith(f".tmp-{victim.paused_at}.") for t in tmps), context
        if kind == "after_rename":
            assert victim.paused_at in orphans, context
        if any(t.startswith(".tmp-part-") for t in tmps):
            landed["in shard writing"] += 1
        elif tmps:
            landed["in manifest writing"] += 1
        elif orphans:
            landed["between rename and manifest"] += 1
        else:
            landed["in engine work or start-up"] += 1
        pending = expected_notes(out, tmps, orphans)

    final = Victim(fake_args(rows_file, out, extra), {"BATCHGEN_FAKE_STEP_SECONDS": "0"})
    assert final.finish() == 0, final.stderr
    assert "resuming rank 0:" in final.stderr
    assert not [note for note in pending if note not in final.stderr], final.stderr
    adopted += final.stderr.count(", committed just before a crash")

    print(f"{scenario}: kills landed {dict(landed)}; {adopted} shard(s) adopted")
    assert sum(landed.values()) == KILLS_PER_SCENARIO
    assert landed["in shard writing"] >= 2 and landed["between rename and manifest"] >= 2
    assert adopted >= 2
    final_rows = assert_consistent(out, cache, reference, n, seen, f"{scenario} final")
    assert final_rows == reference  # every row x n exactly once, texts as uninterrupted
    assert crash_debris(out) == ([], [])
    state = manifest(out)
    assert state["status"] == "finished"
    assert sorted(s["file"] for s in state["shards"]) == [p.name for p in shard_files(out)]
    assert sum(s["rows"] for s in state["shards"]) == ROWS * n
    status = run_cli("status", out)
    assert status.output.splitlines()[-1].startswith("all 1 rank: finished | ")


def test_sampled_texts_survive_a_kill_and_a_resume_in_other_batches(tmp_path, rows_file):
    """temperature > 0 with --seed: a row's samples depend on the run seed, its id and the sample
    index only, not on the batch it ran in or the process that ran it."""
    sampled = ["--temperature", "0.9", "--n", "3", "--seed", "42", "--rows-per-shard", "60"]
    run_cli(*fake_args(rows_file, tmp_path / "reference", sampled))
    reference = rows_by_key(read_output(tmp_path / "reference"))

    out = tmp_path / "out"
    victim = Victim(
        fake_args(rows_file, out, sampled),
        {"BATCHGEN_FAKE_STEP_SECONDS": STEP_SECONDS, TEST_PAUSE_ENV: "after_rename:3"},
    )
    assert wait_until(victim.paused.is_set, victim, 240, "pause")
    assert victim.kill() == -signal.SIGKILL
    committed = rows_by_key(read_output(out))
    assert len(committed) == 3 * 60
    # Resume with other batch sizes, so every remaining row meets other neighbours.
    result = run_cli(
        *fake_args(rows_file, out, sampled), "--max-num-seqs", "5", "--max-inflight", "7"
    )
    assert f"adopted {victim.paused_at} (60 rows), committed just before a crash" in result.output
    assert rows_by_key(read_output(out)) == reference

    texts = {k: v[0] for k, v in reference.items()}
    assert texts[("rows.parquet:0", 0)] != texts[("rows.parquet:0", 1)]  # samples differ
    run_cli(*fake_args(rows_file, tmp_path / "seed43", [*sampled[:-4], "--seed", "43"]))
    other = {k: v[0] for k, v in rows_by_key(read_output(tmp_path / "seed43")).items()}
    assert other.keys() == texts.keys()
    assert not [k for k in texts if texts[k] == other[k]]  # the seed decides every sample


@pytest.mark.engine
def test_real_engine_killed_twice_resumes_to_the_uninterrupted_greedy_texts(
    tmp_path, greedy_reference
):
    """Two kills of the real engine: at a random moment of generation, and between a shard's
    rename and its manifest entry; the in-process resume (the session's engine) completes it."""
    rng = random.Random(f"{SEED}-real")
    reference = rows_by_key(read_output(greedy_reference))
    assert len(reference) == 48
    out, cache = tmp_path / "out", tmp_path / "hf-cache"

    victim = Victim(greedy_sample_args(out), {})
    assert wait_until(lambda: bool(shard_files(out)), victim, 600, "first shard")
    time.sleep(rng.uniform(0.0, 1.5))
    assert victim.kill() == -signal.SIGKILL, victim.stderr
    seen = assert_consistent(out, cache, reference, 1, {}, "real engine, kill 1")
    assert 0 < len(seen) < 48

    victim = Victim(greedy_sample_args(out), {TEST_PAUSE_ENV: "after_rename:2"})
    assert wait_until(victim.paused.is_set, victim, 600, "pause"), victim.stderr
    assert victim.kill() == -signal.SIGKILL
    seen = assert_consistent(out, cache, reference, 1, seen, "real engine, kill 2")
    tmps, orphans = crash_debris(out)
    assert orphans == [victim.paused_at]

    result = run_cli(*greedy_sample_args(out))
    assert f"adopted {victim.paused_at} (4 rows), committed just before a crash" in result.output
    assert f"resuming rank 0: {len(seen)} prompts already committed" in result.output
    assert rows_by_key(read_output(out)) == reference
    assert crash_debris(out) == ([], [])
