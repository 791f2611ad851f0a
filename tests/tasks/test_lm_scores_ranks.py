"""Evaluation where the model lives: 2 plain gloo ranks (no Ray) build the job's model as a Ray
Train worker does (worker.ready_task, build) at ZeRO-0, ZeRO-3 and ZeRO-3 with LoRA, and score
the job's evaluation sets data-parallel (task.evaluate, each rank its share, gathered). Every
per-example number equals one process scoring every row (lm_evaluate.score_model) to 1e-5 and
the greedy answers are the same texts, with rows uneven across ranks (one rank runs stand-in
forwards under ZeRO-3) and a set of one row (a rank with none)."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hamu_ray.engine.evaluation import Ranks
from tests.engine.test_grads_deepspeed import free_port
from tests.lm_fixtures import qa_rows

pytestmark = pytest.mark.integration

WORLD, BATCH, NEW_TOKENS = 2, 3, 6
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
CASES = {  # whole: whether each rank scores with a whole copy (evaluation.whole_model; auto: it fits)
    "zero0": {"stage": 0, "whole": False},
    "zero3": {"stage": 3, "whole_model": False, "whole": False},  # the partitioned model in lockstep
    "zero3-whole": {"stage": 3, "whole_model": "auto", "whole": True},
    "lora-zero3": {"stage": 3, "lora": LORA, "whole_model": False, "whole": False},
    "lora-zero3-whole": {"stage": 3, "lora": LORA, "whole_model": True, "whole": True},
    # the forget set scored again under two attacks, each rank scoring its share of one attacked
    # copy; under ZeRO-3 the whole copy is made whatever auto would choose
    "zero0-attacked": {"stage": 0, "attacked": True, "whole": False},
    "zero3-attacked": {"stage": 3, "attacked": True, "whole": True},
}
RELEARN = {"rows": [0, 2, 3], "steps": 4, "lr": 3e-3, "batch_size": 2, "seed": 5}


def attacks(sets: dict[str, str]) -> dict:
    return {"int4": {"quantize_bits": 4}, "relearn": {"relearning": {"path": sets["qa"], **RELEARN}}}


def eval_rows() -> list[dict]:
    """7 rows (4 and 3 per rank: 2 and 1 batches of 3), truth-ratio columns, a fact in the first 5."""
    rows = []
    for i, r in enumerate(qa_rows()[:7]):
        words = r["answer"].split()
        rows.append({**r, "paraphrased_answer": " ".join(reversed(words)),
                     "perturbed_answers": [r["answer"][::-1], "no idea at all"],
                     "fact": words[-1] if i < 5 else None})
    return rows


def job(model_dir: str, sets: dict[str, str], case: str) -> dict:
    spec = CASES[case]
    evaluation = {"sets": sets, "batch_size": BATCH, "max_new_tokens": NEW_TOKENS,
                  "whole_model": spec.get("whole_model", "auto")}
    if spec.get("attacked"):
        evaluation.update(sets={"forget": sets["qa"]}, attacks=attacks(sets))
    return {"data": {"forget": "f.parquet", "retain": "r.parquet", "retain_batch_size": 2, "forget_batch_size": 2},
            "model": {"kind": "causal_lm", "path": model_dir, "lora": spec.get("lora")},
            "method": {"name": "gdiff"}, "train": {"lr": 0.1, "zero_stage": spec["stage"]},
            "evaluation": evaluation, "output_dir": "unused"}


def _rank(rank: int, port: int, model_dir: str, sets: dict[str, str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    from hamu_ray.engine import deepspeed_engine as eng
    from hamu_ray.engine import evaluation, worker
    from hamu_ray.engine.config import parse_config
    from hamu_ray.tasks.causal_lm import TextData, load_tokenizer
    from hamu_ray.tasks.lm_scores import greedy_answers

    # a rank out of step with the other waits for it: fail in two minutes, not gloo's ten
    eng.import_deepspeed().init_distributed(dist_backend="gloo", auto_mpi_discovery=False,
                                            timeout=datetime.timedelta(seconds=120))
    results = {}
    for case in CASES:
        cfg = parse_config(job(model_dir, sets, case))
        task = worker.ready_task(cfg)
        engine, _ = worker.build(cfg, task)
        scores, whole = worker.evaluate(task, engine.module, cfg, engine.device)
        results[case] = {"whole": whole, "scores": scores}
        if not whole and not CASES[case].get("attacked"):  # the greedy texts themselves, from the model the job holds
            ranks = Ranks.of_job(engine.device, cfg.train.zero_stage)
            per_set = evaluation.read_sets(cfg.evaluation)
            questions = [r["question"] for r in per_set["qa"]][ranks.share(len(per_set["qa"]))]
            with torch.no_grad():
                answers = greedy_answers(engine.module.eval(), load_tokenizer(model_dir), questions, TextData(),
                                         BATCH, NEW_TOKENS, ranks)
            results[case]["answers"] = ranks.gather({"text": np.array(answers, dtype=object)})["text"].tolist()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    directory = tmp_path_factory.mktemp("eval-sets")
    rows = eval_rows()
    paths = {"qa": directory / "qa.parquet", "single": directory / "single.parquet"}
    pq.write_table(pa.Table.from_pylist(rows), paths["qa"])
    pq.write_table(pa.Table.from_pylist(rows[:1]), paths["single"])
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def ranked(tiny_lm, sets, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranked")
    torch.multiprocessing.start_processes(_rank, args=(free_port(), str(tiny_lm), sets, str(out)),
                                          nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def alone(tiny_lm, sets):
    """One process, every row, today's batch size: lm_evaluate.score_model and greedy answers."""
    from transformers import AutoModelForCausalLM

    from hamu_ray.pipeline import lm_evaluate
    from hamu_ray.tasks.causal_lm import TextData, load_tokenizer
    from hamu_ray.tasks.lm_scores import greedy_answers

    scores = lm_evaluate.score_model(str(tiny_lm), sets, TextData().model_dump(), max_new_tokens=NEW_TOKENS)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    questions = [r["question"] for r in eval_rows()]
    with torch.no_grad():
        answers = greedy_answers(model, load_tokenizer(str(tiny_lm)), questions, TextData(), 64, NEW_TOKENS)
    return scores, answers


@pytest.fixture(scope="module")
def attacked_alone(tiny_lm, sets):
    """One process: the forget rows scored under each attack (lm_evaluate.score_model's)."""
    from hamu_ray.attacks.relearn import Relearning
    from hamu_ray.pipeline import lm_evaluate
    from hamu_ray.tasks.causal_lm import TextData

    relearning = Relearning(sets["qa"], tuple(RELEARN["rows"]), RELEARN["steps"], RELEARN["lr"],
                            RELEARN["batch_size"], RELEARN["seed"])
    return {f"forget@{name}": lm_evaluate.score_model(str(tiny_lm), {"forget": sets["qa"]}, TextData().model_dump(),
                                                      max_new_tokens=NEW_TOKENS, **how)["forget"]
            for name, how in (("int4", {"quantize_bits": 4}), ("relearn", {"relearning": relearning}))}


def test_shares_are_contiguous_cover_every_row_once_and_differ_by_at_most_one():
    assert [Ranks(r, 2).share(7) for r in range(2)] == [slice(0, 4), slice(4, 7)]
    assert [Ranks(r, 3).share(1) for r in range(3)] == [slice(0, 1), slice(1, 1), slice(1, 1)]
    for n in range(0, 12):
        rows = [i for r in range(4) for i in range(n)[Ranks(r, 4).share(n)]]
        assert rows == list(range(n))


@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_gets_every_rows_scores_equal_to_one_process(ranked, alone, attacked_alone, case):
    expected, _ = alone
    if CASES[case].get("attacked"):  # the forget set as it is and under each attack
        expected = {"forget": expected["qa"], **attacked_alone}
        unattacked = expected["forget"]["logprob"]
        assert all(np.abs(expected[name]["logprob"] - unattacked).max() > 1e-3 for name in attacked_alone)
    assert [ranked[rank][case]["whole"] for rank in range(WORLD)] == [CASES[case]["whole"]] * WORLD
    for rank in range(WORLD):
        got = ranked[rank][case]["scores"]
        assert set(got) == set(expected)
        for name, scores in expected.items():
            assert set(got[name]) == set(scores)
            for score, values in scores.items():
                assert got[name][score].shape == values.shape, (name, score)
                if values.dtype == bool or score == "rouge":
                    assert got[name][score].tolist() == values.tolist(), (name, score)
                else:
                    np.testing.assert_allclose(got[name][score], values, rtol=1e-5, atol=1e-6,
                                               equal_nan=True, err_msg=f"{name} {score}")


@pytest.mark.parametrize("case", [case for case, spec in CASES.items() if not spec["whole"] and not spec.get("attacked")])
def test_greedy_answers_are_the_same_texts(ranked, alone, case):
    _, answers = alone
    assert any(answers)  # the tiny model says something: the comparison is not of empty strings
    for rank in range(WORLD):
        assert ranked[rank][case]["answers"] == answers
