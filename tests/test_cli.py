"""The `hamu-ray` command line: which errors are messages, `validate`, KEY=VALUE overrides, and
light `--help`. Nothing here starts Ray; the commands' engines are replaced by recorders."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from hamu_ray import cli, jobs
from hamu_ray.errors import OutputExistsError

ROOT = Path(__file__).parent.parent
PIPELINE = ROOT / "pipelines" / "digits.yaml"
OVERRIDES = ["unlearn.lr=0.02", "methods.0.hparams.constraint=0.1", "cluster.num_workers=1"]


def fake_module(monkeypatch, name: str, **attrs) -> None:
    """Stand in for a module a handler imports when it runs (so Ray is never imported)."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, module)


def run_in_subprocess(code: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def job_yaml(tmp_path: Path) -> Path:
    job = {"data": {"forget": "forget.parquet", "retain": "retain.parquet"}, "model": {"sizes": [2, 2]},
           "method": {"name": "gdiff"}, "train": {"lr": 0.1}, "output_dir": str(tmp_path / "out")}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


# ---- errors: a user's mistake is one line, a bug keeps its traceback --------------------------

def test_an_internal_error_keeps_its_traceback(monkeypatch):
    def bug(cfg):
        raise ValueError("an internal bug")
    fake_module(monkeypatch, "hamu_ray.pipeline.stages", run_pipeline=bug)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["run", str(PIPELINE)])


def test_a_user_error_from_below_is_one_line_and_exit_2(monkeypatch, capsys):
    def exists(cfg):
        raise OutputExistsError("output_dir runs/x already exists")
    fake_module(monkeypatch, "hamu_ray.pipeline.stages", run_pipeline=exists)
    assert cli.main(["run", str(PIPELINE)]) == 2
    assert capsys.readouterr().err == "hamu-ray: output_dir runs/x already exists\n"


def test_a_config_error_is_one_line_and_exit_2(monkeypatch, capsys):
    fake_module(monkeypatch, "hamu_ray.pipeline.stages", run_pipeline=lambda cfg: pytest.fail("ran"))
    assert cli.main(["run", str(PIPELINE), "unlearn.lr"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hamu-ray: {PIPELINE}: override 'unlearn.lr': expected KEY=VALUE")
    assert err.count("\n") == 1, err


def test_a_reader_that_leaves_early_ends_the_command_quietly(tmp_path):
    """`hamu-ray … | head`: the pipe closes before the output is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "w") as closed_pipe:
        done = subprocess.run([sys.executable, "-m", "hamu_ray.cli", "validate", str(PIPELINE)], cwd=ROOT,
                              stdout=closed_pipe, stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 128 + signal.SIGPIPE and done.stderr == "", done.stderr


# ---- validate --------------------------------------------------------------------------------

def test_validate_reads_pipelines_and_jobs_without_importing_ray(tmp_path):
    job = job_yaml(tmp_path)
    done = run_in_subprocess(
        "import sys; from hamu_ray.cli import main\n"
        f"assert main(['validate', {str(PIPELINE)!r}, *{OVERRIDES!r}]) == 0\n"
        f"assert main(['validate', {str(job)!r}, 'train.lr=0.5', '--skip-inputs']) == 0\n"
        "print('ray' in sys.modules)")
    lines = done.stdout.splitlines()
    assert lines[0] == (f"{PIPELINE}: valid pipeline digits (2 methods: hamu-q, gdiff; tune: hamu-q); "
                        "it names no local input")
    assert lines[1].startswith(f"{job}: valid job (method gdiff, rule gdiff, 2 workers")
    assert lines[1].endswith("; inputs not checked (--skip-inputs)")
    assert lines[2] == "False"


def test_validate_checks_that_the_local_inputs_exist(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the job names its sets relative to the working directory
    job = job_yaml(tmp_path)
    assert cli.main(["validate", str(job), "data.eval=s3://bucket/eval.parquet"]) == 2
    err = capsys.readouterr().err
    assert f"{job}: data.forget: no such file or directory: forget.parquet" in err, err
    assert f"{job}: data.retain: no such file or directory: retain.parquet" in err
    assert "eval" not in err  # a URI is not this machine's to check
    (tmp_path / "forget.parquet").write_bytes(b"")
    (tmp_path / "retain.parquet").write_bytes(b"")
    assert cli.main(["validate", str(job)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("its 2 local inputs exist (their content is read when it runs)")


def test_validate_prints_the_config_errors_and_exits_2(tmp_path, capsys):
    assert cli.main(["validate", str(PIPELINE), "unlearn.lr=-1", "methods.1.name=nope"]) == 2
    err = capsys.readouterr().err
    assert f"command line 'unlearn.lr=-1' (over {PIPELINE}): unlearn.lr: Input should be greater than 0" in err
    assert f"{PIPELINE} with command line 'methods.1.name=nope': methods.1: Value error, unknown method 'nope'" in err
    neither = tmp_path / "neither.yaml"
    neither.write_text("name: x\n")
    assert cli.main(["validate", str(neither)]) == 2
    assert "neither a pipeline (it has methods:) nor a job" in capsys.readouterr().err
    assert cli.main(["validate", str(job_yaml(tmp_path)), "method.name=scrub", "method.rule=ga"]) == 2
    assert "scrub cannot run under rule ga" in capsys.readouterr().err


# ---- overrides reach every command -------------------------------------------------------------

def test_overrides_reach_run_tune_and_unlearn(monkeypatch, tmp_path, capsys):
    seen = {}
    fake_module(monkeypatch, "hamu_ray.pipeline.stages", run_pipeline=lambda cfg: seen.update(run=cfg)
                or types.SimpleNamespace(failed={}))
    fake_module(monkeypatch, "hamu_ray.pipeline.tune", run_search=lambda cfg: seen.update(tune=cfg)
                or types.SimpleNamespace(complete=True, chosen={}))
    fake_module(monkeypatch, "hamu_ray.engine.driver", run_unlearning=lambda cfg, progress: seen.update(job=cfg)
                or types.SimpleNamespace(output_dir=cfg.output_dir, steps=1, stop="max_steps"))
    assert cli.main(["run", str(PIPELINE), *OVERRIDES]) == 0
    assert cli.main(["tune", str(PIPELINE), *OVERRIDES]) == 0
    assert cli.main(["unlearn", str(job_yaml(tmp_path)), "train.lr=0.5", "cluster.num_workers=1"]) == 0
    for cfg in (seen["run"], seen["tune"]):
        assert cfg.unlearn.lr == 0.02 and cfg.methods[0].hparams["constraint"] == 0.1
        assert cfg.cluster.num_workers == 1
    assert seen["job"].train.lr == 0.5 and seen["job"].cluster.num_workers == 1


def test_submit_passes_overrides_given_before_and_after_its_options(monkeypatch):
    seen = {}
    monkeypatch.setattr(jobs, "submit", lambda *args, **kwargs: seen.update(kwargs) or 0)
    assert cli.main(["submit", str(PIPELINE), "unlearn.lr=0.02", "--address", "http://h:8265",
                     "cluster.num_workers=1", "--no-follow"]) == 0
    assert seen["overrides"] == ["unlearn.lr=0.02", "cluster.num_workers=1"]
    with pytest.raises(SystemExit):  # an unknown option is still argparse's error
        cli.main(["submit", str(PIPELINE), "--address", "h", "--bogus"])


# ---- --help is light ----------------------------------------------------------------------------

def test_help_of_every_command_imports_neither_ray_nor_torch():
    done = run_in_subprocess(
        "import contextlib, io, sys\nfrom hamu_ray.cli import build_parser, main\n"
        "commands = build_parser()._subparsers._group_actions[0].choices\n"
        "argvs = [[], *([c] for c in commands), *(['jobs', a] for a in ('status', 'logs', 'stop')),\n"
        "         *(['receipt', a] for a in ('verify', 'prove', 'verify-chain')), ['tracking', 'upload']]\n"
        "for argv in argvs:\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "        main([*argv, '--help'])\n"
        "    assert 'usage: hamu-ray' in out.getvalue(), argv\n"
        "print(len(argvs), 'ray' in sys.modules, 'torch' in sys.modules)")
    assert done.stdout.split() == ["22", "False", "False"]


# ---- what --help and `methods` tell a new user ---------------------------------------------------

JOB = ROOT / "cluster" / "jobs" / "llama-8b-lora.yaml"


@pytest.mark.parametrize("command, kinds", [
    ("run", ["pipeline"]), ("tune", ["pipeline"]), ("submit", ["pipeline"]), ("unlearn", ["job"]),
    ("hardness", ["job"]), ("plan", ["job"]), ("validate", ["pipeline", "job"])])
def test_the_override_examples_in_help_are_valid_for_the_commands_yaml(command, kinds, capsys):
    """Each command's --help shows KEY=VALUE examples its own kind of YAML accepts."""
    import re

    from hamu_ray.engine.config import load_config
    from hamu_ray.pipeline.config import load_pipeline

    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    examples = re.search(r"KEY=VALUE overrides of the YAML, e\.g\. (.*?) \(dotted keys", text).group(1)
    groups = [g for g in re.split(r" for a (?:pipeline|job),?", examples) if g.strip()]  # validate: two
    assert len(groups) == len(kinds), examples
    for kind, group in zip(kinds, groups):
        overrides = [word for word in group.split() if "=" in word]
        assert overrides, examples
        load = load_pipeline if kind == "pipeline" else load_config
        load(PIPELINE if kind == "pipeline" else JOB, overrides)  # raises if a key is the other kind's


def test_methods_lists_each_methods_hyper_parameters_with_their_defaults(capsys):
    assert cli.main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    detail = {line.split()[0]: lines[i + 1].strip() for i, line in enumerate(lines[:-1])
              if line and not line.startswith(" ") and line.split()[0] in ("hamu-q", "npo", "surgery-implicit", "scrub")}
    assert detail["hamu-q"].startswith("rule hamu-q; hparams: constraint (required), radius=lr, full_grad=false")
    assert detail["npo"] == "rule gdiff; hparams: none; objective: beta=0.1"
    assert detail["surgery-implicit"] == ("one backward, no rule; hparams: epsilon=0.0, dual_lr=1.0, "
                                          "initial_weight=1.0, fast=false")
    assert detail["scrub"] == "rule gdiff; hparams: none; objective: kl_weight=1.0, ce_weight=1.0, temperature=1.0"
