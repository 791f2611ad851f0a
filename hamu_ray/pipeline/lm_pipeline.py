"""The language-model side of a pipeline: the QA sets, the initial model built here, and the
comparison of every model against the oracle (scored by Ray tasks, lm_evaluate).

Forget rows are the sensitive data: the report holds per-row numbers and keyed digests, never text.
"""

from __future__ import annotations

import json
import random
from collections import Counter
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hamu_ray import digests, files
from hamu_ray.attacks.relearn import Relearning
from hamu_ray.engine import data
from hamu_ray.errors import MissingInputError
from hamu_ray.pipeline import lm_evaluate, lm_metrics, qa_sets, user_data
from hamu_ray.tasks.lm_scores import FACT, PARAPHRASED, PERTURBED
from hamu_ray.tasks import small_llama

EVAL_FILES = {"forget": "forget", "retain": "retain_eval", "holdout": "holdout",
              "utility": "utility"}  # scored set → file
FACT_COLUMNS = ("fact", "answer_value")  # the user's name for the value's text (prepared: fact)
PRETRAIN = "pretrain"  # the built-in sets' pretraining text (a `text` column)
EVAL_BATCH, EVAL_NEW_TOKENS = 64, 32  # rows per forward pass and per greedy decoding; answer length
PER_EXAMPLE_ATTACKED = "per_example_attacked.parquet"  # the forget rows' scores under each attack (robustness)
ENTITY = "entity"  # optional forget-set column: relearning holds entities apart, not rows


def build_sets(cfg, directory: Path) -> dict:
    """forget / retain / holdout (by entity for a built-in set, with its utility set and
    pretraining text; the user's files otherwise), train = forget + retain (+ utility) and
    oracle_train = retain + utility when the models are trained here, and retain_eval, a fixed
    sample of retain scored for every model. All written as owner-only parquet."""
    d = cfg.data
    builtin = d.source in qa_sets.SOURCES
    pretraining = None
    if builtin:
        sets, pretraining = qa_sets.build(d.source, forget_share=d.forget_share,
                                          holdout_share=d.holdout_share, seed=d.seed)
    else:
        infos = user_data.user_sets(cfg)
        user_data.check_disjoint(cfg, infos)
        sets = {name: user_data.read_table(info).to_pylist() for name, info in infos.items()}
        check_truth_columns(cfg, sets)
        check_fact_columns(cfg, sets)
    if cfg.model.init is not None:  # the original and the oracle are trained here
        sets["train"] = sets["forget"] + sets["retain"] + sets.get("utility", [])
        if "utility" in sets:
            sets["oracle_train"] = sets["retain"] + sets["utility"]
    sets["retain_eval"] = random.Random(d.seed).sample(sets["retain"], min(d.eval_retain_rows, len(sets["retain"])))
    paths = (qa_sets.write(sets, directory) if builtin else
             {name: files.write_rows(rows, directory / f"{name}.parquet") for name, rows in sets.items()})
    columns = {name: [d.text.question_column, d.text.answer_column] for name in paths}
    if pretraining is not None:
        paths[PRETRAIN] = files.write_rows([{"text": line} for line in pretraining], directory / f"{PRETRAIN}.parquet")
        columns[PRETRAIN] = ["text"]
    infos = {name: data.inspect_set(name, str(path), columns[name]) for name, path in paths.items()}
    return {"sets": {name: {"rows": info.num_rows, "sha256": data.content_digest(info)} for name, info in infos.items()}}


def check_fact_columns(cfg, sets: dict[str, list[dict]]) -> None:
    """The optional fact column (`fact` or `answer_value`): the value's text, which the fact
    metric scores where it last occurs in the answer. Renamed `fact` in the prepared sets; every
    set whose rows hold a fact that is not a text found in their answer is named in one error."""
    problems = []
    answer = cfg.data.text.answer_column
    for name in ("forget", "retain", "holdout"):
        rows, where = sets.get(name) or [{}], f"{name} set {getattr(cfg.data, name)}"
        given = [c for c in FACT_COLUMNS if c in rows[0]]
        must_mark = name == "forget" and cfg.data.forget_tokens == "fact"  # the loss is on those spans
        if must_mark and not given:
            problems.append(f"{where}: data.forget_tokens is fact, but it has no {' or '.join(FACT_COLUMNS)} "
                            "column marking each row's fact")
        if len(given) == 2:
            problems.append(f"{where}: has both {' and '.join(FACT_COLUMNS)}; keep one")
            continue
        if not given:
            continue
        bad = [i for i, r in enumerate(rows) if (r[given[0]] is not None or must_mark) and not (
            isinstance(r[given[0]], str) and r[given[0]] and r[given[0]] in (r[answer] or ""))]
        if bad:
            first = ", ".join(f"row {i}" for i in bad[:5])
            problems.append(f"{where}: {len(bad)} row(s) whose {given[0]} is not a non-empty text found in "
                            f"their {answer}: {first}; the fact metric scores that span of the answer "
                            + ("(data.forget_tokens fact: every forget row marks one)" if must_mark
                               else "(leave it empty where a row marks no fact)"))
        for r in rows:
            r[FACT] = r.pop(given[0])
    if problems:
        raise data.DataError("\n".join(problems))


def check_truth_columns(cfg, sets: dict[str, list[dict]]) -> None:
    """The truth ratio's optional columns, in a set that has either: both, a paraphrase (text)
    and the same number (≥ 1) of perturbed answers (texts) in every row. Every bad set in one
    error, its rows by number (scoring them would fail after training)."""
    problems = []
    for name in ("forget", "retain", "holdout"):
        rows, where = sets.get(name) or [{}], f"{name} set {getattr(cfg.data, name)}"
        present = [c for c in (PARAPHRASED, PERTURBED) if c in rows[0]]
        if len(present) == 1:
            missing = PERTURBED if present == [PARAPHRASED] else PARAPHRASED
            problems.append(f"{where}: has {present[0]} but no {missing}; the truth ratio needs "
                            "both: add it, or drop the column")
        elif present:
            counts = Counter(len(r[PERTURBED]) for r in rows if texts(r[PERTURBED]))
            k = counts.most_common(1)[0][0] if counts else 0
            bad = [i for i, r in enumerate(rows) if not isinstance(r[PARAPHRASED], str)
                   or not texts(r[PERTURBED]) or len(r[PERTURBED]) != k]
            if bad:
                want = f"a list of {k} texts, as in the other rows" if k else "a non-empty list of texts"
                first = ", ".join(f"row {i}" for i in bad[:5])
                problems.append(f"{where}: {len(bad)} row(s) whose {PARAPHRASED} is not a text or whose "
                                f"{PERTURBED} is not {want}: {first}; fix or remove them")
    if problems:
        raise data.DataError("\n".join(problems))


def texts(value) -> bool:
    """A non-empty list of strings (a row's perturbed answers)."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def check_given_models(cfg, prepared: dict[str, str]) -> None:
    """The user's models (before Ray starts): Hugging Face directories whose tokenizers fit
    them and leave every scored answer a token (check_scored_sets); and the attacks' sets."""
    given = [(f"model.{name}", getattr(cfg.model, name)) for name in ("path", "oracle")]
    given = [(setting, path) for setting, path in given if path is not None]
    for setting, path in given:
        check_model_dir(path, setting)
    if given:
        check_scored_sets(cfg, prepared, [path for _, path in given])
    check_attacks(cfg, prepared)


def check_scored_sets(cfg, prepared: dict[str, str], model_dirs: list) -> None:
    """Every scored answer (the answer; the paraphrased and perturbed ones where a set has them)
    keeps at least one token within data.text.max_length after its question, with the tokenizer
    of every model that will be scored: else it has no score, and the evaluation after training
    would fail (or give a NaN forget quality). Refused before any training: every set in one
    error, with its rows counted per column."""
    from hamu_ray.tasks.causal_lm import load_tokenizer

    text = cfg.data.text
    sets = {name: pq.read_table(prepared[file]).to_pylist() for name, file in EVAL_FILES.items() if file in prepared}
    directories = list(dict.fromkeys(str(d) for d in model_dirs))
    problems = []
    for directory in directories:
        tokenizer = load_tokenizer(directory)
        whose = f" (the tokenizer of {directory})" if len(directories) > 1 else ""
        for name, rows in sets.items():
            counts = lm_evaluate.rows_without_answer_tokens(tokenizer, rows, text)
            lost = [f"{column} in {count} of {len(rows)} rows" for column, count in counts.items() if count]
            if lost:
                problems.append(f"{scored_set_label(cfg, name, prepared)}: within data.text.max_length="
                                f"{text.max_length} the question leaves no token of {', of '.join(lost)}"
                                f"{whose}; raise max_length or shorten those questions")
    if problems:
        raise data.DataError("\n".join(problems))


def scored_set_label(cfg, name: str, prepared: dict[str, str]) -> str:
    """A scored set as the user knows it: their file (retain: the sample scored from it)."""
    source = getattr(cfg.data, name) if cfg.data.source == "files" else prepared[EVAL_FILES[name]]
    return f"{name} set {source}" + (" (its scored sample)" if name == "retain" else "")


def check_searchable(cfg) -> None:
    """A search ranks trials by forget quality (the KS test of the forget set's truth ratios
    against the oracle's): the user's forget set must have the truth-ratio columns."""
    if cfg.data.source != "files":
        return  # the built-in set has them
    import pyarrow.dataset as pads

    forget = data.inspect_set("forget", cfg.data.forget, user_data.set_columns(cfg))
    names = pads.dataset(forget.path, format=forget.format).schema.names
    missing = [c for c in (PARAPHRASED, PERTURBED) if c not in names]
    if missing:
        raise data.DataError(f"forget set {cfg.data.forget}: no {' or '.join(missing)} column; tune "
                             "ranks trials by forget quality, the KS test of the forget rows' truth "
                             "ratios against the oracle's, which needs a paraphrased answer and "
                             "perturbed answers per row: add them (README, your own model and data)")


def check_model_dir(path: str, setting: str) -> None:
    """A Hugging Face directory whose tokenizer fits the model's embedding."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise MissingInputError(f"{setting} {path}: not a Hugging Face model directory (no config.json)")
    vocab = json.loads(config.read_text()).get("vocab_size")
    tokenizer = load_tokenizer_checked(path, setting)
    if vocab is not None and len(tokenizer) > vocab:
        raise data.DataError(f"{setting} {path}: the tokenizer has {len(tokenizer)} tokens but the "
                             f"model's vocab_size is {vocab}; they do not belong together")


def load_tokenizer_checked(path: str, setting: str):
    from hamu_ray.tasks.causal_lm import load_tokenizer

    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as exc:
        raise MissingInputError(f"{setting} {path}: no usable tokenizer: {exc}") from exc


def initial_model_dir(cfg, prepared: dict[str, str], out: Path, key) -> Path:
    """Where initial_model builds (or has built) the model: out/stages/init-<key>/model."""
    spec = {"init": cfg.model.init.model_dump(), "text": cfg.data.text.model_dump(),
            "sets": str(Path(prepared["train"]).parent)}  # the prepared sets' folder: their key
    return out / "stages" / f"init-{key(spec, out)}" / "model"


def initial_model(cfg, prepared: dict[str, str], out: Path, key) -> Path:
    """The untrained small Llama, its tokenizer trained on the pretraining text (if any) and the
    questions and answers of every set (holdout included: forget and holdout names tokenise
    alike); cached under out/stages/init-<key> like the training stages."""
    directory = initial_model_dir(cfg, prepared, out, key).parent
    if not (directory / "model" / "config.json").exists():
        print(f"[init] building a small Llama and its tokenizer ({directory.name})", flush=True)
        with files.staging_dir(directory) as staging:
            small_llama.build(staging / "model", cfg.model.init, tokenizer_text(cfg, prepared))
    else:
        print(f"[init] cached: {directory.name}", flush=True)
    return directory / "model"


def tokenizer_text(cfg, prepared: dict[str, str]) -> list[str]:
    text = cfg.data.text
    lines = pq.read_table(prepared[PRETRAIN]).column("text").to_pylist() if PRETRAIN in prepared else []
    for name in ("forget", "retain", "holdout", "utility"):
        if name in prepared:
            table = pq.read_table(prepared[name], columns=[text.question_column, text.answer_column])
            lines += [f"{q} {a}" for q, a in zip(table.column(0).to_pylist(), table.column(1).to_pylist())]
    return lines


def pretraining_data(cfg, prepared: dict[str, str]) -> dict:
    """The pretraining stage's data section: the pretraining text, plain (loss on every token)."""
    return {"forget": None, "retain": prepared[PRETRAIN],
            "text": {**cfg.data.text.model_dump(), "format": "text", "text_column": "text"}}


def oracle_training_set(prepared: dict[str, str]) -> str:
    """The oracle learns what the original learns but the forget set: retain (+ utility)."""
    return "oracle_train" if "oracle_train" in prepared else "retain"


def evaluation_section(prepared: dict[str, str], attacked: dict[str, "Attack"] | None = None) -> dict:
    """The engine's evaluation section of every job whose model a pipeline compares: the scored
    sets (EVAL_FILES), scored by the job's workers after its last step (engine.evaluation), and
    the forget set again under each of the `attacked` attacks (attacks(cfg, prepared))."""
    section = {"sets": {name: prepared[file] for name, file in EVAL_FILES.items() if file in prepared},
               "batch_size": EVAL_BATCH, "max_new_tokens": EVAL_NEW_TOKENS}
    if attacked:
        section["attacks"] = {name: attack.section() for name, attack in attacked.items()}
    return section


def compared_evaluation(cfg, prepared: dict[str, str]) -> dict:
    """The evaluation section of a model the comparison table holds: with the pipeline's attacks."""
    return evaluation_section(prepared, attacks(cfg, prepared))


def covers(ran: dict | None, wanted: dict) -> bool:
    """Whether a job's evaluation section (as it ran, defaults filled) scored what `wanted` asks:
    the same sets and settings, and among its attacks every wanted one."""
    from hamu_ray.engine.config import EvaluationSection

    if ran is None:
        return False
    want = EvaluationSection.model_validate(wanted).model_dump()
    ran_attacks, want_attacks = ran.get("attacks", {}), want.pop("attacks")
    return ({k: v for k, v in ran.items() if k != "attacks"} == want
            and all(ran_attacks.get(name) == attack for name, attack in want_attacks.items()))


def model_scores(cfg, prepared: dict[str, str], model_dir: Path, label: str, wanted: dict | None = None) -> dict:
    """A model's per-example scores on the scored sets (set → score → values; `wanted`: the
    evaluation section asked for, by default evaluation_section's, no attack): those its own
    stage's job computed on its workers (a training or unlearning stage of this pipeline, or a
    search trial), else an evaluation-only job's on the pipeline's workers (the user's own model,
    a stage cached before stages evaluated or before its attacks were asked for), cached under
    output_dir/stages/evaluate-<key>."""
    from hamu_ray.engine import evaluation

    out, wanted = Path(cfg.output_dir).resolve(), wanted or evaluation_section(prepared)
    stage = Path(model_dir).parent
    if stage.parent == out / "stages" and (stage / evaluation.SCORES_FILE).exists():
        if covers(json.loads((stage / "summary.json").read_text())["config"].get("evaluation"), wanted):
            return evaluation.read_scores(stage / evaluation.SCORES_FILE)
    return evaluated_elsewhere(cfg, prepared, Path(model_dir), wanted, label)


def evaluated_elsewhere(cfg, prepared: dict[str, str], model_dir: Path, wanted: dict, label: str) -> dict:
    """An evaluation-only job's scores of `model_dir` (driver.run_evaluation: the unlearning
    stages' workers, ZeRO stage and dtype), kept by the model's files and what it scored."""
    from hamu_ray.engine import evaluation
    from hamu_ray.engine.config import UnlearnConfig
    from hamu_ray.engine.driver import run_evaluation

    job = evaluation_job(cfg, prepared, model_dir)
    directory = evaluation_dir(cfg, job, model_dir, wanted)
    if not (directory / evaluation.SCORES_FILE).exists():
        print(f"[evaluate] {label}: an evaluation-only job on {cfg.cluster.num_workers} worker(s)", flush=True)
        scores = run_evaluation(UnlearnConfig.model_validate(
            {**job, "evaluation": wanted, "output_dir": str(directory / "unused")})).scores
        with files.staging_dir(directory) as staging:
            evaluation.write_scores(staging / evaluation.SCORES_FILE, scores)
    return evaluation.read_scores(directory / evaluation.SCORES_FILE)


def evaluation_job(cfg, prepared: dict[str, str], model_dir: Path) -> dict:
    """The job that scores a given model: the unlearning stages' workers, ZeRO stage and dtype."""
    from hamu_ray.pipeline import stages

    return stages.job_dict(cfg, cfg.unlearn, method={"name": "ft"}, start=model_dir,
                           data={"forget": None, "retain": prepared["retain"]})


def evaluation_dir(cfg, job: dict, model_dir: Path, wanted: dict) -> Path:
    """Where an evaluation-only job's scores are kept: by the model's files, the job's model
    and train sections, and what it scores (`wanted`: sets and attacks; stage_key leaves a job's
    own evaluation section out, so it rides under another name)."""
    from hamu_ray.pipeline import stages

    out = Path(cfg.output_dir).resolve()
    spec = {"job": {key: job[key] for key in ("model", "train")}, "files": files.file_stats(model_dir),
            "scored": wanted}
    return out / "stages" / f"evaluate-{stages.stage_key(spec, out)}"


@dataclass(frozen=True)
class LMYardstick:
    """A search's measure: the prepared sets, and the oracle's per-example scores on the scored ones."""
    prepared: dict[str, str]
    oracle: dict  # set → score name → per-example values


def yardstick(cfg, prepared: dict[str, str], oracle: Path) -> LMYardstick:
    return LMYardstick(prepared, model_scores(cfg, prepared, oracle, "oracle"))


def measure(cfg, ruler: LMYardstick, model_dir: Path) -> dict:
    """One model's metrics against the oracle, from its scores (model_scores)."""
    return lm_evaluate.model_metrics(model_scores(cfg, ruler.prepared, model_dir, model_dir.parent.name),
                                     ruler.oracle)


def attack_names(cfg) -> list[str]:
    """The attacks of robustness, as the table names them: int<bits> per quantization width,
    relearn, and benign (relearning on retain rows); none without the section."""
    r = cfg.robustness
    if r is None:
        return []
    benign = r.relearn is not None and r.relearn.benign
    return ([f"int{bits}" for bits in r.quantize or []] + ["relearn"] * (r.relearn is not None)
            + ["benign"] * benign)


def table_columns(cfg) -> tuple[str, ...]:
    """The comparison's columns: TABLE_COLUMNS, and the attacks' before steps, stop and wall_s."""
    *metrics, steps, stop, wall = lm_evaluate.TABLE_COLUMNS
    return (*metrics, *lm_evaluate.attack_columns(attack_names(cfg)), steps, stop, wall)


@dataclass(frozen=True)
class Attack:
    """How one attack scores a model's forget set: the Scoring fields that make it (quantize_bits,
    or relearning), and the forget rows its metrics are computed on (None: all; relearning
    leaves out its own)."""
    fields: dict
    rows: np.ndarray | None = None

    def section(self) -> dict:
        """The attack as an evaluation section's (engine.config.AttackSection), for the workers."""
        if "quantize_bits" in self.fields:
            return {"quantize_bits": self.fields["quantize_bits"]}
        return {"relearning": {**dataclasses.asdict(self.fields["relearning"]),
                               "rows": list(self.fields["relearning"].rows)}}


def attacks(cfg, prepared: dict[str, str]) -> dict[str, Attack]:
    """Every attack of robustness, by its name in attack_names."""
    r = cfg.robustness
    if r is None:
        return {}
    lr = cfg.relearn_lr if r.relearn is not None else None
    return planned_attacks(r, prepared["forget"], prepared["retain"], lr, cfg.data.seed)


def planned_attacks(r, forget: str, retain: str, relearn_lr: float | None, seed: int, *,
                    unsplit_ok: bool = False) -> dict[str, Attack]:
    """A robustness section's attacks on the forget set `forget` (parquet files), relearning at
    `relearn_lr` (the pipeline's or a forget policy's rule). A forget set relearning cannot split
    (one entity) raises, or with `unsplit_ok` leaves relearning out."""
    found = {f"int{bits}": Attack({"quantize_bits": bits}) for bits in r.quantize or []}
    if r.relearn is not None:
        relearn = r.relearn
        steps = dict(steps=relearn.steps, lr=relearn_lr, batch_size=relearn.batch_size, seed=seed)
        try:
            trained, scored = relearn_split(forget, relearn.share, seed)
            found["relearn"] = Attack({"relearning": Relearning(forget, tuple(trained), **steps)}, scored)
        except data.DataError:
            if not unsplit_ok:
                raise
        if relearn.benign:
            rows = benign_rows(retain, relearn.steps * relearn.batch_size, seed)
            found["benign"] = Attack({"relearning": Relearning(retain, rows, **steps)})
    return found


def check_attacks(cfg, prepared: dict[str, str]) -> None:
    """Refuses, before any training, a forget set the relearning attack cannot split."""
    if cfg.robustness is not None and cfg.robustness.relearn is not None:
        relearn_split(prepared["forget"], cfg.robustness.relearn.share, cfg.data.seed)


def relearn_split(forget: str, share: float, seed: int) -> tuple[list[int], np.ndarray]:
    """The relearning attack's forget rows: those it trains on, every row of `share` of the set's
    entities (at least one, drawn by seed; rows stand for entities in a set without an entity
    column), and a mask of the others, which it scores. An entity is never on both sides."""
    if ENTITY in pq.read_schema(forget).names:
        groups = pq.read_table(forget, columns=[ENTITY]).column(0).to_pylist()
        unit = "entities"
    else:
        groups, unit = list(range(pq.ParquetFile(forget).metadata.num_rows)), "rows (no entity column)"
    distinct = sorted(set(groups), key=str)
    if len(distinct) < 2:
        raise data.DataError(f"robustness.relearn: the forget set has {len(distinct)} {unit}; relearning "
                             "trains on a part of them and scores the rest, which needs two or more")
    count = min(len(distinct) - 1, max(1, round(share * len(distinct))))
    held = set(random.Random(seed).sample(distinct, count))
    return [i for i, g in enumerate(groups) if g in held], np.array([g not in held for g in groups])


def benign_rows(retain: str, count: int, seed: int) -> tuple[int, ...]:
    """`count` retain rows drawn by seed (all of them when there are fewer), in file order."""
    return seeded_rows(pq.ParquetFile(retain).metadata.num_rows, count, seed)


def seeded_rows(total: int, count: int, seed: int) -> tuple[int, ...]:
    """`count` of `total` row numbers drawn by seed (all when there are fewer), in file order."""
    return tuple(sorted(random.Random(seed).sample(range(total), min(count, total))))


def compare(cfg, prepared: dict[str, str], stages: dict, report: Path) -> list[dict]:
    """Every stage's model scored on forget, retain (sample), holdout and utility and, with
    robustness, on the forget set again under each attack (model_scores: by its own job's
    workers); TOFU's and MUSE's metrics against the oracle; per-row scores written to
    report/per_example.parquet (and report/per_example_attacked.parquet)."""
    from hamu_ray.engine.evaluation import attacked_set

    found = attacks(cfg, prepared)
    wanted = evaluation_section(prepared, found)
    sets = wanted["sets"]
    scored = {name: model_scores(cfg, prepared, stage.model_dir, name, wanted) for name, stage in stages.items()}
    scores = {name: {s: per_set[s] for s in sets} for name, per_set in scored.items()}
    attacked = {(name, attack): scored[name][attacked_set("forget", attack)]  # (model, attack) → forget scores
                for name in stages for attack in found}
    write_per_example(scores, sets, digests.output_key(Path(cfg.output_dir).resolve()),
                      report / "per_example.parquet", attacked, found)
    oracle = scores.get("oracle")
    metrics = {name: lm_evaluate.model_metrics(scores[name], oracle) for name in stages}
    rows = []
    for name, stage in stages.items():
        row = {"model": name, **metrics[name]}
        for attack, how in found.items():
            row.update(lm_evaluate.attack_metrics(attack, scores[name]["forget"], scores["original"]["forget"],
                                                  attacked[(name, attack)], how.rows))
        summary = stage.summary
        rows.append({**row, "steps": summary["steps"], "stop": summary["stop"], "wall_s": summary["wall_s"]})
    return [{c: row.get(c) for c in table_columns(cfg)} for row in rows]


def write_per_example(scores: dict, sets: dict[str, str], key: digests.DigestKey, path: Path,
                      attacked: dict[tuple[str, str], dict] | None = None,
                      found: dict[str, Attack] | None = None) -> None:
    """One row per (model, set, example): numbers and the row's keyed digest (the receipts' row
    digest, hamu_ray.digests), no text. With `attacked` ((model, attack) → forget scores) each
    model's forget rows under each attack go beside it, in PER_EXAMPLE_ATTACKED with their
    `attack` and `trained_on` (the attack fine-tuned on the row, so its metrics leave it out); a
    file of their own: a reader of per_example.parquet by model and set keeps getting one row
    per example. Without, an earlier run's is removed."""
    rows = {name: digests.row_digests(p, key) for name, p in sets.items()}
    write_score_rows([({"model": model}, name, s) for model, per_set in scores.items()
                      for name, s in per_set.items()], rows, path)
    path_attacked = path.with_name(PER_EXAMPLE_ATTACKED)
    if attacked:
        trained_on: list[bool] = []
        for (_, attack), s in attacked.items():
            scored = found[attack].rows
            trained_on += [False] * len(s["logprob"]) if scored is None else (~scored).tolist()
        write_score_rows([({"model": model, "attack": attack}, "forget", s) for (model, attack), s in attacked.items()],
                         rows, path_attacked, {"trained_on": trained_on})
    else:
        path_attacked.unlink(missing_ok=True)


def write_score_rows(scored: list[tuple[dict, str, dict]], row_digests: dict[str, list[str]], path: Path,
                     extra: dict[str, list] | None = None) -> None:
    """A parquet file of per-example scores: per (leading columns, set, scores) a row per
    example; `extra`: more columns, a value per row in that order."""
    leading = list(scored[0][0]) if scored else ["model"]
    columns: dict[str, list] = {k: [] for k in (*leading, "set", "row", "row_digest", "probability",
                                                "rouge_l_recall", "min_k", "truth_ratio",
                                                "fact_probability", "fact_exact")}
    for first, name, s in scored:
        n = len(s["logprob"])
        ratios = lm_evaluate.truth_ratios(s)
        for column, value in first.items():
            columns[column] += [value] * n
        columns["set"] += [name] * n
        columns["row"] += list(range(n))
        columns["row_digest"] += row_digests[name]
        columns["probability"] += lm_metrics.probability(s["logprob"], s["count"]).tolist()
        columns["rouge_l_recall"] += s["rouge"].tolist()
        columns["min_k"] += s["min_k"].tolist()
        columns["truth_ratio"] += [None] * n if ratios is None else ratios.tolist()
        marked = ~np.isnan(s["fact_logprob"]) if "fact_logprob" in s else np.zeros(n, dtype=bool)
        facts = lm_metrics.fact_probability(s["fact_logprob"]) if marked.any() else np.zeros(n)
        columns["fact_probability"] += [float(p) if k else None for p, k in zip(facts, marked)]
        columns["fact_exact"] += [bool(s["fact_exact"][i]) if k else None for i, k in enumerate(marked)]
    with files.atomic_path(path, mode=0o600) as tmp:
        pq.write_table(pa.table({**columns, **(extra or {})}), tmp)
