"""A URL is never taken for a local path: output URLs batchgen cannot write are refused in one
line (exit 2) before anything is created: a scheme no installed fsspec implementation knows
(naming the package to install when fsspec's registry knows one), and hf:// (no lease can be
held on the Hub). Writing to an installed fsspec scheme: tests/test_fsspec_output.py."""

from __future__ import annotations

import importlib.util
import os

import pytest
from conftest import FAKE_ENGINE, SAMPLE, run_cli

from pipeline.storage import is_url, url_scheme

REFUSALS = {
    "hf://datasets/me/out": (
        "{flag} hf://datasets/me/out: hf:// output is not supported: the Hub has no conditional "
        "writes and makes every write and delete a commit, so batchgen cannot hold a rank's lease "
        "or write its state there; write locally and publish the finished folder with `hf upload` "
        "(docs/object-stores.md)"
    ),
    "az://container/out": (
        "{flag} az://container/out: az:// needs an fsspec implementation that is not installed; "
        "pip install adlfs, or give a local folder (docs/object-stores.md)"
    ),
    "nosuchfs://host/out": (
        "{flag} nosuchfs://host/out: nosuchfs:// output is not supported (no fsspec "
        "implementation knows it; batchgen writes s3://, s3a://, gs:// and the URLs of installed "
        "fsspec filesystems); give a local folder (a mounted bucket works), or write locally and "
        "upload the finished folder (docs/object-stores.md)"
    ),
    "file:///tmp/out": (
        "{flag} file:///tmp/out: file:// output is not supported: give the local folder itself, "
        "without file:// (docs/object-stores.md)"
    ),
}


@pytest.mark.parametrize(
    ("spec", "scheme"),
    [
        ("s3://bucket/out", "s3"),
        ("GS://bucket/out", "gs"),
        ("hf://datasets/me/x", "hf"),
        ("file:///tmp/x", "file"),
        ("out/s3:", None),
        ("/tmp/a://b", None),
        ("C:/x", None),
    ],
)
def test_url_scheme(spec, scheme):
    assert url_scheme(spec) == scheme
    assert is_url(spec) == (scheme is not None)


@pytest.mark.parametrize("url", list(REFUSALS))
def test_run_refuses_an_output_url_and_creates_nothing(tmp_path, monkeypatch, url):
    if url.startswith("az:") and importlib.util.find_spec("adlfs") is not None:
        pytest.skip("adlfs is installed here: az:// is written, not refused")
    monkeypatch.chdir(tmp_path)
    result = run_cli(
        "run", *FAKE_ENGINE, "--parquet", SAMPLE, "--prompt-column", "prompt",
        "--output", url, expect=2,
    )  # fmt: skip
    assert result.output.splitlines()[-1] == "Error: " + REFUSALS[url].format(flag="--output")
    assert os.listdir(tmp_path) == []  # no folder named 'hf:'


def test_data_parallel_run_refuses_an_output_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli(
        "run", *FAKE_ENGINE, "--parquet", SAMPLE, "--prompt-column", "prompt",
        "--output", "hf://datasets/me/o", "--data-parallel", "2", expect=2,
    )  # fmt: skip
    assert "hf:// output is not supported: the Hub has no conditional writes" in result.output
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", [["status"], ["show"], ["report", "--html", "r.html"]])
@pytest.mark.parametrize("url", ["hf://datasets/me/out", "nosuchfs://host/out"])
def test_readers_refuse_an_output_url(tmp_path, monkeypatch, command, url):
    monkeypatch.chdir(tmp_path)
    result = run_cli(command[0], url, *command[1:], expect=2)
    assert result.output.splitlines()[-1] == "Error: " + REFUSALS[url].format(flag="OUTPUT")
    assert os.listdir(tmp_path) == []
