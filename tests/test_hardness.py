"""The hardness pre-flight (`hamu-ray hardness`): its reading of the statistics against a brute-force
search, its gradient passes on sets whose gradients are known by hand (colinear, orthogonal,
opposed), and the whole command on a 2-worker ZeRO-3 Ray job against plain torch."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hamu_ray import digests
from hamu_ray.engine import preflight
from hamu_ray.engine.config import parse_config
from hamu_ray.engine.grads import TorchGrads
from hamu_ray.rules import BlockStats, hardness

R = 0.2  # a fixed radius per block


def brute_force_reach(g_r: np.ndarray, g_f: np.ndarray, radius: float) -> tuple[float, float]:
    """(max g_f·Δ over ‖Δ‖ ≤ R; the same with g_r·Δ ≤ 0), by sweeping Δ = R·(cos φ·e1 + sin φ·e2)
    in the plane of g_r and g_f (any component outside it gains nothing and costs norm)."""
    e1 = g_f / np.linalg.norm(g_f)
    rest = g_r - (g_r @ e1) * e1
    e2 = rest / np.linalg.norm(rest) if np.linalg.norm(rest) > 1e-12 else np.zeros_like(e1)
    phi = np.linspace(0, 2 * np.pi, 400_001)
    steps = radius * (np.outer(np.cos(phi), e1) + np.outer(np.sin(phi), e2))
    gain, retain = steps @ g_f, steps @ g_r
    return float(gain.max()), float(gain[retain <= 1e-12].max())


def test_the_reach_with_and_without_damage_matches_a_brute_force_search():
    gen = np.random.default_rng(0)
    g_r, g_f = [gen.normal(size=(6, 5)) for _ in range(2)]
    g_f[2] = 1.5 * g_r[2]  # colinear
    g_f[3] = -0.5 * g_r[3]  # opposed
    g_f[4] -= (g_f[4] @ g_r[4]) / (g_r[4] @ g_r[4]) * g_r[4]  # orthogonal
    stats = BlockStats.from_grads([torch.tensor(r) for r in g_r], [torch.tensor(f) for f in g_f])
    summary = hardness.summarize(stats, lr=0.1, radius=R)
    for block, r, f in zip(summary["blocks"], g_r, g_f):
        full, free = brute_force_reach(r, f, R)
        assert block["reach"] == pytest.approx(full, rel=1e-6)
        assert block["reach_without_own_damage"] == pytest.approx(free, rel=1e-4, abs=1e-9)
    assert summary["max_feasible_constraint"] == pytest.approx(sum(b["reach"] for b in summary["blocks"]))
    assert summary["blocks"][2]["reach_without_own_damage"] == pytest.approx(0.0, abs=1e-9)  # colinear: none
    assert summary["blocks"][3]["reach_without_own_damage"] == pytest.approx(summary["blocks"][3]["reach"])
    # coupled over blocks, the damage-free B is at least the per-block sum (one block pays back another)
    assert summary["max_constraint_without_damage"] >= sum(b["reach_without_own_damage"] for b in summary["blocks"])


def _rule_view(stats, lr, **hparams):
    from hamu_ray.engine.step import clip_scales
    from hamu_ray.rules import get_rule

    clip_norm = hparams.pop("clip_norm", None)
    rule = get_rule(hparams.pop("rule"), constraint=0.0, stop_on_criterion=False, **hparams)
    return rule(stats.scaled(*clip_scales(stats, clip_norm)), lr).diagnostics


@pytest.mark.parametrize("setting", [
    dict(rule="hamu-q", full_grad=True, radius="lr"), dict(rule="hamu-q", full_grad=True, radius=0.3),
    dict(rule="hamu-u", full_grad=True, radius="lr"), dict(rule="hamu-q", radius="lr", clip_norm=0.5),
    dict(rule="hamu-q", full_grad=True, radius="lr", clip_norm=0.5), dict(rule="hamu-u", radius=0.3, clip_norm=0.1)])
def test_the_preflight_sees_what_the_rule_sees(setting):
    # two blocks with swapped norms: per block the lr radius R_b = lr·‖g_r,b‖ pairs a short radius with a
    # long g_f; one block over the whole model (full_grad) reaches ~5× further; clipping scales both
    stats = BlockStats(rr=torch.tensor([100.0, 1.0], dtype=torch.float64), ff=torch.tensor([1.0, 100.0], dtype=torch.float64),
                       rf=torch.tensor([3.0, -2.0], dtype=torch.float64))
    rule = _rule_view(stats, 0.1, **setting)
    summary = hardness.summarize(stats, lr=0.1, radius=setting["radius"], reciprocal=setting["rule"] == "hamu-u",
                                 full_grad=setting.get("full_grad", False), clip_norm=setting.get("clip_norm"))
    assert summary["max_feasible_constraint"] == pytest.approx(rule["max_gain"], rel=1e-12)
    assert summary["max_constraint_without_damage"] == pytest.approx(rule["stop_rhs"], rel=1e-9)
    assert summary["paper_rhs"] == pytest.approx(rule["paper_rhs"], rel=1e-12)


def test_a_full_grad_job_reaches_what_per_block_figures_call_out_of_reach():
    stats = BlockStats(rr=torch.tensor([100.0, 1.0], dtype=torch.float64), ff=torch.tensor([1.0, 100.0], dtype=torch.float64),
                       rf=torch.tensor([0.0, 0.0], dtype=torch.float64))
    per_block = hardness.summarize(stats, lr=1.0, constraint=15.0)
    whole = hardness.summarize(stats, lr=1.0, constraint=15.0, full_grad=True)
    assert per_block["max_feasible_constraint"] == pytest.approx(20.0)  # 10·1 + 1·10
    assert whole["max_feasible_constraint"] == pytest.approx(101.0)  # √101·√101
    assert "out of reach" not in whole["verdict"]


def test_the_lr_radius_and_hamu_u_read_the_effective_pair():
    stats = BlockStats(rr=torch.tensor([4.0]), ff=torch.tensor([1.0]), rf=torch.tensor([1.0]), )
    q = hardness.summarize(stats, lr=0.5)  # R = lr·‖g_r‖ = 1; reach R·‖g_f‖ = 1; sin θ = √(1 − 1/4)
    assert q["blocks"][0]["radius"] == pytest.approx(1.0)
    assert q["max_feasible_constraint"] == pytest.approx(1.0)
    assert q["max_constraint_without_damage"] == pytest.approx(math.sqrt(0.75))
    u = hardness.summarize(stats, lr=0.5, reciprocal=True)  # effective (rr, ff) = (1, 4): R = 0.5, reach 1
    assert u["blocks"][0]["radius"] == pytest.approx(0.5)
    assert u["max_feasible_constraint"] == pytest.approx(1.0)
    assert "retain-loss drop" in u["verdict"]


# ---- the gradient passes, plain torch, on sets with hand-known gradients ------------------------
# A linear 3→2 classifier at zero weights predicts (½, ½): a row (x, y) has weight gradient
# v_y ⊗ x and bias gradient v_y, v_0 = (−½, ½) = −v_1. Pairs (x, 0), (−x, 1) cancel in the bias.

E1, E2 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
NEG = {tuple(E1): [-1.0, 0.0, 0.0], tuple(E2): [0.0, -1.0, 0.0]}
RETAIN = [(E1, 0), (NEG[tuple(E1)], 1)] * 4  # g_r = (v_0 ⊗ e1, 0)
FORGET = {  # whole-set g_f, cos θ of the weight block, each row's cos with g_r (whole model)
    "colinear": ([(E1, 0), (NEG[tuple(E1)], 1)] * 2, 1.0, 1 / math.sqrt(2)),
    "orthogonal": ([(E2, 0), (NEG[tuple(E2)], 1)] * 2, 0.0, 0.0),
    "opposed": ([(E1, 1), (NEG[tuple(E1)], 0)] * 2, -1.0, -1 / math.sqrt(2)),
}
REACH = R * math.sqrt(0.5)  # ‖v_0 ⊗ e1‖ = √½
FREE = {"colinear": 0.0, "orthogonal": REACH, "opposed": REACH}


def linear_model() -> torch.nn.Module:
    model = torch.nn.Linear(3, 2)
    torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
    return model


def as_batch(rows) -> dict:
    return {"x": torch.tensor([x for x, _ in rows]), "y": torch.tensor([y for _, y in rows])}


@pytest.mark.parametrize("case", FORGET)
def test_the_passes_on_known_gradients(case):
    forget_rows, cosine, row_cosine = FORGET[case]
    model = linear_model()
    grads = TorchGrads(model, torch.optim.SGD(model.parameters(), lr=0.1))
    loss = lambda batch: F.cross_entropy(model(batch["x"]), batch["y"])  # noqa: E731
    in_batches = lambda rows, size: [(as_batch(rows[i:i + size]), len(rows[i:i + size]))  # noqa: E731
                                     for i in range(0, len(rows), size)]
    # batches of 3 leave a short last one: its rows still weigh by their count
    measured = preflight.full_pass(grads, in_batches(RETAIN, 3), in_batches(forget_rows, 3), loss, loss,
                                   retain_rows=len(RETAIN), forget_rows=len(forget_rows), reduce=None)
    stats, g_r = measured.stats, measured.retain_pieces
    weight, bias = 0, 1
    assert stats.rr.tolist() == pytest.approx([0.5, 0.0], abs=1e-7)
    assert stats.ff.tolist() == pytest.approx([0.5, 0.0], abs=1e-7)
    assert float(stats.cosine()[weight]) == pytest.approx(cosine, abs=1e-6)
    assert float(stats.cosine()[bias]) == pytest.approx(0.0, abs=1e-6)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # nothing left behind
    assert torch.equal(model.weight, torch.zeros(2, 3))  # no step

    # batches of 3 rows of a pair set do not cancel in the bias: ‖g_batch‖² by hand, batch by batch
    by_hand = [[F.cross_entropy(model(b["x"]), b["y"]) for b, _ in in_batches(rows, 3)] for rows in (RETAIN, forget_rows)]
    for mean_sq, losses in zip((measured.batch_rr, measured.batch_ff), by_hand):
        per_batch = [torch.stack([g.pow(2).sum() for g in torch.autograd.grad(l, list(model.parameters()))]) for l in losses]
        torch.testing.assert_close(mean_sq, torch.stack(per_batch).mean(0).double(), rtol=1e-6, atol=1e-9)
    summary = hardness.summarize(stats, lr=0.1, radius=R, constraint=0.1, batch_rr=measured.batch_rr,
                                 batch_ff=measured.batch_ff)
    assert summary["max_feasible_constraint_per_batch"] == pytest.approx(float(R * measured.batch_ff.sqrt().sum()))
    assert summary["max_feasible_constraint_per_batch"] > summary["max_feasible_constraint"]  # the noise
    assert summary["max_feasible_constraint"] == pytest.approx(REACH, rel=1e-6)
    assert summary["max_constraint_without_damage"] == pytest.approx(FREE[case], abs=1e-6)
    expected = "costs raising the retain loss" if case == "colinear" else "inside the damage-free range"
    assert expected in summary["verdict"]
    assert "out of reach" in hardness.summarize(stats, lr=0.1, radius=R, constraint=0.2)["verdict"]
    # a B in scale-free units is judged in loss units: a fraction of the reach is never out of it
    for unit, loss_units in (("reach", 0.9 * REACH), ("damage_free", 0.9 * FREE[case])):
        scaled = hardness.summarize(stats, lr=0.1, radius=R, constraint=0.9, constraint_unit=unit)
        assert hardness.loss_units(0.9, unit, scaled) == pytest.approx(loss_units, abs=1e-9)
        assert "out of reach" not in scaled["verdict"] and "The configured B = 0.9 of the" in scaled["verdict"]
        assert (unit == "reach" and case == "colinear") == ("costs raising the retain loss" in scaled["verdict"])

    rows = [as_batch([row]) for row in forget_rows]
    table = preflight.row_alignment(grads, g_r, rows, loss, reduce=None)
    assert hardness.row_alignment(float(stats.rr.sum()), table) == pytest.approx([row_cosine] * len(rows), abs=1e-6)


# ---- the whole command: a 2-worker ZeRO-3 Ray job against plain torch -------------------------

def write_set(path, rows):
    pq.write_table(pa.table({"x": [x for x, _ in rows], "y": [y for _, y in rows]}), path)


@pytest.fixture(scope="module")
def preflight_run(ray_cluster, tmp_path_factory):
    from hamu_ray.cli import main

    root = tmp_path_factory.mktemp("hardness")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "init.safetensors")
    gen = torch.Generator().manual_seed(3)
    retain = [(x.tolist(), int(y)) for x, y in zip(torch.randn(8, 3, generator=gen), torch.randint(2, (8,), generator=gen))]
    forget = FORGET["colinear"][0][:2] + FORGET["orthogonal"][0][:2]  # rows 0-1 conflict more than 2-3
    write_set(root / "retain.parquet", retain), write_set(root / "forget.parquet", forget)
    job = {"data": {"forget": str(root / "forget.parquet"), "retain": str(root / "retain.parquet"),
                    "retain_batch_size": 2, "forget_batch_size": 1, "shuffle_seed": None},
           "model": {"sizes": [3, 4, 2], "weights": str(root / "init.safetensors")},
           "method": {"name": "hamu-q", "hparams": {"constraint": 0.01, "radius": R}},
           "train": {"lr": 0.1, "zero_stage": 3}, "cluster": {"num_workers": 2}, "output_dir": str(root / "run")}
    (root / "job.json").write_text(json.dumps(job))  # JSON is YAML
    out = root / "report"
    code = main(["hardness", str(root / "job.json"), "--out", str(out), "--rows", "3",
                 "--tracking-uri", f"sqlite:///{root}/mlflow.db"])
    return root, model, retain, forget, out, code


def test_the_command_equals_plain_torch(preflight_run):
    root, model, retain, forget, out, code = preflight_run
    assert code == 0 and not (root / "run").exists()  # a pre-flight writes no model
    summary = json.loads((out / "hardness.json").read_text())
    loss = lambda rows: F.cross_entropy(model(as_batch(rows)["x"]), as_batch(rows)["y"])  # noqa: E731
    g_r = torch.autograd.grad(loss(retain), list(model.parameters()))
    g_f = torch.autograd.grad(loss(forget), list(model.parameters()))
    # a global batch = each rank's 2 rows of its contiguous half (DeepSpeed averages the two)
    global_batches = {"batch_rr": [retain[0:2] + retain[4:6], retain[2:4] + retain[6:8]],
                      "batch_ff": [forget[0:1] + forget[2:3], forget[1:2] + forget[3:4]]}
    for key, batches in global_batches.items():
        norms = torch.stack([torch.stack([g.pow(2).sum() for g in torch.autograd.grad(loss(b), list(model.parameters()))])
                             for b in batches]).mean(0)
        assert [block[key] for block in summary["blocks"]] == pytest.approx(norms.tolist(), rel=1e-5)
    for block, r, f in zip(summary["blocks"], g_r, g_f):
        assert block["rr"] == pytest.approx(float(r.pow(2).sum()), rel=1e-5)
        assert block["ff"] == pytest.approx(float(f.pow(2).sum()), rel=1e-5)
        assert block["rf"] == pytest.approx(float((r * f).sum()), rel=1e-5, abs=1e-9)
    assert [b["name"] for b in summary["blocks"]] == [name for name, _ in model.named_parameters()]
    flat_r = torch.cat([g.flatten() for g in g_r])
    key = digests.read_key(out / digests.KEY_FILE)  # the report directory's own, owner-only
    assert summary["rows"]["digest_key"] == {"id": key.id, "from": digests.KEY_FILE}
    by_row = {r["row"]: r for r in summary["rows"]["by_conflict"]}
    assert sorted(by_row) == [0, 1, 2] and summary["rows"]["of"] == 4
    for i, row in by_row.items():
        g_i = torch.cat([g.flatten() for g in torch.autograd.grad(loss([forget[i]]), list(model.parameters()))])
        assert row["cosine"] == pytest.approx(float(F.cosine_similarity(flat_r, g_i, dim=0)), abs=1e-5)
        assert row["digest"] == digests.row_digests(str(root / "forget.parquet"), key)[i]
    cosines = [r["cosine"] for r in summary["rows"]["by_conflict"]]
    assert cosines == sorted(cosines, reverse=True)


def test_the_report_files_and_mlflow_hold_numbers_not_rows(preflight_run):
    import mlflow

    root, _, _, forget, out, _ = preflight_run
    md = (out / "hardness.md").read_text()
    summary = json.loads((out / "hardness.json").read_text())
    assert summary["verdict"] in md and (out / "hardness.png").stat().st_size > 0
    assert "The configured B = 0.01" in summary["verdict"]
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("hamu-ray-hardness").experiment_id])
    assert run.data.metrics["max_feasible_constraint"] == pytest.approx(summary["max_feasible_constraint"])
    assert run.data.params["rule"] == "hamu-q"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"hardness.json", "hardness.md", "hardness.png"}
    text = (out / "hardness.json").read_text() + md
    for x, _ in forget:  # no forget row's values (the rows here are unit vectors: look for the lists)
        assert json.dumps(x) not in text


def test_bad_requests_fail_before_any_worker(tmp_path, capsys):
    from hamu_ray.cli import main
    from hamu_ray.engine.driver import run_preflight

    cfg = parse_config({"data": {"forget": None, "retain": str(tmp_path / "r.parquet")}, "model": {"sizes": [3, 2]},
                        "method": {"name": "ft"}, "train": {"lr": 0.1}, "output_dir": str(tmp_path / "o")})
    with pytest.raises(Exception, match="data.forget is missing"):
        run_preflight(cfg)
    (tmp_path / "taken").mkdir()
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"data": {"forget": "f.parquet", "retain": "r.parquet"}, "model": {"sizes": [3, 2]},
                               "method": {"name": "gdiff"}, "train": {"lr": 0.1}, "output_dir": "o"}))
    assert main(["hardness", str(job), "--out", str(tmp_path / "taken")]) == 2
    assert "--out" in capsys.readouterr().err and not any((tmp_path / "taken").iterdir())
    assert main(["hardness", str(job), "--rows", "-1"]) == 2
    assert "--rows" in capsys.readouterr().err
