"""Driver-side checks: each bad input is one clear error naming the set or field, before Ray starts."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hamu_ray.config import ConfigError, load_config, parse_config
from hamu_ray.data import DataError, inspect_set
from hamu_ray.driver import check_inputs


@pytest.fixture
def sets(tmp_path):
    table = pa.table({"x": [[0.1, 0.2]] * 6, "y": [0, 1, 0, 1, 0, 1]})
    pq.write_table(table, tmp_path / "retain.parquet")
    pq.write_table(table.slice(0, 4), tmp_path / "forget.parquet")
    (tmp_path / "forget.jsonl").write_text("".join('{"x": [0.1, 0.2], "y": 1}\n' for _ in range(4)))
    return tmp_path


def raw(tmp_path, **data):
    return {"data": {"forget": str(tmp_path / "forget.parquet"), "retain": str(tmp_path / "retain.parquet"),
                     "retain_batch_size": 2, "forget_batch_size": 2, **data},
            "model": {"sizes": [2, 2]}, "method": {"name": "hamu-q"}, "train": {"lr": 0.1},
            "output_dir": str(tmp_path / "out")}


def test_parquet_and_jsonl_are_counted_and_digested(sets):
    parquet = inspect_set("forget", str(sets / "forget.parquet"), ["x", "y"])
    jsonl = inspect_set("forget", str(sets / "forget.jsonl"), ["x", "y"])
    assert (parquet.num_rows, jsonl.num_rows) == (4, 4)
    assert len(parquet.digest) == 16 and parquet.digest != jsonl.digest
    assert inspect_set("forget", f"file://{sets}/forget.parquet", ["x"]).num_rows == 4  # a URI


def test_missing_column_names_the_set_file_and_column(sets):
    with pytest.raises(DataError, match=r"retain set .*retain.parquet: missing column\(s\) label"):
        inspect_set("retain", str(sets / "retain.parquet"), ["x", "label"])


def test_empty_forget_set(sets):
    pq.write_table(pa.table({"x": pa.array([], pa.list_(pa.float64())), "y": pa.array([], pa.int64())}),
                   sets / "empty.parquet")
    with pytest.raises(DataError, match=r"forget set .*empty.parquet is empty"):
        inspect_set("forget", str(sets / "empty.parquet"), ["x", "y"])


@pytest.mark.parametrize("name, content", [("missing.parquet", None), ("garbage.parquet", b"not parquet")])
def test_unreadable_file(sets, name, content):
    if content is not None:
        (sets / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"forget set .*{name}: cannot read it"):
        inspect_set("forget", str(sets / name), ["x"])


def test_unknown_format(sets):
    with pytest.raises(DataError, match="forget set .*data.csv: unknown format"):
        inspect_set("forget", str(sets / "data.csv"), ["x"])


def test_too_few_rows_for_the_workers(sets):
    cfg = parse_config(raw(sets, forget_batch_size=3))  # 4 rows over 2 workers: 2 each
    with pytest.raises(DataError, match="forget set .* 2 per worker, fewer than data.forget_batch_size=3"):
        check_inputs(cfg)


def test_config_errors_name_the_file_and_every_field(sets):
    bad = raw(sets)
    bad["train"] = {"lr": -1, "zero_stage": 4}
    bad["method"] = {"name": "hamu-q", "hparams": {"radius": -2}}
    bad["surprise"] = 1
    path = sets / "pipeline.yaml"
    import yaml

    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    for needle in ("pipeline.yaml: train.lr", "train.zero_stage", "method: Value error, radius must be",
                   "surprise: Extra inputs"):
        assert needle in message, message


def test_missing_required_field(sets):
    bad = raw(sets)
    del bad["train"]["lr"]
    with pytest.raises(ConfigError, match=r"train.lr: Field required"):
        parse_config(bad)


def test_an_existing_output_dir_is_never_overwritten(sets):
    from hamu_ray.driver import run_unlearning

    (sets / "out").mkdir()
    (sets / "out" / "model.safetensors").write_text("keep me")
    with pytest.raises(FileExistsError, match="output_dir .*out already exists"):
        run_unlearning(parse_config(raw(sets)))
    assert (sets / "out" / "model.safetensors").read_text() == "keep me"
