"""``loragate quantize compare``: the version's eval suite on each artifact, beside the adapter.

Every row answers the same held-out prompts, tokenised once with the base's chat template, so
the rows differ only in their weights: the unquantized peft adapter (the reference), the merged
safetensors, the merged GGUFs, and the GGUF LoRA on the base GGUF the gateway serves.

That last row is the served path: it is recorded as suite ``<suite>@served`` with its loss in
points, which the promotion gate reads (``loragate eval --served`` scores only the adapter and
that row).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pydantic import BaseModel

from loragate.offline_base import llamacpp_base_gguf
from loragate.registry import EvalInput, Registry, served_suite
from loragate.trainer.dataset import Example, open_prepared

from .gguf_export import export_gguf, gguf_path
from .lora_gguf import base_hf_folder, convert_lora_to_gguf, lora_gguf_path
from .merge import merged_folder

DEFAULT_TYPES = ("f16", "q8_0", "q4_k_m")


class CompareRow(BaseModel):
    artifact: str  # "adapter", "merged", "gguf f16", "gguf-lora f16 on base Q4_1"
    backend: str  # transformers | llama.cpp
    served: bool = False  # what the gateway's llama.cpp backend serves for this version
    score: float
    quality_loss_points: float  # (adapter's score - this score) x 100
    fit: bool  # loss within the ceiling: fit for promotion on this artifact
    size_bytes: int
    load_s: float
    tokens_per_s: float  # decode speed, one sequence


class CompareReport(BaseModel):
    ref: str
    suite: str
    metric: str
    examples: int
    eval_data_sha256: str
    ceiling_points: float
    rows: list[CompareRow]


# A loaded model: token ids, max new tokens and whether to ignore EOS in; text and count out.
Generate = Callable[[list[int], int, bool], tuple[str, int]]
Score = Callable[[list[str], list[str], str], float]  # answers, references, metric -> value
SPEED_TOKENS = 32  # decode speed: this many new tokens, EOS ignored, after one warm-up


@dataclass(frozen=True)
class Candidate:
    artifact: str
    backend: str
    size_bytes: int
    load: Callable[[], AbstractContextManager[tuple[Generate, float]]]  # the model and its load time
    served: bool = False


def compare_version(registry: Registry, ref: str, data: Path, *, types: tuple[str, ...] = DEFAULT_TYPES,
                    merged: bool = True, limit: int | None = None, ceiling: float | None = None,
                    score: Score | None = None, adapter_row: CompareRow | None = None) -> CompareReport:
    """Score each artifact on the test split of the prepared dataset ``data`` and record the
    scores in the registry as suite ``<suite>@<artifact>`` (the served path as ``<suite>@served``).

    ``score`` defaults to the trainer's metric of that name, with the dataset's labels and schema.
    ``adapter_row``: the adapter's row from an earlier run on the same prompts, not scored again."""
    from transformers import AutoTokenizer

    from loragate.trainer.progress import quiet_library_progress

    quiet_library_progress()
    info = registry.get(ref)
    suite, metric = registry.primary_eval(info.name)
    ceiling = registry.settings.quantize.max_quality_loss_points if ceiling is None else ceiling
    dataset = open_prepared(data)
    if score is None:
        from loragate.trainer.metrics import score_metric

        score = partial(score_metric, labels=dataset.manifest.labels, schema=dataset.manifest.answer_schema)
    examples = dataset.split("test")[:limit]
    base = base_hf_folder(registry, ref)
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = [_prompt_ids(tokenizer, e) for e in examples]
    references = [e.completion for e in examples]
    max_tokens = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references) + 4

    rows: list[CompareRow] = [adapter_row] if adapter_row else []
    for candidate in _candidates(registry, ref, base, types, merged, adapter=adapter_row is None):
        with candidate.load() as (generate, load_s):
            texts = [generate(ids, max_tokens, False)[0] for ids in prompts]
            speed = _decode_speed(generate, prompts[0])
        value = score(texts, references, metric)
        loss = 0.0 if not rows else (rows[0].score - value) * 100
        rows.append(CompareRow(artifact=candidate.artifact, backend=candidate.backend, served=candidate.served,
                               score=value,
                               quality_loss_points=round(loss, 4), fit=loss <= ceiling,
                               size_bytes=candidate.size_bytes, load_s=load_s,
                               tokens_per_s=speed))
    report = CompareReport(ref=ref, suite=suite, metric=metric, examples=len(examples),
                           eval_data_sha256=dataset.sha256("test"), ceiling_points=ceiling, rows=rows)
    _record(registry, report)
    return report


def _decode_speed(generate: Generate, ids: list[int]) -> float:
    generate(ids, SPEED_TOKENS, True)  # warm-up: caches, thread pools, weight repacking
    started = time.perf_counter()
    _, count = generate(ids, SPEED_TOKENS, True)
    return count / (time.perf_counter() - started)


def _record(registry: Registry, report: CompareReport) -> None:
    for row in report.rows[1:]:  # the adapter's own score is the trainer's to record
        suite = served_suite(report.suite) if row.served else f"{report.suite}@{row.artifact.replace(' ', '-')}"
        registry.add_eval(EvalInput(
            suite=suite, sample_count=report.examples,
            eval_data_sha256=report.eval_data_sha256,
            metrics={report.metric: row.score, "quality_loss_points": row.quality_loss_points,
                     "tokens_per_s": row.tokens_per_s, "load_s": row.load_s},
            higher_is_better={"quality_loss_points": False, "load_s": False}), ref=report.ref)


def _prompt_ids(tokenizer, example: Example) -> list[int]:
    rendered = tokenizer.apply_chat_template([m.model_dump() for m in example.prompt], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)
    return list(rendered["input_ids"])


def _candidates(registry: Registry, ref: str, base: Path, types: tuple[str, ...],
                merged: bool, adapter: bool) -> Iterator[Candidate]:
    """The reference first (unless scored already), then each artifact, exported or converted
    when missing; the served path last."""
    if adapter:
        folder = registry.artifact_path(ref)
        yield Candidate("adapter", "transformers", registry.get(ref).artifact_size,
                        lambda: _transformers(base, folder))
    if merged:
        folder = merged_folder(registry, ref)
        yield Candidate("merged", "transformers", _folder_size(folder), lambda: _transformers(folder, None))
    for out_type in types:
        if not any(a.kind == "gguf" and a.type == out_type for a in registry.derived_artifacts(ref)):
            export_gguf(registry, ref, out_type)
        path = gguf_path(registry, ref, out_type)
        yield Candidate(f"gguf {out_type}", "llama.cpp", path.stat().st_size, lambda path=path: _llama_cpp(path))
    if not any(a.kind == "gguf-lora" and a.type == "f16" for a in registry.derived_artifacts(ref)):
        convert_lora_to_gguf(registry, ref)
    lora = lora_gguf_path(registry, ref)
    served_base = llamacpp_base_gguf(registry)
    yield Candidate(f"gguf-lora f16 on {served_base.name}", "llama.cpp", lora.stat().st_size,
                    lambda: _llama_cpp(served_base, lora), served=True)


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextmanager
def _transformers(model_folder: Path, adapter: Path | None) -> Iterator[tuple[Generate, float]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    if adapter is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, adapter)
    model.eval()
    load_s = time.perf_counter() - started
    tokenizer_eos = model.generation_config.eos_token_id

    def generate(ids: list[int], max_tokens: int, ignore_eos: bool) -> tuple[str, int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                 min_new_tokens=max_tokens if ignore_eos else 0,
                                 eos_token_id=tokenizer_eos, pad_token_id=tokenizer_eos)
        new = out[0, len(ids):].tolist()
        return tokenizer.decode(new, skip_special_tokens=True), len(new)

    yield generate, load_s


@contextmanager
def _llama_cpp(gguf: Path, lora: Path | None = None) -> Iterator[tuple[Generate, float]]:
    import llama_cpp

    started = time.perf_counter()
    llm = llama_cpp.Llama(str(gguf), lora_path=str(lora) if lora else None, n_ctx=2048, verbose=False)
    load_s = time.perf_counter() - started

    no_eos = {llm.token_eos(): float("-inf")}

    def generate(ids: list[int], max_tokens: int, ignore_eos: bool) -> tuple[str, int]:
        out = llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0,
                                    logit_bias=no_eos if ignore_eos else None)
        return out["choices"][0]["text"], out["usage"]["completion_tokens"]

    try:
        yield generate, load_s
    finally:
        llm.close()

