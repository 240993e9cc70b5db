"""``loragate eval``: the base model, the prompted base model and the adapter on the same
held-out examples, scored, stored in the registry, and the gate's verdict on the result. On a
label task the majority label and a classical classifier (``baselines``) answer them too.

The base model answers each test prompt as it is; the prompted base gets few-shot examples
from the training split (one per label first) before the same prompt; the adapter answers the
plain prompt. One model is loaded: the base subjects run with the adapter disabled.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

from pydantic import BaseModel

from loragate.console import console, errors
from loragate.registry import EvalInput, InvalidInput, Registry

from .baselines import classical_classifier, majority_label
from .dataset import Example, Message, PreparedDataset, open_prepared
from .judge import JudgeReport, JudgeTarget, judge_pairs
from .json_fields import field_accuracy
from .metrics import looks_like_json, score_all
from .progress import quiet_library_progress

SUBJECTS = ("base", "prompted_base", "adapter")
Generator = Callable[[list[Example]], list[str]]


class EvalReport(BaseModel):
    ref: str
    suite: str
    metric: str  # the gate's primary metric
    examples: int
    shots: int
    eval_data_sha256: str
    scores: dict[str, dict[str, float]]  # subject -> metric -> value
    predictions: dict[str, list[str]]  # subject -> answers, in test order
    beat_base: bool
    beat_prompted_base: bool
    beat_majority: bool | None = None  # label tasks only
    beat_classical: bool | None = None
    # What an answer costs at the machine's price (settings.trainer), from the time each took here:
    # the adapter in this eval's batched generation, the classical classifier predicting.
    cost_per_1k_usd: dict[str, float] = {}
    field_accuracy: dict[str, dict[str, float]] = {}  # JSON tasks: subject -> field path -> share right
    predictions_file: str | None = None  # every example's reference and answers, one JSON line each
    promotable: bool  # the production gate's verdict, which also reads licences and contamination
    gate_reasons: list[str]
    gate_notes: list[str] = []
    judge: JudgeReport | None = None


def few_shot(train: Sequence[Example], shots: int, labels: Sequence[str] | None) -> list[Example]:
    """Training examples to show the prompted base: one per label first, then in order."""
    chosen: list[Example] = []
    for label in labels or ():
        match = next((e for e in train if e.completion == label), None)
        if match is not None and len(chosen) < shots:
            chosen.append(match)
    chosen += [e for e in train if e not in chosen][: shots - len(chosen)]
    return chosen


def with_shots(example: Example, shots: Sequence[Example]) -> Example:
    """The example's system messages, then each shot as a user/assistant exchange, then its own turns."""
    system = [m for m in example.prompt if m.role == "system"]
    turns = [m for m in example.prompt if m.role != "system"]
    demonstrations = [message for shot in shots
                      for message in [*(m for m in shot.prompt if m.role != "system"),
                                      Message(role="assistant", content=shot.completion)]]
    return Example(prompt=[*system, *demonstrations, *turns], completion=example.completion)


@contextmanager
def loaded_adapter(base_folder: Path, adapters: dict[str, Path]) -> Iterator[tuple[object, object]]:
    """The base with named peft adapters attached (fp32 on CPU, bf16 on a GPU), and its tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_library_progress()
    on_gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(base_folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.bfloat16 if on_gpu else torch.float32)
    if on_gpu:
        model = model.to("cuda")
    names = list(adapters)
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    yield model, tokenizer


def generator(model, tokenizer, max_new_tokens: int, batch_size: int = 16) -> Generator:
    """Greedy answers, batched by prompt length with left padding."""
    import torch

    def generate(examples: list[Example]) -> list[str]:
        texts = [tokenizer.apply_chat_template([m.model_dump() for m in e.prompt], add_generation_prompt=True,
                                               tokenize=False) for e in examples]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        answers: list[str] = [""] * len(texts)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            for i, row in zip(chunk, out[:, batch["input_ids"].shape[1]:], strict=True):
                answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
        return answers

    return generate


def answer_budget(tokenizer, references: Sequence[str], labels: Sequence[str] | None) -> int:
    """New tokens to allow: a little over the longest reference (labels need only a few)."""
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    return min(512, longest + (4 if labels else 16 + longest // 2))


def evaluate_version(registry: Registry, ref: str, data: Path, *, limit: int | None = None, shots: int = 3,
                     batch_size: int = 16, judge: JudgeTarget | None = None, record: bool = True) -> EvalReport:
    """Score base, prompted base and ``ref`` on the test split; store the scores; ask the gate.

    With ``judge``, the previous version (the parent) answers too and the judge compares."""
    prepared = open_prepared(data)
    info = registry.get(ref)
    test = prepared.split("test")[:limit]
    labels = prepared.manifest.labels
    references = [e.completion for e in test]
    demonstrations = few_shot(prepared.split("train"), shots, labels)
    prompted = [with_shots(e, demonstrations) for e in test]
    adapters = {"adapter": registry.artifact_path(ref)}
    if judge is not None:
        if info.parent is None:
            raise InvalidInput(f"{ref} has no previous version to judge against")
        adapters["previous"] = registry.artifact_path(info.parent)
    predictions: dict[str, list[str]] = {}
    seconds_per_answer: dict[str, float] = {}
    with loaded_adapter(registry.base_model_folder(info.base_model), adapters) as (model, tokenizer):
        generate = generator(model, tokenizer, answer_budget(tokenizer, references, labels), batch_size)
        for subject, examples in (("base", test), ("prompted_base", prompted), ("adapter", test)):
            started = time.perf_counter()
            with model.disable_adapter() if subject != "adapter" else nullcontext():
                predictions[subject] = generate(examples)
            seconds_per_answer[subject] = (time.perf_counter() - started) / len(test)
            errors.print(f"eval {ref}: {subject.replace('_', ' ')} answered {len(test)} examples in "
                         f"{seconds_per_answer[subject] * len(test):.0f} s", highlight=False)
        if judge is not None:
            model.set_adapter("previous")
            previous = generate(test)
        on_gpu = model.device.type == "cuda"
    if labels:
        train = prepared.split("train")
        for answers in (majority_label(train, test), classical_classifier(train, test)):
            predictions[answers.subject] = answers.predictions
            seconds_per_answer[answers.subject] = answers.seconds_per_answer
    schema = prepared.manifest.answer_schema
    scores = {subject: score_all(answers, references, labels, schema) for subject, answers in predictions.items()}
    trainer = registry.settings.trainer
    usd_per_hour = trainer.gpu_usd_per_hour if on_gpu else trainer.cpu_usd_per_hour
    cost = {subject: round(seconds_per_answer[subject] * usd_per_hour / 3600 * 1000, 6)
            for subject in ("adapter", "classical") if subject in seconds_per_answer}
    report = _report(registry, info, prepared, scores, predictions, shots, record, cost)
    if looks_like_json(references):
        report.field_accuracy = {subject: field_accuracy(answers, references) for subject, answers in predictions.items()}
    report.predictions_file = str(_save_predictions(registry, report, test))
    if judge is not None:
        report.judge = judge_pairs(judge, test, predictions["adapter"], previous, new=ref, old=info.parent)
        if record:
            registry.add_eval(EvalInput(suite=f"judge-vs-{info.parent}", metrics={"win_rate": report.judge.win_rate},
                                        sample_count=len(test), eval_data_sha256=report.eval_data_sha256), ref=ref)
    return report


def _report(registry: Registry, info, prepared: PreparedDataset, scores: dict[str, dict[str, float]],
            predictions: dict[str, list[str]], shots: int, record: bool, cost: dict[str, float]) -> EvalReport:
    suite, metric = registry.primary_eval(info.name)
    test_sha = prepared.sha256("test")
    examples = len(predictions["adapter"])
    if record:
        for subject, metrics in scores.items():
            scores_in = EvalInput(suite=suite, metrics=metrics, sample_count=examples, eval_data_sha256=test_sha)
            if subject == "adapter":
                registry.add_eval(scores_in, ref=info.ref)
            else:
                registry.add_eval(scores_in, base=info.base_model, subject=subject)
    gate = registry.check_gate(info.ref, to="production")
    primary = {subject: metrics.get(metric) for subject, metrics in scores.items()}
    return EvalReport(
        ref=info.ref, suite=suite, metric=metric, examples=examples, shots=shots, eval_data_sha256=test_sha,
        scores=scores, predictions=predictions,
        beat_base=_beats(primary["adapter"], primary["base"]),
        beat_prompted_base=_beats(primary["adapter"], primary["prompted_base"]),
        beat_majority=_beats(primary["adapter"], primary["majority"]) if "majority" in primary else None,
        beat_classical=_beats(primary["adapter"], primary["classical"]) if "classical" in primary else None,
        cost_per_1k_usd=cost, promotable=gate.passed, gate_reasons=gate.reasons, gate_notes=gate.notes,
    )


def _save_predictions(registry: Registry, report: EvalReport, test: Sequence[Example]) -> Path:
    """``$LORAGATE_HOME/evals/REF/SUITE-DATA.jsonl``: each prompt, its reference and every subject's
    answer, so that errors can be read, not only counted."""
    path = registry.settings.home / "evals" / report.ref / f"{report.suite}-{report.eval_data_sha256[:12]}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for i, example in enumerate(test):
            row = {"prompt": example.user_text, "reference": example.completion,
                   **{subject: answers[i] for subject, answers in report.predictions.items()}}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _beats(value: float | None, baseline: float | None) -> bool:
    """Strictly better, as the gate reads it (every metric here is higher-is-better)."""
    return value is not None and baseline is not None and value > baseline


def print_eval(report: EvalReport) -> None:
    from loragate.console import table

    metrics = list(report.scores["adapter"])
    table(f"{report.ref} on {report.examples} held-out examples (suite {report.suite}, "
          f"data {report.eval_data_sha256[:12]})",
          ["subject", *metrics],
          [[subject.replace("_", " ") + (f" ({report.shots}-shot)" if subject == "prompted_base" else ""),
            *(f"{values[m]:.3f}" for m in metrics)] for subject, values in report.scores.items()])
    verdict = "beat" if report.beat_prompted_base else "did NOT beat"
    colour = "green" if report.beat_prompted_base else "red"
    console.print(f"[{colour}]fine-tuning {verdict} the prompted base model on {report.metric}[/{colour}] "
                  f"({report.scores['adapter'][report.metric]:.3f} vs "
                  f"{report.scores['prompted_base'][report.metric]:.3f})")
    if report.beat_classical is not None:
        adapter, classical = report.scores["adapter"][report.metric], report.scores["classical"][report.metric]
        costs = report.cost_per_1k_usd
        console.print(f"[{'green' if report.beat_classical else 'yellow'}]the adapter "
                      f"{'beat' if report.beat_classical else 'did NOT beat'} a classical classifier "
                      f"(TF-IDF + logistic regression) on {report.metric}[/] ({adapter:.3f} vs {classical:.3f}); "
                      f"per 1k answers ${costs['adapter']:.4f} against ${costs['classical']:.6f} at this "
                      f"machine's price")
    if report.field_accuracy:
        subjects = list(report.field_accuracy)
        paths = list(report.field_accuracy["adapter"])
        table("share of answers right, by field", ["field", *subjects],
              [[path, *(f"{report.field_accuracy[s].get(path, 0):.3f}" for s in subjects)] for path in paths])
    for note in report.gate_notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    if report.predictions_file:
        console.print(f"every answer beside its reference: {report.predictions_file}")
    if report.promotable:
        console.print(f"[green]{report.ref} is promotable[/green] (`loragate registry promote {report.ref}`)")
    else:
        console.print(f"[red]{report.ref} is not promotable[/red]: " + "; ".join(report.gate_reasons))
    if report.judge is not None:
        j = report.judge
        console.print(f"pairwise judge ({j.judge_model}) {j.new} vs {j.old}: {j.wins} wins, {j.losses} losses, "
                      f"{j.ties} ties, win rate {j.win_rate:.2f}"
                      + (f" ({j.unparsed_replies} replies were not A/B/T)" if j.unparsed_replies else ""))
