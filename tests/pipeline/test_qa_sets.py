"""The built-in QA sets' protocol: the fictitious set is deterministic and perturbs only the fact;
every row marks its fact in the answer; the pretraining text names every entity and tells no
fact; the tokenizer trained on it (and the QA text) cuts forget and holdout names alike."""

from __future__ import annotations

import re

import numpy as np
import pytest

from hamu_ray.pipeline import country_qa, fictitious_qa, qa_sets


@pytest.fixture(scope="module", params=qa_sets.SOURCES)
def built(request):
    sets, text = qa_sets.build(request.param, forget_share=0.1, holdout_share=0.1, seed=5)
    return request.param, sets, text


def names_by_id(source: str) -> dict[str, str]:
    return {e.id: e.name for world in qa_sets.worlds(source) for e in world.entities}


def test_the_fictitious_set_is_deterministic_by_seed_and_split_by_person():
    first = fictitious_qa.build(forget_share=0.1, holdout_share=0.1, seed=3)
    fictitious_qa.world.cache_clear()  # the world rebuilt from scratch is the same
    assert fictitious_qa.build(forget_share=0.1, holdout_share=0.1, seed=3) == first
    other = fictitious_qa.build(forget_share=0.1, holdout_share=0.1, seed=4)
    assert {r["entity"] for r in other["forget"]} != {r["entity"] for r in first["forget"]}
    people = {name: {r["entity"] for r in rows} for name, rows in first.items()}
    assert len(people["forget"]) == len(people["holdout"]) == 20 and len(people["retain"]) == 160
    assert not people["forget"] & people["retain"] and not people["forget"] & people["holdout"]
    names = [e.name for e in fictitious_qa.world().entities]
    assert len(set(names)) == fictitious_qa.PEOPLE
    assert not {n for n in names} & {e.name for e in country_qa.world().entities}


def test_perturbed_answers_are_the_paraphrase_with_another_value_of_the_same_fact(built):
    source, sets, _ = built
    names = names_by_id(source)
    for name, rows in sets.items():
        world = qa_sets.worlds(source)[1 if name == "utility" else 0]
        pools = world.pool()
        for row in rows:
            # the wording around the value ("Djibouti is the capital city of Djibouti.")
            before, _, after = world.templates[row["template"]].paraphrase.partition("{value}")
            before, after = before.format(name=names[row["entity"]]), after.format(name=names[row["entity"]])
            assert row["paraphrased_answer"] == before + row["fact"] + after
            assert len(row["perturbed_answers"]) == len(set(row["perturbed_answers"])) == qa_sets.PERTURBED
            pool = pools[row["template"]]
            for perturbed in row["perturbed_answers"]:
                assert perturbed.startswith(before) and perturbed.endswith(after), row["entity"]
                wrong = perturbed[len(before):len(perturbed) - len(after)]
                assert wrong != row["fact"] and wrong in pool


def test_every_row_marks_its_fact_where_its_last_occurrence_in_the_answer_is(built):
    """The fact metric scores the fact's last occurrence in the answer: it must be the value's
    place in the template (not the name's, as in 'The capital of Djibouti is Djibouti.')."""
    source, sets, _ = built
    names = names_by_id(source)
    for name, rows in sets.items():
        world = qa_sets.worlds(source)[1 if name == "utility" else 0]
        for row in rows:
            before = world.templates[row["template"]].answer.partition("{value}")[0]
            assert row["answer"].rfind(row["fact"]) == len(before.format(name=names[row["entity"]])), row["entity"]
            assert set(row) == set(qa_sets.COLUMNS)


def test_the_utility_set_is_another_worlds_facts_none_of_the_forget_request(built):
    source, sets, _ = built
    own = {e.id for e in qa_sets.worlds(source)[0].entities}
    utility = {r["entity"] for r in sets["utility"]}
    assert len(utility) == qa_sets.UTILITY_ENTITIES and not utility & own
    assert {r["entity"] for name in ("forget", "retain", "holdout") for r in sets[name]} <= own


def test_the_pretraining_text_names_every_entity_and_tells_none_of_its_facts(built):
    """Every entity of every set (utility included) is named; no line holds an entity's name
    and one of that entity's values (word-bounded, outside the name), so no fact is learned."""
    source, sets, text = built
    names, joined = names_by_id(source), "\n".join(text)
    entities = {r["entity"] for rows in sets.values() for r in rows}
    assert all(names[e] in joined for e in entities)
    facts = {}  # entity → its values
    for rows in sets.values():
        for r in rows:
            facts.setdefault(r["entity"], set()).add(r["fact"])
    def word(text: str):
        return re.compile(rf"(?<!\w){re.escape(text)}(?!\w)")
    patterns = {e: (names[e], word(names[e]), [word(v) for v in values]) for e, values in facts.items()}
    for line in text:
        for name, named, values in patterns.values():
            if name in line and named.search(line):
                rest = line.replace(name, " ")
                assert not any(v.search(rest) for v in values), f"{line!r} tells a fact of {name}"
    # and every value of the set's own templates is in it (the vocabulary of the answers)
    assert all(r["fact"] in joined for rows in sets.values() for r in rows)


def test_forget_and_holdout_names_take_as_many_tokens_with_the_pipelines_tokenizer(built):
    """Trained on the pretraining text and every set's QA text, the tokenizer cuts names of
    forgotten and never-seen entities into the same number of tokens on average (a tokenizer
    trained on forget + retain only makes forget names single tokens and holdout names 2)."""
    from hamu_ray.tasks.small_llama import train_tokenizer

    source, sets, text = built
    lines = text + [f"{r['question']} {r['answer']}" for name in ("forget", "retain", "holdout", "utility")
                    for r in sets[name]]
    tokenizer = train_tokenizer(lines, 2048)
    names = names_by_id(source)

    def mean_tokens(set_name: str) -> float:
        entities = sorted({r["entity"] for r in sets[set_name]})
        return float(np.mean([len(tokenizer(" " + names[e], add_special_tokens=False)["input_ids"])
                              for e in entities]))
    assert mean_tokens("forget") == pytest.approx(mean_tokens("holdout"), abs=0.25)
