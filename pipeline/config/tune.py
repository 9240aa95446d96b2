"""The settings of `batchgen tune`, declared once (pipeline.options): the job (a RunConfig, as
`batchgen run` takes it) and how the tuner searches its engine settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config.run import RunConfig
from pipeline.errors import ConfigError
from pipeline.options import key_value_option, option


@dataclass(frozen=True, slots=True)
class TuneConfig:
    """What `batchgen tune` does; `run` is the job, exactly as `batchgen run` would take it."""

    run: RunConfig
    # Rows taken from the start of the input; every pass runs them all. None: SAMPLE_SEQS x
    # the baseline engine's max_num_seqs (at least MIN_SAMPLE), so a pass fills the engine,
    # runs full and drains as a whole job does: with a sample of max_num_seqs rows or fewer
    # every row runs at once, which a job never does, and trials overstated the run (36,769
    # out tok/s on a 1,024-row sample of a job whose whole run makes ~20,000 on an H200).
    sample: int | None = option(
        None,
        "Rows from the start of the input timed in every trial [default: 4 x the engine's "
        "max_num_seqs, at least 256, so each pass fills the engine and drains as the job does].",
    )
    repeats: int = option(3, "Timed passes per trial, after one untimed warm-up pass.")
    # Wall time for the whole tune, engine starts included; the baseline always runs.
    budget_seconds: float = option(
        1800.0, "Start no trial that would end later (engine starts count; 0: no limit)."
    )
    # A setting must beat the incumbent's median by this share (and beyond both trials'
    # spread) to replace it: the margin against a noisy machine.
    min_gain: float = option(
        0.03, "Share by which a setting must beat the best so far (and beyond the passes' spread)."
    )
    # --try KEY=VALUE: only these values are tried
    tries: tuple[tuple[str, Any], ...] = key_value_option(
        "Try only these values (repeatable; JSON values), e.g. max_num_seqs=64.",
        "--try",
        "max_num_seqs=64",
    )
    allow_output_changes: bool = option(
        False, "Accept a faster setting whose texts on the sample differ from the baseline's."
    )
    # After the search: this many alternating rounds of the whole job with the baseline's and
    # the winner's settings (pipeline/tune/verify.py), each on a warm engine; 0: none.
    verify_rounds: int = option(
        0,
        "Then run the whole job with the baseline's and the winner's settings, alternating "
        "this many rounds on warm engines, and report both and each trial's error (0: skip).",
        flag="--verify",
        metavar="ROUNDS",
        minimum=0,
    )

    def __post_init__(self) -> None:
        if self.sample is not None and self.sample < 1:
            raise ConfigError(f"--sample {self.sample}: must be at least 1")
        if self.repeats < 1:
            raise ConfigError(f"--repeats {self.repeats}: must be at least 1")
        if self.budget_seconds < 0:
            raise ConfigError("--budget-seconds must be 0 (no limit) or more")
        if not 0 <= self.min_gain < 1:
            raise ConfigError(f"--min-gain {self.min_gain}: must be a share in [0, 1), e.g. 0.03")
        if self.verify_rounds < 0:
            raise ConfigError(f"--verify {self.verify_rounds}: rounds, 0 (none) or more")
        from pipeline.tune.space import check_tries  # the tuner owns what it searches

        check_tries(self.tries)
