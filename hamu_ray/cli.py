"""`hamu-ray …` entry points."""

from __future__ import annotations

import argparse
import logging
import sys

from hamu_ray.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hamu-ray", description="Machine unlearning on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a pipeline: prepare, train, unlearn, evaluate, compare")
    run.add_argument("pipeline", help="pipeline YAML (see pipelines/)")
    unlearn = commands.add_parser("unlearn", help="run one unlearning job on the engine")
    unlearn.add_argument("config", help="job YAML: data, model, method, train, cluster, output_dir")
    commands.add_parser("methods", help="list the methods a pipeline can use")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        if args.command == "run":
            from hamu_ray.config import load_pipeline
            from hamu_ray.pipeline import run_pipeline

            run_pipeline(load_pipeline(args.pipeline))
        elif args.command == "unlearn":
            from hamu_ray.config import load_config
            from hamu_ray.driver import run_unlearning

            result = run_unlearning(load_config(args.config), progress="unlearn")
            print(f"{result.output_dir}: {result.steps} steps, stop {result.stop}")
        else:
            from hamu_ray.objectives import METHODS

            for name, method in METHODS.items():
                print(f"{name:18} {method.summary}")
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"hamu-ray: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
