"""Seeded train/validation/test splits, stratified when the completions are labels.

The label rule: the completions are classification labels when there are between 2 and 50
distinct values (after stripping white space), each a single line of at most 40 characters,
and every value appears at least twice. Then each label is split on its own, so every split
keeps the label balance of the whole; otherwise the examples are split as one group.
"""

from __future__ import annotations

import random
from collections import Counter

from loragate.registry import InvalidInput

from .dataset import SPLITS, Example

MAX_LABELS = 50
MAX_LABEL_CHARS = 40


def detect_labels(completions: list[str]) -> list[str] | None:
    """The sorted label set when the completions are classification labels, else None."""
    counts = Counter(c.strip() for c in completions)
    if not 2 <= len(counts) <= MAX_LABELS:
        return None
    if any(n < 2 or len(value) > MAX_LABEL_CHARS or "\n" in value for value, n in counts.items()):
        return None
    return sorted(counts)


def allocate(sizes: list[int], fraction: float) -> list[int]:
    """Per-group counts that sum to round(total * fraction), largest remainders first."""
    shares = [size * fraction for size in sizes]
    counts = [int(share) for share in shares]
    target = int(sum(sizes) * fraction + 0.5)
    by_remainder = sorted(range(len(sizes)), key=lambda i: (counts[i] - shares[i], i))
    for i in by_remainder[:max(target - sum(counts), 0)]:
        counts[i] += 1
    return counts


def check_fractions(validation_fraction: float, test_fraction: float, *, test_given: bool = False) -> None:
    if not (test_given or 0 < test_fraction < 1) or not 0 <= validation_fraction < 1:
        raise InvalidInput("the test fraction must be in (0, 1) and the validation fraction in [0, 1)")
    if validation_fraction + test_fraction >= 1:
        raise InvalidInput(f"validation ({validation_fraction:g}) and test ({test_fraction:g}) fractions "
                           "leave nothing to train on")


def split_examples(
    examples: list[Example],
    *,
    labels: list[str] | None,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, list[Example]]:
    """{"train", "validation", "test"}: the same seed and input always give the same split. A test
    fraction of 0 leaves the test split empty, for a test set the user gives."""
    check_fractions(validation_fraction, test_fraction, test_given=test_fraction == 0)
    rng = random.Random(seed)
    if labels:
        groups = [[e for e in examples if e.completion.strip() == label] for label in labels]
    else:
        groups = [list(examples)]
    for group in groups:
        rng.shuffle(group)
    sizes = [len(g) for g in groups]
    parts: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for group, n_test, n_val in zip(groups, allocate(sizes, test_fraction), allocate(sizes, validation_fraction)):
        # Every label keeps at least one training example, even in a tiny group.
        n_val = max(min(n_val, len(group) - n_test - 1), 0)
        n_test = max(min(n_test, len(group) - 1), 0)
        parts["test"] += group[:n_test]
        parts["validation"] += group[n_test:n_test + n_val]
        parts["train"] += group[n_test + n_val:]
    for part in parts.values():
        rng.shuffle(part)  # stratified groups come out label by label; mix them
    if (test_fraction and not parts["test"]) or not parts["train"]:
        raise InvalidInput(f"{len(examples)} example(s) are too few for a train and a test split")
    return parts
