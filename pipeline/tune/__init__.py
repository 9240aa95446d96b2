"""`batchgen tune`: find the engine settings that run a job fastest on this machine, on a
sample of the job's own rows, and write them as a job config.

  space.py   the settings searched, the values tried, what each changes besides speed
  search.py  coordinate descent with line searches and repeated passes (no engine: `measure`
             is injected)
  tuner.py   the sample rows (through the run's own prompt path) and one trial on an engine
  report.py  the report, its text form, and the job config it writes
  verify.py  --verify: the whole job with the baseline's and the winner's settings
"""

from pipeline.tune.report import format_tune, job_config_toml, tune_report, write_job_config
from pipeline.tune.space import KNOBS, apply_settings, baseline_engine
from pipeline.tune.tuner import TuneConfig, run_tune
from pipeline.tune.verify import Verify

__all__ = [
    "KNOBS",
    "TuneConfig",
    "Verify",
    "apply_settings",
    "baseline_engine",
    "format_tune",
    "job_config_toml",
    "run_tune",
    "tune_report",
    "write_job_config",
]
