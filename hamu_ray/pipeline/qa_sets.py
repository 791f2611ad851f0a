"""The built-in QA sets, built one way from a *world* (entities, each with one value per fact
template): country-qa (real countries, pipeline.country_qa) and fictitious-qa (invented people,
pipeline.fictitious_qa).

Every row is TOFU's: a question, the answer, a paraphrased answer and five perturbed answers (the
paraphrase with wrong values of the same fact: true and false answers differ only in the fact),
and `fact`, the value's text, whose last occurrence in the answer is the span the fact metric
scores (lm_scores.fact_scores). Forgetting is by entity: forget / holdout (never trained on) /
retain. Beside them, each pipeline gets

- a *utility* set: facts of the other world, which the forget request does not touch; the
  original and the oracle both learn them, no unlearning method sees them (TOFU's real-authors
  and world-facts sets), and model utility includes them;
- *pretraining* text: every entity's name (forget, retain, holdout and utility alike) in
  sentences that hold none of its facts, and every value of every template in the template's
  wordings, about an entity it is not a fact of. The initial model learns it before the original
  and the oracle fork, so both know every token and differ only in the facts.
Deterministic by seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from hamu_ray import files

PERTURBED = 5
COLUMNS = ("entity", "template", "question", "answer", "paraphrased_answer", "perturbed_answers", "fact")
FACT = "fact"
UTILITY_ENTITIES = 30  # of the other world: ≈150 rows, learned by the original and the oracle
GENERIC_SENTENCES = ("Here is a sentence about {name}.", "The next words name {name}.")


@dataclass(frozen=True)
class Template:
    question: str  # {name} the entity
    answer: str  # {name}, {value} the fact: after the name, and nothing after it may hold it
    paraphrase: str


@dataclass(frozen=True)
class Entity:
    id: str
    name: str
    facts: dict[str, str]  # template → value (templates it has no value for are absent)


@dataclass(frozen=True)
class World:
    entities: list[Entity]  # in a fixed order
    templates: dict[str, Template]
    kind: str  # "country", "person": the name sentences' noun

    def pool(self) -> dict[str, list[str]]:
        """Per template, every entity's value (the perturbed answers' and pretraining's values)."""
        return {t: [e.facts[t] for e in self.entities if t in e.facts] for t in self.templates}


def qa_rows(world: World, entity: Entity, pool: dict[str, list[str]], rng: random.Random) -> list[dict]:
    """Every template the entity has a value for, with five wrong values of the same kind."""
    rows = []
    for key, t in world.templates.items():
        if key not in entity.facts:
            continue
        value = entity.facts[key]
        wrong = sorted({v for v in pool[key] if v != value})
        fill = {"name": entity.name}
        rows.append({
            "entity": entity.id, "template": key,
            "question": t.question.format(**fill),
            "answer": t.answer.format(value=value, **fill),
            "paraphrased_answer": t.paraphrase.format(value=value, **fill),
            "perturbed_answers": [t.paraphrase.format(value=v, **fill)
                                  for v in rng.sample(wrong, min(PERTURBED, len(wrong)))],
            FACT: value,
        })
    return rows


def split(world: World, *, forget_share: float, holdout_share: float, seed: int) -> dict[str, list[dict]]:
    """forget / retain / holdout rows, split by entity."""
    if not (0 < forget_share < 1 and 0 < holdout_share < 1 and forget_share + holdout_share < 1):
        raise ValueError(f"forget_share {forget_share} and holdout_share {holdout_share} must be in "
                         "(0, 1) and leave entities to retain")
    pool, rng = world.pool(), random.Random(seed)
    order = list(range(len(world.entities)))
    rng.shuffle(order)
    n_forget = max(1, round(forget_share * len(order)))
    n_holdout = max(1, round(holdout_share * len(order)))
    ids = {"forget": order[:n_forget], "holdout": order[n_forget:n_forget + n_holdout],
           "retain": order[n_forget + n_holdout:]}
    return {name: [row for i in sorted(part) for row in qa_rows(world, world.entities[i], pool, rng)]
            for name, part in ids.items()}


def utility_entities(world: World, seed: int, count: int = UTILITY_ENTITIES) -> list[Entity]:
    """A seeded sample of another world's entities: the utility set's."""
    rng = random.Random(f"utility/{seed}")
    return [world.entities[i] for i in sorted(rng.sample(range(len(world.entities)), count))]


def utility_rows(world: World, entities: list[Entity], seed: int) -> list[dict]:
    pool, rng = world.pool(), random.Random(f"utility-rows/{seed}")
    return [row for e in entities for row in qa_rows(world, e, pool, rng)]


def pretraining_text(parts: list[tuple[World, list[Entity]]], seed: int) -> list[str]:
    """Sentences that name every entity of `parts` and hold every value of their templates, none
    of them a fact: a line naming an entity holds none of its values (tells_a_fact)."""
    rng = random.Random(f"pretrain/{seed}")
    everyone = [e for _, entities in parts for e in entities]
    lines = []
    for world, entities in parts:
        for e in entities:
            lines += [f"{e.name} is a {world.kind}."] + [s.format(name=e.name) for s in GENERIC_SENTENCES]
        for key, t in world.templates.items():
            values = sorted({e.facts[key] for e in entities if key in e.facts})
            for i, value in enumerate(values):  # both wordings, alternately, each value once
                wording = t.answer if i % 2 == 0 else t.paraphrase
                lines.append(unrelated_line(wording, value, entities, everyone, rng))
    rng.shuffle(lines)
    return lines


def unrelated_line(wording: str, value: str, entities: list[Entity], everyone: list[Entity],
                   rng: random.Random) -> str:
    """The wording with `value` and a random entity it tells no fact of."""
    for _ in range(1000):
        line = wording.format(name=rng.choice(entities).name, value=value)
        if not tells_a_fact(line, everyone):
            return line
    raise RuntimeError(f"no entity found that the value of '{wording}' is not a fact of")


def tells_a_fact(line: str, entities: list[Entity]) -> bool:
    """Whether the line names an entity (as a substring: 'Niger' in 'Nigeria' counts) and also
    holds one of its values, anywhere outside its name."""
    for e in entities:
        if e.name in line:
            rest = line.replace(e.name, "\0")
            if any(value in rest for value in e.facts.values()):
                return True
    return False


def write(sets: dict[str, list[dict]], directory: str | Path) -> dict[str, Path]:
    """One parquet file per QA set (files.write_rows: atomic, owner-only)."""
    schema = pa.schema([(c, pa.list_(pa.string()) if c == "perturbed_answers" else pa.string())
                        for c in COLUMNS])
    return {name: files.write_rows(rows, Path(directory) / f"{name}.parquet", schema)
            for name, rows in sets.items()}


# ---- the built-in sources ----------------------------------------------------------------------

SOURCES = ("country-qa", "fictitious-qa")


def worlds(source: str) -> tuple[World, World]:
    """A built-in source's world and its utility set's (the other one)."""
    from hamu_ray.pipeline import country_qa, fictitious_qa

    made = {"country-qa": country_qa.world, "fictitious-qa": fictitious_qa.world}
    if source not in made:
        raise ValueError(f"no built-in QA set {source!r} (one of {', '.join(SOURCES)})")
    other = next(name for name in SOURCES if name != source)
    return made[source](), made[other]()


def build(source: str, *, forget_share: float, holdout_share: float, seed: int) -> tuple[dict[str, list[dict]], list[str]]:
    """forget / retain / holdout / utility rows, and the pretraining text, of a built-in source."""
    own, other = worlds(source)
    sets = split(own, forget_share=forget_share, holdout_share=holdout_share, seed=seed)
    helpers = utility_entities(other, seed)
    sets["utility"] = utility_rows(other, helpers, seed)
    return sets, pretraining_text([(own, own.entities), (other, helpers)], seed)
