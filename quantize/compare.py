"""``loragate quantize compare``: the version's eval suite on each artifact, beside the adapter.

Every row answers the same held-out prompts, greedy: the unquantized peft adapter (the reference,
in transformers, or its recorded score on exactly these examples), the merged safetensors, the
merged GGUFs on llama.cpp's server engine, and the served path: the version on the backend the
gateway serves with (the GGUF LoRA on the serving base GGUF through the same engine code and
slots, or the peft adapter on the vLLM server), so its score is what users get.

The served row is recorded as suite ``<suite>@served`` with its loss in points, which the
promotion gate reads (``loragate eval --served`` scores only the adapter and that row).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pydantic import BaseModel

from loragate.gateway.backends.factory import default_backend
from loragate.gateway.backends.llamacpp import LlamaCppBackend
from loragate.gateway.batch import SPEED_TOKENS, EngineAnswers, answer_on_backend
from loragate.gateway.routing import adapter_handle
from loragate.offline_base import llamacpp_base_gguf
from loragate.registry import EvalInput, Registry, VersionInfo, served_suite
from loragate.trainer.dataset import Example, open_prepared

from .gguf_export import export_gguf, gguf_path
from .lora_gguf import base_hf_folder, convert_lora_to_gguf, lora_gguf_path
from .merge import merged_folder

DEFAULT_TYPES = ("f16", "q8_0", "q4_k_m")


class CompareRow(BaseModel):
    artifact: str  # "adapter", "merged", "gguf f16", "gguf-lora f16 on base Q4_1"
    backend: str  # transformers | llama.cpp | vLLM
    served: bool = False  # what the gateway's backend serves for this version
    score: float
    quality_loss_points: float  # (adapter's score - this score) x 100
    fit: bool  # loss within the ceiling: fit for promotion on this artifact
    size_bytes: int
    load_s: float | None = None  # None: a recorded score, not run here
    tokens_per_s: float | None = None  # decode speed, one sequence


class CompareReport(BaseModel):
    ref: str
    suite: str
    metric: str
    examples: int
    eval_data_sha256: str
    max_tokens: int  # each answer's budget: the longest reference's tokens and a few more
    ceiling_points: float
    rows: list[CompareRow]


Score = Callable[[list[str], list[str], str], float]  # answers, references, metric -> value


@dataclass(frozen=True)
class Candidate:
    artifact: str
    backend: str
    size_bytes: int
    answer: Callable[[list[Example], int], EngineAnswers]  # the test examples, max new tokens -> answers
    served: bool = False


def compare_version(registry: Registry, ref: str, data: Path, *, types: tuple[str, ...] = DEFAULT_TYPES,
                    merged: bool = True, limit: int | None = None, ceiling: float | None = None,
                    score: Score | None = None, adapter_row: CompareRow | None = None) -> CompareReport:
    """Score each artifact on the test split of the prepared dataset ``data`` and record the
    scores in the registry as suite ``<suite>@<artifact>`` (the served path as ``<suite>@served``).

    ``score`` defaults to the trainer's metric of that name, with the dataset's labels and schema.
    ``adapter_row``: the adapter's row from an earlier run on the same prompts, not scored again;
    without it, the adapter's recorded score on the same examples is the reference when there is one."""
    from transformers import AutoTokenizer

    from loragate.trainer.progress import quiet_library_progress

    quiet_library_progress()
    info = registry.get(ref)
    suite, metric = registry.primary_eval(info.name)
    ceiling = registry.settings.quantize.max_quality_loss_points if ceiling is None else ceiling
    dataset = open_prepared(data)
    own_metric = score is None
    if score is None:
        from loragate.trainer.metrics import score_metric

        score = partial(score_metric, labels=dataset.manifest.labels, schema=dataset.manifest.answer_schema)
    examples = dataset.split("test")[:limit]
    data_sha256 = dataset.sha256("test")
    base = base_hf_folder(registry, ref)
    tokenizer = AutoTokenizer.from_pretrained(base)
    references = [e.completion for e in examples]
    max_tokens = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references) + 4

    if adapter_row is None and own_metric:  # a caller's own scorer cannot reuse the metric's recorded score
        adapter_row = _recorded_adapter_row(info, suite, metric, data_sha256, len(examples))
    rows: list[CompareRow] = [adapter_row] if adapter_row else []
    for candidate in _candidates(registry, ref, base, types, merged, adapter=adapter_row is None):
        answered = candidate.answer(examples, max_tokens)
        value = score(answered.answers, references, metric)
        loss = 0.0 if not rows else (rows[0].score - value) * 100
        rows.append(CompareRow(artifact=candidate.artifact, backend=candidate.backend, served=candidate.served,
                               score=value, quality_loss_points=round(loss, 4), fit=loss <= ceiling,
                               size_bytes=candidate.size_bytes, load_s=answered.load_s,
                               tokens_per_s=answered.tokens_per_s))
    report = CompareReport(ref=ref, suite=suite, metric=metric, examples=len(examples), eval_data_sha256=data_sha256,
                           max_tokens=max_tokens, ceiling_points=ceiling, rows=rows)
    _record(registry, report)
    return report


def _recorded_adapter_row(info: VersionInfo, suite: str, metric: str, data_sha256: str,
                          examples: int) -> CompareRow | None:
    """The adapter's own score from ``loragate eval`` (or training) on exactly these examples."""
    recorded = info.score(suite, metric)
    if recorded is None or recorded.eval_data_sha256 != data_sha256 or recorded.sample_count != examples:
        return None
    return CompareRow(artifact="adapter", backend="transformers (recorded eval)", score=recorded.value,
                      quality_loss_points=0.0, fit=True, size_bytes=info.artifact_size)


def _record(registry: Registry, report: CompareReport) -> None:
    for row in report.rows[1:]:  # the adapter's own score is the trainer's to record
        suite = served_suite(report.suite) if row.served else f"{report.suite}@{row.artifact.replace(' ', '-')}"
        registry.add_eval(EvalInput(
            suite=suite, sample_count=report.examples,
            eval_data_sha256=report.eval_data_sha256,
            metrics={report.metric: row.score, "quality_loss_points": row.quality_loss_points,
                     "tokens_per_s": row.tokens_per_s, "load_s": row.load_s},
            higher_is_better={"quality_loss_points": False, "load_s": False}), ref=report.ref)


def _candidates(registry: Registry, ref: str, base: Path, types: tuple[str, ...],
                merged: bool, adapter: bool) -> Iterator[Candidate]:
    """The reference first (unless scored already), then each artifact, exported or converted
    when missing; the served path last, on the backend the gateway serves with."""
    if adapter:
        folder = registry.artifact_path(ref)
        yield Candidate("adapter", "transformers", registry.get(ref).artifact_size,
                        partial(_transformers, base, folder))
    if merged:
        folder = merged_folder(registry, ref)
        yield Candidate("merged", "transformers", _folder_size(folder), partial(_transformers, folder, None))
    for out_type in types:
        if not any(a.kind == "gguf" and a.type == out_type for a in registry.derived_artifacts(ref)):
            export_gguf(registry, ref, out_type)
        path = gguf_path(registry, ref, out_type)
        yield Candidate(f"gguf {out_type}", "llama.cpp", path.stat().st_size, partial(_gguf_on_engine, registry, path))
    yield _served_candidate(registry, ref)


def _served_candidate(registry: Registry, ref: str) -> Candidate:
    """The gateway's own backend (llama.cpp or vLLM, as settings say) with the version's adapter."""
    backend = default_backend(registry.settings, registry)
    if backend.artifact_kind == "gguf-lora":
        if not any(a.kind == "gguf-lora" and a.type == "f16" for a in registry.derived_artifacts(ref)):
            convert_lora_to_gguf(registry, ref)
        lora = lora_gguf_path(registry, ref)
        artifact, size = f"gguf-lora f16 on {llamacpp_base_gguf(registry).name}", lora.stat().st_size
    else:
        artifact, size = f"peft on {backend.weights}", registry.get(ref).artifact_size
    label = {"llamacpp": "llama.cpp", "vllm": "vLLM"}.get(backend.name, backend.name)

    def answer(examples: list[Example], max_tokens: int) -> EngineAnswers:
        handle = adapter_handle(registry, backend, ref)
        return answer_on_backend(backend, _conversations(examples), max_tokens=max_tokens, adapter=handle)

    return Candidate(artifact, label, size, answer, served=True)


def _gguf_on_engine(registry: Registry, gguf: Path, examples: list[Example], max_tokens: int) -> EngineAnswers:
    """A merged GGUF on the gateway's llama.cpp engine, as the backend would serve it as a base."""
    settings = registry.settings
    backend = LlamaCppBackend(settings.gateway.llamacpp, gguf, settings.gateway.request_timeout_s,
                              settings.home / "logs")
    return answer_on_backend(backend, _conversations(examples), max_tokens=max_tokens)


def _conversations(examples: list[Example]) -> list[list[dict[str, str]]]:
    return [[m.model_dump() for m in e.prompt] for e in examples]


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _transformers(model_folder: Path, adapter: Path | None, examples: list[Example], max_tokens: int) -> EngineAnswers:
    """Greedy answers of the Hugging Face model (with the peft adapter, unmerged), one at a time."""
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
    eos = model.generation_config.eos_token_id

    def generate(ids: list[int], new_tokens: int, ignore_eos: bool) -> tuple[str, int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                 min_new_tokens=new_tokens if ignore_eos else 0, eos_token_id=eos, pad_token_id=eos)
        new = out[0, len(ids):].tolist()
        return tokenizer.decode(new, skip_special_tokens=True), len(new)

    prompts = [list(tokenizer.apply_chat_template([m.model_dump() for m in e.prompt], add_generation_prompt=True,
                                                  tokenize=True, return_dict=True)["input_ids"]) for e in examples]
    done = [generate(ids, max_tokens, False) for ids in prompts]
    generate(prompts[0], SPEED_TOKENS, True)  # warm-up, as on the engines
    timed = time.perf_counter()
    _, count = generate(prompts[0], SPEED_TOKENS, True)
    return EngineAnswers(answers=[text for text, _ in done], load_s=load_s,
                         tokens_per_s=count / (time.perf_counter() - timed))
