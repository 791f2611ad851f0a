"""A classifier pipeline's own half (stages.py runs either task through the same names; the
language model's half is lm_pipeline.py): its sets, the user's weights, the yardstick every model
is measured against (accuracies, losses, MIA, the comparison to the oracle), the comparison table.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from hamu_ray.engine import data
from hamu_ray.pipeline import classifier_attacks, datasets, evaluate, lm_pipeline, user_data


def build_sets(cfg, directory: Path) -> dict:
    """The forget, retain, train and test sets (the user's files, or a built-in image set's
    split), with their row counts, digests and the forgotten classes."""
    if cfg.data.source == "files":
        paths = user_data.write_classifier_sets(cfg, directory)
    else:
        paths = builtin_image_sets(cfg, directory)
    infos = {name: data.inspect_set(name, path, ["x", "y"]) for name, path in paths.items()}
    return {"sets": {name: {"rows": info.num_rows, "sha256": data.content_digest(info)} for name, info in infos.items()},
            "forget_classes": forget_classes(cfg)}


def builtin_image_sets(cfg, directory: Path) -> dict[str, str]:
    request = cfg.data.forget
    train, test = datasets.load_source(cfg.data.source, root=cfg.data.root, seed=cfg.data.seed)
    train = datasets.subsample(train, cfg.data.max_train_rows, cfg.data.seed)
    if request.kind == "class":
        forget_idx, retain_idx = datasets.class_forget_indices(
            train.y, request.forget_class, request.rho, cfg.data.seed)
    else:
        forget_idx, retain_idx = datasets.random_forget_indices(len(train.y), request.fraction, cfg.data.seed)
    return datasets.write_sets(directory, train, test, forget_idx, retain_idx)


def forget_classes(cfg) -> list[int]:
    if cfg.data.source == "files":
        return list(cfg.data.forget_classes)
    return [cfg.data.forget.forget_class] if cfg.data.forget.kind == "class" else []


def check_given_models(cfg, prepared: dict[str, str]) -> None:
    """The user's weights (before Ray starts): safetensors of the configured shape."""
    if cfg.model.weights is not None:
        user_data.check_classifier_weights(cfg)


@dataclass(frozen=True)
class Yardstick:
    """What every model is measured against: the sets and the oracle's results on them."""
    sets: dict[str, tuple]
    forget_classes: list[int]
    oracle: dict[str, float] | None  # measured like any model (forget quality 1, gaps 0)
    oracle_forget: evaluate.Predictions | None  # its losses and correctness on the forget rows


def yardstick(cfg, prepared: dict[str, str], oracle_weights: Path | None) -> Yardstick:
    """The sets, and the oracle's results on them (None without an oracle: the comparisons
    that need one are then absent)."""
    splits = {name: datasets.read_split(prepared[name]) for name in ("forget", "retain", "test")}
    sets = {name: (split.x, split.y) for name, split in splits.items()}
    if oracle_weights is None:
        return Yardstick(sets, forget_classes(cfg), None, None)
    metrics, predictions = evaluate.evaluate(load_weights(cfg, oracle_weights), sets,
                                             forget_classes=forget_classes(cfg))
    losses = predictions["forget"].losses
    metrics.update(evaluate.compare_to_oracle(metrics, losses, metrics, losses))  # its own table row
    return Yardstick(sets, forget_classes(cfg), metrics, predictions["forget"])


def measure(cfg, ruler: Yardstick, weights: Path) -> dict[str, float]:
    """A model's accuracies, losses, MIA and comparison to the oracle (forget quality, gaps)."""
    return scores(ruler, load_weights(cfg, weights))[0]


def scores(ruler: Yardstick, model) -> tuple[dict[str, float], evaluate.Predictions]:
    """A classifier's metrics against the yardstick, and its predictions on the forget rows."""
    metrics, predictions = evaluate.evaluate(model, ruler.sets, forget_classes=ruler.forget_classes)
    if ruler.oracle is not None:
        metrics.update(evaluate.compare_to_oracle(metrics, predictions["forget"].losses,
                                                  ruler.oracle, ruler.oracle_forget.losses))
    return metrics, predictions["forget"]


def load_weights(cfg, weights: Path):
    from hamu_ray.tasks import classifier as models

    return models.build_model(cfg.model.model_copy(update={"weights": str(weights)}))


def compare(cfg, prepared: dict[str, str], stages: dict, report: Path) -> list[dict]:
    """Every stage's classifier measured against the oracle; with robustness, each attack's
    forget accuracy and recovered share (classifier_attacks). Each model is loaded and scored
    once. (`report`: nothing per example is written for a classifier.)"""
    ruler = yardstick(cfg, prepared, stages["oracle"].weights if "oracle" in stages else None)
    attacks = lm_pipeline.attacks(cfg, prepared)
    read = functools.cache(datasets.read_split)  # each relearning set once, for every model
    results, original_correct = {}, None
    for name, stage in stages.items():  # original, oracle, then the methods
        model = load_weights(cfg, stage.weights) if attacks or name != "oracle" else None
        if name == "oracle":  # the yardstick measured it
            measured, forget = ruler.oracle, ruler.oracle_forget
        else:
            measured, forget = scores(ruler, model)
        original_correct = forget.correct if name == "original" else original_correct
        for attack, how in attacks.items():
            after = classifier_attacks.forget_correct(classifier_attacks.attacked(model, how, read), ruler.sets)
            measured = {**measured, **classifier_attacks.attack_metrics(attack, forget.correct, original_correct,
                                                                        after, how.rows)}
        summary = stage.summary
        results[name] = {**measured, "steps": summary["steps"],
                         "stop": summary["stop"], "wall_s": summary["wall_s"]}
    return evaluate.comparison_rows(results, table_columns(cfg))


def table_columns(cfg) -> tuple[str, ...]:
    """The comparison's columns; the attacks' before steps, stop and wall_s."""
    *metrics, steps, stop, wall = evaluate.TABLE_COLUMNS
    return (*metrics, *classifier_attacks.attack_columns(lm_pipeline.attack_names(cfg)), steps, stop, wall)
