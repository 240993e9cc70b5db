"""Protected aliases: who may move an alias, beside what the gate asks of the version.

A pure function of the alias's policy (``gate.protected_aliases`` in settings) and the actor,
so every path that moves an alias (CLI, admin API, a rollout's ramp) asks the same question.
"""

from __future__ import annotations

from loragate.settings import AliasPolicy

from .schemas import Actor


def alias_refusal(policy: AliasPolicy | None, actor: Actor, alias: str) -> str | None:
    """Why ``actor`` may not move ``alias``, or None when it may."""
    if policy is None:
        return None
    allowed = {
        "user": actor.name in policy.os_users,
        "key": actor.name in policy.keys or (actor.admin and policy.admin_keys),
        "rollout": policy.rollouts,
    }[actor.kind]
    if allowed:
        return None
    who = [*(["admin keys"] if policy.admin_keys else []), *(f"key {k}" for k in policy.keys),
           *(f"OS user {u}" for u in policy.os_users), *(["rollouts"] if policy.rollouts else [])]
    return f"{alias} is protected: {actor.label} may not move it (allowed: {', '.join(who) or 'no one'})"
