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
        "code": code_version(),
    }
    return sign(receipt)


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
