"""Publishing a pipeline's models: the MLflow model registry and the finished receipts.

Every model a pipeline publishes (the original it trained, each unlearned model) is logged as an
MLflow model — a language model's Hugging Face directory as it is, with a pyfunc loader
(registered_lm.py), its weights never loaded on the driver; a classifier in the pytorch flavour,
with its weights file and shape beside it (what `hamu-ray forget` unlearns from) —
and registered as a version of one registered model (`tracking.registered_model`, default the
pipeline's name). An unlearned model is published after the evaluation: its receipt
first gains the evaluation against the oracle and the verdict, then is logged to the method's
run, and the version's tags carry the model's digest (receipt.MODEL_RULE, as in receipts), the
receipt's sha256 and forget-set Merkle root, the method, and the original's version (or the
original's digest when the original is the user's own): "which model forgot what" is a registry
query, and "which original did this forget" one by hash. A model already registered (same weights, same
forget set) is not registered again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hamu_ray.pipeline.outcomes import KS_LEVEL

def publish_unlearned(cfg, stages: dict, rows: list[dict], tracker, original_version: str | None) -> None:
    """For every method that left a model (not one that diverged): the receipt completed with
    its evaluation, logged to the method's run, and the model registered there."""
    by_model = {row["model"]: row for row in rows}
    for entry in cfg.methods:
        stage = stages.get(entry.key)
        if stage is None:  # diverged: no model, no receipt
            continue
        complete_receipt(cfg, stage.directory / "receipt.json", by_model[entry.key],
                         by_model["original"], by_model.get("oracle"))
        with tracker.run(stage.name, run_id=stage.run_id):
            tracker.log_artifact(stage.directory / "receipt.json")
            version = register(tracker, cfg, stage, role="unlearned", original_version=original_version)
            tracker.set_tags({"registered_version": version})


EVALUATED = {False: ("forget_acc", "test_acc_retained", "forget_quality", "mia_auc", "avg_gap"),
             True: ("forget_prob", "forget_fact", "forget_rouge", "model_utility", "forget_quality", "mia_auc",
                    "priv_leak")}


def complete_receipt(cfg, path: Path, row: dict, original: dict, oracle: dict | None) -> None:
    """Add the evaluation (this model, the original and the oracle on the same metrics) and its
    verdict to a stage's receipt; the file is replaced only when that changes it."""
    from hamu_ray import files, receipt

    keys = EVALUATED[cfg.is_lm]
    evaluation = {"against": "oracle" if oracle is not None else None,
                  "model": {k: row.get(k) for k in keys}, "original": {k: original.get(k) for k in keys},
                  "oracle": {k: oracle.get(k) for k in keys} if oracle is not None else None}
    metric = "prob" if cfg.is_lm else "acc"
    attacks = attack_record(row, oracle, metric)
    if attacks:
        evaluation["attacks"] = attacks
    current = receipt.load(str(path))
    verdict = evaluation_verdict(cfg.is_lm, evaluation) + attack_verdict(attacks, metric)
    updated = receipt.with_evaluation(current, evaluation, verdict)
    if updated != current:
        files.write_atomic(path, json.dumps(updated, indent=2))


def evaluation_verdict(is_lm: bool, evaluation: dict) -> str:
    model, original, oracle = evaluation["model"], evaluation["original"], evaluation["oracle"]
    forget, utility = ("forget_prob", "model_utility") if is_lm else ("forget_acc", "test_acc_retained")
    forget_name = "answer probability on the forget set" if is_lm else "accuracy on the forget set"
    utility_name = "model utility" if is_lm else "test accuracy on the retained classes"
    text = f"Its {forget_name} is {model[forget]:.3g} (original {original[forget]:.3g}"
    text += f", oracle {oracle[forget]:.3g})" if oracle is not None else ")"
    text += f"; its {utility_name} is {model[utility]:.3g} (original {original[utility]:.3g})."
    quality = model.get("forget_quality")
    if oracle is None or quality is None:
        return text + " Without an oracle (a model trained without the forget set) forget quality is not measured."
    untouched = original.get("forget_quality")
    if untouched is not None and untouched >= KS_LEVEL:
        return text + (f" Forget quality {quality:.3g}: the test has no power here: the original itself scores "
                       f"FQ {untouched:.3g} (KS test, p ≥ 0.05), so it cannot tell even the untouched original "
                       "from the oracle, and says nothing of what this model forgot.")
    if quality >= KS_LEVEL:
        return text + (f" Forget quality {quality:.3g}: on the forget set it cannot be told apart from the "
                       "oracle (KS test, p ≥ 0.05).")
    return text + (f" Forget quality {quality:.3g}: on the forget set it can still be told apart from the "
                   "oracle (KS test, p < 0.05).")


def attack_record(row: dict, oracle: dict | None, metric: str) -> dict:
    """Per attack in the row (its recovered_<metric>_<attack> column; metric prob, a classifier's
    acc): the model's forget <metric> after it, the share of its forgetting the attack undid, and
    the oracle's share, the floor."""
    recovered = f"recovered_{metric}_"
    names = [k.removeprefix(recovered) for k in row if k.startswith(recovered) and not k.endswith("_sd")]
    return {name: {f"forget_{metric}": row.get(f"forget_{metric}_{name}"), f"recovered_{metric}": row[recovered + name],
                   f"oracle_recovered_{metric}": oracle.get(recovered + name) if oracle is not None else None}
            for name in names}


def attack_verdict(attacks: dict, metric: str) -> str:
    """A sentence on what each attack of attack_record(..., metric) brought back, beside the
    oracle's floor; empty without attacks."""
    if not attacks:
        return ""
    share = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731 (None: the model is the original's)
    parts = []
    for name, a in attacks.items():
        floor = a[f"oracle_recovered_{metric}"]
        parts.append(f"{name} {share(a[f'recovered_{metric}'])}" + (f" (oracle {share(floor)})" if floor is not None else ""))
    return (f" Attacks brought back this share of its forgetting (forget {'probability' if metric == 'prob' else 'accuracy'}; "
            "0 none, 1 all; the oracle's share is the floor, what a model that never learned the rows gains): "
            + "; ".join(parts) + ".")


def register(tracker, cfg, stage, *, role: str, original_version: str | None = None) -> str:
    """Log the stage's exported model in the active run and register it; returns the version.
    A model registered before keeps its version (its receipt's digest tag is brought up to date).
    With the server down, the registration waits in the tracker's buffer (Tracker.register_model)."""
    name = cfg.tracking.registered_model or cfg.name
    return tracker.register_model(name, model_source(cfg, stage), version_tags(stage, role, original_version))


def model_source(cfg, stage) -> dict:
    """What log_model needs to log the stage's model, now or at an upload: a language model's
    directory; a classifier's stage directory and the pipeline's model config."""
    if cfg.is_lm:
        return {"kind": "causal_lm", "model_dir": str(stage.model_dir.resolve())}
    return {"kind": "classifier", "stage_dir": str(stage.directory.resolve()),
            "model": cfg.model.model_dump(mode="json")}


def log_model(source: dict, name: str, tags: dict[str, str]):
    """Log `source`'s model (model_source) in MLflow's active run and register it as a new
    version of `name` with `tags`; returns MLflow's ModelInfo."""
    if source["kind"] == "causal_lm":
        return _log_language_model(Path(source["model_dir"]), name, tags)
    return _log_classifier(source, name, tags)


def version_tags(stage, role: str, original_version: str | None) -> dict[str, str]:
    """`model_sha256` is the exported model's digest by receipt.MODEL_RULE (a weights file's
    sha256, a directory's over its files), the definition receipts use for `model_in` and
    `model_out`: an unlearned version's `original_sha256` is its original's `model_sha256`."""
    from hamu_ray import receipt

    exported = stage.model_dir if stage.model_dir.exists() else stage.weights
    tags = {"role": role, "stage": stage.name, "model_sha256": receipt.model_digest(exported)}
    receipt_path = stage.directory / "receipt.json"
    if receipt_path.exists():
        content = receipt.load(str(receipt_path))
        tags.update(method=content["method"],
                    receipt_sha256=hashlib.sha256(receipt_path.read_bytes()).hexdigest(),
                    forget_merkle_root=content["forget"]["merkle_root"])
        if original_version is not None:
            tags["original_version"] = original_version
        elif (content.get("model_in") or {}).get("sha256"):
            tags["original_sha256"] = content["model_in"]["sha256"]
    return tags


def find_version(client, name: str, model_sha256: str) -> str | None:
    """The version already registered for these exact weights, if any."""
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get("model_sha256") == model_sha256:
            return str(version.version)
    return None


LM_ARTIFACT = "model"  # registered_lm.DIRECTORY
# predict's default; a loader may override it: mlflow.pyfunc.load_model(uri, model_config={...})
LM_MODEL_CONFIG = {"max_new_tokens": 32}


def _log_language_model(model_dir: Path, name: str, tags: dict[str, str]):
    """The model's directory logged as it is (its files copied, never loaded: the driver holds
    no weights, whatever the model's size), with registered_lm.py as its pyfunc loader."""
    import mlflow

    from hamu_ray import quiet

    loader = Path(__file__).with_name("registered_lm.py")
    with quiet.without_artifact_progress():
        return mlflow.pyfunc.log_model(name="model", python_model=str(loader), artifacts={LM_ARTIFACT: str(model_dir)},
                                       model_config=LM_MODEL_CONFIG, registered_model_name=name, tags=tags,
                                       pip_requirements=["transformers", "torch"])


CLASSIFIER_SHAPE = "classifier.json"  # beside a classifier's weights in the version's extra_files/
CLASSIFIER_FIELDS = ("kind", "sizes", "channels")  # what builds it again (tasks.classifier.ClassifierModel)


def _log_classifier(source: dict, name: str, tags: dict[str, str]):
    """The pytorch flavour (a loadable module), and in its extra_files the exported weights file
    (the digest its model_sha256 is) and the shape that builds it: what `hamu-ray forget` unlearns
    from."""
    import tempfile

    import mlflow
    import numpy as np

    from hamu_ray.pipeline.config import PipelineClassifier
    from hamu_ray.tasks.classifier import EXPORT_WEIGHTS, build_model

    weights = Path(source["stage_dir"]) / EXPORT_WEIGHTS
    config = PipelineClassifier.model_validate({**source["model"], "weights": str(weights)})
    module = build_model(config).eval()
    # a shape, not a row of any set; two rows: torch.export fixes a batch dimension of 1 (and
    # says so), and the logged model would then take one row at a time
    example = np.zeros((2, config.sizes[0]), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        shape = Path(tmp) / CLASSIFIER_SHAPE
        shape.write_text(json.dumps(config.model_dump(include=set(CLASSIFIER_FIELDS))))
        # `tags` reach the new version as it is created: a registration cut off half-way is still
        # found by find_version (its model_sha256) when the upload redoes it
        return mlflow.pytorch.log_model(module, name="model", registered_model_name=name, tags=tags,
                                        input_example=example, pip_requirements=["torch"],
                                        extra_files=[str(weights), str(shape)])
