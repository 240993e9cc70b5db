"""Exact and near-duplicate removal.

Exact: the same prompt text and completion once case, Unicode forms and white space are
normalised. Near: prompts whose character 5-gram sets overlap with a Jaccard similarity of at
least the threshold. datasketch's MinHash LSH finds the candidates without comparing every
pair; each candidate is then confirmed on the exact Jaccard of the two 5-gram sets, so a
removal never rests on a hash collision. Character shingles, not words: prompts are short,
and a changed word or typo moves a word-level Jaccard much more than a character-level one.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Literal

from datasketch import MinHash, MinHashLSH

from .dataset import DedupReport, Example
from .formats import SourceRow

SHINGLE_CHARS = 5
MAX_REPORTED_PAIRS = 20
MINHASH_SEED = 1  # fixed: the same text always gets the same signature


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def shingles(text: str) -> set[str]:
    norm = normalise(text)
    if len(norm) <= SHINGLE_CHARS:
        return {norm}
    return {norm[i:i + SHINGLE_CHARS] for i in range(len(norm) - SHINGLE_CHARS + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def exact_key(example: Example) -> str:
    return normalise(example.user_text) + "\x00" + normalise(example.completion)


class NearIndex:
    """Texts indexed by key; ``matches`` gives the indexed texts within the threshold of a query."""

    def __init__(self, threshold: float, num_perm: int):
        self.threshold = threshold
        self.num_perm = num_perm
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._shingles: dict[int, set[str]] = {}

    def _signature(self, grams: set[str]) -> MinHash:
        signature = MinHash(num_perm=self.num_perm, seed=MINHASH_SEED)
        signature.update_batch([g.encode("utf-8") for g in grams])
        return signature

    def add(self, key: int, text: str) -> None:
        grams = shingles(text)
        self._shingles[key] = grams
        self._lsh.insert(key, self._signature(grams))

    def matches(self, text: str) -> list[tuple[int, float]]:
        """(key, Jaccard) of each confirmed near duplicate, most similar first."""
        grams = shingles(text)
        found = [(key, jaccard(grams, self._shingles[key])) for key in self._lsh.query(self._signature(grams))]
        return sorted(((k, s) for k, s in found if s >= self.threshold), key=lambda m: (-m[1], m[0]))


@dataclass(frozen=True)
class Removal:
    kept_line: int
    removed_line: int
    # exact/near: a duplicate of ``kept_line`` in the same file; in_test/in_validation: a train row
    # that repeats line ``kept_line`` of a held-out file the user gave.
    kind: Literal["exact", "near", "in_test", "in_validation"]
    similarity: float  # Jaccard of the prompts' 5-grams; 1.0 for exact duplicates


def deduplicate(rows: list[SourceRow], *, threshold: float, num_perm: int) -> tuple[list[SourceRow], list[Removal]]:
    """Keep the first of each group of duplicates, in file order; say what went and why."""
    first_seen: dict[str, int] = {}
    index = NearIndex(threshold, num_perm)
    kept: list[SourceRow] = []
    removed: list[Removal] = []
    for row in rows:
        key = exact_key(row.example)
        if key in first_seen:
            removed.append(Removal(first_seen[key], row.line, "exact", 1.0))
            continue
        near = index.matches(row.example.user_text)
        if near:
            removed.append(Removal(near[0][0], row.line, "near", round(near[0][1], 4)))
            continue
        first_seen[key] = row.line
        index.add(row.line, row.example.user_text)
        kept.append(row)
    return kept, removed


def drop_held_out(rows: list[SourceRow], held_out: dict[str, list[SourceRow]], *, threshold: float,
                  num_perm: int) -> tuple[list[SourceRow], list[Removal]]:
    """Train rows whose prompt repeats (exactly or nearly) one of a given held-out set's: they leave
    train, and the held-out sets stay as given."""
    exact: dict[str, tuple[str, int]] = {}
    index = NearIndex(threshold, num_perm)
    where: list[tuple[str, int]] = []  # the index's keys: (held-out set, line)
    for name, examples in held_out.items():
        for row in examples:
            exact.setdefault(normalise(row.example.user_text), (name, row.line))
            index.add(len(where), row.example.user_text)
            where.append((name, row.line))
    kept: list[SourceRow] = []
    removed: list[Removal] = []
    for row in rows:
        hit = exact.get(normalise(row.example.user_text))
        similarity = 1.0
        if hit is None:
            near = index.matches(row.example.user_text)
            if near:
                hit, similarity = where[near[0][0]], round(near[0][1], 4)
        if hit is None:
            kept.append(row)
        else:
            removed.append(Removal(hit[1], row.line, f"in_{hit[0]}", similarity))  # type: ignore[arg-type]
    return kept, removed


def dedup_report(removed: list[Removal], threshold: float) -> DedupReport:
    return DedupReport(
        exact_removed=sum(r.kind == "exact" for r in removed),
        near_removed=sum(r.kind == "near" for r in removed),
        held_out_removed=sum(r.kind.startswith("in_") for r in removed),
        threshold=threshold,
        examples=[(r.kept_line, r.removed_line) for r in removed[:MAX_REPORTED_PAIRS]],
    )
