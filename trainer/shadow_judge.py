"""``loragate rollout judge``: the pairwise judge on a shadow rollout's stored pairs.

Each pair is the same live request answered by production (shown to the user) and by the
candidate (unseen); the judge says which is better with no reference answer, both orders asked
(``judge.py``). The candidate's win rate is recorded on it as an eval (suite ``shadow``), which
the gate weighs when the adapter's primary suite is ``shadow``.
"""

from __future__ import annotations

import json

from loragate.gateway.rollouts import SHADOW_SUITE, RolloutService
from loragate.registry import EvalInput, InvalidInput, Registry

from .dataset import Example, Message
from .judge import JudgeReport, JudgeTarget, judge_pairs


def judge_shadow(registry: Registry, adapter: str, target: JudgeTarget, *, limit: int = 100) -> JudgeReport:
    rollout, pairs = RolloutService(registry).shadow_pairs(adapter, limit=limit)
    if not pairs:
        raise InvalidInput(f"the latest shadow rollout of {adapter} has no stored pairs to judge "
                           "(none compared yet, or every request said \"store\": false)")
    examples = [_example(p.prompt) for p in pairs]
    candidate, production = f"{adapter}@{rollout.candidate_version}", f"{adapter}@{rollout.production_version}"
    report = judge_pairs(target, examples, [p.candidate_output for p in pairs], [p.production_output for p in pairs],
                         new=candidate, old=production)
    registry.add_eval(EvalInput(suite=SHADOW_SUITE, metrics={"judge_win_rate": report.win_rate},
                                sample_count=len(pairs)), ref=candidate)
    return report


def _example(prompt: str) -> Example:
    """The request as the judge reads it: chat messages, or a completion prompt as one user turn."""
    try:
        messages = json.loads(prompt)
    except ValueError:
        messages = None
    if not isinstance(messages, list):
        messages = [{"role": "user", "content": prompt}]
    return Example(prompt=[Message(role=m["role"] if m["role"] in ("system", "assistant") else "user",
                                   content=m.get("content") or "") for m in messages], completion="")
