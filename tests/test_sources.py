"""Input readers: which files --parquet reads, stable row ids, rank slicing, HF datasets."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import SourceConfig
from pipeline.errors import BatchgenError, ConfigError
from pipeline.sources import Source, rank_range
from pipeline.sources.hf import HFDatasetSource
from pipeline.sources.parquet import ParquetSource


def read_rows(
    source: Source, columns: list[str], batch_rows: int = 1000, *span: int | None
) -> list[tuple]:
    """(id, *values) for every row the source yields (of positions [start, stop) with `span`),
    checking the batch shape on the way."""
    rows = []
    for ids, cols in source.iter_batches(columns, batch_rows, *span):
        assert 0 < len(ids) <= batch_rows
        assert list(cols) == columns
        assert all(len(values) == len(ids) for values in cols.values())
        rows += [(row_id, *(cols[c][i] for c in columns)) for i, row_id in enumerate(ids)]
    return rows


def write(path: Path, values: list[Any], row_group_size: int | None = None, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"v": values, **extra}), path, row_group_size=row_group_size)
    return path


# --- which files a --parquet spec reads, and the ids of their rows ---------------------------


def test_single_file_ids_are_file_name_and_row(tmp_path: Path) -> None:
    path = write(tmp_path / "in.parquet", ["a", "b", "c"], row_group_size=2, w=[1, 2, 3])
    source = ParquetSource(str(path))
    assert source.columns == ["v", "w"]
    assert source.total_rows == 3
    assert source.field("w").type == pa.int64()
    assert read_rows(source, ["v", "w"], batch_rows=2) == [
        ("in.parquet:0", "a", 1),
        ("in.parquet:1", "b", 2),
        ("in.parquet:2", "c", 3),
    ]


@pytest.fixture
def data_folder(tmp_path: Path) -> Path:
    """A folder of Parquet files plus the hidden and underscore paths Spark/Hive/batchgen leave.

    It sits under hidden and underscore folders itself: only paths *inside* it may be skipped.
    """
    root = tmp_path / "_runs" / ".v1" / "data"
    write(root / "a.parquet", ["a0", "a1"])
    write(root / "sub" / "b.parquet", ["b0"])
    write(root / "sub" / "deeper" / "c.parquet", ["c0", "c1"])
    write(root / "part-1.parquet", ["p1"])
    write(root / "sub" / "part-2.parquet", ["p2"])
    for skipped in (
        ".hidden.parquet",
        "_tmp.parquet",
        ".batchgen/state.parquet",
        "_staging/x.parquet",
        "sub/_y.parquet",
        "sub/.z.parquet",
    ):
        write(root / skipped, ["SKIPPED"])
    (root / "notes.txt").write_text("not parquet")
    (root / "_SUCCESS").write_text("")
    return root


def test_folder_is_read_recursively_skipping_hidden_and_underscore_paths(data_folder: Path):
    source = ParquetSource(str(data_folder))
    assert source.total_rows == 7
    assert read_rows(source, ["v"]) == [
        ("a.parquet:0", "a0"),
        ("a.parquet:1", "a1"),
        ("part-1.parquet:0", "p1"),
        ("sub/b.parquet:0", "b0"),
        ("sub/deeper/c.parquet:0", "c0"),
        ("sub/deeper/c.parquet:1", "c1"),
        ("sub/part-2.parquet:0", "p2"),
    ]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("part-*.parquet", [("part-1.parquet:0", "p1")]),
        ("**/part-*.parquet", [("part-1.parquet:0", "p1"), ("sub/part-2.parquet:0", "p2")]),
        (
            "sub/*/*.parquet",
            # the root is the path before the first wildcard: here `sub`
            [("deeper/c.parquet:0", "c0"), ("deeper/c.parquet:1", "c1")],
        ),
    ],
)
def test_glob_ids_are_relative_to_the_glob_root(
    data_folder: Path, pattern: str, expected: list[tuple]
) -> None:
    source = ParquetSource(str(data_folder / pattern))
    assert read_rows(source, ["v"]) == expected
    assert source.total_rows == len(expected)


def test_files_with_different_columns_are_refused(tmp_path: Path) -> None:
    first = write(tmp_path / "d" / "a.parquet", [1, 2])
    second = tmp_path / "d" / "b.parquet"
    pq.write_table(pa.table({"prompt": ["x"]}), second)
    with pytest.raises(BatchgenError) as err:
        ParquetSource(str(tmp_path / "d"))
    assert str(err.value) == (
        f"--parquet: {second} has columns ['prompt'] but {first} has ['v']; "
        "give files of one schema"
    )


def test_files_with_different_column_types_are_refused(tmp_path: Path) -> None:
    write(tmp_path / "d" / "a.parquet", [1, 2])
    write(tmp_path / "d" / "b.parquet", ["one", "two"])
    with pytest.raises(BatchgenError) as exc:
        ParquetSource(str(tmp_path / "d"))
    assert str(exc.value) == (
        f"--parquet: column 'v' is string in {tmp_path / 'd' / 'b.parquet'} but int64 in "
        f"{tmp_path / 'd' / 'a.parquet'}; give files of one schema (cast one of them)"
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing.parquet", "--parquet {spec}: no such file or folder"),
        (
            lambda root: root / "missing-dir",
            "--parquet {spec}: no such file or folder",
        ),
        (
            lambda root: (root / "empty").mkdir() or root / "empty",
            "--parquet {spec}: holds no .parquet file; give a .parquet file, a folder or a glob",
        ),
        (
            lambda root: write(root / "only-hidden" / "_x.parquet", [1]).parent,
            "--parquet {spec}: holds no .parquet file; give a .parquet file, a folder or a glob",
        ),
        (
            lambda root: root / "*.parquet",
            "--parquet {spec}: matches no file; give a .parquet file, a folder or a glob",
        ),
    ],
    ids=["missing-file", "missing-folder", "empty-folder", "only-underscore-files", "glob"],
)
def test_inputs_that_name_no_data_are_config_errors(
    tmp_path: Path, make: Callable[[Path], Path], message: str
) -> None:
    spec = str(make(tmp_path))
    with pytest.raises(ConfigError) as err:
        ParquetSource(spec)
    assert str(err.value) == message.format(spec=spec)


def test_a_file_that_is_not_parquet_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_text("id,prompt\n1,hello\n")
    with pytest.raises(BatchgenError) as err:
        ParquetSource(str(bad))
    assert str(err.value).startswith(f"--parquet: {bad} is not a readable Parquet file (")


# --- rank slicing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "num_shards", "expected"),
    [
        (10, 1, [(0, 10)]),
        (10, 3, [(0, 4), (4, 7), (7, 10)]),
        (2, 4, [(0, 1), (1, 2), (2, 2), (2, 2)]),
        (0, 3, [(0, 0), (0, 0), (0, 0)]),
        (7, 7, [(i, i + 1) for i in range(7)]),
    ],
)
def test_rank_range_values(total: int, num_shards: int, expected: list[tuple[int, int]]) -> None:
    assert [rank_range(total, num_shards, k) for k in range(num_shards)] == expected


@pytest.mark.parametrize("num_shards", range(1, 8))
@pytest.mark.parametrize("total", [0, 1, 2, 6, 13, 100, 1001])
def test_rank_ranges_tile_the_rows(total: int, num_shards: int) -> None:
    ranges = [rank_range(total, num_shards, k) for k in range(num_shards)]
    covered = [i for start, stop in ranges for i in range(start, stop)]
    assert covered == list(range(total))  # contiguous, in rank order, each row once
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1


def _chunks(n: int, size: int) -> list[int]:
    return [min(size, n - i) for i in range(0, n, size)] or [0]


# Each layout maps a row count to files, each file a list of row-group sizes.
LAYOUTS: dict[str, Callable[[int], list[list[int]]]] = {
    # one huge file with one row group, fewer files than ranks
    "one-file-one-group": lambda n: [[n]],
    "one-file-groups-of-4": lambda n: [_chunks(n, 4)],
    "uneven-files": lambda n: [_chunks(n // 2, 3), _chunks(n - n // 2 - n // 5, 5), [n // 5]],
    "one-row-per-file": lambda n: [[1]] * n,
    "empty-files-between": lambda n: [[0], [n // 3], [0], _chunks(n - n // 3, 2), [0]],
}


@pytest.fixture(scope="module")
def layout_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable:
    """Writes each (total, layout) once: a folder of Parquet files whose column `g` holds the
    global row number. Returns the folder and the expected (id, g) rows in order."""
    made: dict[tuple[int, str], tuple[Path, list[tuple[str, int]]]] = {}

    def make(total: int, layout: str) -> tuple[Path, list[tuple[str, int]]]:
        if (total, layout) not in made:
            files = LAYOUTS[layout](total)
            assert sum(sum(groups) for groups in files) == total
            root = tmp_path_factory.mktemp(f"{layout}-{total}")
            expected, g = [], 0
            for f, groups in enumerate(files):
                name = f"f{f:03d}.parquet"
                n = sum(groups)
                table = pa.table({"g": pa.array(range(g, g + n), pa.int64())})
                with pq.ParquetWriter(root / name, table.schema) as writer:
                    for start, size in zip([0, *_cumsum(groups)], groups, strict=False):
                        writer.write_table(table.slice(start, size), row_group_size=max(size, 1))
                meta = pq.ParquetFile(root / name).metadata
                assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == (
                    [s for s in groups if s] or [0]
                )
                expected += [(f"{name}:{i}", g + i) for i in range(n)]
                g += n
            made[total, layout] = root, expected
        return made[total, layout]

    return make


def _cumsum(sizes: list[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        acc += s
        out.append(acc)
    return out


@pytest.mark.parametrize("num_shards", range(1, 8))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("total", [1, 5, 23, 64])
def test_parquet_ranks_read_every_row_exactly_once(
    layout_folder: Callable, total: int, layout: str, num_shards: int
) -> None:
    root, expected = layout_folder(total, layout)
    for batch_rows in (3, 1000):
        per_rank = []
        for k in range(num_shards):
            source = ParquetSource(str(root), num_shards, k)
            rows = read_rows(source, ["g"], batch_rows)
            assert len(rows) == source.total_rows
            assert (source.start, source.stop) == rank_range(total, num_shards, k)
            per_rank.append(rows)
        # Concatenated in rank order they are the input in order: each row once, ranks contiguous.
        assert [row for rows in per_rank for row in rows] == expected
        sizes = [len(rows) for rows in per_rank]
        assert max(sizes) - min(sizes) <= 1


SPANS = [(0, None), (0, 1), (2, 7), (5, 30), (4, 4), (9, 14)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parquet_reads_a_span_of_positions(layout_folder: Callable, layout: str) -> None:
    """iter_batches(start, stop) yields the rows at those positions of the rank's slice (a
    resume reads only the rows it has not committed), whatever the files and row groups."""
    root, _ = layout_folder(23, layout)
    for num_shards, k in [(1, 0), (3, 1)]:
        source = ParquetSource(str(root), num_shards, k)
        whole = read_rows(source, ["g"])
        for start, stop in SPANS:
            for batch_rows in (3, 1000):
                assert read_rows(source, ["g"], batch_rows, start, stop) == whole[start:stop]


def test_parquet_span_reads_only_the_row_groups_that_hold_it(
    layout_folder: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, expected = layout_folder(23, "one-file-groups-of-4")
    read_groups: list[list[int]] = []
    iter_batches = pq.ParquetFile.iter_batches

    def recording(self, *args, row_groups=None, **kwargs):
        read_groups.append(list(row_groups))
        return iter_batches(self, *args, row_groups=row_groups, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recording)
    source = ParquetSource(str(root))
    assert [g for _, g in read_rows(source, ["g"], 1000, 9, 14)] == list(range(9, 14))
    assert read_groups == [[2, 3]]  # rows 8-11 and 12-15


def test_limit_clips_a_span(layout_folder: Callable) -> None:
    from pipeline.sources.limit import LimitedSource

    root, expected = layout_folder(23, "uneven-files")
    source = LimitedSource(ParquetSource(str(root)), 10)
    assert [g for _, g in read_rows(source, ["g"], 3, 5, 20)] == list(range(5, 10))
    assert read_rows(source, ["g"], 3, 12, 20) == []


# --- Hugging Face datasets ---------------------------------------------------------------------


def _dataset(prefix: str, n: int):
    import datasets

    return datasets.Dataset.from_dict(
        {"prompt": [f"{prefix}{i}" for i in range(n)], "n": list(range(n))}
    )


def _save(ds, path: Path) -> Path:
    import datasets

    datasets.disable_progress_bars()
    try:
        ds.save_to_disk(str(path))
    finally:
        datasets.enable_progress_bars()
    return path


def test_save_to_disk_dataset(hf_offline: None, tmp_path: Path) -> None:
    folder = _save(_dataset("p", 5), tmp_path / "ds")
    source = HFDatasetSource(SourceConfig(dataset=str(folder)))
    assert source.columns == ["prompt", "n"]
    assert source.total_rows == 5
    assert read_rows(source, ["prompt", "n"], batch_rows=2) == [
        (f"train:{i}", f"p{i}", i) for i in range(5)
    ]


def test_save_to_disk_dataset_dict_reads_the_chosen_split(hf_offline: None, tmp_path: Path):
    import datasets

    folder = _save(
        datasets.DatasetDict({"train": _dataset("tr", 4), "test": _dataset("te", 3)}),
        tmp_path / "dd",
    )
    source = HFDatasetSource(SourceConfig(dataset=str(folder), split="test"))
    assert source.total_rows == 3
    assert read_rows(source, ["prompt"]) == [
        ("test:0", "te0"),
        ("test:1", "te1"),
        ("test:2", "te2"),
    ]


def test_save_to_disk_dataset_dict_wrong_split_lists_the_splits(hf_offline: None, tmp_path: Path):
    import datasets

    folder = _save(
        datasets.DatasetDict({"train": _dataset("tr", 2), "test": _dataset("te", 2)}),
        tmp_path / "dd",
    )
    with pytest.raises(ConfigError) as err:
        HFDatasetSource(SourceConfig(dataset=str(folder), split="validation"))
    assert str(err.value) == (
        f"--split 'validation': {folder} has splits train, test; pick one with --split"
    )


def test_save_to_disk_single_split_is_read_under_its_own_name_only(
    hf_offline: None, tmp_path: Path
):
    import datasets

    folder = _save(datasets.Dataset.from_dict({"prompt": ["a", "b"]}, split="test"), tmp_path / "t")
    with pytest.raises(ConfigError) as err:
        HFDatasetSource(SourceConfig(dataset=str(folder)))  # --split defaults to train
    assert str(err.value) == (
        f"--split 'train': {folder} holds only the split 'test', saved on its own; pass --split test"
    )
    source = HFDatasetSource(SourceConfig(dataset=str(folder), split="test"))
    assert read_rows(source, ["prompt"]) == [("test:0", "a"), ("test:1", "b")]


def _jsonl(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"j{i}", "n": i}) + "\n" for i in range(n)))
    return path


@pytest.mark.parametrize(
    ("num_shards", "shard_index", "first", "stop"), [(1, 0, 0, 7), (3, 1, 3, 5)]
)
def test_json_builder_with_data_files(
    hf_offline: None, tmp_path: Path, num_shards: int, shard_index: int, first: int, stop: int
) -> None:
    data = _jsonl(tmp_path / "x.jsonl", 7)
    cfg = SourceConfig(dataset="json", data_files=(str(data),))
    source = HFDatasetSource(cfg, num_shards, shard_index)
    assert source.columns == ["prompt", "n"]
    assert source.total_rows == stop - first
    assert read_rows(source, ["prompt", "n"], batch_rows=2) == [
        (f"train:{i}", f"j{i}", i) for i in range(first, stop)
    ]


def test_json_builder_missing_data_file(hf_offline: None, tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError) as err:
        HFDatasetSource(SourceConfig(dataset="json", data_files=(str(missing),)))
    assert str(err.value).startswith("--dataset json: not found (")
    assert str(missing) in str(err.value)
    assert str(err.value).endswith(
        "); give a hub id, a local dataset folder, or a builder name (json, csv, parquet, text) "
        "with --data-files"
    )


def test_json_builder_unknown_split(hf_offline: None, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "x.jsonl", 2)
    with pytest.raises(ConfigError) as err:
        HFDatasetSource(SourceConfig(dataset="json", data_files=(str(data),), split="test"))
    assert str(err.value).startswith("--split 'test': ")
    assert "'train'" in str(err.value)  # datasets names the splits there are


@pytest.mark.parametrize("num_shards", [2, 3, 4])
@pytest.mark.parametrize("kind", ["json-data-files", "save-to-disk"])
def test_streaming_ranks_read_every_row_exactly_once(
    hf_offline: None, tmp_path: Path, kind: str, num_shards: int
) -> None:
    total = 11
    if kind == "json-data-files":
        cfg = SourceConfig(
            dataset="json", data_files=(str(_jsonl(tmp_path / "x.jsonl", total)),), streaming=True
        )
        prefix = "j"
    else:
        cfg = SourceConfig(
            dataset=str(_save(_dataset("p", total), tmp_path / "ds")), streaming=True
        )
        prefix = "p"
    per_rank = []
    for k in range(num_shards):
        source = HFDatasetSource(cfg, num_shards, k)
        assert source.columns == ["prompt", "n"]
        rows = read_rows(source, ["prompt", "n"], batch_rows=2)
        assert source.total_rows in (None, len(rows))  # known only when the stream says
        # A stream is dealt round-robin: rank k keeps rows k, k + num_shards, ...
        assert rows == [(f"train:{i}", f"{prefix}{i}", i) for i in range(k, total, num_shards)]
        per_rank.append(rows)
    everything = sorted((row for rows in per_rank for row in rows), key=lambda r: r[2])
    assert everything == [(f"train:{i}", f"{prefix}{i}", i) for i in range(total)]
    sizes = [len(rows) for rows in per_rank]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("streaming", [False, True])
def test_datasets_read_a_span_of_positions(
    hf_offline: None, tmp_path: Path, streaming: bool
) -> None:
    cfg = SourceConfig(dataset=str(_save(_dataset("p", 23), tmp_path / "ds")), streaming=streaming)
    for num_shards, k in [(1, 0), (3, 1)]:
        source = HFDatasetSource(cfg, num_shards, k)
        whole = read_rows(source, ["prompt"])
        for start, stop in SPANS:
            assert read_rows(source, ["prompt"], 2, start, stop) == whole[start:stop]
