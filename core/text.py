"""How answers are read, by the eval (trainer) and by the gateway's output checks alike."""

from __future__ import annotations

import json
import re
import string
from collections import Counter

_PUNCTUATION = string.punctuation + "“”‘’"
_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Case, surrounding punctuation and runs of whitespace removed: the usual exact-match rule."""
    return _SPACES.sub(" ", text.strip().lower()).strip(_PUNCTUATION + " ")


def token_overlap_f1(prediction: str, reference: str) -> float:
    """SQuAD's token-overlap F1 of one answer against another, after ``normalize``."""
    predicted, expected = normalize(prediction).split(), normalize(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
