"""The Ray Train loop: one function, top to bottom, run by every worker."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from hamu_ray import objectives, receipt
from hamu_ray.engine import data, evaluation, monitor, preflight, shards, usage
from hamu_ray.engine import deepspeed_engine as eng
from hamu_ray.engine.config import UnlearnConfig, measures_steps
from hamu_ray.engine.grads import DeepSpeedGrads
from hamu_ray.rules import NonFiniteStatsError, Rule, get_rule, trust
from hamu_ray.rules.surgery import ImplicitSurgeryParams
from hamu_ray.tasks import task_for
from hamu_ray.engine.step import (ImplicitStepOutput, ImplicitSurgery, MeanAcrossRanks, StepOutput,
                                  SumAcrossRanks, TrustRegion, descent_step, implicit_surgery_step,
                                  unlearning_step)

log = logging.getLogger(__name__)
DS_TAG = "ds"  # the DeepSpeed checkpoint tag inside every Ray checkpoint
STATE_FILE = "loop_state.json"  # step and step log, written by rank 0
EXPORT_LOG, EXPORT_INFO = "step_log.jsonl", "run_info.json"  # beside the task's model export
PREFLIGHT_FILE = "preflight.json"  # the pre-flight's raw numbers, reported by rank 0
MONITOR_FILE = "monitor.json"  # an evaluation-only job's monitor values, reported by rank 0


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg = UnlearnConfig.model_validate(config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    task = ready_task(cfg)
    began = time.perf_counter()
    set_digests = checked_sets(cfg, task, rank, world)  # before the model: a bad set fails fast
    set_check_s = round(time.perf_counter() - began, 2)
    used = usage.Usage()  # the libraries are in: what comes now is the model's (what plan predicts)
    engine, losses = build(cfg, task)
    device = engine.device  # the one place the device is decided: batches and reference follow it

    # resume: weights and optimizer state from the latest checkpoint, then skip the steps done
    start_step, step_log = restore(engine, ray.train.get_checkpoint(), set_digests, cfg.data)
    take_step = step_function(cfg, DeepSpeedGrads(engine), *losses, step_log)
    prepared = Prepared(task)
    retain, forget = (prepared.rank_shard(cfg, role, rank, world) if path else None
                      for role, path in (("retain", cfg.data.retain), ("forget", cfg.data.forget)))
    pairs = shards.paired_batches(
        retain, forget, retain_batch_size=cfg.data.retain_batch_size,
        forget_batch_size=cfg.data.forget_batch_size, anchor=cfg.data.anchor, epochs=cfg.train.epochs,
        make_batch=task.make_batch, shuffle_seed=cfg.data.shuffle_seed, rank=rank, start=start_step)
    watch = None
    if cfg.monitor is not None:
        watch = monitor.Monitor(cfg.monitor, task, monitor.sample_batches(
            prepared.samples(cfg.monitor), task, cfg.monitor.batch_size, device), step_log)
        if start_step == 0:  # the starting point of the run's curve (and maybe already the target)
            step_log.append({"step": 0, "stop": "none", **watch.evaluate(engine, 0)})

    step = start_step
    for retain_batch, forget_batch in pairs:
        if step_log and step_log[-1]["stop"] != "none":  # the target was met before any step
            break
        if cfg.train.max_steps is not None and step >= cfg.train.max_steps:
            break
        step += 1
        used.count(retain_batch, forget_batch)
        try:
            record = used.timed(take_step, step, data.to_device(retain_batch, device),
                                data.to_device(forget_batch, device))
        except NonFiniteStatsError as exc:  # the pipeline's table names the step a method diverged at
            raise exc.at_step(step) from None
        if watch is not None and watch.due(step):
            record.update(evaluated(watch, engine, record))
        step_log.append(record)

        # checkpoint every k steps (every worker saves its shard, then reports); otherwise report
        # only every progress_every steps: a report is a barrier through Ray Train's controller
        # (~1 s here), and every row reaches the driver in the exported step log anyway
        stop = record["stop"] != "none"
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and not stop:
            with tempfile.TemporaryDirectory() as tmp:
                save(engine, tmp, step, step_log, rank, set_digests)
                ray.train.report(monitor.scalars(record), checkpoint=ray.train.Checkpoint.from_directory(tmp))
        elif stop or step % cfg.train.progress_every == 0:
            ray.train.report(monitor.scalars(record))
        if stop:
            break

    if watch is not None and "monitor/forget_prob" not in step_log[-1]:  # the exported model's values
        step_log[-1].update(evaluated(watch, engine, step_log[-1]))

    # export: the task writes the model from rank 0 (a collective under ZeRO-3), then the step log
    summary = {"steps": step, "stop": step_log[-1]["stop"] if step_log else "none",
               "resumed_from_step": start_step, "prepared": prepared.counts(),
               "set_digests": set_digests, "set_check_s": set_check_s,
               "usage": usage.summary(usage.gathered(used.record(device)))}  # before the export's gather
    scores = None
    if cfg.evaluation is not None:  # the final model scored where it is, before it is written out
        started = time.perf_counter()
        scores, whole = evaluate(task, engine.module, cfg, device, ray.train.get_context().get_local_world_size())
        summary.update(evaluation_s=round(time.perf_counter() - started, 2), evaluation_whole_model=whole)
    with tempfile.TemporaryDirectory() as tmp:
        task.export(engine, Path(tmp) if rank == 0 else None)
        if rank == 0 and scores is not None:
            evaluation.write_scores(Path(tmp) / evaluation.SCORES_FILE, scores)
        if rank == 0:
            summary["usage"]["rank0_peak_rss_gb_after_export"] = round(usage.peak_rss_bytes() / 1e9, 3)
            # the receipt's determinism record: this process made the numbers
            dtype = next(engine.module.parameters()).dtype
            determinism = receipt.determinism_record(cfg, device, dtype, ray.train.get_context().get_world_size())
            export_log(tmp, step_log, {**summary, "determinism": determinism})
        ray.train.report({**summary, "final": True},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


def ready_task(cfg: UnlearnConfig):
    """The job's task in a worker process made ready for its model: DeepSpeed and the model's code
    imported, and with $HAMU_RAY_HOST_MEMORY=release freed host memory returned to the system
    (usage.return_freed_memory: the peak then follows the live tensors, what the plan counts)."""
    usage.return_freed_memory()
    eng.import_deepspeed()  # first: transformers' ZeRO-3 integration would import it with MLflow
    task = task_for(cfg)
    task.import_model_code()
    return task


def checked_sets(cfg: UnlearnConfig, task, rank: int, world: int) -> dict[str, str]:
    """The job's forget and retain sets checked where they are read, before the model is built:
    rank r hashes every world-th block of their files and looks for forget rows among every
    world-th retain piece (data.share_check). Gathered, every rank holds the sets' content
    digests (the receipt's), or raises the same DataError (a forget row in the retain set, a
    damaged file)."""
    sets = {role: data.inspect_set(role, path, task.columns(role))
            for role, path in (("forget", cfg.data.forget), ("retain", cfg.data.retain)) if path}
    columns = task.columns()
    shares = usage.gathered(data.share_check(sets, columns, rank, world))
    return data.merged_checks(sets, columns, shares)


class Prepared:
    """The task's preparation of the sets this worker reads (the causal LM's tokenisation), as
    it reads them, with the task's checks; and what those counted (rows read, rows cut)."""

    def __init__(self, task):
        self.task, self.tallies = task, {}

    def preparer(self, role: str, path: str):
        tally = self.tallies.setdefault(role, {"rows": 0})

        def prepare(rows):
            table = self.task.prepare(rows, role)
            for key, count in {"rows": rows.num_rows, **self.task.check_prepared(table, role, path)}.items():
                tally[key] = tally.get(key, 0) + count
            return table
        return prepare

    def rank_shard(self, cfg: UnlearnConfig, role: str, rank: int, world: int) -> shards.Shard:
        """This rank's slice of the job's retain or forget set."""
        path = getattr(cfg.data, role)
        return shards.rank_shard(role, path, self.task.columns(role), rank, world, cfg.data.shuffle_seed,
                                 self.preparer(role, path))

    def samples(self, section) -> dict[str, shards.Shard]:
        """The monitor's samples, whole on every rank, in file order."""
        return {name: shards.whole_set(name, path, self.task.columns(name), self.preparer(name, path))
                for name, path in monitor.sample_paths(section).items()}

    def counts(self) -> dict[str, dict[str, int]]:
        """Every rank's counts summed, per set (a collective: every rank calls it)."""
        total: dict[str, dict[str, int]] = {}
        for tallies in usage.gathered(self.tallies):
            for role, tally in tallies.items():
                for key, count in tally.items():
                    total.setdefault(role, {}).setdefault(key, 0)
                    total[role][key] += count
        return total


def job_ds_config(cfg: UnlearnConfig) -> dict:
    return eng.deepspeed_config(
        stage=cfg.train.zero_stage, lr=cfg.train.lr, micro_batch_size=cfg.data.retain_batch_size,
        bf16=cfg.train.bf16, optimizer=cfg.train.optimizer, offload=cfg.train.offload)


def build(cfg: UnlearnConfig, task):
    """(DeepSpeed engine, (retain_loss, forget_loss)): the task's original model wrapped at the
    configured ZeRO stage, and the method's losses (with its frozen reference, if any)."""
    torch.manual_seed(cfg.train.seed)
    ds_config = job_ds_config(cfg)
    engine = eng.initialize(task.build(ds_config), ds_config)
    reference = None
    if cfg.data.forget is not None and objectives.needs_reference(cfg.method.spec):
        reference = task.reference(engine, ds_config)
    losses = objectives.loss_fns(cfg.method.spec, cfg.method.objective,
                                 lambda batch: task.scores(engine, batch), reference)
    return engine, losses


def preflight_loop_per_worker(config: dict) -> None:
    """The hardness pre-flight (no optimizer step): whole-set statistics of g_r and g_f, then the
    first `rows` forget rows one by one against g_r. Rank 0 reports PREFLIGHT_FILE."""
    import ray.train

    cfg = UnlearnConfig.model_validate(config["job"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    task = ready_task(cfg)
    set_digests = checked_sets(cfg, task, rank, world)
    engine, (retain_loss, forget_loss) = build(cfg, task)
    grads, device = DeepSpeedGrads(engine), engine.device
    reduce = SumAcrossRanks(device=device)
    prepared = Prepared(task)
    retain, forget = (prepared.rank_shard(cfg, role, rank, world) for role in ("retain", "forget"))

    def batches(shard: shards.Shard, batch_size: int):  # every row of the shard, in order
        for rows in shard.batches(batch_size, None, drop_last=False):
            yield data.to_device(task.make_batch(rows), device), len(next(iter(rows.values())))

    # equal slices: every rank holds num_rows // world of each set
    measured = preflight.full_pass(
        grads, batches(retain, cfg.data.retain_batch_size), batches(forget, cfg.data.forget_batch_size),
        retain_loss, forget_loss, retain_rows=retain.rows, forget_rows=forget.rows, reduce=reduce)
    # the first rows of the forget set, in file order, on every rank
    first = shards.whole_set("forget", cfg.data.forget, task.columns("forget"),
                             prepared.preparer("forget", cfg.data.forget))
    rows = itertools.islice((batch for batch, _ in batches(first, 1)), config["rows"])
    table = preflight.row_alignment(grads, measured.retain_pieces, rows, forget_loss, reduce)
    names = [name for name, p in engine.module.named_parameters() if p.requires_grad]
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            (Path(tmp) / PREFLIGHT_FILE).write_text(json.dumps(
                {"stats": measured.stats.to_tensor().tolist(), "batch_rr": measured.batch_rr.tolist(),
                 "batch_ff": measured.batch_ff.tolist(), "names": names, "rows": table.tolist(),
                 "set_digests": set_digests}))
        ray.train.report({"final": True}, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


def evaluate_loop_per_worker(config: dict) -> None:
    """An evaluation-only job: the job's model as given, built at its ZeRO stage and dtype
    without an optimizer; its monitor samples' values (MONITOR_FILE) and its evaluation sets'
    scores (evaluation.SCORES_FILE) as an unlearning run computes them, reported by rank 0."""
    import ray.train
    import ray.train.torch

    cfg = UnlearnConfig.model_validate(config)
    rank = ray.train.get_context().get_world_rank()
    task = ready_task(cfg)
    ds_config = job_ds_config(cfg)
    device = ray.train.torch.get_device()
    model = eng.frozen_copy(task.build(ds_config), ds_config, device)  # ZeRO-3: partitioned
    report = {"final": True}
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.monitor is not None:  # every rank scores every sample row: their forwards line up
            samples = Prepared(task).samples(cfg.monitor)
            values = monitor.measure(model, task, monitor.sample_batches(samples, task, cfg.monitor.batch_size, device))
            if rank == 0:
                (Path(tmp) / MONITOR_FILE).write_text(json.dumps(values))
        if cfg.evaluation is not None:
            started = time.perf_counter()
            scores, whole = evaluate(task, getattr(model, "module", model), cfg, device,
                                     ray.train.get_context().get_local_world_size())
            report.update(evaluation_s=round(time.perf_counter() - started, 2), evaluation_whole_model=whole)
            if rank == 0:
                evaluation.write_scores(Path(tmp) / evaluation.SCORES_FILE, scores)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


def evaluate(task, module: torch.nn.Module, cfg: UnlearnConfig, device: torch.device,
             local_workers: int = 1) -> tuple[dict, bool]:
    """The job's evaluation sets scored with `module` (the model the job holds), each rank its
    share: (set → score → per-example values, whether each rank scored with a whole copy).
    Under ZeRO-3 on 2+ ranks a whole copy per rank (evaluation.whole_model; auto: when it fits
    in half the free memory, `local_workers` sharing a node's) spares a gather of every layer at
    every forward and greedy token; otherwise the partitioned model, the ranks in lockstep.
    Then each attack's copy of the whole model scores the forget set again (`forget@<attack>`)."""
    section = cfg.evaluation
    ranks = evaluation.Ranks.of_job(device, cfg.train.zero_stage)
    partitioned = cfg.train.zero_stage == 3  # (on one rank too: its parameters live in ZeRO-3's store)
    whole = partitioned and (bool(section.attacks)
                             or ranks.lockstep and whole_copy_fits(module, section.whole_model, ranks, local_workers))
    if whole:
        module, ranks = whole_copy(task, module, device), dataclasses.replace(ranks, lockstep=False)
    sets = evaluation.read_sets(section)
    scores = task.evaluate(module, sets, section, ranks)
    base = module if whole or not section.attacks else whole_copy(task, module, device)  # never the engine's own
    for name, attack in section.attacks.items():
        attacked = same_on_every_rank(task.attacked(base, attack), ranks)
        scores[evaluation.attacked_set("forget", name)] = task.evaluate(
            attacked, {"forget": sets["forget"]}, section, ranks)["forget"]
    return scores, whole


def whole_copy(task, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """An unpartitioned copy of the job's model on every rank (a collective under ZeRO-3)."""
    copy = task.unpartitioned(device)
    eng.copy_whole_into(module, copy)
    return copy


def same_on_every_rank(model: torch.nn.Module, ranks: evaluation.Ranks) -> torch.nn.Module:
    """Rank 0's weights on every rank: the ranks score shares of one model, and a relearned copy
    need not come out bit-identical everywhere (a GPU's reductions need not be deterministic)."""
    if ranks.world > 1:
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in (*model.parameters(), *model.buffers()):
                dist.broadcast(tensor.data, src=0)
    return model


def whole_copy_fits(module: torch.nn.Module, choice, ranks: evaluation.Ranks, local_workers: int) -> bool:
    """evaluation.whole_model on every rank alike (auto: the smallest free memory decides)."""
    if choice != "auto":
        return choice
    import torch.distributed as dist

    need = eng.partitioned_bytes(module)
    fits = torch.tensor([int(2 * need <= usage.free_memory_bytes(ranks.device, local_workers))], device=ranks.device)
    dist.all_reduce(fits, op=dist.ReduceOp.MIN)
    return bool(fits.item())


def step_function(cfg: UnlearnConfig, grads: DeepSpeedGrads, retain_loss, forget_loss,
                  step_log: list[dict]):
    """`take_step(step, retain_batch, forget_batch) -> record` for this job: plain training
    (no forget set), one-backprop implicit surgery, or the two-backward rule step."""
    if cfg.data.forget is None:
        def train(step: int, retain_batch: dict, _) -> dict:
            return {"step": step, "loss/retain": descent_step(grads, lambda: retain_loss(retain_batch)),
                    "stop": "none"}
        return train

    if cfg.method.spec.implicit:
        state = ImplicitSurgery(ImplicitSurgeryParams(**cfg.method.hparams))
        if step_log:  # resumed: the dual weight (and the fast variant's pending loss) carry over
            state.weight = step_log[-1]["surgery/next_weight"]
            state.pending_before = step_log[-1]["surgery/retain_before"] if state.params.fast else None
        reduce_mean = MeanAcrossRanks()

        def implicit(step: int, retain_batch: dict, forget_batch: dict) -> dict:
            out = implicit_surgery_step(
                grads, state, lr=cfg.train.lr, reduce_mean=reduce_mean,
                retain_loss=lambda: retain_loss(retain_batch),
                forget_loss=lambda: forget_loss(forget_batch))
            return implicit_record(step, out)
        return implicit

    rule = get_rule(cfg.method.rule_name, **cfg.method.hparams)
    reduce = SumAcrossRanks(device=grads.engine.device)
    measure, tolerance = measures_steps(cfg), cfg.method.hparams.get("trust_tolerance")
    region = None
    if tolerance is not None:  # resumed: the scale carries over
        region = TrustRegion(rule, tolerance, step_log[-1].get("trust/next_scale", 1.0) if step_log else 1.0)

    def two_backward(step: int, retain_batch: dict, forget_batch: dict) -> dict:
        # both gradients on this worker's micro-batches, statistics all-reduced
        current = region.rule() if region else rule
        out = unlearning_step(
            grads, current, lr=cfg.train.lr, reduce_stats=reduce, clip_norm=cfg.train.clip_norm,
            retain_loss=lambda: retain_loss(retain_batch),
            forget_loss=lambda: forget_loss(forget_batch),
            measure=measure, reduce_mean=MeanAcrossRanks() if measure else None)
        record = step_record(step, out, current)
        if region and out.stepped:  # the trust region's test on the measured retain change
            record["trust/next_scale"] = region.update(out)
            if region.exhausted and record["stop"] == "none":
                record["stop"] = trust.STOP
        return record
    return two_backward


def evaluated(watch: monitor.Monitor, engine, record: dict) -> dict:
    """The monitor's values; its forget_target stop only where the step did not stop already."""
    values = watch.evaluate(engine, record["step"])
    if record["stop"] != "none":
        values.pop("stop", None)
    return values


def implicit_record(step: int, out: ImplicitStepOutput) -> dict:
    record = {"step": step, "loss/retain": out.retain_loss, "loss/forget": out.forget_loss,
              "surgery/weight": out.weight, "surgery/next_weight": out.next_weight,
              "surgery/retain_before": out.retain_before, "stop": "none"}
    if out.retain_after is not None:
        record["surgery/retain_after"] = out.retain_after
    return record


def step_record(step: int, out: StepOutput, rule: Rule) -> dict:
    """One flat, slash-namespaced metrics row per step (no forget-set content, only numbers)."""
    d = out.result.diagnostics
    cosine = d["cosine"]
    branches = out.result.branch
    record = {
        "step": step,
        "loss/retain": out.retain_loss,
        "loss/forget": out.forget_loss,
        "hardness/cosine_mean": float(cosine.mean()),
        "hardness/cosine_min": float(cosine.min()),
        "hardness/cosine_max": float(cosine.max()),
        # true first-order effects; with clip_norm the rule's own (clipped units) beside them
        "guarantee/forget_gain": out.true_forget_gain,
        "guarantee/retain_change": out.true_retain_change,
        "guarantee/forget_gain_clipped": float(d["forget_gain"]),
        "comm/stats_values": out.reduced_values,
        "clip/retain_scale": out.retain_scale,
        "clip/forget_scale": out.forget_scale,
        "stop": out.result.stop.value if out.result.stop else "none",
    }
    if rule.spec.guarantees:  # the B the rule promised on this step (receipt.guarantee_record)
        record["guarantee/B"] = float(d["constraint_total"])
    if out.realised_forget_gain is not None:  # what the step did, measured on its own batches
        record["realised/forget_gain"] = out.realised_forget_gain
        record["realised/retain_change"] = out.realised_retain_change
    if "trust_scale" in d and rule.params.trust_tolerance is not None:
        record["trust/scale"] = d["trust_scale"]
    if "stop_rhs" in d:
        record["stop/rhs"] = d["stop_rhs"]  # exact: largest gain with no retain damage
        record["stop/margin"] = d["stop_margin"]
        record["stop/paper_rhs"] = d["paper_rhs"]  # the paper's Σ R_b‖g_f,b‖ sin θ_b
        record["stop/max_gain"] = d["max_gain"]  # largest gain inside the radii (feasibility)
    for name in sorted(set(branches)):
        record[f"branch/{name}"] = branches.count(name) / len(branches)
    return record


def save(engine, directory: str, step: int, step_log: list[dict], rank: int, set_digests: dict[str, str]) -> None:
    engine.save_checkpoint(directory, tag=DS_TAG)  # collective: each rank writes its shard
    if rank == 0:
        (Path(directory) / STATE_FILE).write_text(json.dumps({"step": step, "log": step_log, "sets": set_digests}))


def restore(engine, checkpoint, set_digests: dict[str, str], data_section) -> tuple[int, list[dict]]:
    """(step, step log) of the checkpoint the run resumes from, its weights and optimizer state
    loaded; refused when a set's content is not the one it was trained on (the driver matched
    the run by the sets' fingerprints; the content digests decide)."""
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as directory:
        if not (Path(directory) / DS_TAG).is_dir():  # the run's final export, registered late
            raise RuntimeError("the interrupted run finished (its final checkpoint was registered after this "
                               "one started): run the same command again to publish it")
        state = json.loads((Path(directory) / STATE_FILE).read_text())
        for name, digest in state.get("sets", {}).items():
            if set_digests.get(name) != digest:
                raise data.DataError(
                    f"{name} set {getattr(data_section, name)}: its content changed since the checkpoint at step {state['step']} "
                    f"(sha256 {digest} then, {set_digests.get(name)} now); put the set back, or remove "
                    "the kept run directory to start over")
        engine.load_checkpoint(directory, tag=DS_TAG)
    log.info("resumed from step %d", state["step"])
    return state["step"], state["log"]


def export_log(directory: str, step_log: list[dict], info: dict) -> None:
    (Path(directory) / EXPORT_INFO).write_text(json.dumps(info))
    with open(Path(directory) / EXPORT_LOG, "w") as f:
        for row in step_log:
            f.write(json.dumps(row) + "\n")
