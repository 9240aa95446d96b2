"""`--replicas-per-gpu N`: each rank's GPU, memory share and KV cache size, computed (no GPU
needed: the GPU's size is given or patched), and a fake-engine run of two replicas on one GPU."""

from __future__ import annotations

import re

import pytest
from conftest import FAKE_ENGINE, read_output, run_args, run_cli, write_prompts

from pipeline import replicas
from pipeline.errors import ConfigError
from pipeline.replicas import GIB, replica_memory, replica_placements, weights_bytes
from pipeline.slots import plan_node

H200 = 143771 * (1 << 20)  # nvidia-smi's memory.total on the lent H200


@pytest.mark.parametrize(
    ("engines", "weights", "share", "expected"),
    [
        # 0.45 x 140.4 GiB = 63.2 GiB, less 0.25 GiB of weights and 4 GiB headroom: 58 GiB
        (2, GIB // 4, None, (0.45, 58 * GIB)),
        (4, GIB // 4, None, (0.22, 26 * GIB)),
        (3, 15 * GIB, 0.9, (0.3, 23 * GIB)),  # an 8B model, three to a GPU
        (2, 0, 0.5, (0.25, 31 * GIB)),  # the run's own --gpu-memory-utilization, divided
    ],
)
def test_each_replica_gets_its_share_and_a_fixed_kv_cache(engines, weights, share, expected):
    memory = replica_memory(engines, H200, weights, share)
    assert (memory.utilization, memory.kv_cache_bytes) == expected
    assert memory.flags() == [
        f"--gpu-memory-utilization={expected[0]}",
        f"--engine-arg=kv_cache_memory_bytes={expected[1]}",
    ]
    # the user's own KV cache size stays theirs
    assert memory.flags({"kv_cache_memory_bytes": 1}) == [f"--gpu-memory-utilization={expected[0]}"]


def test_a_gpu_of_unknown_size_gets_the_share_only():
    memory = replica_memory(2, None)
    assert memory.flags() == ["--gpu-memory-utilization=0.45"]
    assert memory.describe() == "0.45 of its memory"


def test_too_many_replicas_for_the_model_are_refused_naming_the_need():
    with pytest.raises(ConfigError) as exc:
        replica_memory(8, H200, 15 * GIB)
    assert str(exc.value) == (
        "--replicas-per-gpu 8: each replica's share (0.11 of 140 GiB) does not hold the model "
        "(15.0 GiB), 4 GiB of activations and a KV cache; each needs at least 0.14 of the GPU: "
        "use fewer replicas"
    )


def test_placements_fill_every_gpu_before_doubling_up():
    assert replica_placements(["0", "1"], 1, 2, None) == [("0", 0), ("1", 0), ("0", 1), ("1", 1)]
    assert replica_placements(["0", "1", "2", "3"], 2, 2, 3) == [
        ("0,1", 0),
        ("2,3", 0),
        ("0,1", 1),
    ]
    with pytest.raises(ConfigError, match=r"--data-parallel 5 with --replicas-per-gpu 2: 2 "):
        replica_placements(["0", "1"], 1, 2, 5)
    with pytest.raises(ConfigError, match="no GPU is visible"):
        replica_placements([], 1, 2, None)


def test_weights_from_files_or_from_the_config_of_a_shape_only_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model.safetensors").write_bytes(b"x" * 1000)
    assert weights_bytes(str(tmp_path / "a")) == 1000
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(
        '{"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336, '
        '"vocab_size": 49152, "num_attention_heads": 32, "num_key_value_heads": 8}'
    )
    # llama-8b shape in bf16: 7.38 G parameters (the embeddings and LM head counted apart)
    assert weights_bytes(str(tmp_path / "b")) == 2 * 7_381_975_040
    assert weights_bytes("org/name") == 0


def test_plan_gives_each_rank_its_gpu_and_memory_flags(monkeypatch):
    monkeypatch.setattr(replicas, "gpu_memory_bytes", lambda gpu: H200)
    plan = plan_node(
        "auto",
        None,
        1,
        {"CUDA_VISIBLE_DEVICES": "3"},
        replicas_per_gpu=2,
        run_flags={"gpu_memory_utilization": None, "model": None, "engine_args": ()},
    )
    assert plan.num_ranks == 2
    assert [s.env for s in plan.slots] == [{"CUDA_VISIBLE_DEVICES": "3"}] * 2
    flags = ("--gpu-memory-utilization=0.45", f"--engine-arg=kv_cache_memory_bytes={59 * GIB}")
    assert [s.flags for s in plan.slots] == [flags, flags]
    assert plan.slots[1].where == "GPU 3 (replica 2 of 2: 0.45 of its memory, 59.0 GiB KV cache)"


def test_two_replicas_on_one_gpu_write_every_row_once(tmp_path, monkeypatch):
    """The fake engine on a 'GPU' (CUDA_VISIBLE_DEVICES=0, no nvidia-smi here): two ranks, both
    on GPU 0, each given half of the default share; every row written once."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(replicas, "gpu_memory_bytes", lambda gpu: None)
    src = write_prompts(tmp_path / "rows.parquet", [f"q {i}" for i in range(60)], 8)
    out = tmp_path / "out"
    result = run_cli(
        *run_args(src, out, "--rows-per-shard", "10", *FAKE_ENGINE), "--replicas-per-gpu", "2"
    )
    # The launcher's lines only: a rank's own output can come between them, in any order.
    lines = [
        line for line in result.output.splitlines() if re.search(r"rank \d of 2: pid \d+ ", line)
    ]
    assert len(lines) == 2, result.output
    for i, line in enumerate(lines):
        assert line.endswith(f"on GPU 0 (replica {i + 1} of 2: 0.45 of its memory)"), line
    table = read_output(out)
    assert table.num_rows == 60
