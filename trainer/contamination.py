"""The contamination check: no held-out example, exact or near duplicate, appears in train.

It compares prompts (``Example.user_text``): an evaluation prompt the model has trained on,
word for word or nearly, measures memory rather than skill, whatever the completion. Exact is
the normalised text; near is the same MinHash LSH + Jaccard rule as deduplication. The result
goes into the registry under the training split's sha256, where the promotion gate reads it.
"""

from __future__ import annotations

from pathlib import Path

from loragate.registry import Registry
from loragate.settings import Settings

from .dataset import ContaminationReport, Example, file_sha256, open_prepared
from .dedup import NearIndex, normalise
from .formats import load_source

MAX_REPORTED_OVERLAPS = 20


def method_name(threshold: float) -> str:
    return f"exact+minhash(t={threshold:g})"


def numbered(examples: list[Example]) -> list[tuple[int, Example]]:
    return list(enumerate(examples, 1))


def find_overlaps(
    train: list[Example], held_out: dict[str, list[tuple[int, Example]]], *, threshold: float, num_perm: int
) -> ContaminationReport:
    """Each held-out set (name -> (1-based line, example)) against train; overlaps named by line."""
    exact_lines: dict[str, int] = {}
    index = NearIndex(threshold, num_perm)
    for line, example in enumerate(train, 1):
        exact_lines.setdefault(normalise(example.user_text), line)
        index.add(line, example.user_text)
    exact = near = 0
    found: list[str] = []
    for name, examples in held_out.items():
        for line, example in examples:
            train_line = exact_lines.get(normalise(example.user_text))
            if train_line is not None:
                exact += 1
                found.append(f"{name} line {line} = train line {train_line} (exact)")
                continue
            matches = index.matches(example.user_text)
            if matches:
                near += 1
                found.append(f"{name} line {line} ~ train line {matches[0][0]} (jaccard {matches[0][1]:.2f})")
    return ContaminationReport(
        passed=exact + near == 0, method=method_name(threshold), threshold=threshold,
        exact_overlaps=exact, near_overlaps=near, examples=found[:MAX_REPORTED_OVERLAPS],
    )


def record_check(registry: Registry, training_data_sha256: str, report: ContaminationReport,
                 checked: dict[str, str]) -> None:
    """``checked``: each held-out set's name -> its sha256, so the record says what was compared."""
    details = report.model_dump(exclude={"passed", "method"}) | {"checked": checked}
    registry.record_contamination_check(training_data_sha256, passed=report.passed, method=report.method,
                                        details=details)


def check_prepared(
    folder: Path,
    *,
    against: Path | None = None,
    against_format: str | None = None,
    threshold: float | None = None,
    settings: Settings | None = None,
    registry: Registry | None = None,
) -> ContaminationReport:
    """Check a prepared folder's validation and test splits (and ``against``, any JSONL in a
    supported format, e.g. a test set of the user's own) against its train split, and record it.

    ``threshold`` defaults to the one the folder was deduplicated with."""
    settings = settings or (registry.settings if registry else Settings())
    dataset = open_prepared(folder)
    manifest = dataset.manifest
    held_out = {name: numbered(dataset.split(name)) for name in ("validation", "test")}
    checked = {name: dataset.sha256(name) for name in held_out}
    if against is not None:
        source = load_source(against, against_format)
        held_out[source.path.name] = [(row.line, row.example) for row in source.rows]
        checked[source.path.name] = file_sha256(source.path)
    report = find_overlaps(dataset.split("train"), held_out, threshold=threshold or manifest.dedup.threshold,
                           num_perm=settings.data.minhash_permutations)
    record_check(registry or Registry(settings), manifest.training_data_sha256, report, checked)
    return report
