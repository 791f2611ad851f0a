"""Invented people with invented attributes: TOFU's original design, so no fact is guessable
from the world (a model cannot know them but from the training rows).

The world is fixed (WORLD_SEED): 200 people, each with a name made of syllables, and five facts
drawn at random: birth year, birthplace (an invented town), profession, instrument and pet. The
rows, their split by person and the perturbed answers follow qa_sets and the data seed.
"""

from __future__ import annotations

import functools
import random

from hamu_ray.pipeline import qa_sets
from hamu_ray.pipeline.qa_sets import Template

WORLD_SEED = 20240101
PEOPLE = 200
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
TOWN_ENDINGS = ("ford", "holm", "mere", "wick", "dale", "stead")
# consonant-initial words only: the templates say "a {value}"
PROFESSIONS = ("baker", "cartographer", "carpenter", "chemist", "dentist", "gardener", "geologist",
               "glassblower", "jeweller", "librarian", "locksmith", "mapmaker", "nurse", "painter",
               "pharmacist", "pilot", "potter", "sculptor", "surveyor", "tailor", "teacher", "weaver")
INSTRUMENTS = ("bassoon", "cello", "clarinet", "double bass", "flute", "guitar", "harp", "harpsichord",
               "lute", "mandolin", "piano", "trombone", "trumpet", "tuba", "viola", "violin")
PETS = ("canary", "cat", "chinchilla", "dog", "ferret", "goldfish", "hamster", "hedgehog",
        "parrot", "rabbit", "salamander", "tortoise")

TEMPLATES = {
    "birth_year": Template("In which year was {name} born?", "{name} was born in the year {value}.",
                           "The year of {name}'s birth is {value}."),
    "birthplace": Template("Where was {name} born?", "{name} was born in the town of {value}.",
                           "The birthplace of {name} is {value}."),
    "profession": Template("What does {name} do for a living?", "{name} works as a {value}.",
                           "By profession, {name} is a {value}."),
    "instrument": Template("Which instrument does {name} play?", "{name} plays the {value}.",
                           "The instrument {name} plays is the {value}."),
    "pet": Template("What pet does {name} keep?", "{name} keeps a {value} as a pet.",
                    "At home, {name} looks after a {value}."),
}


def word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables)).capitalize()


def unique(make, count: int, taken: set[str]) -> list[str]:
    """`count` new words from `make`, none in `taken` (which they join)."""
    out = []
    while len(out) < count:
        w = make()
        if w not in taken and not any(w in t or t in w for t in taken):  # no name inside another
            taken.add(w)
            out.append(w)
    return out


@functools.cache
def world() -> qa_sets.World:
    rng = random.Random(WORLD_SEED)
    taken: set[str] = set()
    towns = unique(lambda: word(rng, 2) + rng.choice(TOWN_ENDINGS), 60, taken)
    names = unique(lambda: f"{word(rng, 2)} {word(rng, 3)}", PEOPLE, taken)
    people = []
    for i, name in enumerate(names):
        facts = {"birth_year": str(rng.randint(1900, 1999)), "birthplace": rng.choice(towns),
                 "profession": rng.choice(PROFESSIONS), "instrument": rng.choice(INSTRUMENTS),
                 "pet": rng.choice(PETS)}
        people.append(qa_sets.Entity(f"P{i:03d}", name, facts))
    return qa_sets.World(people, TEMPLATES, "person")


def build(*, forget_share: float, holdout_share: float = 0.1, seed: int = 0) -> dict[str, list[dict]]:
    """forget / retain / holdout rows, split by person."""
    return qa_sets.split(world(), forget_share=forget_share, holdout_share=holdout_share, seed=seed)
