"""Which answer tokens a model knows: per set, the per-token probability (geometric mean) of the
answers' entity-name tokens, fact tokens and the other (wording) tokens, for the models of a
built-in QA pipeline's run. It shows what the whole-answer metrics measure: a model that never
saw an entity in a QA answer may fail to write its name, which moves every whole-answer metric
without any fact being known or forgotten.

    python scripts/answer_tokens.py RUN_DIR [--models original,oracle,unlearn-npo] [--rows 60]

RUN_DIR is a pipeline's output_dir on a built-in set (rows with `entity` and `fact`); a model is
a stage name prefix under RUN_DIR/stages (its first match). An entity's name is the longest text
all its questions and answers share ("Chad" in "What is the capital of Chad?", "The capital of
Chad is N'Djamena.", "On which continent is Chad?", …), stripped. Prints one Markdown table:
only numbers, never a row's text.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import string
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from hamu_ray.tasks.causal_lm import IGNORE, TextData, encode_qa, fact_encoding, load_tokenizer

SETS = ("forget", "holdout", "retain_eval")
KINDS = ("name", "fact", "other")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--models", default="original,oracle")
    parser.add_argument("--rows", type=int, default=60, help="the first rows of each set")
    args = parser.parse_args(argv)
    stages = args.run_dir / "stages"
    sets = {name: rows_of(stages, name)[:args.rows] for name in SETS}
    print("| model | " + " | ".join(f"{s} {k}" for s in SETS for k in KINDS) + " |")
    print("| --- |" + " ---: |" * (len(SETS) * len(KINDS)))
    for prefix in args.models.split(","):
        directory = model_dir(stages, prefix)
        means = {s: token_means(directory, rows) for s, rows in sets.items()}
        print(f"| {directory.parent.name} | " +
              " | ".join(f"{means[s][k]:.3f}" for s in SETS for k in KINDS) + " |")
    print(f"\nPer-token probability (geometric mean over the first {args.rows} rows of each set) of the "
          "answer tokens inside the entity's name, inside the fact, and the rest.")
    return 0


def rows_of(stages: Path, name: str) -> list[dict]:
    found = sorted(stages.glob(f"prepare-*/{name}.parquet"))
    if not found:
        raise SystemExit(f"{stages}: no prepared {name} set (prepare-*/{name}.parquet)")
    rows = pq.read_table(found[0]).to_pylist()
    if rows and not {"entity", "fact"} <= rows[0].keys():
        raise SystemExit(f"{found[0]}: rows without entity and fact columns (a built-in set's)")
    texts = defaultdict(list)
    for r in rows:
        texts[r["entity"]] += [r["question"], r["answer"]]
    names = {entity: functools.reduce(common_text, t).strip(string.whitespace + string.punctuation)
             for entity, t in texts.items() if len(t) > 2}
    return [{**r, "name": names.get(r["entity"], "")} for r in rows]


def common_text(a: str, b: str) -> str:
    match = difflib.SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b))
    return a[match.a:match.a + match.size]


def model_dir(stages: Path, prefix: str) -> Path:
    found = sorted(p for p in stages.glob(f"{prefix}*/model") if (p / "config.json").exists())
    if not found:
        raise SystemExit(f"{stages}: no stage {prefix}* with a model")
    return found[0]


@torch.no_grad()
def token_means(directory: Path, rows: list[dict]) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer, text = load_tokenizer(str(directory)), TextData(max_length=64)
    logprobs: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for r in rows:
        ids, labels = encode_qa(tokenizer, r["question"], r["answer"], "auto")
        fact = fact_encoding(tokenizer, r["question"], r["answer"], r["fact"], text)[1]
        name = (fact_encoding(tokenizer, r["question"], r["answer"], r["name"], text)[1]
                if len(r["name"]) > 1 and r["name"] in r["answer"] else [IGNORE] * len(ids))
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        for t in range(1, len(ids)):
            if labels[t] != IGNORE:
                kind = "fact" if fact[t] != IGNORE else "name" if name[t] != IGNORE else "other"
                logprobs[kind].append(logp[t - 1, ids[t]].item())
    return {kind: float(np.exp(np.mean(v))) if v else float("nan") for kind, v in logprobs.items()}


if __name__ == "__main__":
    sys.exit(main())
