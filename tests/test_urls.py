"""A URL is never taken for a local path: output URLs batchgen cannot write (any but s3:// and
gs://) are refused in one line (exit 2) before anything is created."""

from __future__ import annotations

import os

import pytest
from conftest import FAKE_ENGINE, SAMPLE, run_cli

from pipeline.storage import is_url, url_scheme

REFUSAL = (
    "{flag} {url}: {scheme}:// output is not supported (URL schemes batchgen can write: s3://, "
    "s3a://, gs://); give a local folder (a mounted bucket works), or write locally and upload the "
    "finished folder (docs/object-stores.md)"
)


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


@pytest.mark.parametrize("url", ["hf://datasets/me/out", "az://container/out"])
def test_run_refuses_an_output_url_and_creates_nothing(tmp_path, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    result = run_cli(
        "run", *FAKE_ENGINE, "--parquet", SAMPLE, "--prompt-column", "prompt",
        "--output", url, expect=2,
    )  # fmt: skip
    scheme = url.split(":")[0]
    assert result.output.splitlines()[-1] == "Error: " + REFUSAL.format(
        flag="--output", url=url, scheme=scheme
    )
    assert os.listdir(tmp_path) == []  # no folder named 's3:'


def test_data_parallel_run_refuses_an_output_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli(
        "run", *FAKE_ENGINE, "--parquet", SAMPLE, "--prompt-column", "prompt",
        "--output", "hf://datasets/me/o", "--data-parallel", "2", expect=2,
    )  # fmt: skip
    assert "hf:// output is not supported" in result.output
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", [["status"], ["show"], ["report", "--html", "r.html"]])
def test_readers_refuse_an_output_url(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    result = run_cli(command[0], "hf://datasets/me/out", *command[1:], expect=2)
    assert result.output.splitlines()[-1] == "Error: " + REFUSAL.format(
        flag="OUTPUT", url="hf://datasets/me/out", scheme="hf"
    )
    assert os.listdir(tmp_path) == []
