"""What a pipeline's table says beside its numbers: how each method ended, and whether the
measurements can carry the comparison.

- A method whose run diverged (a NaN/Inf loss or gradient) has no model: its row says
  "diverged" with the step where the NaN appeared; the other methods are still compared,
  plotted and registered, and nothing of it is cached (a rerun tries it again).
- A method that took no step (its rule stopped at step 1, or the original already met the
  monitor's target) exported the original unchanged: its row says so, rather than reading as a
  result.
- Two checks of the measurements themselves, from the original's row: a retain truth score near
  0 (perturbed answers that the trained original finds likelier than the paraphrase: they are
  worded like the answer, not like the paraphrase), and a forget quality the original itself
  passes (the KS test cannot tell the untouched original from the oracle: it has no power).

`hamu-ray run --strict` exits non-zero when a method diverged or took no step; the notes are
printed, and written under the table in report/comparison.md, either way.
"""

from __future__ import annotations

from dataclasses import dataclass

KS_LEVEL = 0.05  # forget quality is a KS p-value: below it, "can be told apart from the oracle"
RETAIN_TRUTH_FLOOR = 0.05  # the original's retain truth score below it: perturbed answers mis-worded
DIVERGED, NO_STEP = "diverged", "took no step"  # how a failed method's stop cell begins


@dataclass(frozen=True)
class Diverged:
    """A method whose run stopped on a NaN/Inf: at `step` (None: the error did not say)."""
    label: str
    step: int | None
    message: str

    @property
    def stop(self) -> str:
        return f"{DIVERGED}: NaN/Inf at step {self.step}" if self.step is not None else f"{DIVERGED}: NaN/Inf"


def steps_taken(step_log: list[dict]) -> int:
    """Optimizer steps a run took (rules.took_step)."""
    from hamu_ray.rules import took_step  # (torch: not imported with the registry)

    return sum(map(took_step, step_log))


def no_step_stop(stop: str, step_log: list[dict]) -> str | None:
    """The stop cell of a run that took no step ("took no step: infeasible at step 1"); None
    for a run that took one."""
    if steps_taken(step_log):
        return None
    at = step_log[-1].get("step", 0) if step_log else 0
    return f"{NO_STEP}: {stop} at step {at}"


def table_rows(rows: list[dict], step_logs: dict[str, list[dict]], diverged: list[Diverged],
               order: list[str], columns: tuple[str, ...]) -> list[dict]:
    """The comparison's rows in `order` (the references, then the methods as configured): a
    method that took no step gets its stop cell marked (`step_logs`: per method), a diverged
    one a row of its own, empty but for its stop cell."""
    by_model = {row["model"]: row for row in rows}
    for name, log in step_logs.items():
        marked = no_step_stop(by_model[name]["stop"], log) if name in by_model else None
        if marked is not None:
            by_model[name] = {**by_model[name], "stop": marked}
    for failed in diverged:
        by_model[failed.label] = {**{column: None for column in columns}, "model": failed.label,
                                  "stop": failed.stop}
    return [by_model[name] for name in order if name in by_model]


def failed_methods(rows: list[dict]) -> dict[str, str]:
    """Method → stop cell, for the methods that diverged or took no step (what --strict refuses)."""
    return {row["model"]: row["stop"] for row in rows
            if isinstance(row.get("stop"), str) and row["stop"].startswith((DIVERGED, NO_STEP))}


NO_STEP_REASON = {
    "infeasible": "no step inside the radius could gain the constraint B (lower hparams.constraint "
                  "or raise hparams.radius)",
    "criterion": "the stopping test held before the first step: gaining B would already raise the "
                 "retain loss (lower hparams.constraint)",
    "forget_target": "the original already met the monitor's forget target",
}


def notes(rows: list[dict]) -> list[str]:
    """One line per thing the table cannot show by itself: each method that diverged or took no
    step, and each check of the measurements the original's row fails."""
    lines = []
    for model, stop in failed_methods(rows).items():
        detail = stop.split(": ", 1)[1]
        if stop.startswith(DIVERGED):
            lines.append(f"{model} diverged ({detail}): it has no model, so it is not evaluated, cached "
                         "or registered; lower its learning rate (methods[].train.lr) and run again "
                         "(the finished stages are reused)")
        else:
            reason = NO_STEP_REASON.get(detail.split(" at step ")[0], "it stopped before its first step")
            lines.append(f"{model} took no step ({detail}): {reason}; its exported model is the original's, "
                         "so its row measures the original, not unlearning")
    original = next((row for row in rows if row["model"] == "original"), {})
    retain_truth = original.get("retain_truth")
    if retain_truth is not None and retain_truth < RETAIN_TRUTH_FLOOR:
        lines.append(f"the original's retain truth score is {retain_truth:.3f} (below {RETAIN_TRUTH_FLOOR}): on "
                     "retain rows it was trained on it finds the perturbed answers as likely as the paraphrased "
                     "one, so the perturbed answers are probably not worded like the paraphrase (they should be "
                     "the paraphrase with the fact changed); retain_truth and model_utility, which includes it, "
                     "do not measure utility here")
    quality = original.get("forget_quality")
    if quality is not None and quality >= KS_LEVEL:
        lines.append(f"forget quality has no power here: the original itself scores {quality:.3g} (≥ {KS_LEVEL}), "
                     "so the KS test cannot tell the untouched original from the oracle, and a method's forget "
                     "quality ≥ 0.05 does not show that it forgot (more forget rows give the test power)")
    return lines


def summary_line(rows: list[dict]) -> str | None:
    """The run's last line when a method diverged or took no step: which ones."""
    failed = failed_methods(rows)
    if not failed:
        return None
    groups = {kind: [m for m, stop in failed.items() if stop.startswith(kind)] for kind in (DIVERGED, NO_STEP)}
    parts = [f"{len(names)} method{'s' * (len(names) != 1)} {kind} ({', '.join(names)})"
             for kind, names in groups.items() if names]
    return f"warning: {'; '.join(parts)}; `hamu-ray run --strict` exits 1 on this"
