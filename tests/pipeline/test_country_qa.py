"""The country QA set: real facts, split by entity, deterministic, with paraphrased and
perturbed answers that keep the template and change the fact."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from hamu_ray.pipeline import country_qa


@pytest.fixture(scope="module")
def sets():
    return country_qa.build(forget_share=0.05, holdout_share=0.1, seed=3)


def test_forgetting_is_by_entity_and_the_shares_hold(sets):
    entities = {name: {r["entity"] for r in rows} for name, rows in sets.items()}
    assert not entities["forget"] & entities["retain"] and not entities["forget"] & entities["holdout"]
    assert not entities["retain"] & entities["holdout"]
    total = len(country_qa.countries())
    assert len(entities["forget"]) == round(0.05 * total) and len(entities["holdout"]) == round(0.1 * total)
    assert len(sets["retain"]) > 1000  # ~5 facts for each of ~215 countries


def test_facts_are_the_packages_and_answers_are_perturbed_within_their_template(sets):
    france = next(c for c in country_qa.countries() if c["iso"] == "FR")
    rows = {r["template"]: r for name in sets for r in sets[name] if r["entity"] == "FR"}
    assert rows["capital"]["question"] == "What is the capital of France?"
    assert rows["capital"]["answer"] == f"The capital of France is {france['capital']}."
    assert rows["capital"]["paraphrased_answer"] == f"{france['capital']} is the capital city of France."
    assert f"{france['capital']} is" not in " ".join(rows["capital"]["perturbed_answers"])
    every = country_qa.countries()
    for row in (r for rows_ in sets.values() for r in rows_):
        perturbed = row["perturbed_answers"]
        assert len(perturbed) == len(set(perturbed)) == country_qa.PERTURBED, row["question"]
        assert row["paraphrased_answer"] not in perturbed
        # the paraphrase's wording with another country's value of the same fact: true and
        # false answers differ only in the fact
        template = country_qa.TEMPLATES[row["template"]]
        name = next(c["name"] for c in every if c["iso"] == row["entity"])
        wrong = {template.paraphrase.format(value=v, name=name) for c in every
                 if (v := country_qa.VALUES[row["template"]](c)) is not None}
        assert set(perturbed) <= wrong, row["question"]


def test_the_same_seed_gives_the_same_sets_and_another_seed_other_entities(sets, tmp_path):
    assert country_qa.build(forget_share=0.05, holdout_share=0.1, seed=3) == sets
    other = country_qa.build(forget_share=0.05, holdout_share=0.1, seed=4)
    assert {r["entity"] for r in other["forget"]} != {r["entity"] for r in sets["forget"]}
    paths = country_qa.write(sets, tmp_path)
    table = pq.read_table(paths["forget"])
    assert table.column_names == list(country_qa.COLUMNS) and table.to_pylist() == sets["forget"]
    assert paths["forget"].stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("forget, holdout", [(0.0, 0.1), (0.5, 0.5), (0.05, 1.2)])
def test_bad_shares_are_refused(forget, holdout):
    with pytest.raises(ValueError, match="must be in"):
        country_qa.build(forget_share=forget, holdout_share=holdout)
