"""The local files and directories a job or a pipeline reads, from one table of its fields:
`hamu-ray validate` checks that they exist, `hamu-ray submit` that they are absolute."""

from __future__ import annotations

from pathlib import Path

# the config fields that may name an input by path (a built-in set's `forget` is a request, not a
# path; a pipeline's monitor holds sizes, a job's the sample files)
INPUT_FIELDS = {"data": ("root", "forget", "retain", "eval", "test", "holdout"),
                "model": ("weights", "path", "oracle"), "monitor": ("forget", "retain")}


def local_inputs(cfg) -> list[tuple[str, str]]:
    """(field, path) of every input `cfg` (a job or a pipeline) names on this machine's file
    system: not a URI such as s3://…, nor a language model's hub name."""
    named = [(f"{section}.{name}", getattr(getattr(cfg, section, None), name, None))
             for section, names in INPUT_FIELDS.items() for name in names]
    return [(field, path) for field, path in named if isinstance(path, str) and "://" not in path
            and not (field.startswith("model.") and cfg.model.kind == "causal_lm" and is_hub_name(path))]


def is_hub_name(path: str) -> bool:
    """A language model's path that is no local directory and reads `org/name` is a hub name
    (as the task reads it); an absolute or ./-relative path is always local."""
    return (not Path(path).expanduser().exists() and not path.startswith((".", "/", "~"))
            and path.count("/") == 1)


def missing_inputs(cfg) -> list[tuple[str, str]]:
    return [(field, path) for field, path in local_inputs(cfg) if not Path(path).expanduser().exists()]
