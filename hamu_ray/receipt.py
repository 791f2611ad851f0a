"""The unlearning receipt: what was forgotten, by which model change, with which evidence.

Every unlearning job writes `receipt.json` beside its model. It commits to the forget set
without containing it (a Merkle root over per-row digests), names the retain set and the input
and output models by digest, and records the method, the steps, the stop reason and how often
the rule's guarantee held. `verify` recomputes every digest it can from the files at hand;
`prove` gives one row's inclusion proof, so a data subject can be shown their row was in the
request without the other rows being revealed.

The forget-set commitment (the rule, written once; ROW_RULE and TREE_RULE go into each receipt):
  row digest   sha256 of the row as canonical JSON: an object of every column of the file,
               keys sorted, no spaces, UTF-8 (values as pyarrow reads them)
  leaf         sha256(0x00 ‖ row digest), rows in file order
  node         sha256(0x01 ‖ left ‖ right); a level with an odd count promotes its last node
               unchanged; the root is the single node left (one row: its leaf)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from hamu_ray.errors import UserError

ROW_RULE = "sha256 of the row as JSON: every column, keys sorted, separators (',', ':'), UTF-8"
TREE_RULE = ("leaf = sha256(0x00 || row digest), rows in file order; node = sha256(0x01 || left || "
             "right); an odd level promotes its last node unchanged; the root is the last node")
VERSION = "hamu-ray unlearning receipt v1"
KEY_ENV = "HAMU_RECEIPT_KEY"  # optional HMAC-SHA256 key: the receipt is then signed
NOT_MODEL = {"ray", "step_log.jsonl", "summary.json", "receipt.json"}  # beside the model in output_dir


class ReceiptError(UserError, ValueError):
    """A receipt or a row that cannot be read or used; the message names it."""


# ---- the Merkle commitment ------------------------------------------------------------------

def row_digests(path: str) -> list[str]:
    """One hex digest per row of a parquet or JSON-lines file, in file order (ROW_RULE)."""
    import pyarrow.dataset as pads

    from hamu_ray.engine.data import file_format

    table = pads.dataset(path, format=file_format("forget", path)).to_table()
    return [hashlib.sha256(json.dumps(row, sort_keys=True, separators=(",", ":"),
                                      ensure_ascii=False).encode()).hexdigest()
            for row in table.to_pylist()]


def _leaf(digest: str) -> bytes:
    return hashlib.sha256(b"\x00" + bytes.fromhex(digest)).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def merkle_levels(digests: list[str]) -> list[list[bytes]]:
    if not digests:
        raise ReceiptError("a Merkle root needs at least one row")
    levels = [[_leaf(d) for d in digests]]
    while len(levels[-1]) > 1:
        level = levels[-1]
        levels.append([_node(level[i], level[i + 1]) if i + 1 < len(level) else level[i]
                       for i in range(0, len(level), 2)])
    return levels


def merkle_root(digests: list[str]) -> str:
    return merkle_levels(digests)[-1][0].hex()


def inclusion_proof(digests: list[str], index: int) -> list[dict]:
    """The sibling hashes from row `index`'s leaf to the root; a promoted node has none."""
    if not 0 <= index < len(digests):
        raise ReceiptError(f"row {index} is not in the set (it has {len(digests)} rows, numbered from 0)")
    proof = []
    for level in merkle_levels(digests)[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            proof.append({"side": "left" if sibling < index else "right", "hash": level[sibling].hex()})
        index //= 2
    return proof


def proof_holds(digest: str, proof: list[dict], root: str) -> bool:
    node = _leaf(digest)
    for step in proof:
        sibling = bytes.fromhex(step["hash"])
        node = _node(sibling, node) if step["side"] == "left" else _node(node, sibling)
    return node.hex() == root


# ---- digests of models -----------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def model_files(directory: Path) -> dict[str, str]:
    """sha256 of every model file in an output directory (not the logs, the summary, the
    receipt or Ray's storage), by path relative to it."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): file_sha256(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.relative_to(directory).parts[0] not in NOT_MODEL}


def combined(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def input_model(model_cfg) -> dict | None:
    """The model the job started from: a classifier's weights file or a causal LM's directory
    (None: a freshly initialised classifier; a hub name is recorded without a digest)."""
    path = getattr(model_cfg, "weights", None) or getattr(model_cfg, "path", None)
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return {"path": str(p), "sha256": file_sha256(p)}
    if p.is_dir():
        files = model_files(p)
        return {"path": str(p), "files": files, "sha256": combined(files)}
    return {"path": str(path), "sha256": None}


# ---- the receipt -----------------------------------------------------------------------------

def guarantee_record(step_log: list[dict]) -> dict:
    """Of the steps a HAMU rule took, how many made a first-order forget gain of at least B."""
    taken = [r for r in step_log if "guarantee/constraint" in r and r.get("stop") == "none"]
    held = sum(r["guarantee/forget_gain"] >= r["guarantee/constraint"] * (1 - 1e-6) for r in taken)
    return {"steps": len(taken), "held": held, "hold_rate": held / len(taken) if taken else None}


STOP_MEANING = {"none": "it ran its whole step budget",
                "criterion": "the stopping criterion: gaining B more would have raised the retain loss",
                "infeasible": "no step inside the radius could gain B",
                "forget_target": "its forget probability reached the target"}


def _span(values: list[float]) -> dict:
    return {"first": values[0], "last": values[-1], "min": min(values), "max": max(values),
            "mean": sum(values) / len(values)}


def hardness_trace(step_log: list[dict]) -> dict | None:
    """The run's hardness in numbers: per step the mean over blocks of cos(g_r, g_f), how many
    steps conflicted (mean cos θ > 0), and the stopping margin (the exact test's right-hand side
    minus B); None for a method that computes no hardness."""
    rows = [r for r in step_log if "hardness/cosine_mean" in r]
    if not rows:
        return None
    cosines = [r["hardness/cosine_mean"] for r in rows]
    trace = {"steps": len(rows), "cosine_mean": _span(cosines),
             "conflicting_steps": sum(c > 0 for c in cosines)}
    margins = [r["stop/margin"] for r in rows if "stop/margin" in r]
    if margins:
        trace["stop_margin"] = _span(margins)
    return trace


def losses(step_log: list[dict]) -> dict:
    """The batch losses at the first and last step (what the run did to them)."""
    found = {}
    for key in ("loss/retain", "loss/forget"):
        values = [r[key] for r in step_log if key in r]
        if values:
            found[key.split("/")[1]] = {"first": values[0], "last": values[-1]}
    return found


def engine_verdict(receipt: dict) -> str:
    """One paragraph on what the run did, from the receipt's own numbers."""
    text = (f"{receipt['method']} took {receipt['steps']} steps and stopped because "
            f"{STOP_MEANING.get(receipt['stop'], receipt['stop'])}.")
    guarantee = receipt["guarantee"]
    if guarantee["steps"]:
        text += (f" Its first-order guarantee (forget gain ≥ B) held on {guarantee['held']} of "
                 f"{guarantee['steps']} steps.")
    else:
        text += " The method gives no per-step guarantee."
    trace = receipt.get("hardness")
    if trace:
        text += (f" Retain and forget gradients conflicted on {trace['conflicting_steps']} of {trace['steps']} "
                 f"steps (mean block cos θ {trace['cosine_mean']['mean']:+.3f}).")
    for name, span in receipt.get("losses", {}).items():
        text += f" The {name} batch loss went from {span['first']:.4g} to {span['last']:.4g}."
    return text


def build(cfg, sets: dict, summary: dict, output_dir: Path, step_log: list[dict]) -> dict:
    forget = sets["forget"]
    files = model_files(output_dir)
    receipt = {
        "receipt": VERSION,
        "forget": {"path": forget.path, "rows": forget.num_rows,
                   "merkle_root": merkle_root(row_digests(forget.path)),
                   "row_rule": ROW_RULE, "tree_rule": TREE_RULE},
        "retain": {"path": sets["retain"].path, "rows": sets["retain"].num_rows,
                   "sha256_16": sets["retain"].digest},
        "model_in": input_model(cfg.model),
        "model_out": {"files": files, "sha256": combined(files)},
        "method": cfg.method.name, "rule": cfg.method.rule_name, "hparams": cfg.method.hparams,
        "objective": cfg.method.objective, "lr": cfg.train.lr, "zero_stage": cfg.train.zero_stage,
        "steps": summary["steps"], "stop": summary["stop"],
        "guarantee": guarantee_record(step_log),
        "hardness": hardness_trace(step_log),
        "losses": losses(step_log),
        "code": code_version(),
    }
    receipt["verdict"] = engine_verdict(receipt)
    return sign(receipt)


def with_evaluation(receipt: dict, evaluation: dict, verdict: str) -> dict:
    """The receipt with a pipeline's evaluation of the unlearned model (against the oracle when
    there is one) and the verdict extended by it; signed anew when a key is set."""
    updated = {k: v for k, v in receipt.items() if k != "signature"}
    updated["evaluation"] = evaluation
    updated["verdict"] = engine_verdict(updated) + " " + verdict
    return sign(updated)


def code_version() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return {"hamu_ray": version("hamu-ray")}
    except PackageNotFoundError:
        return {"hamu_ray": "not installed"}


def _payload(receipt: dict) -> bytes:
    unsigned = {k: v for k, v in receipt.items() if k != "signature"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()


def sign(receipt: dict) -> dict:
    key = os.environ.get(KEY_ENV)
    if key:
        receipt["signature"] = {"hmac_sha256": hmac.new(key.encode(), _payload(receipt), "sha256").hexdigest(),
                                "key_from": KEY_ENV}
    return receipt


def verify(receipt: dict, model_dir: Path | None = None, forget: str | None = None) -> list[tuple[str, bool, str]]:
    """(what, matches, detail) for every digest that can be recomputed from what is given."""
    checks = []
    if "signature" in receipt:
        key = os.environ.get(KEY_ENV)
        if not key:
            checks.append(("signature", False, f"signed, but ${KEY_ENV} is not set to check it"))
        else:
            ok = hmac.compare_digest(receipt["signature"]["hmac_sha256"],
                                     hmac.new(key.encode(), _payload(receipt), "sha256").hexdigest())
            checks.append(("signature", ok, "valid" if ok else "does not match this receipt and key"))
    if model_dir is not None:
        expected, got = receipt["model_out"]["files"], model_files(Path(model_dir))
        for name in sorted(set(expected) | set(got)):
            if name not in got:
                checks.append((name, False, "missing"))
            elif name not in expected:
                checks.append((name, False, "not in the receipt"))
            else:
                ok = got[name] == expected[name]
                checks.append((name, ok, "matches" if ok else f"sha256 {got[name][:16]}… ≠ {expected[name][:16]}…"))
    if forget is not None:
        root = merkle_root(row_digests(forget))
        ok = root == receipt["forget"]["merkle_root"]
        checks.append(("forget set", ok, "Merkle root matches" if ok else
                       f"Merkle root {root[:16]}… ≠ {receipt['forget']['merkle_root'][:16]}…"))
    return checks


def load(path: str) -> dict:
    try:
        receipt = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReceiptError(f"receipt {path}: cannot read it ({exc})") from None
    if not isinstance(receipt, dict) or receipt.get("receipt") != VERSION:
        raise ReceiptError(f"receipt {path}: not a {VERSION}")
    return receipt
