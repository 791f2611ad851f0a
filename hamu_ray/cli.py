"""`hamu-ray …` entry points: one parser block and one handler per command."""

from __future__ import annotations

import argparse
import logging
import sys

from hamu_ray.config import ConfigError
from hamu_ray.jobs import JobsError

# User mistakes and unreachable clusters print one message and exit 2, never a traceback.
USER_ERRORS = (ConfigError, JobsError, FileExistsError, FileNotFoundError, ValueError)
ADDRESS_HELP = ("the Ray dashboard's HTTP address, e.g. http://HEAD:8265 "
                "(default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except USER_ERRORS as exc:
        print(f"hamu-ray: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hamu-ray", description="Machine unlearning on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a pipeline: prepare, train, unlearn, evaluate, compare")
    run.add_argument("pipeline", help="pipeline YAML (see pipelines/)")
    run.set_defaults(handler=run_command)

    tune = commands.add_parser("tune", help="search a method's threshold with Ray Tune (the tune: section)")
    tune.add_argument("pipeline", help="pipeline YAML with a tune: section; running it again resumes")
    tune.set_defaults(handler=tune_command)

    unlearn = commands.add_parser("unlearn", help="run one unlearning job on the engine")
    unlearn.add_argument("config", help="job YAML: data, model, method, train, cluster, output_dir")
    unlearn.set_defaults(handler=unlearn_command)

    methods = commands.add_parser("methods", help="list the methods a pipeline can use")
    methods.set_defaults(handler=methods_command)

    submit = commands.add_parser("submit", help="run a pipeline on a Ray cluster as a Ray job")
    submit.add_argument("pipeline", help="pipeline YAML; validated here before anything is sent")
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
    from hamu_ray.config import load_pipeline
    from hamu_ray.pipeline import run_pipeline

    run_pipeline(load_pipeline(args.pipeline))
    return 0


def tune_command(args) -> int:
    from hamu_ray.config import load_pipeline
    from hamu_ray.tune import run_search

    result = run_search(load_pipeline(args.pipeline))
    if not result.complete:
        return 130  # interrupted (SIGINT): the same command resumes the search
    return 0 if result.chosen is not None else 1


def unlearn_command(args) -> int:
    from hamu_ray.config import load_config
    from hamu_ray.driver import run_unlearning

    result = run_unlearning(load_config(args.config), progress="unlearn")
    print(f"{result.output_dir}: {result.steps} steps, stop {result.stop}")
    return 0


def methods_command(args) -> int:
    from hamu_ray.objectives import METHODS

    for name, method in METHODS.items():
        print(f"{name:18} {method.summary}")
    return 0


def submit_command(args) -> int:
    from hamu_ray import jobs

    return jobs.submit(args.address, args.pipeline, tune=args.tune, follow=args.follow,
                       tracking_uri=args.tracking_uri, output_dir=args.output_dir,
                       runtime_env_file=args.runtime_env)


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
