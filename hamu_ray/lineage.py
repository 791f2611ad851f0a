"""Deletion requests over time: `hamu-ray forget` and `hamu-ray receipt verify-chain`.

A request unlearns its rows from a registered model's version (by default the newest; a causal
language model, or a classifier registered with its weights and shape) and registers the result as the next version, whose receipt is chained to its parent's: the
parent's version, receipt sha256 and model digest, this request's rows (their keyed digests'
Merkle root, in the receipt's `forget` block as for any job) and the root over every row
forgotten along the lineage so far. A version is unlearned from at most once (a lock in the
registry, then a check that it has no child yet), so two requests never fork the lineage.

The keyed row digests of each request and of the rows forgotten so far travel as an artifact of
the version's run (`forgotten.json`: digests only, never a row); rows are digested under one key
for the whole lineage (the work directory's digest.key, or $HAMU_RECEIPT_KEY) so that a row asked
for twice is recognised. verify_chain walks the lineage from its first request and checks every
link, receipt, model digest and signature from what the registry holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hamu_ray.errors import UserError

PARENT_TAG = "lineage_parent"   # on a version made by `forget`: the version it was unlearned from
LOCK_SUFFIX = ".forget-lock"    # a registered model of this name is held while a request runs
EXPERIMENT = "hamu-ray forget"
RECEIPT, FORGOTTEN = "receipt.json", "forgotten.json"
EVALUATED = ("forget_prob", "forget_rouge", "retain_prob", "retain_rouge", "mia_auc")
EVALUATED_CLASSIFIER = ("forget_acc", "forget_loss", "retain_acc", "holdout_acc", "mia_auc")
EVALUATE_DEFAULTS = {"retain_rows": 200, "holdout": None, "seed": 0}
# A policy without `method`: HAMU-Q, its B from the pre-flight, in a fixed radius per block (the
# rule's default radius, lr·‖g_r,b‖, vanishes on a model that fits its retain set: on the demo's
# original D* was 0.0014 there and 50 steps moved the request's answer probability 0.968 → 0.939)
DEFAULT_METHOD = {"name": "hamu-q", "hparams": {"radius": 0.2}}
PREFLIGHT_SHARE = 0.5  # a HAMU rule without a constraint: B = this share of the request's D*
SET_BY_THE_COMMAND = {("data", "forget"): "the request is", ("model", "path"): "the registered version is",
                      ("output_dir",): "--workdir decides it"}


class LineageError(UserError):
    """A request that cannot be carried out on this lineage; the message says why."""


@dataclass(frozen=True)
class Parent:
    """The version a request unlearns from, fetched from the registry."""
    version: str
    model: Path               # a language model's directory, or a classifier's weights file
    classifier: dict | None   # a classifier's shape (registry.CLASSIFIER_FIELDS); None: a language model
    model_sha256: str
    receipt_sha256: str | None
    forgotten: list[str]  # keyed digests of every row forgotten along the lineage, in request order
    position: int         # how many requests made it


# ---- the registry --------------------------------------------------------------------------

def versions(client, name: str) -> dict[str, object]:
    """Every version of `name` by its number (as text), oldest first."""
    found = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    return {str(v.version): v for v in found}


def split_model(spec: str) -> tuple[str, str | None]:
    """NAME or NAME/VERSION."""
    name, _, version = spec.partition("/")
    if not name or (version and not version.isdigit()):
        raise LineageError(f"--model {spec}: give NAME or NAME/VERSION (a version number)")
    return name, version or None


def parent_version(client, spec: str):
    """The version a request starts from: the one named, or the newest; refused when a request
    already unlearned from it (starting there again would fork the lineage)."""
    name, wanted = split_model(spec)
    known = versions(client, name)
    if not known:
        raise LineageError(f"--model {spec}: no registered model {name!r} in this registry")
    version = wanted or list(known)[-1]
    if version not in known:
        raise LineageError(f"--model {spec}: {name} has no version {version} (it has {', '.join(known)})")
    if children(known, version):
        raise LineageError(f"--model {spec}: version {version} was already unlearned from (version "
                           f"{children(known, version)[0]}); a request starts from the lineage's newest version, "
                           f"here {lineage_head(known, version)}")
    return known[version]


def children(known: dict, version: str) -> list[str]:
    """The versions a request unlearned from `version`."""
    return [v for v, mv in known.items() if mv.tags.get(PARENT_TAG) == version]


def lineage_head(known: dict, version: str) -> str:
    """Following the children of `version` to the end."""
    while children(known, version):
        version = children(known, version)[0]
    return version


@contextlib.contextmanager
def locked(client, name: str):
    """Hold `name`'s request lock: a registered model created only if absent (the registry's
    own uniqueness check, on a file store or a server alike). A holder that is gone (its process
    ended on this host) leaves a stale lock, which is taken over."""
    from mlflow.exceptions import MlflowException

    from hamu_ray import files

    lock = name + LOCK_SUFFIX
    for attempt in (1, 2):
        try:
            client.create_registered_model(lock, tags={"owner": json.dumps(files.this_process())})
            break
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
            owner = json.loads(client.get_registered_model(lock).tags.get("owner", "{}"))
            if attempt == 1 and owner and not files.owner_alive(owner):
                client.delete_registered_model(lock)  # its holder is gone
                continue
            raise LineageError(f"another `hamu-ray forget` is running on {name} (process {owner.get('pid')} "
                               f"on {owner.get('host')}); run this request after it: requests on one model are "
                               f"taken one at a time so that its lineage never forks") from None
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def fetch_parent(client, name: str, mv, into: Path) -> Parent:
    """The parent's model directory (checked against its registered digest), its receipt's
    sha256 and the rows forgotten along its lineage."""
    from hamu_ray import receipt

    model, classifier = download_model(client, name, str(mv.version), into)
    digest = receipt.model_digest(model)
    if mv.tags.get("model_sha256") not in (None, digest):
        raise LineageError(f"{name} version {mv.version}: the downloaded model's digest {digest[:16]}… is not "
                           f"its registered model_sha256 {mv.tags['model_sha256'][:16]}…; nothing was unlearned")
    record = run_json(client, mv.run_id, FORGOTTEN, into) if PARENT_TAG in mv.tags else None
    return Parent(str(mv.version), model, classifier, digest, mv.tags.get("receipt_sha256"),
                  record["forgotten"] if record else [], record["position"] if record else 0)


def download_model(client, name: str, version: str, into: Path) -> tuple[Path, dict | None]:
    """A registered version's files into `into`/model: a language model's directory
    (registry.LM_ARTIFACT under the pyfunc's artifacts) and None, or a classifier's weights file
    and shape (in the pytorch flavour's extra_files)."""
    import mlflow

    from hamu_ray.pipeline.registry import CLASSIFIER_SHAPE, LM_ARTIFACT
    from hamu_ray.tasks.classifier import EXPORT_WEIGHTS

    # the version's own artifact location: a models:/ URI would be resolved in the process's
    # default registry, not in the client's
    source = client.get_model_version_download_uri(name, version)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(into / "model"),
                                                     tracking_uri=client.tracking_uri))
    if (local / "artifacts" / LM_ARTIFACT).is_dir():
        return local / "artifacts" / LM_ARTIFACT, None
    weights, shape = local / "extra_files" / EXPORT_WEIGHTS, local / "extra_files" / CLASSIFIER_SHAPE
    if weights.is_file() and shape.is_file():
        return weights, json.loads(shape.read_text())
    raise LineageError(f"{name} version {version} holds neither a language model directory (artifacts/{LM_ARTIFACT}) "
                       f"nor a classifier's weights and shape (extra_files/{EXPORT_WEIGHTS}, {CLASSIFIER_SHAPE}): "
                       "`forget` unlearns the models hamu-ray registers; nothing was unlearned")


def run_json(client, run_id: str, artifact: str, into: Path) -> dict | None:
    """A JSON artifact of a run, None when the run has none."""
    try:
        path = client.download_artifacts(run_id, artifact, str(into))
    except Exception:  # noqa: BLE001 (MLflow raises several kinds for a missing artifact)
        return None
    return json.loads(Path(path).read_text())


# ---- one request ---------------------------------------------------------------------------

def read_policy(path) -> tuple[dict, dict, object]:
    """The policy file as a mapping, with its `evaluate:` and `robustness:` sections read
    (evaluation_spec, robustness_spec) and the fields the command sets checked (the job itself is
    checked against the parent's model)."""
    import yaml

    try:
        policy = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise LineageError(f"--config {path}: cannot read it ({exc})") from None
    if not isinstance(policy, dict):
        raise LineageError(f"--config {path}: not a mapping of sections (a job YAML's)")
    check_set_by_the_command(policy)
    return policy, evaluation_spec(policy), robustness_spec(policy)


def check_set_by_the_command(policy: dict) -> None:
    for path, who in SET_BY_THE_COMMAND.items():
        section = policy
        for field in path[:-1]:
            section = section.get(field) or {}
        if isinstance(section, dict) and path[-1] in section:
            raise LineageError(f"the policy sets {'.'.join(path)}: leave it out, {who}")


def request_job(policy: dict, request: Path, parent: Parent, out: Path):
    """The engine job: the policy's method, retain set, training and cluster, unlearning the
    request's rows from the parent's model into `out`."""
    from hamu_ray.engine.config import parse_config

    check_set_by_the_command(policy)
    data = {**(policy.get("data") or {}), "forget": str(request)}
    job = {k: v for k, v in policy.items() if k not in ("evaluate", "robustness")}
    return parse_config({**job, "data": data, "model": job_model(policy, parent), "output_dir": str(out)},
                        source="the policy")


def job_model(policy: dict, parent: Parent) -> dict:
    """The parent as the job's model: a language model's directory (the policy may set its dtype,
    LoRA, …), or a classifier's weights in its registered shape (the policy sets none of it)."""
    given = policy.get("model") or {}
    if not isinstance(given, dict):
        raise LineageError(f"the policy's model: a mapping of fields (dtype, lora, …), not {given!r}")
    if parent.classifier is None:
        return {**given, "kind": "causal_lm", "path": str(parent.model)}
    if given:
        raise LineageError(f"the policy sets model.{next(iter(given))}: leave it out, the registered version is a "
                           f"classifier ({parent.classifier['kind']} {parent.classifier['sizes']}) whose shape "
                           "and weights come from the registry")
    return {**parent.classifier, "weights": str(parent.model)}


def evaluation_spec(policy: dict) -> dict:
    """The policy's `evaluate:` section (what a version is scored on) with its defaults."""
    spec = policy.get("evaluate") or {}
    unknown = sorted(set(spec) - set(EVALUATE_DEFAULTS))
    if unknown:
        raise LineageError(f"the policy's evaluate.{unknown[0]}: not a field (it has {', '.join(EVALUATE_DEFAULTS)})")
    return {**EVALUATE_DEFAULTS, **spec}


def robustness_spec(policy: dict):
    """The policy's `robustness:` section (the pipelines' own: quantize, relearn), or None."""
    from pydantic import ValidationError

    from hamu_ray.pipeline.config import RobustnessSection

    if policy.get("robustness") is None:
        return None
    try:
        return RobustnessSection.model_validate(policy["robustness"])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in ("robustness", *first["loc"]))
        raise LineageError(f"the policy's {where}: {first['msg']}") from None


def evaluate_request(cfg, parent: Parent, model: Path, spec: dict, robustness, into: Path) -> dict:
    """Without an oracle: the parent and the new version `model` scored on the request's rows, a
    sample of `retain_rows` retain rows and (given) the holdout's non-members, as the pipelines
    score (lm_scores, classifier_scores); and the new version under each attack of `robustness`,
    its recovered share against the parent's scores."""
    retain, retain_rows = retain_sample(cfg.data.retain, spec["retain_rows"], spec["seed"], into / "retain.parquet")
    sets = {"forget": as_parquet(cfg.data.forget, into / "forget.parquet"), "retain": retain}
    if spec["holdout"]:
        sets["holdout"] = as_parquet(spec["holdout"], into / "holdout.parquet")
    attacks, skipped = request_attacks(cfg, robustness, sets["forget"], into / "retain-all.parquet", spec["seed"])
    score, kept = (lm_scores, EVALUATED) if parent.classifier is None else (classifier_scores, EVALUATED_CLASSIFIER)
    measured, found = score(cfg, parent, model, sets, attacks)
    return {"against": "parent", "retain_rows": retain_rows,
            **{name: {k: m[k] for k in kept} for name, m in measured.items()},
            **({"attacks": {**found, **skipped}} if robustness is not None else {})}


def lm_scores(cfg, parent: Parent, model: Path, sets: dict[str, str], attacks: dict) -> tuple[dict, dict]:
    """A language model's metrics (parent, model), each scored by an evaluation-only job on the
    request job's workers (driver.run_evaluation, as the pipelines score a given model), the
    model's also under each attack (the same job: evaluation.attacks)."""
    from hamu_ray.engine.config import UnlearnConfig
    from hamu_ray.engine.driver import ray_session, run_evaluation
    from hamu_ray.engine.evaluation import attacked_set
    from hamu_ray.pipeline import lm_evaluate

    def evaluation_job(path: Path, attacked: dict) -> UnlearnConfig:  # the model directory as it is (no new adapters)
        raw = cfg.model_dump()
        section = {"sets": sets, "attacks": {name: attack.section() for name, attack in attacked.items()}}
        return UnlearnConfig.model_validate({**raw, "model": {**raw["model"], "path": str(path), "lora": None},
                                             "evaluation": section})

    with ray_session(cfg.cluster):
        scores = {name: run_evaluation(evaluation_job(path, attacked)).scores
                  for name, path, attacked in (("parent", parent.model, {}), ("model", model, attacks))}
    measured = {name: lm_evaluate.model_metrics({s: scores[name][s] for s in sets}, None) for name in ("parent", "model")}
    found = {name: lm_evaluate.attack_metrics(name, scores["model"]["forget"], scores["parent"]["forget"],
                                              scores["model"][attacked_set("forget", name)], attack.rows)
             for name, attack in attacks.items()}
    return measured, found


def classifier_scores(cfg, parent: Parent, model: Path, sets: dict[str, str], attacks: dict) -> tuple[dict, dict]:
    """A classifier's metrics (parent, model) and attacks, as the classifier pipelines score
    (evaluate.predict, classifier_attacks), on the driver: accuracy in place of probability."""
    import functools

    from hamu_ray.pipeline import classifier_attacks, datasets, evaluate
    from hamu_ray.tasks.classifier import ClassifierModel, build_model

    read = functools.cache(functools.partial(datasets.read_split, x=cfg.data.input_column, y=cfg.data.label_column))
    splits = {name: read(path) for name, path in sets.items()}
    models = {name: build_model(ClassifierModel.model_validate({**parent.classifier, "weights": str(path)}))
              for name, path in (("parent", parent.model), ("model", model))}
    predicted = {name: {s: evaluate.predict(m, split.x, split.y) for s, split in splits.items()}
                 for name, m in models.items()}
    forget = {"forget": (splits["forget"].x, splits["forget"].y)}
    found = {name: classifier_attacks.attack_metrics(
                 name, predicted["model"]["forget"].correct, predicted["parent"]["forget"].correct,
                 classifier_attacks.forget_correct(classifier_attacks.attacked(models["model"], attack, read), forget),
                 attack.rows)
             for name, attack in attacks.items()}
    return {name: classifier_metrics(p) for name, p in predicted.items()}, found


def classifier_metrics(predicted: dict) -> dict:
    """EVALUATED_CLASSIFIER from per-set predictions (the holdout's, and membership inference
    against it, None without a holdout)."""
    from hamu_ray.pipeline import evaluate

    holdout = predicted.get("holdout")
    return {"forget_acc": evaluate.accuracy(predicted["forget"]), "forget_loss": float(predicted["forget"].losses.mean()),
            "retain_acc": evaluate.accuracy(predicted["retain"]),
            "holdout_acc": None if holdout is None else evaluate.accuracy(holdout),
            "mia_auc": None if holdout is None else evaluate.mia_auc(predicted["forget"].losses, holdout.losses)}


def request_attacks(cfg, robustness, forget: str, retain_into: Path, seed: int) -> tuple[dict, dict]:
    """The policy's attacks on this request (lm_pipeline.planned_attacks; relearning at a tenth of
    train.lr unless given), and those that cannot run on it, with the reason (relearning needs
    two entities: it trains on a part and scores the rest)."""
    from hamu_ray.engine.data import DataError
    from hamu_ray.pipeline import lm_pipeline
    from hamu_ray.pipeline.config import RELEARN_LR_OF_TRAIN

    if robustness is None:
        return {}, {}
    relearn, retain, skipped = robustness.relearn, cfg.data.retain, {}
    if relearn is not None and relearn.benign:
        retain = as_parquet(retain, retain_into)
    lr = None if relearn is None else relearn.lr or RELEARN_LR_OF_TRAIN * cfg.train.lr
    attacks = lm_pipeline.planned_attacks(robustness, forget, retain, lr, seed, unsplit_ok=True)
    if relearn is not None and "relearn" not in attacks:  # e.g. a request of one person's rows
        try:
            lm_pipeline.relearn_split(forget, relearn.share, seed)
        except DataError as exc:  # the reason planned_attacks left it out
            skipped["relearn"] = {"skipped": str(exc)}
    return attacks, skipped


def read_rows(path: str):
    from hamu_ray.engine import data

    return data.open_dataset(path, data.file_format("the policy's", path))[1].to_table()


def as_parquet(path: str, into: Path) -> str:
    """The set as parquet (what the scoring reads), owner-only: a request holds sensitive rows."""
    from hamu_ray import files

    if path.endswith((".parquet", ".pq")):
        return path
    return str(files.write_rows(read_rows(path).to_pylist(), into))


def retain_sample(path: str, rows: int, seed: int, into: Path) -> tuple[str, int]:
    """`rows` retain rows drawn by seed (all when there are fewer; the relearning attack's rule,
    lm_pipeline.seeded_rows), in file order, as parquet; and how many."""
    from hamu_ray import files
    from hamu_ray.pipeline.lm_pipeline import seeded_rows

    table = read_rows(path)
    chosen = seeded_rows(table.num_rows, rows, seed)
    return str(files.write_rows(table.take(list(chosen)).to_pylist(), into)), len(chosen)


def absolute_constraint(hparams: dict, summary: dict) -> float:
    """B in loss units, from the policy's constraint and unit and the pre-flight's reaches."""
    from hamu_ray.rules.hardness import loss_units

    return loss_units(float(hparams["constraint"]), hparams.get("constraint_unit", "absolute"), summary)


def fitted_batch(policy: dict, rows: int) -> tuple[dict, dict | None]:
    """A request smaller than one forget batch per worker (one person's few rows) runs with the
    batch it fills: rows // workers, said and recorded (None: the policy's batch fits). Fewer rows
    than workers is refused."""
    from hamu_ray.engine.config import ClusterSection, DataSection

    data_section, cluster = policy.get("data") or {}, policy.get("cluster") or {}
    if not (isinstance(data_section, dict) and isinstance(cluster, dict)):
        return policy, None  # parse_config names the bad section
    batch = data_section.get("forget_batch_size", DataSection.model_fields["forget_batch_size"].default)
    workers = cluster.get("num_workers", ClusterSection.model_fields["num_workers"].default)
    if rows // workers >= batch:
        return policy, None
    if rows < workers:
        raise LineageError(f"the request has {rows} rows for the policy's {workers} workers (cluster.num_workers): "
                           "every worker needs one; give fewer workers. Nothing was trained")
    fitted = rows // workers
    print(f"[forget] the request's {rows} rows give {fitted} per worker: forget batches of {fitted} "
          f"(the policy's data.forget_batch_size is {batch})", flush=True)
    return ({**policy, "data": {**data_section, "forget_batch_size": fitted}},
            {"policy": batch, "used": fitted, "rows": rows, "workers": workers})


def preflight_job(policy: dict, request: Path, parent: Parent, out: Path, accept_damage: bool,
                  key_dir: Path):
    """The engine job and, for a HAMU rule's B, the hardness pre-flight on this request and the
    parent's model (what the lineage block records; None for a rule without B). A HAMU rule
    without a constraint (the default method's too) gets B = PREFLIGHT_SHARE × D*, in loss units."""
    from hamu_ray import hardness
    from hamu_ray.engine.driver import run_preflight

    policy = {**policy, "method": policy.get("method") or DEFAULT_METHOD}
    from_preflight = takes_b_from_preflight(policy["method"])
    cfg = request_job(with_constraint(policy, 0.0) if from_preflight else policy, request, parent, out)
    if hardness.rule_figures(cfg)["constraint"] is None:
        return cfg, None
    raw, sets = run_preflight(cfg, rows=0)
    summary = hardness.build_report(cfg, raw, sets, key_dir)
    if from_preflight:
        cfg = request_job(with_constraint(policy, preflight_constraint(summary)), request, parent, out)
    return cfg, {**gate(summary, cfg.method.hparams, accept_damage),
                 "constraint_from": f"{PREFLIGHT_SHARE} × D*" if from_preflight else "the policy"}


def takes_b_from_preflight(method: dict) -> bool:
    """A HAMU rule (the method's own or method.rule) whose hparams give no constraint."""
    from hamu_ray.objectives import METHODS

    spec = METHODS.get(method.get("name"))
    if spec is None or spec.implicit:  # parse_config names an unknown method
        return False
    return ((method.get("rule") or spec.rule) in ("hamu-q", "hamu-u")
            and "constraint" not in (method.get("hparams") or {}))


def with_constraint(policy: dict, b: float) -> dict:
    hparams = {**(policy["method"].get("hparams") or {}), "constraint": b, "constraint_unit": "absolute"}
    return {**policy, "method": {**policy["method"], "hparams": hparams}}


def preflight_constraint(summary: dict) -> float:
    """PREFLIGHT_SHARE × D*; refused when the pre-flight finds no damage-free reach (every step
    would raise the retain loss to first order)."""
    free = summary["max_constraint_without_damage"]
    if not free > 0:
        raise LineageError(f"the hardness pre-flight finds no damage-free reach on this request (D* = {free:.4g}): "
                           "any forgetting raises the retain loss to first order. Give method.hparams.constraint "
                           "(and --accept-damage) to forget it anyway; nothing was trained")
    return PREFLIGHT_SHARE * free


def gate(summary: dict, hparams: dict, accept_damage: bool) -> dict:
    """A B beyond the damage-free reach D* cannot be met without retain damage to first order:
    refused unless accepted."""
    free, b = summary["max_constraint_without_damage"], absolute_constraint(hparams, summary)
    if b > free and not accept_damage:
        raise LineageError(f"the policy's B = {b:.4g} (loss units) is beyond the damage-free reach D* = {free:.4g} "
                           "of this request on the parent's model (hardness pre-flight): forgetting it needs retain "
                           f"damage to first order. Give --accept-damage to go on, or a smaller B (constraint ≤ "
                           f"{free:.4g}, or constraint_unit: damage_free with constraint ≤ 1); nothing was trained")
    return {"constraint": b, "damage_free_reach": free, "max_feasible": summary["max_feasible_constraint"],
            "damage_accepted": b > free}


def lineage_record(name: str, parent: Parent, request: list[str]) -> tuple[dict, list[str]]:
    """The receipt's lineage block (the link to the parent, what the lineage has forgotten), and
    the digests of every row forgotten along it, this request's new ones last."""
    from hamu_ray.receipt import merkle_root

    distinct, before = list(dict.fromkeys(request)), set(parent.forgotten)
    forgotten = parent.forgotten + [d for d in distinct if d not in before]
    block = {"model": name, "request": parent.position + 1,
             "parent": {"version": parent.version, "model_sha256": parent.model_sha256,
                        "receipt_sha256": parent.receipt_sha256},
             "rows": {"requested": len(request), "forgotten_before": sum(d in before for d in distinct),
                      "repeated_in_request": len(request) - len(distinct)},
             "forgotten": {"rows": len(forgotten), "merkle_root": merkle_root(forgotten)}}
    return block, forgotten


def forget(request: str, model: str, policy_path: str, uri: str, workdir: str | None = None,
           accept_damage: bool = False) -> str:
    """Carry out one deletion request; returns the registered version."""
    from mlflow import MlflowClient

    from hamu_ray import digests, receipt
    from hamu_ray.engine.driver import run_unlearning

    request_path = Path(request).resolve()
    if not request_path.is_file():
        raise LineageError(f"request {request}: no such file")
    policy, scoring, robustness = read_policy(policy_path)
    client = MlflowClient(uri)
    name, _ = split_model(model)
    work = Path(workdir or Path("runs") / "forget" / name).resolve()
    with locked(client, name), tempfile.TemporaryDirectory(prefix="hamu-forget-") as tmp:
        mv = parent_version(client, model)  # under the lock: nobody else extends it meanwhile
        parent = fetch_parent(client, name, mv, Path(tmp))
        out = work / f"v{parent.version}-{hashlib.sha256(request_path.read_bytes()).hexdigest()[:12]}"
        policy, batch = fitted_batch(policy, len(read_rows(str(request_path))))
        cfg, preflight = preflight_job(policy, request_path, parent, out, accept_damage, work)
        set_aside(out, parent.version)  # checked, about to train: an earlier attempt's directory moves now
        result = run_unlearning(cfg, progress="forget", key_dir=work)
        job_receipt = receipt.load(str(out / RECEIPT))  # its model_out.sha256 is the export's digest
        if job_receipt["model_out"]["sha256"] == parent.model_sha256:
            # the parent's weights (e.g. a rule that stopped at its first step): registering them
            # would claim a forgetting that did not happen
            raise LineageError(f"the unlearning left the model unchanged (stop: {result.stop}): nothing was "
                               f"forgotten and nothing registered; its job is in {out}")
        key = digests.output_key(work)
        requested = digests.row_digests(str(request_path), key)
        block, forgotten = lineage_record(name, parent, requested)
        block["preflight"] = preflight
        if batch is not None:
            block["forget_batch_size"] = batch
        block["evaluation"] = evaluate_request(cfg, parent, receipt.exported_model(out), scoring, robustness,
                                               Path(tmp))
        chained = chain_receipt(out, job_receipt, block)
        (out / FORGOTTEN).write_text(json.dumps({"request": requested, "forgotten": forgotten,
                                                 "position": block["request"]}))
        return register(client, name, parent, out, chained)


def set_aside(out: Path, parent_version: str) -> Path | None:
    """An earlier attempt at this request from this parent (its job directory) registered nothing:
    the parent has no child, checked under the lock. It is kept, renamed, and the request runs
    again; returns where it went (None: there was none)."""
    import time

    if not out.exists():
        return None
    aside = out.with_name(f"{out.name}.unregistered-{time.strftime('%Y%m%dT%H%M%S')}")
    n = 1
    while aside.exists():
        aside, n = aside.with_name(f"{aside.name.split('~')[0]}~{n}"), n + 1
    out.rename(aside)
    print(f"[forget] {out.name}: an earlier attempt at this request registered nothing (version {parent_version} "
          f"has no child); kept as {aside}, running it again", flush=True)
    return aside


def chain_receipt(out: Path, content: dict, block: dict) -> dict:
    """The job's receipt with the lineage block and a sentence on it; written back atomically."""
    from hamu_ray import files, receipt

    chained = receipt.with_lineage(content, block, lineage_verdict(block))
    files.write_atomic(out / RECEIPT, json.dumps(chained, indent=2))
    return chained


def lineage_verdict(block: dict) -> str:
    rows, preflight, scored = block["rows"], block.get("preflight"), block.get("evaluation")
    damage = ""
    if preflight is not None and preflight["damage_accepted"]:
        damage = (f" Its B {preflight['constraint']:.4g} was beyond the damage-free reach "
                  f"{preflight['damage_free_reach']:.4g}: retain damage was accepted (--accept-damage).")
    return (f"Request {block['request']} on {block['model']}, from version {block['parent']['version']}: "
            f"{rows['requested']} rows ({rows['forgotten_before']} forgotten before); "
            f"{block['forgotten']['rows']} distinct rows forgotten along the lineage.{damage}"
            + (evaluation_sentence(scored) if scored else ""))


def evaluation_sentence(scored: dict) -> str:
    before, after = scored["parent"], scored["model"]
    metric, what = ("acc", "Accuracy") if "forget_acc" in after else ("prob", "Answer probability")
    mia = (f"; membership AUC against the holdout {before['mia_auc']:.3f} → {after['mia_auc']:.3f}"
           if after["mia_auc"] is not None else "")
    return (f" {what}, parent → this version: on the request's rows {before[f'forget_{metric}']:.3f} → "
            f"{after[f'forget_{metric}']:.3f}, on {scored['retain_rows']} retain rows {before[f'retain_{metric}']:.3f} → "
            f"{after[f'retain_{metric}']:.3f}{mia}." + attacks_sentence(scored.get("attacks") or {}, metric))


def attacks_sentence(attacks: dict, metric: str = "prob") -> str:
    """What each attack brought back of this request's forgetting (its share of the parent → version
    drop in answer probability, a classifier's accuracy (metric acc): 0 none, 1 all)."""
    parts = []
    for name, a in attacks.items():
        share = a.get(f"recovered_{metric}_{name}")
        parts.append(f"{name} not run ({a['skipped']})" if "skipped" in a else
                     f"{name} {'–' if share is None else format(share, '.2f')}")
    what = "answer probability" if metric == "prob" else "accuracy"
    return (f" Attacks brought back this share of the drop in {what} (0 none, 1 all): "
            + "; ".join(parts) + ".") if parts else ""


def register(client, name: str, parent: Parent, out: Path, chained: dict) -> str:
    """The unlearned model as the next version of `name`, its receipt and digests in its run (a
    local store keeps the artifacts in the work directory, beside the requests' jobs)."""
    import mlflow

    from hamu_ray import receipt
    from hamu_ray.pipeline import registry, tracking

    tags = {"role": "forget", PARENT_TAG: parent.version, "method": chained["method"],
            "model_sha256": chained["model_out"]["sha256"],
            "receipt_sha256": hashlib.sha256((out / RECEIPT).read_bytes()).hexdigest(),
            "forget_merkle_root": chained["forget"]["merkle_root"],
            "forgotten_root": chained["lineage"]["forgotten"]["merkle_root"]}
    mlflow.set_tracking_uri(client.tracking_uri)
    experiment = tracking.Store(client.tracking_uri).experiment_id(EXPERIMENT, str(out.parent / "mlartifacts"))
    with mlflow.start_run(experiment_id=experiment, run_name=f"forget-{name}-from-v{parent.version}"):
        mlflow.log_artifact(str(out / RECEIPT))
        mlflow.log_artifact(str(out / FORGOTTEN))
        source = ({"kind": "causal_lm", "model_dir": str(receipt.exported_model(out))} if parent.classifier is None
                  else {"kind": "classifier", "stage_dir": str(out), "model": parent.classifier})
        info = registry.log_model(source, name, tags)
        version = str(info.registered_model_version)
        mlflow.set_tag("registered_version", version)
    return version


# ---- the chain -----------------------------------------------------------------------------

def verify_chain(client, name: str, into: Path) -> list[tuple[str, bool, str]]:
    """(what, ok, detail) for every link of `name`'s lineage, from its first request: the
    receipt against its registered sha256 and signature, the model files against the receipt,
    the parent link (version, model digest, receipt sha256), the request's and the lineage's
    Merkle roots from the digests, one digest key throughout, and no version unlearned twice."""
    known = versions(client, name)
    made = [v for v, mv in known.items() if PARENT_TAG in mv.tags]
    if not made:
        raise LineageError(f"{name}: no version made by `hamu-ray forget` in this registry")
    records = {v: run_json(client, known[v].run_id, FORGOTTEN, into / v) for v in made}  # each read once
    checks, key_ids = forks(known), set()
    for version in made:
        found, key_id = link_checks(client, name, known, version, records, into / version)
        checks += found
        key_ids |= {key_id} - {None}
    if len(key_ids) > 1:
        checks.append(("digest key", False, f"the requests' rows are keyed by {len(key_ids)} different keys "
                                            f"({', '.join(sorted(key_ids))}): rows asked for twice go unnoticed"))
    return checks


def forks(known: dict) -> list[tuple[str, bool, str]]:
    parents = [mv.tags[PARENT_TAG] for mv in known.values() if PARENT_TAG in mv.tags]
    twice = sorted({p for p in parents if parents.count(p) > 1}, key=int)
    return [(f"version {p}", False, "unlearned from more than once: the lineage forks there") for p in twice]


def link_checks(client, name: str, known: dict, version: str, records: dict,
                into: Path) -> tuple[list[tuple[str, bool, str]], str | None]:
    """One version's checks against its parent, and the id of the key its rows are digested by."""
    from hamu_ray import receipt

    mv, label = known[version], f"v{version}"
    into.mkdir(parents=True, exist_ok=True)
    receipt_file = client.download_artifacts(mv.run_id, RECEIPT, str(into))
    content = json.loads(Path(receipt_file).read_text())
    sha = hashlib.sha256(Path(receipt_file).read_bytes()).hexdigest()
    checks = [(f"{label} receipt", sha == mv.tags.get("receipt_sha256"),
               "matches its registered sha256" if sha == mv.tags.get("receipt_sha256") else
               f"sha256 {sha[:16]}… ≠ registered {str(mv.tags.get('receipt_sha256'))[:16]}…: the receipt was edited")]
    checks += [(f"{label} {what}", ok, detail) for what, ok, detail in receipt.verify(content)]
    digest = receipt.model_digest(download_model(client, name, version, into)[0])
    ok = digest == content["model_out"]["sha256"] == mv.tags.get("model_sha256")
    checks.append((f"{label} model", ok, "its files match the receipt" if ok else
                   f"digest {digest[:16]}… ≠ the receipt's {content['model_out']['sha256'][:16]}…"))
    lineage = content.get("lineage")
    if lineage is None:
        return checks + [(f"{label} lineage", False, "its receipt has no lineage block")], None
    checks += parent_checks(label, lineage, content, known, mv)
    # the parent's rows: none when it was not made by a request (or is gone: its link fails above)
    checks += root_checks(label, lineage, content, records[version], records.get(lineage["parent"]["version"]))
    return checks, content["forget"]["digest_key"]["id"]


def parent_checks(label, lineage, content, known, mv) -> list[tuple[str, bool, str]]:
    link = lineage["parent"]
    if link["version"] != mv.tags.get(PARENT_TAG):
        return [(f"{label} parent", False, f"the receipt names version {link['version']}, the registry "
                                           f"{mv.tags.get(PARENT_TAG)}: the link was changed")]
    parent = known.get(link["version"])
    if parent is None:
        return [(f"{label} parent", False, f"version {link['version']} is not in the registry: a link was removed")]
    problems = []
    if link["model_sha256"] != parent.tags.get("model_sha256") or link["model_sha256"] != (content.get("model_in") or {}).get("sha256"):
        problems.append("its model digest is not the parent's")
    if link["receipt_sha256"] != parent.tags.get("receipt_sha256"):
        problems.append("its receipt sha256 is not the parent's")
    ok = not problems
    return [(f"{label} parent", ok, f"version {link['version']}: model and receipt digests match" if ok else
             f"version {link['version']}: " + "; ".join(problems))]


def root_checks(label, lineage, content, record, parent) -> list[tuple[str, bool, str]]:
    from hamu_ray.receipt import merkle_root

    if record is None:
        return [(f"{label} rows", False, f"its run has no {FORGOTTEN}")]
    before = parent["forgotten"] if parent else []
    expected = before + list(dict.fromkeys(d for d in record["request"] if d not in set(before)))
    problems = []
    if merkle_root(record["request"]) != content["forget"]["merkle_root"]:
        problems.append("the request's digests are not the receipt's forget rows")
    if record["forgotten"] != expected:
        problems.append("the rows forgotten so far are not the parent's plus this request's")
    if merkle_root(record["forgotten"]) != lineage["forgotten"]["merkle_root"]:
        problems.append("the lineage's Merkle root is not the receipt's")
    ok = not problems
    return [(f"{label} rows", ok, f"{len(record['request'])} requested, {len(record['forgotten'])} forgotten "
                                  "so far: both Merkle roots match" if ok else "; ".join(problems))]
