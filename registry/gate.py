"""The promotion gate: scores, licence and data hygiene, checked before an alias moves.

A pure function of what the registry loaded, so it is easy to read and to test.
"""

from __future__ import annotations

from dataclasses import dataclass

from .licences import licence_problems
from .models import ContaminationCheck, Licence
from .schemas import EvalScore, GateReport, VersionInfo


def served_suite(suite: str) -> str:
    """Where the served path's score (the artifact the gateway serves, on its base) is recorded,
    with its loss in points against the adapter (``quantize compare``, ``eval --served``)."""
    return f"{suite}@served"


@dataclass(frozen=True)
class ServedPath:
    score: EvalScore  # the primary metric on the served artifact
    loss_points: float  # (adapter - served) x 100, measured in the same run


@dataclass(frozen=True)
class GateInputs:
    candidate: VersionInfo
    alias: str
    suite: str
    metric: str
    tolerance: float
    baselines: dict[str, EvalScore]  # subject -> newest score on the same suite, metric and eval data
    current: VersionInfo | None
    licences: tuple[Licence, ...]  # the adapter's and its base model's
    contamination: ContaminationCheck | None
    commercial: bool
    monthly_active_users: int | None
    served: ServedPath | None = None  # scored on the same eval data as the primary score
    serves_quantized: bool = False  # the gateway serves a GGUF (llama.cpp), not the adapter as scored
    max_quality_loss_points: float = 2.0


def _better(a: EvalScore, b: EvalScore) -> bool:
    return a.value > b.value if a.higher_is_better else a.value < b.value


# Baselines the candidate must beat (the base model's score is required), in the order reported.
MUST_BEAT = {"base": "base model", "prompted_base": "prompted base model", "majority": "majority-label baseline"}
CLASSICAL = "classical classifier (TF-IDF + logistic regression)"


def _check_scores(inputs: GateInputs, reasons: list[str], checks: list[str], notes: list[str]) -> None:
    label = f"{inputs.suite}/{inputs.metric}"
    score = inputs.candidate.score(inputs.suite, inputs.metric)
    if score is None:
        reasons.append(f"no score on the primary eval {label}")
        return
    for subject, kind in MUST_BEAT.items():
        baseline = inputs.baselines.get(subject)
        if baseline is None:
            if subject == "base":
                reasons.append(f"no base-model baseline on {label} for the same eval data")
            continue
        if _better(score, baseline):
            checks.append(f"{label} {score.value:.4g} beats the {kind}'s {baseline.value:.4g}")
        else:
            reasons.append(f"{label} {score.value:.4g} does not beat the {kind}'s {baseline.value:.4g}")
    # Not a refusal, but the first thing to know: the task may not need an LLM at all.
    classical = inputs.baselines.get("classical")
    if classical is not None:
        if _better(score, classical):
            checks.append(f"{label} {score.value:.4g} beats the {CLASSICAL}'s {classical.value:.4g}")
        else:
            notes.append(f"the {CLASSICAL} scores {classical.value:.3f} on {label}, as good as the adapter's "
                         f"{score.value:.3f}: it answers this task for a fraction of the cost")
    _check_served(inputs, score, reasons, checks, notes)
    if inputs.current is None or inputs.current.version == inputs.candidate.version:
        return
    current_score = inputs.current.score(inputs.suite, inputs.metric)
    if current_score is None:
        checks.append(f"current {inputs.alias} {inputs.current.ref} has no {label} score to compare")
        return
    if current_score.eval_data_sha256 != score.eval_data_sha256:
        reasons.append(
            f"{inputs.current.ref} ({inputs.alias}) was scored on other eval data; "
            "score both versions on the same data"
        )
        return
    sign = 1 if score.higher_is_better else -1
    drop = sign * (current_score.value - score.value)
    if drop > inputs.tolerance:
        reasons.append(
            f"{label} {score.value:.4g} is worse than {inputs.alias} {inputs.current.ref}'s "
            f"{current_score.value:.4g} by more than the tolerance {inputs.tolerance:g}"
        )
    else:
        checks.append(f"{label} within {inputs.tolerance:g} of {inputs.current.ref} ({current_score.value:.4g})")


def _check_served(inputs: GateInputs, score: EvalScore, reasons: list[str], checks: list[str],
                  notes: list[str]) -> None:
    """The users get the served artifact, not the adapter that was scored: hold it to the ceiling."""
    label = f"{inputs.suite}/{inputs.metric}"
    served, ceiling = inputs.served, inputs.max_quality_loss_points
    if served is None:
        if not inputs.serves_quantized:
            return
        notes.append(f"no served-path score on {label} for this eval data: the gate read the adapter's own score "
                     f"(`loragate eval {inputs.candidate.ref} --served --data ...` scores what the gateway serves)")
    elif served.loss_points > ceiling:
        reasons.append(
            f"the served path scores {served.score.value:.4g} on {label}, {served.loss_points:.1f} points below "
            f"the adapter's {score.value:.4g} (ceiling {ceiling:g}): serve it on a higher-precision base "
            f"(`loragate eval {inputs.candidate.ref} --served --data ...` picks one by measured loss; or "
            f"`loragate quantize base-gguf {inputs.candidate.base_model} --type q8_0`) or merge and export at a "
            f"better type (`loragate quantize gguf {inputs.candidate.ref} --type q8_0`)")
    else:
        checks.append(f"served path {served.score.value:.4g} on {label}, {served.loss_points:.1f} points below "
                      f"the adapter (ceiling {ceiling:g})")


def _check_licences(inputs: GateInputs, reasons: list[str], checks: list[str]) -> None:
    for licence in inputs.licences:
        problems = licence_problems(
            licence, commercial=inputs.commercial, monthly_active_users=inputs.monthly_active_users
        )
        reasons.extend(problems)
        if not problems:
            checks.append(f"licence {licence.id} allows the declared use")


def _check_contamination(inputs: GateInputs, reasons: list[str], checks: list[str]) -> None:
    data_hash = inputs.candidate.training_data_sha256
    check = inputs.contamination
    if data_hash is None:
        reasons.append("no training-data sha256 recorded, so no contamination check can apply")
    elif check is None:
        reasons.append(f"no contamination check for training data {data_hash[:12]}")
    elif not check.passed:
        reasons.append(f"contamination check failed for training data {data_hash[:12]}: {check.details}")
    else:
        checks.append(f"contamination check passed ({check.method})")


def evaluate_gate(inputs: GateInputs) -> GateReport:
    reasons: list[str] = []
    checks: list[str] = []
    notes: list[str] = []
    _check_scores(inputs, reasons, checks, notes)
    _check_licences(inputs, reasons, checks)
    _check_contamination(inputs, reasons, checks)
    return GateReport(
        target=inputs.candidate.ref, alias=inputs.alias, passed=not reasons, reasons=reasons, checks=checks,
        notes=notes,
    )
