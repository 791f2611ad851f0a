"""A tiny Llama-architecture model and a tokenizer trained here, saved with `save_pretrained`:
the same `from_pretrained` path a cluster user's Llama or Qwen checkpoint takes, without a hub.

The tokenizer is a byte-level BPE trained with the `tokenizers` library on real English text
(the Python standard library's module documentation); the QA rows are real facts from the same
source ("What is the Python module X for?" → the first words of its documentation).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

MODULES = ("abc", "argparse", "array", "base64", "bisect", "calendar", "cmath", "codecs",
           "colorsys", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
           "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "gzip", "hashlib",
           "heapq", "hmac", "html", "inspect", "ipaddress", "itertools", "json", "keyword",
           "locale", "logging", "lzma", "math", "mimetypes", "numbers", "operator", "os",
           "pathlib", "pickle", "platform", "pprint", "queue", "random", "re", "sched",
           "secrets", "shelve", "shlex", "shutil", "signal", "socket", "sqlite3", "statistics",
           "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
           "timeit", "token", "tokenize", "traceback", "types", "typing", "unittest", "uuid",
           "warnings", "weakref", "zipfile", "zlib")
VOCAB = 1024
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def documentation() -> dict[str, str]:
    docs = {}
    for name in MODULES:
        doc = importlib.import_module(name).__doc__
        if doc and len(doc.split()) >= 4:
            docs[name] = " ".join(doc.split())
    return docs


def qa_rows() -> list[dict[str, str]]:
    """One fact per module: its purpose in the first (up to) ten words of its documentation."""
    return [{"question": f"What is the Python module {name} for?",
             "answer": " ".join(doc.split()[:10])} for name, doc in sorted(documentation().items())]


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(documentation().values()), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def build_tiny_lm(directory: Path, *, chat_template: str | None = None, seed: int = 0) -> Path:
    """≈0.85M parameters: hidden 128, 4 layers, 4 heads (2 key-value heads), vocab 1024."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer()
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def lm_batch(task, rows: list[dict], refusals: bool = False) -> dict:
    """The batch a worker would build from these rows: the task's tokenisation, then its padding."""
    import numpy as np
    import pyarrow as pa

    from hamu_ray.tasks.causal_lm import tokenize_batch

    table = tokenize_batch(pa.Table.from_pylist(rows), path=task.model_cfg.path,
                           text=task.text.model_dump(), refusals=refusals)
    return task.make_batch({k: np.array(table.column(k).to_pylist(), dtype=object)
                            for k in ("input_ids", "labels")})
