"""A pairwise judge: a model behind any OpenAI-compatible endpoint (the gateway included)
says which of two answers to the same request is better, as a regression signal between a
version and the one before it.

Each pair is asked twice with the answers swapped, because judges favour a position; a pair
counts as a win or a loss only when both orders agree, otherwise as a tie. A reply that is
not one of the three letters counts as a tie too, and is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field

from .dataset import Example

Verdict = Literal["new", "old", "tie"]
INSTRUCTIONS = (
    "You compare two answers to the same request. A reference answer may be given. Reply with one "
    "letter only: A if answer A is better, B if answer B is better, T if they are equally good."
)


class JudgeTarget(BaseModel):
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str
    api_key: str = "none"
    max_tokens: int = Field(2, ge=1)


class JudgeReport(BaseModel):
    new: str  # version refs
    old: str
    judge_model: str
    wins: int
    losses: int
    ties: int
    unparsed_replies: int
    verdicts: list[Verdict]

    @property
    def win_rate(self) -> float:
        """Wins plus half the ties, over all pairs: 0.5 means no change."""
        return (self.wins + self.ties / 2) / len(self.verdicts) if self.verdicts else 0.5


def _question(example: Example, first: str, second: str) -> str:
    request = "\n".join(f"{m.role}: {m.content}" for m in example.prompt)
    # Live traffic (a shadow's pairs) has no reference answer.
    reference = f"Reference answer:\n{example.completion}\n\n" if example.completion else ""
    return (f"Request:\n{request}\n\n{reference}"
            f"Answer A:\n{first}\n\nAnswer B:\n{second}\n\nWhich is better? Reply A, B or T.")


def _letter(reply: str | None) -> str | None:
    text = (reply or "").strip().upper()
    return text[0] if text[:1] in ("A", "B", "T") else None


def judge_pairs(target: JudgeTarget, examples: Sequence[Example], new_answers: Sequence[str],
                old_answers: Sequence[str], *, new: str, old: str) -> JudgeReport:
    import openai

    client = openai.OpenAI(base_url=target.base_url, api_key=target.api_key, max_retries=2)
    verdicts: list[Verdict] = []
    unparsed = 0

    def ask(example: Example, first: str, second: str) -> str | None:
        nonlocal unparsed
        response = client.chat.completions.create(
            model=target.model, temperature=0, max_tokens=target.max_tokens,
            messages=[{"role": "system", "content": INSTRUCTIONS},
                      {"role": "user", "content": _question(example, first, second)}],
        )
        letter = _letter(response.choices[0].message.content)
        unparsed += letter is None
        return letter

    for example, new_answer, old_answer in zip(examples, new_answers, old_answers, strict=True):
        new_first = ask(example, new_answer, old_answer)  # new is A
        old_first = ask(example, old_answer, new_answer)  # new is B
        if new_first == "A" and old_first == "B":
            verdicts.append("new")
        elif new_first == "B" and old_first == "A":
            verdicts.append("old")
        else:
            verdicts.append("tie")
    return JudgeReport(new=new, old=old, judge_model=target.model, wins=verdicts.count("new"),
                       losses=verdicts.count("old"), ties=verdicts.count("tie"), unparsed_replies=unparsed,
                       verdicts=verdicts)
