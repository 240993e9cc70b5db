"""``loragate data stats``: what a dataset holds, and the max_seq_length it needs.

Token lengths are of the whole conversation (prompt and completion) rendered with the base
model's chat template, as training sees it. Percentiles are nearest-rank: p90 is the smallest
length that at least 90% of the examples fit in. The recommended max_seq_length is p99 rounded
up to a multiple of 64, or the longest example rounded up when that costs at most one more
block of 64 (then nothing is cut; a few outliers alone do not grow every batch). Anything
longer is truncated in training, and a truncated example loses its completion (the part the
loss is computed on) first, so the stats count and warn about them.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from loragate.registry import InvalidInput, NotFound, Registry
from loragate.text import is_json

from .dataset import SPLITS, Example, open_prepared
from .formats import read_source
from .splits import detect_labels

LENGTH_MULTIPLE = 64


class TokenStats(BaseModel):
    p50: int
    p90: int
    p99: int
    max: int
    recommended_max_seq_length: int
    truncated_at_recommended: int  # examples longer than the recommendation
    max_seq_length: int | None = None  # the length the user asked about, if any
    truncated_at_max_seq_length: int | None = None


class DataStats(BaseModel):
    source: str
    counts: dict[str, int]  # per split for a prepared folder, {"all": n} for a file
    invalid_lines: int = 0
    labels: list[str] | None = None
    label_counts: dict[str, dict[str, int]] | None = None  # split -> label -> count
    output_format: Literal["label", "json", "text"]
    format_share: float | None = None  # share of completions in that format; None for free text
    tokens: TokenStats | None = None
    warnings: list[str] = []


def percentile(sorted_values: list[int], p: float) -> int:
    """Nearest rank: the smallest value with at least p% of the values at or below it."""
    return sorted_values[max(math.ceil(p / 100 * len(sorted_values)) - 1, 0)]


def round_up(value: int, multiple: int = LENGTH_MULTIPLE) -> int:
    return max(math.ceil(value / multiple), 1) * multiple


def output_format(completions: list[str], labels: list[str] | None) -> tuple[str, float | None]:
    """Labels, JSON (when at least half the completions start like JSON) or free text, and the
    share of completions that really are in that format."""
    if labels:
        allowed = set(labels)
        return "label", sum(c.strip() in allowed for c in completions) / len(completions)
    if sum(c.lstrip().startswith(("{", "[")) for c in completions) * 2 >= len(completions):
        return "json", sum(is_json(c) for c in completions) / len(completions)
    return "text", None


def token_lengths(examples: list[Example], base_model: Path) -> list[int]:
    """Each example's token count under the base model's chat template."""
    from transformers import AutoTokenizer  # heavy; only when lengths are asked for

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    texts = [tokenizer.apply_chat_template(
        [m.model_dump() for m in e.prompt] + [{"role": "assistant", "content": e.completion}], tokenize=False)
        for e in examples]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def token_stats(lengths: list[int], max_seq_length: int | None = None) -> TokenStats:
    ordered = sorted(lengths)
    recommended = round_up(percentile(ordered, 99))
    if round_up(ordered[-1]) <= recommended + LENGTH_MULTIPLE:
        recommended = round_up(ordered[-1])
    return TokenStats(
        p50=percentile(ordered, 50), p90=percentile(ordered, 90), p99=percentile(ordered, 99), max=ordered[-1],
        recommended_max_seq_length=recommended,
        truncated_at_recommended=sum(n > recommended for n in lengths),
        max_seq_length=max_seq_length,
        truncated_at_max_seq_length=None if max_seq_length is None else sum(n > max_seq_length for n in lengths),
    )


def resolve_base_model(value: str, registry: Registry | None = None) -> Path:
    """A Hugging Face model folder, or the id of a registered base model (its local folder)."""
    if Path(value).is_dir():
        return Path(value)
    try:
        return (registry or Registry()).base_model_folder(value)
    except NotFound as exc:
        raise InvalidInput(f"--base-model {value!r} is neither a model folder nor a usable registered base model: "
                           f"{exc}") from exc


def _load(target: Path, format: str | None) -> tuple[dict[str, list[Example]], list[str] | None, int]:
    """(examples by split, the labels, invalid line count) of a prepared folder or a JSONL file."""
    if target.is_dir():
        dataset = open_prepared(target)
        return {name: dataset.split(name) for name in SPLITS}, dataset.manifest.labels, 0
    source = read_source(target, format)  # stats describe the file as it is, invalid lines too
    examples = [row.example for row in source.rows]
    if not examples:
        raise InvalidInput(f"{target}: no valid examples")
    return {"all": examples}, detect_labels([e.completion for e in examples]), len(source.problems)


def dataset_stats(
    target: Path, *, base_model: Path | None = None, max_seq_length: int | None = None, format: str | None = None
) -> DataStats:
    parts, labels, invalid = _load(Path(target), format)
    everything = [e for examples in parts.values() for e in examples]
    kind, share = output_format([e.completion for e in everything], labels)
    stats = DataStats(
        source=str(target), counts={name: len(examples) for name, examples in parts.items()}, invalid_lines=invalid,
        labels=labels, output_format=kind, format_share=share,
        label_counts={name: dict(sorted(Counter(e.completion.strip() for e in examples).items()))
                      for name, examples in parts.items()} if labels else None,
    )
    if invalid:
        stats.warnings.append(f"{invalid} invalid line(s) left out; `data prepare` refuses them without --skip-invalid")
    if base_model is not None:
        stats.tokens = token_stats(token_lengths(everything, base_model), max_seq_length)
        stats.warnings += _length_warnings(stats.tokens)
    return stats


def _length_warnings(tokens: TokenStats) -> list[str]:
    warnings = []
    if tokens.truncated_at_recommended:
        warnings.append(f"{tokens.truncated_at_recommended} example(s) are longer than the recommended "
                        f"max_seq_length {tokens.recommended_max_seq_length} (longest {tokens.max}) and "
                        "would be truncated, completion first")
    if tokens.truncated_at_max_seq_length:
        warnings.append(f"{tokens.truncated_at_max_seq_length} example(s) are longer than max_seq_length "
                        f"{tokens.max_seq_length} and would be truncated, completion first")
    return warnings
