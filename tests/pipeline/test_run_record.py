"""`hamu-ray report RUN_DIR`: a finished run's table under the line that says where it came from."""

from __future__ import annotations

import json
import subprocess

import torch

from hamu_ray import cli
from hamu_ray.pipeline import run_record

TABLE = "| model | forget_prob |\n|---|---|\n| original | 0.900 |\n| hamu-q | 0.100 |\n\nNotes:\n- a note\n"


def finished_run(tmp_path, seeds=1):
    report = tmp_path / "run" / "report"
    report.mkdir(parents=True)
    (report / "comparison.md").write_text(TABLE)
    (report / "spread.md").write_text("| metric | p |\n|---|---|\n| forget_prob | 0.01 |\n")
    return tmp_path / "run", run_record.write_run_record("country-qa", seeds, report)


def test_the_record_names_this_checkout_and_this_machine(tmp_path):
    _, record = finished_run(tmp_path)
    head = subprocess.run(["git", "-C", str(run_record.CODE_DIR), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    assert record["commit"].startswith(head)  # this checkout, "-dirty" when it has edits
    assert record["machine"]["cores"] >= 1 and record["machine"]["memory_gib"] > 0
    assert record["machine"]["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    assert record["machine"]["kernel_pins"] == {}  # the tests run on the machine's own kernels
    assert record["pipeline"] == "country-qa" and record["seeds"] == 1
    assert json.loads((tmp_path / "run" / "report" / "run.json").read_text()) == record


def test_the_block_is_the_table_as_written_under_its_provenance(tmp_path, capsys):
    run, record = finished_run(tmp_path, seeds=3)
    assert cli.main(["report", str(run)]) == 0
    printed = capsys.readouterr().out
    first, rest = printed.split("\n\n", 1)
    assert first == (f"Pipeline `country-qa`, 3 seed(s), finished {record['finished']} at commit "
                     f"{record['commit']} on {record['machine']['cpu']}, {record['machine']['cores']} cores, "
                     f"{record['machine']['memory_gib']} GiB, {record['machine']['cpu_kernels']} kernels. "
                     f"Made by `hamu-ray report {run}`.")
    assert rest.startswith(TABLE.strip()) and rest.endswith("| forget_prob | 0.01 |\n")  # table, notes, spread


def test_a_run_under_kernel_pins_says_so_in_its_line(tmp_path, monkeypatch):
    from hamu_ray.kernels import PORTABLE_KERNELS

    for key, value in PORTABLE_KERNELS.items():
        monkeypatch.setenv(key, value)
    run, record = finished_run(tmp_path)
    assert record["machine"]["kernel_pins"] == PORTABLE_KERNELS
    assert (f"{record['machine']['cpu_kernels']} kernels (pinned: ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2). "
            "Made by") in run_record.readme_block(run)


def test_one_seed_has_no_spread_and_a_run_without_a_record_is_named(tmp_path, capsys):
    run, _ = finished_run(tmp_path, seeds=1)
    assert "forget_prob | 0.01" not in run_record.readme_block(run)
    (run / "report" / "run.json").unlink()
    assert cli.main(["report", str(run)]) == 2
    assert f"{run / 'report' / 'run.json'}: not found" in capsys.readouterr().err


def test_columns_print_those_columns_of_the_csv_with_the_seeds_spread(tmp_path, capsys):
    run, record = finished_run(tmp_path, seeds=3)
    (run / "report" / "comparison.csv").write_text(
        "model,forget_prob,forget_acc_int4,stop,forget_prob_sd,forget_acc_int4_sd,stop_sd,seeds\n"
        "original,0.9,0.95,none,,,,\n"
        "hamu-q,0.1234,0.5,\"none, stop ×2\",0.0456,0.25,,3\n")
    assert cli.main(["report", str(run), "--columns", "model,forget_acc_int4,forget_prob"]) == 0
    first, table = capsys.readouterr().out.split("\n\n", 1)
    assert first.endswith(f"Made by `hamu-ray report {run} --columns model,forget_acc_int4,forget_prob`.")
    assert table.splitlines()[0] == "| model | forget_acc_int4 | forget_prob |"
    assert table.splitlines()[2:] == ["| original | 95.0 | 0.900 |", "| hamu-q | 50.0 ± 25.0 | 0.123 ± 0.046 |"]
    assert cli.main(["report", str(run), "--columns", "model,forget_rouge"]) == 2
    assert "--columns: forget_rouge not in" in capsys.readouterr().err
