"""The unlearning receipt: what was forgotten, by which model change, with which evidence.

Every unlearning job writes `receipt.json` beside its model. It commits to the forget set
without containing it (a Merkle root over per-row digests), names the retain set and the input
and output models by digest, and records the method, the steps, the stop reason, how often
the rule's guarantee held and what decides its numbers (seeds, libraries, device, kernel
settings). `verify` recomputes every digest it can from the files at hand;
`prove` gives one row's inclusion proof, so a data subject can be shown their row was in the
request without the other rows being revealed.

The forget-set commitment (the rule, written once; ROW_RULE and TREE_RULE go into each receipt):
  row digest   HMAC-SHA256 under the output's digest key of the row as canonical JSON
               (hamu_ray.digests: the key, the encoding of every Arrow type); the receipt
               records which key (its id, and its file or $HAMU_RECEIPT_KEY), never the key
  leaf         sha256(0x00 ‖ row digest), rows in file order
  node         sha256(0x01 ‖ left ‖ right); a level with an odd count promotes its last node
               unchanged; the root is the single node left (one row: its leaf)

A model's digest (MODEL_RULE, one definition for receipts and the model registry): a weights
file's sha256 (what `sha256sum` prints); a directory's, the sha256 of the JSON object
{path relative to it: file sha256} of its model files, keys sorted, separators (',', ':').
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from hamu_ray import digests
from hamu_ray.digests import KEY_ENV, ROW_RULE, DigestKey
from hamu_ray.engine.data import DIGEST_RULE
from hamu_ray.errors import UserError

TREE_RULE = ("leaf = sha256(0x00 || row digest), rows in file order; node = sha256(0x01 || left || "
             "right); an odd level promotes its last node unchanged; the root is the last node")
MODEL_RULE = ("a file: its sha256; a directory: sha256 of the JSON object {relative path: file sha256} "
              "of its model files, keys sorted, separators (',', ':')")
# v2: keyed row digests, one model digest rule; v3: the determinism record; v4: the retain set's
# digest built from its files' blocks (engine.data.DIGEST_RULE, the workers'). The version is part of
# every pipeline stage's cache key (pipeline.stages.stage_key): a new one reruns cached stages.
VERSION = "hamu-ray unlearning receipt v4"
# $HAMU_RECEIPT_KEY (optional): the receipt is then HMAC-SHA256 signed, and the row digests keyed by it
NOT_MODEL = {"ray", "step_log.jsonl", "summary.json", "receipt.json", digests.KEY_FILE}  # beside the model


class ReceiptError(UserError, ValueError):
    """A receipt or a row that cannot be read or used; the message names it."""


# ---- the Merkle commitment ------------------------------------------------------------------

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
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_digest(path: Path) -> str:
    """A model's digest by MODEL_RULE: the same for a model wherever it is read (a job's input,
    a job's export, a registry version)."""
    path = Path(path)
    return combined(model_files(path)) if path.is_dir() else file_sha256(path)


def input_model(model_cfg) -> dict | None:
    """The model the job started from: a classifier's weights file or a causal LM's directory
    (None: a freshly initialised classifier; a hub name is recorded without a digest)."""
    path = getattr(model_cfg, "weights", None) or getattr(model_cfg, "path", None)
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return {"path": str(p), "sha256": model_digest(p)}
    if p.is_dir():
        return {"path": str(p), "files": model_files(p), "sha256": model_digest(p)}
    return {"path": str(path), "sha256": None}


def exported_model(output_dir: Path) -> Path:
    """The model a job exported into its output directory: a language model's Hugging Face
    directory (with LoRA: the merged model, else the adapter) or a classifier's weights file."""
    from hamu_ray.tasks.causal_lm import ADAPTER_DIR, MODEL_DIR
    from hamu_ray.tasks.classifier import EXPORT_WEIGHTS

    found = [output_dir / name for name in (MODEL_DIR, ADAPTER_DIR, EXPORT_WEIGHTS) if (output_dir / name).exists()]
    if not found:
        raise ReceiptError(f"{output_dir}: no exported model ({MODEL_DIR}/, {ADAPTER_DIR}/ or {EXPORT_WEIGHTS})")
    return found[0]


# ---- the receipt -----------------------------------------------------------------------------

# What each rule's guarantee bounds (RuleSpec.guarantees), as the step log has it: the true
# (unclipped) first-order effects of the step taken. With clip_norm the rule keeps the clipped
# quantity ≥ B, so the true one is ≥ B / scale ≥ B as well.
GUARANTEED = {"forget_gain": ("forget gain", lambda r: r["guarantee/forget_gain"]),
              "retain_drop": ("retain-loss drop", lambda r: -r["guarantee/retain_change"])}
# The same quantities as measured on the step's own batches after it (train.measure).
REALISED = {"forget_gain": lambda r: r["realised/forget_gain"],
            "retain_drop": lambda r: -r["realised/retain_change"]}
# Rounding allowance, relative to the step's first-order effects: the realised values are
# computed in float64 from the same statistics the rule solved with.
GUARANTEE_RTOL = 1e-9


def guarantee_record(step_log: list[dict], rule_name: str) -> dict:
    """Of the steps the rule took (rules.took_step), on how many its guaranteed quantity reached
    the B logged with it."""
    from hamu_ray.rules import RULES, took_step

    kind = RULES[rule_name].guarantees if rule_name in RULES else None
    if kind is None:
        return {"quantity": None, "B": None, "steps": 0, "held": 0, "hold_rate": None}
    quantity, value = GUARANTEED[kind]
    taken = [r for r in step_log if took_step(r) and "guarantee/B" in r]
    held = sum(_holds(value(r), r["guarantee/B"], r) for r in taken)
    record = {"quantity": quantity, "B": taken[0]["guarantee/B"] if taken else None, "steps": len(taken),
              "held": held, "hold_rate": held / len(taken) if taken else None}
    constraints = [r["guarantee/B"] for r in taken]
    if constraints and min(constraints) != max(constraints):  # scale-free units or a trust region
        record["B_span"] = [min(constraints), max(constraints)]
    measured = [r for r in taken if "realised/retain_change" in r]
    if measured:
        record["realised"] = realised_record(measured, REALISED[kind])
    return record


def realised_record(measured: list[dict], value) -> dict:
    """What the measured steps did: on how many the guaranteed quantity really reached B, and
    the retain-loss change the first-order model predicted against the one measured."""
    predicted = [r["guarantee/retain_change"] for r in measured]
    realised = [r["realised/retain_change"] for r in measured]
    return {"steps": len(measured), "held": sum(value(r) >= r["guarantee/B"] for r in measured),
            "retain_change_predicted": sum(predicted), "retain_change_realised": sum(realised),
            "worst_retain_error": max(b - a for a, b in zip(predicted, realised))}


def _holds(achieved: float, constraint: float, record: dict) -> bool:
    scale = constraint + abs(record["guarantee/forget_gain"]) + abs(record["guarantee/retain_change"])
    return achieved >= constraint - GUARANTEE_RTOL * scale


STOP_MEANING = {"none": "it ran its whole step budget",
                "criterion": "the stopping criterion: gaining B more would have raised the retain loss",
                "infeasible": "no step inside the radius could gain B",
                "forget_target": "its forget probability reached the target",
                "trust_region": "the trust region: the first-order model kept missing the measured "
                                "retain change down to the smallest radius"}


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


def realised_verdict(realised: dict | None) -> str:
    if not realised:
        return ""
    return (f" Measured on each step's own batches after it, it held on {realised['held']} of "
            f"{realised['steps']}; the first-order model predicted a retain-loss change of "
            f"{realised['retain_change_predicted']:+.4g} in total, the steps made "
            f"{realised['retain_change_realised']:+.4g} (worst step {realised['worst_retain_error']:+.4g} "
            "above its prediction).")


def engine_verdict(receipt: dict) -> str:
    """One paragraph on what the run did, from the receipt's own numbers."""
    text = (f"{receipt['method']} took {receipt['steps']} steps and stopped because "
            f"{STOP_MEANING.get(receipt['stop'], receipt['stop'])}.")
    guarantee = receipt["guarantee"]
    if guarantee["steps"]:
        span = guarantee.get("B_span")
        constraint = f"B = {guarantee['B']:.4g}" if not span else f"B, {span[0]:.4g} to {span[1]:.4g} by step"
        text += (f" Its first-order guarantee ({guarantee['quantity']} ≥ {constraint}) held on "
                 f"{guarantee['held']} of {guarantee['steps']} steps taken.")
        text += realised_verdict(guarantee.get("realised"))
    elif guarantee["quantity"]:
        text += f" It took no step, so its guarantee ({guarantee['quantity']} ≥ B) was never tested."
    else:
        text += " The method gives no per-step guarantee."
    trace = receipt.get("hardness")
    if trace:
        text += (f" Retain and forget gradients conflicted on {trace['conflicting_steps']} of {trace['steps']} "
                 f"steps (mean block cos θ {trace['cosine_mean']['mean']:+.3f}).")
    for name, span in receipt.get("losses", {}).items():
        text += f" The {name} batch loss went from {span['first']:.4g} to {span['last']:.4g}."
    if "determinism" in receipt:  # (a receipt made by hand, in a test, may leave it out)
        text += determinism_verdict(receipt["determinism"])
    return text


def build(cfg, sets: dict, summary: dict, output_dir: Path, step_log: list[dict], key: DigestKey) -> dict:
    """The receipt of the job whose output is (being written) in `output_dir`; `key` keys the
    forget rows' digests (digests.output_key)."""
    forget = sets["forget"]
    model = exported_model(Path(output_dir))
    receipt = {
        "receipt": VERSION,
        "forget": {"path": forget.path, "rows": forget.num_rows,
                   "merkle_root": merkle_root(digests.row_digests(forget.path, key)),
                   "digest_key": key_record(key, Path(output_dir)),
                   "row_rule": ROW_RULE, "tree_rule": TREE_RULE},
        "retain": {"path": sets["retain"].path, "rows": sets["retain"].num_rows,
                   "sha256_16": staged_retain_digest(summary), "digest_rule": DIGEST_RULE},
        "model_in": input_model(cfg.model),
        "model_out": {"path": str(model.relative_to(output_dir)), "sha256": model_digest(model),
                      "files": model_files(Path(output_dir))},
        "model_rule": MODEL_RULE,
        "method": cfg.method.name, "rule": cfg.method.rule_name, "hparams": cfg.method.hparams,
        "objective": cfg.method.objective, "lr": cfg.train.lr, "zero_stage": cfg.train.zero_stage,
        "steps": summary["steps"], "stop": summary["stop"],
        "guarantee": guarantee_record(step_log, cfg.method.rule_name),
        "hardness": hardness_trace(step_log),
        "losses": losses(step_log),
        "code": code_version(),
        "determinism": staged_determinism(summary),
    }
    receipt["verdict"] = engine_verdict(receipt)
    return sign(receipt)


def with_evaluation(receipt: dict, evaluation: dict, verdict: str) -> dict:
    """The receipt with a pipeline's evaluation of the unlearned model (against the oracle when
    there is one) and the verdict extended by it; signed anew when a key is set."""
    return extended(receipt, "evaluation", evaluation, engine_verdict(receipt) + " " + verdict)


def with_lineage(receipt: dict, lineage: dict, sentence: str) -> dict:
    """The receipt of a deletion request (hamu_ray.lineage) with its link to the version it
    unlearned from and the rows forgotten along the lineage; signed anew when a key is set."""
    return extended(receipt, "lineage", lineage, receipt["verdict"] + " " + sentence)


def extended(receipt: dict, key: str, block: dict, verdict: str) -> dict:
    """The receipt with one more block and its verdict, signed anew (the old signature dropped)."""
    updated = {k: v for k, v in receipt.items() if k != "signature"}
    updated[key], updated["verdict"] = block, verdict
    return sign(updated)


def code_version() -> dict:
    return {"hamu_ray": installed_version("hamu-ray") or "not installed"}


def installed_version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


# ---- what decides the numbers ----------------------------------------------------------------

LIBRARIES = ("torch", "deepspeed", "ray", "transformers", "peft", "numpy")  # None: not installed


def staged_determinism(summary: dict) -> dict:
    """The record the rank-0 worker gathered (determinism_record); a run staged by a version
    before receipt v3 has none and cannot be published as v3."""
    if "determinism" not in summary:
        raise ValueError("this run was trained by a hamu-ray before receipt format v3 and has no "
                         "determinism record: delete its staging directory and run it again")
    return summary["determinism"]


def staged_retain_digest(summary: dict) -> str:
    """The retain set's content digest the workers computed (engine.data.DIGEST_RULE); a run
    staged by a version before receipt v4 has none."""
    digest = summary.get("sets", {}).get("retain", {}).get("sha256")
    if digest is None:
        raise ValueError("this run was trained by a hamu-ray before receipt format v4 and has no content "
                         "digest of its retain set: delete its staging directory and run it again")
    return digest


def determinism_record(cfg, device, dtype, workers: int) -> dict:
    """What decides a run's numbers besides its inputs: the seeds, the libraries, the device and
    its kernel settings, the dtype trained in, the ZeRO stage and the number of workers. Called
    on the rank-0 worker, where the numbers are made: the libraries, thread counts and kernels
    are that process's (every rank is taken to run the same image on the same kind of device).
    `device`: the engine's torch.device; `dtype`: its parameters' torch.dtype."""
    import platform

    import torch

    from hamu_ray.kernels import kernel_env

    device = torch.device(device)
    record = {
        "seeds": {"train": cfg.train.seed, "data_shuffle": cfg.data.shuffle_seed},
        "libraries": {"python": platform.python_version(), **{name: installed_version(name) for name in LIBRARIES}},
        "device": {"kind": device.type, "count": workers,  # one per worker
                   "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
                   "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                   "kernel_pins": kernel_env()},  # empty: the machine's own kernels
        "threads": {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()},
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "dtype": str(dtype).removeprefix("torch."),
        "zero_stage": cfg.train.zero_stage, "workers": workers,
    }
    if device.type == "cuda":
        record["cudnn"] = {"deterministic": torch.backends.cudnn.deterministic,
                           "benchmark": torch.backends.cudnn.benchmark}
    return record


def determinism_verdict(record: dict) -> str:
    """The determinism record in one sentence of the verdict."""
    device, threads, seeds = record["device"], record["threads"], record["seeds"]
    pins = device.get("kernel_pins") or {}  # (a record made before pins were recorded has none)
    pinned = f" pinned by {' '.join(f'{k}={v}' for k, v in pins.items())}" if pins else " (the machine's own)"
    kernels = f", {device['cpu_capability']} kernels{pinned}" if device["kind"] == "cpu" else ""
    return (f" Its numbers come from {record['workers']} {device['kind']} worker(s) ({device['name']}{kernels}, "
            f"{threads['intra_op']} intra-op / {threads['inter_op']} inter-op thread(s)) in {record['dtype']} at "
            f"ZeRO stage {record['zero_stage']}, torch {record['libraries']['torch']}, seed {seeds['train']}, "
            f"data shuffle seed {seeds['data_shuffle']}, deterministic algorithms "
            f"{'on' if record['deterministic_algorithms'] else 'off'}.")


def _payload(receipt: dict) -> bytes:
    unsigned = {k: v for k, v in receipt.items() if k != "signature"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()


def sign(receipt: dict) -> dict:
    key = os.environ.get(KEY_ENV)
    if key:
        receipt["signature"] = {"hmac_sha256": hmac.new(key.encode(), _payload(receipt), "sha256").hexdigest(),
                                "key_from": KEY_ENV}
    return receipt


def key_record(key: DigestKey, output_dir: Path) -> dict:
    """Which key made the row digests: its id, and where it is (its file relative to the
    receipt's directory, or $HAMU_RECEIPT_KEY); never the key itself."""
    if key.file is None:
        return {"id": key.id, "from": f"${KEY_ENV}"}
    return {"id": key.id, "file": os.path.relpath(key.file.resolve(), Path(output_dir).resolve())}


def forget_key(receipt: dict, receipt_dir: Path, key_file: str | None = None) -> DigestKey:
    """The key to recompute the receipt's row digests with: `key_file` when given, else the one
    the receipt names. A key whose id is not the receipt's is refused: with it every digest
    would differ, and the forget set would look changed when it is not."""
    recorded = receipt["forget"]["digest_key"]
    if key_file is not None:
        key = digests.read_key(key_file)
    elif "file" in recorded:
        path = Path(receipt_dir) / recorded["file"]
        if not path.exists():
            raise ReceiptError(f"the receipt's row digests are keyed by {path}, which is not there; pass "
                               f"--key FILE (the {digests.KEY_FILE} of the job's or pipeline's output directory)")
        key = digests.read_key(path)
    else:
        key = digests.env_key()
        if key is None:
            raise ReceiptError(f"the receipt's row digests are keyed by ${KEY_ENV}: set it to the key the job ran with")
    if key.id != recorded["id"]:
        raise ReceiptError(f"digest key {key.source} is not the one this receipt's row digests were made with "
                           f"(key id {key.id}; the receipt's is {recorded['id']})")
    return key


def verify(receipt: dict, model_dir: Path | None = None, forget: str | None = None,
           key: DigestKey | None = None) -> list[tuple[str, bool, str]]:
    """(what, matches, detail) for every digest that can be recomputed from what is given:
    the signature, the model files in `model_dir` (the job's output directory), the forget
    set's Merkle root (with `key`, forget_key's)."""
    checks = [signature_check(receipt)] if "signature" in receipt or os.environ.get(KEY_ENV) else []
    if model_dir is not None:
        checks += model_checks(receipt, Path(model_dir))
    if forget is not None:
        root = merkle_root(digests.row_digests(forget, key))
        ok = root == receipt["forget"]["merkle_root"]
        checks.append(("forget set", ok, "Merkle root matches" if ok else
                       f"Merkle root {root[:16]}… ≠ {receipt['forget']['merkle_root'][:16]}…"))
    return checks


def signature_check(receipt: dict) -> tuple[str, bool, str]:
    key = os.environ.get(KEY_ENV)
    if "signature" not in receipt:  # with the key, every receipt is signed as it is written
        return ("signature", False, f"missing, and ${KEY_ENV} is set: the receipt was not made with this "
                                    "key, or its signature was removed")
    if not key:
        return ("signature", False, f"signed, but ${KEY_ENV} is not set to check it")
    ok = hmac.compare_digest(receipt["signature"]["hmac_sha256"],
                             hmac.new(key.encode(), _payload(receipt), "sha256").hexdigest())
    return ("signature", ok, "valid" if ok else "does not match this receipt and key")


def model_checks(receipt: dict, model_dir: Path) -> list[tuple[str, bool, str]]:
    expected = receipt["model_out"]["files"]
    if not model_dir.is_dir():
        what = "is a file" if model_dir.is_file() else "does not exist"
        raise ReceiptError(f"--model {model_dir} {what}: give the job's output directory, the one its receipt "
                           f"was written to (it holds the model, {receipt['model_out']['path']})")
    got, checks = model_files(model_dir), []
    for name in sorted(set(expected) | set(got)):
        if name not in got:
            checks.append((name, False, "missing"))
        elif name not in expected:
            checks.append((name, False, "not in the receipt"))
        else:
            ok = got[name] == expected[name]
            checks.append((name, ok, "matches" if ok else f"sha256 {got[name][:16]}… ≠ {expected[name][:16]}…"))
    return checks


def load(path: str) -> dict:
    try:
        receipt = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReceiptError(f"receipt {path}: cannot read it ({exc})") from None
    if not isinstance(receipt, dict) or not str(receipt.get("receipt", "")).startswith("hamu-ray unlearning receipt"):
        raise ReceiptError(f"receipt {path}: not a {VERSION}")
    if receipt["receipt"] != VERSION:
        raise ReceiptError(f"receipt {path}: a {receipt['receipt']}, written by an earlier hamu-ray; this one reads "
                           f"{VERSION} (rerun the job, or check it with the version that wrote it)")
    return receipt
