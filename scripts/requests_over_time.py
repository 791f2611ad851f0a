"""Deletion requests over time (MUSE's sustainability) on the built-in country QA.

The demo's original model forgets its forget countries through `hamu-ray forget` (lineage.forget,
a registry lineage with chained receipts), either in N sequential requests of an equal share of
the countries each or in one request of them all, under each policy: the default one (HAMU-Q,
B from the pre-flight) and NPO at the demo's settings. After every request, on every row
requested so far: answer probability, fact probability and the relearning attack's recovered
share (the pipeline's attack: fine-tuning on the rows of 10 % of those countries, scored on the
rest); and TOFU's model utility (retain sample and utility set). The original and the oracle
are the references. Writes OUT/requests.json, OUT/requests.md and OUT/utility_vs_requests.png.

    python scripts/requests_over_time.py [--pipeline pipelines/country_qa.yaml] [--out DIR] [--requests 4]

The pipeline's stages (sets, original, oracle) are reused from its output_dir when `make demo`
has made them, trained there otherwise. OUT must not exist (nothing is overwritten).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

FORGET_BATCH = 8  # per worker, in every lineage (the demo's 16 does not fit a quarter request)
POLICIES = {  # what each lineage's requests run with, on top of the demo's unlearning job
    "hamu-q (default)": None,  # the policy without `method`: HAMU-Q, B = half the pre-flight's D*
    "npo": "npo",               # the demo's NPO entry (beta 0.1)
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="pipelines/country_qa.yaml")
    parser.add_argument("--out", default="runs/requests_over_time")
    parser.add_argument("--requests", type=int, default=4, help="sequential requests (an equal share each)")
    parser.add_argument("--render", action="store_true", help="only write the table and plot again from "
                                                               "OUT/requests.json")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if args.render:
        results = json.loads((out / "requests.json").read_text())
    elif out.exists():
        print(f"--out {out}: exists; give a new directory (nothing is overwritten)", file=sys.stderr)
        return 2
    else:
        out.mkdir(parents=True)
        results = study(args.pipeline, out, args.requests)
        (out / "requests.json").write_text(json.dumps(results, indent=2))
    (out / "requests.md").write_text(table(results))
    plot(results, out / "utility_vs_requests.png")
    print(table(results))
    print(f"written: {out}/requests.json, requests.md, utility_vs_requests.png")
    return 0


def study(pipeline: str, out: Path, parts: int) -> dict:
    from hamu_ray.engine.driver import ray_session
    from hamu_ray.pipeline import config, run_record, stages
    from hamu_ray.pipeline.tracking import Tracker

    cfg = config.load_pipeline(pipeline)
    run_dir = Path(cfg.output_dir).resolve()
    uri = f"sqlite:///{out}/mlflow.db"
    prepared = stages.prepare_sets(cfg, run_dir).paths
    with ray_session(cfg.cluster):
        tracker = Tracker(uri, "requests-over-time", artifact_root=out / "mlartifacts", buffer_dir=out / "unsent")
        with tracker.run("references"):
            references = stages.train_references(cfg, prepared, run_dir, tracker)
        original, oracle = references["original"].model_dir, references["oracle"].model_dir
        requests = split_requests(prepared["forget"], parts, cfg.data.seed, out / "requests")
        scorer = Scorer(cfg, prepared)
        results = {"pipeline": cfg.name, "commit": run_record.code_commit(), "machine": run_record.machine(),
                   "requests": parts, "rows": [len(r) for r in requests["rows"]],
                   "references": {"original": scorer.score(original, original, None),
                                  "oracle": scorer.score(oracle, original, None)},
                   "lineages": {}}
        for label, method in POLICIES.items():
            policy = policy_file(cfg, prepared, method, original, out / f"{slug(label)}.yaml")
            for shape, files in (("sequential", requests["files"]), ("one request", [requests["all"]])):
                results["lineages"][f"{label}, {shape}"] = lineage(
                    f"{slug(label)}-{len(files)}", files, requests, policy, original, uri, out, scorer)
                (out / "requests.json").write_text(json.dumps(results, indent=2))  # progress on disk
    return {**results, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def split_requests(forget: str, parts: int, seed: int, into: Path) -> dict:
    """The forget set's entities shuffled by seed and cut into `parts` requests of (nearly)
    equal size, each a parquet of its rows; and one request of every row."""
    from hamu_ray import files

    table = pq.read_table(forget)
    entities = sorted(set(table.column("entity").to_pylist()), key=str)
    random.Random(seed).shuffle(entities)
    if not 1 <= parts <= len(entities):
        raise SystemExit(f"--requests {parts}: between 1 and the forget set's {len(entities)} entities")
    groups = [set(entities[i::parts]) for i in range(parts)]
    column = table.column("entity").to_pylist()
    rows = [[i for i, e in enumerate(column) if e in group] for group in groups]
    into.mkdir(parents=True)
    made = [str(files.write_rows(table.take(r).to_pylist(), into / f"request-{k + 1}.parquet"))
            for k, r in enumerate(rows)]
    return {"rows": rows, "files": made, "all": forget}


def policy_file(cfg, prepared: dict, method: str | None, original: Path, path: Path) -> str:
    """The demo's unlearning job for `method` (None: no method, the command's default) as a
    policy: without what `hamu-ray forget` sets, scored on the demo's retain sample and holdout."""
    import yaml

    from hamu_ray.pipeline import stages

    entry = cfg.method_entry(method or "hamu-q")
    job = stages.unlearning_job(cfg, entry, prepared, original)
    job["data"].pop("forget")
    job["data"]["forget_batch_size"] = FORGET_BATCH  # a quarter of the forget set gives 15 rows per worker
    job["model"].pop("path")
    if method is None:
        job.pop("method")
    job["evaluate"] = {"retain_rows": cfg.data.eval_retain_rows, "holdout": prepared["holdout"],
                       "seed": cfg.data.seed}
    path.write_text(yaml.safe_dump(job))
    return str(path)


def lineage(name: str, requests: list[str], split: dict, policy: str, original: Path, uri: str,
            out: Path, scorer: "Scorer") -> list[dict]:
    """Register the original as `name`'s first version, carry out the requests in order, and
    score each version on every row requested so far."""
    import mlflow

    from hamu_ray import lineage as lineages, receipt
    from hamu_ray.pipeline import registry, tracking

    mlflow.set_tracking_uri(uri)
    experiment = tracking.Store(uri).experiment_id("requests-over-time", str(out / "mlartifacts"))
    with mlflow.start_run(experiment_id=experiment, run_name=f"{name}-original"):
        registry.log_model({"kind": "causal_lm", "model_dir": str(original)}, name,
                           {"role": "original", "model_sha256": receipt.model_digest(original)})
    rows, steps = [], []
    for k, request in enumerate(requests):
        rows += split["rows"][k] if len(requests) > 1 else [i for part in split["rows"] for i in part]
        start = time.monotonic()
        version = lineages.forget(request, name, policy, uri, str(out / "work" / name))
        work = sorted((out / "work" / name).glob("v*-*"), key=lambda p: p.stat().st_mtime)[-1]
        content = receipt.load(str(work / lineages.RECEIPT))
        steps.append({"request": k + 1, "version": version, "rows_so_far": len(rows), "steps": content["steps"],
                      "stop": content["stop"], "wall_s": round(time.monotonic() - start, 1),
                      "constraint": (content["lineage"].get("preflight") or {}).get("constraint"),
                      **scorer.score(receipt.exported_model(work), original, sorted(rows))})
        print(f"[requests] {name} request {k + 1}/{len(requests)}: {json.dumps(steps[-1])}", flush=True)
    return steps


class Scorer:
    """A model's numbers after a request: on the forget rows requested so far (None: all), its
    answer and fact probability and the relearning attack's recovered share; model utility."""

    def __init__(self, cfg, prepared: dict):
        from hamu_ray.pipeline import lm_pipeline

        self.cfg, self.prepared = cfg, prepared
        self.sets = {"forget": prepared["forget"], "retain": prepared["retain_eval"], "utility": prepared["utility"]}
        self.text, self.bf16 = cfg.data.text.model_dump(), cfg.model.dtype == "bf16"
        self.relearn = cfg.robustness.relearn
        self.rows = pq.ParquetFile(prepared["forget"]).metadata.num_rows
        self.entities = pq.read_table(prepared["forget"], columns=[lm_pipeline.ENTITY]).column(0).to_pylist()
        self.original_scores: dict | None = None

    def relearned_rows(self, rows: list[int]) -> tuple[list[int], np.ndarray]:
        """The attack's split of `rows` (lm_pipeline.relearn_split's rule on those rows): the rows of
        a seeded share of their entities to train on, and a mask of the scored rest."""
        from hamu_ray import files
        from hamu_ray.pipeline import lm_pipeline

        with tempfile.TemporaryDirectory() as tmp:
            subset = files.write_rows([{"entity": self.entities[i]} for i in rows], Path(tmp) / "rows.parquet")
            trained, _ = lm_pipeline.relearn_split(str(subset), self.relearn.share, self.cfg.data.seed)
        trained = [rows[i] for i in trained]
        scored = np.zeros(self.rows, dtype=bool)
        scored[sorted(set(rows) - set(trained))] = True
        return trained, scored

    def score(self, model: Path, original: Path, rows: list[int] | None) -> dict:
        from hamu_ray.attacks.recovery import recovered_share
        from hamu_ray.pipeline import lm_evaluate

        rows = list(range(self.rows)) if rows is None else rows
        trained, scored = self.relearned_rows(rows)
        relearning = lm_evaluate.Relearning(self.prepared["forget"], tuple(trained), steps=self.relearn.steps,
                                            lr=self.cfg.relearn_lr, batch_size=self.relearn.batch_size,
                                            seed=self.cfg.data.seed)
        scorings = {"model": lm_evaluate.Scoring("model", str(model), self.sets),
                    "relearned": lm_evaluate.Scoring("relearned", str(model), {"forget": self.sets["forget"]},
                                                     relearning=relearning, attack="relearn")}
        if self.original_scores is None:
            scorings["original"] = lm_evaluate.Scoring("original", str(original), {"forget": self.sets["forget"]})
        scores = lm_evaluate.score_all(scorings, self.text, bf16=self.bf16)
        self.original_scores = self.original_scores or scores["original"]
        mask = np.zeros(self.rows, dtype=bool)
        mask[rows] = True
        now = lm_evaluate.forget_metrics(scores["model"]["forget"], mask)
        before = [lm_evaluate.forget_metrics(s, scored)["forget_prob"]
                  for s in (self.original_scores["forget"], scores["model"]["forget"], scores["relearned"]["forget"])]
        return {"forget_prob": now["forget_prob"], "forget_fact": now["forget_fact"],
                "model_utility": lm_evaluate.model_metrics(scores["model"], None)["model_utility"],
                "recovered_prob_relearn": recovered_share(*before)}


def slug(label: str) -> str:
    return label.split(" ")[0]


def table(results: dict) -> str:
    columns = ("lineage", "request", "rows_so_far", "steps", "stop", "forget_prob", "forget_fact", "model_utility",
               "recovered_prob_relearn", "wall_s")
    where = results["machine"]
    lines = [f"Requests over time on `{results['pipeline']}`'s sets and original, finished {results['finished']} at "
             f"commit {results['commit']} on {where['cpu']}, {where['cores']} cores. Made by "
             "`python scripts/requests_over_time.py`. Forget rows per request: "
             f"{', '.join(map(str, results['rows']))}; metrics on every row requested so far (recovered share: "
             "the relearning attack's).", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, ref in results["references"].items():
        lines.append("| " + " | ".join([name, "–", "all", "–", "–"] + [cell(ref[c]) for c in columns[5:9]] + ["–"]) + " |")
    for name, steps in results["lineages"].items():
        for s in steps:
            lines.append("| " + " | ".join([name] + [cell(s[c], c) for c in columns[1:]]) + " |")
    return "\n".join(lines) + "\n"


def cell(value, column: str = "") -> str:
    if value is None:
        return "–"
    if column == "wall_s":
        return f"{value:.0f}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def plot(results: dict, path: Path) -> None:
    """Model utility after each request (MUSE's sustainability), one line per lineage; the
    original's and the oracle's utility as references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, steps in results["lineages"].items():
        share = [s["rows_so_far"] / sum(results["rows"]) for s in steps]
        ax.plot([0] + share, [results["references"]["original"]["model_utility"]] + [s["model_utility"] for s in steps],
                marker="o", label=name)
    for name, style in (("original", ":"), ("oracle", "--")):
        ax.axhline(results["references"][name]["model_utility"], color="grey", linestyle=style, label=name)
    ax.set_xlabel("share of the forget set requested so far")
    ax.set_ylabel("model utility")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
