"""`hamu-ray …` entry points: one parser block and one handler per command.

Handlers import what they need when they run, so `--help` and `validate` stay light: neither
imports Ray (nor `--help` torch)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from hamu_ray.bench import METHODS as BENCH_METHODS, MODELS as BENCH_MODELS
from hamu_ray.errors import UserError

ADDRESS_HELP = ("the Ray dashboard's HTTP address, e.g. http://HEAD:8265 "
                "(default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS)")
# KEY=VALUE examples per kind of YAML: a pipeline's keys are refused in a job, and back
PIPELINE_OVERRIDES = "unlearn.lr=0.02 methods.0.hparams.constraint=0.1"
JOB_OVERRIDES = "train.lr=0.02 method.hparams.constraint=0.1"
METHOD_HELP = ("with a pipeline YAML: the job of its method with this label, on the sets and "
               "original model `hamu-ray run` made (kept in its output_dir)")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return args.handler(args)
    except UserError as exc:  # one line; any other exception is a bug and keeps its traceback
        print(f"hamu-ray: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (`… | head`): stop quietly, as a SIGPIPE'd tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush would raise again
        return 128 + signal.SIGPIPE


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills a '*' positional only once: KEY=VALUE given after an option lands in `extra`
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def add_overrides(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"KEY=VALUE overrides of the YAML, e.g. {example} (dotted keys, integers "
                        "index lists, values read as YAML)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hamu-ray", description="Machine unlearning on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a pipeline: prepare, train, unlearn, evaluate, compare")
    run.add_argument("pipeline", help="pipeline YAML (see pipelines/)")
    add_overrides(run, PIPELINE_OVERRIDES)
    run.add_argument("--strict", action="store_true", help="exit 1 when a method diverged or took no "
                     "step (its row says so; by default a warning, and exit 0 once the table is out)")
    run.set_defaults(handler=run_command)

    report = commands.add_parser("report", help="a finished run's table for the README: the table, its notes "
                                 "and spread under one line saying when, where and at which commit it ran")
    report.add_argument("run_dir", help="the pipeline's output_dir")
    report.add_argument("--columns", type=lambda text: text.split(","), metavar="A,B,…",
                        help="only these columns of the table, in this order (e.g. "
                        "model,forget_prob,model_utility,recovered_prob_relearn)")
    report.set_defaults(handler=report_command)

    tune = commands.add_parser("tune", help="search a method's threshold with Ray Tune (the tune: section)")
    tune.add_argument("pipeline", help="pipeline YAML with a tune: section; running it again resumes")
    add_overrides(tune, PIPELINE_OVERRIDES)
    tune.set_defaults(handler=tune_command)

    bench = commands.add_parser("bench", help="time every method's step side by side (ZeRO 0-3, 1-2 workers)")
    bench.add_argument("--models", default=",".join(BENCH_MODELS),
                       help="comma-separated: mlp, llama-fp32, llama-bf16, llama-lora")
    bench.add_argument("--methods", default=",".join(BENCH_METHODS), help="comma-separated subset")
    bench.add_argument("--stages", default="0,1,2,3", help="ZeRO stages, comma-separated")
    bench.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    bench.add_argument("--steps", type=int, default=20, help="timed steps per case (after warm-up)")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--hidden", type=int, default=1024, help="MLP width")
    bench.add_argument("--llama-size", choices=("micro", "tiny", "1b"), default="tiny",
                       help="micro (~0.07M), tiny (~0.85M, the tests' model) or 1b (a GPU)")
    bench.add_argument("--llama-dir", default="",
                       help="time this saved Llama (a from_pretrained directory) instead of building one")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--zero-config", default="{}",
                       help='JSON merged into DeepSpeed\'s zero_optimization, e.g. \'{"overlap_comm": true}\'')
    bench.add_argument("--small", action="store_true", help="tiny shapes and 3 steps: every row, fast")
    bench.add_argument("--out", default="bench", help="directory for bench.json and bench.md")
    bench.add_argument("--tracking-uri", help="also log to this MLflow tracking URI")
    bench.set_defaults(handler=bench_command)

    receipt = commands.add_parser("receipt", help="check an unlearning receipt, or prove a forget row was in it")
    steps = receipt.add_subparsers(dest="action", required=True)
    verify = steps.add_parser("verify", help="recompute the signature and the digests of the model and the forget set")
    verify.add_argument("receipt", help="receipt.json of an unlearning job")
    verify.add_argument("--model", help="the job's output directory (its model files are hashed)")
    prove = steps.add_parser("prove", help="the Merkle inclusion proof of one forget row")
    prove.add_argument("receipt", help="receipt.json of an unlearning job")
    prove.add_argument("--row", type=int, required=True, help="the row's index in the file, from 0")
    chain = steps.add_parser("verify-chain", help="walk a model's lineage of deletion requests (`hamu-ray "
                             "forget`) and check every link, receipt, model digest and signature")
    chain.add_argument("name", help="the registered model's name")
    chain.add_argument("--tracking-uri", help="the registry's MLflow URI (default: $MLFLOW_TRACKING_URI)")
    chain.set_defaults(handler=verify_chain_command)
    for step in (verify, prove):
        step.add_argument("--forget", help="the forget file (its Merkle root is recomputed; default: the "
                          "path the receipt records)")
        step.add_argument("--key", help="the digest key file the row digests are keyed by (default: the one "
                          "the receipt names, or $HAMU_RECEIPT_KEY when the job ran with it)")
        step.set_defaults(handler=receipt_command)

    forget = commands.add_parser("forget", help="carry out a deletion request: unlearn its rows from a registered "
                                 "language model or classifier and register the next version, its receipt chained to the last")
    forget.add_argument("request", help="the rows to forget (parquet or JSON lines; the policy's text "
                        "columns, a classifier's input and label columns)")
    forget.add_argument("--model", required=True, help="NAME (its newest version) or NAME/VERSION in the registry")
    forget.add_argument("--config", required=True, help="the policy: a job YAML without data.forget, model.path "
                        "(a classifier's: no model section) and output_dir (method, hyper-parameters, retain set, training, cluster, stop rule)")
    forget.add_argument("--tracking-uri", help="the registry's MLflow URI (default: $MLFLOW_TRACKING_URI)")
    forget.add_argument("--workdir", help="where the requests' jobs and the lineage's digest key live "
                        "(default: runs/forget/NAME)")
    forget.add_argument("--accept-damage", action="store_true", help="go on when the policy's B is beyond the "
                        "damage-free reach the hardness pre-flight measures on this request (retain damage)")
    forget.add_argument("--address", help="submit the request to this Ray cluster as a job (http://HEAD:8265) "
                        "instead of running it here; the request, the policy's files and --workdir by absolute "
                        "path on storage every node sees, the registry an MLflow server")
    forget.add_argument("--runtime-env", help="with --address: YAML with env_vars and pip for the job")
    forget.add_argument("--no-follow", dest="follow", action="store_false",
                        help="with --address: print the job id and return")
    forget.set_defaults(handler=forget_command)

    preflight = commands.add_parser("hardness", help="the hardness pre-flight of a job: how much forget gain "
                                    "its sets allow without retain damage (no step taken)")
    preflight.add_argument("config", help="job YAML (as for `hamu-ray unlearn`), or a pipeline YAML "
                           "with --method")
    add_overrides(preflight, JOB_OVERRIDES)
    preflight.add_argument("--method", metavar="LABEL", help=METHOD_HELP)
    preflight.add_argument("--out", help="new directory for hardness.json/.md/.png (default: output_dir + '-hardness')")
    preflight.add_argument("--rows", type=int, default=64, help="forget rows scored one by one, from the "
                           "first (default 64; each costs one backward)")
    preflight.add_argument("--tracking-uri", help="also log an MLflow run here")
    preflight.set_defaults(handler=hardness_command)

    unlearn = commands.add_parser("unlearn", help="run one unlearning job on the engine")
    unlearn.add_argument("config", help="job YAML: data, model, method, train, cluster, output_dir")
    add_overrides(unlearn, JOB_OVERRIDES)
    unlearn.set_defaults(handler=unlearn_command)

    validate = commands.add_parser("validate", help="check a pipeline or job YAML; starts nothing")
    validate.add_argument("config", help="pipeline YAML (has methods:) or job YAML (has method: "
                          "and output_dir:)")
    add_overrides(validate, f"{PIPELINE_OVERRIDES} for a pipeline, {JOB_OVERRIDES} for a job")
    validate.add_argument("--skip-inputs", action="store_true", help="do not check that the local "
                          "files and directories it reads exist (e.g. paths on cluster storage)")
    validate.set_defaults(handler=validate_command)

    plan = commands.add_parser("plan", help="per-GPU memory of a causal-LM job's model, from its "
                               "config.json (no weights loaded): does it fit?")
    plan.add_argument("config", help="job YAML with model.kind causal_lm, or a pipeline YAML with --method")
    add_overrides(plan, JOB_OVERRIDES)
    plan.add_argument("--method", metavar="LABEL", help=METHOD_HELP + " (or not yet: a plan reads no data)")
    plan.add_argument("--gpus-per-node", type=int, default=8)
    plan.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU (default 80); with "
                      "--device cpu, GB per CPU worker")
    plan.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="plan for GPUs (default) or for "
                      "CPU workers at ZeRO-3 (every state in the worker's memory)")
    plan.add_argument("--model-config", help="a config.json (or its directory) to size instead of "
                      "model.path's, e.g. where the weights live on cluster storage only")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(handler=plan_command)

    methods = commands.add_parser("methods", help="list the methods, each with its rule and "
                                  "hyper-parameters (and their defaults)")
    methods.set_defaults(handler=methods_command)

    submit = commands.add_parser("submit", help="run a pipeline on a Ray cluster as a Ray job")
    submit.add_argument("pipeline", help="pipeline YAML; validated here before anything is sent")
    add_overrides(submit, PIPELINE_OVERRIDES)
    submit.add_argument("--address", help=ADDRESS_HELP)
    submit.add_argument("--tune", action="store_true", help="run `hamu-ray tune` on it instead of `run`")
    submit.add_argument("--no-follow", dest="follow", action="store_false",
                        help="print the job id and return instead of streaming its logs")
    submit.add_argument("--tracking-uri", help="MLflow tracking URI (an MLflow server on a cluster); "
                        "default: tracking.uri, else $MLFLOW_TRACKING_URI")
    submit.add_argument("--output-dir", help="absolute path on storage every node sees; "
                        "overrides the pipeline's output_dir")
    submit.add_argument("--runtime-env", help="YAML with env_vars and pip for the job "
                        "(e.g. cluster/runtime_env.yaml)")
    submit.set_defaults(handler=submit_command)

    tracking = commands.add_parser("tracking", help="MLflow tracking a command kept on disk while its server "
                                   "did not answer")
    tracking_actions = tracking.add_subparsers(dest="action", required=True)
    upload = tracking_actions.add_parser("upload", help="send a tracking buffer's runs, metrics, artifacts and "
                                         "models to the MLflow server, in order (safe to run again)")
    upload.add_argument("buffer", help="the directory the command named, e.g. OUTPUT_DIR/mlflow-unsent")
    upload.add_argument("--tracking-uri", help="the MLflow server to send it to (default: the one the buffer "
                        "records)")
    upload.set_defaults(handler=tracking_command)

    jobs = commands.add_parser("jobs", help="status, logs or stop of a submitted job")
    actions = jobs.add_subparsers(dest="action", required=True)
    for action, text in (("status", "print the job's status"), ("logs", "print the job's whole log"),
                         ("stop", "stop the job")):
        sub = actions.add_parser(action, help=text)
        sub.add_argument("job_id", help="the id `hamu-ray submit` printed")
        sub.add_argument("--address", help=ADDRESS_HELP)
        sub.set_defaults(handler=jobs_command)
    return parser


def run_command(args) -> int:
    from hamu_ray.pipeline.config import load_pipeline
    from hamu_ray.pipeline.stages import run_pipeline

    result = run_pipeline(load_pipeline(args.pipeline, args.overrides))
    return strict_exit(result.failed, args.strict)


def report_command(args) -> int:
    from hamu_ray.pipeline.run_record import readme_block

    print(readme_block(args.run_dir, args.columns), end="")
    return 0


def strict_exit(failed: dict[str, str], strict: bool) -> int:
    """`run`'s exit status: 1 under --strict when a method diverged or took no step (method →
    its stop cell), else 0 (the table, plots and registry are out either way)."""
    if strict and failed:
        print(f"hamu-ray: --strict: {'; '.join(f'{m}: {stop}' for m, stop in failed.items())}", file=sys.stderr)
        return 1
    return 0


def tune_command(args) -> int:
    from hamu_ray.pipeline.config import load_pipeline
    from hamu_ray.pipeline.tune import run_search

    result = run_search(load_pipeline(args.pipeline, args.overrides))
    if not result.complete:
        return 130  # interrupted (SIGINT): the same command resumes the search
    return 0 if result.chosen is not None else 1


def unlearn_command(args) -> int:
    from hamu_ray.engine.config import load_config
    from hamu_ray.engine.driver import run_unlearning

    result = run_unlearning(load_config(args.config, args.overrides), progress="unlearn")
    print(f"{result.output_dir}: {result.steps} steps, stop {result.stop}")
    return 0


def hardness_command(args) -> int:
    from pathlib import Path

    from hamu_ray import hardness

    if args.rows < 0:
        raise UserError(f"--rows must be ≥ 0, got {args.rows}")
    cfg = job_of(args)
    out = Path(args.out or f"{cfg.output_dir.rstrip('/')}-hardness")
    summary = hardness.main(cfg, out, args.rows, args.tracking_uri)
    print(summary["verdict"])
    print(f"{out}: hardness.json, hardness.md, hardness.png")
    return 0


def validate_command(args) -> int:
    from hamu_ray.engine.config import load_config
    from hamu_ray.pipeline.config import load_pipeline
    from hamu_ray.schema import config_kind, read_yaml

    source = args.config
    if config_kind(read_yaml(source), source) == "pipeline":
        cfg = load_pipeline(source, args.overrides)
        keys = [m.key for m in cfg.methods]
        search = f"; tune: {cfg.tune.method}" if cfg.tune is not None else ""
        what = (f"valid pipeline {cfg.name} ({len(keys)} method{'s' * (len(keys) != 1)}: "
                f"{', '.join(keys)}{search})")
    else:
        cfg = load_config(source, args.overrides)
        what = (f"valid job (method {cfg.method.name}, rule {cfg.method.rule_name}, "
                f"{cfg.cluster.num_workers} workers, output_dir {cfg.output_dir})")
    print(f"{source}: {what}; {checked_inputs(cfg, source, args.skip_inputs)}")
    return 0


def checked_inputs(cfg, source: str, skip: bool) -> str:
    """What validate says of the inputs: their paths exist here (else one error naming each),
    or that they were not checked. Their content is read when a command runs."""
    from hamu_ray.inputs import local_inputs, missing_inputs
    from hamu_ray.schema import ConfigError

    if skip:
        return "inputs not checked (--skip-inputs)"
    missing = missing_inputs(cfg)
    if missing:
        raise ConfigError("\n".join([*(f"{source}: {field}: no such file or directory: {path}"
                                       for field, path in missing),
                                     "(--skip-inputs for paths on another machine's storage)"]))
    found = len(local_inputs(cfg))
    if not found:
        return "it names no local input"
    return f"its {found} local input{'s' * (found != 1)} exist (their content is read when it runs)"


def plan_command(args) -> int:
    import json

    from hamu_ray import plan

    cfg = job_of(args, needs_sets=False)
    result = plan.plan(cfg, device=args.device, gpus_per_node=args.gpus_per_node,
                       gpu_memory_gb=args.gpu_memory, model_config=args.model_config)
    print(json.dumps(plan.as_dict(result), indent=2) if args.json else plan.describe(result))
    return 0 if result.fits else 1


def job_of(args, *, needs_sets: bool = True):
    """The job a command works on: a job YAML, or with --method one method's job of a pipeline."""
    from hamu_ray.engine.config import load_config
    from hamu_ray.schema import config_kind, read_yaml

    if args.method is None:
        return load_config(args.config, args.overrides)
    if config_kind(read_yaml(args.config), args.config) != "pipeline":
        raise UserError(f"--method {args.method}: {args.config} is a job, not a pipeline; "
                        "leave --method out")
    from hamu_ray.pipeline.config import load_pipeline
    from hamu_ray.pipeline.stages import method_job

    return method_job(load_pipeline(args.config, args.overrides), args.method, needs_sets=needs_sets)


def bench_command(args) -> int:
    from pathlib import Path

    from hamu_ray import bench
    from hamu_ray.bench import runner

    def listed(text: str, flag: str, valid, convert=str) -> list:
        try:
            values = [convert(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = None
        if not values or any(v not in valid for v in values):
            raise UserError(f"--{flag} {text!r}: expected a comma-separated subset of "
                            f"{', '.join(map(str, valid))}")
        return values

    spec = runner.BenchSpec(
        models=listed(args.models, "models", BENCH_MODELS),
        methods=listed(args.methods, "methods", BENCH_METHODS),
        stages=listed(args.stages, "stages", (0, 1, 2, 3), int),
        workers=listed(args.workers, "workers", range(1, 65), int),
        steps=args.steps, warmup=args.warmup, hidden=args.hidden, llama_size=args.llama_size,
        device=args.device, zero=zero_config(args.zero_config), llama_dir=args.llama_dir)
    if args.llama_dir and not Path(args.llama_dir, "config.json").is_file():
        raise UserError(f"--llama-dir {args.llama_dir}: no config.json there (a from_pretrained directory)")
    if args.small:
        for key, value in bench.SMALL.items():
            setattr(spec, key, value)
    if spec.steps < 1 or spec.warmup < 0:
        raise UserError(f"--steps must be ≥ 1 and --warmup ≥ 0, got {spec.steps} and {spec.warmup}")
    bench.main(spec, Path(args.out), args.tracking_uri)
    return 0


def receipt_command(args) -> int:
    import json
    from pathlib import Path

    from hamu_ray import digests, receipt

    content = receipt.load(args.receipt)
    forget = receipt_forget_file(args, content)
    key = receipt.forget_key(content, Path(args.receipt).parent, args.key) if forget else None
    if args.action == "prove":
        if forget is None:
            raise receipt.ReceiptError(f"the forget file the receipt records, {content['forget']['path']}, "
                                       "is not here: pass --forget FILE")
        rows = digests.row_digests(forget, key)
        root = receipt.merkle_root(rows)
        if root != content["forget"]["merkle_root"]:
            raise receipt.ReceiptError(f"--forget {forget}: its Merkle root is not the receipt's; "
                                       "this is not the forget set the receipt commits to")
        proof = receipt.inclusion_proof(rows, args.row)
        print(json.dumps({"row": args.row, "row_digest": rows[args.row], "proof": proof,
                          "merkle_root": root, "tree_rule": receipt.TREE_RULE}, indent=2))
        return 0
    checks = receipt.verify(content, args.model, forget, key)
    if forget is None:
        print(f"skipped  forget set: the file the receipt records, {content['forget']['path']}, is not here "
              "(pass --forget FILE)")
    if not checks:
        raise UserError("receipt verify: nothing to check; give --model DIR and/or --forget FILE")
    for what, ok, detail in checks:
        print(f"{'ok      ' if ok else 'MISMATCH'} {what}: {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


def registry_uri(args) -> str:
    import os

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UserError("give the registry: --tracking-uri URI or $MLFLOW_TRACKING_URI (e.g. sqlite:///runs/x/mlflow.db)")
    return uri


def forget_command(args) -> int:
    from hamu_ray import jobs, lineage

    if args.address:
        return jobs.submit_forget(args.address, args.request, args.model, args.config,
                                  tracking_uri=args.tracking_uri, workdir=args.workdir,
                                  accept_damage=args.accept_damage, runtime_env_file=args.runtime_env,
                                  follow=args.follow)
    if args.runtime_env or not args.follow:
        raise UserError("--runtime-env and --no-follow go with --address (a request submitted to a cluster)")
    version = lineage.forget(args.request, args.model, args.config, registry_uri(args), args.workdir,
                             args.accept_damage)
    print(f"registered {lineage.split_model(args.model)[0]} version {version}")
    return 0


def verify_chain_command(args) -> int:
    import tempfile
    from pathlib import Path

    from mlflow import MlflowClient

    from hamu_ray import lineage

    with tempfile.TemporaryDirectory(prefix="hamu-chain-") as tmp:
        checks = lineage.verify_chain(MlflowClient(registry_uri(args)), args.name, Path(tmp))
    for what, ok, detail in checks:
        print(f"{'ok      ' if ok else 'MISMATCH'} {what}: {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


def receipt_forget_file(args, content: dict) -> str | None:
    """--forget, else the path the receipt records when it is here (None: it is not)."""
    from pathlib import Path

    from hamu_ray import receipt

    path = args.forget or content["forget"]["path"]
    if "://" in path or Path(path).exists():
        return path
    if args.forget is not None:
        raise receipt.ReceiptError(f"--forget {path}: no such file")
    return None


def zero_config(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"--zero-config {text!r}: not JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise UserError(f"--zero-config {text!r}: expected a JSON object")
    return value


def methods_command(args) -> int:
    from hamu_ray.objectives import METHODS, hyper_parameters

    print("Each method: what it does; its rule (method.rule runs it under another), method.hparams "
          "and method.objective with their defaults.\n")
    for name, method in METHODS.items():
        rule = "one backward, no rule" if method.implicit else f"rule {method.rule}"
        sections = [f"{section}: {listed(params)}" for section, params in hyper_parameters(method).items()
                    if params or section == "hparams"]
        print(f"{name:18} {method.summary}\n{'':18} {rule}; {'; '.join(sections)}")
    return 0


def listed(params: dict) -> str:
    """name=default, …; a required one as `name (required)`; YAML's true/false."""
    import dataclasses

    def entry(name: str, default) -> str:
        if default is dataclasses.MISSING:
            return f"{name} (required)"
        return f"{name}={str(default).lower() if isinstance(default, bool) else default}"
    return ", ".join(entry(name, default) for name, default in params.items()) or "none"


def submit_command(args) -> int:
    from hamu_ray import jobs

    return jobs.submit(args.address, args.pipeline, tune=args.tune, follow=args.follow,
                       tracking_uri=args.tracking_uri, output_dir=args.output_dir,
                       runtime_env_file=args.runtime_env, overrides=args.overrides)


def tracking_command(args) -> int:
    from pathlib import Path

    from hamu_ray.pipeline import tracking

    result = tracking.upload(Path(args.buffer), args.tracking_uri)
    if result.uploaded_file is None:
        print(f"{args.buffer}: nothing to upload, everything in it was uploaded before")
    else:
        before = result.operations - result.sent
        print(f"{result.uri}: {result.sent} operations uploaded" + (f" ({before} were before)" if before else "")
              + f"; the buffer is done: {result.uploaded_file}")
    return 0


def jobs_command(args) -> int:
    from hamu_ray import jobs

    if args.action == "status":
        state, message = jobs.status(args.address, args.job_id)
        print(f"{args.job_id}: {state}" + (f" ({message})" if message else ""))
    elif args.action == "logs":
        sys.stdout.write(jobs.logs(args.address, args.job_id))
    else:
        was_running = jobs.stop(args.address, args.job_id)
        print(f"{args.job_id}: " + ("stop requested" if was_running else "was not running"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
