"""How answers are read, by the eval (trainer) and by the gateway's output checks alike."""

from __future__ import annotations

import json
import re
import string

_PUNCTUATION = string.punctuation + "“”‘’"
_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Case, surrounding punctuation and runs of whitespace removed: the usual exact-match rule."""
    return _SPACES.sub(" ", text.strip().lower()).strip(_PUNCTUATION + " ")


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
