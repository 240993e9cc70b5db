"""The trainer's boundary types: one normalised example, and a prepared dataset on disk.

Data prep (``loragate data prepare``) reads the formats users have and writes a prepared
folder; training and evaluation only ever read prepared folders:

    OUT/train.jsonl  OUT/validation.jsonl  OUT/test.jsonl  OUT/manifest.json

Each line is trl's conversational prompt-completion format, so ``SFTTrainer`` takes the files
as they are and computes the loss on the completion only:
``{"prompt": [{"role": "system"|"user"|"assistant", "content": ...}, ...],
"completion": [{"role": "assistant", "content": ...}]}``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

Role = Literal["system", "user", "assistant"]
SPLITS = ("train", "validation", "test")


class Message(BaseModel):
    role: Role
    content: str


class Example(BaseModel):
    """A prompt (chat messages ending with the user's turn) and the assistant's answer."""

    prompt: list[Message] = Field(min_length=1)
    completion: str

    @property
    def user_text(self) -> str:
        """What near-duplicate and contamination checks compare: the prompt's text."""
        return "\n".join(m.content for m in self.prompt if m.role != "system")

    def to_trl(self) -> dict:
        return {"prompt": [m.model_dump() for m in self.prompt],
                "completion": [{"role": "assistant", "content": self.completion}]}

    @classmethod
    def from_trl(cls, row: dict) -> Example:
        return cls(prompt=row["prompt"], completion=row["completion"][-1]["content"])


class SplitInfo(BaseModel):
    file: str
    sha256: str
    count: int


class GivenSplit(BaseModel):
    source: str
    source_sha256: str
    count: int


class DedupReport(BaseModel):
    exact_removed: int = 0
    near_removed: int = 0
    held_out_removed: int = 0  # train rows that repeated a given test or validation example
    threshold: float
    # (kept line, removed line) pairs, by line number in the source file; capped for size.
    examples: list[tuple[int, int]] = Field(default_factory=list)


class ContaminationReport(BaseModel):
    passed: bool
    method: str
    threshold: float
    exact_overlaps: int
    near_overlaps: int
    examples: list[str] = Field(default_factory=list)


class Manifest(BaseModel):
    """What ``manifest.json`` holds: where the data came from and what was done to it."""

    source: str
    source_sha256: str
    format: Literal["prompt_completion", "messages", "alpaca"]
    seed: int
    invalid_skipped: list[int] = Field(default_factory=list)  # 1-based line numbers
    dedup: DedupReport
    splits: dict[str, SplitInfo]
    contamination: ContaminationReport
    labels: list[str] | None = None  # set when the completions are classification labels
    # Splits the user gave (``--test``, ``--validation``), kept as given: their files and hashes.
    given: dict[str, GivenSplit] = Field(default_factory=dict)
    # The JSON schema every answer must follow (``--schema``): eval reports ``schema_valid``.
    answer_schema: dict[str, Any] | None = None

    @property
    def training_data_sha256(self) -> str:
        """The hash the registry's lineage and the promotion gate's contamination check use."""
        return self.splits["train"].sha256


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_examples(path: Path, examples: list[Example]) -> SplitInfo:
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example.to_trl(), ensure_ascii=False) + "\n")
    return SplitInfo(file=path.name, sha256=file_sha256(path), count=len(examples))


def read_examples(path: Path) -> list[Example]:
    with path.open(encoding="utf-8") as handle:
        return [Example.from_trl(json.loads(line)) for line in handle if line.strip()]


class PreparedDataset:
    """A prepared folder, its manifest checked against the files' hashes on open."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        manifest_path = self.folder / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.folder} is not a prepared dataset (no manifest.json); "
                                    "run `loragate data prepare` first")
        self.manifest = Manifest.model_validate_json(manifest_path.read_text())
        for name, split in self.manifest.splits.items():
            actual = file_sha256(self.folder / split.file)
            if actual != split.sha256:
                raise ValueError(f"{self.folder / split.file} changed since it was prepared "
                                 f"(sha256 {actual[:12]}, manifest {split.sha256[:12]})")

    def split(self, name: str) -> list[Example]:
        return read_examples(self.folder / self.manifest.splits[name].file)

    def sha256(self, name: str) -> str:
        return self.manifest.splits[name].sha256


def open_prepared(folder: Path) -> PreparedDataset:
    """``PreparedDataset`` for the command line: a missing or changed folder is a user error
    (``InvalidInput``: one line and exit code 2), not a traceback."""
    from loragate.registry import InvalidInput

    try:
        return PreparedDataset(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise InvalidInput(str(exc)) from exc
