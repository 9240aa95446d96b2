"""Shared fixtures. The real engine is started once per test session (pipeline.engine caches it
by its settings), so every engine test passes the same REAL_ENGINE flags."""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hooks import PAUSE_ENV, STEP_ENV

from pipeline.cli import main
from pipeline.ranks import LAUNCHER_VARIABLES

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "prompts.parquet"
BATCHGEN = Path(sys.executable).with_name("batchgen")


# Tests that must not run beside each other. The real engine takes both cores, and timing
# tests compare its speed within one test: under `make test` (pytest-xdist, --dist loadgroup)
# the `engine` tests run one after another on one worker (the serial group), the real-engine
# Slurm test among them. The Slurm cluster has two CPUs for its tasks, so the other Slurm tests
# (fake engine, light) run one after another as a group of their own. The object-store files
# share one S3 server and one GCS emulator (session fixtures, their ports picked at start,
# restarted on the same ports by some tests), and the FTP file starts a server of its own, so
# they run one after another too, as a group of their own. xdist hands out the largest groups
# first: the serial one to one worker, the object stores to the other, which then takes the
# Slurm group and the rest, while the serial worker, the longer one, runs only engine tests.
# (The Slurm group ran on the serial worker until 2026-12-07: 1,607 s of tests there against
# 1,123 s on the other; its 103 s now run on the other.)
S3_FILES = (
    "test_fsspec_output.py",
    "test_objstore_input.py",
    "test_objstore_output.py",
    "test_storage.py",
)


# tryfirst: pytest-xdist's worker reads the groups in a hook of its own (it appends the group to
# each test's id, which is what --dist loadgroup deals out by), and a plugin registered after
# this file runs first; without tryfirst the groups were added after it had looked, so the
# engine and Slurm tests were spread over both workers, beside each other.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("engine"):
            item.add_marker(pytest.mark.xdist_group("serial"))
        elif item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif item.path.name in S3_FILES:
            item.add_marker(pytest.mark.xdist_group("s3"))
    # A process keeps one vLLM engine: a test whose in-process engine has other settings than
    # REAL_ENGINE's replaces the session's, and the next test on REAL_ENGINE starts it again
    # (20-40 s on a 2-core CI machine). Those tests run last, after every test that shares the
    # session's engine, so that each replacement costs no second start of it. A stable sort:
    # the order is otherwise the collection's, the same on every xdist worker.
    items.sort(key=lambda item: item.get_closest_marker("other_engine") is not None)


def _hooked_launcher() -> Path:
    """An executable `batchgen` with the tests' fault hooks (tests/hooks.py) installed: what the
    subprocess tests run when they slow the fake engine or pause a commit to kill it there."""
    path = Path(tempfile.mkdtemp(prefix="batchgen-hooked-")) / "batchgen"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{REPO / "tests" / "hooks.py"}" "$@"\n')
    path.chmod(0o755)
    return path


HOOKED_BATCHGEN = _hooked_launcher()
# float32 so the fidelity test can compare with Transformers' own float32 generate exactly.
REAL_ENGINE = ["--dtype", "float32", "--max-model-len", "512"]
FAKE_ENGINE = ["--engine", "fake"]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
# vLLM's engine processes talk over Unix sockets under this folder (default: $TMPDIR), and a
# socket path over 107 characters fails the engine's start. pytest-xdist's temporary paths are
# longer than plain pytest's, and a test that points TMPDIR at its tmp_path pushed it over: a
# short folder of the session's own, inherited by every engine the tests start.
if "VLLM_RPC_BASE_PATH" not in os.environ:
    os.environ["VLLM_RPC_BASE_PATH"] = tempfile.mkdtemp(prefix="vllm-", dir="/tmp")
    atexit.register(shutil.rmtree, os.environ["VLLM_RPC_BASE_PATH"], ignore_errors=True)


def run_cli(*args: str | Path, expect: int | None = 0):
    """Invoke `batchgen` in-process; assert the exit code unless `expect` is None."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, result.output
    return result


def run_subprocess(*args: str | Path, timeout: float = 600, env: dict | None = None):
    """Run the installed `batchgen` console script as a user would."""
    return subprocess.run(
        [str(BATCHGEN), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def shard_files(out: Path) -> list[Path]:
    """The committed Parquet shards under an output folder, every rank's."""
    return sorted(out.glob("rank-*/part-*.parquet"))


def run_cli_signalled(args: list, out: Path, signals: list[signal.Signals]):
    """Run batchgen in this process (on the engine the tests share, no engine start) and, once
    it commits a shard under `out`, send this process `signals` 0.1 s apart, as a terminal or a
    scheduler would: batchgen's handlers own the stop signals for the whole run, so every one
    lands in them while the run drains. Around the run, handlers of this helper's own stand in
    for pytest's: batchgen restores them at its end, so a signal that came after it (none
    should) is caught and fails here instead of stopping the test session. Returns the
    CliRunner result (exit code not checked)."""
    before = len(shard_files(out))
    done = threading.Event()
    late: list[int] = []

    def send() -> None:
        while len(shard_files(out)) <= before and not done.wait(0.05):
            pass
        for sig in signals:
            if not done.is_set():
                os.kill(os.getpid(), sig)
                time.sleep(0.1)

    previous = {sig: signal.signal(sig, lambda n, _f: late.append(n)) for sig in set(signals)}
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        result = run_cli(*args, expect=None)
    finally:
        done.set()
        sender.join(timeout=10)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert not late, f"signals {late} came after batchgen's run had ended"
    return result


def read_output(out: Path) -> pa.Table:
    """The whole output folder as one table, the way pyarrow/pandas readers see it."""
    return pads.dataset(str(out), format="parquet").to_table()


def manifest_state(out: Path, rank: int = 0) -> dict:
    """A rank's manifest as batchgen reads it (newest generation plus commit records), as JSON."""
    from dataclasses import asdict

    from pipeline.checkpoint import Manifest

    data = asdict(Manifest.load(out, rank))
    del data["generation"]
    return data


def save_manifest_state(out: Path, data: dict, rank: int = 0) -> None:
    """Replace a rank's manifest by `data`: one new generation, no commit records (what a test
    that edits the state by hand means)."""
    from pipeline.checkpoint import manifest_path

    folder = manifest_path(out, rank)
    for p in folder.iterdir():
        if p.name.startswith(("manifest-", "commit-")):
            p.unlink()
    (folder / "manifest-00000099.json").write_text(json.dumps(data))


def write_prompts(
    path: Path, prompts: list[str | None], row_group_size: int | None = None, **extra: list
) -> Path:
    """A Parquet file with a "prompt" column and the `extra` columns."""
    pq.write_table(pa.table({"prompt": prompts, **extra}), path, row_group_size=row_group_size)
    return path


def run_args(src: str | Path, out: str | Path, *extra: str, max_tokens: int = 8) -> list[str]:
    """`batchgen run` on the "prompt" column of the Parquet file `src`, plus `extra`, into `out`."""
    return [
        "run",
        "--parquet",
        str(src),
        "--prompt-column",
        "prompt",
        "--max-tokens",
        str(max_tokens),
        *extra,
        "--output",
        str(out),
    ]


def hold_rank_lock(out: Path, rank: int) -> subprocess.Popen:
    """Another process holding rank `rank`'s lock of `out` (as a live run does) until killed."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from pathlib import Path; from pipeline.checkpoint import RankLock; "
            f"lock = RankLock(Path({str(out)!r}), {rank}).acquire(); "
            "print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


class Group:
    """A command in a process group of its own (as a terminal or a scheduler starts a job), its
    output in text pipes; `with Group(cmd) as g:` kills whatever of the group is left at the end."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=env,
        )
        self.seen: list[str] = []  # stderr lines read before a signal
        self.rest = ""  # and the start of the next one

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.communicate()

    def alive(self) -> bool:
        """Whether any process of the group (the command, its workers, their engines) lives."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def signal_at(self, text: str, seconds: float, sig: int = signal.SIGTERM) -> None:
        """Read stderr until a line holds `text` (the command still running), then send `sig`.
        Fails after `seconds` even if the command goes silent without exiting."""
        deadline = time.monotonic() + seconds
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()  # read raw: the text wrapper's readline would block
        while not any(text in line for line in self.seen):
            left = deadline - time.monotonic()
            assert left > 0 and self.proc.poll() is None, "".join(self.seen) + self.rest
            if not select.select([fd], [], [], min(left, 0.5))[0]:
                continue
            chunk = os.read(fd, 1 << 16).decode(errors="replace")
            if not chunk:  # stderr closed: the command is ending
                time.sleep(0.1)
                continue
            lines = (self.rest + chunk).splitlines(keepends=True)
            self.rest = "" if lines[-1].endswith("\n") else lines.pop()
            self.seen.extend(lines)
        self.proc.send_signal(sig)

    def finish(self, seconds: float) -> tuple[int, str, str]:
        """Exit code, stdout and the whole stderr once the command ends."""
        out, err = self.proc.communicate(timeout=seconds)
        return self.proc.returncode, out, "".join(self.seen) + self.rest + err

    def wait_gone(self, seconds: float, what: str) -> None:
        """Every process of the group ends within `seconds`."""
        deadline = time.monotonic() + seconds
        while self.alive():
            assert time.monotonic() < deadline, what
            time.sleep(0.2)


def greedy_sample_args(out: str | Path) -> list[str]:
    """The bundled sample, greedy chat on the real engine, 4-row shards: the run the resume
    tests interrupt and compare with an uninterrupted one. Four requests in the engine at once
    (--max-inflight, a run setting) keep it slow enough to interrupt; the engine settings are
    REAL_ENGINE's, so in-process runs share the session's engine instead of starting another."""
    return run_args(
        SAMPLE,
        out,
        "--chat",
        "--temperature",
        "0",
        "--rows-per-shard",
        "4",
        "--max-inflight",
        "4",
        *REAL_ENGINE,
        max_tokens=16,
    )


@pytest.fixture(scope="session")
def greedy_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of one uninterrupted greedy_sample_args run (in process, on the
    session's engine): what the interrupted, killed and restarted runs of several tests must
    equal. Built once per session instead of once per test; tests only read it."""
    out = tmp_path_factory.mktemp("greedy-reference") / "out"
    run_cli(*greedy_sample_args(out))
    assert read_output(out).num_rows == 48
    return out


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test run inside a Slurm job (or under torchrun, MPI or a Kubernetes Indexed Job) must
    not pick up that job's rank, nor a kill test's hooks."""
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(PAUSE_ENV, raising=False)
    monkeypatch.delenv(STEP_ENV, raising=False)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def batchgen_log():
    """The lines batchgen logs during the test, taken on its own logger: an in-process CLI run
    earlier in the session may have stopped it propagating to pytest's capture, raised its
    level, or a library may have disabled logging below some level."""
    log = logging.getLogger("batchgen")
    saved = (log.level, log.disabled, logging.root.manager.disable)
    handler = _Lines()
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.disabled = False
    logging.disable(logging.NOTSET)
    yield handler.lines
    log.removeHandler(handler)
    log.setLevel(saved[0])
    log.disabled = saved[1]
    logging.disable(saved[2])


@pytest.fixture
def hf_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network, and a datasets cache inside tmp_path.

    `datasets` parses these variables when first imported, which may have happened already, so
    the parsed values are patched too.
    """
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    """200 short distinct prompts in a 4-row-group Parquet file."""
    prompts = [f"Write one sentence about the number {i}." for i in range(200)]
    topics = [f"t{i % 7}" for i in range(200)]
    return write_prompts(tmp_path / "in.parquet", prompts, row_group_size=50, topic=topics)


# A chat template that opens a thinking block for the answer unless enable_thinking=false, as
# Qwen3-style templates do: SmolLM2's own template plus "<think>\n" after the assistant header.
THINK_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is not defined or enable_thinking %}{{ '<think>\\n' }}{% endif %}"
    "{% endif %}"
)


def make_think_model(folder: Path) -> Path:
    """The bundled model with two unused special tokens renamed to <think> and </think> and
    THINK_TEMPLATE as its chat template: a fixture for reasoning parsers, not a model that
    was trained to think (it proves the plumbing: markers, columns, counts, budgets)."""
    import json
    import shutil

    from pipeline.models import ensure_bundled_model

    source = ensure_bundled_model()
    folder.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name == "model.safetensors":
            (folder / item.name).symlink_to(item)
        elif item.is_file():
            shutil.copy(item, folder / item.name)
    renames = {"<jupyter_text>": "<think>", "<jupyter_code>": "</think>"}
    tok = json.loads((folder / "tokenizer.json").read_text())
    for token in tok["added_tokens"]:
        token["content"] = renames.get(token["content"], token["content"])
    vocab = tok["model"]["vocab"]
    for old, new in renames.items():
        vocab[new] = vocab.pop(old)
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "chat_template.jinja").write_text(THINK_TEMPLATE)
    return folder


def make_adapter(
    folder: Path,
    rank: int = 8,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    zero_b: bool = False,
    seed: int = 0,
    scale: float = 0.5,
) -> Path:
    """A PEFT LoRA adapter for the bundled model (30 layers, hidden 576, 3 KV heads of 64),
    written directly as safetensors: B = 0 leaves the base model's outputs unchanged."""
    import json

    import torch
    from safetensors.torch import save_file

    out_features = {"q_proj": 576, "k_proj": 192, "v_proj": 192, "o_proj": 576}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(30):
        for module in targets:
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, 576, generator=gen) * 0.02
            b = torch.zeros if zero_b else lambda *s, **_: torch.randn(*s, generator=gen) * scale
            tensors[f"{key}.lora_B.weight"] = b(out_features[module], rank)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors")
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(targets),
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder
