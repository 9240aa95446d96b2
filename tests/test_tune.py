"""`batchgen tune`: the search on made-up timings (no engine), the search space, the job config
it writes and its round trip through `batchgen run --config`, the CLI on the fake engine, and
one tune on the real engine. Speed is never asserted: the search is fed its timings."""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    BATCHGEN,
    FAKE_ENGINE,
    HOOKED_BATCHGEN,
    REAL_ENGINE,
    SAMPLE,
    Group,
    read_output,
    run_args,
    run_cli,
    write_prompts,
)
from hooks import STEP_ENV

from pipeline.config import EngineConfig
from pipeline.errors import BatchgenError, ConfigError
from pipeline.tune import apply_settings, baseline_engine, job_config_toml
from pipeline.tune.report import format_tune
from pipeline.tune.search import EARLY_STOP, Measurement, search
from pipeline.tune.space import KNOBS, NGRAM_DRAFTS, NGRAM_GPU_DRAFTS, Space

KNOB_BY_KEY = {k.key: k for k in KNOBS}

# What vLLM 0.32 resolves on this CPU machine for the bundled model (Engine.tunables()).
CPU = {
    "device": "cpu",
    "max_model_len": 2048,
    "max_num_seqs": 256,
    "max_num_batched_tokens": 4096,
    "enable_chunked_prefill": True,
    "enable_prefix_caching": True,
    "speculative_config": None,
    "gpu_memory_utilization": None,
    "max_cudagraph_capture_size": None,
    "quantization": None,
}
GPU = {
    **CPU,
    "device": "gpu",
    "max_num_seqs": 1024,
    "max_num_batched_tokens": 16384,
    "gpu_memory_utilization": 0.92,
    "max_cudagraph_capture_size": 512,
}
K2 = NGRAM_DRAFTS[0]


class FakeLab:
    """A stand-in for the engine: each trial's output tok/s from `speed(settings)` (a factor
    of BASE) with a fixed +-1% spread over three passes; texts from `texts(settings)`. Every
    trial advances a fake clock by `seconds` (an engine start plus its passes)."""

    BASE = 400.0

    def __init__(
        self,
        speed: Any,
        texts: Any = None,
        seconds: float = 60.0,
        effective: Mapping[str, Any] = CPU,
        spread: float = 0.01,
    ) -> None:
        self.speed, self.texts, self.seconds = speed, texts, seconds
        self.effective, self.spread = effective, spread
        self.now = 0.0
        self.seen: list[dict[str, Any]] = []
        self.floors: list[float | None] = []

    def clock(self) -> float:
        return self.now

    def measure(self, settings: dict[str, Any], floor: float | None) -> Measurement:
        self.seen.append(settings)
        self.floors.append(floor)
        self.now += self.seconds
        factor = self.speed(settings)
        if isinstance(factor, str):
            return Measurement(start_seconds=30.0, error=factor)
        center = self.BASE * factor
        passes = [center * (1 - self.spread), center, center * (1 + self.spread)]
        cut = floor is not None and passes[0] < floor
        text = self.texts(settings) if self.texts else "same"
        return Measurement(
            tok_s=passes[:1] if cut else passes,
            output_tokens=1000,
            start_seconds=30.0,
            texts={("row-1", 0): "same", ("row-2", 0): text},
            tunables=dict(self.effective),
            cut_short=cut,
        )

    def run(self, sample: int = 128, tries: tuple = (), **kw: Any):
        kw.setdefault("budget_seconds", 0)
        return search(
            self.measure,
            lambda eff: Space(eff, sample, tries),
            clock=self.clock,
            **kw,
        )


def table(*rows: tuple[dict[str, Any], float | str], default: float = 1.0):
    """speed(settings) from (settings, speed factor or error) rows; `default` for the rest."""
    keyed = {json.dumps(settings, sort_keys=True): factor for settings, factor in rows}
    return lambda settings: keyed.get(json.dumps(settings, sort_keys=True), default)


def k(**settings: Any) -> dict[str, Any]:
    return settings


# --- the search, on made-up timings ------------------------------------------------------------


def test_trials_walk_each_setting_from_the_best_so_far_in_order() -> None:
    """Speculation first (its shortest draft is clearly slower: one pass, and no longer drafts),
    then max_num_seqs (down, since 512 is no smaller than the 128-row sample), stopping at the
    first step that does not beat the best; then batch tokens (up first; having moved up it never
    tries down), chunked prefill, prefix caching. GPU-only settings are skipped on the CPU."""
    lab = FakeLab(
        table(
            (k(speculative_config=K2), 0.7),
            (k(max_num_seqs=64), 1.2),
            (k(max_num_seqs=32), 1.1),
            (k(max_num_seqs=64, max_num_batched_tokens=8192), 1.3),
            (k(max_num_seqs=64, max_num_batched_tokens=16384), 1.3),
            (k(max_num_seqs=64, max_num_batched_tokens=8192, enable_chunked_prefill=False), 1.0),
            (k(max_num_seqs=64, max_num_batched_tokens=8192, enable_prefix_caching=False), 1.3),
        )
    )
    result = lab.run()
    assert lab.seen == [
        {},
        {"speculative_config": K2},
        {"max_num_seqs": 64},
        {"max_num_seqs": 32},
        {"max_num_seqs": 64, "max_num_batched_tokens": 8192},
        {"max_num_seqs": 64, "max_num_batched_tokens": 16384},
        {"max_num_seqs": 64, "max_num_batched_tokens": 8192, "enable_chunked_prefill": False},
        {"max_num_seqs": 64, "max_num_batched_tokens": 8192, "enable_prefix_caching": False},
    ]
    assert result.winner.settings == {"max_num_seqs": 64, "max_num_batched_tokens": 8192}
    assert result.winner.number == 4
    assert result.gain == pytest.approx(1.3)
    assert [t.verdict.split(":")[0] for t in result.trials[1:]] == [
        "slower",  # 0.7x: under 80% of the baseline after one pass
        "faster",
        "not faster than the incumbent (trial 2) by 3% and beyond both trials' spread",
        "faster",
        "not faster than the incumbent (trial 4) by 3% and beyond both trials' spread",
        "slower",
        "not faster than the incumbent (trial 4) by 3% and beyond both trials' spread",
    ]
    not_tried = {(key, json.dumps(value)): why for key, value, why in result.not_tried}
    assert not_tried == {
        (
            "max_num_seqs",
            "128",
        ): "not measurable on a sample of 128 rows (every row would run at once)",
        (
            "max_num_seqs",
            "512",
        ): "not measurable on a sample of 128 rows (every row would run at once)",
        ("gpu_memory_utilization", "null"): "GPU only (this engine runs on the CPU)",
        ("max_cudagraph_capture_size", "null"): "GPU only (this engine runs on the CPU)",
        ("replicas_per_gpu", "null"): "GPU only (this engine runs on the CPU)",
        ("quantization", "null"): "GPU only (this engine runs on the CPU)",
    }


def test_a_slower_first_step_turns_the_line_search_around() -> None:
    """Up from the baseline's 4096 batch tokens is slower, so it tries down: 2048, then 1024."""
    lab = FakeLab(
        table(
            (k(max_num_batched_tokens=2048), 1.1),
            (k(max_num_batched_tokens=1024), 1.2),
        ),
    )
    result = lab.run(tries=())
    tokens = [
        t.settings["max_num_batched_tokens"]
        for t in result.trials
        if t.knob == "max_num_batched_tokens"
    ]
    assert tokens == [8192, 2048, 1024]
    assert result.winner.settings == {"max_num_batched_tokens": 1024}


def test_speculation_climbs_to_longer_drafts_while_each_is_faster() -> None:
    lab = FakeLab(
        table(
            (k(speculative_config=NGRAM_DRAFTS[0]), 1.2),
            (k(speculative_config=NGRAM_DRAFTS[1]), 1.4),
            (k(speculative_config=NGRAM_DRAFTS[2]), 1.3),
        ),
    )
    result = lab.run(tries=())
    drafts = [
        t.settings["speculative_config"] for t in result.trials if t.knob == "speculative_config"
    ]
    assert drafts == list(NGRAM_DRAFTS)
    assert result.winner.settings["speculative_config"] == NGRAM_DRAFTS[1]


SPEED_TABLES = [
    pytest.param(lambda s: 0.9, id="everything-slower"),
    pytest.param(lambda s: 1.0, id="everything-equal"),
    # 2% faster with a 1% spread: under the 3% --min-gain
    pytest.param(lambda s: 1.0 if not s else 1.02, id="within-min-gain"),
    pytest.param(lambda s: "ValueError: vLLM refused it" if s else 1.0, id="every-candidate-fails"),
]


@pytest.mark.parametrize("speed", SPEED_TABLES)
def test_nothing_clearly_faster_keeps_the_baseline(speed: Any) -> None:
    result = FakeLab(speed).run()
    assert result.winner is result.baseline
    assert result.winner.settings == {}
    assert result.gain == 1.0
    assert len(result.trials) > 3  # it did try


def test_a_faster_median_inside_the_noise_is_not_taken() -> None:
    """5% faster in the median, but with a 6% spread its slowest pass is below the baseline's
    fastest: not a measured gain."""
    lab = FakeLab(lambda s: 1.05 if s else 1.0, spread=0.06)
    result = lab.run(tries=(("max_num_seqs", 64),))
    (candidate,) = result.trials[1:]
    assert candidate.median == pytest.approx(1.05 * FakeLab.BASE)
    assert result.winner is result.baseline


@pytest.mark.parametrize("seed", range(20))
def test_the_winner_is_never_slower_than_the_baseline(seed: int) -> None:
    """Random speeds and spreads: whatever moves, every move beat the one before beyond its
    spread, so the winner's median is above the baseline's."""
    rng = random.Random(seed)
    speeds: dict[str, float] = {}

    def speed(settings: dict[str, Any]) -> float:
        key = json.dumps(settings, sort_keys=True)
        return speeds.setdefault(key, 1.0 if not settings else rng.uniform(0.6, 1.5))

    lab = FakeLab(speed, spread=rng.uniform(0.0, 0.1))
    result = lab.run()
    assert result.winner.median >= result.baseline.median
    if result.winner is not result.baseline:
        assert min(result.winner.measurement.tok_s) > max(result.baseline.measurement.tok_s)
        assert result.gain >= 1.03


def test_it_stops_at_the_budget() -> None:
    """Trials of 100 s each and 350 s: no trial starts that the longest so far says would end
    past the budget. The rest are listed as not tried."""
    lab = FakeLab(lambda s: 1.0, seconds=100.0)
    result = lab.run(budget_seconds=350)
    assert len(lab.seen) == 3 and lab.now == 300
    assert result.budget_stopped
    assert [(key, value) for key, value, why in result.not_tried if "budget" in why] == [
        ("max_num_batched_tokens", 8192),
        ("enable_chunked_prefill", None),
        ("enable_prefix_caching", None),
    ]


def test_the_baseline_always_runs_and_time_before_it_counts() -> None:
    lab = FakeLab(lambda s: 1.0, seconds=100.0)
    lab.now = 1000.0  # the sample took a while: started at 950
    result = lab.run(budget_seconds=200, started=950.0)
    assert lab.seen == [{}]
    assert result.winner is result.baseline and result.budget_stopped


def test_a_clearly_slower_candidate_gets_one_pass() -> None:
    lab = FakeLab(
        table(
            (k(max_num_seqs=64), 0.7),
        )
    )
    result = lab.run(tries=(("max_num_seqs", 64),))
    assert lab.floors == [None, EARLY_STOP * FakeLab.BASE]
    (slow,) = result.trials[1:]
    assert len(slow.measurement.tok_s) == 1 and slow.measurement.cut_short
    assert slow.verdict == (
        "slower: its first pass made 277.2 out tok/s, under 80% of the incumbent's median; "
        "no more passes"
    )


@pytest.mark.parametrize("allow", [False, True])
def test_a_faster_setting_whose_texts_differ_is_flagged(allow: bool) -> None:
    lab = FakeLab(
        table(
            (k(speculative_config=K2), 1.5),
        ),
        texts=lambda s: "changed" if "speculative_config" in s else "same",
    )
    result = lab.run(tries=(("speculative_config", K2),), allow_output_changes=allow)
    (spec,) = result.trials[1:]
    assert (spec.rows_differ, spec.first_differing) == (1, "row-2")
    if allow:
        assert result.winner is spec and spec.verdict == "faster: kept"
    else:
        assert result.winner is result.baseline
        assert spec.verdict == (
            "faster, but its texts differ from the baseline's in 1 sample row(s) (e.g. row-2): "
            "not chosen; --allow-output-changes accepts it"
        )


def test_tries_run_every_value_given_in_order() -> None:
    lab = FakeLab(
        table(
            (k(max_num_seqs=8), 0.95),
            (k(max_num_seqs=32), 1.2),
        )
    )
    result = lab.run(tries=(("max_num_seqs", 8), ("max_num_seqs", 32), ("max_num_seqs", 16)))
    assert lab.seen == [{}, {"max_num_seqs": 8}, {"max_num_seqs": 32}, {"max_num_seqs": 16}]
    assert result.winner.settings == {"max_num_seqs": 32}


def test_a_failed_candidate_is_reported_and_the_search_goes_on() -> None:
    lab = FakeLab(
        table(
            (k(speculative_config=K2), "RuntimeError: no ngram on this platform"),
        )
    )
    result = lab.run()
    spec = next(t for t in result.trials if "speculative_config" in t.settings)
    assert spec.verdict == "failed: RuntimeError: no ngram on this platform"
    assert any("max_num_batched_tokens" in t.settings for t in result.trials)


def test_a_failed_baseline_ends_the_tune() -> None:
    lab = FakeLab(lambda s: "ValueError: no KV cache room")
    with pytest.raises(BatchgenError) as exc:
        lab.run()
    assert str(exc.value) == (
        "the baseline engine (the job's own settings) failed: ValueError: no KV cache room; the "
        "job would fail the same way, so fix that before tuning"
    )


# --- the space -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("effective", "sample", "key", "incumbent", "values", "start"),
    [
        (CPU, 128, "max_num_seqs", {}, (16, 32, 64, 256), 3),
        (CPU, 1000, "max_num_seqs", {}, (16, 32, 64, 128, 256, 512), 4),
        (GPU, 4096, "max_num_seqs", {}, (64, 128, 256, 512, 1024, 2048), 4),
        (CPU, 128, "max_num_batched_tokens", {}, (1024, 2048, 4096, 8192, 16384), 2),
        (CPU, 128, "enable_chunked_prefill", {}, (True, False), 0),
        (CPU, 128, "speculative_config", {}, (None, *NGRAM_DRAFTS), 0),
        (GPU, 4096, "speculative_config", {}, (None, *NGRAM_GPU_DRAFTS), 0),
        (GPU, 4096, "gpu_memory_utilization", {}, (0.92, 0.95), 0),
        (GPU, 4096, "max_cudagraph_capture_size", {"max_num_seqs": 2048}, (512, 2048), 0),
        (GPU, 4096, "replicas_per_gpu", {}, (1, 2, 3, 4), 0),
        (GPU, 4096, "quantization", {}, (None, "fp8"), 0),
    ],
)
def test_ladders(effective, sample, key, incumbent, values, start) -> None:
    space = Space(effective, sample)
    knob = next(kb for kb in space.knobs if kb.key == key)
    ladder = space.ladder(knob, incumbent)
    assert (ladder.values, ladder.start) == (values, start)


def test_gpu_drafts_are_the_cpu_drafts_on_vllms_gpu_proposer() -> None:
    # Same draft and lookup sizes; only the proposer differs (ngram_gpu keeps async scheduling).
    assert [d["method"] for d in NGRAM_GPU_DRAFTS] == ["ngram_gpu"] * len(NGRAM_DRAFTS)
    assert [{**d, "method": "ngram"} for d in NGRAM_GPU_DRAFTS] == list(NGRAM_DRAFTS)


@pytest.mark.parametrize(
    ("effective", "key", "why"),
    [
        (CPU, "gpu_memory_utilization", "GPU only (this engine runs on the CPU)"),
        ({**GPU, "max_cudagraph_capture_size": None}, "max_cudagraph_capture_size",
         "CUDA graphs are off (--enforce-eager)"),
        (GPU, "max_cudagraph_capture_size", "graphs already cover max_num_seqs 512 (capture size 512)"),
        ({**CPU, "speculative_config": "ngram"}, "speculative_config",
         "the job sets its own speculative_config"),
    ],
)  # fmt: skip
def test_settings_not_searched_say_why(effective, key, why) -> None:
    space = Space(effective, 4096)
    knob = next(kb for kb in space.knobs if kb.key == key)
    incumbent = {"max_num_seqs": 512} if key == "max_cudagraph_capture_size" else {}
    assert space.ladder(knob, incumbent) == why


def test_chunked_prefill_off_takes_a_whole_prompt_per_step() -> None:
    space = Space({**CPU, "max_model_len": 8192}, 128)
    knob = next(kb for kb in space.knobs if kb.key == "enable_chunked_prefill")
    assert space.candidate(knob, False, {"max_num_seqs": 64}) == {
        "max_num_seqs": 64,
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": 8192,
    }
    assert space.problem({"max_num_seqs": 64, "max_num_batched_tokens": 32}) == (
        "max_num_batched_tokens 32 is below max_num_seqs 64"
    )
    assert space.problem({"enable_chunked_prefill": False}) == (
        "without chunked prefill max_num_batched_tokens 4096 must hold max_model_len 8192"
    )


def test_settings_apply_as_flags_and_engine_args_and_strip_back_to_defaults() -> None:
    job = EngineConfig(
        max_num_seqs=128,
        engine_args=(("load_format", "dummy"), ("max_num_batched_tokens", 2048)),
    )
    tuned = apply_settings(
        job, {"max_num_seqs": 64, "max_num_batched_tokens": 8192, "speculative_config": K2}
    )
    assert tuned.max_num_seqs == 64
    assert tuned.engine_args == (
        ("load_format", "dummy"),
        ("max_num_batched_tokens", 8192),
        ("speculative_config", K2),
    )
    raw = baseline_engine(tuned)
    assert raw.max_num_seqs is None and raw.engine_args == (("load_format", "dummy"),)
    with pytest.raises(ConfigError) as exc:
        baseline_engine(raw)
    assert str(exc.value).startswith(
        "--raw-defaults: the engine flags set none of the settings batchgen tune searches "
        "(speculative_config, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill, "
        "enable_prefix_caching, gpu_memory_utilization, max_cudagraph_capture_size, "
        "quantization)"
    )


# --- the job config it writes --------------------------------------------------------------

JOB_KEYS = {
    "parquet": "in.parquet",
    "prompt-column": "prompt",
    "chat": True,
    "system-prompt": 'Say "hi"\\ then\n\ttab, caf\u00e9, del\x7f.',
    "stop": ["END", "\u00bb"],
    "temperature": 0.0,
    "max-tokens": 64,
    "max-num-seqs": 256,
    "engine-arg": ["load_format=dummy", "max_num_batched_tokens=2048"],
    "engine": "fake",
    "output": "out/job",
}
WINNER = {
    "max_num_seqs": 64,
    "max_num_batched_tokens": 8192,
    "enable_chunked_prefill": False,
    "speculative_config": K2,
}


def test_the_config_is_toml_with_the_job_keys_and_the_winner_in_place() -> None:
    text = job_config_toml(JOB_KEYS, WINNER, ["written by a test", "", "second line"])
    assert text.startswith("# written by a test\n#\n# second line\n\n")
    assert tomllib.loads(text) == {
        **JOB_KEYS,
        "max-num-seqs": 64,
        "engine-arg": [
            "load_format=dummy",
            "max_num_batched_tokens=8192",
            "enable_chunked_prefill=false",
            'speculative_config={"method": "ngram", "num_speculative_tokens": 2, '
            '"prompt_lookup_max": 3, "prompt_lookup_min": 2}',
        ],
    }


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list:
    """The RunConfig `batchgen run` builds, with the runner replaced by a recorder."""
    import pipeline.runner

    configs: list = []

    def record(cfg: Any) -> Any:
        configs.append(cfg)
        return pipeline.runner.RunResult("finished", cfg.output_dir)

    monkeypatch.setattr(pipeline.runner, "run", record)
    return configs


def test_run_reads_the_written_config_back_to_the_tuned_engine(tmp_path: Path, captured) -> None:
    path = tmp_path / "tuned.toml"
    path.write_text(job_config_toml(JOB_KEYS, WINNER, ["header"]))
    run_cli("run", "--config", path)
    (cfg,) = captured
    assert cfg.engine.max_num_seqs == 64
    assert cfg.engine.engine_args == (
        ("load_format", "dummy"),
        ("max_num_batched_tokens", 8192),
        ("enable_chunked_prefill", False),
        ("speculative_config", K2),
    )
    assert cfg.engine.backend == "fake"
    assert cfg.prompt.system_prompt == JOB_KEYS["system-prompt"]
    assert cfg.sampling.get("stop") == ("END", "\u00bb")
    assert cfg.output.path == "out/job"


def test_a_written_config_runs(tmp_path: Path) -> None:
    """With the fake engine, which ignores engine args, the run itself goes through."""
    src = write_prompts(tmp_path / "in.parquet", ["one", "two", "three"])
    keys = {**JOB_KEYS, "parquet": str(src), "output": str(tmp_path / "out")}
    del keys["engine-arg"], keys["system-prompt"], keys["chat"]
    path = tmp_path / "tuned.toml"
    path.write_text(job_config_toml(keys, WINNER, ["header"]))
    run_cli("run", "--config", path)
    assert read_output(tmp_path / "out").num_rows == 3


# --- the CLI, fake engine ------------------------------------------------------------------


def test_tune_on_the_fake_engine_writes_a_config_run_accepts(tmp_path: Path) -> None:
    """--config job.toml: its keys (output, rows-per-shard) survive into the written config;
    --json holds every trial; the config runs as it is."""
    job = tmp_path / "job.toml"
    job.write_text(
        f'parquet = "{SAMPLE}"\nprompt-column = "prompt"\nchat = true\nmax-tokens = 8\n'
        f'engine = "fake"\nid-column = "id"\noutput = "{tmp_path / "out"}"\nrows-per-shard = 5\n'
    )
    written = tmp_path / "tuned.toml"
    result = run_cli(
        "tune",
        "--config",
        job,
        "--sample",
        "8",
        "--repeats",
        "2",
        "--try",
        "max_num_seqs=4",
        "--write-config",
        written,
        "--json",
    )
    report = json.loads(result.stdout)
    assert [t["settings"] for t in report["trials"]] == [{}, {"max_num_seqs": 4}]
    assert len(report["trials"][0]["output_tok_s"]) == 2
    assert report["trials"][0]["gain"] == 1.0 and report["trials"][0]["verdict"].startswith(
        "baseline"
    )
    assert report["sample"]["rows"] == 8 and report["sample"]["output_tokens_per_pass"] == 64
    assert report["winner"]["rows_differ"] == 0  # the fake's texts do not depend on settings
    assert report["config_written"] == str(written)
    winner = report["trials"][report["winner"]["trial"]]
    assert winner["chosen"] and report["gain"] == winner["gain"]
    config = tomllib.loads(written.read_text())
    expected = {
        "parquet": str(SAMPLE),
        "prompt-column": "prompt",
        "chat": True,
        "max-tokens": 8,
        "engine": "fake",
        "id-column": "id",
        "output": str(tmp_path / "out"),
        "rows-per-shard": 5,
    }
    if winner["settings"]:
        expected["max-num-seqs"] = 4
    assert config == expected
    run_cli("run", "--config", written)
    assert read_output(tmp_path / "out").num_rows == 48


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--try", "max_num_sequences=8"],
            "--try max_num_sequences=...: not a setting batchgen tune searches; those are: "
            "speculative_config, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill, "
            "enable_prefix_caching, gpu_memory_utilization, max_cudagraph_capture_size, "
            "replicas_per_gpu, quantization",
        ),
        (["--try", "max_num_seqs"], "Invalid value for --try: 'max_num_seqs': expected "
         "KEY=VALUE, e.g. --try max_num_seqs=64"),
        (["--sample", "0"], "--sample 0: must be at least 1"),
        (["--verify", "-1"], "Invalid value for '--verify': -1 is not in the range x>=0."),
        (["--repeats", "0"], "--repeats 0: must be at least 1"),
        (["--min-gain", "1.5"], "--min-gain 1.5: must be a share in [0, 1), e.g. 0.03"),
    ],
)  # fmt: skip
def test_bad_tune_flags_are_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_cli("tune", *run_args(SAMPLE, "x", *FAKE_ENGINE)[1:-2], *args, expect=2)
    assert result.output.endswith(f"\nError: {message}\n"), result.output


def test_bench_raw_defaults_needs_tuned_settings() -> None:
    result = run_cli("bench", "--raw-defaults", expect=2)
    assert "\nError: --raw-defaults: the engine flags set none of the settings" in result.output
    result = run_cli("bench", "--memory", "--raw-defaults", expect=2)
    assert result.output.endswith(
        "\nError: --raw-defaults: only for the throughput bench; drop --memory\n"
    )


# --- the fingerprint -----------------------------------------------------------------------


def test_speculative_decoding_is_part_of_the_fingerprint_batch_limits_are_not(
    tmp_path: Path,
) -> None:
    src = write_prompts(tmp_path / "in.parquet", [f"prompt {i}" for i in range(10)])
    out = tmp_path / "out"
    spec = "speculative_config=" + json.dumps(K2)
    run_cli(*run_args(src, out, *FAKE_ENGINE))
    # Batch limits only change speed: the finished run is found complete.
    result = run_cli(*run_args(src, out, *FAKE_ENGINE, "--engine-arg", "max_num_seqs=8"))
    assert "already complete" in result.output
    result = run_cli(*run_args(src, out, *FAKE_ENGINE, "--engine-arg", spec), expect=1)
    assert "speculative_config.num_speculative_tokens: (not set) -> 2" in result.output


# --- the real engine -------------------------------------------------------------------------


@pytest.mark.engine
def test_tune_on_the_real_engine_writes_a_config_run_accepts(tmp_path: Path) -> None:
    """16 prompts, 16 tokens: the baseline and max_num_seqs=8, two timed passes each. Whatever
    wins, the config holds it and `batchgen run --config` runs it (here on two rows)."""
    src = write_prompts(
        tmp_path / "in.parquet", [f"Name one fact about the number {i}." for i in range(16)]
    )
    written = tmp_path / "tuned.toml"
    args = run_args(src, tmp_path / "out", "--chat", "--temperature", "0", *REAL_ENGINE)
    result = run_cli(
        "tune",
        *args[1:],
        "--max-tokens",
        "16",
        "--sample",
        "16",
        "--repeats",
        "2",
        "--try",
        "max_num_seqs=8",
        "--budget-seconds",
        "300",
        "--write-config",
        written,
        "--json",
    )
    report = json.loads(result.stdout)
    baseline, trial = report["trials"]
    assert trial["settings"] == {"max_num_seqs": 8}
    assert trial["engine_start_s"] > 0  # (the baseline may find this session's engine running)
    assert report["baseline"]["effective"]["max_num_seqs"] == 256
    assert trial["rows_differ"] == 0  # float32, greedy: batch size does not change texts
    assert report["winner"]["outputs_equal"] is True
    assert report["dtype"] == "float32" and report["sample"]["greedy"] is True
    for t in (baseline, trial):
        # (the median of the unrounded passes, rounded: within 0.1 of the rounded passes' median)
        assert t["median_output_tok_s"] == pytest.approx(
            statistics.median(t["output_tok_s"]), abs=0.1
        )
    config = tomllib.loads(written.read_text())
    assert config.get("max-num-seqs") == (8 if trial["chosen"] else None)
    two = write_prompts(tmp_path / "two.parquet", ["Say hello.", "Say goodbye."])
    run_cli("run", "--config", written, "--parquet", two, "--output", tmp_path / "run")
    table = read_output(tmp_path / "run")
    assert table.num_rows == 2 and table.column("error").null_count == 2


def test_verify_runs_the_whole_job_as_baseline_and_winner_and_scores_the_trials() -> None:
    """--verify 2 on the fake engine: the default sample takes every row of this 48-row input
    (4 x max_num_seqs is more), then two alternating rounds of the whole job, each side in a
    warm worker process; each trial's figure is set against its side's whole run."""
    args = run_args(SAMPLE, "x", *FAKE_ENGINE, "--max-tokens", "8")[1:-2]
    result = run_cli("tune", *args, "--repeats", "1", "--try", "max_num_seqs=4", "--verify", "2",
                     "--json")  # fmt: skip
    report = json.loads(result.stdout)
    assert report["sample"]["rows"] == 48
    v = report["verify"]
    assert v["rounds"] == 2 and v["ratio"]["rounds"] == 2
    for name in ("baseline", "winner"):
        side = v["sides"][name]
        assert side["rows"] == 48 and side["output_tokens_median"] == 48 * 8
        assert side["run_output_tok_s"]["median"] > 0
        trial = report["trials"][0 if name == "baseline" else report["winner"]["trial"]]
        expected = trial["median_output_tok_s"] / side["run_output_tok_s"]["median"] - 1
        # From the report's rounded figures: relative, since on the fake engine a trial (no
        # reading, no writing) can run hundreds of times faster than its whole run.
        assert side["trial_error"] == pytest.approx(expected, rel=1e-3, abs=0.01)
        assert side["trial_predicts_run"] == (abs(side["trial_error"]) <= 0.10)
    # What `batchgen tune` prints for this report (its --json-less output is format_tune's):
    # read from this run's report rather than a second tune with its own warm workers.
    text = format_tune(report)
    assert "\nverify: the whole job, 2 alternating round(s) on warm engines\n" in text
    assert "winner / baseline on the whole job: " in text
    same = report["winner"]["trial"] == 0
    assert v["same_settings"] is same
    assert ("both sides ran the same settings" in text) is same


def test_a_stop_during_verify_prints_the_search_and_leaves_no_worker() -> None:
    """SIGTERM to a tune in its --verify rounds (as `timeout` or a scheduler sends it): the
    search's result is printed with the rounds that ended and a line saying the verify was
    stopped, it exits 75, and its warm worker processes are gone (one was left running with its
    engine, 20 minutes on, when the tune process itself died of the signal)."""
    args = run_args(SAMPLE, "x", *FAKE_ENGINE, "--max-tokens", "8")[1:-2]
    cmd = [str(BATCHGEN), "tune", *args, "--repeats", "1", "--try", "max_num_seqs=4",
           "--verify", "500"]  # fmt: skip
    with Group(cmd) as tune:
        tune.signal_at("round 1/500", 120)
        code, out, err = tune.finish(120)
        assert code == 75, err
        done = int(re.search(r"stopped it after (\d+) of 500 round\(s\)", err).group(1))
        assert done >= 1 and "Traceback" not in err
        assert "\nwinner: " in out
        assert f"\nverify: the whole job, {done} alternating round(s) on warm engines\n" in out
        assert f"verify: stopped by SIGTERM after {done} round(s), before its rounds ended" in out
        # the workers, stopped mid-pass, exit on their own
        tune.wait_gone(30, "a worker of the tune outlived it")


def test_a_stop_during_the_search_exits_75_in_one_line() -> None:
    """SIGTERM while a trial runs (fake engine steps slowed by the tests' hook): one line saying
    the search was stopped and nothing was written, exit 75, no traceback."""
    args = run_args(SAMPLE, "x", *FAKE_ENGINE, "--max-tokens", "8")[1:-2]
    cmd = [str(HOOKED_BATCHGEN), "tune", *args, "--try", "max_num_seqs=4"]
    with Group(cmd, env={**os.environ, STEP_ENV: "0.5"}) as tune:
        tune.signal_at("trial 0: the job's settings", 60)
        code, out, err = tune.finish(60)
        assert code == 75, err
        assert "SIGTERM received during the search: stopped; nothing written" in err
        assert "Traceback" not in err and out == ""


def test_replicas_are_a_run_flag_not_an_engine_arg() -> None:
    engine = EngineConfig(engine_args=(("max_num_batched_tokens", 8192),))
    settings = {"replicas_per_gpu": 2, "max_num_seqs": 512}
    assert apply_settings(engine, settings) == EngineConfig(
        max_num_seqs=512, engine_args=(("max_num_batched_tokens", 8192),)
    )
    assert Space(GPU, 4096).candidate(KNOB_BY_KEY["replicas_per_gpu"], 1, settings) == {
        "max_num_seqs": 512
    }  # one replica is the job's own setting: left out
    toml = job_config_toml({"parquet": "p"}, settings, ["h"])
    assert toml == '# h\n\nparquet = "p"\nmax-num-seqs = 512\nreplicas-per-gpu = 2\n'


def test_a_budget_stop_says_what_budget_fits_the_rest_and_why_the_first_start_was_long() -> None:
    """The report of a GPU tune (H100, docs/bench) that the budget stopped after its baseline,
    whose trial took 356 s with a 214 s first engine start: the line names the budget that
    fits the setting not tried (370 + 356 s, rounded up to a minute) and the compile cost of
    a host's first start."""
    report = json.loads(
        (
            Path(__file__).parents[1] / "docs/bench/h100-smollm2-4096-tune-verify-5-rounds.json"
        ).read_text()
    )
    text = format_tune(report)
    assert (
        "\nstopped by --budget-seconds 600 after 370 s; the settings listed as not tried were "
        "not measured\n  each trial took up to 356 s here (its engine start 214 s): "
        "--budget-seconds 780 would fit the 1 not tried\n  an engine's first start on a host "
        "compiles the model;"
    ) in text
    report["machine"]["gpu"] = None
    assert "first start on a host" not in format_tune(report)
    report["verify"]["same_settings"] = (
        True  # (the report predates the key; its winner was trial 0)
    )
    assert text.count("both sides ran the same settings") == 0
    assert (
        "\n  (the winner is the baseline: both sides ran the same settings, so this spread is "
        "the noise of the measurement here)" in format_tune(report)
    )


def test_verify_runs_a_replicas_winner_with_its_replicas() -> None:
    """--verify's winner side runs as many engines as the winning trial had replicas (a run
    flag that apply_settings leaves out of the engine config), the baseline one."""
    from pipeline.tune.verify import verify_sides

    engine = EngineConfig(engine_args=(("max_num_batched_tokens", 8192),))
    baseline, winner = verify_sides(engine, {"replicas_per_gpu": 3, "max_num_seqs": 512})
    assert (baseline.replicas, baseline.engine) == (1, engine)
    assert winner.replicas == 3
    assert winner.engine == EngineConfig(
        max_num_seqs=512, engine_args=(("max_num_batched_tokens", 8192),)
    )
    assert verify_sides(engine, {})[1].replicas == 1


def fake_run_config(tmp_path: Path) -> Any:
    """The run config of the sample on the fake engine, one rank: what the tuner's trials and
    the warm workers take."""
    from pipeline.cli.flags import run_config
    from pipeline.cli.run import run

    ctx = run.make_context("run", run_args(SAMPLE, tmp_path / "o", *FAKE_ENGINE)[1:])
    return run_config(dict(ctx.params, num_ranks=1, rank=0))


@pytest.fixture
def start_order(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The order in which warm workers are spawned and report their engine ready."""
    from pipeline.bench import warm

    events: list[str] = []

    class Recorded(warm._Worker):
        def __init__(self, side: Any, rank: int, *args: Any) -> None:
            super().__init__(side, rank, *args)
            events.append(f"spawn {rank}")

        def answer(self, timeout: float) -> tuple:
            reply = super().answer(timeout)
            if reply[0] == "ready":
                events.append(f"ready {self.rank}")
            return reply

    monkeypatch.setattr(warm, "_Worker", Recorded)
    return events


def test_a_replica_trial_deals_the_sample_out_and_answers_every_row(
    tmp_path: Path, start_order: list[str]
) -> None:
    """Two replicas (worker processes, fake engine): each engine gets as many rows as the
    one-engine trial (the input's first 2 x 20, so each is as full as in a long run), the
    texts compared being the sample's, as one engine gives them; timed over the passes. Its
    engines start at once: the baseline trial already compiled the model on this host (on an
    H100 a replica trial's two engines took 92 s each, 187 s one after the other)."""
    from pipeline.job import read_job
    from pipeline.tune.tuner import TrialRunner, TuneConfig

    cfg = TuneConfig(run=fake_run_config(tmp_path), sample=20, repeats=2)
    trials = TrialRunner(cfg, read_job(cfg.run))
    one = trials.measure({}, None)
    two = trials.measure({"replicas_per_gpu": 2}, None)
    assert two.error is None, two.error
    assert len(two.tok_s) == 2 and two.tunables == {"replicas_per_gpu": 2}
    assert two.texts == one.texts and len(two.texts) == 20
    assert two.output_tokens > 1.5 * one.output_tokens  # 40 rows' tokens, not 20's
    assert start_order == ["spawn 0", "spawn 1", "ready 0", "ready 1"]


@pytest.mark.parametrize(
    ("first_alone", "order"),
    [(True, ["spawn 0", "ready 0", "spawn 1", "ready 1"]),
     (False, ["spawn 0", "spawn 1", "ready 0", "ready 1"])],
)  # fmt: skip
def test_warm_engines_start_the_first_alone_unless_the_host_compiled_the_model(
    tmp_path: Path, start_order: list[str], first_alone: bool, order: list[str]
) -> None:
    """A bench on a fresh host starts its first engine alone (it compiles the model; the rest
    reuse its cache), then the others at once; a tune's later trials and --verify start all."""
    from pipeline.bench.warm import Side, WarmSides

    cfg = fake_run_config(tmp_path)
    sides = [Side("trial", "trial", cfg.engine, 2, sample=8)]
    with WarmSides(sides, cfg, tmp_path / "w", parallel=True, first_alone=first_alone) as warm:
        warm.start()
    assert start_order == order


def test_fp8_is_tried_on_a_gpu_only_where_the_job_has_no_quantization_and_raw_defaults_drop_it() -> (
    None
):
    knob = KNOB_BY_KEY["quantization"]
    assert knob.changes_outputs  # so a greedy tune keeps it only with --allow-output-changes
    assert Space(CPU, 4096).ladder(knob, {}) == "GPU only (this engine runs on the CPU)"
    assert Space({**GPU, "quantization": "fp8"}, 4096).ladder(knob, {}) == (
        "the job sets its own quantization (fp8)"
    )
    fp8 = EngineConfig(engine_args=(("load_format", "dummy"), ("quantization", "fp8")))
    assert baseline_engine(fp8).engine_args == (("load_format", "dummy"),)


def test_a_resume_with_other_quantization_is_refused_naming_it(tmp_path: Path) -> None:
    """FP8 changes the texts, so a run that began with it cannot end without it (fake engine:
    the fingerprint is the run's, whatever the engine does with the setting)."""
    path = write_prompts(tmp_path / "in.parquet", ["a", "b"])
    out = tmp_path / "out"
    fp8 = ("--engine-arg", "quantization=fp8")
    run_cli(*run_args(path, out, *FAKE_ENGINE, *fp8))
    result = run_cli(*run_args(path, out, *FAKE_ENGINE), expect=1)
    assert "\n  quantization: fp8 -> (not set)\n" in result.output, result.output
