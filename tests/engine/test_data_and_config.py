"""Checks of a job's inputs: each bad input is one clear error naming the set or field (the driver's
before Ray starts; the sets' rows checked by the workers that read them)."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from hamu_ray.engine.config import TrainSection, TrainSettings, load_config, parse_config
from hamu_ray.schema import ConfigError
from hamu_ray.pipeline.config import PipelineConfig, load_pipeline
from hamu_ray.schema import apply_overrides
from hamu_ray.engine import data
from hamu_ray.engine.data import DataError, inspect_set
from hamu_ray.engine.driver import check_inputs
from hamu_ray.errors import UserError


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
            "model": {"sizes": [2, 2]}, "method": {"name": "hamu-q", "hparams": {"constraint": 0.01}},
            "train": {"lr": 0.1},
            "output_dir": str(tmp_path / "out")}


def test_parquet_and_jsonl_are_counted_and_fingerprinted(sets):
    parquet = inspect_set("forget", str(sets / "forget.parquet"), ["x", "y"])
    jsonl = inspect_set("forget", str(sets / "forget.jsonl"), ["x", "y"])
    assert (parquet.num_rows, jsonl.num_rows) == (4, 4)
    assert len(parquet.fingerprint) == 16 and parquet.fingerprint != jsonl.fingerprint
    assert inspect_set("forget", f"file://{sets}/forget.parquet", ["x"]).num_rows == 4  # a URI


def test_a_parquet_fingerprint_is_its_size_and_footer_and_the_content_digest_its_blocks(sets, monkeypatch):
    """The driver's fingerprint reads a parquet file's footer only (the row pages may be
    anything); the content digest hashes every byte, block by block, and the ranks' shares of
    the blocks combine to the one-process digest at any world size."""
    path = sets / "plain.parquet"
    pq.write_table(pa.table({"x": [[0.1, 0.2]] * 6, "y": [0, 1, 0, 1, 0, 1]}), path, compression="NONE",
                   use_dictionary=False, write_statistics=False)  # a value's bytes stand in its page only
    info = inspect_set("forget", str(path), ["x", "y"])
    blob = path.read_bytes()
    footer = int.from_bytes(blob[-8:-4], "little")
    by_hand = hashlib.sha256(f"{len(blob)}\n".encode() + blob[-8 - footer:-8]).hexdigest()[:16]
    assert info.fingerprint == by_hand
    monkeypatch.setattr(data, "DIGEST_BLOCK_BYTES", 100)  # several blocks in a small file
    blocks = [blob[i:i + 100] for i in range(0, len(blob), 100)]
    whole = hashlib.sha256("".join(hashlib.sha256(b).hexdigest() for b in blocks).encode()).hexdigest()[:16]
    assert len(blocks) > 3 and data.content_digest(info) == whole
    sets_ = {"forget": info}
    for world in (1, 2, 3):
        shares = [data.share_check(sets_, ["x", "y"], rank, world) for rank in range(world)]
        assert data.merged_checks(sets_, ["x", "y"], shares) == {"forget": whole}
    value = struct.pack("<d", 0.1)
    assert blob.count(value) == 6 and blob.rindex(value) < len(blob) - 8 - footer  # every one in the page
    path.write_bytes(blob.replace(value, struct.pack("<d", 0.3), 1))  # a value edited in place
    again = inspect_set("forget", str(path), ["x", "y"])
    assert again.fingerprint == info.fingerprint and data.content_digest(again) != whole


def test_the_ranks_share_the_disjointness_check_and_find_every_shared_row(tmp_path):
    """Forget rows equal to retain rows, found whatever rank reads the retain piece they are in,
    named by the first equal retain row; a damaged retain file is the same error on every rank."""
    retain_rows = [{"x": [float(i), 1.0], "y": i % 3} for i in range(50)]
    retain, forget = tmp_path / "retain.parquet", tmp_path / "forget.parquet"
    pq.write_table(pa.Table.from_pylist(retain_rows), retain, row_group_size=7, write_page_checksum=True)
    pq.write_table(pa.Table.from_pylist([retain_rows[40], {"x": [0.5, 0.5], "y": 0}, retain_rows[3]]), forget)
    infos = {"forget": inspect_set("forget", str(forget), ["x", "y"]),
             "retain": inspect_set("retain", str(retain), ["x", "y"])}
    expected = (f"forget set {forget}: 2 row(s) also in the retain set {retain} (the same x and y): "
                "forget row 0 = retain row 40, forget row 2 = retain row 3; remove them from one")
    with pytest.raises(DataError) as whole:
        data.check_disjoint(infos["forget"], infos["retain"], ["x", "y"])
    assert str(whole.value) == expected
    for world in (1, 2, 3):
        shares = [data.share_check(infos, ["x", "y"], rank, world) for rank in range(world)]
        with pytest.raises(DataError) as shared:
            data.merged_checks(infos, ["x", "y"], shares)
        assert str(shared.value) == expected
    blob = bytearray(retain.read_bytes())
    for i in range(len(blob) // 3, len(blob) // 3 + 16):
        blob[i] ^= 0xFF
    retain.write_bytes(bytes(blob))
    shares = [data.share_check(infos, ["x", "y"], rank, 2) for rank in range(2)]
    assert sum(share["error"] is not None for share in shares) >= 1
    with pytest.raises(DataError, match=r"retain set .*retain.parquet: damaged \(.*retain.parquet\)"):
        data.merged_checks(infos, ["x", "y"], shares)


def test_missing_column_names_the_set_file_and_column(sets):
    with pytest.raises(DataError, match=r"retain set .*retain.parquet: missing column\(s\) label"):
        inspect_set("retain", str(sets / "retain.parquet"), ["x", "label"])


def test_empty_forget_set(sets):
    pq.write_table(pa.table({"x": pa.array([], pa.list_(pa.float64())), "y": pa.array([], pa.int64())}),
                   sets / "empty.parquet")
    with pytest.raises(DataError, match=r"forget set .*empty.parquet is empty"):
        inspect_set("forget", str(sets / "empty.parquet"), ["x", "y"])


@pytest.mark.parametrize("name, content, problem", [("missing.parquet", None, "no such file"),
                                                    ("garbage.parquet", b"not parquet", "cannot read it")])
def test_unreadable_file(sets, name, content, problem):
    if content is not None:
        (sets / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"forget set .*{name}: {problem}"):
        inspect_set("forget", str(sets / name), ["x"])


GOOD_LINE = '{"x": [1.0, 2.0], "y": 0}\n'


@pytest.mark.parametrize("lines, where", [
    # pyarrow: "row 2" (from 0, blank lines skipped)
    ([GOOD_LINE, "\n", GOOD_LINE, '{"x": [1.0], y: 1}\n'], "line 4: not valid JSON (Expecting property name"),
    # pyarrow counts rows within a block of the file (≈1 MB): "row 9805" here
    ([GOOD_LINE] * 60_000 + ['{"x": [1.0] "y": 1}\n'], "line 60001: not valid JSON (Expecting ',' delimiter"),
    ([GOOD_LINE, "[1, 2]\n"], "line 2: not a JSON object (a list)"),
    ([GOOD_LINE, '{"x": [1.0, 2.0], "y": "zero"}\n'], "line 2: y is a string, but a number on line 1"),
])
def test_a_broken_json_line_is_named_by_its_line_from_1(tmp_path, lines, where):
    path = tmp_path / "forget.jsonl"
    path.write_text("".join(lines))
    with pytest.raises(DataError) as err:
        inspect_set("forget", str(path), ["x", "y"])
    assert str(err.value).startswith(f"forget set {path}: {where}"), str(err.value)
    assert "row" not in str(err.value) and "zero" not in str(err.value)  # pyarrow's count; no content


def test_a_damaged_page_is_found_by_whoever_reads_it(sets, tmp_path):
    """The driver's inspection reads the footer only; the rows' readers (the disjointness check,
    a worker's shard: both through data.read_piece) verify the pages and name the file."""
    from hamu_ray.engine import shards
    from hamu_ray.files import write_rows

    rows = [{"x": [float(i)] * 12, "y": i % 3} for i in range(200)]
    path = write_rows(rows, tmp_path / "forget.parquet")  # with page checksums
    assert inspect_set("forget", str(path), ["x", "y"]).num_rows == 200
    blob = bytearray(path.read_bytes())
    for i in range(len(blob) // 3, len(blob) // 3 + 16):  # inside a data page; the footer is intact
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))
    assert pq.ParquetFile(path).metadata.num_rows == 200  # the metadata still reads
    info = inspect_set("forget", str(path), ["x", "y"])
    with pytest.raises(DataError, match=r"forget set .*forget.parquet: damaged .*CRC checksum"):
        data.forget_keys(info, ["x", "y"])
    shard = shards.rank_shard("forget", str(path), ["x", "y"], 0, 1, None, lambda rows: rows)
    with pytest.raises(DataError, match=r"forget set .*forget.parquet: damaged .*CRC checksum"):
        list(shard.batches(10, None))
    path.write_bytes(bytes(blob[: len(blob) // 2]))  # cut short: no footer
    with pytest.raises(DataError, match=r"forget set .*forget.parquet: cannot read it"):
        inspect_set("forget", str(path), ["x", "y"])


def test_unknown_format(sets):
    with pytest.raises(DataError, match="forget set .*data.csv: unknown format"):
        inspect_set("forget", str(sets / "data.csv"), ["x"])


def test_too_few_rows_for_the_workers(sets):
    cfg = parse_config(raw(sets, forget_batch_size=3))  # 4 rows over 2 workers: 2 each
    with pytest.raises(DataError, match="forget set .* 2 per worker, fewer than data.forget_batch_size=3"):
        check_inputs(cfg)


def test_unlearn_refuses_forget_rows_that_are_retain_rows_by_their_numbers_only(tmp_path, capsys):
    from hamu_ray.cli import main

    retain = pa.table({"x": pa.array([[0.5 * i, 1.0] for i in range(6)], pa.list_(pa.float32())),
                       "y": [0, 1, 2, 0, 1, 2]})
    # float64 inputs, as the model reads them in float32: rows 1 and 3 are retain rows 5 and 1;
    # row 2 has retain row 4's input with another label
    forget = pa.table({"x": [[9.25, 9.25], [2.5, 1.0], [2.0, 1.0], [0.5, 1.0]], "y": [0, 2, 0, 1]})
    pq.write_table(retain, tmp_path / "retain.parquet")
    pq.write_table(forget, tmp_path / "forget.parquet")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw(tmp_path)))
    assert main(["unlearn", str(tmp_path / "job.yaml")]) == 2
    message = capsys.readouterr().err
    assert (f"forget set {tmp_path}/forget.parquet: 2 row(s) also in the retain set {tmp_path}/retain.parquet "
            "(the same x and y): forget row 1 = retain row 5, forget row 3 = retain row 1; remove them from one") \
        in message, message
    assert "2.5" not in message and not (tmp_path / "out").exists()  # no row content; nothing written


def test_config_errors_name_the_file_and_every_field(sets):
    bad = raw(sets)
    bad["train"] = {"lr": -1, "zero_stage": 4}
    bad["method"] = {"name": "hamu-q", "hparams": {"constraint": 0.01, "radius": -2}}
    bad["surprise"] = 1
    path = sets / "pipeline.yaml"
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
    from hamu_ray.engine.driver import run_unlearning

    (sets / "out").mkdir()
    (sets / "out" / "model.safetensors").write_text("keep me")
    with pytest.raises(FileExistsError, match="output_dir .*out already exists"):
        run_unlearning(parse_config(raw(sets)))
    assert (sets / "out" / "model.safetensors").read_text() == "keep me"


# ---- the training settings, the method checks, the search horizon -----------------------------

DIGITS = Path(__file__).parents[2] / "pipelines" / "digits.yaml"


def digits(**edits) -> dict:
    raw = yaml.safe_load(DIGITS.read_text())
    raw.update(edits)
    return raw


def test_a_jobs_train_section_extends_the_stage_settings_without_repeating_them():
    assert issubclass(TrainSection, TrainSettings)
    own = set(TrainSection.model_fields) - set(TrainSettings.model_fields)
    assert own == {"seed"}
    assert not set(vars(TrainSection).get("__annotations__", {})) & set(TrainSettings.model_fields)


@pytest.mark.parametrize("rule", ["hamu-q", "surgery", "ga", "gru"])
def test_scrub_is_refused_under_a_rule_its_zero_forget_gradient_leaves_still(sets, rule):
    bad = raw(sets)
    bad["method"] = {"name": "scrub", "rule": rule,
                     "hparams": {"constraint": 0.01} if rule == "hamu-q" else {}}
    with pytest.raises(ConfigError) as err:
        parse_config(bad, source="job.yaml")
    message = str(err.value)
    for needle in (f"scrub cannot run under rule {rule}", "zero gradient at the original model",
                   "valid rules for scrub: gdiff, pcgrad, hamu-u, ft"):
        assert needle in message, message


@pytest.mark.parametrize("rule", [None, "gdiff", "pcgrad", "hamu-u", "ft"])
def test_scrub_runs_under_a_rule_that_moves_without_a_forget_gradient(sets, rule):
    good = raw(sets)
    good["method"] = {"name": "scrub", "rule": rule,
                      "hparams": {"constraint": 0.01} if rule == "hamu-u" else {}}
    assert parse_config(good).method.rule_name == (rule or "gdiff")


@pytest.mark.parametrize("hparams", [{"constraint": True}, {"radius": 0.1}])
def test_hamus_constraint_is_a_required_number(sets, hparams):
    bad = raw(sets)
    bad["method"] = {"name": "hamu-q", "hparams": hparams}
    with pytest.raises(ConfigError, match="constraint") as err:
        parse_config(bad, source="job.yaml")
    assert "job.yaml: method" in str(err.value)


def test_which_steps_measure_and_an_adaptive_radius_needs_them(sets):
    from hamu_ray.engine.config import measures_steps

    def job(method: dict, **train):
        return parse_config({**raw(sets), "method": method, "train": {"lr": 0.1, **train}})

    hamu = {"name": "hamu-q", "hparams": {"constraint": 0.01}}
    assert measures_steps(job(hamu))  # auto: a rule with a guarantee
    assert not measures_steps(job({"name": "gdiff"}))  # auto: none to measure
    assert measures_steps(job({"name": "gdiff"}, measure=True))
    assert not measures_steps(job(hamu, measure=False))
    assert not measures_steps(job({"name": "surgery-implicit"}, measure=True))  # measures its own
    adaptive = {"name": "hamu-q", "hparams": {"constraint": 0.01, "trust_tolerance": 0.01}}
    assert measures_steps(job(adaptive))
    with pytest.raises(ConfigError, match="trust_tolerance adapts the radius to the measured retain change: "
                                          "it needs train.measure true or auto"):
        job(adaptive, measure=False)
    with pytest.raises(ConfigError, match="trust_tolerance must be a finite number > 0"):
        job({"name": "hamu-q", "hparams": {"constraint": 0.01, "trust_tolerance": 0}})


def test_a_grace_period_beyond_the_searched_methods_horizon_is_a_config_error():
    raw_ = digits()  # the pipeline's unlearn: 30 steps / 10 → 4 reports; hamu-q's own: 6 / 3 → 3
    raw_["methods"][0]["train"] = {"max_steps": 6, "progress_every": 3}
    raw_["tune"]["scheduler"] = {"grace_period": 3}
    assert parse_config(raw_, schema=PipelineConfig).search_horizon() == 3
    raw_["tune"]["scheduler"] = {"grace_period": 4}
    with pytest.raises(ConfigError) as err:
        parse_config(raw_, source="digits.yaml", schema=PipelineConfig)
    assert ("tune.scheduler.grace_period: 4 reports, but a trial of hamu-q makes only 3 "
            "(ceil(max_steps 6 / progress_every 3) + 1 evaluation)") in str(err.value)


def test_without_max_steps_the_horizon_is_unknown_and_not_checked():
    raw_ = digits()
    raw_["unlearn"]["max_steps"] = None
    raw_["tune"]["scheduler"] = {"grace_period": 1000}
    assert parse_config(raw_, schema=PipelineConfig).search_horizon() is None
    assert parse_config(digits(tune=None), schema=PipelineConfig).search_horizon() is None


# ---- KEY=VALUE overrides ----------------------------------------------------------------------

def test_override_values_are_yaml_and_paths_index_lists_and_create_mappings():
    raw_ = {"a": {"b": 1}, "items": [{"x": 0}, 5]}
    merged = apply_overrides(raw_, ["a.b=0.1", "a.flag=true", "items.0.x=[1, 2]", "a.gone=null",
                                    "new.deep.key=text", "items.1=3"], "f.yaml")
    assert merged == {"a": {"b": 0.1, "flag": True, "gone": None},
                      "items": [{"x": [1, 2]}, 3], "new": {"deep": {"key": "text"}}}
    assert raw_ == {"a": {"b": 1}, "items": [{"x": 0}, 5]}  # the loaded mapping is not changed


@pytest.mark.parametrize("override, problem", [
    ("unlearn.lr", "expected KEY=VALUE"),
    ("=1", "expected KEY=VALUE"),
    ("unlearn..lr=1", "expected KEY=VALUE"),
    ("methods.2.name=ga", "'2' is not an index of a list of 2 item(s)"),
    ("methods.first.name=ga", "'first' is not an index"),
    ("unlearn.lr.value=1", "unlearn.lr is 0.1, not a mapping or a list"),
    ("unlearn.lr=[1", "the value is not YAML"),
])
def test_a_malformed_override_is_one_error_naming_it(override, problem):
    with pytest.raises(ConfigError) as err:
        load_pipeline(DIGITS, ["cluster.num_workers=1", override])
    assert str(err.value).startswith(f"{DIGITS}: override {override!r}: {problem}"), str(err.value)


def test_overridden_configs_are_validated_like_the_file():
    cfg = load_pipeline(DIGITS, ["unlearn.lr=0.02", "methods.0.hparams.constraint=0.1",
                                 "cluster.num_workers=1"])
    assert (cfg.unlearn.lr, cfg.methods[0].hparams["constraint"], cfg.cluster.num_workers) == (0.02, 0.1, 1)
    with pytest.raises(ConfigError) as err:
        load_pipeline(DIGITS, ["unlearn.lr=-1", "cluster.nodes=3"])
    message = str(err.value)
    # each error names the command line's override that made it, not the file
    assert f"command line 'unlearn.lr=-1' (over {DIGITS}): unlearn.lr: Input should be greater than 0" in message
    assert f"command line 'cluster.nodes=3' (over {DIGITS}): cluster.nodes: Extra inputs are not permitted" in message


def test_an_evaluation_section_needs_a_qa_language_model_and_sets_named_by_identifiers(sets):
    evaluation = {"sets": {"forget": str(sets / "forget.parquet")}}
    with pytest.raises(ConfigError, match="evaluation scores answers to questions: it needs model.kind causal_lm"):
        parse_config({**raw(sets), "evaluation": evaluation})
    lm = {**raw(sets), "model": {"kind": "causal_lm", "path": str(sets)}}
    with pytest.raises(ConfigError, match=r"evaluation.sets and attacks: names must be identifiers .*\['a b'\]"):
        parse_config({**lm, "evaluation": {"sets": {"a b": "x.parquet"}}})
    with pytest.raises(ConfigError, match="evaluation.sets"):
        parse_config({**lm, "evaluation": {"sets": {}}})
    assert parse_config({**lm, "evaluation": evaluation}).evaluation.batch_size == 64


def test_evaluation_attacks_are_one_kind_each_and_score_the_forget_set_on_whole_models(sets):
    lm = {**raw(sets), "model": {"kind": "causal_lm", "path": str(sets)}}
    forget = {"forget": str(sets / "forget.parquet")}
    relearning = {"path": str(sets / "forget.parquet"), "rows": [0, 1], "steps": 2, "lr": 0.01, "batch_size": 1}

    def refused(evaluation: dict) -> str:
        with pytest.raises(ConfigError) as err:
            parse_config({**lm, "evaluation": evaluation})
        return str(err.value)
    assert "an attack is quantize_bits or relearning, one of them" in refused(
        {"sets": forget, "attacks": {"both": {"quantize_bits": 8, "relearning": relearning}}})
    assert "an attack is quantize_bits or relearning, one of them" in refused({"sets": forget, "attacks": {"none": {}}})
    assert "evaluation.attacks.int2.quantize_bits" in refused({"sets": forget, "attacks": {"int2": {"quantize_bits": 2}}})
    assert "evaluation.attacks score the set named forget: add it to evaluation.sets" in refused(
        {"sets": {"qa": forget["forget"]}, "attacks": {"int8": {"quantize_bits": 8}}})
    assert "evaluation.attacks need the model whole on every rank: whole_model false" in refused(
        {"sets": forget, "whole_model": False, "attacks": {"int8": {"quantize_bits": 8}}})
    assert "names must be identifiers" in refused({"sets": forget, "attacks": {"int-8": {"quantize_bits": 8}}})
    section = parse_config({**lm, "evaluation": {"sets": forget, "attacks": {
        "int8": {"quantize_bits": 8}, "relearn": {"relearning": relearning}}}}).evaluation
    assert section.attacks["relearn"].relearning.seed == 0 and section.attacks["int8"].relearning is None


def test_evaluation_sets_are_checked_before_any_worker_starts(tiny_lm, tmp_path):
    from hamu_ray.engine.driver import run_evaluation
    from tests.lm_fixtures import qa_rows

    rows = qa_rows()
    pq.write_table(pa.Table.from_pylist(rows[:4]), tmp_path / "forget.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:12]), tmp_path / "retain.parquet")
    pq.write_table(pa.table({"question": ["q"]}), tmp_path / "no_answer.parquet")
    job = {"data": {"forget": str(tmp_path / "forget.parquet"), "retain": str(tmp_path / "retain.parquet"),
                    "retain_batch_size": 2, "forget_batch_size": 2},
           "model": {"kind": "causal_lm", "path": str(tiny_lm)}, "method": {"name": "ga"},
           "train": {"lr": 0.1}, "output_dir": str(tmp_path / "out")}
    missing = parse_config({**job, "evaluation": {"sets": {"holdout": str(tmp_path / "holdout.parquet")}}})
    with pytest.raises(DataError, match="evaluation holdout set .*holdout.parquet: no such file"):
        check_inputs(missing)
    with pytest.raises(DataError, match="evaluation holdout set .*holdout.parquet: no such file"):
        run_evaluation(missing)  # before Ray starts
    no_answer = parse_config({**job, "evaluation": {"sets": {"extra": str(tmp_path / "no_answer.parquet")}}})
    with pytest.raises(DataError, match="evaluation extra set .*no_answer.parquet: missing column.s. answer"):
        check_inputs(no_answer)
    with pytest.raises(UserError, match="the job has no evaluation: section"):
        run_evaluation(parse_config(job))
    assert not (tmp_path / "out").exists()
