"""``prepare_dataset``: a user's JSONL in, a prepared folder out, its contamination check recorded.

    from loragate.trainer.prepare import prepare_dataset
    result = prepare_dataset(Path("tickets.jsonl"), Path("prepared/"))
    result.manifest.training_data_sha256   # what `registry register --data-sha256` takes

Order matters: validate, deduplicate the whole file, then split (so no duplicate can straddle
train and test), write the splits, and only then check the written splits for contamination.

A test (or validation) set the data came with is kept as given, so that scores compare with
everyone else's on it: train rows that repeat one of its prompts (exactly or nearly) leave
train instead, and the contamination check then runs the other way, the given sets against train.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loragate.registry import InvalidInput, Registry
from loragate.settings import Settings

from .contamination import find_overlaps, numbered, record_check
from .dataset import SPLITS, GivenSplit, Manifest, file_sha256, write_examples
from .dedup import Removal, dedup_report, deduplicate, drop_held_out
from .formats import LineProblem, SourceFile, load_source
from .json_fields import answer_problems, schema_problems
from .splits import check_fractions, detect_labels, split_examples

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PrepareResult:
    folder: Path
    manifest: Manifest
    removed: list[Removal]  # every duplicate dropped (the manifest keeps counts and a sample)
    skipped: list[LineProblem]  # invalid lines passed over with skip_invalid


def _check_output_folder(out: Path) -> None:
    """Refuse to write into a folder holding anything but an earlier prepared dataset."""
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"{out} exists and is not a folder")
    ours = {MANIFEST} | {f"{name}.jsonl" for name in SPLITS}
    if out.is_dir() and any(p.name not in ours for p in out.iterdir()):
        raise InvalidInput(f"{out} holds other files; give an empty or new folder, or an earlier prepared one")


def prepare_dataset(
    source: Path,
    out: Path,
    *,
    format: str | None = None,
    skip_invalid: bool = False,
    near_threshold: float | None = None,
    validation_fraction: float | None = None,
    test_fraction: float | None = None,
    seed: int | None = None,
    settings: Settings | None = None,
    registry: Registry | None = None,
    record: bool = True,
    test: Path | None = None,
    validation: Path | None = None,
    answer_schema: Path | None = None,
) -> PrepareResult:
    """Validate, deduplicate, split, write, check contamination; record the check unless
    ``record`` is False. ``test``/``validation``: files of the user's own split, kept as given
    (their fraction is then unused). ``answer_schema``: a JSON schema file every completion must
    follow (checked here, scored by eval). Unset options come from ``settings.data``."""
    settings = settings or (registry.settings if registry else Settings())
    data = settings.data
    threshold = data.near_duplicate_threshold if near_threshold is None else near_threshold
    val_fraction = data.validation_fraction if validation_fraction is None else validation_fraction
    test_fraction = data.test_fraction if test_fraction is None else test_fraction
    seed = data.seed if seed is None else seed
    if not 0 < threshold <= 1:
        raise InvalidInput(f"the near-duplicate threshold must be in (0, 1], got {threshold:g}")
    val_fraction = 0.0 if validation is not None else val_fraction
    test_fraction = 0.0 if test is not None else test_fraction
    check_fractions(val_fraction, test_fraction, test_given=test is not None)
    out = Path(out)
    _check_output_folder(out)
    schema = _read_schema(answer_schema) if answer_schema is not None else None

    loaded = load_source(Path(source), format, skip_invalid=skip_invalid)
    given: dict[str, SourceFile] = {name: load_source(Path(path), format, skip_invalid=skip_invalid)
                                    for name, path in (("test", test), ("validation", validation)) if path is not None}
    kept, removed = deduplicate(loaded.rows, threshold=threshold, num_perm=data.minhash_permutations)
    kept, leaked = drop_held_out(kept, {name: f.rows for name, f in given.items()}, threshold=threshold,
                                 num_perm=data.minhash_permutations)
    removed += leaked
    examples = [row.example for row in kept]
    labels = detect_labels([e.completion for e in examples]
                           + [row.example.completion for f in given.values() for row in f.rows])
    parts = split_examples(examples, labels=labels, validation_fraction=val_fraction,
                           test_fraction=test_fraction, seed=seed)
    for name, f in given.items():
        parts[name] = [row.example for row in f.rows]
    if schema is not None:
        _check_answers(parts, schema, answer_schema)

    out.mkdir(parents=True, exist_ok=True)
    splits = {name: write_examples(out / f"{name}.jsonl", parts[name]) for name in SPLITS}
    contamination = find_overlaps(parts["train"], {n: numbered(parts[n]) for n in ("validation", "test")},
                                  threshold=threshold, num_perm=data.minhash_permutations)
    manifest = Manifest(
        source=str(Path(source).resolve()), source_sha256=file_sha256(loaded.path), format=loaded.format,
        seed=seed, invalid_skipped=[p.line for p in loaded.problems], dedup=dedup_report(removed, threshold),
        splits=splits, contamination=contamination, labels=labels,
        given={name: GivenSplit(source=str(f.path.resolve()), source_sha256=file_sha256(f.path), count=len(f.rows))
               for name, f in given.items()},
        answer_schema=schema,
    )
    (out / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    if record:
        record_check(registry or Registry(settings), manifest.training_data_sha256, contamination,
                     {name: splits[name].sha256 for name in ("validation", "test")})
    return PrepareResult(folder=out, manifest=manifest, removed=removed, skipped=loaded.problems)


def _read_schema(path: Path) -> dict:
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read the JSON schema {path}: {exc}") from exc
    problem = schema_problems(schema) if isinstance(schema, dict) else "a schema is a JSON object"
    if problem:
        raise InvalidInput(f"{path} is not a valid JSON schema: {problem}")
    return schema


def _check_answers(parts: dict[str, list], schema: dict, path: Path) -> None:
    """Every reference answer must follow the schema the eval will hold the model's answers to."""
    bad = [(name, i, problem) for name, examples in parts.items()
           for i, problem in enumerate(answer_problems([e.completion for e in examples], schema), 1)
           if problem is not None]
    if bad:
        shown = "; ".join(f"{name} #{i}: {problem}" for name, i, problem in bad[:3])
        raise InvalidInput(f"{len(bad)} answer(s) do not follow {path}: {shown}")
