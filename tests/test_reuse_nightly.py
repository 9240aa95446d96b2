"""jobs/cron/nightly.sh with --reuse: three nights over a growing, then edited dataset generate
only the new and changed rows; on the fake engine, and two nights on the real one (float32),
where vLLM's own finished-request counter proves how many requests reached the engine."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import (
    BATCHGEN,
    HOOKED_BATCHGEN,
    REAL_ENGINE,
    manifest_state,
    read_output,
    save_manifest_state,
)

NIGHTLY = Path(__file__).resolve().parent.parent / "jobs" / "cron" / "nightly.sh"
OUTPUTS = ["text", "finish_reason", "prompt_tokens", "completion_tokens"]
NIGHTS = ("2026-03-01", "2026-03-02", "2026-03-03")


def write_input(path: Path, rows: int, edited: tuple[int, ...] = ()) -> None:
    ids = [f"q{i:02d}" for i in range(rows)]
    prompts = [
        f"Name a fruit that starts with the letter {chr(65 + i % 26)}"
        + (" and say its color." if i in edited else f" (list {i // 26}).")
        for i in range(rows)
    ]
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), path)


def setup(tmp_path: Path, engine: list[str], batchgen: Path) -> tuple[Path, Path, dict]:
    src = tmp_path / "in.parquet"
    config = tmp_path / "nightly.toml"
    flags = "\n".join(
        f"{a[2:]} = {json.dumps(b)}" for a, b in zip(engine[::2], engine[1::2], strict=True)
    )
    config.write_text(
        f'parquet = "{src}"\nprompt-column = "prompt"\nid-column = "id"\nmax-tokens = 16\n'
        f"chat = true\ntemperature = 0.0\nrows-per-shard = 8\n{flags}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        BATCHGEN=str(batchgen),
        NIGHTLY_ROOT=str(tmp_path / "nightly"),
        CUDA_VISIBLE_DEVICES="",  # --data-parallel auto: one process
    )
    return src, config, env


def night(config: Path, env: dict, date: str, *flags: str, **extra: str) -> dict:
    """Run one night; its rank-0 reuse report."""
    proc = subprocess.run(
        [NIGHTLY, config, *flags],
        env={**env, "NIGHTLY_DATE": date, **extra},
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = (Path(env["NIGHTLY_ROOT"]) / "nightly.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    return manifest_state(Path(env["NIGHTLY_ROOT"]) / date)["report"]["this_run"]["reuse"]


def outputs(out: Path) -> dict[str, dict]:
    rows = read_output(out).select(["id", *OUTPUTS, "reused_from"]).to_pylist()
    assert len(rows) == len({r["id"] for r in rows})
    return {r.pop("id"): r for r in rows}


def three_nights(tmp_path: Path, src: Path, config: Path, env: dict, *flags: str) -> list[dict]:
    root = Path(env["NIGHTLY_ROOT"])
    write_input(src, 40)
    reports = [night(config, env, NIGHTS[0], *flags)]
    write_input(src, 60)
    reports.append(night(config, env, NIGHTS[1], *flags))
    write_input(src, 60, edited=(3, 17, 30, 44, 59))
    reports.append(night(config, env, NIGHTS[2], *flags))
    first, second, third = (outputs(root / d) for d in NIGHTS)
    assert len(first) == 40 and len(second) == len(third) == 60
    assert all(row["completion_tokens"] > 1 for row in first.values())  # real answers
    for i, row in first.items():  # the 40 reused rows, byte for byte
        assert {k: second[i][k] for k in OUTPUTS} == {k: row[k] for k in OUTPUTS}
        assert second[i]["reused_from"].startswith(str(root / NIGHTS[0]))
    edited = {f"q{i:02d}" for i in (3, 17, 30, 44, 59)}
    for i, row in third.items():
        assert (row["reused_from"] is None) is (i in edited), i
        if i not in edited:
            assert {k: row[k] for k in OUTPUTS} == {k: second[i][k] for k in OUTPUTS}
    log = (root / "nightly.log").read_text()
    assert f"reusing the outputs of {root / NIGHTS[1]}" in log
    return reports


def counts(report: dict) -> tuple[int, int]:
    return report["generated_prompts"], report["reused_prompts"]


def test_three_nights_generate_only_new_and_edited_rows(tmp_path):
    src, config, env = setup(tmp_path, ["--engine", "fake"], HOOKED_BATCHGEN)
    reports = three_nights(tmp_path, src, config, env)
    assert [counts(r) for r in reports] == [(40, 0), (20, 40), (5, 55)]
    assert [r["engine_requests"] for r in reports] == [40, 20, 5]


def test_nightly_reuse_can_be_turned_off(tmp_path):
    src, config, env = setup(tmp_path, ["--engine", "fake"], HOOKED_BATCHGEN)
    write_input(src, 40)
    night(config, env, NIGHTS[0])
    report = night(config, env, NIGHTS[1], NIGHTLY_REUSE="0")
    assert counts(report) == (40, 0) and report["sources"] == []
    log = (Path(env["NIGHTLY_ROOT"]) / "nightly.log").read_text()
    assert "NIGHTLY_REUSE=0: generating every row" in log


def test_an_unfinished_earlier_night_is_finished_first_then_reused(tmp_path):
    src, config, env = setup(tmp_path, ["--engine", "fake"], HOOKED_BATCHGEN)
    write_input(src, 40)
    night(config, env, NIGHTS[0])
    folder = Path(env["NIGHTLY_ROOT"]) / NIGHTS[0]
    data = manifest_state(folder)
    # Marked failed: the next night retries it first; once that run finishes, it is reused.
    save_manifest_state(folder, {**data, "status": "failed"})
    report = night(config, env, NIGHTS[1])
    assert counts(report) == (0, 40)


@pytest.mark.engine
def test_two_nights_on_the_real_engine(tmp_path):
    """The second night grows the input by 20 rows and edits 3 of the first 40: vLLM's own
    finished-request counter says 23 requests reached it, and the 37 reused rows are the first
    night's bytes. (Two nights, each an engine start: the fake-engine test above walks all
    three, the third reusing a night that itself reused.)"""
    # vLLM's stats on, so its own request counter (vllm:request_success) can be read.
    stats = ["--engine-arg", "disable_log_stats=false"]
    src, config, env = setup(tmp_path, REAL_ENGINE, BATCHGEN)
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    root = Path(env["NIGHTLY_ROOT"])
    write_input(src, 40)
    reports = [night(config, env, NIGHTS[0], *stats)]
    edited = (3, 17, 30)
    write_input(src, 60, edited=edited)
    reports.append(night(config, env, NIGHTS[1], *stats))
    assert [counts(r) for r in reports] == [(40, 0), (23, 37)]
    assert [r["vllm_finished_requests"] for r in reports] == [40, 23]
    assert [r["engine_requests"] for r in reports] == [40, 23]
    first, second = (outputs(root / d) for d in NIGHTS[:2])
    assert len(first) == 40 and len(second) == 60
    assert all(row["completion_tokens"] > 1 for row in first.values())  # real answers
    regenerated = {f"q{i:02d}" for i in edited} | {f"q{i:02d}" for i in range(40, 60)}
    for i, row in second.items():
        assert (row["reused_from"] is None) is (i in regenerated), i
        if i not in regenerated:  # reused, byte for byte
            assert {k: row[k] for k in OUTPUTS} == {k: first[i][k] for k in OUTPUTS}
            assert row["reused_from"].startswith(str(root / NIGHTS[0]))
    assert f"reusing the outputs of {root / NIGHTS[0]}" in (root / "nightly.log").read_text()
