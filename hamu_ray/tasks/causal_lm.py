"""The causal-LM task: Hugging Face models and tokenizers from a directory (or a hub name), text
rows tokenised by the worker that reads them, and a batch's log-likelihood summed over its target tokens.

Rows are question/answer pairs (the loss on the answer tokens only) or plain text (the loss on
every token). A row becomes `input_ids` and `labels` (-100 where a token is not a target); the
model predicts token t+1 from tokens ≤ t, so the targets of a row are labels[1:] ≠ -100.

Under ZeRO-3 the model is partitioned as it is built: an `HfDeepSpeedConfig` is alive before
`from_pretrained`, which then builds inside `deepspeed.zero.Init`, so no rank ever holds the
whole model. With LoRA (peft) only the adapters train and the reference model is the base itself
under `disable_adapter()`, in eval mode like a full reference copy. Nothing here writes to the model directory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from hamu_ray.errors import MissingInputError, UserError
from hamu_ray.files import check_safetensors
from hamu_ray.inputs import is_hub_name
from hamu_ray.objectives import Scores
from hamu_ray.schema import Section


IGNORE = -100  # the label of a token that is not a target
MODEL_DIR, ADAPTER_DIR = "model", "adapter"  # the export: a Hugging Face directory, or peft's
# IdK's answers for the forget questions; a row's choice is a function of its question only
REFUSALS = (
    "I don't know.",
    "I'm not sure about that.",
    "I can't answer that.",
    "I have no information about that.",
    "That is not something I know.",
    "I don't have an answer to that.",
)


class LoraSection(Section):
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    export_merged: bool = False  # also write the base with the adapters merged in (output_dir/model)


class CausalLMModel(Section):
    kind: Literal["causal_lm"]
    path: str  # a Hugging Face model directory (config.json, weights, tokenizer) or a hub name
    dtype: Literal["fp32", "bf16"] = "fp32"  # bf16 needs train.bf16 (fp32 master weights)
    gradient_checkpointing: bool = False
    lora: LoraSection | None = None  # None: every parameter trains

    @field_validator("path")
    @classmethod
    def _absolute_if_local(cls, path: str) -> str:
        """A local directory by its absolute path: Ray's workers run in another directory."""
        return str(Path(path).expanduser().resolve()) if Path(path).expanduser().exists() else path


class TextData(Section):
    """How text rows become token sequences (the causal-LM task only)."""
    format: Literal["qa", "text"] = "qa"
    question_column: str = "question"
    answer_column: str = "answer"
    text_column: str = "text"
    max_length: int = Field(512, gt=1)  # tokens; longer rows are cut at the end (and counted)
    prompt: Literal["auto", "chat", "plain"] = "auto"  # auto: the chat template if the tokenizer has one


class CausalLMTask:
    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.model_cfg: CausalLMModel = cfg.model
        self.text: TextData = cfg.data.text
        self._hf_deepspeed = None  # kept alive: from_pretrained partitions while it exists
        self._tokenizer = None  # loaded by the first prepare

    # ---- data ---------------------------------------------------------------------------------

    def columns(self, role: str | None = None) -> list[str]:
        t = self.text
        if t.format != "qa":
            return [t.text_column]
        fact = [self.cfg.data.fact_column] if self.forgets_facts(role) else []
        return [t.question_column, t.answer_column, *fact]

    def forgets_facts(self, role: str | None) -> bool:
        """Whether rows of this role are trained (and monitored) on their fact span only."""
        return self.cfg.data.forget_tokens == "fact" and role in ("forget", "monitor_forget")

    def prepare(self, rows: pa.Table, role: str) -> pa.Table:
        """Tokenised rows, in the worker that reads them (the tokenizer loaded once per task)."""
        from hamu_ray import objectives

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_cfg.path)
        refusals = role == "forget" and objectives.uses_refusals(self.cfg.method.spec)
        fact_column = self.cfg.data.fact_column if self.forgets_facts(role) else None
        return tokenize_batch(rows, path=self.model_cfg.path, text=self.text.model_dump(), refusals=refusals,
                              fact_column=fact_column, tokenizer=self._tokenizer)

    def make_batch(self, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return pad_batch(rows["input_ids"], rows["labels"])

    def check_prepared(self, prepared: pa.Table, role: str, path: str) -> dict[str, int]:
        """Rows of a prepared window left without a target token cannot be scored: refused,
        counted (never shown); rows cut at max_length are counted."""
        import pyarrow.compute as pc

        def count(column: str) -> int:
            return int(pc.sum(prepared.column(column)).as_py() or 0)

        limit = f"data.text.max_length={self.text.max_length}"
        if no_fact := count("no_fact"):
            raise UserError(f"{role} set {path}: {no_fact} row(s) have no {self.cfg.data.fact_column} found "
                            f"in their answer within {limit}, and data.forget_tokens is fact (the loss on "
                            "that span only); mark every row's fact, or forget whole answers")
        if empty := count("no_target"):
            what = "answer" if self.text.format == "qa" else "text"
            raise UserError(f"{role} set {path}: {empty} row(s) keep no {what} token within {limit}; "
                            "raise it or shorten them")
        return {"truncated": count("truncated")}

    def prepared_lines(self, prepared: dict[str, dict[str, int]]) -> list[str]:
        """Rows cut at max_length, of the rows the run read (a set read twice counts twice)."""
        return [f"{role} set: {counts['truncated']} of {counts['rows']} rows read were cut at "
                f"data.text.max_length={self.text.max_length}"
                for role, counts in prepared.items() if counts.get("truncated")]

    # ---- model --------------------------------------------------------------------------------

    def check_model(self) -> None:
        path = self.model_cfg.path
        if Path(path).exists():
            if not (Path(path) / "config.json").is_file():
                raise MissingInputError(f"model.path {path}: not a Hugging Face model directory "
                                        "(no config.json)")
            for weights in sorted(Path(path).glob("*.safetensors")):  # a truncated copy, here
                check_safetensors(weights, "model.path")
        elif not is_hub_name(path):
            raise MissingInputError(f"model.path {path}: no such directory (and not a hub name "
                                    "of the form org/name)")

    def import_model_code(self) -> None:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        config = AutoConfig.from_pretrained(self.model_cfg.path)
        if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:  # else from_pretrained says what is wrong
            MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the lookup imports the architecture's module
        if self.model_cfg.lora is not None:
            import peft  # noqa: F401
        self._tokenizer = self._tokenizer or load_tokenizer(self.model_cfg.path)  # the data's, not the model's

    def build(self, ds_config: dict) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per load is noise in a worker's log
        if ds_config["zero_optimization"]["stage"] == 3:
            if self._hf_deepspeed is None:
                self._hf_deepspeed = HfDeepSpeedConfig(ds_config)
        else:  # a ZeRO-3 config left alive by an earlier model in this process must not apply
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
        model = AutoModelForCausalLM.from_pretrained(self.model_cfg.path, dtype=self.dtype)
        model.train()  # from_pretrained returns eval mode
        if self.model_cfg.gradient_checkpointing:
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.model_cfg.lora is not None:
            from peft import LoraConfig, get_peft_model

            lora = self.model_cfg.lora
            model = get_peft_model(model, LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=lora.target_modules, task_type="CAUSAL_LM"))
        return model

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.model_cfg.dtype == "bf16" else torch.float32

    def scores(self, model, batch: dict[str, torch.Tensor]) -> Scores:
        return sequence_scores(model, batch)

    def evaluate(self, model, sets: dict[str, list[dict]], section, ranks) -> dict[str, dict[str, np.ndarray]]:
        """Every row of each set scored with `model` (the Hugging Face module; under ZeRO-3
        partitioned), this rank its share (`ranks`: tasks.lm_scores.Ranks), batched as
        `section` says (engine.config.EvaluationSection); every rank gets every row's numbers."""
        from hamu_ray.tasks.lm_scores import score_rows

        tokenizer = load_tokenizer(self.model_cfg.path)
        return {name: score_rows(model, tokenizer, rows, self.text, batch_size=section.batch_size,
                                 max_new_tokens=section.max_new_tokens, ranks=ranks)
                for name, rows in sets.items()}

    def attacked(self, model, attack) -> torch.nn.Module:
        """A copy of the whole `model` after one evaluation attack (engine.config.AttackSection)."""
        from hamu_ray.tasks.lm_scores import attacked

        return attacked(model, load_tokenizer(self.model_cfg.path), attack, self.text)

    def unpartitioned(self, device: torch.device) -> torch.nn.Module:
        """The model's architecture whole on `device` in its dtype, weights not loaded (from its
        config; with LoRA the same adapters), outside ZeRO-3's partitioned construction even while
        this task's ZeRO-3 model lives: the copy an evaluation fills (copy_whole_into)."""
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.model_cfg.path),
                                                         dtype=self.dtype)
        finally:
            if self._hf_deepspeed is not None:
                set_hf_deepspeed_config(self._hf_deepspeed)
        if self.model_cfg.lora is not None:
            from peft import LoraConfig, get_peft_model

            lora = self.model_cfg.lora
            model = get_peft_model(model, LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=lora.target_modules, task_type="CAUSAL_LM"))
        return model.eval()

    def reference(self, engine, ds_config: dict):
        if self.model_cfg.lora is not None:
            module = engine.module

            @torch.no_grad()
            def base_scores(batch: dict) -> Scores:
                # the base weights, untouched, with dropout off: the original, scored like the
                # full model's frozen copy (eval mode); the trained model stays in train mode
                with module.disable_adapter(), eval_mode(module):
                    return self.scores(engine, batch)
            return base_scores

        from hamu_ray.engine import deepspeed_engine as eng

        original = self.build(ds_config)
        forward = eng.frozen_copy(original, ds_config, engine.device)

        @torch.no_grad()
        def reference(batch: dict) -> Scores:
            return self.scores(forward, batch)
        return reference

    def export(self, engine, directory: Path | None) -> None:
        """A Hugging Face directory of the consolidated weights (+ tokenizer), or with LoRA the
        adapter; both load back with from_pretrained."""
        from transformers import AutoTokenizer

        from hamu_ray.engine import deepspeed_engine as eng

        module, lora = engine.module, self.model_cfg.lora
        if lora is not None:
            state = eng.trainable_state_dict(engine)  # the adapters, whole, on every rank
            if directory is not None:
                module.save_pretrained(Path(directory) / ADAPTER_DIR, state_dict=state)
        else:
            state = eng.consolidated_state_dict(engine)  # whole on rank 0 only
            if directory is not None:
                module.save_pretrained(Path(directory) / MODEL_DIR, state_dict=state)
        if directory is None:
            return
        tokenizer = AutoTokenizer.from_pretrained(self.model_cfg.path)
        tokenizer.save_pretrained(Path(directory) / (ADAPTER_DIR if lora is not None else MODEL_DIR))
        if lora is not None and lora.export_merged:
            self.export_merged(Path(directory))
            tokenizer.save_pretrained(Path(directory) / MODEL_DIR)

    def export_merged(self, directory: Path) -> None:
        """The base with the exported adapters merged in, built on rank 0's CPU from the input
        directory (read only): a plain Hugging Face model, no peft needed to load it."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        from transformers.integrations.deepspeed import (set_hf_deepspeed_config,
                                                         unset_hf_deepspeed_config)

        unset_hf_deepspeed_config()  # a whole CPU copy on this rank: not a ZeRO-3 collective
        try:
            base = AutoModelForCausalLM.from_pretrained(self.model_cfg.path, dtype=self.dtype)
        finally:
            if self._hf_deepspeed is not None:
                set_hf_deepspeed_config(self._hf_deepspeed)
        merged = PeftModel.from_pretrained(base, directory / ADAPTER_DIR).merge_and_unload()
        merged.save_pretrained(directory / MODEL_DIR)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """`module` in eval mode inside (dropout off); every submodule's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def pad_batch(ids: Sequence, labels: Sequence) -> dict[str, torch.Tensor]:
    """Pad to the longest row of the batch (right padding, masked and ignored)."""
    width = max(len(r) for r in ids)
    batch = {"input_ids": torch.zeros(len(ids), width, dtype=torch.long),
             "attention_mask": torch.zeros(len(ids), width, dtype=torch.long),
             "labels": torch.full((len(ids), width), IGNORE, dtype=torch.long)}
    for i, (row_ids, row_labels) in enumerate(zip(ids, labels)):
        n = len(row_ids)
        batch["input_ids"][i, :n] = torch.as_tensor(np.asarray(row_ids, dtype=np.int64))
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = torch.as_tensor(np.asarray(row_labels, dtype=np.int64))
    return batch


def sequence_scores(model, batch: dict[str, torch.Tensor]) -> Scores:
    """Each row's summed log-likelihood of its target tokens (position t predicts token t+1)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    nll = F.cross_entropy(logits.flatten(0, 1), targets.clamp(min=0).flatten(),
                          reduction="none").view_as(targets)
    logprob = -(nll * mask).sum(-1)
    return Scores(logprob, mask.sum(-1).to(logprob.dtype), logits, mask)


# ---- tokenisation (runs in the workers, window by window) ------------------------------------

@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokenize_batch(batch: pa.Table, *, path: str, text: dict, refusals: bool,
                   fact_column: str | None = None, tokenizer=None) -> pa.Table:
    """Token rows of a batch; with `fact_column` the targets are each answer's fact span only
    (a row whose fact is missing, not in its answer or cut is counted in `no_fact`)."""
    tokenizer, cfg = tokenizer or load_tokenizer(path), TextData(**text)
    no_fact = [0] * batch.num_rows
    if cfg.format == "qa":
        questions = batch.column(cfg.question_column).to_pylist()
        answers = ([refusal_for(q) for q in questions] if refusals
                   else batch.column(cfg.answer_column).to_pylist())
        if fact_column is None:
            rows = [encode_qa(tokenizer, q, a, cfg.prompt) for q, a in zip(questions, answers)]
        else:
            facts = batch.column(fact_column).to_pylist()
            rows = [fact_row(tokenizer, q, a, f, cfg) for q, a, f in zip(questions, answers, facts)]
            no_fact = [int(r is None) for r in rows]
            rows = [r or ([], []) for r in rows]
    else:
        rows = [encode_text(tokenizer, t) for t in batch.column(cfg.text_column).to_pylist()]
    rows = [truncate(ids, labels, cfg.max_length) for ids, labels in rows]
    return pa.table({
        "input_ids": pa.array([r[0] for r in rows], pa.list_(pa.int32())),
        "labels": pa.array([r[1] for r in rows], pa.list_(pa.int32())),
        "truncated": pa.array([r[2] for r in rows], pa.int64()),
        "no_target": pa.array([int(not has_target(r[1]) and not n) for r, n in zip(rows, no_fact)], pa.int64()),
        "no_fact": pa.array(no_fact, pa.int64()),
    })


def fact_row(tokenizer, question: str, answer: str, fact: str | None, cfg: TextData):
    """fact_encoding's (input_ids, labels), or None for a row without a usable fact."""
    try:
        return fact_encoding(tokenizer, question, answer, fact, cfg)
    except ValueError:
        return None


def has_target(labels: Sequence[int]) -> bool:
    """Whether a row keeps a target token: position t predicts token t + 1, so labels[1:]."""
    return any(t != IGNORE for t in labels[1:])


def refusal_for(question: str) -> str:
    digest = hashlib.blake2b(question.encode(), digest_size=4).digest()
    return REFUSALS[int.from_bytes(digest, "little") % len(REFUSALS)]


def encode_qa(tokenizer, question: str, answer: str, prompt: str) -> tuple[list[int], list[int]]:
    """input_ids of prompt + answer, labels = the answer tokens (the prompt is IGNORE)."""
    prompt_ids = prompt_tokens(tokenizer, question, prompt)
    if uses_chat_template(tokenizer, prompt):
        user = [{"role": "user", "content": question}]
        ids = list(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}],
                                                 tokenize=True, return_dict=False))
        if ids[:len(prompt_ids)] != prompt_ids:
            raise UserError(f"the chat template of {tokenizer.name_or_path} does not start the "
                            "answered conversation with the question's prompt; use "
                            "data.text.prompt: plain")
    else:
        ids = prompt_ids + tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return ids, [IGNORE] * len(prompt_ids) + ids[len(prompt_ids):]


def fact_encoding(tokenizer, question: str, answer: str, fact: str, cfg: TextData) -> tuple[list[int], list[int]]:
    """input_ids of the scored (question, answer) and labels that keep only the tokens that
    overlap the fact's characters (its last occurrence in the answer); cut at max_length."""
    ids, labels = encode_qa(tokenizer, question, answer, cfg.prompt)
    where = answer.rfind(fact) if fact else -1
    if where < 0:
        raise ValueError(f"a fact that is not in its answer ({len(fact or '')} characters)")
    first = next(i for i, label in enumerate(labels) if label != IGNORE)  # the answer's first token
    text = answer if uses_chat_template(tokenizer, cfg.prompt) else " " + answer  # as encode_qa tokenises it
    where += len(text) - len(answer)
    piece = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    at = find_sublist(ids, piece["input_ids"], first)
    if at is None:
        raise ValueError("the answer's tokens are not found in the encoded conversation (a chat "
                         "template that rewrites the answer); use data.text.prompt: plain")
    span = {at + k for k, (a, b) in enumerate(piece["offset_mapping"]) if a < where + len(fact) and b > where}
    fact_labels = [t if i in span else IGNORE for i, t in enumerate(ids)]
    if max(span) >= cfg.max_length:
        raise ValueError(f"a fact cut at data.text.max_length={cfg.max_length}")
    return truncate(ids, fact_labels, cfg.max_length)[:2]


def find_sublist(ids: list[int], part: list[int], start: int) -> int | None:
    for at in range(start, len(ids) - len(part) + 1):
        if ids[at:at + len(part)] == part:
            return at
    return None


def prompt_tokens(tokenizer, question: str, prompt: str) -> list[int]:
    """The tokens a model answers after: the chat template's generation prompt, or plain text."""
    if uses_chat_template(tokenizer, prompt):
        user = [{"role": "user", "content": question}]
        return list(tokenizer.apply_chat_template(user, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return tokenizer(plain_prompt(question))["input_ids"]


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    ids = tokenizer(text)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids, list(ids)


def plain_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def uses_chat_template(tokenizer, prompt: str) -> bool:
    if prompt == "chat" and tokenizer.chat_template is None:
        raise UserError(f"data.text.prompt is chat but the tokenizer of {tokenizer.name_or_path} "
                        "has no chat template")
    return prompt == "chat" or (prompt == "auto" and tokenizer.chat_template is not None)


def truncate(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], int]:
    if len(ids) <= max_length:
        return ids, labels, 0
    return ids[:max_length], labels[:max_length], 1


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # Ray forks its own workers
