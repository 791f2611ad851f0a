"""`hamu-ray hardness JOB.yaml`: the hardness pre-flight's report, before any unlearning step.

The engine measures (hamu_ray.engine.driver.run_preflight, on the job's own workers and ZeRO
stage); hamu_ray.rules.hardness reads the numbers; this module names the forget rows by index and
keyed digest (hamu_ray.digests, the output's own key; never their content), writes hardness.json /
hardness.md / hardness.png into a new directory, and logs an MLflow run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hamu_ray import digests
from hamu_ray.errors import OutputExistsError
from hamu_ray.files import staging_dir
from hamu_ray.rules import BlockStats, hardness

SHOWN_ROWS = 10  # rows listed in hardness.md (hardness.json has every scored row)


def rule_figures(cfg) -> dict:
    """What the job's rule sees: its radius, constraint, convention, blocks and clipping (HAMU's
    own; any other rule is read as HAMU-Q at the lr radius, per block, with no B to judge)."""
    name, hparams = cfg.method.rule_name, cfg.method.hparams
    figures = {"radius": "lr", "reciprocal": False, "full_grad": False, "constraint": None,
               "constraint_unit": "absolute", "clip_norm": cfg.train.clip_norm}
    if name in ("hamu-q", "hamu-u") and not cfg.method.spec.implicit:
        figures.update(radius=hparams.get("radius", "lr"), reciprocal=name == "hamu-u",
                       full_grad=bool(hparams.get("full_grad", False)), constraint=float(hparams["constraint"]),
                       constraint_unit=hparams.get("constraint_unit", "absolute"))
    return figures


def build_report(cfg, raw: dict, sets: dict, key_dir: Path) -> dict:
    """The report's numbers; scored forget rows are named by their digest under `key_dir`'s key."""
    stats = BlockStats.from_tensor(torch.tensor(raw["stats"], dtype=torch.float64))
    summary = hardness.summarize(stats, lr=cfg.train.lr, names=raw["names"],
                                 batch_rr=torch.tensor(raw["batch_rr"], dtype=torch.float64),
                                 batch_ff=torch.tensor(raw["batch_ff"], dtype=torch.float64), **rule_figures(cfg))
    table = torch.tensor(raw["rows"], dtype=torch.float64).reshape(-1, 2)
    cosines = hardness.row_alignment(float(stats.rr.sum()), table)
    summary["rows"] = scored_rows(sets["forget"], cosines, key_dir)
    summary["job"] = {"method": cfg.method.name, "rule": cfg.method.rule_name, "zero_stage": cfg.train.zero_stage,
                      "workers": cfg.cluster.num_workers, "bf16": cfg.train.bf16,
                      "sets": {name: {"rows": sets[name].num_rows, "sha256": digest}  # the workers'
                               for name, digest in raw["set_digests"].items()}}
    return summary


def scored_rows(forget, cosines: list[float], key_dir: Path) -> dict:
    """The scored forget rows by index and keyed digest, most conflicting first (no key is made
    when no row was scored)."""
    rows = {"scored": len(cosines), "of": forget.num_rows, "by_conflict": []}
    if cosines:
        key = digests.output_key(key_dir)
        names = digests.row_digests(forget.path, key)[:len(cosines)]
        scored = [{"row": i, "digest": name, "cosine": cos} for i, (name, cos) in enumerate(zip(names, cosines))]
        rows.update(by_conflict=sorted(scored, key=lambda r: -r["cosine"]),
                    digest_key={"id": key.id, "from": key.source if key.file is None else key.file.name})
    return rows


def markdown(summary: dict) -> str:
    lines = ["# Hardness pre-flight", "", summary["verdict"], "",
             f"- largest B without retain damage: {summary['max_constraint_without_damage']:.6g}",
             f"- largest feasible B: {summary['max_feasible_constraint']:.6g}",
             f"- largest B one step on a typical pair of batches reaches: "
             f"{summary['max_feasible_constraint_per_batch']:.6g}",
             f"- the paper's right-hand side (Σ R‖g_f‖ sin θ): {summary['paper_rhs']:.6g}",
             f"- whole-model cos θ: {summary['cosine_whole_model']:.4f}; conflicting blocks "
             f"{summary['conflicting_blocks']} of {len(summary['blocks'])}", "",
             "| block | cos θ | R | reach | reach without raising its own retain loss |", "|---|---|---|---|---|"]
    lines += [f"| {b['name']} | {b['cosine']:.3f} | {b['radius']:.3g} | {b['reach']:.3g} | "
              f"{b['reach_without_own_damage']:.3g} |" for b in summary["blocks"]]
    rows = summary["rows"]
    lines += ["", f"Forget rows most aligned with the retain gradient ({rows['scored']} of {rows['of']} scored; "
              "index in the file, the row's digest keyed by this directory's digest key, as in a receipt "
              "made with that key):", "",
              "| row | cos(g_r, g_f,row) | digest |", "|---|---|---|"]
    lines += [f"| {r['row']} | {r['cosine']:.3f} | {r['digest'][:16]}… |" for r in rows["by_conflict"][:SHOWN_ROWS]]
    return "\n".join(lines) + "\n"


def write(summary: dict, directory: Path) -> None:
    """hardness.json, hardness.md and hardness.png."""
    from hamu_ray.pipeline import plots

    (directory / "hardness.json").write_text(json.dumps(summary, indent=1))
    (directory / "hardness.md").write_text(markdown(summary))
    plots.preflight(summary, directory / "hardness.png")


def log_to_mlflow(uri: str, summary: dict, out: Path) -> None:
    """One run in the experiment hamu-ray-hardness: the figures as metrics, the three files."""
    from hamu_ray.pipeline.tracking import Tracker

    metrics = {key: summary[key] for key in ("max_constraint_without_damage", "max_feasible_constraint",
                                             "max_feasible_constraint_per_batch", "paper_rhs",
                                             "cosine_whole_model", "conflicting_blocks")}
    metrics.update({f"cosine/{b['name']}": b["cosine"] for b in summary["blocks"]})
    tracker = Tracker(uri, "hamu-ray-hardness", artifact_root=out / "mlflow-artifacts",
                      buffer_dir=out / "mlflow-unsent", check=False)  # checked before the workers
    params = {"method": summary["job"]["method"], "rule": summary["job"]["rule"], "lr": summary["lr"],
              "radius": summary["radius"], "constraint": summary["constraint"],
              "constraint_unit": summary.get("constraint_unit", "absolute")}
    with tracker.run("hardness", params=params):
        tracker.log_metrics(metrics)
        for name in ("hardness.json", "hardness.md", "hardness.png"):
            tracker.log_artifact(out / name)
    tracker.finish()


def main(cfg, out: Path, rows: int, tracking_uri: str | None) -> dict:
    from hamu_ray.engine.driver import run_preflight
    from hamu_ray.pipeline.tracking import check_reachable

    if out.exists():  # before any worker starts
        raise OutputExistsError(f"--out {out} already exists; choose a new one (nothing is overwritten)")
    if tracking_uri:
        check_reachable(tracking_uri)  # down later: the run waits in out/mlflow-unsent
    raw, sets = run_preflight(cfg, rows)
    with staging_dir(out) as staging:  # a new directory, renamed into place when complete
        summary = build_report(cfg, raw, sets, key_dir=staging)
        write(summary, staging)
    if tracking_uri:
        log_to_mlflow(tracking_uri, summary, out)
    return summary
