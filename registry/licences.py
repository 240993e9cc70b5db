"""Licence presets and the check that a deployment stays within a licence's terms."""

from __future__ import annotations

from .models import Licence

PRESETS: tuple[Licence, ...] = (
    Licence(
        id="apache-2.0", name="Apache License 2.0", commercial_use=True,
        derivatives_redistribution=True, attribution_required=True,
        url="https://www.apache.org/licenses/LICENSE-2.0",
    ),
    Licence(
        id="mit", name="MIT License", commercial_use=True,
        derivatives_redistribution=True, attribution_required=True,
        url="https://opensource.org/license/mit",
    ),
    Licence(
        id="llama3", name="Meta Llama 3 Community License", commercial_use=True,
        # Licensees above 700M monthly active users need a separate licence from Meta.
        mau_cap=700_000_000,
        acceptable_use=[
            "Meta Llama 3 Acceptable Use Policy applies",
            "no use of outputs to improve other large language models",
        ],
        derivatives_redistribution=True, attribution_required=True,
        url="https://llama.meta.com/llama3/license",
    ),
    Licence(
        id="gemma", name="Gemma Terms of Use", commercial_use=True,
        acceptable_use=["Gemma Prohibited Use Policy applies and must pass to derivatives"],
        derivatives_redistribution=True, attribution_required=True,
        url="https://ai.google.dev/gemma/terms",
    ),
    Licence(
        id="cc-by-nc-4.0", name="Creative Commons Attribution-NonCommercial 4.0",
        commercial_use=False, derivatives_redistribution=True, attribution_required=True,
        url="https://creativecommons.org/licenses/by-nc/4.0/",
    ),
)


def licence_problems(licence: Licence, *, commercial: bool, monthly_active_users: int | None) -> list[str]:
    """Why the declared use breaks this licence; empty when it does not."""
    problems = []
    if commercial and not licence.commercial_use:
        problems.append(f"licence {licence.id} does not allow commercial use")
    if licence.mau_cap is not None and monthly_active_users is not None and monthly_active_users > licence.mau_cap:
        problems.append(
            f"licence {licence.id} caps use at {licence.mau_cap:,} monthly active users; "
            f"the deployment declares {monthly_active_users:,}"
        )
    return problems
