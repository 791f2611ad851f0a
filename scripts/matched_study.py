"""Every method tuned with the same trial budget at matched forgetting, then run at several seeds.

    python scripts/matched_study.py STUDY.yaml [--trials N] [--seeds N] [KEY=VALUE ...]

STUDY.yaml names a pipeline whose monitor stops each run at a forget target (`monitor.stop_at`:
the oracle's forget probability, or a number), the trials every method gets, the seeds, and per
method label the space `hamu-ray tune` searches (its `tune.space`), and optionally `overrides`
(KEY=VALUE settings of the pipeline that the study changes, e.g. a larger step cap). For each method the study
runs one search ranked at matched forgetting (`tune.rank: matched`: the most model utility
among the trials that reached the target; no ASHA, every trial runs to its stop), then the
pipeline again with each method at its chosen settings (label `<label>-tuned`) at `seeds` data
seeds: the comparison `hamu-ray report OUTPUT_DIR/tuned` prints with each difference against the
seeds' spread. A method whose search reached the target in no trial is left out, and said so.
KEY=VALUE overrides on the command line apply after the study's own (e.g. data.source=fictitious-qa
output_dir=...).
Every search and run is cached in the pipeline's output directory: running the study again
resumes it. Writes OUTPUT_DIR/tune/study/*.yaml (the searches' and the comparison's pipelines) and
OUTPUT_DIR/tune/study/chosen.json (beside the searches: a pipeline's output directory holds
nothing else).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import yaml

STUDY_KEYS = {"pipeline", "trials", "seeds", "spaces", "overrides"}


def load_study(path: Path) -> dict:
    """The study file, checked: its keys, and a space for at least one method."""
    study = yaml.safe_load(path.read_text())
    if not isinstance(study, dict) or set(study) - STUDY_KEYS or not {"pipeline", "spaces"} <= set(study):
        raise SystemExit(f"{path}: a study is a mapping of pipeline, spaces (method label → tune.space), "
                         f"and optionally trials, seeds and overrides; got {sorted(study) if isinstance(study, dict) else study!r}")
    if not isinstance(study["spaces"], dict) or not study["spaces"]:
        raise SystemExit(f"{path}: spaces: give at least one method label and its tune.space")
    overrides = study.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise SystemExit(f"{path}: overrides: a list of KEY=VALUE strings (e.g. unlearn.max_steps=200); "
                         f"got {overrides!r}")
    return study


def study_pipeline(study: dict, overrides: list[str]) -> dict:
    """The study's pipeline with its own overrides, then `overrides` (the command line's)."""
    from hamu_ray.schema import apply_overrides

    raw = yaml.safe_load(Path(study["pipeline"]).read_text())
    return apply_overrides(raw, [*study.get("overrides", []), *overrides], study["pipeline"])


def search_pipeline(raw: dict, label: str, space: dict, trials: int) -> dict:
    """The pipeline of one method's search: its tune section at matched forgetting."""
    searched = copy.deepcopy(raw)
    searched["tune"] = {"method": label, "space": space, "num_samples": trials, "rank": "matched",
                        "scheduler": None, "seed": 0}
    return searched


def tuned_entry(cfg, label: str, params: dict) -> dict:
    """The methods entry of `label` at a search's chosen `params` (as its trials ran them)."""
    entry = cfg.method_entry(label)
    method, train = cfg.trial_settings(entry, params)
    return {**method.model_dump(include={"name", "rule", "objective", "hparams"}), "label": f"{label}-tuned",
            "train": {**entry.train, "lr": train.lr}}


def comparison_pipeline(raw: dict, entries: list[dict]) -> dict:
    """The pipeline that runs every tuned method (and only those) beside the original and oracle."""
    compared = copy.deepcopy(raw)
    compared.pop("tune", None)
    compared.update(name=f"{raw['name']}-tuned", methods=entries)
    return compared


def chosen_params(cfg) -> dict | None:
    """The chosen trial's parameters of the pipeline's search (best.json), None if none qualified."""
    from hamu_ray.pipeline.tune import search_key

    best = Path(cfg.output_dir).resolve() / "tune" / f"search-{search_key(cfg)}" / "report" / "best.json"
    chosen = json.loads(best.read_text())["chosen"]
    return None if chosen is None else chosen["params"]


def hamu_ray(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "hamu_ray.cli", *args], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--trials", type=int, help="trials per method (default: the study's, else 6)")
    parser.add_argument("--seeds", type=int, help="seeds of the comparison (default: the study's, else 3)")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the pipeline")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hamu_ray.engine.config import parse_config
    from hamu_ray.pipeline.config import PipelineConfig

    study = load_study(args.study)
    trials, seeds = args.trials or study.get("trials", 6), args.seeds or study.get("seeds", 3)
    raw = study_pipeline(study, args.overrides)
    out = Path(raw["output_dir"]).resolve()
    written = out / "tune" / "study"
    written.mkdir(parents=True, exist_ok=True)
    entries, chosen = [], {}
    for label, space in study["spaces"].items():
        searched = search_pipeline(raw, label, space, trials)
        path = written / f"search-{label}.yaml"
        path.write_text(yaml.safe_dump(searched, sort_keys=False))
        print(f"[study] {label}: {trials} trials at matched forgetting", flush=True)
        hamu_ray("tune", str(path))
        cfg = parse_config(searched, source=str(path), schema=PipelineConfig)
        chosen[label] = chosen_params(cfg)
        if chosen[label] is None:
            print(f"[study] {label}: no trial reached the forget target; left out of the comparison", flush=True)
        else:
            entries.append(tuned_entry(cfg, label, chosen[label]))
    (written / "chosen.json").write_text(json.dumps({"trials": trials, "chosen": chosen}, indent=2))
    if not entries:
        print("[study] no method reached the forget target: nothing to compare", flush=True)
        return 1
    path = written / "tuned.yaml"
    path.write_text(yaml.safe_dump(comparison_pipeline(raw, entries), sort_keys=False))
    hamu_ray("run", str(path), f"seeds={seeds}")
    print(f"[study] the comparison: hamu-ray report {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
