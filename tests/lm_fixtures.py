"""A tiny Llama-architecture model and a tokenizer trained here, saved with `save_pretrained`:
the same `from_pretrained` path a cluster user's Llama or Qwen checkpoint takes, without a hub.

The tokenizer is a byte-level BPE trained with the `tokenizers` library on real English text
(the Python standard library's module documentation); the QA rows are real facts from the same
source ("What is the Python module X for?" → the first words of its documentation).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from hamu_ray.tasks import small_llama
from hamu_ray.tasks.small_llama import SmallLlama

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


def build_tiny_lm(directory: Path, *, chat_template: str | None = None, seed: int = 0) -> Path:
    """≈0.85M parameters: hidden 128, 4 layers, 4 heads (2 key-value heads), vocab 1024."""
    shape = SmallLlama(hidden_size=128, intermediate_size=256, layers=4, heads=4, kv_heads=2,
                       vocab_size=VOCAB, seed=seed)
    return small_llama.build(directory, shape, documentation().values(), chat_template=chat_template)


def lm_batch(task, rows: list[dict], refusals: bool = False) -> dict:
    """The batch a worker would build from these rows: the task's tokenisation, then its padding."""
    import numpy as np
    import pyarrow as pa

    from hamu_ray.tasks.causal_lm import tokenize_batch

    table = tokenize_batch(pa.Table.from_pylist(rows), path=task.model_cfg.path,
                           text=task.text.model_dump(), refusals=refusals)
    return task.make_batch({k: np.array(table.column(k).to_pylist(), dtype=object)
                            for k in ("input_ids", "labels")})
